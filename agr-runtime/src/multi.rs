//! One optimizer object whose parameters are split between several specs.
//!
//! Real training runs pick the optimizer by the kind of parameter: Muon for
//! the hidden weight matrices, AdamW for embeddings, the head, biases and
//! norm scales. [`Multi`] is that choice as one [`DynOptimizer`]: each
//! parameter goes to the first part whose predicate holds (the predicates of
//! [`crate::groups::select`]), or to the rest; the candle adapter
//! (`CandleDyn`), the tch adapter (`TchDyn`), schedules and checkpoints then
//! see one optimizer (as optax's `multi_transform` does).
//!
//! ```
//! use agr_runtime::groups::select;
//! use agr_runtime::multi::Multi;
//! use agr_runtime::{optim, DynOptimizer, ParamMut};
//!
//! let mut opt = Multi::new(optim::builtin("adamw_agr").unwrap().make())
//!     .part("matrices", select::ndim_at_least(2), optim::builtin("muon_agr").unwrap().make())
//!     .unwrap();
//! let (mut w, mut b) = (vec![0.5_f32; 6], vec![0.5_f32; 3]);
//! let (gw, gb) = (vec![0.1_f32, -0.2, 0.3, 0.0, 0.1, 0.2], vec![0.1_f32, 0.2, -0.1]);
//! opt.step_params(&mut [
//!     ParamMut::new(&mut w, Some(&gw), &[2, 3]),
//!     ParamMut::new(&mut b, Some(&gb), &[3]),
//! ])
//! .unwrap();
//! assert_eq!(opt.group_name(0), "matrices/default");
//! assert_eq!(opt.group_name(1), "rest/default");
//! assert!(opt.state(0, "buf").is_some()); // Muon's momentum
//! assert!(opt.state(1, "m").is_some()); // AdamW's first moment
//! ```
//!
//! What is whose:
//! - [`DynOptimizer::set_lr`] moves every part at the ratio of its learning
//!   rate to the rest's when the part was added (a schedule scales them all,
//!   as PyTorch's schedulers scale each parameter group); the other
//!   hyperparameter calls ([`DynOptimizer::hyper`], `set_hyper`, `desc`,
//!   `name`, `spec`, `hypers`) are the rest's. [`Multi::part_mut`] reaches a
//!   part's own.
//! - The first step splits the parameters by name and shape: names come
//!   from [`DynOptimizer::set_param_names`] (the candle and tch adapters
//!   call it) or [`DynOptimizer::set_param_groups`], which also applies the
//!   groups inside every part (group names read `part/group`). Without
//!   names, predicates on names see an empty name. Once split, a parameter
//!   stays in its part.
//! - A step checks every part's parameters and (unless the policy is
//!   `Ignore`) every gradient for NaN and infinities before any part steps,
//!   so a bad input changes nothing in any part. Parts with matrix blocks
//!   step first: a matrix block that does not fit its parameter fails before
//!   the other parts move. (Two parts that both have matrix blocks are the
//!   exception: the first may have stepped when the second fails.)
//! - On a CUDA device the parts decide non-finite skips each on its own (the
//!   step reads nothing back to check gradients first).

use std::fmt;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::cpu::KernelDesc;
use crate::groups::{GroupError, ParamInfo, Selector};
use crate::{
    CheckpointError, ConfigError, Device, DeviceError, DynOptimizer, HyperInfo, HyperValue,
    NonFinite, ParamGroups, ParamMut, StepError, StepReport,
};

/// The name of the part that takes every parameter no predicate selects.
pub const REST: &str = "rest";

const FORMAT: &str = "agr-multi/1";

struct Part {
    name: String,
    /// `None` for the rest.
    select: Option<Selector>,
    opt: Box<dyn DynOptimizer>,
    /// Its learning rate when added (for [`DynOptimizer::set_lr`]'s ratio).
    base_lr: Option<f64>,
}

/// Several optimizers behind one: see the [module docs](self).
pub struct Multi {
    /// The rest first, then the parts in the order they were added (which is
    /// the order their predicates are tried).
    parts: Vec<Part>,
    /// Per parameter, in step order: its part and its index there.
    route: Option<Vec<(usize, usize)>>,
    /// Per parameter: `part/group`.
    group_names: Vec<String>,
    /// The parameters' names, where known before the split (the first step
    /// splits by them and the shapes).
    names: Option<Vec<String>>,
    /// The groups last applied (re-applied to the parts already changed if
    /// a later part refuses new ones).
    groups: Option<(ParamGroups, Vec<(String, Vec<usize>)>)>,
    policy: NonFinite,
    steps: u64,
    skips: u64,
}

impl fmt::Debug for Multi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Multi")
            .field(
                "parts",
                &self
                    .parts
                    .iter()
                    .map(|p| (p.name.as_str(), p.opt.name()))
                    .collect::<Vec<_>>(),
            )
            .field("steps", &self.steps)
            .finish()
    }
}

impl Multi {
    /// `rest` steps every parameter that no part's predicate selects.
    pub fn new(rest: Box<dyn DynOptimizer>) -> Multi {
        let policy = NonFinite::default();
        let mut m = Multi {
            parts: vec![],
            route: None,
            names: None,
            group_names: vec![],
            groups: None,
            policy,
            steps: 0,
            skips: 0,
        };
        m.push(REST, None, rest);
        m
    }

    fn push(&mut self, name: &str, select: Option<Selector>, mut opt: Box<dyn DynOptimizer>) {
        opt.set_non_finite_policy(self.policy);
        self.parts.push(Part {
            name: name.to_string(),
            select,
            base_lr: opt.lr(),
            opt,
        });
    }

    /// Adds a part: the parameters for which `select` holds (and no earlier
    /// part's predicate does) step with `opt`. Only before the first step;
    /// names are unique and not `rest`.
    pub fn part(
        mut self,
        name: &str,
        select: impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static,
        opt: Box<dyn DynOptimizer>,
    ) -> Result<Multi, GroupError> {
        if self.route.is_some() {
            return Err(GroupError::Misuse(format!(
                "part `{name}` was added after the parameters were split between the parts; add every part before the first step"
            )));
        }
        if name.is_empty() || name.contains('/') || self.parts.iter().any(|p| p.name == name) {
            return Err(GroupError::Misuse(format!(
                "part name `{name}` is empty, holds a `/` or is taken (the parts are {})",
                self.part_names().join(", ")
            )));
        }
        self.push(name, Some(std::sync::Arc::new(select)), opt);
        Ok(self)
    }

    /// The parts' names: `rest` first, then in the order added.
    pub fn part_names(&self) -> Vec<&str> {
        self.parts.iter().map(|p| p.name.as_str()).collect()
    }

    /// Part `name`'s optimizer (its own hyperparameters, groups, state).
    pub fn part_mut(&mut self, name: &str) -> Option<&mut dyn DynOptimizer> {
        let p = self.parts.iter_mut().find(|p| p.name == name)?;
        Some(p.opt.as_mut())
    }

    /// Part `name`'s optimizer.
    pub fn part_ref(&self, name: &str) -> Option<&dyn DynOptimizer> {
        self.parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.opt.as_ref())
    }

    /// The part that steps parameter `index`, once the parameters are split.
    pub fn part_of(&self, index: usize) -> Option<&str> {
        let (k, _) = *self.route.as_ref()?.get(index)?;
        Some(&self.parts[k].name)
    }

    /// Which part each parameter goes to, and its index there.
    fn split(&self, params: &[(&str, &[usize])]) -> Vec<(usize, usize)> {
        let mut counts = vec![0; self.parts.len()];
        params
            .iter()
            .enumerate()
            .map(|(index, &(name, shape))| {
                let info = ParamInfo { index, name, shape };
                let k = (1..self.parts.len())
                    .find(|&k| self.parts[k].select.as_ref().is_some_and(|s| s(&info)))
                    .unwrap_or(0);
                counts[k] += 1;
                (k, counts[k] - 1)
            })
            .collect()
    }

    /// The split of `params`, checked against the one in use.
    fn route_for(&self, params: &[(&str, &[usize])]) -> Result<Vec<(usize, usize)>, GroupError> {
        let route = self.split(params);
        if let Some(old) = &self.route {
            if old.len() != route.len() {
                return Err(GroupError::ParamCount {
                    expected: old.len(),
                    got: route.len(),
                });
            }
            if let Some(i) = (0..old.len()).find(|&i| old[i] != route[i]) {
                return Err(GroupError::Misuse(format!(
                    "parameter #{i} (`{}`) would move from part `{}` to part `{}`, but the parameters are already split (a part's state is its own); split them the same way, or start a new optimizer",
                    params[i].0,
                    self.parts[old[i].0].name,
                    self.parts[route[i].0].name
                )));
            }
        }
        Ok(route)
    }

    /// The split a step's parameters (their shapes) go by: the one in use,
    /// or the first step's.
    fn route_of<'s>(
        &self,
        shapes: impl ExactSizeIterator<Item = &'s [usize]>,
    ) -> Result<Vec<(usize, usize)>, StepError> {
        match &self.route {
            _ if shapes.len() == 0 => Err(StepError::NoParams),
            Some(r) if r.len() != shapes.len() => Err(StepError::ParamCount {
                expected: r.len(),
                got: shapes.len(),
            }),
            Some(r) => Ok(r.clone()),
            None => self.first_split(shapes),
        }
    }

    /// Steps every part with parameters (`step` on part `k`'s share), those
    /// with matrix blocks first, and counts the step.
    /// A step over parameters of `T`: split between the parts, each part's
    /// share checked (`check`) before any part steps (`step`), the
    /// non-finite check over every gradient first.
    fn step_typed<T: crate::Element>(
        &mut self,
        params: &mut [ParamMut<'_, T>],
        check: impl Fn(&dyn DynOptimizer, &[ParamMut<'_, T>]) -> Result<(), StepError>,
        mut step: impl FnMut(
            &mut dyn DynOptimizer,
            &mut [ParamMut<'_, T>],
        ) -> Result<StepReport, StepError>,
    ) -> Result<StepReport, StepError> {
        let route = self.route_of(params.iter().map(|p| p.shape))?;
        let members: Vec<Vec<usize>> = (0..self.parts.len())
            .map(|k| Self::members(&route, k))
            .collect();
        let mut subs: Vec<Vec<ParamMut<'_, T>>> = (0..self.parts.len()).map(|_| vec![]).collect();
        for (i, p) in params.iter_mut().enumerate() {
            subs[route[i].0].push(ParamMut {
                value: &mut *p.value,
                grad: p.grad,
                shape: p.shape,
            });
        }
        for (k, sub) in subs.iter().enumerate() {
            if !sub.is_empty() {
                check(self.parts[k].opt.as_ref(), sub)
                    .map_err(|e| Self::global_error(e, &members[k]))?;
            }
        }
        let on_host = self
            .parts
            .iter()
            .all(|p| matches!(p.opt.device(), Device::Cpu));
        if self.policy != NonFinite::Ignore && on_host {
            // In step order, so the lowest index is the one reported.
            let mut grads: Vec<(usize, &[T])> = subs
                .iter()
                .enumerate()
                .flat_map(|(k, sub)| {
                    let m = &members[k];
                    sub.iter()
                        .enumerate()
                        .filter_map(move |(j, p)| Some((m[j], p.grad?)))
                })
                .collect();
            grads.sort_by_key(|&(i, _)| i);
            let bad = grads
                .par_iter()
                .find_first(|(_, g)| g.iter().any(|x| !x.to_f32().is_finite()))
                .map(|&(i, _)| i);
            if let Some(index) = bad {
                if self.policy == NonFinite::Error {
                    return Err(StepError::NonFinite { index });
                }
                self.skips += 1;
                return Ok(StepReport {
                    step: self.steps,
                    updated: 0,
                    skipped: 0,
                    skipped_non_finite: Some(index),
                });
            }
        }
        if self.route.is_none() {
            self.set_route(route);
        }
        self.step_parts(&mut subs, &members, |opt, sub| step(opt, sub))
    }

    /// The count of parameters a step passes, against the split.
    fn check_count(&self, n: usize) -> Result<(), StepError> {
        match &self.route {
            Some(r) if r.len() != n => Err(StepError::ParamCount {
                expected: r.len(),
                got: n,
            }),
            _ if n == 0 => Err(StepError::NoParams),
            _ => Ok(()),
        }
    }

    fn step_parts<P>(
        &mut self,
        subs: &mut [Vec<P>],
        members: &[Vec<usize>],
        mut step: impl FnMut(&mut dyn DynOptimizer, &mut Vec<P>) -> Result<StepReport, StepError>,
    ) -> Result<StepReport, StepError> {
        let mut report = StepReport {
            step: 0,
            updated: 0,
            skipped: 0,
            skipped_non_finite: None,
        };
        for k in self.step_order() {
            if subs[k].is_empty() {
                continue;
            }
            let r = step(self.parts[k].opt.as_mut(), &mut subs[k])
                .map_err(|e| Self::global_error(e, &members[k]))?;
            report.updated += r.updated;
            report.skipped += r.skipped;
            if let Some(i) = r.skipped_non_finite {
                report.skipped_non_finite.get_or_insert(members[k][i]);
            }
        }
        self.steps += 1;
        report.step = self.steps;
        Ok(report)
    }

    /// The split on the first step: by the names given, where given (their
    /// count checked), and the shapes.
    fn first_split<'s>(
        &self,
        shapes: impl ExactSizeIterator<Item = &'s [usize]>,
    ) -> Result<Vec<(usize, usize)>, StepError> {
        let n = shapes.len();
        let names: Vec<&str> = match &self.names {
            Some(names) if names.len() != n => {
                return Err(StepError::ParamCount {
                    expected: names.len(),
                    got: n,
                })
            }
            Some(names) => names.iter().map(String::as_str).collect(),
            None => vec![""; n],
        };
        let list: Vec<(&str, &[usize])> = names.into_iter().zip(shapes).collect();
        Ok(self.split(&list))
    }

    /// Uses `route` from now on; each part learns its parameters' names.
    fn set_route(&mut self, route: Vec<(usize, usize)>) {
        if let Some(names) = &self.names {
            for k in 0..self.parts.len() {
                let sub: Vec<String> = Self::members(&route, k)
                    .into_iter()
                    .map(|i| names[i].clone())
                    .collect();
                if !sub.is_empty() {
                    // The part steps exactly these parameters: it takes them.
                    let _ = self.parts[k].opt.set_param_names(sub);
                }
            }
        }
        self.group_names = route
            .iter()
            .map(|&(k, j)| format!("{}/{}", self.parts[k].name, self.parts[k].opt.group_name(j)))
            .collect();
        self.route = Some(route);
    }

    /// The indices (in step order) of part `k`'s parameters.
    fn members(route: &[(usize, usize)], k: usize) -> Vec<usize> {
        (0..route.len()).filter(|&i| route[i].0 == k).collect()
    }

    /// Parts in stepping order: those with matrix blocks first (they are
    /// the only ones that can fail once the checks have passed).
    fn step_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.parts.len()).collect();
        order.sort_by_key(|&k| self.parts[k].opt.desc().matrices.is_empty());
        order
    }

    /// `e` with its parameter index taken back from part numbering to ours.
    fn global_error(e: StepError, members: &[usize]) -> StepError {
        let g = |i: usize| members.get(i).copied().unwrap_or(i);
        match e {
            StepError::ShapeLen { index, shape, len } => StepError::ShapeLen {
                index: g(index),
                shape,
                len,
            },
            StepError::GradLen {
                index,
                expected,
                got,
            } => StepError::GradLen {
                index: g(index),
                expected,
                got,
            },
            StepError::StateShape {
                index,
                expected,
                got,
            } => StepError::StateShape {
                index: g(index),
                expected,
                got,
            },
            StepError::Empty { index } => StepError::Empty { index: g(index) },
            StepError::NonFinite { index } => StepError::NonFinite { index: g(index) },
            StepError::Matrix {
                index,
                block,
                shape,
                message,
            } => StepError::Matrix {
                index: g(index),
                block,
                shape,
                message,
            },
            other => other,
        }
    }

    /// Moves every part (all or none: on error the parts already moved go
    /// back).
    fn for_all_parts(
        &mut self,
        mut apply: impl FnMut(&mut dyn DynOptimizer) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let before: Vec<Device> = self.parts.iter().map(|p| p.opt.device()).collect();
        for k in 0..self.parts.len() {
            if let Err(e) = apply(self.parts[k].opt.as_mut()) {
                for (j, d) in before.iter().enumerate().take(k) {
                    // Back where it was (a move back to a place it ran on).
                    let _ = self.parts[j].opt.set_device(*d);
                }
                // The part's error names its optimizer.
                return Err(e);
            }
        }
        Ok(())
    }
}

impl DynOptimizer for Multi {
    /// The rest's.
    fn desc(&self) -> &'static KernelDesc {
        self.parts[0].opt.desc()
    }
    /// The rest's.
    fn name(&self) -> &'static str {
        self.parts[0].opt.name()
    }
    /// The rest's.
    fn spec(&self) -> &'static str {
        self.parts[0].opt.spec()
    }
    /// The rest's.
    fn hypers(&self) -> &'static [HyperInfo] {
        self.parts[0].opt.hypers()
    }
    /// The rest's.
    fn hyper(&self, name: &str) -> Option<HyperValue> {
        self.parts[0].opt.hyper(name)
    }
    /// The rest's (see [`Multi::part_mut`] for a part's); `lr` goes through
    /// [`DynOptimizer::set_lr`].
    fn set_hyper(&mut self, name: &str, value: HyperValue) -> Result<(), ConfigError> {
        if name == "lr" {
            if let HyperValue::Float(lr) = value {
                return self.set_lr(lr);
            }
        }
        self.parts[0].opt.set_hyper(name, value)
    }

    fn step_params(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, StepError> {
        self.step_typed(params, |o, p| o.check_params(p), |o, p| o.step_params(p))
    }

    /// The count alone: each part checks its own parameters when a step
    /// splits them (before any part moves).
    fn check_params(&self, params: &[ParamMut<'_>]) -> Result<(), StepError> {
        self.check_count(params.len())
    }

    /// The rest's learning rate.
    fn lr(&self) -> Option<f64> {
        self.parts[0].opt.lr()
    }

    /// Sets the rest's learning rate to `lr` and every part's to `lr` times
    /// the ratio of their learning rates when the part was added (all or
    /// none).
    fn set_lr(&mut self, lr: f64) -> Result<(), ConfigError> {
        let base = self.parts[0].base_lr;
        let before: Vec<Option<f64>> = self.parts.iter().map(|p| p.opt.lr()).collect();
        for k in 0..self.parts.len() {
            let target = match (self.parts[k].base_lr, base) {
                (Some(own), Some(rest)) if k > 0 && rest != 0.0 => lr * own / rest,
                (Some(_), _) => lr,
                (None, _) => continue,
            };
            if let Err(e) = self.parts[k].opt.set_lr(target) {
                for (j, old) in before.iter().enumerate().take(k) {
                    if let Some(old) = old {
                        let _ = self.parts[j].opt.set_lr(*old);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn state(&self, index: usize, name: &str) -> Option<&[f32]> {
        let (k, j) = *self.route.as_ref()?.get(index)?;
        self.parts[k].opt.state(j, name)
    }

    fn state_to_host(&self, index: usize, name: &str) -> Option<Vec<f32>> {
        let (k, j) = *self.route.as_ref()?.get(index)?;
        self.parts[k].opt.state_to_host(j, name)
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn tensor_steps(&self, index: usize) -> u64 {
        match self.route.as_ref().and_then(|r| r.get(index)) {
            Some(&(k, j)) => self.parts[k].opt.tensor_steps(j),
            None => 0,
        }
    }

    fn set_non_finite_policy(&mut self, policy: NonFinite) {
        self.policy = policy;
        for p in &mut self.parts {
            p.opt.set_non_finite_policy(policy);
        }
    }

    /// Steps skipped as a whole here, plus the most any part skipped on its
    /// own (on a CUDA device, where each part decides).
    fn non_finite_skips(&self) -> u64 {
        self.skips
            + self
                .parts
                .iter()
                .map(|p| p.opt.non_finite_skips())
                .max()
                .unwrap_or(0)
    }

    /// Splits the parameters between the parts (by name and shape), then
    /// applies `groups` inside each part. All or nothing.
    fn set_param_groups(
        &mut self,
        groups: &ParamGroups,
        params: &[(&str, &[usize])],
    ) -> Result<(), GroupError> {
        let route = self.route_for(params)?;
        for k in 0..self.parts.len() {
            let sub: Vec<(&str, &[usize])> = Self::members(&route, k)
                .into_iter()
                .map(|i| params[i])
                .collect();
            if sub.is_empty() {
                continue;
            }
            if let Err(e) = self.parts[k].opt.set_param_groups(groups, &sub) {
                // The parts already changed take back the groups they had.
                let (old, names) = self.groups.clone().unwrap_or_else(|| {
                    let names = params
                        .iter()
                        .map(|(n, s)| (n.to_string(), s.to_vec()))
                        .collect();
                    (ParamGroups::new(), names)
                });
                for j in 0..k {
                    let sub: Vec<(&str, &[usize])> = Self::members(&route, j)
                        .into_iter()
                        .map(|i| (names[i].0.as_str(), names[i].1.as_slice()))
                        .collect();
                    if !sub.is_empty() {
                        let _ = self.parts[j].opt.set_param_groups(&old, &sub);
                    }
                }
                return Err(match e {
                    GroupError::Misuse(m) => {
                        GroupError::Misuse(format!("part `{}`: {m}", self.parts[k].name))
                    }
                    other => other,
                });
            }
        }
        self.names = Some(params.iter().map(|(n, _)| n.to_string()).collect());
        self.groups = Some((
            groups.clone(),
            params
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_vec()))
                .collect(),
        ));
        self.set_route(route);
        Ok(())
    }

    fn group_name(&self, index: usize) -> &str {
        self.group_names.get(index).map_or(REST, |s| s.as_str())
    }

    /// Names the parameters: the first step splits them by these names and
    /// their shapes, and each part checks its checkpoints against them.
    fn set_param_names(&mut self, names: Vec<String>) -> Result<(), GroupError> {
        if let Some(route) = &self.route {
            if route.len() != names.len() {
                return Err(GroupError::ParamCount {
                    expected: route.len(),
                    got: names.len(),
                });
            }
        }
        self.names = Some(names);
        if let Some(route) = self.route.clone() {
            self.set_route(route);
        }
        Ok(())
    }

    fn set_device(&mut self, device: Device) -> Result<(), DeviceError> {
        self.for_all_parts(|o| o.set_device(device))
    }

    /// The rest's (every part is on the same device).
    fn device(&self) -> Device {
        self.parts[0].opt.device()
    }

    #[cfg(feature = "cuda")]
    fn set_cuda_stream(
        &mut self,
        stream: std::sync::Arc<crate::cuda::CudaStream>,
        dtype: crate::cuda::DType,
    ) -> Result<(), DeviceError> {
        self.for_all_parts(|o| o.set_cuda_stream(stream.clone(), dtype))
    }

    #[cfg(feature = "cuda")]
    fn cuda_stream(&self) -> Option<&std::sync::Arc<crate::cuda::CudaStream>> {
        self.parts[0].opt.cuda_stream()
    }

    #[cfg(feature = "cuda")]
    fn cuda_dtype(&self) -> Option<crate::cuda::DType> {
        self.parts[0].opt.cuda_dtype()
    }

    #[cfg(feature = "cuda")]
    unsafe fn step_raw(
        &mut self,
        params: &[crate::cuda::RawCudaParam<'_>],
    ) -> Result<StepReport, StepError> {
        let route = self.route_of(params.iter().map(|p| p.shape))?;
        let mut subs: Vec<Vec<crate::cuda::RawCudaParam<'_>>> =
            (0..self.parts.len()).map(|_| vec![]).collect();
        for (i, p) in params.iter().enumerate() {
            subs[route[i].0].push(crate::cuda::RawCudaParam {
                value: p.value,
                grad: p.grad,
                shape: p.shape,
            });
        }
        let members: Vec<Vec<usize>> = (0..self.parts.len())
            .map(|k| Self::members(&route, k))
            .collect();
        if self.route.is_none() {
            self.set_route(route);
        }
        // SAFETY: the caller's contract, for a subset of its parameters.
        self.step_parts(&mut subs, &members, |opt, sub| unsafe { opt.step_raw(sub) })
    }

    /// One safetensors file: every part's checkpoint as bytes, and the split.
    fn save_checkpoint(&self) -> Vec<u8> {
        let blobs: Vec<(String, Vec<u8>)> = self
            .parts
            .iter()
            .map(|p| (format!("part/{}", p.name), p.opt.save_checkpoint()))
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(
            "parts".to_string(),
            serde_json::json!(self.part_names()).to_string(),
        );
        meta.insert(
            "route".to_string(),
            serde_json::json!(self.route).to_string(),
        );
        meta.insert("steps".to_string(), self.steps.to_string());
        meta.insert("skips".to_string(), self.skips.to_string());
        let views: Vec<(String, TensorView<'_>)> = blobs
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::U8, vec![b.len()], b).expect("sizes match"),
                )
            })
            .collect();
        safetensors::serialize(views, Some(meta)).expect("a checkpoint always serialises")
    }

    /// Restores every part (all or nothing: on error each part is as it
    /// was).
    fn load_checkpoint(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        let corrupt = |e: String| CheckpointError::Corrupt(e);
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| corrupt("no metadata".into()))?;
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| corrupt(format!("no field `{k}`")))
        };
        if field("format")? != FORMAT {
            return Err(CheckpointError::WrongOptimizer {
                expected: format!("a multi-part optimizer ({FORMAT})"),
                found: field("format")?.clone(),
            });
        }
        let parts: Vec<String> =
            serde_json::from_str(field("parts")?).map_err(|e| corrupt(format!("parts: {e}")))?;
        if parts != self.part_names() {
            return Err(CheckpointError::Mismatch(format!(
                "it holds the parts {parts:?}, this optimizer has {:?}",
                self.part_names()
            )));
        }
        let route: Option<Vec<(usize, usize)>> =
            serde_json::from_str(field("route")?).map_err(|e| corrupt(format!("route: {e}")))?;
        if let Some(r) = &route {
            if r.iter().any(|&(k, _)| k >= parts.len()) {
                return Err(corrupt("route: a part out of range".into()));
            }
        }
        if let (Some(saved), Some(ours)) = (&route, &self.route) {
            if saved != ours {
                return Err(CheckpointError::Mismatch(
                    "its parameters were split between the parts differently".into(),
                ));
            }
        }
        let number = |k: &str| -> Result<u64, CheckpointError> {
            field(k)?.parse().map_err(|e| corrupt(format!("{k}: {e}")))
        };
        let (steps, skips) = (number("steps")?, number("skips")?);
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut blobs = vec![];
        for p in &parts {
            let t = st
                .tensor(&format!("part/{p}"))
                .map_err(|e| corrupt(format!("part `{p}`: {e}")))?;
            blobs.push(t.data().to_vec());
        }
        let backups: Vec<Vec<u8>> = self.parts.iter().map(|p| p.opt.save_checkpoint()).collect();
        for k in 0..self.parts.len() {
            if let Err(e) = self.parts[k].opt.load_checkpoint(&blobs[k]) {
                for (j, b) in backups.iter().enumerate().take(k) {
                    // What it saved a moment ago loads back.
                    let _ = self.parts[j].opt.load_checkpoint(b);
                }
                let name = &self.parts[k].name;
                return Err(match e {
                    CheckpointError::Mismatch(m) => {
                        CheckpointError::Mismatch(format!("part `{name}`: {m}"))
                    }
                    CheckpointError::Corrupt(m) => {
                        CheckpointError::Corrupt(format!("part `{name}`: {m}"))
                    }
                    other => other,
                });
            }
        }
        if let Some(r) = route {
            self.set_route(r);
        }
        self.steps = steps;
        self.skips = skips;
        Ok(())
    }
    /// Every part, over the same ranks (each part's parameters are
    /// planned on their own).
    fn shard(
        &mut self,
        comm: std::sync::Arc<dyn crate::comm::Comm>,
        grads: crate::shard::GradMode,
    ) -> Result<(), crate::shard::ShardError> {
        for p in &mut self.parts {
            p.opt.shard(comm.clone(), grads)?;
        }
        Ok(())
    }
    fn state_bytes(&self) -> crate::shard::StateBytes {
        let mut b = crate::shard::StateBytes::default();
        for p in &self.parts {
            let s = p.opt.state_bytes();
            b.state += s.state;
            b.results += s.results;
        }
        b
    }

    /// A `Multi` keeps f32 everywhere in this version: set the precision of
    /// its parts' optimizers before building it.
    fn set_precision(
        &mut self,
        precision: crate::Precision,
    ) -> Result<(), crate::precision::PrecisionError> {
        if precision == crate::Precision::f32() {
            return Ok(());
        }
        Err(crate::precision::PrecisionError(
            "a Multi's precision is its parts' (set it on each part's optimizer before building the Multi)".into(),
        ))
    }

    fn precision(&self) -> crate::Precision {
        crate::Precision::f32()
    }

    fn step_params_bf16(
        &mut self,
        params: &mut [ParamMut<'_, half::bf16>],
    ) -> Result<StepReport, StepError> {
        self.step_typed(
            params,
            |o, p| o.check_params_bf16(p),
            |o, p| o.step_params_bf16(p),
        )
    }

    fn step_params_f16(
        &mut self,
        params: &mut [ParamMut<'_, half::f16>],
    ) -> Result<StepReport, StepError> {
        self.step_typed(
            params,
            |o, p| o.check_params_f16(p),
            |o, p| o.step_params_f16(p),
        )
    }

    fn check_params_bf16(&self, params: &[ParamMut<'_, half::bf16>]) -> Result<(), StepError> {
        self.check_count(params.len())
    }

    fn check_params_f16(&self, params: &[ParamMut<'_, half::f16>]) -> Result<(), StepError> {
        self.check_count(params.len())
    }
}

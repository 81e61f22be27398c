//! candle adapter (feature `candle`): every generated optimizer is a
//! `candle_nn::Optimizer`, so `candle_nn::AdamW::new(vars, params)` becomes
//! `agr_runtime::optim::AdamWAgr::new(vars, Default::default())`.
//!
//! CPU `f32` variables are updated in place with the fused step, through
//! candle's public in-place custom ops: the write locks of all variables are
//! taken one inside the other, then one step runs over all of them (global
//! reductions need every tensor at once). Variables without a gradient in the
//! `GradStore` are skipped. No per-step copy of parameters or gradients.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Var};

use crate::cpu::Kernel;
use crate::groups::{GroupError, ParamGroups};
use crate::{DynOptimizer, Optimizer, ParamMut, StepReport};
use candle_nn::VarMap;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// What runs once every variable's write lock is held: the step over
/// (pointer, length) of each variable.
type AtBottom<'f> = &'f mut dyn FnMut(&[(usize, usize)]) -> candle_core::Result<()>;

/// One variable's place in the nested in-place ops.
struct Gather<'a, 'f> {
    rest: &'a [Var],
    ptrs: &'a RefCell<Vec<(usize, usize)>>,
    at_bottom: &'a RefCell<AtBottom<'f>>,
}

impl InplaceOp1 for Gather<'_, '_> {
    fn name(&self) -> &'static str {
        "agr-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            return Err(err(
                "agr's candle adapter updates f32 variables; convert the model to f32",
            ));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(err(
                "a variable is not contiguous; agr updates contiguous variables in place",
            ));
        };
        let slice = &mut data[start..end];
        self.ptrs
            .borrow_mut()
            .push((slice.as_mut_ptr() as usize, slice.len()));
        match self.rest.split_first() {
            // Still holding this variable's write lock: take the next one's.
            Some((next, rest)) => next.inplace_op1(&Gather {
                rest,
                ptrs: self.ptrs,
                at_bottom: self.at_bottom,
            }),
            None => {
                let ptrs = self.ptrs.borrow().clone();
                (self.at_bottom.borrow_mut())(&ptrs)
            }
        }
    }
}

/// Checks `vars` for an optimizer: distinct `f32` variables.
fn check_vars(vars: &[Var]) -> candle_core::Result<()> {
    let mut ids = std::collections::HashSet::new();
    for (i, v) in vars.iter().enumerate() {
        if !ids.insert(v.as_tensor().id()) {
            return Err(err(format!("variable #{i} was passed twice")));
        }
        if v.dtype() != candle_core::DType::F32 {
            return Err(err(format!(
                "variable #{i} is {:?}; agr's candle adapter updates f32 variables",
                v.dtype()
            )));
        }
        if !v.device().is_cpu() {
            return Err(err(format!(
                "variable #{i} is on {:?}; agr's candle adapter steps CPU variables (for GPU tensors use agr_runtime::cuda::CudaOptimizer on their device pointers)",
                v.device().location()
            )));
        }
    }
    Ok(())
}

/// The variables of `varmap`, sorted by name (a stable order for state and
/// checkpoints), with their names.
pub fn named_vars(varmap: &VarMap) -> (Vec<String>, Vec<Var>) {
    let data = varmap
        .data()
        .lock()
        .expect("the VarMap's lock is not poisoned");
    let mut named: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().unzip()
}

/// Runs `step` once over `vars` and their gradients in `grads`, with every
/// variable's storage borrowed in place (CPU, f32, contiguous). Variables
/// without a gradient are passed with `grad: None`. This is how every agr
/// optimizer steps candle variables; use it to drive your own steppers.
pub fn step_vars<E: std::fmt::Display>(
    vars: &[Var],
    grads: &GradStore,
    step: &mut dyn FnMut(&mut [ParamMut<'_>]) -> Result<StepReport, E>,
) -> candle_core::Result<Option<StepReport>> {
    if vars.is_empty() {
        return Ok(None);
    }
    // Read access to every gradient for the whole step.
    let grad_tensors: Vec<Option<candle_core::Tensor>> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).cloned())
        .collect();
    let guards: Vec<Option<(candle_core::StorageRef<'_>, &Layout)>> = grad_tensors
        .iter()
        .map(|g| g.as_ref().map(|g| g.storage_and_layout()))
        .collect();
    let mut grad_slices: Vec<Option<&[f32]>> = Vec::with_capacity(guards.len());
    for (i, g) in guards.iter().enumerate() {
        grad_slices.push(match g {
            None => None,
            Some((storage, layout)) => {
                let Storage::Cpu(CpuStorage::F32(data)) = &**storage else {
                    return Err(err(format!(
                        "the gradient of variable #{i} is not an f32 CPU tensor"
                    )));
                };
                let Some((start, end)) = layout.contiguous_offsets() else {
                    return Err(err(format!(
                        "the gradient of variable #{i} is not contiguous"
                    )));
                };
                Some(&data[start..end])
            }
        });
    }
    let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.dims().to_vec()).collect();
    let mut outcome: Option<Result<StepReport, String>> = None;
    let mut run = |ptrs: &[(usize, usize)]| -> candle_core::Result<()> {
        let mut params: Vec<ParamMut<'_>> = ptrs
            .iter()
            .zip(&grad_slices)
            .zip(&shapes)
            .map(|((&(p, n), g), s)| {
                // SAFETY: each pointer is a live, exclusively locked f32
                // slice of length n (the nested in-place ops hold the
                // write locks while this runs); variables are distinct.
                let value = unsafe { std::slice::from_raw_parts_mut(p as *mut f32, n) };
                ParamMut::new(value, *g, s)
            })
            .collect();
        outcome = Some(step(&mut params).map_err(|e| e.to_string()));
        Ok(())
    };
    let ptrs = RefCell::new(Vec::with_capacity(vars.len()));
    let bottom: RefCell<AtBottom<'_>> = RefCell::new(&mut run);
    let (first, rest) = vars.split_first().expect("not empty");
    first.inplace_op1(&Gather {
        rest,
        ptrs: &ptrs,
        at_bottom: &bottom,
    })?;
    match outcome {
        Some(Ok(report)) => Ok(Some(report)),
        Some(Err(e)) => Err(err(e)),
        None => Err(err("the step did not run")),
    }
}

impl<K: Kernel> Optimizer<K> {
    /// Every variable of `varmap`, in name order, remembered with its name
    /// for [`Optimizer::set_candle_groups`] and checkpoints.
    pub fn from_varmap(varmap: &VarMap, config: K::Config) -> candle_core::Result<Self> {
        let (names, vars) = named_vars(varmap);
        let mut opt = <Self as candle_nn::Optimizer>::new(vars, config)?;
        opt.set_param_names(names.clone()).map_err(err)?;
        opt.var_names = names;
        Ok(opt)
    }

    /// The candle variables' names (`0`, `1`, ... unless built by
    /// [`Optimizer::from_varmap`]).
    pub fn var_names(&self) -> &[String] {
        &self.var_names
    }

    /// Groups the candle variables by name and shape (see [`crate::groups`]).
    pub fn set_candle_groups(&mut self, groups: &ParamGroups) -> Result<(), GroupError> {
        let shapes: Vec<Vec<usize>> = self.vars.iter().map(|v| v.dims().to_vec()).collect();
        let names = self.var_names.clone();
        let params: Vec<(&str, &[usize])> = names
            .iter()
            .zip(&shapes)
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        self.set_param_groups(groups, &params)
    }

    /// The last candle step's report.
    pub fn last_report(&self) -> Option<StepReport> {
        self.last_report
    }
}

impl<K: Kernel> candle_nn::Optimizer for Optimizer<K> {
    type Config = K::Config;

    fn new(vars: Vec<Var>, config: K::Config) -> candle_core::Result<Self> {
        check_vars(&vars)?;
        let mut opt = Optimizer::<K>::with_config(config).map_err(err)?;
        opt.var_names = (0..vars.len()).map(|i| i.to_string()).collect();
        opt.vars = vars;
        Ok(opt)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let vars = self.vars.clone();
        self.last_report = step_vars(&vars, grads, &mut |params| {
            Optimizer::<K>::step(self, params)
        })?;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        Optimizer::<K>::learning_rate(self).unwrap_or(0.0)
    }

    /// Sets `lr`; a value outside its range is ignored (the trait cannot
    /// report it: use `Optimizer::set_learning_rate` to get the error).
    fn set_learning_rate(&mut self, lr: f64) {
        let _ = Optimizer::<K>::set_learning_rate(self, lr);
    }
}

/// Any optimizer chosen at run time ([`DynOptimizer`], e.g. a built-in by
/// name) over candle variables.
pub struct CandleDyn {
    pub opt: Box<dyn DynOptimizer>,
    vars: Vec<Var>,
    names: Vec<String>,
    last_report: Option<StepReport>,
}

impl CandleDyn {
    /// `opt` over `vars` (named `0`, `1`, ...).
    pub fn new(opt: Box<dyn DynOptimizer>, vars: Vec<Var>) -> candle_core::Result<Self> {
        check_vars(&vars)?;
        let names = (0..vars.len()).map(|i| i.to_string()).collect();
        Ok(CandleDyn {
            opt,
            vars,
            names,
            last_report: None,
        })
    }

    /// `opt` over every variable of `varmap`, in name order.
    pub fn from_varmap(opt: Box<dyn DynOptimizer>, varmap: &VarMap) -> candle_core::Result<Self> {
        let (names, vars) = named_vars(varmap);
        let mut d = Self::new(opt, vars)?;
        d.names = names;
        Ok(d)
    }

    pub fn var_names(&self) -> &[String] {
        &self.names
    }

    /// Groups the variables by name and shape (see [`crate::groups`]).
    pub fn set_param_groups(&mut self, groups: &ParamGroups) -> Result<(), GroupError> {
        let shapes: Vec<Vec<usize>> = self.vars.iter().map(|v| v.dims().to_vec()).collect();
        let params: Vec<(&str, &[usize])> = self
            .names
            .iter()
            .zip(&shapes)
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        self.opt.set_param_groups(groups, &params)
    }

    /// One step from `grads`; returns what it did.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<Option<StepReport>> {
        let opt = &mut self.opt;
        self.last_report = step_vars(&self.vars, grads, &mut |params| opt.step(params))?;
        Ok(self.last_report)
    }

    /// `loss.backward()`, then [`CandleDyn::step`].
    pub fn backward_step(
        &mut self,
        loss: &candle_core::Tensor,
    ) -> candle_core::Result<Option<StepReport>> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
}

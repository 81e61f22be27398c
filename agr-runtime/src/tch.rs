//! tch adapter (feature `tch`): any generated optimizer over a
//! `tch::nn::VarStore` or a list of tensors.
//!
//! ```no_run
//! # use agr_runtime::optim::AdamWAgrKernel;
//! use agr_runtime::tch::TchOptimizer;
//! # fn demo(vs: &tch::nn::VarStore, loss: &tch::Tensor) -> Result<(), agr_runtime::tch::TchError> {
//! let mut opt = TchOptimizer::<AdamWAgrKernel>::new(vs, Default::default())?;
//! opt.backward_step(loss)?; // zero_grad, backward, fused step
//! # Ok(()) }
//! ```
//!
//! A step reads each variable's `.grad()` (an undefined gradient skips the
//! variable, as PyTorch skips a `.grad` of `None`) and updates the variable's
//! storage in place with the fused CPU step: no autograd graph is recorded
//! and nothing is copied. The state lives in the wrapped [`Optimizer`]
//! (reachable through `Deref`), so groups, schedules and checkpoints work as
//! they do everywhere else. Variables must be contiguous `f32` CPU tensors;
//! anything else is an error naming the variable, and nothing is modified.

use std::fmt;
use std::ops::{Deref, DerefMut};

use tch::{Device, Kind, Tensor};

use crate::cpu::Kernel;
use crate::groups::{GroupError, ParamGroups};
use crate::{ConfigError, Optimizer, ParamMut, StepError, StepReport};

/// Why a tch step could not run. Nothing was modified.
#[derive(Debug)]
pub enum TchError {
    /// A bad hyperparameter.
    Config(ConfigError),
    /// The engine refused the step (shapes, non-finite gradient, ...);
    /// `name` is the variable's, where the error is about one.
    Step {
        error: StepError,
        name: Option<String>,
    },
    /// A variable or its gradient cannot be stepped (the message says why).
    Param { name: String, problem: String },
}

impl fmt::Display for TchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TchError::Config(e) => e.fmt(f),
            TchError::Step {
                error,
                name: Some(name),
            } => write!(f, "variable `{name}`: {error}"),
            TchError::Step { error, name: None } => error.fmt(f),
            TchError::Param { name, problem } => write!(f, "variable `{name}`: {problem}"),
        }
    }
}

impl std::error::Error for TchError {}

/// agr's errors convert into `tch::TchError`, so `?` works in a function
/// returning `Result<_, tch::TchError>`. tch has no variant for a caller's
/// error: they become `TchError::Torch` with agr's message.
macro_rules! into_tch_error {
    ($($t:ty),*) => {$(
        impl From<$t> for tch::TchError {
            fn from(e: $t) -> Self {
                tch::TchError::Torch(format!("agr: {e}"))
            }
        }
    )*};
}

into_tch_error!(
    TchError,
    StepError,
    ConfigError,
    GroupError,
    crate::CheckpointError
);

/// A generated optimizer driving tch tensors.
pub struct TchOptimizer<K: Kernel> {
    inner: Optimizer<K>,
    names: Vec<String>,
    vars: Vec<Tensor>,
    shapes: Vec<Vec<usize>>,
}

impl<K: Kernel> Deref for TchOptimizer<K> {
    type Target = Optimizer<K>;
    fn deref(&self) -> &Optimizer<K> {
        &self.inner
    }
}

impl<K: Kernel> DerefMut for TchOptimizer<K> {
    fn deref_mut(&mut self) -> &mut Optimizer<K> {
        &mut self.inner
    }
}

fn param_error(name: &str, problem: impl Into<String>) -> TchError {
    TchError::Param {
        name: name.to_string(),
        problem: problem.into(),
    }
}

/// Checks that `t` can be read (or written) as a contiguous f32 CPU slice.
fn check_tensor(name: &str, what: &str, t: &Tensor) -> Result<(), TchError> {
    if t.device() != Device::Cpu {
        return Err(param_error(
            name,
            format!(
                "{what} is on {:?}; the tch adapter steps CPU tensors (move the model to the CPU)",
                t.device()
            ),
        ));
    }
    if t.kind() != Kind::Float {
        return Err(param_error(
            name,
            format!(
                "{what} is {:?}; the tch adapter steps f32 tensors (convert with `.to_kind(Kind::Float)`)",
                t.kind()
            ),
        ));
    }
    if !t.is_contiguous() {
        return Err(param_error(
            name,
            format!("{what} is not contiguous; agr updates contiguous tensors in place"),
        ));
    }
    Ok(())
}

/// The bytes a contiguous f32 tensor's elements occupy, `None` when it has
/// none (its data pointer may then be null).
fn byte_range(t: &Tensor) -> Option<(usize, usize)> {
    let n = t.numel();
    if n == 0 {
        return None;
    }
    let start = t.data_ptr() as usize;
    Some((start, start + n * std::mem::size_of::<f32>()))
}

/// Checks that the variables' element ranges are pairwise disjoint and that
/// no gradient overlaps a variable (views of one storage at different offsets
/// can overlap: comparing data pointers is not enough), and that each data
/// pointer can make a slice (non-null, aligned).
fn check_disjoint(
    names: &[String],
    vars: &[Tensor],
    grads: &[Option<Tensor>],
) -> Result<(), TchError> {
    let mut ranges: Vec<(usize, usize, usize)> = Vec::with_capacity(vars.len());
    let tensors = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (i, "the variable", v))
        .chain(
            grads
                .iter()
                .enumerate()
                .filter_map(|(i, g)| g.as_ref().map(|g| (i, "the gradient", g))),
        );
    for (i, what, t) in tensors {
        if let Some((start, _)) = byte_range(t) {
            if start == 0 || start % std::mem::align_of::<f32>() != 0 {
                return Err(param_error(
                    &names[i],
                    format!("{what}'s data pointer {start:#x} is null or not aligned for f32"),
                ));
            }
        }
    }
    for (i, v) in vars.iter().enumerate() {
        if let Some((start, end)) = byte_range(v) {
            ranges.push((start, end, i));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((_, end_a, a), (start_b, _, b)) = (w[0], w[1]);
        if start_b < end_a {
            let (a, b) = (a.min(b), a.max(b));
            return Err(param_error(
                &names[b],
                format!(
                    "shares its storage with `{}` (their elements overlap); pass each variable once",
                    names[a]
                ),
            ));
        }
    }
    for (i, g) in grads.iter().enumerate() {
        let Some((start, end)) = g.as_ref().and_then(byte_range) else {
            continue;
        };
        // The last variable starting before this gradient ends is the only
        // one that can overlap it (the variables are disjoint).
        let k = ranges.partition_point(|r| r.0 < end);
        if let Some(&(_, v_end, v)) = k.checked_sub(1).map(|k| &ranges[k]) {
            if v_end > start {
                return Err(param_error(
                    &names[i],
                    format!(
                        "the gradient overlaps the storage of variable `{}`; gradients must be tensors of their own",
                        names[v]
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl<K: Kernel> TchOptimizer<K> {
    /// Every trainable variable of `vs`, in name order.
    pub fn new(vs: &tch::nn::VarStore, config: K::Config) -> Result<Self, TchError> {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_named(named, config)
    }

    /// The given tensors, named `0`, `1`, ... (for groups and messages).
    pub fn from_tensors(tensors: Vec<Tensor>, config: K::Config) -> Result<Self, TchError> {
        let named = tensors
            .into_iter()
            .enumerate()
            .map(|(i, t)| (i.to_string(), t))
            .collect();
        Self::from_named(named, config)
    }

    /// The given named tensors, stepped in this order (checkpoints check the
    /// names).
    pub fn from_named(named: Vec<(String, Tensor)>, config: K::Config) -> Result<Self, TchError> {
        let mut inner = Optimizer::<K>::with_config(config).map_err(TchError::Config)?;
        let mut names = vec![];
        let mut vars = vec![];
        let mut shapes = vec![];
        for (name, t) in named {
            check_tensor(&name, "the variable", &t)?;
            shapes.push(t.size().iter().map(|&d| d as usize).collect());
            names.push(name);
            vars.push(t.shallow_clone());
        }
        check_disjoint(&names, &vars, &[])?;
        inner
            .set_param_names(names.clone())
            .expect("a fresh optimizer takes any number of names");
        Ok(TchOptimizer {
            inner,
            names,
            vars,
            shapes,
        })
    }

    /// The variables' names, in step order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Groups the variables by name and shape (see [`crate::groups`]).
    pub fn set_param_groups(&mut self, groups: &ParamGroups) -> Result<(), GroupError> {
        let params: Vec<(&str, &[usize])> = self
            .names
            .iter()
            .zip(&self.shapes)
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        self.inner.set_param_groups(groups, &params)
    }

    /// Zeroes every variable's gradient (where one is defined).
    pub fn zero_grad(&mut self) {
        for v in &mut self.vars {
            v.zero_grad();
        }
    }

    /// `zero_grad`, `loss.backward()`, then [`step`](Self::step).
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport, TchError> {
        self.zero_grad();
        loss.backward();
        self.step()
    }

    /// One fused step over every variable with a gradient, in place.
    pub fn step(&mut self) -> Result<StepReport, TchError> {
        // Gradients are kept alive (and their storage borrowed) for the step.
        let grads: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| {
                let g = v.grad();
                g.defined().then_some(g)
            })
            .collect();
        for ((name, v), g) in self.names.iter().zip(&self.vars).zip(&grads) {
            check_tensor(name, "the variable", v)?;
            if let Some(g) = g {
                check_tensor(name, "the gradient", g)?;
                if g.size() != v.size() {
                    return Err(param_error(
                        name,
                        format!(
                            "the gradient has shape {:?} but the variable {:?}",
                            g.size(),
                            v.size()
                        ),
                    ));
                }
            }
        }
        // Overlapping variables would become overlapping `&mut` slices, a
        // variable overlapping a gradient a `&mut` aliasing a `&`: refused,
        // every step (a variable's data can be replaced between steps).
        check_disjoint(&self.names, &self.vars, &grads)?;
        let mut params: Vec<ParamMut<'_>> = Vec::with_capacity(self.vars.len());
        for ((v, g), shape) in self.vars.iter().zip(&grads).zip(&self.shapes) {
            // SAFETY: checked above: contiguous, aligned f32 CPU storage of
            // `numel` elements (an empty tensor, whose pointer may be null,
            // becomes an empty slice), no variable overlapping another
            // variable or a gradient; gradients are only read. The tensors
            // outlive `params`.
            let value: &mut [f32] = match byte_range(v) {
                None => &mut [],
                Some((start, end)) => unsafe {
                    std::slice::from_raw_parts_mut(start as *mut f32, (end - start) / 4)
                },
            };
            let grad: Option<&[f32]> = g.as_ref().map(|g| match byte_range(g) {
                None => &[][..],
                Some((start, end)) => unsafe {
                    std::slice::from_raw_parts(start as *const f32, (end - start) / 4)
                },
            });
            params.push(ParamMut::new(value, grad, shape));
        }
        let names = &self.names;
        tch::no_grad(|| self.inner.step_params(&mut params)).map_err(|error| {
            let index = match &error {
                StepError::ShapeLen { index, .. }
                | StepError::GradLen { index, .. }
                | StepError::StateShape { index, .. }
                | StepError::Empty { index }
                | StepError::NonFinite { index } => Some(*index),
                StepError::NoParams | StepError::ParamCount { .. } | StepError::Device(_) => None,
            };
            TchError::Step {
                error,
                name: index.and_then(|i| names.get(i).cloned()),
            }
        })
    }
}

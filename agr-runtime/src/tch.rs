//! tch adapter (feature `tch`): any generated optimizer ([`TchOptimizer`]),
//! or any chosen at run time ([`TchDyn`]: a built-in by name, a spec compiled
//! at run time, a [`crate::multi::Multi`]), over a `tch::nn::VarStore` or a
//! list of tensors.
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
//! they do everywhere else. Variables must be contiguous tensors of one
//! device and one kind: `f32` on the CPU; with the `cuda` feature, CUDA
//! tensors of `f32`, `bf16` or `f16` (f32 state and arithmetic), stepped in
//! place through their device pointers by the generated kernels on the
//! device's default stream, the one PyTorch uses unless told otherwise; the
//! optimizer moves to their GPU on the first step. Anything else is an error
//! naming the variable, and nothing is modified.

use std::fmt;
use std::ops::{Deref, DerefMut};

use tch::{Device, Kind, Tensor};

use crate::cpu::Kernel;
use crate::groups::{GroupError, ParamGroups};
use crate::{ConfigError, DynOptimizer, Optimizer, ParamMut, StepError, StepReport};

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

/// What a tch adapter drives: a generated optimizer ([`Optimizer`]), or any
/// optimizer chosen at run time (`Box<dyn DynOptimizer>`: a built-in by
/// name, a spec compiled at run time, a [`crate::multi::Multi`]).
pub trait TchEngine {
    fn engine(&self) -> &dyn DynOptimizer;
    fn engine_mut(&mut self) -> &mut dyn DynOptimizer;
}

impl<K: Kernel> TchEngine for Optimizer<K> {
    fn engine(&self) -> &dyn DynOptimizer {
        self
    }
    fn engine_mut(&mut self) -> &mut dyn DynOptimizer {
        self
    }
}

impl TchEngine for Box<dyn DynOptimizer> {
    fn engine(&self) -> &dyn DynOptimizer {
        self.as_ref()
    }
    fn engine_mut(&mut self) -> &mut dyn DynOptimizer {
        self.as_mut()
    }
}

/// An optimizer driving tch tensors: [`TchOptimizer`] (a generated one) or
/// [`TchDyn`] (one chosen at run time).
pub struct Tch<O: TchEngine> {
    inner: O,
    names: Vec<String>,
    vars: Vec<Tensor>,
    shapes: Vec<Vec<usize>>,
}

/// A generated optimizer driving tch tensors.
pub type TchOptimizer<K> = Tch<Optimizer<K>>;

/// An optimizer chosen at run time driving tch tensors.
pub type TchDyn = Tch<Box<dyn DynOptimizer>>;

impl<O: TchEngine> Deref for Tch<O> {
    type Target = O;
    fn deref(&self) -> &O {
        &self.inner
    }
}

impl<O: TchEngine> DerefMut for Tch<O> {
    fn deref_mut(&mut self) -> &mut O {
        &mut self.inner
    }
}

fn param_error(name: &str, problem: impl Into<String>) -> TchError {
    TchError::Param {
        name: name.to_string(),
        problem: problem.into(),
    }
}

/// What the adapter needs to know about a tensor: a seam, so that tests can
/// describe tensors of devices this machine does not have.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Facts {
    pub device: Device,
    pub kind: Kind,
    pub contiguous: bool,
    pub numel: usize,
    /// Its data pointer (a device pointer for a CUDA tensor).
    pub ptr: usize,
}

impl Facts {
    fn of(t: &Tensor) -> Facts {
        Facts {
            device: t.device(),
            kind: t.kind(),
            contiguous: t.is_contiguous(),
            numel: t.numel(),
            ptr: t.data_ptr() as usize,
        }
    }

    fn elem_bytes(&self) -> usize {
        self.kind.elt_size_in_bytes()
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "the CPU".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}"),
    }
}

/// Checks that a tensor can be stepped with the variables, which are on
/// `device` and of `kind` (those of the first variable): contiguous, on the
/// same device, of the same kind, and of a kind agr steps (f32, bf16 or
/// f16, with f32 arithmetic; see [`crate::Optimizer::set_precision`]).
fn check_tensor(
    name: &str,
    what: &str,
    t: &Facts,
    device: Device,
    kind: Kind,
) -> Result<(), TchError> {
    match t.device {
        Device::Cpu | Device::Cuda(_) => {}
        other => {
            return Err(param_error(
                name,
                format!("{what} is on {other:?}; agr steps CPU and CUDA tensors"),
            ))
        }
    }
    if t.device != device {
        return Err(param_error(
            name,
            format!(
                "{what} is on {} but the first variable on {}; one optimizer steps the tensors of one device",
                device_name(t.device),
                device_name(device)
            ),
        ));
    }
    let allowed: &[Kind] = match device {
        _ => &[Kind::Float, Kind::BFloat16, Kind::Half],
    };
    if !allowed.contains(&t.kind) {
        return Err(param_error(
            name,
            format!(
                "{what} is {:?}; the tch adapter steps f32, bf16 or f16 tensors on {} (convert with `.to_kind(..)`)",
                t.kind,
                device_name(device)
            ),
        ));
    }
    if t.kind != kind {
        return Err(param_error(
            name,
            format!(
                "{what} is {:?} but the first variable {kind:?}; one optimizer steps tensors of one kind",
                t.kind
            ),
        ));
    }
    if !t.contiguous {
        return Err(param_error(
            name,
            format!("{what} is not contiguous; agr updates contiguous tensors in place"),
        ));
    }
    Ok(())
}

/// The bytes a contiguous tensor's elements occupy, `None` when it has none
/// (its data pointer may then be null).
fn byte_range(t: &Facts) -> Option<(usize, usize)> {
    if t.numel == 0 {
        return None;
    }
    Some((t.ptr, t.ptr + t.numel * t.elem_bytes()))
}

/// Checks that the variables' element ranges are pairwise disjoint and that
/// no gradient overlaps a variable (views of one storage at different offsets
/// can overlap: comparing data pointers is not enough), and that each data
/// pointer can address elements (non-null, aligned). On a GPU the ranges
/// are device addresses, compared the same way.
fn check_disjoint(
    names: &[String],
    vars: &[Facts],
    grads: &[Option<Facts>],
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
            if start == 0 || start % t.elem_bytes() != 0 {
                return Err(param_error(
                    &names[i],
                    format!(
                        "{what}'s data pointer {start:#x} is null or not aligned for {:?}",
                        t.kind
                    ),
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

/// Checks a step's variables and gradients (facts) against each other: the
/// checks of [`check_tensor`] and [`check_disjoint`], and each gradient's
/// shape. Returns the variables' device and kind.
fn check_step(
    names: &[String],
    vars: &[Facts],
    var_sizes: &[Vec<i64>],
    grads: &[Option<(Facts, Vec<i64>)>],
) -> Result<(Device, Kind), TchError> {
    let (device, kind) = vars
        .first()
        .map_or((Device::Cpu, Kind::Float), |v| (v.device, v.kind));
    for (i, v) in vars.iter().enumerate() {
        check_tensor(&names[i], "the variable", v, device, kind)?;
        if let Some((g, size)) = &grads[i] {
            check_tensor(&names[i], "the gradient", g, device, kind)?;
            if *size != var_sizes[i] {
                return Err(param_error(
                    &names[i],
                    format!(
                        "the gradient has shape {size:?} but the variable {:?}",
                        var_sizes[i]
                    ),
                ));
            }
        }
    }
    let grad_facts: Vec<Option<Facts>> = grads.iter().map(|g| g.as_ref().map(|g| g.0)).collect();
    // Overlapping variables would become overlapping `&mut` slices, a
    // variable overlapping a gradient a `&mut` aliasing a `&`: refused,
    // every step (a variable's data can be replaced between steps).
    check_disjoint(names, vars, &grad_facts)?;
    Ok((device, kind))
}

/// CPU bf16 or f16 variables and their gradients (of `T`, checked by
/// [`check_step`]) as parameters.
fn host_params<'a, T: crate::Element>(
    vars: &'a [Tensor],
    grads: &'a [Option<Tensor>],
    shapes: &'a [Vec<usize>],
) -> Vec<ParamMut<'a, T>> {
    let size = std::mem::size_of::<T>();
    vars.iter()
        .zip(grads)
        .zip(shapes)
        .map(|((v, g), shape)| {
            // SAFETY: as for f32 in `step`: contiguous, aligned CPU storage
            // of `T`, `numel` elements, no variable overlapping another or
            // a gradient; gradients only read; the tensors outlive the step.
            let value: &mut [T] = match byte_range(&Facts::of(v)) {
                None => &mut [],
                Some((start, end)) => unsafe {
                    std::slice::from_raw_parts_mut(start as *mut T, (end - start) / size)
                },
            };
            let grad: Option<&[T]> = g.as_ref().map(|g| match byte_range(&Facts::of(g)) {
                None => &[][..],
                Some((start, end)) => unsafe {
                    std::slice::from_raw_parts(start as *const T, (end - start) / size)
                },
            });
            ParamMut::new(value, grad, shape)
        })
        .collect()
}

/// The dtype the GPU kernels are compiled for, for tensors of `kind`.
#[cfg(feature = "cuda")]
fn cuda_dtype(kind: Kind) -> crate::cuda::DType {
    match kind {
        Kind::BFloat16 => crate::cuda::DType::BF16,
        Kind::Half => crate::cuda::DType::F16,
        _ => crate::cuda::DType::F32,
    }
}

/// What a GPU step hands the engine: each variable's and gradient's device
/// pointer (checked by [`check_step`]).
#[cfg(feature = "cuda")]
fn cuda_params<'a>(
    vars: &[Facts],
    grads: &[Option<Facts>],
    shapes: &'a [Vec<usize>],
) -> Vec<crate::cuda::RawCudaParam<'a>> {
    let pointers = vars
        .iter()
        .zip(grads)
        .map(|(v, g)| (v.ptr as u64, g.map(|g| g.ptr as u64)));
    crate::cuda::RawCudaParam::list(pointers, shapes)
}

/// Every trainable variable of `vs`, in name order.
fn trainable(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// `tensors` named `0`, `1`, ...
fn numbered(tensors: Vec<Tensor>) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .enumerate()
        .map(|(i, t)| (i.to_string(), t))
        .collect()
}

impl<K: Kernel> TchOptimizer<K> {
    /// Every trainable variable of `vs`, in name order.
    pub fn new(vs: &tch::nn::VarStore, config: K::Config) -> Result<Self, TchError> {
        Self::from_named(trainable(vs), config)
    }

    /// The given tensors, named `0`, `1`, ... (for groups and messages).
    pub fn from_tensors(tensors: Vec<Tensor>, config: K::Config) -> Result<Self, TchError> {
        Self::from_named(numbered(tensors), config)
    }

    /// The given named tensors, stepped in this order (checkpoints check the
    /// names).
    pub fn from_named(named: Vec<(String, Tensor)>, config: K::Config) -> Result<Self, TchError> {
        let inner = Optimizer::<K>::with_config(config).map_err(TchError::Config)?;
        Tch::with(inner, named)
    }
}

impl TchDyn {
    /// `opt` over every trainable variable of `vs`, in name order.
    pub fn new_dyn(vs: &tch::nn::VarStore, opt: Box<dyn DynOptimizer>) -> Result<Self, TchError> {
        Tch::with(opt, trainable(vs))
    }

    /// `opt` over the given named tensors, stepped in this order.
    pub fn from_named_dyn(
        named: Vec<(String, Tensor)>,
        opt: Box<dyn DynOptimizer>,
    ) -> Result<Self, TchError> {
        Tch::with(opt, named)
    }
}

impl<O: TchEngine> Tch<O> {
    /// `inner` over the given named tensors, stepped in this order
    /// (checkpoints check the names).
    fn with(mut inner: O, named: Vec<(String, Tensor)>) -> Result<Self, TchError> {
        let mut names = vec![];
        let mut vars = vec![];
        let mut shapes = vec![];
        for (name, t) in named {
            shapes.push(t.size().iter().map(|&d| d as usize).collect());
            names.push(name);
            vars.push(t.shallow_clone());
        }
        let facts: Vec<Facts> = vars.iter().map(Facts::of).collect();
        let sizes: Vec<Vec<i64>> = vars.iter().map(|v| v.size()).collect();
        check_step(&names, &facts, &sizes, &vec![None; vars.len()])?;
        inner
            .engine_mut()
            .set_param_names(names.clone())
            .map_err(|e| {
                let first = names.first().map_or("", String::as_str);
                param_error(
                    first,
                    format!("the optimizer cannot take these variables: {e}"),
                )
            })?;
        Ok(Tch {
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
        self.inner.engine_mut().set_param_groups(groups, &params)
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
        let vars: Vec<Facts> = self.vars.iter().map(Facts::of).collect();
        let sizes: Vec<Vec<i64>> = self.vars.iter().map(|v| v.size()).collect();
        let grad_facts: Vec<Option<(Facts, Vec<i64>)>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| (Facts::of(g), g.size())))
            .collect();
        let (device, kind) = check_step(&self.names, &vars, &sizes, &grad_facts)?;
        if let Device::Cuda(ordinal) = device {
            let grads: Vec<Option<Facts>> =
                grad_facts.iter().map(|g| g.as_ref().map(|g| g.0)).collect();
            return self.step_cuda(ordinal, kind, &vars, &grads);
        }
        match kind {
            Kind::BFloat16 => {
                let mut params = host_params::<half::bf16>(&self.vars, &grads, &self.shapes);
                let result = tch::no_grad(|| self.inner.engine_mut().step_params_bf16(&mut params));
                return self.named(result);
            }
            Kind::Half => {
                let mut params = host_params::<half::f16>(&self.vars, &grads, &self.shapes);
                let result = tch::no_grad(|| self.inner.engine_mut().step_params_f16(&mut params));
                return self.named(result);
            }
            _ => {}
        }
        let mut params: Vec<ParamMut<'_>> = Vec::with_capacity(self.vars.len());
        for ((v, g), shape) in self.vars.iter().zip(&grads).zip(&self.shapes) {
            // SAFETY: checked above: contiguous, aligned f32 CPU storage of
            // `numel` elements (an empty tensor, whose pointer may be null,
            // becomes an empty slice), no variable overlapping another
            // variable or a gradient; gradients are only read. The tensors
            // outlive `params`.
            let value: &mut [f32] = match byte_range(&Facts::of(v)) {
                None => &mut [],
                Some((start, end)) => unsafe {
                    std::slice::from_raw_parts_mut(start as *mut f32, (end - start) / 4)
                },
            };
            let grad: Option<&[f32]> = g.as_ref().map(|g| match byte_range(&Facts::of(g)) {
                None => &[][..],
                Some((start, end)) => unsafe {
                    std::slice::from_raw_parts(start as *const f32, (end - start) / 4)
                },
            });
            params.push(ParamMut::new(value, grad, shape));
        }
        let result = tch::no_grad(|| self.inner.engine_mut().step_params(&mut params));
        self.named(result)
    }

    /// A GPU step: the variables' device pointers stepped by the kernels on
    /// the device's default stream, the one PyTorch uses unless told
    /// otherwise (so no synchronisation is added); the optimizer (and its
    /// state) moves to the variables' GPU and dtype on the first such step.
    #[cfg(feature = "cuda")]
    fn step_cuda(
        &mut self,
        ordinal: usize,
        kind: Kind,
        vars: &[Facts],
        grads: &[Option<Facts>],
    ) -> Result<StepReport, TchError> {
        let dtype = cuda_dtype(kind);
        let engine = self.inner.engine();
        let here =
            engine.device() == crate::Device::Cuda(ordinal) && engine.cuda_dtype() == Some(dtype);
        if !here {
            let stream = crate::cuda::default_stream(ordinal)
                .map_err(|e| self.named_device_error(e.to_string()))?;
            self.inner
                .engine_mut()
                .set_cuda_stream(stream, dtype)
                .map_err(|e| self.named_device_error(e.to_string()))?;
        }
        let params = cuda_params(vars, grads, &self.shapes);
        // SAFETY: checked by `check_step`: contiguous storage of the
        // variables' kind (the dtype the kernels were compiled for) on this
        // GPU, `numel` elements each, no variable overlapping another or a
        // gradient. The tensors outlive the step, and the kernels run on the
        // stream PyTorch's work on them is ordered by.
        let result = tch::no_grad(|| unsafe { self.inner.engine_mut().step_raw(&params) });
        self.named(result)
    }

    #[cfg(not(feature = "cuda"))]
    fn step_cuda(
        &mut self,
        ordinal: usize,
        _kind: Kind,
        _vars: &[Facts],
        _grads: &[Option<Facts>],
    ) -> Result<StepReport, TchError> {
        Err(self.named_device_error(format!(
            "the variables are on cuda:{ordinal}, and this build of agr-runtime has no GPU support (its `cuda` feature)"
        )))
    }

    fn named_device_error(&self, e: String) -> TchError {
        TchError::Step {
            error: StepError::Device(e),
            name: None,
        }
    }

    /// The engine's error, with the variable's name where it is about one.
    fn named(&self, result: Result<StepReport, StepError>) -> Result<StepReport, TchError> {
        let names = &self.names;
        result.map_err(|error| {
            let index = match &error {
                StepError::ShapeLen { index, .. }
                | StepError::GradLen { index, .. }
                | StepError::StateShape { index, .. }
                | StepError::Empty { index }
                | StepError::NonFinite { index }
                | StepError::Matrix { index, .. } => Some(*index),
                StepError::NoParams
                | StepError::ParamCount { .. }
                | StepError::Device(_)
                | StepError::Comm(_)
                | StepError::Precision(_) => None,
            };
            TchError::Step {
                error,
                name: index.and_then(|i| names.get(i).cloned()),
            }
        })
    }
}

/// The adapter's checks and its GPU step's pointers, on tensors described
/// by their facts: CUDA tensors cannot be made without a GPU, their facts can.
#[cfg(test)]
mod tests {
    use super::*;

    fn facts(device: Device, kind: Kind, ptr: usize, numel: usize) -> Facts {
        Facts {
            device,
            kind,
            contiguous: true,
            numel,
            ptr,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("v{i}")).collect()
    }

    fn problem(r: Result<(Device, Kind), TchError>) -> String {
        match r {
            Err(TchError::Param { name, problem }) => format!("{name}: {problem}"),
            other => panic!("expected a problem with a variable, got {other:?}"),
        }
    }

    const GPU: Device = Device::Cuda(0);

    #[test]
    fn one_device_and_one_kind_per_optimizer() {
        let sizes = vec![vec![8], vec![8]];
        // Two bf16 variables on one GPU, with their gradients: fine.
        let vars = [
            facts(GPU, Kind::BFloat16, 0x1000, 8),
            facts(GPU, Kind::BFloat16, 0x2000, 8),
        ];
        let grads = vec![Some((facts(GPU, Kind::BFloat16, 0x3000, 8), vec![8])), None];
        assert_eq!(
            check_step(&names(2), &vars, &sizes, &grads).unwrap(),
            (GPU, Kind::BFloat16)
        );
        // A variable on another device.
        let mixed = [vars[0], facts(Device::Cpu, Kind::BFloat16, 0x2000, 8)];
        let p = problem(check_step(&names(2), &mixed, &sizes, &[None, None]));
        assert!(
            p.starts_with("v1: the variable is on the CPU but the first variable on cuda:0"),
            "{p}"
        );
        let other_gpu = [vars[0], facts(Device::Cuda(1), Kind::BFloat16, 0x2000, 8)];
        let p = problem(check_step(&names(2), &other_gpu, &sizes, &[None, None]));
        assert!(
            p.contains("is on cuda:1 but the first variable on cuda:0"),
            "{p}"
        );
        // A gradient on the CPU for a GPU variable.
        let g = vec![
            Some((facts(Device::Cpu, Kind::BFloat16, 0x3000, 8), vec![8])),
            None,
        ];
        let p = problem(check_step(&names(2), &vars, &sizes, &g));
        assert!(p.starts_with("v0: the gradient is on the CPU"), "{p}");
        // Kinds: f32, bf16 and f16 on a GPU and on the CPU, one kind per optimizer.
        let f64_gpu = [facts(GPU, Kind::Double, 0x1000, 8)];
        let p = problem(check_step(&names(1), &f64_gpu, &sizes[..1], &[None]));
        assert!(
            p.contains("is Double; the tch adapter steps f32, bf16 or f16 tensors on cuda:0"),
            "{p}"
        );
        let bf16_cpu = [facts(Device::Cpu, Kind::BFloat16, 0x1000, 8)];
        assert_eq!(
            check_step(&names(1), &bf16_cpu, &sizes[..1], &[None]).unwrap(),
            (Device::Cpu, Kind::BFloat16)
        );
        let kinds = [vars[0], facts(GPU, Kind::Float, 0x2000, 8)];
        let p = problem(check_step(&names(2), &kinds, &sizes, &[None, None]));
        assert!(
            p.contains("is Float but the first variable BFloat16"),
            "{p}"
        );
        // A gradient of another shape.
        let g = vec![
            Some((facts(GPU, Kind::BFloat16, 0x3000, 8), vec![2, 4])),
            None,
        ];
        let p = problem(check_step(&names(2), &vars, &sizes, &g));
        assert!(
            p.contains("the gradient has shape [2, 4] but the variable [8]"),
            "{p}"
        );
    }

    #[test]
    fn device_ranges_are_checked_with_the_element_size_of_the_kind() {
        let sizes = vec![vec![8], vec![8]];
        // 8 bf16 elements occupy 16 bytes: a variable at +16 touches, at +8 overlaps.
        let touching = [
            facts(GPU, Kind::BFloat16, 0x1000, 8),
            facts(GPU, Kind::BFloat16, 0x1010, 8),
        ];
        check_step(&names(2), &touching, &sizes, &[None, None]).unwrap();
        let overlapping = [touching[0], facts(GPU, Kind::BFloat16, 0x1008, 8)];
        let p = problem(check_step(&names(2), &overlapping, &sizes, &[None, None]));
        assert!(p.contains("shares its storage with `v0`"), "{p}");
        // As f32 the same addresses overlap.
        let f32s = [
            facts(GPU, Kind::Float, 0x1000, 8),
            facts(GPU, Kind::Float, 0x1010, 8),
        ];
        let p = problem(check_step(&names(2), &f32s, &sizes, &[None, None]));
        assert!(p.contains("shares its storage"), "{p}");
        // A misaligned device pointer.
        let odd = [facts(GPU, Kind::Float, 0x1002, 8)];
        let p = problem(check_step(&names(1), &odd, &sizes[..1], &[None]));
        assert!(p.contains("null or not aligned for Float"), "{p}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_gpu_step_hands_the_engine_the_tensors_device_pointers_and_dtype() {
        let vars = [
            facts(GPU, Kind::Half, 0x1000, 6),
            facts(GPU, Kind::Half, 0x2000, 4),
        ];
        let grads = [Some(facts(GPU, Kind::Half, 0x3000, 6)), None];
        let shapes = vec![vec![2, 3], vec![4]];
        let params = cuda_params(&vars, &grads, &shapes);
        let seen: Vec<(u64, Option<u64>, &[usize])> =
            params.iter().map(|p| (p.value, p.grad, p.shape)).collect();
        assert_eq!(
            seen,
            vec![
                (0x1000, Some(0x3000), &[2usize, 3][..]),
                (0x2000, None, &[4usize][..])
            ]
        );
        assert_eq!(cuda_dtype(Kind::Half), crate::cuda::DType::F16);
        assert_eq!(cuda_dtype(Kind::BFloat16), crate::cuda::DType::BF16);
        assert_eq!(cuda_dtype(Kind::Float), crate::cuda::DType::F32);
    }
}

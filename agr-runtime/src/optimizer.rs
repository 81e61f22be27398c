//! The CPU engine that runs a generated [`Kernel`] over a list of parameters.

use std::fmt;

use rayon::prelude::*;

use crate::buf::RawState;
use crate::cpu::{Kernel, KernelDesc, StaticKernel};
use crate::device::{Exec, Store};
use crate::groups::{self, Group, GroupError, Override, ParamGroups, DEFAULT_GROUP};
use crate::precision::{Element, Precision, Rounding, Storage};
use crate::shard::GradMode;
use crate::{ConfigError, Dims, HyperConfig, HyperValue, Scope, TensorMeta, MAX_STATES};

/// One parameter tensor for a step: its values (updated in place), its
/// gradient (`None` skips the tensor this step, as PyTorch skips a parameter
/// whose `.grad` is `None`) and its shape (row-major). Values and gradient
/// are `f32` (the default), `half::bf16` or `half::f16`: see
/// [`Optimizer::set_precision`].
pub struct ParamMut<'a, T: Element = f32> {
    pub value: &'a mut [T],
    pub grad: Option<&'a [T]>,
    pub shape: &'a [usize],
}

impl<'a, T: Element> ParamMut<'a, T> {
    pub fn new(value: &'a mut [T], grad: Option<&'a [T]>, shape: &'a [usize]) -> Self {
        ParamMut { value, grad, shape }
    }
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepReport {
    /// Steps taken by this optimizer so far, this one included.
    pub step: u64,
    /// Tensors updated in this step.
    pub updated: usize,
    /// Tensors skipped because they had no gradient.
    pub skipped: usize,
    /// `Some(index)`: the gradient of parameter `index` held a NaN or an
    /// infinity, so (under [`NonFinite::Skip`]) the whole step was skipped:
    /// no parameter, state or step count changed. On a CUDA device the
    /// update kernel makes this decision without telling the host (a read
    /// back would stall the stream): always `None` there, and `step` counts
    /// the step; [`Optimizer::non_finite_skips`] and [`Optimizer::steps`]
    /// read the device's count.
    pub skipped_non_finite: Option<usize>,
}

/// What a step does when a gradient holds a NaN or an infinity. The check
/// is a sum of `g · 0` folded into the step's first reduction pass (one extra
/// read of the gradients for optimizers that have no reduction of their own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinite {
    /// Skip the whole step, change nothing, report it in
    /// [`StepReport::skipped_non_finite`] and count it (as PyTorch's
    /// `GradScaler` and optax's `apply_if_finite` do). On a CUDA device the
    /// update kernel decides and counts, with no read back to the host.
    #[default]
    Skip,
    /// Change nothing and return [`StepError::NonFinite`].
    Error,
    /// Don't check: NaN and infinities flow into the parameters.
    Ignore,
}

/// A step that could not run. Nothing was modified: parameters, state and
/// step counts are exactly as before the call.
#[derive(Clone, Debug, PartialEq)]
pub enum StepError {
    /// The step was given no parameters.
    NoParams,
    /// The number of parameters differs from the first step's.
    ParamCount { expected: usize, got: usize },
    /// A parameter's value does not have as many elements as its shape says.
    ShapeLen {
        index: usize,
        shape: Vec<usize>,
        len: usize,
    },
    /// A gradient does not have as many elements as its parameter.
    GradLen {
        index: usize,
        expected: usize,
        got: usize,
    },
    /// A parameter's shape differs from the shape its state was created with.
    StateShape {
        index: usize,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A parameter has no elements.
    Empty { index: usize },
    /// A gradient holds a NaN or an infinity (policy [`NonFinite::Error`]).
    NonFinite { index: usize },
    /// The device failed (a CUDA driver error) or cannot take these
    /// parameters; nothing was changed.
    Device(String),
    /// A matrix block cannot run on this parameter (its products do not fit
    /// the parameter's shape); parameters, visible state and step counts
    /// are unchanged.
    Matrix {
        index: usize,
        block: String,
        shape: Vec<usize>,
        message: String,
    },
    /// A sharded step's collective failed (see [`crate::shard`]). Before
    /// the update nothing was changed; a failure in the final gather leaves
    /// this rank's own part updated and the others' not (MPI ends the job
    /// instead: see [`crate::comm`]).
    Comm(crate::comm::CommError),
    /// bf16/f16 parameters or narrowed state where this optimizer cannot
    /// step them (see [`Optimizer::set_precision`]).
    Precision(String),
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::NoParams => write!(f, "the step was given no parameters; pass every parameter the optimizer updates"),
            StepError::ParamCount { expected, got } => write!(
                f,
                "the step was given {got} parameters but the optimizer was first stepped with {expected}; pass the same parameters, in the same order, every step"
            ),
            StepError::ShapeLen { index, shape, len } => write!(
                f,
                "parameter #{index}: shape {shape:?} has {} elements but its value has {len}; pass the tensor's real shape",
                shape.iter().product::<usize>()
            ),
            StepError::GradLen { index, expected, got } => write!(
                f,
                "parameter #{index}: the gradient has {got} elements but the parameter has {expected}; pass the gradient of this parameter"
            ),
            StepError::StateShape { index, expected, got } => write!(
                f,
                "parameter #{index}: shape {got:?} differs from the shape {expected:?} its optimizer state was created with; pass the parameters in the same order every step"
            ),
            StepError::Empty { index } => write!(f, "parameter #{index} has no elements; leave empty tensors out of the optimizer"),
            StepError::NonFinite { index } => write!(
                f,
                "the gradient of parameter #{index} holds a NaN or an infinity; nothing was changed (lower the learning rate or scale the loss)"
            ),
            StepError::Device(e) => write!(f, "the step could not run on its device: {e}"),
            StepError::Matrix { index, block, shape, message } => write!(
                f,
                "parameter #{index} (shape {shape:?}): matrix block `{block}`: {message}; nothing was changed (give this optimizer parameters its matrix block fits, e.g. through parameter groups)"
            ),
            StepError::Comm(e) => write!(f, "the sharded step's ranks could not exchange: {e}"),
            StepError::Precision(why) => write!(f, "{why}; nothing was changed"),
        }
    }
}

impl std::error::Error for StepError {}

/// What a step was given for one parameter, for validation.
pub(crate) struct ParamSeen<'a> {
    pub shape: &'a [usize],
    pub len: usize,
    pub grad_len: Option<usize>,
}

/// The checks every back end runs before touching anything: parameter count,
/// shapes, gradient lengths, and shapes against existing state.
pub(crate) fn validate_params<'a>(
    n_params: Option<usize>,
    stored_shape: impl Fn(usize) -> Option<&'a [usize]>,
    params: impl Iterator<Item = ParamSeen<'a>>,
    count: usize,
) -> Result<(), StepError> {
    if count == 0 {
        return Err(StepError::NoParams);
    }
    if let Some(n) = n_params {
        if n != count {
            return Err(StepError::ParamCount {
                expected: n,
                got: count,
            });
        }
    }
    for (index, p) in params.enumerate() {
        let numel: usize = p.shape.iter().product();
        if numel != p.len {
            return Err(StepError::ShapeLen {
                index,
                shape: p.shape.to_vec(),
                len: p.len,
            });
        }
        if numel == 0 {
            return Err(StepError::Empty { index });
        }
        if let Some(g) = p.grad_len {
            if g != numel {
                return Err(StepError::GradLen {
                    index,
                    expected: numel,
                    got: g,
                });
            }
        }
        if let Some(shape) = stored_shape(index) {
            if shape != p.shape {
                return Err(StepError::StateShape {
                    index,
                    expected: shape.to_vec(),
                    got: p.shape.to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// Per-parameter state: created on the parameter's first gradient.
#[derive(Clone)]
pub(crate) struct TensorState {
    pub(crate) shape: Vec<usize>,
    /// Steps this tensor has taken.
    /// Steps issued to this tensor (on a CUDA device, the device's count of
    /// those it skipped comes off: see [`crate::device`]).
    pub(crate) t: u64,
    /// Its state buffers (and a bf16/f16 parameter's master copy), in its
    /// device's memory.
    pub(crate) store: Store,
}

/// Elements per unit of parallel work. Fixed, so the reduction order (and so
/// every bit of the result) does not depend on the number of threads.
pub const CHUNK: usize = 1 << 15;

/// Below this many elements in a step, run on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

#[derive(Clone, Copy)]
struct Item {
    /// Index into the active list.
    slot: usize,
    start: usize,
    len: usize,
}

/// A tensor's buffers for one step (also what the emulated device's tables
/// point to).
#[derive(Clone, Copy)]
pub(crate) struct Ptrs {
    pub(crate) p: *mut f32,
    pub(crate) g: *const f32,
    pub(crate) st: [*mut f32; MAX_STATES],
    /// Each state's slice in a work item: `None` per element (the chunk's
    /// elements), `Some(n)` the whole buffer of `n` values (a reduced state;
    /// 0 for a per-tensor state, which the passes never see).
    pub(crate) st_len: [Option<usize>; MAX_STATES],
    pub(crate) rows: *mut f64,
    /// Where this rank's part of the tensor starts (0 unsharded): its
    /// per-element state buffers hold elements from here on.
    pub(crate) st_off: usize,
    /// The same for the gradient: 0 when `g` is the whole tensor's.
    pub(crate) g_off: usize,
    /// The first row whose results `rows` holds.
    pub(crate) rows_off: usize,
    pub(crate) dims: Dims,
    /// A factored spec's work item is the whole tensor, with all its results.
    pub(crate) whole: bool,
    /// What the kernel sees in f32 but is stored narrower (see `staged`).
    pub(crate) narrow: Narrow,
}

/// A tensor's buffers stored in fewer bytes than the kernels compute in: the
/// engine widens them into f32 scratch for each work item and narrows back
/// what the update wrote (see [`crate::precision`]).
#[derive(Clone, Copy)]
pub(crate) struct Narrow {
    /// bf16/f16 parameter words (null: `Ptrs::p` is the f32 parameter).
    pub(crate) p: *mut u16,
    /// bf16/f16 gradient words (null: `Ptrs::g` is f32).
    pub(crate) g: *const u16,
    /// The parameters' and gradients' storage.
    pub(crate) kind: Storage,
    /// `Ptrs::p` is the f32 master copy: the words are written as its rounding.
    pub(crate) master: bool,
    /// Narrowed per-element states (`RawState::NONE`: `Ptrs::st` is f32).
    pub(crate) st: [RawState; MAX_STATES],
    /// Whether anything is narrowed (else the kernels run in place).
    pub(crate) any: bool,
    /// The parameter's index and the step, for stochastic rounding.
    pub(crate) index: usize,
    pub(crate) step: u64,
    pub(crate) rounding: Rounding,
}

impl Narrow {
    pub(crate) const NONE: Narrow = Narrow {
        p: std::ptr::null_mut(),
        g: std::ptr::null(),
        kind: Storage::F32,
        master: false,
        st: [RawState::NONE; MAX_STATES],
        any: false,
        index: 0,
        step: 0,
        rounding: Rounding::Nearest,
    };
}

// SAFETY: the pointers are only dereferenced inside `Optimizer::step`, for
// disjoint element ranges per work item, while the step holds `&mut` to every
// parameter and state buffer and `&` to every gradient.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

/// Scratch space reused by every step, so steps allocate nothing once the
/// set of parameters with gradients is stable.
pub(crate) struct Scratch<K: Kernel> {
    active: Vec<usize>,
    ptrs: Vec<Ptrs>,
    metas: Vec<TensorMeta>,
    items: Vec<Item>,
    acc: Vec<f64>,
    reduced: Vec<f64>,
    global: Vec<f64>,
    ts: Vec<K::TensorScalars>,
    /// Step scalars per parameter group.
    ss: Vec<K::StepScalars>,
    /// The group of each active tensor.
    slot_group: Vec<usize>,
    /// Parameters whose state this step created (removed again if the step
    /// is skipped, so a skipped step changes nothing).
    created: Vec<usize>,
    /// The work items this rank runs (all of them unsharded).
    own: std::ops::Range<usize>,
    /// Sharded: work items per rank.
    item_counts: Vec<usize>,
    /// Sharded: this rank's partial results, sent to the others.
    send: Vec<f64>,
    /// Sharded: the collectives' buffers (and, after a reduce-scatter,
    /// this rank's summed gradients).
    pub(crate) shard: crate::shard::ShardBufs,
}

impl<K: Kernel> Default for Scratch<K> {
    fn default() -> Self {
        Scratch {
            active: vec![],
            ptrs: vec![],
            metas: vec![],
            items: vec![],
            acc: vec![],
            reduced: vec![],
            global: vec![],
            ts: vec![],
            ss: vec![],
            slot_group: vec![],
            created: vec![],
            own: 0..0,
            item_counts: vec![],
            send: vec![],
            shard: Default::default(),
        }
    }
}

/// An optimizer generated from a spec: its hyperparameters, its per-tensor
/// state and the fused CPU step. `agr_runtime::optimizer!` defines
/// `pub type Name = Optimizer<NameKernel>`.
pub struct Optimizer<K: Kernel> {
    /// The fused step: a unit value for a generated kernel, the compiled
    /// program for a spec compiled at run time.
    pub(crate) kernel: K,
    /// Its description.
    pub(crate) desc: &'static KernelDesc,
    /// What runs the steps (see [`crate::Device`]).
    pub(crate) exec: Exec,
    /// The optimizer's hyperparameters (those of the group `default`).
    pub(crate) config: K::Config,
    /// Parameter groups; group 0 is `default` (no overrides).
    pub(crate) groups: Vec<Group<K::Config>>,
    /// The group of each parameter; empty: every parameter is in `default`.
    pub(crate) group_of: Vec<usize>,
    /// The parameters' names, where known (checked against checkpoints).
    pub(crate) param_names: Vec<String>,
    pub(crate) tensors: Vec<Option<TensorState>>,
    pub(crate) n_params: Option<usize>,
    pub(crate) steps: u64,
    pub(crate) non_finite: NonFinite,
    /// The storage of parameters' master copies and of states (see
    /// [`Optimizer::set_precision`]).
    pub(crate) precision: Precision,
    /// Each state's storage, from `precision` and the spec (one per state).
    pub(crate) storage: Vec<Storage>,
    /// Steps skipped (on a CUDA device, plus the device's count).
    pub(crate) non_finite_skips: u64,
    /// Whether the first step looked for parameters their gradient cannot
    /// move (see `frozen`).
    pub(crate) frozen_checked: bool,
    /// Sharded: the communicator and who owns what (see [`crate::shard`]).
    pub(crate) shard: Option<crate::shard::Shard>,
    pub(crate) scratch: Scratch<K>,
    /// The variables a candle optimizer updates (`candle_nn::Optimizer::new`).
    #[cfg(feature = "candle")]
    pub(crate) vars: Vec<candle_core::Var>,
    /// Their names (for groups).
    #[cfg(feature = "candle")]
    pub(crate) var_names: Vec<String>,
    /// What the last candle step did.
    #[cfg(feature = "candle")]
    pub(crate) last_report: Option<StepReport>,
}

impl<K: Kernel> Clone for Optimizer<K> {
    fn clone(&self) -> Self {
        Optimizer {
            kernel: self.kernel.clone(),
            desc: self.desc,
            exec: self.exec.clone(),
            config: self.config.clone(),
            groups: self.groups.clone(),
            group_of: self.group_of.clone(),
            param_names: self.param_names.clone(),
            tensors: self.tensors.clone(),
            n_params: self.n_params,
            steps: self.steps,
            non_finite: self.non_finite,
            precision: self.precision.clone(),
            storage: self.storage.clone(),
            non_finite_skips: self.non_finite_skips,
            frozen_checked: self.frozen_checked,
            shard: self.shard.clone(),
            scratch: Scratch::default(),
            #[cfg(feature = "candle")]
            vars: self.vars.clone(),
            #[cfg(feature = "candle")]
            var_names: self.var_names.clone(),
            #[cfg(feature = "candle")]
            last_report: self.last_report,
        }
    }
}

impl<K: Kernel> fmt::Debug for Optimizer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(self.desc.name)
            .field("config", &self.config)
            .field("steps", &self.steps)
            .field("params", &self.n_params)
            .finish()
    }
}

impl<K: StaticKernel> Optimizer<K> {
    /// The spec's name.
    pub const NAME: &'static str = K::DESC.name;
    /// The normalised spec this optimizer was generated from.
    pub const SPEC: &'static str = K::DESC.spec;
    /// The Rust code generated from the spec.
    pub const GENERATED_RUST: &'static str = K::DESC.generated_rust;
    /// The CUDA C generated from the spec as one translation unit: the
    /// shared prelude (the same for every spec), a newline, then
    /// [`Self::CUDA_KERNEL_SOURCE`]. This is what the CUDA engine compiles.
    pub const CUDA_SOURCE: &'static str = K::DESC.cuda_source;
    /// The spec's own CUDA C, without the shared prelude: snapshot this one,
    /// so the snapshot changes only when the spec's code does.
    pub const CUDA_KERNEL_SOURCE: &'static str = K::DESC.cuda_kernel_source;
}

impl<K: Kernel> Optimizer<K> {
    /// A new optimizer; fails if a hyperparameter is outside its range.
    pub fn with_config(config: K::Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let kernel = K::of_config(&config);
        let desc = kernel.desc();
        Ok(Optimizer {
            desc,
            exec: Exec::Cpu,
            kernel,
            groups: vec![Group {
                name: DEFAULT_GROUP.into(),
                overrides: vec![],
                config: config.clone(),
            }],
            group_of: vec![],
            param_names: vec![],
            config,
            tensors: vec![],
            n_params: None,
            steps: 0,
            non_finite: NonFinite::default(),
            precision: Precision::default(),
            // As the spec declares its states (`m: bf16 = 0`).
            storage: desc.states.iter().map(|s| s.storage).collect(),
            non_finite_skips: 0,
            frozen_checked: false,
            shard: None,
            scratch: Scratch::default(),
            #[cfg(feature = "candle")]
            vars: vec![],
            #[cfg(feature = "candle")]
            var_names: vec![],
            #[cfg(feature = "candle")]
            last_report: None,
        })
    }

    pub fn config(&self) -> &K::Config {
        &self.config
    }

    /// What the optimizer's spec declares: hyperparameters, states,
    /// reductions, passes and generated code.
    pub fn desc(&self) -> &'static KernelDesc {
        self.desc
    }

    /// The spec's name.
    pub fn name(&self) -> &'static str {
        self.desc.name
    }

    /// Replaces the hyperparameters; a value out of range is an error and
    /// changes nothing.
    pub fn set_config(&mut self, config: K::Config) -> Result<(), ConfigError> {
        let other = K::of_config(&config).desc();
        if !std::ptr::eq(other, self.desc) {
            return Err(ConfigError::WrongSpec {
                expected: self.desc.name.into(),
                got: other.name.into(),
            });
        }
        config.validate()?;
        self.set_base(config)
    }

    /// Makes `config` the optimizer's hyperparameters and re-derives every
    /// group's; if a group's override no longer fits, nothing changes.
    fn set_base(&mut self, config: K::Config) -> Result<(), ConfigError> {
        let mut derived = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            derived.push(groups::apply(&config, &g.overrides)?);
        }
        for (g, c) in self.groups.iter_mut().zip(derived) {
            g.config = c;
        }
        self.config = config;
        Ok(())
    }

    /// Sets one hyperparameter by name (checked).
    pub fn set_hyper(
        &mut self,
        name: &str,
        value: impl Into<HyperValue>,
    ) -> Result<(), ConfigError> {
        let value = value.into();
        let mut c = self.config.clone();
        c.set(name, value).map_err(|e| match e {
            ConfigError::Unknown { name, known, .. } => ConfigError::Unknown {
                optimizer: self.desc.name.into(),
                name,
                known,
            },
            e => e,
        })?;
        self.set_base(c)
    }

    /// The learning rate, where the spec has a hyperparameter `lr`. (Not
    /// named `learning_rate`: in a candle program that name is
    /// `candle_nn::Optimizer::learning_rate`.)
    pub fn lr(&self) -> Option<f64> {
        self.config.get("lr").and_then(|v| v.as_float("lr").ok())
    }

    /// Sets the hyperparameter `lr` (checked: a value out of range is an
    /// error and changes nothing). In a candle program
    /// `set_learning_rate` is `candle_nn::Optimizer::set_learning_rate`.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), ConfigError> {
        self.set_hyper("lr", lr)
    }

    /// Steps taken so far.
    /// Chooses what a step does with a NaN or infinite gradient.
    pub fn set_non_finite_policy(&mut self, policy: NonFinite) {
        self.non_finite = policy;
    }

    pub fn non_finite_policy(&self) -> NonFinite {
        self.non_finite
    }

    /// The state buffer `name` of parameter `index`, once it exists, where
    /// it is in host memory (on a GPU: `None`; see [`Self::state_to_host`]).
    pub fn state(&self, index: usize, name: &str) -> Option<&[f32]> {
        let s = self.desc.states.iter().position(|s| s.name == name)?;
        let t = self.tensors.get(index)?.as_ref()?;
        match &t.store {
            // State a step skipped on the device created is not there yet.
            Store::Host { bufs, .. }
                if self.tensor_steps(index) > 0 && bufs[s].storage() == Storage::F32 =>
            {
                Some(bufs[s].f32s())
            }
            _ => None,
        }
    }

    /// The state buffer `name` of parameter `index`, once it exists, copied
    /// to host memory from whichever device holds it.
    ///
    /// # Panics
    /// If the copy from a GPU fails (its context is lost).
    pub fn state_to_host(&self, index: usize, name: &str) -> Option<Vec<f32>> {
        let s = self.desc.states.iter().position(|s| s.name == name)?;
        let t = self.tensors.get(index)?.as_ref()?;
        (self.tensor_steps(index) > 0).then(|| t.store.to_host(s).into_owned())
    }

    /// Puts each parameter into the first of `groups` whose predicate holds
    /// (or into `default`). `params` lists every parameter's name and shape
    /// in the order steps pass them. Checked first; on error nothing changes.
    pub fn set_param_groups(
        &mut self,
        groups: &ParamGroups,
        params: &[(&str, &[usize])],
    ) -> Result<(), GroupError> {
        if let Some(n) = self.n_params {
            if n != params.len() {
                return Err(GroupError::ParamCount {
                    expected: n,
                    got: params.len(),
                });
            }
        }
        let group_of = groups.assign(params)?;
        let mut resolved = vec![self.groups[0].clone()];
        for spec in groups.specs() {
            let overrides = spec.overrides_for(|n| self.config.get(n).is_some());
            resolved.push(Group {
                name: spec.name.clone(),
                config: groups::derive(&self.config, &spec.name, &overrides)
                    .map_err(|e| named(self.desc.name, e))?,
                overrides,
            });
        }
        self.groups = resolved;
        self.group_of = group_of;
        self.n_params = Some(params.len());
        self.param_names = params.iter().map(|(n, _)| n.to_string()).collect();
        Ok(())
    }

    /// Names the parameters, in step order. Checkpoints store the names and
    /// refuse to load into an optimizer whose parameters have other names,
    /// so a reordered model cannot silently receive another tensor's
    /// moments. (The candle and tch adapters name them from their stores.)
    pub fn set_param_names(&mut self, names: Vec<String>) -> Result<(), GroupError> {
        if let Some(n) = self.n_params {
            if n != names.len() {
                return Err(GroupError::ParamCount {
                    expected: n,
                    got: names.len(),
                });
            }
        }
        self.param_names = names;
        Ok(())
    }

    /// The parameters' names, where known (empty otherwise).
    pub fn param_names(&self) -> &[String] {
        &self.param_names
    }

    /// The group index of parameter `index` (0 is `default`).
    pub fn group_of(&self, index: usize) -> usize {
        self.group_of.get(index).copied().unwrap_or(0)
    }

    /// The name of parameter `index`'s group.
    pub fn group_name(&self, index: usize) -> &str {
        &self.groups[self.group_of(index)].name
    }

    /// The names of the groups, `default` first.
    pub fn group_names(&self) -> Vec<&str> {
        self.groups.iter().map(|g| g.name.as_str()).collect()
    }

    /// The hyperparameters group `name` steps with.
    pub fn group_config(&self, name: &str) -> Option<&K::Config> {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .map(|g| &g.config)
    }

    /// Overrides hyperparameter `hyper` in group `group` (checked; on error
    /// nothing changes).
    pub fn set_group_hyper(
        &mut self,
        group: &str,
        hyper: &str,
        value: impl Into<HyperValue>,
    ) -> Result<(), GroupError> {
        let Some(k) = self.groups.iter().position(|g| g.name == group) else {
            return Err(GroupError::UnknownGroup {
                name: group.into(),
                known: self.groups.iter().map(|g| g.name.clone()).collect(),
            });
        };
        let mut overrides = self.groups[k].overrides.clone();
        overrides.retain(|(n, _)| n != hyper);
        overrides.push((hyper.to_string(), Override::Set(value.into())));
        let config = groups::derive(&self.config, group, &overrides)
            .map_err(|e| named(self.desc.name, e))?;
        if k == 0 {
            // `default` has no overrides: this sets the optimizer's own value.
            return self.set_base(config).map_err(|error| GroupError::Config {
                group: group.into(),
                error,
            });
        }
        self.groups[k].overrides = overrides;
        self.groups[k].config = config;
        Ok(())
    }

    pub(crate) fn validate<T: Element>(&self, params: &[ParamMut<'_, T>]) -> Result<(), StepError> {
        let stored = |i: usize| {
            self.tensors
                .get(i)
                .and_then(|t| t.as_ref())
                .map(|t| t.shape.as_slice())
        };
        let seen = params.iter().map(|p| ParamSeen {
            shape: p.shape,
            len: p.value.len(),
            grad_len: p.grad.map(|g| g.len()),
        });
        validate_params(self.n_params, stored, seen, params.len())
    }

    /// One optimizer step over `params`, in place. Parameters must be passed
    /// in the same order every step. On error nothing is modified. (Not
    /// named `step`: in a candle program `opt.step(&grads)` is
    /// `candle_nn::Optimizer::step`.)
    /// (bf16 and f16 parameters: [`Optimizer::step_params_of`].)
    pub fn step_params(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, StepError> {
        self.step_params_of(params)
    }

    /// [`Optimizer::step_params`] for parameters and gradients of `T`:
    /// `f32`, `half::bf16` or `half::f16` (one type per call). The
    /// arithmetic is f32 either way; [`Optimizer::set_precision`] says how
    /// bf16/f16 parameters are kept (an f32 master copy or not, how they are
    /// rounded). bf16/f16 parameters step on the CPU and on CUDA devices
    /// (on a GPU: copied there and back, for checks), unsharded.
    pub fn step_params_of<T: Element>(
        &mut self,
        params: &mut [ParamMut<'_, T>],
    ) -> Result<StepReport, StepError> {
        self.validate(params)?;
        if T::STORAGE != Storage::F32 {
            if let Some(why) = self.narrow_refused(&self.storage) {
                return Err(StepError::Precision(format!(
                    "{} parameters: {why}",
                    T::STORAGE
                )));
            }
        }
        if !self.frozen_checked {
            // Once: one-element parameters Ψ (or the like) freezes are
            // logged as a warning.
            self.frozen_checked = true;
            crate::frozen::warn_frozen_scalars(self, params);
        }
        if !matches!(self.exec, Exec::Cpu) {
            return match T::f32_params(params) {
                Some(p32) => self.step_host_params_on_device(p32),
                None => self.step_narrow_params_on_device(params),
            };
        }
        if self.shard.is_some() {
            let p32 = T::f32_params(params).expect("bf16/f16 parameters refused when sharded");
            self.plan_shards(p32, CHUNK)?;
        }
        if let Some(sh) = &mut self.shard {
            if let GradMode::ReduceScatter { mean } = sh.grads {
                let plan = sh.plan.as_ref().expect("made above");
                let p32 = T::f32_params(params).expect("bf16/f16 parameters refused when sharded");
                let grads: Vec<Option<&[f32]>> = p32.iter().map(|p| p.grad).collect();
                if plan.size > 1 {
                    sh.reduce_scatter(plan, &grads, mean, &mut self.scratch.shard)
                        .map_err(StepError::Comm)?;
                }
            }
        }
        let plan = self.shard.as_ref().and_then(|sh| sh.plan.as_ref());
        // One rank alone steps with its own gradients.
        let scattered = self.shard.as_ref().is_some_and(|sh| {
            matches!(sh.grads, GradMode::ReduceScatter { .. }) && sh.comm.size() > 1
        });
        // What a skipped step restores: on the first step nothing exists yet.
        let (n_params_before, tensors_before) = (self.n_params, self.tensors.len());
        self.n_params = Some(params.len());
        if self.tensors.len() < params.len() {
            self.tensors.resize_with(params.len(), || None);
        }
        let desc = self.desc;
        let kernel = &self.kernel;
        let ns = desc.states.len();
        let nr = desc.reductions.len();
        let sc = &mut self.scratch;
        // Sharded with a reduce-scatter: where each parameter's part of this
        // rank's gradients starts.
        let mut grads_at = 0;
        sc.active.clear();
        sc.ptrs.clear();
        sc.metas.clear();
        sc.items.clear();
        sc.slot_group.clear();
        sc.created.clear();
        for (i, p) in params.iter_mut().enumerate() {
            // Sharded: this rank's elements of the tensor (all of them
            // unsharded), whose state it keeps.
            let (lo, hi) = plan.map_or((0, p.value.len()), |pl| pl.part(i));
            let part_at = grads_at;
            grads_at += hi - lo;
            let Some(g) = p.grad else { continue };
            if self.tensors[i].is_none() {
                sc.created.push(i);
            }
            let storage = &self.storage;
            let st = self.tensors[i].get_or_insert_with(|| TensorState {
                shape: p.shape.to_vec(),
                t: 0,
                store: Store::new_host_part(desc, p.shape, i, (lo, hi), storage),
            });
            let words = T::words_mut(p.value).map(|w| w.as_mut_ptr());
            // Without the `cuda` feature host memory is the only kind.
            #[allow(irrefutable_let_patterns)]
            let Store::Host { bufs, rows, master } = &mut st.store
            else {
                unreachable!("the CPU keeps state in host memory")
            };
            if let (Some(w), true, None) = (words, self.precision.master, &master) {
                // SAFETY: `w` points at the parameter's `len` words.
                let w = unsafe { std::slice::from_raw_parts(w, p.value.len()) };
                *master = Some(crate::precision::master_of(T::STORAGE, w, i));
            }
            let slot = sc.active.len();
            sc.active.push(i);
            sc.slot_group
                .push(self.group_of.get(i).copied().unwrap_or(0));
            let mut stp = [std::ptr::null_mut(); MAX_STATES];
            let mut st_len = [None; MAX_STATES];
            let mut meta = TensorMeta::of(p.shape, st.t + 1);
            let mut narrow = Narrow {
                kind: T::STORAGE,
                index: i,
                step: self.steps + 1,
                rounding: self.precision.rounding,
                ..Narrow::NONE
            };
            for (k, b) in bufs.iter_mut().enumerate() {
                stp[k] = b.f32_ptr();
                narrow.st[k] = b.raw();
                narrow.any |= b.storage() != Storage::F32;
                if desc.states[k].per_tensor {
                    meta.state[k] = b.f32s()[0];
                    st_len[k] = Some(0);
                } else if desc.states[k].reduced.is_some() {
                    st_len[k] = Some(b.len());
                }
            }
            // The parameter the kernels step in f32: the f32 parameter, the
            // master copy, or (null) the bf16/f16 words widened per item.
            let value = match (words, master.as_mut()) {
                (None, _) => p.value.as_mut_ptr() as *mut f32,
                (Some(w), Some(m)) => {
                    narrow.p = w;
                    narrow.master = true;
                    m.as_mut_ptr()
                }
                (Some(w), None) => {
                    narrow.p = w;
                    std::ptr::null_mut()
                }
            };
            narrow.any |= words.is_some();
            let n = p.value.len();
            let dims = Dims::of(p.shape, desc);
            let (g, g_off) = if scattered {
                // This rank's summed gradients: its parts, in parameter order.
                (sc.shard.grads[part_at..].as_ptr(), lo)
            } else if let Some(w) = T::words(g) {
                narrow.g = w.as_ptr();
                (std::ptr::null(), 0)
            } else {
                (g.as_ptr() as *const f32, 0)
            };
            sc.ptrs.push(Ptrs {
                p: value,
                g,
                st: stp,
                st_len,
                rows: rows.as_mut_ptr(),
                st_off: lo,
                g_off,
                rows_off: if desc.factored || dims.row_len == 0 {
                    0
                } else {
                    lo / dims.row_len
                },
                dims,
                whole: desc.factored,
                narrow,
            });
            sc.metas.push(meta);
            let chunk = desc.chunk_len(n, dims.row_len, CHUNK);
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                sc.items.push(Item { slot, start, len });
                start += len;
            }
        }
        // The work items this rank runs: one contiguous run, as units are
        // owned in order (see `ShardPlan`).
        match plan {
            None => sc.own = 0..sc.items.len(),
            Some(pl) => {
                sc.item_counts.clear();
                sc.item_counts.resize(pl.size, 0);
                for item in &sc.items {
                    sc.item_counts[pl.owner(sc.active[item.slot], item.start)] += 1;
                }
                let first: usize = sc.item_counts[..pl.rank].iter().sum();
                sc.own = first..first + sc.item_counts[pl.rank];
            }
        }
        let na = sc.active.len();
        sc.ts.clear();
        sc.ts.resize(na, K::TensorScalars::default());
        sc.reduced.clear();
        sc.reduced.resize(na * nr, 0.0);
        sc.global.clear();
        sc.global.resize(nr, 0.0);
        sc.acc.clear();
        sc.acc.resize(sc.items.len() * nr.max(1), 0.0);
        let total: usize = sc.metas.iter().map(|m| m.numel).sum();
        let parallel = total >= PARALLEL_MIN && rayon::current_num_threads() > 1;

        let ng = self.groups.len();
        sc.ss.clear();
        sc.ss.resize(ng, K::StepScalars::default());
        let mut mat_err: Option<(usize, String, String)> = None;
        let mut comm_err: Option<crate::comm::CommError> = None;
        let bad_slot: Option<usize> = {
            'passes: {
                for phase in 0..=desc.passes {
                    for (g, ss) in self.groups.iter().zip(sc.ss.iter_mut()) {
                        kernel.step_scalars(&g.config, phase, &sc.global, ss);
                    }
                    for j in 0..na {
                        let red = &sc.reduced[j * nr..(j + 1) * nr];
                        let g = sc.slot_group[j];
                        let (c, ss) = (&self.groups[g].config, &sc.ss[g]);
                        kernel.tensor_scalars(c, phase, ss, &sc.metas[j], red, &mut sc.ts[j]);
                    }
                    let ptrs = &sc.ptrs;
                    let ts = &sc.ts;
                    let sss = &sc.ss;
                    let slot_group = &sc.slot_group;
                    for (b, info) in desc.matrices.iter().enumerate() {
                        if info.phase != phase {
                            continue;
                        }
                        let metas = &sc.metas;
                        let run = |ws: &mut crate::mat::Workspace, j: usize| {
                            let pt = ptrs[j];
                            let n = metas[j].numel;
                            // SAFETY: see `Ptrs`; one call per tensor, each
                            // writing only its own block's state buffer.
                            let rows = unsafe { rows_of(pt, 0, n, desc.row_reductions) };
                            let ss = &sss[slot_group[j]];
                            // The block writes only its own (f32) buffer.
                            unsafe {
                                staged(pt, ns, 0, n, Write::Nothing, u32::MAX, |p, g, st| {
                                    kernel.matrix(b, ss, &ts[j], p, g, st, rows, pt.dims, ws)
                                })
                            }
                            .map_err(|e| (j, info.name.to_string(), e))
                        };
                        // Sharded: the tensors this rank owns (a matrix
                        // block's tensor is one unit).
                        let mine = |j: &usize| {
                            plan.is_none_or(|pl| {
                                let (a, b) = pl.part(sc.active[*j]);
                                a < b
                            })
                        };
                        let res: Result<(), (usize, String, String)> = (0..na)
                            .into_par_iter()
                            .filter(mine)
                            .map(|j| crate::mat::with_workspace(|ws| run(ws, j)))
                            .collect();
                        let res = match self.shard.as_ref().filter(|_| plan.is_some()) {
                            Some(sh) => agree_on_matrix(sh, b, res, &mut sc.send),
                            None => res.map_err(Ok),
                        };
                        match res {
                            Ok(()) => {}
                            Err(Ok(e)) => {
                                mat_err = Some(e);
                                break 'passes None;
                            }
                            Err(Err(e)) => {
                                comm_err = Some(e);
                                break 'passes None;
                            }
                        }
                    }
                    if phase < desc.passes && skip_pass_of(desc, phase, self.non_finite) {
                        continue;
                    }
                    if phase < desc.passes {
                        let reads = desc.pass_reads.get(phase).copied().unwrap_or(u32::MAX);
                        let run = |(item, acc): (&Item, &mut [f64])| {
                            let pt = ptrs[item.slot];
                            // SAFETY: whole rows per item, so items' row ranges are disjoint.
                            let rows =
                                unsafe { rows_of(pt, item.start, item.len, desc.row_reductions) };
                            let ss = &sss[slot_group[item.slot]];
                            // SAFETY: see `Ptrs`; read-only access to [start, start+len).
                            unsafe {
                                staged(
                                    pt,
                                    ns,
                                    item.start,
                                    item.len,
                                    Write::Nothing,
                                    reads,
                                    |p, g, st| {
                                        let st = st.map(|s| &*s);
                                        kernel.reduce(
                                            phase,
                                            ss,
                                            &ts[item.slot],
                                            p,
                                            g,
                                            st,
                                            rows,
                                            pt.dims,
                                            acc,
                                        );
                                    },
                                )
                            }
                        };
                        let own = sc.own.clone();
                        if nr > 0 {
                            let items = &sc.items[own.clone()];
                            let acc = &mut sc.acc[own.start * nr..own.end * nr];
                            if parallel {
                                items.par_iter().zip(acc.par_chunks_mut(nr)).for_each(run);
                            } else {
                                items.iter().zip(acc.chunks_mut(nr)).for_each(run);
                            }
                        }
                        if let (Some(sh), true) = (&self.shard, plan.is_some() && nr > 0) {
                            // Every rank's partials, in item order: the
                            // fold below then sees the unsharded step's.
                            if let Err(e) = sh.gather_partials(
                                phase,
                                &sc.item_counts,
                                nr,
                                &mut sc.acc,
                                &mut sc.send,
                            ) {
                                comm_err = Some(e);
                                break 'passes None;
                            }
                        }
                        combine(
                            desc,
                            phase,
                            &sc.items,
                            &sc.acc,
                            nr,
                            na,
                            &mut sc.reduced,
                            &mut sc.global,
                        );
                        if phase == 0
                            && self.non_finite != NonFinite::Ignore
                            && !sc.global[desc.finite_check].is_finite()
                        {
                            break 'passes Some(desc.non_finite_slot(&sc.reduced, na, nr));
                        }
                    } else {
                        // An update whose elements are independent of
                        // each other's position stages in pieces.
                        let update_write = if desc.factored
                            || desc.row_reductions > 0
                            || desc.dim_reductions != [0, 0]
                            || desc.states.iter().any(|s| s.reduced.is_some())
                        {
                            Write::Update
                        } else {
                            Write::UpdatePieces
                        };
                        let run = |item: &Item| {
                            let pt = ptrs[item.slot];
                            let rows =
                                unsafe { rows_of(pt, item.start, item.len, desc.row_reductions) };
                            let ss = &sss[slot_group[item.slot]];
                            // Buffers the kernel's loop converts as it goes
                            // (bf16 with rounding to nearest): no scratch.
                            // SAFETY: see `Ptrs`; work items cover disjoint ranges.
                            if let Some((p, g, st, round)) =
                                unsafe { stored_words(pt, ns, item.start, item.len) }
                            {
                                let ts = &ts[item.slot];
                                if kernel.update_words(ss, ts, p, g, st, round, rows, pt.dims) {
                                    return;
                                }
                            }
                            // SAFETY: see `Ptrs`; work items cover disjoint ranges.
                            unsafe {
                                staged(
                                    pt,
                                    ns,
                                    item.start,
                                    item.len,
                                    update_write,
                                    u32::MAX,
                                    |p, g, st| {
                                        kernel.update(ss, &ts[item.slot], p, g, st, rows, pt.dims)
                                    },
                                )
                            }
                        };
                        let items = &sc.items[sc.own.clone()];
                        if parallel {
                            items.par_iter().for_each(run);
                        } else {
                            items.iter().for_each(run);
                        }
                    }
                }
                None
            }
        };
        if mat_err.is_some() || bad_slot.is_some() || comm_err.is_some() {
            // Neither the parameters nor the spec's states have been
            // written (at most a matrix block's own buffer): leave
            // everything as it was, including state this step created and
            // the parameter count a first step fixes.
            for &i in &sc.created {
                self.tensors[i] = None;
            }
            self.tensors.truncate(tensors_before);
            self.n_params = n_params_before;
        }
        if let Some(e) = comm_err {
            return Err(StepError::Comm(e));
        }
        if let Some((j, block, message)) = mat_err {
            let index = sc.active[j];
            return Err(StepError::Matrix {
                index,
                block,
                shape: params[index].shape.to_vec(),
                message,
            });
        }
        if let Some(j) = bad_slot {
            let index = sc.active[j];
            if self.non_finite == NonFinite::Error {
                return Err(StepError::NonFinite { index });
            }
            self.non_finite_skips += 1;
            return Ok(StepReport {
                step: self.steps,
                updated: 0,
                skipped: params.len(),
                skipped_non_finite: Some(index),
            });
        }
        if let Some(sh) = &self.shard {
            if let Some(pl) = plan {
                let p32 = T::f32_params(params).expect("bf16/f16 parameters refused when sharded");
                let mut values: Vec<&mut [f32]> = p32.iter_mut().map(|p| &mut *p.value).collect();
                sh.gather_params(pl, &mut values, &mut sc.shard)
                    .map_err(StepError::Comm)?;
            }
        }
        // The step succeeded: per-tensor states take their new values.
        let per_tensor = desc.states.iter().any(|s| s.per_tensor);
        for (j, &i) in sc.active.iter().enumerate() {
            let Some(t) = self.tensors[i].as_mut() else {
                continue;
            };
            t.t += 1;
            if per_tensor {
                let mut out = [0.0f32; MAX_STATES];
                kernel.tensor_states(&sc.ss[sc.slot_group[j]], &sc.ts[j], &mut out);
                #[allow(irrefutable_let_patterns)]
                let Store::Host { bufs, .. } = &mut t.store
                else {
                    unreachable!("the CPU keeps state in host memory")
                };
                for (k, info) in desc.states.iter().enumerate() {
                    if info.per_tensor {
                        bufs[k].f32s_mut()[0] = out[k];
                    }
                }
            }
        }
        self.steps += 1;
        Ok(StepReport {
            step: self.steps,
            updated: na,
            skipped: params.len() - na,
            skipped_non_finite: None,
        })
    }
}

/// Puts the optimizer's name into an unknown-hyperparameter error.
fn named(optimizer: &str, e: GroupError) -> GroupError {
    match e {
        GroupError::Config {
            group,
            error: ConfigError::Unknown { name, known, .. },
        } => GroupError::Config {
            group,
            error: ConfigError::Unknown {
                optimizer: optimizer.into(),
                name,
                known,
            },
        },
        e => e,
    }
}

/// Sharded: whether matrix block `block` failed on any rank. Each rank
/// sends the slot of its failure (or -1); every rank then fails with the
/// lowest slot: `Err(Ok(..))` with the owner's message where it is this
/// rank's, a pointer to the owner's otherwise.
fn agree_on_matrix(
    sh: &crate::shard::Shard,
    block: usize,
    res: Result<(), (usize, String, String)>,
    buf: &mut Vec<f64>,
) -> Result<(), Result<(usize, String, String), crate::comm::CommError>> {
    let size = sh.comm.size();
    let mine = match &res {
        Ok(()) => -1.0,
        Err((j, ..)) => *j as f64,
    };
    buf.clear();
    buf.resize(size, 0.0);
    sh.comm
        .all_gather_f64(
            &format!("whether matrix block {block} failed"),
            &[mine],
            &vec![1; size],
            buf,
        )
        .map_err(Err)?;
    let failed = buf
        .iter()
        .enumerate()
        .filter(|(_, &j)| j >= 0.0)
        .min_by(|a, b| a.1.total_cmp(b.1));
    match (failed, res) {
        (None, _) => Ok(()),
        (Some((_, &j)), Err(e)) if e.0 == j as usize => Err(Ok(e)),
        (Some((r, &j)), _) => Err(Ok((
            j as usize,
            format!("block {block}"),
            format!("failed on rank {r}, which owns this parameter (its message is there)"),
        ))),
    }
}

/// Whether reduction pass `phase` can be skipped: it holds only the finite
/// check and the policy does not check.
pub(crate) fn skip_pass_of(desc: &KernelDesc, phase: usize, policy: NonFinite) -> bool {
    policy == NonFinite::Ignore
        && desc
            .reductions
            .iter()
            .enumerate()
            .all(|(r, info)| info.pass != phase || r == desc.finite_check)
}

/// Combines the per-chunk partial results of pass `phase` in a fixed order:
/// chunks in element order per tensor, then tensors in parameter order.
fn combine(
    desc: &KernelDesc,
    phase: usize,
    items: &[Item],
    acc: &[f64],
    nr: usize,
    na: usize,
    reduced: &mut [f64],
    global: &mut [f64],
) {
    for (r, info) in desc.reductions.iter().enumerate() {
        if info.pass != phase {
            continue;
        }
        for j in 0..na {
            reduced[j * nr + r] = info.op.identity();
        }
        for (k, item) in items.iter().enumerate() {
            let cell = &mut reduced[item.slot * nr + r];
            *cell = info.op.combine(*cell, acc[k * nr + r]);
        }
        if info.scope == Scope::Global {
            let mut g = info.op.identity();
            for j in 0..na {
                g = info.op.combine(g, reduced[j * nr + r]);
            }
            global[r] = g;
        }
    }
}

/// The row results of the rows in [start, start+len) (empty without row
/// reductions).
unsafe fn rows_of<'a>(pt: Ptrs, start: usize, len: usize, per_row: usize) -> &'a mut [f64] {
    if pt.whole {
        // The whole tensor: every result (row, last and second-to-last).
        return std::slice::from_raw_parts_mut(pt.rows, pt.dims.results);
    }
    if per_row == 0 || len == 0 {
        return &mut [];
    }
    let first = start / pt.dims.row_len - pt.rows_off;
    let count = len.div_ceil(pt.dims.row_len);
    std::slice::from_raw_parts_mut(pt.rows.add(first * per_row), count * per_row)
}

unsafe fn chunk_mut<'a>(
    pt: Ptrs,
    ns: usize,
    start: usize,
    len: usize,
) -> (&'a mut [f32], &'a [f32], [&'a mut [f32]; MAX_STATES]) {
    let p = std::slice::from_raw_parts_mut(pt.p.add(start), len);
    let g = std::slice::from_raw_parts(pt.g.add(start - pt.g_off), len);
    let mut st: [&mut [f32]; MAX_STATES] = Default::default();
    for ((s, &ptr), &whole) in st.iter_mut().zip(&pt.st).zip(&pt.st_len).take(ns) {
        *s = match whole {
            Some(n) => std::slice::from_raw_parts_mut(ptr, n),
            None => std::slice::from_raw_parts_mut(ptr.add(start - pt.st_off), len),
        };
    }
    (p, g, st)
}

/// What [`staged`] narrows back after the kernel ran.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Nothing: a reduction pass, or a matrix block (which writes only its
    /// own f32 buffer).
    Nothing,
    /// The parameter and every narrowed state: the update pass.
    Update,
    /// As `Update`, for an update whose every element is computed from
    /// that element alone (no rows, columns or reduced states): staged in
    /// pieces of [`PIECE`] values, so the scratch stays in the first-level
    /// cache and every buffer streams from memory at once, as in one fused
    /// loop. The same bits as one piece.
    UpdatePieces,
}

/// Values per piece of a [`Write::UpdatePieces`] update: a q8 block, so a
/// piece of a block-aligned work item stores whole blocks.
const PIECE: usize = crate::precision::Q8_BLOCK;

thread_local! {
    /// Each thread's f32 scratch for narrowed buffers (kept between steps).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` over the f32 values of elements `[start, start + len)` of a
/// tensor: its buffers in place where they are f32; where `pt.narrow` says
/// they are stored narrower, copies widened into this thread's scratch,
/// narrowed back afterwards as `write` says (the parameter with its
/// rounding; states to nearest, q8 blocks re-scaled). A narrowed buffer
/// `reads` (a `KernelDesc::pass_reads` mask) leaves out is not widened: a
/// state is then an empty slice, the parameter or gradient scratch of the
/// right length.
///
/// # Safety
/// As `chunk_mut`: see [`Ptrs`].
unsafe fn staged<R>(
    pt: Ptrs,
    ns: usize,
    start: usize,
    len: usize,
    write: Write,
    reads: u32,
    mut f: impl FnMut(&mut [f32], &[f32], [&mut [f32]; MAX_STATES]) -> R,
) -> R {
    if !pt.narrow.any {
        let (p, g, st) = chunk_mut(pt, ns, start, len);
        return f(p, g, st);
    }
    if write == Write::UpdatePieces && len > PIECE {
        let mut o = 0;
        loop {
            let m = PIECE.min(len - o);
            let r = staged_range(pt, ns, start + o, m, Write::Update, reads, &mut f);
            o += m;
            if o == len {
                return r;
            }
        }
    }
    staged_range(pt, ns, start, len, write, reads, &mut f)
}

/// Elements `[start, start + len)` of a tensor with something narrowed, as
/// [`crate::cpu::Kernel::update_words`] takes them, with how the parameter
/// is rounded, where every narrowed buffer is bf16 (no master copy) and
/// every state a per-element one; else `None` (the engine stages them).
///
/// # Safety
/// As `chunk_mut`: see [`Ptrs`].
unsafe fn stored_words<'a>(
    pt: Ptrs,
    ns: usize,
    start: usize,
    len: usize,
) -> Option<(
    crate::cpu::Words<'a>,
    crate::cpu::WordsRef<'a>,
    [crate::cpu::Words<'a>; MAX_STATES],
    crate::cpu::Round,
)> {
    use crate::cpu::{Bf16Bits, Round, Words, WordsRef};
    use std::slice::{from_raw_parts, from_raw_parts_mut};
    let nw = pt.narrow;
    if !nw.any || nw.master {
        return None;
    }
    // The parameter's random bits, as `precision::narrow` draws them.
    let round = match nw.rounding {
        crate::precision::Rounding::Stochastic { seed } if !nw.p.is_null() => Round {
            stochastic: true,
            key: crate::precision::noise_key(seed, nw.step, nw.index),
            base: start,
        },
        _ => Round::default(),
    };
    let half = |ptr: *mut u16| ptr as *mut Bf16Bits;
    if (!nw.p.is_null() || !nw.g.is_null()) && nw.kind != Storage::Bf16 {
        return None;
    }
    let p = if nw.p.is_null() {
        Words::F32(from_raw_parts_mut(pt.p.add(start), len))
    } else {
        Words::Bf16(from_raw_parts_mut(half(nw.p).add(start), len))
    };
    let g = if nw.g.is_null() {
        WordsRef::F32(from_raw_parts(pt.g.add(start - pt.g_off), len))
    } else {
        WordsRef::Bf16(from_raw_parts(
            half(nw.g as *mut u16).add(start - pt.g_off),
            len,
        ))
    };
    let mut st: [Words<'a>; MAX_STATES] = Default::default();
    for (k, s) in st.iter_mut().enumerate().take(ns) {
        let at = start - pt.st_off;
        *s = match (nw.st[k].kind, pt.st_len[k]) {
            (Storage::F32, None) => Words::F32(from_raw_parts_mut(pt.st[k].add(at), len)),
            (Storage::Bf16, _) => Words::Bf16(from_raw_parts_mut(
                (nw.st[k].data as *mut Bf16Bits).add(at),
                len,
            )),
            _ => return None,
        };
    }
    Some((p, g, st, round))
}

/// [`staged`] over one range, in one piece.
///
/// # Safety
/// As [`staged`].
unsafe fn staged_range<R>(
    pt: Ptrs,
    ns: usize,
    start: usize,
    len: usize,
    write: Write,
    reads: u32,
    f: &mut dyn FnMut(&mut [f32], &[f32], [&mut [f32]; MAX_STATES]) -> R,
) -> R {
    use agr_codegen::backend::{READS_G, READS_P};
    let nw = pt.narrow;
    // Taken, not borrowed: a matrix block's products may run another work
    // item on this thread (rayon), which then takes a fresh buffer.
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let need = len * (2 + ns);
    if buf.len() < need {
        buf.resize(need, 0.0);
    }
    let base = buf.as_mut_ptr();
    let stage_p = !nw.p.is_null() && !nw.master;
    let p: *mut f32 = if stage_p {
        if reads & READS_P != 0 {
            let w = std::slice::from_raw_parts(nw.p.add(start), len);
            crate::precision::widen(nw.kind, w, std::slice::from_raw_parts_mut(base, len));
        }
        base
    } else {
        pt.p.add(start)
    };
    let g: *const f32 = if nw.g.is_null() {
        pt.g.add(start - pt.g_off)
    } else {
        let out = base.add(len);
        if reads & READS_G != 0 {
            let w = std::slice::from_raw_parts(nw.g.add(start - pt.g_off), len);
            crate::precision::widen(nw.kind, w, std::slice::from_raw_parts_mut(out, len));
        }
        out
    };
    let mut st: [&mut [f32]; MAX_STATES] = Default::default();
    for (k, s) in st.iter_mut().enumerate().take(ns) {
        *s = if nw.st[k].kind != Storage::F32 && reads & (1 << k) == 0 {
            &mut []
        } else if nw.st[k].kind != Storage::F32 {
            let out = std::slice::from_raw_parts_mut(base.add((2 + k) * len), len);
            nw.st[k].load(start - pt.st_off, out);
            out
        } else {
            match pt.st_len[k] {
                Some(n) => std::slice::from_raw_parts_mut(pt.st[k], n),
                None => std::slice::from_raw_parts_mut(pt.st[k].add(start - pt.st_off), len),
            }
        };
    }
    let r = f(
        std::slice::from_raw_parts_mut(p, len),
        std::slice::from_raw_parts(g, len),
        st,
    );
    if write != Write::Nothing {
        if !nw.p.is_null() {
            // The new parameter (or the master copy's rounding).
            let words = std::slice::from_raw_parts_mut(nw.p.add(start), len);
            let vals = std::slice::from_raw_parts(p, len);
            crate::precision::narrow(nw.kind, nw.rounding, nw.step, nw.index, start, vals, words);
        }
        for k in 0..ns {
            if nw.st[k].kind != Storage::F32 {
                let vals = std::slice::from_raw_parts(base.add((2 + k) * len), len);
                nw.st[k].store(start - pt.st_off, vals);
            }
        }
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.capacity() < buf.capacity() {
            *s = buf;
        }
    });
    r
}

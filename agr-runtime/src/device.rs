//! Where an optimizer's steps run, and the one step path every device that
//! runs the generated CUDA shares.
//!
//! The engine ([`Optimizer`]) owns the plan: parameters, names, groups,
//! state layout, step counts, the non-finite policy and checkpoints. A device
//! owns memory and executes passes:
//!
//! - **CPU**: the generated Rust loops (or the IR evaluator), over host state.
//! - **CUDA devices**: the generated kernels, launched through a launch
//!   layer (the crate's `Launch` trait) with two implementations: the emulated device
//!   ([`crate::emulated`], host C++ one block at a time, host memory) and a
//!   GPU (`crate::cuda`, cudarc and NVRTC, device memory). Both get the same
//!   tensor table, chunk table, per-group hyperparameters and skip counters
//!   from one step path of the engine, so CI runs every engine path a GPU
//!   run takes.
//!
//! On a CUDA device the non-finite skip is decided by the update kernel
//! (see `NonFinite::Skip`): a step is a fixed sequence of launches with no
//! read back. The device counts skipped steps, once per step and once per
//! parameter; the engine counts steps *issued*, and its step counts are
//! issued minus skipped, read back only when asked ([`Optimizer::steps`],
//! [`Optimizer::tensor_steps`], [`Optimizer::non_finite_skips`],
//! checkpoints).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::buf::{AlignedBuf, StateBuf};
use crate::cpu::{Kernel, KernelDesc};
use crate::emulated::{self, AgrChunk, AgrTensor, EmulatedError, HostModule};
use crate::matdev::MatBatch;
use crate::optimizer::TensorState;
use crate::precision::{KernelTypes, Rounding, Storage};
use crate::{NonFinite, Optimizer, StepError, StepReport, TensorMeta, MAX_STATES};

/// Where an optimizer's steps run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The fused CPU loops (generated Rust, or the IR evaluator for a spec
    /// compiled at run time).
    #[default]
    Cpu,
    /// The generated CUDA kernels compiled as host C++ and launched block by
    /// block on the CPU, with a GPU step's tables, counters and read-backs
    /// (see [`crate::emulated`]): every engine path a GPU run takes, without
    /// a GPU.
    EmulatedCuda,
    /// The GPU with this ordinal (needs the `cuda` feature): kernels compiled
    /// by NVRTC, state in device memory.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::EmulatedCuda => f.write_str("emulated-cuda"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "emulated-cuda" => Ok(Device::EmulatedCuda),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{other}`; the devices are `cpu`, `emulated-cuda`, `cuda` and `cuda:N`"
                )),
            },
        }
    }
}

/// Why an optimizer cannot move to, or work on, a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The emulated CUDA device cannot compile or load the kernels.
    Emulated(EmulatedError),
    /// This build has no GPU support (the `cuda` feature).
    NoCudaFeature,
    /// The CUDA driver, NVRTC or the GPU failed.
    Cuda(String),
    /// The spec has what runs on the CPU only: a matrix block whose loop
    /// counts, conditions or coefficients depend on the step (see
    /// [`crate::KernelDesc::cpu_only`]).
    CpuOnly { optimizer: String, reason: String },
    /// A sharded optimizer stays on the device it was sharded on (its
    /// parts follow that device's chunks; see [`crate::shard`]).
    Sharded { optimizer: String },
    /// 8-bit states (see [`crate::Optimizer::set_precision`]) live on the
    /// CPU in this version.
    Narrowed { optimizer: String },
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::Emulated(e) => e.fmt(f),
            DeviceError::NoCudaFeature => f.write_str(
                "this build of agr has no GPU support: build agr-runtime with the `cuda` feature",
            ),
            DeviceError::Cuda(e) => write!(f, "CUDA: {e}"),
            DeviceError::CpuOnly { optimizer, reason } => write!(
                f,
                "`{optimizer}` has {reason}, which runs on the CPU only in this version; step it on the CPU"
            ),
            DeviceError::Narrowed { optimizer } => write!(
                f,
                "`{optimizer}` keeps 8-bit (q8/uq8) states, which step on the CPU only in this version; store them in bf16, f16 or f32 (`set_precision`) before moving it"
            ),
            DeviceError::Sharded { optimizer } => write!(
                f,
                "`{optimizer}` is sharded, and a sharded optimizer stays on the device it was sharded on; move it before `shard`"
            ),
        }
    }
}

impl std::error::Error for DeviceError {}

impl From<EmulatedError> for DeviceError {
    fn from(e: EmulatedError) -> Self {
        DeviceError::Emulated(e)
    }
}

/// A parameter's state buffers, where its device keeps them.
pub(crate) enum Store {
    /// Host memory (the CPU and the emulated CUDA device).
    Host {
        /// One per spec state, each in its storage (see [`crate::precision`]).
        bufs: Vec<StateBuf>,
        /// Row-reduction results of the current step (`ROW_REDUCTIONS` per row).
        rows: Vec<f64>,
        /// The f32 master copy of a bf16/f16 parameter (see
        /// [`crate::Precision::master`]), made from the parameter on its
        /// first step.
        master: Option<AlignedBuf>,
    },
    /// GPU memory.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::DeviceState),
}

impl Clone for Store {
    fn clone(&self) -> Self {
        match self {
            Store::Host { bufs, rows, master } => Store::Host {
                bufs: bufs.clone(),
                rows: rows.clone(),
                master: master.clone(),
            },
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => Store::Cuda(d.clone()),
        }
    }
}

impl Store {
    /// A new parameter's host state: each buffer at its spec's fill value.
    /// `storage[k]` is state `k`'s storage (f32 where `storage` is shorter).
    pub(crate) fn new_host(
        desc: &KernelDesc,
        shape: &[usize],
        index: usize,
        storage: &[Storage],
    ) -> Store {
        let ns = desc.states.len();
        Store::Host {
            bufs: desc
                .states
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let kind = storage.get(k).copied().unwrap_or_default();
                    StateBuf::filled(kind, s.len(shape), s.fill, index * ns + k)
                })
                .collect(),
            rows: vec![0.0; crate::Dims::of(shape, desc).results],
            master: None,
        }
    }

    /// The host state a rank keeps for its part `[lo, hi)` of a parameter
    /// of `shape` (see [`crate::shard`]): its elements of the per-element
    /// buffers and the results of its rows; a reduced state (a factored
    /// spec, whose tensor is one unit) only if it owns the tensor; every
    /// per-tensor state.
    pub(crate) fn new_host_part(
        desc: &KernelDesc,
        shape: &[usize],
        index: usize,
        (lo, hi): (usize, usize),
        storage: &[Storage],
    ) -> Store {
        let numel: usize = shape.iter().product();
        if (lo, hi) == (0, numel) {
            return Store::new_host(desc, shape, index, storage);
        }
        let ns = desc.states.len();
        let dims = crate::Dims::of(shape, desc);
        let rows = if desc.factored || dims.row_len == 0 {
            // A factored tensor is one unit: not this rank's.
            0
        } else {
            (hi - lo) / dims.row_len * desc.row_reductions
        };
        Store::Host {
            bufs: desc
                .states
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let len = if s.per_tensor {
                        1
                    } else if s.reduced.is_some() {
                        0
                    } else {
                        hi - lo
                    };
                    let kind = storage.get(k).copied().unwrap_or_default();
                    StateBuf::filled(kind, len, s.fill, index * ns + k)
                })
                .collect(),
            rows: vec![0.0; rows],
            master: None,
        }
    }

    /// State buffer `k` in host memory (copied from a GPU).
    ///
    /// # Panics
    /// If the copy from the GPU fails (its context is lost).
    pub(crate) fn to_host(&self, k: usize) -> Cow<'_, [f32]> {
        match self {
            Store::Host { bufs, .. } => bufs[k].to_f32(),
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => Cow::Owned(
                d.to_host(k)
                    .unwrap_or_else(|e| panic!("reading optimizer state back from the GPU: {e}")),
            ),
        }
    }

    /// State buffer `k` where it is in host memory.
    pub(crate) fn host_buf(&self, k: usize) -> Option<&StateBuf> {
        match self {
            Store::Host { bufs, .. } => bufs.get(k),
            #[cfg(feature = "cuda")]
            Store::Cuda(_) => None,
        }
    }

    /// Bytes of the state buffers (the master copy included) and values of
    /// the row results (f64).
    pub(crate) fn lens(&self) -> (usize, usize) {
        match self {
            Store::Host { bufs, rows, master } => (
                bufs.iter().map(|b| b.bytes()).sum::<usize>()
                    + master.as_ref().map_or(0, |m| m.as_slice().len() * 4),
                rows.len(),
            ),
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => d.lens(),
        }
    }

    /// The master copy in host memory (copied from a GPU), if there is one.
    ///
    /// # Panics
    /// If the copy from the GPU fails (its context is lost).
    pub(crate) fn master_to_host(&self) -> Option<Cow<'_, [f32]>> {
        match self {
            Store::Host { master, .. } => master.as_ref().map(|m| Cow::Borrowed(m.as_slice())),
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => d.master_to_host().map(|m| {
                Cow::Owned(
                    m.unwrap_or_else(|e| panic!("reading a master copy back from the GPU: {e}")),
                )
            }),
        }
    }

    /// Whether the parameter has a master copy here.
    pub(crate) fn has_master(&self) -> bool {
        match self {
            Store::Host { master, .. } => master.is_some(),
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => d.has_master(),
        }
    }

    /// Drops the master copy (the parameter is stepped in its own storage).
    pub(crate) fn drop_master(&mut self) {
        match self {
            Store::Host { master, .. } => *master = None,
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => d.drop_master(),
        }
    }

    /// The buffers as the kernels address them: the states (each in its
    /// storage), the rows and the master copy (0: none).
    fn pointers(&mut self) -> ([u64; MAX_STATES], u64, u64) {
        match self {
            Store::Host { bufs, rows, master } => {
                let mut st = [0u64; MAX_STATES];
                for (k, b) in bufs.iter_mut().enumerate() {
                    st[k] = match b.storage() {
                        Storage::F32 => b.f32_ptr() as u64,
                        _ => b.raw().data as u64,
                    };
                }
                let m = master.as_mut().map_or(0, |m| m.as_mut_ptr() as u64);
                (st, rows.as_mut_ptr() as u64, m)
            }
            #[cfg(feature = "cuda")]
            Store::Cuda(d) => d.pointers(),
        }
    }
}

/// What executes an optimizer's steps.
#[derive(Clone)]
pub(crate) enum Exec {
    Cpu,
    Emulated(Emulated),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::CudaExec>),
}

/// The emulated CUDA device: the kernels and the skip counters in "device"
/// (host) memory.
#[derive(Clone)]
pub(crate) struct Emulated {
    module: Arc<HostModule>,
    /// `[0]`: steps the update kernel skipped; `[1 + i]`: of those, parameter `i`'s.
    counts: Vec<u32>,
    /// Matrix programs' registers (see [`crate::matdev`]).
    scratch: Vec<f32>,
}

/// The launch layer: runs one step's passes over tables the engine built.
pub(crate) trait Launch {
    /// Runs every pass of the step (the reduction passes `policy` needs, then
    /// the update); before the pass of a matrix block's phase, the block's
    /// kernel and its programs (`mats`, see [`crate::matdev`]). Under [`NonFinite::Error`] it reads the finite check back
    /// after the first pass and returns the slot of a tensor whose gradient
    /// is not finite, having written nothing. Under `Skip` the update kernel
    /// decides, counting into the skip counters; nothing is read back.
    ///
    /// # Safety
    /// The tables' pointers must address live buffers of the sizes they say,
    /// in this device's memory, written by nothing else during the step; the
    /// skip counters must cover every parameter.
    unsafe fn run(
        &mut self,
        desc: &'static KernelDesc,
        hypers: &[f64],
        chunks: &[AgrChunk],
        tensors: &[AgrTensor],
        mats: &[MatBatch],
        policy: NonFinite,
        gather: Option<GatherPartials<'_>>,
    ) -> Result<Option<usize>, DeviceError>;
    /// The skip counters' address (`[0]` for the step, `[1 + i]` per parameter).
    fn counts_ptr(&mut self) -> u64;
    /// The skip counters (on a GPU: read back).
    fn counts(&self) -> Cow<'_, [u32]>;
    /// How many skip counters there are (no read back).
    fn counts_len(&self) -> usize;
    /// Replaces the skip counters by `n` zeros.
    fn reset_counts(&mut self, n: usize) -> Result<(), DeviceError>;
    /// A new parameter's state buffers, each at its fill value in its
    /// storage, for its elements `part` (all of them unsharded: see
    /// [`Store::new_host_part`]).
    fn new_store(
        &mut self,
        desc: &KernelDesc,
        shape: &[usize],
        index: usize,
        part: (usize, usize),
        storage: &[Storage],
    ) -> Result<Store, DeviceError>;
    /// Makes the kernels for buffers stored as `types` the ones a step
    /// runs (compiled once per set of types, then reused).
    fn use_types(
        &mut self,
        desc: &'static KernelDesc,
        types: KernelTypes,
    ) -> Result<(), DeviceError>;
    /// Puts the f32 master copy of the bf16/f16 parameter at `value` (`len`
    /// words of `kind`; parameter `index`) into `store`: its words widened,
    /// exactly.
    ///
    /// # Safety
    /// `value` must address `len` live words in this device's memory.
    unsafe fn make_master(
        &mut self,
        store: &mut Store,
        value: u64,
        len: usize,
        kind: Storage,
        index: usize,
    ) -> Result<(), DeviceError>;
}

/// A sharded step's exchange of one reduction pass's chunk partials (see
/// [`crate::shard`]): called with the pass and the whole partials buffer
/// (every chunk's), this rank's chunks filled in; it fills in the others'.
/// The reduction kernel is then launched a second time, to fold them.
pub(crate) type GatherPartials<'a> =
    &'a mut dyn FnMut(usize, &mut [f64]) -> Result<(), DeviceError>;

impl Launch for Emulated {
    unsafe fn run(
        &mut self,
        desc: &'static KernelDesc,
        hypers: &[f64],
        chunks: &[AgrChunk],
        tensors: &[AgrTensor],
        mats: &[MatBatch],
        policy: NonFinite,
        gather: Option<GatherPartials<'_>>,
    ) -> Result<Option<usize>, DeviceError> {
        let counts = self.counts.as_mut_ptr();
        self.module.run(
            desc,
            hypers,
            chunks,
            tensors,
            mats,
            &mut self.scratch,
            policy,
            counts,
            gather,
        )
    }
    fn counts_ptr(&mut self) -> u64 {
        self.counts.as_mut_ptr() as u64
    }
    fn counts(&self) -> Cow<'_, [u32]> {
        emulated::note_read_back();
        Cow::Borrowed(&self.counts)
    }
    fn counts_len(&self) -> usize {
        self.counts.len()
    }
    fn reset_counts(&mut self, n: usize) -> Result<(), DeviceError> {
        self.counts = vec![0; n];
        Ok(())
    }
    fn new_store(
        &mut self,
        desc: &KernelDesc,
        shape: &[usize],
        index: usize,
        part: (usize, usize),
        storage: &[Storage],
    ) -> Result<Store, DeviceError> {
        Ok(Store::new_host_part(desc, shape, index, part, storage))
    }
    fn use_types(
        &mut self,
        desc: &'static KernelDesc,
        types: KernelTypes,
    ) -> Result<(), DeviceError> {
        if self.module.types() != types {
            self.module = HostModule::load_for(desc, types)?;
        }
        Ok(())
    }
    unsafe fn make_master(
        &mut self,
        store: &mut Store,
        value: u64,
        len: usize,
        kind: Storage,
        index: usize,
    ) -> Result<(), DeviceError> {
        #[allow(irrefutable_let_patterns)]
        let Store::Host { master, .. } = store
        else {
            unreachable!("the emulated device keeps state in host memory")
        };
        // SAFETY: the caller's contract; host memory is the device's.
        let words = unsafe { std::slice::from_raw_parts(value as *const u16, len) };
        *master = Some(crate::precision::master_of(kind, words, index));
        Ok(())
    }
}

impl Exec {
    pub(crate) fn device(&self) -> Device {
        match self {
            Exec::Cpu => Device::Cpu,
            Exec::Emulated(_) => Device::EmulatedCuda,
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => Device::Cuda(c.ordinal()),
        }
    }

    /// The launch layer of a CUDA device; `None` on the CPU.
    fn launch(&mut self) -> Option<&mut dyn Launch> {
        match self {
            Exec::Cpu => None,
            Exec::Emulated(e) => Some(e),
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => Some(&mut **c),
        }
    }

    /// The device's skip counters (empty on the CPU, which counts on the host).
    pub(crate) fn counts(&self) -> Cow<'_, [u32]> {
        match self {
            Exec::Cpu => Cow::Borrowed(&[]),
            Exec::Emulated(e) => e.counts(),
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => c.counts(),
        }
    }
}

/// One parameter as the kernels address it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawParam<'a> {
    pub value: u64,
    pub grad: Option<u64>,
    pub shape: &'a [usize],
}

impl<K: Kernel> Optimizer<K> {
    /// Where steps run.
    pub fn device(&self) -> Device {
        self.exec.device()
    }

    /// Moves the optimizer to `device`: its state (to or from GPU memory),
    /// its step counts and its kernels. Groups, names, hyperparameters and
    /// the non-finite policy stay; a step after a move continues the same
    /// trajectory (with the other device's arithmetic). On error nothing
    /// changes.
    pub fn set_device(&mut self, device: Device) -> Result<(), DeviceError> {
        if device == self.device() {
            return Ok(());
        }
        self.cpu_only(device)?;
        self.no_q8_on(device)?;
        let exec = match device {
            Device::Cpu => Exec::Cpu,
            Device::EmulatedCuda => Exec::Emulated(Emulated {
                module: HostModule::load_for(
                    self.desc,
                    KernelTypes::new(Storage::F32, &self.storage),
                )?,
                counts: vec![],
                scratch: vec![],
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Exec::Cuda(Box::new(crate::cuda::CudaExec::new(
                crate::cuda::default_stream(n)?,
                self.desc,
                crate::cuda::DType::F32,
            )?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(DeviceError::NoCudaFeature),
        };
        self.set_exec(exec)
    }

    /// A spec that runs on the CPU only (see [`crate::KernelDesc::cpu_only`])
    /// stays there: checked before a device's kernels are built for it.
    pub(crate) fn cpu_only(&self, device: Device) -> Result<(), DeviceError> {
        match self.desc.cpu_only {
            Some(why) if device != Device::Cpu => Err(DeviceError::CpuOnly {
                optimizer: self.desc.name.to_string(),
                reason: why.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// 8-bit states have no kernels: they keep an optimizer on the CPU.
    fn no_q8_on(&self, device: Device) -> Result<(), DeviceError> {
        if device != Device::Cpu && self.storage.iter().any(|s| s.is_q8()) {
            return Err(DeviceError::Narrowed {
                optimizer: self.desc.name.to_string(),
            });
        }
        Ok(())
    }

    /// Moves the optimizer to `exec`'s device (see [`Self::set_device`]).
    pub(crate) fn set_exec(&mut self, mut exec: Exec) -> Result<(), DeviceError> {
        // A sharded optimizer's parts are planned for its device's chunks.
        if self.shard.is_some() {
            return Err(DeviceError::Sharded {
                optimizer: self.desc.name.to_string(),
            });
        }
        self.no_q8_on(exec.device())?;
        // The steps the old device skipped come off the issued ones; then
        // the state moves (a copy: if that fails, nothing has changed).
        self.fold_counts();
        let tensors = move_state(&mut self.tensors, &self.exec, &mut exec)?;
        if let Some(l) = exec.launch() {
            l.reset_counts(self.n_params.map_or(0, |n| n + 1))?;
        }
        if let Some(t) = tensors {
            self.tensors = t;
        }
        self.exec = exec;
        Ok(())
    }

    /// Host state (a checkpoint's) in the memory of this optimizer's device.
    pub(crate) fn state_on_this_device(
        &mut self,
        tensors: Vec<Option<TensorState>>,
    ) -> Result<Vec<Option<TensorState>>, DeviceError> {
        let mut tensors = tensors;
        Ok(move_state(&mut tensors, &Exec::Cpu, &mut self.exec)?.unwrap_or(tensors))
    }

    /// Replaces the state and step counts (a checkpoint's, already in this
    /// device's memory); the device's skip counters start again from zero.
    pub(crate) fn install_state(
        &mut self,
        tensors: Vec<Option<TensorState>>,
        n_params: Option<usize>,
        steps: u64,
    ) {
        self.fold_counts();
        self.tensors = tensors;
        self.n_params = n_params;
        self.steps = steps;
        if let Some(l) = self.exec.launch() {
            // Host memory (emulated) cannot fail; on a GPU the next step
            // re-sizes counters of the wrong length (and reports a failure).
            let _ = l.reset_counts(n_params.map_or(0, |n| n + 1));
        }
    }

    /// Applies the device's skip counts to the host's step counts (read back
    /// from a GPU); the counters are then zero.
    fn fold_counts(&mut self) {
        // No counters yet (the first step sizes them): nothing to read back.
        if self.exec.launch().is_none_or(|l| l.counts_len() == 0) {
            return;
        }
        let counts = self.exec.counts().into_owned();
        if counts.iter().all(|&c| c == 0) {
            return;
        }
        self.steps -= u64::from(counts[0]);
        self.non_finite_skips += u64::from(counts[0]);
        for (i, t) in self.tensors.iter_mut().enumerate() {
            if let Some(t) = t {
                t.t -= u64::from(counts.get(i + 1).copied().unwrap_or(0));
            }
        }
        let n = counts.len();
        if let Some(l) = self.exec.launch() {
            // Host memory (emulated) cannot fail; a GPU that cannot zero 4n
            // bytes has lost its context, and the next step will say so.
            let _ = l.reset_counts(n);
        }
    }

    /// Steps that ran (a skipped one does not count).
    pub fn steps(&self) -> u64 {
        self.steps - u64::from(self.exec.counts().first().copied().unwrap_or(0))
    }

    /// [`Self::steps`] and each parameter's [`Self::tensor_steps`], `None`
    /// where it has no state or every one of its steps was skipped on the
    /// device (its state is then the initial one): one read of the counts
    /// for all of them.
    pub(crate) fn step_counts(&self) -> (u64, Vec<Option<u64>>) {
        let counts = self.exec.counts();
        let skipped = |k: usize| u64::from(counts.get(k).copied().unwrap_or(0));
        let tensors = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| t.as_ref().map(|t| t.t - skipped(i + 1)).filter(|&t| t > 0))
            .collect();
        (self.steps - skipped(0), tensors)
    }

    /// Steps skipped so far because a gradient was not finite.
    pub fn non_finite_skips(&self) -> u64 {
        self.non_finite_skips + u64::from(self.exec.counts().first().copied().unwrap_or(0))
    }

    /// Steps taken by parameter `index` (those with a gradient).
    pub fn tensor_steps(&self, index: usize) -> u64 {
        let counts = self.exec.counts();
        self.tensors
            .get(index)
            .and_then(|t| t.as_ref())
            .map_or(0, |t| {
                t.t - u64::from(counts.get(index + 1).copied().unwrap_or(0))
            })
    }

    /// One step on a CUDA device over parameters its kernels can address,
    /// already validated: the shared tables, the launch layer, the counts.
    ///
    /// # Safety
    /// Each `value` must address `prod(shape)` writable elements and each
    /// `grad` as many readable ones, in the device's memory, written by
    /// nothing else until the step's kernels have run.
    pub(crate) unsafe fn step_on_device(
        &mut self,
        params: &[RawParam<'_>],
        param: Storage,
    ) -> Result<StepReport, StepError> {
        let desc = self.desc;
        let policy = self.non_finite;
        // The counters cover every parameter (sized once the count is known;
        // checking the size reads nothing back).
        let l = self.exec.launch().expect("a CUDA device");
        if l.counts_len() != params.len() + 1 {
            self.fold_counts();
            let l = self.exec.launch().expect("a CUDA device");
            l.reset_counts(params.len() + 1).map_err(device_error)?;
        }
        let (n_params_before, tensors_before) = (self.n_params, self.tensors.len());
        self.n_params = Some(params.len());
        if self.tensors.len() < params.len() {
            self.tensors.resize_with(params.len(), || None);
        }
        let mut created = vec![];
        let result = self.step_on_device_inner(params, param, &mut created, desc, policy);
        if !matches!(result, Ok(None)) {
            // An error, or a non-finite gradient under `Error`: nothing was
            // written; undo what this step created.
            for &i in &created {
                self.tensors[i] = None;
            }
            self.tensors.truncate(tensors_before);
            self.n_params = n_params_before;
        }
        let active: Vec<usize> = (0..params.len())
            .filter(|&i| params[i].grad.is_some())
            .collect();
        match result {
            Err(e) => Err(e),
            Ok(Some(slot)) => Err(StepError::NonFinite {
                index: active[slot],
            }),
            Ok(None) => {
                for &i in &active {
                    if let Some(t) = self.tensors[i].as_mut() {
                        t.t += 1;
                    }
                }
                self.steps += 1;
                Ok(StepReport {
                    // Under `Skip` the device may yet have skipped this step:
                    // `steps()` reads its decision back.
                    step: self.steps,
                    updated: active.len(),
                    skipped: params.len() - active.len(),
                    skipped_non_finite: None,
                })
            }
        }
    }

    unsafe fn step_on_device_inner(
        &mut self,
        params: &[RawParam<'_>],
        param: Storage,
        created: &mut Vec<usize>,
        desc: &'static KernelDesc,
        policy: NonFinite,
    ) -> Result<Option<usize>, StepError> {
        // Sharded (see `crate::shard`): the plan the host path made.
        let plan = self.shard.as_ref().and_then(|sh| sh.plan.as_ref());
        let l = self.exec.launch().expect("a CUDA device");
        // The kernels for this step's storage types.
        l.use_types(desc, KernelTypes::new(param, &self.storage))
            .map_err(device_error)?;
        let counts = l.counts_ptr();
        // bf16/f16 parameters: a master copy, and how they are rounded.
        let master = self.precision.master && param != Storage::F32;
        let (sr, sr_seed) = match self.precision.rounding {
            Rounding::Stochastic { seed } if param != Storage::F32 => (1, seed),
            _ => (0, 0),
        };
        let mut metas = vec![];
        let mut table = vec![];
        let mut active = vec![];
        for (i, p) in params.iter().enumerate() {
            let Some(g) = p.grad else { continue };
            let numel: usize = p.shape.iter().product();
            let (lo, hi) = plan.as_ref().map_or((0, numel), |pl| pl.part(i));
            active.push(i);
            if self.tensors[i].is_none() {
                let store = l
                    .new_store(desc, p.shape, i, (lo, hi), &self.storage)
                    .map_err(device_error)?;
                created.push(i);
                self.tensors[i] = Some(TensorState {
                    shape: p.shape.to_vec(),
                    t: 0,
                    store,
                });
            }
            let st = self.tensors[i].as_mut().expect("created above");
            if master && !st.store.has_master() {
                l.make_master(&mut st.store, p.value, numel, param, i)
                    .map_err(device_error)?;
            }
            let (bufs, rows, master_ptr) = st.store.pointers();
            let meta = TensorMeta::of(p.shape, st.t + 1);
            metas.push(meta);
            table.push(AgrTensor {
                p: p.value,
                g,
                st: bufs,
                numel: meta.numel as i64,
                ndim: meta.ndim as i64,
                t: meta.t as f64,
                first_chunk: 0,
                n_chunks: 0,
                group: self.group_of.get(i).copied().unwrap_or(0) as i32,
                rows,
                row_len: meta.row_len as i64,
                skips: counts + 4 * (i as u64 + 1),
                view_rows: meta.view.rows as i64,
                view_cols: meta.view.cols as i64,
                st_off: lo as i64,
                g_off: 0,
                rows_off: if desc.row_reductions > 0 {
                    (lo / meta.row_len.max(1)) as i64
                } else {
                    0
                },
                master: if master { master_ptr } else { 0 },
                sr_seed,
                sr_step: (self.steps + 1) as i64,
                sr_skipped: counts,
                sr_param: i as i64,
                sr,
            });
        }
        if table.is_empty() {
            return Ok(None);
        }
        let (mut chunks, spans) =
            emulated::chunk_table(desc, &metas, emulated::CHUNK).map_err(|(slot, e)| {
                let index = params
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.grad.is_some())
                    .nth(slot)
                    .map_or(0, |(i, _)| i);
                StepError::Device(format!("parameter #{index}: {e}"))
            })?;
        for (t, (first, n)) in table.iter_mut().zip(spans) {
            t.first_chunk = first;
            t.n_chunks = n;
        }
        // Sharded: every rank launches every chunk (so the partials, the
        // skip counters and the per-tensor states line up), the others'
        // with no elements; the chunks a rank owns are one run of the table.
        let mut chunk_counts = vec![];
        if let Some(pl) = &plan {
            chunk_counts = vec![0usize; pl.size];
            for c in &mut chunks {
                let owner = pl.owner(active[c.tensor as usize], c.start as usize);
                chunk_counts[owner] += 1;
                if owner != pl.rank {
                    c.len = 0;
                }
            }
        }
        let mats = self.matrix_batches(params, &metas, &table, plan)?;
        let hypers = emulated::hyper_table(desc, self.groups.iter().map(|g| &g.config));
        let nr = desc.reductions.len().max(1);
        let shard = self.shard.as_ref();
        let mut send = vec![];
        let mut gather = |pass: usize, partials: &mut [f64]| -> Result<(), DeviceError> {
            let Some(sh) = shard else {
                return Ok(());
            };
            sh.gather_partials(pass, &chunk_counts, nr, partials, &mut send)
                .map_err(|e| DeviceError::Cuda(e.to_string()))
        };
        let gather: Option<GatherPartials<'_>> = if plan.is_some() {
            Some(&mut gather)
        } else {
            None
        };
        let l = self.exec.launch().expect("a CUDA device");
        l.run(desc, &hypers, &chunks, &table, &mats, policy, gather)
            .map_err(device_error)
    }

    /// The step's matrix programs on a device (see [`crate::matdev`]): per
    /// block, the active tensors grouped by shape and by the numbers the
    /// program reads (computed on the host from the hyperparameters and the
    /// shape, before any reduction), each group's program resolved once. A
    /// shape a program cannot run on is an error here, before anything is
    /// launched.
    fn matrix_batches(
        &self,
        params: &[RawParam<'_>],
        metas: &[TensorMeta],
        table: &[AgrTensor],
        plan: Option<&crate::shard::ShardPlan>,
    ) -> Result<Vec<MatBatch>, StepError> {
        let desc = self.desc;
        if desc.matrices.is_empty() {
            return Ok(vec![]);
        }
        let zeros = vec![0.0; desc.reductions.len()];
        let ss: Vec<K::StepScalars> = self
            .groups
            .iter()
            .map(|g| {
                let mut s = K::StepScalars::default();
                self.kernel.step_scalars(&g.config, 0, &zeros, &mut s);
                s
            })
            .collect();
        let active = params.iter().enumerate().filter(|(_, p)| p.grad.is_some());
        let mut batches: Vec<MatBatch> = vec![];
        let mut keys: Vec<(usize, usize, usize, Vec<u64>)> = vec![];
        let mut args = vec![];
        for ((i, p), (meta, t)) in active.zip(metas.iter().zip(table)) {
            if meta.numel == 0 {
                continue;
            }
            let group = self.group_of.get(i).copied().unwrap_or(0);
            let config = &self.groups[group].config;
            let mut ts = K::TensorScalars::default();
            self.kernel
                .tensor_scalars(config, 0, &ss[group], meta, &zeros, &mut ts);
            let (rows, cols) = (meta.numel / meta.row_len, meta.row_len);
            for (b, info) in desc.matrices.iter().enumerate() {
                self.kernel.matrix_args(b, &ss[group], &ts, &mut args);
                let key = (b, rows, cols, args.iter().map(|a| a.to_bits()).collect());
                let buf = t.st[info.state];
                // Sharded: every rank resolves every tensor's program (so a
                // shape it cannot take fails on every rank), and runs its own.
                let mine = plan.is_none_or(|pl| {
                    let (a, b) = pl.part(i);
                    a < b
                });
                match keys.iter().position(|k| *k == key) {
                    Some(at) if !mine => {
                        let _ = at;
                    }
                    Some(at) => batches[at].bufs.push(buf),
                    None => {
                        let prog = crate::matdev::resolve(info.code, info.regs, &args, rows, cols)
                            .map_err(|message| StepError::Matrix {
                                index: i,
                                block: info.name.to_string(),
                                shape: p.shape.to_vec(),
                                message,
                            })?;
                        keys.push(key);
                        batches.push(MatBatch {
                            block: b,
                            prog,
                            rows,
                            cols,
                            bufs: if mine { vec![buf] } else { vec![] },
                        });
                    }
                }
            }
        }
        // A rank that owns none of a batch's tensors has nothing to run.
        batches.retain(|b| !b.bufs.is_empty());
        Ok(batches)
    }

    /// Sharded on a device: the plan (once, with the device's chunks), and
    /// with a reduce-scatter (more than one rank) each tensor's summed
    /// gradients over this rank's part, zeros elsewhere.
    fn scatter_on_host(
        &mut self,
        params: &[crate::ParamMut<'_>],
    ) -> Result<Option<Vec<Vec<f32>>>, StepError> {
        self.plan_shards(params, emulated::CHUNK)?;
        let Some(sh) = &mut self.shard else {
            return Ok(None);
        };
        let (crate::shard::GradMode::ReduceScatter { mean }, Some(plan)) = (sh.grads, &sh.plan)
        else {
            return Ok(None);
        };
        if plan.size == 1 {
            return Ok(None);
        }
        let grads: Vec<Option<&[f32]>> = params.iter().map(|p| p.grad).collect();
        let bufs = &mut self.scratch.shard;
        sh.reduce_scatter(plan, &grads, mean, bufs)
            .map_err(StepError::Comm)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            let (lo, hi) = plan.part(i);
            let mut g = vec![0.0f32; p.value.len()];
            g[lo..hi].copy_from_slice(&bufs.grads[at..at + (hi - lo)]);
            at += hi - lo;
            out.push(g);
        }
        Ok(Some(out))
    }

    /// The step path of [`Optimizer::step_params`] on a CUDA device: host
    /// parameters (on a GPU: copied there and back, for checks, not speed).
    pub(crate) fn step_host_params_on_device(
        &mut self,
        params: &mut [crate::ParamMut<'_>],
    ) -> Result<StepReport, StepError> {
        // Sharded with a reduce-scatter: this rank's summed gradients, in
        // tensors of full length (the parts of other ranks are never read:
        // their chunks have no elements here).
        match self.scatter_on_host(params)? {
            None => self.step_host_params_here(params),
            Some(sums) => {
                let mut with_sums: Vec<crate::ParamMut<'_>> = params
                    .iter_mut()
                    .zip(&sums)
                    .map(|(p, s)| crate::ParamMut {
                        value: &mut *p.value,
                        grad: p.grad.map(|_| s.as_slice()),
                        shape: p.shape,
                    })
                    .collect();
                self.step_host_params_here(&mut with_sums)
            }
        }
    }

    /// The step path of [`Optimizer::step_params_of`] for bf16/f16 host
    /// parameters on a CUDA device (unsharded: checked before); on a GPU
    /// they are copied there and back, for checks, not speed.
    pub(crate) fn step_narrow_params_on_device<T: crate::Element>(
        &mut self,
        params: &mut [crate::ParamMut<'_, T>],
    ) -> Result<StepReport, StepError> {
        #[cfg(feature = "cuda")]
        if matches!(self.exec, Exec::Cuda(_)) {
            return crate::cuda::step_narrow_host_params(self, params);
        }
        self.step_emulated(params)
    }

    /// A step of the emulated device over validated host parameters of `T`
    /// (its memory is host memory).
    fn step_emulated<T: crate::Element>(
        &mut self,
        params: &mut [crate::ParamMut<'_, T>],
    ) -> Result<StepReport, StepError> {
        let raw: Vec<RawParam<'_>> = params
            .iter_mut()
            .map(|p| RawParam {
                value: p.value.as_mut_ptr() as u64,
                grad: p.grad.map(|g| g.as_ptr() as u64),
                shape: p.shape,
            })
            .collect();
        // SAFETY: validated host slices of `T`, held `&mut` (values) and `&`
        // (gradients) for the whole step; the emulated device's memory is
        // host memory and its launches return when done.
        unsafe { self.step_on_device(&raw, T::STORAGE) }
    }

    fn step_host_params_here(
        &mut self,
        params: &mut [crate::ParamMut<'_>],
    ) -> Result<StepReport, StepError> {
        let report = match &self.exec {
            Exec::Cpu => unreachable!("the CPU steps in the engine"),
            Exec::Emulated(_) => self.step_emulated(params),
            #[cfg(feature = "cuda")]
            Exec::Cuda(_) => crate::cuda::step_host_params(self, params),
        }?;
        // Sharded: every rank's updated parts, on every rank.
        if let Some((sh, pl)) = self
            .shard
            .as_ref()
            .and_then(|sh| sh.plan.as_ref().map(|pl| (sh, pl)))
        {
            let mut values: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut *p.value).collect();
            sh.gather_params(pl, &mut values, &mut self.scratch.shard)
                .map_err(StepError::Comm)?;
        }
        Ok(report)
    }
}

fn device_error(e: DeviceError) -> StepError {
    StepError::Device(e.to_string())
}

/// The engine's state in the memory of `to`'s device: `None` when it is
/// already there (host memory to host memory), else copies (the original is
/// untouched, so a failure changes nothing).
fn move_state(
    tensors: &mut [Option<TensorState>],
    from: &Exec,
    to: &mut Exec,
) -> Result<Option<Vec<Option<TensorState>>>, DeviceError> {
    let host = |e: &Exec| matches!(e, Exec::Cpu | Exec::Emulated(_));
    if host(from) && host(to) {
        return Ok(None);
    }
    tensors
        .iter()
        .map(|t| {
            let Some(t) = t else { return Ok(None) };
            let store = match (&*to, &t.store) {
                (Exec::Cpu | Exec::Emulated(_), Store::Host { .. }) => t.store.clone(),
                #[cfg(feature = "cuda")]
                (Exec::Cuda(c), s) => c.upload_store(s)?,
                #[cfg(feature = "cuda")]
                (Exec::Cpu | Exec::Emulated(_), Store::Cuda(d)) => d.download()?,
            };
            Ok(Some(TensorState {
                shape: t.shape.clone(),
                t: t.t,
                store,
            }))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

//! candle adapter (feature `candle`): every generated optimizer is a
//! `candle_nn::Optimizer`, so `candle_nn::AdamW::new(vars, params)` becomes
//! `agr_runtime::optim::AdamWAgr::new(vars, Default::default())`.
//!
//! Variables are updated in place with the fused step, through candle's
//! public in-place custom ops: CPU `f32` variables by the CPU step; with the
//! feature `candle-cuda`, CUDA `f32`, `bf16` and `f16` variables by the
//! generated kernels, launched on candle's own stream of the variables' GPU
//! (so nothing needs synchronising), the optimizer's state moved to that GPU
//! on the first such step. The write locks of all variables are held at once
//! (global reductions need every tensor at once), taken in one global order
//! (by storage address, the order candle's own in-place ops use), so
//! optimizers sharing variables never deadlock. Variables without a gradient
//! in the `GradStore` are skipped. No per-step copy of parameters or
//! gradients, on either device.
//!
//! What a step decides (one device, one dtype, contiguous storage, gradients
//! matching their variables) it decides from what it saw of each variable
//! and gradient inside the locks ([`Seen`]), so those checks are tested
//! without a GPU; an error changes nothing.
//!
//! candle only lends a variable's storage mutably inside an in-place op, so
//! holding n locks takes n nested calls. Past 512 KiB of stack (about 1,500
//! variables in a release build) they run on a helper thread whose stack is
//! sized for them and kept between steps (the step itself runs on the
//! calling thread): 100,000 variables step on any thread.

use std::cell::{Cell, RefCell};
use std::sync::{mpsc, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, DeviceLocation, InplaceOp1, Layout, Storage, Var};

use crate::cpu::Kernel;
use crate::groups::{GroupError, ParamGroups};
use crate::{DynOptimizer, Optimizer, ParamMut, StepError, StepReport};
use candle_nn::VarMap;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// agr's errors convert into `candle_core::Error` (wrapped, message kept),
/// so `?` works in a function returning `candle_core::Result`.
macro_rules! into_candle_error {
    ($($t:ty),*) => {$(
        impl From<$t> for candle_core::Error {
            fn from(e: $t) -> Self {
                candle_core::Error::wrap(e)
            }
        }
    )*};
}

into_candle_error!(
    crate::StepError,
    crate::ConfigError,
    crate::GroupError,
    crate::CheckpointError
);

/// The most stack the nested locks may take on the calling thread (which may
/// be a 2 MiB thread of a pool or a test harness); beyond it they move to a
/// helper thread. About 1,500 variables in a release build, 150 in a debug
/// one.
const INLINE_STACK: usize = 512 << 10;
/// The helper thread's stack: a base plus twice what one nested in-place op
/// uses per variable.
const STACK_BASE: usize = 256 << 10;

/// Stack bytes one level of the nested in-place ops uses, measured on two
/// throwaway variables the first time it is needed.
fn stack_per_var() -> usize {
    static PER_VAR: OnceLock<usize> = OnceLock::new();
    *PER_VAR.get_or_init(|| {
        let measured = (|| {
            let dev = candle_core::Device::Cpu;
            let vars = [
                Var::ones(1, candle_core::DType::F32, &dev)?,
                Var::ones(1, candle_core::DType::F32, &dev)?,
            ];
            let marks = Cell::new([0; 2]);
            lock_nested(&vars, &[0, 1], &marks, &mut |_| {})?;
            let [a, b] = marks.get();
            candle_core::Result::Ok(a.abs_diff(b))
        })();
        // Unmeasurable (it cannot be): far more than a debug build uses.
        measured.unwrap_or(16 << 10).clamp(256, 64 << 10)
    })
}

/// A variable or a gradient as a step sees it (inside the variables' write
/// locks): where its elements start, how many there are, their dtype and
/// device. Everything a step decides it decides from these.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Seen {
    /// The first element's address: in host memory for a CPU tensor, a
    /// device pointer for a CUDA one; 0 where the step cannot use it (not
    /// contiguous, or a dtype it does not step).
    pub(crate) ptr: u64,
    /// Elements.
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    pub(crate) place: DeviceLocation,
    pub(crate) contiguous: bool,
}

/// What runs once every variable's write lock is held: gets what was seen of
/// each variable, in the caller's order.
type AtBottom<'f> = &'f mut dyn FnMut(&[Seen]);

/// One variable's place in the nested in-place ops: `order[depth]` is the
/// index of the variable this level locks.
struct Nest<'a, 'f> {
    vars: &'a [Var],
    order: &'a [usize],
    depth: usize,
    ptrs: &'a RefCell<Vec<Seen>>,
    at_bottom: &'a RefCell<AtBottom<'f>>,
    /// The stack address of the first two levels (see `stack_per_var`).
    marks: &'a Cell<[usize; 2]>,
}

impl InplaceOp1 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "agr-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        if self.depth < 2 {
            let here = 0u8;
            let mut marks = self.marks.get();
            marks[self.depth] = std::hint::black_box(&here) as *const u8 as usize;
            self.marks.set(marks);
        }
        let offsets = layout.contiguous_offsets();
        let (ptr, dtype) = match (storage, offsets) {
            (CpuStorage::F32(data), Some((start, end))) => {
                (data[start..end].as_mut_ptr() as u64, DType::F32)
            }
            (CpuStorage::BF16(data), Some((start, end))) => {
                (data[start..end].as_mut_ptr() as u64, DType::BF16)
            }
            (CpuStorage::F16(data), Some((start, end))) => {
                (data[start..end].as_mut_ptr() as u64, DType::F16)
            }
            (storage, _) => (0, candle_core::backend::BackendStorage::dtype(&*storage)),
        };
        self.descend(seen_at(ptr, offsets, dtype, DeviceLocation::Cpu))
    }

    /// A CUDA variable: its device pointer, used on candle's stream. Where
    /// cudarc tracks events, the write waits for the storage's earlier uses,
    /// and its end is recorded when this level returns (after the step's
    /// kernels were launched). Past `INLINE_STACK` the levels run on the
    /// lock holder's thread, so with a per-thread stream (candle's default)
    /// those waits and records are that thread's: it matters only to a
    /// program that uses several streams with event tracking on.
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &mut candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        use candle_core::cuda::cudarc::driver::DevicePtrMut;
        use candle_core::cuda::CudaStorageSlice;
        let dtype = storage.dtype();
        let place = storage.device.location();
        let stream = storage.device.cuda_stream();
        let (base, _written) = match &mut storage.slice {
            CudaStorageSlice::F32(s) => {
                let (p, w) = s.device_ptr_mut(&stream);
                (p, Some(w))
            }
            CudaStorageSlice::BF16(s) => {
                let (p, w) = s.device_ptr_mut(&stream);
                (p, Some(w))
            }
            CudaStorageSlice::F16(s) => {
                let (p, w) = s.device_ptr_mut(&stream);
                (p, Some(w))
            }
            _ => (0, None),
        };
        let offsets = layout.contiguous_offsets();
        let ptr = match (base, offsets) {
            (0, _) | (_, None) => 0,
            (base, Some((start, _))) => base + (start * dtype.size_in_bytes()) as u64,
        };
        self.descend(seen_at(ptr, offsets, dtype, place))
    }
}

impl Nest<'_, '_> {
    /// Records what was seen of this level's variable, then, still holding
    /// its write lock, takes the next one's (or runs the step at the bottom).
    fn descend(&self, seen: Seen) -> candle_core::Result<()> {
        let i = self.order[self.depth];
        self.ptrs.borrow_mut()[i] = seen;
        match self.order.get(self.depth + 1) {
            Some(&next) => self.vars[next].inplace_op1(&Nest {
                depth: self.depth + 1,
                ..*self
            }),
            None => {
                let ptrs = self.ptrs.borrow();
                (self.at_bottom.borrow_mut())(&ptrs);
                Ok(())
            }
        }
    }
}

/// A tensor seen at `ptr` (0: unusable) with contiguous `offsets` (or none).
fn seen_at(ptr: u64, offsets: Option<(usize, usize)>, dtype: DType, place: DeviceLocation) -> Seen {
    Seen {
        ptr,
        len: offsets.map_or(0, |(start, end)| end - start),
        dtype,
        place,
        contiguous: offsets.is_some(),
    }
}

/// Takes the write lock of every variable in `order` (nested) and runs
/// `at_bottom` with all of them held, on the current thread.
fn lock_nested(
    vars: &[Var],
    order: &[usize],
    marks: &Cell<[usize; 2]>,
    at_bottom: AtBottom<'_>,
) -> candle_core::Result<()> {
    let unseen = seen_at(0, None, DType::F32, DeviceLocation::Cpu);
    let ptrs = RefCell::new(vec![unseen; vars.len()]);
    let at_bottom = RefCell::new(at_bottom);
    let Some(&first) = order.first() else {
        return Ok(());
    };
    vars[first].inplace_op1(&Nest {
        vars,
        order,
        depth: 0,
        ptrs: &ptrs,
        at_bottom: &at_bottom,
        marks,
    })
}

/// A request to a lock holder: lock `vars` in `order`, send their pointers,
/// hold the locks until `release` is dropped.
struct LockRequest {
    vars: Vec<Var>,
    order: Vec<usize>,
    ptrs: mpsc::SyncSender<Vec<Seen>>,
    release: mpsc::Receiver<()>,
    /// The outcome, for when the pointers were never sent.
    done: mpsc::SyncSender<candle_core::Result<()>>,
}

/// A long-lived thread that takes and holds locks for one calling thread,
/// on a stack sized for `capacity` variables. Kept between steps: a fresh
/// thread's stack costs a page fault per 4 KiB touched, every step.
struct LockHolder {
    capacity: usize,
    requests: mpsc::Sender<LockRequest>,
}

impl LockHolder {
    fn spawn(capacity: usize, per_var: usize) -> candle_core::Result<Self> {
        let (requests, incoming) = mpsc::channel::<LockRequest>();
        std::thread::Builder::new()
            .name("agr-candle-locks".into())
            .stack_size(
                capacity
                    .saturating_mul(2 * per_var)
                    .saturating_add(STACK_BASE),
            )
            .spawn(move || {
                // Ends when the calling thread drops its holder.
                for r in incoming {
                    let outcome = lock_nested(&r.vars, &r.order, &Cell::new([0; 2]), &mut |p| {
                        if r.ptrs.send(p.to_vec()).is_ok() {
                            let _ = r.release.recv();
                        }
                    });
                    let _ = r.done.send(outcome);
                }
            })
            .map_err(|e| {
                err(format!(
                    "cannot start a thread to hold the locks of {capacity} variables: {e}"
                ))
            })?;
        Ok(LockHolder { capacity, requests })
    }
}

thread_local! {
    /// This thread's lock holder (taken out while in use, so a step inside a
    /// step gets a holder of its own).
    static HOLDER: RefCell<Option<LockHolder>> = const { RefCell::new(None) };
}

/// Runs `f` on the calling thread while every variable's write lock is held,
/// the locks taken in `order`; `f` gets each variable's (pointer, length).
/// Many variables are locked by this thread's lock holder, whose stack is
/// sized for them.
fn with_write_locks(vars: &[Var], order: &[usize], f: AtBottom<'_>) -> candle_core::Result<()> {
    let per_var = stack_per_var();
    if vars.len().saturating_mul(per_var) <= INLINE_STACK {
        return lock_nested(vars, order, &Cell::new([0; 2]), f);
    }
    let mut holder = match HOLDER.with(|h| h.borrow_mut().take()) {
        Some(h) if h.capacity >= vars.len() => h,
        // Grown by half again at least, so a growing model rarely respawns it.
        Some(h) => LockHolder::spawn(vars.len().max(h.capacity.saturating_mul(3) / 2), per_var)?,
        None => LockHolder::spawn(vars.len(), per_var)?,
    };
    let (ptrs_tx, ptrs_rx) = mpsc::sync_channel(1);
    let (release, released) = mpsc::sync_channel::<()>(0);
    let (done_tx, done) = mpsc::sync_channel(1);
    let request = |ptrs, release, done| LockRequest {
        vars: vars.to_vec(),
        order: order.to_vec(),
        ptrs,
        release,
        done,
    };
    if let Err(mpsc::SendError(r)) = holder.requests.send(request(ptrs_tx, released, done_tx)) {
        // The holder is gone (a panic inside candle): a new one.
        holder = LockHolder::spawn(holder.capacity, per_var)?;
        let _ = holder.requests.send(r);
    }
    let outcome = match ptrs_rx.recv() {
        Ok(ptrs) => {
            f(&ptrs);
            // The locks are released once `release` is dropped (also while
            // unwinding from a panic in `f`); whoever reads a variable next
            // waits for that, nothing more.
            drop(release);
            Ok(())
        }
        Err(_) => done
            .recv()
            .unwrap_or_else(|_| Err(err("the thread holding the variables' locks stopped"))),
    };
    HOLDER.with(|h| {
        let mut h = h.borrow_mut();
        let keep_old = matches!(&*h, Some(old) if old.capacity >= holder.capacity);
        if !keep_old {
            *h = Some(holder);
        }
    });
    outcome
}

/// A key naming a tensor's storage (its address inside candle's lock):
/// tensors with equal keys share one storage; the order of keys is the order
/// in which candle's own in-place ops take locks.
fn storage_key(t: &candle_core::Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
}

/// Checks `vars` for an optimizer: distinct variables, of a dtype and on a
/// device it steps (all on one).
fn check_vars(vars: &[Var]) -> candle_core::Result<()> {
    let mut ids = std::collections::HashSet::new();
    for (i, v) in vars.iter().enumerate() {
        if !ids.insert(v.as_tensor().id()) {
            return Err(err(format!("variable #{i} was passed twice")));
        }
    }
    check_declared(vars)?;
    lock_order(vars).map(|_| ())
}

/// [`check_devices`] on what the variables declare (dtype, device, length),
/// before any lock is taken: candle cannot lock what this build does not
/// step.
fn check_declared(vars: &[Var]) -> candle_core::Result<()> {
    let declared: Vec<Seen> = vars
        .iter()
        .map(|v| {
            let elems = Some((0, v.elem_count()));
            seen_at(0, elems, v.dtype(), v.device().location())
        })
        .collect();
    check_devices(&declared).map(|_| ()).map_err(err)
}

/// A device's name as users write it: `cpu`, `cuda:0`, `metal:0`.
fn location_name(place: DeviceLocation) -> String {
    match place {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The dtypes the step takes on `place`; an error where it steps nothing
/// there (in a build with GPU support for candle, `gpu`, or without).
fn stepped_dtypes(place: DeviceLocation, gpu: bool) -> Result<&'static [DType], String> {
    match place {
        DeviceLocation::Cpu => Ok(&[DType::F32, DType::BF16, DType::F16]),
        DeviceLocation::Cuda { .. } if gpu => {
            Ok(&[DType::F32, DType::BF16, DType::F16])
        }
        DeviceLocation::Cuda { gpu_id } => Err(format!(
            "the variables are on cuda:{gpu_id}, and this build of agr-runtime steps CPU variables only (GPU variables need its `candle-cuda` feature)"
        )),
        DeviceLocation::Metal { gpu_id } => Err(format!(
            "the variables are on metal:{gpu_id}; agr's candle adapter steps CPU and CUDA variables"
        )),
    }
}

/// The device and dtype of a step over `vars`: one device, one dtype the
/// step takes there.
pub(crate) fn check_devices(vars: &[Seen]) -> Result<(DeviceLocation, DType), String> {
    check_devices_in(vars, cfg!(feature = "candle-cuda"))
}

/// [`check_devices`] in a build with (`gpu`) or without GPU support.
fn check_devices_in(vars: &[Seen], gpu: bool) -> Result<(DeviceLocation, DType), String> {
    let Some(first) = vars.first() else {
        return Ok((DeviceLocation::Cpu, DType::F32));
    };
    let dtypes = stepped_dtypes(first.place, gpu)?;
    for (i, v) in vars.iter().enumerate() {
        if v.place != first.place {
            return Err(format!(
                "variable #{i} is on {} and variable #0 on {}; one optimizer steps variables on one device",
                location_name(v.place),
                location_name(first.place)
            ));
        }
        if !dtypes.contains(&v.dtype) {
            return Err(match first.place {
                place => format!(
                    "variable #{i} is {:?}; on {} agr's candle adapter updates f32, bf16 and f16 variables",
                    v.dtype,
                    location_name(place)
                ),
            });
        }
        if v.dtype != first.dtype {
            return Err(format!(
                "variable #{i} is {:?} and variable #0 {:?}; one optimizer steps variables of one dtype (its kernels are compiled for it)",
                v.dtype, first.dtype
            ));
        }
    }
    Ok((first.place, first.dtype))
}

/// Checks what a step saw, before anything is written: the variables (see
/// [`check_devices`]), contiguous and usable; each gradient on its
/// variable's device, of its dtype and length, contiguous.
pub(crate) fn check_seen(
    vars: &[Seen],
    grads: &[Option<Seen>],
) -> Result<(DeviceLocation, DType), String> {
    check_seen_in(vars, grads, cfg!(feature = "candle-cuda"))
}

/// [`check_seen`] in a build with (`gpu`) or without GPU support.
fn check_seen_in(
    vars: &[Seen],
    grads: &[Option<Seen>],
    gpu: bool,
) -> Result<(DeviceLocation, DType), String> {
    let (place, dtype) = check_devices_in(vars, gpu)?;
    for (i, v) in vars.iter().enumerate() {
        if !v.contiguous {
            return Err(format!(
                "variable #{i} is not contiguous; agr updates contiguous variables in place"
            ));
        }
    }
    for (i, (v, g)) in vars.iter().zip(grads).enumerate() {
        let Some(g) = g else { continue };
        if g.place != place || g.dtype != dtype {
            return Err(match place {
                DeviceLocation::Cpu => format!(
                    "the gradient of variable #{i} is not an f32 CPU tensor but {:?} on {}",
                    g.dtype,
                    location_name(g.place)
                ),
                _ => format!(
                    "the gradient of variable #{i} is {:?} on {}, the variable {:?} on {}",
                    g.dtype,
                    location_name(g.place),
                    v.dtype,
                    location_name(v.place)
                ),
            });
        }
        if !g.contiguous {
            return Err(format!("the gradient of variable #{i} is not contiguous"));
        }
        if g.len != v.len {
            return Err(format!(
                "the gradient of variable #{i} has {} elements and the variable {}",
                g.len, v.len
            ));
        }
    }
    Ok((place, dtype))
}

/// The variables' indices in lock order (by storage); an error if two share
/// a storage. Returns the sorted keys too.
fn lock_order(vars: &[Var]) -> candle_core::Result<(Vec<usize>, Vec<usize>)> {
    let keys: Vec<usize> = vars.iter().map(|v| storage_key(v.as_tensor())).collect();
    let mut order: Vec<usize> = (0..vars.len()).collect();
    order.sort_unstable_by_key(|&i| keys[i]);
    for w in order.windows(2) {
        if keys[w[0]] == keys[w[1]] {
            let (a, b) = (w[0].min(w[1]), w[0].max(w[1]));
            return Err(err(format!(
                "variables #{a} and #{b} share one storage; pass each variable once"
            )));
        }
    }
    let sorted = order.iter().map(|&i| keys[i]).collect();
    Ok((order, sorted))
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

/// What steps candle variables: an agr optimizer (any device), or a
/// caller's function of host slices (CPU variables).
trait Engine {
    /// A step over CPU `f32` variables.
    fn step_host(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, String>;

    /// A step over CPU bf16 or f16 variables.
    fn step_host_half(&mut self, params: HalfParams<'_, '_>) -> Result<StepReport, String>;

    /// A step over variables of `dtype` on `stream`'s GPU, as device
    /// pointers; the engine moves there first if it is elsewhere.
    ///
    /// # Safety
    /// As [`Optimizer::step_raw`]: live, exclusively held device buffers of
    /// `prod(shape)` elements of `dtype`, used in `stream`'s order.
    #[cfg(feature = "candle-cuda")]
    unsafe fn step_device(
        &mut self,
        stream: &std::sync::Arc<crate::cuda::CudaStream>,
        dtype: crate::cuda::DType,
        params: &[crate::cuda::RawCudaParam<'_>],
    ) -> Result<StepReport, String>;
}

/// CPU bf16 or f16 variables for a step.
enum HalfParams<'s, 'a> {
    Bf16(&'s mut [ParamMut<'a, half::bf16>]),
    F16(&'s mut [ParamMut<'a, half::f16>]),
}

impl Engine for dyn DynOptimizer + '_ {
    fn step_host(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, String> {
        self.step_params(params)
            .map_err(|e: StepError| e.to_string())
    }

    fn step_host_half(&mut self, params: HalfParams<'_, '_>) -> Result<StepReport, String> {
        match params {
            HalfParams::Bf16(p) => self.step_params_bf16(p),
            HalfParams::F16(p) => self.step_params_f16(p),
        }
        .map_err(|e: StepError| e.to_string())
    }

    #[cfg(feature = "candle-cuda")]
    unsafe fn step_device(
        &mut self,
        stream: &std::sync::Arc<crate::cuda::CudaStream>,
        dtype: crate::cuda::DType,
        params: &[crate::cuda::RawCudaParam<'_>],
    ) -> Result<StepReport, String> {
        // A move only on the first step (the state moves with it; a failed
        // move changes nothing).
        self.set_cuda_stream(stream.clone(), dtype)
            .map_err(|e| e.to_string())?;
        // SAFETY: the caller's contract.
        unsafe { self.step_raw(params) }.map_err(|e| e.to_string())
    }
}

/// A caller's stepper of host slices ([`step_vars`]).
struct HostOnly<'f, E>(&'f mut dyn FnMut(&mut [ParamMut<'_>]) -> Result<StepReport, E>);

impl<E: std::fmt::Display> Engine for HostOnly<'_, E> {
    fn step_host(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, String> {
        (self.0)(params).map_err(|e| e.to_string())
    }

    fn step_host_half(&mut self, _: HalfParams<'_, '_>) -> Result<StepReport, String> {
        Err("step_vars hands f32 slices to its function; bf16 and f16 CPU variables step through an agr optimizer".into())
    }

    #[cfg(feature = "candle-cuda")]
    unsafe fn step_device(
        &mut self,
        stream: &std::sync::Arc<crate::cuda::CudaStream>,
        _dtype: crate::cuda::DType,
        _params: &[crate::cuda::RawCudaParam<'_>],
    ) -> Result<StepReport, String> {
        Err(format!(
            "the variables are on cuda:{}; step_vars hands host slices to its function, so it steps CPU variables (an agr optimizer steps GPU ones)",
            stream.context().ordinal()
        ))
    }
}

/// Runs `step` once over `vars` and their gradients in `grads`, with every
/// variable's storage borrowed in place (CPU, f32, contiguous). Variables
/// without a gradient are passed with `grad: None`. This is how every agr
/// optimizer steps CPU candle variables; use it to drive your own steppers.
///
/// The variables' write locks are held for the whole step, taken in the
/// order of their storages' addresses (whatever the order of `vars`), so
/// steppers over overlapping variables on different threads wait for each
/// other instead of deadlocking. Past about 1,500 variables (release build)
/// a helper thread, kept per calling thread, holds the locks on a stack large
/// enough for them.
pub fn step_vars<E: std::fmt::Display>(
    vars: &[Var],
    grads: &GradStore,
    step: &mut dyn FnMut(&mut [ParamMut<'_>]) -> Result<StepReport, E>,
) -> candle_core::Result<Option<StepReport>> {
    step_with(vars, grads, &mut HostOnly(step))
}

/// What was seen of a gradient (read only, for the whole step). A CUDA
/// gradient's read is ordered after its writes where cudarc tracks events,
/// and recorded when `reads` is dropped, after the step's kernels.
fn seen_grad<'g>(
    storage: &'g Storage,
    layout: &Layout,
    place: DeviceLocation,
    #[cfg(feature = "candle-cuda")] reads: &mut Vec<crate::cuda::SyncOnDrop<'g>>,
) -> Seen {
    let offsets = layout.contiguous_offsets();
    let ptr = match (storage, offsets) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => {
            data[start..end].as_ptr() as u64
        }
        (Storage::Cpu(CpuStorage::BF16(data)), Some((start, end))) => {
            data[start..end].as_ptr() as u64
        }
        (Storage::Cpu(CpuStorage::F16(data)), Some((start, end))) => {
            data[start..end].as_ptr() as u64
        }
        #[cfg(feature = "candle-cuda")]
        (Storage::Cuda(cs), Some((start, _))) => {
            use candle_core::cuda::cudarc::driver::DevicePtr;
            use candle_core::cuda::CudaStorageSlice;
            let (base, read) = match &cs.slice {
                CudaStorageSlice::F32(s) => s.device_ptr(s.stream()),
                CudaStorageSlice::BF16(s) => s.device_ptr(s.stream()),
                CudaStorageSlice::F16(s) => s.device_ptr(s.stream()),
                _ => (0, crate::cuda::SyncOnDrop::Sync(None)),
            };
            reads.push(read);
            match base {
                0 => 0,
                base => base + (start * storage.dtype().size_in_bytes()) as u64,
            }
        }
        _ => 0,
    };
    seen_at(ptr, offsets, storage.dtype(), place)
}

/// One step of `engine` over `vars` and their gradients in `grads`, in
/// place on the variables' device (see the module's documentation).
fn step_with<E: Engine + ?Sized>(
    vars: &[Var],
    grads: &GradStore,
    engine: &mut E,
) -> candle_core::Result<Option<StepReport>> {
    if vars.is_empty() {
        return Ok(None);
    }
    check_declared(vars)?;
    let (order, var_keys) = lock_order(vars)?;
    // Read access to every gradient for the whole step.
    let grad_tensors: Vec<Option<candle_core::Tensor>> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).cloned())
        .collect();
    for (i, g) in grad_tensors.iter().enumerate() {
        if let Some(g) = g {
            // Reading a variable's storage while writing it would deadlock.
            if var_keys.binary_search(&storage_key(g)).is_ok() {
                return Err(err(format!(
                    "the gradient of variable #{i} shares its storage with a variable; pass gradients in tensors of their own"
                )));
            }
        }
    }
    let guards: Vec<Option<(candle_core::StorageRef<'_>, &Layout, DeviceLocation)>> = grad_tensors
        .iter()
        .map(|g| {
            g.as_ref().map(|g| {
                let (storage, layout) = g.storage_and_layout();
                (storage, layout, g.device().location())
            })
        })
        .collect();
    #[cfg(feature = "candle-cuda")]
    let mut reads = Vec::new();
    let grad_seen: Vec<Option<Seen>> = guards
        .iter()
        .map(|g| {
            g.as_ref().map(|(storage, layout, place)| {
                seen_grad(
                    storage,
                    layout,
                    *place,
                    #[cfg(feature = "candle-cuda")]
                    &mut reads,
                )
            })
        })
        .collect();
    let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.dims().to_vec()).collect();
    let mut outcome: Option<Result<StepReport, String>> = None;
    with_write_locks(vars, &order, &mut |seen: &[Seen]| {
        outcome = Some(step_seen(vars, seen, &grad_seen, &shapes, engine));
    })?;
    match outcome {
        Some(Ok(report)) => Ok(Some(report)),
        Some(Err(e)) => Err(err(e)),
        None => Err(err("the step did not run")),
    }
}

/// The step itself, every variable's write lock held: checks what was seen,
/// then hands the engine host slices or device pointers.
fn step_seen<E: Engine + ?Sized>(
    #[cfg_attr(not(feature = "candle-cuda"), allow(unused_variables))] vars: &[Var],
    seen: &[Seen],
    grads: &[Option<Seen>],
    shapes: &[Vec<usize>],
    engine: &mut E,
) -> Result<StepReport, String> {
    match check_seen(seen, grads)? {
        (DeviceLocation::Cpu, DType::BF16) => {
            let mut params = half_params::<half::bf16>(seen, grads, shapes);
            engine.step_host_half(HalfParams::Bf16(&mut params))
        }
        (DeviceLocation::Cpu, DType::F16) => {
            let mut params = half_params::<half::f16>(seen, grads, shapes);
            engine.step_host_half(HalfParams::F16(&mut params))
        }
        (DeviceLocation::Cpu, _) => {
            let mut params: Vec<ParamMut<'_>> = seen
                .iter()
                .zip(grads)
                .zip(shapes)
                .map(|((v, g), s)| {
                    // SAFETY: checked by `check_seen`: each pointer is a live,
                    // exclusively locked, contiguous f32 CPU slice of `len`
                    // elements (the write locks are held while this runs);
                    // the variables' storages are distinct (`lock_order`),
                    // as are the gradients' from theirs, and each gradient
                    // (read only) has its variable's length.
                    let value = unsafe { host_slice_mut(v) };
                    let grad = g.as_ref().map(|g| unsafe { host_slice(g) });
                    ParamMut::new(value, grad, s)
                })
                .collect();
            engine.step_host(&mut params)
        }
        #[cfg(feature = "candle-cuda")]
        (DeviceLocation::Cuda { .. }, dtype) => {
            let candle_core::Device::Cuda(device) = vars[0].device() else {
                return Err("variable #0 is on a CUDA device but its tensor says otherwise".into());
            };
            let stream = device.cuda_stream();
            let params = raw_params(seen, grads, shapes);
            // SAFETY: checked by `check_seen`: contiguous device buffers of
            // the variables' dtype (the one the kernels are compiled for),
            // `len` elements each, gradients of their variables' lengths, all
            // on this GPU; the variables' write locks (and the gradients'
            // read locks) are held until the kernels are launched on
            // candle's stream, which orders every other use of them.
            unsafe { engine.step_device(&stream, cuda_dtype(dtype), &params) }
        }
        (place, _) => Err(format!(
            "the variables are on {}, which this build of agr-runtime does not step",
            location_name(place)
        )),
    }
}

/// Seen CPU bf16 or f16 variables and gradients (of type `T`, as
/// `check_seen` found them) as parameters.
fn half_params<'a, T: crate::Element>(
    seen: &[Seen],
    grads: &[Option<Seen>],
    shapes: &'a [Vec<usize>],
) -> Vec<ParamMut<'a, T>> {
    seen.iter()
        .zip(grads)
        .zip(shapes)
        .map(|((v, g), s)| {
            // SAFETY: as for f32 in `step_seen`: checked by `check_seen` to
            // be live, exclusively locked (gradients read only), contiguous
            // CPU tensors of `T` and of their variables' lengths, the
            // variables' storages distinct.
            let value: &mut [T] = match v.len {
                0 => &mut [],
                n => unsafe { std::slice::from_raw_parts_mut(v.ptr as *mut T, n) },
            };
            let grad = g.as_ref().map(|g| -> &[T] {
                match g.len {
                    0 => &[],
                    n => unsafe { std::slice::from_raw_parts(g.ptr as *const T, n) },
                }
            });
            ParamMut::new(value, grad, s)
        })
        .collect()
}

/// A seen CPU f32 tensor as a mutable slice (empty where it has no elements).
///
/// # Safety
/// `v.ptr` must address `v.len` live f32 values no one else uses meanwhile.
unsafe fn host_slice_mut<'a>(v: &Seen) -> &'a mut [f32] {
    if v.len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(v.ptr as *mut f32, v.len) }
}

/// A seen CPU f32 tensor as a slice (empty where it has no elements).
///
/// # Safety
/// `v.ptr` must address `v.len` live f32 values no one writes meanwhile.
unsafe fn host_slice<'a>(v: &Seen) -> &'a [f32] {
    if v.len == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(v.ptr as *const f32, v.len) }
}

/// The dtype the kernels are compiled for, for variables of `dtype` (one
/// [`check_devices`] accepted on a GPU).
#[cfg(feature = "cuda")]
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
pub(crate) fn cuda_dtype(dtype: DType) -> crate::cuda::DType {
    match dtype {
        DType::BF16 => crate::cuda::DType::BF16,
        DType::F16 => crate::cuda::DType::F16,
        _ => crate::cuda::DType::F32,
    }
}

/// What a GPU step hands the engine: each variable's and gradient's device
/// pointer, as seen (and checked by [`check_seen`]).
#[cfg(feature = "cuda")]
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
pub(crate) fn raw_params<'a>(
    vars: &[Seen],
    grads: &[Option<Seen>],
    shapes: &'a [Vec<usize>],
) -> Vec<crate::cuda::RawCudaParam<'a>> {
    let pointers = vars
        .iter()
        .zip(grads)
        .map(|(v, g)| (v.ptr, g.map(|g| g.ptr)));
    crate::cuda::RawCudaParam::list(pointers, shapes)
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
        self.last_report = step_with(&vars, grads, self as &mut dyn DynOptimizer)?;
        Ok(())
    }

    /// The hyperparameter `lr` (0 for a spec without one).
    fn learning_rate(&self) -> f64 {
        self.lr().unwrap_or(0.0)
    }

    /// Sets `lr`; a value outside its range changes nothing and is logged
    /// (a warning through the `log` crate): the trait cannot return it. Use
    /// [`Optimizer::set_lr`] to get the error.
    fn set_learning_rate(&mut self, lr: f64) {
        if let Err(e) = self.set_lr(lr) {
            log::warn!("{}: set_learning_rate({lr}) ignored: {e}", self.desc.name);
        }
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
        d.opt.set_param_names(names.clone()).map_err(err)?;
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
        self.last_report = step_with(&self.vars, grads, &mut *self.opt)?;
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

#[cfg(test)]
mod tests {
    //! What a step decides from what it saw, with the facts a CUDA variable
    //! would show (no GPU needed).
    use super::*;

    const CUDA0: DeviceLocation = DeviceLocation::Cuda { gpu_id: 0 };
    const CUDA1: DeviceLocation = DeviceLocation::Cuda { gpu_id: 1 };

    fn seen(place: DeviceLocation, dtype: DType, ptr: u64, len: usize) -> Seen {
        seen_at(ptr, Some((0, len)), dtype, place)
    }

    fn problem(r: Result<(DeviceLocation, DType), String>) -> String {
        r.expect_err("the step should be refused")
    }

    #[test]
    fn one_device_and_one_dtype_per_step() {
        let cpu = |p| seen(DeviceLocation::Cpu, DType::F32, p, 4);
        assert_eq!(
            check_seen(&[cpu(64), cpu(128)], &[Some(cpu(256)), None]),
            Ok((DeviceLocation::Cpu, DType::F32))
        );
        let e = problem(check_devices(&[
            cpu(64),
            seen(DeviceLocation::Cpu, DType::F64, 8, 4),
        ]));
        assert!(e.contains("variable #1 is F64; on cpu agr's candle adapter updates f32, bf16 and f16 variables"), "{e}");
        // CPU bf16 and f16 variables step too (one dtype per step).
        let bf = seen(DeviceLocation::Cpu, DType::BF16, 8, 4);
        assert_eq!(check_devices(&[bf]), Ok((DeviceLocation::Cpu, DType::BF16)));
        let e = problem(check_devices(&[cpu(64), bf]));
        assert!(e.contains("variable #1 is BF16 and variable #0 F32"), "{e}");
        let e = problem(check_devices(&[cpu(64), seen(CUDA0, DType::F32, 8, 4)]));
        assert!(
            e.contains("variable #1 is on cuda:0 and variable #0 on cpu"),
            "{e}"
        );
        let e = problem(check_devices(&[seen(
            DeviceLocation::Metal { gpu_id: 0 },
            DType::F32,
            8,
            4,
        )]));
        assert!(e.contains("metal:0"), "{e}");
    }

    /// As a build with the `candle-cuda` feature decides.
    #[test]
    fn gpu_variables_of_one_float_dtype_on_one_gpu() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let v = seen(CUDA1, dtype, 1 << 20, 4);
            assert_eq!(check_seen_in(&[v], &[Some(v)], true), Ok((CUDA1, dtype)));
        }
        let e = problem(check_devices_in(&[seen(CUDA0, DType::F64, 8, 4)], true));
        assert!(e.contains("variable #0 is F64; on cuda:0"), "{e}");
        let two_dtypes = [
            seen(CUDA0, DType::BF16, 8, 4),
            seen(CUDA0, DType::F16, 16, 4),
        ];
        let e = problem(check_devices_in(&two_dtypes, true));
        assert!(e.contains("variable #1 is F16 and variable #0 BF16"), "{e}");
        let two_gpus = [
            seen(CUDA0, DType::F32, 8, 4),
            seen(CUDA1, DType::F32, 16, 4),
        ];
        let e = problem(check_devices_in(&two_gpus, true));
        assert!(
            e.contains("variable #1 is on cuda:1 and variable #0 on cuda:0"),
            "{e}"
        );
        let v = seen(CUDA0, DType::BF16, 4096, 6);
        let g = seen(CUDA0, DType::F32, 8192, 6);
        let e = problem(check_seen_in(&[v], &[Some(g)], true));
        assert!(
            e.contains("gradient of variable #0 is F32 on cuda:0, the variable BF16 on cuda:0"),
            "{e}"
        );
    }

    /// As a build without it decides; and this build as its feature says.
    #[test]
    fn gpu_variables_need_the_candle_cuda_feature() {
        let v = seen(CUDA0, DType::F32, 8, 4);
        let e = problem(check_devices_in(&[v], false));
        assert!(e.contains("its `candle-cuda` feature"), "{e}");
        assert_eq!(check_devices(&[v]).is_ok(), cfg!(feature = "candle-cuda"));
    }

    #[test]
    fn gradients_match_their_variables() {
        for place in [DeviceLocation::Cpu, CUDA0] {
            let check = |vars: &[Seen], grads: &[Option<Seen>]| check_seen_in(vars, grads, true);
            let v = seen(place, DType::F32, 4096, 6);
            let vars = [v, v];
            let e = problem(check(
                &vars,
                &[None, Some(seen(place, DType::F32, 8192, 5))],
            ));
            assert!(
                e.contains("gradient of variable #1 has 5 elements and the variable 6"),
                "{e}"
            );
            let e = problem(check(
                &vars,
                &[Some(seen(place, DType::F64, 8192, 6)), None],
            ));
            assert!(
                e.contains("gradient of variable #0 is") && e.contains("F64"),
                "{e}"
            );
            let e = problem(check(
                &vars,
                &[Some(seen(CUDA1, DType::F32, 8192, 6)), None],
            ));
            assert!(e.contains("cuda:1"), "{e}");
            let strided = seen_at(0, None, DType::F32, place);
            let e = problem(check(&vars, &[Some(strided), None]));
            assert!(
                e.contains("gradient of variable #0 is not contiguous"),
                "{e}"
            );
            let e = problem(check(&[v, strided], &[None, None]));
            assert!(e.contains("variable #1 is not contiguous"), "{e}");
        }
    }

    #[test]
    #[cfg(feature = "cuda")]
    fn a_gpu_step_hands_the_engine_the_seen_pointers_and_dtype() {
        let vars = [
            seen(CUDA0, DType::BF16, 0x7000_0000, 6),
            seen(CUDA0, DType::BF16, 0x7000_1000, 4),
        ];
        let grads = [Some(seen(CUDA0, DType::BF16, 0x7100_0000, 6)), None];
        let shapes = vec![vec![2, 3], vec![4]];
        let raw = raw_params(&vars, &grads, &shapes);
        assert_eq!(raw.len(), 2);
        assert_eq!(
            (raw[0].value, raw[0].grad),
            (0x7000_0000, Some(0x7100_0000))
        );
        assert_eq!((raw[1].value, raw[1].grad), (0x7000_1000, None));
        assert_eq!(raw[0].shape, &[2, 3]);
        assert_eq!(cuda_dtype(DType::BF16), crate::cuda::DType::BF16);
        assert_eq!(cuda_dtype(DType::F16), crate::cuda::DType::F16);
        assert_eq!(cuda_dtype(DType::F32), crate::cuda::DType::F32);
    }

    #[test]
    fn a_cpu_variable_is_seen_where_its_values_are() {
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::arange(0f32, 10f32, &dev)
            .unwrap()
            .narrow(0, 3, 4)
            .unwrap();
        let var = Var::from_tensor(&t).unwrap();
        let mut got = vec![];
        with_write_locks(&[var.clone()], &[0], &mut |s| got = s.to_vec()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].len, got[0].dtype, got[0].contiguous),
            (4, DType::F32, true)
        );
        let values = unsafe { host_slice(&got[0]) }.to_vec();
        assert_eq!(values, var.to_vec1::<f32>().unwrap());
    }
}

//! candle adapter (feature `candle`): every generated optimizer is a
//! `candle_nn::Optimizer`, so `candle_nn::AdamW::new(vars, params)` becomes
//! `agr_runtime::optim::AdamWAgr::new(vars, Default::default())`.
//!
//! CPU `f32` variables are updated in place with the fused step, through
//! candle's public in-place custom ops: the write locks of all variables are
//! held at once (global reductions need every tensor at once), taken in one
//! global order (by storage address, the order candle's own in-place ops
//! use), so optimizers sharing variables never deadlock. Variables without a
//! gradient in the `GradStore` are skipped. No per-step copy of parameters or
//! gradients.
//!
//! candle only lends a variable's storage mutably inside an in-place op, so
//! holding n locks takes n nested calls. Past 512 KiB of stack (about 1,500
//! variables in a release build) they run on a helper thread whose stack is
//! sized for them and kept between steps (the step itself runs on the
//! calling thread): 100,000 variables step on any thread.

use std::cell::{Cell, RefCell};
use std::sync::{mpsc, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Var};

use crate::cpu::Kernel;
use crate::groups::{GroupError, ParamGroups};
use crate::{DynOptimizer, Optimizer, ParamMut, StepReport};
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

/// What runs once every variable's write lock is held: gets the (pointer,
/// length) of each variable, in the caller's order.
type AtBottom<'f> = &'f mut dyn FnMut(&[(usize, usize)]);

/// One variable's place in the nested in-place ops: `order[depth]` is the
/// index of the variable this level locks.
struct Nest<'a, 'f> {
    vars: &'a [Var],
    order: &'a [usize],
    depth: usize,
    ptrs: &'a RefCell<Vec<(usize, usize)>>,
    at_bottom: &'a RefCell<AtBottom<'f>>,
    /// The stack address of the first two levels (see `stack_per_var`).
    marks: &'a Cell<[usize; 2]>,
}

impl InplaceOp1 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "agr-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let i = self.order[self.depth];
        if self.depth < 2 {
            let here = 0u8;
            let mut marks = self.marks.get();
            marks[self.depth] = std::hint::black_box(&here) as *const u8 as usize;
            self.marks.set(marks);
        }
        let CpuStorage::F32(data) = storage else {
            return Err(err(format!(
                "variable #{i} is not f32; agr's candle adapter updates f32 variables"
            )));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(err(format!(
                "variable #{i} is not contiguous; agr updates contiguous variables in place"
            )));
        };
        let slice = &mut data[start..end];
        self.ptrs.borrow_mut()[i] = (slice.as_mut_ptr() as usize, slice.len());
        match self.order.get(self.depth + 1) {
            // Still holding this variable's write lock: take the next one's.
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

/// Takes the write lock of every variable in `order` (nested) and runs
/// `at_bottom` with all of them held, on the current thread.
fn lock_nested(
    vars: &[Var],
    order: &[usize],
    marks: &Cell<[usize; 2]>,
    at_bottom: AtBottom<'_>,
) -> candle_core::Result<()> {
    let ptrs = RefCell::new(vec![(0, 0); vars.len()]);
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
    ptrs: mpsc::SyncSender<Vec<(usize, usize)>>,
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
                "variable #{i} is on {:?}; agr's candle adapter steps CPU variables (for GPU tensors move the optimizer with set_device(Device::Cuda(n)) and step their device pointers with step_raw)",
                v.device().location()
            )));
        }
    }
    lock_order(vars).map(|_| ())
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

/// Runs `step` once over `vars` and their gradients in `grads`, with every
/// variable's storage borrowed in place (CPU, f32, contiguous). Variables
/// without a gradient are passed with `grad: None`. This is how every agr
/// optimizer steps candle variables; use it to drive your own steppers.
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
    if vars.is_empty() {
        return Ok(None);
    }
    for (i, v) in vars.iter().enumerate() {
        if !v.device().is_cpu() {
            return Err(err(format!(
                "variable #{i} is on {:?}; agr's candle adapter steps CPU variables",
                v.device().location()
            )));
        }
    }
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
    with_write_locks(vars, &order, &mut |ptrs: &[(usize, usize)]| {
        let mut params: Vec<ParamMut<'_>> = ptrs
            .iter()
            .zip(&grad_slices)
            .zip(&shapes)
            .map(|((&(p, n), g), s)| {
                // SAFETY: each pointer is a live, exclusively locked f32
                // slice of length n (the write locks are held while this
                // runs); the variables' storages are distinct (checked by
                // `lock_order`), as are the gradients' from theirs.
                let value = unsafe { std::slice::from_raw_parts_mut(p as *mut f32, n) };
                ParamMut::new(value, *g, s)
            })
            .collect();
        outcome = Some(step(&mut params).map_err(|e| e.to_string()));
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
        self.last_report = step_vars(&vars, grads, &mut |params| self.step_params(params))?;
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
        self.last_report = step_vars(&self.vars, grads, &mut |params| opt.step_params(params))?;
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

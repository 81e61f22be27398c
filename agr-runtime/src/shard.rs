//! Optimizer state sharded across ranks (ZeRO stage 1, and 2 with
//! [`GradMode::ReduceScatter`]), with every reduction exact.
//!
//! The parameters, flattened in order, are cut into *units*: the chunks the
//! engine steps as one work item ([`crate::optimizer::CHUNK`] elements,
//! whole rows under a row reduction), or whole tensors for a factored spec
//! or one with matrix blocks, whose work reads a tensor at once. Each rank
//! owns a contiguous run of units (so a tensor may be split between ranks,
//! at a chunk boundary) and keeps state for those alone; per-tensor states
//! and step counts, a few values per tensor, are kept by every rank.
//!
//! A step on rank `r`:
//! 1. each reduction pass computes its per-chunk partial results for the
//!    chunks `r` owns; one all-gather per pass (every reduction of the pass
//!    packed into one buffer) gives every rank every chunk's partials, which
//!    it folds exactly as the single-process step does: chunks in element
//!    order per tensor, then tensors in parameter order. So each rank holds
//!    the bits of the unsharded step's per-tensor and global results,
//!    whatever the number of ranks;
//! 2. the update runs over the chunks `r` owns;
//! 3. one all-gather of the updated parameters.
//!
//! The collectives move values and never add them (see [`crate::comm`]),
//! so the step is bitwise identical to the single-process one.
//!
//! A spec with matrix blocks adds one small all-gather per pass that runs
//! a block, so that a block that fails on its owner (an operand's shape)
//! fails the step on every rank. With [`GradMode::ReduceScatter`] one
//! all-to-all before the step brings each rank the gradients of its units
//! from every rank, summed in rank order.

use std::fmt;
use std::sync::Arc;

use crate::buf::{AlignedBuf, StateBuf};
use crate::comm::{offsets, Comm, CommError};
use crate::cpu::KernelDesc;
use crate::device::Store;
use crate::optimizer::CHUNK;
use crate::precision::Storage;
use crate::TensorMeta;

/// What a sharded step is given as gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradMode {
    /// Every rank passes the same, full gradients (after the trainer's own
    /// all-reduce). Each rank reads the part it owns.
    #[default]
    Full,
    /// Every rank passes its local gradients; before the step one
    /// all-to-all brings each rank every rank's gradients for its units,
    /// summed in rank order (`g_0 + g_1 + …`) and, with `mean`, divided by
    /// the number of ranks: the same bits as an all-reduce that adds in
    /// rank order. (ZeRO stage 2's reduce-scatter, made exact.)
    ReduceScatter { mean: bool },
}

/// Why an optimizer cannot be sharded, or a sharded step failed.
#[derive(Clone, Debug, PartialEq)]
pub enum ShardError {
    /// Sharding is decided before the first step (the state it would split
    /// already exists).
    AfterFirstStep {
        optimizer: String,
    },
    /// Narrowed states and master copies are not sharded in this version.
    Narrowed {
        optimizer: String,
    },
    Comm(CommError),
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardError::Narrowed { optimizer } => write!(
                f,
                "`{optimizer}` keeps narrowed states or f32 master copies, which are not sharded in this version; shard it with f32 precision"
            ),
            ShardError::AfterFirstStep { optimizer } => write!(
                f,
                "`{optimizer}` has stepped already: shard it before its first step (its state would have to be split)"
            ),
            ShardError::Comm(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ShardError {}

impl From<CommError> for ShardError {
    fn from(e: CommError) -> Self {
        ShardError::Comm(e)
    }
}

/// Which rank owns what, decided once from the parameters' shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub size: usize,
    pub rank: usize,
    /// Per parameter: elements per unit (0 for an empty tensor).
    unit: Vec<usize>,
    /// Per parameter: its first unit's index.
    first_unit: Vec<usize>,
    /// Per parameter: where it starts in the flattened parameters.
    start: Vec<usize>,
    numel: Vec<usize>,
    /// The owner of each unit (non-decreasing).
    owner: Vec<u32>,
    /// Per rank: its flattened elements `[lo, hi)`.
    ranges: Vec<(usize, usize)>,
}

impl ShardPlan {
    /// The plan for `shapes` stepped by `desc`, over `size` ranks.
    ///
    /// Unit `u`, whose middle is flattened element `m` of `E`, goes to
    /// rank `⌊m·size / E⌋`: contiguous runs, balanced by elements to within
    /// half a unit at each end. With more ranks than units, some ranks own nothing (and still
    /// take part in every collective).
    pub fn new(desc: &KernelDesc, shapes: &[&[usize]], size: usize, rank: usize) -> ShardPlan {
        ShardPlan::with_chunk(desc, shapes, CHUNK, size, rank)
    }

    /// [`ShardPlan::new`] with the chunks of a device that steps `chunk`
    /// elements per work item (a CUDA device's blocks are smaller than the
    /// CPU's work items).
    pub fn with_chunk(
        desc: &KernelDesc,
        shapes: &[&[usize]],
        chunk: usize,
        size: usize,
        rank: usize,
    ) -> ShardPlan {
        let size = size.max(1);
        let whole = desc.factored || !desc.matrices.is_empty();
        let mut plan = ShardPlan {
            size,
            rank,
            unit: vec![],
            first_unit: vec![],
            start: vec![],
            numel: vec![],
            owner: vec![],
            ranges: vec![],
        };
        let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let mut at = 0usize;
        let mut unit_starts = vec![];
        for shape in shapes {
            let n: usize = shape.iter().product();
            let unit = if n == 0 {
                0
            } else if whole {
                n
            } else {
                desc.chunk_len(n, TensorMeta::row_len_of(shape), chunk)
            };
            plan.unit.push(unit);
            plan.first_unit.push(unit_starts.len());
            plan.start.push(at);
            plan.numel.push(n);
            let mut s = 0;
            while s < n {
                unit_starts.push(at + s);
                s += unit;
            }
            at += n;
        }
        plan.owner = (0..unit_starts.len())
            .map(|u| {
                let end = unit_starts.get(u + 1).copied().unwrap_or(total);
                // Twice the middle, over twice the total.
                let mid2 = (unit_starts[u] + end) as u128;
                ((mid2 * size as u128) / (2 * total.max(1)) as u128).min(size as u128 - 1) as u32
            })
            .collect();
        plan.ranges = (0..size)
            .map(|r| {
                let units: Vec<usize> = (0..plan.owner.len())
                    .filter(|&u| plan.owner[u] as usize == r)
                    .collect();
                match (units.first(), units.last()) {
                    (Some(&a), Some(&b)) => {
                        let end = unit_starts.get(b + 1).copied().unwrap_or(total);
                        (unit_starts[a], end)
                    }
                    _ => {
                        // No units: an empty range where the next rank's starts.
                        let next = plan.owner.iter().position(|&o| o as usize > r);
                        let at = next.map_or(total, |u| unit_starts[u]);
                        (at, at)
                    }
                }
            })
            .collect();
        plan
    }

    /// How many parameters the plan was made for.
    pub fn params(&self) -> usize {
        self.numel.len()
    }

    /// The rank that owns element `at` of parameter `i`.
    pub fn owner(&self, i: usize, at: usize) -> usize {
        self.owner[self.first_unit[i] + at / self.unit[i]] as usize
    }

    /// The elements of parameter `i` that `rank` owns, `[lo, hi)` within
    /// the tensor (empty: `lo == hi`).
    pub fn part_of(&self, rank: usize, i: usize) -> (usize, usize) {
        let (lo, hi) = self.ranges[rank];
        let (s, n) = (self.start[i], self.numel[i]);
        let a = lo.clamp(s, s + n) - s;
        let b = hi.clamp(s, s + n) - s;
        (a, b.max(a))
    }

    /// [`Self::part_of`] this rank.
    pub fn part(&self, i: usize) -> (usize, usize) {
        self.part_of(self.rank, i)
    }

    /// Each rank's flattened elements, `[lo, hi)`.
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// How many elements each rank owns.
    pub fn counts(&self) -> Vec<usize> {
        self.ranges.iter().map(|(a, b)| b - a).collect()
    }
}

/// A sharded optimizer's communicator, gradient mode and plan.
#[derive(Clone)]
pub(crate) struct Shard {
    pub(crate) comm: Arc<dyn Comm>,
    pub(crate) grads: GradMode,
    /// Made on the first step, from the parameters' shapes.
    pub(crate) plan: Option<ShardPlan>,
}

impl Shard {
    /// All-gathers the updated parameters: each rank sends the values of
    /// its flattened range, every rank receives every range and copies the
    /// others' into its tensors. `buf` is reused between steps. One rank
    /// alone has nothing to receive.
    pub(crate) fn gather_params(
        &self,
        plan: &ShardPlan,
        values: &mut [&mut [f32]],
        bufs: &mut ShardBufs,
    ) -> Result<(), CommError> {
        if plan.size == 1 {
            return Ok(());
        }
        let ShardBufs {
            send, recv: buf, ..
        } = bufs;
        send.clear();
        for (i, v) in values.iter().enumerate() {
            let (a, b) = plan.part(i);
            send.extend_from_slice(&v[a..b]);
        }
        let counts = plan.counts();
        let total: usize = counts.iter().sum();
        // Grown once (and zeroed only then): every value is overwritten.
        buf.resize(total, 0.0);
        self.comm
            .all_gather_f32("the updated parameters", send, &counts, buf)?;
        let mut at = 0;
        for (i, v) in values.iter_mut().enumerate() {
            let n = plan.numel[i];
            let (a, b) = plan.part(i);
            // Everything but this rank's own part, which is already there.
            v[..a].copy_from_slice(&buf[at..at + a]);
            v[b..].copy_from_slice(&buf[at + b..at + n]);
            at += n;
        }
        Ok(())
    }

    /// ZeRO-2: from every rank's local gradients (`None`: a parameter
    /// without one, the same on every rank), this rank's summed gradients
    /// for its units, flattened in order, into `bufs.grads`. (One rank
    /// alone steps with its own gradients: see the engine.)
    pub(crate) fn reduce_scatter(
        &self,
        plan: &ShardPlan,
        grads: &[Option<&[f32]>],
        mean: bool,
        bufs: &mut ShardBufs,
    ) -> Result<(), CommError> {
        let size = plan.size;
        let ShardBufs {
            send,
            recv,
            grads: sum,
        } = bufs;
        // What this rank sends to each rank: its gradients over that rank's
        // range (zeros where a parameter has none).
        let mut send_counts = vec![0usize; size];
        send.clear();
        for r in 0..size {
            for (i, g) in grads.iter().enumerate() {
                let (a, b) = plan.part_of(r, i);
                match g {
                    Some(g) => send.extend_from_slice(&g[a..b]),
                    None => send.resize(send.len() + (b - a), 0.0),
                }
                send_counts[r] += b - a;
            }
        }
        let mine = send_counts[plan.rank];
        let recv_counts = vec![mine; size];
        recv.resize(mine * size, 0.0);
        self.comm.all_to_all_f32(
            "the local gradients (reduce-scatter)",
            send,
            &send_counts,
            recv,
            &recv_counts,
        )?;
        let at = offsets(&recv_counts);
        sum.clear();
        sum.extend_from_slice(&recv[..mine]);
        for &from in &at[1..] {
            for (s, &x) in sum.iter_mut().zip(&recv[from..from + mine]) {
                *s += x;
            }
        }
        if mean && size > 1 {
            let n = size as f32;
            for s in sum.iter_mut() {
                *s /= n;
            }
        }
        Ok(())
    }
}

impl Shard {
    /// Exchanges one reduction pass's per-item partials (`nr` values per
    /// item, items in order, `counts[r]` of them rank `r`'s): this rank's
    /// run goes out, every rank's comes into `partials`.
    pub(crate) fn gather_partials(
        &self,
        pass: usize,
        counts: &[usize],
        nr: usize,
        partials: &mut [f64],
        send: &mut Vec<f64>,
    ) -> Result<(), CommError> {
        let rank = self.comm.rank();
        let first: usize = counts[..rank].iter().sum();
        send.clear();
        send.extend_from_slice(&partials[first * nr..(first + counts[rank]) * nr]);
        let counts: Vec<usize> = counts.iter().map(|c| c * nr).collect();
        let total = counts.iter().sum();
        self.comm.all_gather_f64(
            &format!("the partial results of reduction pass {pass}"),
            send,
            &counts,
            &mut partials[..total],
        )
    }
}

/// Buffers a sharded step reuses (grown once, not zeroed each step).
#[derive(Default)]
pub(crate) struct ShardBufs {
    pub(crate) send: Vec<f32>,
    pub(crate) recv: Vec<f32>,
    /// This rank's summed gradients, after a reduce-scatter.
    pub(crate) grads: Vec<f32>,
}

/// Bytes of optimizer state one rank holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// State buffers the spec declares (per element, reduced, per tensor).
    pub state: usize,
    /// Per-row and per-dimension reduction results kept between passes.
    pub results: usize,
}

impl StateBytes {
    pub fn total(&self) -> usize {
        self.state + self.results
    }
}

impl<K: crate::Kernel> crate::Optimizer<K> {
    /// Shards this optimizer over `comm`'s ranks: each rank keeps the state
    /// of its part of the parameters and updates that part; every step
    /// ends with all of them updated on every rank, bitwise as one process
    /// would (see the module's documentation). Call on every rank, before
    /// the first step, with the same parameters passed in the same order
    /// on every rank. On the CPU or on a CUDA device (the one it is on:
    /// move it first; a sharded optimizer does not move).
    pub fn shard(&mut self, comm: Arc<dyn Comm>, grads: GradMode) -> Result<(), ShardError> {
        if self.steps > 0 || self.tensors.iter().any(Option::is_some) {
            return Err(ShardError::AfterFirstStep {
                optimizer: self.desc.name.to_string(),
            });
        }
        if self.narrows() {
            return Err(ShardError::Narrowed {
                optimizer: self.desc.name.to_string(),
            });
        }
        self.shard = Some(Shard {
            comm,
            grads,
            plan: None,
        });
        Ok(())
    }

    /// Who owns what, once the first sharded step has seen the parameters.
    pub fn shard_plan(&self) -> Option<&ShardPlan> {
        self.shard.as_ref().and_then(|s| s.plan.as_ref())
    }

    /// The communicator of a sharded optimizer.
    pub fn shard_comm(&self) -> Option<&Arc<dyn Comm>> {
        self.shard.as_ref().map(|s| &s.comm)
    }

    /// Bytes of optimizer state this rank holds (all of it unsharded).
    pub fn state_bytes(&self) -> StateBytes {
        let mut b = StateBytes::default();
        for t in self.tensors.iter().flatten() {
            let (state, results) = t.store.lens();
            b.state += state;
            b.results += results * 8;
        }
        b
    }
}

impl<K: crate::Kernel> crate::Optimizer<K> {
    /// Sharded, on the first step: the plan, from the parameters' shapes
    /// and the device's work items of `chunk` elements. State a checkpoint
    /// loaded before it is whole: it is cut to this rank's parts, in this
    /// device's memory. (Otherwise nothing, and no allocation.)
    pub(crate) fn plan_shards(
        &mut self,
        params: &[crate::ParamMut<'_>],
        chunk: usize,
    ) -> Result<(), crate::StepError> {
        let Some(sh) = self.shard.as_ref().filter(|sh| sh.plan.is_none()) else {
            return Ok(());
        };
        let shapes: Vec<&[usize]> = params.iter().map(|p| p.shape).collect();
        let plan = ShardPlan::with_chunk(self.desc, &shapes, chunk, sh.comm.size(), sh.comm.rank());
        if self.tensors.iter().any(Option::is_some) {
            let ns = self.desc.states.len();
            let whole: Vec<Option<crate::optimizer::TensorState>> = self
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_ref().map(|t| crate::optimizer::TensorState {
                        shape: t.shape.clone(),
                        t: t.t,
                        store: Store::Host {
                            bufs: (0..ns)
                                .map(|k| {
                                    StateBuf::from_f32(
                                        Storage::F32,
                                        &t.store.to_host(k),
                                        i * ns + k,
                                    )
                                })
                                .collect(),
                            rows: vec![0.0; crate::Dims::of(&t.shape, self.desc).results],
                            master: None,
                        },
                    })
                })
                .collect();
            let parts = cut_to_parts(self.desc, &plan, whole);
            self.tensors = self
                .state_on_this_device(parts)
                .map_err(|e| crate::StepError::Device(e.to_string()))?;
        }
        if let Some(sh) = self.shard.as_mut() {
            sh.plan = Some(plan);
        }
        Ok(())
    }

    /// Sharded: every rank's state, whole (a collective: every rank calls
    /// it); `None` unsharded or before the plan (the state is then whole).
    pub(crate) fn gather_shards(
        &self,
    ) -> Result<Option<Vec<Option<crate::optimizer::TensorState>>>, CommError> {
        let Some((sh, plan)) = self
            .shard
            .as_ref()
            .and_then(|sh| sh.plan.as_ref().map(|p| (sh, p)))
        else {
            return Ok(None);
        };
        let desc = self.desc;
        let ns = desc.states.len();
        let mut out = Vec::with_capacity(self.tensors.len());
        for (i, t) in self.tensors.iter().enumerate() {
            let Some(t) = t else {
                out.push(None);
                continue;
            };
            let numel: usize = t.shape.iter().product();
            let mut whole = Vec::with_capacity(ns);
            for (k, s) in desc.states.iter().enumerate() {
                let len = s.len(&t.shape);
                let mut buf = AlignedBuf::filled(len, 0.0, i * ns + k);
                let part = t.store.to_host(k);
                if s.per_tensor {
                    // Every rank keeps it.
                    buf.as_mut_slice().copy_from_slice(&part);
                } else {
                    let counts: Vec<usize> = (0..plan.size)
                        .map(|r| {
                            let (a, b) = plan.part_of(r, i);
                            match s.reduced {
                                Some(_) if (a, b) == (0, numel) => len,
                                Some(_) => 0,
                                None => b - a,
                            }
                        })
                        .collect();
                    sh.comm.all_gather_f32(
                        &format!("state `{}` of parameter #{i}", s.name),
                        &part,
                        &counts,
                        buf.as_mut_slice(),
                    )?;
                }
                whole.push(StateBuf::F32(buf));
            }
            out.push(Some(crate::optimizer::TensorState {
                shape: t.shape.clone(),
                t: t.t,
                store: Store::Host {
                    bufs: whole,
                    rows: vec![0.0; crate::Dims::of(&t.shape, desc).results],
                    master: None,
                },
            }));
        }
        Ok(Some(out))
    }

    /// Sharded, once the plan is made: whole host state (a checkpoint's)
    /// cut to this rank's parts. Otherwise unchanged.
    pub(crate) fn to_shards(
        &self,
        tensors: Vec<Option<crate::optimizer::TensorState>>,
    ) -> Vec<Option<crate::optimizer::TensorState>> {
        match self.shard_plan() {
            Some(plan) => cut_to_parts(self.desc, plan, tensors),
            None => tensors,
        }
    }
}

/// Whole host state cut to `plan`'s parts for its rank (state already cut
/// is left as it is).
pub(crate) fn cut_to_parts(
    desc: &KernelDesc,
    plan: &ShardPlan,
    tensors: Vec<Option<crate::optimizer::TensorState>>,
) -> Vec<Option<crate::optimizer::TensorState>> {
    tensors
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let mut t = t?;
            let numel: usize = t.shape.iter().product();
            let (lo, hi) = plan.part(i);
            #[allow(irrefutable_let_patterns)]
            let Store::Host { bufs, .. } = &t.store
            else {
                return Some(t);
            };
            let whole = desc
                .states
                .iter()
                .zip(bufs.iter())
                .all(|(s, b)| b.len() == s.len(&t.shape));
            if !whole || (lo, hi) == (0, numel) {
                return Some(t);
            }
            let mut part = Store::new_host_part(desc, &t.shape, i, (lo, hi), &[]);
            #[allow(irrefutable_let_patterns)]
            if let Store::Host { bufs: out, .. } = &mut part {
                for ((s, o), b) in desc.states.iter().zip(out.iter_mut()).zip(bufs) {
                    let from = if s.per_tensor || s.reduced.is_some() {
                        &b.f32s()[..o.len()]
                    } else {
                        &b.f32s()[lo..hi]
                    };
                    o.f32s_mut().copy_from_slice(from);
                }
            }
            t.store = part;
            Some(t)
        })
        .collect()
}

//! The CPU side of a generated optimizer: the [`Kernel`] trait the Rust back
//! end implements, and the helpers its element loops call.

use crate::{HyperConfig, HyperInfo, ReductionInfo, StateInfo, TensorMeta, MAX_STATES};

/// What the engine knows about a spec: its hyperparameters, states,
/// reductions and passes, and its generated code. A value, so a spec
/// compiled into the binary by `optimizer!` and one compiled at run time
/// ([`crate::compile`]) describe themselves the same way.
#[derive(Clone, Copy, Debug)]
pub struct KernelDesc {
    /// The spec's name.
    pub name: &'static str,
    /// The normalised spec text.
    pub spec: &'static str,
    /// The Rust code generated for the spec (empty for a spec compiled at
    /// run time: it runs on the IR executor instead).
    pub generated_rust: &'static str,
    /// The CUDA C generated for the spec: a complete translation unit, the
    /// shared prelude followed by [`KernelDesc::cuda_kernel_source`].
    pub cuda_source: &'static str,
    /// The spec's own CUDA C, without the shared prelude (what to snapshot).
    pub cuda_kernel_source: &'static str,
    /// Its kernels: one per reduction pass and the update, in launch
    /// order; then one per matrix block (its value per element) and, with
    /// matrix blocks, their programs' sums and transposes (`X_mat_axpby`).
    pub cuda_kernels: &'static [&'static str],
    /// Every hyperparameter, in spec order.
    pub hypers: &'static [HyperInfo],
    pub states: &'static [StateInfo],
    pub reductions: &'static [ReductionInfo],
    /// Reduction passes before the update pass.
    pub passes: usize,
    /// What each reduction pass reads per element: bit `k` for state `k`,
    /// bit 30 the parameter, bit 31 the gradient (`agr_codegen`'s
    /// `READS_P`, `READS_G`). Narrowed buffers a pass does not read are not
    /// widened for it.
    pub pass_reads: &'static [u32],
    /// The reduction (`global_sum(g * 0)`, pass 0) that finds NaN and infinities.
    pub finite_check: usize,
    /// Reductions with one result per row (see `row_sum`).
    pub row_reductions: usize,
    /// Reductions over the last and over the second-to-last dimension
    /// (see `sum(x, -1)`).
    pub dim_reductions: [usize; 2],
    /// Whether a pass reads whole rows or columns of the last two
    /// dimensions (a reduction over one of them, a reduced state): then each
    /// tensor is one unit of work.
    pub factored: bool,
    /// What keeps the spec on the CPU (a matrix block whose loop counts,
    /// conditions or coefficients depend on `t` or a reduction), in words;
    /// `None` where it has kernels.
    pub cpu_only: Option<&'static str>,
    /// Whether the step changes the parameter at all.
    pub writes_param: bool,
    /// Matrix blocks (`matrix x = value { ... }`), in spec order.
    pub matrices: &'static [MatrixInfo],
}

/// A matrix block of a spec: see [`Kernel::matrix`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatrixInfo {
    /// The spec's name for its result.
    pub name: &'static str,
    /// It runs after the scalars of this phase are known, before pass
    /// `phase` (the update pass where `phase == passes`).
    pub phase: usize,
    /// The state buffer that holds its matrix (a state the spec does not
    /// declare, named after the block).
    pub state: usize,
    /// Registers its program uses (register 0 is the block's matrix).
    pub regs: usize,
    /// Its program (see [`crate::mat`]); the numbers it reads
    /// ([`crate::mat::Scal::Arg`]) come from [`Kernel::matrix_args`].
    pub code: &'static [crate::mat::MatInst],
}

impl KernelDesc {
    /// Elements per unit of work for a tensor of `numel` elements with rows
    /// of `row_len`: `chunk`, or, with row reductions, as many whole rows as
    /// fit (at least one); a factored spec's tensors are stepped whole.
    pub fn chunk_len(&self, numel: usize, row_len: usize, chunk: usize) -> usize {
        if self.factored {
            numel.max(1)
        } else if self.row_reductions > 0 {
            row_len * (chunk / row_len).max(1)
        } else {
            chunk
        }
    }

    /// Where matrix block `b`'s kernel (its value per element) is in
    /// [`KernelDesc::cuda_kernels`]: after the passes' kernels.
    pub const fn matrix_kernel(&self, b: usize) -> usize {
        self.passes + 1 + b
    }

    /// Where the matrix programs' sums and transposes (`X_mat_axpby`) are
    /// in [`KernelDesc::cuda_kernels`] (a spec with matrix blocks has them).
    pub const fn mat_axpby_kernel(&self) -> usize {
        self.passes + 1 + self.matrices.len()
    }

    /// Where the per-tensor states' kernel (`X_tensor_states`, run after the
    /// update) is in [`KernelDesc::cuda_kernels`]; `None` without
    /// per-tensor states.
    pub const fn tensor_states_kernel(&self) -> Option<usize> {
        let mut i = 0;
        while i < self.states.len() {
            if self.states[i].per_tensor {
                let axpby = if self.matrices.is_empty() { 0 } else { 1 };
                return Some(self.mat_axpby_kernel() + axpby);
            }
            i += 1;
        }
        None
    }

    /// How many reductions the spec has over `axis` (results per row or
    /// per column, see [`KernelDesc::dim_reductions`]).
    pub fn dim_reductions_over(&self, axis: crate::Axis) -> usize {
        match axis {
            crate::Axis::Last => self.dim_reductions[0],
            crate::Axis::SecondLast => self.dim_reductions[1],
        }
    }

    /// The first of `n` tensors whose finite check in `reduced` (one row of
    /// `nr` results per tensor) failed, or 0.
    pub fn non_finite_slot(&self, reduced: &[f64], n: usize, nr: usize) -> usize {
        (0..n)
            .find(|&j| !reduced[j * nr + self.finite_check].is_finite())
            .unwrap_or(0)
    }
}

/// The fused phases of one spec: what the engine runs on the CPU.
///
/// A step runs `desc().passes` reduction passes and one update pass. Before
/// pass `k` (the update pass is `k = passes`), `step_scalars(k)` and, per
/// tensor, `tensor_scalars(k)` compute the host scalars that became known.
/// The Rust back end implements it for each spec with straight-line loops
/// (a unit struct, see [`StaticKernel`]); [`crate::compile`] implements it
/// for a spec read at run time.
/// One stored value of a buffer an update loop converts as it goes: `f32`
/// itself, or [`Bf16Bits`].
pub trait Word: Copy {
    /// The value, exactly.
    fn get(self) -> f32;
    /// `v` stored: bf16 rounds to nearest even (a NaN stays a NaN).
    fn put(v: f32) -> Self;
    /// `v` stored as element `i` of an update's parameter, rounded as
    /// `round` says (stochastic rounding draws element `round.base + i`'s
    /// random bits).
    #[inline(always)]
    fn put_param(v: f32, round: Round, i: usize) -> Self {
        let _ = (round, i);
        Self::put(v)
    }
}

/// How an update stores bf16 parameters: to nearest, or stochastically
/// with the random bits of `key` (see `precision::noise_key`) at element
/// `base + i` of the tensor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    pub stochastic: bool,
    pub key: u64,
    pub base: usize,
}

impl Word for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
}

/// The bits of a bf16 value (`half::bf16`'s), as an update loop stores them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);

impl Word for Bf16Bits {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
    /// Branch-free, so the loop vectorises: the rule of
    /// `precision::narrow_nearest`, to the bit.
    #[inline(always)]
    fn put(v: f32) -> Self {
        let b = v.to_bits();
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        let nan = ((b >> 16) as u16) | 0x0040;
        Bf16Bits(if v.is_nan() { nan } else { rounded })
    }
    /// Stochastic rounding as `precision::narrow` does it, to the bit.
    #[inline(always)]
    fn put_param(v: f32, round: Round, i: usize) -> Self {
        if round.stochastic {
            let r = crate::precision::noise_at(round.key, round.base + i) as u16;
            Bf16Bits(crate::precision::bf16_stochastic(v, r))
        } else {
            Self::put(v)
        }
    }
}

/// A buffer an update writes, as stored.
pub enum Words<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [Bf16Bits]),
}

impl Default for Words<'_> {
    fn default() -> Self {
        Words::F32(&mut [])
    }
}

/// A buffer an update reads (the gradient), as stored.
pub enum WordsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [Bf16Bits]),
}

pub trait Kernel: 'static + Clone + Send + Sync {
    type Config: HyperConfig + Clone + std::fmt::Debug + Send + Sync;
    type StepScalars: Default + Clone + Send + Sync;
    type TensorScalars: Default + Clone + Send + Sync;

    /// The kernel that steps with `config`. (A generated kernel is a unit
    /// value; a spec compiled at run time travels in its config.)
    fn of_config(config: &Self::Config) -> Self;
    /// The spec's description.
    fn desc(&self) -> &'static KernelDesc;

    fn step_scalars(
        &self,
        c: &Self::Config,
        phase: usize,
        global: &[f64],
        s: &mut Self::StepScalars,
    );
    fn tensor_scalars(
        &self,
        c: &Self::Config,
        phase: usize,
        s: &Self::StepScalars,
        meta: &TensorMeta,
        reduced: &[f64],
        ts: &mut Self::TensorScalars,
    );
    /// Reduction pass `pass` over one chunk of a tensor: writes this chunk's
    /// partial result of every tensor or global reduction of that pass into
    /// `acc`, and the results of its row reductions into `rows` (the chunk's
    /// whole rows of `dims.row_len` elements, `row_reductions` values per
    /// row; for a factored spec the whole tensor's results, laid out as
    /// [`crate::Dims`] says).
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &self,
        pass: usize,
        s: &Self::StepScalars,
        ts: &Self::TensorScalars,
        p: &[f32],
        g: &[f32],
        st: [&[f32]; MAX_STATES],
        rows: &mut [f64],
        dims: crate::Dims,
        acc: &mut [f64],
    );
    /// The update pass over one chunk of a tensor.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        s: &Self::StepScalars,
        ts: &Self::TensorScalars,
        p: &mut [f32],
        g: &[f32],
        st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: crate::Dims,
    );
    /// The update pass over buffers as they are stored: f32 or bf16 words
    /// (converted in the loop, round-to-nearest-even on the way out), for
    /// an update whose elements are independent and whose states are all
    /// per-element. Returns `false`, having done nothing, where this kernel
    /// has no such loop or not for these storages (the engine then stages
    /// the buffers through f32 scratch). The same bits as the f32 update on
    /// the widened values, narrowed after.
    #[allow(clippy::too_many_arguments)]
    fn update_words(
        &self,
        s: &Self::StepScalars,
        ts: &Self::TensorScalars,
        p: Words<'_>,
        g: WordsRef<'_>,
        st: [Words<'_>; MAX_STATES],
        round: Round,
        rows: &[f64],
        dims: crate::Dims,
    ) -> bool {
        let _ = (s, ts, p, g, st, round, rows, dims);
        false
    }

    /// The new values of the spec's per-tensor states (`per_tensor`), by
    /// state index, from the tensor's scalars after the step's last phase:
    /// the engine stores them once the step has succeeded. (The passes never
    /// see a per-tensor state: its old value reaches the scalars through
    /// [`TensorMeta::state`].)
    fn tensor_states(
        &self,
        s: &Self::StepScalars,
        ts: &Self::TensorScalars,
        out: &mut [f32; MAX_STATES],
    ) {
        let _ = (s, ts, out);
    }

    /// The numbers matrix block `block`'s program reads
    /// ([`crate::mat::Scal::Arg`], bools as 0 or 1), from a tensor's scalars,
    /// into `out` (cleared first).
    fn matrix_args(
        &self,
        block: usize,
        s: &Self::StepScalars,
        ts: &Self::TensorScalars,
        out: &mut Vec<f64>,
    ) {
        let _ = (block, s, ts);
        out.clear();
    }

    /// Matrix block `block` (see [`KernelDesc::matrices`]) over one whole
    /// tensor: computes the block's value per element into the block's
    /// state buffer, then runs its matrix program there ([`crate::mat::run`]),
    /// `len / dims.row_len` rows by `dims.row_len` columns. It writes nothing else.
    #[allow(clippy::too_many_arguments)]
    fn matrix(
        &self,
        block: usize,
        s: &Self::StepScalars,
        ts: &Self::TensorScalars,
        p: &[f32],
        g: &[f32],
        st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: crate::Dims,
        ws: &mut crate::mat::Workspace,
    ) -> Result<(), String> {
        let _ = (s, ts, p, g, st, rows, dims, ws);
        Err(format!("the spec has no matrix block {block}"))
    }
}

/// A kernel generated by `optimizer!`: a unit value whose description is a
/// constant, so `Optimizer::<K>::NAME`, `CUDA_SOURCE` and the like are
/// constants too.
pub trait StaticKernel: Kernel + Default + Copy {
    const DESC: KernelDesc;
}

/// Whether the CPU has AVX2 (detected once; `AGR_NO_AVX2` turns it off).
/// Generated kernels run an AVX2 build of their loops where it is available:
/// the same operations in the same order, so the same bits, only wider
/// vectors. (FMA is not enabled: it would change rounding.)
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static STATE: AtomicU8 = AtomicU8::new(0);
        match STATE.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let yes = std::is_x86_feature_detected!("avx2")
                    && std::env::var_os("AGR_NO_AVX2").is_none();
                STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How a reduction combines values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    Sum,
    Max,
}

impl Fold {
    /// The value of an empty reduction.
    pub const fn identity(self) -> f64 {
        match self {
            Fold::Sum => 0.0,
            Fold::Max => f64::NEG_INFINITY,
        }
    }

    #[inline(always)]
    pub fn combine(self, a: f64, b: f64) -> f64 {
        match self {
            Fold::Sum => a + b,
            // NaN wins, so a NaN in the data is never hidden.
            Fold::Max => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            }
        }
    }
}

/// Lanes of independent accumulators in [`fold`]: they let the compiler
/// vectorise the loop while keeping a fixed summation order.
pub const LANES: usize = 8;

/// Reduces `f(0..n)` with `K` folds at once, accumulating in f64 over
/// [`LANES`] lanes that are combined in a fixed order: the result depends only
/// on the values, never on threads or timing.
#[inline(always)]
pub fn fold<const K: usize>(n: usize, ops: [Fold; K], f: impl Fn(usize) -> [f32; K]) -> [f64; K] {
    let mut acc = [[0.0f64; LANES]; K];
    for k in 0..K {
        acc[k] = [ops[k].identity(); LANES];
    }
    let full = n - n % LANES;
    let mut i = 0;
    while i < full {
        for l in 0..LANES {
            let v = f(i + l);
            for k in 0..K {
                acc[k][l] = ops[k].combine(acc[k][l], f64::from(v[k]));
            }
        }
        i += LANES;
    }
    for j in full..n {
        let v = f(j);
        for k in 0..K {
            acc[k][j - full] = ops[k].combine(acc[k][j - full], f64::from(v[k]));
        }
    }
    let mut out = [0.0; K];
    for k in 0..K {
        // Pairwise, in a fixed order.
        let a = &acc[k];
        let c = |x, y| ops[k].combine(x, y);
        out[k] = c(
            c(c(a[0], a[1]), c(a[2], a[3])),
            c(c(a[4], a[5]), c(a[6], a[7])),
        );
    }
    out
}

/// Combines [`LANES`] accumulators pairwise, in a fixed order.
#[inline(always)]
pub fn combine_lanes(op: Fold, a: &[f64; LANES]) -> f64 {
    let c = |x, y| op.combine(x, y);
    c(
        c(c(a[0], a[1]), c(a[2], a[3])),
        c(c(a[4], a[5]), c(a[6], a[7])),
    )
}

/// -1, 0 or 1 (`sign(0) = 0`, NaN stays NaN).
#[inline(always)]
pub fn sign_f32(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x * 0.0
    }
}

/// -1, 0 or 1 (`sign(0) = 0`, NaN stays NaN).
#[inline(always)]
pub fn sign_f64(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x * 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_matches_a_plain_sum_and_max() {
        for n in [0usize, 1, 7, 8, 9, 100, 1001] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let [s, m] = fold(n, [Fold::Sum, Fold::Max], |i| [x[i], x[i].abs()]);
            let want: f64 = x.iter().map(|&v| f64::from(v)).sum();
            assert!((s - want).abs() < 1e-9, "n={n}: {s} vs {want}");
            let want_max = x
                .iter()
                .map(|v| f64::from(v.abs()))
                .fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(m, want_max, "n={n}");
        }
    }

    #[test]
    fn max_propagates_nan_and_sign_of_zero_is_zero() {
        let [m] = fold(3, [Fold::Max], |i| [[1.0, f32::NAN, 2.0][i]]);
        assert!(m.is_nan());
        assert_eq!(sign_f32(0.0), 0.0);
        assert_eq!(sign_f32(-0.0), 0.0);
        assert_eq!(sign_f32(-3.0), -1.0);
        assert_eq!(sign_f64(2.0), 1.0);
    }
}

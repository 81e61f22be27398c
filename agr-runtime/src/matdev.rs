//! Matrix blocks on a CUDA device (a GPU, or the emulated device).
//!
//! On the CPU a block's program runs per tensor ([`crate::mat::run`]). On a
//! device the host drives it, so the numbers it reads must be known on the
//! host before the step (see `Program::mat_args_on_host`), and it is
//! planned here once per step, before anything is launched:
//!
//! 1. [`resolve`] runs the program's control flow (`repeat`, `if`) on the
//!    host for one tensor shape and one set of numbers, checks every
//!    operand's shape and leaves a straight list of [`Op`]s: products, sums
//!    and register swaps (the CPU's [`crate::mat::run`] executes the same
//!    list, so both devices decide, and fail, alike);
//! 2. the tensors whose block has the same shape and the same numbers form
//!    one `MatBatch`: their matrices are gathered into one scratch buffer,
//!    and each product is one strided batched SGEMM (`Sgemm`, cuBLAS's
//!    `cublasSgemmStridedBatched` arguments) and each sum one launch of the
//!    spec's `X_mat_axpby` kernel (`Axpby`) for the whole batch;
//! 3. `run_batches` issues them through a `MatDevice`: cuBLAS and the
//!    kernel on a GPU; on the emulated device the same column-major SGEMM
//!    arguments evaluated by the `gemm` crate (`host_sgemm`) and the
//!    kernel compiled as host C++, so the row-major to column-major
//!    mapping a GPU uses is what CI checks.

use agr_codegen::ir::{mat_steps, MatInst, MatStep, Scal};

use crate::device::DeviceError;

/// Operations a resolved program may hold (its `repeat`s unrolled): a
/// guard against a loop count that would take too long to run or to issue.
pub const MAX_OPS: usize = 1 << 16;

/// A register read by an operation, with the shape it holds then (stored
/// row-major: `r` rows of `c`), transposed where `t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opnd {
    pub reg: usize,
    pub t: bool,
    pub r: usize,
    pub c: usize,
}

impl Opnd {
    /// Rows and columns of the operand as the operation sees it.
    pub fn dims(&self) -> (usize, usize) {
        if self.t {
            (self.c, self.r)
        } else {
            (self.r, self.c)
        }
    }
}

/// One operation of a resolved program; registers hold row-major matrices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// `dst (m x n) = alpha * a @ b + beta * dst` (`dst` is not read where
    /// `beta` is 0); `dst` is neither `a` nor `b`.
    Gemm {
        dst: usize,
        a: Opnd,
        b: Opnd,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        beta: f32,
    },
    /// `dst (m x n) = alpha * a + beta * b`; `dst` is no transposed operand.
    Axpby {
        dst: usize,
        a: Opnd,
        alpha: f32,
        b: Option<(Opnd, f32)>,
        m: usize,
        n: usize,
    },
    /// The two registers trade buffers (a `Move`, or a scratch result).
    Swap(usize, usize),
}

/// A program resolved for one shape and one set of numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub ops: Vec<Op>,
    /// Registers, the scratch one included.
    pub regs: usize,
    /// Floats per register per matrix: the largest matrix any register holds.
    pub reg_len: usize,
}

/// Resolves `code` (with `regs` registers and the numbers `args`) for a
/// `rows x cols` matrix: see the module's documentation. Its errors are
/// what a step reports for the block on every device.
pub fn resolve(
    code: &[MatInst],
    regs: usize,
    args: &[f64],
    rows: usize,
    cols: usize,
) -> Result<Resolved, String> {
    let mut r = Resolver {
        ops: vec![],
        shape: vec![None; regs + 1],
        scratch: regs,
        reg_len: rows * cols,
        args,
    };
    r.shape[0] = Some((rows, cols));
    r.exec(code)?;
    match r.shape[0] {
        Some(s) if s == (rows, cols) => {}
        Some((a, b)) => {
            return Err(format!(
                "the block ends with a {a}x{b} matrix where the tensor is {rows}x{cols}"
            ))
        }
        None => return Err("the block ends without a matrix".into()),
    }
    Ok(Resolved {
        ops: r.ops,
        regs: regs + 1,
        reg_len: r.reg_len.max(1),
    })
}

struct Resolver<'a> {
    ops: Vec<Op>,
    shape: Vec<Option<(usize, usize)>>,
    scratch: usize,
    reg_len: usize,
    args: &'a [f64],
}

impl Resolver<'_> {
    fn scal(&self, x: Scal) -> f64 {
        x.value(self.args)
    }

    fn opnd(&self, m: agr_codegen::ir::Mat) -> Result<Opnd, String> {
        let reg = usize::from(m.reg);
        match self.shape.get(reg).copied().flatten() {
            Some((r, c)) => Ok(Opnd { reg, t: m.t, r, c }),
            None => Err(format!(
                "the program reads register {reg} before writing it"
            )),
        }
    }

    fn push(&mut self, op: Op) -> Result<(), String> {
        if self.ops.len() >= MAX_OPS {
            return Err(format!(
                "the program runs more than {MAX_OPS} matrix operations per tensor and step (its `repeat` counts multiplied out)"
            ));
        }
        self.ops.push(op);
        Ok(())
    }

    fn set(&mut self, reg: usize, m: usize, n: usize) {
        self.shape[reg] = Some((m, n));
        self.reg_len = self.reg_len.max(m * n);
    }

    fn exec(&mut self, code: &[MatInst]) -> Result<(), String> {
        for step in mat_steps(code) {
            match step {
                MatStep::Inst(&MatInst::Gemm {
                    dst,
                    a,
                    b,
                    alpha,
                    c,
                }) => {
                    let dst = usize::from(dst);
                    let (a, b) = (self.opnd(a)?, self.opnd(b)?);
                    let ((m, k), (k2, n)) = (a.dims(), b.dims());
                    if k != k2 {
                        return Err(format!("`@` of a {m}x{k} and a {k2}x{n} matrix"));
                    }
                    let alpha = self.scal(alpha) as f32;
                    let beta = match c {
                        None => 0.0,
                        Some((cm, beta)) => {
                            let cm = self.opnd(cm)?;
                            if cm.dims() != (m, n) {
                                let (r, cc) = cm.dims();
                                return Err(format!("`+` of a {m}x{n} and a {r}x{cc} matrix"));
                            }
                            let beta = self.scal(beta) as f32;
                            if cm.reg == dst && !cm.t {
                                beta
                            } else {
                                // beta * c into dst first (through the
                                // scratch register where c is dst itself,
                                // transposed), then the product adds to it.
                                let to = if cm.reg == dst { self.scratch } else { dst };
                                self.push(Op::Axpby {
                                    dst: to,
                                    a: cm,
                                    alpha: beta,
                                    b: None,
                                    m,
                                    n,
                                })?;
                                self.set(to, m, n);
                                if to != dst {
                                    self.push(Op::Swap(dst, to))?;
                                    self.shape.swap(dst, to);
                                }
                                1.0
                            }
                        }
                    };
                    self.push(Op::Gemm {
                        dst,
                        a,
                        b,
                        m,
                        n,
                        k,
                        alpha,
                        beta,
                    })?;
                    self.set(dst, m, n);
                }
                MatStep::Inst(&MatInst::Axpby { dst, a, alpha, b }) => {
                    let dst = usize::from(dst);
                    let a = self.opnd(a)?;
                    let (m, n) = a.dims();
                    let b = match b {
                        None => None,
                        Some((bm, beta)) => {
                            let bm = self.opnd(bm)?;
                            if bm.dims() != (m, n) {
                                let (r, c) = bm.dims();
                                return Err(format!("`+` of a {m}x{n} and a {r}x{c} matrix"));
                            }
                            Some((bm, self.scal(beta) as f32))
                        }
                    };
                    let alpha = self.scal(alpha) as f32;
                    self.push(Op::Axpby {
                        dst,
                        a,
                        alpha,
                        b,
                        m,
                        n,
                    })?;
                    self.set(dst, m, n);
                }
                MatStep::Inst(&MatInst::Move { dst, src }) => {
                    let (dst, src) = (usize::from(dst), usize::from(src));
                    self.push(Op::Swap(dst, src))?;
                    self.shape.swap(dst, src);
                }
                MatStep::Inst(other) => unreachable!("mat_steps decodes {other:?}"),
                MatStep::Repeat(count, body) => {
                    let n = self.scal(count);
                    if !(n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX)) {
                        return Err(format!("`repeat` needs a whole number of times, not {n}"));
                    }
                    for _ in 0..n as u64 {
                        self.exec(body)?;
                    }
                }
                MatStep::If(cond, then, otherwise) => {
                    let body = if self.scal(cond) != 0.0 {
                        then
                    } else {
                        otherwise
                    };
                    self.exec(body)?;
                }
            }
        }
        Ok(())
    }
}

/// The tensors of one step whose block `block` has one shape and the same
/// numbers: one resolved program for all of them.
#[derive(Clone, Debug)]
pub(crate) struct MatBatch {
    pub block: usize,
    pub prog: Resolved,
    pub rows: usize,
    pub cols: usize,
    /// Each tensor's block state buffer (`rows * cols` f32, device memory).
    pub bufs: Vec<u64>,
}

impl MatBatch {
    /// Scratch floats the batch needs: every register, once per matrix.
    pub fn scratch_len(&self) -> usize {
        self.prog.regs * self.prog.reg_len * self.bufs.len()
    }
}

/// `cublasSgemmStridedBatched`'s arguments (column-major):
/// `C_i = alpha * op(A_i) op(B_i) + beta * C_i` for `batch` matrices
/// `stride_*` floats apart, `op` transposing where `trans*`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sgemm {
    pub transa: bool,
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    pub a: u64,
    pub lda: i32,
    pub stride_a: i64,
    pub b: u64,
    pub ldb: i32,
    pub stride_b: i64,
    pub beta: f32,
    pub c: u64,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
}

/// The arguments of the spec's `X_mat_axpby` kernel: for the matrices
/// `stride` floats apart (`total` elements in all), `dst = alpha * op(a) +
/// beta * op(b)`, each `m x n` row-major; `b` 0 where there is none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Axpby {
    pub dst: u64,
    pub a: u64,
    pub a_t: bool,
    pub alpha: f32,
    pub b: u64,
    pub b_t: bool,
    pub beta: f32,
    pub m: i32,
    pub n: i32,
    pub stride: i64,
    pub total: i64,
}

/// What a device provides for matrix programs; addresses are in its memory.
pub(crate) trait MatDevice {
    /// The address of at least `floats` f32 of scratch, valid until the
    /// next call.
    fn scratch(&mut self, floats: usize) -> Result<u64, DeviceError>;
    /// Copies `floats` f32 from `src` to `dst` (not overlapping).
    ///
    /// # Safety
    /// Both ranges must be live buffers of the device.
    unsafe fn copy(&mut self, dst: u64, src: u64, floats: usize) -> Result<(), DeviceError>;
    /// # Safety
    /// Every matrix the arguments address must be in live buffers.
    unsafe fn sgemm(&mut self, g: &Sgemm) -> Result<(), DeviceError>;
    /// # Safety
    /// Every matrix the arguments address must be in live buffers.
    unsafe fn axpby(&mut self, x: &Axpby) -> Result<(), DeviceError>;
}

/// A row-major product as cuBLAS (column-major) computes it: a matrix stored
/// row-major `r x c` is its transpose stored column-major with leading
/// dimension `c`, so `C = op(A) op(B)` (`m x n`) is `Cᵀ = op(B)ᵀ op(A)ᵀ`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_of(
    a: Opnd,
    b: Opnd,
    (m, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    (pa, pb, pc): (u64, u64, u64),
    stride: usize,
    batch: usize,
) -> Sgemm {
    Sgemm {
        transa: b.t,
        transb: a.t,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha,
        a: pb,
        lda: b.c.max(1) as i32,
        stride_a: stride as i64,
        b: pa,
        ldb: a.c.max(1) as i32,
        stride_b: stride as i64,
        beta,
        c: pc,
        ldc: n.max(1) as i32,
        stride_c: stride as i64,
        batch: batch as i32,
    }
}

/// Runs every batch of block `block` (gathering each tensor's matrix into
/// register 0 of a scratch buffer shared by the batches, running the
/// resolved program, scattering the result back).
///
/// # Safety
/// Each batch's `bufs` must be live device buffers of `rows * cols` f32,
/// written by nothing else until the device has run what is issued here.
pub(crate) unsafe fn run_batches(
    dev: &mut dyn MatDevice,
    batches: &[MatBatch],
    block: usize,
) -> Result<(), DeviceError> {
    let mine = || batches.iter().filter(|b| b.block == block);
    let need = mine().map(MatBatch::scratch_len).max().unwrap_or(0);
    if need == 0 {
        return Ok(());
    }
    let base = dev.scratch(need)?;
    for batch in mine() {
        let (nb, len) = (batch.bufs.len(), batch.prog.reg_len);
        let n0 = batch.rows * batch.cols;
        let mut reg: Vec<u64> = (0..batch.prog.regs)
            .map(|r| base + 4 * (r * nb * len) as u64)
            .collect();
        for (i, &buf) in batch.bufs.iter().enumerate() {
            dev.copy(reg[0] + 4 * (i * len) as u64, buf, n0)?;
        }
        for op in &batch.prog.ops {
            match *op {
                Op::Gemm {
                    dst,
                    a,
                    b,
                    m,
                    n,
                    k,
                    alpha,
                    beta,
                } => {
                    if m * n == 0 {
                        continue;
                    }
                    dev.sgemm(&sgemm_of(
                        a,
                        b,
                        (m, n, k),
                        (alpha, beta),
                        (reg[a.reg], reg[b.reg], reg[dst]),
                        len,
                        nb,
                    ))?
                }
                Op::Axpby {
                    dst,
                    a,
                    alpha,
                    b,
                    m,
                    n,
                } => {
                    if m * n == 0 {
                        continue;
                    }
                    dev.axpby(&Axpby {
                        dst: reg[dst],
                        a: reg[a.reg],
                        a_t: a.t,
                        alpha,
                        b: b.map_or(0, |(o, _)| reg[o.reg]),
                        b_t: b.is_some_and(|(o, _)| o.t),
                        beta: b.map_or(0.0, |(_, beta)| beta),
                        m: m as i32,
                        n: n as i32,
                        stride: len as i64,
                        total: (nb * m * n) as i64,
                    })?
                }
                Op::Swap(x, y) => reg.swap(x, y),
            }
        }
        for (i, &buf) in batch.bufs.iter().enumerate() {
            dev.copy(buf, reg[0] + 4 * (i * len) as u64, n0)?;
        }
    }
    Ok(())
}

/// [`Sgemm`] on host memory with cuBLAS's semantics, through the `gemm`
/// crate (the emulated device's cuBLAS). As on the CPU, `beta * C` is
/// formed first and the product added to it.
///
/// # Safety
/// The arguments must address live host buffers of f32 holding every matrix
/// they describe.
pub(crate) unsafe fn host_sgemm(g: &Sgemm) {
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    if m == 0 || n == 0 {
        return;
    }
    // Column-major element (i, j) of a matrix with leading dimension ld is
    // at i + j * ld: (column stride, row stride) of op(X).
    let strides = |t: bool, ld: i32| -> (isize, isize) {
        if t {
            (1, ld as isize)
        } else {
            (ld as isize, 1)
        }
    };
    let (a_cs, a_rs) = strides(g.transa, g.lda);
    let (b_cs, b_rs) = strides(g.transb, g.ldb);
    let parallelism = if m * n * k >= crate::mat::PARALLEL_FLOPS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    for i in 0..g.batch as usize {
        let a = (g.a as *const f32).add(i * g.stride_a as usize);
        let b = (g.b as *const f32).add(i * g.stride_b as usize);
        let c = (g.c as *mut f32).add(i * g.stride_c as usize);
        let read_dst = g.beta != 0.0;
        if read_dst && g.beta != 1.0 {
            for j in 0..n {
                for r in 0..m {
                    *c.add(r + j * g.ldc as usize) *= g.beta;
                }
            }
        }
        gemm::gemm(
            m,
            n,
            k,
            c,
            g.ldc as isize,
            1,
            read_dst,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            1.0f32,
            g.alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mat::{Mat, Workspace};

    fn m(reg: u16, t: bool) -> Mat {
        Mat { reg, t }
    }

    /// The host's matrix device: scratch in a Vec, the kernel's arithmetic
    /// written out in Rust (the emulated device runs the generated kernel).
    #[derive(Default)]
    struct Host {
        scratch: Vec<f32>,
    }

    impl MatDevice for Host {
        fn scratch(&mut self, floats: usize) -> Result<u64, DeviceError> {
            self.scratch.resize(floats, f32::NAN);
            Ok(self.scratch.as_mut_ptr() as u64)
        }
        unsafe fn copy(&mut self, dst: u64, src: u64, floats: usize) -> Result<(), DeviceError> {
            std::ptr::copy_nonoverlapping(src as *const f32, dst as *mut f32, floats);
            Ok(())
        }
        unsafe fn sgemm(&mut self, g: &Sgemm) -> Result<(), DeviceError> {
            host_sgemm(g);
            Ok(())
        }
        unsafe fn axpby(&mut self, x: &Axpby) -> Result<(), DeviceError> {
            let (m, n) = (x.m as i64, x.n as i64);
            let at = |p: u64, t: bool, base: i64, r: i64, c: i64| {
                *(p as *const f32).add((base + if t { c * m + r } else { r * n + c }) as usize)
            };
            for e in 0..x.total {
                let (base, r, c) = ((e / (m * n)) * x.stride, (e % (m * n)) / n, e % n);
                let mut v = x.alpha * at(x.a, x.a_t, base, r, c);
                if x.b != 0 {
                    v += x.beta * at(x.b, x.b_t, base, r, c);
                }
                *(x.dst as *mut f32).add((base + r * n + c) as usize) = v;
            }
            Ok(())
        }
    }

    /// Muon's program (as the planner lowers `muon`), with its numbers:
    /// arg0 `rows > cols`, arg1 the step count.
    fn newton_schulz() -> Vec<MatInst> {
        vec![
            MatInst::If {
                cond: Scal::Arg(0),
                then_len: 2,
                else_len: 0,
            },
            MatInst::Axpby {
                dst: 1,
                a: m(0, true),
                alpha: Scal::Num(1.0),
                b: None,
            },
            MatInst::Move { dst: 0, src: 1 },
            MatInst::Repeat {
                count: Scal::Arg(1),
                len: 4,
            },
            MatInst::Gemm {
                dst: 1,
                a: m(0, false),
                b: m(0, true),
                alpha: Scal::Num(1.0),
                c: None,
            },
            MatInst::Gemm {
                dst: 2,
                a: m(1, false),
                b: m(1, false),
                alpha: Scal::Num(2.0315),
                c: Some((m(1, false), Scal::Num(-4.775))),
            },
            MatInst::Gemm {
                dst: 3,
                a: m(2, false),
                b: m(0, false),
                alpha: Scal::Num(1.0),
                c: Some((m(0, false), Scal::Num(3.4445))),
            },
            MatInst::Move { dst: 0, src: 3 },
            MatInst::If {
                cond: Scal::Arg(0),
                then_len: 2,
                else_len: 0,
            },
            MatInst::Axpby {
                dst: 1,
                a: m(0, true),
                alpha: Scal::Num(1.0),
                b: None,
            },
            MatInst::Move { dst: 0, src: 1 },
        ]
    }

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5 - 1.0) / 4.0)
            .collect()
    }

    /// The device path (resolved, batched, column-major SGEMM) against the
    /// CPU's interpreter of the same program, over shapes both ways round,
    /// a batch of three and a batch of one.
    #[test]
    fn batched_device_programs_agree_with_the_cpu() {
        let code = newton_schulz();
        for (rows, cols, nb) in [(3, 5, 3), (5, 3, 1), (4, 4, 2), (1, 7, 2), (6, 1, 1)] {
            let args = [f64::from(u8::from(rows > cols)), 5.0];
            let prog = resolve(&code, 4, &args, rows, cols).unwrap();
            let mut mats: Vec<Vec<f32>> = (0..nb).map(|i| data(rows * cols, i)).collect();
            let want: Vec<Vec<f32>> = mats
                .iter()
                .map(|x| {
                    let mut x = x.clone();
                    crate::mat::run(
                        &code,
                        4,
                        &args,
                        rows,
                        cols,
                        &mut x,
                        &mut Workspace::default(),
                    )
                    .unwrap();
                    x
                })
                .collect();
            let batch = MatBatch {
                block: 0,
                prog,
                rows,
                cols,
                bufs: mats.iter_mut().map(|x| x.as_mut_ptr() as u64).collect(),
            };
            unsafe { run_batches(&mut Host::default(), &[batch], 0) }.unwrap();
            for (got, want) in mats.iter().zip(&want) {
                for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{rows}x{cols} [{e}]: device {g}, cpu {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_sum_with_a_transposed_destination_goes_through_the_scratch_register() {
        // r1 = x @ xᵀ (2x2); r1 = 1 * r1 @ r1 + 2 * r1ᵀ; x = r1 @ x
        let code = [
            MatInst::Gemm {
                dst: 1,
                a: m(0, false),
                b: m(0, true),
                alpha: Scal::Num(1.0),
                c: None,
            },
            MatInst::Gemm {
                dst: 2,
                a: m(1, false),
                b: m(1, false),
                alpha: Scal::Num(1.0),
                c: None,
            },
            MatInst::Gemm {
                dst: 2,
                a: m(1, false),
                b: m(1, true),
                alpha: Scal::Num(1.0),
                c: Some((m(2, true), Scal::Num(2.0))),
            },
            MatInst::Gemm {
                dst: 3,
                a: m(2, false),
                b: m(0, false),
                alpha: Scal::Num(0.5),
                c: Some((m(0, false), Scal::Num(-1.0))),
            },
            MatInst::Move { dst: 0, src: 3 },
        ];
        let prog = resolve(&code, 4, &[], 2, 3).unwrap();
        assert!(prog
            .ops
            .iter()
            .any(|op| matches!(op, Op::Axpby { dst: 4, .. })));
        let mut x = data(6, 3);
        let mut want = x.clone();
        crate::mat::run(&code, 4, &[], 2, 3, &mut want, &mut Workspace::default()).unwrap();
        let batch = MatBatch {
            block: 0,
            prog,
            rows: 2,
            cols: 3,
            bufs: vec![x.as_mut_ptr() as u64],
        };
        unsafe { run_batches(&mut Host::default(), &[batch], 0) }.unwrap();
        for (g, w) in x.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn a_program_too_long_to_issue_is_an_error() {
        // (Shape errors: `mat::run` resolves through here; its tests check
        // the messages.)
        let long = [
            MatInst::Repeat {
                count: Scal::Num(1e6),
                len: 1,
            },
            MatInst::Axpby {
                dst: 0,
                a: m(0, false),
                alpha: Scal::Num(1.0),
                b: None,
            },
        ];
        let err = resolve(&long, 1, &[], 2, 3).unwrap_err();
        assert!(err.contains("more than 65536 matrix operations"), "{err}");
    }
}

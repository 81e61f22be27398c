//! The matrix programs of matrix blocks (`matrix x = value { ... }`) on the
//! CPU: products through the `gemm` crate, sums and copies in plain loops.
//!
//! The planner ([`agr_codegen::lower`](mod@agr_codegen::lower)) turns a block into [`MatInst`]s over
//! registers that each hold one matrix; register 0 is the block's matrix.
//! [`crate::matdev::resolve`] decides, for one tensor's shape, what runs (its
//! loops unrolled, its conditions decided, every shape checked); [`run`]
//! executes that here, as a CUDA device does in batches. The generated
//! kernels and the run-time evaluator both call [`run`]; the engine runs the
//! blocks of a step's tensors in parallel, one tensor per thread at a time.

pub use agr_codegen::ir::{Mat, MatInst, Scal};

use crate::matdev::{Op, Opnd};

/// Products with at least this many multiply-adds also use the thread pool.
pub(crate) const PARALLEL_FLOPS: usize = 1 << 24;

/// The registers of one thread's blocks (each a row-major matrix whose
/// shape the resolved program knows), kept between tensors and steps so
/// their buffers are allocated once.
#[derive(Debug, Default)]
pub struct Workspace {
    regs: Vec<Vec<f32>>,
    /// Where a sum is formed before it replaces its destination.
    tmp: Vec<f32>,
}

thread_local! {
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::new(Workspace::default());
}

/// Calls `f` with this thread's workspace, kept between tensors and steps.
/// (Where the thread is already inside a call, as a thread waiting in a
/// parallel product can be when it picks up another tensor's block, `f`
/// gets a fresh one.)
pub fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|w| match w.try_borrow_mut() {
        Ok(mut ws) => f(&mut ws),
        Err(_) => f(&mut Workspace::default()),
    })
}

/// Runs a block's program on one tensor's matrix (`rows × cols` values,
/// row-major, in `data`), leaving the result in `data`. `args` are the
/// block's scalars ([`Scal::Arg`]). Operands of the wrong shapes, a result
/// of another shape or a loop count that is not a whole number are errors
/// (and leave `data` as it was).
pub fn run(
    code: &[MatInst],
    regs: usize,
    args: &[f64],
    rows: usize,
    cols: usize,
    data: &mut [f32],
    ws: &mut Workspace,
) -> Result<(), String> {
    if data.len() != rows * cols {
        return Err(format!(
            "a {rows}x{cols} matrix needs {} values, not {}",
            rows * cols,
            data.len()
        ));
    }
    let prog = crate::matdev::resolve(code, regs, args, rows, cols)?;
    if ws.regs.len() < prog.regs {
        ws.regs.resize_with(prog.regs, Vec::new);
    }
    ws.regs[0].clear();
    ws.regs[0].extend_from_slice(data);
    for op in &prog.ops {
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
            } => gemm_into(&mut ws.regs, dst, a, b, (m, n, k), alpha, beta),
            Op::Axpby {
                dst,
                a,
                alpha,
                b,
                m,
                n,
            } => {
                let regs = &ws.regs;
                let at = |o: Opnd, i: usize, j: usize| {
                    let v = &regs[o.reg];
                    if o.t {
                        v[j * o.c + i]
                    } else {
                        v[i * o.c + j]
                    }
                };
                ws.tmp.clear();
                ws.tmp.extend((0..m * n).map(|e| {
                    let (i, j) = (e / n, e % n);
                    let x = alpha * at(a, i, j);
                    match b {
                        Some((b, beta)) => x + beta * at(b, i, j),
                        None => x,
                    }
                }));
                std::mem::swap(&mut ws.tmp, &mut ws.regs[dst]);
            }
            Op::Swap(x, y) => ws.regs.swap(x, y),
        }
    }
    data.copy_from_slice(&ws.regs[0][..rows * cols]);
    Ok(())
}

/// `r[dst] (m × n) = alpha * a @ b + beta * r[dst]` (`dst` is not read
/// where `beta` is 0): `beta * dst` formed first, the product added to it.
fn gemm_into(
    regs: &mut [Vec<f32>],
    dst: usize,
    a: Opnd,
    b: Opnd,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) {
    let mut out = std::mem::take(&mut regs[dst]);
    let read_dst = beta != 0.0;
    if read_dst {
        if beta != 1.0 {
            out.iter_mut().for_each(|x| *x *= beta);
        }
    } else {
        out.clear();
        out.resize(m * n, 0.0);
    }
    // (row stride, column stride) of an operand stored row-major r × c.
    let strides = |o: Opnd| -> (isize, isize) {
        let c = o.c as isize;
        if o.t {
            (1, c)
        } else {
            (c, 1)
        }
    };
    let ((a_rs, a_cs), (b_rs, b_cs)) = (strides(a), strides(b));
    let parallelism = if m * n * k >= PARALLEL_FLOPS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    if m * n > 0 {
        let (ra, rb) = (&regs[a.reg], &regs[b.reg]);
        debug_assert!(out.len() >= m * n && ra.len() >= a.r * a.c && rb.len() >= b.r * b.c);
        // SAFETY: `out` holds m×n values (row stride n, column stride 1); a
        // is m×k and b k×n through their strides, within their buffers (the
        // resolved program's shapes); out is a buffer of its own (taken out
        // of the registers above, and the program never multiplies into an
        // operand).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                ra.as_ptr(),
                a_cs,
                a_rs,
                rb.as_ptr(),
                b_cs,
                b_rs,
                1.0f32,
                alpha,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    regs[dst] = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(reg: u16, t: bool) -> Mat {
        Mat { reg, t }
    }

    /// An independent product in f64 (a plain triple loop over row-major data).
    fn naive(a: &[f32], ar: usize, ac: usize, b: &[f32], bc: usize) -> Vec<f64> {
        let mut out = vec![0.0; ar * bc];
        for i in 0..ar {
            for j in 0..bc {
                out[i * bc + j] = (0..ac)
                    .map(|l| f64::from(a[i * ac + l]) * f64::from(b[l * bc + j]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn a_gram_update_matches_an_independent_product() {
        // x (3x5); r1 = x @ xᵀ; r2 = 2 * r1 @ r1 + -0.5 * r1; r3 = r2 @ x + 1.5 * x; x <- r3
        let x: Vec<f32> = (0..15).map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0).collect();
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
                alpha: Scal::Arg(0),
                c: Some((m(1, false), Scal::Num(-0.5))),
            },
            MatInst::Gemm {
                dst: 3,
                a: m(2, false),
                b: m(0, false),
                alpha: Scal::Num(1.0),
                c: Some((m(0, false), Scal::Num(1.5))),
            },
            MatInst::Move { dst: 0, src: 3 },
        ];
        let mut data = x.clone();
        run(&code, 4, &[2.0], 3, 5, &mut data, &mut Workspace::default()).unwrap();
        let xt: Vec<f32> = (0..15).map(|e| x[(e % 3) * 5 + e / 3]).collect();
        let a: Vec<f32> = naive(&x, 3, 5, &xt, 3).iter().map(|&v| v as f32).collect();
        let aa = naive(&a, 3, 3, &a, 3);
        let b: Vec<f32> = aa
            .iter()
            .zip(&a)
            .map(|(&p, &q)| (2.0 * p - 0.5 * f64::from(q)) as f32)
            .collect();
        let bx = naive(&b, 3, 3, &x, 5);
        for (e, (&got, &want)) in data.iter().zip(bx.iter()).enumerate() {
            let want = want + 1.5 * f64::from(x[e]);
            assert!(
                (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{e}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn transposes_loops_and_branches() {
        // if arg0 { r1 = xᵀ; x <- r1 } ; repeat 3 { r2 = 2 * x; x <- r2 }; if arg0 { r3 = xᵀ; x <- r3 }
        let code = [
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
                count: Scal::Num(3.0),
                len: 2,
            },
            MatInst::Axpby {
                dst: 2,
                a: m(0, false),
                alpha: Scal::Num(2.0),
                b: None,
            },
            MatInst::Move { dst: 0, src: 2 },
            MatInst::If {
                cond: Scal::Arg(0),
                then_len: 2,
                else_len: 0,
            },
            MatInst::Axpby {
                dst: 3,
                a: m(0, true),
                alpha: Scal::Num(1.0),
                b: None,
            },
            MatInst::Move { dst: 0, src: 3 },
        ];
        let x: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let mut data = x.clone();
        run(&code, 4, &[1.0], 3, 2, &mut data, &mut Workspace::default()).unwrap();
        assert_eq!(data, x.iter().map(|v| v * 8.0).collect::<Vec<_>>());
    }

    #[test]
    fn shape_errors_say_what_and_change_nothing() {
        // x @ x of a 2x3 matrix.
        let code = [
            MatInst::Gemm {
                dst: 1,
                a: m(0, false),
                b: m(0, false),
                alpha: Scal::Num(1.0),
                c: None,
            },
            MatInst::Move { dst: 0, src: 1 },
        ];
        let mut data = vec![1.0f32; 6];
        let err = run(&code, 2, &[], 2, 3, &mut data, &mut Workspace::default()).unwrap_err();
        assert_eq!(err, "`@` of a 2x3 and a 2x3 matrix");
        assert_eq!(data, vec![1.0; 6]);
        // x = x @ xᵀ: a 2x2 result for a 2x3 tensor.
        let code = [
            MatInst::Gemm {
                dst: 1,
                a: m(0, false),
                b: m(0, true),
                alpha: Scal::Num(1.0),
                c: None,
            },
            MatInst::Move { dst: 0, src: 1 },
        ];
        let err = run(&code, 2, &[], 2, 3, &mut data, &mut Workspace::default()).unwrap_err();
        assert!(err.contains("2x2 matrix where the tensor is 2x3"), "{err}");
        assert_eq!(data, vec![1.0; 6]);
        let code = [MatInst::Repeat {
            count: Scal::Num(1.5),
            len: 0,
        }];
        let err = run(&code, 1, &[], 2, 3, &mut data, &mut Workspace::default()).unwrap_err();
        assert!(err.contains("whole number"), "{err}");
    }
}

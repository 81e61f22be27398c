//! The matrix programs of matrix blocks (`matrix x = value { ... }`) on the
//! CPU: products through the `gemm` crate, sums and copies in plain loops.
//!
//! The planner ([`agr_codegen::lower`]) turns a block into [`MatInst`]s over
//! registers that each hold one matrix; register 0 is the block's matrix. The
//! generated kernels and the run-time evaluator both call [`run`]; the
//! engine runs the blocks of a step's tensors in parallel, one tensor per
//! thread at a time.

pub use agr_codegen::ir::{Mat, MatInst, Scal};

use agr_codegen::ir::{mat_steps, MatStep};

/// Products with at least this many multiply-adds also use the thread pool.
pub(crate) const PARALLEL_FLOPS: usize = 1 << 24;

/// One register: a rows × cols matrix, row-major.
#[derive(Clone, Debug, Default)]
struct Reg {
    r: usize,
    c: usize,
    v: Vec<f32>,
}

impl Reg {
    fn dims(&self, t: bool) -> (usize, usize) {
        if t {
            (self.c, self.r)
        } else {
            (self.r, self.c)
        }
    }
    /// (row stride, column stride) of the operand (transposed where `t`).
    fn strides(&self, t: bool) -> (isize, isize) {
        let c = self.c as isize;
        if t {
            (1, c)
        } else {
            (c, 1)
        }
    }
    fn at(&self, t: bool, i: usize, j: usize) -> f32 {
        if t {
            self.v[j * self.c + i]
        } else {
            self.v[i * self.c + j]
        }
    }
}

/// The registers of one thread's blocks, kept between tensors and steps so
/// their buffers are allocated once.
#[derive(Debug, Default)]
pub struct Workspace {
    regs: Vec<Reg>,
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
    if ws.regs.len() < regs {
        ws.regs.resize_with(regs, Reg::default);
    }
    let r0 = &mut ws.regs[0];
    r0.r = rows;
    r0.c = cols;
    r0.v.clear();
    r0.v.extend_from_slice(data);
    exec(code, &mut ws.regs, args)?;
    let r0 = &ws.regs[0];
    if (r0.r, r0.c) != (rows, cols) {
        return Err(format!(
            "the block ends with a {}x{} matrix where the tensor is {rows}x{cols}",
            r0.r, r0.c
        ));
    }
    data.copy_from_slice(&r0.v);
    Ok(())
}

fn exec(code: &[MatInst], regs: &mut [Reg], args: &[f64]) -> Result<(), String> {
    let scal = |x: Scal| x.value(args);
    for step in mat_steps(code) {
        match step {
            MatStep::Inst(&MatInst::Gemm {
                dst,
                a,
                b,
                alpha,
                c,
            }) => gemm_into(regs, dst, a, b, scal(alpha), c.map(|(m, s)| (m, scal(s))))?,
            MatStep::Inst(&MatInst::Axpby { dst, a, alpha, b }) => {
                axpby(regs, dst, a, scal(alpha), b.map(|(m, s)| (m, scal(s))))?
            }
            MatStep::Inst(&MatInst::Move { dst, src }) => {
                regs.swap(usize::from(dst), usize::from(src))
            }
            MatStep::Inst(other) => unreachable!("mat_steps decodes {other:?}"),
            MatStep::Repeat(count, body) => {
                let n = scal(count);
                if !(n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX)) {
                    return Err(format!("`repeat` needs a whole number of times, not {n}"));
                }
                for _ in 0..n as u64 {
                    exec(body, regs, args)?;
                }
            }
            MatStep::If(cond, then, otherwise) => {
                exec(if scal(cond) != 0.0 { then } else { otherwise }, regs, args)?
            }
        }
    }
    Ok(())
}

/// `r[dst] = alpha * a @ b + beta * c`.
fn gemm_into(
    regs: &mut [Reg],
    dst: u16,
    a: Mat,
    b: Mat,
    alpha: f64,
    c: Option<(Mat, f64)>,
) -> Result<(), String> {
    let (m, k) = regs[usize::from(a.reg)].dims(a.t);
    let (k2, n) = regs[usize::from(b.reg)].dims(b.t);
    if k != k2 {
        return Err(format!("`@` of a {m}x{k} and a {k2}x{n} matrix"));
    }
    let mut out = std::mem::take(&mut regs[usize::from(dst)]);
    let read_dst = match c {
        Some((cm, beta)) => {
            let src = if cm.reg == dst {
                &out
            } else {
                &regs[usize::from(cm.reg)]
            };
            if src.dims(cm.t) != (m, n) {
                let (r, cc) = src.dims(cm.t);
                regs[usize::from(dst)] = out;
                return Err(format!("`+` of a {m}x{n} and a {r}x{cc} matrix"));
            }
            let beta = beta as f32;
            if cm.reg != dst {
                // Into dst's own buffer.
                let src = &regs[usize::from(cm.reg)];
                out.v.clear();
                out.v
                    .extend((0..m * n).map(|e| beta * src.at(cm.t, e / n, e % n)));
            } else if !cm.t {
                if beta != 1.0 {
                    out.v.iter_mut().for_each(|x| *x *= beta);
                }
            } else {
                let scaled: Vec<f32> = (0..m * n)
                    .map(|e| beta * out.at(true, e / n, e % n))
                    .collect();
                out.v = scaled;
            }
            true
        }
        None => {
            out.v.clear();
            out.v.resize(m * n, 0.0);
            false
        }
    };
    out.r = m;
    out.c = n;
    let (ra, rb) = (&regs[usize::from(a.reg)], &regs[usize::from(b.reg)]);
    let ((a_rs, a_cs), (b_rs, b_cs)) = (ra.strides(a.t), rb.strides(b.t));
    let parallelism = if m * n * k >= PARALLEL_FLOPS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    if m * n > 0 {
        // SAFETY: `out` holds m×n values (row stride n, column stride 1); a
        // is m×k and b k×n through their strides, within their buffers; out
        // is a buffer of its own (taken out of the registers above).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.v.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                ra.v.as_ptr(),
                a_cs,
                a_rs,
                rb.v.as_ptr(),
                b_cs,
                b_rs,
                1.0f32,
                alpha as f32,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    regs[usize::from(dst)] = out;
    Ok(())
}

/// `r[dst] = alpha * a + beta * b`.
fn axpby(
    regs: &mut [Reg],
    dst: u16,
    a: Mat,
    alpha: f64,
    b: Option<(Mat, f64)>,
) -> Result<(), String> {
    let mut out = std::mem::take(&mut regs[usize::from(dst)]);
    // The operands where they are (dst itself, as the accumulator, is the
    // register taken out above); the result into a buffer of its own.
    let view = |m: Mat| {
        if m.reg == dst {
            &out
        } else {
            &regs[usize::from(m.reg)]
        }
    };
    let ra = view(a);
    let (m, n) = ra.dims(a.t);
    let rb = b.map(|(bm, beta)| (view(bm), bm.t, beta as f32));
    if let Some((rb, t, _)) = rb {
        if rb.dims(t) != (m, n) {
            let (r, c) = rb.dims(t);
            regs[usize::from(dst)] = out;
            return Err(format!("`+` of a {m}x{n} and a {r}x{c} matrix"));
        }
    }
    let alpha = alpha as f32;
    let v: Vec<f32> = (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            let x = alpha * ra.at(a.t, i, j);
            match rb {
                Some((rb, t, beta)) => x + beta * rb.at(t, i, j),
                None => x,
            }
        })
        .collect();
    out = Reg { r: m, c: n, v };
    regs[usize::from(dst)] = out;
    Ok(())
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

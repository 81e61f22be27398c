//! A reference evaluation of the IR: unfused and unhoisted, every node
//! materialised for a whole tensor, reductions summed element by element in
//! order. Slow and simple, it defines what a step means, and tests compare
//! the fused back ends with it.

use agr_grammar::check::Level;

use crate::ir::*;

/// One tensor's data for [`step`].
pub struct TensorData {
    pub shape: Vec<usize>,
    pub p: Vec<f32>,
    pub g: Vec<f32>,
    /// One buffer per state, created with each state's fill value.
    pub states: Vec<Vec<f32>>,
    /// Steps taken so far.
    pub t: u64,
}

impl TensorData {
    pub fn new(prog: &Program, shape: Vec<usize>, p: Vec<f32>) -> TensorData {
        let n = p.len();
        TensorData {
            g: vec![0.0; n],
            states: prog
                .states
                .iter()
                .map(|s| {
                    let len = state_shape(s.reduced, s.per_tensor, &shape)
                        .iter()
                        .product();
                    vec![s.fill as f32; len]
                })
                .collect(),
            shape,
            p,
            t: 0,
        }
    }
}

#[derive(Clone, Debug)]
enum V {
    S(f64),
    B(bool),
    A(Vec<f32>),
    BA(Vec<bool>),
}

impl V {
    fn f32_at(&self, i: usize) -> f32 {
        match self {
            V::S(x) => *x as f32,
            V::A(a) => a[i],
            _ => panic!("not a number"),
        }
    }
    fn bool_at(&self, i: usize) -> bool {
        match self {
            V::B(b) => *b,
            V::BA(a) => a[i],
            _ => panic!("not a bool"),
        }
    }
}

/// Hyperparameter values in spec order (bools as 0/1).
pub fn step(prog: &Program, hyper: &[f64], tensors: &mut [TensorData]) {
    let nr = prog.reductions.len();
    let mut reduced = vec![vec![0.0f64; nr]; tensors.len()];
    let mut global = vec![0.0f64; nr];
    let mut rows: Vec<Vec<Vec<f64>>> = vec![vec![vec![]; nr]; tensors.len()];
    for pass in 0..prog.n_phases {
        let mut per_tensor = vec![];
        for (j, t) in tensors.iter().enumerate() {
            let vals = eval(prog, hyper, t, pass, &reduced[j], &global, &rows[j]);
            per_tensor.push(vals);
        }
        for (r, red) in prog.reductions.iter().enumerate() {
            if red.pass != pass {
                continue;
            }
            let fold = |acc: f64, x: f64| match red.op {
                ReduceOp::Sum => acc + x,
                ReduceOp::Max => {
                    if acc.is_nan() || x.is_nan() {
                        f64::NAN
                    } else {
                        acc.max(x)
                    }
                }
            };
            let id = if red.op == ReduceOp::Sum {
                0.0
            } else {
                f64::NEG_INFINITY
            };
            let mut g = id;
            for (j, t) in tensors.iter().enumerate() {
                let v = &per_tensor[j][red.arg];
                let n = t.p.len();
                match red.scope {
                    Scope::Dim(axis) => {
                        let view = View::of(&t.shape);
                        let mut out = vec![id; view.count(axis, n)];
                        for i in 0..n {
                            let k = view.index(axis, i);
                            out[k] = fold(out[k], f64::from(v.f32_at(i)));
                        }
                        rows[j][r] = out;
                    }
                    Scope::Rows => {
                        let row_len = row_len(&t.shape);
                        rows[j][r] = (0..n / row_len)
                            .map(|row| {
                                (0..row_len).fold(id, |a, k| {
                                    fold(a, f64::from(v.f32_at(row * row_len + k)))
                                })
                            })
                            .collect();
                    }
                    _ => {
                        let s = (0..n).fold(id, |a, i| fold(a, f64::from(v.f32_at(i))));
                        reduced[j][r] = s;
                        g = fold(g, s);
                    }
                }
            }
            if red.scope == Scope::Global {
                global[r] = g;
            }
        }
    }
    for (j, t) in tensors.iter_mut().enumerate() {
        let vals = eval(
            prog,
            hyper,
            t,
            prog.n_phases,
            &reduced[j],
            &global,
            &rows[j],
        );
        let n = t.p.len();
        let new_p: Vec<f32> = (0..n).map(|i| vals[prog.param_out].f32_at(i)).collect();
        let view = View::of(&t.shape);
        let mut new_states: Vec<Vec<f32>> = prog
            .state_out
            .iter()
            .zip(&prog.states)
            .map(|(&id, s)| match s.reduced {
                // One number per tensor, stored as f32 like every state.
                _ if s.per_tensor => match vals[id] {
                    V::S(x) => vec![x as f32],
                    _ => unreachable!("a per-tensor state's value is a tensor scalar"),
                },
                // The value is the same along the axis (the checker proves
                // it): the last element of each row or column writes it.
                Some(a) => (0..n)
                    .filter(|&i| view.closes(a, i))
                    .map(|i| vals[id].f32_at(i))
                    .collect(),
                None => (0..n).map(|i| vals[id].f32_at(i)).collect(),
            })
            .collect();
        // A matrix block's state holds its result.
        for (i, node) in prog.nodes.iter().enumerate() {
            if let Op::MatOut(b) = node.op {
                new_states[prog.mats[b].state] = (0..n).map(|k| vals[i].f32_at(k)).collect();
            }
        }
        t.p = new_p;
        t.states = new_states;
        t.t += 1;
    }
}

fn row_len(shape: &[usize]) -> usize {
    if shape.len() >= 2 {
        shape[1..].iter().product()
    } else {
        shape.iter().product()
    }
}

/// Every node's value for one tensor, with reductions of passes `< upto`.
fn eval(
    prog: &Program,
    hyper: &[f64],
    t: &TensorData,
    upto: usize,
    reduced: &[f64],
    global: &[f64],
    rows: &[Vec<f64>],
) -> Vec<V> {
    let n = t.p.len();
    let rl = row_len(&t.shape);
    let view = View::of(&t.shape);
    let mut vals: Vec<V> = Vec::with_capacity(prog.nodes.len());
    for node in &prog.nodes {
        if node.phase > upto {
            vals.push(V::S(f64::NAN));
            continue;
        }
        let v = match node.op {
            Op::Num(x) => V::S(x),
            Op::Bool(b) => V::B(b),
            Op::Hyper(h) => match prog.hypers[h].kind {
                HyperKind::Bool => V::B(hyper[h] != 0.0),
                _ => V::S(hyper[h]),
            },
            Op::T => V::S((t.t + 1) as f64),
            Op::Ndim => V::S(t.shape.len() as f64),
            Op::Numel => V::S(n as f64),
            Op::RowLen => V::S(rl as f64),
            Op::DimLen(a) => V::S(view.len(a) as f64),
            Op::Param => V::A(t.p.clone()),
            Op::Grad => V::A(t.g.clone()),
            Op::State(s) if prog.states[s].per_tensor => V::S(f64::from(t.states[s][0])),
            Op::State(s) => match prog.states[s].reduced {
                Some(a) => V::A((0..n).map(|i| t.states[s][view.index(a, i)]).collect()),
                None => V::A(t.states[s].clone()),
            },
            Op::Reduced(r) => match prog.reductions[r].scope {
                Scope::Tensor => V::S(reduced[r]),
                Scope::Global => V::S(global[r]),
                Scope::Rows => V::A((0..n).map(|i| rows[r][i / rl] as f32).collect()),
                Scope::Dim(a) => V::A((0..n).map(|i| rows[r][view.index(a, i)] as f32).collect()),
            },
            Op::MatOut(b) => {
                let block = &prog.mats[b];
                let x: Vec<f32> = (0..n).map(|i| vals[block.input].f32_at(i)).collect();
                let args: Vec<f64> = block
                    .args
                    .iter()
                    .map(|&a| match &vals[a] {
                        V::S(v) => *v,
                        V::B(b) => f64::from(u8::from(*b)),
                        _ => unreachable!("matrix arguments are scalars"),
                    })
                    .collect();
                V::A(run_matrix(block, &args, n / rl, rl, x))
            }
            Op::Unary(op, a) => unary(op, &vals[a], n),
            Op::Binary(op, a, b) => binary(op, &vals[a], &vals[b], n),
            Op::Select(c, a, b) => {
                let elem = node.level == Level::Elem;
                match (&vals[c], elem) {
                    (V::B(c), false) => {
                        if *c {
                            vals[a].clone()
                        } else {
                            vals[b].clone()
                        }
                    }
                    _ if node.ty == agr_grammar::check::Ty::Bool => V::BA(
                        (0..n)
                            .map(|i| {
                                if vals[c].bool_at(i) {
                                    vals[a].bool_at(i)
                                } else {
                                    vals[b].bool_at(i)
                                }
                            })
                            .collect(),
                    ),
                    _ => V::A(
                        (0..n)
                            .map(|i| {
                                if vals[c].bool_at(i) {
                                    vals[a].f32_at(i)
                                } else {
                                    vals[b].f32_at(i)
                                }
                            })
                            .collect(),
                    ),
                }
            }
        };
        vals.push(v);
    }
    vals
}

fn unary(op: UnaryOp, a: &V, n: usize) -> V {
    let f64op = |x: f64| op.eval_f64(x).expect("numeric unary op");
    let f32op = |x: f32| match op {
        UnaryOp::Neg => -x,
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sign => UnaryOp::Sign.eval_f64(f64::from(x)).unwrap() as f32,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Ln => x.ln(),
        UnaryOp::Not => unreachable!(),
    };
    match (op, a) {
        (UnaryOp::Not, V::B(b)) => V::B(!b),
        (UnaryOp::Not, V::BA(v)) => V::BA(v.iter().map(|b| !b).collect()),
        (_, V::S(x)) => V::S(f64op(*x)),
        (_, V::A(v)) => V::A((0..n).map(|i| f32op(v[i])).collect()),
        _ => panic!("bad unary operand"),
    }
}

fn binary(op: BinaryOp, a: &V, b: &V, n: usize) -> V {
    use BinaryOp as B;
    match (a, b) {
        (V::S(x), V::S(y)) => match op.eval_f64(*x, *y).expect("bool op on numbers") {
            Scalar::Num(v) => V::S(v),
            Scalar::Bool(v) => V::B(v),
        },
        (V::B(x), V::B(y)) => V::B(if op == B::And { *x && *y } else { *x || *y }),
        (V::B(_) | V::BA(_), V::B(_) | V::BA(_)) => V::BA(
            (0..n)
                .map(|i| {
                    if op == B::And {
                        a.bool_at(i) && b.bool_at(i)
                    } else {
                        a.bool_at(i) || b.bool_at(i)
                    }
                })
                .collect(),
        ),
        _ => {
            let f = |x: f32, y: f32| -> Result<f32, bool> {
                Ok(match op {
                    B::Add => x + y,
                    B::Sub => x - y,
                    B::Mul => x * y,
                    B::Div => x / y,
                    B::Pow => x.powf(y),
                    B::Min => x.min(y),
                    B::Max => x.max(y),
                    B::Lt => return Err(x < y),
                    B::Le => return Err(x <= y),
                    B::Gt => return Err(x > y),
                    B::Ge => return Err(x >= y),
                    B::Eq => return Err(x == y),
                    B::Ne => return Err(x != y),
                    B::And | B::Or => unreachable!(),
                })
            };
            let r: Vec<Result<f32, bool>> = (0..n).map(|i| f(a.f32_at(i), b.f32_at(i))).collect();
            if r.first().is_some_and(|x| x.is_err()) {
                V::BA(r.into_iter().map(|x| x.unwrap_err()).collect())
            } else {
                V::A(r.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
            }
        }
    }
}

/// A matrix in the reference evaluation: rows, columns, row-major values.
#[derive(Clone, Debug, Default)]
struct M {
    r: usize,
    c: usize,
    v: Vec<f32>,
}

impl M {
    /// Element (i, j) of the operand (transposed where `t`).
    fn at(&self, t: bool, i: usize, j: usize) -> f32 {
        if t {
            self.v[j * self.c + i]
        } else {
            self.v[i * self.c + j]
        }
    }
    fn dims(&self, t: bool) -> (usize, usize) {
        if t {
            (self.c, self.r)
        } else {
            (self.r, self.c)
        }
    }
}

/// A matrix block's program, the plain way: each instruction's products
/// and sums in f64, rounded to f32 once per element of its result.
/// Panics on operands whose shapes do not fit (the engine reports those as
/// errors; tests use valid specs).
fn run_matrix(block: &MatBlock, args: &[f64], rows: usize, cols: usize, x: Vec<f32>) -> Vec<f32> {
    let mut regs = vec![M::default(); block.regs];
    regs[0] = M {
        r: rows,
        c: cols,
        v: x,
    };
    fn run(code: &[MatInst], regs: &mut [M], args: &[f64]) {
        let scal = |x: Scal| x.value(args);
        for step in mat_steps(code) {
            match step {
                MatStep::Inst(&MatInst::Gemm {
                    dst,
                    a,
                    b,
                    alpha,
                    c,
                }) => {
                    let (ma, mb) = (&regs[usize::from(a.reg)], &regs[usize::from(b.reg)]);
                    let ((m, k), (k2, n)) = (ma.dims(a.t), mb.dims(b.t));
                    assert_eq!(k, k2, "matrix product of {m}x{k} and {k2}x{n}");
                    let alpha = scal(alpha);
                    let mut out = vec![0.0f32; m * n];
                    for r in 0..m {
                        for col in 0..n {
                            let dot: f64 = (0..k)
                                .map(|l| {
                                    f64::from(ma.at(a.t, r, l)) * f64::from(mb.at(b.t, l, col))
                                })
                                .sum();
                            let mut v = alpha * dot;
                            if let Some((cm, beta)) = c {
                                let mc = &regs[usize::from(cm.reg)];
                                assert_eq!(mc.dims(cm.t), (m, n), "matrix sum of different shapes");
                                v += scal(beta) * f64::from(mc.at(cm.t, r, col));
                            }
                            out[r * n + col] = v as f32;
                        }
                    }
                    regs[usize::from(dst)] = M { r: m, c: n, v: out };
                }
                MatStep::Inst(&MatInst::Axpby { dst, a, alpha, b }) => {
                    let ma = &regs[usize::from(a.reg)];
                    let (m, n) = ma.dims(a.t);
                    let alpha = scal(alpha);
                    let mut out = vec![0.0f32; m * n];
                    for r in 0..m {
                        for col in 0..n {
                            let mut v = alpha * f64::from(ma.at(a.t, r, col));
                            if let Some((bm, beta)) = b {
                                let mb = &regs[usize::from(bm.reg)];
                                assert_eq!(mb.dims(bm.t), (m, n), "matrix sum of different shapes");
                                v += scal(beta) * f64::from(mb.at(bm.t, r, col));
                            }
                            out[r * n + col] = v as f32;
                        }
                    }
                    regs[usize::from(dst)] = M { r: m, c: n, v: out };
                }
                MatStep::Inst(&MatInst::Move { dst, src }) => {
                    regs[usize::from(dst)] = std::mem::take(&mut regs[usize::from(src)]);
                }
                MatStep::Inst(other) => unreachable!("mat_steps decodes {other:?}"),
                MatStep::Repeat(count, body) => {
                    for _ in 0..scal(count) as u64 {
                        run(body, regs, args);
                    }
                }
                MatStep::If(cond, then, otherwise) => {
                    run(if scal(cond) != 0.0 { then } else { otherwise }, regs, args);
                }
            }
        }
    }
    run(&block.code, &mut regs, args);
    let out = std::mem::take(&mut regs[0]);
    assert_eq!(
        (out.r, out.c),
        (rows, cols),
        "a matrix block must end with its matrix's shape"
    );
    out.v
}

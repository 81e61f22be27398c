//! Stage 3a: checked syntax tree → IR.
//!
//! Assignments become SSA values, `if` statements become selects, built-in
//! functions become arithmetic and reductions (Ψ lowers to one Σ|x| per
//! tensor), identical subexpressions are shared and constant arithmetic is
//! folded. The spec must have passed [`agr_grammar::check::check`].

use std::collections::HashMap;

use agr_grammar::ast::{self, BinOp, ExprKind, HyperTy, Literal, Stmt, UnOp};
use agr_grammar::check::{self, Level, Ty};
use agr_grammar::{print, Diagnostic};

use crate::ir::*;

/// Checks and lowers a spec.
pub fn lower(spec: &ast::Spec) -> Result<Program, Vec<Diagnostic>> {
    let errors = check::check(spec);
    if !errors.is_empty() {
        return Err(errors);
    }
    let prog = lower_checked(spec);
    // 8-bit states scale blocks of 256 values: a spec whose work items are
    // whole rows cannot keep them.
    if prog.row_reductions() > 0 && !prog.factored() {
        let errors: Vec<Diagnostic> = spec
            .states
            .iter()
            .filter(|s| matches!(check::state_storage(s), "q8" | "uq8"))
            .map(|s| {
                let sh = s.shape.as_ref().expect("a storage word was written");
                Diagnostic::new(
                    sh.span.clone(),
                    format!(
                        "state `{}` is stored in {}, whose scales cover blocks of 256 values, but this spec reduces per row, so its work items are whole rows",
                        s.name.name, sh.word.name
                    ),
                    "store it in `bf16` or `f16`",
                )
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
    }
    Ok(prog)
}

/// Parses, checks and lowers spec text.
pub fn compile(source: &str) -> Result<Program, Vec<Diagnostic>> {
    compile_with_warnings(source).map(|(prog, _)| prog)
}

/// Parses, checks and lowers spec text (every syntax error, or every
/// semantic error, when it fails); a spec that compiles also gets the
/// checker's warnings (see [`check::warnings`]), which do not stop it.
pub fn compile_with_warnings(source: &str) -> Result<(Program, Vec<Diagnostic>), Vec<Diagnostic>> {
    let spec = agr_grammar::parse::parse_all(source)?;
    let prog = lower(&spec)?;
    Ok((prog, check::warnings(&spec)))
}

#[derive(Clone, Debug)]
enum Bind {
    Node(NodeId),
    /// A matrix of the matrix block being lowered: its register.
    Reg(u16),
    /// A state not yet read or assigned in this step.
    StateOld(usize),
}

struct Lowerer<'a> {
    spec: &'a ast::Spec,
    nodes: Vec<Node>,
    memo: HashMap<OpKey, NodeId>,
    reductions: Vec<Reduction>,
    scopes: Vec<HashMap<String, Bind>>,
    state_old: Vec<Option<NodeId>>,
    assign_count: HashMap<String, usize>,
    /// The states, with those that hold matrix blocks' results.
    states: Vec<State>,
    mats: Vec<MatBlock>,
    /// The matrix block being lowered.
    mat: Option<MatCtx>,
}

/// A matrix block while it is lowered.
struct MatCtx {
    code: Vec<MatInst>,
    regs: usize,
    args: Vec<NodeId>,
}

/// A matrix expression: a sum of terms, each a scalar coefficient (a node)
/// times a matrix or a product of two matrices.
type Terms = Vec<(NodeId, Term)>;

#[derive(Clone, Copy)]
enum Term {
    One(Mat),
    Prod(Mat, Mat),
}

/// Hashable form of an op (floats by their bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum OpKey {
    Num(u64),
    Other(OpShape),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum OpShape {
    Bool(bool),
    Hyper(usize),
    T,
    Ndim,
    Numel,
    RowLen,
    DimLen(Axis),
    Param,
    Grad,
    State(usize),
    Reduced(usize),
    Unary(UnaryOp, NodeId),
    Binary(BinaryOp, NodeId, NodeId),
    Select(NodeId, NodeId, NodeId),
    MatOut(usize),
}

fn key(op: Op) -> OpKey {
    OpKey::Other(match op {
        Op::Num(v) => return OpKey::Num(v.to_bits()),
        Op::Bool(b) => OpShape::Bool(b),
        Op::Hyper(i) => OpShape::Hyper(i),
        Op::T => OpShape::T,
        Op::Ndim => OpShape::Ndim,
        Op::Numel => OpShape::Numel,
        Op::RowLen => OpShape::RowLen,
        Op::DimLen(a) => OpShape::DimLen(a),
        Op::Param => OpShape::Param,
        Op::Grad => OpShape::Grad,
        Op::State(i) => OpShape::State(i),
        Op::Reduced(i) => OpShape::Reduced(i),
        Op::Unary(o, a) => OpShape::Unary(o, a),
        Op::Binary(o, a, b) => OpShape::Binary(o, a, b),
        Op::Select(c, a, b) => OpShape::Select(c, a, b),
        Op::MatOut(b) => OpShape::MatOut(b),
    })
}

pub fn lower_checked(spec: &ast::Spec) -> Program {
    let mut l = Lowerer {
        spec,
        nodes: vec![],
        memo: HashMap::new(),
        reductions: vec![],
        scopes: vec![HashMap::new()],
        state_old: vec![None; spec.states.len()],
        assign_count: HashMap::new(),
        states: vec![],
        mats: vec![],
        mat: None,
    };
    let p = l.leaf(Op::Param, Ty::Num, Level::Elem, "p");
    let g = l.leaf(Op::Grad, Ty::Num, Level::Elem, "g");
    let t = l.leaf(Op::T, Ty::Num, Level::Tensor, "t");
    let ndim = l.leaf(Op::Ndim, Ty::Num, Level::Tensor, "ndim");
    let numel = l.leaf(Op::Numel, Ty::Num, Level::Tensor, "numel");
    for (n, id) in [
        ("p", p),
        ("g", g),
        ("t", t),
        ("ndim", ndim),
        ("numel", numel),
    ] {
        l.bind(n, Bind::Node(id));
    }
    // A tensor viewed as rows: the first dimension by the rest (one row
    // below two dimensions).
    let cols = l.row_len();
    let rows = l.make(Op::Binary(BinaryOp::Div, numel, cols));
    l.name_node(rows, "rows");
    l.bind("cols", Bind::Node(cols));
    l.bind("rows", Bind::Node(rows));
    let mut hypers = vec![];
    for (i, h) in spec.hypers.iter().enumerate() {
        let kind = match (h.ty.as_ref().map(|t| t.0), h.default) {
            (Some(HyperTy::Int), _) => HyperKind::Int,
            (Some(HyperTy::Bool), _) | (None, Literal::Bool(_)) => HyperKind::Bool,
            _ => HyperKind::Float,
        };
        let ty = if kind == HyperKind::Bool {
            Ty::Bool
        } else {
            Ty::Num
        };
        let id = l.leaf(Op::Hyper(i), ty, Level::Step, &h.name.name);
        l.bind(&h.name.name, Bind::Node(id));
        hypers.push(Hyper {
            name: h.name.name.clone(),
            kind,
            default: match h.default {
                Literal::Bool(b) => f64::from(u8::from(b)),
                Literal::Num { value, .. } => value,
            },
            lower: h.lower.map(|b| (b.value, b.inclusive)),
            upper: h.upper.map(|b| (b.value, b.inclusive)),
            doc: h.doc.clone(),
        });
    }
    for (i, s) in spec.states.iter().enumerate() {
        l.bind(&s.name.name, Bind::StateOld(i));
        let fill = match s.init.kind {
            ExprKind::Num(v) => v,
            ExprKind::Unary(UnOp::Neg, ref e) => match e.kind {
                ExprKind::Num(v) => -v,
                _ => 0.0,
            },
            _ => 0.0,
        };
        l.states.push(State {
            name: s.name.name.clone(),
            doc: s.doc.clone(),
            fill,
            init_text: print::expr(&s.init),
            reduced: agr_grammar::check::state_axis(s),
            per_tensor: agr_grammar::check::state_form(s) == check::StateForm::PerTensor,
            storage: agr_grammar::check::state_storage(s),
        });
    }
    l.scopes.push(HashMap::new());
    l.block(&spec.step);
    let param_out = l.read("p");
    let mut state_out: Vec<NodeId> = spec.states.iter().map(|s| l.read(&s.name.name)).collect();
    for b in 0..l.mats.len() {
        // The engine writes a block's state; the passes only read it.
        let i = l.mats[b].state;
        let name = l.states[i].name.clone();
        state_out.push(l.leaf(Op::State(i), Ty::Num, Level::Elem, &name));
    }
    // Every step first checks its gradients for NaN and infinities: Σ g·0 is
    // 0 when every value is finite and NaN otherwise (NaN·0 = ∞·0 = NaN). It
    // is a plain sum, so it vectorises, and it shares pass 0 with any other
    // reduction over g.
    let zero = l.num(0.0);
    let g_zero = l.make_raw(Op::Binary(BinaryOp::Mul, g, zero));
    l.reduce(
        ReduceOp::Sum,
        Scope::Global,
        g_zero,
        "finite check of the gradients".into(),
    );
    let finite_check = l
        .reductions
        .iter()
        .position(|r| r.op == ReduceOp::Sum && r.scope == Scope::Global && r.arg == g_zero)
        .expect("just added");
    let mut prog = Program {
        name: spec.name.name.clone(),
        doc: spec.doc.clone(),
        spec_text: print::normalize(spec),
        hypers,
        states: l.states,
        nodes: l.nodes,
        reductions: l.reductions,
        n_phases: 0,
        param_out,
        state_out,
        finite_check,
        mats: l.mats,
    };
    prog.prune();
    prog
}

impl<'a> Lowerer<'a> {
    fn bind(&mut self, name: &str, b: Bind) {
        self.scopes.last_mut().unwrap().insert(name.to_string(), b);
    }

    fn lookup(&self, name: &str) -> Bind {
        self.scopes
            .iter()
            .rev()
            .find_map(|s| s.get(name))
            .cloned()
            .unwrap_or_else(|| panic!("checked spec: `{name}` is bound"))
    }

    fn set(&mut self, name: &str, id: NodeId) {
        for s in self.scopes.iter_mut().rev() {
            if let Some(b) = s.get_mut(name) {
                *b = Bind::Node(id);
                return;
            }
        }
    }

    fn read(&mut self, name: &str) -> NodeId {
        match self.lookup(name) {
            Bind::Node(id) => id,
            Bind::StateOld(i) => self.state_old(i),
            Bind::Reg(_) => unreachable!("checked spec: `{name}` is a matrix, read as a number"),
        }
    }

    /// The value of state `i` before the step, built at its first read.
    fn state_old(&mut self, i: usize) -> NodeId {
        if let Some(id) = self.state_old[i] {
            return id;
        }
        let name = self.spec.states[i].name.name.clone();
        let level = if self.states[i].per_tensor {
            Level::Tensor
        } else {
            Level::Elem
        };
        let stored = self.leaf(Op::State(i), Ty::Num, level, &name);
        // The checker rejects an initial value that reads a state; should one
        // get here anyway, reading the stored buffer ends the recursion.
        self.state_old[i] = Some(stored);
        let init = &self.spec.states[i].init;
        let id = if is_constant(init) {
            // The buffer is created holding the constant.
            stored
        } else {
            let init = self.expr(&init.clone());
            let t = self.read("t");
            let one = self.num(1.0);
            let first = self.make(Op::Binary(BinaryOp::Eq, t, one));
            self.make(Op::Select(first, init, stored))
        };
        self.state_old[i] = Some(id);
        id
    }

    fn leaf(&mut self, op: Op, ty: Ty, level: Level, name: &str) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Node {
            op,
            ty,
            level,
            phase: 0,
            name: name.to_string(),
        });
        self.memo.insert(key(op), id);
        id
    }

    fn num(&mut self, v: f64) -> NodeId {
        self.make(Op::Num(v))
    }

    /// Adds a node, sharing an identical one and folding constants.
    fn make(&mut self, op: Op) -> NodeId {
        if let Some(folded) = self.fold(op) {
            return self.make_raw(folded);
        }
        self.make_raw(op)
    }

    fn make_raw(&mut self, op: Op) -> NodeId {
        if let Some(&id) = self.memo.get(&key(op)) {
            return id;
        }
        let kids = op.children();
        let level = kids
            .iter()
            .map(|&c| self.nodes[c].level)
            .max()
            .unwrap_or(Level::Const);
        let phase = kids.iter().map(|&c| self.nodes[c].phase).max().unwrap_or(0);
        let ty = match op {
            Op::Bool(_) | Op::Unary(UnaryOp::Not, _) => Ty::Bool,
            Op::Binary(o, _, _)
                if !matches!(
                    o,
                    BinaryOp::Add
                        | BinaryOp::Sub
                        | BinaryOp::Mul
                        | BinaryOp::Div
                        | BinaryOp::Pow
                        | BinaryOp::Min
                        | BinaryOp::Max
                ) =>
            {
                Ty::Bool
            }
            Op::Select(_, a, _) => self.nodes[a].ty,
            _ => Ty::Num,
        };
        let id = self.nodes.len();
        self.nodes.push(Node {
            op,
            ty,
            level,
            phase,
            name: String::new(),
        });
        self.memo.insert(key(op), id);
        id
    }

    fn constant(&self, id: NodeId) -> Option<f64> {
        match self.nodes[id].op {
            Op::Num(v) => Some(v),
            _ => None,
        }
    }

    fn boolean(&self, id: NodeId) -> Option<bool> {
        match self.nodes[id].op {
            Op::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Folds an op whose operands are all constants into a constant (in
    /// f64, as the reference evaluation computes constants), and a select
    /// on a constant condition into the chosen side. Every op over
    /// constants folds, so no node above the literals is constant: each
    /// computed node is a step, tensor or element value that some printed
    /// struct or loop holds.
    fn fold(&self, op: Op) -> Option<Op> {
        match op {
            // x ^ 2 is x * x exactly, and far cheaper per element than powf.
            Op::Binary(BinaryOp::Pow, a, b)
                if self.constant(b) == Some(2.0) && self.constant(a).is_none() =>
            {
                Some(Op::Binary(BinaryOp::Mul, a, a))
            }
            Op::Unary(UnaryOp::Not, a) => Some(Op::Bool(!self.boolean(a)?)),
            Op::Unary(o, a) => Some(Op::Num(o.eval_f64(self.constant(a)?)?)),
            Op::Binary(o @ (BinaryOp::And | BinaryOp::Or), a, b) => {
                let (x, y) = (self.boolean(a)?, self.boolean(b)?);
                Some(Op::Bool(if o == BinaryOp::And { x && y } else { x || y }))
            }
            Op::Binary(o, a, b) => {
                let (x, y) = (self.constant(a)?, self.constant(b)?);
                Some(match o.eval_f64(x, y)? {
                    Scalar::Num(v) => Op::Num(v),
                    Scalar::Bool(v) => Op::Bool(v),
                })
            }
            Op::Select(c, a, b) => match self.nodes[c].op {
                Op::Bool(true) => Some(self.nodes[a].op),
                Op::Bool(false) => Some(self.nodes[b].op),
                _ => None,
            },
            _ => None,
        }
    }

    /// `x − x·(|x| / den)`: Ψ(x) as the published code computes it, with a
    /// true f32 division per element. `den` is a per-tensor scalar: Σ|x|
    /// (accumulated in f64, rounded once to f32 where the element loop reads
    /// it), or +∞ where Σ|x| = 0 or Ψ is switched off. With `den = +∞` the
    /// ratio is exactly 0 and Ψ(x) is exactly `x` (so Ψ(0) = 0). Since
    /// f32(Σ|x|) ≥ |x| for every element, the ratio is in [0, 1] under IEEE
    /// rounding: no sign flips, no element grows, and a tensor whose Σ|x| is
    /// one element's |x| (one element, or one non-zero) gives exactly 0 there.
    fn psi(&mut self, x: NodeId, den: NodeId) -> NodeId {
        let ax = self.make(Op::Unary(UnaryOp::Abs, x));
        let ratio = self.make(Op::Binary(BinaryOp::Div, ax, den));
        let share = self.make(Op::Binary(BinaryOp::Mul, x, ratio));
        self.make(Op::Binary(BinaryOp::Sub, x, share))
    }

    /// `(x, den)` when `n` is [`Lowerer::psi`]`(x, den)`.
    fn as_psi(&self, n: NodeId) -> Option<(NodeId, NodeId)> {
        let op = |n: NodeId| self.nodes[n].op;
        let Op::Binary(BinaryOp::Sub, x, share) = op(n) else {
            return None;
        };
        let Op::Binary(BinaryOp::Mul, x2, ratio) = op(share) else {
            return None;
        };
        let Op::Binary(BinaryOp::Div, ax, den) = op(ratio) else {
            return None;
        };
        let is_psi =
            x2 == x && op(ax) == Op::Unary(UnaryOp::Abs, x) && self.nodes[den].level != Level::Elem;
        is_psi.then_some((x, den))
    }

    /// `select(c, a, b)`. A switch around Ψ with a condition that is the
    /// same for the whole tensor (`if use_agr { agr(g) } else { g }`) becomes
    /// Ψ with its denominator switched, `den' = select(c, den, +∞)`: exactly
    /// the same values (Ψ with `den = +∞` is `x − x·0 = x`), and nothing
    /// extra per element.
    fn select(&mut self, c: NodeId, a: NodeId, b: NodeId) -> NodeId {
        if self.nodes[c].level != Level::Elem {
            let off = self.num(f64::INFINITY);
            if let Some((x, den)) = self.as_psi(a).filter(|&(x, _)| x == b) {
                let den = self.make(Op::Select(c, den, off));
                self.name_node(den, "agr_den_if");
                return self.psi(x, den);
            }
            if let Some((x, den)) = self.as_psi(b).filter(|&(x, _)| x == a) {
                let den = self.make(Op::Select(c, off, den));
                self.name_node(den, "agr_den_if");
                return self.psi(x, den);
            }
        }
        self.make(Op::Select(c, a, b))
    }

    fn name_node(&mut self, id: NodeId, name: &str) {
        if self.nodes[id].name.is_empty() {
            self.nodes[id].name = name.to_string();
        }
    }

    fn block(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, s: &Stmt) {
        if self.mat.is_some() {
            return self.mat_stmt(s);
        }
        match s {
            Stmt::Matrix {
                name, value, body, ..
            } => self.matrix(&name.name, value, body),
            Stmt::Repeat { .. } => unreachable!("checked spec: `repeat` is in a matrix block"),
            Stmt::Let { name, value } => {
                let id = self.expr(value);
                self.name_node(id, &name.name);
                self.bind(&name.name, Bind::Node(id));
            }
            Stmt::Assign { target, value } => {
                let id = self.expr(value);
                let k = self.assign_count.entry(target.name.clone()).or_insert(0);
                *k += 1;
                let label = format!("{}_{}", target.name, k);
                self.name_node(id, &label);
                self.set(&target.name, id);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
                ..
            } => {
                let c = self.expr(cond);
                let before = self.scopes.clone();
                self.scoped(then);
                let after_then = std::mem::replace(&mut self.scopes, before.clone());
                self.scoped(otherwise);
                let after_else = std::mem::replace(&mut self.scopes, before.clone());
                for (depth, scope) in before.iter().enumerate() {
                    let mut names: Vec<&String> = scope.keys().collect();
                    names.sort();
                    for name in names {
                        let a = &after_then[depth][name];
                        let b = &after_else[depth][name];
                        let changed = |x: &Bind| {
                            !matches!((x, &scope[name]), (Bind::Node(p), Bind::Node(q)) if p == q)
                                && !matches!(
                                    (x, &scope[name]),
                                    (Bind::StateOld(_), Bind::StateOld(_))
                                )
                        };
                        if !changed(a) && !changed(b) {
                            continue;
                        }
                        let va = self.resolve(a);
                        let vb = self.resolve(b);
                        let id = self.make(Op::Select(c, va, vb));
                        self.scopes[depth].insert(name.clone(), Bind::Node(id));
                    }
                }
            }
        }
    }

    fn resolve(&mut self, b: &Bind) -> NodeId {
        match *b {
            Bind::Node(id) => id,
            Bind::StateOld(i) => self.state_old(i),
            Bind::Reg(_) => unreachable!("checked spec: matrices stay in their block"),
        }
    }

    fn expr(&mut self, e: &ast::Expr) -> NodeId {
        match &e.kind {
            ExprKind::Num(v) => self.num(*v),
            ExprKind::Bool(b) => self.make(Op::Bool(*b)),
            ExprKind::Name(n) => self.read(n),
            ExprKind::Unary(op, a) => {
                let a = self.expr(a);
                let op = match op {
                    UnOp::Neg => UnaryOp::Neg,
                    UnOp::Not => UnaryOp::Not,
                };
                self.make(Op::Unary(op, a))
            }
            ExprKind::Binary(op, a, b) => {
                let a = self.expr(a);
                let b = self.expr(b);
                let op = match op {
                    BinOp::Add => BinaryOp::Add,
                    BinOp::Sub => BinaryOp::Sub,
                    BinOp::Mul => BinaryOp::Mul,
                    BinOp::Div => BinaryOp::Div,
                    BinOp::Pow => BinaryOp::Pow,
                    BinOp::Lt => BinaryOp::Lt,
                    BinOp::Le => BinaryOp::Le,
                    BinOp::Gt => BinaryOp::Gt,
                    BinOp::Ge => BinaryOp::Ge,
                    BinOp::Eq => BinaryOp::Eq,
                    BinOp::Ne => BinaryOp::Ne,
                    BinOp::And => BinaryOp::And,
                    BinOp::Or => BinaryOp::Or,
                    BinOp::MatMul => unreachable!("checked spec: `@` is in a matrix block"),
                };
                self.make(Op::Binary(op, a, b))
            }
            ExprKind::If(c, a, b) => {
                let c = self.expr(c);
                let a = self.expr(a);
                let b = self.expr(b);
                self.select(c, a, b)
            }
            ExprKind::Call { func, args } => {
                let origin = print::expr(e);
                let a: Vec<NodeId> = args.iter().map(|x| self.expr(x)).collect();
                self.call(&func.name, &a, origin)
            }
        }
    }

    fn reduce(&mut self, op: ReduceOp, scope: Scope, arg: NodeId, origin: String) -> NodeId {
        let pass = self.nodes[arg].phase;
        let existing = self
            .reductions
            .iter()
            .position(|r| r.op == op && r.scope == scope && r.arg == arg);
        let r = existing.unwrap_or_else(|| {
            self.reductions.push(Reduction {
                op,
                scope,
                arg,
                pass,
                origin,
            });
            self.reductions.len() - 1
        });
        let level = match scope {
            Scope::Tensor => Level::Tensor,
            Scope::Global => Level::Step,
            Scope::Rows | Scope::Dim(_) => Level::Elem,
        };
        let id = self.make_raw(Op::Reduced(r));
        self.nodes[id].level = level;
        self.nodes[id].phase = pass + 1;
        id
    }

    fn row_len(&mut self) -> NodeId {
        match self.memo.get(&key(Op::RowLen)) {
            Some(&id) => id,
            None => self.leaf(Op::RowLen, Ty::Num, Level::Tensor, "row_len"),
        }
    }

    fn dim_len(&mut self, axis: Axis) -> NodeId {
        match self.memo.get(&key(Op::DimLen(axis))) {
            Some(&id) => id,
            None => {
                let name = match axis {
                    Axis::Last => "last_len",
                    Axis::SecondLast => "second_last_len",
                };
                self.leaf(Op::DimLen(axis), Ty::Num, Level::Tensor, name)
            }
        }
    }

    fn call(&mut self, f: &str, a: &[NodeId], origin: String) -> NodeId {
        use BinaryOp as B;
        let un = |s: &mut Self, o, x| s.make(Op::Unary(o, x));
        let bin = |s: &mut Self, o, x, y| s.make(Op::Binary(o, x, y));
        match f {
            "sqrt" => un(self, UnaryOp::Sqrt, a[0]),
            "abs" => un(self, UnaryOp::Abs, a[0]),
            "sign" => un(self, UnaryOp::Sign, a[0]),
            "exp" => un(self, UnaryOp::Exp, a[0]),
            "ln" => un(self, UnaryOp::Ln, a[0]),
            "pow" => bin(self, B::Pow, a[0], a[1]),
            "min" => bin(self, B::Min, a[0], a[1]),
            "max" => bin(self, B::Max, a[0], a[1]),
            "clamp" => {
                let lo = bin(self, B::Max, a[0], a[1]);
                bin(self, B::Min, lo, a[2])
            }
            "select" => self.select(a[0], a[1], a[2]),
            "lerp" => {
                // As torch.lerp: a + w·(b − a) where |w| < 0.5, else
                // b − (b − a)·(1 − w).
                let (x, y, wt) = (a[0], a[1], a[2]);
                let d = bin(self, B::Sub, y, x);
                let aw = un(self, UnaryOp::Abs, wt);
                let half = self.num(0.5);
                let small = bin(self, B::Lt, aw, half);
                let wd = bin(self, B::Mul, wt, d);
                let near_a = bin(self, B::Add, x, wd);
                let one = self.num(1.0);
                let rest = bin(self, B::Sub, one, wt);
                let dr = bin(self, B::Mul, d, rest);
                let near_b = bin(self, B::Sub, y, dr);
                self.select(small, near_a, near_b)
            }
            "sum" | "mean" if a.len() == 2 => {
                let axis = match self.nodes[a[1]].op {
                    Op::Num(d) => Axis::from_dim(d),
                    _ => None,
                }
                .expect("checked spec: the dimension is -1 or -2");
                let s = self.reduce(ReduceOp::Sum, Scope::Dim(axis), a[0], origin);
                if f == "sum" {
                    s
                } else {
                    let n = self.dim_len(axis);
                    bin(self, B::Div, s, n)
                }
            }
            "sum" => self.reduce(ReduceOp::Sum, Scope::Tensor, a[0], origin),
            "mean" => {
                let s = self.reduce(ReduceOp::Sum, Scope::Tensor, a[0], origin);
                let n = self.read("numel");
                bin(self, B::Div, s, n)
            }
            "norm" | "global_norm" => {
                let scope = if f == "norm" {
                    Scope::Tensor
                } else {
                    Scope::Global
                };
                let sq = bin(self, B::Mul, a[0], a[0]);
                let s = self.reduce(ReduceOp::Sum, scope, sq, origin);
                un(self, UnaryOp::Sqrt, s)
            }
            "global_sum" => self.reduce(ReduceOp::Sum, Scope::Global, a[0], origin),
            "row_sum" => self.reduce(ReduceOp::Sum, Scope::Rows, a[0], origin),
            "row_mean" => {
                let s = self.reduce(ReduceOp::Sum, Scope::Rows, a[0], origin);
                let n = self.row_len();
                bin(self, B::Div, s, n)
            }
            "max_abs" | "global_max_abs" => {
                let scope = if f == "max_abs" {
                    Scope::Tensor
                } else {
                    Scope::Global
                };
                let x = un(self, UnaryOp::Abs, a[0]);
                self.reduce(ReduceOp::Max, scope, x, origin)
            }
            "agr" => {
                // Ψ(x) = x − x·(|x| / Σ|x|), as the published code: Σ|x| in
                // f64 over the tensor, rounded once to f32; the ratio a true
                // f32 division (see `psi`); Ψ(0) = 0 through den = +∞.
                let x = a[0];
                let ax = un(self, UnaryOp::Abs, x);
                let s = self.reduce(
                    ReduceOp::Sum,
                    Scope::Tensor,
                    ax,
                    format!("sum(abs(..)) for {origin}"),
                );
                let zero = self.num(0.0);
                let off = self.num(f64::INFINITY);
                let pos = bin(self, B::Gt, s, zero);
                let den = self.make(Op::Select(pos, s, off));
                self.name_node(den, "agr_den");
                self.psi(x, den)
            }
            other => unreachable!("checked spec: unknown function `{other}`"),
        }
    }
}

/// Matrix blocks.
impl Lowerer<'_> {
    /// `matrix name = value { body }`: the block's program, its state and
    /// the result per element.
    fn matrix(&mut self, name: &str, value: &ast::Expr, body: &[Stmt]) {
        let input = self.expr(value);
        let b = self.mats.len();
        let state = self.states.len();
        self.states.push(State {
            name: name.to_string(),
            doc: vec![format!(
                "The result of matrix block `{name}` (written by the block every step, read by the passes after it)."
            )],
            fill: 0.0,
            init_text: "0".into(),
            reduced: None,
            per_tensor: false,
            storage: "f32",
        });
        self.mat = Some(MatCtx {
            code: vec![],
            regs: 1,
            args: vec![],
        });
        self.scopes.push(HashMap::new());
        self.bind(name, Bind::Reg(0));
        self.block(body);
        self.scopes.pop();
        let ctx = self.mat.take().expect("set above");
        let mut block = MatBlock {
            name: name.to_string(),
            input,
            phase: 0,
            args: ctx.args,
            code: ctx.code,
            regs: ctx.regs,
            state,
        };
        block.phase = block
            .reads()
            .map(|c| self.nodes[c].phase)
            .max()
            .unwrap_or(0);
        let phase = block.phase;
        self.mats.push(block);
        let id = self.make_raw(Op::MatOut(b));
        self.nodes[id].level = Level::Elem;
        self.nodes[id].phase = phase;
        self.name_node(id, name);
        self.bind(name, Bind::Node(id));
    }

    fn ctx(&mut self) -> &mut MatCtx {
        self.mat.as_mut().expect("in a matrix block")
    }

    fn emit(&mut self, i: MatInst) {
        self.ctx().code.push(i);
    }

    fn fresh(&mut self) -> u16 {
        let c = self.ctx();
        c.regs += 1;
        u16::try_from(c.regs - 1)
            .expect("the checker bounds a matrix block's size (MAX_MATRIX_OPS)")
    }

    /// A scalar node as a program number.
    fn scal(&mut self, id: NodeId) -> Scal {
        match self.nodes[id].op {
            Op::Num(v) => return Scal::Num(v),
            Op::Bool(b) => return Scal::Num(f64::from(u8::from(b))),
            _ => {}
        }
        let c = self.ctx();
        let k = match c.args.iter().position(|&a| a == id) {
            Some(k) => k,
            None => {
                c.args.push(id);
                c.args.len() - 1
            }
        };
        Scal::Arg(
            u16::try_from(k).expect("the checker bounds a matrix block's size (MAX_MATRIX_OPS)"),
        )
    }

    fn mat_stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Let { name, value } => {
                if self.is_matrix(value) {
                    let r = self.mexpr_reg(value);
                    self.bind(&name.name, Bind::Reg(r));
                } else {
                    let id = self.expr(value);
                    self.name_node(id, &name.name);
                    self.bind(&name.name, Bind::Node(id));
                }
            }
            Stmt::Assign { target, value } => {
                let Bind::Reg(dst) = self.lookup(&target.name) else {
                    unreachable!("checked spec: a matrix block assigns matrices")
                };
                self.assign_reg(dst, value);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
                ..
            } => {
                let c = self.expr(cond);
                if let Some(b) = self.boolean(c) {
                    return self.scoped(if b { then } else { otherwise });
                }
                let cond = self.scal(c);
                self.mat_if(cond, |l| l.scoped(then), |l| l.scoped(otherwise));
            }
            Stmt::Repeat { count, body, .. } => {
                let n = self.expr(count);
                let count = self.scal(n);
                let at = self.ctx().code.len();
                self.emit(MatInst::Repeat { count, len: 0 });
                self.scoped(body);
                let end = self.ctx().code.len();
                self.ctx().code[at] = MatInst::Repeat {
                    count,
                    len: len16(end - at - 1),
                };
            }
            Stmt::Matrix { .. } => unreachable!("checked spec: matrix blocks do not nest"),
        }
    }

    /// A branch of the program: the `If` instruction, then the bodies
    /// `then` and `otherwise` emit.
    fn mat_if(
        &mut self,
        cond: Scal,
        then: impl FnOnce(&mut Self),
        otherwise: impl FnOnce(&mut Self),
    ) {
        let at = self.ctx().code.len();
        self.emit(MatInst::If {
            cond,
            then_len: 0,
            else_len: 0,
        });
        then(self);
        let mid = self.ctx().code.len();
        otherwise(self);
        let end = self.ctx().code.len();
        self.ctx().code[at] = MatInst::If {
            cond,
            then_len: len16(mid - at - 1),
            else_len: len16(end - mid),
        };
    }

    /// `r[dst] = e`: the value into a new register, then moved.
    fn assign_reg(&mut self, dst: u16, e: &ast::Expr) {
        let src = self.mexpr_reg(e);
        self.emit(MatInst::Move { dst, src });
    }

    /// `stmts` in a scope of their own.
    fn scoped(&mut self, stmts: &[Stmt]) {
        self.scopes.push(HashMap::new());
        self.block(stmts);
        self.scopes.pop();
    }

    /// Whether an expression of a (checked) matrix block is a matrix.
    fn is_matrix(&self, e: &ast::Expr) -> bool {
        match &e.kind {
            ExprKind::Name(n) => matches!(self.lookup(n), Bind::Reg(_)),
            ExprKind::Unary(_, a) => self.is_matrix(a),
            ExprKind::Binary(op, a, b) => {
                *op == BinOp::MatMul || self.is_matrix(a) || self.is_matrix(b)
            }
            ExprKind::If(_, a, _) => self.is_matrix(a),
            ExprKind::Call { func, .. } => func.name == "transpose",
            _ => false,
        }
    }

    /// A matrix expression's value in a register of its own (for `let`).
    fn mexpr_reg(&mut self, e: &ast::Expr) -> u16 {
        let t = self.mexpr(e);
        self.materialise(&t)
    }

    /// A matrix expression as terms.
    fn mexpr(&mut self, e: &ast::Expr) -> Terms {
        let one = self.num(1.0);
        match &e.kind {
            ExprKind::Name(n) => {
                let Bind::Reg(r) = self.lookup(n) else {
                    unreachable!("checked spec: `{n}` is a matrix")
                };
                vec![(one, Term::One(Mat { reg: r, t: false }))]
            }
            ExprKind::Unary(_, a) => {
                let t = self.mexpr(a);
                self.scale(t, None, true)
            }
            ExprKind::Call { args, .. } => {
                // transpose
                let t = self.mexpr(&args[0]);
                let m = self.operand(&t);
                vec![(
                    one,
                    Term::One(Mat {
                        reg: m.reg,
                        t: !m.t,
                    }),
                )]
            }
            ExprKind::If(c, a, b) => {
                let c = self.expr(c);
                if let Some(v) = self.boolean(c) {
                    return self.mexpr(if v { a } else { b });
                }
                let cond = self.scal(c);
                let dst = self.fresh();
                self.mat_if(cond, |l| l.assign_reg(dst, a), |l| l.assign_reg(dst, b));
                vec![(one, Term::One(Mat { reg: dst, t: false }))]
            }
            ExprKind::Binary(op, a, b) => match op {
                BinOp::Add | BinOp::Sub => {
                    let mut ta = self.mexpr(a);
                    let tb = self.mexpr(b);
                    let tb = if *op == BinOp::Sub {
                        self.scale(tb, None, true)
                    } else {
                        tb
                    };
                    ta.extend(tb);
                    ta
                }
                BinOp::Mul | BinOp::Div => {
                    let (m, s) = if self.is_matrix(a) { (a, b) } else { (b, a) };
                    let t = self.mexpr(m);
                    let s = self.expr(s);
                    let s = if *op == BinOp::Div {
                        self.make(Op::Binary(BinaryOp::Div, one, s))
                    } else {
                        s
                    };
                    self.scale(t, Some(s), false)
                }
                BinOp::MatMul => {
                    let ta = self.mexpr(a);
                    let tb = self.mexpr(b);
                    let (ca, ma) = self.factor(&ta);
                    let (cb, mb) = self.factor(&tb);
                    let c = self.make(Op::Binary(BinaryOp::Mul, ca, cb));
                    vec![(c, Term::Prod(ma, mb))]
                }
                _ => unreachable!("checked spec: `{}` is not a matrix operator", op.symbol()),
            },
            _ => unreachable!("checked spec: a matrix expression"),
        }
    }

    /// Every coefficient times `s` (and negated where `neg`).
    fn scale(&mut self, t: Terms, s: Option<NodeId>, neg: bool) -> Terms {
        t.into_iter()
            .map(|(c, term)| {
                let mut c = c;
                if let Some(s) = s {
                    c = self.make(Op::Binary(BinaryOp::Mul, s, c));
                }
                if neg {
                    c = self.make(Op::Unary(UnaryOp::Neg, c));
                }
                (c, term)
            })
            .collect()
    }

    /// `(coefficient, matrix)` with `terms == coefficient * matrix`: one
    /// plain term as it is, anything else computed into a register.
    fn factor(&mut self, t: &Terms) -> (NodeId, Mat) {
        if let [(c, Term::One(m))] = t.as_slice() {
            return (*c, *m);
        }
        let one = self.num(1.0);
        (one, self.operand(t))
    }

    /// The terms as one operand (coefficient 1).
    fn operand(&mut self, t: &Terms) -> Mat {
        if let [(c, Term::One(m))] = t.as_slice() {
            if self.constant(*c) == Some(1.0) {
                return *m;
            }
        }
        let r = self.materialise(t);
        Mat { reg: r, t: false }
    }

    /// Computes the terms into a new register: a product with the first
    /// plain term folded into one GEMM (`alpha * a @ b + beta * c`, as
    /// torch's `addmm`), then the rest accumulated.
    fn materialise(&mut self, t: &Terms) -> u16 {
        let dst = self.fresh();
        let prods: Vec<(NodeId, Mat, Mat)> = t
            .iter()
            .filter_map(|&(c, term)| match term {
                Term::Prod(a, b) => Some((c, a, b)),
                Term::One(_) => None,
            })
            .collect();
        let ones: Vec<(NodeId, Mat)> = t
            .iter()
            .filter_map(|&(c, term)| match term {
                Term::One(m) => Some((c, m)),
                Term::Prod(..) => None,
            })
            .collect();
        let mut ones = ones.into_iter();
        let acc = Mat { reg: dst, t: false };
        let one = Scal::Num(1.0);
        if let Some((i, &(c, a, b))) = prods.iter().enumerate().next() {
            let alpha = self.scal(c);
            let first = ones.next().map(|(c, m)| (m, c));
            let first = first.map(|(m, c)| (m, self.scal(c)));
            self.emit(MatInst::Gemm {
                dst,
                a,
                b,
                alpha,
                c: first,
            });
            for &(c, a, b) in &prods[i + 1..] {
                let alpha = self.scal(c);
                self.emit(MatInst::Gemm {
                    dst,
                    a,
                    b,
                    alpha,
                    c: Some((acc, one)),
                });
            }
        } else {
            let (c, a) = ones.next().expect("a matrix expression has a term");
            let alpha = self.scal(c);
            let b = ones.next().map(|(c, m)| (m, c));
            let b = b.map(|(m, c)| (m, self.scal(c)));
            self.emit(MatInst::Axpby { dst, a, alpha, b });
        }
        for (c, m) in ones {
            let beta = self.scal(c);
            self.emit(MatInst::Axpby {
                dst,
                a: acc,
                alpha: one,
                b: Some((m, beta)),
            });
        }
        dst
    }
}

fn len16(n: usize) -> u16 {
    u16::try_from(n).expect("the checker bounds a matrix block's size (MAX_MATRIX_OPS)")
}

fn is_constant(e: &ast::Expr) -> bool {
    match &e.kind {
        ExprKind::Num(_) => true,
        ExprKind::Unary(UnOp::Neg, a) => matches!(a.kind, ExprKind::Num(_)),
        _ => false,
    }
}

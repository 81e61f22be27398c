//! Stage 3: the IR every back end prints.
//!
//! A step is a pure dataflow graph in SSA form over the step's inputs
//! (`p`, `g`, the old state, hyperparameters, `t`, tensor metadata) and the
//! results of reductions. Each node carries its *level* (how often it
//! changes), so printers hoist everything that is not per-element out of
//! the element loop, and its *phase* (how many reduction passes must finish
//! before it is known). The step runs as `n_phases` reduction passes and one
//! update pass; a reduction scheduled in pass `k` reads nodes of phase `<= k`.

pub use agr_grammar::ast::Axis;
pub use agr_grammar::check::{Level, Ty};

pub type NodeId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Not,
    Sqrt,
    Abs,
    /// -1, 0 or 1; sign(0) = 0.
    Sign,
    Exp,
    Ln,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Min,
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinaryOp {
    /// The operator as written in Rust, CUDA C and the spec, for infix ops.
    pub fn infix(self) -> Option<&'static str> {
        Some(match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::And => "&&",
            BinaryOp::Or => "||",
            BinaryOp::Pow | BinaryOp::Min | BinaryOp::Max => return None,
        })
    }
}

/// A step- or tensor-level value: how constants fold and how the reference
/// evaluation computes scalars (in f64).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    Num(f64),
    Bool(bool),
}

impl UnaryOp {
    /// The op on a number in f64; `None` for `Not` (a boolean op).
    pub fn eval_f64(self, x: f64) -> Option<f64> {
        Some(match self {
            UnaryOp::Neg => -x,
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sign => {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    x * 0.0
                }
            }
            UnaryOp::Exp => x.exp(),
            UnaryOp::Ln => x.ln(),
            UnaryOp::Not => return None,
        })
    }
}

impl BinaryOp {
    /// The op on two numbers in f64; `None` for `&&` and `||` (boolean ops).
    pub fn eval_f64(self, x: f64, y: f64) -> Option<Scalar> {
        Some(match self {
            BinaryOp::Add => Scalar::Num(x + y),
            BinaryOp::Sub => Scalar::Num(x - y),
            BinaryOp::Mul => Scalar::Num(x * y),
            BinaryOp::Div => Scalar::Num(x / y),
            BinaryOp::Pow => Scalar::Num(x.powf(y)),
            BinaryOp::Min => Scalar::Num(x.min(y)),
            BinaryOp::Max => Scalar::Num(x.max(y)),
            BinaryOp::Lt => Scalar::Bool(x < y),
            BinaryOp::Le => Scalar::Bool(x <= y),
            BinaryOp::Gt => Scalar::Bool(x > y),
            BinaryOp::Ge => Scalar::Bool(x >= y),
            BinaryOp::Eq => Scalar::Bool(x == y),
            BinaryOp::Ne => Scalar::Bool(x != y),
            BinaryOp::And | BinaryOp::Or => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Num(f64),
    Bool(bool),
    /// A hyperparameter, by index into [`Program::hypers`].
    Hyper(usize),
    /// This tensor's step count (1 on its first step).
    T,
    Ndim,
    Numel,
    /// Elements per row (see [`Scope::Rows`]).
    RowLen,
    /// The length of one of the last two dimensions (see [`Scope::Dim`]).
    DimLen(Axis),
    /// The parameter's value before the step.
    Param,
    Grad,
    /// A state buffer's value before the step, by index.
    State(usize),
    /// The result of a reduction, by index into [`Program::reductions`].
    Reduced(usize),
    Unary(UnaryOp, NodeId),
    Binary(BinaryOp, NodeId, NodeId),
    /// `cond ? a : b`; both sides are pure, so either may be evaluated.
    Select(NodeId, NodeId, NodeId),
    /// The result of matrix block `b` (see [`MatBlock`]), per element.
    MatOut(usize),
}

impl Op {
    pub fn children(&self) -> Vec<NodeId> {
        match *self {
            Op::Unary(_, a) => vec![a],
            Op::Binary(_, a, b) => vec![a, b],
            Op::Select(c, a, b) => vec![c, a, b],
            _ => vec![],
        }
    }

    fn map_children(self, f: impl Fn(NodeId) -> NodeId) -> Op {
        match self {
            Op::Unary(o, a) => Op::Unary(o, f(a)),
            Op::Binary(o, a, b) => Op::Binary(o, f(a), f(b)),
            Op::Select(c, a, b) => Op::Select(f(c), f(a), f(b)),
            other => other,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: Ty,
    pub level: Level,
    /// Reduction passes that must run before this value is known.
    pub phase: usize,
    /// A readable name for printers (unique within the program).
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Σ x, accumulated in f64.
    Sum,
    /// max x.
    Max,
}

/// Which elements one reduction result covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One result per tensor.
    Tensor,
    /// One result per step, over every parameter that has a gradient.
    Global,
    /// One result per row: over every dimension but the first (a tensor of
    /// fewer than two dimensions is one row). Read back per element.
    Rows,
    /// Over one of the last two dimensions of the tensor viewed as
    /// `[.., rows, cols]` (fewer than two dimensions: `[1, numel]`): one
    /// result per row (`Last`) or per column (`SecondLast`) of each matrix.
    /// Read back per element.
    Dim(Axis),
}

/// A tensor viewed as matrices over its last two dimensions,
/// `[.., rows, cols]` (fewer than two dimensions: one row, `[1, numel]`):
/// what [`Scope::Dim`] reduces over and a reduced state is indexed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub rows: usize,
    pub cols: usize,
}

impl View {
    pub fn of(shape: &[usize]) -> View {
        let n = shape.len();
        View {
            rows: if n >= 2 { shape[n - 2] } else { 1 },
            cols: if n >= 1 { shape[n - 1] } else { 1 },
        }
    }

    /// The length of dimension `axis`.
    pub fn len(self, axis: Axis) -> usize {
        match axis {
            Axis::Last => self.cols,
            Axis::SecondLast => self.rows,
        }
    }

    /// How many results a reduction over `axis` has for `numel` elements
    /// (one per row or per column of each matrix): the size of a state
    /// reduced over `axis`.
    pub fn count(self, axis: Axis, numel: usize) -> usize {
        numel.checked_div(self.len(axis)).unwrap_or(0)
    }

    /// Which of those results element `i` reads.
    pub fn index(self, axis: Axis, i: usize) -> usize {
        match axis {
            Axis::Last => i / self.cols,
            Axis::SecondLast => (i / (self.rows * self.cols)) * self.cols + i % self.cols,
        }
    }

    /// Whether element `i` is the last of its row (`Last`) or column
    /// (`SecondLast`): the one that writes a reduced state.
    pub fn closes(self, axis: Axis, i: usize) -> bool {
        match axis {
            Axis::Last => i % self.cols == self.cols - 1,
            Axis::SecondLast => (i / self.cols) % self.rows == self.rows - 1,
        }
    }
}

/// The shape of a state's buffer for a parameter of `shape`: the parameter's
/// own; with `reduced`, the reduced dimension kept as 1 (torch's `keepdim`);
/// per tensor, a scalar.
pub fn state_shape(reduced: Option<Axis>, per_tensor: bool, shape: &[usize]) -> Vec<usize> {
    if per_tensor {
        return vec![];
    }
    let mut s = shape.to_vec();
    let n = s.len();
    match reduced {
        Some(Axis::Last) if n >= 1 => s[n - 1] = 1,
        Some(Axis::SecondLast) if n >= 2 => s[n - 2] = 1,
        _ => {}
    }
    s
}

impl Scope {
    /// Whether its results are read per element (from the row buffer).
    pub fn per_element(self) -> bool {
        matches!(self, Scope::Rows | Scope::Dim(_))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reduction {
    pub op: ReduceOp,
    pub scope: Scope,
    /// The per-element value reduced.
    pub arg: NodeId,
    /// The pass that computes it (`0..n_phases`).
    pub pass: usize,
    /// What the spec wrote, for comments and errors (e.g. `agr(g)`).
    pub origin: String,
}

/// A matrix operand: register `reg`, transposed where `t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mat {
    pub reg: u16,
    pub t: bool,
}

/// A number in a matrix program: a constant, or the block's argument `k`
/// (a step or tensor scalar, see [`MatBlock::args`]; bools as 0 or 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scal {
    Num(f64),
    Arg(u16),
}

/// One instruction of a matrix block's program. Registers hold one matrix
/// each, of any shape; register 0 is the block's matrix (its value viewed
/// as rows × cols on entry, the result on exit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MatInst {
    /// `r[dst] = alpha * a @ b + beta * c` (without `c`: `alpha * a @ b`);
    /// `dst` is neither `a` nor `b` (it may be `c`).
    Gemm {
        dst: u16,
        a: Mat,
        b: Mat,
        alpha: Scal,
        c: Option<(Mat, Scal)>,
    },
    /// `r[dst] = alpha * a + beta * b` (without `b`: `alpha * a`); `dst` is
    /// not a transposed operand.
    Axpby {
        dst: u16,
        a: Mat,
        alpha: Scal,
        b: Option<(Mat, Scal)>,
    },
    /// `r[dst]` takes the value of `r[src]`, a temporary no longer read.
    Move { dst: u16, src: u16 },
    /// The next `len` instructions, `count` times (a whole number ≥ 0).
    Repeat { count: Scal, len: u16 },
    /// Where `cond` is not 0 the next `then_len` instructions, else the
    /// `else_len` after them.
    If {
        cond: Scal,
        then_len: u16,
        else_len: u16,
    },
}

/// `matrix x = value { ... }`: per tensor, `value` (per element) viewed as
/// a rows × cols matrix, transformed by `code`; `Op::MatOut` reads the
/// result per element. The engine runs it after the scalars of `phase` are
/// known and before pass `phase` (the update pass when `phase == n_phases`),
/// so every pass from `phase` on can read it.
#[derive(Clone, Debug, PartialEq)]
pub struct MatBlock {
    /// The spec's name for the result.
    pub name: String,
    /// The value the block starts from (per element).
    pub input: NodeId,
    pub phase: usize,
    /// Scalars the program reads ([`Scal::Arg`]): step or tensor nodes of
    /// phase `<= phase`.
    pub args: Vec<NodeId>,
    pub code: Vec<MatInst>,
    /// Registers the program uses (register 0 is the block's matrix).
    pub regs: usize,
    /// The state buffer that holds the matrix between the block and the
    /// passes that read it (a state the spec does not declare, named after
    /// the block; it holds the last step's result between steps).
    pub state: usize,
}

impl MatBlock {
    /// The nodes it reads: its value and its arguments (its phase is the
    /// latest of theirs).
    pub fn reads(&self) -> impl Iterator<Item = NodeId> + '_ {
        std::iter::once(self.input).chain(self.args.iter().copied())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HyperKind {
    Float,
    Int,
    Bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hyper {
    pub name: String,
    pub kind: HyperKind,
    /// The default (bools as 0/1).
    pub default: f64,
    /// `(value, inclusive)`.
    pub lower: Option<(f64, bool)>,
    pub upper: Option<(f64, bool)>,
    pub doc: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub name: String,
    pub doc: Vec<String>,
    /// The buffer's contents when it is created: the constant initial value,
    /// or 0 where the initial value is an expression (which the step selects
    /// on the tensor's first step).
    pub fill: f64,
    /// The initial value as the spec wrote it.
    pub init_text: String,
    /// `reduced(-1)` or `reduced(-2)`: one value per row or per column of the
    /// last two dimensions instead of one per element.
    pub reduced: Option<Axis>,
    /// `per_tensor`: one value per tensor, read and computed at the tensor
    /// level (see [`Program::per_tensor_states`]).
    pub per_tensor: bool,
    /// How the buffer is stored (`m: bf16 = 0`): one of
    /// `agr_grammar::check::STORAGE_WORDS`; `f32` unless declared.
    pub storage: &'static str,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub name: String,
    pub doc: Vec<String>,
    /// The normalised spec text.
    pub spec_text: String,
    pub hypers: Vec<Hyper>,
    pub states: Vec<State>,
    /// Topologically ordered: children come before parents.
    pub nodes: Vec<Node>,
    pub reductions: Vec<Reduction>,
    /// Number of reduction passes before the update pass.
    pub n_phases: usize,
    /// The parameter's new value.
    pub param_out: NodeId,
    /// Each state's new value (equal to its `Op::State` node when unchanged).
    pub state_out: Vec<NodeId>,
    /// The reduction `global_sum(g * 0)` (in pass 0): NaN exactly when some
    /// gradient holds a NaN or an infinity, found before anything is written.
    pub finite_check: usize,
    /// Matrix blocks, in spec order.
    pub mats: Vec<MatBlock>,
}

impl Program {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Reductions computed in pass `k`.
    pub fn reductions_in(&self, k: usize) -> impl Iterator<Item = (usize, &Reduction)> {
        self.reductions
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.pass == k)
    }

    /// The nodes (in order) that `roots` need, stopping at nodes for which
    /// `stop` holds (they are included but not descended into).
    pub fn needed(&self, roots: &[NodeId], stop: impl Fn(&Node) -> bool) -> Vec<NodeId> {
        let mut mark = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = roots.to_vec();
        while let Some(n) = stack.pop() {
            if mark[n] {
                continue;
            }
            mark[n] = true;
            if !stop(&self.nodes[n]) {
                stack.extend(self.nodes[n].op.children());
            }
        }
        (0..self.nodes.len()).filter(|&i| mark[i]).collect()
    }

    /// Index of reduction `r` among the reductions of its scope (its slot in
    /// a row's or column's results), if its results are per element.
    pub fn row_slot(&self, r: usize) -> Option<usize> {
        let scope = self.reductions[r].scope;
        if !scope.per_element() {
            return None;
        }
        Some(
            self.reductions[..r]
                .iter()
                .filter(|x| x.scope == scope)
                .count(),
        )
    }

    /// Number of row reductions.
    pub fn row_reductions(&self) -> usize {
        self.scope_reductions(Scope::Rows)
    }

    /// Number of reductions of `scope`.
    pub fn scope_reductions(&self, scope: Scope) -> usize {
        self.reductions.iter().filter(|x| x.scope == scope).count()
    }

    /// Whether the step reduces over, or keeps state along, one of the last
    /// two dimensions: then a tensor is stepped whole (its rows and columns
    /// in one work item on the CPU, in one block on a CUDA device).
    pub fn factored(&self) -> bool {
        self.reductions
            .iter()
            .any(|r| matches!(r.scope, Scope::Dim(_)))
            || self.states.iter().any(|s| s.reduced.is_some())
    }

    /// Whether every number matrix block `b`'s program reads (its loop
    /// counts, conditions and coefficients) is known on the host before the
    /// step: made of constants, hyperparameters and the tensor's shape only.
    /// On a CUDA device the host drives the block's products (cuBLAS), so
    /// it must know them without reading the device back.
    pub fn mat_args_on_host(&self, b: usize) -> bool {
        self.needed(&self.mats[b].args, |_| false).iter().all(|&i| {
            matches!(
                self.nodes[i].op,
                Op::Num(_)
                    | Op::Bool(_)
                    | Op::Hyper(_)
                    | Op::Ndim
                    | Op::Numel
                    | Op::RowLen
                    | Op::Unary(..)
                    | Op::Binary(..)
                    | Op::Select(..)
            )
        })
    }

    /// What keeps the step on the CPU, in words; `None` where it has
    /// kernels. Two things do: a matrix block whose numbers depend on the
    /// step (see [`Program::mat_args_on_host`]), and a reduced state whose
    /// new value reads, per element, the parameter or a state the update
    /// writes (the CUDA update writes reduced states after the rest, so it
    /// would read their new values).
    pub fn cpu_only(&self) -> Option<String> {
        if let Some(b) = (0..self.mats.len()).find(|&b| !self.mat_args_on_host(b)) {
            return Some(format!(
                "a matrix block (`{}`) whose loop counts, conditions or coefficients depend on `t` or on a reduction",
                self.mats[b].name
            ));
        }
        let written_per_element = |op: Op| match op {
            Op::Param => true,
            Op::State(k) => {
                self.states[k].reduced.is_none()
                    && !self.states[k].per_tensor
                    && self.state_written(k)
            }
            _ => false,
        };
        for (i, s) in self.states.iter().enumerate() {
            if s.reduced.is_none() || !self.state_written(i) {
                continue;
            }
            let reads = self.needed(&[self.state_out[i]], |n| n.level != Level::Elem);
            if let Some(&r) = reads
                .iter()
                .find(|&&r| written_per_element(self.nodes[r].op))
            {
                return Some(format!(
                    "a reduced state (`{}`) whose new value reads `{}` per element",
                    s.name, self.nodes[r].name
                ));
            }
        }
        None
    }

    /// The per-tensor states (by index): the engine hands each one's value
    /// to the tensor's scalars before the step (`TensorMeta::state`) and
    /// stores its new value, a tensor-level node, after the update.
    pub fn per_tensor_states(&self) -> Vec<usize> {
        (0..self.states.len())
            .filter(|&i| self.states[i].per_tensor)
            .collect()
    }

    /// Whether the state's value changes in a step.
    pub fn state_written(&self, i: usize) -> bool {
        self.nodes[self.state_out[i]].op != Op::State(i)
    }

    /// Whether the parameter changes in a step.
    pub fn param_written(&self) -> bool {
        self.nodes[self.param_out].op != Op::Param
    }

    /// Removes nodes and reductions that no output depends on, renumbering
    /// the rest (order preserved).
    pub fn prune(&mut self) {
        let mut live = vec![false; self.nodes.len()];
        let mut live_red = vec![false; self.reductions.len()];
        let mut stack: Vec<NodeId> = vec![self.param_out];
        stack.extend(&self.state_out);
        live_red[self.finite_check] = true;
        stack.push(self.reductions[self.finite_check].arg);
        for b in &self.mats {
            stack.extend(b.reads());
        }
        while let Some(n) = stack.pop() {
            if live[n] {
                continue;
            }
            live[n] = true;
            if let Op::Reduced(r) = self.nodes[n].op {
                if !live_red[r] {
                    live_red[r] = true;
                    stack.push(self.reductions[r].arg);
                }
            }
            stack.extend(self.nodes[n].op.children());
        }
        let mut red_map = vec![usize::MAX; self.reductions.len()];
        let mut reds = vec![];
        for (i, r) in self.reductions.iter().enumerate() {
            if live_red[i] {
                red_map[i] = reds.len();
                reds.push(r.clone());
            }
        }
        let mut map = vec![usize::MAX; self.nodes.len()];
        let mut nodes = vec![];
        for (i, n) in self.nodes.iter().enumerate() {
            if live[i] {
                map[i] = nodes.len();
                let mut n = n.clone();
                n.op = n.op.map_children(|c| map[c]);
                if let Op::Reduced(r) = n.op {
                    n.op = Op::Reduced(red_map[r]);
                }
                nodes.push(n);
            }
        }
        for r in &mut reds {
            r.arg = map[r.arg];
        }
        for b in &mut self.mats {
            b.input = map[b.input];
            for a in &mut b.args {
                *a = map[*a];
            }
        }
        self.finite_check = red_map[self.finite_check];
        self.nodes = nodes;
        self.reductions = reds;
        self.param_out = map[self.param_out];
        for s in &mut self.state_out {
            *s = map[*s];
        }
        // Passes keep their order; drop passes left empty.
        let mut passes: Vec<usize> = self.reductions.iter().map(|r| r.pass).collect();
        passes.sort();
        passes.dedup();
        for r in &mut self.reductions {
            r.pass = passes.iter().position(|&p| p == r.pass).unwrap();
        }
        for n in &mut self.nodes {
            n.phase = match n.op {
                Op::Reduced(r) => self.reductions[r].pass + 1,
                _ => 0,
            };
        }
        for i in 0..self.nodes.len() {
            if let Op::MatOut(b) = self.nodes[i].op {
                // What it reads comes before it.
                let phase = self.mats[b].reads().map(|c| self.nodes[c].phase).max();
                self.mats[b].phase = phase.unwrap_or(0);
                self.nodes[i].phase = self.mats[b].phase;
            }
            let ph = self.nodes[i]
                .op
                .children()
                .iter()
                .map(|&c| self.nodes[c].phase)
                .max()
                .unwrap_or(0);
            self.nodes[i].phase = self.nodes[i].phase.max(ph);
        }
        self.n_phases = passes.len();
        // Printers hold every computed scalar in the step's or a tensor's
        // struct, by level. Lowering folds every op over constants, so no
        // computed node should be constant; should one be, it is computed
        // once per step like any other, rather than referenced and missing.
        for n in &mut self.nodes {
            if n.level == Level::Const && !matches!(n.op, Op::Num(_) | Op::Bool(_)) {
                n.level = Level::Step;
            }
        }
        self.name_nodes();
    }

    /// Gives every node a unique name: its spec name where it has one (those
    /// are taken first, so they survive unchanged where they can),
    /// `s<id>`/`ts<id>`/`e<id>` (step, tensor, element) otherwise. Printers
    /// never print these names bare: see [`crate::backend::ident`].
    pub fn name_nodes(&mut self) {
        let mut used = std::collections::HashSet::new();
        let mut unique = |base: String| {
            let mut name = base.clone();
            let mut k = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}_v{k}");
                k += 1;
            }
            name
        };
        let mut names = vec![String::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.name.is_empty() {
                names[i] = unique(n.name.clone());
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.name.is_empty() {
                let prefix = match n.level {
                    Level::Const | Level::Step => "s",
                    Level::Tensor => "ts",
                    Level::Elem => "e",
                };
                names[i] = unique(format!("{prefix}{i}"));
            }
        }
        for (n, name) in self.nodes.iter_mut().zip(names) {
            n.name = name;
        }
    }
}

/// A readable listing of the IR: one line per node with its level and
/// phase, then the reductions and the outputs.
pub fn dump(prog: &Program) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "program {} ({} reduction passes)\n",
        prog.name, prog.n_phases
    );
    let name = |i: NodeId| prog.nodes[i].name.clone();
    for (i, n) in prog.nodes.iter().enumerate() {
        let op = match n.op {
            Op::Num(v) => format!("{v:?}"),
            Op::Bool(b) => b.to_string(),
            Op::Hyper(h) => format!("hyper {}", prog.hypers[h].name),
            Op::T => "t".into(),
            Op::Ndim => "ndim".into(),
            Op::Numel => "numel".into(),
            Op::RowLen => "row_len".into(),
            Op::DimLen(a) => format!("dim_len {}", a.dim()),
            Op::Param => "load p".into(),
            Op::Grad => "load g".into(),
            Op::State(s) => format!("load {}", prog.states[s].name),
            Op::Reduced(r) => format!("reduced r{r}"),
            Op::MatOut(b) => format!("matrix m{b}"),
            Op::Unary(o, a) => format!("{o:?} {}", name(a)),
            Op::Binary(o, a, b) => format!("{o:?} {} {}", name(a), name(b)),
            Op::Select(c, a, b) => format!("select {} {} {}", name(c), name(a), name(b)),
        };
        let level = format!("{:?}", n.level).to_lowercase();
        let ty = if n.ty == Ty::Bool { ":bool" } else { "" };
        let _ = writeln!(
            out,
            "  %{i:<3} {:<14} {level:<6} ph{}  = {op}{ty}",
            n.name, n.phase
        );
    }
    for (i, r) in prog.reductions.iter().enumerate() {
        let _ = writeln!(
            out,
            "  r{i}: {:?} over {:?} of {} in pass {}  ({})",
            r.op,
            r.scope,
            name(r.arg),
            r.pass,
            r.origin
        );
    }
    for (i, b) in prog.mats.iter().enumerate() {
        let _ = writeln!(
            out,
            "  m{i}: matrix {} of {} before pass {} in state {}, {} registers, args [{}]",
            b.name,
            name(b.input),
            b.phase,
            prog.states[b.state].name,
            b.regs,
            b.args
                .iter()
                .map(|&a| name(a))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for line in mat_listing(&b.code) {
            let _ = writeln!(out, "    {line}");
        }
    }
    let _ = writeln!(out, "  finite check: r{}", prog.finite_check);
    let _ = writeln!(out, "  out p = {}", name(prog.param_out));
    for (i, s) in prog.states.iter().enumerate() {
        let _ = writeln!(out, "  out {} = {}", s.name, name(prog.state_out[i]));
    }
    out
}

impl Scal {
    /// The number, with the block's arguments `args`.
    pub fn value(self, args: &[f64]) -> f64 {
        match self {
            Scal::Num(v) => v,
            Scal::Arg(k) => args[usize::from(k)],
        }
    }
}

/// One step of a matrix program as it runs: a straight-line instruction
/// (`Gemm`, `Axpby`, `Move`), or a loop or branch with its bodies. The flat
/// encoding of [`MatInst::Repeat`] and [`MatInst::If`] is decoded here only.
#[derive(Clone, Copy, Debug)]
pub enum MatStep<'a> {
    Inst(&'a MatInst),
    Repeat(Scal, &'a [MatInst]),
    If(Scal, &'a [MatInst], &'a [MatInst]),
}

/// The steps of a matrix program (bodies that run past its end are cut there).
pub fn mat_steps(code: &[MatInst]) -> impl Iterator<Item = MatStep<'_>> {
    let mut i = 0;
    std::iter::from_fn(move || {
        let inst = code.get(i)?;
        let at = |k: usize| k.min(code.len());
        Some(match *inst {
            MatInst::Repeat { count, len } => {
                let end = at(i + 1 + usize::from(len));
                let body = &code[i + 1..end];
                i = end;
                MatStep::Repeat(count, body)
            }
            MatInst::If {
                cond,
                then_len,
                else_len,
            } => {
                let mid = at(i + 1 + usize::from(then_len));
                let end = at(mid + usize::from(else_len));
                let (then, otherwise) = (&code[i + 1..mid], &code[mid..end]);
                i = end;
                MatStep::If(cond, then, otherwise)
            }
            _ => {
                i += 1;
                MatStep::Inst(inst)
            }
        })
    })
}

/// A matrix program as text, one instruction per line, loop and branch
/// bodies indented.
pub fn mat_listing(code: &[MatInst]) -> Vec<String> {
    fn m(x: Mat) -> String {
        format!("r{}{}", x.reg, if x.t { "\u{1d40}" } else { "" })
    }
    fn s(x: Scal) -> String {
        match x {
            Scal::Num(v) => agr_grammar::check::fmt_num(v),
            Scal::Arg(k) => format!("arg{k}"),
        }
    }
    fn go(code: &[MatInst], depth: usize, out: &mut Vec<String>) {
        let pad = "  ".repeat(depth);
        for step in mat_steps(code) {
            match step {
                MatStep::Inst(&MatInst::Gemm {
                    dst,
                    a,
                    b,
                    alpha,
                    c,
                }) => {
                    let tail = c.map_or(String::new(), |(c, beta)| {
                        format!(" + {} * {}", s(beta), m(c))
                    });
                    out.push(format!(
                        "{pad}r{dst} = {} * {} @ {}{tail}",
                        s(alpha),
                        m(a),
                        m(b)
                    ));
                }
                MatStep::Inst(&MatInst::Axpby { dst, a, alpha, b }) => {
                    let tail = b.map_or(String::new(), |(b, beta)| {
                        format!(" + {} * {}", s(beta), m(b))
                    });
                    out.push(format!("{pad}r{dst} = {} * {}{tail}", s(alpha), m(a)));
                }
                MatStep::Inst(&MatInst::Move { dst, src }) => {
                    out.push(format!("{pad}r{dst} <- r{src}"))
                }
                MatStep::Inst(other) => unreachable!("mat_steps decodes {other:?}"),
                MatStep::Repeat(count, body) => {
                    out.push(format!("{pad}repeat {} {{", s(count)));
                    go(body, depth + 1, out);
                    out.push(format!("{pad}}}"));
                }
                MatStep::If(cond, then, otherwise) => {
                    out.push(format!("{pad}if {} {{", s(cond)));
                    go(then, depth + 1, out);
                    if !otherwise.is_empty() {
                        out.push(format!("{pad}}} else {{"));
                        go(otherwise, depth + 1, out);
                    }
                    out.push(format!("{pad}}}"));
                }
            }
        }
    }
    let mut out = vec![];
    go(code, 0, &mut out);
    out
}

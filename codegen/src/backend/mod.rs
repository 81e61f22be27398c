//! Printers over the IR, one per target, and what they share: the pass plan
//! (what each pass reduces, the loop that computes it — which nodes it
//! hoists and which it computes per element — and what the update writes),
//! which scalars each phase computes, and the spec-syntax text of a node for
//! comments. A planner decides; printers print.

pub mod cuda;
pub mod rust;

use agr_grammar::check::Level;

use crate::ir::*;

/// An indenting line writer.
#[derive(Default)]
pub struct W {
    pub out: String,
    pub depth: usize,
}

impl W {
    pub fn line(&mut self, s: &str) {
        if s.is_empty() {
            self.out.push('\n');
            return;
        }
        for _ in 0..self.depth {
            self.out.push_str("    ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }
    pub fn blank(&mut self) {
        self.out.push('\n');
    }
    pub fn open(&mut self, s: &str) {
        self.line(s);
        self.depth += 1;
    }
    pub fn close(&mut self, s: &str) {
        self.depth -= 1;
        self.line(s);
    }
    pub fn doc(&mut self, lines: &[String]) {
        for l in lines {
            if l.is_empty() {
                self.line("///");
            } else {
                self.line(&format!("/// {l}"));
            }
        }
    }
}

/// The prefix of every identifier a printer derives from a node's name.
///
/// Node names are spec names (`let m_hat`, a state `v`, a hyperparameter
/// `lr`) or the IR's own (`s3`, `e12`). Printed bare they could collide with
/// anything the printers write themselves (`a`, `s`, `out`, `p_out`, ...),
/// with the target language (`float`, `None`), with a macro (`INFINITY`) or,
/// in the Rust back end, with an item in scope where `optimizer!` expands.
/// Printed as `__v_<name>` they cannot: spec names cannot start with `__`
/// (the checker reserves that prefix), nothing else a printer writes starts
/// with `__v_`, and node names are unique within a program.
pub const VALUE_PREFIX: &str = "__v_";

/// The identifier under which printers hold node `id`'s value.
pub fn ident(prog: &Program, id: NodeId) -> String {
    format!("{VALUE_PREFIX}{}", prog.nodes[id].name)
}

/// The language of a numeric literal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Cuda,
}

/// A numeric literal in `f64` (`single = false`) or `f32` precision, for
/// either back end: every value prints, infinities and NaN included (as
/// `f32::INFINITY` or `(1.0f / 0.0f)`), and the text reads back as the same
/// value in that precision.
pub fn float_lit(v: f64, single: bool, lang: Lang) -> String {
    let (v, suffix) = if single {
        (f64::from(v as f32), "f32")
    } else {
        (v, "f64")
    };
    if !v.is_finite() {
        return match lang {
            Lang::Rust => {
                let c = if v.is_nan() {
                    "NAN"
                } else if v > 0.0 {
                    "INFINITY"
                } else {
                    "NEG_INFINITY"
                };
                format!("{suffix}::{c}")
            }
            Lang::Cuda => {
                let f = if single { "f" } else { "" };
                let num = if v.is_nan() {
                    "0.0"
                } else if v > 0.0 {
                    "1.0"
                } else {
                    "-1.0"
                };
                format!("({num}{f} / 0.0{f})")
            }
        };
    }
    // `{:?}` prints the shortest text that reads back as the same value in
    // that precision (`0.1`, `1e-8`, `3.0`).
    let text = if single {
        format!("{:?}", v as f32)
    } else {
        format!("{v:?}")
    };
    match lang {
        Lang::Rust => format!("{text}_{suffix}"),
        Lang::Cuda => {
            let text = if text.contains(['.', 'e']) {
                text
            } else {
                format!("{text}.0")
            };
            if single {
                format!("{text}f")
            } else {
                text
            }
        }
    }
}

/// Scalar nodes (not per-element, not constants), by level.
pub fn scalar_nodes(prog: &Program, level: Level) -> Vec<NodeId> {
    (0..prog.nodes.len())
        .filter(|&i| prog.nodes[i].level == level && !is_const(&prog.nodes[i]))
        .collect()
}

pub fn is_const(n: &Node) -> bool {
    matches!(n.op, Op::Num(_) | Op::Bool(_))
}

/// The phases (0 = before any reduction) in which scalars of `level` are computed.
pub fn scalar_phases(prog: &Program, level: Level) -> Vec<usize> {
    let mut v: Vec<usize> = scalar_nodes(prog, level)
        .iter()
        .map(|&i| prog.nodes[i].phase)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// What one element loop needs: scalars to hoist above it (in node order)
/// and per-element nodes to compute in it (in node order, loads included).
pub struct LoopPlan {
    pub hoisted: Vec<NodeId>,
    pub body: Vec<NodeId>,
    /// States whose old value the loop reads.
    pub states_read: Vec<usize>,
}

impl LoopPlan {
    pub fn new(prog: &Program, roots: &[NodeId]) -> LoopPlan {
        let mut plan = LoopPlan {
            hoisted: vec![],
            body: vec![],
            states_read: vec![],
        };
        for id in prog.needed(roots, |n| n.level != Level::Elem) {
            let n = &prog.nodes[id];
            if is_const(n) {
                continue;
            }
            if n.level != Level::Elem {
                plan.hoisted.push(id);
            } else {
                if let Op::State(s) = n.op {
                    plan.states_read.push(s);
                }
                if let Op::MatOut(b) = n.op {
                    plan.states_read.push(prog.mats[b].state);
                }
                plan.body.push(id);
            }
        }
        plan
    }
}

/// In a [`pass_reads`] mask: the pass reads the parameter per element.
pub const READS_P: u32 = 1 << 30;
/// In a [`pass_reads`] mask: the pass reads the gradient per element.
pub const READS_G: u32 = 1 << 31;

impl LoopPlan {
    /// What the loop reads per element: bit `k` for state `k`, [`READS_P`],
    /// [`READS_G`].
    pub fn reads(&self, prog: &Program) -> u32 {
        let mut mask = 0;
        for &id in &self.body {
            mask |= match prog.nodes[id].op {
                Op::Param => READS_P,
                Op::Grad => READS_G,
                _ => 0,
            };
        }
        for &s in &self.states_read {
            mask |= 1 << s;
        }
        mask
    }
}

/// What each reduction pass reads per element (see [`LoopPlan::reads`]):
/// where buffers are stored narrower than f32, the engine widens only these.
pub fn pass_reads(prog: &Program) -> Vec<u32> {
    (0..prog.n_phases)
        .map(|pass| PassPlan::reduce(prog, pass).lp.reads(prog))
        .collect()
}

/// One pass of a step as every back end runs it, decided once here: what it
/// reduces, the element loop that computes it, and (the update) what it
/// writes. The Rust and CUDA printers and the run-time evaluator take their
/// passes from [`pass_plans`] instead of each re-deriving them.
pub struct PassPlan<'p> {
    /// The reduction pass's index; `None` for the update.
    pub pass: Option<usize>,
    /// Its reductions, in spec order: (index into `prog.reductions`, the
    /// reduction).
    pub reductions: Vec<(usize, &'p Reduction)>,
    /// The loop: scalars to hoist, nodes per element, states read.
    pub lp: LoopPlan,
    /// The update's writes: each written state and its new value, in state order.
    pub state_writes: Vec<(usize, NodeId)>,
    /// The update's new parameter value, where the spec writes it.
    pub param_write: Option<NodeId>,
}

impl<'p> PassPlan<'p> {
    /// Reduction pass `pass`.
    pub fn reduce(prog: &'p Program, pass: usize) -> PassPlan<'p> {
        let reductions: Vec<(usize, &Reduction)> = prog.reductions_in(pass).collect();
        let roots: Vec<NodeId> = reductions.iter().map(|(_, r)| r.arg).collect();
        PassPlan {
            pass: Some(pass),
            lp: LoopPlan::new(prog, &roots),
            reductions,
            state_writes: vec![],
            param_write: None,
        }
    }

    /// The update pass.
    pub fn update(prog: &'p Program) -> PassPlan<'p> {
        PassPlan::update_part(prog, true, |_| true)
    }

    /// Part of the update pass: the parameter's new value (where `param`)
    /// and the new values of the states `keep` selects. (The CUDA update
    /// writes a reduced state once its rows and columns have been read: in
    /// a loop of its own.)
    pub fn update_part(
        prog: &'p Program,
        param: bool,
        keep: impl Fn(usize) -> bool,
    ) -> PassPlan<'p> {
        let param_write = (param && prog.param_written()).then_some(prog.param_out);
        let mut roots: Vec<NodeId> = param_write.into_iter().collect();
        // A state the step leaves as it is (a matrix block's) is not read for
        // it; a per-tensor state is written by the engine, not the loop.
        let written = |i: &usize| prog.state_written(*i) && !prog.states[*i].per_tensor && keep(*i);
        roots.extend(
            (0..prog.states.len())
                .filter(written)
                .map(|i| prog.state_out[i]),
        );
        PassPlan {
            pass: None,
            lp: LoopPlan::new(prog, &roots),
            reductions: vec![],
            state_writes: (0..prog.states.len())
                .filter(written)
                .map(|i| (i, prog.state_out[i]))
                .collect(),
            param_write,
        }
    }

    /// The loop of matrix block `b`: its value per element, written to the
    /// block's state (before the block's program runs on it).
    pub fn matrix(prog: &'p Program, b: usize) -> PassPlan<'p> {
        let block = &prog.mats[b];
        PassPlan {
            pass: None,
            lp: LoopPlan::new(prog, &[block.input]),
            reductions: vec![],
            state_writes: vec![(block.state, block.input)],
            param_write: None,
        }
    }

    /// Its reductions with one result per tensor or per step (folded over
    /// a whole chunk), in spec order.
    pub fn whole(&self) -> Vec<(usize, &'p Reduction)> {
        self.reductions
            .iter()
            .copied()
            .filter(|(_, r)| !r.scope.per_element())
            .collect()
    }

    /// Its reductions over one of the last two dimensions, in spec order.
    pub fn dims(&self) -> Vec<(usize, &'p Reduction)> {
        self.reductions
            .iter()
            .copied()
            .filter(|(_, r)| matches!(r.scope, Scope::Dim(_)))
            .collect()
    }

    /// Its reductions with one result per row, in spec order.
    pub fn rows(&self) -> Vec<(usize, &'p Reduction)> {
        self.reductions
            .iter()
            .copied()
            .filter(|(_, r)| r.scope == Scope::Rows)
            .collect()
    }
}

/// Every pass of a step in launch order: the reduction passes, then the update.
pub fn pass_plans(prog: &Program) -> Vec<PassPlan<'_>> {
    (0..prog.n_phases)
        .map(|k| PassPlan::reduce(prog, k))
        .chain(std::iter::once(PassPlan::update(prog)))
        .collect()
}

/// The spec-syntax text of a node; children with a spec name (or leaves)
/// appear by name, other children are spelled out in parentheses.
pub fn describe(prog: &Program, id: NodeId, top: bool) -> String {
    let n = &prog.nodes[id];
    let leaf_text = match n.op {
        Op::Num(v) => Some(agr_grammar::check::fmt_num(v)),
        Op::Bool(b) => Some(b.to_string()),
        _ if is_leaf(n) || (!top && !is_auto_name(n)) => Some(n.name.clone()),
        _ => None,
    };
    if let Some(t) = leaf_text {
        return t;
    }
    let d = |c| describe(prog, c, false);
    let text = match n.op {
        Op::Reduced(r) => {
            let red = &prog.reductions[r];
            let f = match (red.op, red.scope) {
                (ReduceOp::Sum, Scope::Tensor) => "sum",
                (ReduceOp::Max, Scope::Tensor) => "max",
                (ReduceOp::Sum, Scope::Global) => "global_sum",
                (ReduceOp::Max, Scope::Global) => "global_max",
                (ReduceOp::Sum, Scope::Rows) => "row_sum",
                (ReduceOp::Max, Scope::Rows) => "row_max",
                (op, Scope::Dim(a)) => {
                    let f = if op == ReduceOp::Sum { "sum" } else { "max" };
                    return format!("{f}({}, {})", describe(prog, red.arg, true), a.dim());
                }
            };
            return format!("{f}({})", describe(prog, red.arg, true));
        }
        Op::Unary(o, a) => {
            let f = match o {
                UnaryOp::Neg => return format!("-{}", d(a)),
                UnaryOp::Not => return format!("!{}", d(a)),
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Abs => "abs",
                UnaryOp::Sign => "sign",
                UnaryOp::Exp => "exp",
                UnaryOp::Ln => "ln",
            };
            return format!("{f}({})", describe(prog, a, true));
        }
        Op::Binary(o, a, b) => match o.infix() {
            Some(sym) => format!("{} {sym} {}", d(a), d(b)),
            None => {
                let f = match o {
                    BinaryOp::Pow => "pow",
                    BinaryOp::Min => "min",
                    _ => "max",
                };
                return format!(
                    "{f}({}, {})",
                    describe(prog, a, true),
                    describe(prog, b, true)
                );
            }
        },
        Op::Select(c, a, b) => {
            return format!(
                "select({}, {}, {})",
                describe(prog, c, true),
                describe(prog, a, true),
                describe(prog, b, true)
            )
        }
        _ => n.name.clone(),
    };
    if top {
        text
    } else {
        format!("({text})")
    }
}

/// Names that `Program::name_nodes` made up (`s3`, `ts4`, `e5`).
pub fn is_auto_name(n: &Node) -> bool {
    let digits = n.name.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let prefix = &n.name[..n.name.len() - digits.len()];
    matches!(prefix, "s" | "ts" | "e")
        && !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
}

fn is_leaf(n: &Node) -> bool {
    matches!(
        n.op,
        Op::Num(_)
            | Op::Bool(_)
            | Op::Hyper(_)
            | Op::T
            | Op::Ndim
            | Op::Numel
            | Op::RowLen
            | Op::DimLen(_)
            | Op::Param
            | Op::Grad
            | Op::State(_)
    )
}

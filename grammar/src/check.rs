//! Stage 2: semantic checks on the syntax tree.
//!
//! Every name resolves, every expression has a type (number or bool) and a
//! *level* — how often it changes: never (a constant), once per step
//! (hyperparameters), once per tensor (`t`, `ndim`, reductions) or per
//! element (`p`, `g`, state) — and every reduction can be scheduled. The
//! checker collects every error it finds, each with a span and a hint.

use std::collections::HashMap;

use crate::ast::*;
use crate::builtins::{self, FuncKind, MAX_MATRIX_OPS, MAX_REDUCTION_PHASES, MAX_STATES};
use crate::diag::{Diagnostic, Span};

/// How often a value changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Const,
    Step,
    Tensor,
    Elem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Num,
    Bool,
    /// One matrix per tensor (inside a `matrix` block).
    Mat,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Num => "a number",
            Ty::Bool => "a bool",
            Ty::Mat => "a matrix",
        }
    }
}

/// What the checker knows about a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Val {
    pub ty: Ty,
    pub level: Level,
    /// How many reduction passes must run before the value is known.
    pub phase: usize,
    /// Along which of the last two dimensions a per-element value may vary
    /// ([`ALONG_LAST`], [`ALONG_SECOND_LAST`]): a value written to a state
    /// declared `reduced(-1)` must not vary along the last dimension.
    pub axes: u8,
}

/// [`Val::axes`]: the value may differ between elements of a row.
pub const ALONG_LAST: u8 = 1;
/// [`Val::axes`]: the value may differ between elements of a column.
pub const ALONG_SECOND_LAST: u8 = 2;

/// The [`Val::axes`] bit of `axis`.
pub fn along(axis: Axis) -> u8 {
    match axis {
        Axis::Last => ALONG_LAST,
        Axis::SecondLast => ALONG_SECOND_LAST,
    }
}

/// The [`Val::axes`] of a state declared with `shape` (none: per element).
fn state_axes(shape: Option<Axis>) -> u8 {
    match shape {
        Some(a) => (ALONG_LAST | ALONG_SECOND_LAST) & !along(a),
        None => ALONG_LAST | ALONG_SECOND_LAST,
    }
}

/// What one state holds per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateForm {
    /// One value per element (no shape written).
    Elem,
    /// `reduced(-1)`, `reduced(-2)`: one value per row or per column of the
    /// last two dimensions.
    Reduced(Axis),
    /// `per_tensor`: one value per tensor.
    PerTensor,
}

/// A state's declared form (a shape that is not valid counts as per element;
/// the checker reports it).
pub fn state_form(s: &StateDecl) -> StateForm {
    let Some(sh) = s.shape.as_ref() else {
        return StateForm::Elem;
    };
    match (sh.word.name.as_str(), sh.dim) {
        ("reduced", Some(d)) => Axis::from_dim(d).map_or(StateForm::Elem, StateForm::Reduced),
        ("per_tensor", None) => StateForm::PerTensor,
        _ => StateForm::Elem,
    }
}

/// The storage words a per-element state may declare (`m: bf16 = 0`):
/// how its buffer is kept; the arithmetic is f32 either way.
pub const STORAGE_WORDS: [&str; 5] = ["f32", "bf16", "f16", "q8", "uq8"];

/// A state's declared storage: `f32` unless it is declared with one of
/// [`STORAGE_WORDS`].
pub fn state_storage(s: &StateDecl) -> &'static str {
    match s.shape.as_ref() {
        Some(sh) if sh.dim.is_none() => STORAGE_WORDS
            .iter()
            .find(|w| **w == sh.word.name)
            .copied()
            .unwrap_or("f32"),
        _ => "f32",
    }
}

/// A state's reduced dimension, if it is declared `reduced(..)`.
pub fn state_axis(s: &StateDecl) -> Option<Axis> {
    match state_form(s) {
        StateForm::Reduced(a) => Some(a),
        _ => None,
    }
}

impl Val {
    fn num(level: Level) -> Val {
        Val {
            ty: Ty::Num,
            level,
            phase: 0,
            axes: if level == Level::Elem {
                ALONG_LAST | ALONG_SECOND_LAST
            } else {
                0
            },
        }
    }
    fn join(self, other: Val, ty: Ty) -> Val {
        Val {
            ty,
            level: self.level.max(other.level),
            phase: self.phase.max(other.phase),
            axes: self.axes | other.axes,
        }
    }
}

#[derive(Clone, Debug)]
enum Binding {
    Input,
    Hyper,
    State { index: usize, read: bool },
    Param,
    Let,
}

#[derive(Clone, Debug)]
struct Slot {
    binding: Binding,
    val: Val,
    /// The value of a `let` bound to a constant number (as lowering folds it).
    konst: Option<f64>,
}

/// Checks a spec; returns every error found (empty when the spec is valid).
pub fn check(spec: &Spec) -> Vec<Diagnostic> {
    let mut c = Checker {
        spec,
        errors: vec![],
        scopes: vec![HashMap::new()],
        state_assigned: vec![false; spec.states.len()],
        p_assigned: false,
        in_init: false,
        matrix: None,
    };
    c.run();
    c.errors
}

/// Convenience: the first error, if any.
pub fn check_first(spec: &Spec) -> Result<(), Diagnostic> {
    match check(spec).into_iter().next() {
        Some(d) => Err(d),
        None => Ok(()),
    }
}

struct Checker<'a> {
    spec: &'a Spec,
    errors: Vec<Diagnostic>,
    scopes: Vec<HashMap<String, Slot>>,
    state_assigned: Vec<bool>,
    p_assigned: bool,
    in_init: bool,
    /// Inside a matrix block: the index of its scope and the latest phase
    /// of anything it reads.
    matrix: Option<(usize, usize)>,
}

impl<'a> Checker<'a> {
    fn err(&mut self, span: Span, msg: impl Into<String>, help: impl Into<String>) {
        self.errors.push(Diagnostic::new(span, msg, help));
    }

    fn lookup(&self, name: &str) -> Option<&Slot> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn lookup_mut(&mut self, name: &str) -> Option<&mut Slot> {
        self.scopes.iter_mut().rev().find_map(|s| s.get_mut(name))
    }

    fn known_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .scopes
            .iter()
            .flat_map(|s| s.keys().map(|k| k.as_str()))
            .collect();
        v.extend(builtins::FUNCS.iter().map(|f| f.name));
        v
    }

    fn run(&mut self) {
        let spec = self.spec;
        let name = &spec.name;
        if !name.name.starts_with(|c: char| c.is_ascii_uppercase()) {
            self.err(
                name.span.clone(),
                format!(
                    "optimizer name `{}` must start with an uppercase letter",
                    name.name
                ),
                "it becomes a Rust type name; write it in UpperCamelCase, e.g. `AdamWAgr`",
            );
        }
        for (name, _) in builtins::INPUTS {
            self.declare(name, Binding::Input, Val::num(input_level(name)));
        }
        self.scopes[0].get_mut("p").unwrap().binding = Binding::Param;
        self.scopes[0].get_mut("p").unwrap().val = Val::num(Level::Elem);
        self.check_hypers();
        self.check_states();
        self.scopes.push(HashMap::new());
        let step = spec.step.clone();
        self.check_block(&step);
        for (i, s) in spec.states.iter().enumerate() {
            if !self.state_assigned[i] {
                self.err(
                    s.name.span.clone(),
                    format!("state `{}` is never assigned in `step`", s.name.name),
                    format!(
                        "update it in `step` (e.g. `{0} = ...;`) or remove it from `state`",
                        s.name.name
                    ),
                );
            }
        }
        if !self.p_assigned {
            self.err(
                spec.step_span.clone(),
                "the step never updates the parameter `p`",
                "assign the new value, e.g. `p = p - lr * g;`",
            );
        }
    }

    fn declare(&mut self, name: &str, binding: Binding, val: Val) {
        self.scopes.last_mut().unwrap().insert(
            name.to_string(),
            Slot {
                binding,
                val,
                konst: None,
            },
        );
    }

    /// A new name must not clash with anything already in scope.
    fn check_new_name(&mut self, id: &Ident, what: &str) -> bool {
        let n = id.name.as_str();
        if builtins::is_input(n) {
            self.err(
                id.span.clone(),
                format!("`{n}` is a built-in input and cannot be declared as a {what}"),
                format!("choose another name; `{n}` is provided by every step"),
            );
            return false;
        }
        if builtins::func(n).is_some() {
            self.err(
                id.span.clone(),
                format!("`{n}` is a built-in function and cannot be declared as a {what}"),
                "choose another name",
            );
            return false;
        }
        if builtins::RUST_KEYWORDS.contains(&n) || n.starts_with("__") {
            self.err(
                id.span.clone(),
                format!("`{n}` cannot be used as a {what} name"),
                "names become Rust identifiers: choose one that is not a Rust keyword and does not start with `__`",
            );
            return false;
        }
        if let Some(slot) = self.lookup(n) {
            let prev = match &slot.binding {
                Binding::Hyper => "a hyperparameter",
                Binding::State { .. } => "a state",
                Binding::Let => "a `let` in this step",
                Binding::Input | Binding::Param => "a built-in input",
            };
            let help = match slot.binding {
                Binding::Let | Binding::State { .. } if what == "`let` binding" => {
                    format!("assign to it with `{n} = ...;` or choose another name")
                }
                _ => "rename one of the two".to_string(),
            };
            self.err(
                id.span.clone(),
                format!("`{n}` is declared twice: it is already {prev}"),
                help,
            );
            return false;
        }
        true
    }

    fn check_hypers(&mut self) {
        for h in &self.spec.hypers {
            let n = &h.name.name;
            let ok = self.check_new_name(&h.name, "hyperparameter");
            let (ty, ty_span) = match (h.ty.clone(), h.default) {
                (Some((t, s)), _) => (t, s),
                (None, Literal::Bool(_)) => (HyperTy::Bool, h.default_span.clone()),
                (None, Literal::Num { .. }) => (HyperTy::Float, h.default_span.clone()),
            };
            match (ty, h.default) {
                (HyperTy::Bool, Literal::Num { .. }) => self.err(
                    h.default_span.clone(),
                    format!("hyperparameter `{n}` is a bool but its default is a number"),
                    "write `true` or `false`, or declare it `: float`",
                ),
                (HyperTy::Float | HyperTy::Int, Literal::Bool(_)) => self.err(
                    h.default_span.clone(),
                    format!("hyperparameter `{n}` is declared `: {}` but its default is a bool", ty.keyword()),
                    "give a number as the default, or declare it `: bool`",
                ),
                (HyperTy::Int, Literal::Num { integral: false, value }) => self.err(
                    h.default_span.clone(),
                    format!("hyperparameter `{n}` is an int but its default `{value}` is not a whole number"),
                    "write a whole number such as `0`, or declare it `: float`",
                ),
                (_, Literal::Num { value, .. }) if value.is_nan() || value.is_infinite() => self.err(
                    h.default_span.clone(),
                    format!("hyperparameter `{n}` needs a finite default"),
                    "write a finite number; `inf` is only allowed as a range bound",
                ),
                _ => {}
            }
            let _ = ty_span;
            if let Some(rn) = &h.range_name {
                if rn.name != *n {
                    self.err(
                        rn.span.clone(),
                        format!("the range of `{n}` constrains `{}`", rn.name),
                        format!("write the hyperparameter's own name: `where ... {n} ...`"),
                    );
                }
            }
            if ty == HyperTy::Bool && h.range_span.is_some() {
                self.err(
                    h.range_span.clone().unwrap(),
                    format!("bool hyperparameter `{n}` cannot have a range"),
                    "remove the `where` clause",
                );
            }
            if let (Some(lo), Some(hi)) = (h.lower, h.upper) {
                if lo.value > hi.value || (lo.value == hi.value && !(lo.inclusive && hi.inclusive))
                {
                    self.err(
                        h.range_span.clone().unwrap(),
                        format!("the range of `{n}` is empty"),
                        "the lower bound must be below the upper bound",
                    );
                }
            }
            if let Literal::Num { value, .. } = h.default {
                if !in_range(value, h.lower, h.upper) {
                    self.err(
                        h.default_span.clone(),
                        format!(
                            "the default {value} of `{n}` is outside its range {}",
                            range_text(h.lower, h.upper)
                        ),
                        "change the default or widen the range",
                    );
                }
            }
            if ok {
                let val = Val {
                    ty: if ty == HyperTy::Bool {
                        Ty::Bool
                    } else {
                        Ty::Num
                    },
                    level: Level::Step,
                    phase: 0,
                    axes: 0,
                };
                self.declare(n, Binding::Hyper, val);
            }
        }
    }

    fn check_states(&mut self) {
        if self.spec.states.len() > MAX_STATES {
            let s = &self.spec.states[MAX_STATES];
            self.err(
                s.name.span.clone(),
                format!("a spec may declare at most {MAX_STATES} states"),
                "combine states or split the optimizer",
            );
        }
        for (index, s) in self.spec.states.iter().enumerate() {
            if !self.check_new_name(&s.name, "state") {
                // Reported already; don't also call it unassigned.
                self.state_assigned[index] = true;
            } else {
                let val = match self.check_state_shape(s) {
                    StateForm::PerTensor => Val::num(Level::Tensor),
                    StateForm::Reduced(a) => Val {
                        axes: state_axes(Some(a)),
                        ..Val::num(Level::Elem)
                    },
                    StateForm::Elem => Val::num(Level::Elem),
                };
                self.declare(&s.name.name, Binding::State { index, read: false }, val);
            }
        }
    }

    /// A state's `: reduced(dim)` or `: per_tensor`, if written: valid, or
    /// an error at it.
    fn check_state_shape(&mut self, s: &StateDecl) -> StateForm {
        let Some(sh) = s.shape.as_ref() else {
            return StateForm::Elem;
        };
        let forms = "a state is per element, `reduced(-1)` (one value per row of the last dimension), `reduced(-2)` (one per column of the last two dimensions) or `per_tensor` (one per tensor); a per-element state may say how it is stored: `f32`, `bf16`, `f16`, `q8` or `uq8`";
        let (what, form) = match (sh.word.name.as_str(), sh.dim) {
            ("reduced", Some(d)) => match Axis::from_dim(d) {
                Some(a) => ("reduced", StateForm::Reduced(a)),
                None => {
                    self.err(
                        sh.span.clone(),
                        format!("a state can be reduced over dimension -1 or -2, not {}", fmt_num(d)),
                        "write `reduced(-1)` for one value per row of the last dimension or `reduced(-2)` for one per column (a tensor is viewed as matrices over its last two dimensions)",
                    );
                    return StateForm::Elem;
                }
            },
            ("reduced", None) => {
                self.err(
                    sh.word.span.clone(),
                    "`reduced` needs the dimension it reduces over",
                    "write `reduced(-1)` or `reduced(-2)`; for one value per tensor write `per_tensor`",
                );
                return StateForm::Elem;
            }
            ("per_tensor", None) => ("per-tensor", StateForm::PerTensor),
            (w, None) if STORAGE_WORDS.contains(&w) => return StateForm::Elem,
            (w, Some(_)) if STORAGE_WORDS.contains(&w) => {
                self.err(
                    sh.span.clone(),
                    format!("the storage `{w}` takes no number"),
                    format!("write `{w}`"),
                );
                return StateForm::Elem;
            }
            ("per_tensor", Some(_)) => {
                self.err(
                    sh.span.clone(),
                    "`per_tensor` takes no dimension",
                    "write `per_tensor`",
                );
                return StateForm::Elem;
            }
            _ => {
                self.err(
                    sh.word.span.clone(),
                    format!("unknown state shape `{}`", sh.word.name),
                    forms,
                );
                return StateForm::Elem;
            }
        };
        if !matches!(s.init.kind, ExprKind::Num(_))
            && !matches!(&s.init.kind, ExprKind::Unary(UnOp::Neg, e) if matches!(e.kind, ExprKind::Num(_)))
        {
            self.err(
                s.init.span.clone(),
                format!("the {what} state `{}` must start from a number", s.name.name),
                format!("write a number such as `0`; a {what} state cannot start from a per-element value"),
            );
        }
        form
    }

    fn check_block(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.check_stmt(s);
        }
    }

    fn check_stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Let { name, value } => {
                let v = self.expr(value);
                if self.check_new_name(name, "`let` binding") {
                    if let Some(v) = v {
                        self.declare(&name.name, Binding::Let, v);
                        let konst = self.const_num(value);
                        self.lookup_mut(&name.name).unwrap().konst = konst;
                    }
                } else if let Some(v) = v {
                    // Keep checking later uses without a cascade of errors.
                    if self.lookup(&name.name).is_none() {
                        self.declare(&name.name, Binding::Let, v);
                    }
                }
                if v.is_none() && self.lookup(&name.name).is_none() {
                    // The value had an error (already reported): declare the
                    // name anyway so later uses don't report it as unknown.
                    self.declare(&name.name, Binding::Let, Val::num(Level::Elem));
                }
            }
            Stmt::Assign { target, value } => {
                let v = self.expr(value);
                if let Some((scope, _)) = self.matrix {
                    let known = self.lookup(&target.name).is_some();
                    let inner = self.scopes[scope..]
                        .iter()
                        .any(|s| s.contains_key(&target.name));
                    if known && !inner {
                        self.err(
                            target.span.clone(),
                            format!("`{}` cannot be assigned inside a matrix block", target.name),
                            "a matrix block assigns only its own matrices; assign the parameter and states after the block, from its result",
                        );
                        return;
                    }
                    let number = self
                        .lookup(&target.name)
                        .is_some_and(|slot| slot.val.ty != Ty::Mat);
                    if inner && number {
                        self.err(
                            target.span.clone(),
                            format!("`{}` is a number of the matrix block and cannot be reassigned", target.name),
                            "inside a matrix block only matrices are reassigned; bind a new name with `let`",
                        );
                        return;
                    }
                }
                self.assign(target, value, v);
            }
            Stmt::Matrix {
                name,
                value,
                body,
                span,
            } => self.check_matrix(name, value, body, span),
            Stmt::Repeat { count, body, span } => {
                if self.matrix.is_none() {
                    self.err(
                        span.clone(),
                        "`repeat` runs only inside a matrix block",
                        "per-element steps have no loops; repeat matrix statements inside `matrix x = ... { repeat n { ... } }`",
                    );
                    return;
                }
                if let Some(c) = self.expr(count) {
                    if c.ty != Ty::Num {
                        self.err(
                            count.span.clone(),
                            format!("`repeat` needs a number of times, but this is {}", c.ty.name()),
                            "write a whole number or an `int` hyperparameter, e.g. `repeat ns_steps { ... }`",
                        );
                    } else if let Some(k) = self.const_num(count) {
                        if k < 0.0 || k.fract() != 0.0 || k > u32::MAX as f64 {
                            self.err(
                                count.span.clone(),
                                format!(
                                    "`repeat` needs a whole number of times, not {}",
                                    fmt_num(k)
                                ),
                                "write a whole number such as `5`",
                            );
                        }
                    }
                }
                self.scopes.push(HashMap::new());
                self.check_block(body);
                self.scopes.pop();
            }
            Stmt::If {
                cond,
                then,
                otherwise,
                ..
            } => {
                let c = self.expr(cond);
                if let Some(c) = c {
                    if c.ty != Ty::Bool {
                        self.err(
                            cond.span.clone(),
                            "the condition of `if` must be a bool, but this is a number",
                            "compare it, e.g. `if t <= agr_steps { ... }`",
                        );
                    }
                }
                // Each branch starts from the values before the `if`; after
                // it, a variable assigned in either branch depends on both
                // branches and on the condition.
                let before: Vec<HashMap<String, Slot>> = self.scopes.clone();
                self.scopes.push(HashMap::new());
                self.check_block(then);
                self.scopes.pop();
                let after_then = std::mem::replace(&mut self.scopes, before.clone());
                self.scopes.push(HashMap::new());
                self.check_block(otherwise);
                self.scopes.pop();
                // A name assigned in a branch depends on the condition even
                // where the value assigned looks the same as before.
                let mut assigned = std::collections::HashSet::new();
                stmts_assigned(then, &mut assigned);
                stmts_assigned(otherwise, &mut assigned);
                for (depth, scope) in before.iter().enumerate() {
                    for (name, old) in scope {
                        let a = after_then[depth][name].clone();
                        let b = self.scopes[depth][name].clone();
                        if a.val == old.val && b.val == old.val && !assigned.contains(name.as_str())
                        {
                            // Keep what the branches learned (e.g. a state read).
                            if !matches!(a.binding, Binding::State { read: false, .. }) {
                                self.scopes[depth].get_mut(name).unwrap().binding = a.binding;
                            }
                            continue;
                        }
                        let mut merged = a.val.join(b.val, a.val.ty);
                        if let Some(c) = c {
                            merged = merged.join(c, merged.ty);
                        }
                        if let Binding::State { index, .. } = a.binding {
                            match state_form(&self.spec.states[index]) {
                                StateForm::Reduced(axis) if merged.axes & along(axis) != 0 => {
                                    let name = name.clone();
                                    self.reduced_state_error(
                                        &name,
                                        axis,
                                        cond.span.clone(),
                                        "this condition, which chooses its value,",
                                    );
                                    merged.axes &= !along(axis);
                                }
                                StateForm::PerTensor if merged.level == Level::Elem => {
                                    let name = name.clone();
                                    self.per_tensor_state_error(
                                        &name,
                                        cond.span.clone(),
                                        "this condition, which chooses its value, is",
                                    );
                                    merged.level = Level::Tensor;
                                    merged.axes = 0;
                                }
                                _ => {}
                            }
                        }
                        let slot = self.scopes[depth].get_mut(name).unwrap();
                        slot.val = merged;
                        slot.konst = None;
                        if matches!(a.binding, Binding::State { read: true, .. }) {
                            slot.binding = a.binding;
                        }
                    }
                }
            }
        }
    }

    /// `matrix name = value { body }`.
    fn check_matrix(&mut self, name: &Ident, value: &Expr, body: &[Stmt], span: &Span) {
        if self.matrix.is_some() || self.scopes.len() > 2 {
            self.err(
                span.clone(),
                "a matrix block must be a statement of `step` itself",
                "move it out of the `if`, `repeat` or matrix block around it",
            );
            return;
        }
        let v = self.expr(value);
        let mut phase = 0;
        if let Some(v) = v {
            if v.ty != Ty::Num || v.level != Level::Elem {
                let what = if v.ty != Ty::Num {
                    v.ty.name()
                } else {
                    "the same for every element"
                };
                self.err(
                    value.span.clone(),
                    format!(
                        "a matrix block views a per-element number as a matrix, but this is {what}"
                    ),
                    "start the block from a per-element value, e.g. `matrix x = g { ... }`",
                );
            }
            phase = v.phase;
        }
        let ops = stmts_size(body);
        if ops > MAX_MATRIX_OPS {
            self.err(
                span.clone(),
                format!("this matrix block holds {ops} operations; a block may hold at most {MAX_MATRIX_OPS}"),
                "loop with `repeat` instead of writing statements out, or split the work into several blocks",
            );
            // Later uses of the result are not errors too.
            if self.lookup(&name.name).is_none() {
                let val = Val {
                    phase,
                    ..Val::num(Level::Elem)
                };
                self.declare(&name.name, Binding::Let, val);
            }
            return;
        }
        let ok = self.check_new_name(name, "matrix");
        self.scopes.push(HashMap::new());
        let scope = self.scopes.len() - 1;
        self.matrix = Some((scope, phase));
        self.declare(
            &name.name,
            Binding::Let,
            Val {
                ty: Ty::Mat,
                level: Level::Tensor,
                phase,
                axes: 0,
            },
        );
        self.check_block(body);
        let phase = self.matrix.take().map_or(phase, |(_, p)| p);
        self.scopes.pop();
        if phase > MAX_REDUCTION_PHASES {
            self.err(
                span.clone(),
                format!(
                    "this matrix block cannot be scheduled: it needs {phase} reduction passes before it, and a step has at most {MAX_REDUCTION_PHASES}"
                ),
                "read values that depend on fewer nested reductions",
            );
        }
        if ok || self.lookup(&name.name).is_none() {
            self.declare(
                &name.name,
                Binding::Let,
                Val {
                    phase,
                    ..Val::num(Level::Elem)
                },
            );
        }
    }

    fn assign(&mut self, target: &Ident, value: &Expr, v: Option<Val>) {
        let n = target.name.as_str();
        let Some(slot) = self.lookup(n).cloned() else {
            let hint = match builtins::closest(n, self.known_names()) {
                Some(c) => {
                    format!("did you mean `{c}`? To introduce a temporary, write `let {n} = ...;`")
                }
                None => format!("declare it in `state {{ ... }}` or write `let {n} = ...;`"),
            };
            self.err(
                target.span.clone(),
                format!("cannot assign to unknown name `{n}`"),
                hint,
            );
            return;
        };
        match slot.binding {
            Binding::Input => {
                let help = if n == "g" {
                    "the gradient is read-only: bind a new name, e.g. `let gr = agr(g);`"
                        .to_string()
                } else {
                    format!("`{n}` is provided by the step; bind a new name with `let`")
                };
                self.err(target.span.clone(), format!("cannot assign to `{n}`"), help);
                return;
            }
            Binding::Hyper => {
                self.err(
                    target.span.clone(),
                    format!("cannot assign to hyperparameter `{n}`"),
                    "hyperparameters are fixed during a step: bind a new name with `let`",
                );
                return;
            }
            Binding::State { index, .. } => {
                if !self.in_init {
                    self.state_assigned[index] = true;
                }
            }
            Binding::Param => self.p_assigned = true,
            Binding::Let => {}
        }
        let Some(v) = v else { return };
        let needs_num = !matches!(slot.binding, Binding::Let);
        if (needs_num && v.ty != Ty::Num) || v.ty != slot.val.ty {
            self.err(
                value.span.clone(),
                format!(
                    "`{n}` holds {} but this value is {}",
                    slot.val.ty.name(),
                    v.ty.name()
                ),
                if v.ty == Ty::Bool {
                    "turn the condition into a number with `select(cond, 1, 0)`"
                } else {
                    "compare it to get a bool, e.g. `x > 0`"
                },
            );
            return;
        }
        let konst = if needs_num {
            None
        } else {
            self.const_num(value)
        };
        let mut per_tensor = false;
        if let Binding::State { index, .. } = slot.binding {
            match state_form(&self.spec.states[index]) {
                StateForm::Reduced(axis) if v.axes & along(axis) != 0 => {
                    let at = self.varying_part(value, along(axis));
                    self.reduced_state_error(n, axis, at, "this value");
                }
                StateForm::PerTensor => {
                    per_tensor = true;
                    if v.level == Level::Elem {
                        let at = self.varying_part(value, ALONG_LAST | ALONG_SECOND_LAST);
                        self.per_tensor_state_error(n, at, "this value is");
                    }
                }
                _ => {}
            }
        }
        let slot = self.lookup_mut(n).unwrap();
        // A state or the parameter stays per-element whatever is assigned
        // (a reduced state keeps its shape; a per-tensor state stays one
        // number per tensor).
        let (level, axes) = if per_tensor {
            (Level::Tensor, 0)
        } else if needs_num {
            (Level::Elem, slot.val.axes)
        } else {
            (v.level, v.axes)
        };
        slot.val = Val { level, axes, ..v };
        slot.konst = konst;
    }

    /// The [`Val::axes`] of an already checked expression (no errors, no
    /// side effects).
    fn axes_of(&self, e: &Expr) -> u8 {
        match &e.kind {
            ExprKind::Num(_) | ExprKind::Bool(_) => 0,
            ExprKind::Name(n) => self.lookup(n).map_or(0, |s| s.val.axes),
            ExprKind::Unary(_, a) => self.axes_of(a),
            ExprKind::Binary(_, a, b) => self.axes_of(a) | self.axes_of(b),
            ExprKind::If(c, a, b) => self.axes_of(c) | self.axes_of(a) | self.axes_of(b),
            ExprKind::Call { func, args } => match builtins::func(&func.name).map(|f| f.kind) {
                Some(FuncKind::TensorReduce) if args.len() == 2 => {
                    let axis = self.const_num(&args[1]).and_then(Axis::from_dim);
                    self.axes_of(&args[0]) & !axis.map_or(0, along)
                }
                Some(FuncKind::TensorReduce | FuncKind::GlobalReduce) => 0,
                Some(FuncKind::Agr | FuncKind::RowReduce) => ALONG_LAST | ALONG_SECOND_LAST,
                _ => args.iter().fold(0, |acc, a| acc | self.axes_of(a)),
            },
        }
    }

    /// The innermost part of `e` that varies along `bit` (for errors).
    fn varying_part(&self, e: &Expr, bit: u8) -> Span {
        let children: Vec<&Expr> = match &e.kind {
            ExprKind::Unary(_, a) => vec![a],
            ExprKind::Binary(_, a, b) => vec![a, b],
            ExprKind::If(c, a, b) => vec![c, a, b],
            ExprKind::Call { func, args } => match builtins::func(&func.name).map(|f| f.kind) {
                // A reduction is the varying part itself.
                Some(FuncKind::Agr | FuncKind::RowReduce | FuncKind::TensorReduce) => vec![],
                _ => args.iter().collect(),
            },
            _ => vec![],
        };
        match children.into_iter().find(|c| self.axes_of(c) & bit != 0) {
            Some(c) => self.varying_part(c, bit),
            None => e.span.clone(),
        }
    }

    /// A per-element value assigned to a per-tensor state.
    fn per_tensor_state_error(&mut self, n: &str, span: Span, what: &str) {
        self.err(
            span,
            format!(
                "state `{n}` holds one value per tensor (`per_tensor`), but {what} per element"
            ),
            format!("reduce it first, e.g. `mean(x)`, or declare `{n}` per element"),
        );
    }

    /// A value that varies along the dimension state `n` is reduced over.
    fn reduced_state_error(&mut self, n: &str, axis: Axis, span: Span, what: &str) {
        let (holds, reduce) = match axis {
            Axis::Last => ("one value per row of the last dimension", "mean(x, -1)"),
            Axis::SecondLast => (
                "one value per column of the last two dimensions",
                "mean(x, -2)",
            ),
        };
        self.err(
            span,
            format!("state `{n}` holds {holds} (`reduced({})`), but {what} varies along dimension {}", axis.dim(), axis.dim()),
            format!("reduce it over that dimension first, e.g. `{reduce}`, or declare `{n}` per element"),
        );
    }

    /// Checks an expression; a constant number that folds to NaN, or to an
    /// infinity from finite operands (`0 / 0`, `1 / 0`, `sqrt(-1)`,
    /// `exp(1000)`), is an error at the innermost such subexpression.
    fn expr(&mut self, e: &Expr) -> Option<Val> {
        let v = self.expr_inner(e)?;
        if v.level == Level::Const
            && v.ty == Ty::Num
            && !matches!(e.kind, ExprKind::Num(_) | ExprKind::Name(_))
        {
            if let Some(x) = self.const_num(e).filter(|x| !x.is_finite()) {
                let kids: Vec<f64> = match &e.kind {
                    ExprKind::Unary(_, a) => vec![a.as_ref()],
                    ExprKind::Binary(_, a, b) => vec![a.as_ref(), b.as_ref()],
                    ExprKind::If(_, a, b) => vec![a.as_ref(), b.as_ref()],
                    ExprKind::Call { args, .. } => args.iter().collect(),
                    _ => vec![],
                }
                .into_iter()
                .filter_map(|k| self.const_num(k))
                .collect();
                let reported = kids.iter().any(|k| k.is_nan());
                let from_inf = kids.iter().any(|k| k.is_infinite());
                if !reported && (x.is_nan() || !from_inf) {
                    let what = if x.is_nan() {
                        "NaN".to_string()
                    } else if x > 0.0 {
                        "infinity".to_string()
                    } else {
                        "minus infinity".to_string()
                    };
                    self.err(
                        e.span.clone(),
                        format!("this constant expression evaluates to {what}"),
                        "write a finite value (or `inf` where an infinite bound is meant)",
                    );
                    return None;
                }
            }
        }
        Some(v)
    }

    /// The value of a constant number expression, folded as lowering folds it.
    fn const_num(&self, e: &Expr) -> Option<f64> {
        Some(match &e.kind {
            ExprKind::Num(v) => *v,
            ExprKind::Name(n) => self.lookup(n)?.konst?,
            ExprKind::Unary(UnOp::Neg, a) => -self.const_num(a)?,
            ExprKind::Binary(op, a, b) => {
                let (x, y) = (self.const_num(a)?, self.const_num(b)?);
                match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                    BinOp::Pow => x.powf(y),
                    _ => return None,
                }
            }
            ExprKind::If(c, a, b) => {
                if self.const_bool(c)? {
                    self.const_num(a)?
                } else {
                    self.const_num(b)?
                }
            }
            ExprKind::Call { func, args } => {
                if func.name == "select" && args.len() == 3 {
                    return if self.const_bool(&args[0])? {
                        self.const_num(&args[1])
                    } else {
                        self.const_num(&args[2])
                    };
                }
                let a: Vec<f64> = args
                    .iter()
                    .map(|x| self.const_num(x))
                    .collect::<Option<_>>()?;
                match (func.name.as_str(), a.as_slice()) {
                    ("sqrt", [x]) => x.sqrt(),
                    ("abs", [x]) => x.abs(),
                    ("sign", [x]) => {
                        if *x > 0.0 {
                            1.0
                        } else if *x < 0.0 {
                            -1.0
                        } else {
                            x * 0.0
                        }
                    }
                    ("exp", [x]) => x.exp(),
                    ("ln", [x]) => x.ln(),
                    ("pow", [x, y]) => x.powf(*y),
                    ("min", [x, y]) => x.min(*y),
                    ("max", [x, y]) => x.max(*y),
                    ("clamp", [x, lo, hi]) => x.max(*lo).min(*hi),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// The value of a constant bool expression.
    fn const_bool(&self, e: &Expr) -> Option<bool> {
        Some(match &e.kind {
            ExprKind::Bool(b) => *b,
            ExprKind::Unary(UnOp::Not, a) => !self.const_bool(a)?,
            ExprKind::Binary(BinOp::And, a, b) => self.const_bool(a)? && self.const_bool(b)?,
            ExprKind::Binary(BinOp::Or, a, b) => self.const_bool(a)? || self.const_bool(b)?,
            ExprKind::Binary(op, a, b) => {
                let (x, y) = (self.const_num(a)?, self.const_num(b)?);
                match op {
                    BinOp::Lt => x < y,
                    BinOp::Le => x <= y,
                    BinOp::Gt => x > y,
                    BinOp::Ge => x >= y,
                    BinOp::Eq => x == y,
                    BinOp::Ne => x != y,
                    _ => return None,
                }
            }
            ExprKind::If(c, a, b) => {
                if self.const_bool(c)? {
                    self.const_bool(a)?
                } else {
                    self.const_bool(b)?
                }
            }
            _ => return None,
        })
    }

    fn expr_inner(&mut self, e: &Expr) -> Option<Val> {
        match &e.kind {
            ExprKind::Num(_) => Some(Val::num(Level::Const)),
            ExprKind::Bool(_) => Some(Val {
                ty: Ty::Bool,
                ..Val::num(Level::Const)
            }),
            ExprKind::Name(n) => self.name(n, &e.span),
            ExprKind::Unary(op, a) => {
                let v = self.expr(a)?;
                let want = if *op == UnOp::Neg { Ty::Num } else { Ty::Bool };
                if *op == UnOp::Neg && v.ty == Ty::Mat {
                    return Some(v);
                }
                if v.ty != want {
                    let (what, help) = if *op == UnOp::Neg {
                        (
                            "`-` needs a number, but this is a bool",
                            "negate the condition with `!` instead",
                        )
                    } else {
                        (
                            "`!` needs a bool, but this is a number",
                            "negate a number with `-` instead",
                        )
                    };
                    self.err(a.span.clone(), what, help);
                    return None;
                }
                Some(v)
            }
            ExprKind::Binary(op, a, b) => {
                let va = self.expr(a);
                let vb = self.expr(b);
                let (va, vb) = (va?, vb?);
                if va.ty == Ty::Mat || vb.ty == Ty::Mat || *op == BinOp::MatMul {
                    return self.matrix_binary(*op, a, va, b, vb);
                }
                let (want, out) = match op {
                    BinOp::And | BinOp::Or => (Ty::Bool, Ty::Bool),
                    o if o.is_comparison() => (Ty::Num, Ty::Bool),
                    _ => (Ty::Num, Ty::Num),
                };
                for (v, side) in [(va, a), (vb, b)] {
                    if v.ty != want {
                        let help = if want == Ty::Num {
                            "use `select(cond, a, b)` to choose between numbers, or `&&`/`||` to combine conditions"
                        } else {
                            "compare the number to get a bool, e.g. `x > 0`"
                        };
                        self.err(
                            side.span.clone(),
                            format!(
                                "`{}` needs {} on both sides, but this is {}",
                                op.symbol(),
                                want.name(),
                                v.ty.name()
                            ),
                            help,
                        );
                        return None;
                    }
                }
                Some(va.join(vb, out))
            }
            ExprKind::If(c, a, b) => {
                let vc = self.expr(c);
                let va = self.expr(a);
                let vb = self.expr(b);
                let (vc, va, vb) = (vc?, va?, vb?);
                if vc.ty != Ty::Bool {
                    self.err(
                        c.span.clone(),
                        "the condition of `if` must be a bool, but this is a number",
                        "compare it, e.g. `if ndim >= 2 { ... }`",
                    );
                    return None;
                }
                if va.ty != vb.ty {
                    self.err(
                        b.span.clone(),
                        format!(
                            "the branches of `if` differ: {} and {}",
                            va.ty.name(),
                            vb.ty.name()
                        ),
                        "make both branches numbers or both bools",
                    );
                    return None;
                }
                Some(vc.join(va, va.ty).join(vb, va.ty))
            }
            ExprKind::Call { func, args } => self.call(e, func, args),
        }
    }

    /// A binary operator with a matrix on either side, or `@`.
    fn matrix_binary(&mut self, op: BinOp, a: &Expr, va: Val, b: &Expr, vb: Val) -> Option<Val> {
        let (ma, mb) = (va.ty == Ty::Mat, vb.ty == Ty::Mat);
        let num = |v: Val| v.ty == Ty::Num;
        let ok = match op {
            BinOp::MatMul => ma && mb,
            BinOp::Mul => (ma && num(vb)) || (num(va) && mb),
            BinOp::Div => ma && num(vb),
            BinOp::Add | BinOp::Sub => ma && mb,
            _ => false,
        };
        if ok {
            return Some(va.join(vb, Ty::Mat));
        }
        let (span, msg, help): (Span, String, &str) = match op {
            BinOp::MatMul if self.matrix.is_none() => (
                a.span.start..b.span.end,
                "`@` multiplies matrices: it is defined only inside a matrix block".into(),
                "write `matrix x = value { ... }` and multiply inside it, e.g. `let a = x @ transpose(x);`",
            ),
            BinOp::MatMul => {
                let side = if ma { b } else { a };
                let v = if ma { vb } else { va };
                (
                    side.span.clone(),
                    format!("`@` multiplies two matrices, but this is {}", v.ty.name()),
                    "scale a matrix with `*` instead, e.g. `2 * x`",
                )
            }
            BinOp::Mul if ma && mb => (
                a.span.start..b.span.end,
                "`*` of two matrices is not defined".into(),
                "write `@` for the matrix product",
            ),
            BinOp::Div if mb => (
                b.span.clone(),
                "a matrix can only be divided by a number".into(),
                "divide by a number, e.g. `x / 2`",
            ),
            BinOp::Add | BinOp::Sub => {
                let side = if ma { b } else { a };
                let v = if ma { vb } else { va };
                (
                    side.span.clone(),
                    format!("`{}` of a matrix needs a matrix on the other side too, but this is {}", op.symbol(), v.ty.name()),
                    "add matrices of the same shape, or scale with `*`",
                )
            }
            _ => (
                a.span.start..b.span.end,
                format!("`{}` is not defined on matrices", op.symbol()),
                "matrices take `@`, `+`, `-`, `*` and `/` by a number, and `transpose`",
            ),
        };
        self.err(span, msg, help);
        None
    }

    fn name(&mut self, n: &str, span: &Span) -> Option<Val> {
        let Some(slot) = self.lookup(n).cloned() else {
            let help = if builtins::func(n).is_some() {
                format!("`{n}` is a function: call it, e.g. `{n}(x)`")
            } else {
                match builtins::closest(n, self.known_names()) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => "declare it in `hyper { ... }`, `state { ... }` or with `let` before this line".into(),
                }
            };
            self.err(span.clone(), format!("unknown name `{n}`"), help);
            return None;
        };
        if let Some((scope, phase)) = self.matrix {
            let outer = !self.scopes[scope..].iter().any(|s| s.contains_key(n));
            if outer && slot.val.level == Level::Elem {
                self.err(
                    span.clone(),
                    format!("`{n}` is per element and cannot be read inside a matrix block"),
                    "a matrix block reads its own matrices and per-tensor or per-step numbers (hyperparameters, `t`, `rows`, `cols`, reductions); compute per-element values into the block's matrix (`matrix x = ... { }`)",
                );
                return None;
            }
            self.matrix = Some((scope, phase.max(slot.val.phase)));
        }
        if self.in_init && matches!(slot.binding, Binding::State { .. }) {
            self.err(
                span.clone(),
                format!("the initial value of a state cannot read state `{n}`"),
                "initialise from `p`, `g`, hyperparameters or earlier temporaries",
            );
            return None;
        }
        if let Binding::State { index, read: false } = slot.binding {
            if self.in_init {
                self.err(
                    span.clone(),
                    format!("the initial value of a state cannot read state `{n}`"),
                    "initialise from `p`, `g`, hyperparameters or earlier temporaries",
                );
                return None;
            }
            // The first read of a state: its initial value is evaluated here.
            if let Some(s) = self.lookup_mut(n) {
                s.binding = Binding::State { index, read: true };
            }
            let init = self.spec.states[index].init.clone();
            self.in_init = true;
            let v = self.expr(&init);
            self.in_init = false;
            if let Some(v) = v {
                if v.ty != Ty::Num {
                    self.err(
                        init.span.clone(),
                        format!("the initial value of state `{n}` must be a number"),
                        "write a number such as `0`, or an expression such as `g`",
                    );
                }
            }
        }
        Some(slot.val)
    }

    fn call(&mut self, e: &Expr, func: &Ident, args: &[Expr]) -> Option<Val> {
        let Some(f) = builtins::func(&func.name) else {
            let names = builtins::FUNCS.iter().map(|f| f.name);
            let help = match builtins::closest(&func.name, names) {
                Some(c) => format!("did you mean `{c}`?"),
                None => format!(
                    "the functions are {}",
                    builtins::FUNCS
                        .iter()
                        .map(|f| f.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            self.err(
                func.span.clone(),
                format!("unknown function `{}`", func.name),
                help,
            );
            for a in args {
                self.expr(a);
            }
            return None;
        };
        if f.kind == FuncKind::TensorReduce && args.len() == 2 {
            return self.dim_reduce(e, f, args);
        }
        if args.len() != f.arity {
            self.err(
                e.span.clone(),
                format!(
                    "`{}` takes {} argument{} but {} {} given",
                    f.name,
                    f.arity,
                    if f.arity == 1 { "" } else { "s" },
                    args.len(),
                    if args.len() == 1 { "was" } else { "were" }
                ),
                format!("{}: {}", f.name, f.doc),
            );
            for a in args {
                self.expr(a);
            }
            return None;
        }
        let vals: Vec<Option<Val>> = args.iter().map(|a| self.expr(a)).collect();
        let vals: Vec<Val> = vals.into_iter().collect::<Option<_>>()?;
        if f.kind == FuncKind::Transpose {
            if vals[0].ty != Ty::Mat {
                let help = if self.matrix.is_none() {
                    "`transpose` works inside a matrix block: `matrix x = value { x = transpose(x); }`"
                } else {
                    "transpose a matrix of the block"
                };
                self.err(
                    args[0].span.clone(),
                    format!(
                        "`transpose` takes a matrix, but this is {}",
                        vals[0].ty.name()
                    ),
                    help,
                );
                return None;
            }
            return Some(vals[0]);
        }
        if let Some((v, a)) = vals.iter().zip(args).find(|(v, _)| v.ty == Ty::Mat) {
            let _ = v;
            self.err(
                a.span.clone(),
                format!("`{}` takes numbers, not a matrix", f.name),
                "matrices take `@`, `+`, `-`, `*` and `/` by a number, and `transpose`",
            );
            return None;
        }
        for (i, (v, a)) in vals.iter().zip(args).enumerate() {
            let want = if f.kind == FuncKind::Select && i == 0 {
                Ty::Bool
            } else {
                Ty::Num
            };
            if v.ty != want {
                self.err(
                    a.span.clone(),
                    format!(
                        "argument {} of `{}` must be {}, but this is {}",
                        i + 1,
                        f.name,
                        want.name(),
                        v.ty.name()
                    ),
                    if want == Ty::Bool {
                        "compare it, e.g. `g > 0`"
                    } else {
                        "use `select(cond, 1, 0)` to turn a bool into a number"
                    },
                );
                return None;
            }
        }
        let joined = vals
            .iter()
            .fold(Val::num(Level::Const), |acc, v| acc.join(*v, Ty::Num));
        match f.kind {
            FuncKind::Math => Some(joined),
            FuncKind::Transpose => unreachable!("handled above"),
            FuncKind::Select => Some(Val {
                ty: vals[1].ty,
                ..joined
            }),
            FuncKind::Agr
            | FuncKind::TensorReduce
            | FuncKind::GlobalReduce
            | FuncKind::RowReduce => {
                let phase = self.reduction_phase(e, f, &args[0], vals[0])?;
                let level = match f.kind {
                    FuncKind::Agr | FuncKind::RowReduce => Level::Elem,
                    FuncKind::TensorReduce => Level::Tensor,
                    _ => Level::Step,
                };
                Some(Val {
                    phase,
                    ..Val::num(level)
                })
            }
        }
    }

    /// The pass after which reduction `e` of `f` over `arg` (checked value
    /// `v`) is known; an error where `arg` is not per element or the
    /// reduction needs more passes than a step has.
    fn reduction_phase(
        &mut self,
        e: &Expr,
        f: &builtins::Func,
        arg: &Expr,
        v: Val,
    ) -> Option<usize> {
        if v.level != Level::Elem {
            self.err(
                arg.span.clone(),
                format!("`{}` reduces over a tensor's elements, but this value is the same for every element", f.name),
                "pass a per-element value such as `g`, `p` or a state",
            );
            return None;
        }
        let phase = v.phase + 1;
        if phase > MAX_REDUCTION_PHASES {
            self.err(
                e.span.clone(),
                format!(
                    "this reduction cannot be scheduled: it needs {phase} reduction passes before the update, and a step has at most {MAX_REDUCTION_PHASES}"
                ),
                "reduce over a value that depends on fewer nested reductions",
            );
            return None;
        }
        Some(phase)
    }

    /// `sum(x, -1)`, `mean(x, -2)`: a reduction over one of the last two
    /// dimensions, read back per element.
    fn dim_reduce(&mut self, e: &Expr, f: &builtins::Func, args: &[Expr]) -> Option<Val> {
        let arg = self.expr(&args[0]);
        let dim = self.const_num(&args[1]);
        let axis = dim.and_then(Axis::from_dim);
        if !matches!(f.name, "sum" | "mean") || axis.is_none() {
            let what = match dim {
                _ if !matches!(f.name, "sum" | "mean") => {
                    format!(
                        "`{}` reduces over the whole tensor and takes one argument",
                        f.name
                    )
                }
                Some(d) => format!(
                    "`{}` reduces over dimension -1 or -2 (the last two), not {}",
                    f.name,
                    fmt_num(d)
                ),
                None => format!("the dimension of `{}` must be the number -1 or -2", f.name),
            };
            self.err(
                args[1].span.clone(),
                what,
                "`sum(x, -1)` and `mean(x, -1)` give one value per row of the last dimension, `sum(x, -2)` and `mean(x, -2)` one per column of the last two (a tensor is viewed as matrices over its last two dimensions)",
            );
            return None;
        }
        let (arg, axis) = (arg?, axis?);
        if arg.ty != Ty::Num {
            self.err(
                args[0].span.clone(),
                format!("`{}` takes numbers, but this is {}", f.name, arg.ty.name()),
                if arg.ty == Ty::Bool {
                    "use `select(cond, 1, 0)` to turn a bool into a number"
                } else {
                    "reduce per-element values; matrices take `@`, `+`, `-`, `*` and `/` by a number, and `transpose`"
                },
            );
            return None;
        }
        let phase = self.reduction_phase(e, f, &args[0], arg)?;
        Some(Val {
            ty: Ty::Num,
            level: Level::Elem,
            phase,
            axes: arg.axes & !along(axis),
        })
    }
}

/// Warnings about a spec that compiles but probably does not do what was
/// meant: hyperparameters that neither `step` nor any state's initial value
/// reads (a condition such as `if use_agr { ... }` counts as a read).
pub fn warnings(spec: &Spec) -> Vec<Diagnostic> {
    let mut read = std::collections::HashSet::new();
    for s in &spec.states {
        names_read(&s.init, &mut read);
    }
    stmts_read(&spec.step, &mut read);
    spec.hypers
        .iter()
        .filter(|h| !read.contains(h.name.name.as_str()))
        .map(|h| {
            Diagnostic::warning(
                h.name.span.clone(),
                format!("hyperparameter `{}` is never used", h.name.name),
                "read it in `step` or in a state's initial value, or remove it from `hyper`",
            )
        })
        .collect()
}

fn stmts_read<'s>(stmts: &'s [Stmt], read: &mut std::collections::HashSet<&'s str>) {
    walk(stmts, &mut |s| match s {
        Stmt::Let { value, .. } | Stmt::Assign { value, .. } | Stmt::Matrix { value, .. } => {
            names_read(value, read)
        }
        Stmt::Repeat { count, .. } => names_read(count, read),
        Stmt::If { cond, .. } => names_read(cond, read),
    });
}

/// Every statement of `stmts`, nested blocks' included, in order.
fn walk<'s>(stmts: &'s [Stmt], f: &mut impl FnMut(&'s Stmt)) {
    for s in stmts {
        f(s);
        match s {
            Stmt::Let { .. } | Stmt::Assign { .. } => {}
            Stmt::Matrix { body, .. } | Stmt::Repeat { body, .. } => walk(body, f),
            Stmt::If {
                then, otherwise, ..
            } => {
                walk(then, f);
                walk(otherwise, f);
            }
        }
    }
}

/// The names `stmts` assign, nested blocks included.
fn stmts_assigned<'s>(stmts: &'s [Stmt], out: &mut std::collections::HashSet<&'s str>) {
    walk(stmts, &mut |s| {
        if let Stmt::Assign { target, .. } = s {
            out.insert(target.name.as_str());
        }
    });
}

/// Statements and expression nodes in `stmts`, nested blocks included.
fn stmts_size(stmts: &[Stmt]) -> usize {
    stmts
        .iter()
        .map(|s| {
            1 + match s {
                Stmt::Let { value, .. } | Stmt::Assign { value, .. } => expr_size(value),
                Stmt::If {
                    cond,
                    then,
                    otherwise,
                    ..
                } => expr_size(cond) + stmts_size(then) + stmts_size(otherwise),
                Stmt::Matrix { value, body, .. } => expr_size(value) + stmts_size(body),
                Stmt::Repeat { count, body, .. } => expr_size(count) + stmts_size(body),
            }
        })
        .sum()
}

fn expr_size(e: &Expr) -> usize {
    1 + match &e.kind {
        ExprKind::Num(_) | ExprKind::Bool(_) | ExprKind::Name(_) => 0,
        ExprKind::Unary(_, a) => expr_size(a),
        ExprKind::Binary(_, a, b) => expr_size(a) + expr_size(b),
        ExprKind::Call { args, .. } => args.iter().map(expr_size).sum(),
        ExprKind::If(c, a, b) => expr_size(c) + expr_size(a) + expr_size(b),
    }
}

fn names_read<'s>(e: &'s Expr, read: &mut std::collections::HashSet<&'s str>) {
    match &e.kind {
        ExprKind::Num(_) | ExprKind::Bool(_) => {}
        ExprKind::Name(n) => {
            read.insert(n);
        }
        ExprKind::Unary(_, a) => names_read(a, read),
        ExprKind::Binary(_, a, b) => {
            names_read(a, read);
            names_read(b, read);
        }
        ExprKind::Call { args, .. } => args.iter().for_each(|a| names_read(a, read)),
        ExprKind::If(c, a, b) => {
            names_read(c, read);
            names_read(a, read);
            names_read(b, read);
        }
    }
}

fn input_level(name: &str) -> Level {
    match name {
        "p" | "g" => Level::Elem,
        _ => Level::Tensor,
    }
}

pub fn in_range(v: f64, lo: Option<Bound>, hi: Option<Bound>) -> bool {
    let lo_ok = lo.is_none_or(|b| {
        if b.inclusive {
            v >= b.value
        } else {
            v > b.value
        }
    });
    let hi_ok = hi.is_none_or(|b| {
        if b.inclusive {
            v <= b.value
        } else {
            v < b.value
        }
    });
    lo_ok && hi_ok
}

/// `[0, 1)` style text for a range.
pub fn range_text(lo: Option<Bound>, hi: Option<Bound>) -> String {
    let (lb, lv) = match lo {
        Some(b) => (if b.inclusive { "[" } else { "(" }, fmt_num(b.value)),
        None => ("(", "-inf".into()),
    };
    let (hb, hv) = match hi {
        Some(b) => (if b.inclusive { "]" } else { ")" }, fmt_num(b.value)),
        None => (")", "inf".into()),
    };
    format!("{lb}{lv}, {hv}{hb}")
}

pub fn fmt_num(v: f64) -> String {
    if v == f64::INFINITY {
        "inf".into()
    } else if v == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn errors(src: &str) -> Vec<(String, String)> {
        let spec = parse(src).unwrap();
        check(&spec)
            .into_iter()
            .map(|d| (src[d.span.clone()].to_string(), d.message))
            .collect()
    }

    fn one_error(src: &str) -> (String, String) {
        let e = errors(src);
        assert_eq!(e.len(), 1, "{e:?}");
        e[0].clone()
    }

    #[test]
    fn a_valid_spec_has_no_errors() {
        let e = errors(
            "X { hyper { lr = 0.1 where lr > 0, on = true, k: int = 3 where 0 <= k }
                 state { m = 0, prev = g }
                 step {
                    let d = g - prev;
                    let gr = if on && t <= k { agr(g) } else { g };
                    m = 0.9 * m + gr + d;
                    prev = g;
                    if ndim >= 2 { p = p - lr * m; } else { p = p - lr * g; }
                 } }",
        );
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn unknown_name_suggests_the_closest() {
        let (at, msg) = one_error("X { hyper { beta1 = 0.9 } step { p = p * bata1; } }");
        assert_eq!(at, "bata1");
        assert!(msg.contains("unknown name"));
    }

    #[test]
    fn assigning_to_g_is_rejected() {
        let (at, msg) = one_error("X { step { g = g * 2; p = p - g; } }");
        assert_eq!(at, "g");
        assert!(msg.contains("cannot assign to `g`"));
    }

    #[test]
    fn unassigned_state_and_parameter() {
        let e = errors("X { state { m = 0 } step { let x = m; } }");
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, "m");
        assert!(e[0].1.contains("never assigned"));
        assert_eq!(e[1].0, "step");
    }

    #[test]
    fn default_outside_range() {
        let (at, msg) = one_error("X { hyper { b = 1.5 where 0 <= b < 1 } step { p = p * b; } }");
        assert_eq!(at, "1.5");
        assert!(msg.contains("[0, 1)"), "{msg}");
    }

    #[test]
    fn reductions_need_per_element_arguments_and_a_schedule() {
        let (at, msg) = one_error("X { hyper { lr = 1 } step { p = p - sum(lr) * g; } }");
        assert_eq!(at, "lr");
        assert!(msg.contains("same for every element"));
        let (at, msg) = one_error("X { step { p = p - agr(agr(agr(agr(g)))); } }");
        assert_eq!(at, "agr(agr(agr(agr(g))))");
        assert!(msg.contains("cannot be scheduled"));
    }

    #[test]
    fn type_mismatch() {
        let (at, msg) = one_error("X { step { p = p - (g > 0); } }");
        assert_eq!(at, "g > 0");
        assert!(msg.contains("needs a number"), "{msg}");
    }

    #[test]
    fn duplicate_names() {
        let (at, msg) = one_error("X { hyper { lr = 1 } state { lr = 0 } step { p = p - lr; } }");
        assert_eq!(at, "lr");
        assert!(msg.contains("declared twice"));
    }

    #[test]
    fn each_branch_of_an_if_starts_from_the_values_before_it() {
        // In the else branch `p` is the parameter, not the then-branch's value
        // (which needs three reduction passes).
        let e = errors(
            "X { step { let a = agr(agr(agr(g))); if t > 1 { p = p - a; } else { p = p - norm(p); } } }",
        );
        assert!(e.is_empty(), "{e:?}");
    }

    fn warned(src: &str) -> Vec<(String, String)> {
        let spec = parse(src).unwrap();
        assert!(check(&spec).is_empty(), "{:?}", check(&spec));
        warnings(&spec)
            .into_iter()
            .map(|d| {
                assert!(!d.is_error());
                (src[d.span.clone()].to_string(), d.message)
            })
            .collect()
    }

    #[test]
    fn an_unused_hyperparameter_is_a_warning_at_its_name() {
        let w = warned(
            "X { hyper { lr = 0.1, beta = 0.9 where 0 <= beta < 1, gamma = 2 } step { p = p - lr * g; } }",
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[0].0, "beta");
        assert_eq!(w[0].1, "hyperparameter `beta` is never used");
        assert_eq!(w[1].0, "gamma");
    }

    #[test]
    fn a_hyperparameter_read_only_in_a_condition_or_a_state_init_is_used() {
        let w = warned(
            "X { hyper { use_agr = true, k: int = 3, lr = 0.1, c = 1, m0 = 0.5 }
                 state { m = m0 * g }
                 step {
                    if use_agr { p = p - lr * agr(g); } else { p = p - lr * g; }
                    m = select(t <= k, m + g, if c > 0 { m } else { g });
                 } }",
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn the_builtin_specs_have_no_warnings() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agr-runtime/specs");
        let mut n = 0;
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            let src = std::fs::read_to_string(&path).unwrap();
            let spec = parse(&src).unwrap();
            assert!(
                warnings(&spec).is_empty(),
                "{}: {:?}",
                path.display(),
                warnings(&spec)
            );
            n += 1;
        }
        assert!(n >= 14, "{n} specs in {}", dir.display());
    }

    #[test]
    fn a_state_cannot_start_from_itself() {
        let (at, msg) = one_error("X { state { m = m } step { m = m + g; p = p - m; } }");
        assert_eq!(at, "m");
        assert!(msg.contains("cannot read state `m`"), "{msg}");
    }

    #[test]
    fn state_init_reads_temporaries_at_first_read() {
        assert!(errors(
            "X { state { prev = gr } step { let gr = agr(g); p = p - prev; prev = gr; } }"
        )
        .is_empty());
        let (at, _) =
            one_error("X { state { prev = gr } step { p = p - prev; let gr = g; prev = gr; } }");
        assert_eq!(at, "gr");
    }

    /// A spec with `body` as its step (hyper `n: int = 3`, state `m = 0`).
    fn in_step(body: &str) -> String {
        format!(
            "X {{ hyper {{ lr = 0.1, n: int = 3 }} state {{ m = 0 }} step {{ m = g; {body} }} }}"
        )
    }

    #[test]
    fn a_matrix_block_checks() {
        let src = in_step(
            "matrix x = g / max(norm(g), 1e-7) { if rows > cols { x = transpose(x); } \
             repeat n { let a = x @ transpose(x); x = 2 * x - (a @ x) / 2; } \
             if rows > cols { x = transpose(x); } } p = p - lr * x;",
        );
        assert_eq!(errors(&src), vec![]);
    }

    #[test]
    fn matrix_misuse_is_an_error_at_the_offending_token() {
        let cases: &[(&str, &str, &str)] = &[
            ("p = p - g @ g;", "g @ g", "`@` multiplies matrices: it is defined only inside a matrix block"),
            ("matrix x = g { x = x @ 2; } p = x;", "2", "`@` multiplies two matrices, but this is a number"),
            ("matrix x = g { x = x * x; } p = x;", "x * x", "`*` of two matrices is not defined"),
            ("matrix x = g { x = x + 1; } p = x;", "1", "`+` of a matrix needs a matrix on the other side too, but this is a number"),
            ("matrix x = g { x = sqrt(x); } p = x;", "x", "`sqrt` takes numbers, not a matrix"),
            ("matrix x = g { x = x - p; } p = x;", "p", "`p` is per element and cannot be read inside a matrix block"),
            ("matrix x = g { m = x; } p = x;", "m", "`m` cannot be assigned inside a matrix block"),
            ("matrix x = g { let k = 2; k = 3; x = k * x; } p = x;", "k", "`k` is a number of the matrix block and cannot be reassigned"),
            ("matrix x = lr { } p = x;", "lr", "a matrix block views a per-element number as a matrix, but this is the same for every element"),
            ("p = transpose(g);", "g", "`transpose` takes a matrix, but this is a number"),
            ("repeat 2 { p = g; }", "repeat", "`repeat` runs only inside a matrix block"),
            ("matrix x = g { repeat 1.5 { x = 2 * x; } } p = x;", "1.5", "`repeat` needs a whole number of times, not 1.5"),
            ("if t > 1 { matrix x = g { } } p = g;", "matrix", "a matrix block must be a statement of `step` itself"),
            ("matrix x = g { matrix y = x { } } p = x;", "matrix", "a matrix block must be a statement of `step` itself"),
            ("matrix x = g { let k = x > 1; } p = x;", "x > 1", "`>` is not defined on matrices"),
        ];
        for (body, at, msg) in cases {
            let src = in_step(body);
            let e = errors(&src);
            assert!(
                e.iter().any(|(a, m)| a == at && m == msg),
                "{body}: want `{msg}` at `{at}`, got {e:?}"
            );
        }
    }

    fn factored(states: &str, body: &str) -> String {
        format!("X {{ hyper {{ lr = 0.1 }} state {{ {states} }} step {{ {body} }} }}")
    }

    #[test]
    fn reduced_states_and_dimension_reductions_check() {
        let ok = [
            factored(
                "vr: reduced(-1) = 0, vc: reduced(-2) = 0",
                "vr = lerp(vr, mean(g * g, -1), 0.5); vc = 0.5 * vc + sum(g, -2); \
                 p = p - lr * g / sqrt(vr * vc / max(mean(vr, -2), 1e-30) + 1e-8);",
            ),
            // A per-tensor state: any per-tensor or per-step value, chosen
            // by a per-tensor condition; read per element or per tensor.
            factored(
                "mu: per_tensor = 1, m = 0",
                "if t > 2 { mu = mu * (1 - lr) + norm(g); } m = mu * g; \
                 p = p - lr * m / (1 - mu + sum(m));",
            ),
            // A condition per tensor, or constant along the reduced axis, may choose.
            factored(
                "vr: reduced(-1) = 0",
                "if ndim > 1 { vr = mean(g, -1); } else { vr = vr; } \
                 if mean(g, -1) > 0 { vr = 2 * vr; } p = p - lr * vr;",
            ),
        ];
        for src in ok {
            let e = errors(&src);
            assert!(e.is_empty(), "{src}: {e:?}");
        }
    }

    #[test]
    fn reduced_state_misuse_is_an_error_at_the_offending_token() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("vr: reduced(-1) = 0", "vr = 0.9 * vr + 0.1 * mean(g, -2) * 2; p = p - vr;", "mean(g, -2)",
             "state `vr` holds one value per row of the last dimension (`reduced(-1)`), but this value varies along dimension -1"),
            ("vc: reduced(-2) = 0", "vc = 2 * mean(g, -1); p = p - vc;", "mean(g, -1)",
             "state `vc` holds one value per column of the last two dimensions (`reduced(-2)`), but this value varies along dimension -2"),
            ("vr: reduced(-1) = 0", "vr = lerp(vr, g * g, 0.1); p = p - vr;", "g",
             "state `vr` holds one value per row of the last dimension (`reduced(-1)`), but this value varies along dimension -1"),
            ("vr: reduced(-1) = 0", "if g > 0 { vr = 1; } p = p - vr;", "g > 0",
             "state `vr` holds one value per row of the last dimension (`reduced(-1)`), but this condition, which chooses its value, varies along dimension -1"),
            ("vr: reduced(0) = 0", "vr = 1; p = p - vr;", "reduced(0)",
             "a state can be reduced over dimension -1 or -2, not 0"),
            ("vr: rows(-1) = 0", "vr = 1; p = p - vr;", "rows",
             "unknown state shape `rows`"),
            ("vr: reduced(-1) = g", "vr = 1; p = p - vr;", "g",
             "the reduced state `vr` must start from a number"),
            ("m = 0", "m = sum(g, 0); p = p - m;", "0",
             "`sum` reduces over dimension -1 or -2 (the last two), not 0"),
            ("m = 0", "m = norm(g, -1); p = p - m;", "-1",
             "`norm` reduces over the whole tensor and takes one argument"),
            ("m = 0", "m = mean(g, lr); p = p - m;", "lr",
             "the dimension of `mean` must be the number -1 or -2"),
            ("m = 0", "m = mean(lr, -1); p = p - m;", "lr",
             "`mean` reduces over a tensor's elements, but this value is the same for every element"),
            ("m = 0", "m = sum(g > 0, -2); p = p - m;", "g > 0",
             "`sum` takes numbers, but this is a bool"),
            ("mu: per_tensor = 1", "mu = mu * (1 + g); p = p - mu;", "g",
             "state `mu` holds one value per tensor (`per_tensor`), but this value is per element"),
            ("mu: per_tensor = 1", "if g > 0 { mu = 2 * mu; } p = p - mu;", "g > 0",
             "state `mu` holds one value per tensor (`per_tensor`), but this condition, which chooses its value, is per element"),
            ("mu: per_tensor(1) = 1", "mu = 1; p = p - mu;", "per_tensor(1)",
             "`per_tensor` takes no dimension"),
            ("vr: reduced = 0", "vr = 1; p = p - vr;", "reduced",
             "`reduced` needs the dimension it reduces over"),
            ("mu: per_tensor = lr", "mu = 1; p = p - mu;", "lr",
             "the per-tensor state `mu` must start from a number"),
            ("mu: per_tensor = 1", "mu = sum(mu); p = p - mu;", "mu",
             "`sum` reduces over a tensor's elements, but this value is the same for every element"),
        ];
        for (states, body, at, msg) in cases {
            let src = factored(states, body);
            let e = errors(&src);
            assert!(
                e.iter().any(|(a, m)| a == at && m == msg),
                "{body}: want `{msg}` at `{at}`, got {e:?}"
            );
        }
    }

    #[test]
    fn a_matrix_block_has_a_size_limit() {
        // 4 operations each: the assignment, `*`, `2` and `x`.
        let body = "x = 2 * x; ".repeat(MAX_MATRIX_OPS / 4 + 1);
        let src = in_step(&format!("matrix x = g {{ {body} }} p = x;"));
        let (at, msg) = one_error(&src);
        assert_eq!(at, "matrix");
        assert!(
            msg.starts_with("this matrix block holds 10004 operations"),
            "{msg}"
        );
    }

    #[test]
    fn after_a_matrix_block_its_name_is_per_element() {
        let src = in_step("matrix x = g { } let s = sum(x); p = p - lr * s * x;");
        assert_eq!(errors(&src), vec![]);
        let src = in_step("matrix x = g { } let y = x @ x; p = y;");
        assert_eq!(
            one_error(&src).1,
            "`@` multiplies matrices: it is defined only inside a matrix block"
        );
    }
}

//! The syntax tree of a spec, with the byte span of every name and expression.

use crate::diag::Span;

/// A name and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A whole optimizer spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The `///` lines before the name, without the slashes.
    pub doc: Vec<String>,
    pub name: Ident,
    pub hypers: Vec<HyperDecl>,
    pub states: Vec<StateDecl>,
    pub step: Vec<Stmt>,
    /// Span of the `step` keyword (for errors about the step as a whole).
    pub step_span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HyperTy {
    Float,
    Int,
    Bool,
}

impl HyperTy {
    pub fn keyword(self) -> &'static str {
        match self {
            HyperTy::Float => "float",
            HyperTy::Int => "int",
            HyperTy::Bool => "bool",
        }
    }
}

/// A literal value of a hyperparameter or a range bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Literal {
    Num { value: f64, integral: bool },
    Bool(bool),
}

/// One end of a hyperparameter's valid range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub value: f64,
    pub inclusive: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HyperDecl {
    pub doc: Vec<String>,
    pub name: Ident,
    /// The written type, if any (`lr: float = ...`).
    pub ty: Option<(HyperTy, Span)>,
    pub default: Literal,
    pub default_span: Span,
    pub lower: Option<Bound>,
    pub upper: Option<Bound>,
    /// The `where ...` clause, if any.
    pub range_span: Option<Span>,
    /// The name written inside the `where` clause.
    pub range_name: Option<Ident>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StateDecl {
    pub doc: Vec<String>,
    pub name: Ident,
    /// The value before the first step: a constant, or an expression that is
    /// evaluated where the step first reads the state.
    pub init: Expr,
    /// `: reduced(-1)` or the like, as written (the checker validates it).
    pub shape: Option<StateShape>,
}

/// A state's declared shape, `reduced(dim)` or `per_tensor`, as written.
#[derive(Clone, Debug, PartialEq)]
pub struct StateShape {
    /// The word (`reduced`, `per_tensor`).
    pub word: Ident,
    /// The number in parentheses, if any.
    pub dim: Option<f64>,
    /// The whole `reduced(-1)`.
    pub span: Span,
}

/// One of the last two dimensions of a tensor viewed as `[.., rows, cols]`
/// (a tensor with fewer than two dimensions is one row: `[1, numel]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Dimension -1: along a row.
    Last,
    /// Dimension -2: along a column.
    SecondLast,
}

impl Axis {
    /// The dimension as torch writes it: -1 or -2.
    pub fn dim(self) -> i32 {
        match self {
            Axis::Last => -1,
            Axis::SecondLast => -2,
        }
    }

    pub fn from_dim(d: f64) -> Option<Axis> {
        if d == -1.0 {
            Some(Axis::Last)
        } else if d == -2.0 {
            Some(Axis::SecondLast)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Let {
        name: Ident,
        value: Expr,
    },
    Assign {
        target: Ident,
        value: Expr,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
        span: Span,
    },
    /// `matrix name = value { body }`: `value` (per element) viewed as one
    /// matrix per tensor, `body` transforms it; `name` is the result.
    Matrix {
        name: Ident,
        value: Expr,
        body: Vec<Stmt>,
        /// The `matrix` keyword.
        span: Span,
    },
    /// `repeat count { body }` (inside a matrix block).
    Repeat {
        count: Expr,
        body: Vec<Stmt>,
        /// The `repeat` keyword.
        span: Span,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `@`: the matrix product (inside a matrix block).
    MatMul,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::MatMul => "@",
            BinOp::Pow => "^",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }

    /// Binding strength, loosest first (matches the grammar).
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div | BinOp::MatMul => 5,
            BinOp::Pow => 7,
        }
    }

    pub fn is_comparison(self) -> bool {
        self.precedence() == 3
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Num(f64),
    Bool(bool),
    Name(String),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call { func: Ident, args: Vec<Expr> },
    If(Box<Expr>, Box<Expr>, Box<Expr>),
}

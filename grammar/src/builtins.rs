//! The names a spec can use without declaring them.

/// How a built-in function combines its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuncKind {
    /// Elementwise arithmetic on numbers.
    Math,
    /// `select(cond, a, b)`: `a` where `cond` holds, else `b`.
    Select,
    /// A reduction over one tensor's elements; the result is one number per
    /// tensor. `sum` and `mean` also take a dimension, -1 or -2: one number
    /// per row or per column of the last two dimensions, read per element.
    TensorReduce,
    /// A reduction over every parameter's elements; one number per step.
    GlobalReduce,
    /// A reduction over every dimension but the first: one number per row
    /// (per output channel), read back by every element of its row. A tensor
    /// with fewer than two dimensions is one row.
    RowReduce,
    /// The AGR operator Ψ(x) = x − x·|x| / Σ|x| (Σ over the tensor, Ψ(0) = 0).
    Agr,
    /// `transpose(x)`: a matrix's transpose (inside a matrix block).
    Transpose,
}

pub struct Func {
    pub name: &'static str,
    pub arity: usize,
    pub kind: FuncKind,
    pub doc: &'static str,
}

pub const FUNCS: &[Func] = &[
    Func {
        name: "sqrt",
        arity: 1,
        kind: FuncKind::Math,
        doc: "square root",
    },
    Func {
        name: "abs",
        arity: 1,
        kind: FuncKind::Math,
        doc: "absolute value",
    },
    Func {
        name: "sign",
        arity: 1,
        kind: FuncKind::Math,
        doc: "-1, 0 or 1 (sign(0) = 0)",
    },
    Func {
        name: "exp",
        arity: 1,
        kind: FuncKind::Math,
        doc: "e^x",
    },
    Func {
        name: "ln",
        arity: 1,
        kind: FuncKind::Math,
        doc: "natural logarithm",
    },
    Func {
        name: "pow",
        arity: 2,
        kind: FuncKind::Math,
        doc: "pow(x, y) = x ^ y",
    },
    Func {
        name: "min",
        arity: 2,
        kind: FuncKind::Math,
        doc: "the smaller of two numbers",
    },
    Func {
        name: "max",
        arity: 2,
        kind: FuncKind::Math,
        doc: "the larger of two numbers",
    },
    Func {
        name: "clamp",
        arity: 3,
        kind: FuncKind::Math,
        doc: "clamp(x, lo, hi)",
    },
    Func {
        name: "lerp",
        arity: 3,
        kind: FuncKind::Math,
        doc: "lerp(a, b, w) = a + w * (b - a), computed as torch.lerp does (b - (b - a) * (1 - w) where w >= 0.5)",
    },
    Func {
        name: "select",
        arity: 3,
        kind: FuncKind::Select,
        doc: "select(cond, a, b): a where cond holds, else b",
    },
    Func {
        name: "transpose",
        arity: 1,
        kind: FuncKind::Transpose,
        doc: "the transpose of a matrix (inside a matrix block)",
    },
    Func {
        name: "agr",
        arity: 1,
        kind: FuncKind::Agr,
        doc: "the AGR operator x - x*|x|/sum(|x|) over the tensor",
    },
    Func {
        name: "sum",
        arity: 1,
        kind: FuncKind::TensorReduce,
        doc: "sum over the tensor's elements; sum(x, -1): over the last dimension (one value per row), sum(x, -2): over the second-to-last (one per column)",
    },
    Func {
        name: "mean",
        arity: 1,
        kind: FuncKind::TensorReduce,
        doc: "mean over the tensor's elements; mean(x, -1) and mean(x, -2): over the last or second-to-last dimension",
    },
    Func {
        name: "norm",
        arity: 1,
        kind: FuncKind::TensorReduce,
        doc: "L2 norm of the tensor",
    },
    Func {
        name: "max_abs",
        arity: 1,
        kind: FuncKind::TensorReduce,
        doc: "largest |x| in the tensor",
    },
    Func {
        name: "row_sum",
        arity: 1,
        kind: FuncKind::RowReduce,
        doc: "sum over every dimension but the first (one value per row)",
    },
    Func {
        name: "row_mean",
        arity: 1,
        kind: FuncKind::RowReduce,
        doc: "mean over every dimension but the first (one value per row)",
    },
    Func {
        name: "global_sum",
        arity: 1,
        kind: FuncKind::GlobalReduce,
        doc: "sum over every parameter's elements",
    },
    Func {
        name: "global_norm",
        arity: 1,
        kind: FuncKind::GlobalReduce,
        doc: "L2 norm over every parameter",
    },
    Func {
        name: "global_max_abs",
        arity: 1,
        kind: FuncKind::GlobalReduce,
        doc: "largest |x| over every parameter",
    },
];

pub fn func(name: &str) -> Option<&'static Func> {
    FUNCS.iter().find(|f| f.name == name)
}

/// Values every step provides.
pub const INPUTS: &[(&str, &str)] = &[
    ("p", "the parameter (assign to it to update it)"),
    ("g", "the parameter's gradient (read-only)"),
    ("t", "the step count of this parameter, 1 on its first step"),
    ("ndim", "the parameter's number of dimensions"),
    ("numel", "the parameter's number of elements"),
    (
        "rows",
        "the parameter's first dimension (1 for fewer than two dimensions)",
    ),
    (
        "cols",
        "elements per row: the product of every dimension but the first",
    ),
];

pub fn is_input(name: &str) -> bool {
    INPUTS.iter().any(|(n, _)| *n == name)
}

/// Rust keywords: hyperparameter and state names become Rust field names.
pub const RUST_KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut",
    "pub", "ref", "return", "self", "Self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
];

/// Most state buffers a spec may declare (the CPU back end passes them as a
/// fixed-size array).
pub const MAX_STATES: usize = 8;

/// Most reduction passes a step may need before its update pass.
pub const MAX_REDUCTION_PHASES: usize = 3;

/// Most statements and expression nodes a matrix block may hold. Each
/// lowers to at most a few registers and instructions, so a block within
/// this bound fits the IR's 16-bit register and instruction counts.
pub const MAX_MATRIX_OPS: usize = 10_000;

/// The closest known name, for "did you mean" hints.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3) && *d < name.len().max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn closest_suggests_near_misses_only() {
        assert_eq!(
            super::closest("bata1", ["beta1", "beta2", "lr"]),
            Some("beta1")
        );
        assert_eq!(super::closest("zzz", ["beta1", "lr"]), None);
    }
}

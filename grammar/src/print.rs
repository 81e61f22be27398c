//! The normalised text of a spec: one canonical layout, minimal parentheses.
//! Parsing the printed text gives the same syntax tree (up to spans).

use crate::ast::*;
use crate::check::fmt_num;

pub fn normalize(spec: &Spec) -> String {
    let mut out = String::new();
    for d in &spec.doc {
        out += &format!("/// {d}\n").replace("/// \n", "///\n");
    }
    out += &format!("{} {{\n", spec.name.name);
    if !spec.hypers.is_empty() {
        out += "    hyper {\n";
        for h in &spec.hypers {
            for d in &h.doc {
                out += &format!("        /// {d}\n");
            }
            out += &format!("        {}", h.name.name);
            if let Some((t, _)) = h.ty {
                out += &format!(": {}", t.keyword());
            }
            out += " = ";
            out += &match h.default {
                Literal::Bool(b) => b.to_string(),
                Literal::Num { value, integral } => num_text(value, integral),
            };
            if h.lower.is_some() || h.upper.is_some() {
                out += " where ";
                if let Some(lo) = h.lower {
                    out += &format!(
                        "{} {} ",
                        fmt_num(lo.value),
                        if lo.inclusive { "<=" } else { "<" }
                    );
                }
                out += &h.name.name;
                if let Some(hi) = h.upper {
                    out += &format!(
                        " {} {}",
                        if hi.inclusive { "<=" } else { "<" },
                        fmt_num(hi.value)
                    );
                }
            }
            out += ",\n";
        }
        out += "    }\n";
    }
    if !spec.states.is_empty() {
        out += "    state {\n";
        for s in &spec.states {
            for d in &s.doc {
                out += &format!("        /// {d}\n");
            }
            let shape = match &s.shape {
                Some(sh) => match sh.dim {
                    Some(d) => format!(": {}({})", sh.word.name, fmt_num(d)),
                    None => format!(": {}", sh.word.name),
                },
                None => String::new(),
            };
            out += &format!("        {}{shape} = {},\n", s.name.name, expr(&s.init));
        }
        out += "    }\n";
    }
    out += "    step {\n";
    stmts(&spec.step, 2, &mut out);
    out += "    }\n}\n";
    out
}

fn num_text(value: f64, integral: bool) -> String {
    if integral {
        format!("{value}")
    } else {
        let s = fmt_num(value);
        if value.is_finite() && (value.abs() >= 1e6 || (value != 0.0 && value.abs() < 1e-3)) {
            format!("{value:e}")
        } else if s.contains(['.', 'e', 'i']) {
            s
        } else {
            format!("{s}.0")
        }
    }
}

fn stmts(list: &[Stmt], depth: usize, out: &mut String) {
    let pad = "    ".repeat(depth);
    for s in list {
        match s {
            Stmt::Let { name, value } => {
                *out += &format!("{pad}let {} = {};\n", name.name, expr(value))
            }
            Stmt::Assign { target, value } => {
                *out += &format!("{pad}{} = {};\n", target.name, expr(value))
            }
            Stmt::If {
                cond,
                then,
                otherwise,
                ..
            } => {
                *out += &format!("{pad}if {} {{\n", expr(cond));
                stmts(then, depth + 1, out);
                if otherwise.is_empty() {
                    *out += &format!("{pad}}}\n");
                } else {
                    *out += &format!("{pad}}} else {{\n");
                    stmts(otherwise, depth + 1, out);
                    *out += &format!("{pad}}}\n");
                }
            }
            Stmt::Matrix {
                name, value, body, ..
            } => {
                *out += &format!("{pad}matrix {} = {} {{\n", name.name, expr(value));
                stmts(body, depth + 1, out);
                *out += &format!("{pad}}}\n");
            }
            Stmt::Repeat { count, body, .. } => {
                *out += &format!("{pad}repeat {} {{\n", expr(count));
                stmts(body, depth + 1, out);
                *out += &format!("{pad}}}\n");
            }
        }
    }
}

/// An expression with the fewest parentheses that keep its meaning.
pub fn expr(e: &Expr) -> String {
    prec_expr(e, 0)
}

fn prec_expr(e: &Expr, min: u8) -> String {
    let (text, prec) = match &e.kind {
        ExprKind::Num(v) => {
            let integral = v.fract() == 0.0 && v.abs() < 1e15;
            (num_text(*v, integral), 9)
        }
        ExprKind::Bool(b) => (b.to_string(), 9),
        ExprKind::Name(n) => (n.clone(), 9),
        ExprKind::Unary(op, a) => {
            let sym = if *op == UnOp::Neg { "-" } else { "!" };
            (format!("{sym}{}", prec_expr(a, 6)), 6)
        }
        ExprKind::Binary(BinOp::Pow, a, b) => {
            (format!("{} ^ {}", prec_expr(a, 8), prec_expr(b, 6)), 7)
        }
        ExprKind::Binary(op, a, b) => {
            let p = op.precedence();
            // Comparisons don't chain; everything else is left-associative.
            let right_min = p + 1;
            let left_min = if op.is_comparison() { p + 1 } else { p };
            (
                format!(
                    "{} {} {}",
                    prec_expr(a, left_min),
                    op.symbol(),
                    prec_expr(b, right_min)
                ),
                p,
            )
        }
        ExprKind::Call { func, args } => (
            format!(
                "{}({})",
                func.name,
                args.iter().map(expr).collect::<Vec<_>>().join(", ")
            ),
            9,
        ),
        ExprKind::If(c, a, b) => (
            format!("if {} {{ {} }} else {{ {} }}", expr(c), expr(a), expr(b)),
            0,
        ),
    };
    if prec < min {
        format!("({text})")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn strip(s: &Spec) -> String {
        // Compare trees by their printed form: spans differ after reprinting.
        normalize(s)
    }

    #[test]
    fn normalising_is_idempotent_and_keeps_meaning() {
        let src =
            "/// Doc.\nX { hyper { lr=1e-3 where lr>0, k:int=2, b=0.5 where 0<=b<1 } state{m=0,q=g}
            step { let a = (lr*(1-b)) * -(m^2)^t; m = a - (g - (1 - b)); q = g;
            if k >= 2 && !(t > 1) { p = p - a; } else { p = p / (1 + a); } } }";
        let once = normalize(&parse(src).unwrap());
        let twice = normalize(&parse(&once).unwrap());
        assert_eq!(once, twice);
        assert!(
            once.contains("let a = lr * (1 - b) * -(m ^ 2) ^ t;"),
            "{once}"
        );
        assert!(once.contains("m = a - (g - (1 - b));"), "{once}");
        assert!(once.contains("lr = 0.001 where 0 < lr,"), "{once}");
        assert!(
            normalize(&parse("X { hyper { e = 1e-8 } step { p = p; } }").unwrap())
                .contains("e = 1e-8,")
        );
        assert_eq!(strip(&parse(&once).unwrap()), once);
    }
}

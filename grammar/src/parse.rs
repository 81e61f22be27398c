//! Stage 1: spec text to syntax tree, with the pest grammar in `agr.pest`.

use pest::iterators::Pair;
use pest::Parser as _;

use crate::ast::*;
use crate::diag::{Diagnostic, Span};

#[derive(pest_derive::Parser)]
#[grammar = "agr.pest"]
struct SpecParser;

pub use self::Rule as GrammarRule;

/// Parses one spec (optionally preceded by `///` doc lines).
pub fn parse(source: &str) -> Result<Spec, Diagnostic> {
    let mut pairs = SpecParser::parse(Rule::file, source).map_err(|e| syntax_error(source, e))?;
    let file = pairs.next().expect("the file rule always yields one pair");
    let spec = file
        .into_inner()
        .next()
        .expect("a parsed file holds a spec");
    Ok(build_spec(spec))
}

fn span(p: &Pair<Rule>) -> Span {
    let s = p.as_span();
    s.start()..s.end()
}

/// Turns pest's error into a diagnostic that says what was expected.
fn syntax_error(source: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let start = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    // Point at the whole token that starts at the error position.
    let rest = &source[start.min(source.len())..];
    let len = rest
        .char_indices()
        .take_while(|(_, c)| c.is_alphanumeric() || *c == '_' || *c == '.')
        .last()
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or_else(|| rest.chars().next().map(|c| c.len_utf8()).unwrap_or(0));
    let found = if rest.is_empty() {
        "the end of the spec".to_string()
    } else {
        format!("`{}`", &rest[..len])
    };
    let (message, help) = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let mut expected: Vec<&str> = positives.iter().filter_map(|r| describe(*r)).collect();
            expected.sort();
            expected.dedup();
            let expected = match expected.len() {
                0 => "something else".to_string(),
                1 => expected[0].to_string(),
                _ => {
                    let last = expected.pop().unwrap();
                    format!("{} or {}", expected.join(", "), last)
                }
            };
            (
                format!("syntax error: expected {expected}, found {found}"),
                syntax_help(positives),
            )
        }
        ErrorVariant::CustomError { message } => (message.clone(), String::new()),
    };
    Diagnostic::new(start..start + len, message, help)
}

fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::ident => "a name",
        Rule::expr | Rule::or_expr | Rule::and_expr | Rule::cmp_expr | Rule::add_expr => {
            "an expression"
        }
        Rule::mul_expr | Rule::unary | Rule::power | Rule::paren | Rule::call => "an expression",
        Rule::number | Rule::signed_number => "a number",
        Rule::literal => "a number, `true` or `false`",
        Rule::boolean => "`true` or `false`",
        Rule::hyper_block => "`hyper { ... }`",
        Rule::state_block => "`state { ... }`",
        Rule::step_block => "`step { ... }`",
        Rule::hyper => "a hyperparameter (`name = default`)",
        Rule::state => "a state (`name = initial value`)",
        Rule::let_stmt | Rule::assign_stmt | Rule::if_stmt => "a statement",
        Rule::ty => "a type (`float`, `int` or `bool`)",
        Rule::range => "`where ...`",
        Rule::cmp_op | Rule::cmp_lo | Rule::cmp_hi => "a comparison",
        Rule::add_op | Rule::mul_op | Rule::pow_op | Rule::or_op | Rule::and_op => "an operator",
        Rule::EOI => "the end of the spec",
        Rule::doc => "a doc comment",
        _ => return None,
    })
}

fn syntax_help(positives: &[Rule]) -> String {
    if positives.contains(&Rule::step_block) {
        "a spec is `Name { hyper { ... } state { ... } step { ... } }`, in that order; only `step` is required".into()
    } else if positives
        .iter()
        .any(|r| matches!(r, Rule::mul_op | Rule::add_op))
        && !positives.contains(&Rule::expr)
    {
        "end each statement with `;` and check the operators between terms".into()
    } else if positives.contains(&Rule::range) {
        "write a range as a comparison, e.g. `beta1 = 0.9 where 0 <= beta1 < 1`".into()
    } else {
        "see the grammar summary in the README".into()
    }
}

fn docs<'a>(it: &mut std::iter::Peekable<impl Iterator<Item = Pair<'a, Rule>>>) -> Vec<String> {
    let mut out = vec![];
    while let Some(p) = it.peek() {
        if p.as_rule() != Rule::doc {
            break;
        }
        let text = it.next().unwrap().as_str();
        let text = text.strip_prefix("///").unwrap_or(text);
        out.push(
            text.strip_prefix(' ')
                .unwrap_or(text)
                .trim_end()
                .to_string(),
        );
    }
    out
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident {
        name: p.as_str().to_string(),
        span: span(&p),
    }
}

fn build_spec(p: Pair<Rule>) -> Spec {
    let mut it = p.into_inner().peekable();
    let doc = docs(&mut it);
    let name = ident(it.next().unwrap());
    let mut spec = Spec {
        doc,
        name,
        hypers: vec![],
        states: vec![],
        step: vec![],
        step_span: 0..0,
    };
    for block in it {
        match block.as_rule() {
            Rule::hyper_block => spec.hypers = block.into_inner().map(build_hyper).collect(),
            Rule::state_block => spec.states = block.into_inner().map(build_state).collect(),
            Rule::step_block => {
                let s = span(&block);
                spec.step_span = s.start..s.start + 4;
                spec.step = block.into_inner().map(build_stmt).collect();
            }
            _ => unreachable!("grammar: unexpected block {:?}", block.as_rule()),
        }
    }
    spec
}

fn signed_number(p: Pair<Rule>) -> f64 {
    let mut negative = false;
    let mut value = 0.0;
    for q in p.into_inner() {
        match q.as_rule() {
            Rule::neg => negative = true,
            Rule::inf => value = f64::INFINITY,
            // The grammar only admits digits, '.', and exponents: always valid.
            Rule::number => value = q.as_str().parse().unwrap_or(f64::NAN),
            _ => {}
        }
    }
    if negative {
        -value
    } else {
        value
    }
}

fn build_hyper(p: Pair<Rule>) -> HyperDecl {
    let mut it = p.into_inner().peekable();
    let doc = docs(&mut it);
    let name = ident(it.next().unwrap());
    let mut h = HyperDecl {
        doc,
        name,
        ty: None,
        default: Literal::Num {
            value: 0.0,
            integral: false,
        },
        default_span: 0..0,
        lower: None,
        upper: None,
        range_span: None,
        range_name: None,
    };
    for q in it {
        match q.as_rule() {
            Rule::ty => {
                let t = match q.as_str() {
                    "int" => HyperTy::Int,
                    "bool" => HyperTy::Bool,
                    _ => HyperTy::Float,
                };
                h.ty = Some((t, span(&q)));
            }
            Rule::literal => {
                h.default_span = span(&q);
                let inner = q.into_inner().next().unwrap();
                h.default = match inner.as_rule() {
                    Rule::boolean => Literal::Bool(inner.as_str() == "true"),
                    _ => {
                        let text = inner.as_str();
                        let integral = !text.contains(['.', 'e', 'E']) && !text.contains("inf");
                        Literal::Num {
                            value: signed_number(inner),
                            integral,
                        }
                    }
                };
            }
            Rule::range => {
                h.range_span = Some(span(&q));
                for r in q.into_inner() {
                    match r.as_rule() {
                        Rule::bound => {
                            let mut b = r.into_inner();
                            let value = signed_number(b.next().unwrap());
                            let inclusive = b.next().unwrap().as_str() == "<=";
                            h.lower = Some(Bound { value, inclusive });
                        }
                        Rule::ident => h.range_name = Some(ident(r)),
                        Rule::bound_hi => {
                            let mut b = r.into_inner();
                            let op = b.next().unwrap().as_str().to_string();
                            let value = signed_number(b.next().unwrap());
                            let bound = Bound {
                                value,
                                inclusive: op.ends_with('='),
                            };
                            if op.starts_with('<') {
                                h.upper = Some(bound);
                            } else {
                                // `where x > 0`: a lower bound written on the right.
                                h.lower = Some(bound);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    h
}

fn build_state(p: Pair<Rule>) -> StateDecl {
    let mut it = p.into_inner().peekable();
    let doc = docs(&mut it);
    let name = ident(it.next().unwrap());
    let init = build_expr(it.next().unwrap());
    StateDecl { doc, name, init }
}

fn build_block(p: Pair<Rule>) -> Vec<Stmt> {
    p.into_inner().map(build_stmt).collect()
}

fn build_stmt(p: Pair<Rule>) -> Stmt {
    let s = span(&p);
    match p.as_rule() {
        Rule::let_stmt => {
            let mut it = p.into_inner();
            Stmt::Let {
                name: ident(it.next().unwrap()),
                value: build_expr(it.next().unwrap()),
            }
        }
        Rule::assign_stmt => {
            let mut it = p.into_inner();
            Stmt::Assign {
                target: ident(it.next().unwrap()),
                value: build_expr(it.next().unwrap()),
            }
        }
        Rule::if_stmt => {
            let mut it = p.into_inner();
            let cond = build_expr(it.next().unwrap());
            let then = build_block(it.next().unwrap());
            let otherwise = match it.next() {
                None => vec![],
                Some(q) if q.as_rule() == Rule::if_stmt => vec![build_stmt(q)],
                Some(q) => build_block(q),
            };
            Stmt::If {
                cond,
                then,
                otherwise,
                span: s.start..s.start + 2,
            }
        }
        r => unreachable!("grammar: unexpected statement {r:?}"),
    }
}

fn build_expr(p: Pair<Rule>) -> Expr {
    let s = span(&p);
    match p.as_rule() {
        Rule::expr | Rule::paren => build_expr(p.into_inner().next().unwrap()),
        Rule::or_expr | Rule::and_expr | Rule::cmp_expr | Rule::add_expr | Rule::mul_expr => {
            // Left-associative chain: operand (op operand)*
            let mut it = p.into_inner();
            let mut lhs = build_expr(it.next().unwrap());
            while let Some(op) = it.next() {
                let rhs = build_expr(it.next().unwrap());
                let op = match op.as_str() {
                    "||" => BinOp::Or,
                    "&&" => BinOp::And,
                    "<" => BinOp::Lt,
                    "<=" => BinOp::Le,
                    ">" => BinOp::Gt,
                    ">=" => BinOp::Ge,
                    "==" => BinOp::Eq,
                    "!=" => BinOp::Ne,
                    "+" => BinOp::Add,
                    "-" => BinOp::Sub,
                    "*" => BinOp::Mul,
                    _ => BinOp::Div,
                };
                let span = lhs.span.start..rhs.span.end;
                lhs = Expr {
                    kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                    span,
                };
            }
            lhs
        }
        Rule::unary => {
            let inner: Vec<_> = p.into_inner().collect();
            let (ops, operand) = inner.split_at(inner.len() - 1);
            let mut e = build_expr(operand[0].clone());
            for op in ops.iter().rev() {
                let op_span = span(op);
                let u = if op.as_str() == "-" {
                    UnOp::Neg
                } else {
                    UnOp::Not
                };
                e = Expr {
                    span: op_span.start..e.span.end,
                    kind: ExprKind::Unary(u, Box::new(e)),
                };
            }
            e
        }
        Rule::power => {
            let mut it = p.into_inner();
            let base = build_expr(it.next().unwrap());
            match it.next() {
                None => base,
                Some(_op) => {
                    let exp = build_expr(it.next().unwrap());
                    Expr {
                        kind: ExprKind::Binary(BinOp::Pow, Box::new(base), Box::new(exp)),
                        span: s,
                    }
                }
            }
        }
        Rule::if_expr => {
            let mut it = p.into_inner();
            let c = build_expr(it.next().unwrap());
            let a = build_expr(it.next().unwrap());
            let b = build_expr(it.next().unwrap());
            Expr {
                kind: ExprKind::If(Box::new(c), Box::new(a), Box::new(b)),
                span: s,
            }
        }
        Rule::call => {
            let mut it = p.into_inner();
            let func = ident(it.next().unwrap());
            let args = it.map(build_expr).collect();
            Expr {
                kind: ExprKind::Call { func, args },
                span: s,
            }
        }
        Rule::boolean => Expr {
            kind: ExprKind::Bool(p.as_str() == "true"),
            span: s,
        },
        Rule::number => Expr {
            kind: ExprKind::Num(p.as_str().parse().unwrap_or(f64::NAN)),
            span: s,
        },
        Rule::inf => Expr {
            kind: ExprKind::Num(f64::INFINITY),
            span: s,
        },
        Rule::ident => Expr {
            kind: ExprKind::Name(p.as_str().to_string()),
            span: s,
        },
        r => unreachable!("grammar: unexpected expression {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAMW: &str = r#"
        /// AdamW.
        AdamW {
            hyper { lr = 1e-3 where lr > 0, beta1 = 0.9 where 0 <= beta1 < 1, flag = false, }
            state { m = 0 }
            step {
                m = beta1 * m + (1 - beta1) * g;
                p = p - lr * m ^ 2 ^ 3;
            }
        }
    "#;

    #[test]
    fn parses_blocks_docs_and_ranges() {
        let s = parse(ADAMW).unwrap();
        assert_eq!(s.doc, vec!["AdamW."]);
        assert_eq!(s.name.name, "AdamW");
        assert_eq!(s.hypers.len(), 3);
        let lr = &s.hypers[0];
        assert_eq!(
            lr.lower,
            Some(Bound {
                value: 0.0,
                inclusive: false
            })
        );
        assert_eq!(lr.upper, None);
        let b1 = &s.hypers[1];
        assert_eq!(
            b1.upper,
            Some(Bound {
                value: 1.0,
                inclusive: false
            })
        );
        assert_eq!(
            b1.lower,
            Some(Bound {
                value: 0.0,
                inclusive: true
            })
        );
        assert_eq!(s.hypers[2].default, Literal::Bool(false));
        assert_eq!(s.states.len(), 1);
        assert_eq!(s.step.len(), 2);
        assert_eq!(&ADAMW[s.step_span.clone()], "step");
    }

    #[test]
    fn power_is_right_associative_and_binds_tighter_than_minus() {
        let s = parse("X { step { p = -a ^ b ^ c - d * e; } }").unwrap();
        let Stmt::Assign { value, .. } = &s.step[0] else {
            panic!()
        };
        // (-(a ^ (b ^ c))) - (d * e)
        let ExprKind::Binary(BinOp::Sub, l, r) = &value.kind else {
            panic!("{value:?}")
        };
        assert!(matches!(r.kind, ExprKind::Binary(BinOp::Mul, _, _)));
        let ExprKind::Unary(UnOp::Neg, inner) = &l.kind else {
            panic!("{l:?}")
        };
        let ExprKind::Binary(BinOp::Pow, _, e) = &inner.kind else {
            panic!()
        };
        assert!(matches!(e.kind, ExprKind::Binary(BinOp::Pow, _, _)));
    }

    #[test]
    fn syntax_error_points_at_the_token_and_says_what_was_expected() {
        let src = "X { step { p = p + ; } }";
        let e = parse(src).unwrap_err();
        assert_eq!(&src[e.span.clone()], ";");
        assert!(
            e.message.contains("expected an expression"),
            "{}",
            e.message
        );
    }

    #[test]
    fn missing_semicolon_is_reported_at_the_next_token() {
        let src = "X { step { p = p * 2\n m = 1; } }";
        let e = parse(src).unwrap_err();
        assert_eq!(&src[e.span.clone()], "m");
    }
}

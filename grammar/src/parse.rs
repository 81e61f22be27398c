//! Stage 1: spec text to syntax tree, with the pest grammar in `agr.pest`.

use pest::iterators::Pair;
use pest::Parser as _;

use crate::ast::*;
use crate::diag::{Diagnostic, Span};

#[derive(pest_derive::Parser)]
#[grammar = "agr.pest"]
struct SpecParser;

pub use self::Rule as GrammarRule;

/// Parses one spec (optionally preceded by `///` doc lines); on failure,
/// the first syntax error (see [`parse_all`] for all of them).
pub fn parse(source: &str) -> Result<Spec, Diagnostic> {
    parse_all(source).map_err(|mut errors| errors.swap_remove(0))
}

/// At most this many syntax errors are reported for one spec.
pub const MAX_SYNTAX_ERRORS: usize = 20;

/// Parses one spec; on failure, every syntax error found (never empty).
///
/// After a syntax error the parser skips the statement (or declaration list)
/// holding it, up to the next `;` or the `}` closing its block, and parses
/// again, so independent mistakes are all reported at once. Byte offsets stay
/// those of `source`.
pub fn parse_all(source: &str) -> Result<Spec, Vec<Diagnostic>> {
    let mut errors = vec![];
    let mut text = source.to_string();
    while errors.len() < MAX_SYNTAX_ERRORS {
        match SpecParser::parse(Rule::file, &text) {
            Ok(mut pairs) => {
                let file = pairs.next().expect("the file rule always yields one pair");
                let spec = file
                    .into_inner()
                    .next()
                    .expect("a parsed file holds a spec");
                compound_assignments(spec.clone(), &mut errors);
                if !errors.is_empty() {
                    errors.sort_by_key(|d| d.span.start);
                    return Err(errors);
                }
                return Ok(build_spec(spec));
            }
            Err(e) => {
                let d = syntax_error(&text, e);
                let at = d.span.start;
                if errors.iter().any(|e: &Diagnostic| e.span.start == at) {
                    // Skipping did not get past this point: stop here.
                    break;
                }
                errors.push(d);
                match statement_around(&text, at) {
                    // Same length, so later offsets still index `source`.
                    Some(r) => text.replace_range(r.clone(), &" ".repeat(r.len())),
                    None => break,
                }
            }
        }
    }
    errors.sort_by_key(|d| d.span.start);
    Err(errors)
}

/// A token that matters for finding statement boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Semi,
    Open,
    Close,
    If,
    Else,
    /// `hyper`, `state` or `step`.
    Block,
    /// `matrix` or `repeat`: a statement that ends with its block.
    Blocky,
    Other,
}

/// The text as tokens (start byte, kind), comments left out.
fn tokens(text: &str) -> Vec<(usize, Tok)> {
    let mut out = vec![];
    let mut it = text.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let rest = &text[i..];
        if c.is_whitespace() {
            continue;
        }
        if rest.starts_with("//") || rest.starts_with("/*") {
            let end = if rest.starts_with("//") {
                rest.find('\n').unwrap_or(rest.len())
            } else {
                rest.find("*/").map_or(rest.len(), |e| e + 2)
            };
            while it.peek().is_some_and(|(j, _)| *j < i + end) {
                it.next();
            }
            continue;
        }
        let word = |c: char| c.is_alphanumeric() || c == '_' || c == '.';
        let tok = if word(c) {
            let len = rest.find(|c: char| !word(c)).unwrap_or(rest.len());
            while it.peek().is_some_and(|(j, _)| *j < i + len) {
                it.next();
            }
            match &rest[..len] {
                "if" => Tok::If,
                "else" => Tok::Else,
                "hyper" | "state" | "step" => Tok::Block,
                "matrix" | "repeat" => Tok::Blocky,
                _ => Tok::Other,
            }
        } else {
            match c {
                ';' => Tok::Semi,
                '{' => Tok::Open,
                '}' => Tok::Close,
                _ => Tok::Other,
            }
        };
        out.push((i, tok));
    }
    out
}

/// The index just past the `{ ... }` opening at `toks[i]` (or the end).
/// Parentheses are not tracked: a statement never holds `;` or an unmatched
/// `}` inside them, and an unbalanced `(` must not swallow the rest.
fn skip_group(toks: &[(usize, Tok)], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < toks.len() {
        match toks[i].1 {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// Splits the statements of a block starting at `toks[i]` (just inside its
/// `{`) into byte ranges, nested blocks' statements included; returns the
/// index of the block's `}` (or the end). A statement runs to its `;`, to
/// the end of its last block (`if ... { } else { }`), or up to the `}` that
/// closes the enclosing block.
fn statements(text_len: usize, toks: &[(usize, Tok)], mut i: usize, out: &mut Vec<Span>) -> usize {
    let pos = |i: usize| toks.get(i).map_or(text_len, |t| t.0);
    while i < toks.len() && toks[i].1 != Tok::Close {
        let start = i;
        if toks[i].1 == Tok::If {
            loop {
                // The condition, then the block.
                while i < toks.len() && !matches!(toks[i].1, Tok::Open | Tok::Close | Tok::Semi) {
                    i += 1;
                }
                if toks.get(i).map(|t| t.1) != Some(Tok::Open) {
                    break;
                }
                i = statements(text_len, toks, i + 1, out) + 1;
                if toks.get(i).map(|t| t.1) != Some(Tok::Else) {
                    break;
                }
                i += 1;
                if toks.get(i).map(|t| t.1) == Some(Tok::Open) {
                    i = statements(text_len, toks, i + 1, out) + 1;
                    break;
                }
            }
            if toks.get(i).map(|t| t.1) == Some(Tok::Semi) {
                i += 1;
            }
        } else if toks[i].1 == Tok::Blocky
            && toks[i + 1..]
                .iter()
                .find(|t| matches!(t.1, Tok::Open | Tok::Close | Tok::Semi))
                .map(|t| t.1)
                == Some(Tok::Open)
        {
            // `matrix x = value { ... }`, `repeat n { ... }`: up to the block, then its statements.
            while toks[i].1 != Tok::Open {
                i += 1;
            }
            i = statements(text_len, toks, i + 1, out) + 1;
        } else {
            while i < toks.len() && !matches!(toks[i].1, Tok::Semi | Tok::Close) {
                i = match toks[i].1 {
                    Tok::Open => skip_group(toks, i),
                    _ => i + 1,
                };
            }
            if toks.get(i).map(|t| t.1) == Some(Tok::Semi) {
                i += 1;
            }
        }
        // A block without its `}` (cut off, or swallowed by an unclosed
        // comment) ends at the end.
        i = i.min(toks.len());
        let end = if i > start && toks[i - 1].1 != Tok::Close && toks[i - 1].1 != Tok::Semi {
            // Ends without `;` at the enclosing `}`: up to it.
            pos(i)
        } else {
            i.checked_sub(1)
                .and_then(|k| toks.get(k))
                .map_or(text_len, |t| t.0 + 1)
        };
        out.push(pos(start)..end);
    }
    i
}

/// What to skip after a syntax error at `at`: in `hyper { ... }` or
/// `state { ... }` the whole list; in `step { ... }` the innermost statement
/// holding it (from its first token to its `;`, to the end of its last block
/// for an `if`, or up to the `}` closing its block). `None` when there is
/// nothing to skip (the error is in the spec's header or at its end).
fn statement_around(text: &str, at: usize) -> Option<Span> {
    let toks = tokens(text);
    let non_blank = |r: Span| Some(r.clone()).filter(|_| !text[r].trim().is_empty());
    let mut i = 0;
    while i + 1 < toks.len() {
        if toks[i].1 != Tok::Block || toks[i + 1].1 != Tok::Open {
            i += 1;
            continue;
        }
        let is_step = text[toks[i].0..].starts_with("step");
        let open = i + 1;
        let close = skip_group(&toks, open) - 1;
        let (lo, hi) = (toks[open].0, toks.get(close).map_or(text.len(), |t| t.0));
        if at > lo && at <= hi {
            if !is_step {
                return non_blank(lo + 1..hi);
            }
            let mut stmts = vec![];
            statements(text.len(), &toks, open + 1, &mut stmts);
            return stmts
                .into_iter()
                .filter(|r| r.start <= at && at <= r.end)
                .min_by_key(|r| r.len())
                .and_then(|r| non_blank(r.start..r.end.min(text.len())));
        }
        i = close.max(i + 1);
    }
    None
}

/// `p -= x;` and friends parse only to be rejected with the way to write them.
fn compound_assignments(p: Pair<Rule>, errors: &mut Vec<Diagnostic>) {
    for q in p.into_inner().flatten() {
        if q.as_rule() != Rule::compound_assign {
            continue;
        }
        let mut it = q.into_inner();
        let target = it.next().unwrap().as_str();
        let op_pair = it.next().unwrap();
        let op = op_pair.as_str().chars().next().unwrap_or('+');
        let value = it.next().unwrap();
        let text = value
            .as_str()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let rhs = if text.chars().count() > 40 {
            "(...)".to_string()
        } else if is_atom(value) {
            text
        } else {
            format!("({text})")
        };
        errors.push(Diagnostic::new(
            span(&op_pair),
            "compound assignment is not supported",
            format!("write `{target} = {target} {op} {rhs};`"),
        ));
    }
}

/// Whether an expression needs no parentheses as an operand.
fn is_atom(p: Pair<Rule>) -> bool {
    match p.as_rule() {
        Rule::paren | Rule::call | Rule::ident | Rule::number | Rule::boolean | Rule::inf => true,
        Rule::expr
        | Rule::or_expr
        | Rule::and_expr
        | Rule::cmp_expr
        | Rule::add_expr
        | Rule::mul_expr
        | Rule::unary
        | Rule::power => {
            let mut inner = p.into_inner();
            match (inner.next(), inner.next()) {
                (Some(only), None) => is_atom(only),
                _ => false,
            }
        }
        _ => false,
    }
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
        Rule::state_shape => "a state shape: `reduced(-1)`, `reduced(-2)` or `per_tensor`",
        Rule::let_stmt
        | Rule::assign_stmt
        | Rule::if_stmt
        | Rule::matrix_stmt
        | Rule::repeat_stmt
        | Rule::compound_assign => "a statement",
        Rule::ty => "a type (`float`, `int` or `bool`)",
        Rule::range => "`where ...`",
        Rule::cmp_op | Rule::cmp_lo | Rule::cmp_hi => "a comparison",
        Rule::add_op | Rule::mul_op | Rule::pow_op | Rule::or_op | Rule::and_op => "an operator",
        Rule::EOI => "the end of the spec",
        // Tried where `=` was expected after a name.
        Rule::compound_op => "`=`",
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
    let next = it.next().unwrap();
    let (shape, init) = if next.as_rule() == Rule::state_shape {
        let span = span(&next);
        let mut parts = next.into_inner();
        let word = ident(parts.next().unwrap());
        let dim = parts.next().map(signed_number);
        let shape = StateShape { word, dim, span };
        (Some(shape), build_expr(it.next().unwrap()))
    } else {
        (None, build_expr(next))
    };
    StateDecl {
        doc,
        name,
        init,
        shape,
    }
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
        Rule::matrix_stmt => {
            let mut it = p.into_inner();
            it.next(); // the keyword
            Stmt::Matrix {
                name: ident(it.next().unwrap()),
                value: build_expr(it.next().unwrap()),
                body: build_block(it.next().unwrap()),
                span: s.start..s.start + "matrix".len(),
            }
        }
        Rule::repeat_stmt => {
            let mut it = p.into_inner();
            it.next(); // the keyword
            Stmt::Repeat {
                count: build_expr(it.next().unwrap()),
                body: build_block(it.next().unwrap()),
                span: s.start..s.start + "repeat".len(),
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
                    "@" => BinOp::MatMul,
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

    #[test]
    fn compound_assignment_says_how_to_write_it() {
        for (src, op, help) in [
            ("X { step { p -= g; } }", "-=", "write `p = p - g;`"),
            (
                "X { hyper { lr = 1 } step { p -= lr * g; } }",
                "-=",
                "write `p = p - (lr * g);`",
            ),
            ("X { step { p *= 0.5; } }", "*=", "write `p = p * 0.5;`"),
            (
                "X { step { p /= (1 + g); } }",
                "/=",
                "write `p = p / (1 + g);`",
            ),
            (
                "X { state { m = 0 } step { m += sign(g); p = p - m; } }",
                "+=",
                "write `m = m + sign(g);`",
            ),
            ("X { step { p ^= -g; } }", "^=", "write `p = p ^ (-g);`"),
        ] {
            let e = parse_all(src).unwrap_err();
            assert_eq!(e.len(), 1, "{src}: {e:?}");
            assert_eq!(&src[e[0].span.clone()], op, "{src}");
            assert_eq!(e[0].message, "compound assignment is not supported");
            assert_eq!(e[0].help, help, "{src}");
        }
        // Inside an `if` too, and each one is reported.
        let src = "X { step { if t > 1 { p -= g; } else { p += g; } } }";
        let e = parse_all(src).unwrap_err();
        let at: Vec<&str> = e.iter().map(|d| &src[d.span.clone()]).collect();
        assert_eq!(at, ["-=", "+="]);
    }

    #[test]
    fn independent_syntax_errors_are_all_reported() {
        let src = "X {\n  hyper { lr = 0.1 }\n  step {\n    let a = g * ;\n    let b = (g + 1;\n    p = p - lr * a * b;\n  }\n}";
        let e = parse_all(src).unwrap_err();
        let at: Vec<(&str, &str)> = e
            .iter()
            .map(|d| (&src[d.span.clone()], d.message.as_str()))
            .collect();
        assert_eq!(at.len(), 2, "{at:?}");
        assert_eq!(at[0].0, ";");
        assert!(at[0].1.contains("expected an expression"), "{at:?}");
        assert_eq!(crate::diag::line_col(src, e[0].span.start), (4, 17));
        assert_eq!(crate::diag::line_col(src, e[1].span.start), (5, 19));
        // The first error alone, as before.
        assert_eq!(parse(src).unwrap_err(), e[0]);
    }

    #[test]
    fn a_block_that_never_closes_is_an_error_not_a_panic() {
        // Found by the property test (an unclosed comment swallowed every
        // `}` after an `if`'s block opened), shrunk: the recovery's scan of
        // a block that never closes ran past the last token.
        for src in [
            "A{hyper{}step{if{",
            "A { step { if t == 1 { p = g; } else { p = p /* g; } } }",
            "A { step { if t > 1 { if t > 2 { matrix x = g { repeat 2 {",
            "A { step { matrix x = g { x = x /* 2; } p = x; } }",
        ] {
            let e = parse_all(src).unwrap_err();
            assert!(!e.is_empty(), "{src}");
            for d in &e {
                assert!(d.span.end <= src.len(), "{src}: {d:?}");
            }
        }
    }

    #[test]
    fn recovery_skips_whole_statements_and_blocks() {
        // Errors in a declaration list, an `if` condition (with its block and
        // `else`), a nested block and a compound assignment: one report each.
        let src = "X { hyper { lr = 0.1 where lr > , k = 2 }
                    step {
                        if t >> 1 { p = p; } else { p = p - g; }
                        if t > 1 { p = p +; }
                        p -= lr * g;
                        p = p * 2
                    }
                  }";
        let e = parse_all(src).unwrap_err();
        let at: Vec<&str> = e.iter().map(|d| &src[d.span.clone()]).collect();
        assert_eq!(at, [",", ">", ";", "-=", "}"], "{e:?}");
        // Errors with nothing to skip stop the search.
        assert_eq!(parse_all("X step { p = p; }").unwrap_err().len(), 1);
        assert_eq!(parse_all("X { step { p = p; }").unwrap_err().len(), 1);
        assert_eq!(parse_all("").unwrap_err().len(), 1);
    }

    #[test]
    fn recovery_on_mutated_builtins_keeps_spans_in_bounds_and_distinct() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agr-runtime/specs");
        let mut x: u64 = 88172645463325252;
        let mut rnd = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let pieces = [
            ";", "{", "}", "(", ")", "=", "-=", "+", "if", "else", "let", ",", "é", "", " ",
            "where", "\n", "<", "x", "//",
        ];
        let (mut failed, mut several) = (0, 0);
        for f in std::fs::read_dir(&dir).unwrap() {
            let src = std::fs::read_to_string(f.unwrap().path()).unwrap();
            for _ in 0..100 {
                let mut s = src.clone();
                for _ in 0..1 + rnd(3) {
                    let mut at = rnd(s.len() + 1);
                    while !s.is_char_boundary(at) {
                        at -= 1;
                    }
                    let mut end = (at + rnd(4)).min(s.len());
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    s.replace_range(at..end, pieces[rnd(pieces.len())]);
                }
                let Err(e) = parse_all(&s) else { continue };
                failed += 1;
                several += (e.len() > 1) as usize;
                assert!(!e.is_empty() && e.len() <= MAX_SYNTAX_ERRORS);
                for d in &e {
                    assert!(
                        d.span.start <= d.span.end && d.span.end <= s.len(),
                        "{s}\n{d:?}"
                    );
                    d.render("x.agr", &s);
                }
                let starts: Vec<usize> = e.iter().map(|d| d.span.start).collect();
                assert!(starts.windows(2).all(|w| w[0] < w[1]), "{s}\n{e:?}");
                assert_eq!(parse(&s).unwrap_err(), e[0]);
            }
        }
        assert!(failed > 500 && several > 0, "{failed} {several}");
    }
}

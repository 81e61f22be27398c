//! The `optimizer!` token path: a Rust token stream flattened back into
//! spec text for the grammar, remembering which token each byte came from so
//! that an error's byte offset maps back to the offending token's span.
//! (Lives outside the proc-macro crate so that it can be tested and fuzzed.)

use proc_macro2::{Delimiter, Span, TokenStream as TokenStream2, TokenTree};

/// The macro input flattened back into spec text, remembering which token
/// each byte came from so errors can point at it.
pub struct Flat {
    pub text: String,
    /// (start byte, span) of each token, in order.
    spans: Vec<(usize, Span)>,
}

impl Flat {
    pub fn new(input: TokenStream2) -> Flat {
        let mut f = Flat {
            text: String::new(),
            spans: vec![],
        };
        f.push_stream(input);
        f
    }

    fn push(&mut self, text: &str, span: Span) {
        self.spans.push((self.text.len(), span));
        self.text.push_str(text);
    }

    fn push_stream(&mut self, input: TokenStream2) {
        let toks: Vec<TokenTree> = input.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            // `/// text` arrives as `#[doc = "text"]`: turn it back into a doc line.
            if let (TokenTree::Punct(p), Some(TokenTree::Group(g))) = (&toks[i], toks.get(i + 1)) {
                if p.as_char() == '#' && g.delimiter() == Delimiter::Bracket {
                    if let Some(doc) = doc_text(g.stream()) {
                        let line = format!("///{doc}\n");
                        self.push(&line, p.span());
                        i += 2;
                        continue;
                    }
                }
            }
            match &toks[i] {
                TokenTree::Group(g) => {
                    let (open, close) = match g.delimiter() {
                        Delimiter::Brace => ("{ ", " }"),
                        Delimiter::Bracket => ("[ ", " ]"),
                        Delimiter::Parenthesis => ("( ", " )"),
                        Delimiter::None => (" ", " "),
                    };
                    self.push(open, g.span_open());
                    self.push_stream(g.stream());
                    self.push(close, g.span_close());
                    self.text.push(' ');
                }
                TokenTree::Ident(id) => {
                    self.push(&id.to_string(), id.span());
                    self.text.push(' ');
                }
                TokenTree::Punct(p) => {
                    self.push(&p.as_char().to_string(), p.span());
                    if p.spacing() == proc_macro2::Spacing::Alone {
                        self.text.push(' ');
                    }
                }
                TokenTree::Literal(l) => {
                    self.push(&l.to_string(), l.span());
                    self.text.push(' ');
                }
            }
            i += 1;
        }
    }

    /// The span of the token that covers byte `at` (or the nearest before it).
    pub fn span_at(&self, at: usize) -> Span {
        let idx = self.spans.partition_point(|(start, _)| *start <= at);
        if idx == 0 {
            self.spans
                .first()
                .map(|s| s.1)
                .unwrap_or_else(Span::call_site)
        } else {
            self.spans[idx - 1].1
        }
    }
}

/// `doc = "text"` → `text`.
fn doc_text(attr: TokenStream2) -> Option<String> {
    let toks: Vec<TokenTree> = attr.into_iter().collect();
    match toks.as_slice() {
        [TokenTree::Ident(i), TokenTree::Punct(p), TokenTree::Literal(l)]
            if i == "doc" && p.as_char() == '=' =>
        {
            let s = syn::parse2::<syn::LitStr>(TokenTree::Literal(l.clone()).into()).ok()?;
            Some(s.value().replace('\n', " "))
        }
        _ => None,
    }
}

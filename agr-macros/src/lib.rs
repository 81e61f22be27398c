//! `optimizer!`: an agr spec, written inline or in a `.agr` file, becomes a
//! config type, a fused CPU kernel and an optimizer type.
//!
//! ```ignore
//! agr_runtime::optimizer! {
//!     /// SGD with momentum and Ψ.
//!     SgdmAgr {
//!         hyper { lr = 1e-2 where lr > 0, momentum = 0.9 where 0 <= momentum < 1 }
//!         state { b = 0 }
//!         step { b = momentum * b + agr(g); p = p - lr * b; }
//!     }
//! }
//! // or: agr_runtime::optimizer! { file = "specs/sgdm_agr.agr" }
//! ```
//!
//! Every mistake in a spec becomes `compile_error!` at the offending token;
//! the macro never panics.

use proc_macro::TokenStream;
use proc_macro2::{Delimiter, Span, TokenStream as TokenStream2, TokenTree};
use quote::{quote, quote_spanned};

use agr_grammar::Diagnostic;

#[proc_macro]
pub fn optimizer(input: TokenStream) -> TokenStream {
    let input = TokenStream2::from(input);
    let out = match std::panic::catch_unwind(|| expand(input)) {
        Ok(ts) => ts,
        Err(_) => quote! {
            compile_error!("internal error in agr's optimizer! macro; please report it with the spec that caused it");
        },
    };
    out.into()
}

fn expand(input: TokenStream2) -> TokenStream2 {
    if let Some(file) = file_form(&input) {
        return expand_file(file);
    }
    let flat = Flat::new(input);
    match compile(&flat.text) {
        Ok(code) => code,
        Err(diags) => {
            let errors = diags.iter().map(|d| {
                let span = flat.span_at(d.span.start);
                let msg = d.text();
                quote_spanned! {span=> compile_error!(#msg); }
            });
            quote! { #(#errors)* }
        }
    }
}

/// `file = "path.agr"`: returns the literal.
fn file_form(input: &TokenStream2) -> Option<proc_macro2::Literal> {
    let toks: Vec<TokenTree> = input.clone().into_iter().collect();
    match toks.as_slice() {
        [TokenTree::Ident(i), TokenTree::Punct(p), TokenTree::Literal(l)]
            if i == "file" && p.as_char() == '=' =>
        {
            Some(l.clone())
        }
        _ => None,
    }
}

fn expand_file(lit: proc_macro2::Literal) -> TokenStream2 {
    let span = lit.span();
    let err = |msg: String| quote_spanned! {span=> compile_error!(#msg); };
    let Ok(path) = syn::parse2::<syn::LitStr>(TokenTree::Literal(lit.clone()).into()) else {
        return err(
            "`file = ...` takes a string literal: the spec's path relative to the crate root"
                .into(),
        );
    };
    let rel = path.value();
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let full = std::path::Path::new(&root).join(&rel);
    let source = match std::fs::read_to_string(&full) {
        Ok(s) => s,
        Err(e) => {
            return err(format!(
                "cannot read spec file `{rel}` (relative to the crate root): {e}"
            ))
        }
    };
    match compile(&source) {
        Ok(code) => {
            let full = full.to_string_lossy().to_string();
            // Rebuild when the spec file changes.
            quote! {
                const _: &[u8] = include_bytes!(#full);
                #code
            }
        }
        Err(diags) => {
            let errors = diags.iter().map(|d| err(d.render(&rel, &source)));
            quote! { #(#errors)* }
        }
    }
}

fn compile(source: &str) -> Result<TokenStream2, Vec<Diagnostic>> {
    let prog = agr_codegen::compile(source)?;
    use agr_codegen::backend::{cuda, rust};
    let first = rust::emit(&prog);
    let cuda_source = cuda::full_source(&prog);
    let embedded = rust::Embedded {
        generated_rust: &first,
        cuda_source: &cuda_source,
    };
    let code = rust::emit_with(&prog, Some(embedded));
    match code.parse::<TokenStream2>() {
        Ok(ts) => Ok(ts),
        Err(e) => {
            Ok({
                let msg = format!("internal error: agr generated Rust that does not tokenize ({e}); please report it");
                quote! { compile_error!(#msg); }
            })
        }
    }
}

/// The macro input flattened back into spec text, remembering which token
/// each byte came from so errors can point at it.
struct Flat {
    text: String,
    /// (start byte, span) of each token, in order.
    spans: Vec<(usize, Span)>,
}

impl Flat {
    fn new(input: TokenStream2) -> Flat {
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
    fn span_at(&self, at: usize) -> Span {
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

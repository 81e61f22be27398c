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

use agr_codegen::tokens::Flat;
use proc_macro::TokenStream;
use proc_macro2::{TokenStream as TokenStream2, TokenTree};
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
        Ok((code, warnings)) => {
            let warnings = warnings
                .iter()
                .map(|d| warning(flat.span_at(d.span.start), &d.text()));
            quote! { #code #(#warnings)* }
        }
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
        Ok((code, warnings)) => {
            let full = full.to_string_lossy().to_string();
            let warnings = warnings
                .iter()
                .map(|d| d.render(&rel, &source))
                .map(|r| warning(span, r.trim_end().trim_start_matches("warning: ")));
            // Rebuild when the spec file changes.
            quote! {
                const _: &[u8] = include_bytes!(#full);
                #code
                #(#warnings)*
            }
        }
        Err(diags) => {
            // compile_error! prints its own `error: `: keep one.
            let errors = diags.iter().map(|d| {
                let r = d.render(&rel, &source);
                err(r.trim_end().trim_start_matches("error: ").to_string())
            });
            quote! { #(#errors)* }
        }
    }
}

/// A rustc warning at `span` that does not stop the build. Stable Rust has no
/// way for a proc-macro to emit a warning, so this uses the standard trick:
/// an item marked `#[deprecated]` with the message as its note, used at
/// `span`. rustc prints `warning: use of deprecated constant
/// `_::agr_warning`: <message>`, which `#[allow(deprecated)]` silences.
fn warning(span: proc_macro2::Span, message: &str) -> TokenStream2 {
    let used = proc_macro2::Ident::new("agr_warning", span);
    quote! {
        const _: () = {
            #[deprecated(note = #message)]
            #[allow(non_upper_case_globals)]
            const agr_warning: () = ();
            #used
        };
    }
}

/// The generated code and the spec's warnings.
fn compile(source: &str) -> Result<(TokenStream2, Vec<Diagnostic>), Vec<Diagnostic>> {
    let (prog, warnings) = agr_codegen::compile_with_warnings(source)?;
    use agr_codegen::backend::{cuda, rust};
    let first = rust::emit(&prog);
    let cuda_kernel_source = cuda::emit(&prog);
    let cuda_source = cuda::full_source(&prog);
    let embedded = rust::Embedded {
        generated_rust: &first,
        cuda_source: &cuda_source,
        cuda_kernel_source: &cuda_kernel_source,
    };
    let code = rust::emit_with(&prog, Some(embedded));
    match code.parse::<TokenStream2>() {
        Ok(ts) => Ok((ts, warnings)),
        Err(e) => {
            Ok({
                let msg = format!("internal error: agr generated Rust that does not tokenize ({e}); please report it");
                (quote! { compile_error!(#msg); }, vec![])
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every identifier named `name`, depth first, with its span.
    fn idents(ts: TokenStream2, name: &str, out: &mut Vec<proc_macro2::Span>) {
        for t in ts {
            match t {
                TokenTree::Ident(i) if i == name => out.push(i.span()),
                TokenTree::Group(g) => idents(g.stream(), name, out),
                _ => {}
            }
        }
    }

    #[test]
    fn an_unused_hyperparameter_becomes_a_deprecation_warning_at_its_name() {
        // Parsed from text, so every token has its own span (the dev build
        // enables proc-macro2's span locations).
        let input: TokenStream2 = "X { hyper { lr = 0.1, beta = 0.9 } step { p = p - lr * g; } }"
            .parse()
            .unwrap();
        let out = expand(input.clone());
        let text = out.to_string();
        assert!(!text.contains("compile_error"), "{text}");
        assert_eq!(text.matches("deprecated").count(), 1, "{text}");
        assert!(
            text.contains("hyperparameter `beta` is never used"),
            "{text}"
        );
        let mut beta = vec![];
        idents(input, "beta", &mut beta);
        let mut used = vec![];
        idents(out, "agr_warning", &mut used);
        // Declared, then used at `beta`: rustc reports the use.
        assert_eq!(used.len(), 2, "{text}");
        assert_eq!(format!("{:?}", used[1]), format!("{:?}", beta[0]));
        assert_ne!(format!("{:?}", used[0]), format!("{:?}", beta[0]));
    }

    #[test]
    fn a_spec_using_every_hyperparameter_gets_no_warning() {
        let out = expand(quote! {
            X { hyper { lr = 0.1, on = true } step { p = if on { p - lr * g } else { p }; } }
        })
        .to_string();
        assert!(!out.contains("compile_error"), "{out}");
        assert!(!out.contains("deprecated"), "{out}");
    }

    #[test]
    fn a_spec_file_error_says_error_once() {
        let out = expand(quote! { file = "tests/specs/bad.agr" }).to_string();
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("unknown name `gg`"), "{out}");
        assert!(out.contains("tests/specs/bad.agr:4:"), "{out}");
        assert!(!out.contains("error: error"), "{out}");
        assert!(!out.contains("\"error: "), "{out}");
    }
}

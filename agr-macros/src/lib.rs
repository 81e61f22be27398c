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
    let cuda_kernel_source = cuda::emit(&prog);
    let cuda_source = cuda::full_source(&prog);
    let embedded = rust::Embedded {
        generated_rust: &first,
        cuda_source: &cuda_source,
        cuda_kernel_source: &cuda_kernel_source,
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

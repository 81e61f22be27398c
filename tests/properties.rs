//! Property tests: Ψ's guarantees from the paper, every built-in's fused CPU
//! step against the unfused reference evaluation of its IR, and the spec
//! compiler on arbitrary and mutated input (a bounded fuzz run: zero panics,
//! every rejection with a location inside the input).

use agr_codegen::{backend, interp};
use agr_runtime::{optim, HyperValue, ParamMut};
use proptest::prelude::*;

agr_runtime::optimizer! {
    /// Writes Ψ(g) into the parameter.
    Psi { step { p = agr(g); } }
}

fn gradient() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![3 => -1e3f32..1e3f32, 1 => Just(0.0f32), 1 => -1e-6f32..1e-6f32],
        1..300,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Theorem 4.1 of the paper: ‖Ψ(g)‖₂ ≤ ‖g‖₂; and Ψ keeps each element's
    /// sign and never grows it.
    #[test]
    fn psi_never_grows_the_gradient(g in gradient()) {
        let mut p = vec![0.0f32; g.len()];
        let mut opt = Psi::with_config(PsiConfig::default()).unwrap();
        opt.step_params(&mut [ParamMut::new(&mut p, Some(&g), &[g.len()])]).unwrap();
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        prop_assert!(norm(&p) <= norm(&g) * (1.0 + 1e-6), "{} > {}", norm(&p), norm(&g));
        for (psi, gi) in p.iter().zip(&g) {
            prop_assert!(psi.is_finite());
            prop_assert!(f64::from(*psi) * f64::from(*gi) >= 0.0, "sign flipped: {gi} -> {psi}");
            prop_assert!(psi.abs() <= gi.abs(), "grew: {gi} -> {psi}");
        }
    }
}

/// Any finite, non-zero f32: normal and subnormal, of either sign.
fn nonzero_f32() -> impl Strategy<Value = f32> {
    (prop::num::f32::NORMAL
        | prop::num::f32::SUBNORMAL
        | prop::num::f32::NEGATIVE
        | prop::num::f32::POSITIVE)
        .prop_filter("finite and non-zero", |x| x.is_finite() && *x != 0.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The published code computes g − g·(|g|/Σ|g|) with a true division: in a
    /// one-element tensor |g|/|g| = 1 and Ψ(g) = 0 exactly, for every f32.
    #[test]
    fn psi_of_a_one_element_tensor_is_exactly_zero(x in nonzero_f32()) {
        let g = [x];
        let mut p = [f32::NAN];
        let mut opt = Psi::with_config(PsiConfig::default()).unwrap();
        opt.step_params(&mut [ParamMut::new(&mut p, Some(&g), &[1])]).unwrap();
        prop_assert_eq!(p[0].to_bits(), 0.0f32.to_bits(), "Ψ([{:e}]) = {:e}", x, p[0]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Likewise where one element carries all of Σ|g|, in tensors large enough
    /// to span many chunks and threads.
    #[test]
    fn psi_of_a_single_non_zero_element_is_exactly_zero(
        n in prop_oneof![1usize..64, 64usize..200_000],
        at in any::<prop::sample::Index>(),
        x in nonzero_f32(),
    ) {
        let mut g = vec![0.0f32; n];
        g[at.index(n)] = x;
        let mut p = vec![f32::NAN; n];
        let mut opt = Psi::with_config(PsiConfig::default()).unwrap();
        opt.step_params(&mut [ParamMut::new(&mut p, Some(&g), &[n])]).unwrap();
        for (i, v) in p.iter().enumerate() {
            prop_assert_eq!(v.to_bits(), 0.0f32.to_bits(), "element {} of {} (g = {:e}): {:e}", i, n, x, v);
        }
    }
}

const BUILTINS: &[&str] = &[
    "adamw",
    "adamw_agr",
    "adamw_agr_m",
    "adan",
    "adan_agr",
    "adam",
    "rmsprop",
    "sgdm",
    "sgdm_agr",
    "lion",
    "lion_agr",
    "acprop",
    "lamb",
    "adamw_gc",
    "adopt",
    "cadamw_agr",
];

fn shapes() -> impl Strategy<Value = Vec<Vec<usize>>> {
    prop::collection::vec(
        prop_oneof![
            (1usize..40).prop_map(|n| vec![n]),
            (1usize..9, 1usize..9).prop_map(|(a, b)| vec![a, b]),
        ],
        1..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The generated, fused, hoisted CPU step equals the unfused reference
    /// evaluation of the same IR.
    #[test]
    fn fused_cpu_steps_equal_the_reference_evaluation(
        which in 0..BUILTINS.len(),
        shapes in shapes(),
        seed in any::<u64>(),
        lr in 1e-4f64..1e-1,
    ) {
        let name = BUILTINS[which];
        let b = optim::builtin(name).unwrap();
        let prog = agr_codegen::compile(b.source).unwrap();
        let mut opt = b.make();
        opt.set_hyper("lr", HyperValue::Float(lr)).unwrap();
        let hyper: Vec<f64> = prog.hypers.iter().map(|h| match opt.hyper(&h.name).unwrap() {
            HyperValue::Float(v) => v,
            HyperValue::Int(i) => i as f64,
            HyperValue::Bool(b) => f64::from(u8::from(b)),
        }).collect();
        let mut rng = seed;
        let mut next = move || {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut values: Vec<Vec<f32>> = shapes.iter().map(|s| (0..s.iter().product::<usize>()).map(|_| next()).collect()).collect();
        let mut reference: Vec<interp::TensorData> =
            shapes.iter().zip(&values).map(|(s, v)| interp::TensorData::new(&prog, s.clone(), v.clone())).collect();
        for _ in 0..3 {
            let grads: Vec<Vec<f32>> = values.iter().map(|v| v.iter().map(|_| next()).collect()).collect();
            let mut params: Vec<ParamMut<'_>> =
                values.iter_mut().zip(&grads).zip(&shapes).map(|((v, g), s)| ParamMut::new(v, Some(g), s)).collect();
            opt.step_params(&mut params).unwrap();
            for (t, g) in reference.iter_mut().zip(&grads) {
                t.g = g.clone();
            }
            interp::step(&prog, &hyper, &mut reference);
        }
        for (k, (ours, r)) in values.iter().zip(&reference).enumerate() {
            for (i, (x, y)) in ours.iter().zip(&r.p).enumerate() {
                prop_assert!((x - y).abs() <= 1e-6 + 1e-5 * y.abs(), "{name} tensor {k}[{i}]: fused {x} vs reference {y}");
            }
        }
    }
}

/// Compiles and prints `source` with both back ends; every error must point
/// inside the input. Panics (the property's failure) are what we look for.
fn compile_everything(source: &str) -> Result<(), String> {
    match agr_codegen::compile(source) {
        Ok(prog) => {
            let rust = backend::rust::emit(&prog);
            let cuda = backend::cuda::emit(&prog);
            if rust.is_empty() || cuda.is_empty() {
                return Err("empty output".into());
            }
            Ok(())
        }
        Err(diags) => {
            if diags.is_empty() {
                return Err("rejected without an error".into());
            }
            for d in diags {
                if d.span.start > source.len()
                    || d.span.end > source.len()
                    || d.span.start > d.span.end
                {
                    return Err(format!(
                        "span {:?} outside the input of {} bytes",
                        d.span,
                        source.len()
                    ));
                }
                if d.message.is_empty() {
                    return Err("an error without a message".into());
                }
                let _ = d.render("fuzz.agr", source);
            }
            Ok(())
        }
    }
}

/// Grammar-aware mutations of a real spec: delete, duplicate or replace a
/// token-sized piece with one from a vocabulary of the language.
fn mutated_spec() -> impl Strategy<Value = String> {
    const VOCAB: &[&str] = &[
        "agr(",
        "sum(",
        "row_mean(",
        "global_norm(",
        "if",
        "else",
        "{",
        "}",
        "(",
        ")",
        ";",
        "=",
        "let",
        "p",
        "g",
        "t",
        "m",
        "*",
        "/",
        "^",
        "-",
        "<=",
        "&&",
        "!",
        "0",
        "1e400",
        "where",
        "hyper",
        "state",
        "step",
        ",",
        "inf",
        "true",
        "int",
        ":",
        "select(",
        "sqrt(",
        "\u{1F600}",
        "///",
        "\n",
    ];
    (
        0..BUILTINS.len(),
        prop::collection::vec(
            (any::<prop::sample::Index>(), 0usize..3, 0..VOCAB.len()),
            1..6,
        ),
    )
        .prop_map(|(which, edits)| {
            let mut s = optim::builtin(BUILTINS[which]).unwrap().source.to_string();
            for (at, kind, word) in edits {
                let mut i = at.index(s.len() + 1);
                while !s.is_char_boundary(i) {
                    i -= 1;
                }
                let mut j = (i + 1 + word % 7).min(s.len());
                while !s.is_char_boundary(j) {
                    j += 1;
                }
                match kind {
                    0 => s.replace_range(i..j, ""),
                    1 => s.insert_str(i, VOCAB[word]),
                    _ => s.replace_range(i..j, VOCAB[word]),
                }
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20000, ..ProptestConfig::default() })]

    #[test]
    fn the_compiler_never_panics_on_mutated_specs(s in mutated_spec()) {
        prop_assert!(compile_everything(&s).is_ok(), "{:?}", compile_everything(&s));
    }

    #[test]
    fn the_compiler_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
        prop_assert!(compile_everything(&s).is_ok(), "{:?}", compile_everything(&s));
    }
}

/// The macro's token path: text → Rust tokens → flattened spec text →
/// compiler; every error's offset maps back to a token without panicking.
fn through_tokens(source: &str) -> Result<(), String> {
    use std::str::FromStr;
    // Inputs that are not valid Rust tokens never reach the macro.
    let Ok(tokens) = proc_macro2::TokenStream::from_str(source) else {
        return Ok(());
    };
    let flat = agr_codegen::tokens::Flat::new(tokens);
    match agr_codegen::compile(&flat.text) {
        Ok(_) => Ok(()),
        Err(diags) => {
            for d in diags {
                if d.span.start > flat.text.len() {
                    return Err(format!("span {:?} outside the flattened text", d.span));
                }
                let _ = flat.span_at(d.span.start);
            }
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn the_token_path_never_panics_on_mutated_specs(s in mutated_spec()) {
        prop_assert!(through_tokens(&s).is_ok(), "{:?}", through_tokens(&s));
    }
}

#[test]
fn every_builtin_compiles_through_the_token_path() {
    for name in BUILTINS {
        let src = optim::builtin(name).unwrap().source;
        let tokens: proc_macro2::TokenStream = src.parse().unwrap();
        let flat = agr_codegen::tokens::Flat::new(tokens);
        let a = agr_codegen::compile(&flat.text)
            .unwrap_or_else(|e| panic!("{name}: {e:?}\n{}", flat.text));
        let b = agr_codegen::compile(src).unwrap();
        assert_eq!(
            a.spec_text, b.spec_text,
            "{name}: the token path reads a different spec"
        );
    }
}

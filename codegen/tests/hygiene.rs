//! Name hygiene and constant folding in the printers: a spec may name its
//! values anything the checker accepts, including every identifier the
//! printers write themselves, and constant subexpressions leave nothing
//! behind that the printers would reference but never define. The CUDA is
//! compiled as host C++ (`g++ -fsyntax-only`); the Rust is compiled by the
//! random-spec test crate (`specgen`), which includes these specs too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use agr_codegen::{backend, compile, ir::Program};

/// Every identifier-like word in `text`.
fn words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cur = String::new();
    for c in text.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' {
            cur.push(c);
        } else {
            if cur.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                out.insert(cur.clone());
            }
            cur.clear();
        }
    }
    out
}

/// Compiles a CUDA translation unit as host C++ (syntax and types only).
fn cuda_compiles(name: &str, source: &str) -> Result<(), String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hygiene");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.cpp"));
    std::fs::write(&file, format!("#define AGR_HOST_CHECK 1\n{source}")).unwrap();
    let out = Command::new("g++")
        .args(["-std=c++17", "-fsyntax-only", "-w"])
        .arg(&file)
        .output()
        .expect("g++ must be installed to check the generated CUDA on the CPU");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

const BASE: &str = include_str!("../../tests/specs/kitchen_sink.agr");

/// The identifiers both printers emit for a spec that uses every operation
/// (and for its Ψ), that a spec could also use as a name.
fn printer_identifiers() -> Vec<String> {
    let mut all = BTreeSet::new();
    for src in [
        BASE,
        "Psi { hyper { on = true } state { m = 0 } step { m = agr(g); p = p - select(on, agr(m), m); } }",
    ] {
        let prog = compile(src).unwrap();
        all.extend(words(&backend::rust::emit(&prog)));
        all.extend(words(&backend::cuda::full_source(&prog)));
    }
    // Only names a spec may declare: the checker decides.
    all.into_iter()
        .filter(|w| compile(&format!("T {{ step {{ let {w} = g; p = p - {w}; }} }}")).is_ok())
        .collect()
}

/// A spec that declares `names` as hyperparameters, states and `let`s, and
/// uses each.
fn hostile_spec(name: &str, names: &[String]) -> String {
    let (h, rest) = names.split_at(names.len().min(4));
    let (s, l) = rest.split_at(rest.len().min(4));
    let mut text = format!("{name} {{\n  hyper {{ ");
    for (i, n) in h.iter().enumerate() {
        text += &format!("{n} = 0.{} where {n} >= 0, ", i + 1);
    }
    text += "}\n  state { ";
    for n in s {
        text += &format!("{n} = 0, ");
    }
    text += "}\n  step {\n    let acc0 = g;\n";
    let mut prev = "acc0".to_string();
    for (i, n) in l.iter().enumerate() {
        let e = match i % 5 {
            0 => format!("{prev} * 0.5 + g"),
            1 => format!("{prev} - mean(g * {prev})"),
            2 => format!("select({prev} > 0, {prev}, -{prev}) + row_mean(g)"),
            3 => format!("{prev} / (norm(g) + 1)"),
            _ => format!("{prev} + agr(g)"),
        };
        text += &format!("    let {n} = {e};\n");
        prev = n.clone();
    }
    for n in s {
        // `x_` first: a state named `_` must not give the reserved `__x`.
        text += &format!("    {n} = {n} * 0.9 + {prev};\n    let x_{n} = {n} + 1;\n");
        prev = format!("x_{n}");
    }
    let hs: Vec<String> = h.iter().map(|n| format!("(1 + {n})")).collect();
    let scale = if hs.is_empty() {
        "1".to_string()
    } else {
        hs.join(" * ")
    };
    text += &format!("    p = p - 0.01 * {scale} * {prev};\n  }}\n}}\n");
    text
}

/// Specs whose names are every identifier the printers write (a few dozen
/// per spec), all accepted by the checker.
pub fn hostile_specs() -> Vec<String> {
    let names = printer_identifiers();
    assert!(names.len() > 50, "too few identifiers harvested: {names:?}");
    names
        .chunks(24)
        .enumerate()
        .map(|(i, chunk)| hostile_spec(&format!("Hostile{i}"), chunk))
        .collect()
}

#[test]
fn spec_names_equal_to_printer_identifiers_compile_as_cuda() {
    let specs = hostile_specs();
    let mut failures = vec![];
    for (i, src) in specs.iter().enumerate() {
        let prog: Program = compile(src).unwrap_or_else(|e| panic!("{e:?}\n{src}"));
        if let Err(e) = cuda_compiles(&format!("hostile{i}"), &backend::cuda::full_source(&prog)) {
            failures.push(format!(
                "{src}\n{}",
                e.lines().take(8).collect::<Vec<_>>().join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} specs do not compile:\n{}",
        failures.len(),
        specs.len(),
        failures.join("\n\n")
    );
}

#[test]
fn names_taken_by_target_languages_compile_as_cuda() {
    // C++ keywords and types, macros of the host headers, CUDA built-ins.
    let names: Vec<String> = [
        "float",
        "double",
        "int",
        "char",
        "unsigned",
        "signed",
        "long",
        "short",
        "void",
        "auto",
        "register",
        "volatile",
        "switch",
        "case",
        "default",
        "goto",
        "sizeof",
        "typedef",
        "union",
        "class",
        "namespace",
        "template",
        "typename",
        "this",
        "new",
        "delete",
        "operator",
        "private",
        "public",
        "friend",
        "inline",
        "explicit",
        "bool",
        "NULL",
        "INFINITY",
        "NAN",
        "EOF",
        "errno",
        "assert",
        "sqrtf",
        "fabsf",
        "powf",
        "expf",
        "logf",
        "fminf",
        "fmaxf",
        "float4",
        "threadIdx",
        "blockIdx",
        "blockDim",
        "AGR_BLOCK",
        "AgrTensor",
        "AgrChunk",
        "agr_ld",
        "agr_fold",
        "agr_tensor_step",
        "size_t",
        "M_PI",
        "HUGE_VAL",
        "stdin",
        "stdout",
    ]
    .iter()
    .map(|s| s.to_string())
    .filter(|w| compile(&format!("T {{ step {{ let {w} = g; p = p - {w}; }} }}")).is_ok())
    .collect();
    assert!(names.len() > 40, "{names:?}");
    for (i, chunk) in names.chunks(24).enumerate() {
        let src = hostile_spec(&format!("Lang{i}"), chunk);
        let prog = compile(&src).unwrap();
        cuda_compiles(&format!("lang{i}"), &backend::cuda::full_source(&prog))
            .unwrap_or_else(|e| panic!("{src}\n{e}"));
    }
}

#[test]
fn spec_names_that_meet_the_prelude_compile_as_cuda() {
    // `Agr` + `Tensor` is the prelude's `AgrTensor`.
    for name in ["Agr", "AGR", "AgrChunk", "Option", "Default", "Result"] {
        let src = format!(
            "{name} {{ hyper {{ lr = 0.1 where lr > 0 }} state {{ m = 0 }} step {{ m = 0.9 * m + g; p = p - lr * agr(m) / (norm(m) + 1); }} }}"
        );
        let prog = compile(&src).unwrap();
        cuda_compiles(name, &backend::cuda::full_source(&prog))
            .unwrap_or_else(|e| panic!("{src}\n{e}"));
    }
}

/// Nodes that are neither literals nor per-element must be held by the
/// step's or a tensor's struct: constant conditions fold away.
#[test]
fn constant_conditions_leave_no_dangling_scalar() {
    for step in [
        "p = p - lr * select(2 > 0, g, 1 - b ^ t);",
        "p = p - lr * select(!(1 >= 2) && true, g, 1 - b ^ t);",
        "let c = 3 == 3; if c || false { p = p - lr * g; } else { p = p - b ^ t; }",
        "p = p - lr * if sqrt(4) != 2 { g } else { abs(-1) * sign(-2) * exp(0) * ln(1) + g * b ^ t };",
        "p = p - max(lr, 1 - b ^ t) * select(1 < 2, g, g * 2);",
    ] {
        let src =
            format!("Fold {{ hyper {{ lr = 0.1 where lr > 0, b = 0.9 }} step {{ {step} }} }}");
        let prog = compile(&src).unwrap_or_else(|e| panic!("{step}: {e:?}"));
        for n in &prog.nodes {
            assert!(
                n.level != agr_grammar::check::Level::Const
                    || matches!(
                        n.op,
                        agr_codegen::ir::Op::Num(_) | agr_codegen::ir::Op::Bool(_)
                    ),
                "{step}: unfolded constant {n:?}\n{}",
                agr_codegen::ir::dump(&prog)
            );
        }
        let rust = backend::rust::emit(&prog);
        let cuda = backend::cuda::full_source(&prog);
        // Every scalar field the code reads is declared.
        for (text, prefixes) in [(&rust, ["__s.", "__ts."]), (&cuda, ["s.", "ts."])] {
            for w in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')) {
                for pre in prefixes {
                    if let Some(field) = w.strip_prefix(pre) {
                        let field = field.split('.').next().unwrap();
                        assert!(
                            text.contains(&format!(" {field}: ")) || text.contains(&format!(" {field};")),
                            "{step}: `{w}` is read but never declared\n{text}"
                        );
                    }
                }
            }
        }
        cuda_compiles("fold", &cuda).unwrap_or_else(|e| panic!("{step}\n{e}"));
    }
}

#[test]
fn constant_expressions_that_fold_to_nan_or_infinity_are_errors() {
    let spec = |step: &str| format!("C {{ hyper {{ lr = 0.1 }} step {{ {step} }} }}");
    for (step, bad) in [
        ("let z = 0 / 0; p = p - z * g;", "0 / 0"),
        ("p = p - lr * g * (1 / 0);", "1 / 0"),
        ("p = p - lr * g * sqrt(-1);", "sqrt(-1)"),
        ("p = p - lr * g * ln(0);", "ln(0)"),
        ("p = p - lr * g * exp(1000);", "exp(1000)"),
        ("p = p - lr * g * (inf - inf);", "inf - inf"),
        (
            "let a = 0; let b = 2 * a; p = p - lr * g / (b / a);",
            "b / a",
        ),
        ("p = p - lr * select(1 > 0, g * 0 ^ -1, g);", "0 ^ -1"),
    ] {
        let src = spec(step);
        let errs = compile(&src).expect_err(step);
        assert_eq!(errs.len(), 1, "{step}: {errs:?}");
        assert_eq!(&src[errs[0].span.clone()], bad, "{step}: {errs:?}");
        assert!(
            errs[0].message.contains("constant expression evaluates to"),
            "{step}: {errs:?}"
        );
    }
    // Infinities written as such are values, and fold like any other.
    for step in [
        "p = p - lr * clamp(g, -inf, inf);",
        "let big = inf * 2; p = p - lr * min(g, big);",
        "p = max(p - lr * g, -inf);",
    ] {
        let prog = compile(&spec(step)).unwrap_or_else(|e| panic!("{step}: {e:?}"));
        cuda_compiles("inf", &backend::cuda::full_source(&prog))
            .unwrap_or_else(|e| panic!("{step}\n{e}"));
    }
}

/// Both printers' literals, read back by the target language, are the value
/// printed: NaN and the infinities included (CUDA once printed `NaN.0f`).
#[test]
fn literals_read_back_as_the_value_in_cuda() {
    use agr_codegen::backend::{float_lit, Lang};
    let values = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e300,
        -1e300,
        1e-45,
        -0.0,
        0.1,
        3.0,
        1e-8,
        123456789.0,
        f64::MIN_POSITIVE,
    ];
    let mut body = String::new();
    for v in values {
        body += &format!(
            "{{ float f = {}; double d = {}; unsigned u; unsigned long long w; memcpy(&u, &f, 4); memcpy(&w, &d, 8); printf(\"%u %llu\\n\", u, w); }}\n",
            float_lit(v, true, Lang::Cuda),
            float_lit(v, false, Lang::Cuda)
        );
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hygiene");
    std::fs::create_dir_all(&dir).unwrap();
    let cpp = dir.join("literals.cpp");
    let exe = dir.join("literals");
    std::fs::write(
        &cpp,
        format!("#include <stdio.h>\n#include <string.h>\nint main() {{\n{body}return 0;\n}}\n"),
    )
    .unwrap();
    let out = Command::new("g++")
        .args(["-std=c++17", "-w", "-o"])
        .arg(&exe)
        .arg(&cpp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(run.stdout).unwrap();
    for (v, line) in values.iter().zip(text.lines()) {
        let mut it = line.split(' ');
        let f = f32::from_bits(it.next().unwrap().parse().unwrap());
        let d = f64::from_bits(it.next().unwrap().parse().unwrap());
        let same32 = f.to_bits() == (*v as f32).to_bits() || (f.is_nan() && v.is_nan());
        let same64 = d.to_bits() == v.to_bits() || (d.is_nan() && v.is_nan());
        assert!(same32 && same64, "{v:?}: read back as {f:?} / {d:?}");
    }
    for v in values {
        for single in [true, false] {
            let lit = float_lit(v, single, Lang::Rust);
            assert!(!lit.contains("NaN") && !lit.contains("inf."), "{lit}");
        }
    }
}

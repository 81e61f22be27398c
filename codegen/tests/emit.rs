//! Snapshots of the Rust printed for every built-in spec, and IR facts.

use std::path::PathBuf;

use agr_codegen::{backend, compile, ir};

fn spec(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../agr-runtime/specs")
        .join(format!("{name}.agr"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
    "muon",
    "muon_agr",
    "adafactor",
    "nadam",
];

#[test]
fn generated_rust_of_every_builtin() {
    for name in BUILTINS {
        let prog = compile(&spec(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        insta::assert_snapshot!(format!("rust_{name}"), backend::rust::emit(&prog));
    }
}

#[test]
fn ir_of_every_builtin() {
    for name in BUILTINS {
        let prog = compile(&spec(name)).unwrap();
        insta::assert_snapshot!(format!("ir_{name}"), ir::dump(&prog));
    }
}

#[test]
fn generated_cuda_of_every_builtin() {
    for name in BUILTINS {
        let prog = compile(&spec(name)).unwrap();
        insta::assert_snapshot!(format!("cuda_{name}"), backend::cuda::emit(&prog));
    }
}

#[test]
fn a_uniform_switch_around_psi_costs_nothing_per_element() {
    use agr_codegen::ir::Op;
    use agr_grammar::check::Level;
    // `if use_agr { agr(g) } else { g }` becomes Ψ with a switched denominator: no
    // per-element select, and the same Ψ node shape as a bare `agr(g)`.
    let switched = agr_codegen::compile(&spec("adamw_agr")).unwrap();
    let elem_selects = |p: &agr_codegen::ir::Program| {
        p.nodes
            .iter()
            .filter(|n| n.level == Level::Elem && matches!(n.op, Op::Select(..)))
            .count()
    };
    assert_eq!(elem_selects(&switched), 0);
    assert!(switched.nodes.iter().any(|n| n.name == "agr_den_if"));
    // An element-wise condition keeps its select.
    let per_element = spec("adamw_agr").replace("if use_agr {", "if g > 0 {");
    let p = agr_codegen::compile(&per_element).unwrap();
    assert_eq!(elem_selects(&p), 1);
    assert!(!p.nodes.iter().any(|n| n.name == "agr_den_if"));
}

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

//! Writes the random specs of this run into `$OUT_DIR/specs.rs`: one
//! `optimizer!` per spec the checker accepts (each in its own module, so
//! rustc compiles them all in this one crate), and a table of them.

#[path = "src/gen.rs"]
#[allow(dead_code)]
mod gen;

use std::fmt::Write;

/// CI's seed; `AGR_SPECGEN_SEED=random` draws a fresh one.
const DEFAULT_SEED: u64 = 20261128;
const DEFAULT_COUNT: usize = 240;

/// Spec names that meet names the printers or the Rust prelude use.
const TYPE_NAMES: &[&str] = &[
    "Agr", "AGR", "Option", "Default", "Result", "Some", "AgrChunk",
];

fn main() {
    println!("cargo:rerun-if-env-changed=AGR_SPECGEN_SEED");
    println!("cargo:rerun-if-env-changed=AGR_SPECGEN_COUNT");
    println!("cargo:rerun-if-changed=src/gen.rs");
    let seed = match std::env::var("AGR_SPECGEN_SEED").ok().as_deref() {
        None | Some("") => DEFAULT_SEED,
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1),
        Some(s) => s.parse().expect("AGR_SPECGEN_SEED: a number or `random`"),
    };
    let count: usize = std::env::var("AGR_SPECGEN_COUNT")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("AGR_SPECGEN_COUNT: a number"))
        .unwrap_or(DEFAULT_COUNT);
    if seed != DEFAULT_SEED {
        println!("cargo:warning=agr-specgen: seed {seed}, {count} specs");
    }
    let mut rng = gen::Rng::new(seed);
    let mut out = String::new();
    let mut table = String::new();
    let mut rejected = String::new();
    for i in 0..count {
        // Each once: the CUDA check compiles every spec in one unit.
        let name = if (10..10 + TYPE_NAMES.len()).contains(&i) {
            TYPE_NAMES[i - 10].to_string()
        } else {
            format!("R{i}")
        };
        let src = gen::spec(&mut rng, &name);
        match agr_codegen::compile(&src) {
            Ok(_) => {
                writeln!(
                    out,
                    "// Random specs may leave a hyperparameter unread: that warning is expected.\n#[allow(non_snake_case, non_upper_case_globals, dead_code, deprecated)]\npub mod r{i} {{\n::agr_runtime::optimizer! {{\n{src}}}\n}}"
                )
                .unwrap();
                writeln!(
                    table,
                    "    Case {{ index: {i}, source: {src:?}, make: || Box::new(r{i}::{name}::with_config(::core::default::Default::default()).unwrap()) }},"
                )
                .unwrap();
            }
            Err(e) => {
                writeln!(rejected, "    ({src:?}, {:?}),", e[0].message).unwrap();
            }
        }
    }
    let text = format!(
        "{out}\npub const SEED: u64 = {seed};\npub const GENERATED: usize = {count};\npub const CASES: &[Case] = &[\n{table}];\n/// (spec, first error) of every spec the checker rejected.\npub const REJECTED: &[(&str, &str)] = &[\n{rejected}];\n"
    );
    let path = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("specs.rs");
    std::fs::write(path, text).unwrap();
}

//! The `agr` command line: replay, check and emit.

use std::process::Command;

fn agr(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agr"))
        .args(args)
        .output()
        .expect("run agr");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn golden(name: &str) -> String {
    let dir = std::env::var("AGR_GOLDEN_DIR")
        .unwrap_or_else(|_| format!("{}/../shared/golden", env!("CARGO_MANIFEST_DIR")));
    format!("{dir}/{name}")
}

#[test]
fn replay_prints_one_line_per_file_and_fails_on_an_unreadable_one() {
    let (code, out, _) = agr(&[
        "replay",
        &golden("adamw_agr_basic.json"),
        &golden("adan_agr_basic.json"),
    ]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("adamw_agr_basic.json")
            && lines[0].contains("adamw_agr")
            && lines[0].ends_with("PASS"),
        "{out}"
    );
    assert!(lines[0].contains("steps=12"), "{out}");
    let (code, out, _) = agr(&["replay", &golden("adan_basic.json"), "no-such-file.json"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("no-such-file.json") && out.contains("ERROR"),
        "{out}"
    );
}

#[test]
fn check_shows_line_column_and_caret() {
    let dir = std::env::temp_dir().join(format!("agr-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.agr");
    std::fs::write(
        &bad,
        "Sgd {\n    hyper { lr = 0.1 where lr > 0 }\n    step { p = p - lr * grad; }\n}\n",
    )
    .unwrap();
    let (code, _, err) = agr(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown name `grad`"), "{err}");
    assert!(err.contains("bad.agr:3:25"), "{err}");
    assert!(err.contains("^^^^"), "{err}");
    let good = dir.join("good.agr");
    std::fs::write(
        &good,
        "Sgd { hyper { lr = 0.1 where lr > 0 } step { p = p - lr * g; } }",
    )
    .unwrap();
    let (code, out, _) = agr(&["check", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn emit_prints_generated_rust_for_a_builtin() {
    let (code, out, _) = agr(&["emit", "--target", "rust", "adamw_agr"]);
    assert_eq!(code, 0);
    assert!(out.contains("pub type AdamWAgr = ::agr_runtime::Optimizer<AdamWAgrKernel>;"));
    assert_eq!(
        out,
        agr_codegen::backend::rust::emit(
            &agr_codegen::compile(agr_runtime::optim::builtin("adamw_agr").unwrap().source)
                .unwrap()
        )
    );
    let (code, _, err) = agr(&["emit", "nonesuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("neither a built-in"), "{err}");
}

#[test]
fn check_warns_about_an_unused_hyperparameter_and_still_succeeds() {
    let dir = std::env::temp_dir().join(format!("agr-cli-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("unused.agr");
    std::fs::write(
        &f,
        "Sgd {\n    hyper { lr = 0.1, beta = 0.9, use_psi = true }\n    step { p = p - lr * select(use_psi, agr(g), g); }\n}\n",
    )
    .unwrap();
    let (code, out, err) = agr(&["check", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok") && out.contains("1 warning"), "{out}");
    assert!(
        err.starts_with("warning: hyperparameter `beta` is never used\n"),
        "{err}"
    );
    assert!(err.contains("unused.agr:2:23"), "{err}");
    assert!(err.contains("\n  |                       ^^^^\n"), "{err}");
    assert_eq!(err.matches("warning:").count(), 1, "{err}");
    // The built-ins have none.
    let specs = format!("{}/agr-runtime/specs", env!("CARGO_MANIFEST_DIR"));
    for e in std::fs::read_dir(specs).unwrap() {
        let path = e.unwrap().path();
        let (code, _, err) = agr(&["check", path.to_str().unwrap()]);
        assert_eq!((code, err.as_str()), (0, ""), "{}", path.display());
    }
}

#[test]
fn check_reports_every_independent_mistake_not_only_the_first() {
    let dir = std::env::temp_dir().join(format!("agr-cli-multi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Two syntax errors in different statements, and a compound assignment.
    let f = dir.join("syntax.agr");
    std::fs::write(
        &f,
        "Sgd {\n    hyper { lr = 0.1 }\n    state { m = 0 }\n    step {\n        m = 0.9 * m + ;\n        let d = g * * 2;\n        p -= lr * m;\n    }\n}\n",
    )
    .unwrap();
    let (code, _, err) = agr(&["check", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        3,
        "{err}"
    );
    assert!(err.contains("syntax.agr:5:23"), "{err}");
    assert!(err.contains("syntax.agr:6:21"), "{err}");
    assert!(
        err.contains("error: compound assignment is not supported\n")
            && err.contains("syntax.agr:7:11")
            && err.contains("= help: write `p = p - (lr * m);`"),
        "{err}"
    );
    // Two semantic errors in different statements: both, too.
    let f = dir.join("names.agr");
    std::fs::write(
        &f,
        "Sgd {\n    hyper { lr = 0.1 }\n    step {\n        let d = gg * 2;\n        p = p - lrr * d;\n    }\n}\n",
    )
    .unwrap();
    let (code, _, err) = agr(&["check", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        2,
        "{err}"
    );
    assert!(
        err.contains("unknown name `gg`") && err.contains("names.agr:4:17"),
        "{err}"
    );
    assert!(
        err.contains("unknown name `lrr`") && err.contains("names.agr:5:17"),
        "{err}"
    );
}

#[test]
fn replay_takes_a_spec_of_the_users_and_a_device() {
    let dir = std::env::temp_dir().join(format!("agr-cli-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The built-in AdamW-AGR, written out as a user's file.
    let spec = dir.join("mine.agr");
    std::fs::write(
        &spec,
        agr_runtime::optim::builtin("adamw_agr").unwrap().source,
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    let file = golden("adamw_agr_basic.json");
    for device in ["cpu", "emulated-cuda"] {
        let (code, out, err) = agr(&["replay", "--spec", spec, "--device", device, &file]);
        assert_eq!(code, 0, "{device}: {out}{err}");
        assert!(
            out.contains("AdamWAgr (file: adamw_agr)") && out.trim_end().ends_with("PASS"),
            "{device}: {out}"
        );
    }
    // A spec that does not fit the file: its hyperparameters are missing.
    let sgd = dir.join("sgd.agr");
    std::fs::write(&sgd, "Sgd { hyper { lr = 0.1 } step { p = p - lr * g; } }").unwrap();
    let (code, out, _) = agr(&["replay", "--spec", sgd.to_str().unwrap(), &file]);
    assert_eq!(code, 1);
    assert!(
        out.contains("ERROR") && out.contains("Sgd has no hyperparameter"),
        "{out}"
    );
    // A broken spec fails before any file, with line and column.
    let bad = dir.join("bad.agr");
    std::fs::write(&bad, "Bad {\n  step { p = p - lr * g; }\n}\n").unwrap();
    let (code, _, err) = agr(&["replay", "--spec", bad.to_str().unwrap(), &file]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.agr:2:") && err.contains("`lr`"), "{err}");
    // An unknown device is a usage error.
    let (code, _, err) = agr(&["replay", "--device", "tpu", &file]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown device `tpu`"), "{err}");
}

#[test]
fn bench_names_its_yardsticks_and_precision_modes() {
    let (code, _, err) = agr(&["bench", "--against", "jax", "--iters", "1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--against jax: the one yardstick is `torch`"),
        "{err}"
    );
    let (code, _, err) = agr(&[
        "bench",
        "--precision",
        "fp8",
        "--optimizers",
        "adamw",
        "--workloads",
        "vars_100k",
        "--iters",
        "1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown precision mode `fp8`"), "{err}");
}

//! Matrix blocks: the reference evaluation replays Muon's references, and
//! the lowering plans torch's `addmm` sequence.

use std::path::PathBuf;

use agr_codegen::{compile, interp, ir};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn spec(name: &str) -> String {
    std::fs::read_to_string(root().join("agr-runtime/specs").join(format!("{name}.agr"))).unwrap()
}

/// Golden files for `optimizer` from the shared folder (where present) and ours.
fn goldens(optimizer: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    for dir in [
        root().join("../shared/golden/frontier"),
        root().join("tests/golden/frontier"),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            if f.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&f).unwrap();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                if v["optimizer"] == optimizer {
                    out.push(f);
                }
            }
        }
    }
    out
}

/// Replays a golden file through the reference evaluation; returns the
/// worst |ours - reference| / (atol + rtol |reference|).
fn replay(prog: &ir::Program, path: &PathBuf) -> f64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hyper: Vec<f64> = prog
        .hypers
        .iter()
        .map(|h| match &v["hyper"][&h.name] {
            serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
            serde_json::Value::Number(n) => n.as_f64().unwrap(),
            _ => h.default,
        })
        .collect();
    let f32s = |x: &serde_json::Value| -> Vec<f32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_f64().unwrap() as f32)
            .collect()
    };
    let mut ts: Vec<interp::TensorData> = v["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let shape = p["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            interp::TensorData::new(prog, shape, f32s(&p["init"]))
        })
        .collect();
    let (atol, rtol) = (
        v["tolerance"]["atol"].as_f64().unwrap(),
        v["tolerance"]["rtol"].as_f64().unwrap(),
    );
    let mut worst = 0.0f64;
    for step in v["steps"].as_array().unwrap() {
        for (t, g) in ts.iter_mut().zip(step["grads"].as_array().unwrap()) {
            t.g = f32s(g);
        }
        interp::step(prog, &hyper, &mut ts);
        for (t, want) in ts.iter().zip(step["params"].as_array().unwrap()) {
            for (x, r) in t.p.iter().zip(f32s(want)) {
                let d = (f64::from(*x) - f64::from(r)).abs();
                worst = worst.max(d / (atol + rtol * f64::from(r).abs()));
            }
        }
    }
    worst
}

#[test]
fn the_reference_evaluation_replays_muon() {
    for name in ["muon", "muon_agr"] {
        let prog = compile(&spec(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let files = goldens(name);
        assert!(!files.is_empty(), "no golden file for {name}");
        for f in files {
            let ratio = replay(&prog, &f);
            eprintln!("{name} {}: tol_ratio {ratio:.3}", f.display());
            assert!(ratio <= 1.0, "{name} {}: tol_ratio {ratio}", f.display());
        }
    }
}

#[test]
fn muon_plans_torchs_addmm_sequence() {
    // torch: gram = X Xᵀ; update = addmm(gram, gram, gram, beta=b, alpha=c);
    // X = addmm(X, update, X, beta=a); X transposed in and out when rows > cols.
    let prog = compile(&spec("muon")).unwrap();
    assert_eq!(prog.mats.len(), 1);
    let block = &prog.mats[0];
    assert_eq!(block.phase, 1, "after the pass that computes norm(u)");
    assert_eq!(
        ir::mat_listing(&block.code),
        [
            "if arg0 {",
            "  r1 = 1 * r0\u{1d40}",
            "  r0 <- r1",
            "}",
            "repeat arg1 {",
            "  r2 = 1 * r0 @ r0\u{1d40}",
            "  r3 = 2.0315 * r2 @ r2 + -4.775 * r2",
            "  r4 = 1 * r3 @ r0 + 3.4445 * r0",
            "  r0 <- r4",
            "}",
            "if arg0 {",
            "  r5 = 1 * r0\u{1d40}",
            "  r0 <- r5",
            "}",
        ]
    );
    let arg = |k: usize| prog.nodes[block.args[k]].name.clone();
    assert_eq!(arg(1), "ns_steps");
    assert!(ir::dump(&prog).contains(&format!("{} ", arg(0))));
}

#[test]
fn a_matrix_if_expression_branches_into_one_register() {
    let prog = compile(
        "X { hyper { lr = 0.1 } step { matrix x = g { x = if rows > cols { 3 * x } else { 2 * x } @ transpose(x) @ x; } p = p - lr * x; } }",
    )
    .unwrap();
    assert_eq!(
        ir::mat_listing(&prog.mats[0].code),
        [
            "if arg0 {",
            "  r2 = 3 * r0",
            "  r1 <- r2",
            "} else {",
            "  r3 = 2 * r0",
            "  r1 <- r3",
            "}",
            "r4 = 1 * r1 @ r0\u{1d40}",
            "r5 = 1 * r4 @ r0",
            "r0 <- r5",
        ]
    );
}

/// Every sequence of up to three statements from valid and invalid pieces
/// inside a matrix block compiles or is rejected with errors: the front
/// end never panics (the macro would report a panic, not a spanned error).
#[test]
fn no_sequence_of_block_statements_panics_the_compiler() {
    const PIECES: &[&str] = &[
        "let a = x @ transpose(x);",
        "x = a @ x;",
        "x = 2 * x - x / 3;",
        "x = -x;",
        "let k = 2;",
        "k = 3;",
        "x = k * x;",
        "repeat n { x = x @ transpose(x) @ x; }",
        "repeat 2 { let b = x; x = b; }",
        "if rows > cols { x = transpose(x); } else { x = 2 * x; }",
        "x = if t > 1 { x } else { transpose(transpose(x)) };",
        "let c = rows * cols;",
        "x = c * x @ x;",
        "x = x + a;",
        "x = x * x;",
        "x = sqrt(x);",
        "x = p;",
        "m = x;",
        "repeat 1.5 { }",
        "matrix y = g { }",
        "x = transpose(x @ transpose(x));",
        "let s = lr * t;",
        "x = s * x + (s * a) @ x;",
        "if t > 1 { let d = x; x = d @ transpose(d) @ d; }",
        "x = if t > 1 { 1 } else { x };",
        "repeat n { repeat 2 { x = 0.5 * x; } }",
    ];
    let n = PIECES.len();
    let (mut ok, mut rejected) = (0, 0);
    for i in 0..n * n * n {
        let body = [PIECES[i % n], PIECES[i / n % n], PIECES[i / (n * n)]].join(" ");
        let src = format!(
            "X {{ hyper {{ lr = 0.1, n: int = 2 }} state {{ m = 0 }} step {{ m = g; matrix x = g {{ {body} }} p = p - lr * x; }} }}"
        );
        match std::panic::catch_unwind(|| compile(&src)) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => rejected += 1,
            Err(_) => panic!("the compiler panicked on: {src}"),
        }
    }
    assert!(
        ok > 1000 && rejected > 1000,
        "{ok} compiled, {rejected} rejected"
    );
}

//! Every reference trajectory in the shared golden folder replays within its
//! tolerance through the built-in optimizer it names.
//!
//! The folder is `../shared/golden` beside the repository, or `$AGR_GOLDEN_DIR`.
//! A missing folder fails the test: the numbers are the ground truth.

use std::path::PathBuf;

use agr_runtime::golden;

fn golden_dir() -> PathBuf {
    match std::env::var_os("AGR_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    }
}

fn files(dir: &PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "golden folder {} is missing ({e}); set AGR_GOLDEN_DIR",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

#[test]
fn the_spine_golden_files_replay() {
    let dir = golden_dir();
    let files = files(&dir);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "adamw_basic.json",
        "adamw_agr_basic.json",
        "adamw_agr_m_basic.json",
        "adan_basic.json",
        "adan_agr_basic.json",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {}",
            dir.display()
        );
    }
    let mut failed = vec![];
    for f in &files {
        let g = golden::load(f).unwrap();
        let r = golden::replay(&g).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        println!("{:<28} {r}", f.file_name().unwrap().to_string_lossy());
        assert_eq!(r.steps, g.steps.len());
        if !r.pass {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn the_more_golden_files_replay() {
    let dir = golden_dir().join("more");
    let files = files(&dir);
    assert_eq!(
        files.len(),
        9,
        "expected the nine files of {}",
        dir.display()
    );
    let mut failed = vec![];
    for f in &files {
        let g = golden::load(f).unwrap();
        let r = golden::replay(&g).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        println!("{:<28} {r}", f.file_name().unwrap().to_string_lossy());
        if !r.pass {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// The repository's own references (`tests/golden/`, each folder's script
/// beside its data): long trajectories where Ψ must be exactly 0 — one-element
/// tensors, a tensor with one non-zero gradient element per step, all-zero
/// gradients. Those tensors move only by weight decay, so ours must equal the
/// published code's to the bit, not just within the tolerance.
#[test]
fn the_repository_golden_files_replay_and_psi_zero_is_exact() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let files = files(&dir);
    assert!(
        files.len() >= 4,
        "expected the psi_exact files in {}",
        dir.display()
    );
    let mut failed = vec![];
    for f in &files {
        let g = golden::load(f).unwrap();
        assert!(g.steps.len() >= 200, "{}: a long trajectory", f.display());
        let r = golden::replay(&g).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        println!("{:<28} {r}", f.file_name().unwrap().to_string_lossy());
        if !r.pass {
            failed.push(f.display().to_string());
        }
        for (p, worst) in g.params.iter().zip(&r.worst_abs_per_tensor) {
            if matches!(p.name.as_str(), "temperature" | "gate" | "sparse") {
                assert_eq!(
                    *worst,
                    0.0,
                    "{}: tensor `{}` (Psi = 0 exactly) differs from the reference",
                    f.display(),
                    p.name
                );
            }
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
    // The one-element tensor without weight decay never moves, in the
    // reference and in ours.
    let g = golden::load(&dir.join("adamw_agr_scalar_long.json")).unwrap();
    assert!(g.steps.iter().all(|s| s.params[0] == g.params[0].init));
}

#[test]
fn a_wrong_trajectory_fails() {
    // The replay must be able to fail: perturb one reference value.
    let f = golden_dir().join("adamw_agr_basic.json");
    let mut g = golden::load(&f).unwrap();
    g.steps[5].params[0][3] += 1e-3;
    let r = golden::replay(&g).unwrap();
    assert!(!r.pass);
    assert_eq!(r.worst_at, (6, "p0".to_string(), 3));
}

#[test]
fn agr_and_plain_trajectories_differ() {
    // Ψ must change the numbers: AdamW-AGR's reference does not replay as AdamW.
    let mut g = golden::load(&golden_dir().join("adamw_agr_basic.json")).unwrap();
    g.optimizer = "adamw".into();
    assert!(!golden::replay(&g).unwrap().pass);
}

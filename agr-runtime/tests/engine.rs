//! The CPU engine on tensors larger than one work chunk: agreement with a
//! plain, unfused reference written independently of the spec compiler,
//! bitwise determinism across thread counts, skipped gradients, and errors
//! that leave everything unchanged.

use agr_runtime::optim::{AdamWAgr, AdamWAgrConfig, AdanAgr, AdanAgrConfig};
use agr_runtime::{ParamMut, StepError};

/// Deterministic pseudo-random values in (-1, 1), with some exact zeros.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 97 == 0 {
                0.0
            } else {
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            }
        })
        .collect()
}

const SHAPES: &[&[usize]] = &[&[301, 333], &[70_000], &[17], &[4, 8]];

struct Model {
    values: Vec<Vec<f32>>,
}

impl Model {
    fn new(seed: u64) -> Model {
        Model {
            values: SHAPES
                .iter()
                .enumerate()
                .map(|(i, s)| values(s.iter().product(), seed + i as u64))
                .collect(),
        }
    }
    fn grads(&self, step: u64) -> Vec<Vec<f32>> {
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| values(v.len(), 1000 * step + i as u64))
            .collect()
    }
}

fn run<F>(
    model: &mut Model,
    grads: &[Vec<f32>],
    mut step: F,
) -> Result<agr_runtime::StepReport, StepError>
where
    F: FnMut(&mut [ParamMut<'_>]) -> Result<agr_runtime::StepReport, StepError>,
{
    let mut params: Vec<ParamMut<'_>> = model
        .values
        .iter_mut()
        .zip(grads)
        .zip(SHAPES)
        .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
        .collect();
    step(&mut params)
}

/// Ψ(g) as the paper defines it, with Ψ(0) = 0, summing in f64.
fn psi(g: &[f32]) -> Vec<f32> {
    let s: f64 = g.iter().map(|&x| f64::from(x.abs())).sum();
    let inv = if s > 0.0 { (1.0 / s) as f32 } else { 0.0 };
    g.iter().map(|&x| x - x * x.abs() * inv).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 + 1e-5 * y.abs(),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn adamw_agr_matches_an_unfused_reference_over_many_chunks() {
    let (lr, b1, b2, eps, wd) = (1e-2f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let mut model = Model::new(1);
    let mut reference = Model::new(1);
    let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default().with_lr(lr)).unwrap();
    let mut m: Vec<Vec<f32>> = reference
        .values
        .iter()
        .map(|v| vec![0.0; v.len()])
        .collect();
    let mut v2 = m.clone();
    for t in 1..=4u64 {
        let grads = model.grads(t);
        run(&mut model, &grads, |p| opt.step_params(p)).unwrap();
        for (k, p) in reference.values.iter_mut().enumerate() {
            let gr = psi(&grads[k]);
            let bc1 = 1.0 - b1.powi(t as i32);
            let bc2 = (1.0 - b2.powi(t as i32)).sqrt();
            for i in 0..p.len() {
                p[i] *= (1.0 - lr * wd) as f32;
                m[k][i] = b1 as f32 * m[k][i] + (1.0 - b1) as f32 * gr[i];
                v2[k][i] = b2 as f32 * v2[k][i] + (1.0 - b2) as f32 * gr[i] * gr[i];
                p[i] -= (lr / bc1) as f32 * m[k][i] / (v2[k][i].sqrt() / bc2 as f32 + eps as f32);
            }
        }
    }
    for (k, (a, b)) in model.values.iter().zip(&reference.values).enumerate() {
        assert_close(a, b, &format!("tensor {k}"));
        assert_close(opt.state(k, "m").unwrap(), &m[k], "m");
    }
}

#[test]
fn adan_agr_with_global_clipping_matches_an_unfused_reference() {
    let (lr, b1, b2, b3, eps, wd, clip) =
        (1e-2f64, 0.98f64, 0.92f64, 0.99f64, 1e-8f64, 0.02f64, 5.0f64);
    let mut model = Model::new(2);
    let mut reference = Model::new(2);
    let mut opt = AdanAgr::with_config(
        AdanAgrConfig::default()
            .with_lr(lr)
            .with_max_grad_norm(clip),
    )
    .unwrap();
    let zeros: Vec<Vec<f32>> = reference
        .values
        .iter()
        .map(|v| vec![0.0; v.len()])
        .collect();
    let (mut m, mut d, mut n, mut prev) = (zeros.clone(), zeros.clone(), zeros.clone(), zeros);
    for t in 1..=3u64 {
        let grads = model.grads(t);
        run(&mut model, &grads, |p| opt.step_params(p)).unwrap();
        let norm: f64 = grads
            .iter()
            .flatten()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let factor = (clip / (norm + eps)).min(1.0);
        assert!(
            factor < 1.0,
            "the test should exercise clipping (norm {norm})"
        );
        for (k, p) in reference.values.iter_mut().enumerate() {
            let gc: Vec<f32> = psi(&grads[k]).iter().map(|&x| x * factor as f32).collect();
            if t == 1 {
                prev[k] = gc.clone();
            }
            let ti = t as i32;
            for i in 0..p.len() {
                let diff = gc[i] - prev[k][i];
                m[k][i] = b1 as f32 * m[k][i] + (1.0 - b1) as f32 * gc[i];
                d[k][i] = b2 as f32 * d[k][i] + (1.0 - b2) as f32 * diff;
                let u = gc[i] + b2 as f32 * diff;
                n[k][i] = b3 as f32 * n[k][i] + (1.0 - b3) as f32 * u * u;
                let den = n[k][i].sqrt() / (1.0 - b3.powi(ti)).sqrt() as f32 + eps as f32;
                let q = p[i]
                    - (lr / (1.0 - b1.powi(ti))) as f32 * m[k][i] / den
                    - (lr * b2 / (1.0 - b2.powi(ti))) as f32 * d[k][i] / den;
                p[i] = q / (1.0 + lr * wd) as f32;
            }
            prev[k] = gc;
        }
    }
    for (k, (a, b)) in model.values.iter().zip(&reference.values).enumerate() {
        assert_close(a, b, &format!("tensor {k}"));
    }
}

#[test]
fn gradient_centralization_subtracts_each_row_mean_over_many_chunks() {
    use agr_runtime::optim::{AdamWGc, AdamWGcConfig};
    let (lr, b1, b2, eps, wd) = (1e-2f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let mut model = Model::new(4);
    let mut reference = Model::new(4);
    let mut opt = AdamWGc::with_config(AdamWGcConfig::default().with_lr(lr)).unwrap();
    let mut m: Vec<Vec<f32>> = reference
        .values
        .iter()
        .map(|v| vec![0.0; v.len()])
        .collect();
    let mut v2 = m.clone();
    for t in 1..=2u64 {
        let grads = model.grads(t);
        run(&mut model, &grads, |p| opt.step_params(p)).unwrap();
        for (k, p) in reference.values.iter_mut().enumerate() {
            let shape = SHAPES[k];
            let mut g = grads[k].clone();
            if shape.len() > 1 {
                let row = shape[1..].iter().product::<usize>();
                for r in g.chunks_mut(row) {
                    let mean = (r.iter().map(|&x| f64::from(x)).sum::<f64>() / row as f64) as f32;
                    r.iter_mut().for_each(|x| *x -= mean);
                }
            }
            let bc1 = 1.0 - b1.powi(t as i32);
            let bc2 = (1.0 - b2.powi(t as i32)).sqrt();
            for i in 0..p.len() {
                p[i] *= (1.0 - lr * wd) as f32;
                m[k][i] = b1 as f32 * m[k][i] + (1.0 - b1) as f32 * g[i];
                v2[k][i] = b2 as f32 * v2[k][i] + (1.0 - b2) as f32 * g[i] * g[i];
                p[i] -= (lr / bc1) as f32 * m[k][i] / (v2[k][i].sqrt() / bc2 as f32 + eps as f32);
            }
        }
    }
    for (k, (a, b)) in model.values.iter().zip(&reference.values).enumerate() {
        assert_close(a, b, &format!("tensor {k}"));
    }
}

fn run_with_threads(threads: usize) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut model = Model::new(3);
        let mut opt =
            AdanAgr::with_config(AdanAgrConfig::default().with_max_grad_norm(1.0)).unwrap();
        let mut opt2 = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
        for t in 1..=3 {
            let grads = model.grads(t);
            run(&mut model, &grads, |p| opt.step_params(p)).unwrap();
            run(&mut model, &grads, |p| opt2.step_params(p)).unwrap();
        }
        model.values
    })
}

#[test]
fn results_are_bitwise_identical_for_1_2_and_8_threads_and_across_runs() {
    let one = run_with_threads(1);
    for threads in [2, 8, 2] {
        let other = run_with_threads(threads);
        for (a, b) in one.iter().zip(&other) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{threads} threads differ"
            );
        }
    }
}

#[test]
fn tensors_without_a_gradient_are_skipped() {
    let mut w0 = vec![1.0f32; 6];
    let mut w1 = vec![2.0f32; 3];
    let g0 = vec![0.5f32; 6];
    let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    let r = opt
        .step_params(&mut [
            ParamMut::new(&mut w0, Some(&g0), &[2, 3]),
            ParamMut::new(&mut w1, None, &[3]),
        ])
        .unwrap();
    assert_eq!((r.updated, r.skipped, r.step), (1, 1, 1));
    assert!(w0.iter().all(|&x| x < 1.0));
    assert_eq!(w1, vec![2.0; 3]);
    assert_eq!(opt.tensor_steps(0), 1);
    assert_eq!(opt.tensor_steps(1), 0);
    assert!(opt.state(1, "m").is_none());
}

#[test]
fn an_all_zero_gradient_gives_psi_zero_not_nan() {
    let mut w = vec![1.0f32, -1.0, 0.5];
    let g = vec![0.0f32; 3];
    let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default().with_weight_decay(0.0)).unwrap();
    opt.step_params(&mut [ParamMut::new(&mut w, Some(&g), &[3])])
        .unwrap();
    assert_eq!(w, vec![1.0, -1.0, 0.5]);
}

#[test]
fn bad_inputs_are_errors_and_change_nothing() {
    let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    let mut w0 = vec![1.0f32; 6];
    let mut w1 = vec![2.0f32; 3];
    let g0 = vec![0.5f32; 6];
    let g1 = vec![0.5f32; 3];
    opt.step_params(&mut [
        ParamMut::new(&mut w0, Some(&g0), &[2, 3]),
        ParamMut::new(&mut w1, Some(&g1), &[3]),
    ])
    .unwrap();
    let (s0, s1, m0) = (w0.clone(), w1.clone(), opt.state(0, "m").unwrap().to_vec());
    let short = vec![0.5f32; 2];
    let cases: Vec<(Box<dyn Fn(&mut Vec<f32>, &mut Vec<f32>) -> StepError>, &str)> = vec![
        (
            Box::new(|a, b| {
                opt.clone()
                    .step_params(&mut [
                        ParamMut::new(a, Some(&g0), &[2, 3]),
                        ParamMut::new(b, Some(&short), &[3]),
                    ])
                    .unwrap_err()
            }),
            "gradient has 2 elements",
        ),
        (
            Box::new(|a, _| {
                opt.clone()
                    .step_params(&mut [ParamMut::new(a, Some(&g0), &[2, 3])])
                    .unwrap_err()
            }),
            "given 1 parameters",
        ),
        (
            Box::new(|a, b| {
                opt.clone()
                    .step_params(&mut [
                        ParamMut::new(a, Some(&g0), &[3, 2]),
                        ParamMut::new(b, Some(&g1), &[3]),
                    ])
                    .unwrap_err()
            }),
            "differs from the shape [2, 3]",
        ),
        (
            Box::new(|a, b| {
                opt.clone()
                    .step_params(&mut [
                        ParamMut::new(a, Some(&g0), &[2, 4]),
                        ParamMut::new(b, Some(&g1), &[3]),
                    ])
                    .unwrap_err()
            }),
            "shape [2, 4] has 8 elements",
        ),
        (
            Box::new(|_, _| opt.clone().step_params(&mut []).unwrap_err()),
            "no parameters",
        ),
    ];
    for (case, want) in cases {
        let e = case(&mut w0, &mut w1);
        assert!(e.to_string().contains(want), "{e} should say {want}");
        assert_eq!(
            (&w0, &w1),
            (&s0, &s1),
            "parameters changed by a failed step: {e}"
        );
    }
    assert_eq!(opt.state(0, "m").unwrap(), &m0[..]);
    assert_eq!(opt.steps(), 1);
    let mut empty: Vec<f32> = vec![];
    let e = AdamWAgr::with_config(AdamWAgrConfig::default())
        .unwrap()
        .step_params(&mut [ParamMut::new(&mut empty, Some(&[]), &[0])])
        .unwrap_err();
    assert!(matches!(e, StepError::Empty { index: 0 }));
}

#[test]
fn hyperparameters_are_range_checked() {
    let e = AdamWAgr::with_config(AdamWAgrConfig::default().with_beta1(1.0)).unwrap_err();
    assert!(
        e.to_string()
            .contains("`beta1` = 1 is outside its valid range [0, 1)"),
        "{e}"
    );
    let mut c = AdamWAgrConfig::default();
    assert!(c.set_lr(-1.0).is_err());
    assert_eq!(c.lr, 1e-3);
    c.set_lr(0.5).unwrap();
    assert_eq!(c.lr, 0.5);
    let mut opt = AdamWAgr::with_config(c).unwrap();
    assert_eq!(opt.lr(), Some(0.5));
    assert!(opt.set_lr(f64::NAN).is_err());
    opt.set_lr(0.25).unwrap();
    assert_eq!(opt.config().lr, 0.25);
    let e = opt.set_hyper("momentum", 0.9).unwrap_err();
    assert!(
        e.to_string()
            .contains("AdamWAgr has no hyperparameter `momentum`"),
        "{e}"
    );
    assert!(AdamWAgr::SPEC.contains("let gr = if use_agr { agr(g) } else { g };"));
    assert!(AdamWAgr::GENERATED_RUST.contains("impl ::agr_runtime::cpu::Kernel for AdamWAgrKernel"));
}

#[test]
fn cuda_kernel_source_is_the_specs_own_code_without_the_prelude() {
    use agr_codegen::backend::cuda::PRELUDE;
    // The prelude is the same for every spec; a snapshot of a spec's CUDA
    // must not change when only the prelude does.
    let kernels = AdamWAgr::CUDA_KERNEL_SOURCE;
    assert!(kernels.contains("__global__"), "{kernels}");
    assert!(kernels.contains("AdamWAgr_update"), "{kernels}");
    let first_prelude_line = PRELUDE.lines().find(|l| !l.trim().is_empty()).unwrap();
    assert!(!kernels.contains(first_prelude_line), "{kernels}");
    assert!(!kernels.contains("struct AgrTensor"), "{kernels}");
    // The complete translation unit is exactly the prelude, then the kernels.
    assert_eq!(AdamWAgr::CUDA_SOURCE, format!("{PRELUDE}\n{kernels}"));
    assert_eq!(
        AdanAgr::CUDA_SOURCE,
        format!("{PRELUDE}\n{}", AdanAgr::CUDA_KERNEL_SOURCE)
    );
    // The spec's code alone, as `agr_codegen` prints it.
    let prog =
        agr_codegen::compile(agr_runtime::optim::builtin("adamw_agr").unwrap().source).unwrap();
    assert_eq!(kernels, agr_codegen::backend::cuda::emit(&prog));
}

#[test]
fn a_non_finite_gradient_skips_the_step_and_changes_nothing() {
    use agr_runtime::optim::{AdamW, AdamWConfig};
    use agr_runtime::NonFinite;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut model = Model::new(5);
        let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
        let grads = model.grads(1);
        run(&mut model, &grads, |p| opt.step_params(p)).unwrap();
        let before = model.values.clone();
        let m_before: Vec<Vec<f32>> = (0..SHAPES.len())
            .map(|k| opt.state(k, "m").unwrap().to_vec())
            .collect();
        let mut grads = model.grads(2);
        grads[1][40_000] = bad;
        let r = run(&mut model, &grads, |p| opt.step_params(p)).unwrap();
        assert_eq!(r.skipped_non_finite, Some(1), "{bad}");
        assert_eq!(r.updated, 0);
        assert_eq!(opt.non_finite_skips(), 1);
        assert_eq!(opt.steps(), 1, "the step count must not advance");
        assert_eq!(opt.tensor_steps(0), 1);
        for k in 0..SHAPES.len() {
            let same = model.values[k]
                .iter()
                .zip(&before[k])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "parameter {k} changed on a skipped step");
            assert_eq!(opt.state(k, "m").unwrap(), &m_before[k][..]);
        }
        // With the error policy the caller gets an error, and still nothing changes.
        opt.set_non_finite_policy(NonFinite::Error);
        let e = run(&mut model, &grads, |p| opt.step_params(p)).unwrap_err();
        assert_eq!(e, StepError::NonFinite { index: 1 });
        assert!(model.values.iter().zip(&before).all(|(a, b)| a == b));
    }
    // An optimizer with no reduction of its own checks too (one extra pass),
    // and with the check off the NaN flows through, as in PyTorch.
    let mut w = vec![1.0f32; 8];
    let mut g = vec![0.5f32; 8];
    g[3] = f32::NAN;
    let mut opt = AdamW::with_config(AdamWConfig::default()).unwrap();
    let r = opt
        .step_params(&mut [ParamMut::new(&mut w, Some(&g), &[8])])
        .unwrap();
    assert_eq!(r.skipped_non_finite, Some(0));
    assert_eq!(w, vec![1.0; 8]);
    opt.set_non_finite_policy(NonFinite::Ignore);
    let r = opt
        .step_params(&mut [ParamMut::new(&mut w, Some(&g), &[8])])
        .unwrap();
    assert_eq!(r.skipped_non_finite, None);
    assert!(w[3].is_nan() && w[0].is_finite());
}

#[test]
fn a_non_finite_first_step_leaves_the_optimizer_as_new() {
    use agr_runtime::NonFinite;
    for policy in [NonFinite::Skip, NonFinite::Error] {
        let mut model = Model::new(9);
        let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
        opt.set_non_finite_policy(policy);
        let fresh = opt.save_checkpoint();
        let before = model.values.clone();
        let mut grads = model.grads(1);
        grads[2][5] = f32::NAN;
        let r = run(&mut model, &grads, |p| opt.step_params(p));
        match policy {
            NonFinite::Skip => assert_eq!(r.unwrap().skipped_non_finite, Some(2)),
            _ => assert_eq!(r.unwrap_err(), StepError::NonFinite { index: 2 }),
        }
        assert_eq!(model.values, before, "{policy:?}: a parameter changed");
        assert_eq!(opt.steps(), 0);
        for k in 0..SHAPES.len() {
            assert_eq!(
                opt.state(k, "m"),
                None,
                "{policy:?}: state of #{k} was created"
            );
            assert_eq!(opt.tensor_steps(k), 0);
        }
        let contents = |bytes: &[u8]| {
            let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
            let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
            (header.metadata().clone(), tensors.len())
        };
        assert_eq!(
            contents(&opt.save_checkpoint()),
            contents(&fresh),
            "{policy:?}: the checkpoint differs from a new optimizer's"
        );
        // The parameter count is not fixed yet: a step over fewer parameters
        // (the model without its last tensor) is the real first step.
        let grads = model.grads(2);
        let mut params: Vec<ParamMut<'_>> = model.values[..3]
            .iter_mut()
            .zip(&grads)
            .zip(SHAPES)
            .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
            .collect();
        let r = opt.step_params(&mut params).unwrap();
        assert_eq!((r.step, r.updated), (1, 3), "{policy:?}");
    }
}

/// A hash of every bit of a short AdanAgr + AdamWAgr run.
fn run_hash() -> u64 {
    let values = run_with_threads(2);
    let mut h: u64 = 0xcbf29ce484222325;
    for x in values.iter().flatten() {
        h ^= u64::from(x.to_bits());
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[test]
#[ignore = "run by the test below in a child process"]
fn print_run_hash() {
    println!("RUN_HASH={:016x}", run_hash());
}

#[test]
fn the_avx2_and_baseline_builds_give_the_same_bits() {
    // The child runs with the AVX2 path switched off.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "print_run_hash", "--ignored", "--nocapture"])
        .env("AGR_NO_AVX2", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let child = text
        .lines()
        .find_map(|l| l.strip_prefix("RUN_HASH="))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        child,
        format!("{:016x}", run_hash()),
        "AVX2 on: {}",
        agr_runtime::cpu::has_avx2()
    );
}

agr_runtime::optimizer! {
    /// AdamW-AGR with Ψ switched off after `agr_steps` steps (the paper's Table 7).
    AdamWAgrUntil {
        hyper { lr = 1e-3 where lr > 0, beta1 = 0.9 where 0 <= beta1 < 1, beta2 = 0.999 where 0 <= beta2 < 1,
                eps = 1e-8 where eps > 0, weight_decay = 1e-2 where weight_decay >= 0, agr_steps: int = 3 where agr_steps >= 0 }
        state { m = 0, v = 0 }
        step {
            let gr = if t <= agr_steps { agr(g) } else { g };
            p = p * (1 - lr * weight_decay);
            m = beta1 * m + (1 - beta1) * gr;
            v = beta2 * v + (1 - beta2) * gr * gr;
            p = p - lr / (1 - beta1 ^ t) * m / (sqrt(v) / sqrt(1 - beta2 ^ t) + eps);
        }
    }
}

#[test]
fn agr_can_be_switched_off_after_a_number_of_steps() {
    use agr_runtime::optim::{AdamW, AdamWConfig};
    let grads: Vec<Vec<f32>> = (0..6).map(|t| values(50, 77 + t)).collect();
    let run = |steps: &mut dyn FnMut(&mut [f32], &[f32])| {
        let mut w = values(50, 5);
        for g in &grads {
            steps(&mut w, g);
        }
        w
    };
    let mut until = AdamWAgrUntil::with_config(AdamWAgrUntilConfig::default()).unwrap();
    let mut agr = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    let mut plain = AdamW::with_config(AdamWConfig::default()).unwrap();
    let mut first_three = vec![];
    let w_until = run(&mut |w, g| {
        until
            .step_params(&mut [ParamMut::new(w, Some(g), &[50])])
            .unwrap();
        if until.steps() == 3 {
            first_three = w.to_vec();
        }
    });
    let mut agr_three = vec![];
    let _ = run(&mut |w, g| {
        agr.step_params(&mut [ParamMut::new(w, Some(g), &[50])])
            .unwrap();
        if agr.steps() == 3 {
            agr_three = w.to_vec();
        }
    });
    // Identical to AdamW-AGR for three steps...
    assert_eq!(first_three, agr_three);
    // ...and then different from both AdamW-AGR and AdamW over six.
    let w_plain = run(&mut |w, g| {
        plain
            .step_params(&mut [ParamMut::new(w, Some(g), &[50])])
            .unwrap();
    });
    assert_ne!(w_until, w_plain);
    let mut agr6 = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    let w_agr = run(&mut |w, g| {
        agr6.step_params(&mut [ParamMut::new(w, Some(g), &[50])])
            .unwrap();
    });
    assert_ne!(w_until, w_agr);
}

/// Reduced and per-tensor states on tensors of every rank and of unit
/// dimensions: Adafactor (a whole tensor per work item, a row and a column
/// per matrix) and NAdam (one number per tensor) step them all at once as
/// each alone, and an empty tensor is refused as for every spec.
#[test]
fn reduced_and_per_tensor_states_step_tensors_of_every_rank_and_size() {
    use agr_runtime::optim::{Adafactor, AdafactorConfig, NAdam, NAdamConfig};
    let shapes: &[&[usize]] = &[&[], &[1, 1], &[1, 4], &[4, 1], &[7], &[2, 1, 3], &[2, 3, 5]];
    // `values` starts with a zero: skip it, so every tensor moves.
    let nonzero = |n: usize, seed: u64| values(n + 1, seed)[1..].to_vec();
    let init: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| nonzero(s.iter().product(), i as u64))
        .collect();
    let grads: Vec<Vec<f32>> = init
        .iter()
        .enumerate()
        .map(|(i, v)| nonzero(v.len(), 50 + i as u64))
        .collect();
    fn steps<K: agr_runtime::Kernel>(
        opt: &mut agr_runtime::Optimizer<K>,
        v: &mut [Vec<f32>],
        g: &[Vec<f32>],
        shapes: &[&[usize]],
    ) {
        for _ in 0..3 {
            let mut ps: Vec<ParamMut<'_>> = v
                .iter_mut()
                .zip(g)
                .zip(shapes)
                .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
                .collect();
            opt.step_params(&mut ps).unwrap();
        }
    }
    let mut together = init.clone();
    let mut ada = Adafactor::with_config(AdafactorConfig::default()).unwrap();
    steps(&mut ada, &mut together, &grads, shapes);
    let mut nadam_together = init.clone();
    let mut nadam = NAdam::with_config(NAdamConfig::default()).unwrap();
    steps(&mut nadam, &mut nadam_together, &grads, shapes);
    assert_eq!(
        ada.state(3, "vr").unwrap().len(),
        4,
        "[4, 1]: a value per row"
    );
    assert_eq!(ada.state(3, "vc").unwrap().len(), 1);
    assert_eq!(ada.state(6, "vr").unwrap().len(), 6);
    assert_eq!(ada.state(6, "vc").unwrap().len(), 10);
    assert_eq!(nadam.state(6, "mu_product").unwrap().len(), 1);
    for (i, s) in shapes.iter().enumerate() {
        let mut alone = vec![init[i].clone()];
        let mut a = Adafactor::with_config(AdafactorConfig::default()).unwrap();
        steps(&mut a, &mut alone, &grads[i..=i], &shapes[i..=i]);
        assert_eq!(alone[0], together[i], "adafactor, shape {s:?}");
        let mut alone = vec![init[i].clone()];
        let mut n = NAdam::with_config(NAdamConfig::default()).unwrap();
        steps(&mut n, &mut alone, &grads[i..=i], &shapes[i..=i]);
        assert_eq!(alone[0], nadam_together[i], "nadam, shape {s:?}");
        assert!(together[i].iter().all(|x| x.is_finite()), "{s:?}");
        assert_ne!(together[i], init[i], "adafactor moved nothing in {s:?}");
    }
    let mut empty = vec![vec![]];
    let mut ps = vec![ParamMut::new(&mut empty[0], Some(&[]), &[3, 0])];
    let mut fresh = Adafactor::with_config(AdafactorConfig::default()).unwrap();
    let e = fresh.step_params(&mut ps).unwrap_err();
    assert!(matches!(e, StepError::Empty { .. }), "{e}");
}

#[test]
fn the_runtime_finds_each_kernel_where_the_printer_lists_it() {
    // `cuda_kernels` is in the CUDA printer's order; the devices launch by
    // the description's positions.
    let mut seen = (0, 0);
    for b in agr_runtime::optim::BUILTINS {
        let desc = b.make().desc();
        let name = |at: usize| desc.cuda_kernels[at];
        assert!(name(desc.passes).ends_with("_update"), "{}", b.name);
        for m in 0..desc.matrices.len() {
            assert!(name(desc.matrix_kernel(m)).ends_with(&format!("_matrix{m}")));
            assert!(name(desc.mat_axpby_kernel()).ends_with("_mat_axpby"));
            seen.0 += 1;
        }
        match desc.tensor_states_kernel() {
            Some(at) => {
                assert!(name(at).ends_with("_tensor_states"), "{}", b.name);
                assert_eq!(at + 1, desc.cuda_kernels.len());
                seen.1 += 1;
            }
            None => assert!(!desc
                .cuda_kernels
                .iter()
                .any(|k| k.ends_with("_tensor_states"))),
        }
    }
    // Muon and Muon-AGR have a matrix block; NAdam a per-tensor state.
    assert_eq!(seen, (2, 1));
    // Both, in a spec compiled at run time.
    let spec = agr_runtime::compile(
        "Both { hyper { lr = 0.1 } state { n: per_tensor = 0 } \
         step { n = n + 1; matrix x = g { x = x @ transpose(x) @ x; } p = p - lr * x / n; } }",
    )
    .unwrap();
    let desc = spec.desc();
    let names: Vec<&str> = desc.cuda_kernels.to_vec();
    assert_eq!(
        names[desc.matrix_kernel(0)..],
        ["Both_matrix0", "Both_mat_axpby", "Both_tensor_states"]
    );
    assert_eq!(desc.mat_axpby_kernel(), desc.matrix_kernel(0) + 1);
    assert_eq!(desc.tensor_states_kernel(), Some(names.len() - 1));
}

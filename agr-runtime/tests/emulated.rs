//! The emulated CUDA device: the generated kernels, compiled as host C++,
//! driven by the one engine. Every engine feature must work on it and agree
//! with the CPU step (reductions fold in another order, so to a few ulps).
//!
//! The same suite runs on a real GPU with `AGR_TEST_DEVICE=cuda`
//! (`scripts/gpu-check.sh`): only the launch layer differs.

mod common;

use agr_runtime::golden;
use agr_runtime::groups::{select, ParamGroups};
use agr_runtime::optim::{builtin, BUILTINS};
use agr_runtime::{
    Device, DynOptimizer, HyperValue, NonFinite, ParamMut, Precision, StepError, Storage,
};
use common::data;

/// The CUDA device under test: the emulated one, or `$AGR_TEST_DEVICE`.
fn dev() -> Device {
    std::env::var("AGR_TEST_DEVICE")
        .ok()
        .map_or(Device::EmulatedCuda, |d| d.parse().unwrap())
}

/// One element, odd lengths, rows, more than one 8192-element chunk.
const SHAPES: &[&[usize]] = &[&[1], &[7], &[5, 9], &[300, 40], &[20000]];

fn step_all(opt: &mut dyn DynOptimizer, values: &mut [Vec<f32>], k: usize, seed: u64) {
    let grads: Vec<Vec<f32>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| data(v.len(), seed * 977 + (k * 13 + i) as u64))
        .collect();
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(SHAPES)
        .zip(&grads)
        .enumerate()
        // The 3rd tensor has no gradient every other step.
        .map(|(i, ((v, s), g))| ParamMut::new(v, (i != 2 || k % 2 == 0).then_some(g.as_slice()), s))
        .collect();
    opt.step_params(&mut params).unwrap();
}

/// A step whose gradients are all finite but tensor `bad`'s, which holds a NaN.
fn step_with_nan(
    opt: &mut dyn DynOptimizer,
    values: &mut [Vec<f32>],
    seed: u64,
    bad: usize,
) -> agr_runtime::StepReport {
    let grads: Vec<Vec<f32>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut g = data(v.len(), seed + i as u64);
            if i == bad {
                g[v.len() / 2] = f32::NAN;
            }
            g
        })
        .collect();
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(SHAPES)
        .zip(&grads)
        .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
        .collect();
    opt.step_params(&mut params).unwrap()
}

fn init(seed: u64) -> Vec<Vec<f32>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), seed + i as u64))
        .collect()
}

/// Largest |a - b| / (1e-6 + 1e-5 |b|).
fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs() / (1e-6 + 1e-5 * f64::from(y).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn every_builtin_steps_on_the_emulated_device_as_on_the_cpu() {
    for b in BUILTINS {
        let mut cpu = b.make();
        let mut emu = b.make();
        // Every built-in has kernels: matrix blocks, reduced and per-tensor
        // states included.
        assert_eq!(emu.desc().cpu_only, None, "{}", b.name);
        emu.set_device(dev()).unwrap();
        assert_eq!(emu.device(), dev());
        let (mut vc, mut ve) = (init(3), init(3));
        for k in 0..4 {
            step_all(&mut *cpu, &mut vc, k, 5);
            step_all(&mut *emu, &mut ve, k, 5);
        }
        let w = worst(&ve, &vc);
        assert!(
            w <= 1.0,
            "{}: the emulated device is {w} tolerances off",
            b.name
        );
        for s in emu.desc().states {
            for i in 0..SHAPES.len() {
                let (a, c) = (emu.state_to_host(i, s.name), cpu.state_to_host(i, s.name));
                assert_eq!(a.is_some(), c.is_some());
                if let (Some(a), Some(c)) = (a, c) {
                    let w = worst(&[a.to_vec()], &[c.to_vec()]);
                    assert!(w <= 1.0, "{} state {}: {w} tolerances off", b.name, s.name);
                }
            }
        }
    }
}

#[test]
fn groups_reach_the_kernels() {
    let b = builtin("adan_agr").unwrap();
    let groups = ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .set("weight_decay", 0.0)
        .set("use_agr", false)
        .group("big", select::ndim_at_least(2))
        .scale("lr", 3.0);
    let params: Vec<(String, Vec<usize>)> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("t{i}"), s.to_vec()))
        .collect();
    let named: Vec<(&str, &[usize])> = params
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let mut cpu = b.make();
    let mut emu = b.make();
    for o in [&mut cpu, &mut emu] {
        o.set_hyper("weight_decay", HyperValue::Float(0.1)).unwrap();
        o.set_param_groups(&groups, &named).unwrap();
    }
    emu.set_device(dev()).unwrap();
    let mut plain = b.make();
    plain
        .set_hyper("weight_decay", HyperValue::Float(0.1))
        .unwrap();
    plain.set_device(dev()).unwrap();
    let (mut vc, mut ve, mut vp) = (init(9), init(9), init(9));
    for k in 0..3 {
        step_all(&mut *cpu, &mut vc, k, 2);
        step_all(&mut *emu, &mut ve, k, 2);
        step_all(&mut *plain, &mut vp, k, 2);
    }
    assert!(worst(&ve, &vc) <= 1.0);
    // Without the groups the kernels compute something else.
    assert!(worst(&vp, &vc) > 1000.0);
}

#[test]
fn a_checkpoint_moves_between_the_cpu_and_the_emulated_device() {
    // (Adafactor: reduced states; NAdam: a per-tensor state; Muon-AGR: a
    // matrix block's buffer.)
    for name in ["adamw_agr", "adafactor", "nadam", "muon_agr"] {
        checkpoint_moves(name);
    }
}

fn checkpoint_moves(name: &str) {
    let b = builtin(name).unwrap();
    let mut cpu = b.make();
    let mut v = init(4);
    for k in 0..3 {
        step_all(&mut *cpu, &mut v, k, 1);
    }
    let bytes = cpu.save_checkpoint();
    let mut emu = b.make();
    emu.set_device(dev()).unwrap();
    emu.load_checkpoint(&bytes).unwrap();
    let mut ve = v.clone();
    for k in 3..5 {
        step_all(&mut *cpu, &mut v, k, 1);
        step_all(&mut *emu, &mut ve, k, 1);
    }
    assert!(worst(&ve, &v) <= 1.0, "{name}");
    // On the same device (the same arithmetic) a resumed optimizer continues
    // bit-identically.
    let mut again = b.make();
    again.set_device(dev()).unwrap();
    again.load_checkpoint(&emu.save_checkpoint()).unwrap();
    let mut va = ve.clone();
    for k in 5..7 {
        step_all(&mut *again, &mut va, k, 1);
        step_all(&mut *emu, &mut ve, k, 1);
    }
    assert!(
        va == ve,
        "{name}: a checkpoint resumed on the same device differs"
    );
    // And back: the emulated device's checkpoint resumes on the CPU.
    let mut back = b.make();
    back.load_checkpoint(&emu.save_checkpoint()).unwrap();
    let mut vb = ve.clone();
    step_all(&mut *back, &mut vb, 7, 1);
    step_all(&mut *emu, &mut ve, 7, 1);
    assert!(worst(&vb, &ve) <= 1.0, "{name}");
    assert_eq!(back.non_finite_skips(), 0);
}

#[test]
fn a_non_finite_gradient_changes_nothing_on_the_emulated_device() {
    let b = builtin("adan_agr").unwrap();
    let mut emu = b.make();
    emu.set_device(dev()).unwrap();
    let mut w = vec![1.0f32, 2.0, 3.0];
    let mut bias = vec![0.5f32];
    let r = emu
        .step_params(&mut [
            ParamMut::new(&mut w, Some(&[0.1, 0.2, 0.3]), &[3]),
            ParamMut::new(&mut bias, Some(&[f32::NAN]), &[1]),
        ])
        .unwrap();
    // The update kernel decided, on the device: the report cannot know, the
    // counts read back can.
    assert_eq!(r.skipped_non_finite, None);
    assert_eq!((emu.non_finite_skips(), emu.steps()), (1, 0));
    assert_eq!((emu.tensor_steps(0), emu.tensor_steps(1)), (0, 0));
    assert_eq!(
        (w.as_slice(), bias.as_slice()),
        (&[1.0, 2.0, 3.0][..], &[0.5][..])
    );
    assert!(
        emu.state_to_host(0, "m").is_none(),
        "a skipped first step has no state"
    );
    // Its checkpoint holds no state, as the CPU's would.
    let mut fresh = b.make();
    fresh.load_checkpoint(&emu.save_checkpoint()).unwrap();
    assert_eq!((fresh.steps(), fresh.state_to_host(0, "m")), (0, None));
    emu.set_non_finite_policy(NonFinite::Error);
    let e = emu
        .step_params(&mut [
            ParamMut::new(&mut w, Some(&[f32::INFINITY, 0.2, 0.3]), &[3]),
            ParamMut::new(&mut bias, Some(&[0.1]), &[1]),
        ])
        .unwrap_err();
    assert_eq!(e, StepError::NonFinite { index: 0 });
    // Bad input is refused before any kernel runs.
    let e = emu
        .step_params(&mut [
            ParamMut::new(&mut w, Some(&[0.1, 0.2]), &[3]),
            ParamMut::new(&mut bias, Some(&[0.1]), &[1]),
        ])
        .unwrap_err();
    assert!(matches!(e, StepError::GradLen { index: 0, .. }), "{e:?}");
    assert_eq!(w, vec![1.0, 2.0, 3.0]);
}

#[test]
fn a_step_is_one_launch_per_pass_plus_the_update() {
    let spec =
        agr_runtime::compile("Launches { hyper { lr = 0.1 } step { p = p - lr * agr(g); } }")
            .unwrap();
    let mut opt = spec.boxed();
    if dev() != Device::EmulatedCuda {
        println!("skipped: counts the emulated device's launches");
        return;
    }
    opt.set_device(dev()).unwrap();
    assert_eq!(spec.desc().passes + 1, 2);
    let mut w = vec![1.0f32; 100];
    let g = vec![0.5f32; 100];
    // The counter is per thread: other tests running alongside add nothing.
    for _ in 0..3 {
        let before = agr_runtime::emulated::launches();
        opt.step_params(&mut [ParamMut::new(&mut w, Some(&g), &[100])])
            .unwrap();
        let launched = agr_runtime::emulated::launches() - before;
        assert_eq!(
            launched, 2,
            "the emulated device launched {launched} kernels per step"
        );
    }
    opt.set_device(Device::Cpu).unwrap();
    assert_eq!(opt.device(), Device::Cpu);
}

#[test]
fn a_spec_compiled_at_run_time_runs_on_the_emulated_device() {
    let spec = agr_runtime::compile(
        "RowNorm { hyper { lr = 0.1 where lr > 0 } state { m = 0 } \
         step { m = 0.9 * m + g / (row_mean(abs(g)) + 1e-8); p = p - lr * agr(m) / (norm(m) + 1); } }",
    )
    .unwrap();
    let mut cpu = spec.boxed();
    let mut emu = spec.boxed();
    emu.set_device(dev()).unwrap();
    let (mut vc, mut ve) = (init(21), init(21));
    for k in 0..3 {
        step_all(&mut *cpu, &mut vc, k, 8);
        step_all(&mut *emu, &mut ve, k, 8);
    }
    assert!(worst(&ve, &vc) <= 1.0);
}

/// Every golden file: the shared ones and the repository's own
/// (`$AGR_GOLDEN_DIR` and `$AGR_REPO_GOLDEN_DIR` where the test binary runs
/// on another machine).
fn golden_files() -> Vec<std::path::PathBuf> {
    let shared = std::env::var_os("AGR_GOLDEN_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"),
        std::path::PathBuf::from,
    );
    let own = std::env::var_os("AGR_REPO_GOLDEN_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden"),
        std::path::PathBuf::from,
    );
    let mut files = vec![];
    for dir in [
        shared.clone(),
        shared.join("more"),
        shared.join("frontier"),
        own.clone(),
        own.join("frontier"),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        files.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json")),
        );
    }
    files.sort();
    assert!(
        files.len() >= 20,
        "found {} golden files in {} and {}",
        files.len(),
        shared.display(),
        own.display()
    );
    files
}

#[test]
fn every_golden_file_replays_on_the_emulated_device() {
    // Each file through the generated built-in on the device, and through
    // its spec compiled at run time on the CPU (the IR evaluator) and on the
    // device (`agr replay --spec` with `--device cpu` / `emulated-cuda`).
    let files = golden_files();
    let mut replayed = 0;
    let mut waiting = vec![];
    let mut cpu_only = vec![];
    for f in &files {
        let g = golden::load(f).unwrap();
        let Some(b) = builtin(&g.optimizer) else {
            waiting.push(g.optimizer.clone());
            continue;
        };
        let spec = agr_runtime::compile(b.source).unwrap();
        let mut generated = b.make();
        if spec.desc().cpu_only.is_some() {
            // Adafactor (reduced states) and NAdam (a per-tensor state) run
            // on the CPU only. The device says so
            // and changes nothing; both CPU paths replay.
            let e = generated.set_device(dev()).unwrap_err();
            assert!(e.to_string().contains("on the CPU only"), "{e}");
            assert_eq!(generated.device(), agr_runtime::Device::Cpu);
            for (how, opt) in [
                ("generated, on the CPU", generated),
                ("compiled at run time, on the CPU", spec.boxed()),
            ] {
                let r = golden::replay_with(&g, opt).unwrap();
                assert!(r.pass, "{} ({how}): {r}", f.display());
            }
            cpu_only.push(g.optimizer.clone());
            continue;
        }
        generated.set_device(dev()).unwrap();
        let mut compiled = spec.boxed();
        compiled.set_device(dev()).unwrap();
        for (how, opt) in [
            ("generated, on the device", generated),
            ("compiled at run time, on the CPU", spec.boxed()),
            ("compiled at run time, on the device", compiled),
        ] {
            let r = golden::replay_with(&g, opt).unwrap();
            assert!(r.pass, "{} ({how}): {r}", f.display());
        }
        replayed += 1;
    }
    println!(
        "{replayed} of {} golden files replayed three ways; on the CPU only: {cpu_only:?}; not built in: {waiting:?}",
        files.len()
    );
    // Every built-in runs on the device: Muon's matrix blocks (cuBLAS there,
    // the `gemm` crate behind the same column-major calls here), Adafactor's
    // reduced states and NAdam's per-tensor state included.
    assert!(cpu_only.is_empty(), "{cpu_only:?}");
    assert!(replayed >= 35, "replayed {replayed}");
    assert!(waiting.is_empty(), "{waiting:?}");
}

#[test]
fn many_tensors_and_a_global_reduction_on_the_emulated_device() {
    // Adan-AGR clips by the global norm: a reduction over every tensor of
    // the step, combined by the last block of the last tensor.
    let b = builtin("adan_agr").unwrap();
    let shapes: Vec<Vec<usize>> = (0..300)
        .map(|i| match i % 4 {
            0 => vec![1 + i % 7],
            1 => vec![3, 1 + i % 11],
            2 => vec![9000 + i],
            _ => vec![2, 3, 1 + i % 5],
        })
        .collect();
    let mut cpu = b.make();
    let mut emu = b.make();
    for o in [&mut cpu, &mut emu] {
        o.set_hyper("max_grad_norm", HyperValue::Float(0.5))
            .unwrap();
    }
    emu.set_device(dev()).unwrap();
    let init: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), 40 + i as u64))
        .collect();
    let (mut vc, mut ve) = (init.clone(), init);
    for k in 0..3 {
        let grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.iter().product(), 1000 * k + i as u64))
            .collect();
        for (opt, vals) in [(&mut cpu, &mut vc), (&mut emu, &mut ve)] {
            let mut params: Vec<ParamMut<'_>> = vals
                .iter_mut()
                .zip(&shapes)
                .zip(&grads)
                .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
                .collect();
            opt.step_params(&mut params).unwrap();
        }
    }
    let w = worst(&ve, &vc);
    assert!(
        w <= 1.0,
        "300 tensors: the emulated device is {w} tolerances off"
    );
}

#[test]
fn the_update_kernel_skips_a_non_finite_step_by_itself() {
    // Under `Skip` nothing reads the finite check back between the passes:
    // the update kernel sees it and writes nothing. The trajectory with a
    // NaN step in the middle must continue exactly as the CPU's does (the
    // step counts, so the bias corrections, stay right).
    // (NAdam: a per-tensor state; Adafactor: reduced states; Muon-AGR: a
    // matrix block, whose own buffer a skipped step may leave changed.)
    for name in [
        "adamw_agr",
        "adan_agr",
        "lion_agr",
        "nadam",
        "adafactor",
        "muon_agr",
    ] {
        let b = builtin(name).unwrap();
        let mut cpu = b.make();
        let mut emu = b.make();
        emu.set_device(dev()).unwrap();
        let (mut vc, mut ve) = (init(70), init(70));
        for k in 0..6 {
            if k == 2 {
                for (opt, vals) in [(&mut cpu, &mut vc), (&mut emu, &mut ve)] {
                    let before = vals.clone();
                    let r = step_with_nan(&mut **opt, vals, 99, 3);
                    // The CPU reports it; a CUDA device counts it on the device.
                    let reported = r.skipped_non_finite.is_some();
                    assert_eq!(reported, opt.device() == Device::Cpu, "{name}");
                    assert_eq!(opt.non_finite_skips(), 1, "{name}");
                    assert!(*vals == before, "{name}: a skipped step wrote");
                }
                continue;
            }
            step_all(&mut *cpu, &mut vc, k, 12);
            step_all(&mut *emu, &mut ve, k, 12);
        }
        assert_eq!(emu.non_finite_skips(), 1);
        assert_eq!(emu.steps(), cpu.steps(), "{name}");
        for i in 0..SHAPES.len() {
            assert_eq!(emu.tensor_steps(i), cpu.tensor_steps(i), "{name}");
        }
        // The device's count survives a checkpoint and a move to the CPU.
        let mut resumed = b.make();
        resumed.load_checkpoint(&emu.save_checkpoint()).unwrap();
        assert_eq!(resumed.steps(), cpu.steps(), "{name}");
        emu.set_device(Device::Cpu).unwrap();
        assert_eq!(
            (emu.steps(), emu.non_finite_skips()),
            (cpu.steps(), 1),
            "{name}"
        );
        for i in 0..SHAPES.len() {
            assert_eq!(emu.tensor_steps(i), cpu.tensor_steps(i), "{name}");
        }
        let w = worst(&ve, &vc);
        assert!(
            w <= 1.0,
            "{name}: after a skipped step the devices differ by {w} tolerances"
        );
    }
}

#[test]
fn a_step_reads_nothing_back_under_skip() {
    // What would stall a GPU's stream: nothing in a step under `Skip`, even
    // one the update kernel skips; the counts when asked; the finite check
    // under `Error`. The counter is per thread, so tests running alongside
    // add nothing to it; each case is tried a few times.
    if dev() != Device::EmulatedCuda {
        println!("skipped: counts the emulated device's read-backs");
        return;
    }
    let b = builtin("adamw_agr").unwrap();
    let mut opt = b.make();
    opt.set_device(dev()).unwrap();
    let mut values = init(90);
    // Every try reads back the same number of times, or none is reported.
    let per_try = |f: &mut dyn FnMut()| {
        let counts: Vec<u64> = (0..3)
            .map(|_| {
                let before = agr_runtime::emulated::read_backs();
                f();
                agr_runtime::emulated::read_backs() - before
            })
            .collect();
        assert!(
            counts.iter().all(|&c| c == counts[0]),
            "read-backs per try: {counts:?}"
        );
        counts[0]
    };
    let mut k = 0;
    let steps = per_try(&mut || {
        step_all(&mut *opt, &mut values, k, 3);
        k += 1;
    });
    assert_eq!(steps, 0, "a step under Skip read back");
    let skipped = per_try(&mut || {
        step_with_nan(&mut *opt, &mut values.clone(), 5, 0);
    });
    assert_eq!(skipped, 0, "a step the device skipped read back");
    let asked = per_try(&mut || {
        let _ = opt.steps();
    });
    assert_eq!(asked, 1, "the step count reads the device's count once");
    let saved = per_try(&mut || {
        let _ = opt.save_checkpoint();
    });
    assert_eq!(saved, 1, "a checkpoint reads the device's counts once");
    opt.set_non_finite_policy(NonFinite::Error);
    let checked = per_try(&mut || step_all(&mut *opt, &mut values, 9, 3));
    assert_eq!(checked, 1, "Error reads the finite check back once");
}

/// Launches of one Muon step over tensors of `shapes` (zero gradients: only
/// the count matters).
fn muon_launches(shapes: &[&[usize]]) -> u64 {
    let mut opt = builtin("muon").unwrap().make();
    opt.set_device(Device::EmulatedCuda).unwrap();
    let mut values: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), 40 + i as u64))
        .collect();
    let grads: Vec<Vec<f32>> = values.iter().map(|v| data(v.len(), 7)).collect();
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(shapes)
        .zip(&grads)
        .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
        .collect();
    let before = agr_runtime::emulated::launches();
    opt.step_params(&mut params).unwrap();
    agr_runtime::emulated::launches() - before
}

#[test]
fn same_shape_matrices_share_their_products() {
    if dev() != Device::EmulatedCuda {
        println!("skipped: counts the emulated device's launches");
        return;
    }
    // Tensors of one shape are one batch: each product is one strided
    // batched SGEMM and each sum one kernel, however many tensors.
    let two = muon_launches(&[&[16, 8], &[16, 8]]);
    let eight = muon_launches(&[&[16usize, 8][..]; 8]);
    assert_eq!(two, eight);
    // A second shape is a second batch: its program again. (16x8 transposes
    // around the iteration, 8x16 does not: two sums fewer.)
    let both = muon_launches(&[&[16, 8], &[8, 16], &[16, 8]]);
    let wide = muon_launches(&[&[8, 16]]);
    assert_eq!(
        both,
        two + wide - 3,
        "passes and the block's kernel are shared"
    );
    assert_eq!(two, wide + 2);
}

#[test]
fn a_matrix_block_that_cannot_run_on_a_shape_changes_nothing_on_the_device() {
    let spec = agr_runtime::compile(
        "Square { hyper { lr = 0.1 } state { m = 0 } \
         step { m = 0.5 * m + g; matrix x = m { x = x @ x; } p = p - lr * x; } }",
    )
    .unwrap();
    assert!(spec.desc().cpu_only.is_none());
    let (mut cpu, mut emu) = (spec.boxed(), spec.boxed());
    emu.set_device(dev()).unwrap();
    // A 3x3 and a 2x2 tensor (products of squares); a 2x3 one without a
    // gradient (skipped) until the last step.
    let shapes: [&[usize]; 3] = [&[3, 3], &[2, 2], &[2, 3]];
    let init = || -> Vec<Vec<f32>> { shapes.iter().map(|s| data(s.iter().product(), 3)).collect() };
    let (mut vc, mut ve) = (init(), init());
    let step = |opt: &mut Box<dyn DynOptimizer>, vals: &mut Vec<Vec<f32>>, k: u64, odd: bool| {
        let grads: Vec<Vec<f32>> = vals.iter().map(|v| data(v.len(), 9 + k)).collect();
        let mut params: Vec<ParamMut<'_>> = vals
            .iter_mut()
            .zip(shapes)
            .zip(&grads)
            .enumerate()
            .map(|(i, ((v, s), g))| ParamMut::new(v, (i < 2 || odd).then_some(g.as_slice()), s))
            .collect();
        opt.step_params(&mut params)
    };
    for k in 0..3 {
        step(&mut cpu, &mut vc, k, false).unwrap();
        step(&mut emu, &mut ve, k, false).unwrap();
    }
    assert!(worst(&ve, &vc) <= 1.0, "{ve:?} vs {vc:?}");
    // With the 2x3 tensor's gradient, x @ x is refused before anything runs.
    let before = ve.clone();
    let m_before = emu.state_to_host(0, "m").unwrap().to_vec();
    let steps = emu.steps();
    let err = step(&mut emu, &mut ve, 3, true).unwrap_err();
    match &err {
        StepError::Matrix {
            index,
            block,
            shape,
            message,
        } => {
            assert_eq!(
                (*index, block.as_str(), shape.as_slice()),
                (2, "x", &[2, 3][..])
            );
            assert_eq!(message, "`@` of a 2x3 and a 2x3 matrix");
        }
        other => panic!("{other}"),
    }
    // The CPU says the same.
    let cpu_err = step(&mut cpu, &mut vc, 3, true).unwrap_err();
    assert_eq!(cpu_err.to_string(), err.to_string());
    assert_eq!(ve, before);
    assert_eq!(emu.state_to_host(0, "m").unwrap().to_vec(), m_before);
    assert!(emu.state_to_host(2, "m").is_none());
    assert_eq!(emu.steps(), steps);
}

#[test]
fn a_spec_the_device_cannot_run_is_refused_and_stays_on_the_cpu() {
    // A loop count that depends on the step: the host cannot know it
    // without reading the device back.
    let spec = agr_runtime::compile(
        "Grow { hyper { lr = 0.1 } step { matrix x = g { repeat min(t, 3) { x = 0.5 * x; } } p = p - lr * x; } }",
    )
    .unwrap();
    let why = spec.desc().cpu_only.unwrap();
    assert!(
        why.contains("matrix block (`x`)") && why.contains("`t`"),
        "{why}"
    );
    let mut opt = spec.boxed();
    let e = opt.set_device(dev()).unwrap_err();
    assert!(matches!(e, agr_runtime::DeviceError::CpuOnly { .. }), "{e}");
    assert!(e.to_string().contains("on the CPU only"), "{e}");
    assert_eq!(opt.device(), Device::Cpu);
    let mut w = vec![1.0f32; 4];
    opt.step_params(&mut [ParamMut::new(&mut w, Some(&[1.0; 4]), &[2, 2])])
        .unwrap();
    assert_eq!(w, vec![0.95; 4]);
}

// ---- Precision on the device ----

/// The precision modes the device is checked in: (name, parameter storage,
/// precision; states narrowed where `Some`).
fn precision_modes() -> Vec<(&'static str, Storage, Precision, Option<Storage>)> {
    let p = Precision::f32;
    vec![
        ("bf16 states", Storage::F32, p(), Some(Storage::Bf16)),
        ("f16 states", Storage::F32, p(), Some(Storage::F16)),
        ("bf16 parameters", Storage::Bf16, p(), None),
        (
            "bf16 parameters, master, bf16 states",
            Storage::Bf16,
            p().with_master(true),
            Some(Storage::Bf16),
        ),
        (
            "bf16 parameters, stochastic",
            Storage::Bf16,
            p().stochastic(7),
            None,
        ),
        (
            "f16 parameters, master, stochastic",
            Storage::F16,
            p().with_master(true).stochastic(9),
            None,
        ),
        (
            "f16 parameters, bf16 states",
            Storage::F16,
            p(),
            Some(Storage::Bf16),
        ),
    ]
}

/// `precision` with every per-element state of `opt` stored as `states`.
fn with_states(opt: &dyn DynOptimizer, precision: Precision, states: Option<Storage>) -> Precision {
    let desc = opt.desc();
    let Some(kind) = states else {
        return precision;
    };
    desc.states
        .iter()
        .enumerate()
        .filter(|(k, s)| {
            s.reduced.is_none() && !s.per_tensor && !desc.matrices.iter().any(|m| m.state == *k)
        })
        .fold(precision, |p, (_, s)| p.state(s.name, kind))
}

/// Step `k` over `values` stored as `kind` (narrowed exactly: they are
/// representable), with a NaN in tensor 1's gradient where `nan`.
fn step_kind(
    opt: &mut dyn DynOptimizer,
    kind: Storage,
    values: &mut [Vec<f32>],
    k: usize,
    nan: bool,
) {
    fn via<T: agr_runtime::Element>(
        values: &mut [Vec<f32>],
        grads: &[Option<Vec<f32>>],
        narrow: fn(f32) -> T,
        step: impl FnOnce(&mut [ParamMut<'_, T>]),
    ) {
        let mut vs: Vec<Vec<T>> = values
            .iter()
            .map(|v| v.iter().map(|&x| narrow(x)).collect())
            .collect();
        let gs: Vec<Option<Vec<T>>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.iter().map(|&x| narrow(x)).collect()))
            .collect();
        let mut ps: Vec<ParamMut<'_, T>> = vs
            .iter_mut()
            .zip(SHAPES)
            .zip(&gs)
            .map(|((v, s), g)| ParamMut::new(v, g.as_deref(), s))
            .collect();
        step(&mut ps);
        for (out, v) in values.iter_mut().zip(&vs) {
            out.iter_mut()
                .zip(v)
                .for_each(|(o, &x)| *o = agr_runtime::Element::to_f32(x));
        }
    }
    let grads: Vec<Option<Vec<f32>>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut g = data(v.len(), 31 * k as u64 + i as u64);
            if nan && i == 1 {
                g[3] = f32::NAN;
            }
            // The 3rd tensor has no gradient every other step.
            (i != 2 || k % 2 == 0).then_some(g)
        })
        .collect();
    use half::{bf16, f16};
    match kind {
        Storage::F32 => {
            let mut ps: Vec<ParamMut<'_>> = values
                .iter_mut()
                .zip(SHAPES)
                .zip(&grads)
                .map(|((v, s), g)| ParamMut::new(v, g.as_deref(), s))
                .collect();
            opt.step_params(&mut ps).unwrap();
        }
        Storage::Bf16 => via(values, &grads, bf16::from_f32, |ps| {
            opt.step_params_bf16(ps).unwrap();
        }),
        Storage::F16 => via(values, &grads, f16::from_f32, |ps| {
            opt.step_params_f16(ps).unwrap();
        }),
        _ => unreachable!(),
    }
}

/// The largest difference between `a` and `b` in units of `kind`'s last
/// place at `b` (f32: one unit is 1e-5 |b| + 1e-6, as [`worst`]).
fn worst_ulps(a: &[f32], b: &[f32], kind: Storage) -> f64 {
    let rel = match kind {
        Storage::Bf16 => 2f64.powi(-8),
        Storage::F16 => 2f64.powi(-11),
        _ => 1e-5,
    };
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs() / (1e-6 + rel * f64::from(y).abs()))
        .fold(0.0, f64::max)
}

/// Each built-in in one precision mode (the modes in turn, AdamW in all
/// of them) steps on the device as on the CPU: bit for bit where the
/// spec has no reduction (the kernels' arithmetic is the CPU's, and so are
/// the conversions and the stochastic rounding's random bits); else within
/// a unit of the storage's last place, as reductions fold in another order.
/// A non-finite step is skipped in between (stochastic rounding's step
/// count then comes from the device's skip counter), the optimizer moves
/// to the device after its first step, and the device's state comes back
/// through a checkpoint.
#[test]
fn precision_modes_step_on_the_device_as_on_the_cpu() {
    let modes = precision_modes();
    let mut runs: Vec<(&str, usize)> = BUILTINS
        .iter()
        .enumerate()
        .map(|(j, b)| (b.name, j % modes.len()))
        .collect();
    runs.extend((0..modes.len()).map(|m| ("adamw", m)));
    let mut exact = 0;
    for (name, m) in runs {
        let (mode, kind, precision, states) = &modes[m];
        let b = builtin(name).unwrap();
        let mut cpu = b.make();
        let mut emu = b.make();
        let precision = with_states(&*cpu, precision.clone(), *states);
        cpu.set_precision(precision.clone()).unwrap();
        emu.set_precision(precision.clone()).unwrap();
        cpu.set_non_finite_policy(NonFinite::Skip);
        emu.set_non_finite_policy(NonFinite::Skip);
        let narrow = |v: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            v.into_iter()
                .map(|x| match kind {
                    Storage::Bf16 => x
                        .iter()
                        .map(|&y| half::bf16::from_f32(y).to_f32())
                        .collect(),
                    Storage::F16 => x.iter().map(|&y| half::f16::from_f32(y).to_f32()).collect(),
                    _ => x,
                })
                .collect()
        };
        let (mut vc, mut ve) = (narrow(init(3)), narrow(init(3)));
        for k in 0..6 {
            if k == 1 {
                emu.set_device(dev()).unwrap();
            }
            step_kind(&mut *cpu, *kind, &mut vc, k, k == 3);
            step_kind(&mut *emu, *kind, &mut ve, k, k == 3);
        }
        assert_eq!(emu.steps(), 5, "{name}, {mode}");
        assert_eq!(cpu.steps(), 5, "{name}, {mode}");
        // No reduction but the finite check (whose result changes no value).
        let desc = b.make().desc();
        let bitwise =
            (0..desc.reductions.len()).all(|r| r == desc.finite_check) && desc.matrices.is_empty();
        for (i, (e, c)) in ve.iter().zip(&vc).enumerate() {
            if bitwise {
                assert!(e == c, "{name}, {mode}: parameter {i} differs");
            } else {
                let w = worst_ulps(e, c, *kind);
                assert!(w <= 1.0, "{name}, {mode}: parameter {i} is {w} units off");
            }
        }
        // The state, through a checkpoint made on the device and loaded
        // into a CPU optimizer in the same precision.
        let mut back = b.make();
        back.set_precision(precision.clone()).unwrap();
        back.load_checkpoint(&emu.save_checkpoint()).unwrap();
        for s in b.make().desc().states {
            let s_kind = precision
                .states
                .iter()
                .find(|(n, _)| n == s.name)
                .map(|(_, k)| *k);
            for i in 0..SHAPES.len() {
                let (a, c) = (back.state_to_host(i, s.name), cpu.state_to_host(i, s.name));
                assert_eq!(a.is_some(), c.is_some(), "{name}, {mode}: {}", s.name);
                let (Some(a), Some(c)) = (a, c) else { continue };
                if bitwise {
                    assert!(a == c, "{name}, {mode}: state {} of {i} differs", s.name);
                } else {
                    let w = worst_ulps(&a, &c, s_kind.unwrap_or(Storage::F32));
                    assert!(
                        w <= 1.0,
                        "{name}, {mode}: state {} of {i}: {w} units off",
                        s.name
                    );
                }
            }
        }
        // And it steps on from there as the CPU does.
        let mut vb = ve.clone();
        step_kind(&mut *back, *kind, &mut vb, 6, false);
        step_kind(&mut *emu, *kind, &mut ve, 6, false);
        if bitwise {
            assert!(vb == ve, "{name}, {mode}: resumed on the CPU differs");
            exact += 1;
        }
        println!(
            "{name}, {mode}: {}",
            if bitwise {
                "bit for bit"
            } else {
                "within a unit"
            }
        );
    }
    assert!(exact >= 14, "{exact} runs compared bit for bit");
}

/// The precision references (`tests/golden/precision`) replay on the
/// device as on the CPU: torch's bf16 AdamW, fused and foreach, and the
/// f32 master copy (bit for bit); the 8-bit one stays on the CPU.
#[test]
fn precision_references_replay_on_the_device() {
    let dir = std::env::var_os("AGR_REPO_GOLDEN_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden"),
        std::path::PathBuf::from,
    );
    for name in [
        "adamw_bf16_fused",
        "adamw_bf16_foreach",
        "adamw_bf16_master",
        "adamw_q8",
    ] {
        let g = golden::load(&dir.join("precision").join(format!("{name}.json"))).unwrap();
        let mut opt = builtin(&g.optimizer).unwrap().make();
        opt.set_device(dev()).unwrap();
        let r = golden::replay_with(&g, opt);
        if name.contains("q8") {
            let e = r.unwrap_err();
            assert!(e.contains("8-bit (q8/uq8) states"), "{e}");
            continue;
        }
        let r = r.unwrap();
        println!("{name} on {}: {r}", dev());
        assert!(r.pass, "{name}: {r}");
        if name.contains("master") {
            assert_eq!(r.worst_abs, 0.0, "{name}: {r}");
        }
    }
}

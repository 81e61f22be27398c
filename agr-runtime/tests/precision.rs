//! Precision modes (`agr_runtime::precision`): bf16/f16 parameters with or
//! without an f32 master copy, stochastic rounding, bf16/f16/8-bit states,
//! against references and independent computations; misuse is an error that
//! changes nothing.

use std::path::PathBuf;

use agr_runtime::optim::{self, AdamW, AdamWConfig};
use agr_runtime::{golden, DynOptimizer, ParamMut, Precision, Storage};
use half::{bf16, f16};

mod common;
use common::data;

fn precision_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/precision")
        .join(name)
}

#[test]
fn precision_references_replay() {
    // (file, worst tolerance ratio allowed: the file's own tolerance)
    for name in [
        "adamw_bf16_fused.json",
        "adamw_bf16_foreach.json",
        "adamw_bf16_master.json",
        "adamw_q8.json",
    ] {
        let g = golden::load(&precision_file(name)).unwrap();
        let r = golden::replay(&g).unwrap();
        println!("{name}: {r}");
        assert!(r.pass, "{name}: {r}");
        // The master copy and the 8-bit moments are computed the way agr
        // computes them: to the bit.
        if name.contains("master") || name.contains("q8") {
            assert_eq!(r.worst_abs, 0.0, "{name}: {r}");
        }
    }
}

#[test]
fn without_a_master_copy_small_updates_are_lost() {
    // The master reference's updates are mostly below half a bf16 ulp:
    // stepping the bf16 parameters themselves cannot follow it.
    let mut g = golden::load(&precision_file("adamw_bf16_master.json")).unwrap();
    g.precision.as_mut().unwrap().master = false;
    let r = golden::replay(&g).unwrap();
    println!("without master: {r}");
    assert!(!r.pass && r.worst_ratio > 2.0, "{r}");
}

const SHAPES: &[&[usize]] = &[&[3, 12000], &[8, 40], &[5, 3]];

fn grads_at(t: u64) -> Vec<Vec<f32>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // bf16 values: the gradient a bf16 model produces.
            data(s.iter().product(), 7 * t + i as u64)
                .into_iter()
                .map(|x| bf16::from_f32(0.1 * x).to_f32())
                .collect()
        })
        .collect()
}

fn init_bf16() -> Vec<Vec<f32>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            data(s.iter().product(), 1000 + i as u64)
                .into_iter()
                .map(|x| bf16::from_f32(x).to_f32())
                .collect()
        })
        .collect()
}

fn step_f32(opt: &mut dyn DynOptimizer, values: &mut [Vec<f32>], grads: &[Vec<f32>]) {
    let mut ps: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(grads)
        .zip(SHAPES)
        .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
        .collect();
    opt.step_params(&mut ps).unwrap();
}

fn step_bf16(opt: &mut dyn DynOptimizer, values: &mut [Vec<bf16>], grads: &[Vec<f32>]) {
    let gs: Vec<Vec<bf16>> = grads
        .iter()
        .map(|g| g.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let mut ps: Vec<ParamMut<'_, bf16>> = values
        .iter_mut()
        .zip(&gs)
        .zip(SHAPES)
        .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
        .collect();
    opt.step_params_bf16(&mut ps).unwrap();
}

/// With a master copy, every built-in steps its f32 master exactly as the
/// f32 engine steps f32 parameters, and the bf16 parameters are the master
/// rounded to nearest.
#[test]
fn every_builtin_with_a_master_copy_is_the_f32_step_rounded() {
    for b in optim::BUILTINS {
        let mut reference = b.make();
        let mut ours = b.make();
        ours.set_precision(Precision::f32().with_master(true))
            .unwrap();
        let mut master: Vec<Vec<f32>> = init_bf16();
        let mut values: Vec<Vec<bf16>> = init_bf16()
            .iter()
            .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
            .collect();
        for t in 1..=4 {
            let grads = grads_at(t);
            step_f32(reference.as_mut(), &mut master, &grads);
            step_bf16(ours.as_mut(), &mut values, &grads);
            for (m, v) in master.iter().zip(&values) {
                for (x, y) in m.iter().zip(v) {
                    assert_eq!(
                        bf16::from_f32(*x).to_bits(),
                        y.to_bits(),
                        "{}: step {t}",
                        b.name
                    );
                }
            }
        }
        // The master copy is saved with the state and comes back.
        let bytes = ours.save_checkpoint();
        let mut resumed = b.make();
        resumed
            .set_precision(Precision::f32().with_master(true))
            .unwrap();
        resumed.load_checkpoint(&bytes).unwrap();
        let mut v2 = values.clone();
        let grads = grads_at(5);
        step_bf16(ours.as_mut(), &mut values, &grads);
        step_bf16(resumed.as_mut(), &mut v2, &grads);
        assert!(values == v2, "{}: resumed differs", b.name);
    }
}

/// Narrowed states: each kernel sees exactly the f32 values its states
/// hold, widened; a step from a checkpoint continues bit for bit.
#[test]
fn narrowed_states_round_trip_through_checkpoints_and_count_their_bytes() {
    let names = ["m", "v"];
    for (kind, bytes_per) in [
        (Storage::Bf16, 2.0),
        (Storage::F16, 2.0),
        (Storage::Q8, 1.0 + 4.0 / 256.0),
    ] {
        let precision = Precision::f32().state("m", kind).state(
            "v",
            if kind == Storage::Q8 {
                Storage::Uq8
            } else {
                kind
            },
        );
        let mut opt = AdamW::with_config(AdamWConfig::default().with_lr(1e-2)).unwrap();
        opt.set_precision(precision.clone()).unwrap();
        assert_eq!(opt.state_storage()[0], kind);
        let mut values = init_bf16();
        for t in 1..=3 {
            step_f32(&mut opt, &mut values, &grads_at(t));
        }
        // The state reads back in f32 only through a copy.
        assert!(opt.state(0, "m").is_none());
        let m = opt.state_to_host(0, "m").unwrap();
        assert!(m.iter().any(|&x| x != 0.0));
        let numel: usize = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
        let blocks: usize = SHAPES
            .iter()
            .map(|s| s.iter().product::<usize>().div_ceil(256))
            .sum();
        let expected = match kind {
            Storage::Q8 => 2 * (numel + 4 * blocks),
            _ => (2.0 * bytes_per * numel as f64) as usize,
        };
        assert_eq!(opt.state_bytes().state, expected, "{kind}");
        let ckpt = opt.save_checkpoint();
        let mut resumed = AdamW::with_config(AdamWConfig::default().with_lr(1e-2)).unwrap();
        resumed.set_precision(precision).unwrap();
        resumed.load_checkpoint(&ckpt).unwrap();
        let mut v2 = values.clone();
        step_f32(&mut opt, &mut values, &grads_at(4));
        step_f32(&mut resumed, &mut v2, &grads_at(4));
        assert!(values == v2, "{kind}: resumed differs");
        // Saved as stored: about the state's bytes, not 4 per value.
        assert!(ckpt.len() < expected + 4096, "{kind}: {} bytes", ckpt.len());
        for name in names {
            assert_eq!(
                opt.state_to_host(1, name),
                resumed.state_to_host(1, name),
                "{kind}: {name}"
            );
        }
        // Back to f32: the values are kept (widened exactly).
        let before = opt.state_to_host(0, "v").unwrap();
        opt.set_precision(Precision::f32()).unwrap();
        assert_eq!(opt.state(0, "v").unwrap(), before.as_slice());
    }
}

/// Stochastic rounding: unbiased, reproducible from its seed, the same
/// whatever the thread count.
#[test]
fn stochastic_rounding_is_unbiased_and_reproducible() {
    let spec = "Sgd { hyper { lr = 0.0001 } step { p = p - lr * g; } }";
    let n = 4096;
    let steps = 1000;
    let run = |precision: Precision, threads: usize| -> Vec<bf16> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut opt = agr_runtime::compile(spec).unwrap().optimizer();
            opt.set_precision(precision).unwrap();
            let mut p = vec![bf16::ONE; n];
            let g = vec![bf16::from_f32(-1.0); n];
            let shape = [n];
            for _ in 0..steps {
                let mut ps = [ParamMut::new(&mut p[..], Some(&g[..]), &shape)];
                opt.step_params_bf16(&mut ps).unwrap();
            }
            p
        })
    };
    let exact = 1.0 + steps as f64 * 1e-4; // 1.1
    let nearest = run(Precision::f32(), 1);
    // Each update is 1e-4, below half an ulp (2^-8) at 1: nearest never moves.
    assert!(nearest.iter().all(|&x| x == bf16::ONE));
    let sr = run(Precision::f32().stochastic(42), 2);
    let mean = sr.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64;
    // Per element the rounding errors are a martingale with per-step
    // variance at most ulp²/4 (ulp = 2^-7 on [1, 2)): the mean of n
    // elements has sd <= sqrt(steps)/2 * 2^-7 / sqrt(n) = 0.0019. 5 sd:
    let bound = 5.0 * (steps as f64).sqrt() / 2.0 * 2f64.powi(-7) / (n as f64).sqrt();
    println!("stochastic rounding: mean {mean:.5} (exact {exact}), bound {bound:.5}");
    assert!(
        (mean - exact).abs() < bound,
        "mean {mean}, exact {exact}, bound {bound}"
    );
    // Reproducible from the seed, whatever the threads; another seed differs.
    assert_eq!(sr, run(Precision::f32().stochastic(42), 1));
    assert_ne!(sr, run(Precision::f32().stochastic(43), 2));
}

#[test]
fn f16_parameters_step_with_a_master_copy_too() {
    let mut opt = AdamW::with_config(AdamWConfig::default()).unwrap();
    opt.set_precision(Precision::f32().with_master(true))
        .unwrap();
    let mut reference = AdamW::with_config(AdamWConfig::default()).unwrap();
    let init: Vec<f32> = data(1000, 3)
        .iter()
        .map(|&x| f16::from_f32(x).to_f32())
        .collect();
    let mut master = init.clone();
    let mut p: Vec<f16> = init.iter().map(|&x| f16::from_f32(x)).collect();
    for t in 0..5 {
        let g: Vec<f32> = data(1000, 50 + t)
            .iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect();
        let gh: Vec<f16> = g.iter().map(|&x| f16::from_f32(x)).collect();
        reference
            .step_params(&mut [ParamMut::new(&mut master, Some(&g), &[1000])])
            .unwrap();
        opt.step_params_of(&mut [ParamMut::new(&mut p, Some(&gh), &[1000])])
            .unwrap();
        let want: Vec<f16> = master.iter().map(|&x| f16::from_f32(x)).collect();
        assert_eq!(p, want);
    }
}

#[test]
fn misuse_is_an_error_that_changes_nothing() {
    // A state the spec does not have.
    let mut opt = AdamW::with_config(AdamWConfig::default()).unwrap();
    let e = opt
        .set_precision(Precision::f32().state("u", Storage::Bf16))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("`AdamW` has no state `u` (its states: m, v)"),
        "{e}"
    );
    assert_eq!(opt.state_storage(), vec![Storage::F32; 2]);
    // A reduced state.
    let mut ada = optim::builtin("adafactor").unwrap().make();
    let e = ada
        .set_precision(Precision::f32().state("vr", Storage::Bf16))
        .unwrap_err();
    assert!(e.to_string().contains("is a reduced state"), "{e}");
    // q8 where work items are whole rows.
    let mut gc = optim::builtin("adamw_gc").unwrap().make();
    let e = gc
        .set_precision(Precision::f32().state("m", Storage::Q8))
        .unwrap_err();
    assert!(e.to_string().contains("reduces per row"), "{e}");
    gc.set_precision(Precision::f32().state("m", Storage::Bf16))
        .unwrap();
    // 8-bit states stay on the CPU; narrowed optimizers are not sharded.
    opt.set_precision(Precision::f32().state("m", Storage::Q8))
        .unwrap();
    let e = opt
        .set_device(agr_runtime::Device::EmulatedCuda)
        .unwrap_err();
    assert!(e.to_string().contains("8-bit (q8/uq8) states"), "{e}");
    assert_eq!(opt.device(), agr_runtime::Device::Cpu);
    opt.set_precision(Precision::f32().state("m", Storage::Bf16))
        .unwrap();
    let comm = agr_runtime::comm::Threads::group(1).remove(0);
    let e = opt
        .shard(comm, agr_runtime::shard::GradMode::Full)
        .unwrap_err();
    assert!(e.to_string().contains("not sharded"), "{e}");
    // On a device, 8-bit states are refused and nothing changes.
    let mut dev = AdamW::with_config(AdamWConfig::default()).unwrap();
    if dev.set_device(agr_runtime::Device::EmulatedCuda).is_ok() {
        let e = dev
            .set_precision(Precision::f32().state("v", Storage::Uq8))
            .unwrap_err();
        assert!(e.to_string().contains("8-bit (q8/uq8) states"), "{e}");
        assert_eq!(dev.state_storage(), vec![Storage::F32; 2]);
    }
}

/// Every built-in with its per-element states narrowed steps as the f32
/// optimizer does when its states are rounded after each step (done here
/// through checkpoints: saved in f32, loaded into a narrowed optimizer,
/// saved as stored, loaded back into the f32 one). Each reduction pass
/// widens only what it reads, so this also checks those masks.
#[test]
fn every_builtin_with_narrowed_states_is_the_f32_step_with_rounded_states() {
    for kind in [Storage::Bf16, Storage::Q8] {
        let mut tested = vec![];
        for b in optim::BUILTINS {
            let desc = b.make().desc();
            let narrowable: Vec<&str> = desc
                .states
                .iter()
                .enumerate()
                .filter(|(k, s)| {
                    s.reduced.is_none()
                        && !s.per_tensor
                        && !desc.matrices.iter().any(|m| m.state == *k)
                })
                .map(|(_, s)| s.name)
                .collect();
            let precision = narrowable
                .iter()
                .fold(Precision::f32(), |p, s| p.state(s, kind));
            let mut ours = b.make();
            if narrowable.is_empty() || ours.set_precision(precision.clone()).is_err() {
                // No per-element state, or q8 on a spec with row reductions.
                continue;
            }
            let mut reference = b.make();
            let mut rounder = b.make();
            rounder.set_precision(precision).unwrap();
            let mut a = init_bf16();
            let mut r = init_bf16();
            for t in 1..=4 {
                let grads = grads_at(t);
                step_f32(ours.as_mut(), &mut a, &grads);
                step_f32(reference.as_mut(), &mut r, &grads);
                rounder
                    .load_checkpoint(&reference.save_checkpoint())
                    .unwrap();
                reference
                    .load_checkpoint(&rounder.save_checkpoint())
                    .unwrap();
                assert!(a == r, "{} with {kind} states: step {t} differs", b.name);
            }
            tested.push(b.name);
        }
        println!("{kind}: {} built-ins: {}", tested.len(), tested.join(" "));
        // All but Adafactor (no per-element state but on vectors) and, for
        // q8, the row-reducing adamw_gc.
        assert!(
            tested.len() >= optim::BUILTINS.len() - 2,
            "{kind}: {tested:?}"
        );
    }
}

/// A spec may declare how a state is stored; it steps as the same spec with
/// that precision set, and the config can still change it.
#[test]
fn storage_declared_in_the_spec_is_the_default_precision() {
    let declared = "AdamWLow {
        hyper { lr = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01 }
        state { m: bf16 = 0, v: uq8 = 0 }
        step {
            p = p * (1 - lr * weight_decay);
            m = beta1 * m + (1 - beta1) * g;
            v = beta2 * v + (1 - beta2) * g * g;
            p = p - lr / (1 - beta1 ^ t) * m / (sqrt(v) / sqrt(1 - beta2 ^ t) + eps);
        }
    }";
    let plain = declared.replace("m: bf16 = 0, v: uq8 = 0", "m = 0, v = 0");
    let mut ours = agr_runtime::compile(declared).unwrap().optimizer();
    assert_eq!(ours.state_storage(), vec![Storage::Bf16, Storage::Uq8]);
    let mut reference = agr_runtime::compile(&plain).unwrap().optimizer();
    reference
        .set_precision(
            Precision::f32()
                .state("m", Storage::Bf16)
                .state("v", Storage::Uq8),
        )
        .unwrap();
    let (mut a, mut r) = (init_bf16(), init_bf16());
    for t in 1..=3 {
        step_f32(&mut ours, &mut a, &grads_at(t));
        step_f32(&mut reference, &mut r, &grads_at(t));
    }
    assert!(a == r);
    assert_eq!(ours.state_to_host(0, "v"), reference.state_to_host(0, "v"));
    // Overridden per state; the others keep the declaration.
    ours.set_precision(Precision::f32().state("v", Storage::F32))
        .unwrap();
    assert_eq!(ours.state_storage(), vec![Storage::Bf16, Storage::F32]);
    // A declared 8-bit state keeps the optimizer on the CPU, with the
    // reason; bf16 moves to the device and steps there as here.
    let mut q8 = agr_runtime::compile(declared).unwrap().optimizer();
    let e = q8
        .set_device(agr_runtime::Device::EmulatedCuda)
        .unwrap_err();
    assert!(e.to_string().contains("8-bit (q8/uq8) states"), "{e}");
    reference
        .set_precision(Precision::f32().state("m", Storage::Bf16))
        .unwrap();
    if ours.set_device(agr_runtime::Device::EmulatedCuda).is_ok() {
        step_f32(&mut ours, &mut a, &grads_at(4));
        step_f32(&mut reference, &mut r, &grads_at(4));
        assert!(a == r);
        assert_eq!(ours.state_to_host(0, "m"), reference.state_to_host(0, "m"));
    }
}

#[test]
fn storage_words_are_checked_where_they_are_written() {
    let spec = |state: &str, step: &str| {
        format!("S {{ hyper {{ lr = 0.1 }} state {{ {state} }} step {{ {step} }} }}")
    };
    let err = |src: String| agr_runtime::compile(&src).unwrap_err().to_string();
    let e = err(spec("m: bf16(2) = 0", "m = g; p = p - lr * m;"));
    assert!(e.contains("the storage `bf16` takes no number"), "{e}");
    let e = err(spec("m: bf17 = 0", "m = g; p = p - lr * m;"));
    assert!(e.contains("unknown state shape `bf17`"), "{e}");
    // q8 blocks and whole-row work items do not mix.
    let e = err(spec("m: q8 = 0", "m = g - row_mean(g); p = p - lr * m;"));
    assert!(e.contains("state `m` is stored in q8"), "{e}");
    agr_runtime::compile(&spec("m: bf16 = 0", "m = g - row_mean(g); p = p - lr * m;")).unwrap();
}

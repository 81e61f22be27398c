//! One optimizer over several specs (`agr_runtime::multi::Multi`), checked
//! against the same specs stepping their parameters separately.

use agr_runtime::groups::{select, ParamGroups};
use agr_runtime::multi::Multi;
use agr_runtime::{
    compile, optim, CheckpointError, Device, DeviceError, DynOptimizer, GroupError, HyperValue,
    NonFinite, ParamMut, StepError,
};

fn builtin(name: &str) -> Box<dyn DynOptimizer> {
    optim::builtin(name).unwrap().make()
}

/// Muon-AGR on the matrices except the head, AdamW-AGR on the rest.
fn muon_and_adamw() -> Multi {
    let mut adamw = builtin("adamw_agr");
    adamw.set_hyper("lr", HyperValue::Float(2e-3)).unwrap();
    Multi::new(adamw)
        .part(
            "hidden",
            |p| p.ndim() >= 2 && !p.name.starts_with("head."),
            builtin("muon_agr"),
        )
        .unwrap()
}

/// A small model: (name, shape, values).
fn model() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    let vals = |n: usize, s: f32| {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + s).sin()) * 0.5)
            .collect()
    };
    vec![
        ("body.w", vec![6, 4], vals(24, 0.1)),
        ("body.b", vec![6], vals(6, 0.2)),
        ("head.w", vec![3, 6], vals(18, 0.3)),
        ("mid.w", vec![5, 3], vals(15, 0.4)),
    ]
}

fn grads(step: usize) -> Vec<Vec<f32>> {
    model()
        .iter()
        .enumerate()
        .map(|(k, (_, _, v))| {
            (0..v.len())
                .map(|i| ((i * 7 + k * 3 + step * 11) as f32 * 0.13).cos() * 0.1)
                .collect()
        })
        .collect()
}

fn names_shapes(m: &[(&'static str, Vec<usize>, Vec<f32>)]) -> Vec<(&'static str, Vec<usize>)> {
    m.iter().map(|(n, s, _)| (*n, s.clone())).collect()
}

fn step(opt: &mut dyn DynOptimizer, params: &mut [(&str, Vec<usize>, Vec<f32>)], g: &[Vec<f32>]) {
    let mut ps: Vec<ParamMut<'_>> = params
        .iter_mut()
        .zip(g)
        .map(|((_, s, v), g)| ParamMut::new(v, Some(g), s))
        .collect();
    opt.step_params(&mut ps).unwrap();
}

fn with_groups(opt: &mut dyn DynOptimizer, m: &[(&'static str, Vec<usize>, Vec<f32>)]) {
    let ns = names_shapes(m);
    let list: Vec<(&str, &[usize])> = ns.iter().map(|(n, s)| (*n, s.as_slice())).collect();
    opt.set_param_groups(&ParamGroups::paper(), &list).unwrap();
}

#[test]
fn parts_step_as_their_optimizers_do_alone() {
    let mut multi = muon_and_adamw();
    let mut m = model();
    with_groups(&mut multi, &m);
    assert_eq!(multi.part_of(0), Some("hidden"));
    assert_eq!(multi.group_name(1), "rest/vectors");
    assert_eq!(multi.group_name(2), "rest/default");
    assert_eq!(multi.group_name(3), "hidden/default");

    // The same specs, each on its own parameters, with the same groups.
    let mut muon = builtin("muon_agr");
    let mut adamw = builtin("adamw_agr");
    adamw.set_hyper("lr", HyperValue::Float(2e-3)).unwrap();
    let all = model();
    let mut hidden: Vec<_> = vec![all[0].clone(), all[3].clone()];
    let mut rest: Vec<_> = vec![all[1].clone(), all[2].clone()];
    with_groups(muon.as_mut(), &hidden);
    with_groups(adamw.as_mut(), &rest);

    for s in 0..6 {
        let g = grads(s);
        step(&mut multi, &mut m, &g);
        step(muon.as_mut(), &mut hidden, &[g[0].clone(), g[3].clone()]);
        step(adamw.as_mut(), &mut rest, &[g[1].clone(), g[2].clone()]);
    }
    // Bit for bit: the same engines on the same bytes.
    assert_eq!(m[0].2, hidden[0].2);
    assert_eq!(m[3].2, hidden[1].2);
    assert_eq!(m[1].2, rest[0].2);
    assert_eq!(m[2].2, rest[1].2);
    assert_eq!(multi.state(0, "buf"), muon.state(0, "buf"));
    assert_eq!(multi.state(2, "v"), adamw.state(1, "v"));
    assert!(multi.state(0, "m").is_none(), "Muon has no `m`");
    assert_eq!(multi.steps(), 6);
    assert_eq!(multi.tensor_steps(3), 6);
}

#[test]
fn without_names_the_first_step_splits_by_shape() {
    let mut opt = Multi::new(builtin("adamw"))
        .part("matrices", select::ndim_at_least(2), builtin("muon"))
        .unwrap();
    let mut m = model();
    step(&mut opt, &mut m, &grads(0));
    assert_eq!(opt.part_of(0), Some("matrices"));
    assert_eq!(opt.part_of(1), Some("rest"));
    assert_eq!(opt.part_of(2), Some("matrices"));
    assert_eq!(opt.group_name(1), "rest/default");
    // Naming them later must not move a parameter to another part.
    let ns = names_shapes(&m);
    let list: Vec<(&str, &[usize])> = ns.iter().map(|(n, s)| (*n, s.as_slice())).collect();
    opt.set_param_groups(&ParamGroups::paper(), &list).unwrap();
    let mut other = muon_and_adamw();
    step(&mut other, &mut model(), &grads(0));
    let err = other
        .set_param_groups(&ParamGroups::new(), &list)
        .unwrap_err();
    assert!(
        matches!(&err, GroupError::Misuse(m) if m.contains("parameter #2 (`head.w`) would move from part `hidden` to part `rest`")),
        "{err}"
    );
}

#[test]
fn a_schedule_moves_every_part_at_its_own_ratio() {
    let mut opt = muon_and_adamw();
    assert_eq!(opt.lr(), Some(2e-3));
    opt.set_lr(1e-3).unwrap();
    assert_eq!(opt.lr(), Some(1e-3));
    // Muon's default 0.02 was 10x AdamW's 2e-3.
    let muon_lr = opt.part_ref("hidden").unwrap().lr().unwrap();
    assert!((muon_lr - 0.01).abs() < 1e-15, "{muon_lr}");
    // A refused value changes no part.
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.lr(), Some(1e-3));
    assert_eq!(opt.part_ref("hidden").unwrap().lr(), Some(muon_lr));
    // set_hyper("lr") is set_lr; other names are the rest's.
    opt.set_hyper("lr", HyperValue::Float(2e-3)).unwrap();
    assert!((opt.part_ref("hidden").unwrap().lr().unwrap() - 0.02).abs() < 1e-15);
    opt.set_hyper("weight_decay", HyperValue::Float(0.5))
        .unwrap();
    assert_eq!(opt.hyper("weight_decay"), Some(HyperValue::Float(0.5)));
    assert_eq!(
        opt.part_ref("hidden").unwrap().hyper("weight_decay"),
        Some(HyperValue::Float(0.1))
    );
}

#[test]
fn bad_input_in_one_part_changes_no_part() {
    for policy in [NonFinite::Skip, NonFinite::Error] {
        let mut opt = muon_and_adamw();
        opt.set_non_finite_policy(policy);
        let mut m = model();
        let before = m.clone();
        let mut g = grads(0);
        g[2][5] = f32::NAN; // the head: the rest's part
        let mut ps: Vec<ParamMut<'_>> = m
            .iter_mut()
            .zip(&g)
            .map(|((_, s, v), g)| ParamMut::new(v, Some(g), s))
            .collect();
        let r = opt.step_params(&mut ps);
        match policy {
            NonFinite::Skip => {
                let r = r.unwrap();
                assert_eq!(r.skipped_non_finite, Some(2));
                assert_eq!((r.step, r.updated), (0, 0));
                assert_eq!(opt.non_finite_skips(), 1);
            }
            _ => assert_eq!(r.unwrap_err(), StepError::NonFinite { index: 2 }),
        }
        assert_eq!(m, before, "no parameter moved ({policy:?})");
        assert!(opt.state(0, "buf").is_none() && opt.state(1, "m").is_none());
        assert_eq!(opt.steps(), 0);
    }

    // A gradient of the wrong length in the rest's part: the Muon part,
    // checked first, does not move either.
    let mut opt = muon_and_adamw();
    let mut m = model();
    let before = m.clone();
    let mut g = grads(0);
    g[1].pop();
    let mut ps: Vec<ParamMut<'_>> = m
        .iter_mut()
        .zip(&g)
        .map(|((_, s, v), g)| ParamMut::new(v, Some(g), s))
        .collect();
    let err = opt.step_params(&mut ps).unwrap_err();
    assert_eq!(
        err,
        StepError::GradLen {
            index: 1,
            expected: 6,
            got: 5
        }
    );
    drop(ps);
    assert_eq!(m, before);
    // Fewer parameters than the split: refused.
    step(&mut opt, &mut m, &grads(0));
    let mut ps: Vec<ParamMut<'_>> = m
        .iter_mut()
        .zip(&g)
        .take(3)
        .map(|((_, s, v), g)| ParamMut::new(v, Some(g), s))
        .collect();
    assert_eq!(
        opt.step_params(&mut ps).unwrap_err(),
        StepError::ParamCount {
            expected: 4,
            got: 3
        }
    );
}

#[test]
fn a_matrix_part_that_cannot_run_fails_before_the_rest_moves() {
    // x @ x needs square matrices; the 2x3 parameter goes to that part.
    let square = compile(
        "Square { hyper { lr = 0.1 } step { matrix x = g { x = x @ x; } p = p - lr * x; } }",
    )
    .unwrap();
    let mut opt = Multi::new(builtin("adamw"))
        .part("square", select::ndim_at_least(2), square.boxed())
        .unwrap();
    let (mut a, ga) = (vec![1.0f32; 3], vec![0.5f32; 3]);
    let (mut b, gb) = (vec![1.0f32; 6], vec![0.5f32; 6]);
    let err = opt
        .step_params(&mut [
            ParamMut::new(&mut a, Some(&ga), &[3]),
            ParamMut::new(&mut b, Some(&gb), &[2, 3]),
        ])
        .unwrap_err();
    assert!(
        matches!(&err, StepError::Matrix { index: 1, block, .. } if block == "x"),
        "{err:?}"
    );
    assert_eq!((a, b), (vec![1.0; 3], vec![1.0; 6]));
    assert!(opt.state(0, "m").is_none(), "AdamW did not step");
}

#[test]
fn checkpoints_resume_bit_for_bit_and_refuse_what_does_not_fit() {
    let mut a = muon_and_adamw();
    let mut ma = model();
    with_groups(&mut a, &ma);
    for s in 0..3 {
        step(&mut a, &mut ma, &grads(s));
    }
    let saved = a.save_checkpoint();
    let mut b = muon_and_adamw();
    let mut mb = ma.clone();
    with_groups(&mut b, &mb);
    b.load_checkpoint(&saved).unwrap();
    assert_eq!(b.steps(), 3);
    for s in 3..6 {
        step(&mut a, &mut ma, &grads(s));
        step(&mut b, &mut mb, &grads(s));
    }
    assert_eq!(ma, mb);
    assert_eq!(a.state(3, "buf"), b.state(3, "buf"));

    // Truncated: an error, and the optimizer is as it was.
    let mut c = muon_and_adamw();
    let mut mc = model();
    step(&mut c, &mut mc, &grads(0));
    let buf_before = c.state(0, "buf").unwrap().to_vec();
    let err = c.load_checkpoint(&saved[..saved.len() / 2]).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt(_)), "{err}");
    assert_eq!(c.state(0, "buf").unwrap(), buf_before.as_slice());
    assert_eq!(c.steps(), 1);

    // Other parts: refused.
    let mut d = Multi::new(builtin("adamw_agr"));
    let err = d.load_checkpoint(&saved).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Mismatch(m) if m.contains("\"hidden\"")),
        "{err}"
    );
    // A plain optimizer's checkpoint is not a multi-part one.
    let plain = builtin("adamw_agr").save_checkpoint();
    assert!(matches!(
        muon_and_adamw().load_checkpoint(&plain).unwrap_err(),
        CheckpointError::WrongOptimizer { .. } | CheckpointError::Corrupt(_)
    ));
}

#[test]
fn a_device_every_part_cannot_take_moves_no_part() {
    // A matrix block whose loop count depends on the step runs on the CPU
    // only.
    let grow = agr_runtime::compile(
        "Grow { hyper { lr = 0.1 } step { matrix x = g { repeat min(t, 3) { x = 0.5 * x; } } p = p - lr * x; } }",
    )
    .unwrap();
    let mut opt = Multi::new(builtin("adamw_agr"))
        .part("hidden", |p| p.ndim() >= 2, grow.boxed())
        .unwrap();
    let err = opt.set_device(Device::EmulatedCuda).unwrap_err();
    assert!(matches!(err, DeviceError::CpuOnly { .. }), "{err}");
    assert_eq!(opt.device(), Device::Cpu);
    assert_eq!(opt.part_ref("hidden").unwrap().device(), Device::Cpu);
    assert_eq!(opt.part_ref("rest").unwrap().device(), Device::Cpu);
}

#[test]
fn muon_agr_and_adamw_agr_step_together_on_the_emulated_device_as_on_the_cpu() {
    let (mut cpu, mut emu) = (muon_and_adamw(), muon_and_adamw());
    emu.set_device(Device::EmulatedCuda).unwrap();
    assert_eq!(
        emu.part_ref("hidden").unwrap().device(),
        Device::EmulatedCuda
    );
    let (mut mc, mut me) = (model(), model());
    let names: Vec<String> = mc.iter().map(|(n, _, _)| n.to_string()).collect();
    cpu.set_param_names(names.clone()).unwrap();
    emu.set_param_names(names).unwrap();
    for k in 0..4 {
        step(&mut cpu, &mut mc, &grads(k));
        step(&mut emu, &mut me, &grads(k));
    }
    assert_eq!(emu.part_of(0), Some("hidden"));
    for ((name, _, c), (_, _, e)) in mc.iter().zip(&me) {
        for (a, b) in e.iter().zip(c) {
            assert!(
                (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                "{name}: emulated device {a}, cpu {b}"
            );
        }
        assert_ne!(c, &model().iter().find(|m| m.0 == *name).unwrap().2);
    }
}

#[test]
fn part_names_are_checked() {
    let taken = Multi::new(builtin("adamw")).part("rest", |_| true, builtin("adamw"));
    assert!(matches!(taken, Err(GroupError::Misuse(m)) if m.contains("`rest`")));
    let slash = Multi::new(builtin("adamw")).part("a/b", |_| true, builtin("adamw"));
    assert!(slash.is_err());
}

#[test]
fn names_given_before_the_first_step_split_the_parameters() {
    let mut opt = muon_and_adamw();
    let mut m = model();
    let names: Vec<String> = m.iter().map(|(n, _, _)| n.to_string()).collect();
    opt.set_param_names(names).unwrap();
    step(&mut opt, &mut m, &grads(0));
    // `head.w` is 2-D, but the part's predicate excludes it by name.
    assert_eq!(opt.part_of(2), Some("rest"));
    assert_eq!(opt.part_of(3), Some("hidden"));
    // Too many names for the parameters already split: refused.
    assert!(matches!(
        opt.set_param_names(vec!["a".into(); 5]),
        Err(GroupError::ParamCount {
            expected: 4,
            got: 5
        })
    ));
    // A count that differs from the names on the first step: refused.
    let mut fresh = muon_and_adamw();
    fresh.set_param_names(vec!["a".into(); 3]).unwrap();
    let g = grads(1);
    let mut ps: Vec<ParamMut<'_>> = m
        .iter_mut()
        .zip(&g)
        .map(|((_, s, v), g)| ParamMut::new(v, Some(g), s))
        .collect();
    assert_eq!(
        fresh.step_params(&mut ps).unwrap_err(),
        StepError::ParamCount {
            expected: 3,
            got: 4
        }
    );
    assert_eq!(fresh.part_of(0), None, "nothing was split");
}

/// bf16 parameters: each part steps its share as it would alone, and a
/// non-finite bf16 gradient skips the whole step.
#[test]
fn bf16_parameters_step_as_the_parts_do_alone() {
    use half::bf16;
    type B = Vec<(&'static str, Vec<usize>, Vec<bf16>)>;
    let narrow = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
    let step16 = |opt: &mut dyn DynOptimizer, params: &mut B, g: &[Vec<f32>]| {
        let gs: Vec<Vec<bf16>> = g.iter().map(|g| narrow(g)).collect();
        let mut ps: Vec<ParamMut<'_, bf16>> = params
            .iter_mut()
            .zip(&gs)
            .map(|((_, s, v), g)| ParamMut::new(v, Some(g), s))
            .collect();
        opt.step_params_bf16(&mut ps).unwrap()
    };
    let to16 = |m: Vec<(&'static str, Vec<usize>, Vec<f32>)>| -> B {
        m.into_iter().map(|(n, s, v)| (n, s, narrow(&v))).collect()
    };
    let mut multi = muon_and_adamw();
    with_groups(&mut multi, &model());
    let mut muon = builtin("muon_agr");
    let mut adamw = builtin("adamw_agr");
    adamw.set_hyper("lr", HyperValue::Float(2e-3)).unwrap();
    let all = model();
    let (hidden_f, rest_f) = (
        vec![all[0].clone(), all[3].clone()],
        vec![all[1].clone(), all[2].clone()],
    );
    with_groups(muon.as_mut(), &hidden_f);
    with_groups(adamw.as_mut(), &rest_f);
    let (mut m, mut hidden, mut rest) = (to16(model()), to16(hidden_f), to16(rest_f));
    for s in 0..4 {
        let g = grads(s);
        step16(&mut multi, &mut m, &g);
        step16(muon.as_mut(), &mut hidden, &[g[0].clone(), g[3].clone()]);
        step16(adamw.as_mut(), &mut rest, &[g[1].clone(), g[2].clone()]);
    }
    assert_eq!((&m[0].2, &m[3].2), (&hidden[0].2, &hidden[1].2));
    assert_eq!((&m[1].2, &m[2].2), (&rest[0].2, &rest[1].2));
    // A NaN in a bf16 gradient: nothing moves.
    let before = m.clone();
    let mut g = grads(9);
    g[2][1] = f32::NAN;
    let report = step16(&mut multi, &mut m, &g);
    assert_eq!(report.skipped_non_finite, Some(2));
    assert_eq!(m, before);
}

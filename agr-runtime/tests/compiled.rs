//! Specs compiled at run time (`agr_runtime::compile`) against the same
//! specs compiled by `optimizer!`: the IR evaluator must step bit-identically
//! to the generated Rust, and every engine feature must work on it.

mod common;

use agr_runtime::optim::BUILTINS;
use agr_runtime::{
    compile, DynOptimizer, HyperConfig, HyperValue, NonFinite, ParamGroups, ParamMut, StepError,
};
use common::data;

/// Shapes that exercise every path: one element, rows shorter than a lane
/// block, rows not a multiple of 8, more than one evaluator block and more
/// than one engine chunk (32768 elements), a tensor that sometimes has no
/// gradient.
const SHAPES: &[&[usize]] = &[
    &[1],
    &[3],
    &[5, 7],
    &[33],
    &[4, 300],
    &[1300],
    &[70001],
    &[40, 1000],
];

fn run(opt: &mut dyn DynOptimizer, steps: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut values: Vec<Vec<f32>> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), seed + i as u64))
        .collect();
    let mut out = vec![];
    for k in 0..steps {
        let grads: Vec<Vec<f32>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut g = data(v.len(), seed * 1000 + (k * 31 + i) as u64);
                // Every 3rd step an all-zero gradient for the 4th tensor (Ψ(0) = 0).
                if i == 3 && k % 3 == 2 {
                    g.iter_mut().for_each(|x| *x = 0.0);
                }
                g
            })
            .collect();
        let mut params: Vec<ParamMut<'_>> = values
            .iter_mut()
            .zip(SHAPES)
            .zip(&grads)
            .enumerate()
            .map(|(i, ((v, s), g))| {
                // The 3rd tensor has no gradient every other step.
                let g = (i != 2 || k % 2 == 0).then_some(g.as_slice());
                ParamMut::new(v, g, s)
            })
            .collect();
        opt.step_params(&mut params).unwrap();
        for v in &values {
            out.push(v.iter().map(|x| x.to_bits()).collect());
        }
    }
    out
}

fn states(opt: &dyn DynOptimizer, names: &[&str]) -> Vec<Vec<u32>> {
    let mut out = vec![];
    for i in 0..SHAPES.len() {
        for n in names {
            if let Some(s) = opt.state(i, n) {
                out.push(s.iter().map(|x| x.to_bits()).collect());
            }
        }
    }
    out
}

#[test]
fn every_builtin_compiled_at_run_time_steps_bit_identically() {
    for b in BUILTINS {
        let spec = compile(b.source).unwrap_or_else(|e| panic!("{}: {e}", b.name));
        assert_eq!(spec.name(), b.type_name);
        let names: Vec<&str> = spec.desc().states.iter().map(|s| s.name).collect();
        let mut ours = spec.boxed();
        let mut theirs = b.make();
        // Non-default hyperparameters where the spec has them.
        for (h, v) in [("lr", 0.02), ("weight_decay", 0.05)] {
            if theirs.hyper(h).is_some() {
                theirs.set_hyper(h, HyperValue::Float(v)).unwrap();
                ours.set_hyper(h, HyperValue::Float(v)).unwrap();
            }
        }
        let a = run(&mut *ours, 6, 7);
        let t = run(&mut *theirs, 6, 7);
        assert!(
            a == t,
            "{}: parameters differ from the generated kernel",
            b.name
        );
        assert!(
            states(&*ours, &names) == states(&*theirs, &names),
            "{}: states differ",
            b.name
        );
    }
}

#[test]
fn a_checkpoint_moves_between_the_generated_and_the_compiled_optimizer() {
    let b = agr_runtime::optim::builtin("adan_agr").unwrap();
    let spec = compile(b.source).unwrap();
    let mut gen = b.make();
    run(&mut *gen, 3, 11);
    let bytes = gen.save_checkpoint();
    let mut ours = spec.boxed();
    ours.load_checkpoint(&bytes).unwrap();
    let a = run(&mut *ours, 2, 12);
    let t = run(&mut *gen, 2, 12);
    assert!(a == t);
    // And back.
    let mut gen2 = b.make();
    gen2.load_checkpoint(&ours.save_checkpoint()).unwrap();
    assert!(run(&mut *gen2, 1, 13) == run(&mut *ours, 1, 13));
}

#[test]
fn groups_and_the_non_finite_policy_work_on_a_compiled_spec() {
    let spec = compile(agr_runtime::optim::builtin("adamw_agr").unwrap().source).unwrap();
    let mut opt = spec.optimizer();
    let groups = ParamGroups::new()
        .group("no_decay", agr_runtime::groups::select::ndim_below(2))
        .set("weight_decay", 0.0);
    opt.set_param_groups(&groups, &[("w", &[2, 2]), ("b", &[2])])
        .unwrap();
    assert_eq!(opt.group_name(1), "no_decay");
    let mut w = vec![1.0f32, 2.0, 3.0, 4.0];
    let mut bias = vec![1.0f32, -1.0];
    // A NaN: nothing changes, not even on the first step.
    let r = opt
        .step_params(&mut [
            ParamMut::new(&mut w, Some(&[0.1, f32::NAN, 0.0, 0.2]), &[2, 2]),
            ParamMut::new(&mut bias, Some(&[0.1, 0.1]), &[2]),
        ])
        .unwrap();
    assert_eq!(r.skipped_non_finite, Some(0));
    assert_eq!(w, vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(opt.steps(), 0);
    opt.set_non_finite_policy(NonFinite::Error);
    let e = opt
        .step_params(&mut [
            ParamMut::new(&mut w, Some(&[0.1, 0.1, 0.0, 0.2]), &[2, 2]),
            ParamMut::new(&mut bias, Some(&[f32::INFINITY, 0.1]), &[2]),
        ])
        .unwrap_err();
    assert_eq!(e, StepError::NonFinite { index: 1 });
    // Bad input is the same error as for a generated optimizer.
    let e = opt
        .step_params(&mut [ParamMut::new(&mut w, Some(&[0.1; 3]), &[2, 2])])
        .unwrap_err();
    assert!(matches!(
        e,
        StepError::ParamCount { .. } | StepError::GradLen { .. }
    ));
    // A real step moves both; the group without decay keeps its bias where
    // the gradient alone takes it.
    let before = (w.clone(), bias.clone());
    opt.step_params(&mut [
        ParamMut::new(&mut w, Some(&[0.1, 0.2, 0.3, 0.4]), &[2, 2]),
        ParamMut::new(&mut bias, Some(&[0.1, -0.2]), &[2]),
    ])
    .unwrap();
    assert_ne!(w, before.0);
    assert_ne!(bias, before.1);
    assert_eq!(
        opt.group_config("no_decay").unwrap().get("weight_decay"),
        Some(HyperValue::Float(0.0))
    );
}

#[test]
fn hyperparameters_of_a_compiled_spec_are_checked_by_name() {
    let spec = compile(
        "Sgd { hyper { lr = 0.1 where lr > 0, k: int = 2 where 1 <= k <= 5, on = true } \
         step { p = if on { p - lr * k * g } else { p }; } }",
    )
    .unwrap();
    let c = spec.default_config();
    assert_eq!(c.get("k"), Some(HyperValue::Int(2)));
    let e = c.clone().with("lr", -1.0).unwrap_err();
    assert!(e.to_string().contains("outside its valid range"), "{e}");
    let e = c.clone().with("momentum", 0.9).unwrap_err();
    assert!(
        e.to_string()
            .contains("Sgd has no hyperparameter `momentum`"),
        "{e}"
    );
    let mut opt = spec.optimizer_with(c.with("on", false).unwrap()).unwrap();
    let mut p = vec![1.0f32];
    opt.step_params(&mut [ParamMut::new(&mut p, Some(&[1.0]), &[1])])
        .unwrap();
    assert_eq!(p, vec![1.0]);
    opt.set_hyper("on", true).unwrap();
    opt.step_params(&mut [ParamMut::new(&mut p, Some(&[1.0]), &[1])])
        .unwrap();
    assert_eq!(p, vec![1.0 - 0.1f32 * 2.0]);
    // A config of another spec is refused.
    let other = compile("Other { hyper { lr = 0.1 } step { p = p - lr * g; } }").unwrap();
    let e = opt.set_config(other.default_config()).unwrap_err();
    assert!(e.to_string().contains("config of Other, not of Sgd"), "{e}");
}

#[test]
fn a_spec_with_errors_says_where() {
    let e = compile("Bad {\n  step {\n    p = p - lr * g;\n  }\n}\n").unwrap_err();
    let text = e.to_string();
    assert!(text.contains("<spec>:3:13"), "{text}");
    assert!(text.contains("`lr`"), "{text}");
    assert!(text.ends_with("the spec has 1 error"), "{text}");
}

#[test]
fn the_same_text_compiles_to_the_same_description() {
    let a = compile("A { step { p = p - 0.1 * g; } }").unwrap();
    let b = compile("A { step { p = p - 0.1 * g; } }").unwrap();
    assert!(std::ptr::eq(a.desc(), b.desc()));
    assert!(a.desc().cuda_source.contains("A_update"));
    // The finite check is a reduction pass of its own.
    assert_eq!(a.desc().cuda_kernels, &["A_reduce0", "A_update"]);
}

#[test]
fn a_matrix_block_that_does_not_fit_is_an_error_that_changes_nothing() {
    // x @ x needs a square matrix: a 2x3 parameter cannot take it.
    let spec = compile(
        "Square { hyper { lr = 0.1 } step { matrix x = g { x = x @ x; } p = p - lr * x; } }",
    )
    .unwrap();
    let mut opt = spec.optimizer();
    let (mut a, ga) = (vec![1.0f32; 4], vec![0.5f32; 4]);
    let (mut b, gb) = (vec![1.0f32; 6], vec![0.5f32; 6]);
    let err = opt
        .step_params(&mut [
            ParamMut::new(&mut a, Some(&ga), &[2, 2]),
            ParamMut::new(&mut b, Some(&gb), &[2, 3]),
        ])
        .unwrap_err();
    assert_eq!(
        err,
        StepError::Matrix {
            index: 1,
            block: "x".into(),
            shape: vec![2, 3],
            message: "`@` of a 2x3 and a 2x3 matrix".into(),
        }
    );
    assert!(
        err.to_string()
            .contains("parameter #1 (shape [2, 3]): matrix block `x`"),
        "{err}"
    );
    assert_eq!((a.clone(), b.clone()), (vec![1.0; 4], vec![1.0; 6]));
    assert!(
        opt.state(0, "x").is_none(),
        "the failed first step created no state"
    );
    // The square parameter alone steps: (0.5 everywhere) @ itself = 0.5 everywhere.
    let r = opt
        .step_params(&mut [ParamMut::new(&mut a, Some(&ga), &[2, 2])])
        .unwrap();
    assert_eq!(r.updated, 1);
    assert_eq!(a, vec![1.0 - 0.1f32 * 0.5; 4]);
}

agr_runtime::optimizer! {
    /// A sum over the columns' dimension of a value the same along each row
    /// (`mean(vr, -2)`: added once per row by the generated loop) beside one
    /// of a per-element value (added per element).
    ColumnSums {
        hyper { lr = 0.1 where lr > 0 }
        state { vr: reduced(-1) = 0 }
        step {
            vr = lerp(vr, mean(g * g, -1), 0.5);
            let a = mean(vr, -2);
            let b = sum(g, -2);
            p = p - lr * (a + b) / (1 + abs(a + b));
        }
    }
}

#[test]
fn column_sums_of_row_invariant_values_step_bit_identically_over_many_matrices() {
    use agr_runtime::StaticKernel;
    let desc = <ColumnSumsKernel as StaticKernel>::DESC;
    assert!(
        desc.generated_rust.contains("__cs"),
        "the generated loop adds `mean(vr, -2)` once per row"
    );
    // Several matrices per tensor (the sum restarts at each matrix's last
    // row), one row, one column, a vector, a scalar.
    let shapes: [&[usize]; 6] = [&[3, 4, 5], &[2, 1, 6], &[4, 3, 1], &[4, 4], &[9], &[]];
    let mut theirs: Box<dyn DynOptimizer> =
        Box::new(ColumnSums::with_config(Default::default()).unwrap());
    let mut ours = compile(desc.spec).unwrap().boxed();
    let init: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), 50 + i as u64))
        .collect();
    let (mut vt, mut vo) = (init.clone(), init);
    for k in 0..4u64 {
        for (opt, vals) in [(&mut theirs, &mut vt), (&mut ours, &mut vo)] {
            let grads: Vec<Vec<f32>> = vals
                .iter()
                .enumerate()
                .map(|(i, v)| data(v.len(), 90 + k * 7 + i as u64))
                .collect();
            let mut params: Vec<ParamMut<'_>> = vals
                .iter_mut()
                .zip(shapes)
                .zip(&grads)
                .map(|((v, s), g)| ParamMut::new(v, Some(g), s))
                .collect();
            opt.step_params(&mut params).unwrap();
        }
        let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
            v.iter()
                .map(|x| x.iter().map(|f| f.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&vt), bits(&vo), "step {k}");
    }
    assert_ne!(vt[0], data(60, 50), "the parameters moved");
}

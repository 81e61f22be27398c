//! The tch adapter: the golden trajectories replayed through tch tensors and
//! autograd, training a VarStore model with each built-in lowers the loss,
//! groups by VarStore names, checkpoints resume bit-identically, and bad
//! tensors are errors that change nothing.
#![cfg(feature = "tch")]

use std::path::PathBuf;

use agr_runtime::golden;
use agr_runtime::groups::{select, ParamGroups};
use agr_runtime::optim::*;
use agr_runtime::tch::{TchError, TchOptimizer};
use agr_runtime::{HyperConfig, HyperValue, Kernel};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

mod common;
use common::step_narrowed;

fn golden_dir() -> PathBuf {
    std::env::var_os("AGR_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"))
}

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(values).reshape(dims.as_slice())
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// Replays a golden file; each step's gradient reaches `.grad()` through
/// autograd (the gradient of Σ p·G is exactly G).
fn replay<K: Kernel>(file: &str) -> f64
where
    K::Config: Default,
{
    replay_on::<K>(file, agr_runtime::Device::Cpu)
}

/// [`replay`] with the optimizer's steps on `device`.
fn replay_on<K: Kernel>(file: &str, device: agr_runtime::Device) -> f64
where
    K::Config: Default,
{
    let g = golden::load(&golden_dir().join(file)).unwrap();
    let mut config = K::Config::default();
    for (name, v) in &g.hyper {
        let value = match v {
            serde_json::Value::Bool(b) => HyperValue::Bool(*b),
            v => HyperValue::Float(v.as_f64().unwrap()),
        };
        config.set(name, value).unwrap();
    }
    let vars: Vec<(String, Tensor)> = g
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                tensor(&p.init, &p.shape).set_requires_grad(true),
            )
        })
        .collect();
    let mut opt = TchOptimizer::<K>::from_named(
        vars.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
        config,
    )
    .unwrap();
    opt.set_device(device).unwrap();
    let mut worst = 0.0f64;
    for step in &g.steps {
        let loss = vars
            .iter()
            .zip(step.grads.iter().zip(&g.params))
            .map(|((_, v), (gr, p))| (v * tensor(gr, &p.shape)).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        opt.backward_step(&loss).unwrap();
        for ((_, v), reference) in vars.iter().zip(&step.params) {
            for (x, r) in to_vec(v).iter().zip(reference) {
                let (x, r) = (f64::from(*x), f64::from(*r));
                assert!(
                    (x - r).abs() <= g.tolerance.atol + g.tolerance.rtol * r.abs(),
                    "{file}: {x} vs {r}"
                );
                worst = worst.max((x - r).abs());
            }
        }
    }
    worst
}

#[test]
fn the_golden_files_replay_through_tch() {
    println!(
        "adamw       {:e}",
        replay::<AdamWKernel>("adamw_basic.json")
    );
    println!(
        "adamw_agr   {:e}",
        replay::<AdamWAgrKernel>("adamw_agr_basic.json")
    );
    println!(
        "adamw_agr_m {:e}",
        replay::<AdamWAgrMKernel>("adamw_agr_m_basic.json")
    );
    println!("adan        {:e}", replay::<AdanKernel>("adan_basic.json"));
    println!(
        "adan_agr    {:e}",
        replay::<AdanAgrKernel>("adan_agr_basic.json")
    );
}

#[test]
fn the_golden_files_replay_through_tch_on_the_emulated_cuda_device() {
    // The adapter hands the engine host tensors; the engine steps them with
    // the generated CUDA kernels (the GPU's path, in host memory).
    let emulated = agr_runtime::Device::EmulatedCuda;
    println!(
        "adamw_agr on {emulated}: {:e}",
        replay_on::<AdamWAgrKernel>("adamw_agr_basic.json", emulated)
    );
    println!(
        "adan_agr on {emulated}:  {:e}",
        replay_on::<AdanAgrKernel>("adan_agr_basic.json", emulated)
    );
}

/// A two-layer net fitting a fixed smooth function; returns the losses
/// before and after `steps` steps.
/// libtorch's generator is global and the tests run on parallel threads:
/// a test seeds it and draws its initial weights holding this lock, or
/// another test's draws would come between (and change its numbers).
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeds libtorch's generator; draw from it while the guard lives.
fn seeded(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    let guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    guard
}

fn train<K: Kernel>(config: K::Config, steps: usize) -> (f64, f64) {
    let rng = seeded(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "fc1", 4, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "fc2", 32, 1, Default::default()));
    let x = Tensor::linspace(-1.0, 1.0, 256, (Kind::Float, Device::Cpu)).reshape([64, 4]);
    let y = (&x * 3.0).sin().sum_dim_intlist(1, true, Kind::Float);
    drop(rng);
    let mut opt = TchOptimizer::<K>::new(&vs, config).unwrap();
    assert_eq!(
        opt.names(),
        ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    );
    let loss = |net: &nn::Sequential| net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
    let first = loss(&net).double_value(&[]);
    for _ in 0..steps {
        opt.backward_step(&loss(&net)).unwrap();
    }
    (first, loss(&net).double_value(&[]))
}

#[test]
fn training_a_varstore_model_with_each_builtin_lowers_the_loss() {
    let cases = [
        (
            "adamw",
            train::<AdamWKernel>(AdamWConfig::default().with_lr(1e-2), 300),
        ),
        (
            "adamw_agr",
            train::<AdamWAgrKernel>(AdamWAgrConfig::default().with_lr(1e-2), 300),
        ),
        (
            "adamw_agr_m",
            train::<AdamWAgrMKernel>(AdamWAgrMConfig::default().with_lr(1e-2), 300),
        ),
        (
            "adan",
            train::<AdanKernel>(AdanConfig::default().with_lr(1e-2), 300),
        ),
        (
            "adan_agr",
            train::<AdanAgrKernel>(AdanAgrConfig::default().with_lr(1e-2), 300),
        ),
    ];
    for (name, (first, last)) in cases {
        println!("{name}: loss {first:.4} -> {last:.5}");
        assert!(last < first * 0.2, "{name}: {first} -> {last}");
    }
}

#[test]
fn groups_use_varstore_names_and_checkpoints_resume_bit_identically() {
    let rng = seeded(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "fc", 6, 5, Default::default());
    let x = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    drop(rng);
    let loss = |lin: &nn::Linear| lin.forward(&x).pow_tensor_scalar(2).mean(Kind::Float);
    let groups = ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .set("weight_decay", 0.0)
        .set("use_agr", false);
    let make = |vs: &nn::VarStore| {
        let mut opt =
            TchOptimizer::<AdamWAgrKernel>::new(vs, AdamWAgrConfig::default().with_lr(0.05))
                .unwrap();
        opt.set_param_groups(&groups).unwrap();
        opt
    };
    let mut opt = make(&vs);
    assert_eq!(opt.group_name(0), "vectors"); // fc.bias
    assert_eq!(opt.group_name(1), "default"); // fc.weight
    for _ in 0..3 {
        opt.backward_step(&loss(&lin)).unwrap();
    }
    let ckpt = opt.save_checkpoint();
    let saved: Vec<Tensor> = vec![lin.ws.copy(), lin.bs.as_ref().unwrap().copy()];
    for _ in 0..4 {
        opt.backward_step(&loss(&lin)).unwrap();
    }
    let straight = (to_vec(&lin.ws), to_vec(lin.bs.as_ref().unwrap()));

    // Rewind the parameters, resume a new optimizer from the checkpoint.
    tch::no_grad(|| {
        lin.ws.shallow_clone().copy_(&saved[0]);
        lin.bs.as_ref().unwrap().shallow_clone().copy_(&saved[1]);
    });
    let mut resumed = make(&vs);
    resumed.load_checkpoint(&ckpt).unwrap();
    assert_eq!(resumed.steps(), 3);
    for _ in 0..4 {
        resumed.backward_step(&loss(&lin)).unwrap();
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&to_vec(&lin.ws)), bits(&straight.0));
    assert_eq!(bits(&to_vec(lin.bs.as_ref().unwrap())), bits(&straight.1));
}

#[test]
fn missing_gradients_are_skipped_and_bad_tensors_are_errors() {
    let a = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt = TchOptimizer::<AdamWAgrKernel>::from_named(
        vec![
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        AdamWAgrConfig::default().with_lr(0.1),
    )
    .unwrap();
    // Only `a` takes part in the loss: `b` has no gradient and is skipped.
    let report = opt.backward_step(&(&a * &a).sum(Kind::Float)).unwrap();
    assert_eq!((report.updated, report.skipped), (1, 1));
    assert!(to_vec(&a)[0] < 1.0);
    assert_eq!(to_vec(&b), vec![1.0; 3]);

    // A NaN in a gradient: the step is skipped and nothing moves.
    let before = to_vec(&a);
    let report = opt
        .backward_step(&(&a * f64::NAN).sum(Kind::Float))
        .unwrap();
    assert_eq!(report.skipped_non_finite, Some(0));
    assert_eq!(to_vec(&a), before);
    opt.set_non_finite_policy(agr_runtime::NonFinite::Error);
    let e = opt
        .backward_step(&(&a * f64::NAN).sum(Kind::Float))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("variable `a`: the gradient of parameter #0 holds a NaN"),
        "{e}"
    );
    assert_eq!(to_vec(&a), before);

    // Wrong kinds and shared storage are refused up front.
    let double = Tensor::ones([2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let e = TchOptimizer::<AdamWAgrKernel>::from_tensors(vec![double], Default::default())
        .err()
        .unwrap();
    assert!(matches!(&e, TchError::Param { name, .. } if name == "0"));
    assert!(
        e.to_string()
            .contains("is Double; the tch adapter steps f32, bf16 or f16 tensors on the CPU"),
        "{e}"
    );
    let e = TchOptimizer::<AdamWAgrKernel>::from_tensors(
        vec![a.shallow_clone(), a.shallow_clone()],
        Default::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("shares its storage with `0`"), "{e}");
    let t = Tensor::ones([3, 2], (Kind::Float, Device::Cpu)).tr();
    assert!(TchOptimizer::<AdamWAgrKernel>::from_tensors(vec![t], Default::default()).is_err());
}

/// Two views of one storage at different offsets have different data
/// pointers but overlapping elements: stepping both would make two
/// overlapping `&mut` slices. Refused when built, and at every step (a
/// variable's data can be replaced between steps), changing nothing.
#[test]
fn overlapping_views_are_refused_when_built_and_at_every_step() {
    let base = Tensor::zeros([10], (Kind::Float, Device::Cpu));
    let (v1, v2) = (base.narrow(0, 0, 6), base.narrow(0, 4, 6));
    assert_ne!(v1.data_ptr(), v2.data_ptr());
    let e = TchOptimizer::<AdamWAgrKernel>::from_named(
        vec![("v1".into(), v1), ("v2".into(), v2)],
        Default::default(),
    )
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("variable `v2`: shares its storage with `v1`"),
        "{e}"
    );
    // Adjacent views do not overlap: fine.
    assert!(TchOptimizer::<AdamWAgrKernel>::from_tensors(
        vec![base.narrow(0, 0, 5), base.narrow(0, 5, 5)],
        Default::default()
    )
    .is_ok());

    let a = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt = TchOptimizer::<AdamWKernel>::from_named(
        vec![
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        AdamWConfig::default().with_lr(0.1),
    )
    .unwrap();
    let loss = |a: &Tensor, b: &Tensor| (a * a).sum(Kind::Float) + (b * b).sum(Kind::Float);
    opt.backward_step(&loss(&a, &b)).unwrap();
    // `b` becomes a view of `a`'s elements 1..4, behind the optimizer's back.
    tch::no_grad(|| b.set_data(&a.detach().narrow(0, 1, 3)));
    let before = to_vec(&a);
    let e = opt.backward_step(&loss(&a, &b)).unwrap_err();
    assert!(
        e.to_string()
            .contains("variable `b`: shares its storage with `a`"),
        "{e}"
    );
    assert_eq!(to_vec(&a), before);
    assert_eq!(opt.steps(), 1);
}

/// A gradient whose elements are a variable's would alias a `&mut` with a
/// `&`: refused, naming both.
#[test]
fn a_gradient_overlapping_a_variable_is_refused() {
    let a = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt = TchOptimizer::<AdamWKernel>::from_named(
        vec![
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        Default::default(),
    )
    .unwrap();
    ((&a * &a).sum(Kind::Float) + (&b * &b).sum(Kind::Float)).backward();
    let mut g = b.grad();
    tch::no_grad(|| g.set_data(&a.detach().narrow(0, 1, 3)));
    let before = (to_vec(&a), to_vec(&b));
    let e = opt.step().unwrap_err();
    assert!(
        e.to_string()
            .contains("variable `b`: the gradient overlaps the storage of variable `a`"),
        "{e}"
    );
    assert_eq!((to_vec(&a), to_vec(&b)), before);
}

/// An empty tensor's data pointer (null in libtorch) never becomes a slice:
/// the step is an error naming the variable.
#[test]
fn an_empty_variable_is_an_error_not_a_null_slice() {
    let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt = TchOptimizer::<AdamWKernel>::from_named(
        vec![
            ("a".into(), a.shallow_clone()),
            ("empty".into(), empty.shallow_clone()),
        ],
        Default::default(),
    )
    .unwrap();
    let e = opt
        .backward_step(&((&a * &a).sum(Kind::Float) + empty.sum(Kind::Float)))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("variable `empty`: parameter #1 has no elements"),
        "{e}"
    );
    assert_eq!(to_vec(&a), vec![1.0; 2]);
}

/// agr's errors convert into `tch::TchError`: `?` works in a function
/// returning `Result<_, tch::TchError>`, and the message is kept.
#[test]
fn agr_errors_convert_into_tch_errors() {
    fn bad_step(a: &Tensor) -> Result<(), tch::TchError> {
        let mut opt = TchOptimizer::<AdamWAgrKernel>::from_named(
            vec![("a".into(), a.shallow_clone())],
            Default::default(),
        )?;
        opt.set_non_finite_policy(agr_runtime::NonFinite::Error);
        opt.backward_step(&(a * f64::NAN).sum(Kind::Float))?;
        Ok(())
    }
    fn bad_config() -> Result<(), tch::TchError> {
        let mut opt = AdamWAgr::with_config(Default::default())?;
        opt.set_lr(-1.0)?;
        Ok(())
    }
    fn bad_groups(a: &Tensor) -> Result<(), tch::TchError> {
        let mut opt = TchOptimizer::<AdamWAgrKernel>::from_tensors(
            vec![a.shallow_clone()],
            Default::default(),
        )?;
        opt.set_param_groups(
            &ParamGroups::new()
                .group("v", select::ndim_below(2))
                .set("no_such", 1.0),
        )?;
        Ok(())
    }
    fn bad_checkpoint(a: &Tensor) -> Result<(), tch::TchError> {
        let mut opt = TchOptimizer::<AdamWAgrKernel>::from_tensors(
            vec![a.shallow_clone()],
            Default::default(),
        )?;
        opt.load_checkpoint(b"not a checkpoint")?;
        Ok(())
    }
    let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    for (e, want) in [
        (bad_step(&a).unwrap_err(), "variable `a`: the gradient"),
        (bad_config().unwrap_err(), "lr"),
        (bad_groups(&a).unwrap_err(), "no_such"),
        (bad_checkpoint(&a).unwrap_err(), "corrupt"),
    ] {
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[test]
fn a_spec_compiled_at_run_time_trains_through_tch_as_its_builtin() {
    let b = agr_runtime::optim::builtin("adamw_agr").unwrap();
    let spec = agr_runtime::compile(b.source).unwrap();
    let config = spec.default_config().with("lr", 1e-2).unwrap();
    let compiled = train::<agr_runtime::DynKernel>(config, 30);
    let generated = train::<AdamWAgrKernel>(AdamWAgrConfig::default().with_lr(1e-2), 30);
    // The same arithmetic: the same losses, bit for bit.
    assert_eq!(compiled.0.to_bits(), generated.0.to_bits());
    assert_eq!(compiled.1.to_bits(), generated.1.to_bits());
    assert!(compiled.1 < compiled.0 * 0.5, "{compiled:?}");
}

#[test]
fn an_optimizer_of_two_specs_steps_a_varstore_as_its_parts_do_alone() {
    use agr_runtime::multi::Multi;
    use agr_runtime::tch::TchDyn;
    let builtin = |n: &str| agr_runtime::optim::builtin(n).unwrap().make();
    let rng = seeded(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "fc", 6, 5, Default::default());
    let x = Tensor::randn([16, 6], (Kind::Float, Device::Cpu));
    drop(rng);
    let loss = |lin: &nn::Linear| lin.forward(&x).pow_tensor_scalar(2).mean(Kind::Float);
    // The same start, for the two optimizers stepping alone.
    let (w0, b0) = (lin.ws.copy(), lin.bs.as_ref().unwrap().copy());

    // Muon-AGR on the weight (chosen by name), AdamW-AGR on the bias.
    let multi = Multi::new(builtin("adamw_agr"))
        .part("hidden", |p| p.name == "fc.weight", builtin("muon_agr"))
        .unwrap();
    let mut opt = TchDyn::new_dyn(&vs, Box::new(multi)).unwrap();
    for _ in 0..4 {
        opt.backward_step(&loss(&lin)).unwrap();
    }
    assert_eq!(opt.group_name(0), "rest/default"); // fc.bias
    assert_eq!(opt.group_name(1), "hidden/default"); // fc.weight
    let together = (to_vec(&lin.ws), to_vec(lin.bs.as_ref().unwrap()));

    tch::no_grad(|| {
        lin.ws.shallow_clone().copy_(&w0);
        lin.bs.as_ref().unwrap().shallow_clone().copy_(&b0);
    });
    let mut muon = TchDyn::from_named_dyn(
        vec![("fc.weight".into(), lin.ws.shallow_clone())],
        builtin("muon_agr"),
    )
    .unwrap();
    let mut adamw = TchDyn::from_named_dyn(
        vec![("fc.bias".into(), lin.bs.as_ref().unwrap().shallow_clone())],
        builtin("adamw_agr"),
    )
    .unwrap();
    for _ in 0..4 {
        muon.zero_grad();
        adamw.zero_grad();
        loss(&lin).backward();
        muon.step().unwrap();
        adamw.step().unwrap();
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&to_vec(&lin.ws)), bits(&together.0));
    assert_eq!(bits(&to_vec(lin.bs.as_ref().unwrap())), bits(&together.1));
    // And the split was by name: Muon's momentum is the weight's.
    assert_eq!(opt.state(1, "buf").map(|b| b.len()), Some(30));
}

/// CPU bf16 and f16 tensors step through the adapter exactly as the engine
/// steps the same values as slices (bf16 with an f32 master copy, f16 with
/// f16 moments).
#[test]
fn cpu_bf16_and_f16_tensors_step_as_the_engine_steps_them() {
    use agr_runtime::optim::{AdamW, AdamWConfig, AdamWKernel};
    use agr_runtime::{Precision, Storage};
    for (kind, precision) in [
        (Kind::BFloat16, Precision::f32().with_master(true)),
        (
            Kind::Half,
            Precision::f32()
                .state("m", Storage::F16)
                .state("v", Storage::F16),
        ),
    ] {
        let init: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let w = tensor(&init, &[4, 6]).to_kind(kind).set_requires_grad(true);
        let mut opt = TchOptimizer::<AdamWKernel>::from_tensors(
            vec![w.shallow_clone()],
            AdamWConfig::default().with_lr(1e-2),
        )
        .unwrap();
        opt.set_precision(precision.clone()).unwrap();
        let mut reference = AdamW::with_config(AdamWConfig::default().with_lr(1e-2)).unwrap();
        reference.set_precision(precision).unwrap();
        let mut mine = to_vec(&w.to_kind(Kind::Float));
        for t in 0..4 {
            let gv: Vec<f32> = (0..24)
                .map(|i| (((i + 5 * t) % 9) as f32 - 4.0) * 0.05)
                .collect();
            let g = tensor(&gv, &[4, 6]).to_kind(kind);
            // The gradient of Σ w·G is exactly G.
            opt.backward_step(&(&w * &g).sum(kind)).unwrap();
            let gf = to_vec(&g.to_kind(Kind::Float));
            if kind == Kind::BFloat16 {
                step_narrowed(
                    &mut reference,
                    &mut mine,
                    &gf,
                    &[4, 6],
                    half::bf16::from_f32,
                );
            } else {
                step_narrowed(&mut reference, &mut mine, &gf, &[4, 6], half::f16::from_f32);
            }
            assert_eq!(to_vec(&w.to_kind(Kind::Float)), mine, "{kind:?}: step {t}");
        }
        assert_ne!(mine, init, "{kind:?}: the tensor moved");
    }
}

//! The candle adapter: the golden trajectories replayed through
//! `candle_nn::Optimizer` (five) and `CandleDyn` (every built-in), training
//! with every built-in lowers the loss, variables without a gradient are
//! skipped, groups and checkpoints work through candle variables.
//!
//! The variables live on the CPU, or on the candle device named by
//! `AGR_TEST_CANDLE_DEVICE` (`cuda:0`: the GPU check runs this suite there,
//! from a build with the `candle-cuda` feature).
#![cfg(feature = "candle")]

use std::path::PathBuf;

use agr_runtime::golden;
use agr_runtime::optim::*;
use agr_runtime::{HyperConfig, HyperValue};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer as _;

mod common;
use common::step_narrowed;

/// The candle device the tests' variables live on.
fn dev() -> Device {
    match std::env::var("AGR_TEST_CANDLE_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        #[cfg(feature = "candle-cuda")]
        Ok(d) if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda:").map_or(0, |n| n.parse().expect("cuda:N"));
            Device::new_cuda(n).expect("AGR_TEST_CANDLE_DEVICE names a GPU this machine has")
        }
        Ok(d) => panic!("AGR_TEST_CANDLE_DEVICE={d}: not a device this build steps (cpu; cuda:N with the candle-cuda feature)"),
    }
}

fn golden_dir() -> PathBuf {
    std::env::var_os("AGR_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"))
}

fn replay<O: candle_nn::Optimizer>(file: &str) -> f64
where
    O::Config: HyperConfig + Default,
{
    let g = golden::load(&golden_dir().join(file)).unwrap();
    let mut config = O::Config::default();
    for (name, v) in &g.hyper {
        let value = match v {
            serde_json::Value::Bool(b) => HyperValue::Bool(*b),
            v => HyperValue::Float(v.as_f64().unwrap()),
        };
        config.set(name, value).unwrap();
    }
    let vars: Vec<Var> = g
        .params
        .iter()
        .map(|p| {
            Var::from_tensor(&Tensor::from_vec(p.init.clone(), p.shape.as_slice(), &dev()).unwrap())
                .unwrap()
        })
        .collect();
    let mut opt = O::new(vars.clone(), config).unwrap();
    let mut worst = 0.0f64;
    for step in &g.steps {
        let mut grads = GradStore::default();
        for (v, (gr, p)) in vars.iter().zip(step.grads.iter().zip(&g.params)) {
            grads.insert(
                v.as_tensor(),
                Tensor::from_vec(gr.clone(), p.shape.as_slice(), &dev()).unwrap(),
            );
        }
        opt.step(&grads).unwrap();
        for (v, reference) in vars.iter().zip(&step.params) {
            let ours = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, r) in ours.iter().zip(reference) {
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
fn the_golden_files_replay_through_candle() {
    println!("adamw      {:e}", replay::<AdamW>("adamw_basic.json"));
    println!(
        "adamw_agr  {:e}",
        replay::<AdamWAgr>("adamw_agr_basic.json")
    );
    println!(
        "adamw_agr_m {:e}",
        replay::<AdamWAgrM>("adamw_agr_m_basic.json")
    );
    println!("adan       {:e}", replay::<Adan>("adan_basic.json"));
    println!("adan_agr   {:e}", replay::<AdanAgr>("adan_agr_basic.json"));
}

/// Fits y = x·w* with candle's autograd; returns (first loss, last loss).
fn train<O: candle_nn::Optimizer>(config: O::Config) -> (f32, f32) {
    let dev = dev();
    let x = Tensor::from_vec(
        (0..64 * 8)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect::<Vec<f32>>(),
        (64, 8),
        &dev,
    )
    .unwrap();
    let w_true = Tensor::from_vec(
        (0..8).map(|i| i as f32 / 4.0 - 1.0).collect::<Vec<f32>>(),
        (8, 1),
        &dev,
    )
    .unwrap();
    let y = x.matmul(&w_true).unwrap();
    let w = Var::zeros((8, 1), candle_core::DType::F32, &dev).unwrap();
    let b = Var::zeros(1, candle_core::DType::F32, &dev).unwrap();
    let mut opt = O::new(vec![w.clone(), b.clone()], config).unwrap();
    let loss = |w: &Var, b: &Var| {
        x.matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap()
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let first = loss(&w, &b).to_scalar::<f32>().unwrap();
    for _ in 0..200 {
        opt.backward_step(&loss(&w, &b)).unwrap();
    }
    (first, loss(&w, &b).to_scalar::<f32>().unwrap())
}

#[test]
fn training_with_each_builtin_lowers_the_loss() {
    let cases = [
        (
            "adamw",
            train::<AdamW>(AdamWConfig::default().with_lr(5e-2)),
        ),
        (
            "adamw_agr",
            train::<AdamWAgr>(AdamWAgrConfig::default().with_lr(5e-2)),
        ),
        (
            "adamw_agr_m",
            train::<AdamWAgrM>(AdamWAgrMConfig::default().with_lr(5e-2)),
        ),
        ("adan", train::<Adan>(AdanConfig::default().with_lr(5e-2))),
        (
            "adan_agr",
            train::<AdanAgr>(AdanAgrConfig::default().with_lr(5e-2)),
        ),
    ];
    for (name, (first, last)) in cases {
        println!("{name}: loss {first:.4} -> {last:.6}");
        assert!(last < first * 0.05, "{name}: {first} -> {last}");
    }
}

#[test]
fn variables_without_a_gradient_are_skipped_and_the_learning_rate_is_shared() {
    let dev = dev();
    let a = Var::ones(4, candle_core::DType::F32, &dev).unwrap();
    let b = Var::ones(3, candle_core::DType::F32, &dev).unwrap();
    let mut opt = AdamWAgr::new(vec![a.clone(), b.clone()], AdamWAgrConfig::default()).unwrap();
    // On the concrete type, candle's names are candle's methods.
    let lr: f64 = opt.learning_rate();
    assert_eq!(lr, 1e-3);
    let () = opt.set_learning_rate(0.1);
    assert_eq!(opt.config().lr, 0.1);
    // Out of range: nothing changes (logged; `set_lr` returns the error).
    opt.set_learning_rate(-1.0);
    assert_eq!(opt.config().lr, 0.1);
    assert!(opt.set_lr(-1.0).is_err());
    let mut grads = GradStore::default();
    grads.insert(
        a.as_tensor(),
        Tensor::from_vec(vec![1.0f32, -1.0, 0.5, 0.0], 4, &dev).unwrap(),
    );
    let () = opt.step(&grads).unwrap();
    assert!(a.as_tensor().to_vec1::<f32>().unwrap()[0] < 1.0);
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0; 3]);
    // Wrong inputs are errors.
    assert!(AdamWAgr::new(vec![a.clone(), a.clone()], Default::default()).is_err());
    let int = Var::ones(2, candle_core::DType::U32, &dev).unwrap();
    assert!(AdamWAgr::new(vec![int], Default::default()).is_err());
}

/// A VarMap with two named variables, deterministic values.
fn varmap() -> candle_nn::VarMap {
    let vm = candle_nn::VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        let w: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
        data.insert(
            "lin.weight".into(),
            Var::from_tensor(&Tensor::from_vec(w, (4, 6), &dev()).unwrap()).unwrap(),
        );
        data.insert(
            "lin.bias".into(),
            Var::from_tensor(&Tensor::zeros(4, candle_core::DType::F32, &dev()).unwrap()).unwrap(),
        );
    }
    vm
}

fn var(vm: &candle_nn::VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

/// loss = mean((x W^T + b)^2 - 1)^2 over a fixed batch.
fn lin_loss(vm: &candle_nn::VarMap) -> Tensor {
    let x = Tensor::from_vec(
        (0..48)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 6.0)
            .collect::<Vec<f32>>(),
        (8, 6),
        &dev(),
    )
    .unwrap();
    let (w, b) = (var(vm, "lin.weight"), var(vm, "lin.bias"));
    let y = x
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    (y.sqr().unwrap() - 1.0)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn values(vm: &candle_nn::VarMap) -> Vec<u32> {
    ["lin.bias", "lin.weight"]
        .iter()
        .flat_map(|n| {
            var(vm, n)
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .map(f32::to_bits)
        .collect()
}

#[test]
fn varmap_groups_and_checkpoints_through_candle() {
    use agr_runtime::groups::{select, ParamGroups};
    let groups = ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .set("weight_decay", 0.0)
        .set("use_agr", false);
    let config = AdamWAgrConfig::default().with_lr(0.05);
    let vm = varmap();
    let mut opt = AdamWAgr::from_varmap(&vm, config.clone()).unwrap();
    assert_eq!(opt.var_names(), ["lin.bias", "lin.weight"]);
    opt.set_candle_groups(&groups).unwrap();
    assert_eq!(opt.group_name(0), "vectors");
    assert_eq!(opt.group_name(1), "default");
    for _ in 0..3 {
        opt.backward_step(&lin_loss(&vm)).unwrap();
    }
    let ckpt = opt.save_checkpoint();
    let saved = varmap();
    for name in ["lin.bias", "lin.weight"] {
        var(&saved, name).set(var(&vm, name).as_tensor()).unwrap();
    }
    for _ in 0..4 {
        opt.backward_step(&lin_loss(&vm)).unwrap();
    }
    assert_eq!(opt.last_report().unwrap().updated, 2);
    // Resume from the checkpoint on the saved parameters: bit-identical.
    let mut resumed = AdamWAgr::from_varmap(&saved, config.clone()).unwrap();
    resumed.load_checkpoint(&ckpt).unwrap();
    assert_eq!(resumed.group_name(0), "vectors");
    for _ in 0..4 {
        resumed.backward_step(&lin_loss(&saved)).unwrap();
    }
    assert_eq!(values(&vm), values(&saved));
    // The groups change the result (the comparison above can fail).
    let plain_vm = varmap();
    let mut plain = AdamWAgr::from_varmap(&plain_vm, config).unwrap();
    for _ in 0..7 {
        plain.backward_step(&lin_loss(&plain_vm)).unwrap();
    }
    assert_ne!(values(&plain_vm), values(&vm));
}

#[test]
fn an_optimizer_chosen_by_name_steps_candle_variables_like_the_typed_one() {
    use agr_runtime::candle::CandleDyn;
    let (a, b) = (varmap(), varmap());
    let mut typed = AdanAgr::from_varmap(&a, AdanAgrConfig::default().with_lr(0.02)).unwrap();
    let mut by_name = agr_runtime::optim::builtin("adan_agr").unwrap().make();
    by_name.set_lr(0.02).unwrap();
    let mut dynamic = CandleDyn::from_varmap(by_name, &b).unwrap();
    for _ in 0..5 {
        typed.backward_step(&lin_loss(&a)).unwrap();
        let report = dynamic.backward_step(&lin_loss(&b)).unwrap().unwrap();
        assert_eq!(report.updated, 2);
    }
    assert_eq!(values(&a), values(&b));
    // A gradient of the wrong dtype is an error naming the variable.
    let mut grads = GradStore::default();
    let v = var(&b, "lin.bias");
    grads.insert(
        v.as_tensor(),
        Tensor::zeros(4, candle_core::DType::F64, &dev()).unwrap(),
    );
    let e = dynamic.step(&grads).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("the gradient of variable #0 is") && e.contains("F64"),
        "{e}"
    );
}

/// Every golden file, both folders, replayed through `CandleDyn` with the
/// built-in it names: the path the main job uses.
#[test]
fn every_golden_file_replays_through_candle_dyn() {
    use agr_runtime::candle::CandleDyn;
    let mut files: Vec<PathBuf> = vec![];
    for dir in [
        golden_dir(),
        golden_dir().join("more"),
        golden_dir().join("frontier"),
    ] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 16, "{files:?}");
    // CPU variables on the CPU, and on the emulated CUDA device (the
    // generated kernels over the variables' storage); GPU variables move the
    // optimizer to candle's stream whatever it starts on.
    let devices: &[agr_runtime::Device] = if dev().is_cpu() {
        &[agr_runtime::Device::Cpu, agr_runtime::Device::EmulatedCuda]
    } else {
        &[agr_runtime::Device::Cpu]
    };
    for (path, &device) in files
        .iter()
        .flat_map(|f| devices.iter().map(move |d| (f, d)))
    {
        let g = golden::load(path).unwrap();
        let Some(b) = agr_runtime::optim::builtin(&g.optimizer) else {
            panic!("{}: no built-in `{}`", path.display(), g.optimizer);
        };
        let mut opt = b.make();
        if let Err(e) = opt.set_device(device) {
            // Muon, Adafactor: run on the CPU only (replayed there).
            assert!(
                matches!(e, agr_runtime::DeviceError::CpuOnly { .. }),
                "{}: {e}",
                path.display()
            );
            continue;
        }
        for (name, v) in &g.hyper {
            let value = match v {
                serde_json::Value::Bool(b) => HyperValue::Bool(*b),
                serde_json::Value::Number(n) if !n.is_f64() => HyperValue::Int(n.as_i64().unwrap()),
                v => HyperValue::Float(v.as_f64().unwrap()),
            };
            opt.set_hyper(name, value).unwrap();
        }
        let vars: Vec<Var> = g
            .params
            .iter()
            .map(|p| {
                Var::from_tensor(
                    &Tensor::from_vec(p.init.clone(), p.shape.as_slice(), &dev()).unwrap(),
                )
                .unwrap()
            })
            .collect();
        let mut opt = CandleDyn::new(opt, vars.clone()).unwrap();
        let mut worst = 0.0f64;
        for step in &g.steps {
            let mut grads = GradStore::default();
            for (v, (gr, p)) in vars.iter().zip(step.grads.iter().zip(&g.params)) {
                grads.insert(
                    v.as_tensor(),
                    Tensor::from_vec(gr.clone(), p.shape.as_slice(), &dev()).unwrap(),
                );
            }
            opt.step(&grads).unwrap();
            for (v, reference) in vars.iter().zip(&step.params) {
                let ours = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (x, r) in ours.iter().zip(reference) {
                    let (x, r) = (f64::from(*x), f64::from(*r));
                    assert!(
                        (x - r).abs() <= g.tolerance.atol + g.tolerance.rtol * r.abs(),
                        "{}: {x} vs {r}",
                        path.display()
                    );
                    worst = worst.max((x - r).abs());
                }
            }
        }
        println!("{:<14} {device:<14} {worst:e}", g.optimizer);
    }
}

#[test]
fn training_with_every_builtin_chosen_by_name_lowers_the_loss() {
    use agr_runtime::candle::CandleDyn;
    for b in agr_runtime::optim::BUILTINS {
        let vm = varmap();
        let mut opt = b.make();
        // Sign-based steps (Lion) move every weight by lr: a smaller rate.
        let lr = if b.name.starts_with("lion") {
            3e-3
        } else {
            2e-2
        };
        opt.set_lr(lr).unwrap();
        let mut opt = CandleDyn::from_varmap(opt, &vm).unwrap();
        let first = lin_loss(&vm).to_scalar::<f32>().unwrap();
        for _ in 0..150 {
            opt.backward_step(&lin_loss(&vm)).unwrap();
        }
        let last = lin_loss(&vm).to_scalar::<f32>().unwrap();
        println!("{:<12} loss {first:.4} -> {last:.5}", b.name);
        assert!(last < first * 0.5, "{}: {first} -> {last}", b.name);
    }
}

#[test]
fn a_checkpoint_does_not_load_into_a_varmap_with_other_names() {
    let vm = varmap();
    let mut opt = AdamWAgr::from_varmap(&vm, Default::default()).unwrap();
    opt.backward_step(&lin_loss(&vm)).unwrap();
    let ckpt = opt.save_checkpoint();
    let other = candle_nn::VarMap::new();
    {
        let src = vm.data().lock().unwrap();
        let mut dst = other.data().lock().unwrap();
        dst.insert("a.bias".into(), src["lin.bias"].clone());
        dst.insert("a.weight".into(), src["lin.weight"].clone());
    }
    let mut renamed = AdamWAgr::from_varmap(&other, Default::default()).unwrap();
    let e = renamed.load_checkpoint(&ckpt).unwrap_err();
    assert!(
        e.to_string()
            .contains("parameter #0 is `a.bias` here and `lin.bias` in the checkpoint"),
        "{e}"
    );
    assert_eq!(renamed.steps(), 0);
}

/// `n` variables of two elements and their gradients (±1).
fn many_vars(n: usize) -> (Vec<Var>, GradStore) {
    let dev = dev();
    let vars: Vec<Var> = (0..n)
        .map(|_| Var::ones(2, candle_core::DType::F32, &dev).unwrap())
        .collect();
    let mut grads = GradStore::default();
    for (i, v) in vars.iter().enumerate() {
        let s = if i % 2 == 0 { 1.0f32 } else { -1.0 };
        grads.insert(
            v.as_tensor(),
            Tensor::from_vec(vec![s, s], 2, &dev).unwrap(),
        );
    }
    (vars, grads)
}

/// Each variable's lock used to be taken by one nested call per variable: a
/// 2 MiB thread (test harnesses, thread pools) overflowed its stack at about
/// 10,000 variables in a release build, fewer in a debug one.
#[test]
fn a_hundred_thousand_variables_step_on_a_thread_with_a_small_stack() {
    let n = 100_000;
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let (vars, grads) = many_vars(n);
            let config = AdamWConfig::default().with_lr(0.1).with_weight_decay(0.0);
            let mut opt = AdamW::new(vars.clone(), config).unwrap();
            opt.step(&grads).unwrap();
            assert_eq!(opt.last_report().unwrap().updated, n);
            // Adam's first step moves each element by lr against the sign
            // of its gradient.
            for (i, v) in vars.iter().enumerate() {
                let want = if i % 2 == 0 { 0.9 } else { 1.1 };
                for x in v.as_tensor().to_vec1::<f32>().unwrap() {
                    assert!((x - want).abs() < 1e-6, "variable #{i}: {x}");
                }
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Locks are taken in one global order (by storage), not in each
/// optimizer's order: two optimizers over the same variables, listed in
/// opposite orders, stepping on two threads, both finish.
#[test]
fn optimizers_over_shared_variables_in_opposite_orders_do_not_deadlock() {
    use std::sync::mpsc;
    use std::time::Duration;
    // Both ways of holding the locks: on the calling thread and on a helper.
    for n in [8, 200] {
        let (vars, _) = many_vars(n);
        let (done_tx, done) = mpsc::channel();
        for reversed in [false, true] {
            let mut vs = vars.clone();
            if reversed {
                vs.reverse();
            }
            let done_tx = done_tx.clone();
            std::thread::spawn(move || {
                let mut grads = GradStore::default();
                for v in &vs {
                    grads.insert(v.as_tensor(), v.as_tensor().ones_like().unwrap());
                }
                let config = AdamWConfig::default().with_lr(1e-4);
                let mut opt = AdamW::new(vs, config).unwrap();
                for _ in 0..300 {
                    opt.step(&grads).unwrap();
                }
                done_tx.send(()).unwrap();
            });
        }
        for _ in 0..2 {
            done.recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("{n} variables: the two optimizers deadlocked"));
        }
    }
}

/// A variable whose gradient is its own storage used to deadlock (read lock,
/// then write lock); now it is an error.
#[test]
fn a_gradient_sharing_a_variables_storage_is_an_error() {
    let (vars, _) = many_vars(2);
    let mut grads = GradStore::default();
    grads.insert(vars[0].as_tensor(), vars[1].as_tensor().clone());
    grads.insert(
        vars[1].as_tensor(),
        vars[0].as_tensor().ones_like().unwrap(),
    );
    let mut opt = AdamW::new(vars.clone(), Default::default()).unwrap();
    let e = opt.step(&grads).unwrap_err();
    assert!(
        e.to_string()
            .contains("the gradient of variable #0 shares its storage with a variable"),
        "{e}"
    );
    assert_eq!(vars[1].as_tensor().to_vec1::<f32>().unwrap(), vec![1.0; 2]);
}

/// agr's errors convert into `candle_core::Error`: `?` works in a function
/// returning `candle_core::Result`, and the message is kept.
#[test]
fn agr_errors_convert_into_candle_errors() {
    use agr_runtime::groups::{select, ParamGroups};
    use agr_runtime::ParamMut;
    fn bad_config() -> candle_core::Result<AdamWAgr> {
        Ok(AdamWAgr::with_config(
            AdamWAgrConfig::default().with_lr(-1.0),
        )?)
    }
    fn bad_step() -> candle_core::Result<()> {
        let mut opt = AdamWAgr::with_config(Default::default())?;
        let mut w = vec![1.0f32; 3];
        opt.step_params(&mut [ParamMut::new(&mut w, Some(&[0.5; 2]), &[3])])?;
        Ok(())
    }
    fn bad_groups(vm: &candle_nn::VarMap) -> candle_core::Result<()> {
        let mut opt = AdamWAgr::from_varmap(vm, Default::default())?;
        opt.set_candle_groups(
            &ParamGroups::new()
                .group("v", select::ndim_below(2))
                .set("no_such", 1.0),
        )?;
        Ok(())
    }
    fn bad_checkpoint(vm: &candle_nn::VarMap) -> candle_core::Result<()> {
        let mut opt = AdamWAgr::from_varmap(vm, Default::default())?;
        opt.load_checkpoint(b"not a checkpoint")?;
        Ok(())
    }
    let vm = varmap();
    for (e, want) in [
        (bad_config().err().unwrap(), "lr"),
        (bad_step().unwrap_err(), "the gradient has 2 elements"),
        (bad_groups(&vm).unwrap_err(), "no_such"),
        (bad_checkpoint(&vm).unwrap_err(), "corrupt"),
    ] {
        assert!(e.to_string().contains(want), "{e}");
    }
}

/// Collects every log record of this test binary.
struct Capture;

static RECORDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static CAPTURE: Capture = Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        RECORDS
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once per test binary).
fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    });
}

/// The warnings logged so far that mention `needle`.
fn warnings_about(needle: &str) -> Vec<String> {
    RECORDS
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with("WARN") && r.contains(needle))
        .cloned()
        .collect()
}

/// A model with a learnable temperature (0-d) and gate (one element), its
/// names prefixed with `prefix`.
fn scalar_model(prefix: &str) -> (candle_nn::VarMap, impl Fn() -> Tensor) {
    let dev = dev();
    let vm = candle_nn::VarMap::new();
    let new = |t: Tensor| Var::from_tensor(&t).unwrap();
    let (w, b, temp, gate) = (
        new(Tensor::from_vec(
            (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect(),
            (4, 6),
            &dev,
        )
        .unwrap()),
        new(Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap()),
        new(Tensor::new(1.5f32, &dev).unwrap()),
        new(Tensor::new(&[0.25f32], &dev).unwrap()),
    );
    {
        let mut data = vm.data().lock().unwrap();
        for (name, v) in [
            ("weight", &w),
            ("bias", &b),
            ("temperature", &temp),
            ("gate", &gate),
        ] {
            data.insert(format!("{prefix}.{name}"), v.clone());
        }
    }
    let x = Tensor::from_vec(
        (0..48)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 6.0)
            .collect::<Vec<f32>>(),
        (8, 6),
        &dev,
    )
    .unwrap();
    let loss = move || {
        let y = x
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap()
            .broadcast_mul(temp.as_tensor())
            .unwrap()
            .broadcast_add(gate.as_tensor())
            .unwrap();
        (y - 1.0).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    (vm, loss)
}

fn scalar(vm: &candle_nn::VarMap, name: &str) -> f32 {
    var(vm, name)
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

/// Under the AGR built-ins Ψ of a one-element parameter is 0 (faithful to
/// the published code), so a learnable temperature or gate never trains:
/// the first step says so once, as a `log` warning naming them;
/// `ParamGroups::paper()` (one call) trains them.
#[test]
fn parameters_psi_freezes_are_named_once_in_a_warning() {
    use agr_runtime::groups::ParamGroups;
    capture_logs();
    let (vm, loss) = scalar_model("frozen");
    let mut opt = AdamWAgr::from_varmap(&vm, AdamWAgrConfig::default().with_lr(0.05)).unwrap();
    for _ in 0..3 {
        opt.backward_step(&loss()).unwrap();
    }
    let logged = warnings_about("`frozen.");
    assert_eq!(logged.len(), 1, "{logged:?}");
    println!("{}", logged[0]);
    assert!(
        logged[0].contains(
            "AdamWAgr: the gradient of 2 one-element parameters never moves them (Ψ of a one-element tensor is 0"
        ) && logged[0].contains("`frozen.gate` [1], `frozen.temperature` []")
            && logged[0].contains("ParamGroups::paper()"),
        "{logged:?}"
    );
    assert!(!logged[0].contains("frozen.weight") && !logged[0].contains("frozen.bias"));

    // The paper's grouping: no warning, and the scalars train.
    let (vm, loss) = scalar_model("paper");
    let mut opt = AdamWAgr::from_varmap(&vm, AdamWAgrConfig::default().with_lr(0.05)).unwrap();
    opt.set_candle_groups(&ParamGroups::paper()).unwrap();
    let before = scalar(&vm, "paper.temperature");
    for _ in 0..3 {
        opt.backward_step(&loss()).unwrap();
    }
    assert!((scalar(&vm, "paper.temperature") - before).abs() > 0.05);
    assert_eq!(warnings_about("`paper."), Vec::<String>::new());

    // Ψ switched off, or an optimizer without Ψ: no warning either.
    let (vm, loss) = scalar_model("off");
    let config = AdamWAgrConfig::default().with_use_agr(false);
    let mut opt = AdamWAgr::from_varmap(&vm, config).unwrap();
    opt.backward_step(&loss()).unwrap();
    let (vm2, loss2) = scalar_model("adamw");
    let mut plain = AdamW::from_varmap(&vm2, Default::default()).unwrap();
    plain.backward_step(&loss2()).unwrap();
    assert_eq!(warnings_about("`off."), Vec::<String>::new());
    assert_eq!(warnings_about("`adamw."), Vec::<String>::new());
}

/// Past a few hundred variables a helper thread holds the locks: an error
/// found with them held (here a gradient of the wrong length, through
/// `step_vars`) comes back as an error before the step runs, and the helper
/// keeps serving steps. A variable of a dtype the step does not take is
/// refused before any lock is taken.
#[test]
fn errors_while_locking_many_variables_come_back_and_steps_go_on() {
    let dev = dev();
    let vars: Vec<Var> = (0..401)
        .map(|_| Var::ones(2, candle_core::DType::F32, &dev).unwrap())
        .collect();
    let mut grads = GradStore::default();
    grads.insert(
        vars[400].as_tensor(),
        Tensor::ones(5, candle_core::DType::F32, &dev).unwrap(),
    );
    let mut ran = false;
    let mut stepper = |_: &mut [agr_runtime::ParamMut<'_>]| {
        ran = true;
        Ok::<_, String>(agr_runtime::StepReport {
            step: 1,
            updated: 0,
            skipped: 0,
            skipped_non_finite: None,
        })
    };
    let e = agr_runtime::candle::step_vars(&vars, &grads, &mut stepper).unwrap_err();
    assert!(
        e.to_string()
            .contains("the gradient of variable #400 has 5 elements and the variable 2"),
        "{e}"
    );
    let mut wrong_dtype = vars.clone();
    wrong_dtype.push(Var::ones(2, candle_core::DType::F64, &dev).unwrap());
    let e = agr_runtime::candle::step_vars(&wrong_dtype, &grads, &mut stepper).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("variable #401 is") && e.contains("F64"), "{e}");
    if !dev.is_cpu() {
        // A caller's function of host slices cannot step GPU variables.
        let e = agr_runtime::candle::step_vars(&vars, &GradStore::default(), &mut stepper)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step_vars hands host slices"), "{e}");
    }
    assert!(!ran);
    let (vars, grads) = many_vars(400);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default().with_lr(0.1)).unwrap();
    for _ in 0..3 {
        opt.step(&grads).unwrap();
    }
    assert_eq!(opt.last_report().unwrap().updated, 400);
    assert!(vars[399].as_tensor().to_vec1::<f32>().unwrap()[0] > 1.0);
}

#[test]
fn a_spec_compiled_at_run_time_is_a_candle_optimizer() {
    let b = builtin("lion_agr").unwrap();
    let spec = agr_runtime::compile(b.source).unwrap();
    let run = |mut opt: Box<dyn FnMut(&GradStore)>, vars: &[Var]| -> Vec<u32> {
        for k in 0..5 {
            let mut grads = GradStore::default();
            for (i, v) in vars.iter().enumerate() {
                let n = v.elem_count();
                let g: Vec<f32> = (0..n)
                    .map(|j| ((j * 7 + i * 3 + k) % 11) as f32 - 5.0)
                    .collect();
                grads.insert(
                    v.as_tensor(),
                    Tensor::from_vec(g, v.dims(), &dev()).unwrap(),
                );
            }
            opt(&grads);
        }
        vars.iter()
            .flat_map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .map(f32::to_bits)
            .collect()
    };
    let vars = || -> Vec<Var> {
        [vec![3, 4], vec![4], vec![1]]
            .iter()
            .map(|s| {
                Var::from_tensor(
                    &Tensor::ones(s.as_slice(), candle_core::DType::F32, &dev()).unwrap(),
                )
                .unwrap()
            })
            .collect()
    };
    let (va, vb) = (vars(), vars());
    let mut compiled =
        agr_runtime::CompiledOptimizer::new(va.clone(), spec.default_config()).unwrap();
    let mut generated = LionAgr::new(vb.clone(), Default::default()).unwrap();
    let a = run(Box::new(move |g| compiled.step(g).unwrap()), &va);
    let b = run(Box::new(move |g| generated.step(g).unwrap()), &vb);
    assert!(
        a == b,
        "the compiled spec and LionAgr differ through candle"
    );
}

/// Half-precision variables: refused on the CPU (nothing changes); on a GPU
/// stepped in place with f32 arithmetic and state, within a few bf16/f16
/// roundings per step of the f32 trajectory on the CPU.
#[test]
fn half_precision_variables_step_on_a_gpu_and_on_the_cpu() {
    use candle_core::DType;
    let init: Vec<f32> = (0..96)
        .map(|i| ((i * 37 % 97) as f32 - 48.0) / 40.0)
        .collect();
    let grad_at = |step: usize| -> Vec<f32> {
        (0..96)
            .map(|i| (((i * 13 + step * 7) % 31) as f32 - 15.0) / 30.0)
            .collect()
    };
    let steps = 5;
    // The f32 reference on the CPU.
    let reference = {
        let v = Var::from_tensor(&Tensor::from_vec(init.clone(), (8, 12), &Device::Cpu).unwrap())
            .unwrap();
        let mut opt =
            AdamWAgr::new(vec![v.clone()], AdamWAgrConfig::default().with_lr(1e-2)).unwrap();
        for k in 0..steps {
            let mut grads = GradStore::default();
            grads.insert(
                v.as_tensor(),
                Tensor::from_vec(grad_at(k), (8, 12), &Device::Cpu).unwrap(),
            );
            opt.step(&grads).unwrap();
        }
        v.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for (dtype, ulp) in [(DType::BF16, 2f32.powi(-8)), (DType::F16, 2f32.powi(-11))] {
        let start = Tensor::from_vec(init.clone(), (8, 12), &dev())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let v = Var::from_tensor(&start).unwrap();
        // On the CPU too: f32 state, each step's parameters rounded to
        // nearest, as on a GPU.
        let mut opt =
            AdamWAgr::new(vec![v.clone()], AdamWAgrConfig::default().with_lr(1e-2)).unwrap();
        for k in 0..steps {
            let mut grads = GradStore::default();
            let g = Tensor::from_vec(grad_at(k), (8, 12), &dev())
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            grads.insert(v.as_tensor(), g);
            opt.step(&grads).unwrap();
        }
        let ours = v
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (x, r)) in ours.iter().zip(&reference).enumerate() {
            // One rounding of the start, the gradients' and one per step.
            let bound = (2 * steps + 2) as f32 * ulp * r.abs().max(1e-2) + 1e-3;
            assert!(
                (x - r).abs() <= bound,
                "{dtype:?}[{i}]: {x} vs the f32 {r} (bound {bound})"
            );
        }
    }
}

/// Variables on two devices are one optimizer's error, before anything is
/// written. Needs a GPU: ignored unless asked for (the GPU check runs the
/// ignored tests with AGR_TEST_CANDLE_DEVICE=cuda:0).
#[test]
#[ignore = "needs a GPU: AGR_TEST_CANDLE_DEVICE=cuda:N and the candle-cuda feature"]
fn variables_on_two_devices_are_an_error() {
    let gpu = dev();
    assert!(!gpu.is_cpu(), "needs AGR_TEST_CANDLE_DEVICE=cuda:N");
    let a = Var::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Var::ones(4, candle_core::DType::F32, &gpu).unwrap();
    let e = AdamW::new(vec![a.clone(), b], Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("variable #1 is on cuda:0 and variable #0 on cpu"),
        "{e}"
    );
    assert_eq!(a.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
}

#[test]
fn a_multi_part_optimizer_steps_candle_variables_as_its_parts_do_alone() {
    use agr_runtime::candle::CandleDyn;
    use agr_runtime::groups::{select, ParamGroups};
    use agr_runtime::multi::Multi;
    let builtin = |n: &str| agr_runtime::optim::builtin(n).unwrap().make();
    let (a, b) = (varmap(), varmap());
    let multi = Multi::new(builtin("adamw_agr"))
        .part("matrices", select::ndim_at_least(2), builtin("muon_agr"))
        .unwrap();
    let mut multi = CandleDyn::from_varmap(Box::new(multi), &a).unwrap();
    multi.set_param_groups(&ParamGroups::paper()).unwrap();
    // The same two optimizers, each over its own variable.
    let mut muon = CandleDyn::new(builtin("muon_agr"), vec![var(&b, "lin.weight")]).unwrap();
    let mut adamw = CandleDyn::new(builtin("adamw_agr"), vec![var(&b, "lin.bias")]).unwrap();
    adamw.set_param_groups(&ParamGroups::paper()).unwrap();
    if !dev().is_cpu() {
        // Muon's matrix block runs on the CPU only: the move is refused.
        let e = multi.backward_step(&lin_loss(&a)).unwrap_err().to_string();
        assert!(e.contains("matrix block"), "{e}");
        return;
    }
    for _ in 0..4 {
        let r = multi.backward_step(&lin_loss(&a)).unwrap().unwrap();
        assert_eq!(r.updated, 2);
        let grads = lin_loss(&b).backward().unwrap();
        muon.step(&grads).unwrap();
        adamw.step(&grads).unwrap();
    }
    assert_eq!(values(&a), values(&b));
    assert_eq!(multi.opt.group_name(0), "rest/vectors");
    assert_eq!(multi.opt.group_name(1), "matrices/default");
}

/// CPU bf16 and f16 variables step through the adapter exactly as the
/// engine steps the same values as slices (here with an f32 master copy
/// for bf16, and f16 states for f16).
#[test]
fn cpu_bf16_and_f16_variables_step_as_the_engine_steps_them() {
    use agr_runtime::{Precision, Storage};
    use candle_core::DType;
    if !matches!(dev(), Device::Cpu) {
        return; // GPU variables of these dtypes: the GPU suite.
    }
    for (dtype, precision) in [
        (DType::BF16, Precision::f32().with_master(true)),
        (
            DType::F16,
            Precision::f32()
                .state("m", Storage::F16)
                .state("v", Storage::F16),
        ),
    ] {
        let init: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.05)
            .collect();
        let w = Var::from_tensor(
            &Tensor::from_vec(init.clone(), (8, 12), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default().with_lr(1e-2)).unwrap();
        opt.set_precision(precision.clone()).unwrap();
        let mut reference = AdamW::with_config(AdamWConfig::default().with_lr(1e-2)).unwrap();
        reference.set_precision(precision).unwrap();
        let as_f32 = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let mut mine = as_f32(w.as_tensor());
        for t in 0..5 {
            let gv: Vec<f32> = (0..96)
                .map(|i| (((i + 7 * t) % 13) as f32 - 6.0) * 0.01)
                .collect();
            let g = Tensor::from_vec(gv, (8, 12), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let mut grads = GradStore::default();
            grads.insert(w.as_tensor(), g.clone());
            opt.step(&grads).unwrap();
            let gf = as_f32(&g);
            match dtype {
                DType::BF16 => step_narrowed(
                    &mut reference,
                    &mut mine,
                    &gf,
                    &[8, 12],
                    half::bf16::from_f32,
                ),
                _ => step_narrowed(
                    &mut reference,
                    &mut mine,
                    &gf,
                    &[8, 12],
                    half::f16::from_f32,
                ),
            }
            assert_eq!(as_f32(w.as_tensor()), mine, "{dtype:?}: step {t}");
        }
        assert_ne!(as_f32(w.as_tensor()), init, "{dtype:?}: the variable moved");
    }
}

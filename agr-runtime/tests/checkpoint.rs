//! Checkpoints: resuming gives bit-identical parameters; a truncated, corrupt
//! or mismatched checkpoint is an error and leaves the optimizer unchanged.

use agr_runtime::optim::{AdamW, AdamWAgr, AdamWAgrConfig, AdanAgr, AdanAgrConfig};
use agr_runtime::{CheckpointError, ParamMut};

mod common;
use common::data;

const SHAPES: &[&[usize]] = &[&[40, 30], &[30], &[70_000]];

fn init() -> Vec<Vec<f32>> {
    init_of(SHAPES)
}

fn step<K: agr_runtime::Kernel>(
    opt: &mut agr_runtime::Optimizer<K>,
    values: &mut [Vec<f32>],
    t: u64,
) {
    let grads: Vec<Vec<f32>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| data(v.len(), 100 * t + i as u64))
        .collect();
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(&grads)
        .zip(SHAPES)
        .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
        .collect();
    // The middle tensor has no gradient on odd steps: per-tensor step counts differ.
    if t % 2 == 1 {
        params[1].grad = None;
    }
    opt.step_params(&mut params).unwrap();
}

/// Whether two checkpoints hold the same state (their metadata maps may be
/// serialised in different orders).
fn same_state(a: &[u8], b: &[u8]) -> bool {
    use safetensors::SafeTensors;
    let (_, ma) = SafeTensors::read_metadata(a).unwrap();
    let (_, mb) = SafeTensors::read_metadata(b).unwrap();
    let (ta, tb) = (
        SafeTensors::deserialize(a).unwrap(),
        SafeTensors::deserialize(b).unwrap(),
    );
    let mut na = ta.names();
    let mut nb = tb.names();
    na.sort();
    nb.sort();
    ma.metadata() == mb.metadata()
        && na == nb
        && na
            .iter()
            .all(|n| ta.tensor(n).unwrap().data() == tb.tensor(n).unwrap().data())
}

fn bits(v: &[Vec<f32>]) -> Vec<u32> {
    v.iter().flatten().map(|x| x.to_bits()).collect()
}

#[test]
fn resuming_from_a_checkpoint_is_bit_identical() {
    let config = AdanAgrConfig::default()
        .with_lr(1e-2)
        .with_max_grad_norm(3.0)
        .with_no_prox(true);
    let mut straight = AdanAgr::with_config(config.clone()).unwrap();
    let mut a = init();
    for t in 1..=8 {
        step(&mut straight, &mut a, t);
    }

    let mut first = AdanAgr::with_config(config).unwrap();
    let mut b = init();
    for t in 1..=4 {
        step(&mut first, &mut b, t);
    }
    let dir = std::env::temp_dir().join(format!("agr-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adan_agr.safetensors");
    first.save_checkpoint_to(&path).unwrap();
    drop(first);
    // A fresh optimizer with default hyperparameters: the checkpoint brings its own.
    let mut resumed = AdanAgr::with_config(AdanAgrConfig::default()).unwrap();
    resumed.load_checkpoint_from(&path).unwrap();
    assert_eq!(resumed.config().lr, 1e-2);
    assert!(resumed.config().no_prox);
    assert_eq!(resumed.steps(), 4);
    for t in 5..=8 {
        step(&mut resumed, &mut b, t);
    }
    assert_eq!(
        bits(&a),
        bits(&b),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn broken_checkpoints_are_errors_and_change_nothing() {
    let mut source = AdamWAgr::with_config(AdamWAgrConfig::default().with_lr(3e-3)).unwrap();
    let mut v = init();
    for t in 1..=2 {
        step(&mut source, &mut v, t);
    }
    let good = source.save_checkpoint();

    // The victim: an optimizer mid-run, whose state must survive every failure.
    let mut victim = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    let mut w = init();
    step(&mut victim, &mut w, 1);
    let before = victim.save_checkpoint();

    let mut flipped = good.clone();
    flipped[10] ^= 0xff; // inside the JSON header
    let wrong_shape = {
        let mut other = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
        let mut x = vec![0.5f32; 12];
        let g = vec![0.1f32; 12];
        other
            .step_params(&mut [
                ParamMut::new(&mut x.clone(), Some(&g), &[3, 4]),
                ParamMut::new(&mut x, Some(&g), &[12]),
                ParamMut::new(&mut vec![0.0; 12], Some(&g), &[12]),
            ])
            .unwrap();
        other.save_checkpoint()
    };
    let other_optimizer = AdamW::with_config(Default::default())
        .unwrap()
        .save_checkpoint();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "corrupt or truncated",
        ),
        ("empty", vec![], "corrupt or truncated"),
        ("flipped header byte", flipped, "corrupt or truncated"),
        (
            "another optimizer",
            other_optimizer,
            "saved by AdamW, not AdamWAgr",
        ),
        (
            "other shapes",
            wrong_shape,
            "parameter #0 has shape [40, 30] here and [3, 4] in the checkpoint",
        ),
    ];
    for (what, bytes, want) in cases {
        let e: CheckpointError = victim.load_checkpoint(&bytes).unwrap_err();
        assert!(e.to_string().contains(want), "{what}: {e}");
        assert!(
            same_state(&victim.save_checkpoint(), &before),
            "{what}: the optimizer changed"
        );
    }
    assert!(victim
        .load_checkpoint_from("/nonexistent/ckpt.safetensors")
        .is_err());
    // And a good one loads.
    victim.load_checkpoint(&good).unwrap();
    assert_eq!(victim.steps(), 2);
    assert_eq!(victim.config().lr, 3e-3);
}

agr_runtime::optimizer! {
    /// SGD with Ψ and no state: nothing but shapes and step counts to save.
    StatelessSgd {
        hyper { lr = 0.1 where lr >= 0 }
        step { p = p - lr * agr(g); }
    }
}

#[test]
fn an_optimizer_without_state_resumes_from_its_checkpoint() {
    let config = StatelessSgdConfig::default().with_lr(0.05);
    let mut straight = StatelessSgd::with_config(config.clone()).unwrap();
    let mut a = init();
    for t in 1..=6 {
        step(&mut straight, &mut a, t);
    }
    let mut first = StatelessSgd::with_config(config).unwrap();
    let mut b = init();
    for t in 1..=3 {
        step(&mut first, &mut b, t);
    }
    let ckpt = first.save_checkpoint();
    let mut resumed = StatelessSgd::with_config(Default::default()).unwrap();
    resumed.load_checkpoint(&ckpt).unwrap();
    assert_eq!(resumed.config().lr, 0.05);
    assert_eq!(resumed.steps(), 3);
    assert_eq!(resumed.tensor_steps(0), 3);
    for t in 4..=6 {
        step(&mut resumed, &mut b, t);
    }
    assert_eq!(bits(&a), bits(&b));

    // The shapes are checked against a running optimizer's, state or none.
    let mut other = StatelessSgd::with_config(Default::default()).unwrap();
    let (mut x, g) = (vec![0.5f32; 12], vec![0.1f32; 12]);
    other
        .step_params(&mut [
            ParamMut::new(&mut x.clone(), Some(&g), &[3, 4]),
            ParamMut::new(&mut x.clone(), Some(&g), &[12]),
            ParamMut::new(&mut x, Some(&g), &[2, 6]),
        ])
        .unwrap();
    let before = resumed.save_checkpoint();
    let e = resumed
        .load_checkpoint(&other.save_checkpoint())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("parameter #0 has shape [40, 30] here and [3, 4] in the checkpoint"),
        "{e}"
    );
    assert!(same_state(&resumed.save_checkpoint(), &before));
}

#[test]
fn stored_shapes_are_checked() {
    use safetensors::SafeTensors;
    let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    let mut v = init();
    step(&mut opt, &mut v, 2); // an even step: every parameter has a gradient
    let good = opt.save_checkpoint();
    // The same checkpoint with its metadata field `tensor_shapes` replaced.
    let with_shapes = |shapes: &str| {
        let (_, header) = SafeTensors::read_metadata(&good).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        meta.insert("tensor_shapes".into(), shapes.into());
        let st = SafeTensors::deserialize(&good).unwrap();
        safetensors::serialize(st.tensors(), Some(meta)).unwrap()
    };
    let cases = [
        ("[[40,30],[30]]", "list different numbers of parameters"),
        (
            "[[40,30],[30],null]",
            "disagree on whether parameter #2 has state",
        ),
        ("[[40,30],[30],[0]]", "parameter #2 has shape [0]"),
        (
            "[[40,30],[31],[70000]]",
            "`1.m` has shape [30], not its parameter's [31]",
        ),
        ("[[40,30],[30],\"x\"]", "corrupt or truncated"),
    ];
    let mut fresh = AdamWAgr::with_config(AdamWAgrConfig::default()).unwrap();
    for (shapes, want) in cases {
        let e = fresh.load_checkpoint(&with_shapes(shapes)).unwrap_err();
        assert!(e.to_string().contains(want), "{shapes}: {e}");
        assert_eq!(fresh.steps(), 0);
    }
    fresh
        .load_checkpoint(&with_shapes("[[40,30],[30],[70000]]"))
        .unwrap();
    assert_eq!(fresh.steps(), 1);
}

/// Values of `shapes`, from the test's data.
fn init_of(shapes: &[&[usize]]) -> Vec<Vec<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), i as u64))
        .collect()
}

/// Steps `ts` of `opt` over `values` (of `shapes`), every tensor with a
/// gradient from the test's data.
fn run_steps<K: agr_runtime::Kernel>(
    opt: &mut agr_runtime::Optimizer<K>,
    values: &mut [Vec<f32>],
    shapes: &[&[usize]],
    ts: std::ops::RangeInclusive<u64>,
) {
    for t in ts {
        let g: Vec<Vec<f32>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| data(v.len(), 100 * t + i as u64))
            .collect();
        let mut ps: Vec<ParamMut<'_>> = values
            .iter_mut()
            .zip(&g)
            .zip(shapes)
            .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
            .collect();
        opt.step_params(&mut ps).unwrap();
    }
}

/// Adafactor keeps reduced states (one value per row or column of the last
/// two dimensions): their checkpoints hold the reduced shapes, a resume is
/// bit for bit, and a reduced state of the wrong shape is refused.
#[test]
fn reduced_states_resume_bit_for_bit_and_their_shapes_are_checked() {
    use agr_runtime::optim::{Adafactor, AdafactorConfig};
    use safetensors::SafeTensors;
    const SHAPES: &[&[usize]] = &[&[2, 3, 4], &[5], &[6, 7]];
    let run = |opt: &mut Adafactor, v: &mut Vec<Vec<f32>>, ts| run_steps(opt, v, SHAPES, ts);
    let init = init_of(SHAPES);
    let config = AdafactorConfig::default().with_weight_decay(0.01);
    let mut straight = Adafactor::with_config(config.clone()).unwrap();
    let mut a = init.clone();
    run(&mut straight, &mut a, 1..=6);
    let mut first = Adafactor::with_config(config).unwrap();
    let mut b = init;
    run(&mut first, &mut b, 1..=3);
    let saved = first.save_checkpoint();
    let st = SafeTensors::deserialize(&saved).unwrap();
    assert_eq!(st.tensor("0.vr").unwrap().shape(), &[2, 3, 1]);
    assert_eq!(st.tensor("0.vc").unwrap().shape(), &[2, 1, 4]);
    assert_eq!(st.tensor("1.vr").unwrap().shape(), &[1]);
    assert_eq!(st.tensor("1.vc").unwrap().shape(), &[5]);
    assert_eq!(first.state(2, "vr").unwrap().len(), 6);
    assert_eq!(first.state(2, "vc").unwrap().len(), 7);
    let mut resumed = Adafactor::with_config(AdafactorConfig::default()).unwrap();
    resumed.load_checkpoint(&saved).unwrap();
    run(&mut resumed, &mut b, 4..=6);
    assert_eq!(bits(&a), bits(&b), "resumed run differs");

    // `0.vr` stored per element instead of per row: refused, nothing changes.
    let (_, header) = SafeTensors::read_metadata(&saved).unwrap();
    let meta = header.metadata().clone();
    let full = vec![0u8; 24 * 4];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "0.vr")
        .collect();
    tensors.push((
        "0.vr".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3, 4], &full)
            .unwrap(),
    ));
    let bad = safetensors::serialize(tensors, meta).unwrap();
    let mut fresh = Adafactor::with_config(AdafactorConfig::default()).unwrap();
    let e = fresh.load_checkpoint(&bad).unwrap_err().to_string();
    assert!(
        e.contains("`0.vr` has shape [2, 3, 4], not [2, 3, 1] (its parameter's [2, 3, 4] reduced over dimension -1)"),
        "{e}"
    );
    assert_eq!(fresh.steps(), 0);
}

/// NAdam keeps its momentum schedule's running product per tensor: the
/// checkpoint holds it as a scalar, a resume is bit for bit, and a step
/// skipped for a non-finite gradient leaves it as it was.
#[test]
fn a_per_tensor_state_resumes_bit_for_bit_and_a_skipped_step_keeps_it() {
    use agr_runtime::optim::{NAdam, NAdamConfig};
    use agr_runtime::NonFinite;
    use safetensors::SafeTensors;
    const SHAPES: &[&[usize]] = &[&[2, 3, 4], &[5], &[]];
    let run = |opt: &mut NAdam, v: &mut Vec<Vec<f32>>, ts| run_steps(opt, v, SHAPES, ts);
    let init = init_of(SHAPES);
    let config = NAdamConfig::default().with_momentum_decay(0.05);
    let mut straight = NAdam::with_config(config.clone()).unwrap();
    let mut a = init.clone();
    run(&mut straight, &mut a, 1..=6);
    let mut first = NAdam::with_config(config).unwrap();
    let mut b = init;
    run(&mut first, &mut b, 1..=3);
    // mu_product = mu_1 mu_2 mu_3, one number per tensor.
    let mu = |t: f64| 0.9 * (1.0 - 0.5 * 0.96f64.powf(t * 0.05));
    let want = (mu(1.0) * mu(2.0) * mu(3.0)) as f32;
    for i in 0..3 {
        let got = first.state(i, "mu_product").unwrap();
        assert_eq!(got.len(), 1);
        assert!((got[0] - want).abs() <= 1e-6 * want, "{got:?} vs {want}");
    }
    let saved = first.save_checkpoint();
    let st = SafeTensors::deserialize(&saved).unwrap();
    assert_eq!(st.tensor("0.mu_product").unwrap().shape(), &[] as &[usize]);
    assert_eq!(st.tensor("0.m").unwrap().shape(), &[2, 3, 4]);

    // A NaN gradient under Skip: nothing moves, the product included.
    first.set_non_finite_policy(NonFinite::Skip);
    let before = first.state(1, "mu_product").unwrap().to_vec();
    let nan = vec![data(24, 9), data(5, 10), vec![f32::NAN]];
    let mut vals = b.clone();
    let mut ps: Vec<ParamMut<'_>> = vals
        .iter_mut()
        .zip(&nan)
        .zip(SHAPES)
        .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
        .collect();
    let r = first.step_params(&mut ps).unwrap();
    assert_eq!(r.updated, 0);
    assert_eq!(first.state(1, "mu_product").unwrap(), &before[..]);
    assert_eq!(bits(&vals), bits(&b));

    let mut resumed = NAdam::with_config(NAdamConfig::default()).unwrap();
    resumed.load_checkpoint(&saved).unwrap();
    run(&mut resumed, &mut b, 4..=6);
    assert_eq!(bits(&a), bits(&b), "resumed run differs");
}

//! Parameter groups: per-group overrides give exactly what separately
//! configured optimizers give, global reductions still span every group,
//! learning-rate changes reach the groups, bad groups are errors that change
//! nothing, and checkpoints carry the group layout.

use agr_runtime::groups::{select, GroupError, ParamGroups};
use agr_runtime::optim::{AdamW, AdamWAgr, AdamWAgrConfig, AdanAgr, AdanAgrConfig};
use agr_runtime::{CheckpointError, ConfigError, Kernel, Optimizer, ParamMut};

mod common;
use common::data;

const NAMES: &[&str] = &["body.weight", "body.bias", "head.weight", "head.bias"];
const SHAPES: &[&[usize]] = &[&[48, 20], &[48], &[10, 48], &[10]];

fn named() -> Vec<(&'static str, &'static [usize])> {
    NAMES.iter().copied().zip(SHAPES.iter().copied()).collect()
}

fn init() -> Vec<Vec<f32>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), 7 + i as u64))
        .collect()
}

fn grads(t: u64) -> Vec<Vec<f32>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), 1000 * t + i as u64))
        .collect()
}

/// One step of `opt` over every parameter.
fn step_all<K: Kernel>(opt: &mut Optimizer<K>, values: &mut [Vec<f32>], t: u64) {
    let g = grads(t);
    let mut params: Vec<ParamMut<'_>> = values
        .iter_mut()
        .zip(&g)
        .zip(SHAPES)
        .map(|((v, g), s)| ParamMut::new(v, Some(g), s))
        .collect();
    opt.step_params(&mut params).unwrap();
}

/// One step of `opt` over parameter `i` alone.
fn step_one<K: Kernel>(opt: &mut Optimizer<K>, value: &mut [f32], i: usize, t: u64) {
    let g = &grads(t)[i];
    opt.step_params(&mut [ParamMut::new(value, Some(g), SHAPES[i])])
        .unwrap();
}

fn paper_groups() -> ParamGroups {
    ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .set("weight_decay", 0.0)
        .set("use_agr", false)
        .group("head", select::name_starts_with("head."))
        .scale("lr", 0.1)
}

#[test]
fn predicates_assign_each_parameter_to_its_first_matching_group() {
    let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
    opt.set_param_groups(&paper_groups(), &named()).unwrap();
    let got: Vec<&str> = (0..4).map(|i| opt.group_name(i)).collect();
    // head.bias is 1-D: the first group that selects it wins.
    assert_eq!(got, ["default", "vectors", "head", "vectors"]);
    assert_eq!(opt.group_names(), ["default", "vectors", "head"]);
    let head = opt.group_config("head").unwrap();
    assert_eq!(head.lr, 1e-4);
    assert_eq!(head.weight_decay, 1e-2);
    let vectors = opt.group_config("vectors").unwrap();
    assert_eq!((vectors.weight_decay, vectors.use_agr), (0.0, false));
}

#[test]
fn grouped_steps_equal_separately_configured_optimizers() {
    let base = AdamWAgrConfig::default().with_lr(3e-3);
    let mut grouped = AdamWAgr::with_config(base.clone()).unwrap();
    grouped.set_param_groups(&paper_groups(), &named()).unwrap();
    let mut w = init();
    for t in 1..=5 {
        step_all(&mut grouped, &mut w, t);
    }
    // The same updates from one optimizer per parameter, configured by hand.
    let by_hand = [
        base.clone(),
        base.clone().with_weight_decay(0.0).with_use_agr(false),
        base.clone().with_lr(3e-3 * 0.1),
        base.clone().with_weight_decay(0.0).with_use_agr(false),
    ];
    for (i, config) in by_hand.into_iter().enumerate() {
        let mut alone = AdamWAgr::with_config(config).unwrap();
        let mut v = init()[i].clone();
        for t in 1..=5 {
            step_one(&mut alone, &mut v, i, t);
        }
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&w[i]), bits(&v), "parameter {}", NAMES[i]);
    }
}

#[test]
fn adamw_agr_without_psi_is_adamw() {
    let mut off = AdamWAgr::with_config(AdamWAgrConfig::default().with_use_agr(false)).unwrap();
    let mut plain = AdamW::with_config(Default::default()).unwrap();
    let (mut a, mut b) = (init(), init());
    for t in 1..=4 {
        step_all(&mut off, &mut a, t);
        step_all(&mut plain, &mut b, t);
    }
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() <= 1e-7 * x.abs().max(1.0), "{x} vs {y}");
    }
    // And Ψ on makes a difference (the comparison above can fail).
    let mut on = AdamWAgr::with_config(Default::default()).unwrap();
    let mut c = init();
    for t in 1..=4 {
        step_all(&mut on, &mut c, t);
    }
    assert_ne!(c, b);
}

#[test]
fn global_reductions_span_every_group() {
    // Adan-AGR clips by the norm of every gradient. A group whose override
    // changes nothing must leave the step bit-identical: were the norm taken
    // per group, the clip factors would differ.
    let base = AdanAgrConfig::default()
        .with_max_grad_norm(0.5)
        .with_lr(1e-2);
    let mut plain = AdanAgr::with_config(base.clone()).unwrap();
    let mut grouped = AdanAgr::with_config(base).unwrap();
    let same = ParamGroups::new()
        .group("head", select::name_starts_with("head."))
        .scale("lr", 1.0);
    grouped.set_param_groups(&same, &named()).unwrap();
    assert_eq!(grouped.group_name(2), "head");
    let (mut a, mut b) = (init(), init());
    for t in 1..=3 {
        step_all(&mut plain, &mut a, t);
        step_all(&mut grouped, &mut b, t);
    }
    assert_eq!(a, b);
    // Clipping is active here: without it the result differs.
    let mut unclipped = AdanAgr::with_config(AdanAgrConfig::default().with_lr(1e-2)).unwrap();
    let mut c = init();
    for t in 1..=3 {
        step_all(&mut unclipped, &mut c, t);
    }
    assert_ne!(a, c);
}

#[test]
fn learning_rate_changes_reach_the_groups() {
    let groups = ParamGroups::new()
        .group("scaled", select::name_starts_with("head."))
        .scale("lr", 0.5)
        .group("fixed", select::name_ends_with(".bias"))
        .set("lr", 0.125);
    let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
    opt.set_param_groups(&groups, &named()).unwrap();
    opt.set_lr(0.25).unwrap();
    assert_eq!(opt.lr(), Some(0.25));
    assert_eq!(opt.group_config("default").unwrap().lr, 0.25);
    assert_eq!(opt.group_config("scaled").unwrap().lr, 0.125);
    assert_eq!(opt.group_config("fixed").unwrap().lr, 0.125);
    opt.set_lr(0.5).unwrap();
    assert_eq!(opt.group_config("scaled").unwrap().lr, 0.25);
    assert_eq!(opt.group_config("fixed").unwrap().lr, 0.125);
    // A schedule's zero (warm-up start) is a valid rate, as in PyTorch.
    opt.set_lr(0.0).unwrap();
    assert_eq!(opt.group_config("scaled").unwrap().lr, 0.0);
    // One group's value, set later.
    opt.set_group_hyper("fixed", "weight_decay", 0.0).unwrap();
    assert_eq!(opt.group_config("fixed").unwrap().weight_decay, 0.0);
    assert_eq!(opt.group_config("default").unwrap().weight_decay, 1e-2);
}

#[test]
fn bad_groups_are_errors_that_change_nothing() {
    let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
    let check = |opt: &AdamWAgr| {
        assert_eq!(opt.group_names(), ["default"]);
        assert_eq!(opt.group_name(3), "default");
    };

    let typo = ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .set("weight_decy", 0.0);
    let e = opt.set_param_groups(&typo, &named()).unwrap_err();
    assert!(matches!(
        &e,
        GroupError::Config { group, error: ConfigError::Unknown { name, .. } }
            if group == "vectors" && name == "weight_decy"
    ));
    assert!(e.to_string().starts_with(
        "parameter group `vectors`: AdamWAgr has no hyperparameter `weight_decy`; its hyperparameters are `lr`"
    ));
    check(&opt);

    let negative = ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .scale("weight_decay", -1.0);
    let e = opt.set_param_groups(&negative, &named()).unwrap_err();
    assert!(
        e.to_string().contains("outside its valid range [0, inf)"),
        "{e}"
    );
    check(&opt);

    let wrong_type = ParamGroups::new()
        .group("vectors", select::ndim_below(2))
        .scale("use_agr", 2.0);
    assert!(opt.set_param_groups(&wrong_type, &named()).is_err());
    check(&opt);

    let twice = ParamGroups::new()
        .group("a", select::ndim_below(2))
        .group("a", select::ndim_at_least(2));
    let e = opt.set_param_groups(&twice, &named()).unwrap_err();
    assert!(e.to_string().contains("`a` is used twice"), "{e}");
    let default = ParamGroups::new().group("default", select::ndim_below(2));
    assert!(opt.set_param_groups(&default, &named()).is_err());
    let orphan = ParamGroups::new().set("lr", 0.1);
    let e = opt.set_param_groups(&orphan, &named()).unwrap_err();
    assert!(
        e.to_string()
            .contains("call `.group(name, predicate)` first"),
        "{e}"
    );
    check(&opt);

    // Once stepped, the groups must list the same parameters.
    let mut w = init();
    step_all(&mut opt, &mut w, 1);
    let e = opt
        .set_param_groups(&paper_groups(), &named()[..3])
        .unwrap_err();
    assert_eq!(
        e,
        GroupError::ParamCount {
            expected: 4,
            got: 3
        }
    );
    check(&opt);
    let e = opt.set_group_hyper("head", "lr", 0.1).unwrap_err();
    assert!(e.to_string().contains("no parameter group `head`"), "{e}");

    // A base change that would push a scaled group out of range is refused whole.
    opt.set_param_groups(
        &ParamGroups::new()
            .group("vectors", select::ndim_below(2))
            .scale("beta1", 1.05),
        &named(),
    )
    .unwrap();
    assert!(opt.set_hyper("beta1", 0.99).is_err());
    assert_eq!(opt.config().beta1, 0.9);
    assert!((opt.group_config("vectors").unwrap().beta1 - 0.945).abs() < 1e-12);
}

#[test]
fn checkpoints_carry_the_group_layout() {
    let mut a = AdamWAgr::with_config(Default::default()).unwrap();
    a.set_param_groups(&paper_groups(), &named()).unwrap();
    let mut wa = init();
    for t in 1..=3 {
        step_all(&mut a, &mut wa, t);
    }
    let ckpt = a.save_checkpoint();
    let mut wb = wa.clone();
    // A fresh optimizer takes the layout from the checkpoint...
    let mut b = AdamWAgr::with_config(Default::default()).unwrap();
    b.load_checkpoint(&ckpt).unwrap();
    assert_eq!(b.group_names(), ["default", "vectors", "head"]);
    assert_eq!(b.group_name(2), "head");
    assert_eq!(b.group_config("head").unwrap().lr, 1e-4);
    // ...and continues bit-identically.
    for t in 4..=6 {
        step_all(&mut a, &mut wa, t);
        step_all(&mut b, &mut wb, t);
    }
    assert_eq!(wa, wb);

    // An optimizer with a different layout refuses it and is unchanged.
    let mut c = AdamWAgr::with_config(Default::default()).unwrap();
    let other = ParamGroups::new()
        .group("matrices", select::ndim_at_least(2))
        .set("weight_decay", 0.1);
    c.set_param_groups(&other, &named()).unwrap();
    let before = c.save_checkpoint();
    let e = c.load_checkpoint(&ckpt).unwrap_err();
    assert!(matches!(e, CheckpointError::Mismatch(_)), "{e}");
    assert!(e.to_string().contains("parameter groups"), "{e}");
    let meta = |b: &[u8]| {
        let (_, m) = safetensors::SafeTensors::read_metadata(b).unwrap();
        m.metadata().clone()
    };
    assert_eq!(meta(&c.save_checkpoint()), meta(&before));
    assert_eq!(c.group_config("matrices").unwrap().weight_decay, 0.1);
}

#[test]
fn configs_list_the_new_switch() {
    // `use_agr` is an ordinary hyperparameter of every AGR built-in.
    for name in [
        "adamw_agr",
        "adamw_agr_m",
        "adan_agr",
        "sgdm_agr",
        "lion_agr",
    ] {
        let b = agr_runtime::optim::builtin(name).unwrap();
        let opt = b.make();
        assert_eq!(
            opt.hyper("use_agr"),
            Some(agr_runtime::HyperValue::Bool(true)),
            "{name}"
        );
    }
    assert!(AdamWAgrConfig::HYPERS.iter().any(|h| h.name == "use_agr"));
}

#[test]
fn checkpoints_refuse_parameters_with_other_names() {
    let mut a = AdamWAgr::with_config(Default::default()).unwrap();
    a.set_param_names(NAMES.iter().map(|s| s.to_string()).collect())
        .unwrap();
    let mut w = init();
    step_all(&mut a, &mut w, 1);
    let ckpt = a.save_checkpoint();
    // The same shapes in another order: the moments would land on the
    // wrong tensors; the names catch it.
    let mut swapped = AdamWAgr::with_config(Default::default()).unwrap();
    let mut names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    names.swap(1, 3);
    swapped.set_param_names(names).unwrap();
    let e = swapped.load_checkpoint(&ckpt).unwrap_err();
    assert!(matches!(e, CheckpointError::Mismatch(_)), "{e}");
    assert!(
        e.to_string()
            .contains("parameter #1 is `head.bias` here and `body.bias` in the checkpoint"),
        "{e}"
    );
    assert_eq!(swapped.steps(), 0);
    // Unnamed optimizers take the names from the checkpoint.
    let mut fresh = AdamWAgr::with_config(Default::default()).unwrap();
    fresh.load_checkpoint(&ckpt).unwrap();
    assert_eq!(fresh.param_names(), NAMES);
    // A name list of the wrong length is refused once the count is known.
    assert!(fresh.set_param_names(vec!["x".into()]).is_err());
}

#[test]
fn only_an_optimizer_without_a_layout_takes_the_checkpoints_groups() {
    let mut grouped = AdamWAgr::with_config(Default::default()).unwrap();
    grouped.set_param_groups(&paper_groups(), &named()).unwrap();
    let mut plain = AdamWAgr::with_config(Default::default()).unwrap();
    plain
        .set_param_names(NAMES.iter().map(|s| s.to_string()).collect())
        .unwrap();
    let (mut wa, mut wb) = (init(), init());
    for t in 1..=2 {
        step_all(&mut grouped, &mut wa, t);
        step_all(&mut plain, &mut wb, t);
    }
    let (with_groups, without) = (grouped.save_checkpoint(), plain.save_checkpoint());
    let refuses = |opt: &mut AdamWAgr, ckpt: &[u8], what: &str| {
        let steps = opt.steps();
        let groups: Vec<String> = opt.group_names().iter().map(|s| s.to_string()).collect();
        let e = opt.load_checkpoint(ckpt).unwrap_err();
        assert!(matches!(e, CheckpointError::Mismatch(_)), "{what}: {e}");
        assert!(e.to_string().contains("parameter groups"), "{what}: {e}");
        assert_eq!(opt.steps(), steps, "{what}");
        assert_eq!(opt.group_names(), groups, "{what}");
    };

    // Never given a layout (named, as the candle and tch adapters name
    // them): takes the checkpoint's, and keeps it.
    let mut fresh = AdamWAgr::with_config(Default::default()).unwrap();
    fresh
        .set_param_names(NAMES.iter().map(|s| s.to_string()).collect())
        .unwrap();
    fresh.load_checkpoint(&with_groups).unwrap();
    assert_eq!(fresh.group_names(), ["default", "vectors", "head"]);
    assert_eq!(fresh.group_name(3), "vectors");
    refuses(&mut fresh, &without, "a taken layout against none");

    // An explicit "no groups" layout is a layout: it refuses groups...
    let mut none = AdamWAgr::with_config(Default::default()).unwrap();
    none.set_param_groups(&ParamGroups::new(), &named())
        .unwrap();
    refuses(&mut none, &with_groups, "no groups against groups");
    // ...and takes a checkpoint without any, the same layout.
    none.load_checkpoint(&without).unwrap();
    assert_eq!(none.steps(), 2);
    assert_eq!(none.group_names(), ["default"]);
    refuses(&mut none, &with_groups, "after loading");

    // Groups set explicitly refuse a checkpoint without groups.
    let mut set = AdamWAgr::with_config(Default::default()).unwrap();
    set.set_param_groups(&paper_groups(), &named()).unwrap();
    refuses(&mut set, &without, "groups against none");
    // The same layout loads, with the checkpoint's overrides.
    set.set_group_hyper("head", "lr", 0.5).unwrap();
    set.load_checkpoint(&with_groups).unwrap();
    assert_eq!(set.group_config("head").unwrap().lr, 1e-4);
}

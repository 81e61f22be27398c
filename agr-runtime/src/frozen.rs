//! The warning for parameters their gradient cannot move: Ψ of a
//! one-element tensor is `g − g·|g|/|g| = 0`, so under the AGR built-ins (as
//! in the published code) a scalar parameter (a learnable temperature, a
//! gate) never trains. That is faithful, and silent; the first step says so
//! once, through the `log` crate.

use crate::cpu::Kernel;
use crate::{HyperConfig, HyperValue, Optimizer, ParamMut};

/// At most this many parameters are listed by name.
const LISTED: usize = 20;

/// Whether, under `config`, the gradient of a one-element parameter of
/// `shape` has no effect on its first update while that of a two-element one
/// does. Found by stepping both on probes, so it holds for any spec (Ψ,
/// gradient centring, ...) and any switch (`use_agr`) or group.
fn gradient_ignored<K: Kernel>(config: &K::Config, shape: &[usize]) -> bool {
    let mut c = config.clone();
    // A learning rate of 0 (a schedule's first step) would hide the effect.
    if let Some(HyperValue::Float(lr)) = c.get("lr") {
        if lr == 0.0 {
            let _ = c.set("lr", HyperValue::Float(1e-2));
        }
    }
    let run = |shape: &[usize], g: &[f32]| -> Option<Vec<u32>> {
        let mut opt = Optimizer::<K>::with_config(c.clone()).ok()?;
        opt.frozen_checked = true;
        let mut p: Vec<f32> = (0..g.len()).map(|k| 0.5 + 0.25 * k as f32).collect();
        opt.step_params(&mut [ParamMut::new(&mut p, Some(g), shape)])
            .ok()?;
        Some(p.iter().map(|x| x.to_bits()).collect())
    };
    let moved = run(shape, &[0.5]);
    let one_ignored = moved.is_some() && moved == run(shape, &[0.0]);
    if !one_ignored {
        return false;
    }
    // The same rank, two elements along the last axis.
    let two: Vec<usize> = match shape.split_last() {
        Some((_, rest)) => rest.iter().copied().chain([2]).collect(),
        None => vec![2],
    };
    run(&two, &[0.5, -0.25]) != run(&two, &[0.0, 0.0])
}

/// Logs (once, at the optimizer's first step) the one-element parameters
/// whose gradient has no effect under their group's hyperparameters.
pub(crate) fn warn_frozen_scalars<K: Kernel, T: crate::precision::Element>(
    opt: &Optimizer<K>,
    params: &[ParamMut<'_, T>],
) {
    if !log::log_enabled!(log::Level::Warn) {
        return;
    }
    // Probed once per (group, rank).
    let mut probed: Vec<((usize, usize), bool)> = vec![];
    let mut frozen: Vec<String> = vec![];
    let mut count = 0;
    for (i, p) in params.iter().enumerate() {
        if p.value.len() != 1 {
            continue;
        }
        let group = opt.group_of(i);
        let key = (group, p.shape.len());
        let ignored = match probed.iter().find(|(k, _)| *k == key) {
            Some(&(_, v)) => v,
            None => {
                let v = gradient_ignored::<K>(&opt.groups[group].config, p.shape);
                probed.push((key, v));
                v
            }
        };
        if !ignored {
            continue;
        }
        count += 1;
        if frozen.len() < LISTED {
            frozen.push(match opt.param_names.get(i) {
                Some(name) => format!("`{name}` {:?}", p.shape),
                None => format!("#{i} {:?}", p.shape),
            });
        }
    }
    if count == 0 {
        return;
    }
    let more = if count > frozen.len() {
        format!(" and {} more", count - frozen.len())
    } else {
        String::new()
    };
    let (s, them) = if count == 1 {
        ("", "it")
    } else {
        ("s", "them")
    };
    let (why, fix) = if opt.desc.spec.contains("agr(") {
        (
            "Ψ of a one-element tensor is 0, as in the AGR authors' code",
            format!(" To train {them}, step {them} without Ψ: `ParamGroups::paper()` (parameters of fewer than 2 dimensions without Ψ or weight decay, as the paper ran) or a group with `use_agr = false`."),
        )
    } else {
        (
            "the step removes a one-element tensor's gradient",
            String::new(),
        )
    };
    log::warn!(
        "{}: the gradient of {count} one-element parameter{s} never moves {them} ({why}): {}{more}.{fix}",
        opt.desc.name,
        frozen.join(", "),
    );
}

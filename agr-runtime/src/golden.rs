//! Replays reference trajectories (format `agr-golden/1`) through a built-in
//! optimizer and reports the worst deviation.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::optim;
use crate::{DynOptimizer, HyperValue, ParamMut, Precision, Storage};

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub format: String,
    pub optimizer: String,
    #[serde(default)]
    pub reference: String,
    #[serde(default)]
    pub note: String,
    pub hyper: serde_json::Map<String, serde_json::Value>,
    pub params: Vec<GoldenParam>,
    pub steps: Vec<GoldenStep>,
    pub tolerance: Tolerance,
    /// Optional: the precision the reference stepped in (absent: f32).
    #[serde(default)]
    pub precision: Option<GoldenPrecision>,
}

/// How a reference stored its parameters and states (see
/// [`crate::precision`]). Parameter values and gradients in the file are
/// exactly representable in `params`.
#[derive(Debug, Deserialize)]
pub struct GoldenPrecision {
    /// `f32`, `bf16` or `f16`.
    #[serde(default = "f32_name")]
    pub params: String,
    /// An f32 master copy of bf16/f16 parameters.
    #[serde(default)]
    pub master: bool,
    /// State storage by name (`f32`, `bf16`, `f16`, `q8`, `uq8`).
    #[serde(default)]
    pub states: std::collections::BTreeMap<String, String>,
}

fn f32_name() -> String {
    "f32".into()
}

impl GoldenPrecision {
    /// The parameters' storage and the optimizer precision it names.
    pub fn parse(&self) -> Result<(Storage, Precision), String> {
        let params = Storage::parse(&self.params)
            .filter(|s| s.for_params())
            .ok_or_else(|| format!("precision.params `{}`: not f32, bf16 or f16", self.params))?;
        let mut p = Precision::f32().with_master(self.master);
        for (name, kind) in &self.states {
            let kind = Storage::parse(kind)
                .ok_or_else(|| format!("precision.states.{name} `{kind}`: unknown storage"))?;
            p = p.state(name, kind);
        }
        Ok((params, p))
    }
}

#[derive(Debug, Deserialize)]
pub struct GoldenParam {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct GoldenStep {
    pub grads: Vec<Vec<f32>>,
    pub params: Vec<Vec<f32>>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

/// The outcome of replaying one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    pub optimizer: String,
    pub steps: usize,
    /// Largest |ours - reference| over every step, tensor and element.
    pub worst_abs: f64,
    /// Where it occurred: (step, 1-based; tensor name; flat index).
    pub worst_at: (usize, String, usize),
    /// Largest |ours - reference| / (atol + rtol·|reference|): ≤ 1 passes.
    pub worst_ratio: f64,
    /// Largest |ours - reference| per tensor, in the file's order.
    pub worst_abs_per_tensor: Vec<f64>,
    pub pass: bool,
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.worst_abs == 0.0 {
            "(bit-exact)".to_string()
        } else {
            format!(
                "at step {} {}[{}]",
                self.worst_at.0, self.worst_at.1, self.worst_at.2
            )
        };
        write!(
            f,
            "{:<12} steps={:<3} worst_abs={:.3e} {at:<22} tol_ratio={:.3} {}",
            self.optimizer,
            self.steps,
            self.worst_abs,
            self.worst_ratio,
            if self.pass { "PASS" } else { "FAIL" }
        )
    }
}

/// Reads a golden file; the error says which file and what is wrong.
pub fn load(path: &Path) -> Result<Golden, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let g: Golden = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not an agr-golden/1 file: {e}", path.display()))?;
    if g.format != "agr-golden/1" {
        return Err(format!(
            "{}: format is `{}`, expected `agr-golden/1`",
            path.display(),
            g.format
        ));
    }
    Ok(g)
}

/// Runs the golden trajectory through the built-in it names.
pub fn replay(g: &Golden) -> Result<Replay, String> {
    let builtin = optim::builtin_or_err(&g.optimizer)?;
    replay_with(g, builtin.make())
}

/// Runs the golden trajectory through `opt` (a spec of the user's, say,
/// compiled with [`crate::compile`]), with the file's hyperparameters.
pub fn replay_with(g: &Golden, mut opt: Box<dyn DynOptimizer>) -> Result<Replay, String> {
    replay_observed(g, opt.as_mut(), &mut |_, _| {})
}

/// [`replay_with`] on an optimizer the caller keeps, handing `observe` the
/// parameters after each step (1-based), in the file's order.
pub fn replay_observed(
    g: &Golden,
    opt: &mut dyn DynOptimizer,
    observe: &mut dyn FnMut(usize, &[Vec<f32>]),
) -> Result<Replay, String> {
    for (name, v) in &g.hyper {
        let value = match v {
            serde_json::Value::Bool(b) => HyperValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) if !n.is_f64() => HyperValue::Int(i),
                _ => HyperValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            other => {
                return Err(format!(
                    "hyperparameter `{name}`: unsupported value {other}"
                ))
            }
        };
        opt.set_hyper(name, value).map_err(|e| e.to_string())?;
    }
    let params_kind = match &g.precision {
        None => Storage::F32,
        Some(p) => {
            let (kind, precision) = p.parse()?;
            opt.set_precision(precision).map_err(|e| e.to_string())?;
            kind
        }
    };
    let mut values: Vec<Vec<f32>> = g.params.iter().map(|p| p.init.clone()).collect();
    let mut worst = Replay {
        optimizer: g.optimizer.clone(),
        steps: g.steps.len(),
        worst_abs: 0.0,
        worst_at: (0, String::new(), 0),
        worst_ratio: 0.0,
        worst_abs_per_tensor: vec![0.0; g.params.len()],
        pass: true,
    };
    for (k, step) in g.steps.iter().enumerate() {
        if step.grads.len() != values.len() || step.params.len() != values.len() {
            return Err(format!("step {}: expected {} tensors", k + 1, values.len()));
        }
        step_as(opt, params_kind, &mut values, &g.params, &step.grads)
            .map_err(|e| format!("step {}: {e}", k + 1))?;
        observe(k + 1, &values);
        for (ti, (ours, reference)) in values.iter().zip(&step.params).enumerate() {
            if ours.len() != reference.len() {
                return Err(format!(
                    "step {}: tensor {} has {} values, reference {}",
                    k + 1,
                    ti,
                    ours.len(),
                    reference.len()
                ));
            }
            for (i, (&x, &r)) in ours.iter().zip(reference).enumerate() {
                let (x, r) = (f64::from(x), f64::from(r));
                let err = (x - r).abs();
                let tensor_worst = &mut worst.worst_abs_per_tensor[ti];
                *tensor_worst = if err.is_nan() {
                    f64::INFINITY
                } else {
                    tensor_worst.max(err)
                };
                let ratio = if err.is_nan() {
                    f64::INFINITY
                } else {
                    err / (g.tolerance.atol + g.tolerance.rtol * r.abs())
                };
                if ratio > worst.worst_ratio || err > worst.worst_abs {
                    if err >= worst.worst_abs {
                        worst.worst_abs = err;
                        worst.worst_at = (k + 1, g.params[ti].name.clone(), i);
                    }
                    worst.worst_ratio = worst.worst_ratio.max(ratio);
                }
            }
        }
    }
    worst.pass = worst.worst_ratio <= 1.0;
    Ok(worst)
}

/// One step of `opt` over `values` stored as `kind` (bf16/f16 values are
/// narrowed, stepped and widened back: exact, as they are representable).
fn step_as(
    opt: &mut dyn DynOptimizer,
    kind: Storage,
    values: &mut [Vec<f32>],
    params: &[GoldenParam],
    grads: &[Vec<f32>],
) -> Result<(), crate::StepError> {
    use half::{bf16, f16};
    /// Narrows the values and gradients to `T`, steps, widens back.
    fn via<T: crate::Element>(
        values: &mut [Vec<f32>],
        params: &[GoldenParam],
        grads: &[Vec<f32>],
        narrow: fn(f32) -> T,
        widen: fn(T) -> f32,
        step: impl FnOnce(&mut [ParamMut<'_, T>]) -> Result<crate::StepReport, crate::StepError>,
    ) -> Result<(), crate::StepError> {
        let to_t = |v: &[Vec<f32>]| -> Vec<Vec<T>> {
            v.iter()
                .map(|x| x.iter().map(|&y| narrow(y)).collect())
                .collect()
        };
        let (mut vs, gs) = (to_t(values), to_t(grads));
        let mut ps: Vec<ParamMut<'_, T>> = vs
            .iter_mut()
            .zip(params)
            .zip(&gs)
            .map(|((v, p), gr)| ParamMut::new(v, Some(gr), &p.shape))
            .collect();
        step(&mut ps)?;
        for (out, v) in values.iter_mut().zip(&vs) {
            out.iter_mut().zip(v).for_each(|(o, &x)| *o = widen(x));
        }
        Ok(())
    }
    match kind {
        Storage::Bf16 => via(values, params, grads, bf16::from_f32, bf16::to_f32, |ps| {
            opt.step_params_bf16(ps)
        })?,
        Storage::F16 => via(values, params, grads, f16::from_f32, f16::to_f32, |ps| {
            opt.step_params_f16(ps)
        })?,
        _ => {
            let mut ps: Vec<ParamMut<'_>> = values
                .iter_mut()
                .zip(params)
                .zip(grads)
                .map(|((v, p), gr)| ParamMut::new(v, Some(gr), &p.shape))
                .collect();
            opt.step_params(&mut ps)?;
        }
    }
    Ok(())
}

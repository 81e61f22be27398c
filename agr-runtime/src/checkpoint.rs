//! Checkpoints: an optimizer's whole state — every state buffer, the step
//! counts, the hyperparameters, the parameter groups (names, overrides and
//! which parameter is in which) — as a safetensors file. Loading checks
//! everything before changing anything: a truncated or corrupt file, another
//! optimizer's checkpoint, or one whose shapes disagree with the parameters
//! this optimizer already steps is an error, and the optimizer is unchanged.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::buf::{AlignedBuf, StateBuf};
use crate::cpu::Kernel;
use crate::device::Store;
use crate::groups::{self, Group, Override, DEFAULT_GROUP};
use crate::optimizer::TensorState;
use crate::precision::Storage;
use crate::{HyperConfig, HyperValue, Optimizer};

/// The format tag stored in every checkpoint.
pub const FORMAT: &str = "agr-checkpoint/1";

/// Why a checkpoint could not be loaded. The optimizer is unchanged.
#[derive(Debug)]
pub enum CheckpointError {
    Io(String),
    /// Not a readable safetensors file, or a field is missing or malformed.
    Corrupt(String),
    /// The checkpoint was saved by another optimizer.
    WrongOptimizer {
        expected: String,
        found: String,
    },
    /// Same optimizer name, different spec.
    SpecChanged {
        optimizer: String,
    },
    /// The checkpoint's tensors disagree with the parameters already stepped.
    Mismatch(String),
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Io(e) => write!(f, "cannot read or write the checkpoint: {e}"),
            CheckpointError::Corrupt(e) => write!(f, "the checkpoint is corrupt or truncated: {e}"),
            CheckpointError::WrongOptimizer { expected, found } => write!(
                f,
                "this checkpoint was saved by {found}, not {expected}; load it into a {found} optimizer"
            ),
            CheckpointError::SpecChanged { optimizer } => write!(
                f,
                "this checkpoint was saved by a different spec of {optimizer}; resume with the spec it was saved with"
            ),
            CheckpointError::Mismatch(e) => write!(f, "the checkpoint does not fit this optimizer's parameters: {e}"),
        }
    }
}

impl std::error::Error for CheckpointError {}

fn corrupt(e: impl fmt::Display) -> CheckpointError {
    CheckpointError::Corrupt(e.to_string())
}

/// FNV-1a of the spec text: identifies the spec a checkpoint was saved with.
fn spec_hash(spec: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in spec.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn hyper_json(v: HyperValue) -> serde_json::Value {
    match v {
        HyperValue::Float(x) => serde_json::json!(x),
        HyperValue::Int(x) => serde_json::json!(x),
        HyperValue::Bool(x) => serde_json::json!(x),
    }
}

fn hyper_value(name: &str, v: &serde_json::Value) -> Result<HyperValue, CheckpointError> {
    Ok(match v {
        serde_json::Value::Bool(b) => HyperValue::Bool(*b),
        serde_json::Value::Number(n) if n.is_i64() => HyperValue::Int(n.as_i64().unwrap()),
        serde_json::Value::Number(n) => HyperValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        other => return Err(corrupt(format!("hyperparameter `{name}` = {other}"))),
    })
}

/// The groups beyond `default`, as stored: `[{"name", "overrides": [{"hyper", "set" | "scale"}]}]`.
fn groups_json<C>(groups: &[Group<C>]) -> serde_json::Value {
    serde_json::Value::Array(
        groups[1..]
            .iter()
            .map(|g| {
                let overrides: Vec<serde_json::Value> = g
                    .overrides
                    .iter()
                    .map(|(name, o)| match o {
                        Override::Set(v) => {
                            serde_json::json!({"hyper": name, "set": hyper_json(*v)})
                        }
                        Override::Scale(s) => serde_json::json!({"hyper": name, "scale": s}),
                    })
                    .collect();
                serde_json::json!({"name": g.name, "overrides": overrides})
            })
            .collect(),
    )
}

type StoredGroups = Vec<(String, Vec<(String, Override)>)>;

fn parse_groups(text: &str) -> Result<StoredGroups, CheckpointError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(corrupt)?;
    let bad = || corrupt(format!("malformed `groups` field: {text}"));
    let mut out = vec![];
    for g in v.as_array().ok_or_else(bad)? {
        let name = g["name"].as_str().ok_or_else(bad)?.to_string();
        let mut overrides = vec![];
        for o in g["overrides"].as_array().ok_or_else(bad)? {
            let hyper = o["hyper"].as_str().ok_or_else(bad)?.to_string();
            let ov = if let Some(s) = o.get("scale") {
                Override::Scale(s.as_f64().ok_or_else(bad)?)
            } else {
                Override::Set(hyper_value(&hyper, o.get("set").ok_or_else(bad)?)?)
            };
            overrides.push((hyper, ov));
        }
        out.push((name, overrides));
    }
    Ok(out)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl<K: Kernel> Optimizer<K> {
    /// The whole optimizer state as safetensors bytes.
    ///
    /// A sharded optimizer gathers every rank's part first: call it on
    /// every rank (each gets the whole checkpoint; save it from one).
    ///
    /// # Panics
    /// Only for a sharded optimizer whose ranks cannot exchange (an MPI
    /// peer that died ends the job before that).
    pub fn save_checkpoint(&self) -> Vec<u8> {
        let gathered = self
            .gather_shards()
            .unwrap_or_else(|e| panic!("gathering the sharded state for a checkpoint: {e}"));
        let tensors = gathered.as_deref().unwrap_or(&self.tensors);
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("optimizer".to_string(), self.desc.name.to_string());
        meta.insert("spec_hash".to_string(), spec_hash(self.desc.spec));
        // The step counts net of a CUDA device's skips (read back once).
        let (steps, tensor_steps) = self.step_counts();
        meta.insert("steps".to_string(), steps.to_string());
        meta.insert(
            "n_params".to_string(),
            self.n_params.map_or("none".into(), |n| n.to_string()),
        );
        let mut hypers = serde_json::Map::new();
        for h in self.desc.hypers {
            if let Some(v) = self.config.get(h.name) {
                hypers.insert(h.name.to_string(), hyper_json(v));
            }
        }
        meta.insert("groups".to_string(), groups_json(&self.groups).to_string());
        meta.insert(
            "group_of".to_string(),
            serde_json::json!(self.group_of).to_string(),
        );
        meta.insert(
            "param_names".to_string(),
            serde_json::json!(self.param_names).to_string(),
        );
        meta.insert(
            "hypers".to_string(),
            serde_json::Value::Object(hypers).to_string(),
        );
        // A tensor whose every step a CUDA device skipped holds its initial
        // state: saved as none, as the CPU (which undoes it) would.
        let live = |i: usize| tensor_steps[i].is_some();
        meta.insert(
            "tensor_steps".to_string(),
            serde_json::json!(tensor_steps).to_string(),
        );
        // The shapes in their own field: a spec without state stores no
        // tensors to take them from.
        let shapes: Vec<Option<&[usize]>> = (0..tensors.len())
            .map(|i| {
                live(i)
                    .then(|| tensors[i].as_ref().map(|t| t.shape.as_slice()))
                    .flatten()
            })
            .collect();
        meta.insert(
            "tensor_shapes".to_string(),
            serde_json::json!(shapes).to_string(),
        );
        let mut data: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = vec![];
        for (i, t) in tensors.iter().enumerate() {
            if let Some(t) = t.as_ref().filter(|_| live(i)) {
                for (k, s) in self.desc.states.iter().enumerate() {
                    let name = format!("{i}.{}", s.name);
                    let shape = s.shape(&t.shape);
                    // A narrowed state is saved as it is stored: bf16/f16
                    // words, or q8 codes and their blocks' scales.
                    match t.store.host_buf(k) {
                        Some(StateBuf::Half { kind, words }) => {
                            let dtype = match kind {
                                Storage::Bf16 => Dtype::BF16,
                                _ => Dtype::F16,
                            };
                            let bytes = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                            data.push((name, dtype, bytes, shape));
                        }
                        Some(StateBuf::Q8 {
                            kind,
                            codes,
                            scales,
                        }) => {
                            data.push((
                                format!("{name}:{kind}scales"),
                                Dtype::F32,
                                f32_bytes(scales),
                                vec![scales.len()],
                            ));
                            data.push((name, Dtype::U8, codes.clone(), shape));
                        }
                        _ => data.push((name, Dtype::F32, f32_bytes(&t.store.to_host(k)), shape)),
                    }
                }
                if let Some(m) = t.store.master_to_host() {
                    data.push((
                        format!("{i}:master"),
                        Dtype::F32,
                        f32_bytes(&m),
                        t.shape.clone(),
                    ));
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, d, b, s)| {
                (
                    n.clone(),
                    TensorView::new(*d, s.clone(), b).expect("sizes match"),
                )
            })
            .collect();
        safetensors::serialize(views, Some(meta)).expect("a checkpoint always serialises")
    }

    /// Writes [`Optimizer::save_checkpoint`] to `path` (through a temporary
    /// file, so an interrupted save never leaves a truncated checkpoint).
    pub fn save_checkpoint_to(&self, path: impl AsRef<Path>) -> Result<(), CheckpointError> {
        let path = path.as_ref();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.save_checkpoint())
            .map_err(|e| CheckpointError::Io(format!("{}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| CheckpointError::Io(format!("{}: {e}", path.display())))
    }

    /// Reads a checkpoint file; see [`Optimizer::load_checkpoint`].
    pub fn load_checkpoint_from(&mut self, path: impl AsRef<Path>) -> Result<(), CheckpointError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| CheckpointError::Io(format!("{}: {e}", path.display())))?;
        self.load_checkpoint(&bytes)
    }

    /// Restores the state saved by [`Optimizer::save_checkpoint`]. Resuming
    /// gives bit-identical parameters to an uninterrupted run. On error the
    /// optimizer is unchanged.
    pub fn load_checkpoint(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
        let st = SafeTensors::deserialize(bytes).map_err(corrupt)?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| corrupt("no metadata"))?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| corrupt(format!("no `{k}` field")))
        };
        if get("format")? != FORMAT {
            return Err(corrupt(format!(
                "format `{}` is not {FORMAT}",
                get("format")?
            )));
        }
        let found = get("optimizer")?;
        if found != self.desc.name {
            return Err(CheckpointError::WrongOptimizer {
                expected: self.desc.name.into(),
                found: found.clone(),
            });
        }
        if get("spec_hash")? != &spec_hash(self.desc.spec) {
            return Err(CheckpointError::SpecChanged {
                optimizer: self.desc.name.into(),
            });
        }
        let steps: u64 = get("steps")?.parse().map_err(corrupt)?;
        let n_params: Option<usize> = match get("n_params")?.as_str() {
            "none" => None,
            n => Some(n.parse().map_err(corrupt)?),
        };
        let tensor_steps: Vec<Option<u64>> =
            serde_json::from_str(get("tensor_steps")?).map_err(corrupt)?;
        // Absent in checkpoints saved before shapes had a field of their
        // own: then the state tensors' shapes are the parameters'.
        let tensor_shapes: Option<Vec<Option<Vec<usize>>>> = match meta.get("tensor_shapes") {
            Some(text) => Some(serde_json::from_str(text).map_err(corrupt)?),
            None if self.desc.states.is_empty() && tensor_steps.iter().any(|t| t.is_some()) => {
                return Err(corrupt(
                    "no `tensor_shapes` field, and this spec has no state tensors to take the parameters' shapes from (a checkpoint saved by an older agr); start the run afresh",
                ))
            }
            None => None,
        };
        if let Some(shapes) = &tensor_shapes {
            if shapes.len() != tensor_steps.len() {
                return Err(corrupt(
                    "`tensor_shapes` and `tensor_steps` list different numbers of parameters",
                ));
            }
            for (i, (shape, t)) in shapes.iter().zip(&tensor_steps).enumerate() {
                match (shape, t) {
                    (Some(shape), Some(_)) => {
                        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                        if !matches!(numel, Some(n) if n > 0) {
                            return Err(corrupt(format!(
                                "parameter #{i} has shape {shape:?} in `tensor_shapes`"
                            )));
                        }
                    }
                    (None, None) => {}
                    _ => {
                        return Err(corrupt(format!(
                            "`tensor_shapes` and `tensor_steps` disagree on whether parameter #{i} has state"
                        )))
                    }
                }
            }
        }
        let hypers: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(get("hypers")?).map_err(corrupt)?;
        let mut config = self.config.clone();
        for (name, v) in &hypers {
            config
                .set(name, hyper_value(name, v)?)
                .map_err(|e| corrupt(e.to_string()))?;
        }
        // Parameter groups (absent: every parameter in `default`).
        let stored = match meta.get("groups") {
            Some(text) => parse_groups(text)?,
            None => vec![],
        };
        let group_of: Vec<usize> = match meta.get("group_of") {
            Some(text) => serde_json::from_str(text).map_err(corrupt)?,
            None => vec![],
        };
        if group_of.iter().any(|&k| k > stored.len()) {
            return Err(corrupt("`group_of` names a group that is not stored"));
        }
        if !group_of.is_empty() && Some(group_of.len()) != n_params {
            return Err(corrupt("`group_of` does not list every parameter"));
        }
        let mut new_groups = vec![Group {
            name: DEFAULT_GROUP.to_string(),
            overrides: vec![],
            config: config.clone(),
        }];
        for (name, overrides) in stored {
            let c = groups::apply(&config, &overrides)
                .map_err(|e| corrupt(format!("parameter group `{name}`: {e}")))?;
            new_groups.push(Group {
                name,
                overrides,
                config: c,
            });
        }
        let param_names: Vec<String> = match meta.get("param_names") {
            Some(text) => serde_json::from_str(text).map_err(corrupt)?,
            None => vec![],
        };
        if !param_names.is_empty() && Some(param_names.len()) != n_params {
            return Err(corrupt("`param_names` does not list every parameter"));
        }
        if let (Some(mine), Some(theirs)) = (self.n_params, n_params) {
            if mine != theirs {
                return Err(CheckpointError::Mismatch(format!(
                    "it holds {theirs} parameters, this optimizer steps {mine}"
                )));
            }
        }
        if !self.param_names.is_empty() && !param_names.is_empty() {
            if let Some(i) =
                (0..param_names.len()).find(|&i| self.param_names.get(i) != Some(&param_names[i]))
            {
                return Err(CheckpointError::Mismatch(format!(
                    "parameter #{i} is `{}` here and `{}` in the checkpoint; step the same parameters, in the same order",
                    self.param_names.get(i).map_or("(none)", |s| s.as_str()),
                    param_names[i]
                )));
            }
        }
        // An optimizer whose layout was never set (`set_param_groups`, or a
        // checkpoint that had one) takes the checkpoint's; one with a layout
        // of its own, if only "everything in `default`", must match it.
        let layout_set = self.groups.len() > 1 || !self.group_of.is_empty();
        if layout_set {
            let names =
                |g: &[Group<K::Config>]| g.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
            // No `group_of`: every parameter is in `default`.
            let layout = |of: &[usize], n: Option<usize>| {
                if of.is_empty() {
                    vec![0; n.unwrap_or(0)]
                } else {
                    of.to_vec()
                }
            };
            if names(&self.groups) != names(&new_groups)
                || layout(&self.group_of, self.n_params) != layout(&group_of, n_params)
            {
                return Err(CheckpointError::Mismatch(format!(
                    "its parameter groups {:?} (parameter to group: {:?}) differ from the groups {:?} ({:?}) set on this optimizer; set the layout the checkpoint was saved with, or none",
                    names(&new_groups),
                    layout(&group_of, n_params),
                    names(&self.groups),
                    layout(&self.group_of, self.n_params)
                )));
            }
        }
        let mut tensors: Vec<Option<TensorState>> = Vec::with_capacity(tensor_steps.len());
        for (i, t) in tensor_steps.iter().enumerate() {
            let Some(t) = *t else {
                tensors.push(None);
                continue;
            };
            let mut shape: Option<Vec<usize>> = tensor_shapes.as_ref().and_then(|s| s[i].clone());
            let mut bufs = vec![];
            for (k, s) in self.desc.states.iter().enumerate() {
                let name = format!("{i}.{}", s.name);
                let view = st
                    .tensor(&name)
                    .map_err(|e| corrupt(format!("`{name}`: {e}")))?;
                if ![Dtype::F32, Dtype::BF16, Dtype::F16, Dtype::U8].contains(&view.dtype()) {
                    return Err(corrupt(format!(
                        "`{name}` is {:?}, not F32, BF16, F16 or U8",
                        view.dtype()
                    )));
                }
                match &shape {
                    None if s.reduced.is_none() => shape = Some(view.shape().to_vec()),
                    None => {
                        return Err(corrupt(format!(
                            "no shape for parameter #{i}, whose state `{}` is reduced",
                            s.name
                        )))
                    }
                    Some(sh) if s.shape(sh) != view.shape() => {
                        return Err(corrupt(match s.reduced {
                            None => format!(
                                "`{name}` has shape {:?}, not its parameter's {sh:?}",
                                view.shape()
                            ),
                            Some(a) => format!(
                                "`{name}` has shape {:?}, not {:?} (its parameter's {sh:?} reduced over dimension {})",
                                view.shape(),
                                s.shape(sh),
                                a.dim()
                            ),
                        }))
                    }
                    _ => {}
                }
                let kind = self.storage[k];
                bufs.push(state_buf(
                    &st,
                    &name,
                    &view,
                    kind,
                    i * self.desc.states.len() + k,
                )?);
            }
            let Some(shape) = shape else {
                return Err(corrupt(format!("no shape for parameter #{i}")));
            };
            if let Some(Some(mine)) = self.tensors.get(i) {
                if mine.shape != shape {
                    return Err(CheckpointError::Mismatch(format!(
                        "parameter #{i} has shape {:?} here and {shape:?} in the checkpoint",
                        mine.shape
                    )));
                }
            }
            let rows = vec![0.0; crate::Dims::of(&shape, self.desc).results];
            // An f32 master copy of a bf16/f16 parameter, if it was saved
            // and this optimizer keeps one (else the next step takes it
            // from the parameter).
            let master = match st.tensor(&format!("{i}:master")) {
                Ok(view) if self.precision.master => {
                    let numel: usize = shape.iter().product();
                    if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                        return Err(corrupt(format!(
                            "`{i}:master` is {:?} {:?}, not F32 {shape:?}",
                            view.dtype(),
                            view.shape()
                        )));
                    }
                    let mut b = AlignedBuf::filled(numel, 0.0, i);
                    for (x, c) in b.as_mut_slice().iter_mut().zip(view.data().chunks_exact(4)) {
                        *x = f32::from_le_bytes(c.try_into().unwrap());
                    }
                    Some(b)
                }
                _ => None,
            };
            tensors.push(Some(TensorState {
                shape,
                t,
                store: Store::Host { bufs, rows, master },
            }));
        }
        // Sharded: this rank's parts.
        let tensors = self.to_shards(tensors);
        // Into the memory of the optimizer's device (a GPU: copied there).
        let tensors = self
            .state_on_this_device(tensors)
            .map_err(|e| CheckpointError::Io(e.to_string()))?;
        // Everything checked: commit.
        self.config = config;
        self.groups = new_groups;
        if !layout_set || !group_of.is_empty() {
            self.group_of = group_of;
        }
        if !param_names.is_empty() {
            self.param_names = param_names;
        }
        self.install_state(tensors, n_params, steps);
        Ok(())
    }
}

/// A saved state in this optimizer's storage `kind`: as saved where the
/// storage is the same (bf16/f16 words, q8 codes and scales), else through
/// f32 (exact to f32 and to a wider storage; narrower rounds to nearest).
fn state_buf(
    st: &SafeTensors<'_>,
    name: &str,
    view: &TensorView<'_>,
    kind: Storage,
    stagger: usize,
) -> Result<StateBuf, CheckpointError> {
    let n: usize = view.shape().iter().product();
    let data = view.data();
    let vals: Vec<f32> = match view.dtype() {
        Dtype::BF16 | Dtype::F16 => {
            let saved = if view.dtype() == Dtype::BF16 {
                Storage::Bf16
            } else {
                Storage::F16
            };
            let words: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take(n)
                .collect();
            if saved == kind {
                return Ok(StateBuf::Half { kind, words });
            }
            let mut v = vec![0.0; n];
            crate::precision::widen(saved, &words, &mut v);
            v
        }
        Dtype::U8 => {
            let (saved, scales) = [Storage::Q8, Storage::Uq8]
                .into_iter()
                .find_map(|q| st.tensor(&format!("{name}:{q}scales")).ok().map(|s| (q, s)))
                .ok_or_else(|| {
                    corrupt(format!(
                        "`{name}` holds 8-bit codes but no `{name}:q8scales` or `{name}:uq8scales`"
                    ))
                })?;
            let blocks = n.div_ceil(crate::precision::Q8_BLOCK);
            if scales.dtype() != Dtype::F32 || scales.shape() != [blocks] {
                return Err(corrupt(format!(
                    "`{name}:{saved}scales` is {:?} {:?}, not F32 [{blocks}]",
                    scales.dtype(),
                    scales.shape()
                )));
            }
            let scales: Vec<f32> = scales
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let codes = data[..n].to_vec();
            let buf = StateBuf::Q8 {
                kind: saved,
                codes,
                scales,
            };
            if saved == kind {
                return Ok(buf);
            }
            buf.to_f32().into_owned()
        }
        _ => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .take(n)
            .collect(),
    };
    Ok(StateBuf::from_f32(kind, &vals, stagger))
}

//! Parameter groups: per-group hyperparameter overrides, chosen by
//! predicates on each parameter's name and shape.
//!
//! As in PyTorch's `param_groups` and optax's `multi_transform`, parameters
//! can differ in hyperparameters. The AGR paper, for instance, regularises
//! only weight matrices and convolution kernels; biases and norm scales are
//! usually trained without weight decay:
//!
//! ```
//! use agr_runtime::groups::{select, ParamGroups};
//! use agr_runtime::optim::AdamWAgr;
//!
//! let groups = ParamGroups::new()
//!     .group("vectors", select::ndim_below(2))
//!     .set("weight_decay", 0.0)
//!     .set("use_agr", false)
//!     .group("head", select::name_starts_with("head."))
//!     .scale("lr", 0.1);
//! let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
//! let params: [(&str, &[usize]); 3] = [("body.w", &[64, 32]), ("body.b", &[64]), ("head.w", &[10, 64])];
//! opt.set_param_groups(&groups, &params).unwrap();
//! assert_eq!(opt.group_name(1), "vectors");
//! assert_eq!(opt.group_name(2), "head");
//! ```
//!
//! Each parameter joins the first group whose predicate holds; a parameter no
//! predicate selects stays in the group `default`, which uses the optimizer's
//! own hyperparameters. A group's hyperparameters are the optimizer's with
//! the group's overrides applied, so `set_lr` (and a schedule
//! driving it) moves every group that does not set `lr` itself, and a group
//! that scales `lr` follows it at its own ratio.
//!
//! Reductions over every parameter (`global_norm`, …) still cover all groups,
//! as the published Adan code clips over all of them.

use std::fmt;
use std::sync::Arc;

use crate::{ConfigError, HyperConfig, HyperValue};

/// What the predicates see of a parameter.
#[derive(Clone, Copy, Debug)]
pub struct ParamInfo<'a> {
    /// Position in the list of parameters the optimizer steps.
    pub index: usize,
    pub name: &'a str,
    pub shape: &'a [usize],
}

impl ParamInfo<'_> {
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
}

/// A predicate choosing a group's parameters.
pub type Selector = Arc<dyn Fn(&ParamInfo<'_>) -> bool + Send + Sync>;

/// How a group changes one hyperparameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Override {
    /// Replace the value.
    Set(HyperValue),
    /// Multiply the optimizer's value (numbers only).
    Scale(f64),
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Override::Set(v) => write!(f, "= {v}"),
            Override::Scale(s) => write!(f, "× {s}"),
        }
    }
}

/// One group as declared: a name, a predicate, overrides.
#[derive(Clone)]
pub struct GroupSpec {
    pub name: String,
    select: Selector,
    pub overrides: Vec<(String, Override)>,
    /// Overrides dropped for an optimizer without this hyperparameter.
    optional: Vec<String>,
}

impl GroupSpec {
    /// The overrides that apply to an optimizer whose hyperparameters
    /// `known` accepts (optional overrides of others are dropped).
    pub(crate) fn overrides_for(&self, known: impl Fn(&str) -> bool) -> Vec<(String, Override)> {
        self.overrides
            .iter()
            .filter(|(n, _)| known(n) || !self.optional.contains(n))
            .cloned()
            .collect()
    }
}

impl fmt::Debug for GroupSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupSpec")
            .field("name", &self.name)
            .field("overrides", &self.overrides)
            .finish()
    }
}

/// A list of groups, built with [`ParamGroups::group`] followed by the
/// group's [`set`](ParamGroups::set) and [`scale`](ParamGroups::scale) calls.
#[derive(Clone, Debug, Default)]
pub struct ParamGroups {
    specs: Vec<GroupSpec>,
    misuse: Option<String>,
}

impl ParamGroups {
    pub fn new() -> Self {
        Self::default()
    }

    /// The AGR paper's layout: parameters of fewer than two dimensions
    /// (biases, norm scales, scalars) form the group `vectors`, trained
    /// without weight decay and without Ψ (`weight_decay = 0`,
    /// `use_agr = false`, each where the optimizer has that
    /// hyperparameter); weight matrices and kernels stay in `default`.
    /// Without it, the AGR built-ins apply Ψ to every parameter, as the
    /// authors' code does, and Ψ of a one-element tensor is 0: a scalar
    /// parameter never trains.
    ///
    /// ```
    /// use agr_runtime::groups::ParamGroups;
    /// use agr_runtime::optim::{AdamW, AdamWAgr};
    ///
    /// let params: [(&str, &[usize]); 3] = [("w", &[64, 32]), ("b", &[64]), ("temperature", &[])];
    /// let mut opt = AdamWAgr::with_config(Default::default()).unwrap();
    /// opt.set_param_groups(&ParamGroups::paper(), &params).unwrap();
    /// assert_eq!(opt.group_name(2), "vectors");
    /// assert_eq!(opt.group_config("vectors").unwrap().use_agr, false);
    /// // AdamW has no `use_agr`: only the weight decay is set.
    /// let mut plain = AdamW::with_config(Default::default()).unwrap();
    /// plain.set_param_groups(&ParamGroups::paper(), &params).unwrap();
    /// assert_eq!(plain.group_config("vectors").unwrap().weight_decay, 0.0);
    /// ```
    pub fn paper() -> Self {
        ParamGroups::new()
            .group("vectors", select::ndim_below(2))
            .set_if_known("weight_decay", 0.0)
            .set_if_known("use_agr", false)
    }

    /// Starts a group of the parameters `select` picks (those no earlier
    /// group took).
    pub fn group(
        mut self,
        name: &str,
        select: impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        if name == DEFAULT_GROUP || self.specs.iter().any(|s| s.name == name) {
            self.misuse.get_or_insert(format!(
                "the group name `{name}` is used twice (`{DEFAULT_GROUP}` is the group of unselected parameters)"
            ));
        }
        self.specs.push(GroupSpec {
            name: name.to_string(),
            select: Arc::new(select),
            overrides: vec![],
            optional: vec![],
        });
        self
    }

    /// In the group last started: hyperparameter `name` takes `value`.
    pub fn set(self, name: &str, value: impl Into<HyperValue>) -> Self {
        self.with_override(name, Override::Set(value.into()))
    }

    /// In the group last started: hyperparameter `name` takes `value` if the
    /// optimizer has a hyperparameter `name`; otherwise nothing (so one set of
    /// groups fits several optimizers).
    pub fn set_if_known(mut self, name: &str, value: impl Into<HyperValue>) -> Self {
        self = self.with_override(name, Override::Set(value.into()));
        if let Some(spec) = self.specs.last_mut() {
            spec.optional.push(name.to_string());
        }
        self
    }

    /// In the group last started: hyperparameter `name` is the optimizer's
    /// value times `factor`.
    pub fn scale(self, name: &str, factor: f64) -> Self {
        self.with_override(name, Override::Scale(factor))
    }

    fn with_override(mut self, name: &str, o: Override) -> Self {
        match self.specs.last_mut() {
            Some(spec) => {
                spec.overrides.retain(|(n, _)| n != name);
                spec.optional.retain(|n| n != name);
                spec.overrides.push((name.to_string(), o));
            }
            None => {
                self.misuse.get_or_insert(format!(
                    "`{name}` was overridden before any group was started; call `.group(name, predicate)` first"
                ));
            }
        }
        self
    }

    pub fn specs(&self) -> &[GroupSpec] {
        &self.specs
    }

    /// The group of each parameter: 0 is `default`, `k` is the `k`-th group
    /// declared.
    pub fn assign(&self, params: &[(&str, &[usize])]) -> Result<Vec<usize>, GroupError> {
        if let Some(m) = &self.misuse {
            return Err(GroupError::Misuse(m.clone()));
        }
        Ok(params
            .iter()
            .enumerate()
            .map(|(index, &(name, shape))| {
                let info = ParamInfo { index, name, shape };
                self.specs
                    .iter()
                    .position(|s| (s.select)(&info))
                    .map_or(0, |k| k + 1)
            })
            .collect())
    }
}

/// The name of the group of parameters no predicate selected.
pub const DEFAULT_GROUP: &str = "default";

/// A resolved group inside an optimizer: overrides and the hyperparameters
/// they give.
#[derive(Clone, Debug)]
pub(crate) struct Group<C> {
    pub(crate) name: String,
    pub(crate) overrides: Vec<(String, Override)>,
    pub(crate) config: C,
}

/// `base` with `overrides` applied, checked; errors name the group.
pub(crate) fn derive<C: HyperConfig + Clone>(
    base: &C,
    group: &str,
    overrides: &[(String, Override)],
) -> Result<C, GroupError> {
    apply(base, overrides).map_err(|error| GroupError::Config {
        group: group.into(),
        error,
    })
}

/// `base` with `overrides` applied, checked.
pub(crate) fn apply<C: HyperConfig + Clone>(
    base: &C,
    overrides: &[(String, Override)],
) -> Result<C, ConfigError> {
    let mut c = base.clone();
    for (name, o) in overrides {
        let value = match *o {
            Override::Set(v) => v,
            Override::Scale(s) => {
                let v = base
                    .get(name)
                    .ok_or_else(|| ConfigError::Unknown {
                        optimizer: String::new(),
                        name: name.clone(),
                        known: base.hypers().iter().map(|h| h.name).collect(),
                    })?
                    .as_float(name)?;
                HyperValue::Float(v * s)
            }
        };
        c.set(name, value)?;
    }
    Ok(c)
}

/// Groups that could not be applied. Nothing was changed.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupError {
    /// An override names an unknown hyperparameter or gives a bad value.
    Config { group: String, error: ConfigError },
    /// The groups were built wrongly (see the message).
    Misuse(String),
    /// The optimizer already steps a different number of parameters.
    ParamCount { expected: usize, got: usize },
    /// No group has this name.
    UnknownGroup { name: String, known: Vec<String> },
}

impl fmt::Display for GroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupError::Config { group, error } => write!(f, "parameter group `{group}`: {error}"),
            GroupError::Misuse(m) => write!(f, "parameter groups: {m}"),
            GroupError::ParamCount { expected, got } => write!(
                f,
                "parameter groups were given {got} parameters but the optimizer steps {expected}; list every parameter, in step order"
            ),
            GroupError::UnknownGroup { name, known } => write!(
                f,
                "there is no parameter group `{name}`; the groups are {}",
                known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

impl std::error::Error for GroupError {}

/// Ready-made predicates.
pub mod select {
    use super::ParamInfo;

    /// Parameters with fewer than `n` dimensions (`ndim_below(2)`: biases,
    /// norm scales).
    pub fn ndim_below(n: usize) -> impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static {
        move |p| p.shape.len() < n
    }

    /// Parameters with at least `n` dimensions.
    pub fn ndim_at_least(n: usize) -> impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static {
        move |p| p.shape.len() >= n
    }

    pub fn name_starts_with(
        prefix: &str,
    ) -> impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static {
        let prefix = prefix.to_string();
        move |p| p.name.starts_with(&prefix)
    }

    pub fn name_ends_with(suffix: &str) -> impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static {
        let suffix = suffix.to_string();
        move |p| p.name.ends_with(&suffix)
    }

    pub fn name_contains(part: &str) -> impl Fn(&ParamInfo<'_>) -> bool + Send + Sync + 'static {
        let part = part.to_string();
        move |p| p.name.contains(&part)
    }
}

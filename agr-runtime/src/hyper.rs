//! Hyperparameters: values, their declared ranges, and checked setters.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HyperKind {
    Float,
    Int,
    Bool,
}

/// A hyperparameter as the spec declares it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HyperInfo {
    pub name: &'static str,
    pub kind: HyperKind,
    /// The default (bools as 0 or 1).
    pub default: f64,
    /// `(bound, inclusive)`.
    pub lower: Option<(f64, bool)>,
    pub upper: Option<(f64, bool)>,
}

impl HyperInfo {
    /// The range as `[0, 1)`.
    pub fn range_text(&self) -> String {
        let (lb, lv) = match self.lower {
            Some((v, inc)) => (if inc { "[" } else { "(" }, format!("{v}")),
            None => ("(", "-inf".into()),
        };
        let (ub, uv) = match self.upper {
            Some((v, inc)) => (if inc { "]" } else { ")" }, format!("{v}")),
            None => (")", "inf".into()),
        };
        format!("{lb}{lv}, {uv}{ub}").replace("inf)", "inf)")
    }

    pub fn contains(&self, v: f64) -> bool {
        let lo = self
            .lower
            .is_none_or(|(b, inc)| if inc { v >= b } else { v > b });
        let hi = self
            .upper
            .is_none_or(|(b, inc)| if inc { v <= b } else { v < b });
        lo && hi
    }

    /// Checks that `value` has this hyperparameter's type and lies in its range.
    pub fn check(&self, value: HyperValue) -> Result<(), ConfigError> {
        let v = match (self.kind, value) {
            (HyperKind::Bool, HyperValue::Bool(_)) => return Ok(()),
            (HyperKind::Float, HyperValue::Float(v)) => v,
            (HyperKind::Float | HyperKind::Int, HyperValue::Int(i)) => i as f64,
            (HyperKind::Int, HyperValue::Float(v)) if v.fract() == 0.0 => v,
            _ => {
                return Err(ConfigError::WrongType {
                    name: self.name.to_string(),
                    expected: self.kind,
                    got: value,
                })
            }
        };
        if v.is_nan() || !self.contains(v) {
            return Err(ConfigError::OutOfRange {
                name: self.name.to_string(),
                value: v,
                range: self.range_text(),
            });
        }
        Ok(())
    }
}

/// A hyperparameter value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HyperValue {
    Float(f64),
    Int(i64),
    Bool(bool),
}

impl From<f64> for HyperValue {
    fn from(v: f64) -> Self {
        HyperValue::Float(v)
    }
}
impl From<i64> for HyperValue {
    fn from(v: i64) -> Self {
        HyperValue::Int(v)
    }
}
impl From<bool> for HyperValue {
    fn from(v: bool) -> Self {
        HyperValue::Bool(v)
    }
}

impl fmt::Display for HyperValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HyperValue::Float(v) => write!(f, "{v}"),
            HyperValue::Int(v) => write!(f, "{v}"),
            HyperValue::Bool(v) => write!(f, "{v}"),
        }
    }
}

impl HyperValue {
    /// The value as the kernels read it: a number, bools 0 or 1.
    pub fn to_f64(self) -> f64 {
        match self {
            HyperValue::Float(v) => v,
            HyperValue::Int(v) => v as f64,
            HyperValue::Bool(b) => f64::from(u8::from(b)),
        }
    }

    pub fn as_float(self, name: &str) -> Result<f64, ConfigError> {
        match self {
            HyperValue::Float(v) => Ok(v),
            HyperValue::Int(v) => Ok(v as f64),
            HyperValue::Bool(_) => Err(ConfigError::WrongType {
                name: name.into(),
                expected: HyperKind::Float,
                got: self,
            }),
        }
    }
    pub fn as_int(self, name: &str) -> Result<i64, ConfigError> {
        match self {
            HyperValue::Int(v) => Ok(v),
            HyperValue::Float(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Ok(v as i64),
            _ => Err(ConfigError::WrongType {
                name: name.into(),
                expected: HyperKind::Int,
                got: self,
            }),
        }
    }
    pub fn as_bool(self, name: &str) -> Result<bool, ConfigError> {
        match self {
            HyperValue::Bool(v) => Ok(v),
            _ => Err(ConfigError::WrongType {
                name: name.into(),
                expected: HyperKind::Bool,
                got: self,
            }),
        }
    }
}

/// A bad hyperparameter name or value. Nothing was changed.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigError {
    Unknown {
        optimizer: String,
        name: String,
        known: Vec<&'static str>,
    },
    OutOfRange {
        name: String,
        value: f64,
        range: String,
    },
    WrongType {
        name: String,
        expected: HyperKind,
        got: HyperValue,
    },
    /// A config of another spec (see [`crate::compile`]).
    WrongSpec { expected: String, got: String },
}

impl ConfigError {
    pub fn unknown(optimizer: &str, name: &str, hypers: &[HyperInfo]) -> ConfigError {
        ConfigError::Unknown {
            optimizer: optimizer.into(),
            name: name.into(),
            known: hypers.iter().map(|h| h.name).collect(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Unknown { optimizer, name, known } => write!(
                f,
                "{optimizer} has no hyperparameter `{name}`; its hyperparameters are {}",
                known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ),
            ConfigError::OutOfRange { name, value, range } => write!(
                f,
                "hyperparameter `{name}` = {value} is outside its valid range {range}; choose a value inside it"
            ),
            ConfigError::WrongType { name, expected, got } => write!(
                f,
                "hyperparameter `{name}` takes {}, not `{got}`",
                match expected {
                    HyperKind::Float => "a number",
                    HyperKind::Int => "a whole number",
                    HyperKind::Bool => "`true` or `false`",
                }
            ),
            ConfigError::WrongSpec { expected, got } => write!(
                f,
                "this is a config of {got}, not of {expected}; take it from this optimizer (`config()`) or from its spec"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A generated optimizer's hyperparameters.
pub trait HyperConfig: Sized {
    /// Every hyperparameter, in spec order.
    fn hypers(&self) -> &'static [HyperInfo];
    fn get(&self, name: &str) -> Option<HyperValue>;
    /// Sets without checking the range (use [`HyperConfig::set`]).
    fn set_unchecked(&mut self, name: &str, value: HyperValue) -> Result<(), ConfigError>;

    /// Sets a hyperparameter by name after checking its type and range; on
    /// error nothing changes.
    fn set(&mut self, name: &str, value: HyperValue) -> Result<(), ConfigError> {
        let Some(info) = self.hypers().iter().find(|h| h.name == name) else {
            return Err(ConfigError::Unknown {
                optimizer: String::new(),
                name: name.into(),
                known: self.hypers().iter().map(|h| h.name).collect(),
            });
        };
        info.check(value)?;
        self.set_unchecked(name, value)
    }

    /// Checks every hyperparameter against its declared range.
    fn validate(&self) -> Result<(), ConfigError> {
        for info in self.hypers() {
            if let Some(v) = self.get(info.name) {
                info.check(v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LR: HyperInfo = HyperInfo {
        name: "lr",
        kind: HyperKind::Float,
        default: 1e-3,
        lower: Some((0.0, false)),
        upper: None,
    };

    #[test]
    fn ranges_are_checked_with_their_bounds() {
        assert!(LR.check(HyperValue::Float(0.1)).is_ok());
        let e = LR.check(HyperValue::Float(0.0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hyperparameter `lr` = 0 is outside its valid range (0, inf); choose a value inside it"
        );
        assert!(LR.check(HyperValue::Float(f64::NAN)).is_err());
        assert!(LR.check(HyperValue::Bool(true)).is_err());
        let k = HyperInfo {
            name: "k",
            kind: HyperKind::Int,
            default: 0.0,
            lower: Some((0.0, true)),
            upper: Some((10.0, true)),
        };
        assert!(k.check(HyperValue::Float(3.0)).is_ok());
        assert!(k.check(HyperValue::Float(3.5)).is_err());
        assert!(k.check(HyperValue::Int(11)).is_err());
        assert_eq!(k.range_text(), "[0, 10]");
    }
}

//! Learning-rate schedules: a function of the step number, applied with any
//! optimizer's `set_lr` (candle: `set_learning_rate`) before its step.
//!
//! ```
//! use agr_runtime::schedule::{Schedule, WarmupCosine};
//! let s = WarmupCosine { peak: 1e-3, floor: 1e-5, warmup: 100, total: 1000 };
//! assert_eq!(s.lr(0), 0.0);
//! assert!((s.lr(100) - 1e-3).abs() < 1e-12);
//! assert!((s.lr(1000) - 1e-5).abs() < 1e-12);
//! ```

/// A learning rate for each step (0-based: the step about to be taken).
pub trait Schedule {
    fn lr(&self, step: u64) -> f64;
}

/// The same rate every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Constant(pub f64);

impl Schedule for Constant {
    fn lr(&self, _: u64) -> f64 {
        self.0
    }
}

fn warmup_factor(step: u64, warmup: u64) -> f64 {
    if warmup == 0 || step >= warmup {
        1.0
    } else {
        step as f64 / warmup as f64
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay to
/// `floor` at step `total`, then `floor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupLinear {
    pub peak: f64,
    pub floor: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule for WarmupLinear {
    fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * warmup_factor(step, self.warmup);
        }
        if step >= self.total || self.total <= self.warmup {
            return self.floor;
        }
        let frac = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        self.peak + (self.floor - self.peak) * frac
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then a half cosine
/// down to `floor` at step `total`, then `floor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    pub peak: f64,
    pub floor: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule for WarmupCosine {
    fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * warmup_factor(step, self.warmup);
        }
        if step >= self.total || self.total <= self.warmup {
            return self.floor;
        }
        let frac = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        self.floor + 0.5 * (self.peak - self.floor) * (1.0 + (std::f64::consts::PI * frac).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_hit_their_ends_and_stay_monotone_after_warmup() {
        let lin = WarmupLinear {
            peak: 1.0,
            floor: 0.1,
            warmup: 10,
            total: 110,
        };
        let cos = WarmupCosine {
            peak: 1.0,
            floor: 0.1,
            warmup: 10,
            total: 110,
        };
        for s in [&lin as &dyn Schedule, &cos] {
            assert_eq!(s.lr(0), 0.0);
            assert!((s.lr(5) - 0.5).abs() < 1e-12);
            assert!((s.lr(10) - 1.0).abs() < 1e-12);
            assert!((s.lr(110) - 0.1).abs() < 1e-12);
            assert_eq!(s.lr(10_000), 0.1);
            for t in 10..110 {
                assert!(s.lr(t + 1) <= s.lr(t) + 1e-15, "not decreasing at {t}");
            }
        }
        assert!((lin.lr(60) - 0.55).abs() < 1e-12);
        assert!((cos.lr(60) - 0.55).abs() < 1e-12);
        assert_eq!(Constant(0.3).lr(7), 0.3);
    }
}

//! The runtime of agr: optimizers generated from specs by [`optimizer!`],
//! the fused CPU engine that runs them, and the built-in optimizers.
//!
//! ```
//! use agr_runtime::optim::{AdamWAgr, AdamWAgrConfig};
//! use agr_runtime::ParamMut;
//!
//! let mut opt = AdamWAgr::with_config(AdamWAgrConfig::default().with_lr(1e-2)).unwrap();
//! let mut w = vec![1.0_f32, -2.0, 3.0, 0.5];
//! let g = vec![0.1_f32, 0.2, -0.3, 0.0];
//! opt.step_params(&mut [ParamMut::new(&mut w, Some(&g), &[2, 2])]).unwrap();
//! assert!(w[0] < 1.0);
//! ```

// Generated code names the runtime as `::agr_runtime`, also inside this crate.
extern crate self as agr_runtime;

mod buf;
#[cfg(feature = "candle")]
pub mod candle;
pub mod checkpoint;
pub mod compiled;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dynamic;
pub mod emulated;
mod frozen;
pub mod golden;
pub mod groups;
mod hyper;
pub mod mat;
pub mod multi;
pub mod optim;
mod optimizer;
pub mod schedule;
#[cfg(feature = "tch")]
pub mod tch;

pub use agr_macros::optimizer;
pub use checkpoint::CheckpointError;
pub use compiled::{
    compile, compile_file, CompiledOptimizer, CompiledSpec, DynConfig, DynKernel, SpecError,
};
pub use cpu::{Kernel, KernelDesc, StaticKernel};
pub use device::{Device, DeviceError};
pub use dynamic::DynOptimizer;
pub use groups::{GroupError, ParamGroups};
pub use hyper::{ConfigError, HyperConfig, HyperInfo, HyperKind, HyperValue};
pub use optimizer::{NonFinite, Optimizer, ParamMut, StepError, StepReport};

/// Most state buffers a spec may declare.
pub const MAX_STATES: usize = 8;

/// What a kernel knows about the tensor it is updating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// This tensor's step count, 1 on its first step.
    pub t: u64,
    pub ndim: usize,
    pub numel: usize,
    /// Elements per row: the product of every dimension but the first (the
    /// whole tensor when it has fewer than two dimensions).
    pub row_len: usize,
}

impl TensorMeta {
    /// Elements per row of a tensor of this shape.
    pub fn row_len_of(shape: &[usize]) -> usize {
        if shape.len() >= 2 {
            shape[1..].iter().product()
        } else {
            shape.iter().product()
        }
    }
}

/// A state buffer of a generated optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateInfo {
    pub name: &'static str,
    /// The value the buffer holds when created.
    pub fill: f32,
}

/// Which elements a reduction covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One result per tensor.
    Tensor,
    /// One result per step, over every parameter with a gradient.
    Global,
    /// One result per row (every dimension but the first).
    Rows,
}

/// A reduction of a generated optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReductionInfo {
    pub op: cpu::Fold,
    pub scope: Scope,
    /// The reduction pass that computes it.
    pub pass: usize,
}

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
pub mod comm;
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
pub mod matdev;
pub mod multi;
pub mod optim;
mod optimizer;
pub mod precision;
pub mod schedule;
pub mod shard;
#[cfg(feature = "tch")]
pub mod tch;

pub use agr_codegen::ir::{Axis, View};
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
pub use precision::{Element, Precision, Rounding, Storage};

/// Most state buffers a spec may declare.
pub const MAX_STATES: usize = 8;

/// What a kernel knows about the tensor it is updating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorMeta {
    /// This tensor's step count, 1 on its first step.
    pub t: u64,
    pub ndim: usize,
    pub numel: usize,
    /// Elements per row: the product of every dimension but the first (the
    /// whole tensor when it has fewer than two dimensions).
    pub row_len: usize,
    /// The tensor as matrices over its last two dimensions.
    pub view: View,
    /// The value of each per-tensor state (`per_tensor`) before the step,
    /// by state index (0 for the others).
    pub state: [f32; MAX_STATES],
}

impl TensorMeta {
    /// The metadata of a tensor of `shape` on step `t`.
    pub fn of(shape: &[usize], t: u64) -> TensorMeta {
        TensorMeta {
            t,
            ndim: shape.len(),
            numel: shape.iter().product(),
            row_len: TensorMeta::row_len_of(shape),
            view: View::of(shape),
            state: [0.0; MAX_STATES],
        }
    }
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

/// What a kernel's passes know about the shape of the tensor they step:
/// its rows (see `row_sum`), its view as matrices over the last two
/// dimensions (see `sum(x, -1)` and reduced states), and where each kind of
/// per-element reduction result starts in the tensor's results buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dims {
    /// Elements per row: every dimension but the first.
    pub row_len: usize,
    /// The second-to-last dimension (1 for fewer than two dimensions).
    pub rows: usize,
    /// The last dimension (1 for a scalar).
    pub cols: usize,
    /// Where the results over the last dimension start (after the row
    /// reductions' results).
    pub last_at: usize,
    /// Where the results over the second-to-last dimension start.
    pub second_last_at: usize,
    /// The length of the whole results buffer.
    pub results: usize,
}

impl Dims {
    /// The dimensions of a tensor of `shape` stepped by `desc`.
    pub fn of(shape: &[usize], desc: &cpu::KernelDesc) -> Dims {
        let numel: usize = shape.iter().product();
        let row_len = TensorMeta::row_len_of(shape);
        let view = View::of(shape);
        let last_at = numel.checked_div(row_len).unwrap_or(0) * desc.row_reductions;
        let second_last_at =
            last_at + view.count(Axis::Last, numel) * desc.dim_reductions_over(Axis::Last);
        let results = second_last_at
            + view.count(Axis::SecondLast, numel) * desc.dim_reductions_over(Axis::SecondLast);
        Dims {
            row_len,
            rows: view.rows,
            cols: view.cols,
            last_at,
            second_last_at,
            results,
        }
    }

    pub fn view(&self) -> View {
        View {
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Where the results over `axis` start.
    pub fn at(&self, axis: Axis) -> usize {
        match axis {
            Axis::Last => self.last_at,
            Axis::SecondLast => self.second_last_at,
        }
    }
}

/// A state buffer of a generated optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateInfo {
    pub name: &'static str,
    /// The value the buffer holds when created.
    pub fill: f32,
    /// `reduced(-1)`, `reduced(-2)`: one value per row or per column of the
    /// last two dimensions (see [`StateInfo::len`]).
    pub reduced: Option<Axis>,
    /// `per_tensor`: one value per tensor (see [`crate::Kernel::tensor_states`]).
    pub per_tensor: bool,
    /// How the spec declares the buffer stored (`m: bf16 = 0`); see
    /// [`crate::Optimizer::set_precision`], which can change it.
    pub storage: crate::Storage,
}

impl StateInfo {
    /// Values the buffer holds for a parameter of `shape`.
    pub fn len(&self, shape: &[usize]) -> usize {
        self.shape(shape).iter().product()
    }

    /// The buffer's shape for a parameter of `shape` (a reduced dimension is
    /// kept as 1, as torch's `keepdim` does; a per-tensor state is a scalar).
    pub fn shape(&self, shape: &[usize]) -> Vec<usize> {
        agr_codegen::ir::state_shape(self.reduced, self.per_tensor, shape)
    }
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
    /// One result per row (`Last`) or per column (`SecondLast`) of the
    /// tensor viewed as matrices over its last two dimensions.
    Dim(Axis),
}

/// A reduction of a generated optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReductionInfo {
    pub op: cpu::Fold,
    pub scope: Scope,
    /// The reduction pass that computes it.
    pub pass: usize,
}

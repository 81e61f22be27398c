//! Optimizers behind one object-safe trait, so tools can pick one by name.

use crate::cpu::{Kernel, KernelDesc};
use crate::{CheckpointError, GroupError, NonFinite, ParamGroups};
use crate::{
    ConfigError, HyperConfig, HyperInfo, HyperValue, Optimizer, ParamMut, StepError, StepReport,
};

/// Any generated optimizer, chosen at run time.
pub trait DynOptimizer: Send {
    /// What the spec declares: hyperparameters, states, passes, generated code.
    fn desc(&self) -> &'static KernelDesc;
    fn name(&self) -> &'static str;
    fn spec(&self) -> &'static str;
    fn hypers(&self) -> &'static [HyperInfo];
    fn hyper(&self, name: &str) -> Option<HyperValue>;
    fn set_hyper(&mut self, name: &str, value: HyperValue) -> Result<(), ConfigError>;
    fn step_params(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, StepError>;
    /// The checks a step runs before touching anything (parameter count,
    /// shapes, gradient lengths, shapes against existing state), alone.
    fn check_params(&self, params: &[ParamMut<'_>]) -> Result<(), StepError>;
    fn lr(&self) -> Option<f64>;
    /// The state buffer `name` of parameter `index`, once it exists.
    fn state(&self, index: usize, name: &str) -> Option<&[f32]>;
    /// The state buffer `name` of parameter `index`, copied from its device.
    fn state_to_host(&self, index: usize, name: &str) -> Option<Vec<f32>>;
    /// Steps that ran (see [`Optimizer::steps`]).
    fn steps(&self) -> u64;
    /// Steps taken by parameter `index`.
    fn tensor_steps(&self, index: usize) -> u64;
    /// What a step does with a NaN or infinite gradient.
    fn set_non_finite_policy(&mut self, policy: NonFinite);
    /// Steps skipped so far because a gradient was not finite.
    fn non_finite_skips(&self) -> u64;
    /// Sets `lr` (checked).
    fn set_lr(&mut self, lr: f64) -> Result<(), ConfigError>;
    /// See [`Optimizer::set_param_groups`].
    fn set_param_groups(
        &mut self,
        groups: &ParamGroups,
        params: &[(&str, &[usize])],
    ) -> Result<(), GroupError>;
    /// The name of parameter `index`'s group.
    fn group_name(&self, index: usize) -> &str;
    /// See [`Optimizer::set_param_names`].
    fn set_param_names(&mut self, names: Vec<String>) -> Result<(), GroupError>;
    /// See [`Optimizer::set_device`].
    fn set_device(&mut self, device: crate::Device) -> Result<(), crate::DeviceError>;
    fn device(&self) -> crate::Device;
    /// See [`Optimizer::set_cuda_stream`].
    #[cfg(feature = "cuda")]
    fn set_cuda_stream(
        &mut self,
        stream: std::sync::Arc<crate::cuda::CudaStream>,
        dtype: crate::cuda::DType,
    ) -> Result<(), crate::DeviceError>;
    /// See [`Optimizer::cuda_stream`].
    #[cfg(feature = "cuda")]
    fn cuda_stream(&self) -> Option<&std::sync::Arc<crate::cuda::CudaStream>>;
    /// See [`Optimizer::cuda_dtype`].
    #[cfg(feature = "cuda")]
    fn cuda_dtype(&self) -> Option<crate::cuda::DType>;
    /// See [`Optimizer::step_raw`].
    ///
    /// # Safety
    /// As [`Optimizer::step_raw`].
    #[cfg(feature = "cuda")]
    unsafe fn step_raw(
        &mut self,
        params: &[crate::cuda::RawCudaParam<'_>],
    ) -> Result<StepReport, StepError>;
    /// The whole state as a checkpoint (see [`Optimizer::save_checkpoint`]).
    fn save_checkpoint(&self) -> Vec<u8>;
    /// See [`Optimizer::load_checkpoint`].
    fn load_checkpoint(&mut self, bytes: &[u8]) -> Result<(), CheckpointError>;
    /// See [`Optimizer::shard`].
    fn shard(
        &mut self,
        comm: std::sync::Arc<dyn crate::comm::Comm>,
        grads: crate::shard::GradMode,
    ) -> Result<(), crate::shard::ShardError>;
    /// See [`Optimizer::state_bytes`].
    fn state_bytes(&self) -> crate::shard::StateBytes;
    /// See [`Optimizer::set_precision`].
    fn set_precision(
        &mut self,
        precision: crate::Precision,
    ) -> Result<(), crate::precision::PrecisionError>;
    /// See [`Optimizer::precision`].
    fn precision(&self) -> crate::Precision;
    /// [`Optimizer::step_params_of`] for bf16 parameters.
    fn step_params_bf16(
        &mut self,
        params: &mut [ParamMut<'_, half::bf16>],
    ) -> Result<StepReport, StepError>;
    /// [`Optimizer::step_params_of`] for f16 parameters.
    fn step_params_f16(
        &mut self,
        params: &mut [ParamMut<'_, half::f16>],
    ) -> Result<StepReport, StepError>;
    /// [`DynOptimizer::check_params`] for bf16 parameters.
    fn check_params_bf16(&self, params: &[ParamMut<'_, half::bf16>]) -> Result<(), StepError>;
    /// [`DynOptimizer::check_params`] for f16 parameters.
    fn check_params_f16(&self, params: &[ParamMut<'_, half::f16>]) -> Result<(), StepError>;
}

impl<K: Kernel> DynOptimizer for Optimizer<K> {
    fn desc(&self) -> &'static KernelDesc {
        self.desc
    }
    fn name(&self) -> &'static str {
        self.desc.name
    }
    fn spec(&self) -> &'static str {
        self.desc.spec
    }
    fn hypers(&self) -> &'static [HyperInfo] {
        self.desc.hypers
    }
    fn hyper(&self, name: &str) -> Option<HyperValue> {
        self.config().get(name)
    }
    fn set_hyper(&mut self, name: &str, value: HyperValue) -> Result<(), ConfigError> {
        Optimizer::set_hyper(self, name, value)
    }
    fn step_params(&mut self, params: &mut [ParamMut<'_>]) -> Result<StepReport, StepError> {
        Optimizer::step_params(self, params)
    }
    fn check_params(&self, params: &[ParamMut<'_>]) -> Result<(), StepError> {
        Optimizer::validate(self, params)
    }
    fn lr(&self) -> Option<f64> {
        Optimizer::lr(self)
    }
    fn set_lr(&mut self, lr: f64) -> Result<(), ConfigError> {
        Optimizer::set_lr(self, lr)
    }
    fn state(&self, index: usize, name: &str) -> Option<&[f32]> {
        Optimizer::state(self, index, name)
    }
    fn state_to_host(&self, index: usize, name: &str) -> Option<Vec<f32>> {
        Optimizer::state_to_host(self, index, name)
    }
    fn steps(&self) -> u64 {
        Optimizer::steps(self)
    }
    fn tensor_steps(&self, index: usize) -> u64 {
        Optimizer::tensor_steps(self, index)
    }
    fn set_non_finite_policy(&mut self, policy: NonFinite) {
        Optimizer::set_non_finite_policy(self, policy)
    }
    fn non_finite_skips(&self) -> u64 {
        Optimizer::non_finite_skips(self)
    }
    fn set_param_groups(
        &mut self,
        groups: &ParamGroups,
        params: &[(&str, &[usize])],
    ) -> Result<(), GroupError> {
        Optimizer::set_param_groups(self, groups, params)
    }
    fn group_name(&self, index: usize) -> &str {
        Optimizer::group_name(self, index)
    }
    fn set_param_names(&mut self, names: Vec<String>) -> Result<(), GroupError> {
        Optimizer::set_param_names(self, names)
    }
    fn set_device(&mut self, device: crate::Device) -> Result<(), crate::DeviceError> {
        Optimizer::set_device(self, device)
    }
    fn device(&self) -> crate::Device {
        Optimizer::device(self)
    }
    #[cfg(feature = "cuda")]
    fn set_cuda_stream(
        &mut self,
        stream: std::sync::Arc<crate::cuda::CudaStream>,
        dtype: crate::cuda::DType,
    ) -> Result<(), crate::DeviceError> {
        Optimizer::set_cuda_stream(self, stream, dtype)
    }
    #[cfg(feature = "cuda")]
    fn cuda_stream(&self) -> Option<&std::sync::Arc<crate::cuda::CudaStream>> {
        Optimizer::cuda_stream(self)
    }
    #[cfg(feature = "cuda")]
    fn cuda_dtype(&self) -> Option<crate::cuda::DType> {
        Optimizer::cuda_dtype(self)
    }
    #[cfg(feature = "cuda")]
    unsafe fn step_raw(
        &mut self,
        params: &[crate::cuda::RawCudaParam<'_>],
    ) -> Result<StepReport, StepError> {
        // SAFETY: the caller's contract.
        unsafe { Optimizer::step_raw(self, params) }
    }
    fn save_checkpoint(&self) -> Vec<u8> {
        Optimizer::save_checkpoint(self)
    }
    fn load_checkpoint(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        Optimizer::load_checkpoint(self, bytes)
    }
    fn shard(
        &mut self,
        comm: std::sync::Arc<dyn crate::comm::Comm>,
        grads: crate::shard::GradMode,
    ) -> Result<(), crate::shard::ShardError> {
        Optimizer::shard(self, comm, grads)
    }
    fn state_bytes(&self) -> crate::shard::StateBytes {
        Optimizer::state_bytes(self)
    }
    fn set_precision(
        &mut self,
        precision: crate::Precision,
    ) -> Result<(), crate::precision::PrecisionError> {
        Optimizer::set_precision(self, precision)
    }
    fn precision(&self) -> crate::Precision {
        Optimizer::precision(self).clone()
    }
    fn step_params_bf16(
        &mut self,
        params: &mut [ParamMut<'_, half::bf16>],
    ) -> Result<StepReport, StepError> {
        Optimizer::step_params_of(self, params)
    }
    fn step_params_f16(
        &mut self,
        params: &mut [ParamMut<'_, half::f16>],
    ) -> Result<StepReport, StepError> {
        Optimizer::step_params_of(self, params)
    }
    fn check_params_bf16(&self, params: &[ParamMut<'_, half::bf16>]) -> Result<(), StepError> {
        Optimizer::validate(self, params)
    }
    fn check_params_f16(&self, params: &[ParamMut<'_, half::f16>]) -> Result<(), StepError> {
        Optimizer::validate(self, params)
    }
}

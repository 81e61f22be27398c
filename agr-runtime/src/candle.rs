//! candle adapter (feature `candle`): every generated optimizer is a
//! `candle_nn::Optimizer`, so `candle_nn::AdamW::new(vars, params)` becomes
//! `agr_runtime::optim::AdamWAgr::new(vars, Default::default())`.
//!
//! CPU `f32` variables are updated in place with the fused step, through
//! candle's public in-place custom ops: the write locks of all variables are
//! taken one inside the other, then one step runs over all of them (global
//! reductions need every tensor at once). Variables without a gradient in the
//! `GradStore` are skipped. No per-step copy of parameters or gradients.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Var};

use crate::cpu::Kernel;
use crate::{Optimizer, ParamMut};

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// One variable's place in the nested in-place ops.
struct Gather<'a, 'f> {
    rest: &'a [Var],
    ptrs: &'a RefCell<Vec<(usize, usize)>>,
    at_bottom: &'a RefCell<&'f mut dyn FnMut(&[(usize, usize)]) -> candle_core::Result<()>>,
}

impl InplaceOp1 for Gather<'_, '_> {
    fn name(&self) -> &'static str {
        "agr-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            return Err(err(
                "agr's candle adapter updates f32 variables; convert the model to f32",
            ));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(err(
                "a variable is not contiguous; agr updates contiguous variables in place",
            ));
        };
        let slice = &mut data[start..end];
        self.ptrs
            .borrow_mut()
            .push((slice.as_mut_ptr() as usize, slice.len()));
        match self.rest.split_first() {
            // Still holding this variable's write lock: take the next one's.
            Some((next, rest)) => next.inplace_op1(&Gather {
                rest,
                ptrs: self.ptrs,
                at_bottom: self.at_bottom,
            }),
            None => {
                let ptrs = self.ptrs.borrow().clone();
                (self.at_bottom.borrow_mut())(&ptrs)
            }
        }
    }
}

impl<K: Kernel> candle_nn::Optimizer for Optimizer<K> {
    type Config = K::Config;

    fn new(vars: Vec<Var>, config: K::Config) -> candle_core::Result<Self> {
        let mut ids = std::collections::HashSet::new();
        for v in &vars {
            if !ids.insert(v.as_tensor().id()) {
                return Err(err("the same variable was passed twice"));
            }
            if v.dtype() != candle_core::DType::F32 {
                return Err(err(format!(
                    "a variable is {:?}; agr's candle adapter updates f32 variables",
                    v.dtype()
                )));
            }
        }
        let mut opt = Optimizer::<K>::with_config(config).map_err(err)?;
        opt.vars = vars;
        Ok(opt)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        if self.vars.is_empty() {
            return Ok(());
        }
        // Read access to every gradient for the whole step.
        let grad_tensors: Vec<Option<candle_core::Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        let guards: Vec<Option<(candle_core::StorageRef<'_>, &Layout)>> = grad_tensors
            .iter()
            .map(|g| g.as_ref().map(|g| g.storage_and_layout()))
            .collect();
        let mut grad_slices: Vec<Option<&[f32]>> = Vec::with_capacity(guards.len());
        for (i, g) in guards.iter().enumerate() {
            grad_slices.push(match g {
                None => None,
                Some((storage, layout)) => {
                    let Storage::Cpu(CpuStorage::F32(data)) = &**storage else {
                        return Err(err(format!(
                            "the gradient of variable #{i} is not an f32 CPU tensor"
                        )));
                    };
                    let Some((start, end)) = layout.contiguous_offsets() else {
                        return Err(err(format!(
                            "the gradient of variable #{i} is not contiguous"
                        )));
                    };
                    Some(&data[start..end])
                }
            });
        }
        let shapes: Vec<Vec<usize>> = self.vars.iter().map(|v| v.dims().to_vec()).collect();
        let vars = self.vars.clone();
        let mut outcome: Option<crate::StepError> = None;
        let mut run = |ptrs: &[(usize, usize)]| -> candle_core::Result<()> {
            let mut params: Vec<ParamMut<'_>> = ptrs
                .iter()
                .zip(&grad_slices)
                .zip(&shapes)
                .map(|((&(p, n), g), s)| {
                    // SAFETY: each pointer is a live, exclusively locked f32
                    // slice of length n (the nested in-place ops hold the
                    // write locks while this runs); variables are distinct.
                    let value = unsafe { std::slice::from_raw_parts_mut(p as *mut f32, n) };
                    ParamMut::new(value, *g, s)
                })
                .collect();
            if let Err(e) = Optimizer::<K>::step(self, &mut params) {
                outcome = Some(e);
            }
            Ok(())
        };
        let ptrs = RefCell::new(Vec::with_capacity(vars.len()));
        let bottom: RefCell<&mut dyn FnMut(&[(usize, usize)]) -> candle_core::Result<()>> =
            RefCell::new(&mut run);
        let (first, rest) = vars.split_first().expect("not empty");
        first.inplace_op1(&Gather {
            rest,
            ptrs: &ptrs,
            at_bottom: &bottom,
        })?;
        match outcome {
            Some(e) => Err(err(e)),
            None => Ok(()),
        }
    }

    fn learning_rate(&self) -> f64 {
        Optimizer::<K>::learning_rate(self).unwrap_or(0.0)
    }

    /// Sets `lr`; a value outside its range is ignored (the trait cannot
    /// report it: use `Optimizer::set_learning_rate` to get the error).
    fn set_learning_rate(&mut self, lr: f64) {
        let _ = Optimizer::<K>::set_learning_rate(self, lr);
    }
}

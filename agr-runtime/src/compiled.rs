//! Specs compiled at run time: [`compile`] turns spec text into a
//! [`CompiledSpec`], whose optimizers ([`CompiledOptimizer`]) are the same
//! engine as the built-ins (groups, checkpoints, the non-finite policy,
//! schedules, the candle and tch adapters) with the step executed by a
//! chunk-at-a-time evaluator of the IR instead of generated Rust.
//!
//! The evaluator computes each IR node over a block of [`BLOCK`] elements
//! (a few KiB, so the block's columns stay in the L1/L2 cache while main
//! memory is read and written once per pass), with the same f32 operations
//! in the same order as the generated code and the same lanes of f64
//! accumulators for reductions: a spec compiled at run time steps
//! bit-identically to the same spec compiled by `optimizer!`.
//!
//! ```
//! let spec = agr_runtime::compile(
//!     "SgdAgr { hyper { lr = 0.1 where lr > 0 } step { p = p - lr * agr(g); } }",
//! )
//! .unwrap();
//! let mut opt = spec.optimizer();
//! let mut w = vec![1.0_f32, 2.0, 3.0];
//! opt.step_params(&mut [agr_runtime::ParamMut::new(&mut w, Some(&[1.0, 0.0, -1.0]), &[3])])
//!     .unwrap();
//! assert_eq!(w, vec![0.95, 2.0, 3.05]);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use agr_codegen::backend::{self, LoopPlan};
use agr_codegen::ir::{self, BinaryOp, Level, NodeId, Op, Program, ReduceOp, Scalar, UnaryOp};
use agr_grammar::Diagnostic;

use crate::cpu::{combine_lanes, sign_f32, Fold, Kernel, KernelDesc, MatrixInfo, LANES};
use crate::{
    Axis, ConfigError, Dims, HyperConfig, HyperInfo, HyperKind, HyperValue, Optimizer,
    ReductionInfo, Scope, StateInfo, TensorMeta, MAX_STATES,
};

/// Elements the evaluator computes per node at a time.
pub const BLOCK: usize = 256;

/// A spec that did not compile: every diagnostic, rendered against its text.
#[derive(Clone, Debug)]
pub struct SpecError {
    /// Where the spec came from (a file's path, or `<spec>`).
    pub origin: String,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.diagnostics.iter().filter(|d| d.is_error()).count();
        for d in &self.diagnostics {
            f.write_str(&d.render(&self.origin, &self.source))?;
        }
        write!(
            f,
            "{}: the spec has {errors} error{}",
            self.origin,
            if errors == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for SpecError {}

/// Compiles spec text (see the crate's README for the language).
pub fn compile(source: &str) -> Result<CompiledSpec, SpecError> {
    compile_named(source, "<spec>")
}

/// Reads and compiles a spec file; errors name the file.
pub fn compile_file(path: impl AsRef<std::path::Path>) -> Result<CompiledSpec, SpecError> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| SpecError {
        origin: origin.clone(),
        source: String::new(),
        diagnostics: vec![Diagnostic::new(
            0..0,
            format!("cannot read the spec file: {e}"),
            "",
        )],
    })?;
    compile_named(&source, &origin)
}

/// Compiles `source`, naming it `origin` in errors. The same text compiled
/// twice gives the same program (and so the same [`KernelDesc`]); each
/// distinct spec's description is kept for the life of the process.
pub fn compile_named(source: &str, origin: &str) -> Result<CompiledSpec, SpecError> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Exec>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(e) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(source) {
        return Ok(CompiledSpec { exec: e.clone() });
    }
    let prog = agr_codegen::compile(source).map_err(|diagnostics| SpecError {
        origin: origin.into(),
        source: source.into(),
        diagnostics,
    })?;
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    // The normalised text identifies the program: two spellings of one spec
    // share it.
    let exec = match cache.values().find(|e| e.prog.spec_text == prog.spec_text) {
        Some(e) => e.clone(),
        None => Arc::new(Exec::new(prog)),
    };
    cache.insert(source.to_string(), exec.clone());
    Ok(CompiledSpec { exec })
}

/// A spec compiled at run time.
#[derive(Clone)]
pub struct CompiledSpec {
    exec: Arc<Exec>,
}

impl fmt::Debug for CompiledSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledSpec")
            .field("name", &self.exec.desc.name)
            .finish()
    }
}

impl CompiledSpec {
    pub fn desc(&self) -> &'static KernelDesc {
        self.exec.desc
    }

    pub fn name(&self) -> &'static str {
        self.exec.desc.name
    }

    /// The IR the evaluator runs.
    pub fn program(&self) -> &Program {
        &self.exec.prog
    }

    /// The spec's hyperparameters with their defaults.
    pub fn default_config(&self) -> DynConfig {
        DynConfig {
            exec: self.exec.clone(),
            values: self
                .exec
                .desc
                .hypers
                .iter()
                .map(|h| match h.kind {
                    HyperKind::Float => HyperValue::Float(h.default),
                    HyperKind::Int => HyperValue::Int(h.default as i64),
                    HyperKind::Bool => HyperValue::Bool(h.default != 0.0),
                })
                .collect(),
        }
    }

    /// An optimizer with the spec's default hyperparameters (always in range:
    /// the checker refuses defaults outside their ranges).
    pub fn optimizer(&self) -> CompiledOptimizer {
        Optimizer::with_config(self.default_config()).expect("defaults are checked by the compiler")
    }

    /// An optimizer with `config` (checked).
    pub fn optimizer_with(&self, config: DynConfig) -> Result<CompiledOptimizer, ConfigError> {
        if !Arc::ptr_eq(&config.exec, &self.exec) {
            return Err(ConfigError::WrongSpec {
                expected: self.name().into(),
                got: config.exec.desc.name.into(),
            });
        }
        Optimizer::with_config(config)
    }

    /// The optimizer behind the object-safe trait the built-ins share.
    pub fn boxed(&self) -> Box<dyn crate::DynOptimizer> {
        Box::new(self.optimizer())
    }
}

/// An optimizer whose spec was compiled at run time.
pub type CompiledOptimizer = Optimizer<DynKernel>;

/// The hyperparameters of a spec compiled at run time, by name
/// ([`HyperConfig::get`], [`HyperConfig::set`]).
#[derive(Clone)]
pub struct DynConfig {
    exec: Arc<Exec>,
    values: Vec<HyperValue>,
}

impl fmt::Debug for DynConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct(&format!("{}Config", self.exec.desc.name));
        for (h, v) in self.exec.desc.hypers.iter().zip(&self.values) {
            s.field(h.name, v);
        }
        s.finish()
    }
}

impl PartialEq for DynConfig {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.exec, &other.exec) && self.values == other.values
    }
}

impl DynConfig {
    /// Returns the config with `name` set (checked).
    pub fn with(mut self, name: &str, value: impl Into<HyperValue>) -> Result<Self, ConfigError> {
        self.set(name, value.into()).map_err(|e| match e {
            ConfigError::Unknown { name, known, .. } => ConfigError::Unknown {
                optimizer: self.exec.desc.name.into(),
                name,
                known,
            },
            e => e,
        })?;
        Ok(self)
    }

    /// The values in spec order, as the kernels read them (f64; bools 0 or 1).
    fn number(&self, h: usize) -> f64 {
        self.values[h].to_f64()
    }
}

impl HyperConfig for DynConfig {
    fn hypers(&self) -> &'static [HyperInfo] {
        self.exec.desc.hypers
    }

    fn get(&self, name: &str) -> Option<HyperValue> {
        let i = self.hypers().iter().position(|h| h.name == name)?;
        Some(self.values[i])
    }

    fn set_unchecked(&mut self, name: &str, value: HyperValue) -> Result<(), ConfigError> {
        let Some(i) = self.hypers().iter().position(|h| h.name == name) else {
            return Err(ConfigError::unknown(
                self.exec.desc.name,
                name,
                self.hypers(),
            ));
        };
        self.values[i] = match self.hypers()[i].kind {
            HyperKind::Float => HyperValue::Float(value.as_float(name)?),
            HyperKind::Int => HyperValue::Int(value.as_int(name)?),
            HyperKind::Bool => HyperValue::Bool(value.as_bool(name)?),
        };
        Ok(())
    }
}

/// The step of a spec compiled at run time (see the module docs).
#[derive(Clone)]
pub struct DynKernel {
    exec: Arc<Exec>,
}

/// Scalars of one step (or one tensor), by IR node (bools as 0 or 1).
#[derive(Clone, Debug, Default)]
pub struct Scalars(Vec<f64>);

impl Kernel for DynKernel {
    type Config = DynConfig;
    type StepScalars = Scalars;
    type TensorScalars = Scalars;

    fn of_config(config: &DynConfig) -> Self {
        DynKernel {
            exec: config.exec.clone(),
        }
    }

    fn desc(&self) -> &'static KernelDesc {
        self.exec.desc
    }

    fn step_scalars(&self, c: &DynConfig, phase: usize, global: &[f64], s: &mut Scalars) {
        let e = &*self.exec;
        s.0.resize(e.prog.nodes.len(), 0.0);
        for &id in e.step_nodes.get(phase).map_or(&[][..], |v| v) {
            let v = match e.prog.nodes[id].op {
                Op::Hyper(h) => c.number(h),
                Op::Reduced(r) => global[r],
                _ => e.scalar_op(id, &s.0, &[]),
            };
            s.0[id] = v;
        }
    }

    fn tensor_scalars(
        &self,
        _c: &DynConfig,
        phase: usize,
        s: &Scalars,
        meta: &TensorMeta,
        reduced: &[f64],
        ts: &mut Scalars,
    ) {
        let e = &*self.exec;
        ts.0.resize(e.prog.nodes.len(), 0.0);
        for &id in e.tensor_nodes.get(phase).map_or(&[][..], |v| v) {
            let v = match e.prog.nodes[id].op {
                Op::T => meta.t as f64,
                Op::Ndim => meta.ndim as f64,
                Op::Numel => meta.numel as f64,
                Op::RowLen => meta.row_len as f64,
                Op::DimLen(a) => meta.view.len(a) as f64,
                // A per-tensor state's value before the step.
                Op::State(k) => f64::from(meta.state[k]),
                // Global results are step-level nodes; row results per element.
                Op::Reduced(r) => reduced[r],
                _ => e.scalar_op(id, &s.0, &ts.0),
            };
            ts.0[id] = v;
        }
    }

    fn reduce(
        &self,
        pass: usize,
        s: &Scalars,
        ts: &Scalars,
        p: &[f32],
        g: &[f32],
        st: [&[f32]; MAX_STATES],
        rows: &mut [f64],
        dims: Dims,
        acc: &mut [f64],
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { self.reduce_avx2(pass, s, ts, p, g, st, rows, dims, acc) };
        }
        self.reduce_body(pass, s, ts, p, g, st, rows, dims, acc)
    }

    fn update(
        &self,
        s: &Scalars,
        ts: &Scalars,
        p: &mut [f32],
        g: &[f32],
        st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: Dims,
    ) {
        let p = ParamIo::Write(p);
        self.write_pass(&self.exec.update, s, ts, p, g, st, rows, dims)
    }

    fn tensor_states(&self, s: &Scalars, ts: &Scalars, out: &mut [f32; MAX_STATES]) {
        let e = &*self.exec;
        for (k, st) in e.prog.states.iter().enumerate() {
            if !st.per_tensor {
                continue;
            }
            let id = e.prog.state_out[k];
            let n = &e.prog.nodes[id];
            // As the generated code: the scalar's f64 value rounded to f32.
            out[k] = match n.op {
                Op::Num(v) => v as f32,
                _ if n.level == Level::Step => s.0[id] as f32,
                _ => ts.0[id] as f32,
            };
        }
    }

    fn matrix_args(&self, block: usize, s: &Scalars, ts: &Scalars, out: &mut Vec<f64>) {
        out.clear();
        let e = &*self.exec;
        if let Some(b) = e.prog.mats.get(block) {
            out.extend(b.args.iter().map(|&a| {
                if e.prog.nodes[a].level == Level::Step {
                    s.0[a]
                } else {
                    ts.0[a]
                }
            }));
        }
    }

    fn matrix(
        &self,
        block: usize,
        s: &Scalars,
        ts: &Scalars,
        p: &[f32],
        g: &[f32],
        mut st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: Dims,
        ws: &mut crate::mat::Workspace,
    ) -> Result<(), String> {
        let e = &*self.exec;
        let (Some(plan), Some(b)) = (e.mats.get(block), e.prog.mats.get(block)) else {
            return Err(format!("the spec has no matrix block {block}"));
        };
        // The block's value per element into its state (the loop writes
        // nothing else).
        let st2: [&mut [f32]; MAX_STATES] = st.each_mut().map(|x| &mut **x);
        self.write_pass(plan, s, ts, ParamIo::Read(p), g, st2, rows, dims);
        let mut args = vec![];
        self.matrix_args(block, s, ts, &mut args);
        let len = p.len();
        crate::mat::run(
            &b.code,
            b.regs,
            &args,
            len / dims.row_len,
            dims.row_len,
            &mut st[b.state][..len],
            ws,
        )
    }
}

/// The passes, compiled twice as the generated kernels are: for the baseline
/// CPU and with AVX2 (the same operations in the same order, so the same
/// bits; everything they call is inlined into them).
#[allow(clippy::too_many_arguments)]
impl DynKernel {
    /// A pass that writes (the update, a matrix block's value), on the
    /// AVX2 build where the CPU has it.
    fn write_pass(
        &self,
        plan: &UpdatePlan,
        s: &Scalars,
        ts: &Scalars,
        p: ParamIo<'_>,
        g: &[f32],
        st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: Dims,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { self.update_avx2(plan, s, ts, p, g, st, rows, dims) };
        }
        self.update_body(plan, s, ts, p, g, st, rows, dims)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce_avx2(
        &self,
        pass: usize,
        s: &Scalars,
        ts: &Scalars,
        p: &[f32],
        g: &[f32],
        st: [&[f32]; MAX_STATES],
        rows: &mut [f64],
        dims: Dims,
        acc: &mut [f64],
    ) {
        self.reduce_body(pass, s, ts, p, g, st, rows, dims, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn update_avx2(
        &self,
        plan: &UpdatePlan,
        s: &Scalars,
        ts: &Scalars,
        p: ParamIo<'_>,
        g: &[f32],
        st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: Dims,
    ) {
        self.update_body(plan, s, ts, p, g, st, rows, dims)
    }

    #[inline(always)]
    fn reduce_body(
        &self,
        pass: usize,
        s: &Scalars,
        ts: &Scalars,
        p: &[f32],
        g: &[f32],
        st: [&[f32]; MAX_STATES],
        rows: &mut [f64],
        dims: Dims,
        acc: &mut [f64],
    ) {
        let e = &*self.exec;
        let Some(plan) = e.passes.get(pass) else {
            return;
        };
        let len = p.len();
        let inputs = Inputs {
            p,
            g: &g[..len],
            st,
        };
        let mut sc = take_scratch();
        sc.prepare(&plan.code, s, ts);
        if !plan.whole.is_empty() {
            let mut lanes: Vec<[f64; LANES]> = plan
                .whole
                .iter()
                .map(|w| [w.op.identity(); LANES])
                .collect();
            let mut check = [0.0f32; LANES];
            let mut off = 0;
            while off < len {
                let n = BLOCK.min(len - off);
                sc.eval(&plan.code, &inputs, RowCtx::of(rows, dims, e), off, n);
                for (w, lanes) in plan.whole.iter().zip(lanes.iter_mut()) {
                    // `off` is a multiple of LANES: element `off + i` is in lane `i % LANES`.
                    let v = sc.arg(w.arg, &inputs, off, n);
                    if w.check {
                        fold_check(&mut check, v, n);
                    } else {
                        fold_into(lanes, w.op, v, n);
                    }
                }
                off += n;
            }
            for (w, lanes) in plan.whole.iter().zip(&lanes) {
                acc[w.index] = if w.check {
                    f64::from(check.iter().sum::<f32>())
                } else {
                    combine_lanes(w.op, lanes)
                };
            }
        }
        if !plan.rows.is_empty() {
            let nrr = e.row_reductions;
            let row_len = dims.row_len;
            for row in 0..len / row_len {
                let mut lanes: Vec<[f64; LANES]> =
                    plan.rows.iter().map(|w| [w.op.identity(); LANES]).collect();
                let mut j = 0;
                while j < row_len {
                    let n = BLOCK.min(row_len - j);
                    let off = row * row_len + j;
                    sc.eval(&plan.code, &inputs, RowCtx::of(rows, dims, e), off, n);
                    // Lanes by the element's place in its row, as `cpu::fold`
                    // (`j` is a multiple of LANES).
                    for (w, lanes) in plan.rows.iter().zip(lanes.iter_mut()) {
                        fold_into(lanes, w.op, sc.arg(w.arg, &inputs, off, n), n);
                    }
                    j += n;
                }
                for (w, lanes) in plan.rows.iter().zip(&lanes) {
                    rows[row * nrr + w.index] = combine_lanes(w.op, lanes);
                }
            }
        }
        if !plan.dims.is_empty() {
            // The whole tensor in element order, each value added in f64 to
            // its row's or column's result (as the generated loop).
            let view = dims.view();
            for (a, w) in &plan.dims {
                let per = e.desc.dim_reductions_over(*a);
                for k in 0..view.count(*a, len) {
                    rows[dims.at(*a) + k * per + w.index] = 0.0;
                }
            }
            let mut off = 0;
            while off < len {
                let n = BLOCK.min(len - off);
                sc.eval(&plan.code, &inputs, RowCtx::of(rows, dims, e), off, n);
                for (a, w) in &plan.dims {
                    let per = e.desc.dim_reductions_over(*a);
                    let at = dims.at(*a);
                    let v = sc.arg(w.arg, &inputs, off, n);
                    for i in 0..n {
                        let x = match v {
                            Arg::Slice(x) => x[i],
                            Arg::Splat(x) => x,
                        };
                        rows[at + view.index(*a, off + i) * per + w.index] += f64::from(x);
                    }
                }
                off += n;
            }
        }
        put_scratch(sc);
    }

    #[inline(always)]
    fn update_body(
        &self,
        plan: &UpdatePlan,
        s: &Scalars,
        ts: &Scalars,
        mut p: ParamIo<'_>,
        g: &[f32],
        st: [&mut [f32]; MAX_STATES],
        rows: &[f64],
        dims: Dims,
    ) {
        let e = &*self.exec;
        let len = p.read().len();
        let mut sc = take_scratch();
        sc.prepare(&plan.code, s, ts);
        let mut outs = std::mem::take(&mut sc.out);
        outs.resize_with(plan.outputs.len(), || vec![0.0; BLOCK]);
        let mut off = 0;
        while off < len {
            let n = BLOCK.min(len - off);
            {
                let inputs = Inputs {
                    p: p.read(),
                    g: &g[..len],
                    st: [
                        &*st[0], &*st[1], &*st[2], &*st[3], &*st[4], &*st[5], &*st[6], &*st[7],
                    ],
                };
                sc.eval(&plan.code, &inputs, RowCtx::of(rows, dims, e), off, n);
                // An output that is an input (`m = g`, `p = v`) is copied
                // before any output of this block is written.
                for (k, &(_, r)) in plan.outputs.iter().enumerate() {
                    if matches!(r, Ref::P | Ref::G | Ref::State(_)) {
                        if let Arg::Slice(x) = sc.arg(r, &inputs, off, n) {
                            outs[k][..n].copy_from_slice(x);
                        }
                    }
                }
            }
            for (k, &(target, r)) in plan.outputs.iter().enumerate() {
                let dst = match target {
                    Target::Param => &mut p.write()[off..off + n],
                    Target::State(i) => &mut st[i][off..off + n],
                    Target::Reduced(i, a) => {
                        // The last element of each row or column writes
                        // (after its row or column has read the old value).
                        let view = dims.view();
                        for j in 0..n {
                            if view.closes(a, off + j) {
                                st[i][view.index(a, off + j)] = match r {
                                    Ref::Col(c) => sc.cols[c][j],
                                    Ref::Hoisted(h) => sc.hoisted[h],
                                    Ref::Const(v) => v,
                                    Ref::P | Ref::G | Ref::State(_) => outs[k][j],
                                };
                            }
                        }
                        continue;
                    }
                };
                match r {
                    Ref::Col(c) => dst.copy_from_slice(&sc.cols[c][..n]),
                    Ref::Hoisted(h) => dst.fill(sc.hoisted[h]),
                    Ref::Const(v) => dst.fill(v),
                    Ref::P | Ref::G | Ref::State(_) => dst.copy_from_slice(&outs[k][..n]),
                }
            }
            off += n;
        }
        sc.out = outs;
        put_scratch(sc);
    }
}

/// The parameter as a pass that writes sees it: the update writes it, a
/// matrix block's loop only reads it.
enum ParamIo<'a> {
    Write(&'a mut [f32]),
    Read(&'a [f32]),
}

impl ParamIo<'_> {
    fn read(&self) -> &[f32] {
        match self {
            ParamIo::Write(p) => p,
            ParamIo::Read(p) => p,
        }
    }

    fn write(&mut self) -> &mut [f32] {
        match self {
            ParamIo::Write(p) => p,
            ParamIo::Read(_) => unreachable!("only the update pass writes the parameter"),
        }
    }
}

/// Where an operand of an element loop comes from.
#[derive(Clone, Copy, Debug)]
enum Ref {
    P,
    G,
    State(usize),
    /// A column computed in this loop.
    Col(usize),
    /// A scalar of the step or the tensor (by place in `LoopCode::hoisted`).
    Hoisted(usize),
    Const(f32),
}

#[derive(Clone, Debug)]
enum Instr {
    /// A row reduction's result for the element's row (`slot`).
    Row(usize),
    /// A result over the axis for the element's row or column (`slot`).
    DimRow(Axis, usize),
    /// A state reduced over the axis: its value for the element's row or column.
    Gather(usize, Axis),
    Unary(UnaryOp, Ref),
    Binary(BinaryOp, Ref, Ref),
    Select(Ref, Ref, Ref),
}

/// One element loop: columns computed in node order.
#[derive(Clone, Debug, Default)]
struct LoopCode {
    /// `(column, instruction)`.
    instrs: Vec<(usize, Instr)>,
    /// Scalar nodes the loop reads, converted to f32 once per call.
    hoisted: Vec<(NodeId, Level)>,
    cols: usize,
}

#[derive(Clone, Debug)]
struct Red {
    /// Index into the reductions (whole) or the row slot (rows).
    index: usize,
    op: Fold,
    arg: Ref,
    /// The finite check: summed in f32 lanes, as the generated code does.
    check: bool,
}

#[derive(Clone, Debug, Default)]
struct PassPlan {
    code: LoopCode,
    whole: Vec<Red>,
    rows: Vec<Red>,
    /// Sums over one of the last two dimensions (`index`: the slot).
    dims: Vec<(Axis, Red)>,
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Param,
    State(usize),
    /// A state reduced over the axis: the last element of each row or
    /// column writes it.
    Reduced(usize, Axis),
}

#[derive(Clone, Debug, Default)]
struct UpdatePlan {
    code: LoopCode,
    outputs: Vec<(Target, Ref)>,
}

/// A compiled spec: its IR and the plans the evaluator runs.
struct Exec {
    prog: Program,
    desc: &'static KernelDesc,
    /// Step-level scalar nodes by phase, in node order.
    step_nodes: Vec<Vec<NodeId>>,
    tensor_nodes: Vec<Vec<NodeId>>,
    passes: Vec<PassPlan>,
    update: UpdatePlan,
    /// Each matrix block's loop (its value into its state).
    mats: Vec<UpdatePlan>,
    row_reductions: usize,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

fn fold(op: ReduceOp) -> Fold {
    match op {
        ReduceOp::Sum => Fold::Sum,
        ReduceOp::Max => Fold::Max,
    }
}

fn describe(prog: &Program) -> &'static KernelDesc {
    let hypers: Vec<HyperInfo> = prog
        .hypers
        .iter()
        .map(|h| HyperInfo {
            name: leak(&h.name),
            kind: match h.kind {
                ir::HyperKind::Float => HyperKind::Float,
                ir::HyperKind::Int => HyperKind::Int,
                ir::HyperKind::Bool => HyperKind::Bool,
            },
            default: h.default,
            lower: h.lower,
            upper: h.upper,
        })
        .collect();
    let states: Vec<StateInfo> = prog
        .states
        .iter()
        .map(|s| StateInfo {
            name: leak(&s.name),
            fill: s.fill as f32,
            reduced: s.reduced,
            per_tensor: s.per_tensor,
            storage: crate::Storage::parse(s.storage).unwrap_or_default(),
        })
        .collect();
    let reductions: Vec<ReductionInfo> = prog
        .reductions
        .iter()
        .map(|r| ReductionInfo {
            op: fold(r.op),
            scope: match r.scope {
                ir::Scope::Tensor => Scope::Tensor,
                ir::Scope::Global => Scope::Global,
                ir::Scope::Rows => Scope::Rows,
                ir::Scope::Dim(a) => Scope::Dim(a),
            },
            pass: r.pass,
        })
        .collect();
    let kernels: Vec<&'static str> = backend::cuda::kernel_names(prog)
        .iter()
        .map(|k| leak(k))
        .collect();
    Box::leak(Box::new(KernelDesc {
        name: leak(&prog.name),
        spec: leak(&prog.spec_text),
        generated_rust: "",
        cuda_source: leak(&backend::cuda::full_source(prog)),
        cuda_kernel_source: leak(&backend::cuda::emit(prog)),
        cuda_kernels: Box::leak(kernels.into_boxed_slice()),
        hypers: Box::leak(hypers.into_boxed_slice()),
        states: Box::leak(states.into_boxed_slice()),
        reductions: Box::leak(reductions.into_boxed_slice()),
        passes: prog.n_phases,
        pass_reads: Box::leak(backend::pass_reads(prog).into_boxed_slice()),
        finite_check: prog.finite_check,
        row_reductions: prog.row_reductions(),
        dim_reductions: [
            prog.scope_reductions(ir::Scope::Dim(Axis::Last)),
            prog.scope_reductions(ir::Scope::Dim(Axis::SecondLast)),
        ],
        factored: prog.factored(),
        cpu_only: prog.cpu_only().map(|w| leak(&w)),
        writes_param: prog.param_written(),
        matrices: Box::leak(
            prog.mats
                .iter()
                .map(|b| MatrixInfo {
                    name: leak(&b.name),
                    phase: b.phase,
                    state: b.state,
                    regs: b.regs,
                    code: Box::leak(b.code.clone().into_boxed_slice()),
                })
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        ),
    }))
}

impl Exec {
    fn new(prog: Program) -> Exec {
        let desc = describe(&prog);
        let mut step_nodes = vec![vec![]; prog.n_phases + 1];
        let mut tensor_nodes = vec![vec![]; prog.n_phases + 1];
        for level in [Level::Step, Level::Tensor] {
            for id in backend::scalar_nodes(&prog, level) {
                let ph = prog.nodes[id].phase;
                let v = if level == Level::Step {
                    &mut step_nodes
                } else {
                    &mut tensor_nodes
                };
                if v.len() <= ph {
                    v.resize(ph + 1, vec![]);
                }
                v[ph].push(id);
            }
        }
        let mut passes = vec![];
        for k in 0..prog.n_phases {
            let pass = backend::PassPlan::reduce(&prog, k);
            let (code, map) = loop_code(&prog, &pass.lp);
            let mut plan = PassPlan {
                code,
                ..Default::default()
            };
            for &(i, r) in &pass.reductions {
                if let ir::Scope::Dim(a) = r.scope {
                    plan.dims.push((
                        a,
                        Red {
                            index: prog.row_slot(i).expect("a dimension reduction"),
                            op: fold(r.op),
                            arg: map(r.arg),
                            check: false,
                        },
                    ));
                } else if r.scope == ir::Scope::Rows {
                    plan.rows.push(Red {
                        index: prog.row_slot(i).expect("a row reduction"),
                        op: fold(r.op),
                        arg: map(r.arg),
                        check: false,
                    });
                } else {
                    plan.whole.push(Red {
                        index: i,
                        op: fold(r.op),
                        arg: map(r.arg),
                        check: i == prog.finite_check,
                    });
                }
            }
            passes.push(plan);
        }
        let pass = backend::PassPlan::update(&prog);
        let (code, map) = loop_code(&prog, &pass.lp);
        let mut outputs = vec![];
        if let Some(p) = pass.param_write {
            outputs.push((Target::Param, map(p)));
        }
        for &(i, value) in &pass.state_writes {
            let target = match prog.states[i].reduced {
                Some(a) => Target::Reduced(i, a),
                None => Target::State(i),
            };
            outputs.push((target, map(value)));
        }
        drop(map);
        drop(pass);
        let mut mats = vec![];
        for b in 0..prog.mats.len() {
            let pass = backend::PassPlan::matrix(&prog, b);
            let (code, map) = loop_code(&prog, &pass.lp);
            let outputs = pass
                .state_writes
                .iter()
                .map(|&(i, value)| (Target::State(i), map(value)))
                .collect();
            mats.push(UpdatePlan { code, outputs });
        }
        let row_reductions = prog.row_reductions();
        Exec {
            desc,
            step_nodes,
            tensor_nodes,
            passes,
            update: UpdatePlan { code, outputs },
            mats,
            row_reductions,
            prog,
        }
    }

    /// A scalar node's value in f64, from its operands (the generated host
    /// code's arithmetic: [`UnaryOp::eval_f64`], [`BinaryOp::eval_f64`]).
    fn scalar_op(&self, id: NodeId, s: &[f64], ts: &[f64]) -> f64 {
        let val = |c: NodeId| -> f64 {
            let n = &self.prog.nodes[c];
            match n.op {
                Op::Num(v) => v,
                Op::Bool(b) => f64::from(u8::from(b)),
                _ if n.level == Level::Step => s[c],
                _ => ts[c],
            }
        };
        let b = |x: bool| f64::from(u8::from(x));
        match self.prog.nodes[id].op {
            Op::Num(v) => v,
            Op::Bool(x) => b(x),
            Op::Unary(UnaryOp::Not, a) => b(val(a) == 0.0),
            Op::Unary(op, a) => op.eval_f64(val(a)).expect("a numeric op"),
            Op::Binary(BinaryOp::And, x, y) => b(val(x) != 0.0 && val(y) != 0.0),
            Op::Binary(BinaryOp::Or, x, y) => b(val(x) != 0.0 || val(y) != 0.0),
            Op::Binary(op, x, y) => match op.eval_f64(val(x), val(y)).expect("a numeric op") {
                Scalar::Num(v) => v,
                Scalar::Bool(v) => b(v),
            },
            Op::Select(c, x, y) => {
                if val(c) != 0.0 {
                    val(x)
                } else {
                    val(y)
                }
            }
            other => unreachable!("scalar node {id} is {other:?}, computed by the caller"),
        }
    }
}

/// The element loop computing `roots`, and how to find each root's value.
fn loop_code<'p>(prog: &'p Program, plan: &LoopPlan) -> (LoopCode, impl Fn(NodeId) -> Ref + 'p) {
    let mut code = LoopCode::default();
    let mut refs: HashMap<NodeId, Ref> = HashMap::new();
    for &id in &plan.hoisted {
        refs.insert(id, Ref::Hoisted(code.hoisted.len()));
        code.hoisted.push((id, prog.nodes[id].level));
    }
    let r = |refs: &HashMap<NodeId, Ref>, id: NodeId| -> Ref {
        match prog.nodes[id].op {
            // As the Rust printer's element literals: rounded to f32.
            Op::Num(v) => Ref::Const(v as f32),
            Op::Bool(b) => Ref::Const(f32::from(u8::from(b))),
            _ => refs[&id],
        }
    };
    for &id in &plan.body {
        let instr = match prog.nodes[id].op {
            Op::Param => {
                refs.insert(id, Ref::P);
                continue;
            }
            Op::Grad => {
                refs.insert(id, Ref::G);
                continue;
            }
            Op::State(s) => match prog.states[s].reduced {
                Some(a) => Instr::Gather(s, a),
                None => {
                    refs.insert(id, Ref::State(s));
                    continue;
                }
            },
            Op::MatOut(b) => {
                refs.insert(id, Ref::State(prog.mats[b].state));
                continue;
            }
            Op::Reduced(red) => {
                let slot = prog
                    .row_slot(red)
                    .expect("a per-element reduction reads rows");
                match prog.reductions[red].scope {
                    ir::Scope::Dim(a) => Instr::DimRow(a, slot),
                    _ => Instr::Row(slot),
                }
            }
            Op::Unary(op, a) => Instr::Unary(op, r(&refs, a)),
            Op::Binary(op, a, b) => Instr::Binary(op, r(&refs, a), r(&refs, b)),
            Op::Select(c, a, b) => Instr::Select(r(&refs, c), r(&refs, a), r(&refs, b)),
            other => unreachable!("element node {id} is {other:?}"),
        };
        let col = code.cols;
        code.cols += 1;
        code.instrs.push((col, instr));
        refs.insert(id, Ref::Col(col));
    }
    let find = move |id: NodeId| r(&refs, id);
    (code, find)
}

/// The element inputs of one chunk.
struct Inputs<'a> {
    p: &'a [f32],
    g: &'a [f32],
    st: [&'a [f32]; MAX_STATES],
}

/// What a pass needs to read per-element reduction results.
#[derive(Clone, Copy)]
struct RowCtx<'a> {
    rows: &'a [f64],
    dims: Dims,
    per_row: usize,
    desc: &'static KernelDesc,
}

impl<'a> RowCtx<'a> {
    fn of(rows: &'a [f64], dims: Dims, e: &Exec) -> Self {
        RowCtx {
            rows,
            dims,
            per_row: e.row_reductions,
            desc: e.desc,
        }
    }

    fn per(&self, a: Axis) -> usize {
        self.desc.dim_reductions_over(a)
    }
}

/// An operand over a block: a slice or one value for every element.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Slice(&'a [f32]),
    Splat(f32),
}

/// Per-thread columns, reused by every call.
#[derive(Default)]
struct Scratch {
    cols: Vec<Vec<f32>>,
    out: Vec<Vec<f32>>,
    hoisted: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// This thread's columns (moved out, so no borrow spans the pass).
#[inline(always)]
fn take_scratch() -> Scratch {
    SCRATCH.with(|s| s.take())
}

#[inline(always)]
fn put_scratch(s: Scratch) {
    SCRATCH.with(|c| c.set(s));
}

impl Scratch {
    /// Columns for `code` and its scalars as f32 (the generated code's
    /// `as f32` of each hoisted f64; bools as 0 or 1).
    fn prepare(&mut self, code: &LoopCode, s: &Scalars, ts: &Scalars) {
        if self.cols.len() < code.cols {
            self.cols.resize_with(code.cols, || vec![0.0; BLOCK]);
        }
        self.hoisted.clear();
        self.hoisted.extend(code.hoisted.iter().map(|&(id, level)| {
            let v = if level == Level::Step {
                s.0[id]
            } else {
                ts.0[id]
            };
            v as f32
        }));
    }

    #[inline(always)]
    fn arg<'a>(&'a self, r: Ref, inp: &Inputs<'a>, off: usize, n: usize) -> Arg<'a> {
        match r {
            Ref::P => Arg::Slice(&inp.p[off..off + n]),
            Ref::G => Arg::Slice(&inp.g[off..off + n]),
            Ref::State(s) => Arg::Slice(&inp.st[s][off..off + n]),
            Ref::Col(c) => Arg::Slice(&self.cols[c][..n]),
            Ref::Hoisted(h) => Arg::Splat(self.hoisted[h]),
            Ref::Const(v) => Arg::Splat(v),
        }
    }

    /// Computes every column of `code` for elements `[off, off + n)`.
    #[inline(always)]
    fn eval(&mut self, code: &LoopCode, inp: &Inputs<'_>, rc: RowCtx<'_>, off: usize, n: usize) {
        for (col, instr) in &code.instrs {
            let mut out = std::mem::take(&mut self.cols[*col]);
            let o = &mut out[..n];
            match *instr {
                Instr::Row(slot) => {
                    for (i, x) in o.iter_mut().enumerate() {
                        *x = rc.rows[((off + i) / rc.dims.row_len) * rc.per_row + slot] as f32;
                    }
                }
                Instr::DimRow(a, slot) => {
                    let (view, at, per) = (rc.dims.view(), rc.dims.at(a), rc.per(a));
                    for (i, x) in o.iter_mut().enumerate() {
                        *x = rc.rows[at + view.index(a, off + i) * per + slot] as f32;
                    }
                }
                Instr::Gather(s, a) => {
                    let view = rc.dims.view();
                    for (i, x) in o.iter_mut().enumerate() {
                        *x = inp.st[s][view.index(a, off + i)];
                    }
                }
                Instr::Unary(op, a) => {
                    let a = self.arg(a, inp, off, n);
                    unary(op, o, a);
                }
                Instr::Binary(op, a, b) => {
                    let (a, b) = (self.arg(a, inp, off, n), self.arg(b, inp, off, n));
                    binary(op, o, a, b);
                }
                Instr::Select(c, a, b) => {
                    let c = self.arg(c, inp, off, n);
                    let (a, b) = (self.arg(a, inp, off, n), self.arg(b, inp, off, n));
                    select(o, c, a, b);
                }
            }
            self.cols[*col] = out;
        }
    }
}

/// Folds `n` values into `lanes`, value `i` into lane `i % LANES` (the
/// caller's first element is at a multiple of LANES), in element order.
#[inline(always)]
fn fold_into(lanes: &mut [f64; LANES], op: Fold, v: Arg<'_>, n: usize) {
    match op {
        Fold::Sum => fold_with(lanes, v, n, |a, y| a + f64::from(y)),
        Fold::Max => fold_with(lanes, v, n, |a, y| Fold::Max.combine(a, f64::from(y))),
    }
}

#[inline(always)]
fn fold_with(lanes: &mut [f64; LANES], v: Arg<'_>, n: usize, f: impl Fn(f64, f32) -> f64) {
    match v {
        Arg::Slice(x) => {
            let x = &x[..n];
            let body = x.len() - x.len() % LANES;
            for c in x[..body].chunks_exact(LANES) {
                for l in 0..LANES {
                    lanes[l] = f(lanes[l], c[l]);
                }
            }
            for (l, &y) in x[body..].iter().enumerate() {
                lanes[l] = f(lanes[l], y);
            }
        }
        Arg::Splat(y) => {
            for i in 0..n {
                lanes[i % LANES] = f(lanes[i % LANES], y);
            }
        }
    }
}

/// The finite check's f32 lanes (as the generated code sums `g * 0`).
#[inline(always)]
fn fold_check(lanes: &mut [f32; LANES], v: Arg<'_>, n: usize) {
    match v {
        Arg::Slice(x) => {
            let x = &x[..n];
            let body = x.len() - x.len() % LANES;
            for c in x[..body].chunks_exact(LANES) {
                for l in 0..LANES {
                    lanes[l] += c[l];
                }
            }
            for (l, &y) in x[body..].iter().enumerate() {
                lanes[l] += y;
            }
        }
        Arg::Splat(y) => {
            for i in 0..n {
                lanes[i % LANES] += y;
            }
        }
    }
}

#[inline(always)]
fn map1(o: &mut [f32], a: Arg<'_>, f: impl Fn(f32) -> f32) {
    match a {
        Arg::Slice(a) => {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = f(a)
            }
        }
        Arg::Splat(a) => o.fill(f(a)),
    }
}

#[inline(always)]
fn map2(o: &mut [f32], a: Arg<'_>, b: Arg<'_>, f: impl Fn(f32, f32) -> f32) {
    match (a, b) {
        (Arg::Slice(a), Arg::Slice(b)) => {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b)
            }
        }
        (Arg::Slice(a), Arg::Splat(b)) => {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = f(a, b)
            }
        }
        (Arg::Splat(a), Arg::Slice(b)) => {
            for (o, &b) in o.iter_mut().zip(b) {
                *o = f(a, b)
            }
        }
        (Arg::Splat(a), Arg::Splat(b)) => o.fill(f(a, b)),
    }
}

/// `c ? a : b` per element (bools are 0 or 1).
#[inline(always)]
fn select(o: &mut [f32], c: Arg<'_>, a: Arg<'_>, b: Arg<'_>) {
    match c {
        // A condition of the step or the tensor picks one side whole.
        Arg::Splat(c) => map1(o, if c != 0.0 { a } else { b }, |x| x),
        Arg::Slice(c) => match (a, b) {
            (Arg::Slice(a), Arg::Slice(b)) => {
                for (((o, &c), &a), &b) in o.iter_mut().zip(c).zip(a).zip(b) {
                    *o = if c != 0.0 { a } else { b }
                }
            }
            (Arg::Slice(a), Arg::Splat(b)) => {
                for ((o, &c), &a) in o.iter_mut().zip(c).zip(a) {
                    *o = if c != 0.0 { a } else { b }
                }
            }
            (Arg::Splat(a), Arg::Slice(b)) => {
                for ((o, &c), &b) in o.iter_mut().zip(c).zip(b) {
                    *o = if c != 0.0 { a } else { b }
                }
            }
            (Arg::Splat(a), Arg::Splat(b)) => {
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = if c != 0.0 { a } else { b }
                }
            }
        },
    }
}

#[inline(always)]
fn unary(op: UnaryOp, o: &mut [f32], a: Arg<'_>) {
    match op {
        UnaryOp::Neg => map1(o, a, |x| -x),
        UnaryOp::Not => map1(o, a, |x| f32::from(u8::from(x == 0.0))),
        UnaryOp::Sqrt => map1(o, a, f32::sqrt),
        UnaryOp::Abs => map1(o, a, f32::abs),
        UnaryOp::Sign => map1(o, a, sign_f32),
        UnaryOp::Exp => map1(o, a, f32::exp),
        UnaryOp::Ln => map1(o, a, f32::ln),
    }
}

#[inline(always)]
fn binary(op: BinaryOp, o: &mut [f32], a: Arg<'_>, b: Arg<'_>) {
    let t = |x: bool| f32::from(u8::from(x));
    match op {
        BinaryOp::Add => map2(o, a, b, |x, y| x + y),
        BinaryOp::Sub => map2(o, a, b, |x, y| x - y),
        BinaryOp::Mul => map2(o, a, b, |x, y| x * y),
        BinaryOp::Div => map2(o, a, b, |x, y| x / y),
        BinaryOp::Pow => map2(o, a, b, f32::powf),
        BinaryOp::Min => map2(o, a, b, f32::min),
        BinaryOp::Max => map2(o, a, b, f32::max),
        BinaryOp::Lt => map2(o, a, b, |x, y| t(x < y)),
        BinaryOp::Le => map2(o, a, b, |x, y| t(x <= y)),
        BinaryOp::Gt => map2(o, a, b, |x, y| t(x > y)),
        BinaryOp::Ge => map2(o, a, b, |x, y| t(x >= y)),
        BinaryOp::Eq => map2(o, a, b, |x, y| t(x == y)),
        BinaryOp::Ne => map2(o, a, b, |x, y| t(x != y)),
        BinaryOp::And => map2(o, a, b, |x, y| t(x != 0.0 && y != 0.0)),
        BinaryOp::Or => map2(o, a, b, |x, y| t(x != 0.0 || y != 0.0)),
    }
}

//! The main job: a real training run with the built-in AGR optimizers.
//!
//! Trains a candle MLP (64 → 64 ReLU → 10, softmax cross-entropy) on the
//! handwritten-digits data the repository ships, with AdamW,
//! AdamW-AGR, Adan, Adan-AGR and Muon-AGR (on the hidden weight matrix, with
//! AdamW-AGR on the rest) over several seeds on one fixed train/test
//! split; prints progress and a table of final test accuracy and loss
//! (mean ± std over seeds); writes the curves (CSV and SVG) and the table.
//!
//!     cargo run --release --example digits -- --help

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use agr_runtime::candle::CandleDyn;
use agr_runtime::comm::Comm;
use agr_runtime::groups::ParamGroups;
use agr_runtime::multi::Multi;
use agr_runtime::schedule::{Constant, Schedule, WarmupCosine};
use agr_runtime::shard::GradMode;
use agr_runtime::{optim, DynOptimizer, HyperValue};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(about = "Train a digit classifier with agr's optimizers and compare them")]
struct Args {
    /// Optimizers to compare: built-in names (see `agr list`) or paths of
    /// your own `.agr` spec files (compiled at run time, with the spec's
    /// defaults). `A+B` is one optimizer with two parts: A on the hidden
    /// weight matrix (`fc1.weight`), B on the rest (the head and the
    /// biases), as Muon is meant to be used: `muon_agr+adamw_agr`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adamw,adamw_agr,adan,adan_agr,muon_agr+adamw_agr"
    )]
    optimizers: Vec<String>,
    /// Number of seeds per optimizer.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Epochs per run.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Learning rate for every optimizer (default: 2e-3 for AdamW-type,
    /// 5e-3 for Adan-type, 0.02 for Muon-type); for `A+B` it is B's, and A
    /// keeps the ratio of their defaults.
    #[arg(long)]
    lr: Option<f64>,
    /// Parameter groups: `paper` trains 1-D parameters (biases) without
    /// weight decay and without Ψ, as the AGR paper did; `none` treats every
    /// parameter alike.
    #[arg(long, value_enum, default_value = "paper")]
    groups: Groups,
    /// Learning-rate schedule: `constant`, or `cosine` (linear warm-up over
    /// the first epoch, then a half cosine down to lr/100 at the last step).
    #[arg(long, value_enum, default_value = "constant")]
    schedule: ScheduleKind,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Output folder for curves.csv, curves.svg and results.md.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Where the run trains: `cpu`; `emulated-cuda` (the model on the CPU,
    /// agr's step by the generated CUDA kernels compiled as host C++ and
    /// launched block by block, as on a GPU); or `cuda` / `cuda:N` (the model
    /// and the optimizer on the GPU, stepped in place on candle's stream:
    /// needs the `candle-cuda` feature and a GPU; without either the run
    /// says so and uses the CPU).
    #[arg(long, default_value = "cpu")]
    device: agr_runtime::Device,
    /// Data-parallel over N ranks: each mini-batch is cut into N slices,
    /// each rank's gradient is its slice's share of the batch's loss, the
    /// ranks' gradients are added in rank order and the optimizer is
    /// sharded (each rank keeps the state of 1/N of the parameters).
    /// Under `mpirun -np N` (built with `--features mpi`) each process is a
    /// rank; in one process the N slices run one after the other, with the
    /// same arithmetic: the two give the same bits. CPU only.
    #[arg(long)]
    ranks: Option<usize>,
    /// The data: gzipped CSV, 64 pixels (0..16) then the label per line.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"))]
    data: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScheduleKind {
    Constant,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Groups {
    Paper,
    None,
}

const IN: usize = 64;
const HIDDEN: usize = 64;
const CLASSES: usize = 10;

struct Data {
    x: Vec<f32>,
    y: Vec<usize>,
}

impl Data {
    fn len(&self) -> usize {
        self.y.len()
    }
}

fn load(path: &PathBuf) -> Result<Data, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot open the data file {}: {e}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("{} is not a gzipped text file: {e}", path.display()))?;
    let (mut x, mut y) = (vec![], vec![]);
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Vec<f32> = line
            .split(',')
            .map(|s| s.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}:{}: not a number: {e}", path.display(), n + 1))?;
        if v.len() != IN + 1 {
            return Err(format!(
                "{}:{}: expected {} values, found {}",
                path.display(),
                n + 1,
                IN + 1,
                v.len()
            ));
        }
        x.extend(v[..IN].iter().map(|p| p / 16.0));
        let label = v[IN] as usize;
        if label >= CLASSES {
            return Err(format!(
                "{}:{}: label {} is not a digit",
                path.display(),
                n + 1,
                v[IN]
            ));
        }
        y.push(label);
    }
    Ok(Data { x, y })
}

/// A fixed 80/20 split, the same for every run.
fn split(d: &Data) -> (Data, Data) {
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(20_240_501));
    let n_train = d.len() * 4 / 5;
    let take = |ids: &[usize]| Data {
        x: ids
            .iter()
            .flat_map(|&i| d.x[i * IN..(i + 1) * IN].iter().copied())
            .collect(),
        y: ids.iter().map(|&i| d.y[i]).collect(),
    };
    (take(&idx[..n_train]), take(&idx[n_train..]))
}

/// The model: a candle MLP, 64 → 64 (ReLU) → 10, its variables named
/// `fc1.weight`, `fc1.bias`, `fc2.weight`, `fc2.bias` in a `VarMap`.
struct Mlp {
    varmap: VarMap,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// He-initialised weights and zero biases from `rng` (candle's own
    /// initialisers draw from an unseeded generator; runs must repeat).
    fn new(rng: &mut StdRng, dev: &Device) -> candle_core::Result<Mlp> {
        let mut he = |fan_in: usize, shape: (usize, usize)| -> candle_core::Result<Tensor> {
            let s = (2.0 / fan_in as f32).sqrt();
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| {
                    // Box-Muller.
                    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                    s * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect();
            Tensor::from_vec(v, shape, dev)
        };
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("not poisoned");
            let mut put = |name: &str, t: Tensor| -> candle_core::Result<()> {
                data.insert(name.to_string(), Var::from_tensor(&t)?);
                Ok(())
            };
            put("fc1.weight", he(IN, (HIDDEN, IN))?)?;
            put("fc1.bias", Tensor::zeros(HIDDEN, DType::F32, dev)?)?;
            put("fc2.weight", he(HIDDEN, (CLASSES, HIDDEN))?)?;
            put("fc2.bias", Tensor::zeros(CLASSES, DType::F32, dev)?)?;
        }
        // The layers take the variables just stored (same names and shapes).
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let fc1 = candle_nn::linear(IN, HIDDEN, vb.pp("fc1"))?;
        let fc2 = candle_nn::linear(HIDDEN, CLASSES, vb.pp("fc2"))?;
        Ok(Mlp { varmap, fc1, fc2 })
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
}

/// A data set as candle tensors: images [n, 64], labels [n] (u32).
struct Tensors {
    x: Tensor,
    y: Tensor,
}

impl Tensors {
    fn new(d: &Data, dev: &Device) -> candle_core::Result<Tensors> {
        Ok(Tensors {
            x: Tensor::from_slice(&d.x, (d.len(), IN), dev)?,
            y: Tensor::from_vec(
                d.y.iter().map(|&v| v as u32).collect::<Vec<u32>>(),
                d.len(),
                dev,
            )?,
        })
    }

    /// Mean cross-entropy and accuracy of `model`.
    fn evaluate(&self, model: &Mlp) -> candle_core::Result<(f32, f32)> {
        let logits = model.logits(&self.x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &self.y)?.to_scalar::<f32>()?;
        let correct = logits
            .argmax(1)?
            .eq(&self.y)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        Ok((loss, correct))
    }
}

/// Per-epoch averages: train loss, test loss, test accuracy.
#[derive(Clone, Default)]
struct Curve {
    train_loss: Vec<f32>,
    test_loss: Vec<f32>,
    test_acc: Vec<f32>,
}

fn default_lr(name: &str) -> f64 {
    if let Some((_, rest)) = name.split_once('+') {
        default_lr(rest)
    } else if name.starts_with("adan") {
        5e-3
    } else if name.starts_with("muon") {
        0.02
    } else {
        2e-3
    }
}

/// The learning rate as the table shows it: `A+B` shows both parts'.
fn lr_label(name: &str, lr: f64) -> String {
    match name.split_once('+') {
        Some((hidden, rest)) => {
            let hidden_lr = lr * default_lr(hidden) / default_lr(rest);
            format!("{}+{lr}", (hidden_lr * 1e9).round() / 1e9)
        }
        None => lr.to_string(),
    }
}

/// The candle device the model lives on: the GPU for `cuda:N`, else the CPU
/// (`emulated-cuda` runs agr's kernels on host memory).
fn model_device(device: agr_runtime::Device) -> candle_core::Result<Device> {
    match device {
        #[cfg(feature = "candle-cuda")]
        agr_runtime::Device::Cuda(n) => Device::new_cuda(n),
        #[cfg(not(feature = "candle-cuda"))]
        agr_runtime::Device::Cuda(_) => Err(candle_core::Error::Msg(
            "this build trains on the CPU (a GPU model needs the `candle-cuda` feature)".into(),
        )),
        _ => Ok(Device::Cpu),
    }
}

/// Where the optimizer starts: on a GPU run the candle adapter moves it to
/// the model's stream on the first step, so it starts on the CPU.
fn optimizer_device(device: agr_runtime::Device) -> agr_runtime::Device {
    match device {
        agr_runtime::Device::Cuda(_) => agr_runtime::Device::Cpu,
        d => d,
    }
}

/// A built-in by name, or a user's spec file compiled at run time
/// (`agr_runtime::compile_file`): either way the same engine, with groups,
/// the non-finite check and the candle adapter. `A+B`: A on the hidden
/// weight matrix, B on the rest, as one optimizer (`agr_runtime::multi`).
fn make(name: &str, lr: f64, device: agr_runtime::Device) -> Result<Box<dyn DynOptimizer>, String> {
    let mut opt = match name.split_once('+') {
        Some((hidden, rest)) => {
            let hidden_lr = lr * default_lr(hidden) / default_lr(rest);
            Box::new(
                Multi::new(make_one(rest, lr)?)
                    .part(
                        "hidden",
                        |p| p.ndim() >= 2 && p.name != "fc2.weight",
                        make_one(hidden, hidden_lr)?,
                    )
                    .map_err(|e| format!("{name}: {e}"))?,
            )
        }
        None => make_one(name, lr)?,
    };
    opt.set_device(optimizer_device(device))
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(opt)
}

/// One spec, with its learning rate.
fn make_one(name: &str, lr: f64) -> Result<Box<dyn DynOptimizer>, String> {
    let mut opt = if name.ends_with(".agr") {
        agr_runtime::compile_file(name)
            .map_err(|e| e.to_string())?
            .boxed()
    } else {
        optim::builtin_or_err(name)
            .map_err(|e| format!("{e} (or give a `.agr` spec file)"))?
            .make()
    };
    if opt.hyper("lr").is_none() {
        return Err(format!("{name}: the spec has no hyperparameter `lr`"));
    }
    opt.set_hyper("lr", HyperValue::Float(lr))
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(opt)
}

/// An optimizer for one run, through the candle adapter.
struct Stepper(CandleDyn);

impl Stepper {
    fn new(name: &str, lr: f64, args: &Args, model: &Mlp) -> Result<Stepper, String> {
        let (groups, device) = (args.groups, args.device);
        let mut opt = CandleDyn::from_varmap(make(name, lr, device)?, &model.varmap)
            .map_err(|e| format!("{name}: {e}"))?;
        if groups == Groups::Paper {
            // 1-D parameters (biases) without weight decay and, for the
            // AGR optimizers, without Ψ.
            opt.set_param_groups(&ParamGroups::paper())
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(Stepper(opt))
    }

    fn set_learning_rate(&mut self, lr: f64) -> Result<(), String> {
        self.0.opt.set_lr(lr).map_err(|e| e.to_string())
    }

    /// `loss.backward()` and one step; the index of a variable whose
    /// gradient was not finite, if the step was skipped for it (on a CUDA
    /// device the device decides: see `skipped`).
    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<Option<usize>> {
        Ok(self
            .0
            .backward_step(loss)?
            .and_then(|r| r.skipped_non_finite))
    }

    /// Steps skipped for a non-finite gradient so far.
    fn skipped(&self) -> u64 {
        self.0.opt.non_finite_skips()
    }
}

/// The learning-rate schedule of a run over `n_train` images.
fn schedule_of(args: &Args, lr: f64, n_train: usize) -> Box<dyn Schedule> {
    let steps_per_epoch = n_train.div_ceil(args.batch) as u64;
    match args.schedule {
        ScheduleKind::Constant => Box::new(Constant(lr)),
        ScheduleKind::Cosine => Box::new(WarmupCosine {
            peak: lr,
            floor: lr / 100.0,
            warmup: steps_per_epoch,
            total: steps_per_epoch * args.epochs as u64,
        }),
    }
}

fn train(
    name: &str,
    lr: f64,
    seed: u64,
    args: &Args,
    train: &Data,
    test: &Data,
) -> Result<Curve, String> {
    let e = |e: candle_core::Error| format!("{name} seed {seed}: {e}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = model_device(args.device).map_err(e)?;
    let model = Mlp::new(&mut rng, &dev).map_err(e)?;
    let mut opt = Stepper::new(name, lr, args, &model)?;
    let train_t = Tensors::new(train, &dev).map_err(e)?;
    let test_t = Tensors::new(test, &dev).map_err(e)?;
    let mut order: Vec<u32> = (0..train.len() as u32).collect();
    let schedule = schedule_of(args, lr, train.len());
    let mut step = 0u64;
    let mut reported_skips = 0u64;
    let mut curve = Curve::default();
    for _ in 0..args.epochs {
        order.shuffle(&mut rng);
        let mut epoch_loss = 0.0;
        for batch in order.chunks(args.batch) {
            let idx = Tensor::from_slice(batch, batch.len(), &dev).map_err(e)?;
            let x = train_t.x.index_select(&idx, 0).map_err(e)?;
            let y = train_t.y.index_select(&idx, 0).map_err(e)?;
            let loss =
                candle_nn::loss::cross_entropy(&model.logits(&x).map_err(e)?, &y).map_err(e)?;
            epoch_loss += loss.to_scalar::<f32>().map_err(e)? * batch.len() as f32;
            opt.set_learning_rate(schedule.lr(step))
                .map_err(|e| format!("{name}: {e}"))?;
            step += 1;
            if let Some(i) = opt.backward_step(&loss).map_err(e)? {
                eprintln!("{name} seed {seed}: skipped a step, the gradient of variable #{i} was not finite");
                reported_skips += 1;
            }
        }
        let (test_loss, test_acc) = test_t.evaluate(&model).map_err(e)?;
        if opt.skipped() > reported_skips {
            // Counted on the device (read back once an epoch).
            reported_skips = opt.skipped();
            eprintln!("{name} seed {seed}: {reported_skips} steps skipped so far (a gradient was not finite)");
        }
        curve.train_loss.push(epoch_loss / train.len() as f32);
        curve.test_loss.push(test_loss);
        curve.test_acc.push(test_acc);
    }
    Ok(curve)
}

fn mean_std(v: &[f32]) -> (f32, f32) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn plot(
    path: &PathBuf,
    names: &[String],
    curves: &[Curve],
    epochs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    let max_loss = curves
        .iter()
        .flat_map(|c| c.test_loss.iter().chain(&c.train_loss))
        .cloned()
        .fold(0.0f32, f32::max);
    let mut chart = ChartBuilder::on(&left)
        .caption("loss (mean over seeds)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(1..epochs, 0f32..max_loss.min(2.5))?;
    chart.configure_mesh().x_desc("epoch").draw()?;
    for (i, (n, c)) in names.iter().zip(curves).enumerate() {
        let col = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                c.test_loss.iter().enumerate().map(|(e, v)| (e + 1, *v)),
                col,
            ))?
            .label(format!("{n} test"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col));
        chart.draw_series(LineSeries::new(
            c.train_loss.iter().enumerate().map(|(e, v)| (e + 1, *v)),
            col.mix(0.4).stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    let lo = curves
        .iter()
        .flat_map(|c| c.test_acc.iter().skip(2))
        .cloned()
        .fold(1.0f32, f32::min);
    let mut chart = ChartBuilder::on(&right)
        .caption("test accuracy (mean over seeds)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(1..epochs, lo.max(0.0)..1.0f32)?;
    chart.configure_mesh().x_desc("epoch").draw()?;
    for (i, (n, c)) in names.iter().zip(curves).enumerate() {
        let col = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                c.test_acc.iter().enumerate().map(|(e, v)| (e + 1, *v)),
                col,
            ))?
            .label(n.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The communicator of a data-parallel run: MPI's world under `mpirun`
/// (with the `mpi` feature), else none (one process runs every slice).
#[cfg(feature = "mpi")]
fn world(ranks: usize) -> Result<Option<Arc<dyn Comm>>, String> {
    let launched = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
        || std::env::var_os("PMI_SIZE").is_some();
    if !launched {
        return Ok(None);
    }
    let comm: Arc<dyn Comm> = Arc::new(agr_runtime::comm::Mpi::init().map_err(|e| e.to_string())?);
    match comm.size() {
        1 => Ok(None),
        n if n == ranks => Ok(Some(comm)),
        n => Err(format!(
            "--ranks {ranks} under mpirun -np {n}: give both the same number"
        )),
    }
}

#[cfg(not(feature = "mpi"))]
fn world(_: usize) -> Result<Option<Arc<dyn Comm>>, String> {
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some_and(|n| n != "1") {
        return Err(
            "this build has no MPI: build the example with `--features mpi` to run it under mpirun"
                .into(),
        );
    }
    Ok(None)
}

/// One data-parallel run over `ranks` ranks (see `--ranks`): this process
/// is rank `comm.rank()` of them, or all of them without `comm`.
fn train_ranks(
    name: &str,
    lr: f64,
    seed: u64,
    args: &Args,
    (train, test): (&Data, &Data),
    ranks: usize,
    comm: Option<&Arc<dyn Comm>>,
) -> Result<Curve, String> {
    let e = |e: candle_core::Error| format!("{name} seed {seed}: {e}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let model = Mlp::new(&mut rng, &dev).map_err(e)?;
    // The variables in name order: the same on every rank.
    let mut named: Vec<(String, Var)> = model
        .varmap
        .data()
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let shapes: Vec<Vec<usize>> = named.iter().map(|(_, v)| v.dims().to_vec()).collect();
    let mut opt = make(name, lr, agr_runtime::Device::Cpu)?;
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    opt.set_param_names(names.clone())
        .map_err(|e| e.to_string())?;
    if args.groups == Groups::Paper {
        let params: Vec<(&str, &[usize])> = names
            .iter()
            .zip(&shapes)
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        opt.set_param_groups(&ParamGroups::paper(), &params)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    if let Some(c) = comm {
        // Each rank hands over its own gradients; the optimizer adds them
        // in rank order (one all-to-all) and steps its shard.
        opt.shard(c.clone(), GradMode::ReduceScatter { mean: false })
            .map_err(|e| format!("{name}: {e}"))?;
    }
    let mine: Vec<usize> = match comm {
        Some(c) => vec![c.rank()],
        None => (0..ranks).collect(),
    };
    let train_t = Tensors::new(train, &dev).map_err(e)?;
    let test_t = Tensors::new(test, &dev).map_err(e)?;
    let mut order: Vec<u32> = (0..train.len() as u32).collect();
    let schedule = schedule_of(args, lr, train.len());
    let mut step = 0u64;
    let mut curve = Curve::default();
    for _ in 0..args.epochs {
        order.shuffle(&mut rng);
        let mut epoch_loss = 0.0f32;
        for batch in order.chunks(args.batch) {
            let b = batch.len();
            // Rank r's slice of the batch, and its share of the batch's
            // mean loss (its slice's mean times its size over the batch's).
            let mut losses = vec![0.0f64; ranks];
            let mut local: Vec<Vec<Vec<f32>>> = vec![];
            for &r in &mine {
                let (lo, hi) = (b * r / ranks, b * (r + 1) / ranks);
                if lo == hi {
                    local.push(
                        shapes
                            .iter()
                            .map(|s| vec![0.0; s.iter().product()])
                            .collect(),
                    );
                    continue;
                }
                let idx = Tensor::from_slice(&batch[lo..hi], hi - lo, &dev).map_err(e)?;
                let x = train_t.x.index_select(&idx, 0).map_err(e)?;
                let y = train_t.y.index_select(&idx, 0).map_err(e)?;
                let loss = (candle_nn::loss::cross_entropy(&model.logits(&x).map_err(e)?, &y)
                    .map_err(e)?
                    * ((hi - lo) as f64 / b as f64))
                    .map_err(e)?;
                losses[r] = f64::from(loss.to_scalar::<f32>().map_err(e)?);
                let grads = loss.backward().map_err(e)?;
                let mut g = vec![];
                for (n, v) in &named {
                    let t = grads
                        .get(v.as_tensor())
                        .ok_or_else(|| format!("{name}: no gradient for {n}"))?;
                    g.push(
                        t.flatten_all()
                            .and_then(|t| t.to_vec1::<f32>())
                            .map_err(e)?,
                    );
                }
                local.push(g);
            }
            if let Some(c) = comm {
                // Every rank's share of the loss (for the curve).
                let mut all = vec![0.0; ranks];
                c.all_gather_f64(
                    "the ranks' losses",
                    &[losses[c.rank()]],
                    &vec![1; ranks],
                    &mut all,
                )
                .map_err(|e| e.to_string())?;
                losses = all;
            }
            // The batch's loss: the shares added in rank order.
            epoch_loss += losses.iter().fold(0.0f32, |a, &l| a + l as f32) * b as f32;
            let grads: Vec<Vec<f32>> = if comm.is_some() {
                local.pop().expect("this rank's gradients")
            } else {
                // One process: the ranks' gradients added in rank order, as
                // the sharded optimizer adds them.
                let mut sum = local[0].clone();
                for g in &local[1..] {
                    for (a, b) in sum.iter_mut().zip(g) {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += y;
                        }
                    }
                }
                sum
            };
            let mut values: Vec<Vec<f32>> = named
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()))
                .collect::<candle_core::Result<_>>()
                .map_err(e)?;
            opt.set_lr(schedule.lr(step))
                .map_err(|e| format!("{name}: {e}"))?;
            step += 1;
            {
                let mut params: Vec<agr_runtime::ParamMut<'_>> = values
                    .iter_mut()
                    .zip(&grads)
                    .zip(&shapes)
                    .map(|((v, g), s)| agr_runtime::ParamMut::new(v, Some(g), s))
                    .collect();
                let report = opt
                    .step_params(&mut params)
                    .map_err(|e| format!("{name} seed {seed}: {e}"))?;
                if let Some(i) = report.skipped_non_finite {
                    eprintln!("{name} seed {seed}: skipped a step, the gradient of variable #{i} was not finite");
                }
            }
            for ((_, var), (v, s)) in named.iter().zip(values.into_iter().zip(&shapes)) {
                var.set(&Tensor::from_vec(v, s.as_slice(), &dev).map_err(e)?)
                    .map_err(e)?;
            }
        }
        let (test_loss, test_acc) = test_t.evaluate(&model).map_err(e)?;
        curve.train_loss.push(epoch_loss / train.len() as f32);
        curve.test_loss.push(test_loss);
        curve.test_acc.push(test_acc);
    }
    Ok(curve)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = Args::parse();
    if let agr_runtime::Device::Cuda(_) = args.device {
        if let Err(why) = model_device(args.device) {
            eprintln!(
                "digits: --device {}: {why}; training on the CPU",
                args.device
            );
            args.device = agr_runtime::Device::Cpu;
        }
    }
    if args.epochs == 0 || args.seeds == 0 || args.batch == 0 {
        return Err("--epochs, --seeds and --batch must be at least 1".into());
    }
    // Data-parallel: the communicator (MPI's world under mpirun).
    let comm = match args.ranks {
        None => None,
        Some(0) => return Err("--ranks must be at least 1".into()),
        Some(n) => {
            if args.device != agr_runtime::Device::Cpu {
                return Err("--ranks trains on the CPU in this version".into());
            }
            world(n)?
        }
    };
    let rank = comm.as_ref().map_or(0, |c| c.rank());
    let started = Instant::now();
    let data = load(&args.data)?;
    let (train_set, test_set) = split(&data);
    for name in &args.optimizers {
        // Unknown names and broken specs fail before any training.
        make(name, 1e-3, args.device)?;
    }
    if rank == 0 {
        eprintln!(
            "digits: {} train / {} test images; {} optimizers x {} seeds x {} epochs; agr's steps on {}{}",
            train_set.len(),
            test_set.len(),
            args.optimizers.len(),
            args.seeds,
            args.epochs,
            args.device,
            match (args.ranks, &comm) {
                (Some(n), Some(_)) => format!(", data-parallel over {n} MPI ranks"),
                (Some(n), None) => format!(", data-parallel over {n} ranks in one process"),
                _ => String::new(),
            }
        );
    }
    let jobs: Vec<(usize, u64)> = (0..args.optimizers.len())
        .flat_map(|o| (0..args.seeds).map(move |s| (o, s)))
        .collect();
    let run = |&(o, seed): &(usize, u64)| {
        let name = &args.optimizers[o];
        let lr = args.lr.unwrap_or_else(|| default_lr(name));
        let t = Instant::now();
        let curve = match args.ranks {
            None => train(name, lr, seed, &args, &train_set, &test_set)?,
            Some(n) => train_ranks(
                name,
                lr,
                seed,
                &args,
                (&train_set, &test_set),
                n,
                comm.as_ref(),
            )?,
        };
        if rank == 0 {
            eprintln!(
                "  {name:<12} seed {seed}  lr {:<6}  test acc {:.4}  test loss {:.4}  ({:.1} s)",
                lr_label(name, lr),
                curve.test_acc.last().unwrap(),
                curve.test_loss.last().unwrap(),
                t.elapsed().as_secs_f32()
            );
        }
        Ok(((o, seed), curve))
    };
    // Ranks of one MPI job take their collectives in the same order: one
    // run at a time.
    let results: Vec<Result<((usize, u64), Curve), String>> = if comm.is_some() {
        jobs.iter().map(run).collect()
    } else {
        jobs.par_iter().map(run).collect()
    };
    let results: Vec<((usize, u64), Curve)> = results.into_iter().collect::<Result<_, _>>()?;
    if rank != 0 {
        // Rank 0 writes the results.
        return Ok(());
    }

    std::fs::create_dir_all(&args.out)?;
    let mut table = String::new();
    if args.device != agr_runtime::Device::Cpu {
        writeln!(table, "agr's optimizers stepped on `{}`.\n", args.device)?;
    }
    if let Some(n) = args.ranks {
        writeln!(
            table,
            "Data-parallel over {n} ranks ({}), each optimizer sharded over them.\n",
            if comm.is_some() {
                "MPI processes"
            } else {
                "in one process"
            }
        )?;
    }
    writeln!(
        table,
        "| optimizer | lr | test accuracy (mean ± std) | test loss (mean ± std) | train loss |"
    )?;
    writeln!(table, "|---|---|---|---|---|")?;
    let mut csv = String::from("optimizer,epoch,train_loss,test_loss,test_acc\n");
    let mut mean_curves = vec![];
    let mut best = 0.0f32;
    for (o, name) in args.optimizers.iter().enumerate() {
        let runs: Vec<&Curve> = results
            .iter()
            .filter(|((oo, _), _)| *oo == o)
            .map(|(_, c)| c)
            .collect();
        let last = |f: fn(&Curve) -> &Vec<f32>| {
            runs.iter()
                .map(|c| *f(c).last().unwrap())
                .collect::<Vec<f32>>()
        };
        let (acc, acc_sd) = mean_std(&last(|c| &c.test_acc));
        let (loss, loss_sd) = mean_std(&last(|c| &c.test_loss));
        let (train_loss, _) = mean_std(&last(|c| &c.train_loss));
        best = best.max(acc);
        let lr = lr_label(name, args.lr.unwrap_or_else(|| default_lr(name)));
        writeln!(table, "| {name} | {lr} | {acc:.4} ± {acc_sd:.4} | {loss:.4} ± {loss_sd:.4} | {train_loss:.4} |")?;
        let mut mean = Curve::default();
        for e in 0..args.epochs {
            let avg = |f: fn(&Curve) -> &Vec<f32>| {
                runs.iter().map(|c| f(c)[e]).sum::<f32>() / runs.len() as f32
            };
            mean.train_loss.push(avg(|c| &c.train_loss));
            mean.test_loss.push(avg(|c| &c.test_loss));
            mean.test_acc.push(avg(|c| &c.test_acc));
            writeln!(
                csv,
                "{name},{},{},{},{}",
                e + 1,
                mean.train_loss[e],
                mean.test_loss[e],
                mean.test_acc[e]
            )?;
        }
        mean_curves.push(mean);
    }
    println!(
        "\nFinal test results after {} epochs, {} seeds each ({} train / {} test images):\n\n{table}",
        args.epochs,
        args.seeds,
        train_set.len(),
        test_set.len()
    );
    std::fs::write(args.out.join("results.md"), &table)?;
    std::fs::write(args.out.join("curves.csv"), csv)?;
    if args.epochs >= 2 {
        plot(
            &args.out.join("curves.svg"),
            &args.optimizers,
            &mean_curves,
            args.epochs,
        )?;
    }
    println!(
        "wrote {0}/results.md, {0}/curves.csv and {0}/curves.svg in {1:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f32()
    );
    if best < 0.8 {
        eprintln!(
            "warning: the best mean test accuracy is {best:.3}; expected above 0.8 for this data"
        );
    }
    Ok(())
}

//! The main job: a real training run with the built-in AGR optimizers.
//!
//! Trains a 64-64-10 MLP (ReLU, softmax cross-entropy, written out by hand)
//! on the handwritten-digits data the repository ships, with AdamW,
//! AdamW-AGR, Adan and Adan-AGR over several seeds on one fixed train/test
//! split; prints progress and a table of final test accuracy and loss
//! (mean ± std over seeds); writes the curves (CSV and SVG) and the table.
//!
//!     cargo run --release --example digits -- --help

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use agr_runtime::{optim, DynOptimizer, HyperValue, ParamMut};
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[derive(Parser, Debug)]
#[command(about = "Train a digit classifier with agr's optimizers and compare them")]
struct Args {
    /// Optimizers to compare: built-in names (see `agr list`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adamw,adamw_agr,adan,adan_agr"
    )]
    optimizers: Vec<String>,
    /// Number of seeds per optimizer.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Epochs per run.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Learning rate for every optimizer (default: 2e-3 for AdamW-type, 5e-3 for Adan-type).
    #[arg(long)]
    lr: Option<f64>,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Output folder for curves.csv, curves.svg and results.md.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// The data: gzipped CSV, 64 pixels (0..16) then the label per line.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"))]
    data: PathBuf,
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

/// The model: w1 [HIDDEN, IN], b1 [HIDDEN], w2 [CLASSES, HIDDEN], b2 [CLASSES].
struct Mlp {
    params: Vec<Vec<f32>>,
}

const SHAPES: [&[usize]; 4] = [&[HIDDEN, IN], &[HIDDEN], &[CLASSES, HIDDEN], &[CLASSES]];

impl Mlp {
    fn new(rng: &mut StdRng) -> Mlp {
        let mut he = |fan_in: usize, n: usize| -> Vec<f32> {
            let s = (2.0 / fan_in as f32).sqrt();
            (0..n)
                .map(|_| {
                    // Box-Muller.
                    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                    s * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect()
        };
        let w1 = he(IN, HIDDEN * IN);
        let w2 = he(HIDDEN, CLASSES * HIDDEN);
        Mlp {
            params: vec![w1, vec![0.0; HIDDEN], w2, vec![0.0; CLASSES]],
        }
    }

    /// Mean cross-entropy and accuracy over `rows` of `d`; with `grads`, also
    /// accumulates the gradient of the mean loss.
    fn run(&self, d: &Data, rows: &[usize], mut grads: Option<&mut [Vec<f32>]>) -> (f32, f32) {
        let [w1, b1, w2, b2] = [
            &self.params[0],
            &self.params[1],
            &self.params[2],
            &self.params[3],
        ];
        let scale = 1.0 / rows.len() as f32;
        let (mut loss, mut correct) = (0.0f32, 0usize);
        let mut h = [0.0f32; HIDDEN];
        let mut z = [0.0f32; CLASSES];
        for &r in rows {
            let x = &d.x[r * IN..(r + 1) * IN];
            for j in 0..HIDDEN {
                let a: f32 = b1[j]
                    + w1[j * IN..(j + 1) * IN]
                        .iter()
                        .zip(x)
                        .map(|(w, x)| w * x)
                        .sum::<f32>();
                h[j] = a.max(0.0);
            }
            for k in 0..CLASSES {
                z[k] = b2[k]
                    + w2[k * HIDDEN..(k + 1) * HIDDEN]
                        .iter()
                        .zip(&h)
                        .map(|(w, h)| w * h)
                        .sum::<f32>();
            }
            let zmax = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|v| (v - zmax).exp()).sum();
            let logp = |k: usize| z[k] - zmax - sum.ln();
            loss -= logp(d.y[r]);
            let pred = (0..CLASSES).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
            correct += usize::from(pred == d.y[r]);
            if let Some(g) = grads.as_deref_mut() {
                // dL/dz = softmax - onehot, averaged over the batch.
                let mut dz = [0.0f32; CLASSES];
                for k in 0..CLASSES {
                    dz[k] = (logp(k).exp() - f32::from(u8::from(k == d.y[r]))) * scale;
                }
                let mut dh = [0.0f32; HIDDEN];
                for k in 0..CLASSES {
                    g[3][k] += dz[k];
                    for j in 0..HIDDEN {
                        g[2][k * HIDDEN + j] += dz[k] * h[j];
                        dh[j] += dz[k] * w2[k * HIDDEN + j];
                    }
                }
                for j in 0..HIDDEN {
                    if h[j] <= 0.0 {
                        continue;
                    }
                    g[1][j] += dh[j];
                    for (gw, xi) in g[0][j * IN..(j + 1) * IN].iter_mut().zip(x) {
                        *gw += dh[j] * xi;
                    }
                }
            }
        }
        (loss * scale, correct as f32 * scale)
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
    if name.starts_with("adan") {
        5e-3
    } else {
        2e-3
    }
}

fn make(name: &str, lr: f64) -> Result<Box<dyn DynOptimizer>, String> {
    let b = optim::builtin(name).ok_or_else(|| {
        format!(
            "unknown optimizer `{name}`; the built-ins are {}",
            optim::BUILTINS
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let mut opt = b.make();
    opt.set_hyper("lr", HyperValue::Float(lr))
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(opt)
}

fn train(
    name: &str,
    lr: f64,
    seed: u64,
    args: &Args,
    train: &Data,
    test: &Data,
) -> Result<Curve, String> {
    let mut opt = make(name, lr)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Mlp::new(&mut rng);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let all_test: Vec<usize> = (0..test.len()).collect();
    let mut curve = Curve::default();
    let mut grads: Vec<Vec<f32>> = model.params.iter().map(|p| vec![0.0; p.len()]).collect();
    for _ in 0..args.epochs {
        order.shuffle(&mut rng);
        let mut epoch_loss = 0.0;
        for batch in order.chunks(args.batch) {
            grads
                .iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x = 0.0));
            let (loss, _) = model.run(train, batch, Some(&mut grads));
            epoch_loss += loss * batch.len() as f32;
            let mut params: Vec<ParamMut<'_>> = model
                .params
                .iter_mut()
                .zip(&grads)
                .zip(SHAPES)
                .map(|((p, g), s)| ParamMut::new(p, Some(g), s))
                .collect();
            let report = opt.step(&mut params).map_err(|e| format!("{name}: {e}"))?;
            if let Some(i) = report.skipped_non_finite {
                eprintln!("{name} seed {seed}: skipped a step, gradient {i} was not finite");
            }
        }
        let (test_loss, test_acc) = model.run(test, &all_test, None);
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.epochs == 0 || args.seeds == 0 || args.batch == 0 {
        return Err("--epochs, --seeds and --batch must be at least 1".into());
    }
    let started = Instant::now();
    let data = load(&args.data)?;
    let (train_set, test_set) = split(&data);
    for name in &args.optimizers {
        make(name, 1e-3)?; // unknown names fail before any training
    }
    eprintln!(
        "digits: {} train / {} test images; {} optimizers x {} seeds x {} epochs",
        train_set.len(),
        test_set.len(),
        args.optimizers.len(),
        args.seeds,
        args.epochs
    );
    let jobs: Vec<(usize, u64)> = (0..args.optimizers.len())
        .flat_map(|o| (0..args.seeds).map(move |s| (o, s)))
        .collect();
    let results: Vec<Result<((usize, u64), Curve), String>> = jobs
        .par_iter()
        .map(|&(o, seed)| {
            let name = &args.optimizers[o];
            let lr = args.lr.unwrap_or_else(|| default_lr(name));
            let t = Instant::now();
            let curve = train(name, lr, seed, &args, &train_set, &test_set)?;
            eprintln!(
                "  {name:<12} seed {seed}  lr {lr:<6}  test acc {:.4}  test loss {:.4}  ({:.1} s)",
                curve.test_acc.last().unwrap(),
                curve.test_loss.last().unwrap(),
                t.elapsed().as_secs_f32()
            );
            Ok(((o, seed), curve))
        })
        .collect();
    let results: Vec<((usize, u64), Curve)> = results.into_iter().collect::<Result<_, _>>()?;

    std::fs::create_dir_all(&args.out)?;
    let mut table = String::new();
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
        let lr = args.lr.unwrap_or_else(|| default_lr(name));
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

//! `agr`: check specs, print the code generated from them, and replay
//! reference trajectories through the built-in optimizers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use agr_codegen::{backend, ir};
use agr_runtime::{golden, optim};

#[derive(Parser)]
#[command(name = "agr", version, about = "The agr optimizer spec compiler")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check spec files; errors show line, column and a caret.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print what a spec compiles to. SPEC is a `.agr` path or a built-in's name.
    Emit {
        #[arg(long, value_enum, default_value_t = Target::Rust)]
        target: Target,
        spec: String,
    },
    /// Replay `agr-golden/1` trajectories through the built-in each file names.
    Replay {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the built-in optimizers.
    List,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    /// The fused CPU step as Rust source (what `optimizer!` generates).
    Rust,
    /// The CUDA kernels as one translation unit (prelude included).
    Cuda,
    /// The IR: one line per node with its level and phase.
    Ir,
    /// The normalised spec.
    Spec,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => check(&files),
        Command::Emit { target, spec } => emit(target, &spec),
        Command::Replay { files } => replay(&files),
        Command::List => {
            for b in optim::BUILTINS {
                let doc = b
                    .source
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("///")
                    .trim();
                println!("{:<12} {:<10} {doc}", b.name, b.type_name);
            }
            ExitCode::SUCCESS
        }
    }
}

/// A spec's source and the name to show in messages.
fn load_spec(spec: &str) -> Result<(String, String), String> {
    if let Some(b) = optim::builtin(spec) {
        return Ok((format!("{}.agr", b.name), b.source.to_string()));
    }
    let path = Path::new(spec);
    match std::fs::read_to_string(path) {
        Ok(s) => Ok((spec.to_string(), s)),
        Err(e) if !spec.ends_with(".agr") && !path.exists() => Err(format!(
            "`{spec}` is neither a built-in ({}) nor a readable file: {e}",
            optim::BUILTINS
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => Err(format!("cannot read {spec}: {e}")),
    }
}

fn compile(name: &str, source: &str) -> Result<ir::Program, String> {
    agr_codegen::compile(source).map_err(|diags| {
        diags
            .iter()
            .map(|d| d.render(name, source))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for f in files {
        let name = f.display().to_string();
        let source = match std::fs::read_to_string(f) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot read {name}: {e}");
                failed = true;
                continue;
            }
        };
        match compile(&name, &source) {
            Ok(p) => println!(
                "{name}: ok: `{}` with {} hyperparameters, {} states, {} reduction pass(es) + 1 update pass",
                p.name,
                p.hypers.len(),
                p.states.len(),
                p.n_phases
            ),
            Err(e) => {
                eprint!("{e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn emit(target: Target, spec: &str) -> ExitCode {
    let result = load_spec(spec).and_then(|(name, source)| {
        let prog = compile(&name, &source)?;
        Ok(match target {
            Target::Rust => backend::rust::emit(&prog),
            Target::Cuda => backend::cuda::full_source(&prog),
            Target::Ir => ir::dump(&prog),
            Target::Spec => prog.spec_text.clone(),
        })
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            if !e.ends_with('\n') {
                eprintln!();
            }
            ExitCode::FAILURE
        }
    }
}

fn replay(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match golden::load(f).and_then(|g| golden::replay(&g)) {
            Ok(r) => {
                println!("{name:<28} {r}");
                failed |= !r.pass;
            }
            Err(e) => {
                println!("{name:<28} ERROR {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

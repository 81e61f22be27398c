//! Sharded optimizers over MPI: `mpirun -np N agr ...` with N = 1 to 4.
//! Built with the `mpi` feature (README's test command has it, and CI
//! installs OpenMPI); a build with it and without `mpirun` fails here.
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &n.to_string()])
        // CI runs as root; OpenMPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_agr"));
    c
}

fn run(mut c: Command) -> (bool, String, String) {
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run mpirun ({e}): install OpenMPI (openmpi-bin) to test the `mpi` feature")
    });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every golden file: the shared ones (all folders) and the project's own.
fn golden_files() -> Vec<PathBuf> {
    let shared = std::env::var("AGR_GOLDEN_DIR")
        .unwrap_or_else(|_| format!("{}/../shared/golden", env!("CARGO_MANIFEST_DIR")));
    let own = format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    for dir in [
        shared.clone(),
        format!("{shared}/more"),
        format!("{shared}/frontier"),
        own.clone(),
        format!("{own}/frontier"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("no golden files in {dir}")
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_golden_file_replays_sharded_over_1_to_4_ranks_bit_identically() {
    let files = golden_files();
    assert!(files.len() >= 35, "{} golden files", files.len());
    for n in 1..=4 {
        let mut c = mpirun(n);
        c.args(["replay", "--sharded"]).args(&files);
        let (ok, out, err) = run(c);
        assert!(ok, "{n} ranks:\n{out}\n{err}");
        let lines: Vec<&str> = out.lines().collect();
        // Rank 0 alone prints: one line per file.
        assert_eq!(lines.len(), files.len(), "{n} ranks:\n{out}");
        for l in lines {
            assert!(
                l.contains(" PASS ")
                    && l.contains(&format!("ranks={n} bit-identical to 1 process")),
                "{n} ranks: {l}"
            );
        }
        assert!(err.trim().is_empty(), "{n} ranks printed errors:\n{err}");
    }
}

#[test]
fn every_builtin_with_tensors_split_between_ranks_is_bit_identical_in_both_gradient_modes() {
    for n in 1..=4 {
        for grads in ["full", "reduce-scatter"] {
            let mut c = mpirun(n);
            c.args([
                "shard-bench",
                "--check",
                "--optimizers",
                "all",
                "--workload",
                "shard_mix",
                "--steps",
                "3",
                "--grads",
                grads,
            ]);
            let (ok, out, err) = run(c);
            assert!(ok, "{n} ranks, {grads}:\n{out}\n{err}");
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), agr_runtime::optim::BUILTINS.len(), "{out}");
            for l in lines {
                assert!(l.contains("bit-identical to 1 process over 3 steps"), "{l}");
                // State per rank: about 1/n of one process's (whole chunks,
                // whole tensors for matrix and factored specs).
                let ratio: f64 = l
                    .split("ratio ")
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .and_then(|r| r.parse().ok())
                    .unwrap_or_else(|| panic!("no ratio in {l}"));
                if n > 1
                    && !l.contains("muon")
                    && !l.contains("adafactor")
                    && !l.contains("adamw_gc")
                {
                    assert!(ratio < 1.0 / n as f64 + 0.1, "{n} ranks: {l}");
                }
            }
        }
    }
}

#[test]
fn on_the_emulated_cuda_device_golden_files_and_split_tensors_shard_bit_identically() {
    let files = golden_files();
    for n in [2, 3, 4] {
        let mut c = mpirun(n);
        c.args(["replay", "--sharded", "--device", "emulated-cuda"])
            .args(&files);
        let (ok, out, err) = run(c);
        assert!(ok, "{n} ranks:\n{out}\n{err}");
        assert_eq!(out.lines().count(), files.len(), "{out}");
        for l in out.lines() {
            assert!(
                l.contains(" PASS ")
                    && l.contains(&format!("ranks={n} bit-identical to 1 process")),
                "{n} ranks: {l}"
            );
        }
        // Both gradient modes (a reduce-scatter with 3 ranks only: time).
        let modes: &[&str] = if n == 3 {
            &["full", "reduce-scatter"]
        } else {
            &["full"]
        };
        for grads in modes {
            let mut c = mpirun(n);
            c.args([
                "shard-bench",
                "--check",
                "--device",
                "emulated-cuda",
                "--grads",
                grads,
                "--optimizers",
                "adamw_agr,adan_agr,lamb,adamw_gc,nadam,adafactor,muon_agr",
                "--workload",
                "shard_mix",
                "--steps",
                "3",
            ]);
            let (ok, out, err) = run(c);
            assert!(ok, "{n} ranks, {grads}:\n{out}\n{err}");
            assert_eq!(out.lines().count(), 7, "{out}");
            for l in out.lines() {
                assert!(l.contains("bit-identical to 1 process over 3 steps"), "{l}");
            }
        }
    }
}

/// The pids of `mpirun` `job`'s children (the ranks) that are `agr`
/// with OMPI's rank `rank`.
fn rank_pids(job: u32, rank: usize) -> Vec<u32> {
    let exe = env!("CARGO_BIN_EXE_agr");
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let is_agr = cmd.split(|&b| b == 0).next() == Some(exe.as_bytes());
        // The parent pid: the field after the command's closing parenthesis.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let parent = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(job) {
            continue;
        }
        let has_rank = env
            .split(|&b| b == 0)
            .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes());
        if is_agr && has_rank {
            pids.push(pid);
        }
    }
    pids
}

/// Starts a long sharded run on 3 ranks, waits until rank 1 is stepping,
/// sends it `signal`, and returns how long the job took to end and what
/// it printed.
fn long_run_with_rank_1_signalled(signal: &str, timeout: Option<&str>) -> (Duration, bool, String) {
    let mut c = mpirun(3);
    if let Some(t) = timeout {
        // Ranks on this machine inherit mpirun's environment.
        c.env("AGR_COMM_TIMEOUT", t);
    }
    c.args([
        "shard-bench",
        "--optimizers",
        "adamw_agr",
        "--workload",
        "gpt_150",
        "--steps",
        "100000",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child: Child = c.spawn().expect("run mpirun");
    // Until rank 1 exists and has stepped a while.
    let start = Instant::now();
    let pid = loop {
        if let Some(&p) = rank_pids(child.id(), 1).first() {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rank 1 never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Bounded: the job must end by itself within a minute.
    let ended = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            for r in 0..3 {
                for p in rank_pids(child.id(), r) {
                    let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
                }
            }
            panic!("the job still runs 60 s after rank 1 got {signal}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (killed.elapsed(), ended.success(), text)
}

#[test]
fn a_rank_killed_mid_run_ends_the_job_with_an_error_naming_it() {
    let (took, ok, text) = long_run_with_rank_1_signalled("-KILL", None);
    assert!(!ok, "the job succeeded:\n{text}");
    // mpirun sees the process die and ends the others.
    assert!(
        text.contains("rank 1") && (text.contains("signal 9") || text.contains("Killed")),
        "{text}"
    );
    assert!(took < Duration::from_secs(60));
    eprintln!("a killed rank ended the job in {:.1} s", took.as_secs_f64());
}

#[test]
fn a_rank_that_stops_answering_ends_the_job_at_the_deadline_with_an_error() {
    // SIGSTOP: the process lives, so mpirun sees nothing; the others'
    // collectives time out (3 s here) and end the job.
    let (took, ok, text) = long_run_with_rank_1_signalled("-STOP", Some("3"));
    assert!(!ok, "the job succeeded:\n{text}");
    assert!(
        text.contains("no answer from the other ranks in 3 s")
            && text.contains("a peer process died, stopped or is in another collective"),
        "{text}"
    );
    assert!(took < Duration::from_secs(60));
    eprintln!(
        "a stopped rank ended the job in {:.1} s",
        took.as_secs_f64()
    );
}

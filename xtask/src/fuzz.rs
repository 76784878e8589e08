//! `cargo xtask fuzz`: coverage-guided fuzzing of the agent's parsers, and the regression
//! check `cargo xtask test` runs (every committed corpus file through every target, then a
//! brief fuzz of each).
//!
//! The targets are `balancer-agent/fuzz/fuzz_targets/*.rs`, a crate outside the workspace with
//! its own target directory (`balancer-agent/fuzz/target`, one profile). Their committed corpora
//! are `balancer-agent/fuzz/corpus/<target>/`; a run grows its corpus in
//! `balancer-agent/fuzz/scratch/corpus/<target>/` and leaves crashes in
//! `scratch/artifacts/<target>/` and libFuzzer's output in `scratch/logs/` (all ignored by git),
//! so the committed corpus changes only with `--merge`.
//!
//! How, on stable Rust and nothing else: the `libfuzzer-sys` crate compiles LLVM's libFuzzer
//! (C++, with the `cc` crate and g++, which `setup` installs) and links it in; coverage comes
//! from LLVM's SanitizerCoverage pass, which stable rustc runs when asked with `-Cpasses` and
//! `-Cllvm-args` (the flags cargo-fuzz passes too). cargo-fuzz is not needed, and its default
//! sanitizer (`-Zsanitizer=address`) is nightly only. No sanitizer is lost that matters
//! here: the targets' code is safe Rust, whose bounds checks, and the overflow checks and debug
//! assertions the fuzz profile turns on, are what catch its bugs. The build passes `--target` so
//! that the flags reach the targets' crates only, not build scripts and proc macros (an
//! instrumented proc macro cannot be loaded by rustc). The kernel programs are not built
//! (`BALANCER_EBPF_STUB=1`): no target loads them.
//!
//! Cost on 2 cores: a clean build about 2 minutes and 0.9 GB (the agent's whole dependency tree,
//! which the profile compiles without optimisation where no target runs it); the replay of the
//! corpora well under a second; then 10 s per target in `cargo xtask test`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{cargo, root, run};

/// Seconds each target is fuzzed by `cargo xtask test`.
const TEST_SECONDS: u64 = 10;
/// Keep each committed corpus small: it is replayed by every `cargo xtask test`.
const MAX_CORPUS_FILES: usize = 200;
const MAX_CORPUS_BYTES: u64 = 1 << 20;

/// SanitizerCoverage as libFuzzer reads it: 8-bit edge counters, the table of instrumented
/// PCs, and comparison operands (so the fuzzer learns the constants the code compares with).
/// `--cfg fuzzing` as cargo-fuzz sets it.
const COVERAGE_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
];

fn dir() -> PathBuf {
    root().join("balancer-agent/fuzz")
}

/// The targets: one per file in `fuzz_targets/`, sorted.
fn targets() -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir().join("fuzz_targets"))
        .context("reading balancer-agent/fuzz/fuzz_targets")?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "rs" {
                return None;
            }
            p.file_stem()?.to_str().map(String::from)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Builds every target; returns the directory of the binaries.
fn build() -> anyhow::Result<PathBuf> {
    let host = crate::image::host_triple()?;
    let target_dir = dir().join("target");
    let started = Instant::now();
    run(cargo()
        .env("CARGO_ENCODED_RUSTFLAGS", COVERAGE_FLAGS.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .env("BALANCER_EBPF_STUB", "1")
        .arg("build")
        .arg("--manifest-path")
        .arg(dir().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--release", "--bins", "--target", &host]))?;
    eprintln!("fuzz: built in {:.0?}", started.elapsed());
    Ok(target_dir.join(host).join("release"))
}

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every committed corpus file, of every target's corpus, through each target: what once
/// crashed a target, or found new code in any, must keep running clean.
fn replay(bin: &Path, targets: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let corpus = dir().join("corpus");
    let files: Vec<PathBuf> = targets
        .iter()
        .flat_map(|t| files_of(&corpus.join(t)))
        .collect();
    for t in targets {
        // Given files (not directories), libFuzzer runs each once and stops at a crash.
        let out = Command::new(bin.join(t))
            .args(&files)
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            bail!("fuzz target {t} crashed replaying the committed corpora (above)");
        }
    }
    eprintln!(
        "fuzz: {} corpus files through {} targets in {:.1?}",
        files.len(),
        targets.len(),
        started.elapsed()
    );
    Ok(())
}

/// What one fuzzing run reported.
struct Stats {
    execs: u64,
    per_sec: u64,
    corpus: usize,
    last: String,
}

fn stat(log: &str, name: &str) -> u64 {
    log.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Fuzzes `target` for `seconds`, growing its scratch corpus from the committed one.
fn fuzz_one(bin: &Path, target: &str, seconds: u64) -> anyhow::Result<Stats> {
    let scratch = dir().join("scratch");
    let grown = scratch.join("corpus").join(target);
    let artifacts = scratch.join("artifacts").join(target);
    let logs = scratch.join("logs");
    for d in [&grown, &artifacts, &logs] {
        fs::create_dir_all(d)?;
    }
    let log_path = logs.join(format!("{target}.log"));
    eprintln!(
        "fuzz: {target} for {seconds} s (libFuzzer's output: {})",
        log_path.display()
    );
    let status = Command::new(bin.join(target))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // A single input that takes this long is a finding too.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(&grown)
        .arg(dir().join("corpus").join(target))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log_path)?)
        .status()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        bail!(
            "fuzz target {target} found a crash: the input is in {} (reproduce: {} FILE); \
             fix it and add the input to balancer-agent/fuzz/corpus/{target}/",
            artifacts.display(),
            bin.join(target).display()
        );
    }
    Ok(Stats {
        execs: stat(&log, "stat::number_of_executed_units:"),
        per_sec: stat(&log, "stat::average_exec_per_sec:"),
        corpus: files_of(&grown).len(),
        // `#N DONE cov: .. ft: .. corp: ..`: how far coverage got.
        last: log
            .lines()
            .rfind(|l| l.contains("DONE ") && l.contains("cov:"))
            .and_then(|l| l.split_once("DONE "))
            .map(|(_, rest)| rest.trim().to_string())
            .unwrap_or_default(),
    })
}

/// Adds to the committed corpus of `target` the inputs of its scratch corpus that reach code it
/// does not (libFuzzer's merge keeps every file already there), then checks its size.
fn merge(bin: &Path, target: &str) -> anyhow::Result<()> {
    let committed = dir().join("corpus").join(target);
    fs::create_dir_all(&committed)?;
    let status = Command::new(bin.join(target))
        // A greedy set cover of new edges only (not new hit counts of known ones): a few
        // inputs, not hundreds.
        .arg("-set_cover_merge=1")
        .arg("-use_counters=0")
        .arg(&committed)
        .arg(dir().join("scratch/corpus").join(target))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("merging the corpus of {target} failed: {status}");
    }
    let files = files_of(&committed);
    let bytes: u64 = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "fuzz: corpus/{target}: {} files, {} KiB",
        files.len(),
        bytes / 1024
    );
    if files.len() > MAX_CORPUS_FILES || bytes > MAX_CORPUS_BYTES {
        eprintln!(
            "WARNING: corpus/{target} is above {MAX_CORPUS_FILES} files or {} KiB: keep the \
             inputs that matter (seeds, regressions) and minimise the rest \
             (`-merge=1` into an empty directory)",
            MAX_CORPUS_BYTES / 1024
        );
    }
    Ok(())
}

/// `cargo xtask fuzz [TARGET] [--seconds N] [--merge]`.
pub(crate) fn fuzz(only: Option<&str>, seconds: u64, merge_back: bool) -> anyhow::Result<()> {
    let all = targets()?;
    let chosen: Vec<String> = match only {
        Some(t) if !all.iter().any(|a| a == t) => {
            bail!("no fuzz target {t}; there are: {}", all.join(", "))
        }
        Some(t) => vec![t.to_string()],
        None => all.clone(),
    };
    let bin = build()?;
    replay(&bin, &chosen)?;
    if seconds == 0 {
        return Ok(());
    }
    let mut failed = Vec::new();
    for t in &chosen {
        match fuzz_one(&bin, t, seconds) {
            Ok(s) => eprintln!(
                "fuzz: {t}: {} runs, {} exec/s, {} inputs in its scratch corpus; {}",
                s.execs, s.per_sec, s.corpus, s.last
            ),
            Err(e) => {
                eprintln!("{e:#}");
                failed.push(t.as_str());
            }
        }
        if merge_back {
            merge(&bin, t)?;
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets with crashes: {}", failed.join(", "));
    }
    Ok(())
}

/// The fuzz step of `cargo xtask test`: the fuzz crate's format, its build, the replay of every
/// committed corpus, and each target fuzzed for a few seconds.
pub(crate) fn check() -> anyhow::Result<()> {
    run(cargo()
        .args(["fmt", "--manifest-path"])
        .arg(dir().join("Cargo.toml"))
        .args(["--", "--check"]))?;
    fuzz(None, TEST_SECONDS, false)
}

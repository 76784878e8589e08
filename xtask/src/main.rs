//! `cargo xtask`: the project's workflows.
//!
//! - `setup`: installs what building and testing need on a fresh Debian 12 machine (Debian's
//!   Rust toolchain with the BPF `core`, bpf-linker against LLVM 22, protoc, test peers).
//!   Idempotent: quick when everything is there.
//! - `test`: setup, then format and lint checks and the agent's layer order (`layers`; alone:
//!   `cargo xtask layers`), then every test (unit, end to end, and the
//!   kernel tests, which run as root).
//! - `demo`: setup, build, then the main job on an embedded default.
//! - `bench`: setup, build (release), then the end-to-end benchmark beside nginx and haproxy.
//! - `image`: the agent's container image (static binary, `FROM scratch`) as an OCI archive
//!   under `target/image/`, built with buildah (no daemon).
#![forbid(unsafe_code)]

mod fuzz;
mod image;
mod layers;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "balancer's workflows")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything building and testing need (idempotent).
    Setup,
    /// Run every check and test: fmt, clippy, unit, end to end, kernel (as root).
    Test {
        /// Extra arguments for `cargo test` (a filter, --nocapture, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the demo: per-call balancing of one gRPC connection, shown end to end.
    Demo,
    /// Run the end-to-end benchmark beside nginx and haproxy, and the criterion benchmarks.
    Bench {
        /// Skip the criterion micro-benchmarks.
        #[arg(long)]
        no_criterion: bool,
    },
    /// Build the agent's container image into target/image/balancer-agent.oci.tar.
    Image,
    /// Fuzz the agent's parsers (balancer-agent/fuzz): build, replay the committed corpora, then
    /// fuzz each target (or one) for a while, growing a scratch corpus.
    Fuzz {
        /// One target (a file name in balancer-agent/fuzz/fuzz_targets, without `.rs`).
        target: Option<String>,
        /// Seconds per target; 0 replays the corpora only.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Add what the run found that reaches new code to the committed corpus.
        #[arg(long)]
        merge: bool,
    },
    /// Check only the agent's layer order (ARCHITECTURE.md, "## Layers"); part of `test`.
    #[command(hide = true)]
    Layers,
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo` with the environment setup arranged (bpf-linker on PATH).
pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", setup::path_with_tools());
    c
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Bench { no_criterion } => bench(no_criterion),
        Cmd::Fuzz {
            target,
            seconds,
            merge,
        } => fuzz::fuzz(target.as_deref(), seconds, merge),
        Cmd::Image => image::image().map(|_| ()),
        Cmd::Layers => layers::check(&root()),
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    layers::check(&root())?;
    // Default members only: balancer-ebpf builds for the BPF target, from the agent's build.rs.
    // The end-to-end tests start the real binaries.
    run(cargo().args(["build", "--bins"]))?;
    if !setup::is_root() {
        eprintln!(
            "NOTE: not root: the kernel and network-namespace tests will be SKIPPED; run as root to run them"
        );
    }
    run(cargo().args(["test", "--no-fail-fast"]).args(args))?;
    fuzz::check()
}

fn demo() -> anyhow::Result<()> {
    setup::setup()?;
    // The demo measures nothing: the dev profile builds fastest and shares `cargo xtask test`'s.
    run(cargo().args(["build", "--bins"]))?;
    let target = root().join("target/debug");
    run(Command::new(target.join("balancer-demo"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent")))
}

fn bench(no_criterion: bool) -> anyhow::Result<()> {
    setup::setup()?;
    setup::bench_peers()?;
    run(cargo().args(["build", "--release", "--bins"]))?;
    let target = root().join("target/release");
    run(Command::new(target.join("balancer-bench"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent"))
        .arg("--out")
        .arg(root().join("target/bench/results.json")))?;
    // Traffic policy: the same ten routes in each proxy's own language (agent, nginx, haproxy).
    run(Command::new(target.join("balancer-bench"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent"))
        .args([
            "--routes",
            "--concurrency",
            "1,100",
            "--rounds",
            "2",
            "--out",
        ])
        .arg(root().join("target/bench/routes.json")))?;
    // Retries configured and never needed: what configuring them costs each proxy.
    run(Command::new(target.join("balancer-bench"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent"))
        .args([
            "--retries",
            "--concurrency",
            "1,100",
            "--rounds",
            "2",
            "--out",
        ])
        .arg(root().join("target/bench/retries.json")))?;
    // Active health checks on: the agent's grpc.health.v1 Watch beside haproxy's own checks.
    run(Command::new(target.join("balancer-bench"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent"))
        .args([
            "--health-checks",
            "--concurrency",
            "1,100",
            "--rounds",
            "2",
            "--out",
        ])
        .arg(root().join("target/bench/health.json")))?;
    // The datapath: pod -> VIP -> eBPF -> agent, shortcut on and off (root only).
    run(Command::new(target.join("balancer-bench-datapath"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent"))
        .arg("--out")
        .arg(root().join("target/bench/datapath.json")))?;
    // Discovery at scale: 1,000 services x 10 endpoints from the API server fixture.
    run(Command::new(target.join("balancer-bench-kube"))
        .env("BALANCER_AGENT_BIN", target.join("balancer-agent"))
        .arg("--out")
        .arg(root().join("target/bench/kube.json")))?;
    if !no_criterion {
        // Only the criterion harness: the library's unit tests need no release build here.
        run(cargo().args(["bench", "-p", "balancer-agent", "--bench", "per_call"]))?;
        run(cargo().args(["bench", "-p", "balancer-agent", "--bench", "routes"]))?;
    }
    Ok(())
}

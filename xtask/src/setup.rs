//! `cargo xtask setup`: everything building and testing need, installed idempotently on a
//! fresh Debian 12 machine. See ../shared/EBPF-TOOLCHAIN.md for why each piece is there.
//!
//! - Debian's Rust toolchain (`rustc-web`, `cargo-web`) with `libstd-rust-web-dev-bpf`, which
//!   ships a prebuilt `core` for `bpfel-unknown-none`: rustup cannot fetch rust-src here.
//! - bpf-linker 0.13.0 built against the `libLLVM.so.22.1` that rustc-web brings.
//! - protoc (the test crate's gRPC code), iproute2 (simulated nodes), the bpffs mount.
//! - g++ for libFuzzer (the fuzz targets, `cargo xtask fuzz`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::run;

/// Debian packages building and testing need.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "protobuf-compiler",
    "iproute2",
    // The fuzz targets' libFuzzer is C++, compiled by the libfuzzer-sys crate (xtask/src/fuzz.rs).
    "g++",
];
/// Debian packages the benchmark needs (peer proxies).
const BENCH_PACKAGES: &[&str] = &["nginx", "haproxy"];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Whether we run as root.
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory (bpf-linker) in front.
pub(crate) fn path_with_tools() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let bin = cargo_bin();
    if path.split(':').any(|p| Path::new(p) == bin) {
        path
    } else {
        format!("{}:{path}", bin.display())
    }
}

fn missing_packages(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| p.to_string())
        .collect()
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing = missing_packages(pkgs);
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: install them (sudo apt-get install {}) or run as root",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-o", "DPkg::Lock::Timeout=600"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=600",
        ])
        .args(&missing))
}

/// The libLLVM 22 that rustc-web depends on.
fn libllvm22() -> anyhow::Result<PathBuf> {
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so.22"))
            })
            .collect();
        found.sort();
        if let Some(p) = found.into_iter().next() {
            return Ok(p);
        }
    }
    bail!("libLLVM.so.22* not found; is rustc-web installed?")
}

fn bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    if let Ok(out) = Command::new(&linker).arg("--version").output()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    // bpf-linker's build finds LLVM as <prefix>/lib/libLLVM.so; Debian's llvm-config is
    // LLVM 14 and must never be picked up, so a prefix of our own points at LLVM 22.
    let prefix = crate::root().join("target/xtask/llvm22");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(libllvm22()?, &link).context("linking libLLVM.so")?;
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
}

/// Mounts the bpffs if it is not (needed for pinned maps).
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        || !is_root()
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Installs what building and testing need.
pub(crate) fn setup() -> anyhow::Result<()> {
    apt_install(PACKAGES)?;
    bpf_linker()?;
    bpffs()?;
    kubernetes_validate()?;
    python_grpcio()?;
    Ok(())
}

/// Debian packages `cargo xtask image` needs: buildah (a daemonless image builder), `file`
/// (to check that the binary is static) and binutils (`strip`).
const IMAGE_PACKAGES: &[&str] = &["buildah", "file", "binutils"];

/// Installs the image builder.
pub(crate) fn image_tools() -> anyhow::Result<()> {
    apt_install(IMAGE_PACKAGES)
}

/// The Python package that validates the manifests under `deploy/` against the Kubernetes
/// OpenAPI schemas (it ships them, so validation needs no network).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Installs a pinned Python package from PyPI unless `import module` already works.
fn pip_install(module: &str, package: &str, what: &str) -> anyhow::Result<()> {
    let works = |args: &[&str]| {
        Command::new("python3")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&["-c", &format!("import {module}")]) {
        return Ok(());
    }
    if !works(&["-m", "pip", "--version"]) {
        apt_install(&["python3", "python3-pip"])?;
    }
    eprintln!("setup: installing {package} ({what})");
    // Debian's own python3 is externally managed (PEP 668); the variable lets pip install
    // there and is ignored elsewhere (pyenv, a venv).
    run(Command::new("python3")
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            package,
        ]))
}

/// `kubernetes-validate` for `tests/tests/deploy.rs`.
fn kubernetes_validate() -> anyhow::Result<()> {
    pip_install(
        "kubernetes_validate",
        KUBERNETES_VALIDATE,
        "manifest validation",
    )
}

/// Installs the benchmark's peer proxies (their services stay stopped; the bench runs its own).
pub(crate) fn bench_peers() -> anyhow::Result<()> {
    let fresh = !missing_packages(BENCH_PACKAGES).is_empty();
    apt_install(BENCH_PACKAGES)?;
    if fresh && is_root() {
        for s in BENCH_PACKAGES {
            let _ = Command::new("systemctl").args(["stop", s]).status();
        }
    }
    Ok(())
}

/// grpcio, pinned, for the Python interop test (`tests/tests/interop.rs`).
const GRPCIO: &str = "grpcio==1.76.0";

/// grpcio for the interop test.
fn python_grpcio() -> anyhow::Result<()> {
    pip_install("grpc", GRPCIO, "the Python gRPC interop test")
}

//! `cargo xtask image`: the agent's container image, as an OCI archive under `target/image/`.
//!
//! 1. A static `balancer-agent` (glibc, `+crt-static`: rustup cannot fetch the musl target
//!    here), built for the host triple in release mode with the real eBPF object embedded.
//!    The triple is passed explicitly so that `+crt-static` reaches the agent only: build
//!    scripts and proc macros stay dynamic, and the BPF build inside the agent's `build.rs`
//!    sets its own flags.
//! 2. Checks on that binary before it is packaged: no ELF interpreter (`file` says static),
//!    an embedded BPF object (not the stub), and `--version` runs.
//! 3. `deploy/Containerfile` (`FROM scratch`) built by buildah, Debian's daemonless builder,
//!    in a storage of its own under `target/image/` (vfs driver, chroot isolation: no daemon,
//!    no fuse, no user namespaces needed), pushed to `target/image/balancer-agent.oci.tar`.
//!
//! Nothing here touches the machine's own container storage or needs a Docker daemon.
//!
//! Not part of `cargo xtask test`: from a clean tree the static release build takes minutes on
//! 2 cores (a second target directory, thin LTO; 196 s for the whole image on a fresh clone),
//! more than a developer's test run should add. `tests/tests/deploy.rs` checks the archive when it exists and says SKIPPED otherwise;
//! CI (`.ci/run`) builds it before `cargo xtask test`, so there the image test runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail, ensure};

use crate::{cargo, root, run, setup};

/// The image's name; the tag is the agent's version.
pub(crate) const IMAGE_NAME: &str = "balancer-agent";

/// What `cargo xtask image` leaves behind.
pub(crate) struct Built {
    /// The OCI archive.
    pub archive: PathBuf,
    /// `balancer-agent:<version>`.
    pub reference: String,
}

/// Builds the static binary and the image archive.
pub(crate) fn image() -> anyhow::Result<Built> {
    let started = Instant::now();
    setup::setup()?;
    setup::image_tools()?;
    let binary = static_binary()?;
    let version = check_binary(&binary)?;
    let built = build_archive(&binary, &version)?;
    let size = std::fs::metadata(&built.archive)?.len();
    eprintln!(
        "image: {} in {} ({:.1} MiB, {:.0?})",
        built.reference,
        built.archive.display(),
        size as f64 / (1024.0 * 1024.0),
        started.elapsed()
    );
    Ok(built)
}

/// The host's target triple, from `rustc -vV`.
pub(crate) fn host_triple() -> anyhow::Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV printed no host triple")
}

/// Builds `balancer-agent` statically linked; returns its path.
fn static_binary() -> anyhow::Result<PathBuf> {
    let triple = host_triple()?;
    let flags_var = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        triple.to_uppercase().replace('-', "_")
    );
    run(cargo()
        .env(&flags_var, "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "balancer-agent",
            "--bin",
            "balancer-agent",
            "--target",
            &triple,
        ]))?;
    Ok(root()
        .join("target")
        .join(&triple)
        .join("release/balancer-agent"))
}

/// Refuses a binary that is dynamic or carries the stub eBPF object; returns its version.
fn check_binary(binary: &Path) -> anyhow::Result<String> {
    let file = Command::new("file")
        .arg("-b")
        .arg(binary)
        .output()
        .context("running `file` (apt-get install file)")?;
    let kind = String::from_utf8_lossy(&file.stdout).trim().to_string();
    ensure!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{} is not static: file says {kind:?}",
        binary.display()
    );
    let bytes = std::fs::read(binary)?;
    ensure!(
        embeds_bpf_object(&bytes),
        "{} embeds no eBPF object (the stub was built): run `cargo xtask setup` and check that \
         bpf-linker is on PATH",
        binary.display()
    );
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    ensure!(
        out.status.success(),
        "{} --version failed",
        binary.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("unexpected --version output {text:?}"))?
        .to_string();
    eprintln!("image: {} is static ({kind})", binary.display());
    Ok(version)
}

/// Whether `bytes` holds a 64-bit little-endian ELF object for the BPF machine (EM_BPF, 247):
/// the object `build.rs` embeds. The stub is empty, so it never matches.
fn embeds_bpf_object(bytes: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\x7fELF\x02\x01\x01";
    const EM_BPF: [u8; 2] = 247u16.to_le_bytes();
    bytes
        .windows(MAGIC.len())
        .enumerate()
        .any(|(i, w)| w == MAGIC && bytes.get(i + 18..i + 20) == Some(&EM_BPF[..]) && i > 0)
}

/// buildah with the storage of its own under `target/image/`.
fn buildah(dir: &Path) -> Command {
    let mut c = Command::new("buildah");
    c.arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"])
        .env("BUILDAH_ISOLATION", "chroot");
    c
}

/// Builds the image from `deploy/Containerfile` and writes the OCI archive.
fn build_archive(binary: &Path, version: &str) -> anyhow::Result<Built> {
    let dir = root().join("target/image");
    let context = dir.join("context");
    // A fresh storage each time: the image is a single layer of one file, so nothing is worth
    // caching, and a leftover storage from an interrupted run cannot get in the way.
    for d in ["storage", "run", "context"] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
    std::fs::create_dir_all(&context)?;
    let in_context = context.join("balancer-agent");
    std::fs::copy(binary, &in_context)
        .with_context(|| format!("copying {} into the build context", binary.display()))?;
    // The release profile keeps line tables (debug = 1) for local profiling; the image does not
    // need them (symbols stay, so backtraces still name functions). `target/` keeps the full
    // binary for symbolizing.
    run(Command::new("strip").arg("--strip-debug").arg(&in_context))?;
    let reference = format!("{IMAGE_NAME}:{version}");
    let archive = dir.join(format!("{IMAGE_NAME}.oci.tar"));
    let _ = std::fs::remove_file(&archive);
    let result = (|| {
        run(buildah(&dir)
            .args(["build", "--isolation", "chroot", "--layers=false"])
            .args(["--format", "oci", "--tag", &reference, "--file"])
            .arg(root().join("deploy/Containerfile"))
            .arg(&context))?;
        run(buildah(&dir)
            .arg("push")
            .arg(&reference)
            .arg(format!("oci-archive:{}:{reference}", archive.display())))
    })();
    // The storage is only a means to the archive; vfs copies every layer, so do not keep it.
    for d in ["storage", "run", "context"] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
    result?;
    if !archive.exists() {
        bail!(
            "buildah reported success but {} is missing",
            archive.display()
        );
    }
    Ok(Built { archive, reference })
}

#[cfg(test)]
mod tests {
    use super::embeds_bpf_object;

    #[test]
    fn finds_an_embedded_bpf_object_and_nothing_else() {
        let mut header = b"\x7fELF\x02\x01\x01".to_vec();
        header.resize(18, 0);
        let mut bpf = header.clone();
        bpf.extend_from_slice(&247u16.to_le_bytes());
        let mut x86 = header;
        x86.extend_from_slice(&62u16.to_le_bytes());
        let wrap = |inner: &[u8]| [b"host binary".as_slice(), inner, b"more"].concat();
        assert!(embeds_bpf_object(&wrap(&bpf)));
        assert!(!embeds_bpf_object(&wrap(&x86)));
        // The host binary's own header (at offset 0) is never the embedded object.
        assert!(!embeds_bpf_object(&bpf));
    }
}

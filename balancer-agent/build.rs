//! Builds the kernel programs (`balancer-ebpf`) and leaves the object in `OUT_DIR` for
//! `include_bytes!` in `src/ebpf/mod.rs`.
//!
//! The object is compiled by aya-build with Debian's Rust toolchain under `/usr`, which ships a
//! prebuilt `core` for `bpfel-unknown-none` (`cargo xtask setup` installs it and bpf-linker).
//! Where that toolchain is missing, or `BALANCER_EBPF_STUB=1` is set, an empty stub object is
//! written instead so that `cargo check`, `clippy` and the userspace tests still build; loading
//! the stub fails at run time with a message that says how to build the real object.
use std::{env, fs, path::PathBuf};

/// The object's file name in OUT_DIR: aya-build copies each binary of the eBPF crate there
/// under its target name (`[[bin]] name = "balancer"` in balancer-ebpf/Cargo.toml).
const OBJECT: &str = "balancer";
/// Debian's toolchain prefix (packages rustc-web, cargo-web, libstd-rust-web-dev-bpf).
const BPF_TOOLCHAIN: &str = "/usr";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BALANCER_EBPF_STUB");
    println!("cargo:rerun-if-changed=../balancer-common/src");
    println!("cargo:rustc-check-cfg=cfg(balancer_ebpf_stub)");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    if let Some(reason) = stub_reason() {
        println!("cargo:warning=building a stub eBPF object ({reason}); run `cargo xtask setup`");
        println!("cargo:rustc-cfg=balancer_ebpf_stub");
        fs::write(out_dir.join(OBJECT), [])?;
        return Ok(());
    }

    // aya-ebpf needs `asm_experimental_arch` on bpf. Unlocking it for that crate alone keeps
    // aya-build from adding `-Z build-std`, which Debian's toolchain cannot do (and needs not:
    // it ships core for the target). The child cargo inherits this process's environment.
    #[allow(unsafe_code)] // `set_var` is unsafe since edition 2024.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe {
        env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf")
    };
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("../balancer-ebpf");
    let root = root.to_str().expect("a UTF-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "balancer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(BPF_TOOLCHAIN),
    )
}

/// Why the real object cannot be built here, if it cannot.
fn stub_reason() -> Option<String> {
    if env::var_os("BALANCER_EBPF_STUB").is_some_and(|v| v == "1") {
        return Some("BALANCER_EBPF_STUB=1".into());
    }
    let core = PathBuf::from(BPF_TOOLCHAIN).join("lib/rustlib/bpfel-unknown-none");
    if !core.exists() {
        return Some(format!("{} is missing", core.display()));
    }
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not on PATH".into());
    }
    None
}

//! `cargo xtask bench`: the end-to-end benchmark (see the bench module of the tests crate).
fn main() {
    eprintln!("balancer-bench: not written yet");
    std::process::exit(2);
}

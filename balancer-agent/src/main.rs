//! The `balancer-agent` binary.
fn main() -> std::process::ExitCode {
    balancer_agent::cli::main()
}

//! A greeter backend in its own process, so a test can kill it with SIGKILL as a node kills a
//! pod. Prints `listening on ADDR` once it accepts connections.
#![forbid(unsafe_code)]

use std::io::Write;

use clap::Parser;

/// Serves `balancer_tests::greeter` on one address.
#[derive(Debug, Parser)]
struct Args {
    /// `IP:port` to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The name the backend reports in every reply.
    #[arg(long, default_value = "greeter")]
    name: String,
    /// Delay every call by this many milliseconds (a slow backend).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    balancer_tests::greeter::serve_with(
        listener,
        args.name,
        Default::default(),
        balancer_tests::greeter::Options {
            delay_ms: args.delay_ms,
            ..Default::default()
        },
        std::sync::Arc::new(tokio::sync::Notify::new()),
    )
    .await;
    Ok(())
}

//! The `sluice` binary: parse settings, open the engine, serve until signalled.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sluice::config::{
    Config, DEFAULT_CHECKPOINT_INTERVAL_MS, DEFAULT_DATA_DIR, DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTIONS,
};
use sluice::engine::Engine;

/// Sluice: an embedded streaming SQL engine speaking the Postgres wire protocol.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on for Postgres-wire clients.
    #[arg(long, env = "SLUICE_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Directory for the RocksDB data (created if missing).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Maximum concurrent connections.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Do not fsync commits (a process crash still loses nothing; a power
    /// loss may lose the last commits).
    #[arg(long, env = "SLUICE_NO_FSYNC")]
    no_fsync: bool,
    /// How often sources commit an epoch (their rows, view state and
    /// offsets, atomically), in milliseconds.
    #[arg(long, env = "SLUICE_CHECKPOINT_INTERVAL_MS", default_value_t = DEFAULT_CHECKPOINT_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    checkpoint_interval_ms: u64,
}

/// RocksDB's C++ is built for SSE 4.2 and PCLMUL on x86-64 (see
/// `.cargo/config.toml`); on a CPU without them it would die on an illegal
/// instruction somewhere in storage. Say so up front instead.
fn check_cpu() -> anyhow::Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        let flags = option_env!("CXXFLAGS_x86_64_unknown_linux_gnu").unwrap_or("");
        for (flag, feature, has) in [
            (
                "-msse4.2",
                "SSE 4.2",
                std::arch::is_x86_feature_detected!("sse4.2"),
            ),
            (
                "-mpclmul",
                "PCLMULQDQ",
                std::arch::is_x86_feature_detected!("pclmulqdq"),
            ),
        ] {
            if flags.contains(flag) && !has {
                anyhow::bail!(
                    "this sluice binary was built for CPUs with {feature}, which this CPU lacks; \
                     rebuild with CXXFLAGS_x86_64_unknown_linux_gnu=\"\" (see .cargo/config.toml)"
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    check_cpu()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        max_connections: args.max_connections.max(1),
        fsync: !args.no_fsync,
        checkpoint_interval: std::time::Duration::from_millis(args.checkpoint_interval_ms),
    };
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr().context("listener has no address")?;
    let data_dir = config.data_dir.clone();
    let engine = Engine::open(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Tests and scripts wait for this line.
    println!(
        "sluice: listening on {addr} (data dir {})",
        data_dir.display()
    );
    tracing::info!("connect with: psql -h {} -p {}", addr.ip(), addr.port());
    sluice::server::serve(engine, listener, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Registers SIGINT/SIGTERM handlers now (so a signal that arrives right
/// after startup is not lost) and returns a future that completes on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutdown requested");
    })
}

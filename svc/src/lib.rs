//! Process plumbing shared by `tessera-server` and `tessera-agent`.
//!
//! What it is: the binaries' CLI entry (runtime, crypto provider, one-line errors), the
//! health/metrics HTTP listener behind a small [`health::Probe`] trait, draining a task set on
//! shutdown, the two gRPC connectors (Unix socket; TCP + rustls with the caller's TLS
//! config), a one-shot HTTP/1.1 client for control-plane calls ([`http`]), and what every
//! configuration file shares: one error type and one duration syntax ([`config`]), the
//! `doctor` report shape ([`doctor`]), standard output that survives a closed pipe ([`out`]),
//! and versions with the agent/server skew policy ([`version`]).
//!
//! What it is not: nothing about identities, CAs or SVIDs; no policy. Each binary decides what
//! "ready" means and which TLS peer it trusts.

#![forbid(unsafe_code)]

pub mod config;
pub mod connect;
pub mod doctor;
pub mod health;
pub mod http;
pub mod listener;
pub mod out;
pub mod version;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio::task::JoinSet;

/// How log lines are written (`log_format` in both configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level, `span`/`spans` for the context.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = config::ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(config::invalid("log_format", format!("{other:?}: expected \"text\" or \"json\""))),
        }
    }
}

/// Logs to stderr at the configured `level` (`RUST_LOG`, when set, overrides it) in `format`,
/// with colour escape codes only when stderr is a terminal (never in a file or a pipe that a
/// collector reads; never in JSON).
pub fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}

/// Runs a binary's async main: installs the ring crypto provider, builds the runtime, and
/// turns an error into one `Error: ...` line on stderr and exit code 1. A `tonic::Status`
/// prints as `<code>: <message>`. Standard output closed by its reader ([`out::StdoutError::Closed`])
/// ends the run quietly with exit code 0.
pub fn run_main<F: Future<Output = anyhow::Result<()>>>(main: impl FnOnce() -> F) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if out::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = match e.downcast_ref::<tonic::Status>() {
                Some(s) => format!("{:?}: {}", s.code(), s.message()),
                None => format!("{e:#}").replace('\n', " "),
            };
            eprintln!("Error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for every task to finish, for at most `grace`; then aborts the rest. Long-lived
/// streams (Envoy keeps SDS streams open) would otherwise hold a shutdown forever.
pub async fn drain(tasks: &mut JoinSet<()>, grace: Duration) {
    let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn terminated() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

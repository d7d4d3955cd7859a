//! `tessera-server`: the CA server and its admin CLI. `run` starts the server from the
//! library; every other verb is an Admin API call over the local socket. Errors print one line
//! and exit non-zero. (`anyhow` here: this is the binary's front.)
//!
//! [`args`] is the command line, [`commands`] the verbs, [`render`] their output, written once
//! per record type.

#![forbid(unsafe_code)]

mod args;
mod commands;
mod render;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tessera_server::config::Config;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    tessera_svc::run_main(|| run(cli))
}

async fn run(cli: args::Cli) -> anyhow::Result<()> {
    if let args::Cmd::Run { config, instance_id } = &cli.cmd {
        return run_server(config, instance_id.as_deref()).await;
    }
    let client = tessera_server::client::connect_admin(&cli.socket).await?;
    let out = render::Printer { json: cli.output == args::Output::Json };
    commands::run(client, &out, cli.cmd).await
}

async fn run_server(config: &Path, instance_id: Option<&str>) -> anyhow::Result<()> {
    // The binary passes the process environment in; the parser reads none itself.
    let cfg = Config::load_with(config, instance_id, &|name| std::env::var(name).ok())?;
    tessera_svc::init_logging(&cfg.log_level);
    let server = tessera_server::app::Server::start(cfg).await?;
    tessera_svc::terminated().await.context("cannot install SIGTERM handler")?;
    server.shutdown().await;
    Ok(())
}

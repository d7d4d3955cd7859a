//! `tessera-server`: the CA server and its admin CLI. `run` starts the server from the
//! library; every other verb is an Admin API call over the local socket. Errors print one line
//! and exit non-zero. (`anyhow` here: this is the binary's front.)
//!
//! [`args`] is the command line, [`commands`] the verbs, [`render`] their output, written once
//! per record type.

#![forbid(unsafe_code)]

mod args;
mod bulk;
mod commands;
mod diagnose;
mod render;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tessera_server::config::Config;

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = args::Cli::command().get_matches();
    let socket_explicit = matches.value_source("socket").is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
    let cli = match args::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let json = cli.output == args::Output::Json;
    match cli.cmd {
        args::Cmd::Validate { config } => diagnose::validate(&config, json),
        args::Cmd::Doctor { config } => {
            let socket = cli.socket;
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(diagnose::doctor(socket, socket_explicit, config, json)),
                Err(e) => {
                    eprintln!("Error: doctor could not run: cannot start runtime: {e}");
                    ExitCode::from(2)
                }
            }
        }
        _ => tessera_svc::run_main(|| run(cli)),
    }
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
    tessera_svc::init_logging(&cfg.log_level, cfg.log_format);
    let server = tessera_server::app::Server::start(cfg).await?;
    tessera_svc::terminated().await.context("cannot install SIGTERM handler")?;
    server.shutdown().await;
    Ok(())
}

//! The `tessera-agent` command line: `run` starts the agent; `api ...` are Workload API calls
//! over the agent socket (as a workload would make them); `healthcheck` asks the health
//! listener. Errors print one line and exit non-zero.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use tessera_proto::workload as wl;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use tessera_svc::out;

use crate::config::Config;

/// Tessera node agent.
#[derive(Debug, Parser)]
#[command(name = "tessera-agent", version, about = "Tessera node agent: Workload API, Envoy SDS, cert files")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// Path to agent.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Call the Workload API as a workload.
    #[command(subcommand)]
    Api(ApiCmd),
    /// Check that the agent is ready (GET /ready on its health listener).
    Healthcheck {
        /// The agent's health_address.
        #[arg(long, default_value = "127.0.0.1:8082")]
        address: String,
    },
    /// Diagnose the running agent: coded findings, most severe first (exit 0 healthy, 1
    /// findings of warning or error, 2 doctor could not run). Only reads.
    Doctor {
        #[command(flatten)]
        socket: AdminSocketArg,
        /// Also check this agent.toml (and take the admin socket from it unless --socket).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Check a configuration file without starting: every problem with its key (exit 1).
    Validate {
        /// Path to agent.toml.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        output: OutputArg,
    },
    /// The running agent's state, from its admin socket.
    #[command(subcommand)]
    Debug(DebugCmd),
}

#[derive(Debug, Subcommand)]
enum DebugCmd {
    /// Version, uptime, counts, last sync, clock skew, the agent's own SVID.
    Info {
        #[command(flatten)]
        socket: AdminSocketArg,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Every open SDS stream: caller, resources, versions and nonces, ACK/NACK, certificates.
    Sds {
        #[command(flatten)]
        socket: AdminSocketArg,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Debug, clap::Args)]
struct AdminSocketArg {
    /// The agent's admin socket (`admin_socket_path`; default `<data_dir>/admin.sock`).
    #[arg(long, env = "TESSERA_AGENT_ADMIN_SOCKET", default_value = "/var/lib/tessera/agent/admin.sock")]
    socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, clap::Args)]
struct SocketArg {
    /// The agent socket.
    #[arg(long, env = "TESSERA_AGENT_SOCKET", default_value = "/run/tessera/agent/api.sock")]
    socket: PathBuf,
}

#[derive(Debug, Subcommand)]
enum ApiCmd {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCmd),
    /// Validate tokens.
    #[command(subcommand)]
    Validate(ValidateCmd),
    /// Stream X509-SVID updates until interrupted.
    Watch {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
enum FetchCmd {
    /// Fetch this process's X509-SVIDs.
    X509 {
        #[command(flatten)]
        socket: SocketArg,
        /// Write svid.N.pem, svid.N.key (0600), bundle.N.pem and federated bundles here.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch JWT-SVIDs.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// Audience (repeatable).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ValidateCmd {
    /// Validate a JWT-SVID.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// Expected audience.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
    },
}

/// Entry point for the binary.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.cmd {
        Cmd::Validate { config, output } => crate::diagnose::validate(&config, output.output == Output::Json),
        Cmd::Doctor { socket, config, output } => {
            let explicit = matches
                .subcommand_matches("doctor")
                .and_then(|m| m.value_source("socket"))
                .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => {
                    rt.block_on(crate::diagnose::doctor(socket.socket, explicit, config, output.output == Output::Json))
                }
                Err(e) => {
                    eprintln!("Error: doctor could not run: cannot start runtime: {e}");
                    ExitCode::from(2)
                }
            }
        }
        cmd => tessera_svc::run_main(|| run(Cli { cmd })),
    }
}

type Client = SpiffeWorkloadApiClient<
    InterceptedService<Channel, fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>>,
>;

fn add_header(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut()
        .insert(crate::workload_api::SECURITY_HEADER, tonic::metadata::MetadataValue::from_static("true"));
    Ok(req)
}

/// Connects a Workload API client (with the security header) to the agent socket.
pub async fn workload_client(socket: &Path) -> anyhow::Result<Client> {
    let channel = tessera_svc::connect::unix(socket)
        .await
        .with_context(|| format!("cannot connect to the agent socket {}", socket.display()))?;
    let f: fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> = add_header;
    Ok(SpiffeWorkloadApiClient::with_interceptor(channel, f))
}

fn when(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn split_der(concat: &[u8]) -> Vec<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let mut out = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        match x509_parser::certificate::X509Certificate::from_der(rest) {
            Ok((r, _)) => {
                out.push(rest[..rest.len() - r.len()].to_vec());
                rest = r;
            }
            Err(_) => break,
        }
    }
    out
}

/// The text `api fetch x509` and `api watch` print for one answer.
fn x509_text(resp: &wl::X509svidResponse) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    for s in &resp.svids {
        let chain = split_der(&s.x509_svid);
        let facts = chain.first().and_then(|c| tessera_identity::x509::cert_facts(c).ok());
        let _ = writeln!(t, "SPIFFE ID:         {}", s.spiffe_id);
        if let Some(f) = facts {
            let _ = writeln!(t, "SVID valid after:  {}", when(f.not_before));
            let _ = writeln!(t, "SVID valid until:  {}", when(f.not_after));
            let _ = writeln!(t, "Serial:            {}", f.serial);
        }
        if !s.hint.is_empty() {
            let _ = writeln!(t, "Hint:              {}", s.hint);
        }
        let _ = writeln!(t, "Intermediates:     {}", chain.len().saturating_sub(1));
        let _ = writeln!(t, "Bundle CAs:        {}", split_der(&s.bundle).len());
        let _ = writeln!(t);
    }
    for td in resp.federated_bundles.keys() {
        let _ = writeln!(t, "Federated bundle:  {td}");
    }
    t
}

fn write_x509(dir: &Path, resp: &wl::X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (i, s) in resp.svids.iter().enumerate() {
        let chain = split_der(&s.x509_svid);
        let key = tessera_identity::PrivateKey::from_pkcs8_der(s.x509_svid_key.clone());
        tessera_plugins::fsutil::atomic_write(&dir.join(format!("svid.{i}.key")), key.to_pem().as_bytes(), 0o600)?;
        tessera_plugins::fsutil::atomic_write(
            &dir.join(format!("svid.{i}.pem")),
            tessera_identity::pem::encode_certs(chain.iter().map(Vec::as_slice)).as_bytes(),
            0o644,
        )?;
        let bundle = split_der(&s.bundle);
        tessera_plugins::fsutil::atomic_write(
            &dir.join(format!("bundle.{i}.pem")),
            tessera_identity::pem::encode_certs(bundle.iter().map(Vec::as_slice)).as_bytes(),
            0o644,
        )?;
    }
    for (j, (_, der)) in resp.federated_bundles.iter().enumerate() {
        let certs = split_der(der);
        tessera_plugins::fsutil::atomic_write(
            &dir.join(format!("federated_bundle.{j}.pem")),
            tessera_identity::pem::encode_certs(certs.iter().map(Vec::as_slice)).as_bytes(),
            0o644,
        )?;
    }
    out::line(&format!("Wrote {} SVID(s) to {}", resp.svids.len(), dir.display()))?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            tessera_svc::init_logging(&cfg.log_level, cfg.log_format);
            let agent = crate::app::Agent::start(cfg).await?;
            tessera_svc::terminated().await.context("cannot install SIGTERM handler")?;
            agent.shutdown().await;
            Ok(())
        }
        Cmd::Api(ApiCmd::Fetch(FetchCmd::X509 { socket, write })) => {
            let started = Instant::now();
            let mut c = workload_client(&socket.socket).await?;
            let mut stream = c.fetch_x509svid(wl::X509svidRequest {}).await?.into_inner();
            let resp =
                stream.message().await?.ok_or_else(|| anyhow!("the agent closed the stream without an answer"))?;
            out::write(&format!(
                "Received {} svid(s) after {:.1?}\n\n{}",
                resp.svids.len(),
                started.elapsed(),
                x509_text(&resp)
            ))?;
            if let Some(dir) = write {
                write_x509(&dir, &resp)?;
            }
            Ok(())
        }
        Cmd::Api(ApiCmd::Fetch(FetchCmd::Jwt { socket, audience, spiffe_id })) => {
            let mut c = workload_client(&socket.socket).await?;
            let resp = c
                .fetch_jwtsvid(wl::JwtsvidRequest { audience, spiffe_id: spiffe_id.unwrap_or_default() })
                .await?
                .into_inner();
            for s in resp.svids {
                out::line(&format!("token({}):\n\t{}\n", s.spiffe_id, s.svid))?;
            }
            Ok(())
        }
        Cmd::Api(ApiCmd::Validate(ValidateCmd::Jwt { socket, audience, svid })) => {
            let mut c = workload_client(&socket.socket).await?;
            let r = c.validate_jwtsvid(wl::ValidateJwtsvidRequest { audience, svid }).await?.into_inner();
            out::line(&format!("SVID is valid.\nSPIFFE ID : {}", r.spiffe_id))?;
            if let Some(claims) = r.claims {
                let mut keys: Vec<_> = claims.fields.keys().cloned().collect();
                keys.sort();
                out::line(&format!("Claims    : {}", keys.join(", ")))?;
            }
            Ok(())
        }
        Cmd::Api(ApiCmd::Watch { socket }) => {
            let mut c = workload_client(&socket.socket).await?;
            let mut stream = c.fetch_x509svid(wl::X509svidRequest {}).await?.into_inner();
            while let Some(resp) = stream.message().await? {
                out::write(&format!(
                    "Received {} svid(s) at {}\n\n{}",
                    resp.svids.len(),
                    when(tessera_identity::unix_now()),
                    x509_text(&resp)
                ))?;
            }
            bail!("the agent closed the stream")
        }
        Cmd::Doctor { .. } | Cmd::Validate { .. } => Ok(()),
        Cmd::Debug(DebugCmd::Info { socket, output }) => {
            let v = crate::admin::ask(&socket.socket, "info")
                .await
                .with_context(|| format!("cannot ask the agent at {}", socket.socket.display()))?;
            if output.output == Output::Json {
                out::line(&serde_json::to_string_pretty(&v)?)?;
            } else {
                out::write(&crate::diagnose::info_text(&v))?;
            }
            Ok(())
        }
        Cmd::Debug(DebugCmd::Sds { socket, output }) => {
            let v = crate::admin::ask(&socket.socket, "sds")
                .await
                .with_context(|| format!("cannot ask the agent at {}", socket.socket.display()))?;
            if output.output == Output::Json {
                out::line(&serde_json::to_string_pretty(&v)?)?;
            } else {
                out::write(&crate::diagnose::sds_text(&v))?;
            }
            Ok(())
        }
        Cmd::Healthcheck { address } => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(&address)
                .await
                .with_context(|| format!("cannot reach the agent at {address}"))?;
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").await?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).await?;
            if buf.starts_with("HTTP/1.1 200") {
                out::line("Agent is healthy.")?;
                Ok(())
            } else {
                bail!("agent is not ready")
            }
        }
    }
}

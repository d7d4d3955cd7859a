//! The `tessera-server` command line: `run` starts the server; every other verb is an Admin
//! API call over the local socket, with SPIRE-familiar names and flags. Errors print one line
//! and exit non-zero. (`anyhow` here as in `main.rs`: this is the binary's front.)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tessera_identity::{Bundle, PrivateKey, unix_now};
use tessera_proto::admin::v1 as pb;
use tessera_proto::admin::v1::admin_client::AdminClient;
use tessera_proto::types::v1 as types;
use tonic::transport::Channel;

use crate::config::Config;

/// Tessera CA server.
#[derive(Debug, Parser)]
#[command(name = "tessera-server", version, about = "Tessera CA server and admin CLI")]
pub struct Cli {
    /// Admin API socket.
    #[arg(long, global = true, env = "TESSERA_ADMIN_SOCKET", default_value = "/run/tessera/server/admin.sock")]
    socket: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the server.
    Run {
        /// Path to server.toml.
        #[arg(long)]
        config: PathBuf,
        /// This replica's instance ID, overriding `server.instance_id` (a StatefulSet passes
        /// its pod name).
        #[arg(long, env = "TESSERA_INSTANCE_ID")]
        instance_id: Option<String>,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Our bundle and federated bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Federation relationships with other trust domains.
    #[command(subcommand)]
    Federation(FederationCmd),
    /// Mint X509-SVIDs.
    #[command(subcommand)]
    X509(X509Cmd),
    /// Mint JWT-SVIDs.
    #[command(subcommand)]
    Jwt(JwtCmd),
    /// The server's own signing authorities.
    #[command(subcommand)]
    Localauthority(LocalAuthorityCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// The issuance audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Check that the server answers and has an active CA.
    Healthcheck,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a one-use join token.
    Generate {
        /// Also create a node alias entry with this SPIFFE ID, parented to the token's agent.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Token lifetime (e.g. 600, 10m, 1h).
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Debug, Args)]
struct EntryFields {
    /// SPIFFE ID issued to matching workloads.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Agent (or node alias) allowed to obtain it.
    #[arg(long)]
    parent_id: Option<String>,
    /// Selector type:value (repeatable).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X509-SVID TTL.
    #[arg(long)]
    x509_svid_ttl: Option<String>,
    /// JWT-SVID TTL.
    #[arg(long)]
    jwt_svid_ttl: Option<String>,
    /// Trust domain whose bundle the workload receives (repeatable).
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// DNS SAN (repeatable).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// Admin entry.
    #[arg(long)]
    admin: bool,
    /// Downstream entry.
    #[arg(long)]
    downstream: bool,
    /// Hint for workloads with several SVIDs.
    #[arg(long)]
    hint: Option<String>,
}

#[derive(Debug, Subcommand)]
enum EntryCmd {
    /// Create an entry.
    Create {
        /// Entry ID (generated when omitted).
        #[arg(long = "entry-id")]
        id: Option<String>,
        #[command(flatten)]
        fields: EntryFields,
    },
    /// Replace an entry's fields.
    Update {
        /// Entry ID.
        #[arg(long = "entry-id")]
        id: String,
        #[command(flatten)]
        fields: EntryFields,
    },
    /// Delete an entry.
    Delete {
        /// Entry ID.
        #[arg(long = "entry-id")]
        id: String,
    },
    /// Show one entry, or the entries matching the filters.
    Show {
        /// Entry ID.
        #[arg(long = "entry-id")]
        id: Option<String>,
        /// Filter by SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Filter by parent ID.
        #[arg(long)]
        parent_id: Option<String>,
        /// Filter by exact selector set (repeatable).
        #[arg(long = "selector")]
        selectors: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, Subcommand)]
enum BundleCmd {
    /// Print our trust domain's bundle.
    Show {
        /// pem (X.509 roots) or spiffe (JWKS).
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
    /// Print the federated bundles.
    List {
        /// pem or spiffe.
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
    /// Create or replace a federated bundle.
    Set {
        /// The trust domain.
        #[arg(long)]
        id: String,
        /// Bundle file (stdin when omitted).
        #[arg(long)]
        path: Option<PathBuf>,
        /// pem or spiffe.
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
    /// Delete a federated bundle.
    Delete {
        /// The trust domain.
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Args)]
struct RelationshipArgs {
    /// The peer trust domain.
    #[arg(long, alias = "id")]
    trust_domain: String,
    /// The peer's bundle endpoint, `https://host[:port][/path]`.
    #[arg(long)]
    bundle_endpoint_url: String,
    /// https_spiffe or https_web.
    #[arg(long, default_value = "https_spiffe")]
    profile: String,
    /// https_spiffe: the endpoint's SPIFFE ID.
    #[arg(long)]
    endpoint_spiffe_id: Option<String>,
    /// https_web: PEM trust anchors for the endpoint (default: the system CA bundle).
    #[arg(long)]
    ca_bundle_path: Option<PathBuf>,
    /// Honour an empty key set from the peer (the spec's "revoke all").
    #[arg(long)]
    allow_empty_bundle: bool,
    /// The peer's bundle to start from (https_spiffe needs one unless already stored).
    #[arg(long)]
    bundle_path: Option<PathBuf>,
    /// pem or spiffe.
    #[arg(long, value_enum, default_value = "pem")]
    bundle_format: BundleFormat,
}

#[derive(Debug, Subcommand)]
enum FederationCmd {
    /// Create a relationship (and store its bootstrap bundle).
    Create(RelationshipArgs),
    /// Replace a relationship's settings.
    Update(RelationshipArgs),
    /// Show one relationship and its refresh status.
    Show {
        /// The peer trust domain.
        #[arg(long, alias = "id")]
        trust_domain: String,
    },
    /// List relationships.
    List,
    /// Delete a relationship (its bundle stays until `bundle delete`).
    Delete {
        /// The peer trust domain.
        #[arg(long, alias = "id")]
        trust_domain: String,
    },
    /// Fetch the peer's bundle now.
    Refresh {
        /// The peer trust domain.
        #[arg(long, alias = "id")]
        trust_domain: String,
    },
}

#[derive(Debug, Subcommand)]
enum X509Cmd {
    /// Mint an X509-SVID. The key is generated here and never sent.
    Mint {
        /// SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// TTL (default: the server's default X509-SVID TTL).
        #[arg(long)]
        ttl: Option<String>,
        /// DNS SAN (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Write svid.pem, key.pem (0600) and bundle.pem here instead of printing them.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum JwtCmd {
    /// Mint a JWT-SVID.
    Mint {
        /// SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Audience (repeatable).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// TTL.
        #[arg(long)]
        ttl: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum LocalAuthorityCmd {
    /// X.509 authorities.
    #[command(subcommand)]
    X509(AuthorityCmd),
}

#[derive(Debug, Subcommand)]
enum AuthorityCmd {
    /// List the prepared, active and old authorities.
    Show,
    /// Prepare a new authority and add it to the bundle.
    Prepare,
    /// Activate the prepared authority.
    Activate {
        /// Must name the prepared authority when given.
        #[arg(long)]
        authority_id: Option<String>,
    },
    /// Mark an old authority as tainted.
    Taint {
        /// The authority.
        #[arg(long)]
        authority_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// List attested agents.
    List,
    /// Show one agent.
    Show {
        /// Agent SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Evict an agent: it must attest again.
    Evict {
        /// Agent SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Ban an agent: it can neither call the API nor attest again.
    Ban {
        /// Agent SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verify the hash chain; reports the first broken link.
    Verify,
    /// List audit records, oldest first, filtered by SPIFFE ID, caller and time.
    Show {
        /// Only records about this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only records made for this caller (an agent ID, `admin`, `attestor`).
        #[arg(long)]
        caller: Option<String>,
        /// Not before: a duration ago (`1h`, `30m`) or Unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// Not after: a duration ago or Unix seconds.
        #[arg(long)]
        until: Option<String>,
        /// Start at this sequence number (paging).
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// At most this many records (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Unix milliseconds for `--since`/`--until`: a duration ago, or Unix seconds.
fn when_ms(s: &Option<String>) -> anyhow::Result<i64> {
    let Some(s) = s else { return Ok(0) };
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs.saturating_mul(1000));
    }
    let ago =
        humantime::parse_duration(s).map_err(|e| anyhow!("{s:?} is neither a duration (1h) nor Unix seconds: {e}"))?;
    Ok((unix_now() - i64::try_from(ago.as_secs()).unwrap_or(i64::MAX)).saturating_mul(1000))
}

/// Entry point for the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tessera_svc::run_main(|| run(cli))
}

/// Parses a TTL: plain seconds or a humantime duration (`90s`, `10m`, `1h`).
fn parse_ttl(s: &str) -> anyhow::Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        if n < 0 {
            bail!("TTL must not be negative: {s:?}");
        }
        return Ok(n);
    }
    let d = humantime::parse_duration(s).map_err(|e| anyhow!("invalid TTL {s:?}: {e}"))?;
    Ok(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn opt_ttl(s: &Option<String>) -> anyhow::Result<i64> {
    s.as_deref().map(parse_ttl).transpose().map(|t| t.unwrap_or(0))
}

/// Connects an Admin API client to the server's Unix socket.
pub async fn connect_admin(socket: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let channel = tessera_svc::connect::unix(socket)
        .await
        .with_context(|| format!("cannot connect to the admin socket {}", socket.display()))?;
    Ok(AdminClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Run { config, instance_id } = &cli.cmd {
        return run_server(config, instance_id.as_deref()).await;
    }
    let mut c = connect_admin(&cli.socket).await?;
    let out = Printer { json: cli.output == Output::Json };
    match cli.cmd {
        Cmd::Run { .. } => Ok(()),
        Cmd::Token(TokenCmd::Generate { spiffe_id, ttl }) => {
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl: opt_ttl(&ttl)?,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            out.print(
                json!({"token": r.token, "expires_at": r.expires_at, "agent_id": r.agent_id, "alias_entry": r.alias_entry.as_ref().map(entry_json)}),
                || {
                    let mut s = format!("Token: {}\nAgent ID: {}\nExpires at: {}\n", r.token, r.agent_id, r.expires_at);
                    if let Some(e) = &r.alias_entry {
                        s.push_str(&format!("Alias entry: {} ({})\n", e.id, e.spiffe_id));
                    }
                    s
                },
            );
            Ok(())
        }
        Cmd::Entry(cmd) => entry(&mut c, &out, cmd).await,
        Cmd::Bundle(cmd) => bundle(&mut c, &out, cmd).await,
        Cmd::Federation(cmd) => federation(&mut c, &out, cmd).await,
        Cmd::X509(X509Cmd::Mint { spiffe_id, ttl, dns, write }) => {
            x509_mint(&mut c, &out, spiffe_id, ttl, dns, write).await
        }
        Cmd::Jwt(JwtCmd::Mint { spiffe_id, audience, ttl }) => {
            let r = c
                .mint_jwt_svid(pb::MintJwtSvidRequest { spiffe_id, audience, ttl: opt_ttl(&ttl)? })
                .await?
                .into_inner();
            out.print(json!({"token": r.token, "expires_at": r.expires_at}), || format!("{}\n", r.token));
            Ok(())
        }
        Cmd::Localauthority(LocalAuthorityCmd::X509(cmd)) => {
            let state = match cmd {
                AuthorityCmd::Show => c.get_x509_authorities(pb::GetX509AuthoritiesRequest {}).await?,
                AuthorityCmd::Prepare => c.prepare_x509_authority(pb::PrepareX509AuthorityRequest {}).await?,
                AuthorityCmd::Activate { authority_id } => {
                    c.activate_x509_authority(pb::ActivateX509AuthorityRequest {
                        authority_id: authority_id.unwrap_or_default(),
                    })
                    .await?
                }
                AuthorityCmd::Taint { authority_id } => {
                    c.taint_x509_authority(pb::TaintX509AuthorityRequest { authority_id }).await?
                }
            }
            .into_inner();
            let rows: Vec<Value> = state
                .authorities
                .iter()
                .map(|a| json!({"authority_id": a.authority_id, "status": a.status, "issued_at": a.issued_at, "expires_at": a.expires_at, "tainted": a.tainted}))
                .collect();
            out.print(json!({"authorities": rows}), || {
                state
                    .authorities
                    .iter()
                    .map(|a| {
                        format!(
                            "Authority ID : {}\nStatus       : {}\nIssued at    : {}\nExpires at   : {}\nTainted      : {}\n\n",
                            a.authority_id, a.status, a.issued_at, a.expires_at, a.tainted
                        )
                    })
                    .collect()
            });
            Ok(())
        }
        Cmd::Agent(cmd) => {
            let agents = match cmd {
                AgentCmd::List => c.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents,
                AgentCmd::Show { spiffe_id } => vec![c.get_agent(pb::AgentId { spiffe_id }).await?.into_inner()],
                AgentCmd::Evict { spiffe_id } => vec![c.evict_agent(pb::AgentId { spiffe_id }).await?.into_inner()],
                AgentCmd::Ban { spiffe_id } => vec![c.ban_agent(pb::AgentId { spiffe_id }).await?.into_inner()],
            };
            let rows: Vec<Value> = agents
                .iter()
                .map(|a| {
                    let selectors: Vec<String> = a.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect();
                    json!({"spiffe_id": a.spiffe_id, "attestation_type": a.attestation_type, "serial": a.serial, "expires_at": a.expires_at, "banned": a.banned, "selectors": selectors})
                })
                .collect();
            out.print(json!({"agents": rows}), || {
                agents
                    .iter()
                    .map(|a| {
                        let selectors: String =
                            a.selectors.iter().map(|s| format!("Selector    : {}:{}\n", s.r#type, s.value)).collect();
                        format!(
                            "SPIFFE ID   : {}\nAttestation : {}\nSerial      : {}\nExpires at  : {}\nBanned      : {}\n{selectors}\n",
                            a.spiffe_id, a.attestation_type, a.serial, a.expires_at, a.banned
                        )
                    })
                    .collect()
            });
            Ok(())
        }
        Cmd::Audit(AuditCmd::Show { spiffe_id, caller, since, until, from_seq, limit }) => {
            let r = c
                .list_audit(pb::ListAuditRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    caller: caller.unwrap_or_default(),
                    since_ms: when_ms(&since)?,
                    until_ms: when_ms(&until)?,
                    from_seq,
                    limit,
                })
                .await?
                .into_inner();
            let rows: Vec<Value> = r
                .records
                .iter()
                .map(|a| {
                    json!({"seq": a.seq, "at_ms": a.at_ms, "kind": a.kind, "spiffe_id": a.spiffe_id, "serial": a.serial,
                           "not_after": a.not_after, "caller": a.caller, "detail": a.detail, "hash": a.hash})
                })
                .collect();
            out.print(json!({"records": rows, "next_seq": r.next_seq}), || {
                let mut s = String::new();
                for a in &r.records {
                    s.push_str(&format!(
                        "{:>6}  {}  {:<14}  {}  serial={}  caller={}{}\n",
                        a.seq,
                        a.at_ms / 1000,
                        a.kind,
                        a.spiffe_id,
                        if a.serial.is_empty() { "-" } else { &a.serial },
                        a.caller,
                        if a.detail.is_empty() { String::new() } else { format!("  ({})", a.detail) }
                    ));
                }
                if r.next_seq != 0 {
                    s.push_str(&format!("More: --from-seq {}\n", r.next_seq));
                }
                s
            });
            Ok(())
        }
        Cmd::Audit(AuditCmd::Verify) => {
            let v = c.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
            out.print(json!({"ok": v.ok, "records": v.records, "first_broken": v.first_broken, "reason": v.reason, "head": v.head}), || {
                if v.ok {
                    format!("Audit log OK: {} records, head {}\n", v.records, v.head)
                } else {
                    format!("Audit log BROKEN at record {}: {} ({} records verified before it)\n", v.first_broken, v.reason, v.records)
                }
            });
            if !v.ok {
                bail!("audit chain is broken at record {}", v.first_broken);
            }
            Ok(())
        }
        Cmd::Healthcheck => {
            let state = c.get_x509_authorities(pb::GetX509AuthoritiesRequest {}).await?.into_inner();
            let now = unix_now();
            if !state.authorities.iter().any(|a| a.status == "active" && a.expires_at > now) {
                bail!("server is unhealthy: no active, unexpired X.509 authority");
            }
            out.print(json!({"healthy": true}), || "Server is healthy.\n".into());
            Ok(())
        }
    }
}

async fn run_server(config: &Path, instance_id: Option<&str>) -> anyhow::Result<()> {
    // The binary passes the process environment in; the parser reads none itself.
    let cfg = Config::load_with(config, instance_id, &|name| std::env::var(name).ok())?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    tessera_svc::init_logging(filter);
    let server = crate::app::Server::start(cfg).await?;
    tessera_svc::terminated().await.context("cannot install SIGTERM handler")?;
    server.shutdown().await;
    Ok(())
}

struct Printer {
    json: bool,
}

impl Printer {
    fn print(&self, v: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            print!("{}", text());
        }
    }
}

fn entry_json(e: &types::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "federates_with": e.federates_with,
        "dns_names": e.dns_names,
        "admin": e.admin,
        "downstream": e.downstream,
        "hint": e.hint,
        "revision": e.revision,
        "created_at": e.created_at,
    })
}

fn entry_text(e: &types::Entry) -> String {
    let ttl = |t: i32| if t == 0 { "default".to_owned() } else { format!("{t}s") };
    let mut s = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\nRevision         : {}\nX509-SVID TTL    : {}\nJWT-SVID TTL     : {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.revision,
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl)
    );
    for sel in &e.selectors {
        s.push_str(&format!("Selector         : {}:{}\n", sel.r#type, sel.value));
    }
    for td in &e.federates_with {
        s.push_str(&format!("FederatesWith    : {td}\n"));
    }
    for d in &e.dns_names {
        s.push_str(&format!("DNS name         : {d}\n"));
    }
    if e.admin {
        s.push_str("Admin            : true\n");
    }
    if e.downstream {
        s.push_str("Downstream       : true\n");
    }
    s.push('\n');
    s
}

fn selectors(raw: &[String]) -> anyhow::Result<Vec<types::Selector>> {
    raw.iter()
        .map(|s| {
            let sel: tessera_identity::Selector = s.parse()?;
            Ok(types::Selector { r#type: sel.kind, value: sel.value })
        })
        .collect()
}

fn ttl_i32(s: &Option<String>) -> anyhow::Result<i32> {
    i32::try_from(opt_ttl(s)?).map_err(|_| anyhow!("TTL is too large"))
}

fn entry_from_fields(id: String, f: EntryFields) -> anyhow::Result<types::Entry> {
    Ok(types::Entry {
        id,
        spiffe_id: f.spiffe_id.ok_or_else(|| anyhow!("--spiffe-id is required"))?,
        parent_id: f.parent_id.ok_or_else(|| anyhow!("--parent-id is required"))?,
        selectors: selectors(&f.selectors)?,
        x509_svid_ttl: ttl_i32(&f.x509_svid_ttl)?,
        jwt_svid_ttl: ttl_i32(&f.jwt_svid_ttl)?,
        federates_with: f.federates_with,
        dns_names: f.dns,
        admin: f.admin,
        downstream: f.downstream,
        hint: f.hint.unwrap_or_default(),
        ..Default::default()
    })
}

async fn entry(c: &mut AdminClient<Channel>, out: &Printer, cmd: EntryCmd) -> anyhow::Result<()> {
    let entries = match cmd {
        EntryCmd::Create { id, fields } => {
            let e = entry_from_fields(id.unwrap_or_default(), fields)?;
            vec![c.create_entry(pb::CreateEntryRequest { entry: Some(e) }).await?.into_inner()]
        }
        EntryCmd::Update { id, fields } => {
            let e = entry_from_fields(id, fields)?;
            vec![c.update_entry(pb::UpdateEntryRequest { entry: Some(e) }).await?.into_inner()]
        }
        EntryCmd::Delete { id } => vec![c.delete_entry(pb::EntryId { id }).await?.into_inner()],
        EntryCmd::Show { id: Some(id), .. } => vec![c.get_entry(pb::EntryId { id }).await?.into_inner()],
        EntryCmd::Show { id: None, spiffe_id, parent_id, selectors: sel } => {
            c.list_entries(pb::ListEntriesRequest {
                by_spiffe_id: spiffe_id.unwrap_or_default(),
                by_parent_id: parent_id.unwrap_or_default(),
                by_selectors: selectors(&sel)?,
            })
            .await?
            .into_inner()
            .entries
        }
    };
    out.print(json!({"entries": entries.iter().map(entry_json).collect::<Vec<_>>()}), || {
        let mut s = format!("Found {} entr{}\n", entries.len(), if entries.len() == 1 { "y" } else { "ies" });
        for e in &entries {
            s.push_str(&entry_text(e));
        }
        s
    });
    Ok(())
}

fn render_bundle(b: &Bundle, format: BundleFormat) -> anyhow::Result<String> {
    Ok(match format {
        BundleFormat::Pem => b.x509_pem(),
        BundleFormat::Spiffe => format!("{}\n", b.to_jwks()?),
    })
}

/// Reads a bundle file (stdin when `path` is `None`) in `format`.
fn read_bundle(td: tessera_identity::TrustDomain, path: Option<&Path>, format: BundleFormat) -> anyhow::Result<Bundle> {
    let data = match path {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
            v
        }
    };
    Ok(match format {
        BundleFormat::Spiffe => Bundle::from_jwks(td, &data)?,
        BundleFormat::Pem => {
            let mut b = Bundle::new(td);
            for cert in tessera_identity::pem::decode_certs(&data)? {
                b.add_x509_authority(&cert);
            }
            b
        }
    })
}

fn relationship_json(r: &pb::FederationRelationship) -> Value {
    json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "profile": r.profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id,
        "ca_bundle_path": r.ca_bundle_path,
        "allow_empty_bundle": r.allow_empty_bundle,
        "bundle_sequence": r.bundle_sequence,
        "last_refresh": r.last_refresh,
        "next_refresh": r.next_refresh,
        "last_error": r.last_error,
    })
}

fn relationship_text(r: &pb::FederationRelationship) -> String {
    let mut s = format!(
        "Trust domain              : {}\nBundle endpoint URL       : {}\nBundle endpoint profile   : {}\n",
        r.trust_domain, r.bundle_endpoint_url, r.profile
    );
    if !r.endpoint_spiffe_id.is_empty() {
        s.push_str(&format!("Endpoint SPIFFE ID        : {}\n", r.endpoint_spiffe_id));
    }
    if !r.ca_bundle_path.is_empty() {
        s.push_str(&format!("CA bundle path            : {}\n", r.ca_bundle_path));
    }
    s.push_str(&format!("Bundle sequence           : {}\n", r.bundle_sequence));
    let when = |t: i64| if t == 0 { "never".to_owned() } else { t.to_string() };
    s.push_str(&format!(
        "Last refresh              : {}\nNext refresh              : {}\n",
        when(r.last_refresh),
        when(r.next_refresh)
    ));
    if !r.last_error.is_empty() {
        s.push_str(&format!("Last error                : {}\n", r.last_error));
    }
    s
}

async fn federation(c: &mut AdminClient<Channel>, out: &Printer, cmd: FederationCmd) -> anyhow::Result<()> {
    let set_req = |a: RelationshipArgs| -> anyhow::Result<pb::SetFederationRelationshipRequest> {
        let td = tessera_identity::ids::parse_trust_domain(&a.trust_domain)?;
        let bootstrap = match &a.bundle_path {
            Some(p) => Some(crate::api::convert::bundle_to_pb(&read_bundle(td, Some(p), a.bundle_format)?)),
            None => None,
        };
        Ok(pb::SetFederationRelationshipRequest {
            relationship: Some(pb::FederationRelationship {
                trust_domain: a.trust_domain,
                bundle_endpoint_url: a.bundle_endpoint_url,
                profile: a.profile,
                endpoint_spiffe_id: a.endpoint_spiffe_id.unwrap_or_default(),
                ca_bundle_path: a.ca_bundle_path.map(|p| p.display().to_string()).unwrap_or_default(),
                allow_empty_bundle: a.allow_empty_bundle,
                ..Default::default()
            }),
            bootstrap_bundle: bootstrap,
        })
    };
    match cmd {
        FederationCmd::Create(a) => {
            let r = c.create_federation_relationship(set_req(a)?).await?.into_inner();
            out.print(relationship_json(&r), || format!("Federation relationship created\n{}", relationship_text(&r)));
        }
        FederationCmd::Update(a) => {
            let r = c.update_federation_relationship(set_req(a)?).await?.into_inner();
            out.print(relationship_json(&r), || format!("Federation relationship updated\n{}", relationship_text(&r)));
        }
        FederationCmd::Show { trust_domain } => {
            let r = c.get_federation_relationship(pb::TrustDomainRequest { trust_domain }).await?.into_inner();
            out.print(relationship_json(&r), || relationship_text(&r));
        }
        FederationCmd::List => {
            let rs = c
                .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
                .await?
                .into_inner()
                .relationships;
            out.print(json!({"relationships": rs.iter().map(relationship_json).collect::<Vec<_>>()}), || {
                let mut s =
                    format!("Found {} federation relationship{}\n", rs.len(), if rs.len() == 1 { "" } else { "s" });
                for r in &rs {
                    s.push('\n');
                    s.push_str(&relationship_text(r));
                }
                s
            });
        }
        FederationCmd::Delete { trust_domain } => {
            let r = c.delete_federation_relationship(pb::TrustDomainRequest { trust_domain }).await?.into_inner();
            out.print(json!({"deleted": r.trust_domain}), || {
                format!(
                    "Federation relationship with {} deleted (its bundle stays until `bundle delete`)\n",
                    r.trust_domain
                )
            });
        }
        FederationCmd::Refresh { trust_domain } => {
            let r = c
                .refresh_federated_bundle(pb::TrustDomainRequest { trust_domain: trust_domain.clone() })
                .await?
                .into_inner();
            out.print(
                json!({"trust_domain": trust_domain, "updated": r.updated, "sequence_number": r.sequence_number}),
                || {
                    if r.updated {
                        format!("Bundle of {trust_domain} updated to sequence {}\n", r.sequence_number)
                    } else {
                        format!("Bundle of {trust_domain} unchanged (sequence {})\n", r.sequence_number)
                    }
                },
            );
        }
    }
    Ok(())
}

async fn bundle(c: &mut AdminClient<Channel>, out: &Printer, cmd: BundleCmd) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Show { format } => {
            let b = crate::api::convert::bundle_from_pb_unchecked(
                &c.get_bundle(pb::GetBundleRequest {}).await?.into_inner(),
            )?;
            let text = render_bundle(&b, format)?;
            out.print(json!({"trust_domain": b.trust_domain.to_string(), "bundle": text}), || text.clone());
        }
        BundleCmd::List { format } => {
            let bundles = c.list_federated_bundles(pb::ListFederatedBundlesRequest {}).await?.into_inner().bundles;
            let mut rows = Vec::new();
            let mut text = String::new();
            for pbb in &bundles {
                let b = crate::api::convert::bundle_from_pb_unchecked(pbb)?;
                let r = render_bundle(&b, format)?;
                text.push_str(&format!(
                    "****************************************\n* {}\n****************************************\n{r}\n",
                    b.trust_domain
                ));
                rows.push(json!({"trust_domain": b.trust_domain.to_string(), "bundle": r}));
            }
            out.print(json!({"bundles": rows}), || text.clone());
        }
        BundleCmd::Set { id, path, format } => {
            let td = tessera_identity::ids::parse_trust_domain(&id)?;
            let b = read_bundle(td, path.as_deref(), format)?;
            let set = c.set_federated_bundle(crate::api::convert::bundle_to_pb(&b)).await?.into_inner();
            out.print(json!({"trust_domain": set.trust_domain}), || format!("Bundle set for {}\n", set.trust_domain));
        }
        BundleCmd::Delete { id } => {
            c.delete_federated_bundle(pb::TrustDomainRequest { trust_domain: id.clone() }).await?;
            out.print(json!({"deleted": id}), || format!("Bundle deleted for {id}\n"));
        }
    }
    Ok(())
}

async fn x509_mint(
    c: &mut AdminClient<Channel>,
    out: &Printer,
    spiffe_id: String,
    ttl: Option<String>,
    dns: Vec<String>,
    write: Option<PathBuf>,
) -> anyhow::Result<()> {
    let id = tessera_identity::ids::parse_spiffe_id(&spiffe_id)?;
    let key = PrivateKey::generate_ec_p256()?;
    let csr = tessera_identity::csr::build_csr(&id, &dns, &key)?;
    let r = c
        .mint_x509_svid(pb::MintX509SvidRequest { spiffe_id, csr, ttl: opt_ttl(&ttl)?, dns_names: dns })
        .await?
        .into_inner();
    let svid = r.svid.ok_or_else(|| anyhow!("server returned no SVID"))?;
    let chain_pem = tessera_identity::pem::encode_certs(svid.cert_chain.iter().map(Vec::as_slice));
    let bundle_pem = tessera_identity::pem::encode_certs(r.bundle.iter().map(Vec::as_slice));
    match write {
        Some(dir) => {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            tessera_plugins::fsutil::atomic_write(&dir.join("svid.pem"), chain_pem.as_bytes(), 0o644)?;
            tessera_plugins::fsutil::atomic_write(&dir.join("key.pem"), key.to_pem().as_bytes(), 0o600)?;
            tessera_plugins::fsutil::atomic_write(&dir.join("bundle.pem"), bundle_pem.as_bytes(), 0o644)?;
            out.print(
                json!({"spiffe_id": svid.spiffe_id, "expires_at": svid.expires_at, "dir": dir.display().to_string()}),
                || {
                    format!(
                        "X509-SVID for {} (expires at {}) written to {}: svid.pem, key.pem, bundle.pem\n",
                        svid.spiffe_id,
                        svid.expires_at,
                        dir.display()
                    )
                },
            );
        }
        None => {
            let key_pem = key.to_pem();
            out.print(
                json!({"spiffe_id": svid.spiffe_id, "expires_at": svid.expires_at, "svid": chain_pem, "key": key_pem.as_str(), "bundle": bundle_pem}),
                || format!("X509-SVID:\n{chain_pem}\nPrivate key:\n{}\nRoot CAs:\n{bundle_pem}", key_pem.as_str()),
            );
        }
    }
    Ok(())
}

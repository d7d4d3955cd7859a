//! The `tessera-server` command line: clap's view of the verbs and flags, with
//! SPIRE-familiar names, and the small parsers for their values (TTLs, times, selectors).

use std::path::PathBuf;

use anyhow::{anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tessera_identity::unix_now;
use tessera_proto::types::v1 as types;

/// Tessera CA server.
#[derive(Debug, Parser)]
#[command(name = "tessera-server", version, about = "Tessera CA server and admin CLI")]
pub struct Cli {
    /// Admin API socket.
    #[arg(long, global = true, env = "TESSERA_ADMIN_SOCKET", default_value = "/run/tessera/server/admin.sock")]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: Output,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
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
    /// Diagnose the running server: coded findings, most severe first (exit 0 healthy, 1
    /// findings of warning or error, 2 doctor could not run). Only reads.
    Doctor {
        /// Also check this server.toml (and take the admin socket from it unless --socket).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file without starting: every problem with its key (exit 1).
    Validate {
        /// Path to server.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// The running server's state.
    #[command(subcommand)]
    Debug(DebugCmd),
}

#[derive(Debug, Subcommand)]
pub enum DebugCmd {
    /// Version, uptime, counts, authorities, the server's own SVID.
    Info,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
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
pub struct EntryFields {
    /// SPIFFE ID issued to matching workloads.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Agent (or node alias) allowed to obtain it.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// Selector type:value (repeatable).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// X509-SVID TTL.
    #[arg(long)]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID TTL.
    #[arg(long)]
    pub jwt_svid_ttl: Option<String>,
    /// Trust domain whose bundle the workload receives (repeatable).
    #[arg(long = "federates-with")]
    pub federates_with: Vec<String>,
    /// DNS SAN (repeatable).
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// Admin entry.
    #[arg(long)]
    pub admin: bool,
    /// Downstream entry.
    #[arg(long)]
    pub downstream: bool,
    /// Hint for workloads with several SVIDs.
    #[arg(long)]
    pub hint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Create an entry.
    Create {
        /// Entry ID (generated when omitted).
        #[arg(long = "entry-id")]
        id: Option<String>,
        /// Create every entry in this file instead (SPIRE's `{"entries": [...]}`, a JSON
        /// array, or one JSON entry per line), in batches of 1,000, each all or nothing.
        #[arg(long, conflicts_with_all = ["id", "spiffe_id", "parent_id", "selectors"])]
        file: Option<PathBuf>,
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
pub enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
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
pub struct RelationshipArgs {
    /// The peer trust domain.
    #[arg(long, alias = "id")]
    pub trust_domain: String,
    /// The peer's bundle endpoint, `https://host[:port][/path]`.
    #[arg(long)]
    pub bundle_endpoint_url: String,
    /// https_spiffe or https_web.
    #[arg(long, default_value = "https_spiffe")]
    pub profile: String,
    /// https_spiffe: the endpoint's SPIFFE ID.
    #[arg(long)]
    pub endpoint_spiffe_id: Option<String>,
    /// https_web: PEM trust anchors for the endpoint (default: the system CA bundle).
    #[arg(long)]
    pub ca_bundle_path: Option<PathBuf>,
    /// Honour an empty key set from the peer (the spec's "revoke all").
    #[arg(long)]
    pub allow_empty_bundle: bool,
    /// The peer's bundle to start from (https_spiffe needs one unless already stored).
    #[arg(long)]
    pub bundle_path: Option<PathBuf>,
    /// pem or spiffe.
    #[arg(long, value_enum, default_value = "pem")]
    pub bundle_format: BundleFormat,
}

#[derive(Debug, Subcommand)]
pub enum FederationCmd {
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
pub enum X509Cmd {
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
pub enum JwtCmd {
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
pub enum LocalAuthorityCmd {
    /// X.509 authorities.
    #[command(subcommand)]
    X509(AuthorityCmd),
}

#[derive(Debug, Subcommand)]
pub enum AuthorityCmd {
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
pub enum AgentCmd {
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
pub enum AuditCmd {
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
pub fn when_ms(s: &Option<String>) -> anyhow::Result<i64> {
    let Some(s) = s else { return Ok(0) };
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs.saturating_mul(1000));
    }
    let ago =
        humantime::parse_duration(s).map_err(|e| anyhow!("{s:?} is neither a duration (1h) nor Unix seconds: {e}"))?;
    Ok((unix_now() - i64::try_from(ago.as_secs()).unwrap_or(i64::MAX)).saturating_mul(1000))
}

/// Parses a TTL: plain seconds or a humantime duration (`90s`, `10m`, `1h`).
pub fn parse_ttl(s: &str) -> anyhow::Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        if n < 0 {
            bail!("TTL must not be negative: {s:?}");
        }
        return Ok(n);
    }
    let d = humantime::parse_duration(s).map_err(|e| anyhow!("invalid TTL {s:?}: {e}"))?;
    Ok(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub fn opt_ttl(s: &Option<String>) -> anyhow::Result<i64> {
    s.as_deref().map(parse_ttl).transpose().map(|t| t.unwrap_or(0))
}

pub fn selectors(raw: &[String]) -> anyhow::Result<Vec<types::Selector>> {
    raw.iter()
        .map(|s| {
            let sel: tessera_identity::Selector = s.parse()?;
            Ok(types::Selector { r#type: sel.kind, value: sel.value })
        })
        .collect()
}

pub fn ttl_i32(s: &Option<String>) -> anyhow::Result<i32> {
    i32::try_from(opt_ttl(s)?).map_err(|_| anyhow!("TTL is too large"))
}

pub fn entry_from_fields(id: String, f: EntryFields) -> anyhow::Result<types::Entry> {
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

//! The server in the test's process: a server on 127.0.0.1:0 with a temp dir, an admin client
//! on its socket, and Agent API clients with or without an agent SVID.

use std::path::PathBuf;

use tessera_identity::tls::{Authorize, client_config};
use tessera_identity::{Bundle, PrivateKey, SpiffeId, TrustDomain};
use tessera_proto::admin::v1 as admin;
use tessera_proto::admin::v1::admin_client::AdminClient;
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_proto::types::v1 as types;
use tessera_server::app::Server;
use tessera_server::config::Config;
use tonic::transport::Channel;

pub const TD: &str = "example.org";

pub struct TestServer {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub admin: AdminClient<Channel>,
}

/// The `[ca]` body the in-process tests run with unless they name one.
pub const DEFAULT_CA: &str = "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"";

/// Server config for tests; `extra_ca` replaces the `[ca]` body when not empty.
pub fn config_text(dir: &std::path::Path, extra_ca: &str) -> String {
    config_text_for(TD, dir, extra_ca)
}

/// The same for trust domain `td`.
pub fn config_text_for(td: &str, dir: &std::path::Path, extra_ca: &str) -> String {
    let ca = if extra_ca.is_empty() { DEFAULT_CA } else { extra_ca };
    crate::ServerToml { td, ..crate::ServerToml::in_process(dir, ca) }.render()
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    pub async fn start_with(extra_ca: &str) -> Self {
        Self::start_full(TD, extra_ca, "").await
    }

    /// A server for `td` with `extra_ca` as the `[ca]` body and `tail` appended to the config.
    pub async fn start_full(td: &str, extra_ca: &str, tail: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\n{}",
            config_text_for(td, dir.path(), extra_ca),
            tail.replace("$DIR", &dir.path().display().to_string())
        );
        Self::start_text(dir, &text).await
    }

    /// A server with exactly `text` as its config, its files in `dir`.
    pub async fn start_text(dir: tempfile::TempDir, text: &str) -> Self {
        Self::start_text_with_clock(dir, text, std::sync::Arc::new(tessera_ca::SystemClock)).await
    }

    /// A server whose CA reads `clock` (a `tessera_ca::ManualClock` in the tests that drive
    /// rotation and expiry), with `extra_ca` as the `[ca]` body.
    pub async fn start_with_clock(extra_ca: &str, clock: std::sync::Arc<dyn tessera_ca::Clock>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), extra_ca);
        Self::start_text_with_clock(dir, &text, clock).await
    }

    /// A server with exactly `text` as its config and its CA on `clock`.
    pub async fn start_text_with_clock(
        dir: tempfile::TempDir,
        text: &str,
        clock: std::sync::Arc<dyn tessera_ca::Clock>,
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cfg = Config::from_toml(text).unwrap();
        let server = Server::start_with_clock(cfg, clock).await.unwrap();
        let admin = tessera_server::client::connect_admin(&server.admin_socket).await.unwrap();
        Self { server: Some(server), dir, admin }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn td(&self) -> TrustDomain {
        self.server().ca.trust_domain().clone()
    }

    pub fn socket(&self) -> PathBuf {
        self.server().admin_socket.clone()
    }

    pub async fn bundle(&mut self) -> types::Bundle {
        self.admin.get_bundle(admin::GetBundleRequest {}).await.unwrap().into_inner()
    }

    pub async fn roots(&mut self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.bundle().await.x509_authorities.into_iter().map(Into::into).collect()
    }

    /// An Agent API channel that presents no client certificate.
    pub async fn anonymous_channel(&mut self) -> AgentClient<Channel> {
        let roots = self.roots().await;
        let server_id = tessera_identity::server_id(&self.td()).unwrap();
        let cfg = client_config(&roots, Authorize::Id(server_id), None).unwrap();
        let ch = tessera_svc::connect::tls(&self.server().agent_api_addr.to_string(), cfg).await.unwrap();
        AgentClient::new(ch)
    }

    pub async fn join_token(&mut self, alias: Option<&str>) -> admin::CreateJoinTokenResponse {
        self.admin
            .create_join_token(admin::CreateJoinTokenRequest { ttl: 600, spiffe_id: alias.unwrap_or_default().into() })
            .await
            .unwrap()
            .into_inner()
    }

    /// Attests a new agent with a fresh join token and returns it connected over mTLS.
    pub async fn attested_agent(&mut self) -> TestAgent {
        let token = self.join_token(None).await;
        let id = SpiffeId::new(&token.agent_id).unwrap();
        let key = PrivateKey::generate_ec_p256().unwrap();
        let csr = tessera_identity::csr::build_csr(&id, &[], &key).unwrap();
        let mut anon = self.anonymous_channel().await;
        let resp = anon
            .attest_agent(agent::AttestAgentRequest {
                data: Some(agent::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.token.clone().into_bytes(),
                }),
                csr,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let svid = resp.svid.unwrap();
        let client = self.agent_client(&svid.cert_chain, &key).await;
        TestAgent { id, key, chain: svid.cert_chain, client }
    }

    pub async fn agent_client(&mut self, chain: &[Vec<u8>], key: &PrivateKey) -> AgentClient<Channel> {
        let roots = self.roots().await;
        let server_id = tessera_identity::server_id(&self.td()).unwrap();
        let chain = chain.iter().map(|c| c.clone().into()).collect();
        let cfg = client_config(&roots, Authorize::Id(server_id), Some((chain, key))).unwrap();
        let ch = tessera_svc::connect::tls(&self.server().agent_api_addr.to_string(), cfg).await.unwrap();
        AgentClient::new(ch)
    }

    pub async fn create_entry(&mut self, spiffe_id: &str, parent: &str) -> types::Entry {
        self.admin
            .create_entry(admin::CreateEntryRequest {
                entry: Some(types::Entry {
                    spiffe_id: spiffe_id.into(),
                    parent_id: parent.into(),
                    selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:1000".into() }],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

pub struct TestAgent {
    pub id: SpiffeId,
    pub key: PrivateKey,
    pub chain: Vec<Vec<u8>>,
    pub client: AgentClient<Channel>,
}

/// A CSR (DER) for `id` with a fresh P-256 key.
pub fn csr_for(id: &str) -> Vec<u8> {
    let key = PrivateKey::generate_ec_p256().unwrap();
    tessera_identity::csr::build_csr(&SpiffeId::new(id).unwrap(), &[], &key).unwrap()
}

pub fn bundle_from_pb(b: &types::Bundle) -> Bundle {
    tessera_server::api::convert::bundle_from_pb_unchecked(b).unwrap()
}

/// Verifies `chain` (leaf first) against `roots` as a SPIFFE peer with ID `id`.
pub fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], id: &str) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier;
    let provider = tessera_identity::tls::provider();
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> = roots.iter().map(|r| r.clone().into()).collect();
    let v =
        tessera_identity::tls::SpiffeServerVerifier::new(&roots, Authorize::Id(SpiffeId::new(id).unwrap()), &provider)
            .unwrap();
    let leaf: rustls_pki_types::CertificateDer<'static> = chain[0].clone().into();
    let inter: Vec<rustls_pki_types::CertificateDer<'static>> = chain[1..].iter().map(|c| c.clone().into()).collect();
    v.verify_server_cert(
        &leaf,
        &inter,
        &rustls_pki_types::ServerName::try_from("x").unwrap(),
        &[],
        rustls_pki_types::UnixTime::now(),
    )
    .map(|_| ())
}

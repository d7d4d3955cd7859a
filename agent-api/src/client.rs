//! The client side of the Agent API: TLS toward the server (authenticated by its SPIFFE ID,
//! `spiffe://<td>/tessera/server`), connecting to the first replica that answers, and the
//! two calls that make or renew an agent identity with a key made here.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_identity::tls::{Authorize, client_config};
use tessera_identity::{PrivateKey, SpiffeId, TrustDomain};
use tessera_proto::agent::v1 as pb;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_proto::types::v1 as types;
use tonic::transport::Channel;

use crate::error::ClientError;
use crate::identity::AgentIdentity;

/// Connects to the Agent API at `addr` (`host:port`) with `tls`.
pub async fn connect(addr: &str, tls: rustls::ClientConfig) -> Result<AgentClient<Channel>, ClientError> {
    let channel = tessera_svc::connect::tls(addr, tls).await.map_err(|e| ClientError::Connect {
        addr: addr.to_owned(),
        reason: format!("{e}: {:?}", std::error::Error::source(&e)),
    })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Connects to the first server replica that answers, trying `servers` in order from index
/// `start`; returns the client and the index that answered.
pub async fn connect_any(
    servers: &[String],
    start: usize,
    tls: rustls::ClientConfig,
) -> Result<(AgentClient<Channel>, usize), ClientError> {
    let n = servers.len();
    let mut last = None;
    for k in 0..n {
        let i = (start + k) % n;
        let Some(addr) = servers.get(i) else { continue };
        match connect(addr, tls.clone()).await {
            Ok(c) => return Ok((c, i)),
            Err(e) => {
                tracing::debug!(server = %addr, error = %e, "Server replica unreachable; trying the next");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Connect { addr: String::new(), reason: "no server address".into() }))
}

/// TLS to the server of `td`, trusting `roots` and presenting `identity` when given.
pub fn server_tls(
    td: &TrustDomain,
    roots: &[CertificateDer<'static>],
    identity: Option<&AgentIdentity>,
) -> Result<rustls::ClientConfig, ClientError> {
    let server = tessera_identity::server_id(td).map_err(|e| ClientError::Tls(e.to_string()))?;
    let client = identity.map(|i| (i.chain.iter().map(|c| c.clone().into()).collect(), &i.key));
    client_config(roots, Authorize::Id(server), client).map_err(|e| ClientError::Tls(e.to_string()))
}

async fn within<T>(
    call: &'static str,
    timeout: Option<Duration>,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    let r = match timeout {
        Some(t) => tokio::time::timeout(t, f).await.map_err(|_| ClientError::Timeout(call))?,
        None => f.await,
    };
    r.map(tonic::Response::into_inner).map_err(ClientError::refused(call))
}

fn new_key_and_csr(id: &SpiffeId) -> Result<(PrivateKey, Vec<u8>), ClientError> {
    let key = PrivateKey::generate_ec_p256().map_err(|e| ClientError::Key(e.to_string()))?;
    let csr = tessera_identity::csr::build_csr(id, &[], &key).map_err(|e| ClientError::Key(e.to_string()))?;
    Ok((key, csr))
}

/// `AttestAgent`: proves the node with `data` (claiming `claimed`, which the CSR names) and
/// returns the new identity, with a key made here, and the bundle the server sent.
pub async fn attest(
    client: &mut AgentClient<Channel>,
    data: pb::AttestationData,
    claimed: &SpiffeId,
    timeout: Option<Duration>,
) -> Result<(AgentIdentity, Option<types::Bundle>), ClientError> {
    const CALL: &str = "AttestAgent";
    let (key, csr) = new_key_and_csr(claimed)?;
    let resp = within(
        CALL,
        timeout,
        client.attest_agent(pb::AttestAgentRequest {
            data: Some(data),
            csr,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
    .await?;
    let svid = resp.svid.ok_or(ClientError::Malformed { call: CALL, reason: "no SVID in the answer".into() })?;
    let identity =
        AgentIdentity::new(svid.cert_chain, key).map_err(|reason| ClientError::Malformed { call: CALL, reason })?;
    Ok((identity, resp.bundle))
}

/// `RenewAgent`: a new SVID for `current`'s ID over a key made here.
pub async fn renew(
    client: &mut AgentClient<Channel>,
    current: &AgentIdentity,
    timeout: Option<Duration>,
) -> Result<AgentIdentity, ClientError> {
    const CALL: &str = "RenewAgent";
    let (key, csr) = new_key_and_csr(&current.id)?;
    let resp = within(
        CALL,
        timeout,
        client.renew_agent(pb::RenewAgentRequest { csr, agent_version: env!("CARGO_PKG_VERSION").into() }),
    )
    .await?;
    let svid = resp.svid.ok_or(ClientError::Malformed { call: CALL, reason: "no SVID in the answer".into() })?;
    AgentIdentity::new(svid.cert_chain, key).map_err(|reason| ClientError::Malformed { call: CALL, reason })
}

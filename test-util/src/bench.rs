//! What the bench binaries (`tessera-bench*` in the `tests` crate) share: choosing the
//! binaries to measure, and a simulated agent's periodic sync.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use prost::Message;
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;

/// `--binaries DIR`: measure the `tessera-server` and `tessera-agent` in `dir` instead of
/// this build's.
pub fn use_binaries_arg(dir: &str) -> Result<()> {
    anyhow::ensure!(Path::new(dir).join("tessera-server").is_file(), "{dir} has no tessera-server");
    crate::use_binaries(Path::new(dir), &[]);
    println!("Binaries: {dir}");
    Ok(())
}

/// One simulated agent's syncs over a window: it starts `offset` after `t0` (agents drift
/// apart over the period), then syncs every `every` from `revision`, `window / every` times
/// (no wait after the last). Returns (syncs, protobuf bytes received).
pub async fn periodic_syncs(
    mut client: AgentClient<tonic::transport::Channel>,
    revision: u64,
    t0: Instant,
    offset: Duration,
    every: Duration,
    window: Duration,
) -> Result<(usize, usize)> {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + offset)).await;
    let (mut syncs, mut bytes) = (0usize, 0usize);
    let n = (window.as_secs_f64() / every.as_secs_f64()).floor().max(1.0) as usize;
    for i in 0..n {
        if i > 0 {
            tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + offset + every * i as u32)).await;
        }
        let r = client
            .sync_entries(agent::SyncEntriesRequest { since_revision: revision, ..Default::default() })
            .await?
            .into_inner();
        bytes += r.encoded_len();
        syncs += 1;
    }
    Ok((syncs, bytes))
}

type Admin = tessera_proto::admin::v1::admin_client::AdminClient<tonic::transport::Channel>;

/// The server's X.509 roots, read over the Admin API.
pub async fn roots(adm: &mut Admin) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    Ok(adm
        .get_bundle(tessera_proto::admin::v1::GetBundleRequest {})
        .await?
        .into_inner()
        .x509_authorities
        .into_iter()
        .map(Into::into)
        .collect())
}

/// A new agent: a join token from the Admin API, then `AttestAgent` on `anon` (a connection
/// without a client certificate) with a fresh key. Returns its ID, key and SVID chain.
pub async fn attest_new_agent(
    adm: &mut Admin,
    anon: &mut AgentClient<tonic::transport::Channel>,
) -> Result<(tessera_identity::SpiffeId, tessera_identity::PrivateKey, Vec<rustls_pki_types::CertificateDer<'static>>)>
{
    let token = adm
        .create_join_token(tessera_proto::admin::v1::CreateJoinTokenRequest { ttl: 600, spiffe_id: String::new() })
        .await?
        .into_inner();
    let id = tessera_identity::SpiffeId::new(&token.agent_id)?;
    let key = tessera_identity::PrivateKey::generate_ec_p256()?;
    let svid = anon
        .attest_agent(agent::AttestAgentRequest {
            data: Some(agent::AttestationData { r#type: "join_token".into(), payload: token.token.into_bytes() }),
            csr: tessera_identity::csr::build_csr(&id, &[], &key)?,
            ..Default::default()
        })
        .await?
        .into_inner()
        .svid
        .ok_or_else(|| anyhow::anyhow!("AttestAgent answered without an SVID"))?;
    Ok((id, key, svid.cert_chain.into_iter().map(Into::into).collect()))
}

//! The agent in-process against an in-process server: attestation, the Workload API, SDS
//! (SotW and delta), rotation, cert files, restart, server outage. Real sockets throughout;
//! the real-Envoy and py-spiffe tests live in the e2e crate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use prost::Message;
use tessera_agent::app::Agent;
use tessera_agent::config::Config;
use tessera_proto::admin::v1 as admin;
use tessera_proto::admin::v1::admin_client::AdminClient;
use tessera_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use tessera_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tessera_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tessera_proto::types::v1 as types;
use tessera_proto::workload as wl;
use tessera_test_util::{ServerToml, eventually, my_uid};
use tonic::Code;
use tonic::transport::Channel;

struct Env {
    dir: tempfile::TempDir,
    server: Option<tessera_server::app::Server>,
    admin: AdminClient<Channel>,
    agent: Option<Agent>,
    agent_toml: String,
    entry: types::Entry,
}

async fn uds_channel(path: PathBuf) -> Channel {
    tessera_svc::connect::unix(&path).await.unwrap()
}

impl Env {
    async fn start(svid_ttl: &str) -> Env {
        Self::start_with(svid_ttl, "").await
    }

    /// `server_extra` goes into the server's `[server]` section.
    async fn start_with(svid_ttl: &str, server_extra: &str) -> Env {
        Self::start_polling(svid_ttl, server_extra, "200ms").await
    }

    /// As [`Env::start_with`], with the agent polling every `sync_interval`.
    async fn start_polling(svid_ttl: &str, server_extra: &str, sync_interval: &str) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = format!("ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"{svid_ttl}\"");
        let server_toml =
            ServerToml { data: "server", server: server_extra, ..ServerToml::in_process(d, &ca) }.render();
        let server =
            tessera_server::app::Server::start(tessera_server::config::Config::from_toml(&server_toml).unwrap())
                .await
                .unwrap();
        let mut admin = tessera_server::client::connect_admin(&server.admin_socket).await.unwrap();
        let token = admin
            .create_join_token(admin::CreateJoinTokenRequest {
                ttl: 600,
                spiffe_id: "spiffe://example.org/node/test".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let entry = admin
            .create_entry(admin::CreateEntryRequest {
                entry: Some(types::Entry {
                    spiffe_id: "spiffe://example.org/web".into(),
                    parent_id: "spiffe://example.org/node/test".into(),
                    selectors: vec![types::Selector { r#type: "unix".into(), value: format!("uid:{}", my_uid()) }],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        let bundle = admin.get_bundle(admin::GetBundleRequest {}).await.unwrap().into_inner();
        let pem = tessera_identity::pem::encode_certs(bundle.x509_authorities.iter().map(Vec::as_slice));
        std::fs::write(d.join("bootstrap.pem"), pem).unwrap();
        let agent_toml = format!(
            "trust_domain = \"example.org\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"127.0.0.1:0\"\nlog_level = \"warn\"\nsync_interval = \"{sync_interval}\"\n[[cert_files]]\ndir = \"{}\"\nspiffe_id = \"spiffe://example.org/web\"\n",
            server.agent_api_addr,
            d.join("agent").display(),
            d.join("agent.sock").display(),
            d.join("bootstrap.pem").display(),
            d.join("files").display(),
        );
        let cfg = Config::from_toml(&format!("join_token = \"{}\"\n{agent_toml}", token.token)).unwrap();
        let agent = Agent::start(cfg).await.unwrap();
        Env { dir, server: Some(server), admin, agent: Some(agent), agent_toml, entry }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    async fn workload(
        &self,
    ) -> tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::service::interceptor::InterceptedService<
            Channel,
            fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
        >,
    > {
        tessera_agent::cli::workload_client(&self.socket()).await.unwrap()
    }

    async fn sds(&self) -> SecretDiscoveryServiceClient<Channel> {
        SecretDiscoveryServiceClient::new(uds_channel(self.socket()).await)
    }

    async fn stop(mut self) {
        if let Some(a) = self.agent.take() {
            a.shutdown().await;
        }
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

fn secret(any: &prost_types::Any) -> Secret {
    assert_eq!(any.type_url, tessera_agent::sds::SECRET_TYPE);
    Secret::decode(any.value.as_slice()).unwrap()
}

fn cert_serial(s: &Secret) -> String {
    let Some(secret::Type::TlsCertificate(t)) = &s.r#type else { panic!("not a TLS certificate: {s:?}") };
    let Some(tessera_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(pem)) =
        t.certificate_chain.as_ref().unwrap().specifier.clone()
    else {
        panic!("no inline chain")
    };
    let certs = tessera_identity::pem::decode_certs(&pem).unwrap();
    tessera_identity::x509::cert_facts(&certs[0]).unwrap().serial
}

#[tokio::test]
async fn workload_gets_x509_and_jwt_svids_and_bundles_over_the_workload_api() {
    let env = Env::start("1h").await;
    let mut c = env.workload().await;
    let resp = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    assert_eq!(resp.svids.len(), 1, "node alias entries must not be served to workloads");
    let s = &resp.svids[0];
    assert_eq!(s.spiffe_id, "spiffe://example.org/web");
    // The Rust spiffe crate accepts the SVID and its key.
    let svid = spiffe::X509Svid::parse_from_der(&s.x509_svid, &s.x509_svid_key).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let bundle =
        spiffe::X509Bundle::parse_from_der(spiffe::TrustDomain::new("example.org").unwrap(), &s.bundle).unwrap();
    assert_eq!(bundle.authorities().len(), 1);

    let jwt = c
        .fetch_jwtsvid(wl::JwtsvidRequest { audience: vec!["billing".into()], spiffe_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let token = jwt.svids[0].svid.clone();
    let v = c
        .validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "billing".into(), svid: token.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, "spiffe://example.org/web");
    let wrong =
        c.validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "other".into(), svid: token }).await.unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    let e = c.fetch_jwtsvid(wl::JwtsvidRequest { audience: vec![], spiffe_id: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let jb =
        c.fetch_jwt_bundles(wl::JwtBundlesRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    let jwks = jb.bundles.get("spiffe://example.org").unwrap();
    let parsed =
        tessera_identity::Bundle::from_jwks(tessera_identity::TrustDomain::new("example.org").unwrap(), jwks).unwrap();
    assert_eq!(parsed.jwt_authorities.len(), 1);
    assert!(parsed.x509_authorities.is_empty());
    let xb =
        c.fetch_x509_bundles(wl::X509BundlesRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    assert!(xb.bundles.contains_key("spiffe://example.org"));

    // A second, newer identity for the same workload: both are served, the older first, and
    // SDS "default" stays the older one.
    let mut admin = env.admin.clone();
    let mut second = env.entry.clone();
    second.id = String::new();
    second.spiffe_id = "spiffe://example.org/web-canary".into();
    second.hint = "canary".into();
    tokio::time::sleep(Duration::from_millis(1100)).await; // created_at has 1 s resolution
    admin.create_entry(admin::CreateEntryRequest { entry: Some(second) }).await.unwrap();
    let mut stream = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner();
    let both = eventually(10, "second identity on the stream", async || {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        (r.svids.len() == 2).then_some(r)
    })
    .await;
    assert_eq!(both.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(both.svids[1].spiffe_id, "spiffe://example.org/web-canary");
    assert_eq!(both.svids[1].hint, "canary");
    let r = env
        .sds()
        .await
        .fetch_secrets(DiscoveryRequest { resource_names: vec!["default".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let default_serial = cert_serial(&secret(&r.resources[0]));
    let web_serial = tessera_identity::x509::cert_facts(&both.svids[0].x509_svid).map(|f| f.serial).unwrap_or_default();
    assert_eq!(default_serial, web_serial, "default is not the oldest identity");
    drop((stream, c)); // open streams would hold the agent's shutdown for its drain grace
    env.stop().await;
}

#[tokio::test]
async fn workload_api_requires_the_security_header_and_an_identity() {
    let env = Env::start("1h").await;
    let mut raw = tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        uds_channel(env.socket()).await,
    );
    let e = raw.fetch_x509svid(wl::X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("security header"), "{}", e.message());
    let e =
        raw.validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "a".into(), svid: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Delete the entry: within the sync interval, the open stream ends with PermissionDenied
    // and new calls are refused.
    let mut c = env.workload().await;
    let mut stream = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let mut admin = env.admin.clone();
    admin.delete_entry(admin::EntryId { id: env.entry.id.clone() }).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream not ended after the entry was deleted");
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    let e = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    env.stop().await;
}

#[tokio::test]
async fn sds_sotw_serves_named_secrets_honours_nonces_and_pushes_rotation() {
    let env = Env::start("1h").await;
    let mut sds = env.sds().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into(), "ROOTCA".into(), "ALL".into()],
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = tokio::time::timeout(
        Duration::from_secs(5),
        sds.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("stream not opened")
    .unwrap()
    .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("no first response")
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 3);
    let secrets: Vec<Secret> = first.resources.iter().map(secret).collect();
    assert_eq!(secrets[0].name, "default");
    let serial1 = cert_serial(&secrets[0]);
    assert!(matches!(secrets[1].r#type, Some(secret::Type::ValidationContext(ref v)) if v.trusted_ca.is_some()));
    let Some(secret::Type::ValidationContext(all)) = &secrets[2].r#type else { panic!() };
    assert_eq!(all.custom_validator_config.as_ref().unwrap().name, "envoy.tls.cert_validator.spiffe");
    // ACK: no new response until something changes.
    tx.send(DiscoveryRequest {
        version_info: first.version_info.clone(),
        resource_names: vec!["default".into(), "ROOTCA".into(), "ALL".into()],
        response_nonce: first.nonce.clone(),
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(600), inbound.message()).await.is_err(),
        "response sent after an ACK without a change"
    );
    // A NACK of the same version is logged, not answered with the same version again; a
    // stale nonce is ignored.
    tx.send(DiscoveryRequest {
        version_info: String::new(),
        resource_names: vec!["default".into(), "ROOTCA".into(), "ALL".into()],
        response_nonce: first.nonce.clone(),
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        error_detail: Some(tessera_proto::google::rpc::Status {
            code: 3,
            message: "rejected for the test".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    tx.send(DiscoveryRequest {
        resource_names: vec!["ROOTCA".into()],
        response_nonce: "stale".into(),
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(600), inbound.message()).await.is_err(),
        "rejected version resent, or stale request answered"
    );
    // `debug sds` over the admin socket: the stream, its caller, what was sent and the replies.
    let admin_socket = env.agent.as_ref().unwrap().manager.config().admin_socket_path.clone();
    let v = tessera_agent::admin::ask(&admin_socket, "sds").await.unwrap();
    let streams = v["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{v}");
    let st = &streams[0];
    assert_eq!(st["api"], "sotw");
    assert_eq!(st["pid"].as_i64(), Some(i64::from(std::process::id())), "{st}");
    assert_eq!(st["spiffe_ids"], serde_json::json!(["spiffe://example.org/web"]));
    assert_eq!(st["nonce"], first.nonce.as_str());
    assert_eq!(st["version"], first.version_info.as_str());
    assert_eq!(st["resources"]["default"]["serial"].as_str(), Some(serial1.as_str()), "{st}");
    assert_eq!(st["resources"]["default"]["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(st["resources"]["ALL"]["trust_domains"], serde_json::json!(["example.org"]));
    assert_eq!(st["last_ack"]["nonce"], first.nonce.as_str());
    assert_eq!(st["last_nack"]["error"], "rejected for the test", "{st}");
    assert_eq!(st["last_nack"]["code"], 3);
    let m = &env.agent.as_ref().unwrap().manager.metrics;
    assert_eq!(m.sds_nacks.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Change the entry: the agent re-mints and pushes.
    let mut admin = env.admin.clone();
    let mut e = env.entry.clone();
    e.dns_names = vec!["web.internal".into()];
    admin.update_entry(admin::UpdateEntryRequest { entry: Some(e) }).await.unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("no push after rotation")
        .unwrap()
        .unwrap();
    assert_ne!(pushed.version_info, first.version_info);
    assert_ne!(cert_serial(&secret(&pushed.resources[0])), serial1);

    // FetchSecrets by SPIFFE ID and by trust domain; unknown names yield nothing.
    let r = sds
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["spiffe://example.org/web".into(), "spiffe://example.org".into(), "nope".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.resources.len(), 2);
    drop((inbound, tx, sds)); // open streams would hold the agent's shutdown for its drain grace
    env.stop().await;
}

#[tokio::test]
async fn sds_delta_sends_only_what_changed() {
    let env = Env::start("1h").await;
    let mut sds = env.sds().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        resource_names_subscribe: vec!["spiffe://example.org/web".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = tokio::time::timeout(
        Duration::from_secs(5),
        sds.delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("stream not opened")
    .unwrap()
    .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("no first response")
        .unwrap()
        .unwrap();
    let mut names: Vec<_> = first.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    assert_eq!(names, vec!["ROOTCA", "spiffe://example.org/web"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut admin = env.admin.clone();
    let mut e = env.entry.clone();
    e.dns_names = vec!["web.internal".into()];
    admin.update_entry(admin::UpdateEntryRequest { entry: Some(e) }).await.unwrap();
    let delta =
        tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("no delta push").unwrap().unwrap();
    assert_eq!(
        delta.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["spiffe://example.org/web"],
        "unchanged ROOTCA resent"
    );
    // Entry deleted: the SVID resource is removed.
    admin.delete_entry(admin::EntryId { id: env.entry.id.clone() }).await.unwrap();
    let removed =
        tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("no removal").unwrap().unwrap();
    assert_eq!(removed.removed_resources, vec!["spiffe://example.org/web".to_owned()]);
    drop((inbound, tx, sds)); // open streams would hold the agent's shutdown for its drain grace
    env.stop().await;
}

#[tokio::test]
async fn svids_rotate_at_half_life_and_cert_files_follow() {
    let env = Env::start("4s").await;
    let files = env.dir.path().join("files");
    let serial_of_file = || {
        let pem = std::fs::read(files.join("cert-chain.pem")).ok()?;
        Some(tessera_identity::x509::cert_facts(&tessera_identity::pem::decode_certs(&pem).ok()?[0]).ok()?.serial)
    };
    eventually(3, "cert files written", async || serial_of_file()).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(files.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    let mut seen = std::collections::BTreeSet::new();
    eventually(12, "three SVIDs in the cert files", async || {
        seen.extend(serial_of_file());
        (seen.len() >= 3).then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test]
async fn agent_restarts_from_its_persisted_svid_and_serves_cached_svids_when_the_server_is_down() {
    let mut env = Env::start("1h").await;
    env.agent.take().unwrap().shutdown().await;
    use std::os::unix::fs::PermissionsExt;
    let key = env.dir.path().join("agent/agent-key.pem");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    // No join token this time: the persisted SVID is enough.
    env.agent = Some(Agent::start(Config::from_toml(&env.agent_toml).unwrap()).await.unwrap());
    let mut c = env.workload().await;
    let before = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    // Server gone: the cached SVID is still served.
    env.server.take().unwrap().shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    assert_eq!(after.svids[0].x509_svid, before.svids[0].x509_svid);
    env.stop().await;
}

#[tokio::test]
async fn the_rust_spiffe_crate_client_gets_x509_and_jwt_svids() {
    let env = Env::start("1h").await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", env.socket().display())).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&spiffe::TrustDomain::new("example.org").unwrap()).is_some());
    let jwt = client.fetch_jwt_svid(["svc"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    let checked = client.validate_jwt_token("svc", jwt.token()).await.unwrap();
    assert_eq!(checked.spiffe_id().to_string(), "spiffe://example.org/web");
    assert!(client.validate_jwt_token("other", jwt.token()).await.is_err());
    env.stop().await;
}

#[tokio::test]
async fn the_agent_renews_its_own_svid_at_half_life() {
    let env = Env::start_with("1h", "agent_svid_ttl = \"4s\"").await;
    let path = env.dir.path().join("agent/agent-svid.pem");
    let serial = || {
        tessera_identity::x509::cert_facts(
            &tessera_identity::pem::decode_certs(&std::fs::read(&path).unwrap()).unwrap()[0],
        )
        .unwrap()
        .serial
    };
    let first = serial();
    eventually(10, "agent SVID renewed", async || (serial() != first).then_some(())).await;
    // Still serving after the renewal (the new SVID authenticates the agent).
    let mut admin = env.admin.clone();
    let mut e = env.entry.clone();
    e.dns_names = vec!["after-renewal.internal".into()];
    admin.update_entry(admin::UpdateEntryRequest { entry: Some(e) }).await.unwrap();
    let mut c = env.workload().await;
    eventually(10, "agent still syncing after renewing its SVID", async || {
        let r = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
        let leaf = &tessera_identity::pem::decode_certs(
            tessera_identity::pem::encode_certs([r.svids[0].x509_svid.as_slice()]).as_bytes(),
        )
        .unwrap()[0];
        x509_dns(leaf).contains(&"after-renewal.internal".to_owned()).then_some(())
    })
    .await;
    env.stop().await;
}

fn x509_dns(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| if let GeneralName::DNSName(d) = n { Some((*d).to_owned()) } else { None })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn federated_bundles_reach_workloads_and_envoy_for_entries_that_federate() {
    let env = Env::start("1h").await;
    let mut admin = env.admin.clone();
    let peer_key = rcgen::KeyPair::generate().unwrap();
    let peer_td = tessera_identity::TrustDomain::new("peer.org").unwrap();
    let peer_root =
        tessera_identity::x509::ca_params(&peer_td, 0, 4_000_000_000, [1; 16]).unwrap().self_signed(&peer_key).unwrap();
    admin
        .set_federated_bundle(types::Bundle {
            trust_domain: "peer.org".into(),
            x509_authorities: vec![peer_root.der().to_vec()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut e = env.entry.clone();
    e.federates_with = vec!["peer.org".into()];
    admin.update_entry(admin::UpdateEntryRequest { entry: Some(e) }).await.unwrap();
    let mut c = env.workload().await;
    let resp = eventually(10, "federated bundle at the workload", async || {
        let r = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
        (!r.federated_bundles.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(resp.federated_bundles.get("spiffe://peer.org").unwrap(), &peer_root.der().to_vec());
    // SDS: "ALL" has one trust bundle per trust domain, "spiffe://peer.org" the peer's roots.
    let mut sds = env.sds().await;
    let r = sds
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["ALL".into(), "spiffe://peer.org".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.resources.len(), 2);
    let Some(secret::Type::ValidationContext(all)) = secret(&r.resources[0]).r#type else { panic!() };
    let cfg = tessera_proto::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig::decode(
        all.custom_validator_config.unwrap().typed_config.unwrap().value.as_slice(),
    )
    .unwrap();
    let mut tds: Vec<_> = cfg.trust_domains.iter().map(|t| t.name.clone()).collect();
    tds.sort();
    assert_eq!(tds, vec!["example.org", "peer.org"]);
    env.stop().await;
}

#[tokio::test]
async fn tainting_an_authority_replaces_everything_it_signed_at_once() {
    // 1 h SVIDs: without the taint, nothing would rotate during this test.
    let env = Env::start("1h").await;
    let mut admin = env.admin.clone();
    let mut c = env.workload().await;
    let aki = |der: &[u8]| tessera_identity::x509::cert_facts(der).unwrap().authority_key_id.unwrap();
    let first = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    let old_svid = first.svids[0].x509_svid.clone();
    let old_authority = aki(&old_svid);
    let agents = admin.list_agents(admin::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    let agent_serial = agents[0].serial.clone();

    admin.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await.unwrap();
    admin.activate_x509_authority(admin::ActivateX509AuthorityRequest { authority_id: String::new() }).await.unwrap();
    // Activation alone does not replace valid SVIDs.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    assert_eq!(r.svids[0].x509_svid, old_svid);

    admin.taint_x509_authority(admin::TaintX509AuthorityRequest { authority_id: old_authority.clone() }).await.unwrap();
    let replaced = eventually(10, "the workload SVID replaced after the taint", async || {
        let r = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
        (r.svids[0].x509_svid != old_svid).then_some(r)
    })
    .await;
    assert_ne!(aki(&replaced.svids[0].x509_svid), old_authority, "the replacement is signed by the tainted CA");
    // The agent's own SVID was renewed too.
    eventually(10, "the agent SVID renewed after the taint", async || {
        let agents = admin.list_agents(admin::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
        (agents[0].serial != agent_serial).then_some(())
    })
    .await;
    env.stop().await;
}

/// Attack-table rows for the agent socket (docs/security-tests.md): forged and expired
/// JWT-SVIDs at ValidateJWTSVID, oversized Workload API and SDS messages, and SDS from a
/// process that matches no entry.
#[tokio::test]
async fn the_agent_socket_refuses_forged_tokens_oversized_messages_and_unattested_callers() {
    let env = Env::start("1h").await;
    let mut c = env.workload().await;
    let jwt = c
        .fetch_jwtsvid(wl::JwtsvidRequest { audience: vec!["billing".into()], spiffe_id: String::new() })
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    // Valid as fetched; a flipped signature byte is refused.
    c.validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "billing".into(), svid: jwt.clone() }).await.unwrap();
    let mut forged = jwt.clone().into_bytes();
    let at = forged.len() - 3;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let e = c
        .validate_jwtsvid(wl::ValidateJwtsvidRequest {
            audience: "billing".into(),
            svid: String::from_utf8(forged).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("signature"), "{}", e.message());
    // A token minted with a one-second TTL is refused once expired.
    let mut admin = env.admin.clone();
    let short = admin
        .mint_jwt_svid(admin::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/web".into(),
            audience: vec!["billing".into()],
            ttl: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e =
        c.validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "billing".into(), svid: short }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("expired"), "{}", e.message());

    // Oversized messages: 64 KiB on the Workload API, 1 MiB on SDS.
    let e = c
        .validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "billing".into(), svid: "a".repeat(70 * 1024) })
        .await
        .unwrap_err();
    assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "{e:?}");
    let mut sds = env.sds().await;
    let e = sds
        .fetch_secrets(DiscoveryRequest { resource_names: vec!["x".repeat(1100 * 1024)], ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "{e:?}");

    // SDS from a process that matches no entry: nothing is served (no secret, or a refusal).
    let served = |r: &Result<
        tonic::Response<tessera_proto::envoy::service::discovery::v3::DiscoveryResponse>,
        tonic::Status,
    >| { r.as_ref().map(|r| r.get_ref().resources.len()).unwrap_or(0) };
    let first =
        sds.fetch_secrets(DiscoveryRequest { resource_names: vec!["default".into()], ..Default::default() }).await;
    assert_eq!(served(&first), 1, "the attested caller gets its secret: {first:?}");
    admin.delete_entry(admin::EntryId { id: env.entry.id.clone() }).await.unwrap();
    eventually(5, "an unattested caller gets no secrets", async || {
        let r =
            sds.fetch_secrets(DiscoveryRequest { resource_names: vec!["default".into()], ..Default::default() }).await;
        if let Err(e) = &r {
            assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        }
        (served(&r) == 0).then_some(())
    })
    .await;
    env.stop().await;
}

/// Reads the next SotW response within `secs`, then ACKs it for `names`.
async fn next_acked(
    inbound: &mut tonic::Streaming<tessera_proto::envoy::service::discovery::v3::DiscoveryResponse>,
    tx: &tokio::sync::mpsc::Sender<DiscoveryRequest>,
    names: &[&str],
    secs: u64,
    what: &str,
) -> tessera_proto::envoy::service::discovery::v3::DiscoveryResponse {
    let r = tokio::time::timeout(Duration::from_secs(secs), inbound.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {secs} s"))
        .unwrap()
        .unwrap();
    tx.send(DiscoveryRequest {
        version_info: r.version_info.clone(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        response_nonce: r.nonce.clone(),
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    r
}

#[tokio::test]
async fn server_change_notices_reach_envoy_without_waiting_for_the_poll() {
    // The agent polls once an hour: whatever arrives within seconds came by a change notice.
    let env = Env::start_polling("1h", "", "1h").await;
    let mut sds = env.sds().await;
    let names = ["spiffe://example.org/api", "ROOTCA"];
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = sds.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Only ROOTCA exists yet: no entry for the api identity.
    let first = next_acked(&mut inbound, &tx, &names, 5, "first answer").await;
    assert_eq!(first.resources.len(), 1);
    let roots = |r: &tessera_proto::envoy::service::discovery::v3::DiscoveryResponse| {
        let s = r.resources.iter().map(secret).find(|s| s.name == "ROOTCA").unwrap();
        let Some(secret::Type::ValidationContext(v)) = s.r#type else { panic!("ROOTCA is not a validation context") };
        let Some(tessera_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(pem)) =
            v.trusted_ca.unwrap().specifier
        else {
            panic!("no inline roots")
        };
        tessera_identity::pem::decode_certs(&pem).unwrap().len()
    };
    assert_eq!(roots(&first), 1);

    // A new entry: the server's notice makes the agent sync and mint now.
    let mut admin = env.admin.clone();
    let mut api = env.entry.clone();
    api.id = String::new();
    api.spiffe_id = "spiffe://example.org/api".into();
    admin.create_entry(admin::CreateEntryRequest { entry: Some(api) }).await.unwrap();
    let minted = next_acked(&mut inbound, &tx, &names, 10, "SVID for a new entry").await;
    assert_eq!(minted.resources.len(), 2, "the new identity's SVID was pushed");
    // One write, one notice: nothing more comes once the server's revision check has run.
    let notices =
        || env.agent.as_ref().unwrap().manager.metrics.change_notices.load(std::sync::atomic::Ordering::Relaxed);
    let after_entry = notices();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(notices(), after_entry, "an entry write was announced more than once");

    // A new authority in the bundle: pushed as well.
    admin.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await.unwrap();
    let rotated = next_acked(&mut inbound, &tx, &names, 10, "bundle change").await;
    assert_eq!(roots(&rotated), 2, "the prepared authority reached ROOTCA");

    // The agent counted the notices it acted on.
    let notices = notices();
    assert!(notices >= 3, "initial, entry and bundle notices; got {notices}");
    drop((inbound, tx, sds)); // open streams would hold the agent's shutdown for its drain grace
    env.stop().await;
}

/// F7 of the second review: one workload asking for ever-new JWT audiences runs out of its
/// own budget; another workload on the node still gets JWT-SVIDs and X509-SVIDs, and oversized
/// audience lists are refused.
#[tokio::test]
async fn one_workload_cannot_starve_its_node_of_jwt_or_x509_svids() {
    let env = Env::start("1h").await;
    let mut admin = env.admin.clone();
    let mut quiet = env.entry.clone();
    quiet.id = String::new();
    quiet.spiffe_id = "spiffe://example.org/quiet".into();
    admin.create_entry(admin::CreateEntryRequest { entry: Some(quiet) }).await.unwrap();
    let mut c = env.workload().await;
    eventually(10, "second identity at the workload", async || {
        let r = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
        (r.svids.len() >= 2).then_some(())
    })
    .await;
    let jwt = |aud: String, id: &str| wl::JwtsvidRequest { audience: vec![aud], spiffe_id: id.into() };
    let mut refused = None;
    for i in 0..500 {
        match c.fetch_jwtsvid(jwt(format!("aud-{i}"), "spiffe://example.org/web")).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (n, e) = refused.expect("500 new audiences in a row were all minted");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(n >= 50, "refused after only {n}");
    // The other workload's identity is unaffected, and so is X.509 signing.
    c.fetch_jwtsvid(jwt("billing".into(), "spiffe://example.org/quiet")).await.unwrap();
    let x = c.fetch_x509svid(wl::X509svidRequest {}).await.unwrap().into_inner().message().await.unwrap().unwrap();
    assert_eq!(x.svids.len(), 2);
    // Bounds on the audience list.
    let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
    let e = c
        .fetch_jwtsvid(wl::JwtsvidRequest { audience: many, spiffe_id: "spiffe://example.org/quiet".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.fetch_jwtsvid(jwt("x".repeat(600), "spiffe://example.org/quiet")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    env.stop().await;
}

/// F8 of the second review: a delta SDS stream remembers at most its subscriptions, and
/// those are bounded.
#[tokio::test]
async fn a_delta_sds_stream_cannot_subscribe_without_bound() {
    let env = Env::start("1h").await;
    let mut sds = env.sds().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let names: Vec<String> =
        (0..=tessera_agent::sds::MAX_SUBSCRIBED).map(|i| format!("spiffe://example.org/x{i}")).collect();
    tx.send(DeltaDiscoveryRequest {
        type_url: tessera_agent::sds::SECRET_TYPE.into(),
        resource_names_subscribe: names,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = sds.delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let e = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("no answer").unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // State of the world: one name repeated 100,000 times is one resource, not 100,000.
    let r = sds
        .fetch_secrets(DiscoveryRequest { resource_names: vec!["ROOTCA".into(); 100_000], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.resources.len(), 1);
    let many: Vec<String> = (0..2000).map(|i| format!("spiffe://example.org/y{i}")).collect();
    let e = sds.fetch_secrets(DiscoveryRequest { resource_names: many, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    env.stop().await;
}

/// F8 of the second review (SPIRE's behaviour): ValidateJWTSVID checks a token against our
/// bundle and the bundles the caller's entries federate with, not every federated bundle.
#[tokio::test]
async fn validate_jwtsvid_uses_only_the_bundles_the_caller_federates_with() {
    let env = Env::start("1h").await;
    // A peer trust domain with a JWT key, federated with but not by this workload's entry.
    let key = rcgen::KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let mut admin = env.admin.clone();
    admin
        .set_federated_bundle(types::Bundle {
            trust_domain: "peer.org".into(),
            jwt_authorities: vec![types::JwtKey {
                key_id: "peer-k".into(),
                public_key: spki.clone(),
                expires_at: 4_000_000_000,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let token = peer_token(&key, "peer-k", "spiffe://peer.org/caller", "me");
    // Another workload on this node federates with peer.org, so the agent holds its bundle;
    // this caller's entry does not.
    let mut other = env.entry.clone();
    other.id = String::new();
    other.spiffe_id = "spiffe://example.org/federating".into();
    other.selectors = vec![types::Selector { r#type: "unix".into(), value: "uid:54321".into() }];
    other.federates_with = vec!["peer.org".into()];
    admin.create_entry(admin::CreateEntryRequest { entry: Some(other) }).await.unwrap();
    let agent = env.agent.as_ref().unwrap();
    eventually(10, "the agent holds peer.org's bundle", async || {
        agent.manager.snapshot().federated.keys().any(|td| td.as_str() == "peer.org").then_some(())
    })
    .await;
    let mut c = env.workload().await;
    let e = c
        .validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "me".into(), svid: token.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "validated against a bundle the caller does not federate with");
    // Once the caller's entry federates with peer.org, the token validates.
    let mut e2 = env.entry.clone();
    e2.federates_with = vec!["peer.org".into()];
    admin.update_entry(admin::UpdateEntryRequest { entry: Some(e2) }).await.unwrap();
    let v = eventually(10, "the token validates", async || {
        c.validate_jwtsvid(wl::ValidateJwtsvidRequest { audience: "me".into(), svid: token.clone() }).await.ok()
    })
    .await;
    assert_eq!(v.into_inner().spiffe_id, "spiffe://peer.org/caller");
    env.stop().await;
}

/// An ES256 JWT-SVID signed by `key`.
fn peer_token(key: &rcgen::KeyPair, kid: &str, sub: &str, aud: &str) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"}).to_string().as_bytes());
    let claims = b64(serde_json::json!({"sub": sub, "aud": [aud], "exp": 4_000_000_000i64}).to_string().as_bytes());
    let input = format!("{header}.{claims}");
    let pkcs8 = key.serialize_der();
    let rng = ring::rand::SystemRandom::new();
    let signer =
        ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .unwrap();
    let sig = signer.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", b64(sig.as_ref()))
}

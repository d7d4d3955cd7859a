//! `tessera-upstream-cfssl`: an example external plugin. It serves Tessera's upstream
//! authority protocol (`tessera.plugin.v1`, docs/plugins.md) on the Unix socket named by
//! `TESSERA_PLUGIN_SOCKET`, and has cfssl sign our CA through cfssl's HTTP API
//! (`POST /api/v1/cfssl/sign`, `POST /api/v1/cfssl/info`).
//!
//! Configuration (`[upstream_authority.plugin_config]`): `url` (cfssl's `http://host:port`),
//! `profile` (a cfssl signing profile that issues CA certificates), `label` (optional).
//! cfssl's CA must be a root (self-signed): it is returned as the upstream root. The CA is
//! polled every `poll_seconds` (default 60) and a change is sent to the server as a root
//! update.
//!
//! Like every plugin, it exits when its server does: when stdin (a pipe only the server
//! holds) reaches end of file. (Not `PR_SET_PDEATHSIG`: that fires when the *thread* that
//! started us exits, which in a thread-pooled server is not the server's death.)
//!
//! What it is not: a production bridge (no TLS or auth to cfssl: run it on loopback).

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tessera_proto::plugin::v1 as pb;
use tessera_proto::plugin::v1::upstream_authority_server::{UpstreamAuthority, UpstreamAuthorityServer};
use tokio::sync::{RwLock, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone)]
struct Settings {
    host: String,
    port: u16,
    profile: String,
    label: String,
    poll: Duration,
}

#[derive(Debug, Default)]
struct Cfssl {
    settings: RwLock<Option<Settings>>,
}

fn parse_settings(json: &str) -> Result<Settings, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("plugin_config is not JSON: {e}"))?;
    let url = v["url"].as_str().ok_or("plugin_config.url is required")?;
    let rest = url.strip_prefix("http://").ok_or("plugin_config.url must be http://host:port")?;
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').ok_or("plugin_config.url needs a port")?;
    Ok(Settings {
        host: host.to_owned(),
        port: port.parse().map_err(|_| format!("bad port in {url:?}"))?,
        profile: v["profile"].as_str().unwrap_or("").to_owned(),
        label: v["label"].as_str().unwrap_or("").to_owned(),
        poll: Duration::from_secs(v["poll_seconds"].as_u64().unwrap_or(60).max(1)),
    })
}

/// One POST of a JSON body to cfssl; returns `result` or cfssl's error messages.
async fn call(s: &Settings, path: &str, body: Value) -> Result<Value, String> {
    let tcp = tokio::net::TcpStream::connect((s.host.as_str(), s.port)).await.map_err(|e| format!("cfssl: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("cfssl: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, format!("{}:{}", s.host, s.port))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| format!("cfssl: {e}"))?;
    let bytes = Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| format!("cfssl: {e}"))?.to_bytes();
    driver.abort();
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("cfssl answered non-JSON: {e}"))?;
    if v["success"].as_bool() != Some(true) {
        return Err(format!("cfssl refused: {}", v["errors"]));
    }
    Ok(v["result"].clone())
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    tessera_identity::pem::decode_certs(pem.as_bytes())
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .map(|c| c.to_vec())
        .ok_or_else(|| "no certificate in cfssl's answer".to_owned())
}

/// cfssl's CA certificate, which must be self-signed.
async fn root(s: &Settings) -> Result<Vec<u8>, String> {
    let info = call(s, "/api/v1/cfssl/info", json!({"label": s.label, "profile": s.profile})).await?;
    let der = pem_to_der(info["certificate"].as_str().ok_or("cfssl info has no certificate")?)?;
    let (_, c) = X509Certificate::from_der(&der).map_err(|e| e.to_string())?;
    if c.subject().as_raw() != c.issuer().as_raw() {
        return Err("this example needs cfssl's CA to be a root (self-signed)".into());
    }
    Ok(der)
}

#[tonic::async_trait]
impl UpstreamAuthority for Cfssl {
    async fn info(&self, _r: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(pb::InfoResponse { name: "cfssl".into(), protocol_version: 1 }))
    }

    async fn configure(&self, r: Request<pb::ConfigureRequest>) -> Result<Response<pb::ConfigureResponse>, Status> {
        let s = parse_settings(&r.into_inner().config_json).map_err(Status::invalid_argument)?;
        *self.settings.write().await = Some(s);
        Ok(Response::new(pb::ConfigureResponse {}))
    }

    type MintX509CaAndSubscribeStream = ReceiverStream<Result<pb::MintX509CaResponse, Status>>;

    async fn mint_x509_ca_and_subscribe(
        &self,
        r: Request<pb::MintX509CaRequest>,
    ) -> Result<Response<Self::MintX509CaAndSubscribeStream>, Status> {
        let s = self.settings.read().await.clone().ok_or_else(|| Status::failed_precondition("not configured"))?;
        let csr = tessera_identity::pem::encode("CERTIFICATE REQUEST", &r.into_inner().csr);
        let signed =
            call(&s, "/api/v1/cfssl/sign", json!({"certificate_request": csr, "profile": s.profile, "label": s.label}))
                .await
                .map_err(Status::unavailable)?;
        let ours = pem_to_der(signed["certificate"].as_str().unwrap_or_default()).map_err(Status::internal)?;
        let ca = root(&s).await.map_err(Status::unavailable)?;
        let first = pb::MintX509CaResponse { x509_ca_chain: vec![ours], upstream_x509_roots: vec![ca.clone()] };
        Ok(Response::new(follow_roots(s, ca, first).await?))
    }

    type SubscribeRootsStream = ReceiverStream<Result<pb::MintX509CaResponse, Status>>;

    async fn subscribe_roots(
        &self,
        _r: Request<pb::SubscribeRootsRequest>,
    ) -> Result<Response<Self::SubscribeRootsStream>, Status> {
        let s = self.settings.read().await.clone().ok_or_else(|| Status::failed_precondition("not configured"))?;
        let ca = root(&s).await.map_err(Status::unavailable)?;
        let first = pb::MintX509CaResponse { x509_ca_chain: vec![], upstream_x509_roots: vec![ca.clone()] };
        Ok(Response::new(follow_roots(s, ca, first).await?))
    }
}

/// Sends `first`, then polls cfssl's CA and sends the new root set whenever it changes.
async fn follow_roots(
    s: Settings,
    ca: Vec<u8>,
    first: pb::MintX509CaResponse,
) -> Result<ReceiverStream<Result<pb::MintX509CaResponse, Status>>, Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(Ok(first)).await.map_err(|_| Status::cancelled("client went away"))?;
    tokio::spawn(async move {
        let mut current = ca;
        loop {
            tokio::time::sleep(s.poll).await;
            if tx.is_closed() {
                break;
            }
            match root(&s).await {
                Ok(now) if now != current => {
                    // The previous root stays trusted while our CAs under it are valid.
                    let update = pb::MintX509CaResponse {
                        x509_ca_chain: vec![],
                        upstream_x509_roots: vec![now.clone(), current.clone()],
                    };
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                    current = now;
                }
                Ok(_) => {}
                Err(e) => eprintln!("tessera-upstream-cfssl: polling cfssl's CA: {e}"),
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let Some(path) = std::env::var_os("TESSERA_PLUGIN_SOCKET") else {
        eprintln!("tessera-upstream-cfssl: TESSERA_PLUGIN_SOCKET is not set (the Tessera server starts this plugin)");
        return std::process::ExitCode::FAILURE;
    };
    // Die with the server, however it dies: the kernel closes the server's end of our stdin
    // when it exits (the plugin contract, docs/plugins.md).
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while std::io::Read::read(&mut stdin, &mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tessera-upstream-cfssl: cannot bind {}: {e}", std::path::Path::new(&path).display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let svc = UpstreamAuthorityServer::new(Cfssl::default());
    let res = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await;
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-upstream-cfssl: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

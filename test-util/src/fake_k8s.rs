//! A FAKE Kubernetes API server and kubelet. There is no real API server on this machine, so
//! the Kubernetes code is tested against this stand-in, which speaks the real wire shapes
//! (request paths, k8s-openapi types serialized as the API server does, `Status` errors,
//! `resourceVersion` conflicts) over HTTPS with a bearer token:
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: checks the ES256 signature of tokens
//!   this fake minted, expiry, the requested audiences, and that the bound pod still exists;
//!   answers `user.extra` with the pod and node as a 1.32+ API server does;
//! - pods (get, list with `fieldSelector=spec.nodeName=…`), nodes, namespaces;
//! - ConfigMaps (get, server-side apply `PATCH`), Leases (get, create, replace with
//!   optimistic concurrency);
//! - the kubelet's `GET /pods`, and the issuer's `GET /openid/v1/jwks`.
//!
//! Every write is recorded, so tests can assert what was (not) written.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ContainerStatus, Namespace, Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

/// The API server's bearer token (what a kubeconfig for Tessera holds).
pub const API_TOKEN: &str = "tessera-server-fake-credential";

/// A recorded write: method and path.
pub type Write = (String, String);

#[derive(Default)]
struct State {
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    namespaces: Vec<String>,
    configmaps: BTreeMap<(String, String), ConfigMap>,
    leases: BTreeMap<(String, String), Lease>,
    writes: Vec<Write>,
    reviews: u32,
    resource_version: u64,
}

/// A running fake cluster.
pub struct FakeCluster {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The issuer (`iss`) of its tokens.
    pub issuer: String,
    /// Its serving CA, PEM.
    pub ca_pem: String,
    key: Arc<EcdsaKeyPair>,
    kid: String,
    state: Arc<Mutex<State>>,
    _runtime: std::thread::JoinHandle<()>,
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn meta(name: &str, ns: Option<&str>, uid: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.into()), namespace: ns.map(Into::into), uid: Some(uid.into()), ..Default::default() }
}

/// A pod for [`FakeCluster::add_pod`].
pub fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> Pod {
    Pod {
        metadata: meta(name, Some(ns), uid),
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus { phase: Some("Running".into()), ..Default::default() }),
    }
}

/// Adds a running container's status (`containerd://<id>`) and labels to a pod.
pub fn with_container(mut p: Pod, container: &str, image: &str, id: &str, labels: &[(&str, &str)]) -> Pod {
    let st = p.status.get_or_insert_with(Default::default);
    st.container_statuses.get_or_insert_with(Vec::new).push(ContainerStatus {
        name: container.into(),
        image: image.into(),
        container_id: Some(format!("containerd://{id}")),
        ready: true,
        state: Some(k8s_openapi::api::core::v1::ContainerState {
            running: Some(k8s_openapi::api::core::v1::ContainerStateRunning::default()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let l = p.metadata.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in labels {
        l.insert((*k).into(), (*v).into());
    }
    p
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn list<T: serde::Serialize>(kind: &str, api_version: &str, items: &[T]) -> Value {
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn typed<T: serde::Serialize>(kind: &str, api_version: &str, obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["kind"] = kind.into();
    v["apiVersion"] = api_version.into();
    v
}

impl FakeCluster {
    /// Starts a fake cluster whose tokens carry `issuer`.
    pub fn start(issuer: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = Arc::new(EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap());
        let kid = format!("fake-{}", &b64(&key.public_key().as_ref()[1..9]));
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fake-kubernetes-ca");
        let ca_cert = ca_params.self_signed(&ca).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
        let issuer_cert = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), &ca).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer_cert).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca_cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { namespaces: vec!["default".into()], ..Default::default() }));
        let ctx = Arc::new(Ctx { state: state.clone(), jwks: jwks_of(&key, &kid), key: key.clone(), kid: kid.clone() });
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(serve(listener, tls, ctx));
        });
        Self { url, issuer: issuer.to_owned(), ca_pem: ca_cert.pem(), key, kid, state, _runtime: runtime }
    }

    /// The issuer's JWKS document.
    pub fn jwks(&self) -> String {
        jwks_of(&self.key, &self.kid)
    }

    /// Mints a projected service-account token as the API server would: ES256, `kid`,
    /// `kubernetes.io` claims binding it to `pod` (and its node), expiring in `ttl_secs`
    /// (negative: already expired).
    pub fn token(&self, ns: &str, sa: &str, pod: Option<&str>, aud: &[&str], ttl_secs: i64) -> String {
        mint(&self.key, &self.kid, &self.issuer, &self.state, ns, sa, pod, aud, ttl_secs)
    }

    /// A token that looks like this cluster's but is signed by another key with the same `kid`.
    pub fn forged_token(&self, ns: &str, sa: &str, pod: Option<&str>, aud: &[&str]) -> String {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let other = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        mint(&other, &self.kid, &self.issuer, &self.state, ns, sa, pod, aud, 3600)
    }

    /// Adds a namespace.
    pub fn add_namespace(&self, ns: &str) {
        self.state.lock().unwrap().namespaces.push(ns.into());
    }

    /// Adds a node.
    pub fn add_node(&self, name: &str, uid: &str, labels: &[(&str, &str)]) {
        let mut m = meta(name, None, uid);
        m.labels = Some(labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect());
        self.state.lock().unwrap().nodes.push(Node { metadata: m, ..Default::default() });
    }

    /// Adds a pod.
    pub fn add_pod(&self, p: Pod) {
        self.state.lock().unwrap().pods.push(p);
    }

    /// Deletes a pod (its bound tokens stop passing TokenReview).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.state
            .lock()
            .unwrap()
            .pods
            .retain(|p| !(p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)));
    }

    /// Writes recorded so far.
    pub fn writes(&self) -> Vec<Write> {
        self.state.lock().unwrap().writes.clone()
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> u32 {
        self.state.lock().unwrap().reviews
    }

    /// A ConfigMap's data, if it exists.
    pub fn configmap(&self, ns: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let s = self.state.lock().unwrap();
        s.configmaps.get(&(ns.into(), name.into())).map(|c| c.data.clone().unwrap_or_default())
    }

    /// A Lease's holder, if the Lease exists.
    pub fn lease_holder(&self, ns: &str, name: &str) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.leases.get(&(ns.into(), name.into())).and_then(|l| l.spec.as_ref()?.holder_identity.clone())
    }

    /// Writes a kubeconfig for this cluster (CA data, bearer token) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, cluster: &str) {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: tessera\n  user:\n    token: {API_TOKEN}\ncontexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: tessera\ncurrent-context: {cluster}\n",
            url = self.url
        );
        std::fs::write(path, text).unwrap();
    }

    /// A cluster with node `node-1` (UID `node-uid-1`, `labels`) and the agent's pod
    /// `tessera-system/<agent_pod>` (service account `tessera-agent`) on it: what a `k8s_psat`
    /// agent attests from. Its agent ID, as `cluster-a`, is [`PSAT_AGENT_ID`].
    pub fn with_agent_node(agent_pod: &str, labels: &[(&str, &str)]) -> Self {
        let k8s = Self::start("https://kubernetes.default.svc.cluster.local");
        k8s.add_node("node-1", "node-uid-1", labels);
        k8s.add_pod(pod("tessera-system", agent_pod, "pod-uid-agent", "tessera-agent", "node-1"));
        k8s
    }

    /// The server's `k8s_psat` node attestor for this cluster as `cluster-a`, allowing the
    /// agent's service account, with its kubeconfig written to `kubeconfig`; `extra` goes into
    /// the cluster's table.
    pub fn psat_attestor(&self, kubeconfig: &Path, extra: &str) -> String {
        self.write_kubeconfig(kubeconfig, "cluster-a");
        format!(
            "\n[[node_attestor]]\ntype = \"k8s_psat\"\n[node_attestor.clusters.cluster-a]\nkubeconfig = \"{}\"\nservice_account_allow_list = [\"tessera-system:tessera-agent\"]\n{extra}",
            kubeconfig.display()
        )
    }
}

/// The agent ID of a `k8s_psat` agent on [`FakeCluster::with_agent_node`]'s node.
pub const PSAT_AGENT_ID: &str = "spiffe://example.org/tessera/agent/k8s_psat/cluster-a/node-uid-1";

fn jwks_of(key: &EcdsaKeyPair, kid: &str) -> String {
    let pk = key.public_key().as_ref();
    json!({"keys": [{"use": "sig", "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
                     "x": b64(&pk[1..33]), "y": b64(&pk[33..65])}]})
    .to_string()
}

#[allow(clippy::too_many_arguments)]
fn mint(
    key: &EcdsaKeyPair,
    kid: &str,
    issuer: &str,
    state: &Mutex<State>,
    ns: &str,
    sa: &str,
    pod: Option<&str>,
    aud: &[&str],
    ttl_secs: i64,
) -> String {
    let now = tessera_identity::unix_now();
    let mut k8s = json!({"namespace": ns, "serviceaccount": {"name": sa, "uid": format!("sa-uid-{sa}")}});
    if let Some(pod_name) = pod {
        let s = state.lock().unwrap();
        let p = s
            .pods
            .iter()
            .find(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(pod_name))
            .expect("token for a pod the fake does not have");
        k8s["pod"] = json!({"name": pod_name, "uid": p.metadata.uid});
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            let uid =
                s.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(&node)).and_then(|n| n.metadata.uid.clone());
            k8s["node"] = json!({"name": node, "uid": uid.unwrap_or_default()});
        }
    }
    let header = json!({"alg": "ES256", "kid": kid});
    let claims = json!({
        "aud": aud, "exp": now + ttl_secs, "iat": now - 10, "nbf": now - 10, "iss": issuer,
        "sub": format!("system:serviceaccount:{ns}:{sa}"), "kubernetes.io": k8s,
    });
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", b64(sig.as_ref()))
}

struct Ctx {
    state: Arc<Mutex<State>>,
    jwks: String,
    key: Arc<EcdsaKeyPair>,
    kid: String,
}

async fn serve(listener: std::net::TcpListener, tls: rustls::ServerConfig, ctx: Arc<Ctx>) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn query(q: Option<&str>, key: &str) -> Option<String> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3D", "=").replace("%3d", "=").replace("%2F", "/"))
    })
}

async fn handle(ctx: &Ctx, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let q = req.uri().query().map(str::to_owned);
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (code, v) = route(ctx, &method, &path, q.as_deref(), auth.as_deref(), &body);
    let text = v.to_string();
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap()
}

fn verify(ctx: &Ctx, token: &str, requested: &[String]) -> Result<(Value, Vec<String>), String> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("malformed".into());
    };
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| "header")?).map_err(|_| "header")?;
    if header["kid"] != ctx.kid.as_str() {
        return Err("unknown key".into());
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| "signature")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, ctx.key.public_key().as_ref())
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| "invalid signature".to_string())?;
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).map_err(|_| "claims")?).map_err(|_| "claims")?;
    if claims["exp"].as_i64().unwrap_or(0) <= tessera_identity::unix_now() {
        return Err("token has expired".into());
    }
    let aud: Vec<String> = serde_json::from_value(claims["aud"].clone()).unwrap_or_default();
    // As the API server: with requested audiences, the token must carry one of them, and
    // the answer lists the intersection; without, the API server's own audience applies.
    let granted: Vec<String> = if requested.is_empty() {
        aud.clone()
    } else {
        requested.iter().filter(|a| aud.contains(a)).cloned().collect()
    };
    if granted.is_empty() {
        return Err("token audiences is invalid for the target audiences".into());
    }
    Ok((claims, granted))
}

fn route(ctx: &Ctx, method: &str, path: &str, q: Option<&str>, auth: Option<&str>, body: &[u8]) -> (u16, Value) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Unauthenticated endpoints: the issuer's keys; the kubelet checks its own token below.
    if method == "GET" && path == "/openid/v1/jwks" {
        return (200, serde_json::from_str(&ctx.jwks).unwrap());
    }
    if auth != Some(&format!("Bearer {API_TOKEN}")) && !(method == "GET" && path == "/pods") {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let mut s = ctx.state.lock().unwrap();
    if method != "GET" {
        s.writes.push((method.to_owned(), path.to_owned()));
    }
    match (method, segs.as_slice()) {
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            s.reviews += 1;
            let mut review: TokenReview = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return status(400, "BadRequest", &e.to_string()),
            };
            let token = review.spec.token.clone().unwrap_or_default();
            let requested = review.spec.audiences.clone().unwrap_or_default();
            let outcome = verify(ctx, &token, &requested).and_then(|(claims, granted)| {
                let k = &claims["kubernetes.io"];
                let mut extra = BTreeMap::new();
                if let Some(pod_name) = k["pod"]["name"].as_str() {
                    let ns = k["namespace"].as_str().unwrap_or_default();
                    let exists = s.pods.iter().any(|p| {
                        p.metadata.namespace.as_deref() == Some(ns)
                            && p.metadata.name.as_deref() == Some(pod_name)
                            && p.metadata.uid.as_deref() == k["pod"]["uid"].as_str()
                    });
                    if !exists {
                        return Err(format!("pod {ns}/{pod_name} no longer exists"));
                    }
                    extra.insert("authentication.kubernetes.io/pod-name".into(), vec![pod_name.to_owned()]);
                    extra.insert(
                        "authentication.kubernetes.io/pod-uid".into(),
                        vec![k["pod"]["uid"].as_str().unwrap_or_default().to_owned()],
                    );
                }
                if let Some(node) = k["node"]["name"].as_str() {
                    extra.insert("authentication.kubernetes.io/node-name".into(), vec![node.to_owned()]);
                    extra.insert(
                        "authentication.kubernetes.io/node-uid".into(),
                        vec![k["node"]["uid"].as_str().unwrap_or_default().to_owned()],
                    );
                }
                Ok(TokenReviewStatus {
                    authenticated: Some(true),
                    audiences: Some(granted),
                    user: Some(UserInfo {
                        username: claims["sub"].as_str().map(str::to_owned),
                        uid: k["serviceaccount"]["uid"].as_str().map(str::to_owned),
                        groups: Some(vec!["system:serviceaccounts".into(), "system:authenticated".into()]),
                        extra: Some(extra),
                    }),
                    error: None,
                })
            });
            review.status = Some(match outcome {
                Ok(st) => st,
                Err(e) => TokenReviewStatus { authenticated: Some(false), error: Some(e), ..Default::default() },
            });
            review.spec.token = None;
            (201, typed("TokenReview", "authentication.k8s.io/v1", &review))
        }
        ("GET", ["pods"]) => {
            if auth.is_none() {
                return status(401, "Unauthorized", "kubelet: Unauthorized");
            }
            (200, list("PodList", "v1", &s.pods))
        }
        ("GET", ["api", "v1", "namespaces"]) => {
            let items: Vec<Namespace> = s
                .namespaces
                .iter()
                .map(|n| Namespace { metadata: meta(n, None, &format!("ns-{n}")), ..Default::default() })
                .collect();
            (200, list("NamespaceList", "v1", &items))
        }
        ("GET", ["api", "v1", "nodes", name]) => {
            match s.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(name)) {
                Some(n) => (200, typed("Node", "v1", n)),
                None => status(404, "NotFound", &format!("nodes \"{name}\" not found")),
            }
        }
        ("GET", ["api", "v1", "pods"]) | ("GET", ["api", "v1", "namespaces", _, "pods"]) => {
            let ns = segs.get(3).copied();
            let node = query(q, "fieldSelector").and_then(|f| f.strip_prefix("spec.nodeName=").map(str::to_owned));
            let items: Vec<&Pod> = s
                .pods
                .iter()
                .filter(|p| ns.is_none_or(|ns| p.metadata.namespace.as_deref() == Some(ns)))
                .filter(|p| {
                    node.as_deref().is_none_or(|n| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(n))
                })
                .collect();
            (200, list("PodList", "v1", &items))
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            match s
                .pods
                .iter()
                .find(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name))
            {
                Some(p) => (200, typed("Pod", "v1", p)),
                None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        ("GET", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match s.configmaps.get(&((*ns).into(), (*name).into())) {
                Some(c) => (200, typed("ConfigMap", "v1", c)),
                None => status(404, "NotFound", &format!("configmaps \"{name}\" not found")),
            }
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            if query(q, "fieldManager").is_none_or(|m| m.is_empty()) {
                return status(422, "Invalid", "fieldManager is required for apply patch");
            }
            let mut cm: ConfigMap = match serde_json::from_slice(body) {
                Ok(c) => c,
                Err(e) => return status(400, "BadRequest", &e.to_string()),
            };
            s.resource_version += 1;
            cm.metadata.namespace = Some((*ns).into());
            cm.metadata.resource_version = Some(s.resource_version.to_string());
            s.configmaps.insert(((*ns).into(), (*name).into()), cm.clone());
            (200, typed("ConfigMap", "v1", &cm))
        }
        ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
            match s.leases.get(&((*ns).into(), (*name).into())) {
                Some(l) => (200, typed("Lease", "coordination.k8s.io/v1", l)),
                None => status(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found")),
            }
        }
        ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
            let mut l: Lease = match serde_json::from_slice(body) {
                Ok(l) => l,
                Err(e) => return status(400, "BadRequest", &e.to_string()),
            };
            let name = l.metadata.name.clone().unwrap_or_default();
            if s.leases.contains_key(&((*ns).into(), name.clone())) {
                return status(409, "AlreadyExists", &format!("leases.coordination.k8s.io \"{name}\" already exists"));
            }
            s.resource_version += 1;
            l.metadata.namespace = Some((*ns).into());
            l.metadata.resource_version = Some(s.resource_version.to_string());
            s.leases.insert(((*ns).into(), name), l.clone());
            (201, typed("Lease", "coordination.k8s.io/v1", &l))
        }
        ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
            let mut l: Lease = match serde_json::from_slice(body) {
                Ok(l) => l,
                Err(e) => return status(400, "BadRequest", &e.to_string()),
            };
            let key = ((*ns).to_string(), (*name).to_string());
            let current = s.leases.get(&key).and_then(|c| c.metadata.resource_version.clone());
            if current.is_none() || current != l.metadata.resource_version {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            s.resource_version += 1;
            l.metadata.resource_version = Some(s.resource_version.to_string());
            s.leases.insert(key, l.clone());
            (200, typed("Lease", "coordination.k8s.io/v1", &l))
        }
        _ => status(404, "NotFound", &format!("the server could not find the requested resource ({method} {path})")),
    }
}

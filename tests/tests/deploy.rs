//! The Helm chart and the manifests rendered from it: a real Helm (`helm lint`, `helm
//! template`) renders the chart with default and non-default values; every document is read
//! into its k8s-openapi type and written back, and any field the type does not know (a typo)
//! makes the round trip differ; the embedded server and agent configs load in the real config
//! parsers; and the security properties the chart promises are checked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;
use tessera_server::config::NodeAttestorKind;
use tessera_test_util::chart::{helm, render};
use tessera_test_util::repo;

/// Drops nulls and empty objects, which serializers may omit without changing meaning.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, normalize(v)))
                .filter(|(_, v)| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        other => other,
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc:#}"));
    let mut back = serde_json::to_value(&typed).unwrap();
    back["apiVersion"] = doc["apiVersion"].clone();
    back["kind"] = doc["kind"].clone();
    if let Some(path) = first_difference(&normalize(doc.clone()), &normalize(back), String::new()) {
        panic!("{} {}: {path} does not survive the typed round trip (a typo?)", doc["kind"], doc["metadata"]["name"]);
    }
    typed
}

/// The path of the first place where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.keys().chain(y.keys()).find_map(|k| match (x.get(k), y.get(k)) {
            (Some(p), Some(q)) => first_difference(p, q, format!("{at}.{k}")),
            _ => Some(format!("{at}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (p, q))| first_difference(p, q, format!("{at}[{i}]")))
        }
        _ => (a != b).then_some(at),
    }
}

#[derive(Default)]
struct Objects {
    configmaps: Vec<ConfigMap>,
    statefulsets: Vec<StatefulSet>,
    daemonsets: Vec<DaemonSet>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    pdbs: Vec<PodDisruptionBudget>,
}

fn parse(rendered: &str) -> Objects {
    let docs: Vec<Value> = serde_saphyr::from_multiple(rendered).unwrap();
    let mut o = Objects::default();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        match doc["kind"].as_str().unwrap() {
            "ConfigMap" => o.configmaps.push(round_trip(&doc)),
            "StatefulSet" => o.statefulsets.push(round_trip(&doc)),
            "DaemonSet" => o.daemonsets.push(round_trip(&doc)),
            "ClusterRole" => o.cluster_roles.push(round_trip(&doc)),
            "Role" => o.roles.push(round_trip(&doc)),
            "PodDisruptionBudget" => o.pdbs.push(round_trip(&doc)),
            "Service" => drop(round_trip::<Service>(&doc)),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(&doc)),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(&doc)),
            "RoleBinding" => drop(round_trip::<RoleBinding>(&doc)),
            other => panic!("unexpected kind {other}"),
        }
    }
    o
}

fn config(o: &Objects, name: &str, key: &str) -> String {
    let cm = o.configmaps.iter().find(|c| c.metadata.name.as_deref() == Some(name)).unwrap();
    cm.data.as_ref().unwrap()[key].clone()
}

fn restricted(c: &Container) {
    let sc = c.security_context.as_ref().unwrap_or_else(|| panic!("{} has no securityContext", c.name));
    assert_eq!(sc.run_as_non_root, Some(true), "{} runs as root", c.name);
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{} has a writable root fs", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]), "{}", c.name);
}

fn pod(spec: Option<&PodSpec>) -> &PodSpec {
    spec.unwrap()
}

#[test]
fn the_chart_lints_renders_into_typed_objects_and_matches_the_committed_manifests() {
    helm(&["lint", "deploy/helm/tessera"]);
    let rendered = render(&[]);
    let committed = std::fs::read_to_string(repo().join("deploy/manifests/tessera.yaml")).unwrap();
    let body: String = committed.lines().skip_while(|l| l.starts_with("# ")).map(|l| format!("{l}\n")).collect();
    assert_eq!(body, rendered, "deploy/manifests/tessera.yaml is stale: run scripts/render-manifests.sh");

    let o = parse(&rendered);
    // The check can fail: a misspelt field does not survive the round trip.
    let typo = rendered.replacen("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1);
    assert!(std::panic::catch_unwind(|| parse(&typo)).is_err(), "a typo went unnoticed");
    // The configs in the chart load in the real parsers.
    let server = tessera_server::config::Config::from_toml(&config(&o, "tessera-server", "server.toml")).unwrap();
    assert_eq!(server.trust_domain.to_string(), "cluster.local");
    let istio = server.istio.as_ref().unwrap();
    assert_eq!(istio.address.port(), 15012);
    assert!(istio.dns_names.contains(&"tessera.tessera-system.svc".to_owned()));
    assert_eq!(server.bundle_publishers.len(), 1);
    let agent = tessera_agent::config::Config::from_toml(&config(&o, "tessera-agent", "agent.toml")).unwrap();
    assert_eq!(agent.psat.as_ref().unwrap().cluster, "Kubernetes");

    // Server: non-root, read-only root fs, a PDB, state on a claim.
    let sts = &o.statefulsets[0];
    let spec = sts.spec.as_ref().unwrap();
    let ps = pod(spec.template.spec.as_ref());
    ps.containers.iter().for_each(restricted);
    assert_eq!(ps.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    assert_eq!(spec.volume_claim_templates.as_ref().unwrap()[0].metadata.name.as_deref(), Some("data"));
    assert_eq!(o.pdbs.len(), 1);

    // Agent: non-root, the socket on a hostPath, a projected token for the server's audience.
    let ds = pod(o.daemonsets[0].spec.as_ref().unwrap().template.spec.as_ref());
    ds.containers.iter().for_each(restricted);
    assert_eq!(ds.host_pid, Some(true));
    let vols = ds.volumes.as_ref().unwrap();
    assert!(vols.iter().any(|v| v.host_path.as_ref().is_some_and(|h| h.path == "/run/tessera/agent")));
    let projected = vols.iter().find_map(|v| v.projected.as_ref()).unwrap();
    let sat = projected.sources.as_ref().unwrap()[0].service_account_token.as_ref().unwrap();
    assert_eq!(sat.audience.as_deref(), Some("tessera-server"));
    assert!(config(&o, "tessera-server", "server.toml").contains("audience = [\"tessera-server\"]"));

    // Least privilege: no wildcards; writes only where needed.
    for rules in o
        .cluster_roles
        .iter()
        .map(|r| r.rules.clone().unwrap_or_default())
        .chain(o.roles.iter().map(|r| r.rules.clone().unwrap_or_default()))
    {
        for r in rules {
            let all = r.verbs.iter().chain(r.resources.iter().flatten()).chain(r.api_groups.iter().flatten());
            assert!(all.clone().all(|s| s != "*"), "wildcard in {r:?}");
            let writes = r.verbs.iter().any(|v| ["create", "update", "patch", "delete"].contains(&v.as_str()));
            if writes {
                let res = r.resources.clone().unwrap_or_default();
                assert!(
                    res.iter().all(|x| ["tokenreviews", "configmaps", "leases"].contains(&x.as_str())),
                    "unexpected write access {r:?}"
                );
            }
            assert!(!r.verbs.iter().any(|v| v == "delete"), "delete is never needed: {r:?}");
        }
    }
}

#[test]
fn non_default_values_render_valid_objects_and_configs() {
    let rendered = render(&[
        "--set",
        "server.replicas=3",
        "--set",
        "server.store.type=postgres",
        "--set",
        "server.store.postgresSecret=tessera-pg",
        "--set",
        "istio.remoteSecret=tessera-remote",
        "--set",
        "istio.remoteClusters[0].clusterId=cluster-b",
        "--set",
        "istio.remoteClusters[0].jwksFile=b-jwks.json",
        "--set",
        "istio.remoteClusters[0].issuer=https://oidc.b.example",
        "--set",
        "istio.rootCertNamespaces={shop,web}",
        "--set",
        "trustDomain=mesh.example.org",
        "--set",
        "server.joinTokens=true",
    ]);
    let o = parse(&rendered);
    let text = config(&o, "tessera-server", "server.toml");
    // The postgres connection string comes from the environment (a Secret): without it, the
    // real parser names exactly that variable.
    let err = tessera_server::config::Config::from_toml_with(&text, Some("tessera-server-0")).unwrap_err().to_string();
    assert!(err.contains("TESSERA_POSTGRES"), "{err}");
    // With a literal connection string instead, the rest of the config is valid.
    let literal =
        text.replace("connection_string_env = \"TESSERA_POSTGRES\"", "connection_string = \"postgres://x@db/tessera\"");
    let cfg = tessera_server::config::Config::from_toml_with(&literal, Some("tessera-server-1")).unwrap();
    assert_eq!(cfg.instance_id, "tessera-server-1");
    let clusters: Vec<&str> = cfg.istio.as_ref().unwrap().clusters.iter().map(|c| c.cluster_id.as_str()).collect();
    assert_eq!(clusters, ["Kubernetes", "cluster-b"]);
    assert_eq!(cfg.bundle_publishers[0].namespaces, ["shop", "web"]);
    assert!(matches!(cfg.node_attestors[..], [NodeAttestorKind::K8sPsat(_), NodeAttestorKind::JoinToken]));
    let sts = o.statefulsets[0].spec.as_ref().unwrap();
    assert_eq!(sts.replicas, Some(3));
    let env = pod(sts.template.spec.as_ref()).containers[0].env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == "TESSERA_POSTGRES"));
    assert!(env.iter().any(|e| e.name == "TESSERA_INSTANCE_ID"));
}

#[test]
fn the_optional_monitoring_objects_carry_the_same_rules_and_select_the_metrics_services() {
    // Off by default.
    assert!(!render(&[]).contains("kind: PrometheusRule"));
    let rendered =
        render(&["--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.serviceMonitor.enabled=true"]);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    let of = |kind: &str| docs.iter().filter(|d| d["kind"] == kind).cloned().collect::<Vec<_>>();
    let rules = of("PrometheusRule");
    assert_eq!(rules.len(), 1);
    let source: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(repo().join("deploy/prometheus/tessera-rules.yaml")).unwrap())
            .unwrap();
    assert_eq!(rules[0]["spec"]["groups"], source["groups"], "the PrometheusRule differs from the rules file");
    // Each ServiceMonitor selects a Service that exists and names a port that Service has.
    let services: Vec<Service> = of("Service").iter().map(|d| serde_json::from_value(d.clone()).unwrap()).collect();
    let monitors = of("ServiceMonitor");
    assert_eq!(monitors.len(), 2);
    for m in monitors {
        let want = m["spec"]["selector"]["matchLabels"].as_object().unwrap().clone();
        let port = m["spec"]["endpoints"][0]["port"].as_str().unwrap();
        let svc = services
            .iter()
            .find(|s| {
                let labels = s.metadata.labels.clone().unwrap_or_default();
                want.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
            })
            .unwrap_or_else(|| panic!("no Service matches {want:?}"));
        let ports = svc.spec.as_ref().unwrap().ports.clone().unwrap_or_default();
        assert!(ports.iter().any(|p| p.name.as_deref() == Some(port)), "{port} not on {:?}", svc.metadata.name);
    }
}

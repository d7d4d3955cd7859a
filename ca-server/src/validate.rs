//! `tessera-server validate`: what a parsed configuration still needs before it can start —
//! the files it names exist and hold what they should (the upstream CA's files load and its
//! certificate can sign our CA; bundles parse; keys load) — checked without starting anything
//! or connecting anywhere. The parse itself ([`Config::parse`]) checks keys, types and ranges.

use std::path::Path;

use tessera_store::EndpointProfile;

use crate::config::{Config, KeyManagerKind, ServingProfile, StoreKind, UpstreamConfig};

pub use tessera_svc::doctor::Problem;

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { key: key.into(), message: message.into() }
}

fn readable(out: &mut Vec<Problem>, key: &str, path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => match std::fs::File::open(path) {
            Ok(_) => true,
            Err(e) => {
                out.push(problem(key, format!("{} cannot be read: {e}", path.display())));
                false
            }
        },
        Ok(_) => {
            out.push(problem(key, format!("{} is not a file", path.display())));
            false
        }
        Err(e) => {
            out.push(problem(key, format!("{}: {e}", path.display())));
            false
        }
    }
}

fn pem_certs(out: &mut Vec<Problem>, key: &str, path: &Path) {
    if !readable(out, key, path) {
        return;
    }
    match std::fs::read(path).map(|b| tessera_identity::pem::decode_certs(&b)) {
        Ok(Ok(c)) if !c.is_empty() => {}
        Ok(Ok(_)) => out.push(problem(key, format!("{} holds no PEM certificate", path.display()))),
        Ok(Err(e)) => out.push(problem(key, format!("{}: {e}", path.display()))),
        Err(e) => out.push(problem(key, format!("{}: {e}", path.display()))),
    }
}

/// Every problem with the files and plugin settings `cfg` names, in file order.
pub fn check(cfg: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(parent) = cfg.admin_socket.parent()
        && !parent.as_os_str().is_empty()
        && parent.exists()
        && !parent.is_dir()
    {
        out.push(problem("server.admin_socket", format!("{} is not a directory", parent.display())));
    }
    if cfg.data_dir.exists() && !cfg.data_dir.is_dir() {
        out.push(problem("data_dir", format!("{} is not a directory", cfg.data_dir.display())));
    }
    if let KeyManagerKind::Pkcs11(p) = &cfg.key_manager {
        readable(&mut out, "key_manager.module_path", &p.module_path);
    }
    if let StoreKind::Postgres { tls_ca_file: Some(f), .. } = &cfg.store {
        pem_certs(&mut out, "store.tls_ca_file", f);
    }
    if let Some(ep) = &cfg.federation.bundle_endpoint
        && let ServingProfile::HttpsWeb { cert_file, key_file } = &ep.profile
    {
        pem_certs(&mut out, "federation.bundle_endpoint.cert_file", cert_file);
        readable(&mut out, "federation.bundle_endpoint.key_file", key_file);
    }
    for p in &cfg.federation.trust_domains {
        let td = &p.relationship.trust_domain;
        if let Some(b) = &p.bootstrap_bundle_path
            && readable(&mut out, "federation.trust_domains.bootstrap_bundle_path", b)
            && let Err(e) = crate::federation::read_bundle_file(td, b)
        {
            out.push(problem("federation.trust_domains.bootstrap_bundle_path", e.to_string()));
        }
        if let EndpointProfile::HttpsWeb { ca_bundle_path: Some(ca) } = &p.relationship.profile {
            pem_certs(&mut out, "federation.trust_domains.ca_bundle_path", ca);
        }
    }
    match &cfg.upstream_authority {
        Some(UpstreamConfig::Disk(files)) => {
            let mut ok = readable(&mut out, "upstream_authority.cert_file", &files.cert_file);
            ok &= readable(&mut out, "upstream_authority.key_file", &files.key_file);
            if let Some(c) = &files.chain_file {
                ok &= readable(&mut out, "upstream_authority.chain_file", c);
            }
            if let Some(b) = &files.bundle_file {
                ok &= readable(&mut out, "upstream_authority.bundle_file", b);
            }
            if ok && let Err(e) = tessera_plugins::DiskUpstream::new(files.clone()) {
                out.push(problem("upstream_authority", e.to_string()));
            }
            if ok {
                check_upstream_ca_profile(&mut out, files);
            }
        }
        Some(UpstreamConfig::External(x)) => {
            readable(&mut out, "upstream_authority.command", &x.command);
        }
        Some(UpstreamConfig::Vault(v)) => {
            if let Some(ca) = &v.ca_cert_file {
                pem_certs(&mut out, "upstream_authority.ca_cert_file", ca);
            }
        }
        Some(UpstreamConfig::Tessera(_)) | None => {}
    }
    out
}

/// The upstream CA certificate signs our CA: it must be a CA fit to (istio #27193: a
/// `cacerts` CA with a server-only extKeyUsage broke every workload certificate).
fn check_upstream_ca_profile(out: &mut Vec<Problem>, files: &tessera_plugins::upstream::disk::DiskFiles) {
    let read = |p: &Path| std::fs::read(p).ok().and_then(|b| tessera_identity::pem::decode_certs(&b).ok());
    let Some(ca) = read(&files.cert_file).and_then(|c| c.into_iter().next()) else { return };
    let ca = ca.to_vec();
    let mut chain = vec![ca.clone()];
    if let Some(more) = files.chain_file.as_deref().and_then(read) {
        chain.extend(more.into_iter().map(|c| c.to_vec()).filter(|c| *c != ca));
    }
    let roots: Vec<Vec<u8>> = match files.bundle_file.as_deref().and_then(read) {
        Some(r) => r.into_iter().map(|c| c.to_vec()).collect(),
        None => vec![ca],
    };
    // The upstream's CA has our CA below it: check it as one level up.
    for p in tessera_identity::x509::upstream_chain_problems(&chain, &roots) {
        out.push(problem("upstream_authority.cert_file", p.replace("the signing CA", "the upstream CA")));
    }
}

//! Conversions between store records and wire messages. Inbound conversions validate: a wire
//! entry becomes a store [`Entry`] only with valid IDs, known selector types and TTLs in range.

use tessera_identity::ids::{parse_member_id, parse_spiffe_id, parse_trust_domain};
use tessera_identity::{Bundle, Selector, TrustDomain};
use tessera_proto::admin::v1 as admin_pb;
use tessera_proto::types::v1 as pb;

use super::ApiError;
use crate::config::CaConfig;
use tessera_store::{AgentRecord, EndpointProfile, Entry, FederationRelationship};

/// Store entry → wire.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(selector_to_pb).collect(),
        x509_svid_ttl: i32::try_from(e.x509_svid_ttl).unwrap_or(i32::MAX),
        jwt_svid_ttl: i32::try_from(e.jwt_svid_ttl).unwrap_or(i32::MAX),
        federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        downstream: e.downstream,
        revision: e.revision,
        created_at: e.created_at,
        hint: e.hint.clone(),
    }
}

/// Selector → wire.
pub fn selector_to_pb(s: &Selector) -> pb::Selector {
    pb::Selector { r#type: s.kind.clone(), value: s.value.clone() }
}

/// Wire selector → validated selector.
pub fn selector_from_pb(s: &pb::Selector) -> Result<Selector, ApiError> {
    Ok(Selector::new(&s.r#type, &s.value)?)
}

fn ttl(field: &str, v: i32, max: std::time::Duration) -> Result<u32, ApiError> {
    let v = u32::try_from(v).map_err(|_| ApiError::InvalidArgument(format!("{field} must not be negative")))?;
    if u64::from(v) > max.as_secs() {
        return Err(ApiError::InvalidArgument(format!(
            "{field} {v}s is over the server's maximum of {}s",
            max.as_secs()
        )));
    }
    Ok(v)
}

/// Wire entry → validated store entry. `id`, `created_at` and `revision` are left to the caller.
pub fn entry_from_pb(e: &pb::Entry, td: &TrustDomain, ca: &CaConfig) -> Result<Entry, ApiError> {
    let spiffe_id = parse_member_id(&e.spiffe_id, td)?;
    if spiffe_id.path().is_empty() {
        return Err(ApiError::InvalidArgument("an entry's SPIFFE ID must have a path".into()));
    }
    let parent_id = parse_spiffe_id(&e.parent_id)?;
    if e.selectors.is_empty() && !is_join_token_parent(&parent_id) {
        return Err(ApiError::InvalidArgument("an entry needs at least one selector".into()));
    }
    let selectors = e.selectors.iter().map(selector_from_pb).collect::<Result<Vec<_>, _>>()?;
    let federates_with = e
        .federates_with
        .iter()
        .map(|t| parse_trust_domain(t).map_err(ApiError::from))
        .collect::<Result<Vec<_>, _>>()?;
    if federates_with.contains(td) {
        return Err(ApiError::InvalidArgument(format!("an entry cannot federate with its own trust domain {td}")));
    }
    for d in &e.dns_names {
        let ok = !d.is_empty()
            && d.len() <= 253
            && d.split('.').all(|l| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
            });
        if !ok {
            return Err(ApiError::InvalidArgument(format!("invalid DNS name {d:?}")));
        }
    }
    Ok(Entry {
        id: e.id.clone(),
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl: ttl("x509_svid_ttl", e.x509_svid_ttl, ca.max_x509_svid_ttl)?,
        jwt_svid_ttl: ttl("jwt_svid_ttl", e.jwt_svid_ttl, ca.max_jwt_svid_ttl)?,
        federates_with,
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        downstream: e.downstream,
        hint: e.hint.clone(),
        created_at: e.created_at,
        revision: 0,
    })
}

/// Node alias entries made by `token generate --spiffe-id` have no selectors.
fn is_join_token_parent(id: &tessera_identity::SpiffeId) -> bool {
    id.path().starts_with("/tessera/agent/join_token/")
}

pub use tessera_agent_api::wire::bundle_to_pb;

/// Wire → bundle, as given (no key checks): for displaying what the server sent.
pub fn bundle_from_pb_unchecked(b: &pb::Bundle) -> Result<Bundle, ApiError> {
    tessera_agent_api::wire::bundle_from_pb(b).map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

/// Wire → bundle, checking every certificate and key parses.
pub fn bundle_from_pb(b: &pb::Bundle) -> Result<Bundle, ApiError> {
    let out = bundle_from_pb_unchecked(b)?;
    for (i, c) in out.x509_authorities.iter().enumerate() {
        tessera_identity::x509::cert_facts(c)
            .map_err(|e| ApiError::InvalidArgument(format!("x509 authority {i}: {e}")))?;
    }
    if out.jwt_authorities.iter().any(|k| k.key_id.is_empty()) {
        return Err(ApiError::InvalidArgument("JWT authority without key ID".into()));
    }
    // Round-trip through the JWKS form: it validates every key the same way the bundle
    // endpoint will.
    let doc = out.to_jwks().map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    Bundle::from_jwks(out.trust_domain.clone(), doc.as_bytes())
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    Ok(out)
}

/// Agent record → wire.
pub fn agent_to_pb(a: &AgentRecord) -> tessera_proto::admin::v1::Agent {
    tessera_proto::admin::v1::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        selectors: a.selectors.iter().map(selector_to_pb).collect(),
        attested_at: a.attested_at,
        renewed_at: a.renewed_at,
        version: a.version.clone(),
    }
}

/// A relationship from the Admin API, checked.
pub fn federation_from_pb(
    own: &TrustDomain,
    r: &admin_pb::FederationRelationship,
) -> Result<FederationRelationship, ApiError> {
    let trust_domain = parse_trust_domain(&r.trust_domain)?;
    let profile = match (r.profile.as_str(), r.endpoint_spiffe_id.as_str()) {
        ("https_spiffe", "") => {
            return Err(ApiError::InvalidArgument("profile https_spiffe needs endpoint_spiffe_id".into()));
        }
        ("https_spiffe", id) => EndpointProfile::HttpsSpiffe { endpoint_spiffe_id: parse_spiffe_id(id)? },
        ("https_web", "") => EndpointProfile::HttpsWeb {
            ca_bundle_path: (!r.ca_bundle_path.is_empty()).then(|| r.ca_bundle_path.clone().into()),
        },
        ("https_web", _) => {
            return Err(ApiError::InvalidArgument("endpoint_spiffe_id belongs to profile https_spiffe only".into()));
        }
        (other, _) => {
            return Err(ApiError::InvalidArgument(format!("profile {other:?}: expected https_spiffe or https_web")));
        }
    };
    let rel = FederationRelationship {
        trust_domain,
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        profile,
        allow_empty_bundle: r.allow_empty_bundle,
    };
    crate::federation::check_relationship(own, &rel)?;
    Ok(rel)
}

/// A relationship and its status for the Admin API.
pub fn federation_to_pb(
    r: &FederationRelationship,
    status: &crate::federation::PeerStatus,
    sequence: u64,
) -> admin_pb::FederationRelationship {
    let (endpoint_spiffe_id, ca_bundle_path) = match &r.profile {
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => (endpoint_spiffe_id.to_string(), String::new()),
        EndpointProfile::HttpsWeb { ca_bundle_path } => {
            (String::new(), ca_bundle_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
        }
    };
    admin_pb::FederationRelationship {
        trust_domain: r.trust_domain.to_string(),
        bundle_endpoint_url: r.bundle_endpoint_url.clone(),
        profile: r.profile.name().into(),
        endpoint_spiffe_id,
        ca_bundle_path,
        allow_empty_bundle: r.allow_empty_bundle,
        bundle_sequence: sequence,
        last_refresh: status.last_success,
        next_refresh: status.next_refresh,
        last_error: status.last_error.clone().unwrap_or_default(),
    }
}

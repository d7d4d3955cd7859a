//! Bundles to and from the wire (`tessera.types.v1.Bundle`).

use tessera_identity::{Bundle, JwtAuthority, TrustDomain};
use tessera_proto::types::v1 as pb;

/// Why a wire bundle cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The trust domain name is invalid.
    #[error("bundle trust domain {name:?}: {reason}")]
    TrustDomain {
        /// What was sent.
        name: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Bundle → wire.
pub fn bundle_to_pb(b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.iter().map(|c| c.as_ref().to_vec()).collect(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|k| pb::JwtKey {
                public_key: k.public_key.clone(),
                key_id: k.key_id.clone(),
                expires_at: k.expires_at,
            })
            .collect(),
        sequence_number: b.sequence_number,
        refresh_hint_seconds: b.refresh_hint.map_or(0, |h| i64::try_from(h).unwrap_or(i64::MAX)),
    }
}

/// Wire → bundle, as sent: the trust domain is checked, the certificates and keys are not
/// (a receiver that stores or serves a bundle checks them itself).
pub fn bundle_from_pb(b: &pb::Bundle) -> Result<Bundle, WireError> {
    let td = TrustDomain::new(&b.trust_domain)
        .map_err(|e| WireError::TrustDomain { name: b.trust_domain.clone(), reason: e.to_string() })?;
    let mut out = Bundle::new(td);
    for c in &b.x509_authorities {
        out.add_x509_authority(c);
    }
    for k in &b.jwt_authorities {
        out.add_jwt_authority(JwtAuthority {
            key_id: k.key_id.clone(),
            public_key: k.public_key.clone(),
            expires_at: k.expires_at,
        });
    }
    out.sequence_number = b.sequence_number;
    out.refresh_hint = u64::try_from(b.refresh_hint_seconds).ok().filter(|h| *h > 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_survives_the_round_trip() {
        let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
        b.add_x509_authority(b"not parsed here");
        b.add_jwt_authority(JwtAuthority { key_id: "k1".into(), public_key: vec![1, 2, 3], expires_at: 42 });
        b.sequence_number = 7;
        b.refresh_hint = Some(300);
        assert_eq!(bundle_from_pb(&bundle_to_pb(&b)).unwrap(), b);
    }

    #[test]
    fn a_bad_trust_domain_is_refused_by_name() {
        let pb = pb::Bundle { trust_domain: "Not A Domain".into(), ..Default::default() };
        assert!(matches!(bundle_from_pb(&pb), Err(WireError::TrustDomain { .. })));
    }
}

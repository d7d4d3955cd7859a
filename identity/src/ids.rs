//! Tessera's well-known SPIFFE IDs and selector parsing.
//!
//! Agent IDs are `spiffe://<td>/tessera/agent/<attestor>/<unique part>`; the server's ID is
//! `spiffe://<td>/tessera/server`.

use crate::{SpiffeId, SpiffeIdError, TrustDomain};

/// Errors building or checking a Tessera identity.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum IdError {
    /// The string is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID {input:?}: {source}")]
    InvalidSpiffeId {
        /// What was given (IDs are not secret).
        input: String,
        /// The spec rule it breaks.
        source: SpiffeIdError,
    },
    /// The string is not a valid trust domain.
    #[error("invalid trust domain {input:?}: {source}")]
    InvalidTrustDomain {
        /// What was given.
        input: String,
        /// The spec rule it breaks.
        source: SpiffeIdError,
    },
    /// The SPIFFE ID belongs to a different trust domain than required.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The ID.
        id: String,
        /// The trust domain it had to be in.
        expected: String,
    },
    /// A selector is not `type:value`, or its type is unknown.
    #[error("invalid selector {0:?}: expected type:value with type one of {KNOWN_SELECTOR_TYPES:?}")]
    InvalidSelector(String),
}

/// Selector types Tessera's attestors produce. Entries naming anything else are refused, so a
/// typo cannot create an entry that never matches.
pub const KNOWN_SELECTOR_TYPES: &[&str] = &["unix", "k8s", "k8s_psat", "join_token", "x509pop", "spiffe_id"];

/// Parses a SPIFFE ID, with an error that names the input.
pub fn parse_spiffe_id(s: &str) -> Result<SpiffeId, IdError> {
    SpiffeId::new(s).map_err(|source| IdError::InvalidSpiffeId { input: s.to_owned(), source })
}

/// Parses a trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
pub fn parse_trust_domain(s: &str) -> Result<TrustDomain, IdError> {
    TrustDomain::new(s).map_err(|source| IdError::InvalidTrustDomain { input: s.to_owned(), source })
}

/// Parses a SPIFFE ID that must belong to `td`.
pub fn parse_member_id(s: &str, td: &TrustDomain) -> Result<SpiffeId, IdError> {
    let id = parse_spiffe_id(s)?;
    if !id.is_member_of(td) {
        return Err(IdError::ForeignTrustDomain { id: id.to_string(), expected: td.to_string() });
    }
    Ok(id)
}

/// `spiffe://<td>/tessera/agent/<attestor>/<unique>`.
pub fn agent_id(td: &TrustDomain, attestor: &str, unique: &str) -> Result<SpiffeId, IdError> {
    parse_spiffe_id(&format!("spiffe://{td}/tessera/agent/{attestor}/{unique}"))
}

/// `spiffe://<td>/tessera/server`.
pub fn server_id(td: &TrustDomain) -> Result<SpiffeId, IdError> {
    parse_spiffe_id(&format!("spiffe://{td}/tessera/server"))
}

/// True when `id` is an agent ID of `td`.
pub fn is_agent_id(id: &SpiffeId, td: &TrustDomain) -> bool {
    id.is_member_of(td) && id.path().starts_with("/tessera/agent/")
}

/// The path segment before a join token in a join-token agent ID.
const JOIN_TOKEN_PATH: &str = "/tessera/agent/join_token/";

/// `s` with the token in every join-token agent ID replaced by a fingerprint
/// (`…/join_token/<sha256:1a2b3c4d>`, the first 8 hex digits of the token's SHA-256). An agent
/// ID made from a join token carries the token itself (`…/join_token/<token>`); logs and error
/// messages show it through this, so that reading them never gives a usable token. The
/// fingerprint cannot be mistaken for a token (`:` and `<` are not allowed in an ID's path).
pub fn redact_join_token(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(JOIN_TOKEN_PATH) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(JOIN_TOKEN_PATH) {
        let (head, tail) = rest.split_at(i + JOIN_TOKEN_PATH.len());
        out.push_str(head);
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))).unwrap_or(tail.len());
        let (token, after) = tail.split_at(end);
        if !token.is_empty() {
            let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            out.push_str("<sha256:");
            out.push_str(&crate::x509::hex_lower(d.as_ref().get(..4).unwrap_or_default()));
            out.push('>');
        }
        rest = after;
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Displays a SPIFFE ID for a log line or an error message: a join-token agent ID with its
/// token replaced by a fingerprint ([`redact_join_token`]), any other ID as it is.
#[derive(Debug, Clone, Copy)]
pub struct LogId<'a>(pub &'a SpiffeId);

impl std::fmt::Display for LogId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_join_token(&self.0.to_string()))
    }
}

/// A selector, `type:value` (the value may itself contain colons: `unix:uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Selector {
    /// The attestor kind, e.g. `unix`.
    pub kind: String,
    /// What it matched, e.g. `uid:1000`.
    pub value: String,
}

impl Selector {
    /// Builds a selector from its parts, checking the type is known and the value non-empty.
    pub fn new(kind: &str, value: &str) -> Result<Self, IdError> {
        if !KNOWN_SELECTOR_TYPES.contains(&kind) || value.is_empty() || value.len() > 1024 {
            return Err(IdError::InvalidSelector(format!("{kind}:{value}")));
        }
        Ok(Self { kind: kind.to_owned(), value: value.to_owned() })
    }
}

impl std::str::FromStr for Selector {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (kind, value) = s.split_once(':').ok_or_else(|| IdError::InvalidSelector(s.to_owned()))?;
        Self::new(kind, value)
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_and_server_ids_follow_the_tessera_layout() {
        let td = parse_trust_domain("example.org").unwrap();
        assert_eq!(server_id(&td).unwrap().to_string(), "spiffe://example.org/tessera/server");
        let a = agent_id(&td, "join_token", "abc").unwrap();
        assert_eq!(a.to_string(), "spiffe://example.org/tessera/agent/join_token/abc");
        assert!(is_agent_id(&a, &td));
        assert!(!is_agent_id(&server_id(&td).unwrap(), &td));
    }

    #[test]
    fn join_token_agent_ids_are_logged_with_a_fingerprint_not_the_token() {
        let td = parse_trust_domain("example.org").unwrap();
        let token = "4f1c2e9a-0b7d-4e2a-9c3b-1d2e3f4a5b6c";
        let a = agent_id(&td, "join_token", token).unwrap();
        let shown = LogId(&a).to_string();
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.starts_with("spiffe://example.org/tessera/agent/join_token/<sha256:"), "{shown}");
        assert_eq!(shown, LogId(&a).to_string(), "the fingerprint is stable");
        let msg = format!("agent {a} is banned; agent {a}/x too");
        let r = redact_join_token(&msg);
        assert!(!r.contains(token) && r.ends_with("/x too"), "{r}");
        let other = agent_id(&td, "k8s_psat", "cluster/node-uid").unwrap();
        assert_eq!(LogId(&other).to_string(), other.to_string());
    }

    #[test]
    fn rejects_ids_that_break_spiffe_rules() {
        for bad in [
            "",
            "http://x/y",
            "spiffe://",
            "spiffe://EX AMPLE/x",
            "spiffe://td/a//b",
            "spiffe://td/a/",
            "spiffe://td/./a",
        ] {
            assert!(parse_spiffe_id(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rejects_member_of_foreign_trust_domain() {
        let td = parse_trust_domain("a.org").unwrap();
        let err = parse_member_id("spiffe://b.org/w", &td).unwrap_err();
        assert!(matches!(err, IdError::ForeignTrustDomain { .. }));
    }

    #[test]
    fn selector_parses_type_and_value_with_colons() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(s.kind, "unix");
        assert_eq!(s.value, "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert!("bogus:x".parse::<Selector>().is_err());
        assert!("unix:".parse::<Selector>().is_err());
        assert!("nocolon".parse::<Selector>().is_err());
    }
}

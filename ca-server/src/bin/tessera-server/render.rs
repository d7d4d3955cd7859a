//! Output of the admin CLI: each record type is rendered here once, as JSON and as text, and
//! every command prints through [`Printer`]. Lists print a header and their items; the JSON of
//! a list is `{"<key>": [items]}`.

use serde_json::{Value, json};
use tessera_proto::admin::v1 as pb;
use tessera_proto::types::v1 as types;

/// A value the CLI prints: one JSON shape and one text shape.
pub trait Record {
    fn json(&self) -> Value;
    fn text(&self) -> String;
}

/// `--output text|json`.
pub struct Printer {
    pub json: bool,
}

impl Printer {
    /// Prints one record. An error only when standard output cannot take it (see
    /// [`tessera_svc::out`]).
    pub fn one(&self, r: &impl Record) -> Result<(), tessera_svc::out::StdoutError> {
        if self.json {
            tessera_svc::out::line(&serde_json::to_string_pretty(&r.json()).unwrap_or_default())
        } else {
            tessera_svc::out::write(&r.text())
        }
    }
}

/// A result printed once, for verbs whose answer is not a stored record (a token, a minted
/// SVID, a refresh outcome): its JSON and its text side by side.
pub struct Message {
    pub json: Value,
    pub text: String,
}

impl Record for Message {
    fn json(&self) -> Value {
        self.json.clone()
    }
    fn text(&self) -> String {
        self.text.clone()
    }
}

/// Records of one type under a JSON key, with an optional "Found N things" header.
pub struct List<'a, R> {
    pub key: &'static str,
    pub items: &'a [R],
    /// Singular and plural noun for the "Found N …" header; no header when `None`.
    pub noun: Option<(&'static str, &'static str)>,
    /// Text printed before each item.
    pub separator: &'static str,
}

impl<R: Record> Record for List<'_, R> {
    fn json(&self) -> Value {
        json!({ self.key: self.items.iter().map(Record::json).collect::<Vec<_>>() })
    }
    fn text(&self) -> String {
        let mut s = match self.noun {
            Some((one, many)) => {
                format!("Found {} {}\n", self.items.len(), if self.items.len() == 1 { one } else { many })
            }
            None => String::new(),
        };
        for r in self.items {
            s.push_str(self.separator);
            s.push_str(&r.text());
        }
        s
    }
}

fn selector_strings(sel: &[types::Selector]) -> Vec<String> {
    sel.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect()
}

impl Record for types::Entry {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "spiffe_id": self.spiffe_id,
            "parent_id": self.parent_id,
            "selectors": selector_strings(&self.selectors),
            "x509_svid_ttl": self.x509_svid_ttl,
            "jwt_svid_ttl": self.jwt_svid_ttl,
            "federates_with": self.federates_with,
            "dns_names": self.dns_names,
            "admin": self.admin,
            "downstream": self.downstream,
            "hint": self.hint,
            "revision": self.revision,
            "created_at": self.created_at,
        })
    }
    fn text(&self) -> String {
        let ttl = |t: i32| if t == 0 { "default".to_owned() } else { format!("{t}s") };
        let mut s = format!(
            "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\nRevision         : {}\nX509-SVID TTL    : {}\nJWT-SVID TTL     : {}\n",
            self.id,
            self.spiffe_id,
            self.parent_id,
            self.revision,
            ttl(self.x509_svid_ttl),
            ttl(self.jwt_svid_ttl)
        );
        for sel in selector_strings(&self.selectors) {
            s.push_str(&format!("Selector         : {sel}\n"));
        }
        for td in &self.federates_with {
            s.push_str(&format!("FederatesWith    : {td}\n"));
        }
        for d in &self.dns_names {
            s.push_str(&format!("DNS name         : {d}\n"));
        }
        if self.admin {
            s.push_str("Admin            : true\n");
        }
        if self.downstream {
            s.push_str("Downstream       : true\n");
        }
        s.push('\n');
        s
    }
}

/// The entries a verb returned, under `"entries"` with a "Found N entries" header.
pub fn entries(items: &[types::Entry]) -> List<'_, types::Entry> {
    List { key: "entries", items, noun: Some(("entry", "entries")), separator: "" }
}

impl Record for pb::X509Authority {
    fn json(&self) -> Value {
        json!({"authority_id": self.authority_id, "status": self.status, "issued_at": self.issued_at, "expires_at": self.expires_at, "tainted": self.tainted})
    }
    fn text(&self) -> String {
        format!(
            "Authority ID : {}\nStatus       : {}\nIssued at    : {}\nExpires at   : {}\nTainted      : {}\n\n",
            self.authority_id, self.status, self.issued_at, self.expires_at, self.tainted
        )
    }
}

/// The X.509 authorities, under `"authorities"`.
pub fn authorities(items: &[pb::X509Authority]) -> List<'_, pb::X509Authority> {
    List { key: "authorities", items, noun: None, separator: "" }
}

impl Record for pb::Agent {
    fn json(&self) -> Value {
        json!({"spiffe_id": self.spiffe_id, "attestation_type": self.attestation_type, "serial": self.serial, "expires_at": self.expires_at, "banned": self.banned, "selectors": selector_strings(&self.selectors), "version": self.version})
    }
    fn text(&self) -> String {
        let selectors: String =
            selector_strings(&self.selectors).iter().map(|s| format!("Selector    : {s}\n")).collect();
        format!(
            "SPIFFE ID   : {}\nAttestation : {}\nVersion     : {}\nSerial      : {}\nExpires at  : {}\nBanned      : {}\n{selectors}\n",
            self.spiffe_id,
            self.attestation_type,
            if self.version.is_empty() { "unknown" } else { &self.version },
            self.serial,
            self.expires_at,
            self.banned
        )
    }
}

/// The agents a verb returned, under `"agents"`.
pub fn agents(items: &[pb::Agent]) -> List<'_, pb::Agent> {
    List { key: "agents", items, noun: None, separator: "" }
}

impl Record for pb::AuditEntry {
    fn json(&self) -> Value {
        json!({"seq": self.seq, "at_ms": self.at_ms, "kind": self.kind, "spiffe_id": self.spiffe_id, "serial": self.serial,
               "not_after": self.not_after, "caller": self.caller, "detail": self.detail, "hash": self.hash})
    }
    fn text(&self) -> String {
        format!(
            "{:>6}  {}  {:<14}  {}  serial={}  caller={}{}\n",
            self.seq,
            self.at_ms / 1000,
            self.kind,
            self.spiffe_id,
            if self.serial.is_empty() { "-" } else { &self.serial },
            self.caller,
            if self.detail.is_empty() { String::new() } else { format!("  ({})", self.detail) }
        )
    }
}

impl Record for pb::ListAuditResponse {
    fn json(&self) -> Value {
        json!({"records": self.records.iter().map(Record::json).collect::<Vec<_>>(), "next_seq": self.next_seq})
    }
    fn text(&self) -> String {
        let mut s: String = self.records.iter().map(Record::text).collect();
        if self.next_seq != 0 {
            s.push_str(&format!("More: --from-seq {}\n", self.next_seq));
        }
        s
    }
}

impl Record for pb::VerifyAuditResponse {
    fn json(&self) -> Value {
        json!({"ok": self.ok, "records": self.records, "first_broken": self.first_broken, "reason": self.reason, "head": self.head})
    }
    fn text(&self) -> String {
        if self.ok {
            format!("Audit log OK: {} records, head {}\n", self.records, self.head)
        } else {
            format!(
                "Audit log BROKEN at record {}: {} ({} records verified before it)\n",
                self.first_broken, self.reason, self.records
            )
        }
    }
}

impl Record for pb::FederationRelationship {
    fn json(&self) -> Value {
        json!({
            "trust_domain": self.trust_domain,
            "bundle_endpoint_url": self.bundle_endpoint_url,
            "profile": self.profile,
            "endpoint_spiffe_id": self.endpoint_spiffe_id,
            "ca_bundle_path": self.ca_bundle_path,
            "allow_empty_bundle": self.allow_empty_bundle,
            "bundle_sequence": self.bundle_sequence,
            "last_refresh": self.last_refresh,
            "next_refresh": self.next_refresh,
            "last_error": self.last_error,
        })
    }
    fn text(&self) -> String {
        let mut s = format!(
            "Trust domain              : {}\nBundle endpoint URL       : {}\nBundle endpoint profile   : {}\n",
            self.trust_domain, self.bundle_endpoint_url, self.profile
        );
        if !self.endpoint_spiffe_id.is_empty() {
            s.push_str(&format!("Endpoint SPIFFE ID        : {}\n", self.endpoint_spiffe_id));
        }
        if !self.ca_bundle_path.is_empty() {
            s.push_str(&format!("CA bundle path            : {}\n", self.ca_bundle_path));
        }
        s.push_str(&format!("Bundle sequence           : {}\n", self.bundle_sequence));
        let when = |t: i64| if t == 0 { "never".to_owned() } else { t.to_string() };
        s.push_str(&format!(
            "Last refresh              : {}\nNext refresh              : {}\n",
            when(self.last_refresh),
            when(self.next_refresh)
        ));
        if !self.last_error.is_empty() {
            s.push_str(&format!("Last error                : {}\n", self.last_error));
        }
        s
    }
}

/// The relationships, under `"relationships"`, each after a blank line.
pub fn relationships(items: &[pb::FederationRelationship]) -> List<'_, pb::FederationRelationship> {
    List {
        key: "relationships",
        items,
        noun: Some(("federation relationship", "federation relationships")),
        separator: "\n",
    }
}

/// A relationship that was just changed: its record, after one line saying what happened.
pub struct Changed<'a, R> {
    pub what: &'static str,
    pub record: &'a R,
}

impl<R: Record> Record for Changed<'_, R> {
    fn json(&self) -> Value {
        self.record.json()
    }
    fn text(&self) -> String {
        format!("{}\n{}", self.what, self.record.text())
    }
}

impl Record for pb::CreateJoinTokenResponse {
    fn json(&self) -> Value {
        json!({"token": self.token, "expires_at": self.expires_at, "agent_id": self.agent_id, "alias_entry": self.alias_entry.as_ref().map(Record::json)})
    }
    fn text(&self) -> String {
        let mut s = format!("Token: {}\nAgent ID: {}\nExpires at: {}\n", self.token, self.agent_id, self.expires_at);
        if let Some(e) = &self.alias_entry {
            s.push_str(&format!("Alias entry: {} ({})\n", e.id, e.spiffe_id));
        }
        s
    }
}

impl Record for pb::MintJwtSvidResponse {
    fn json(&self) -> Value {
        json!({"token": self.token, "expires_at": self.expires_at})
    }
    fn text(&self) -> String {
        format!("{}\n", self.token)
    }
}

/// `debug info`.
pub fn server_info(i: &pb::ServerInfo) -> Message {
    let auths: Vec<Value> = i
        .authorities
        .iter()
        .map(|a| json!({"authority_id": a.authority_id, "status": a.status, "not_after": a.not_after}))
        .collect();
    let chain: Vec<Value> = i
        .svid_chain
        .iter()
        .map(|c| json!({"spiffe_id": c.spiffe_id, "serial": c.serial, "not_after": c.not_after}))
        .collect();
    let json = json!({
        "version": i.version, "instance_id": i.instance_id, "trust_domain": i.trust_domain,
        "uptime_seconds": i.uptime_seconds,
        "counts": {"agents": i.agents, "banned_agents": i.banned_agents, "entries": i.entries,
                   "federated_bundles": i.federated_bundles},
        "bundle_sequence": i.bundle_sequence, "last_agent_sync": i.last_agent_sync,
        "authorities": auths, "svid_chain": chain,
    });
    let mut text = format!(
        "Version:           {}\nInstance:          {}\nTrust domain:      {}\nUptime:            {}s\nAgents:            {} ({} banned)\nEntries:           {}\nFederated bundles: {}\nBundle sequence:   {}\nLast agent sync:   {}\n",
        i.version,
        i.instance_id,
        i.trust_domain,
        i.uptime_seconds,
        i.agents,
        i.banned_agents,
        i.entries,
        i.federated_bundles,
        i.bundle_sequence,
        if i.last_agent_sync == 0 { "never".to_owned() } else { i.last_agent_sync.to_string() }
    );
    for a in &i.authorities {
        text.push_str(&format!("Authority:         {} {} not after {}\n", a.status, a.authority_id, a.not_after));
    }
    for c in &i.svid_chain {
        text.push_str(&format!("SVID chain:        {} serial {} not after {}\n", c.spiffe_id, c.serial, c.not_after));
    }
    Message { json, text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_has_one_json_key_and_a_counted_header() {
        let e = types::Entry { id: "e1".into(), spiffe_id: "spiffe://td/w".into(), ..Default::default() };
        let l = entries(std::slice::from_ref(&e));
        assert_eq!(l.json()["entries"][0]["id"], "e1");
        assert!(l.text().starts_with("Found 1 entry\nEntry ID         : e1\n"), "{}", l.text());
        assert!(entries(&[]).text().starts_with("Found 0 entries"));
        let r = pb::FederationRelationship { trust_domain: "peer.org".into(), ..Default::default() };
        let rs = [r.clone(), r];
        assert!(relationships(&rs).text().starts_with("Found 2 federation relationships\n\nTrust domain"));
    }
}

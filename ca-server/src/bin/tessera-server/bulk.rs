//! `entry create --file F`: many entries from a file, in batches of up to 1,000, each batch
//! created all together or not at all. The file is SPIRE's `-data` shape
//! (`{"entries": [...]}`), a JSON array of entries, or one JSON entry per line. Selectors are
//! `{"type": "unix", "value": "uid:1000"}` objects or `"unix:uid:1000"` strings.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_proto::admin::v1 as pb;
use tessera_proto::admin::v1::admin_client::AdminClient;
use tessera_proto::types::v1 as types;
use tonic::transport::Channel;

use crate::render::{Message, Printer};

/// Entries sent per call (the server's limit).
const BATCH: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSelector {
    Text(String),
    Pair {
        #[serde(rename = "type")]
        kind: String,
        value: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    #[serde(default, alias = "entry_id")]
    id: String,
    spiffe_id: String,
    parent_id: String,
    #[serde(default)]
    selectors: Vec<RawSelector>,
    #[serde(default)]
    x509_svid_ttl: i32,
    #[serde(default)]
    jwt_svid_ttl: i32,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    downstream: bool,
    #[serde(default)]
    hint: String,
}

impl RawEntry {
    fn into_pb(self) -> anyhow::Result<types::Entry> {
        let selectors = self
            .selectors
            .into_iter()
            .map(|s| {
                let sel: tessera_identity::Selector = match s {
                    RawSelector::Text(t) => t.parse()?,
                    RawSelector::Pair { kind, value } => tessera_identity::Selector::new(&kind, &value)?,
                };
                Ok(types::Selector { r#type: sel.kind, value: sel.value })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(types::Entry {
            id: self.id,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            federates_with: self.federates_with,
            dns_names: self.dns_names,
            admin: self.admin,
            downstream: self.downstream,
            hint: self.hint,
            ..Default::default()
        })
    }
}

/// The entries in `text`, each error naming where it is.
fn parse(text: &str) -> anyhow::Result<Vec<types::Entry>> {
    let one = |v: Value, at: &str| -> anyhow::Result<types::Entry> {
        serde_json::from_value::<RawEntry>(v)
            .map_err(anyhow::Error::from)
            .and_then(RawEntry::into_pb)
            .with_context(|| at.to_owned())
    };
    let trimmed = text.trim_start();
    let whole: Option<Value> =
        if trimmed.starts_with('[') || trimmed.starts_with('{') { serde_json::from_str(text).ok() } else { None };
    let list = match whole {
        Some(Value::Array(a)) => a,
        Some(Value::Object(mut o)) if o.contains_key("entries") => match o.remove("entries") {
            Some(Value::Array(a)) => a,
            _ => bail!("\"entries\" must be a list"),
        },
        // One entry per line (a single-line file with one entry lands here too).
        _ => {
            let mut out = Vec::new();
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
                out.push(one(v, &format!("line {}", n + 1))?);
            }
            return Ok(out);
        }
    };
    list.into_iter().enumerate().map(|(i, v)| one(v, &format!("entry {}", i + 1))).collect()
}

/// Creates the entries of `path`; every result is printed; an error when any failed.
pub async fn create_from_file(c: &mut AdminClient<Channel>, out: &Printer, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let entries = parse(&text).with_context(|| path.display().to_string())?;
    if entries.is_empty() {
        bail!("{} holds no entries", path.display());
    }
    let total = entries.len();
    let (mut results, mut created, mut failed_batch) = (Vec::with_capacity(total), 0usize, None);
    for (b, chunk) in entries.chunks(BATCH).enumerate() {
        let r = c.batch_create_entry(pb::BatchCreateEntryRequest { entries: chunk.to_vec() }).await?.into_inner();
        let ok = r.results.iter().all(|x| x.code == 0);
        created += r.results.iter().filter(|x| x.code == 0).count();
        results.extend(r.results);
        if !ok {
            failed_batch = Some(b);
            break;
        }
    }
    let json = json!({
        "results": results.iter().map(|r| json!({
            "entry": r.entry.as_ref().map(|e| json!({"id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id})),
            "status": {"code": r.code, "message": r.message},
        })).collect::<Vec<_>>(),
        "created": created,
        "total": total,
    });
    let mut text = String::new();
    for (i, r) in results.iter().enumerate().filter(|(_, r)| r.code != 0 && r.code != tonic::Code::Aborted as i32) {
        let id = r.entry.as_ref().map(|e| e.spiffe_id.as_str()).unwrap_or_default();
        text.push_str(&format!("entry {} ({id}): {}: {}\n", i + 1, tonic::Code::from(r.code), r.message));
    }
    text.push_str(&format!("Created {created} of {total} entries.\n"));
    if let Some(b) = failed_batch {
        text.push_str(&format!(
            "Batch {} ({} to {}) was refused as a whole; later entries were not sent.\n",
            b + 1,
            b * BATCH + 1,
            ((b + 1) * BATCH).min(total)
        ));
    }
    out.one(&Message { json, text })?;
    if failed_batch.is_some() {
        return Err(anyhow!("{} of {total} entries were not created", total - created));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_file_shapes_give_the_same_entries() {
        let spire = r#"{"entries": [{"spiffe_id": "spiffe://example.org/a", "parent_id": "spiffe://example.org/n",
            "selectors": [{"type": "unix", "value": "uid:1"}], "x509_svid_ttl": 60}]}"#;
        let array = r#"[{"spiffe_id": "spiffe://example.org/a", "parent_id": "spiffe://example.org/n",
            "selectors": ["unix:uid:1"], "x509_svid_ttl": 60}]"#;
        let lines = "{\"spiffe_id\": \"spiffe://example.org/a\", \"parent_id\": \"spiffe://example.org/n\", \"selectors\": [\"unix:uid:1\"], \"x509_svid_ttl\": 60}\n\n";
        let a = parse(spire).unwrap();
        assert_eq!(a, parse(array).unwrap());
        assert_eq!(a, parse(lines).unwrap());
        assert_eq!(a[0].selectors[0].value, "uid:1");
        let e = parse("{\"spiffe_id\": \"spiffe://example.org/a\"}\n{\"bad\": 1}\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        let e = parse(r#"[{"spiffe_id": "x", "parent_id": "y", "selectors": ["nocolon"]}]"#).unwrap_err();
        assert!(format!("{e:#}").contains("entry 1"), "{e:#}");
    }
}

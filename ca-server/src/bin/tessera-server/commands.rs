//! The admin verbs: each builds its Admin API request, calls it and hands the answer to the
//! [`Printer`]. No output is formatted here; [`crate::render`] does that once per record type.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde_json::json;
use tessera_identity::{Bundle, PrivateKey, unix_now};
use tessera_proto::admin::v1 as pb;
use tessera_proto::admin::v1::admin_client::AdminClient;
use tessera_server::api::convert::{bundle_from_pb_unchecked, bundle_to_pb};
use tonic::transport::Channel;

use crate::args::*;
use crate::render::{self, Changed, Message, Printer};

type Client = AdminClient<Channel>;

/// Entries or agents asked for per call when listing them all.
const PAGE: u32 = 1000;

/// Runs one admin verb (every [`Cmd`] but `run`).
pub async fn run(mut c: Client, out: &Printer, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { .. } => Ok(()),
        Cmd::Token(TokenCmd::Generate { spiffe_id, ttl }) => {
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl: opt_ttl(&ttl)?,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            out.one(&r)?;
            Ok(())
        }
        Cmd::Entry(cmd) => entry(&mut c, out, cmd).await,
        Cmd::Bundle(cmd) => bundle(&mut c, out, cmd).await,
        Cmd::Federation(cmd) => federation(&mut c, out, cmd).await,
        Cmd::X509(X509Cmd::Mint { spiffe_id, ttl, dns, write }) => {
            x509_mint(&mut c, out, spiffe_id, ttl, dns, write).await
        }
        Cmd::Jwt(JwtCmd::Mint { spiffe_id, audience, ttl }) => {
            let r = c
                .mint_jwt_svid(pb::MintJwtSvidRequest { spiffe_id, audience, ttl: opt_ttl(&ttl)? })
                .await?
                .into_inner();
            out.one(&r)?;
            Ok(())
        }
        Cmd::Localauthority(LocalAuthorityCmd::X509(cmd)) => {
            let state = match cmd {
                AuthorityCmd::Show => c.get_x509_authorities(pb::GetX509AuthoritiesRequest {}).await?,
                AuthorityCmd::Prepare => c.prepare_x509_authority(pb::PrepareX509AuthorityRequest {}).await?,
                AuthorityCmd::Activate { authority_id } => {
                    c.activate_x509_authority(pb::ActivateX509AuthorityRequest {
                        authority_id: authority_id.unwrap_or_default(),
                    })
                    .await?
                }
                AuthorityCmd::Taint { authority_id } => {
                    c.taint_x509_authority(pb::TaintX509AuthorityRequest { authority_id }).await?
                }
            }
            .into_inner();
            out.one(&render::authorities(&state.authorities))?;
            Ok(())
        }
        Cmd::Agent(cmd) => {
            let agents = match cmd {
                AgentCmd::List => {
                    let mut all = Vec::new();
                    let mut page_token = String::new();
                    loop {
                        let r =
                            c.list_agents(pb::ListAgentsRequest { page_size: PAGE, page_token }).await?.into_inner();
                        all.extend(r.agents);
                        if r.next_page_token.is_empty() {
                            break all;
                        }
                        page_token = r.next_page_token;
                    }
                }
                AgentCmd::Show { spiffe_id } => vec![c.get_agent(pb::AgentId { spiffe_id }).await?.into_inner()],
                AgentCmd::Evict { spiffe_id } => vec![c.evict_agent(pb::AgentId { spiffe_id }).await?.into_inner()],
                AgentCmd::Ban { spiffe_id } => vec![c.ban_agent(pb::AgentId { spiffe_id }).await?.into_inner()],
            };
            out.one(&render::agents(&agents))?;
            Ok(())
        }
        Cmd::Audit(AuditCmd::Show { spiffe_id, caller, since, until, from_seq, limit }) => {
            let r = c
                .list_audit(pb::ListAuditRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    caller: caller.unwrap_or_default(),
                    since_ms: when_ms(&since)?,
                    until_ms: when_ms(&until)?,
                    from_seq,
                    limit,
                })
                .await?
                .into_inner();
            out.one(&r)?;
            Ok(())
        }
        Cmd::Audit(AuditCmd::Verify) => {
            let v = c.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
            out.one(&v)?;
            if !v.ok {
                bail!("audit chain is broken at record {}", v.first_broken);
            }
            Ok(())
        }
        Cmd::Doctor { .. } | Cmd::Validate { .. } => Ok(()),
        Cmd::Debug(DebugCmd::Info) => {
            let i = c.get_server_info(pb::GetServerInfoRequest {}).await?.into_inner();
            out.one(&render::server_info(&i))?;
            Ok(())
        }
        Cmd::Healthcheck => {
            let state = c.get_x509_authorities(pb::GetX509AuthoritiesRequest {}).await?.into_inner();
            let now = unix_now();
            if !state.authorities.iter().any(|a| a.status == "active" && a.expires_at > now) {
                bail!("server is unhealthy: no active, unexpired X.509 authority");
            }
            out.one(&Message { json: json!({"healthy": true}), text: "Server is healthy.\n".into() })?;
            Ok(())
        }
    }
}

async fn entry(c: &mut Client, out: &Printer, cmd: EntryCmd) -> anyhow::Result<()> {
    let entries = match cmd {
        EntryCmd::Create { file: Some(path), .. } => return crate::bulk::create_from_file(c, out, &path).await,
        EntryCmd::Create { id, fields, .. } => {
            let e = entry_from_fields(id.unwrap_or_default(), fields)?;
            vec![c.create_entry(pb::CreateEntryRequest { entry: Some(e) }).await?.into_inner()]
        }
        EntryCmd::Update { id, fields } => {
            let e = entry_from_fields(id, fields)?;
            vec![c.update_entry(pb::UpdateEntryRequest { entry: Some(e) }).await?.into_inner()]
        }
        EntryCmd::Delete { id } => vec![c.delete_entry(pb::EntryId { id }).await?.into_inner()],
        EntryCmd::Show { id: Some(id), .. } => vec![c.get_entry(pb::EntryId { id }).await?.into_inner()],
        EntryCmd::Show { id: None, spiffe_id, parent_id, selectors: sel } => {
            // Every page.
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_entries(pb::ListEntriesRequest {
                        by_spiffe_id: spiffe_id.clone().unwrap_or_default(),
                        by_parent_id: parent_id.clone().unwrap_or_default(),
                        by_selectors: selectors(&sel)?,
                        page_size: PAGE,
                        page_token,
                    })
                    .await?
                    .into_inner();
                all.extend(r.entries);
                if r.next_page_token.is_empty() {
                    break all;
                }
                page_token = r.next_page_token;
            }
        }
    };
    out.one(&render::entries(&entries))?;
    Ok(())
}

fn render_bundle(b: &Bundle, format: BundleFormat) -> anyhow::Result<String> {
    Ok(match format {
        BundleFormat::Pem => b.x509_pem(),
        BundleFormat::Spiffe => format!("{}\n", b.to_jwks()?),
    })
}

/// Reads a bundle file (stdin when `path` is `None`) in `format`.
fn read_bundle(td: tessera_identity::TrustDomain, path: Option<&Path>, format: BundleFormat) -> anyhow::Result<Bundle> {
    let data = match path {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
            v
        }
    };
    Ok(match format {
        BundleFormat::Spiffe => Bundle::from_jwks(td, &data)?,
        BundleFormat::Pem => {
            let mut b = Bundle::new(td);
            for cert in tessera_identity::pem::decode_certs(&data)? {
                b.add_x509_authority(&cert);
            }
            b
        }
    })
}

async fn federation(c: &mut Client, out: &Printer, cmd: FederationCmd) -> anyhow::Result<()> {
    let set_req = |a: RelationshipArgs| -> anyhow::Result<pb::SetFederationRelationshipRequest> {
        let td = tessera_identity::ids::parse_trust_domain(&a.trust_domain)?;
        let bootstrap = match &a.bundle_path {
            Some(p) => Some(bundle_to_pb(&read_bundle(td, Some(p), a.bundle_format)?)),
            None => None,
        };
        Ok(pb::SetFederationRelationshipRequest {
            relationship: Some(pb::FederationRelationship {
                trust_domain: a.trust_domain,
                bundle_endpoint_url: a.bundle_endpoint_url,
                profile: a.profile,
                endpoint_spiffe_id: a.endpoint_spiffe_id.unwrap_or_default(),
                ca_bundle_path: a.ca_bundle_path.map(|p| p.display().to_string()).unwrap_or_default(),
                allow_empty_bundle: a.allow_empty_bundle,
                ..Default::default()
            }),
            bootstrap_bundle: bootstrap,
        })
    };
    match cmd {
        FederationCmd::Create(a) => {
            let r = c.create_federation_relationship(set_req(a)?).await?.into_inner();
            out.one(&Changed { what: "Federation relationship created", record: &r })?;
        }
        FederationCmd::Update(a) => {
            let r = c.update_federation_relationship(set_req(a)?).await?.into_inner();
            out.one(&Changed { what: "Federation relationship updated", record: &r })?;
        }
        FederationCmd::Show { trust_domain } => {
            let r = c.get_federation_relationship(pb::TrustDomainRequest { trust_domain }).await?.into_inner();
            out.one(&r)?;
        }
        FederationCmd::List => {
            let rs = c
                .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
                .await?
                .into_inner()
                .relationships;
            out.one(&render::relationships(&rs))?;
        }
        FederationCmd::Delete { trust_domain } => {
            let r = c.delete_federation_relationship(pb::TrustDomainRequest { trust_domain }).await?.into_inner();
            out.one(&Message {
                json: json!({"deleted": r.trust_domain}),
                text: format!(
                    "Federation relationship with {} deleted (its bundle stays until `bundle delete`)\n",
                    r.trust_domain
                ),
            })?;
        }
        FederationCmd::Refresh { trust_domain } => {
            let r = c
                .refresh_federated_bundle(pb::TrustDomainRequest { trust_domain: trust_domain.clone() })
                .await?
                .into_inner();
            let text = if r.updated {
                format!("Bundle of {trust_domain} updated to sequence {}\n", r.sequence_number)
            } else {
                format!("Bundle of {trust_domain} unchanged (sequence {})\n", r.sequence_number)
            };
            out.one(&Message {
                json: json!({"trust_domain": trust_domain, "updated": r.updated, "sequence_number": r.sequence_number}),
                text,
            })?;
        }
    }
    Ok(())
}

async fn bundle(c: &mut Client, out: &Printer, cmd: BundleCmd) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Show { format } => {
            let b = bundle_from_pb_unchecked(&c.get_bundle(pb::GetBundleRequest {}).await?.into_inner())?;
            let text = render_bundle(&b, format)?;
            out.one(&Message { json: json!({"trust_domain": b.trust_domain.to_string(), "bundle": text}), text })?;
        }
        BundleCmd::List { format } => {
            let bundles = c.list_federated_bundles(pb::ListFederatedBundlesRequest {}).await?.into_inner().bundles;
            let mut rows = Vec::new();
            let mut text = String::new();
            for pbb in &bundles {
                let b = bundle_from_pb_unchecked(pbb)?;
                let r = render_bundle(&b, format)?;
                text.push_str(&format!(
                    "****************************************\n* {}\n****************************************\n{r}\n",
                    b.trust_domain
                ));
                rows.push(json!({"trust_domain": b.trust_domain.to_string(), "bundle": r}));
            }
            out.one(&Message { json: json!({"bundles": rows}), text })?;
        }
        BundleCmd::Set { id, path, format } => {
            let td = tessera_identity::ids::parse_trust_domain(&id)?;
            let b = read_bundle(td, path.as_deref(), format)?;
            let set = c.set_federated_bundle(bundle_to_pb(&b)).await?.into_inner();
            out.one(&Message {
                json: json!({"trust_domain": set.trust_domain}),
                text: format!("Bundle set for {}\n", set.trust_domain),
            })?;
        }
        BundleCmd::Delete { id } => {
            c.delete_federated_bundle(pb::TrustDomainRequest { trust_domain: id.clone() }).await?;
            out.one(&Message { json: json!({"deleted": id}), text: format!("Bundle deleted for {id}\n") })?;
        }
    }
    Ok(())
}

async fn x509_mint(
    c: &mut Client,
    out: &Printer,
    spiffe_id: String,
    ttl: Option<String>,
    dns: Vec<String>,
    write: Option<PathBuf>,
) -> anyhow::Result<()> {
    let id = tessera_identity::ids::parse_spiffe_id(&spiffe_id)?;
    let key = PrivateKey::generate_ec_p256()?;
    let csr = tessera_identity::csr::build_csr(&id, &dns, &key)?;
    let r = c
        .mint_x509_svid(pb::MintX509SvidRequest { spiffe_id, csr, ttl: opt_ttl(&ttl)?, dns_names: dns })
        .await?
        .into_inner();
    let svid = r.svid.ok_or_else(|| anyhow!("server returned no SVID"))?;
    let chain_pem = tessera_identity::pem::encode_certs(svid.cert_chain.iter().map(Vec::as_slice));
    let bundle_pem = tessera_identity::pem::encode_certs(r.bundle.iter().map(Vec::as_slice));
    match write {
        Some(dir) => {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            tessera_plugins::fsutil::atomic_write(&dir.join("svid.pem"), chain_pem.as_bytes(), 0o644)?;
            tessera_plugins::fsutil::atomic_write(&dir.join("key.pem"), key.to_pem().as_bytes(), 0o600)?;
            tessera_plugins::fsutil::atomic_write(&dir.join("bundle.pem"), bundle_pem.as_bytes(), 0o644)?;
            out.one(&Message {
                json: json!({"spiffe_id": svid.spiffe_id, "expires_at": svid.expires_at, "dir": dir.display().to_string()}),
                text: format!(
                    "X509-SVID for {} (expires at {}) written to {}: svid.pem, key.pem, bundle.pem\n",
                    svid.spiffe_id,
                    svid.expires_at,
                    dir.display()
                ),
            })?;
        }
        None => {
            // The key is printed only because the operator asked for it on this terminal; it
            // was made here and never sent.
            let key_pem = key.to_pem();
            out.one(&Message {
                json: json!({"spiffe_id": svid.spiffe_id, "expires_at": svid.expires_at, "svid": chain_pem, "key": key_pem.as_str(), "bundle": bundle_pem}),
                text: format!("X509-SVID:\n{chain_pem}\nPrivate key:\n{}\nRoot CAs:\n{bundle_pem}", key_pem.as_str()),
            })?;
        }
    }
    Ok(())
}

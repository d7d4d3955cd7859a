//! The read-only web console (`[console] address`): server-rendered HTML, no JavaScript, no
//! build step. Views: overview (health and doctor findings), CA timeline, bundles, agents,
//! entries (search), audit tail (filters). Every view reads what the Admin API reads.
//!
//! Access: on a loopback address, plain HTTP for whoever can reach loopback on this host. On
//! any other address, TLS with the server's SVID and a client certificate that verifies to our
//! bundle and whose SPIFFE ID is in `[console] admin_ids`; a handshake without one fails.
//! Only GET and HEAD: any other method is 405, and nothing here changes state.
//!
//! What it is not: no writes, no sessions, no cookies, no scripts (the pages' Content Security
//! Policy forbids them).

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tessera_identity::{SpiffeId, unix_now};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::doctor::Diagnostics;

/// `[console]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// Who may use it over TLS (a non-loopback address).
    pub admin_ids: Vec<SpiffeId>,
}

/// Most connections at once.
const MAX_CONNECTIONS: usize = 64;
/// Rows a table shows at most.
const MAX_ROWS: usize = 500;

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Unix seconds as an ISO-8601 UTC time (the raw value in `data-unix`).
fn when(t: i64) -> String {
    if t == 0 {
        return "—".into();
    }
    let Ok(d) = time::OffsetDateTime::from_unix_timestamp(t) else { return t.to_string() };
    format!(
        "<time data-unix=\"{t}\">{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z</time>",
        d.year(),
        u8::from(d.month()),
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

fn page(title: &str, active: &str, body: &str) -> String {
    let nav = [
        ("/", "Overview"),
        ("/ca", "CA"),
        ("/bundles", "Bundles"),
        ("/agents", "Agents"),
        ("/entries", "Entries"),
        ("/audit", "Audit"),
    ]
    .iter()
    .map(|(href, name)| {
        let cls = if *href == active { " class=\"on\"" } else { "" };
        format!("<a href=\"{href}\"{cls}>{name}</a>")
    })
    .collect::<String>();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · Tessera</title>\
<meta name=\"viewport\" content=\"width=device-width\"><style>{CSS}</style></head>\
<body><header><b>Tessera</b><nav>{nav}</nav></header><main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title)
    )
}

const CSS: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1d2330}header{background:#1d2330;color:#fff;padding:8px 16px;display:flex;gap:24px;align-items:center}\
nav a{color:#cfd6e6;margin-right:14px;text-decoration:none}nav a.on{color:#fff;border-bottom:2px solid #6ea8fe}main{padding:8px 16px}\
table{border-collapse:collapse;margin:8px 0}td,th{border-bottom:1px solid #e3e6ee;padding:4px 10px;text-align:left;vertical-align:top}\
th{background:#f4f6fa}code{font-size:12px}.error{color:#b00020}.warning{color:#a15c00}.info{color:#555}.ok{color:#17803d}\
form{margin:8px 0}input{margin-right:8px}svg text{font-size:11px}";

fn table(headers: &[&str], rows: &[Vec<String>], id: &str) -> String {
    let mut s = format!("<table id=\"{id}\">");
    if headers.iter().any(|h| !h.is_empty()) {
        s.push_str("<thead><tr>");
        for h in headers {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s.push_str("</tr></thead>");
    }
    s.push_str("<tbody>");
    for r in rows.iter().take(MAX_ROWS) {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    if rows.len() > MAX_ROWS {
        let _ = write!(s, "<p>{} more not shown: narrow the search.</p>", rows.len() - MAX_ROWS);
    }
    s
}

/// The query string's value of `key`, percent-decoded.
fn query(req: &Request<Incoming>, key: &str) -> String {
    let q = req.uri().query().unwrap_or_default();
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return decode(v);
        }
    }
    String::new()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The views.
#[derive(Debug)]
pub struct Console {
    d: Arc<Diagnostics>,
}

impl Console {
    /// A console over what doctor reads.
    pub fn new(d: Arc<Diagnostics>) -> Self {
        Self { d }
    }

    async fn overview(&self) -> String {
        let info = self.d.info().await;
        let report = self.d.doctor().await;
        let health = if report.exit_code() == 0 {
            "<span class=\"ok\" id=\"health\">healthy</span>".to_owned()
        } else {
            "<span class=\"error\" id=\"health\">unhealthy</span>".to_owned()
        };
        let facts = vec![
            vec!["Trust domain".into(), format!("<code id=\"trust-domain\">{}</code>", esc(&info.trust_domain))],
            vec!["Instance".into(), esc(&info.instance_id)],
            vec!["Version".into(), esc(&info.version)],
            vec!["Uptime".into(), format!("{} s", info.uptime_seconds)],
            vec!["Health".into(), health],
            vec![
                "Agents".into(),
                format!("<span id=\"agents\">{}</span> ({} banned)", info.agents, info.banned_agents),
            ],
            vec!["Entries".into(), format!("<span id=\"entries\">{}</span>", info.entries)],
            vec!["Federated bundles".into(), info.federated_bundles.to_string()],
            vec!["Bundle sequence".into(), info.bundle_sequence.to_string()],
        ];
        let rows: Vec<Vec<String>> = report
            .findings
            .iter()
            .map(|f| {
                vec![
                    format!("<span class=\"{s}\">{s}</span>", s = f.severity.as_str()),
                    format!("<code>{}</code>", esc(&f.code)),
                    esc(&f.subject),
                    esc(&f.message),
                    esc(&f.fix),
                ]
            })
            .collect();
        let findings = if rows.is_empty() {
            "<p id=\"findings\">No findings.</p>".to_owned()
        } else {
            table(&["Severity", "Code", "Subject", "Message", "Fix"], &rows, "findings")
        };
        page("Overview", "/", &format!("{}<h2>Doctor</h2>{findings}", table(&["", ""], &facts, "facts")))
    }

    async fn ca(&self) -> String {
        let now = self.d.ca.clock().now();
        let auths = self.d.ca.x509_authorities();
        let own: Vec<Vec<u8>> = auths.iter().map(|a| a.certificate.clone()).collect();
        // Bars: our authorities, then the upstream roots in the bundle.
        let mut bars: Vec<(String, String, i64, i64)> = auths
            .iter()
            .map(|a| {
                (
                    a.authority_id.clone(),
                    format!("{}{}", a.status, if a.tainted { ", tainted" } else { "" }),
                    a.issued_at,
                    a.expires_at,
                )
            })
            .collect();
        for r in self.d.ca.bundle().x509_authorities.iter().filter(|c| !own.iter().any(|o| o.as_slice() == c.as_ref()))
        {
            if let Ok(f) = tessera_identity::x509::cert_facts(r) {
                bars.push((f.subject_key_id.unwrap_or(f.serial), "upstream root".into(), f.not_before, f.not_after));
            }
        }
        let lo = bars.iter().map(|b| b.2).min().unwrap_or(now).min(now);
        let hi = bars.iter().map(|b| b.3).max().unwrap_or(now).max(now + 1);
        let (w, left, row) = (900.0, 170.0, 22.0);
        let x = |t: i64| left + (w - left) * ((t - lo) as f64 / (hi - lo) as f64);
        let mut svg = format!(
            "<svg id=\"timeline\" width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"CA timeline\">",
            row * (bars.len() as f64 + 2.5)
        );
        for (i, (id, status, from, to)) in bars.iter().enumerate() {
            let y = row * i as f64 + 4.0;
            let color = match status.as_str() {
                "active" => "#2f6fdf",
                "prepared" => "#7fb0ff",
                "upstream root" => "#8a6d3b",
                _ => "#b8bec9",
            };
            let _ = write!(
                svg,
                "<text x=\"0\" y=\"{ty}\">{label}</text><rect x=\"{x0:.1}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{h}\" fill=\"{color}\"><title>{id} {status}</title></rect>",
                ty = y + 13.0,
                label = esc(&format!("{} {}", &id[..id.len().min(12)], status)),
                x0 = x(*from),
                bw = (x(*to) - x(*from)).max(1.0),
                h = row - 6.0,
                id = esc(id),
                status = esc(status),
            );
        }
        let nx = x(now);
        let axis_y = row * bars.len() as f64 + 16.0;
        let day = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map(|d| {
                    format!(
                        "{:04}-{:02}-{:02} {:02}:{:02}",
                        d.year(),
                        u8::from(d.month()),
                        d.day(),
                        d.hour(),
                        d.minute()
                    )
                })
                .unwrap_or_default()
        };
        let _ = write!(
            svg,
            "<line x1=\"{nx:.1}\" x2=\"{nx:.1}\" y1=\"0\" y2=\"{}\" stroke=\"#b00020\"/><text x=\"{nx:.1}\" y=\"{axis_y}\" fill=\"#b00020\">now</text>\
<text x=\"{left}\" y=\"{ay2}\">{lo_s}</text><text x=\"{w}\" y=\"{ay2}\" text-anchor=\"end\">{hi_s}</text></svg>",
            row * bars.len() as f64 + 4.0,
            ay2 = axis_y + 14.0,
            lo_s = day(lo),
            hi_s = day(hi),
        );
        let rows: Vec<Vec<String>> = bars
            .iter()
            .map(|(id, status, from, to)| {
                vec![format!("<code>{}</code>", esc(id)), esc(status), when(*from), when(*to)]
            })
            .collect();
        let mut chains = String::new();
        for (status, chain) in self.d.ca.x509_chains() {
            let _ = write!(chains, "<h3>{} authority chain</h3><ol>", esc(status));
            for c in chain {
                if let Ok(f) = tessera_identity::x509::cert_facts(&c) {
                    let _ = write!(
                        chains,
                        "<li><code>{}</code> serial <code>{}</code>, not after {}</li>",
                        esc(&f.subject_key_id.unwrap_or_default()),
                        esc(&f.serial),
                        when(f.not_after)
                    );
                }
            }
            chains.push_str("</ol>");
        }
        page(
            "CA timeline",
            "/ca",
            &format!(
                "{svg}{}{chains}",
                table(&["Authority", "State", "Not before", "Not after"], &rows, "authorities")
            ),
        )
    }

    async fn bundles(&self) -> String {
        let own = self.d.ca.bundle();
        let now = unix_now();
        let mut rows = vec![vec![
            format!("<code>{}</code>", esc(own.trust_domain.as_ref())),
            "own".into(),
            own.sequence_number.to_string(),
            own.x509_authorities.len().to_string(),
            own.jwt_authorities.len().to_string(),
            "—".into(),
            "—".into(),
        ]];
        let rels = self.d.store.list_federations().await.unwrap_or_default();
        for b in self
            .d
            .store
            .list_bundles()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b.trust_domain != own.trust_domain)
        {
            let st = self.d.federation.status(&b.trust_domain);
            let configured = rels.iter().any(|r| r.trust_domain == b.trust_domain);
            let fresh = match (&st.last_error, st.last_success) {
                (Some(e), _) => format!("<span class=\"warning\">last fetch failed: {}</span>", esc(e)),
                (None, 0) if configured => "not fetched yet".into(),
                (None, 0) => "set by an operator".into(),
                (None, t) => format!("<span class=\"ok\">{} s ago</span>", now - t),
            };
            rows.push(vec![
                format!("<code>{}</code>", esc(b.trust_domain.as_ref())),
                "federated".into(),
                b.sequence_number.to_string(),
                b.x509_authorities.len().to_string(),
                b.jwt_authorities.len().to_string(),
                when(st.last_success),
                fresh,
            ]);
        }
        // Relationships whose bundle was never stored.
        for r in rels {
            if !rows.iter().any(|row| row[0] == format!("<code>{}</code>", esc(r.trust_domain.as_ref()))) {
                let st = self.d.federation.status(&r.trust_domain);
                rows.push(vec![
                    format!("<code>{}</code>", esc(r.trust_domain.as_ref())),
                    "federated".into(),
                    "—".into(),
                    "0".into(),
                    "0".into(),
                    when(st.last_success),
                    st.last_error.map_or_else(
                        || "not fetched yet".into(),
                        |e| format!("<span class=\"warning\">last fetch failed: {}</span>", esc(&e)),
                    ),
                ]);
            }
        }
        page(
            "Bundles",
            "/bundles",
            &table(
                &["Trust domain", "Kind", "Sequence", "X.509 roots", "JWT keys", "Last refresh", "Freshness"],
                &rows,
                "bundles",
            ),
        )
    }

    async fn agents(&self) -> String {
        let mut agents = self.d.store.list_agents().await.unwrap_or_default();
        agents.sort_by_key(|a| a.spiffe_id.to_string());
        let rows: Vec<Vec<String>> = agents
            .iter()
            .map(|a| {
                vec![
                    format!("<code>{}</code>", esc(&a.spiffe_id.to_string())),
                    esc(&a.attestation_type),
                    esc(&self.d.activity.version_of(a)),
                    when(self.d.activity.last_sync(&a.spiffe_id).unwrap_or(0)),
                    format!("<code>{}</code>", esc(&a.serial)),
                    when(a.expires_at),
                    if a.banned { "<span class=\"error\">banned</span>".into() } else { "no".into() },
                ]
            })
            .collect();
        page(
            "Agents",
            "/agents",
            &table(
                &["SPIFFE ID", "Attestation", "Version", "Last sync", "SVID serial", "SVID expiry", "Banned"],
                &rows,
                "agents",
            ),
        )
    }

    async fn entries(&self, q: &str) -> String {
        let mut entries = self.d.store.list_entries().await.unwrap_or_default();
        entries.sort_by_key(|e| e.spiffe_id.to_string());
        let matches = |e: &tessera_store::Entry| {
            q.is_empty()
                || e.spiffe_id.to_string().contains(q)
                || e.parent_id.to_string().contains(q)
                || e.selectors.iter().any(|s| s.to_string().contains(q))
        };
        let rows: Vec<Vec<String>> = entries
            .iter()
            .filter(|e| matches(e))
            .map(|e| {
                vec![
                    format!("<code>{}</code>", esc(&e.id)),
                    format!("<code>{}</code>", esc(&e.spiffe_id.to_string())),
                    format!("<code>{}</code>", esc(&e.parent_id.to_string())),
                    esc(&e.selectors.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")),
                    if e.x509_svid_ttl == 0 { "default".into() } else { format!("{} s", e.x509_svid_ttl) },
                ]
            })
            .collect();
        let form = format!(
            "<form method=\"get\" action=\"/entries\"><input name=\"q\" value=\"{}\" placeholder=\"SPIFFE ID, parent or selector\" size=\"50\"><button>Search</button></form>",
            esc(q)
        );
        page(
            "Entries",
            "/entries",
            &format!(
                "{form}{}",
                table(&["Entry ID", "SPIFFE ID", "Parent", "Selectors", "X.509 TTL"], &rows, "entries")
            ),
        )
    }

    async fn audit(&self, spiffe_id: &str, caller: &str, since: &str) -> String {
        let since_ms = since.parse::<i64>().map(|s| s * 1000).unwrap_or(0);
        let mut tail: std::collections::VecDeque<tessera_store::AuditRecord> = std::collections::VecDeque::new();
        let mut next = 1;
        while let Ok(page) = self.d.store.audit_range(next, 1024).await {
            let Some(last) = page.last() else { break };
            next = last.seq + 1;
            for r in page {
                let e = &r.event;
                if (spiffe_id.is_empty() || e.spiffe_id == spiffe_id)
                    && (caller.is_empty() || e.caller == caller)
                    && e.at_ms >= since_ms
                {
                    if tail.len() == 100 {
                        tail.pop_front();
                    }
                    tail.push_back(r);
                }
            }
        }
        let rows: Vec<Vec<String>> = tail
            .iter()
            .rev()
            .map(|r| {
                let e = &r.event;
                let kind =
                    serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                vec![
                    r.seq.to_string(),
                    when(e.at_ms / 1000),
                    esc(&kind),
                    format!("<code>{}</code>", esc(&e.spiffe_id)),
                    format!("<code>{}</code>", esc(&e.serial)),
                    esc(&e.caller),
                    esc(&e.detail),
                ]
            })
            .collect();
        let form = format!(
            "<form method=\"get\" action=\"/audit\"><input name=\"spiffe_id\" value=\"{}\" placeholder=\"SPIFFE ID\" size=\"40\"><input name=\"caller\" value=\"{}\" placeholder=\"caller\" size=\"30\"><input name=\"since\" value=\"{}\" placeholder=\"since (Unix s)\" size=\"12\"><button>Filter</button></form>",
            esc(spiffe_id),
            esc(caller),
            esc(since)
        );
        page(
            "Audit log",
            "/audit",
            &format!(
                "{form}<p>The newest 100 matching records, newest first.</p>{}",
                table(&["Seq", "At", "Kind", "SPIFFE ID", "Serial", "Caller", "Detail"], &rows, "audit")
            ),
        )
    }

    async fn handle(&self, req: &Request<Incoming>, allowed: bool) -> Response<Full<Bytes>> {
        if !allowed {
            let body = page(
                "Forbidden",
                "",
                "<p>This client certificate's SPIFFE ID is not in <code>console.admin_ids</code>.</p>",
            );
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = StatusCode::FORBIDDEN;
            return with_headers(r);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = Response::new(Full::new(Bytes::from_static(b"the console is read-only: GET and HEAD only\n")));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let body = match req.uri().path() {
            "/" => self.overview().await,
            "/ca" => self.ca().await,
            "/bundles" => self.bundles().await,
            "/agents" => self.agents().await,
            "/entries" => self.entries(&query(req, "q")).await,
            "/audit" => self.audit(&query(req, "spiffe_id"), &query(req, "caller"), &query(req, "since")).await,
            _ => {
                let mut r = Response::new(Full::new(Bytes::from(page("Not found", "", "<p>No such view.</p>"))));
                *r.status_mut() = StatusCode::NOT_FOUND;
                return with_headers(r);
            }
        };
        with_headers(Response::new(Full::new(Bytes::from(body))))
    }
}

fn with_headers(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    use hyper::header::{
        CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderName, HeaderValue, X_CONTENT_TYPE_OPTIONS,
        X_FRAME_OPTIONS,
    };
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    r
}

async fn serve_conn<I>(io: I, console: Arc<Console>, allowed: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let console = console.clone();
        async move { Ok::<_, Infallible>(console.handle(&req, allowed).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = tokio::time::timeout(Duration::from_secs(300), conn)
        .await
        .map_err(|_| "open too long".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        debug!(error = %e, "Console connection ended with an error");
    }
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    cfg: ConsoleConfig,
    diagnostics: Arc<Diagnostics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let console = Arc::new(Console::new(diagnostics.clone()));
    let loopback = cfg.address.ip().is_loopback();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    info!(address = %cfg.address, tls = !loopback, "Console listening");
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let console = console.clone();
        if loopback {
            tokio::spawn(async move {
                serve_conn(tcp, console, true).await;
                drop(permit);
            });
            continue;
        }
        let tls = match crate::api::tls::tls13_config(
            &diagnostics.ca.bundle(),
            diagnostics.identity.clone(),
            true,
            b"http/1.1",
        ) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "Console TLS configuration failed");
                continue;
            }
        };
        let admins = cfg.admin_ids.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    debug!(%peer, "Console TLS handshake failed (no client certificate that verifies?)");
                    return;
                }
            };
            let id = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| tessera_identity::x509::cert_facts(c).ok())
                .and_then(|f| f.spiffe_id());
            let allowed = id.as_ref().is_some_and(|id| admins.contains(id));
            if !allowed {
                info!(%peer, "Console refused a client certificate whose SPIFFE ID is not in console.admin_ids");
            }
            serve_conn(stream, console, allowed).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded_and_html_is_escaped() {
        assert_eq!(decode("spiffe%3A%2F%2Fexample.org%2Fweb"), "spiffe://example.org/web");
        assert_eq!(decode("a+b%zz%4"), "a b%zz%4");
        assert_eq!(esc("<script>\"x\" & 'y'</script>"), "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;");
        assert_eq!(when(0), "—");
        assert!(when(1_796_098_304).contains("data-unix=\"1796098304\""));
    }
}

//! One HTTP/1.1 request to `http://` or `https://` (rustls with the caller's config), with a
//! bounded response body and a deadline. One connection per request: for control-plane calls
//! (a peer's bundle, Vault) made every few minutes, not for a data path.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// A parsed `http(s)://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https` or not.
    pub tls: bool,
    /// Host name or IP (brackets removed).
    pub host: String,
    /// Port (443/80 by default).
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
}

impl Url {
    /// Parses `url`; only `http` and `https` are accepted.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("URL {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("URL {url:?} must use http or https")),
        };
        let authority = uri.authority().ok_or_else(|| format!("URL {url:?} has no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(format!("URL {url:?} has no host"));
        }
        Ok(Self {
            tls,
            host,
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            authority: authority.as_str().to_owned(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: &str) -> Self {
        Self { path: path.to_owned(), ..self.clone() }
    }
}

/// A request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// Where.
    pub url: &'a Url,
    /// Extra headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// Body (sent with `Content-Type: application/json` when not empty).
    pub body: Vec<u8>,
}

/// How long a TCP connect may take within the deadline: two lost SYNs (retried at 1 s and
/// 3 s) still connect; a peer behind a partition (every packet dropped) is given up on, so
/// the caller's next attempt, on its own schedule, opens a fresh connection once the path is
/// back instead of waiting out the kernel's SYN backoff (7 s, 15 s, 31 s ...).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `req`; `tls` is required for `https`. Returns the status and the body, refusing
/// bodies over `limit` bytes. Errors are one line, fit for a log or a status.
pub async fn send(
    req: Request<'_>,
    tls: Option<Arc<rustls::ClientConfig>>,
    limit: usize,
    deadline: Duration,
) -> Result<(u16, Vec<u8>), String> {
    tokio::time::timeout(deadline, send_inner(req, tls, limit))
        .await
        .map_err(|_| format!("no complete answer within {}s", deadline.as_secs()))?
}

async fn send_inner(
    req: Request<'_>,
    tls: Option<Arc<rustls::ClientConfig>>,
    limit: usize,
) -> Result<(u16, Vec<u8>), String> {
    let u = req.url;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((u.host.as_str(), u.port)))
        .await
        .map_err(|_| format!("connect: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("connect: {e}"))?;
    let msg = build(&req)?;
    if u.tls {
        let cfg = tls.ok_or("an https URL needs a TLS configuration")?;
        let name = ServerName::try_from(u.host.clone()).map_err(|e| format!("host {:?}: {e}", u.host))?;
        let stream = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        exchange(TokioIo::new(stream), msg, limit).await
    } else {
        exchange(TokioIo::new(tcp), msg, limit).await
    }
}

fn build(req: &Request<'_>) -> Result<hyper::Request<Full<Bytes>>, String> {
    let mut b = hyper::Request::builder()
        .method(req.method)
        .uri(req.url.path.as_str())
        .header(hyper::header::HOST, req.url.authority.as_str())
        .header(hyper::header::USER_AGENT, "tessera");
    if !req.body.is_empty() {
        b = b.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    for (k, v) in req.headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(req.body.clone()))).map_err(|e| format!("request: {e}"))
}

async fn exchange<T>(io: T, msg: hyper::Request<Full<Bytes>>, limit: usize) -> Result<(u16, Vec<u8>), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(msg).await.map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), limit).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            format!("body is over the {limit}-byte limit")
        } else {
            format!("reading body: {e}")
        }
    });
    driver.abort();
    Ok((status, body?.to_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_paths() {
        let u = Url::parse("https://b.example").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (true, "b.example", 443, "/"));
        let u = Url::parse("http://[::1]:8200/v1/x?y=1").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (false, "::1", 8200, "/v1/x?y=1"));
        assert!(Url::parse("ftp://x").unwrap_err().contains("http"));
        assert!(Url::parse("b.example:8443").is_err());
        assert_eq!(u.with_path("/z").path, "/z");
    }

    /// A listener whose accept queue is full drops new SYNs, as a partition does: the connect
    /// is given up after CONNECT_TIMEOUT, well inside the caller's 60 s deadline.
    #[tokio::test]
    async fn a_connect_into_a_black_hole_is_given_up_on() {
        if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_abort_on_overflow").is_ok_and(|v| v.trim() != "0") {
            eprintln!("SKIPPED: tcp_abort_on_overflow is set here: a full accept queue refuses, it is no black hole");
            return;
        }
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fill the accept queue (never accepted); the next SYN is dropped.
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                held.push(c);
            }
        }
        let url = Url::parse(&format!("http://{addr}/")).unwrap();
        let req = Request { method: "GET", url: &url, headers: &[], body: Vec::new() };
        let started = std::time::Instant::now();
        let err = send(req, None, 1024, Duration::from_secs(60)).await.unwrap_err();
        assert_eq!(err, "connect: no answer within 5s");
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        drop((held, listener));
    }
}

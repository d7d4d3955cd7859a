//! gRPC channels: over a Unix socket, and over TCP with TLS terminated by tokio-rustls (so the
//! caller's rustls config decides who the server must be).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};

/// A channel to a gRPC server on the Unix socket at `path`.
pub async fn unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// A channel to `addr` (`host:port`) over TLS with `tls`. The TLS server name sent is
/// `tessera-server`; SPIFFE verifiers ignore it and check the URI SAN instead.
pub async fn tls(addr: &str, tls: rustls::ClientConfig) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let target = addr.to_owned();
    Endpoint::from_static("http://tessera-server")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = TcpStream::connect(target.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::try_from("tessera-server").map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
}

//! A client of the Admin API on the server's local socket, for the CLI, the bench tools and
//! the tests.

use std::path::Path;

use tessera_proto::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

/// Why the admin socket could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the admin socket {path}")]
pub struct ConnectError {
    path: String,
    #[source]
    source: tonic::transport::Error,
}

/// Connects an Admin API client to the server's Unix socket.
pub async fn connect_admin(socket: &Path) -> Result<AdminClient<Channel>, ConnectError> {
    let channel = tessera_svc::connect::unix(socket)
        .await
        .map_err(|source| ConnectError { path: socket.display().to_string(), source })?;
    Ok(AdminClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

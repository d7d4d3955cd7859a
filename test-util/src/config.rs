//! The one server configuration template of the test suite: loopback, ephemeral ports, the
//! admin socket and the data directory in the test's own directory. The end-to-end tests
//! (`tessera-server` as a process) and the in-process tests render it with different key
//! managers and log levels; a test edits the text for what it checks.

use std::path::Path;

/// A `server.toml` for a test.
#[derive(Debug, Clone)]
pub struct ServerToml<'a> {
    /// The trust domain.
    pub td: &'a str,
    /// Holds `admin.sock` and the data directory.
    pub dir: &'a Path,
    /// The data directory's name under `dir`.
    pub data: &'a str,
    /// The `[ca]` body.
    pub ca: &'a str,
    /// Extra lines of `[server]`.
    pub server: &'a str,
    /// `disk` (a restarted process keeps its CA) or `memory`.
    pub key_manager: &'a str,
    /// `log_level`.
    pub log_level: &'a str,
}

impl<'a> ServerToml<'a> {
    /// For the binary: trust domain `example.org`, `disk` keys, `info` logs, data in `dir/data`.
    pub fn new(dir: &'a Path, ca: &'a str) -> Self {
        Self { td: "example.org", dir, data: "data", ca, server: "", key_manager: "disk", log_level: "info" }
    }

    /// For a server in the test's process: `memory` keys and `warn` logs.
    pub fn in_process(dir: &'a Path, ca: &'a str) -> Self {
        Self { key_manager: "memory", log_level: "warn", ..Self::new(dir, ca) }
    }

    /// The file's text. It ends with `[store]`, so a test appends whole sections.
    pub fn render(&self) -> String {
        let server = if self.server.is_empty() { String::new() } else { format!("{}\n", self.server.trim_end()) };
        format!(
            r#"trust_domain = "{td}"
data_dir = "{data}"
log_level = "{log}"
[server]
agent_api_address = "127.0.0.1:0"
health_address = "127.0.0.1:0"
admin_socket = "{sock}"
{server}[ca]
{ca}
[key_manager]
type = "{km}"
[store]
type = "sled"
"#,
            td = self.td,
            data = self.dir.join(self.data).display(),
            log = self.log_level,
            sock = self.dir.join("admin.sock").display(),
            ca = self.ca,
            km = self.key_manager,
        )
    }
}

/// A server config for `dir`: loopback, ephemeral ports, disk key manager.
pub fn server_config(dir: &Path, ca: &str) -> String {
    server_config_for("example.org", dir, ca)
}

/// The same for trust domain `td`.
pub fn server_config_for(td: &str, dir: &Path, ca: &str) -> String {
    ServerToml { td, ..ServerToml::new(dir, ca) }.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_a_valid_server_config_for_both_uses() {
        let dir = Path::new("/tmp/t");
        for text in [
            server_config(dir, "ca_ttl = \"24h\""),
            ServerToml { server: "instance_id = \"a\"", ..ServerToml::in_process(dir, "ca_ttl = \"24h\"") }.render(),
        ] {
            let cfg = tessera_server::config::Config::from_toml(&text);
            assert!(cfg.is_ok(), "{text}\n{:?}", cfg.err());
        }
    }
}

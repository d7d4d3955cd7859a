//! The `[key_manager] type = "pkcs11"` section: its keys ([`RawPkcs11Settings`]), checked into
//! [`Pkcs11Settings`] when the configuration is parsed (the PIN named by its source), and
//! turned into a [`Pkcs11Config`] when the server starts (the PIN read then).

use std::path::PathBuf;

use serde::Deserialize;
use tessera_plugins::{SecretError, SecretSource};
use tessera_svc::config::{ConfigError, invalid};

use crate::Pkcs11Config;

/// The section's keys, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPkcs11Settings {
    module_path: Option<PathBuf>,
    token_label: Option<String>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    key_label_prefix: Option<String>,
}

/// Every key of the section (besides `type`), without the `key_manager.` prefix.
pub const KEYS: &[&str] = &["module_path", "token_label", "pin_file", "pin_env", "key_label_prefix"];

/// A checked `pkcs11` section: the PIN named by its source, not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module.
    pub module_path: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The user PIN's source.
    pub pin: SecretSource,
    /// Key labels are `<prefix><slot>`.
    pub key_label_prefix: String,
}

impl TryFrom<RawPkcs11Settings> for Pkcs11Settings {
    type Error = ConfigError;

    fn try_from(k: RawPkcs11Settings) -> Result<Self, ConfigError> {
        let pin = match (k.pin_file, k.pin_env) {
            (Some(f), None) => SecretSource::File(f),
            (None, Some(e)) => SecretSource::Env(e),
            _ => {
                return Err(invalid(
                    "key_manager.pin_file",
                    "type \"pkcs11\" needs exactly one of pin_file and pin_env",
                ));
            }
        };
        Ok(Self {
            module_path: k.module_path.ok_or(ConfigError::Missing("key_manager.module_path"))?,
            token_label: k.token_label.ok_or(ConfigError::Missing("key_manager.token_label"))?,
            pin,
            key_label_prefix: k.key_label_prefix.unwrap_or_else(|| "tessera-".into()),
        })
    }
}

impl Pkcs11Settings {
    /// What the key manager opens with: the PIN read from its source now.
    pub fn into_config(self) -> Result<Pkcs11Config, SecretError> {
        Ok(Pkcs11Config {
            module_path: self.module_path,
            token_label: self.token_label,
            pin: self.pin.read("HSM PIN")?,
            key_label_prefix: self.key_label_prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Result<Pkcs11Settings, ConfigError> {
        Pkcs11Settings::try_from(tessera_svc::config::from_toml::<RawPkcs11Settings>(text)?)
    }

    #[test]
    fn the_pin_has_exactly_one_source_and_the_prefix_a_default() {
        let s = raw("module_path = \"/m.so\"\ntoken_label = \"t\"\npin_env = \"PIN\"\n");
        assert!(matches!(&s, Ok(p) if p.pin == SecretSource::Env("PIN".into()) && p.key_label_prefix == "tessera-"));
        let both = raw("module_path = \"/m.so\"\ntoken_label = \"t\"\npin_env = \"P\"\npin_file = \"/p\"\n");
        assert!(matches!(both, Err(ConfigError::Invalid { key: "key_manager.pin_file", .. })));
        assert!(matches!(
            raw("token_label = \"t\"\npin_env = \"P\"\n"),
            Err(ConfigError::Missing("key_manager.module_path"))
        ));
        assert!(matches!(raw("module_path = \"/m.so\"\nslot = 1\n"), Err(ConfigError::Toml(_))));
    }
}

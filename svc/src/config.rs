//! What every Tessera configuration file shares: one error type ([`ConfigError`]) and one
//! duration syntax ([`duration`]). Each subsystem parses its own section into its own types;
//! none of them reads the environment while parsing (secrets named by an environment
//! variable are read when the subsystem starts).

use std::time::Duration;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not TOML, an unknown key, or a wrong type.
    #[error("{0}")]
    Toml(String),
    /// A required key is missing.
    #[error("missing required key `{0}`")]
    Missing(&'static str),
    /// A value is malformed or out of range.
    #[error("invalid `{key}`: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// An invalid value of `key`.
pub fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// TOML text into `T` (which refuses unknown keys with `deny_unknown_fields`).
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string().trim_end().to_owned()))
}

/// A duration as Tessera's files write them (`90s`, `5m`, `1h30m`, `48h`, `500ms`: the
/// `humantime` syntax), at least `min`. Zero is never a valid duration.
pub fn duration(key: &'static str, s: &str, min: Duration) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s).map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    if d < min {
        return Err(invalid(key, format!("{s:?}: must be at least {}", humantime::format_duration(min))));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_duration_syntax_with_a_floor() {
        assert_eq!(duration("k", "1h30m", Duration::ZERO).unwrap(), Duration::from_secs(5400));
        assert_eq!(duration("k", "500ms", Duration::from_millis(100)).unwrap(), Duration::from_millis(500));
        let e = duration("k", "0s", Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains("`k`") && e.contains("greater than zero"), "{e}");
        let e = duration("k", "50ms", Duration::from_millis(100)).unwrap_err().to_string();
        assert!(e.contains("at least 100ms"), "{e}");
        assert!(duration("k", "soon", Duration::ZERO).unwrap_err().to_string().contains("\"soon\""));
    }
}

//! Serde as strings for always-valid types (`SpiffeId`, `TrustDomain`, `Selector`): written
//! with `Display`, read back through `FromStr`, so a stored value is re-validated on load.
//! Use with `#[serde(with = "tessera_identity::serde_str")]` or `serde_str::vec`.

use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serializer, de::Error};

/// Serializes with `Display`.
pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Deserializes with `FromStr`.
pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: Display,
    D: Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(D::Error::custom)
}

/// The same for `Vec<T>`.
pub mod vec {
    use super::*;

    /// Serializes each element with `Display`.
    pub fn serialize<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    /// Deserializes each element with `FromStr`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let v = Vec::<String>::deserialize(d)?;
        v.iter().map(|s| s.parse().map_err(D::Error::custom)).collect()
    }
}

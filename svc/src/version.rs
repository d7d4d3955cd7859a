//! Versions and the version-skew policy between agents and servers (docs/upgrading.md), taken
//! from SPIRE's: an agent may be as new as the server it talks to and at most one minor
//! release older, within the same major release. Patch releases never matter.

use std::fmt;

/// This build's version (both binaries share the workspace version).
pub const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// A release version, `major.minor.patch` (a pre-release or build suffix is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Patch.
    pub patch: u64,
}

/// A version string that is not `major.minor.patch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a version (major.minor.patch)")]
pub struct BadVersion(pub String);

impl std::str::FromStr for Version {
    type Err = BadVersion;

    fn from_str(s: &str) -> Result<Self, BadVersion> {
        let core = s.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.').map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) => Ok(Self { major, minor, patch }),
            _ => Err(BadVersion(s.to_owned())),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// This build's version.
    pub fn current() -> Self {
        CURRENT.parse().unwrap_or(Self { major: 0, minor: 0, patch: 0 })
    }
}

/// Why an agent is outside the policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skew {
    /// Newer than the server.
    #[error("agent {agent} is newer than server {server}: upgrade every server before the agents (docs/upgrading.md)")]
    AgentNewer {
        /// The agent's version.
        agent: Version,
        /// The server's.
        server: Version,
    },
    /// More than one minor release older (or another major).
    #[error(
        "agent {agent} is more than one minor release older than server {server}: upgrade the agent to {server_major}.{min_minor} or later (docs/upgrading.md)"
    )]
    AgentTooOld {
        /// The agent's version.
        agent: Version,
        /// The server's.
        server: Version,
        /// The server's major.
        server_major: u64,
        /// The oldest minor allowed.
        min_minor: u64,
    },
    /// Not a version at all.
    #[error("agent version {0:?} is not a version (major.minor.patch)")]
    Unparsable(String),
}

/// Whether an agent reporting `agent` may talk to server `server`. An agent that reports no
/// version (built before agents sent one) is let through: nothing is known about it.
pub fn check_agent(agent: &str, server: Version) -> Result<(), Skew> {
    if agent.is_empty() {
        return Ok(());
    }
    let a: Version = agent.parse().map_err(|_| Skew::Unparsable(agent.to_owned()))?;
    if (a.major, a.minor) > (server.major, server.minor) {
        return Err(Skew::AgentNewer { agent: a, server });
    }
    let min_minor = server.minor.saturating_sub(1);
    if a.major != server.major || a.minor < min_minor {
        return Err(Skew::AgentTooOld { agent: a, server, server_major: server.major, min_minor });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn the_skew_policy_is_spires() {
        let server = v("1.5.2");
        for ok in ["1.5.0", "1.5.9", "1.4.0", "1.4.7", "", "1.5.2-rc.1"] {
            assert_eq!(check_agent(ok, server), Ok(()), "{ok}");
        }
        assert!(matches!(check_agent("1.6.0", server), Err(Skew::AgentNewer { .. })));
        assert!(matches!(check_agent("2.0.0", server), Err(Skew::AgentNewer { .. })));
        let e = check_agent("1.3.9", server).unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent 1.3.9 is more than one minor release older than server 1.5.2: upgrade the agent to 1.4 or later (docs/upgrading.md)"
        );
        assert!(matches!(check_agent("0.9.0", server), Err(Skew::AgentTooOld { .. })));
        assert_eq!(check_agent("one", server), Err(Skew::Unparsable("one".into())));
        // At x.0, the previous minor does not exist: only the same minor.
        assert!(check_agent("1.0.3", v("1.0.0")).is_ok());
        assert!(matches!(check_agent("0.9.0", v("1.0.0")), Err(Skew::AgentTooOld { .. })));
        assert!("1.2".parse::<Version>().is_err() && "1.2.3.4".parse::<Version>().is_err());
    }
}

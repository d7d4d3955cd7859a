//! `tessera-agent`: the node agent. Not built yet: the agent issue fills this crate (SVID
//! cache and rotation, SPIFFE Workload API, Envoy SDS, cert files). Until then the binary says
//! so and exits non-zero, so nothing mistakes it for a working agent.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!("Error: tessera-agent is not built yet (see the README's status section)");
    std::process::ExitCode::from(2)
}

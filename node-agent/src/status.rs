//! Where the agent's errors become gRPC statuses for the workloads it serves (Workload API,
//! SDS): here and only here. A workload sees the code and our own words; the detail of a
//! connection, file or key failure goes to the agent's log.

use tonic::Status;
use tracing::warn;

use crate::manager::AgentError;
use tessera_agent_api::ClientError;

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Self {
        match e {
            // The server's refusal, in the server's words (which it keeps free of detail).
            AgentError::Client(ClientError::Refused { code, message, .. }) => Status::new(code, message),
            AgentError::Client(e @ (ClientError::Connect { .. } | ClientError::Timeout(_))) => {
                warn!(error = %e, "Cannot reach the server for a workload request");
                Status::unavailable("the Tessera server cannot be reached; retry")
            }
            AgentError::JwtBudget(_) => Status::resource_exhausted(e.to_string()),
            e @ (AgentError::Attestation(_) | AgentError::Client(ClientError::Evicted { .. })) => {
                warn!(error = %e, "A workload request needs the server, and the agent is not attested");
                Status::unavailable("the agent is not attested to the server; retry")
            }
            other => {
                warn!(error = %other, "Internal error serving a workload");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_sees_our_words_not_the_detail() {
        let s = Status::from(AgentError::Client(ClientError::Connect {
            addr: "10.1.2.3:8081".into(),
            reason: "connection refused".into(),
        }));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(!s.message().contains("10.1.2.3"), "{}", s.message());
        let s = Status::from(AgentError::Client(ClientError::State {
            path: "/var/lib/tessera/agent-key.pem".into(),
            reason: "permission denied".into(),
        }));
        assert_eq!((s.code(), s.message()), (tonic::Code::Internal, "internal error"));
        // The server's refusal passes through with its code.
        let s = Status::from(AgentError::Client(ClientError::Refused {
            call: "NewJwtSvid",
            code: tonic::Code::PermissionDenied,
            message: "not authorized".into(),
        }));
        assert_eq!((s.code(), s.message()), (tonic::Code::PermissionDenied, "not authorized"));
    }
}

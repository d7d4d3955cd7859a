//! The CLI side of `doctor`, `validate` and `debug`: the checks only the caller can make (the
//! config file, the admin socket's mode), the question to the agent's admin socket, and the
//! text renderings of its answers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;
use tessera_svc::doctor::{Finding, Problem, Report, Severity, could_not_run};

use crate::config::Config;

fn config_problems(path: &Path) -> (Option<Config>, Vec<Problem>) {
    match Config::load(path) {
        Ok(cfg) => {
            let p = cfg.file_problems().into_iter().map(|(key, message)| Problem { key, message }).collect();
            (Some(cfg), p)
        }
        Err(e) => (None, vec![tessera_svc::doctor::parse_problem(&e)]),
    }
}

/// `tessera-agent validate --config F`.
pub fn validate(config: &Path, json: bool) -> ExitCode {
    let (_, problems) = config_problems(config);
    tessera_svc::doctor::print_validation(config, &problems, json)
}

/// `tessera-agent doctor`.
pub async fn doctor(socket: PathBuf, socket_explicit: bool, config: Option<PathBuf>, json: bool) -> ExitCode {
    let mut findings = Vec::new();
    let mut socket = socket;
    if let Some(path) = &config {
        let (cfg, problems) = config_problems(path);
        findings.extend(tessera_svc::doctor::config_findings(path, problems, "tessera-agent"));
        if let Some(cfg) = cfg
            && !socket_explicit
        {
            socket = cfg.admin_socket_path;
        }
    }
    if let Ok(m) = std::fs::metadata(&socket) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            findings.push(Finding::new(
                "socket-permissions",
                Severity::Warning,
                socket.display().to_string(),
                format!("the admin socket has mode {mode:03o}: other users can read the agent's state"),
                "restart the agent (it creates the socket 0600)",
            ));
        }
    }
    let answer = match crate::admin::ask(&socket, "doctor").await {
        Ok(v) => v,
        Err(e) => return could_not_run(&format!("cannot ask the agent at {}: {e}", socket.display()), findings, json),
    };
    match serde_json::from_value::<Report>(answer) {
        Ok(r) => findings.extend(r.findings),
        Err(e) => return could_not_run(&format!("the agent's answer is not a report: {e}"), findings, json),
    }
    tessera_svc::doctor::finish(&Report::new(findings), json)
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

/// `debug info` as text.
pub fn info_text(v: &Value) -> String {
    let c = v.get("counts").cloned().unwrap_or_default();
    let mut out = format!(
        "Version:            {}\nAgent ID:           {}\nTrust domain:       {}\nServers:            {}\nUptime:             {}s\nLast sync:          {}\nLast sync error:    {}\nClock skew (ms):    {}\nBundle sequence:    {}\nEntries:            {}\nX509-SVIDs cached:  {}\nJWT-SVIDs cached:   {}\nFederated bundles:  {}\nSDS streams:        {}\nWorkload API streams: {}\n",
        s(v, "version"),
        s(v, "agent_id"),
        s(v, "trust_domain"),
        v.get("servers")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        s(v, "uptime_seconds"),
        s(v, "last_sync"),
        s(v, "last_sync_error"),
        s(v, "clock_skew_ms"),
        s(v, "bundle_sequence"),
        s(&c, "entries"),
        s(&c, "x509_svids"),
        s(&c, "jwt_svids"),
        s(&c, "federated_bundles"),
        s(&c, "sds_streams"),
        s(&c, "workload_api_streams"),
    );
    for cert in v.get("svid_chain").and_then(Value::as_array).into_iter().flatten() {
        out.push_str(&format!(
            "SVID chain:         {} serial {} not after {}\n",
            s(cert, "spiffe_id"),
            s(cert, "serial"),
            s(cert, "not_after")
        ));
    }
    out
}

/// `debug sds` as text: one block per stream, one line per resource.
pub fn sds_text(v: &Value) -> String {
    let streams: Vec<&Value> = v.get("streams").and_then(Value::as_array).into_iter().flatten().collect();
    let mut out = format!("{} open SDS stream(s)\n", streams.len());
    for st in streams {
        out.push_str(&format!(
            "\nstream {} ({}) pid {} uid {} ids [{}]\n  names: {}\n  sent: version {} nonce {} at {}\n",
            s(st, "stream"),
            s(st, "api"),
            s(st, "pid"),
            s(st, "uid"),
            st.get("spiffe_ids")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            st.get("resource_names")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            s(st, "version"),
            s(st, "nonce"),
            s(st, "sent_at"),
        ));
        if let Some(a) = st.get("last_ack").filter(|a| !a.is_null()) {
            out.push_str(&format!("  last ACK: nonce {} at {}\n", s(a, "nonce"), s(a, "at")));
        }
        if let Some(n) = st.get("last_nack").filter(|a| !a.is_null()) {
            out.push_str(&format!("  last NACK: nonce {} at {}: {}\n", s(n, "nonce"), s(n, "at"), s(n, "error")));
        }
        for (name, r) in st.get("resources").and_then(Value::as_object).into_iter().flatten() {
            if r.get("serial").is_some() {
                out.push_str(&format!(
                    "  {name:<30} {} {} serial {} not after {}\n",
                    s(r, "kind"),
                    s(r, "spiffe_id"),
                    s(r, "serial"),
                    s(r, "not_after")
                ));
            } else {
                let tds = r
                    .get("trust_domains")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                out.push_str(&format!("  {name:<30} {} trust domains [{tds}]\n", s(r, "kind")));
            }
        }
    }
    out
}

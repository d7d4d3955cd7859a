//! The verbs whose exit status carries the answer: `doctor` (0 healthy, 1 findings, 2 could
//! not run) and `validate` (0 valid, 1 problems). Both print in text or JSON.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tessera_proto::admin::v1 as pb;
use tessera_server::config::Config;
use tessera_svc::doctor::{Finding, Problem, Report, Severity, could_not_run};

/// What `validate` and `doctor --config` find in a config file: the parse error (the parse
/// stops at the first one), or every problem with the files and settings it names.
fn config_problems(path: &Path) -> (Option<Config>, Vec<Problem>) {
    match Config::load_with(path, None, &|name| std::env::var(name).ok()) {
        Ok(cfg) => {
            let p = tessera_server::validate::check(&cfg);
            (Some(cfg), p)
        }
        Err(e) => (None, vec![tessera_svc::doctor::parse_problem(&e)]),
    }
}

/// `tessera-server validate --config F`.
pub fn validate(config: &Path, json: bool) -> ExitCode {
    let (_, problems) = config_problems(config);
    tessera_svc::doctor::print_validation(config, &problems, json)
}

/// The admin socket's file mode and directory: only the server's user may connect.
fn socket_findings(socket: &Path, out: &mut Vec<Finding>) {
    let Ok(m) = std::fs::metadata(socket) else { return };
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        out.push(Finding::new(
            "socket-permissions",
            Severity::Warning,
            socket.display().to_string(),
            format!("the admin socket has mode {mode:03o}: other users can reach the Admin API"),
            "restart the server (it creates the socket 0600), and make sure nothing changes its mode",
        ));
    }
    if let Some(dir) = socket.parent()
        && let Ok(d) = std::fs::metadata(dir)
    {
        let dmode = d.permissions().mode();
        if dmode & 0o002 != 0 && dmode & 0o1000 == 0 {
            out.push(Finding::new(
                "socket-permissions",
                Severity::Warning,
                dir.display().to_string(),
                format!("the admin socket's directory has mode {:03o}: anyone can replace the socket", dmode & 0o777),
                "make the directory writable only by the server's user (0700)",
            ));
        }
    }
    // /proc/self belongs to the effective user.
    let me = std::fs::metadata("/proc/self").map(|p| p.uid()).unwrap_or(0);
    if me != 0 && m.uid() != me {
        out.push(Finding::new(
            "socket-permissions",
            Severity::Warning,
            socket.display().to_string(),
            format!("the admin socket belongs to uid {}, not to this user (uid {me})", m.uid()),
            "run doctor as the server's user or as root",
        ));
    }
}

/// `tessera-server doctor`.
pub async fn doctor(socket: PathBuf, socket_explicit: bool, config: Option<PathBuf>, json: bool) -> ExitCode {
    let mut findings = Vec::new();
    let mut socket = socket;
    if let Some(path) = &config {
        let (cfg, problems) = config_problems(path);
        findings.extend(tessera_svc::doctor::config_findings(path, problems, "tessera-server"));
        if let Some(cfg) = cfg
            && !socket_explicit
        {
            socket = cfg.admin_socket;
        }
    }
    socket_findings(&socket, &mut findings);
    let mut client = match tessera_server::client::connect_admin(&socket).await {
        Ok(c) => c,
        Err(e) => return could_not_run(&format!("{e}"), findings, json),
    };
    match client.doctor(pb::DoctorRequest {}).await {
        Ok(r) => {
            for f in r.into_inner().findings {
                let severity = match f.severity.as_str() {
                    "error" => Severity::Error,
                    "warning" => Severity::Warning,
                    _ => Severity::Info,
                };
                findings.push(Finding { code: f.code, severity, subject: f.subject, message: f.message, fix: f.fix });
            }
        }
        Err(s) => return could_not_run(&format!("the server did not answer doctor: {}", s.message()), findings, json),
    }
    tessera_svc::doctor::finish(&Report::new(findings), json)
}

//! The shape of a `doctor` report, shared by both programs: coded findings with a severity,
//! their JSON (`{"findings": [...]}`), their text lines and the exit status they mean.
//! The checks themselves live with what they check (the server's, the agent's).

use serde::{Deserialize, Serialize};

/// How bad a finding is. Ordered most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something is broken or will be soon; act now.
    Error,
    /// Something needs attention before it breaks.
    Warning,
    /// Worth knowing; nothing to fix.
    Info,
}

impl Severity {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Info => "info",
        }
    }
}

/// One finding: a stable `code` (documented in docs/doctor.md), what it concerns, what is
/// wrong, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// A stable code such as `ca-expiring`.
    pub code: String,
    /// How bad it is.
    pub severity: Severity,
    /// What it concerns: an authority ID, a trust domain, an agent's SPIFFE ID, a path.
    pub subject: String,
    /// What is wrong, in a sentence.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

impl Finding {
    /// A finding.
    pub fn new(
        code: &str,
        severity: Severity,
        subject: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self { code: code.to_owned(), severity, subject: subject.into(), message: message.into(), fix: fix.into() }
    }
}

/// A whole report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Most severe first.
    pub findings: Vec<Finding>,
}

impl Report {
    /// A report of `findings`, sorted most severe first (then by code and subject, so that
    /// two runs over the same state print the same lines).
    pub fn new(mut findings: Vec<Finding>) -> Self {
        findings.sort_by(|a, b| (a.severity, &a.code, &a.subject).cmp(&(b.severity, &b.code, &b.subject)));
        Self { findings }
    }

    /// 0 when no finding is an error or a warning, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.findings.iter().any(|f| f.severity != Severity::Info))
    }

    /// One line per finding, then a one-line summary.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(
                out,
                "{:<7} {:<20} {}: {} (fix: {})",
                f.severity.as_str(),
                f.code,
                f.subject,
                f.message,
                f.fix
            );
        }
        let count = |s: Severity| self.findings.iter().filter(|f| f.severity == s).count();
        let (e, w, i) = (count(Severity::Error), count(Severity::Warning), count(Severity::Info));
        if e + w == 0 {
            let _ = writeln!(out, "healthy: 0 errors, 0 warnings, {i} info");
        } else {
            let _ = writeln!(out, "unhealthy: {e} errors, {w} warnings, {i} info");
        }
        out
    }
}

/// Prints `report` (text or JSON) and returns its exit status. The status is the verdict
/// even when standard output was closed before the report could be written.
pub fn finish(report: &Report, json: bool) -> std::process::ExitCode {
    let _ = if json {
        crate::out::line(&serde_json::to_string_pretty(report).unwrap_or_default())
    } else {
        crate::out::write(&report.text())
    };
    std::process::ExitCode::from(report.exit_code())
}

/// Exit status 2: prints what was found so far (without a verdict) and why doctor could not
/// ask the running program.
pub fn could_not_run(why: &str, findings: Vec<Finding>, json: bool) -> std::process::ExitCode {
    let report = Report::new(findings);
    let text = if json {
        serde_json::json!({"findings": report.findings, "error": format!("doctor could not run: {why}")}).to_string()
    } else {
        report.text().lines().take(report.findings.len()).collect::<Vec<_>>().join("\n")
    };
    if !text.is_empty() {
        let _ = crate::out::line(&text);
    }
    eprintln!("Error: doctor could not run: {why}");
    std::process::ExitCode::from(2)
}

/// A problem `validate` found, at the key that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The key path, such as `upstream_authority.cert_file` (empty: the file as a whole).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// The problem a configuration parse stopped at.
pub fn parse_problem(e: &crate::config::ConfigError) -> Problem {
    let key = match e {
        crate::config::ConfigError::Invalid { key, .. } | crate::config::ConfigError::Missing(key) => (*key).to_owned(),
        crate::config::ConfigError::Toml(_) => String::new(),
    };
    Problem { key, message: e.to_string() }
}

/// `validate`'s output for `path`; exit status 0 when there is no problem, 1 otherwise (also
/// when standard output was closed before the answer could be written).
pub fn print_validation(path: &std::path::Path, problems: &[Problem], json: bool) -> std::process::ExitCode {
    use std::fmt::Write as _;
    let mut text = String::new();
    if json {
        let _ = writeln!(text, "{}", serde_json::json!({"valid": problems.is_empty(), "problems": problems}));
    } else if problems.is_empty() {
        let _ = writeln!(text, "{}: valid", path.display());
    } else {
        for p in problems {
            if p.key.is_empty() {
                let _ = writeln!(text, "{}: {}", path.display(), p.message);
            } else {
                let _ = writeln!(text, "{}: {}: {}", path.display(), p.key, p.message);
            }
        }
        let _ = writeln!(text, "{} problem(s)", problems.len());
    }
    let _ = crate::out::write(&text);
    std::process::ExitCode::from(u8::from(!problems.is_empty()))
}

/// `config-invalid` findings for `problems` in the file at `path`.
pub fn config_findings(path: &std::path::Path, problems: Vec<Problem>, validate_verb: &str) -> Vec<Finding> {
    problems
        .into_iter()
        .map(|p| {
            let subject = if p.key.is_empty() { path.display().to_string() } else { p.key.clone() };
            Finding::new(
                "config-invalid",
                Severity::Error,
                subject,
                p.message,
                format!(
                    "correct {} (`{validate_verb} validate --config {}` lists every problem)",
                    path.display(),
                    path.display()
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_severe_first_and_exit_status() {
        let r = Report::new(vec![
            Finding::new("entry-unmatched", Severity::Info, "e1", "m", "f"),
            Finding::new("clock-skew", Severity::Warning, "server", "m", "f"),
            Finding::new("store-unavailable", Severity::Error, "store", "m", "f"),
        ]);
        let codes: Vec<_> = r.findings.iter().map(|f| f.code.as_str()).collect();
        assert_eq!(codes, ["store-unavailable", "clock-skew", "entry-unmatched"]);
        assert_eq!(r.exit_code(), 1);
        assert!(r.text().ends_with("unhealthy: 1 errors, 1 warnings, 1 info\n"), "{}", r.text());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["findings"][0]["severity"], "error");
        assert_eq!(json["findings"][0]["code"], "store-unavailable");
        let info_only = Report::new(vec![Finding::new("entry-unmatched", Severity::Info, "e1", "m", "f")]);
        assert_eq!(info_only.exit_code(), 0);
        assert_eq!(Report::default().text(), "healthy: 0 errors, 0 warnings, 0 info\n");
    }
}

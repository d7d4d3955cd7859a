//! ARM64: the aarch64 binaries, cross-built static (crt-static glibc, Debian's
//! gcc-aarch64-linux-gnu; `.cargo/config.toml`), run under `qemu-aarch64-static` user-mode
//! emulation: an aarch64 server starts and mints, an aarch64 agent attests with a join token
//! and serves a workload on the host (the host build's CLI) its SVID, and both CLIs are the
//! aarch64 ones.
//!
//! The binaries come from `$TESSERA_ARM64_DIR`, else target/aarch64-unknown-linux-gnu/qemu
//! (scripts/test.sh builds them: the `qemu` profile, unoptimised, for the suite's time), else
//! target/aarch64-unknown-linux-gnu/dist (scripts/release.sh: what ships). Where they or
//! qemu-aarch64-static are missing, the test says so and skips.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_test_util::{Mesh, bin, repo, use_binaries};

const QEMU: &str = "qemu-aarch64-static";

/// `$TESSERA_ARM64_DIR`, else the suite's `qemu` build, else a `dist` build.
fn arm_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_ARM64_DIR") {
        return PathBuf::from(d);
    }
    let target = repo().join("target/aarch64-unknown-linux-gnu");
    ["qemu", "dist"]
        .iter()
        .map(|p| target.join(p))
        .find(|d| d.join("tessera-server").exists())
        .unwrap_or(target.join("qemu"))
}

/// The ELF header's machine, and whether any program header asks for an interpreter (a
/// dynamic loader).
fn elf_machine_and_interp(path: &Path) -> (u16, bool) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(b[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let machine = u16_at(18);
    let phoff = usize::try_from(u64::from_le_bytes(b[0x20..0x28].try_into().unwrap())).unwrap();
    let (phentsize, phnum) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    let interp = (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == 3 // PT_INTERP
    });
    (machine, interp)
}

#[test]
fn an_aarch64_server_mints_and_an_aarch64_agent_serves_a_workload_under_qemu() {
    let dir = arm_dir();
    if Command::new(QEMU).arg("--version").output().is_err() {
        eprintln!("SKIPPED: {QEMU} is not installed (apt-get install qemu-user-static; scripts/test.sh does)");
        return;
    }
    if !dir.join("tessera-server").exists() || !dir.join("tessera-agent").exists() {
        eprintln!(
            "SKIPPED: no aarch64 build in {} (cargo build --profile qemu --target aarch64-unknown-linux-gnu -p tessera-server -p tessera-agent)",
            dir.display()
        );
        return;
    }
    for b in ["tessera-server", "tessera-agent"] {
        // EM_AARCH64, and static: nothing to load from a root file system.
        assert_eq!(elf_machine_and_interp(&dir.join(b)), (183, false), "{b}");
    }
    use_binaries(&dir, &[QEMU]);

    let mesh = Mesh::start("", "1s");
    // The server really is the emulated aarch64 binary.
    let pid = mesh.server.child.as_ref().unwrap().id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with(QEMU), "{}", exe.display());

    let minted = mesh.server.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/arm/minted"]);
    assert!(minted.contains("BEGIN CERTIFICATE"), "{minted}");

    mesh.register("spiffe://example.org/arm/workload", &[]);
    mesh.wait_for_svid("spiffe://example.org/arm/workload");
    // A workload built for the host reads the same SVID from the aarch64 agent.
    let out = Command::new(bin("tessera-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(&mesh.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/arm/workload"));
}

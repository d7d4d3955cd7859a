//! Network namespaces that a test makes for itself (iproute2's `ip netns`, veth pairs), so that
//! two "clusters", or a node and its server, are separate hosts on one machine, joined by a
//! [`Link`] that the test can delay, make lossy or cut.
//!
//! A process joins a namespace by being started from a thread that entered it
//! ([`Netns::run`]): a child inherits its parent thread's namespaces, so the servers, agents
//! and Envoys a closure starts live there, and so do the threads it spawns (traffic
//! generators). Unix sockets named by a path work across namespaces, so the admin CLIs reach
//! every process from anywhere. Every namespace is deleted on drop, also when the test fails,
//! and namespaces left by a test process that no longer runs are swept at the next creation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

const PREFIX: &str = "tessera-";

/// A network namespace named `tessera-<pid>-<tag>`, deleted on drop.
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run ip: {e}"))
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Why this machine cannot make network namespaces and veth pairs, or `None` when it can
/// (tried with a throwaway pair).
pub fn unavailable() -> Option<String> {
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2's `ip` is not installed".into());
    }
    if Command::new("ethtool").arg("--version").output().is_err() {
        return Some("`ethtool` is not installed".into());
    }
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    let out = ip(&["netns", "add", &probe]);
    if !out.status.success() {
        return Some(format!("`ip netns add` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let veth = ip(&["-n", &probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"]);
    // The link relay: Python's AF_PACKET socket on an interface of the namespace.
    let relay = Command::new("ip")
        .args(["netns", "exec", &probe, "python3", "-c"])
        .arg("import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).bind(('p0', 0))")
        .output();
    let _ = ip(&["netns", "delete", &probe]);
    if !veth.status.success() {
        return Some(format!("cannot make a veth pair: {}", String::from_utf8_lossy(&veth.stderr).trim()));
    }
    match relay {
        Ok(o) if o.status.success() => None,
        Ok(o) => {
            Some(format!("python3 cannot open an AF_PACKET socket: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
        Err(e) => Some(format!("cannot run python3: {e}")),
    }
}

/// Deletes `tessera-<pid>-*` namespaces whose test process is gone (a run killed by a
/// timeout leaves them).
fn sweep_stale() {
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}

impl Netns {
    /// Makes the namespace with its loopback up.
    pub fn create(tag: &str) -> Self {
        sweep_stale();
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        ip_ok(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> <args>`, failing the test on an error.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip_ok(&all);
    }

    /// Runs `cmd args` inside the namespace (`ip netns exec`) and returns its output.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd} in {}: {e}", self.name))
    }

    /// `ethtool <args>` inside the namespace, failing the test on an error.
    pub fn ethtool(&self, args: &[&str]) {
        let out = self.exec("ethtool", args);
        assert!(out.status.success(), "ethtool {args:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Runs `f` on a thread inside the namespace: processes and threads it starts stay there.
    /// A panic in `f` is this caller's panic.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // setns(2): only this thread moves; its children and threads inherit it.
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// The namespace's TCP counters from `/proc/net/snmp`: (segments sent, segments
    /// retransmitted).
    pub fn tcp_segments(&self) -> (u64, u64) {
        let out = self.exec("cat", &["/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap_or_default(), tcp.next().unwrap_or_default());
        let field = |want: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == want)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("no Tcp {want} in {}'s /proc/net/snmp: {text}", self.name))
        };
        (field("OutSegs"), field("RetransSegs"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// A link between two hosts (namespaces) that a test can delay, make lossy or cut. A kernel
/// with `tc netem` could do this on a veth pair; this machine's has none, so each host's
/// interface is one end of a veth pair whose other end is in a relay namespace, where
/// `tests/python/link_relay.py` passes Ethernet frames between the two with the link's delay and
/// loss (AF_PACKET sockets; the hosts' checksum and segmentation offloads are off so that the
/// frames it relays are whole). A cut drops every frame, those in flight too: a black hole, as
/// a partition looks to TCP, not a refused connection.
pub struct Link {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _relay: Netns,
}

impl Link {
    /// Connects `a` (namespace, interface name, IPv4 address in a /24) to `b` through a relay
    /// namespace named after `tag`; the link starts without delay or loss.
    pub fn new(tag: &str, a: (&Netns, &str, &str), b: (&Netns, &str, &str)) -> Self {
        let relay = Netns::create(tag);
        for (i, (host, dev, addr)) in [a, b].into_iter().enumerate() {
            let inner = format!("r{i}");
            ip_ok(&[
                "link",
                "add",
                dev,
                "netns",
                host.name(),
                "type",
                "veth",
                "peer",
                "name",
                &inner,
                "netns",
                relay.name(),
            ]);
            host.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
            host.ethtool(&["-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off"]);
            relay.ethtool(&["-K", &inner, "tx", "off", "tso", "off", "gso", "off", "gro", "off"]);
            host.ip(&["link", "set", dev, "up"]);
            relay.ip(&["link", "set", &inner, "up"]);
        }
        let script = crate::repo().join("tests/python/link_relay.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", relay.name(), "python3"])
            .arg(&script)
            .args(["r0", "r1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut link = Link { child, stdin, stdout, _relay: relay };
        assert_eq!(link.read_line(), "ready", "the link relay did not start");
        link
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.read_line()
    }

    /// Every frame delayed by `delay_ms` and dropped with probability `loss_percent`, each way.
    pub fn set(&mut self, delay_ms: u32, loss_percent: f64) {
        assert_eq!(self.command(&format!("set {delay_ms} {loss_percent}")), "ok");
    }

    /// A clean link again (no delay, no loss), also after a cut.
    pub fn heal(&mut self) {
        self.set(0, 0.0);
    }

    /// Every frame dropped until [`Link::set`] or [`Link::heal`].
    pub fn cut(&mut self) {
        assert_eq!(self.command("cut"), "ok");
    }

    /// (frames forwarded, frames dropped) so far, both ways.
    pub fn stats(&mut self) -> (u64, u64) {
        let line = self.command("stats");
        let n: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert_eq!(n.len(), 2, "link relay stats: {line}");
        (n[0], n[1])
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

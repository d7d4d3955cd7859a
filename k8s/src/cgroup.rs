//! Finding a process's pod and container from `/proc/<pid>/cgroup`, for the cgroupfs and
//! systemd cgroup drivers and for cgroup v1 and v2.
//!
//! A pod counts only where the kubelet puts it: right under the kubelet's cgroup root
//! ([`CgroupRoot`], the kubelet's `cgroupRoot`, `/` by default) in `kubepods`, directly or in
//! its `burstable` / `besteffort` QoS level:
//!
//! ```text
//! cgroupfs  /kubepods/pod<uid>/<cid>
//!           /kubepods/besteffort/pod<uid>/<cid>
//! systemd   /kubepods.slice/kubepods-pod<uid_>.slice/cri-containerd-<cid>.scope
//!           /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/crio-<cid>.scope
//! ```
//!
//! With `cgroupRoot = /custom` these become `/custom/kubepods/…` and
//! `/custom.slice/custom-kubepods.slice/…`. Anything else is refused: a `kubepods` segment
//! deeper down (in a delegated subtree such as `user@1000.service`, which its user may write
//! to), a look-alike name (`xkubepods.slice`), a pod segment deeper than the QoS level, or a
//! path relative to the reader's cgroup namespace (`/../…`), which cannot be anchored.
//! The kubelet's cgroup root is writable by root only, so an unprivileged process cannot
//! place itself in another pod's cgroup.

/// The pod UID and container ID a process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID (with dashes).
    pub pod_uid: String,
    /// The container runtime's ID (64 hex digits), when the path names one.
    pub container_id: Option<String>,
}

/// The kubelet's cgroup root (its `cgroupRoot` setting, a cgroupfs-style path), as the agent
/// sees the cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupRoot {
    /// Path components; empty for `/`.
    parts: Vec<String>,
}

/// A cgroup root that is not an absolute, normal path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid kubelet cgroup root {0:?}: expected an absolute path such as \"/\" or \"/kubelet\"")]
pub struct CgroupRootError(pub String);

impl std::str::FromStr for CgroupRoot {
    type Err = CgroupRootError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CgroupRootError(s.to_owned());
        let rest = s.strip_prefix('/').ok_or_else(bad)?;
        let mut parts = Vec::new();
        for p in rest.split('/').filter(|p| !p.is_empty()) {
            if p == "." || p == ".." || p.ends_with(".slice") {
                return Err(bad());
            }
            parts.push(p.to_owned());
        }
        Ok(Self { parts })
    }
}

impl std::fmt::Display for CgroupRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.parts.join("/"))
    }
}

/// Why a cgroup file names no pod we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAPod {
    /// No line has a pod cgroup at the kubelet's place: the process is not in a pod.
    Outside,
    /// Paths are shown relative to the reader's cgroup namespace (`/../…`): the agent does
    /// not share the host's cgroup namespace and cannot anchor them.
    RelativePaths,
    /// Lines name different pods or containers.
    Conflicting,
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes()
            .enumerate()
            .all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { b.is_ascii_hexdigit() })
}

const QOS: [&str; 2] = ["burstable", "besteffort"];

/// The systemd driver's name for a cgroup given as cgroupfs components: each component with
/// `-` escaped to `_`, the ancestors' names joined with `-`, then `.slice`.
fn slice_name(components: &[&str]) -> String {
    let escaped: Vec<String> = components.iter().map(|c| c.replace('-', "_")).collect();
    format!("{}.slice", escaped.join("-"))
}

fn container_id_in(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = s.rsplit(['-', ':']).next().unwrap_or(s);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The pod (and container) of one cgroup path when it sits where the kubelet puts pods.
fn anchored(root: &CgroupRoot, segments: &[&str]) -> Option<PodContainer> {
    let rootc: Vec<&str> = root.parts.iter().map(String::as_str).collect();
    // cgroupfs: <root>/kubepods[/<qos>]/pod<uid>[/<container>…]
    if let Some(rest) = segments.strip_prefix(rootc.as_slice())
        && let Some((&"kubepods", rest)) = rest.split_first()
    {
        let rest = match rest.first() {
            Some(q) if QOS.contains(q) => rest.get(1..)?,
            _ => rest,
        };
        let (pod, rest) = rest.split_first()?;
        let uid = pod.strip_prefix("pod").filter(|u| is_uid(u))?;
        return Some(PodContainer {
            pod_uid: uid.to_owned(),
            container_id: rest.first().and_then(|c| container_id_in(c)),
        });
    }
    // systemd: every ancestor is a slice named after all the components above it.
    let mut names: Vec<&str> = rootc.clone();
    let mut i = 0;
    for depth in 1..=rootc.len() {
        if segments.get(i)? != &slice_name(&names[..depth]) {
            return None;
        }
        i += 1;
    }
    names.push("kubepods");
    if segments.get(i)? != &slice_name(&names) {
        return None;
    }
    i += 1;
    let seg = *segments.get(i)?;
    if let Some(q) = QOS.iter().find(|q| {
        let mut n = names.clone();
        n.push(q);
        seg == slice_name(&n)
    }) {
        names.push(q);
        i += 1;
    }
    let pod_seg = *segments.get(i)?;
    let prefix = slice_name(&names);
    let prefix = prefix.strip_suffix(".slice").unwrap_or(&prefix);
    let uid = pod_seg.strip_prefix(prefix)?.strip_prefix("-pod")?.strip_suffix(".slice")?;
    let uid = uid.replace('_', "-");
    if !is_uid(&uid) {
        return None;
    }
    Some(PodContainer { pod_uid: uid, container_id: segments.get(i + 1).and_then(|c| container_id_in(c)) })
}

/// Reads the pod and container from the text of a `/proc/<pid>/cgroup` file, anchored at the
/// kubelet's cgroup `root`.
pub fn parse_under(cgroup_file: &str, root: &CgroupRoot) -> Result<PodContainer, NotAPod> {
    let mut found: Option<PodContainer> = None;
    let mut relative = false;
    for line in cgroup_file.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if segments.first() == Some(&"..") {
            relative = true;
            continue;
        }
        if segments.contains(&"..") || segments.contains(&".") {
            continue;
        }
        let Some(pc) = anchored(root, &segments) else { continue };
        match &mut found {
            None => found = Some(pc),
            Some(f) if f.pod_uid != pc.pod_uid => return Err(NotAPod::Conflicting),
            Some(f) => match (&f.container_id, pc.container_id) {
                (Some(a), Some(b)) if *a != b => return Err(NotAPod::Conflicting),
                (None, Some(b)) => f.container_id = Some(b),
                _ => {}
            },
        }
    }
    match found {
        Some(f) => Ok(f),
        None if relative => Err(NotAPod::RelativePaths),
        None => Err(NotAPod::Outside),
    }
}

/// The absolute paths a path relative to the reader's cgroup namespace (`/../../<tail>`) can
/// stand for, under the kubelet's layout at `root`: the tail must hold the pod segment, and
/// what is above it is rebuilt from the kubelet's naming (the systemd driver's slice names
/// carry their ancestry; for cgroupfs, with and without a QoS level).
fn absolute_candidates(root: &CgroupRoot, tail: &[&str]) -> Vec<Vec<String>> {
    let rootc: Vec<&str> = root.parts.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for (i, seg) in tail.iter().enumerate() {
        let above: Vec<&str> = tail.get(..i).unwrap_or_default().to_vec();
        let below: Vec<String> = tail.get(i..).unwrap_or_default().iter().map(|s| (*s).to_owned()).collect();
        // cgroupfs: `pod<uid>`; whatever of the tail is above it must end the rebuilt path.
        if seg.strip_prefix("pod").is_some_and(is_uid) {
            let mut shapes: Vec<Vec<&str>> = vec![vec!["kubepods"]];
            shapes.extend(QOS.iter().map(|q| vec!["kubepods", *q]));
            for shape in shapes {
                let abs: Vec<&str> = rootc.iter().chain(shape.iter()).copied().collect();
                if abs.ends_with(&above) {
                    let mut abs: Vec<String> = abs.iter().map(|s| (*s).to_owned()).collect();
                    abs.extend(below.iter().cloned());
                    out.push(abs);
                }
            }
        }
        // systemd: `<a>-<b>-…-pod<uid_>.slice` names all its ancestors.
        if let Some((prefix, _)) = seg.strip_suffix(".slice").and_then(|s| s.rsplit_once("-pod")) {
            let names: Vec<&str> = prefix.split('-').collect();
            let mut abs: Vec<String> =
                (1..=names.len()).map(|d| slice_name(names.get(..d).unwrap_or_default())).collect();
            abs.extend(below.iter().cloned());
            out.push(abs);
        }
    }
    out
}

/// Whether `pid` is listed in the `cgroup.procs` of the cgroup at `path` (absolute) of the
/// hierarchy a `/proc/<pid>/cgroup` line names, under the host's cgroup file system at
/// `cgroupfs`. The kernel writes that list: a process is in the cgroup if and only if it is
/// there.
fn is_member(cgroupfs: &std::path::Path, line: &str, path: &[String], pid: u32) -> bool {
    let mut parts = line.splitn(3, ':');
    let (Some(_), Some(controllers)) = (parts.next(), parts.next()) else { return false };
    let mut dir = cgroupfs.to_path_buf();
    if !controllers.is_empty() {
        // cgroup v1: one hierarchy per controller set, mounted under its name.
        dir.push(controllers.strip_prefix("name=").unwrap_or(controllers));
    }
    for p in path {
        dir.push(p);
    }
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse::<u32>() == Ok(pid)))
}

/// The pod and container of process `pid` from its cgroup file, anchored at the kubelet's
/// cgroup `root`. Absolute paths are read as they are. Paths relative to the reader's cgroup
/// namespace (an agent that is not in the host's) are rebuilt into the absolute paths the
/// kubelet would have used, and accepted only when the host's cgroup file system, mounted at
/// `cgroupfs`, lists `pid` in that very cgroup.
pub fn resolve(
    cgroup_file: &str,
    root: &CgroupRoot,
    cgroupfs: &std::path::Path,
    pid: u32,
) -> Result<PodContainer, NotAPod> {
    match parse_under(cgroup_file, root) {
        Err(NotAPod::RelativePaths) => {}
        other => return other,
    }
    let mut found: Option<PodContainer> = None;
    for line in cgroup_file.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let ups = segments.iter().take_while(|s| **s == "..").count();
        if ups == 0 {
            continue;
        }
        let tail = segments.get(ups..).unwrap_or_default();
        if tail.iter().any(|s| *s == ".." || *s == ".") {
            continue;
        }
        for abs in absolute_candidates(root, tail) {
            let refs: Vec<&str> = abs.iter().map(String::as_str).collect();
            let Some(pc) = anchored(root, &refs) else { continue };
            if !is_member(cgroupfs, line, &abs, pid) {
                continue;
            }
            match &found {
                Some(f) if *f != pc => return Err(NotAPod::Conflicting),
                _ => found = Some(pc),
            }
        }
    }
    found.ok_or(NotAPod::RelativePaths)
}

/// The pod UID a cgroup file names anywhere, unverified: only for sharing out resources
/// (connections) per pod, never for identity.
pub fn pod_uid_hint(cgroup_file: &str) -> Option<String> {
    cgroup_file.lines().flat_map(|l| l.splitn(3, ':').nth(2).unwrap_or_default().split('/')).find_map(|seg| {
        if let Some(uid) = seg.strip_prefix("pod").filter(|u| is_uid(u)) {
            return Some(uid.to_owned());
        }
        let uid = seg.strip_suffix(".slice")?.rsplit_once("-pod")?.1.replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

/// [`parse_under`] with the kubelet's default root, `/`; `None` when no pod is found.
pub fn parse(cgroup_file: &str) -> Option<PodContainer> {
    parse_under(cgroup_file, &CgroupRoot::default()).ok()
}

/// Reads `/proc/<pid>/cgroup` (under `proc_root`, normally `/proc`) and finds the pod
/// ([`resolve`], with the host's cgroup file system at `cgroupfs`).
pub fn for_pid(
    proc_root: &std::path::Path,
    pid: u32,
    root: &CgroupRoot,
    cgroupfs: &std::path::Path,
) -> std::io::Result<Result<PodContainer, NotAPod>> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))?;
    Ok(resolve(&text, root, cgroupfs, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";

    fn root(s: &str) -> CgroupRoot {
        s.parse().unwrap()
    }

    #[test]
    fn cgroupfs_v1_paths_name_pod_and_container() {
        let f = format!("12:pids:/kubepods/besteffort/pod{UID}/{CID}\n0::/\n");
        let pc = parse(&f).unwrap();
        assert_eq!(pc.pod_uid, UID);
        assert_eq!(pc.container_id.as_deref(), Some(CID));
        let guaranteed = format!("4:memory:/kubepods/pod{UID}/{CID}\n");
        assert_eq!(parse(&guaranteed).unwrap().container_id.as_deref(), Some(CID));
    }

    #[test]
    fn systemd_v2_paths_name_pod_and_container() {
        for runtime in ["cri-containerd", "crio", "docker"] {
            let f = format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/{runtime}-{CID}.scope\n"
            );
            let pc = parse(&f).unwrap();
            assert_eq!(pc.pod_uid, UID);
            assert_eq!(pc.container_id.as_deref(), Some(CID), "{runtime}");
        }
        let guaranteed = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice\n");
        assert_eq!(parse(&guaranteed).unwrap().container_id, None);
        // crun puts the process in a child of the scope: still that container.
        let crun = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope/container\n");
        assert_eq!(parse(&crun).unwrap().container_id.as_deref(), Some(CID));
    }

    #[test]
    fn a_configured_cgroup_root_is_where_pods_must_be() {
        let r = root("/kubelet");
        let systemd = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_under(&systemd, &r).unwrap().container_id.as_deref(), Some(CID));
        let cgroupfs = format!("3:pids:/kubelet/kubepods/burstable/pod{UID}/{CID}\n");
        assert_eq!(parse_under(&cgroupfs, &r).unwrap().pod_uid, UID);
        // With that root, pods at the default place are not the kubelet's.
        assert_eq!(parse_under(&format!("3:pids:/kubepods/pod{UID}/{CID}\n"), &r), Err(NotAPod::Outside));
        let nested = root("/a/b-c");
        let f = format!("0::/a.slice/a-b_c.slice/a-b_c-kubepods.slice/a-b_c-kubepods-pod{UID_}.slice\n");
        assert_eq!(parse_under(&f, &nested).unwrap().pod_uid, UID);
        for bad in ["", "kubelet", "/a/../b", "/x.slice"] {
            assert!(bad.parse::<CgroupRoot>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pod_cgroups_outside_the_kubelets_root_are_refused() {
        let refused = [
            // A delegated subtree: systemd's user manager, writable by its user.
            format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/{CID}\n"),
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
            ),
            // Rootless podman and units with Delegate=.
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-x.scope/kubepods/besteffort/pod{UID}/{CID}\n"
            ),
            format!("0::/system.slice/evil.service/kubepods/pod{UID}/{CID}\n"),
            // Look-alike names.
            format!("0::/xkubepods.slice/xkubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"),
            format!("0::/kubepods.slice/xkubepods-pod{UID_}.slice\n"),
            format!("0::/kubepods/besteffort/notapod{UID}\n"),
            format!("0::/kubepods/besteffort/pod{UID}x/{CID}\n"),
            // A pod segment deeper than the QoS level.
            format!("0::/kubepods/besteffort/extra/pod{UID}/{CID}\n"),
            format!("0::/kubepods/burstable/besteffort/pod{UID}/{CID}\n"),
            // Dot segments.
            format!("0::/kubepods/./pod{UID}/{CID}\n"),
            format!("0::/x/../kubepods/pod{UID}/{CID}\n"),
        ];
        for f in &refused {
            assert_eq!(parse_under(f, &CgroupRoot::default()), Err(NotAPod::Outside), "accepted: {f}");
        }
        // A pod segment nested inside another pod's container is that outer container.
        let nested = format!("0::/kubepods/besteffort/podaaaaaaaa-b29f-11e7-9350-020968147796/{CID}/pod{UID}/{CID}\n");
        assert_eq!(parse(&nested).unwrap().pod_uid, "aaaaaaaa-b29f-11e7-9350-020968147796");
    }

    #[test]
    fn relative_and_conflicting_paths_are_refused() {
        let relative = format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_under(&relative, &CgroupRoot::default()), Err(NotAPod::RelativePaths));
        let conflicting =
            format!("4:pids:/kubepods/pod{UID}\n3:memory:/kubepods/podaaaaaaaa-b29f-11e7-9350-020968147796\n");
        assert_eq!(parse_under(&conflicting, &CgroupRoot::default()), Err(NotAPod::Conflicting));
    }

    #[test]
    fn processes_outside_pods_have_none() {
        assert_eq!(parse("0::/user.slice/user-0.slice/session-1.scope\n4:memory:/docker/abc\n"), None);
        assert_eq!(parse("0::/kubepods/podnot-a-uid/x\n"), None);
        assert_eq!(parse(""), None);
    }

    fn procs(dir: &std::path::Path, pids: &[u32]) {
        std::fs::create_dir_all(dir).unwrap();
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(dir.join("cgroup.procs"), text).unwrap();
    }

    #[test]
    fn relative_paths_count_only_when_the_host_cgroupfs_lists_the_process_in_the_kubelets_cgroup() {
        let fs = tempfile::tempdir().unwrap();
        let root = CgroupRoot::default();
        // systemd driver, cgroup v2: the agent shares only `kubepods.slice` with the caller.
        let leaf = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        procs(&fs.path().join(&leaf), &[4242]);
        let rel = format!(
            "0::/../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        let pc = resolve(&rel, &root, fs.path(), 4242).unwrap();
        assert_eq!((pc.pod_uid.as_str(), pc.container_id.as_deref()), (UID, Some(CID)));
        // The same path for a pid the kernel does not list there: refused.
        assert_eq!(resolve(&rel, &root, fs.path(), 4243), Err(NotAPod::RelativePaths));
        // cgroupfs driver, cgroup v1: the QoS level is rebuilt and confirmed.
        procs(&fs.path().join(format!("pids/kubepods/besteffort/pod{UID}/{CID}")), &[77]);
        let v1 = format!("5:pids:/../../pod{UID}/{CID}\n");
        assert_eq!(resolve(&v1, &root, fs.path(), 77).unwrap().container_id.as_deref(), Some(CID));
        // A delegated subtree: no rebuilt path anchors, whatever its cgroup.procs lists.
        let evil = format!("user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/{CID}");
        procs(&fs.path().join(&evil), &[666]);
        let rel_evil = format!("0::/../../../../{evil}\n");
        assert_eq!(resolve(&rel_evil, &root, fs.path(), 666), Err(NotAPod::RelativePaths));
        // A relative path naming the victim's cgroup, from a process that is not in it.
        assert_eq!(resolve(&rel, &root, fs.path(), 666), Err(NotAPod::RelativePaths));
        // Without a host cgroupfs to confirm it, nothing is taken.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(resolve(&rel, &root, empty.path(), 4242), Err(NotAPod::RelativePaths));
    }

    /// A real cgroup and a real cgroup namespace: the reader sees the caller's path relative to
    /// its own cgroup (`/../../pod<uid>/<cid>`), and the host's cgroupfs confirms it.
    #[test]
    fn a_reader_in_another_cgroup_namespace_resolves_a_real_pod_cgroup() {
        use std::process::Command;
        let base = std::path::Path::new("/sys/fs/cgroup/pids");
        let target_uid = "0f0e0d0c-0b0a-4909-8807-060504030201";
        let reader_uid = "1f1e1d1c-1b1a-4919-8817-161514131211";
        let (t_dir, r_dir) = (
            base.join(format!("kubepods/besteffort/pod{target_uid}/{CID}")),
            base.join(format!("kubepods/besteffort/pod{reader_uid}/{CID}")),
        );
        if std::fs::create_dir_all(&t_dir).is_err() || std::fs::create_dir_all(&r_dir).is_err() {
            eprintln!("SKIPPED: cannot create v1 pids cgroups here (needs root and cgroup v1)");
            return;
        }
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleeper.id();
        std::fs::write(t_dir.join("cgroup.procs"), pid.to_string()).unwrap();
        let script = format!("echo $$ > {}/cgroup.procs && exec unshare -C cat /proc/{pid}/cgroup", r_dir.display());
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let result = resolve(&text, &CgroupRoot::default(), std::path::Path::new("/sys/fs/cgroup"), pid);
        let listed = std::fs::read_to_string(t_dir.join("cgroup.procs")).unwrap_or_default();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        // Once the process is gone, the kernel no longer lists it: the same path is refused.
        let after = resolve(&text, &CgroupRoot::default(), std::path::Path::new("/sys/fs/cgroup"), pid);
        for d in [&t_dir, &r_dir] {
            for dir in d.ancestors().take(4) {
                let _ = std::fs::remove_dir(dir); // fails while another test's pod is there
            }
        }
        if !out.status.success() {
            eprintln!("SKIPPED: `unshare -C` is not allowed here: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        let line = text.lines().find(|l| l.contains(":pids:")).unwrap_or_default().to_owned();
        assert!(line.contains(&format!("/../../pod{target_uid}/{CID}")), "the reader saw {line:?}");
        let pc = result.unwrap_or_else(|e| panic!("{e:?} for {text} ({listed})"));
        assert_eq!((pc.pod_uid.as_str(), pc.container_id.as_deref()), (target_uid, Some(CID)));
        assert_eq!(after, Err(NotAPod::RelativePaths));
    }
}

//! Finding a process's pod and container from `/proc/<pid>/cgroup`, for the cgroupfs and
//! systemd cgroup drivers and for cgroup v1 and v2:
//!
//! ```text
//! 4:pids:/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa…
//! 0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-9bca8d63d5fa….scope
//! ```

/// The pod UID and container ID a process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID (with dashes).
    pub pod_uid: String,
    /// The container runtime's ID (64 hex digits), when the path names one.
    pub container_id: Option<String>,
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes()
            .enumerate()
            .all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { b.is_ascii_hexdigit() })
}

fn pod_uid_in(segment: &str) -> Option<String> {
    // `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
    let at = segment.rfind("pod")?;
    let rest = segment[at + 3..].trim_end_matches(".slice");
    let uid = rest.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn container_id_in(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = s.rsplit(['-', ':']).next().unwrap_or(s);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Reads the pod and container from the text of a `/proc/<pid>/cgroup` file; `None` when the
/// process is not in a Kubernetes pod.
pub fn parse(cgroup_file: &str) -> Option<PodContainer> {
    for line in cgroup_file.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some(pos) = segments.iter().rposition(|s| pod_uid_in(s).is_some()) else { continue };
        let pod_uid = pod_uid_in(segments[pos]).unwrap_or_default();
        let container_id = segments.get(pos + 1).and_then(|s| container_id_in(s));
        return Some(PodContainer { pod_uid, container_id });
    }
    None
}

/// Reads `/proc/<pid>/cgroup` and finds the pod.
pub fn for_pid(pid: u32) -> std::io::Result<Option<PodContainer>> {
    Ok(parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    #[test]
    fn cgroupfs_v1_paths_name_pod_and_container() {
        let f = format!("12:pids:/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-020968147796/{CID}\n0::/\n");
        let pc = parse(&f).unwrap();
        assert_eq!(pc.pod_uid, "2c48913c-b29f-11e7-9350-020968147796");
        assert_eq!(pc.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn systemd_v2_paths_name_pod_and_container() {
        let f = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{CID}.scope\n"
        );
        let pc = parse(&f).unwrap();
        assert_eq!(pc.pod_uid, "2c48913c-b29f-11e7-9350-020968147796");
        assert_eq!(pc.container_id.as_deref(), Some(CID));
        let guaranteed = "0::/kubepods.slice/kubepods-pod2c48913c_b29f_11e7_9350_020968147796.slice\n";
        assert_eq!(parse(guaranteed).unwrap().container_id, None);
    }

    #[test]
    fn processes_outside_pods_have_none() {
        assert_eq!(parse("0::/user.slice/user-0.slice/session-1.scope\n4:memory:/docker/abc\n"), None);
        assert_eq!(parse("0::/kubepods/podnot-a-uid/x\n"), None);
        assert_eq!(parse(""), None);
    }
}

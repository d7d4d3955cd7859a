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

/// `pod<uid>` (cgroupfs driver) or `…kubepods[-<qos>]-pod<uid_with_underscores>.slice`
/// (systemd driver), exactly.
fn pod_uid_in(segment: &str) -> Option<String> {
    if let Some(uid) = segment.strip_prefix("pod") {
        return is_uid(uid).then(|| uid.to_owned());
    }
    let (prefix, uid) = segment.strip_suffix(".slice")?.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    (prefix.contains("kubepods") && is_uid(&uid)).then_some(uid)
}

/// The kubelet's root of pod cgroups: `kubepods` (cgroupfs) or `…kubepods.slice` (systemd,
/// also `kubelet-kubepods.slice` in nested setups such as kind).
fn is_pods_root(segment: &str) -> bool {
    segment == "kubepods" || segment.ends_with("kubepods.slice")
}

fn container_id_in(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = s.rsplit(['-', ':']).next().unwrap_or(s);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Reads the pod and container from the text of a `/proc/<pid>/cgroup` file; `None` when the
/// process is not in a Kubernetes pod, or when its lines name different pods.
///
/// The pod must sit right under the kubelet's root (`kubepods/pod<uid>`) or its QoS level
/// (`kubepods/besteffort/pod<uid>`): a `pod<uid>` segment deeper down, which a process able
/// to create sub-cgroups could add, is not taken.
pub fn parse(cgroup_file: &str) -> Option<PodContainer> {
    let mut found: Option<PodContainer> = None;
    for line in cgroup_file.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some(root) = segments.iter().position(|s| is_pods_root(s)) else { continue };
        let Some(pos) = (root + 1..=root + 2).find(|&i| segments.get(i).is_some_and(|s| pod_uid_in(s).is_some()))
        else {
            continue;
        };
        let pod_uid = segments.get(pos).and_then(|s| pod_uid_in(s))?;
        let container_id = segments.get(pos + 1).and_then(|s| container_id_in(s));
        match &mut found {
            None => found = Some(PodContainer { pod_uid, container_id }),
            Some(f) if f.pod_uid != pod_uid => return None,
            Some(f) => match (&f.container_id, container_id) {
                (Some(a), Some(b)) if *a != b => return None,
                (None, Some(b)) => f.container_id = Some(b),
                _ => {}
            },
        }
    }
    found
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
    fn pod_segments_deeper_than_the_kubelet_puts_them_or_conflicting_lines_are_refused() {
        let nested = format!(
            "0::/kubepods/besteffort/podaaaaaaaa-b29f-11e7-9350-020968147796/{CID}/pod2c48913c-b29f-11e7-9350-020968147796/{CID}\n"
        );
        assert_eq!(
            parse(&nested).unwrap().pod_uid,
            "aaaaaaaa-b29f-11e7-9350-020968147796",
            "the outer pod, not the nested one"
        );
        let unanchored = "0::/user.slice/pod2c48913c-b29f-11e7-9350-020968147796/x\n";
        assert_eq!(parse(unanchored), None);
        let sneaky = "0::/kubepods/besteffort/notapod2c48913c-b29f-11e7-9350-020968147796\n";
        assert_eq!(parse(sneaky), None);
        let conflicting = "4:pids:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796\n3:memory:/kubepods/podaaaaaaaa-b29f-11e7-9350-020968147796\n";
        assert_eq!(parse(conflicting), None);
        let kind = format!(
            "0::/system.slice/docker-x.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse(&kind).unwrap().container_id.as_deref(), Some(CID));
    }

    #[test]
    fn processes_outside_pods_have_none() {
        assert_eq!(parse("0::/user.slice/user-0.slice/session-1.scope\n4:memory:/docker/abc\n"), None);
        assert_eq!(parse("0::/kubepods/podnot-a-uid/x\n"), None);
        assert_eq!(parse(""), None);
    }
}

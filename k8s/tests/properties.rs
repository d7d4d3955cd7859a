//! Property tests (proptest) for the Kubernetes parsers that read untrusted input: cgroup
//! files (a workload's own process shapes them) and `k8s_psat` payloads (any network peer
//! sends them). Arbitrary input never panics; paths the kubelet writes round-trip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use tessera_k8s::cgroup::parse;
use tessera_k8s::psat::Payload;

fn uid() -> impl Strategy<Value = String> {
    "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cgroup_files_never_panic(text in "(([0-9]{1,2}:[a-z,=_]{0,12}:)?(/[a-zA-Z0-9._:-]{0,70}){0,8}\n){0,6}", junk in ".{0,400}") {
        let _ = parse(&text);
        let _ = parse(&junk);
    }

    #[test]
    fn kubelet_cgroup_paths_round_trip(
        pod in uid(),
        cid in "[0-9a-f]{64}",
        qos in prop_oneof![Just(""), Just("besteffort"), Just("burstable")],
        systemd in any::<bool>(),
        v1 in any::<bool>(),
    ) {
        let path = if systemd {
            let qos_slice = if qos.is_empty() { String::new() } else { format!("/kubepods-{qos}.slice") };
            let prefix = if qos.is_empty() { "kubepods".to_owned() } else { format!("kubepods-{qos}") };
            format!("/kubepods.slice{qos_slice}/{prefix}-pod{}.slice/cri-containerd-{cid}.scope", pod.replace('-', "_"))
        } else {
            let qos_dir = if qos.is_empty() { String::new() } else { format!("/{qos}") };
            format!("/kubepods{qos_dir}/pod{pod}/{cid}")
        };
        let line = if v1 { format!("4:pids:{path}\n3:memory:{path}\n0::/\n") } else { format!("0::{path}\n") };
        let pc = parse(&line).unwrap();
        prop_assert_eq!(pc.pod_uid, pod);
        prop_assert_eq!(pc.container_id, Some(cid));
    }

    #[test]
    fn psat_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cluster in ".{0,40}", token in ".{0,300}") {
        if let Ok(p) = Payload::from_bytes(&bytes) {
            let _ = p.agent_suffix();
        }
        let p = Payload { cluster, token };
        let _ = p.agent_suffix();
        let _ = tessera_k8s::psat::node_uid_claim(&p.token);
    }
}

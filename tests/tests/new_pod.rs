//! New pods in Kubernetes mode. A pod's interface appears some 100-300 ms
//! before its Pod object, with its IP, reaches the node's agent; until then
//! nothing says whether an EgressIP selects it. The agent holds every new
//! pod interface: a source it does not know yet reaches only cluster
//! destinations there. So a selected pod's first datagrams never leave with
//! its node's address, an unselected pod gets out as its node once its Pod
//! is known, and an interface no Pod ever claims is let go when the hold
//! ends.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use egress_lab::{
    LabSpec, PodRef,
    failover::{Receiver, Sender},
    spec,
    topology::CONVERGE_TIMEOUT,
    window,
};
use egress_tests::Cluster;

const PORT: u16 = 8097;

/// How long the agent may take to drop a deleted Pod from its datapath.
const FORGET_TIMEOUT: Duration = Duration::from_secs(30);

fn pending_drops(c: &Cluster, node: u8) -> u64 {
    let stats = c.expect("agent stats", c.lab.agent(node).stats());
    stats.drops(0, "pod_pending").unwrap_or_else(|e| c.fail(e))
}

/// The datagrams the server received from `pod` (sending every 5 ms from
/// before its interface exists) in `observe` after its interface pair was
/// created again, with their source and the time since; the Pod object is
/// restored right after the interface when `with_pod_object`.
fn replug(
    c: &mut Cluster,
    pod: PodRef,
    with_pod_object: bool,
    observe: Duration,
) -> Vec<(Duration, Ipv4Addr)> {
    c.expect("unplugging the pod", c.lab.unplug_pod(pod));
    let deleted = c.lab.delete_pod_object(pod);
    c.expect("deleting its Pod", deleted);
    // The agent must have forgotten the Pod before the interface comes
    // back, or a known source would pass the hold whatever the test is
    // about: waited for, not assumed (under load it took over 2 s in CI).
    let forgotten = c
        .lab
        .agent(pod.node)
        .wait_until_pod_unknown(pod.ip(), FORGET_TIMEOUT);
    c.expect("the agent forgetting the deleted Pod", forgotten);
    // The agent forgets the interface meanwhile.
    thread::sleep(Duration::from_secs(2));
    let to = SocketAddrV4::new(spec::SERVER_ADDR, PORT);
    let server = c.expect("the receiver", Receiver::start(&c.lab.server_ns(), to));
    let mut sender = c.expect(
        "the sender",
        Sender::every(&c.lab.pod_ns(pod), to, Duration::from_millis(5)),
    );
    thread::sleep(Duration::from_millis(50));
    let plugged = Instant::now();
    c.expect("plugging the pod", c.lab.plug_pod(pod));
    if with_pod_object {
        let restored = c.lab.restore_pod_object(pod);
        c.expect("restoring its Pod", restored);
    }
    thread::sleep(observe);
    c.expect("stopping the sender", sender.stop());
    server
        .arrivals()
        .into_iter()
        .map(|a| (a.at.saturating_duration_since(plugged), *a.from.ip()))
        .collect()
}

/// The acceptance test of the window: a selected pod sending every
/// millisecond from before its interface exists has none of its datagrams
/// leave with another address than its egress IP (without the hold, 53-238
/// left with the node's address in each run).
#[test]
fn a_selected_new_pod_never_leaves_with_its_node_address() {
    let mut c = Cluster::new(LabSpec::kubernetes());
    c.expect("convergence", c.lab.wait_converged(CONVERGE_TIMEOUT));
    let pod = PodRef::new(2, 1);
    let egress_ip = c.lab.policy_of(pod).expect("selected").egress_ip;
    let before = pending_drops(&c, 2);
    for run in 1..=2 {
        let measured = window::measure_new_pod_window(&mut c.lab, pod);
        let r = c.expect("the new-pod window", measured);
        eprintln!("run {run}: {}", r.summary());
        if r.leaked != 0 || r.first_egress_ms.is_none() {
            c.fail(format!(
                "run {run}: {} datagrams left with {:?} before the first with {egress_ip}: {}",
                r.leaked,
                r.leaked_sources,
                r.summary()
            ));
        }
    }
    eprintln!(
        "pod_pending drops on node2 over both runs: {}",
        pending_drops(&c, 2) - before
    );
}

/// An unselected pod is let out (as its node) as soon as its Pod is known,
/// long before the hold ends; an interface whose Pod never comes is held
/// until the hold ends, then let out as the node, and what it dropped is
/// counted.
#[test]
fn held_interfaces_are_let_go_once_their_pod_is_known_or_the_hold_ends() {
    const HOLD: Duration = Duration::from_secs(8);
    let mut spec = LabSpec::kubernetes();
    if let Some(k) = spec.kubernetes.as_mut() {
        k.agent.new_pod_hold = HOLD;
    }
    let mut c = Cluster::new(spec);
    c.expect("convergence", c.lab.wait_converged(CONVERGE_TIMEOUT));
    let pod = PodRef::new(2, 2);
    let node = spec::node_addr(2);
    assert_eq!(
        c.lab.expected_source(pod),
        Some(node),
        "pod 2 is unselected"
    );

    let known = replug(&mut c, pod, true, Duration::from_secs(3));
    let Some((first, _)) = known.first() else {
        c.fail("the unselected pod never got out after its Pod was restored");
    };
    assert!(
        *first < HOLD - Duration::from_secs(2),
        "the unselected pod got out only {first:?} after its interface appeared: \
         the hold ({HOLD:?}) was not released by its Pod"
    );
    assert!(
        known.iter().all(|(_, src)| *src == node),
        "an unselected pod leaves as its node: {known:?}"
    );

    let before = pending_drops(&c, 2);
    let podless = replug(&mut c, pod, false, HOLD + Duration::from_secs(4));
    let Some((first, _)) = podless.first() else {
        c.fail("an interface without a Pod was never let go after its hold");
    };
    assert!(
        *first >= HOLD - Duration::from_secs(1),
        "an interface without a Pod got out {first:?} after it appeared, inside its hold ({HOLD:?})"
    );
    assert!(podless.iter().all(|(_, src)| *src == node), "{podless:?}");
    let dropped = pending_drops(&c, 2) - before;
    assert!(
        dropped > 0,
        "the datagrams held back were not counted as pod_pending"
    );
    eprintln!(
        "podless interface: first datagram {first:?} after it appeared, {dropped} counted as pod_pending"
    );
    let restored = c.lab.restore_pod_object(pod);
    c.expect("restoring its Pod", restored);
}

//! SIGTERM without `--keep-state-on-exit` removes everything the agent set
//! up: links (so nothing is attached), pins, and the egress IPs it added.

use std::path::Path;

use egress_lab::{LabSpec, PodRef, exec_in, spec, tcp_probe};
use egress_tests::{Cluster, TCP, opts};

fn addresses(c: &Cluster, n: u8) -> String {
    let out = c.expect(
        "ip addr",
        exec_in(
            &c.lab.node_ns(n),
            "ip",
            &["-4", "-o", "addr", "show", "dev", "eth0"],
        ),
    );
    out.stdout
}

#[test]
fn sigterm_detaches_unpins_and_releases_the_egress_ip() {
    let mut c = Cluster::new(LabSpec::default());
    let egress = c.lab.spec().policies[0].egress_ip.to_string();
    let pins = Path::new("/sys/fs/bpf").join(c.lab.instance(1));
    c.check_tcp(PodRef::new(1, 1), opts());
    assert!(
        pins.join("maps/nat_fwd_v4").exists(),
        "{} has no pinned maps while running",
        pins.display()
    );
    assert!(
        addresses(&c, 1).contains(&format!("{egress}/")),
        "node1 does not hold {egress}"
    );

    let stopped = c.lab.stop_agent(1);
    c.expect("SIGTERM", stopped);

    if pins.exists() {
        c.fail(format!("{} still exists after SIGTERM", pins.display()));
    }
    let held = addresses(&c, 1);
    if held.contains(&format!("{egress}/")) {
        c.fail(format!("node1 still holds {egress} after SIGTERM:\n{held}"));
    }
    // The node's own address, which the agent did not add, stays.
    assert!(held.contains(&format!("{}/", spec::node_addr(1))), "{held}");
    // Nothing is attached any more: the selected pod leaves through masquerade.
    let pod = PodRef::new(1, 1);
    let p = c.expect("TCP after SIGTERM", tcp_probe(&c.ns(pod), TCP, opts()));
    if *p.observed.ip() != spec::node_addr(1) {
        c.fail(format!(
            "after SIGTERM the pod left as {}, expected its node address",
            p.observed
        ));
    }
}

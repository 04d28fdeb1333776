//! Against the real kernel, each test in a network namespace of its own.
//!
//! The namespaces are anonymous, held only by a file descriptor: closing it
//! (in `Drop`, on panic too, or by the kernel when the test process dies)
//! destroys the namespace with every device in it, and two tests can never
//! collide on a name. Setup and checks use iproute2 (`ip`) rather than the
//! code under test, so a test cannot agree with itself.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use egress_netlink::{ClaimLedger, Error, LinkEvent, Netlink};
use futures_util::StreamExt;
use nix::sched::{CloneFlags, setns, unshare};
use serde_json::Value;

struct Netns {
    fd: OwnedFd,
}

impl Netns {
    fn new() -> Netns {
        // unshare() moves the calling thread; a throwaway thread keeps the
        // test harness's threads in the host namespace.
        let fd = std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (tests need root)");
            OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap();
        Netns { fd }
    }

    /// Runs `f` on a fresh thread inside the namespace, on a current-thread
    /// runtime: netlink sockets bind to the namespace of the thread that
    /// opens them, and every task of that runtime stays on this thread.
    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let fd = self.fd.try_clone().unwrap();
        let joined = std::thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            drop(fd);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join();
        match joined {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// `ip ARGS` in the calling thread's namespace (a child inherits it).
fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip_json(args: &str) -> Value {
    serde_json::from_str(&ip(&format!("-j {args}"))).unwrap()
}

/// `(address/prefix, secondary)` of each IPv4 address on `dev`.
fn addrs_of(dev: &str) -> Vec<(String, bool)> {
    let v = ip_json(&format!("-4 addr show dev {dev}"));
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]),
                a["secondary"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Two veth pairs on different subnets, the default route through the
/// first: a claim must follow the subnet, not the default route.
fn two_subnets() {
    ip("link add a0 type veth peer name a1");
    ip("link add b0 type veth peer name b1");
    ip("addr add 10.1.0.1/24 dev a0");
    ip("addr add 10.2.0.1/24 dev b0");
    for dev in ["a0", "a1", "b0", "b1"] {
        ip(&format!("link set {dev} up"));
    }
    ip("route add default via 10.1.0.254 dev a0");
}

#[test]
fn vxlan_is_created_external_and_idempotent() {
    Netns::new().run(|| async {
        let nl = Netlink::connect().unwrap();
        let first = nl
            .ensure_vxlan("egress-vxlan", 4789, Some(1450))
            .await
            .unwrap();
        assert_eq!(first.kind.as_deref(), Some("vxlan"));
        assert!(first.up);
        assert_eq!(first.mtu, 1450);

        let shown = ip_json("-d link show dev egress-vxlan");
        let data = &shown[0]["linkinfo"]["info_data"];
        assert_eq!(data["external"], Value::Bool(true), "{shown}");
        assert_eq!(data["port"], 4789, "{shown}");
        assert!(
            shown[0]["flags"].as_array().unwrap().contains(&"UP".into()),
            "{shown}"
        );

        let again = nl
            .ensure_vxlan("egress-vxlan", 4789, Some(1450))
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(
            nl.link_by_name("egress-vxlan").await.unwrap(),
            Some(first.clone())
        );

        // An existing device that drifted is brought back, not recreated.
        ip("link set egress-vxlan down mtu 1400");
        let fixed = nl
            .ensure_vxlan("egress-vxlan", 4789, Some(1450))
            .await
            .unwrap();
        assert_eq!(
            (fixed.index, fixed.up, fixed.mtu),
            (first.index, true, 1450)
        );
        assert_eq!(ip_json("link show dev egress-vxlan")[0]["mtu"], 1450);

        // Wrong port, wrong kind, not external: refused and left alone.
        let err = nl
            .ensure_vxlan("egress-vxlan", 8472, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::VxlanMismatch { .. }), "{err}");
        assert!(err.to_string().contains("dstport 4789"), "{err}");

        ip("link add notvx type veth peer name notvx-peer");
        let err = nl.ensure_vxlan("notvx", 4789, None).await.unwrap_err();
        assert!(err.to_string().contains("of kind veth"), "{err}");

        ip("link add vx42 type vxlan id 42 dstport 4790");
        let err = nl.ensure_vxlan("vx42", 4790, None).await.unwrap_err();
        assert!(
            err.to_string().contains("fixed VNI 42, not external"),
            "{err}"
        );
        assert_eq!(
            ip_json("-d link show dev vx42")[0]["linkinfo"]["info_data"]["id"],
            42
        );

        // The kernel allows one external VXLAN per port: say who has it.
        let err = nl.ensure_vxlan("egress-vx2", 4789, None).await.unwrap_err();
        assert!(matches!(err, Error::VxlanPortInUse { .. }), "{err}");
        assert!(err.to_string().contains("\"egress-vxlan\""), "{err}");
        assert_eq!(err.errno(), Some(libc::EEXIST));

        assert!(nl.delete_link("egress-vxlan").await.unwrap());
        assert!(!nl.delete_link("egress-vxlan").await.unwrap());
        assert_eq!(nl.link_by_name("egress-vxlan").await.unwrap(), None);
    });
}

#[test]
fn links_and_addresses_are_listed() {
    Netns::new().run(|| async {
        two_subnets();
        let nl = Netlink::connect().unwrap();
        let links = nl.links().await.unwrap();
        let a0 = links.iter().find(|l| l.name == "a0").unwrap();
        assert_eq!(a0.kind.as_deref(), Some("veth"));
        assert!(a0.up);
        let lo = links.iter().find(|l| l.name == "lo").unwrap();
        assert_eq!((lo.kind.as_deref(), lo.up), (None, false));

        let addrs = nl.ipv4_addresses().await.unwrap();
        let b0 = addrs.iter().find(|a| a.ifname == "b0").unwrap();
        assert_eq!(b0.addr, "10.2.0.1/24".parse().unwrap());
        assert_eq!(
            b0.ifindex,
            links.iter().find(|l| l.name == "b0").unwrap().index
        );
        assert_eq!(addrs.len(), 2, "{addrs:?}");
    });
}

#[test]
fn claim_follows_the_subnet_and_is_idempotent() {
    Netns::new().run(|| async {
        two_subnets();
        let nl = Netlink::connect().unwrap();

        let c = nl.claim(v4("10.2.0.50"), None).await.unwrap();
        assert_eq!(
            (c.interface.as_str(), c.prefix_len, c.added),
            ("b0", 24, true)
        );
        assert_eq!(
            addrs_of("b0"),
            vec![("10.2.0.1/24".into(), false), ("10.2.0.50/24".into(), true)]
        );
        // The node's own traffic keeps its source address.
        let route = ip_json("route get 10.2.0.9");
        assert_eq!(route[0]["prefsrc"], "10.2.0.1", "{route}");

        let again = nl.claim(v4("10.2.0.50"), None).await.unwrap();
        assert_eq!((again.interface.as_str(), again.added), ("b0", false));
        assert_eq!(addrs_of("b0").len(), 2);

        let c = nl.claim(v4("10.1.0.77"), None).await.unwrap();
        assert_eq!((c.interface.as_str(), c.prefix_len), ("a0", 24));

        let err = nl.claim(v4("10.3.0.1"), None).await.unwrap_err();
        assert!(matches!(err, Error::NoSubnetFor { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("a0 10.1.0.1/24") && msg.contains("b0 10.2.0.1/24"),
            "{msg}"
        );

        // The override wins over the subnet match, and must exist.
        let c = nl.claim(v4("10.2.0.60"), Some("a0")).await.unwrap();
        assert_eq!(
            (c.interface.as_str(), c.prefix_len, c.added),
            ("a0", 32, true)
        );
        let err = nl.claim(v4("10.2.0.61"), Some("nope0")).await.unwrap_err();
        assert!(matches!(err, Error::NoSuchLink { .. }), "{err}");
        assert!(err.to_string().contains("nope0"), "{err}");
        let err = nl.claim(v4("10.2.0.50"), Some("a0")).await.unwrap_err();
        assert!(matches!(err, Error::HeldElsewhere { .. }), "{err}");

        // Equally specific subnets on two interfaces: no guessing.
        ip("addr add 10.2.0.2/24 dev a0");
        let err = nl.claim(v4("10.2.0.70"), None).await.unwrap_err();
        assert!(matches!(err, Error::AmbiguousSubnet { .. }), "{err}");
    });
}

#[test]
fn release_removes_only_the_claimed_address() {
    Netns::new().run(|| async {
        two_subnets();
        let nl = Netlink::connect().unwrap();
        nl.claim(v4("10.2.0.50"), None).await.unwrap();
        assert!(nl.release(v4("10.2.0.50"), "b0").await.unwrap());
        assert_eq!(addrs_of("b0"), vec![("10.2.0.1/24".into(), false)]);
        assert!(!nl.release(v4("10.2.0.50"), "b0").await.unwrap());
        assert!(!nl.release(v4("10.2.0.50"), "gone0").await.unwrap());
        // Deleting the primary would take secondaries with it; make sure
        // the default route's interface is untouched too.
        assert_eq!(addrs_of("a0"), vec![("10.1.0.1/24".into(), false)]);
    });
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "egress-netlink-test-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn batch_claims_follow_subnets_and_spare_admin_addresses() {
    let dir = TempDir::new();
    let path = dir.0.join("claims.json");
    Netns::new().run(move || async move {
        two_subnets();
        ip("addr add 10.1.0.9/24 dev a0");
        let nl = Netlink::connect().unwrap();
        let mut ledger = ClaimLedger::open(&path).unwrap();
        let mut wanted: Vec<(Ipv4Addr, Option<String>)> = (20..120)
            .map(|i| (Ipv4Addr::new(10, 1, 0, i), None))
            .collect();
        wanted.push((v4("10.2.0.20"), None));
        wanted.push((v4("10.1.0.9"), None));
        // Claimed twice in one batch: the second sees the first through the snapshot.
        wanted.push((v4("10.1.0.20"), None));
        let done = nl.claim_all_tracked(&mut ledger, &wanted).await.unwrap();
        assert_eq!(done.len(), wanted.len());
        assert_eq!(done.iter().filter(|c| c.added).count(), 101);
        assert_eq!(done[100].interface, "b0");
        assert!(!done[101].added, "the admin's 10.1.0.9 is not ours");
        assert!(!done[102].added);
        assert_eq!(ledger.entries().len(), 101);
        assert!(!ledger.contains(v4("10.1.0.9"), "a0"));
        let on_a0 = addrs_of("a0");
        assert!(on_a0.contains(&("10.1.0.119/24".into(), true)), "{on_a0:?}");
        assert_eq!(
            addrs_of("b0"),
            vec![("10.2.0.1/24".into(), false), ("10.2.0.20/24".into(), true)]
        );
    });
}

#[test]
fn tracked_claims_survive_a_restart_and_spare_admin_addresses() {
    let dir = TempDir::new();
    let path = dir.0.join("claims.json");
    Netns::new().run(move || async move {
        two_subnets();
        ip("addr add 10.1.0.9/24 dev a0");

        {
            let nl = Netlink::connect().unwrap();
            let mut ledger = ClaimLedger::open(&path).unwrap();
            let admin = nl
                .claim_tracked(&mut ledger, v4("10.1.0.9"), None)
                .await
                .unwrap();
            assert!(!admin.added);
            let ours = nl
                .claim_tracked(&mut ledger, v4("10.1.0.10"), None)
                .await
                .unwrap();
            assert!(ours.added);
            let ours2 = nl
                .claim_tracked(&mut ledger, v4("10.2.0.10"), None)
                .await
                .unwrap();
            assert_eq!(ours2.interface, "b0");
            assert_eq!(ledger.entries().len(), 2);
        } // "agent exits"

        let nl = Netlink::connect().unwrap();
        let mut ledger = ClaimLedger::open(&path).unwrap();
        assert!(ledger.contains(v4("10.1.0.10"), "a0"));
        assert!(ledger.contains(v4("10.2.0.10"), "b0"));
        assert!(!ledger.contains(v4("10.1.0.9"), "a0"));

        // Re-claiming after the restart finds it present and keeps it ours.
        let re = nl
            .claim_tracked(&mut ledger, v4("10.1.0.10"), None)
            .await
            .unwrap();
        assert!(!re.added);
        assert!(ledger.contains(v4("10.1.0.10"), "a0"));

        let removed = nl
            .release_tracked(&mut ledger, v4("10.1.0.9"))
            .await
            .unwrap();
        assert!(removed.is_empty());
        let removed = nl
            .release_tracked(&mut ledger, v4("10.1.0.10"))
            .await
            .unwrap();
        assert_eq!(removed, vec!["a0".to_string()]);
        assert_eq!(
            addrs_of("a0"),
            vec![("10.1.0.1/24".into(), false), ("10.1.0.9/24".into(), true)]
        );

        let reloaded = ClaimLedger::open(&path).unwrap();
        assert_eq!(reloaded.entries().len(), 1);
        assert_eq!(reloaded.entries()[0].ip, v4("10.2.0.10"));
    });
}

#[test]
fn batch_release_removes_only_ours_and_forgets_them_in_one_go() {
    let dir = TempDir::new();
    let path = dir.0.join("claims.json");
    Netns::new().run(move || async move {
        two_subnets();
        ip("addr add 10.1.0.9/24 dev a0");
        let nl = Netlink::connect().unwrap();
        let mut ledger = ClaimLedger::open(&path).unwrap();
        let wanted: Vec<(Ipv4Addr, Option<String>)> = ["10.1.0.20", "10.1.0.21", "10.2.0.20"]
            .iter()
            .map(|a| (v4(a), None))
            .collect();
        nl.claim_all_tracked(&mut ledger, &wanted).await.unwrap();
        // Gone behind the agent's back: still released from the ledger.
        ip("addr del 10.1.0.21/24 dev a0");
        let released = nl
            .release_all_tracked(
                &mut ledger,
                &[
                    v4("10.1.0.9"),
                    v4("10.1.0.20"),
                    v4("10.1.0.21"),
                    v4("10.2.0.20"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            released,
            vec![
                (v4("10.1.0.20"), vec!["a0".to_string()]),
                (v4("10.1.0.21"), vec![]),
                (v4("10.2.0.20"), vec!["b0".to_string()]),
            ],
            "the admin's 10.1.0.9 is not the ledger's, so not listed"
        );
        assert!(ledger.entries().is_empty());
        assert!(ClaimLedger::open(&path).unwrap().entries().is_empty());
        assert_eq!(
            addrs_of("a0"),
            vec![("10.1.0.1/24".into(), false), ("10.1.0.9/24".into(), true)]
        );
        assert_eq!(addrs_of("b0"), vec![("10.2.0.1/24".into(), false)]);
    });
}

#[test]
fn link_events_report_new_and_removed_veths() {
    Netns::new().run(|| async {
        let nl = Netlink::connect().unwrap();
        let mut events = nl.link_events().unwrap();
        ip("link add ev0 type veth peer name ev1");

        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("no link event within 5 s")
                .expect("event stream ended")
        };
        let mut added = Vec::new();
        while added.len() < 2 {
            match next().await {
                LinkEvent::Added(l) => added.push(l),
                other => panic!("unexpected {other:?}"),
            }
        }
        added.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(added[0].name, "ev0");
        assert_eq!(added[1].name, "ev1");
        assert_eq!(added[0].kind.as_deref(), Some("veth"));
        let ev0 = nl.link_by_name("ev0").await.unwrap().unwrap();
        assert_eq!(added[0].index, ev0.index);

        // State changes of a known link are not news; a rename is.
        ip("link set ev0 up");
        ip("link set ev1 name ev1x");
        match next().await {
            LinkEvent::Added(l) => assert_eq!((l.name.as_str(), l.index), ("ev1x", added[1].index)),
            other => panic!("expected the rename, got {other:?}"),
        }

        // Bridge port notifications (AF_BRIDGE) are not device events, not
        // even the RTM_DELLINK sent when a port leaves its bridge.
        ip("link add br0 type bridge");
        match next().await {
            LinkEvent::Added(l) => assert_eq!(l.name, "br0"),
            other => panic!("expected br0, got {other:?}"),
        }
        ip("link set ev0 master br0");
        ip("link set ev0 nomaster");
        ip("link del br0");
        match next().await {
            LinkEvent::Removed { name, .. } => assert_eq!(name, "br0"),
            other => panic!("expected br0 to go, got {other:?}"),
        }

        ip("link del ev0");
        let mut removed = Vec::new();
        while removed.len() < 2 {
            match next().await {
                LinkEvent::Removed { name, index } => removed.push((name, index)),
                other => panic!("unexpected {other:?}"),
            }
        }
        removed.sort();
        assert_eq!(
            removed,
            vec![
                ("ev0".to_string(), added[0].index),
                ("ev1x".to_string(), added[1].index)
            ]
        );
    });
}

#[test]
fn default_route_interface_is_the_lowest_metric_default_of_the_main_table() {
    Netns::new().run(|| async {
        two_subnets();
        let nl = Netlink::connect().unwrap();
        let links = nl.links().await.unwrap();
        let index = |name: &str| links.iter().find(|l| l.name == name).unwrap().index;
        assert_eq!(nl.default_route_ifindex().await.unwrap(), Some(index("a0")));
        ip("route del default");
        assert_eq!(nl.default_route_ifindex().await.unwrap(), None);
        // A default in another table does not count.
        ip("route add default via 10.1.0.2 dev a0 table 100");
        assert_eq!(nl.default_route_ifindex().await.unwrap(), None);
        ip("route add default via 10.1.0.2 dev a0 metric 200");
        ip("route add default via 10.2.0.2 dev b0 metric 100");
        assert_eq!(nl.default_route_ifindex().await.unwrap(), Some(index("b0")));
    });
}

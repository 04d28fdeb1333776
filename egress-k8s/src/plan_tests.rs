use super::*;
use crate::facts::{DEFAULT_ASSIGNABLE_LABEL as EA, eip_fixtures::eip, fixtures};
use serde_json::json;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Three workers on 172.18.0.0/16, all egress-assignable; node3 also has a
/// second NIC on 192.168.50.0/24 and is in zone b.
fn nodes() -> Vec<NodeInfo> {
    [
        fixtures::node(
            "node1",
            "172.18.0.11",
            &[(EA, ""), ("zone", "a")],
            &[("eth0", "172.18.0.11/16")],
        ),
        fixtures::node(
            "node2",
            "172.18.0.12",
            &[(EA, ""), ("zone", "a")],
            &[("eth0", "172.18.0.12/16")],
        ),
        fixtures::node(
            "node3",
            "172.18.0.13",
            &[(EA, ""), ("zone", "b")],
            &[("eth0", "172.18.0.13/16"), ("eth1", "192.168.50.13/24")],
        ),
        // Not labeled: never holds egress IPs.
        fixtures::node("node4", "172.18.0.14", &[], &[("eth0", "172.18.0.14/16")]),
    ]
    .iter()
    .map(|n| NodeInfo::from_node(n).unwrap())
    .collect()
}

fn simple(name: &str, created: &str, ips: &[&str]) -> EgressIP {
    eip(
        name,
        created,
        json!({"egressIPs": ips, "namespaceSelector": {"matchLabels": {"team": name}}}),
    )
}

fn verdicts(c: &Checked) -> Vec<Result<Ipv4Addr, &'static str>> {
    c.ips
        .iter()
        .map(|e| match &e.verdict {
            IpVerdict::Valid(ip) => Ok(*ip),
            IpVerdict::Invalid(p) | IpVerdict::Conflict(p) => Err(p.reason),
        })
        .collect()
}

fn space() -> IdSpace {
    IdSpace::new(egress_common::maps::DEFAULT_MAX_POLICIES, BTreeSet::new())
}

fn cfg() -> PlanConfig {
    PlanConfig::default()
}

#[test]
fn valid_ips_pass_validation() {
    let c = check_all(
        &[simple(
            "a",
            "2026-01-01T00:00:00Z",
            &["172.18.0.100", "192.168.50.100"],
        )],
        &nodes(),
        &cfg(),
    );
    assert_eq!(
        verdicts(&c[0]),
        [Ok(ip("172.18.0.100")), Ok(ip("192.168.50.100"))]
    );
    assert!(c[0].invalid.is_none());
}

#[test]
fn malformed_and_unusable_ips_are_invalid() {
    let c = check_all(
        &[simple(
            "a",
            "2026-01-01T00:00:00Z",
            &[
                "172.18.0.300",
                "fd00::10",
                "224.0.0.5",
                "172.18.0.100",
                "172.18.0.100",
                "10.9.9.9",
            ],
        )],
        &nodes(),
        &cfg(),
    );
    assert_eq!(
        verdicts(&c[0]),
        [
            Err("MalformedIP"),
            Err("UnsupportedFamily"),
            Err("UnusableIP"),
            Ok(ip("172.18.0.100")),
            Err("DuplicateInSpec"),
            Err("NoEligibleSubnet"),
        ]
    );
    let IpVerdict::Invalid(p) = &c[0].ips[0].verdict else {
        panic!()
    };
    assert!(p.message.contains("172.18.0.300"), "{}", p.message);
}

#[test]
fn node_addresses_conflict() {
    let c = check_all(
        &[simple(
            "a",
            "2026-01-01T00:00:00Z",
            &["172.18.0.12", "192.168.50.13"],
        )],
        &nodes(),
        &cfg(),
    );
    assert_eq!(verdicts(&c[0]), [Err("NodeAddress"), Err("NodeAddress")]);
    let IpVerdict::Conflict(p) = &c[0].ips[1].verdict else {
        panic!()
    };
    assert_eq!(p.message, "192.168.50.13 is an address of node node3");
}

#[test]
fn same_ip_in_two_resources_stays_with_the_older() {
    let older = simple("zeta", "2026-01-01T00:00:00Z", &["172.18.0.100"]);
    let newer = simple(
        "alpha",
        "2026-02-01T00:00:00Z",
        &["172.18.0.100", "172.18.0.101"],
    );
    // Input order must not matter.
    for eips in [vec![older.clone(), newer.clone()], vec![newer, older]] {
        let c = check_all(&eips, &nodes(), &cfg());
        assert_eq!(c[0].name, "zeta");
        assert_eq!(verdicts(&c[0]), [Ok(ip("172.18.0.100"))]);
        assert_eq!(
            verdicts(&c[1]),
            [Err("DuplicateEgressIP"), Ok(ip("172.18.0.101"))]
        );
    }
}

#[test]
fn same_age_resources_are_ordered_by_name() {
    let c = check_all(
        &[
            simple("b", "2026-01-01T00:00:00Z", &["172.18.0.100"]),
            simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"]),
        ],
        &nodes(),
        &cfg(),
    );
    assert_eq!(c[0].name, "a");
    assert_eq!(verdicts(&c[1]), [Err("DuplicateEgressIP")]);
}

#[test]
fn malformed_selector_or_cidr_invalidates_the_whole_resource() {
    let cases = [
        (
            json!({"matchExpressions": [{"key": "team", "operator": "Equals", "values": ["a"]}]}),
            json!([]),
            "InvalidSelector",
            "spec.namespaceSelector",
        ),
        (
            json!({}),
            json!(["10.0.0.0/33"]),
            "InvalidCIDR",
            "spec.excludedCIDRs[0]",
        ),
    ];
    for (ns, cidrs, reason, field) in cases {
        let e = eip(
            "a",
            "2026-01-01T00:00:00Z",
            json!({"egressIPs": ["172.18.0.100"], "namespaceSelector": ns, "excludedCIDRs": cidrs}),
        );
        let c = check_all(&[e], &nodes(), &cfg());
        let p = c[0].invalid.as_ref().unwrap();
        assert_eq!(p.reason, reason);
        assert!(p.message.starts_with(field), "{}", p.message);
        assert_eq!(verdicts(&c[0]), [Err("ResourceInvalid")]);
    }
    let e = eip(
        "a",
        "2026-01-01T00:00:00Z",
        json!({"egressIPs": ["172.18.0.100"], "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app": "web"}}, "interface": "eth0/1"}),
    );
    assert_eq!(
        check_all(&[e], &nodes(), &cfg())[0]
            .invalid
            .as_ref()
            .unwrap()
            .reason,
        "InvalidInterface"
    );
}

#[test]
fn an_invalid_resource_does_not_reserve_its_ips() {
    let bad = eip(
        "old",
        "2026-01-01T00:00:00Z",
        json!({"egressIPs": ["172.18.0.100"],
        "namespaceSelector": {"matchExpressions": [{"key": "x", "operator": "In"}]}}),
    );
    let good = simple("new", "2026-02-01T00:00:00Z", &["172.18.0.100"]);
    let c = check_all(&[bad, good], &nodes(), &cfg());
    assert_eq!(verdicts(&c[1]), [Ok(ip("172.18.0.100"))]);
}

#[test]
fn excluded_cidrs_accept_plain_addresses_and_are_truncated() {
    let e = eip(
        "a",
        "2026-01-01T00:00:00Z",
        json!({"egressIPs": [], "namespaceSelector": {},
        "excludedCIDRs": ["192.0.2.7", "198.51.100.9/24"]}),
    );
    let c = check_all(&[e], &nodes(), &cfg());
    assert_eq!(
        c[0].excluded,
        BTreeSet::from([
            "192.0.2.7/32".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap()
        ])
    );
}

#[test]
fn node_selector_narrows_eligible_subnets() {
    // Only node3 has 192.168.50.0/24; restricting to zone a leaves no node for it.
    let e = eip(
        "a",
        "2026-01-01T00:00:00Z",
        json!({"egressIPs": ["192.168.50.100", "172.18.0.100"],
        "namespaceSelector": {}, "nodeSelector": {"matchLabels": {"zone": "a"}}}),
    );
    let c = check_all(&[e], &nodes(), &cfg());
    assert_eq!(
        verdicts(&c[0]),
        [Err("NoEligibleSubnet"), Ok(ip("172.18.0.100"))]
    );
    let IpVerdict::Invalid(p) = &c[0].ips[0].verdict else {
        panic!()
    };
    assert!(p.message.contains("matching spec.nodeSelector"));
}

#[test]
fn configurable_assignable_label() {
    let cfg = PlanConfig {
        assignable_label: "zone".into(),
        ..PlanConfig::default()
    };
    // node4 has no zone label; the other three do.
    let c = check_all(
        &[simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"])],
        &nodes(),
        &cfg,
    );
    let a = assign(&c, &nodes(), &BTreeMap::new(), &BTreeSet::new(), &cfg);
    assert_eq!(a[&ip("172.18.0.100")], Ok("node1".into()));
}

fn assigned(a: &Assignments) -> BTreeMap<Ipv4Addr, String> {
    a.iter()
        .filter_map(|(k, v)| Some((*k, v.clone().ok()?)))
        .collect()
}

#[test]
fn fewest_first_and_never_two_ips_of_one_resource_on_a_node() {
    let eips = [
        simple(
            "a",
            "2026-01-01T00:00:00Z",
            &["172.18.0.100", "172.18.0.101", "172.18.0.102"],
        ),
        simple(
            "b",
            "2026-01-02T00:00:00Z",
            &["172.18.0.110", "172.18.0.111"],
        ),
    ];
    let c = check_all(&eips, &nodes(), &cfg());
    let a = assigned(&assign(
        &c,
        &nodes(),
        &BTreeMap::new(),
        &BTreeSet::new(),
        &cfg(),
    ));
    assert_eq!(a[&ip("172.18.0.100")], "node1");
    assert_eq!(a[&ip("172.18.0.101")], "node2");
    assert_eq!(a[&ip("172.18.0.102")], "node3");
    assert_eq!(a[&ip("172.18.0.110")], "node1");
    assert_eq!(a[&ip("172.18.0.111")], "node2");
    // A fourth IP of `a` has nowhere to go: every capable node holds one.
    let eips = [simple(
        "a",
        "2026-01-01T00:00:00Z",
        &[
            "172.18.0.100",
            "172.18.0.101",
            "172.18.0.102",
            "172.18.0.103",
        ],
    )];
    let c = check_all(&eips, &nodes(), &cfg());
    let r = assign(&c, &nodes(), &BTreeMap::new(), &BTreeSet::new(), &cfg());
    let p = r[&ip("172.18.0.103")].clone().unwrap_err();
    assert_eq!(p.reason, "NoAvailableNode");
    assert!(
        p.message
            .contains("node1 (holds another IP of this EgressIP)"),
        "{}",
        p.message
    );
    assert!(
        !p.message.contains("node4"),
        "unlabeled nodes are no candidates"
    );
}

#[test]
fn assignment_is_stable_across_unrelated_changes() {
    let eips = vec![simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"])];
    let c = check_all(&eips, &nodes(), &cfg());
    // Placed on node3 earlier (e.g. node1 was down then): it stays there even
    // though node1 and node2 now hold fewer IPs.
    let prev = BTreeMap::from([(ip("172.18.0.100"), "node3".to_string())]);
    let mut more_eips = eips.clone();
    more_eips.push(simple("b", "2026-01-02T00:00:00Z", &["172.18.0.110"]));
    let c2 = check_all(&more_eips, &nodes(), &cfg());
    for c in [&c, &c2] {
        let a = assigned(&assign(c, &nodes(), &prev, &BTreeSet::new(), &cfg()));
        assert_eq!(a[&ip("172.18.0.100")], "node3");
    }
}

#[test]
fn failed_node_loses_its_ips_and_gets_none_back_when_it_returns() {
    let eips = [
        simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"]),
        simple("b", "2026-01-02T00:00:00Z", &["172.18.0.110"]),
    ];
    let c = check_all(&eips, &nodes(), &cfg());
    let first = assigned(&assign(
        &c,
        &nodes(),
        &BTreeMap::new(),
        &BTreeSet::new(),
        &cfg(),
    ));
    assert_eq!(first[&ip("172.18.0.100")], "node1");
    assert_eq!(first[&ip("172.18.0.110")], "node2");

    // node1 stops answering probes: its IP moves, the other stays.
    let down = BTreeSet::from(["node1".to_string()]);
    let second = assigned(&assign(&c, &nodes(), &first, &down, &cfg()));
    assert_eq!(second[&ip("172.18.0.100")], "node3");
    assert_eq!(second[&ip("172.18.0.110")], "node2");

    // node1 is back: no failback.
    let third = assigned(&assign(&c, &nodes(), &second, &BTreeSet::new(), &cfg()));
    assert_eq!(third, second);
}

#[test]
fn not_ready_and_cordoned_nodes_hand_over() {
    let eips = [simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"])];
    let prev = BTreeMap::from([(ip("172.18.0.100"), "node1".to_string())]);
    let mut ns = nodes();
    ns[0].ready = false;
    let c = check_all(&eips, &ns, &cfg());
    assert_eq!(
        assigned(&assign(&c, &ns, &prev, &BTreeSet::new(), &cfg()))[&ip("172.18.0.100")],
        "node2"
    );
    let mut ns = nodes();
    ns[0].unschedulable = true;
    assert_eq!(
        assigned(&assign(&c, &ns, &prev, &BTreeSet::new(), &cfg()))[&ip("172.18.0.100")],
        "node2"
    );
}

#[test]
fn relabeled_node_loses_its_ips() {
    let eips = [simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"])];
    let prev = BTreeMap::from([(ip("172.18.0.100"), "node1".to_string())]);
    let mut ns = nodes();
    ns[0].labels.remove(EA);
    let c = check_all(&eips, &ns, &cfg());
    assert_eq!(
        assigned(&assign(&c, &ns, &prev, &BTreeSet::new(), &cfg()))[&ip("172.18.0.100")],
        "node2"
    );
}

#[test]
fn ip_only_goes_where_a_subnet_holds_it() {
    let eips = [simple("a", "2026-01-01T00:00:00Z", &["192.168.50.100"])];
    let c = check_all(&eips, &nodes(), &cfg());
    let a = assign(&c, &nodes(), &BTreeMap::new(), &BTreeSet::new(), &cfg());
    assert_eq!(a[&ip("192.168.50.100")], Ok("node3".into()));
    let down = BTreeSet::from(["node3".to_string()]);
    let a = assign(&c, &nodes(), &BTreeMap::new(), &down, &cfg());
    assert!(
        a[&ip("192.168.50.100")]
            .clone()
            .unwrap_err()
            .message
            .contains("node3 (unreachable)")
    );
}

#[test]
fn policy_ids_are_stable_lowest_free_and_released() {
    let eips = [
        simple(
            "a",
            "2026-01-01T00:00:00Z",
            &["172.18.0.100", "172.18.0.101"],
        ),
        simple("b", "2026-01-02T00:00:00Z", &["172.18.0.110"]),
    ];
    let c = check_all(&eips, &nodes(), &cfg());
    let ids = allocate_ids(&c, &BTreeMap::new(), &space());
    assert_eq!(ids[&ip("172.18.0.100")], 1);
    assert_eq!(ids[&ip("172.18.0.101")], 2);
    assert_eq!(ids[&ip("172.18.0.110")], 3);

    // a's second IP is removed; a new resource appears: it reuses id 2, and
    // b keeps 3.
    let prev: BTreeMap<(String, Ipv4Addr), PolicyId> = BTreeMap::from([
        (("a".into(), ip("172.18.0.100")), 1),
        (("a".into(), ip("172.18.0.101")), 2),
        (("b".into(), ip("172.18.0.110")), 3),
    ]);
    let eips = [
        simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"]),
        simple("b", "2026-01-02T00:00:00Z", &["172.18.0.110"]),
        simple("c", "2026-01-03T00:00:00Z", &["172.18.0.120"]),
    ];
    let c = check_all(&eips, &nodes(), &cfg());
    let ids = allocate_ids(&c, &prev, &space());
    assert_eq!(ids.get(&ip("172.18.0.101")), None);
    assert_eq!(ids[&ip("172.18.0.110")], 3);
    assert_eq!(ids[&ip("172.18.0.120")], 2);
}

#[test]
fn duplicate_or_out_of_range_ids_in_status_are_reallocated() {
    let eips = [
        simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"]),
        simple(
            "b",
            "2026-01-02T00:00:00Z",
            &["172.18.0.110", "172.18.0.111"],
        ),
    ];
    let prev = BTreeMap::from([
        (("a".into(), ip("172.18.0.100")), 7),
        (("b".into(), ip("172.18.0.110")), 7),
        (
            ("b".into(), ip("172.18.0.111")),
            egress_model::MAX_POLICY_ID + 1,
        ),
    ]);
    let c = check_all(&eips, &nodes(), &cfg());
    let ids = allocate_ids(&c, &prev, &space());
    assert_eq!(ids[&ip("172.18.0.100")], 7);
    assert_eq!(ids[&ip("172.18.0.110")], 1);
    assert_eq!(ids[&ip("172.18.0.111")], 2);
}

#[test]
fn previous_assignment_is_read_from_ovn_style_items_and_our_ips() {
    let mut a = simple(
        "a",
        "2026-01-01T00:00:00Z",
        &["172.18.0.100", "172.18.0.101"],
    );
    a.status = Some(
        serde_json::from_value(json!({
            "items": [{"node": "node2", "egressIP": "172.18.0.100"}],
            "ips": [{"egressIP": "172.18.0.100", "policyId": 4, "node": "node2", "conditions": []},
                    {"egressIP": "172.18.0.101", "policyId": 5, "conditions": []}]
        }))
        .unwrap(),
    );
    let (nodes, ids) = previous_from_status(&[a]);
    assert_eq!(
        nodes,
        BTreeMap::from([(ip("172.18.0.100"), "node2".to_string())])
    );
    assert_eq!(ids[&("a".to_string(), ip("172.18.0.101"))], 5);
}

fn ns_labels(pairs: &[(&str, &[(&str, &str)])]) -> BTreeMap<String, BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|(n, l)| {
            let mut labels: BTreeMap<String, String> = l
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            labels.insert("kubernetes.io/metadata.name".into(), n.to_string());
            (n.to_string(), labels)
        })
        .collect()
}

fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> PodInfo {
    PodInfo::from_pod(&fixtures::pod(ns, name, "node1", ip, labels)).unwrap()
}

#[test]
fn pods_matched_by_several_resources_use_the_oldest() {
    let broad = eip(
        "all-prod",
        "2026-03-01T00:00:00Z",
        json!({"egressIPs": ["172.18.0.100"],
        "namespaceSelector": {"matchLabels": {"env": "prod"}}}),
    );
    let narrow = eip(
        "web",
        "2026-01-01T00:00:00Z",
        json!({"egressIPs": ["172.18.0.101"],
        "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]}]},
        "podSelector": {"matchLabels": {"app": "web"}}}),
    );
    let c = check_all(&[broad, narrow], &nodes(), &cfg());
    let namespaces = ns_labels(&[
        ("shop", &[("env", "prod")]),
        ("billing", &[("env", "prod")]),
        ("dev", &[]),
    ]);
    let pods = [
        pod("shop", "web-1", "10.244.1.5", &[("app", "web")]),
        pod("shop", "db-0", "10.244.1.6", &[("app", "db")]),
        pod("billing", "api-1", "10.244.1.7", &[("app", "web")]),
        pod("dev", "web-1", "10.244.1.8", &[("app", "web")]),
        pod("unknown-ns", "x", "10.244.1.9", &[]),
    ];
    let s = select_pods(&c, &namespaces, &pods);
    let name_of = |ip_s: &str| s.winner.get(&ip(ip_s)).map(|i| c[*i].name.as_str());
    assert_eq!(name_of("10.244.1.5"), Some("web"));
    assert_eq!(name_of("10.244.1.6"), Some("all-prod"));
    assert_eq!(name_of("10.244.1.7"), Some("all-prod"));
    assert_eq!(name_of("10.244.1.8"), None);
    assert_eq!(name_of("10.244.1.9"), None);
    assert_eq!(
        s.shadowed["all-prod"],
        [("shop/web-1".to_string(), "web".to_string())]
    );
    assert!(!s.shadowed.contains_key("web"));
}

#[test]
fn relabeled_namespace_changes_selection() {
    let e = simple("a", "2026-01-01T00:00:00Z", &["172.18.0.100"]);
    let c = check_all(&[e], &nodes(), &cfg());
    let pods = [pod("shop", "web-1", "10.244.1.5", &[])];
    assert!(
        select_pods(&c, &ns_labels(&[("shop", &[("team", "b")])]), &pods)
            .winner
            .is_empty()
    );
    assert_eq!(
        select_pods(&c, &ns_labels(&[("shop", &[("team", "a")])]), &pods)
            .winner
            .len(),
        1
    );
}

fn cond<'a>(conds: &'a [Condition], t: &str) -> &'a Condition {
    conds.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn status_reports_assignment_claims_conflicts_and_shadowing() {
    let a = simple(
        "a",
        "2026-01-01T00:00:00Z",
        &["172.18.0.100", "172.18.0.101", "bogus"],
    );
    let b = simple("b", "2026-01-02T00:00:00Z", &["172.18.0.100"]);
    let c = check_all(&[a, b], &nodes(), &cfg());
    let assignments = assign(&c, &nodes(), &BTreeMap::new(), &BTreeSet::new(), &cfg());
    let ids = allocate_ids(&c, &BTreeMap::new(), &space());
    // node1 claims .100; node3 (previous holder) still claims .101, which now goes to node2.
    let claims = BTreeMap::from([
        (ip("172.18.0.100"), BTreeSet::from(["node1".to_string()])),
        (ip("172.18.0.101"), BTreeSet::from(["node3".to_string()])),
    ]);
    let selection = Selection {
        winner: BTreeMap::new(),
        shadowed: BTreeMap::from([(
            "b".to_string(),
            vec![("shop/web-1".to_string(), "a".to_string())],
        )]),
    };
    let now: Timestamp = "2026-05-01T12:00:00Z".parse().unwrap();
    let st = |i: usize, previous: Option<&EgressIPStatus>, now| {
        build_status(&StatusInput {
            checked: &c[i],
            assignments: &assignments,
            ids: &ids,
            claims: &claims,
            selection: &selection,
            previous,
            now,
            shortage: None,
            apply_failures: &BTreeMap::new(),
        })
    };
    let sa = st(0, None, now);
    assert_eq!(
        sa.items,
        [
            EgressIPStatusItem {
                node: "node1".into(),
                egress_ip: "172.18.0.100".into()
            },
            EgressIPStatusItem {
                node: "node2".into(),
                egress_ip: "172.18.0.101".into()
            },
        ]
    );
    assert_eq!(sa.ips[0].policy_id, Some(1));
    assert_eq!(cond(&sa.ips[0].conditions, "Assigned").status, "True");
    assert_eq!(cond(&sa.ips[0].conditions, "Announced").reason, "Claimed");
    let waiting = cond(&sa.ips[1].conditions, "Announced");
    assert_eq!(waiting.reason, "WaitingForRelease");
    assert!(
        waiting.message.contains("node3 releases"),
        "{}",
        waiting.message
    );
    assert_eq!(cond(&sa.ips[2].conditions, "Invalid").reason, "MalformedIP");
    assert_eq!(sa.ips[2].policy_id, None);
    assert_eq!(cond(&sa.conditions, "Conflict").status, "False");
    assert_eq!(sa.observed_generation, Some(1));

    let sb = st(1, None, now);
    assert!(sb.items.is_empty());
    assert_eq!(
        cond(&sb.ips[0].conditions, "Conflict").reason,
        "DuplicateEgressIP"
    );
    assert_eq!(cond(&sb.ips[0].conditions, "Assigned").status, "False");
    let shadow = cond(&sb.conditions, "Conflict");
    assert_eq!(shadow.reason, "PodsSelectedByOlderEgressIP");
    assert!(
        shadow.message.contains("1 selected pod(s) use EgressIP a"),
        "{}",
        shadow.message
    );

    // Recomputing later with nothing changed yields an identical status, so
    // the assigner writes nothing.
    let later: Timestamp = "2026-05-01T12:05:00Z".parse().unwrap();
    assert_eq!(st(0, Some(&sa), later), sa);
}

#[test]
fn status_reports_exhausted_ids_and_nodes_that_failed_to_apply() {
    let a = simple(
        "a",
        "2026-01-01T00:00:00Z",
        &["172.18.0.100", "172.18.0.101"],
    );
    let c = check_all(&[a], &nodes(), &cfg());
    let assignments = assign(&c, &nodes(), &BTreeMap::new(), &BTreeSet::new(), &cfg());
    // max_policies = 2: one id for two IPs.
    let space = IdSpace::new(2, BTreeSet::new());
    let ids = allocate_ids(&c, &BTreeMap::new(), &space);
    let shortage = ids::shortage(&ids, &space);
    let failures = BTreeMap::from([(
        1,
        vec![(
            "node2".to_string(),
            "map policies_v4: the index 1 is out of bounds".to_string(),
        )],
    )]);
    let st = build_status(&StatusInput {
        checked: &c[0],
        assignments: &assignments,
        ids: &ids,
        claims: &BTreeMap::new(),
        selection: &Selection::default(),
        previous: None,
        now: "2026-05-01T12:00:00Z".parse().unwrap(),
        shortage: Some(&shortage),
        apply_failures: &failures,
    });
    let cond = |i: usize, t: &str| {
        st.ips[i]
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(st.ips[0].policy_id, Some(1));
    let applied = cond(0, "Applied");
    assert_eq!(
        (applied.status.as_str(), applied.reason.as_str()),
        ("False", "ApplyFailed")
    );
    assert!(
        applied.message.contains("node node2: map policies_v4"),
        "{}",
        applied.message
    );
    // The second IP has no id: not assigned to any node, and says why.
    assert_eq!(st.ips[1].policy_id, None);
    assert_eq!(st.ips[1].node, None);
    let assigned = cond(1, "Assigned");
    assert_eq!(
        (assigned.status.as_str(), assigned.reason.as_str()),
        ("False", "NoPolicyId")
    );
    assert!(
        assigned.message.contains("max_policies = 2"),
        "{}",
        assigned.message
    );
    assert_eq!(st.items.len(), 1, "only the IP with an id is in items");
    assert_eq!(cond(1, "Applied").reason, "NotApplied");
}

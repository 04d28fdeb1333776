//! The assigner's pure decisions: validation, precedence, placement, policy
//! ids and the status that reports them.
//!
//! Everything here is a function of the cluster objects (plus the previous
//! status, for stability), so that any agent elected assigner reaches the
//! same result, and node agents can re-derive the validity of what status
//! tells them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use egress_model::{FailurePolicy, PolicyId};
use ipnet::Ipv4Net;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::{
    crd::{EgressIP, EgressIPAddressStatus, EgressIPStatus, EgressIPStatusItem, condition},
    facts::{NodeInfo, PodInfo},
    ids::{self, IdSpace},
    selector::Selector,
};

/// Settings shared by the assigner and the node agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Nodes need this label (any value) to hold egress IPs.
    pub assignable_label: String,
    /// The nodes' `[datapath] max_policies`: policy ids are below it.
    pub max_policies: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            assignable_label: crate::facts::DEFAULT_ASSIGNABLE_LABEL.to_string(),
            max_policies: egress_common::maps::DEFAULT_MAX_POLICIES,
        }
    }
}

/// A condition reason and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpVerdict {
    Valid(Ipv4Addr),
    Invalid(Problem),
    Conflict(Problem),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpEntry {
    /// As written in `spec.egressIPs`.
    pub raw: String,
    pub verdict: IpVerdict,
}

/// One EgressIP after validation.
#[derive(Clone, Debug)]
pub struct Checked {
    pub name: String,
    pub generation: Option<i64>,
    /// Resource-level problem: nothing of the resource is applied.
    pub invalid: Option<Problem>,
    pub namespace_selector: Selector,
    pub pod_selector: Selector,
    pub node_selector: Selector,
    pub excluded: BTreeSet<Ipv4Net>,
    pub failure_policy: FailurePolicy,
    pub interface: Option<String>,
    pub ips: Vec<IpEntry>,
}

impl Checked {
    pub fn valid_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ips.iter().filter_map(|e| match e.verdict {
            IpVerdict::Valid(ip) => Some(ip),
            _ => None,
        })
    }

    /// Whether `node` may hold this resource's IPs at all (label and
    /// `nodeSelector`), regardless of its health.
    pub fn node_eligible(&self, node: &NodeInfo, cfg: &PlanConfig) -> bool {
        node.labels.contains_key(&cfg.assignable_label)
            && self.node_selector.matches(Some(&node.labels))
    }
}

/// The documented precedence among EgressIPs: oldest `creationTimestamp`
/// first, then name. It decides which resource keeps a contested IP and which
/// one a pod selected by several uses.
pub fn precedence(eips: &[EgressIP]) -> Vec<&EgressIP> {
    let mut v: Vec<&EgressIP> = eips.iter().collect();
    v.sort_by(|a, b| {
        let key = |e: &EgressIP| {
            (
                e.metadata.creation_timestamp.as_ref().map(|t| t.0),
                e.metadata.name.clone().unwrap_or_default(),
            )
        };
        let (ta, na) = key(a);
        let (tb, nb) = key(b);
        // A missing timestamp (not yet persisted) sorts as the newest.
        (ta.is_none(), ta, na).cmp(&(tb.is_none(), tb, nb))
    });
    v
}

fn parse_interface(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err("must be 1 to 15 characters".into());
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err("must not contain '/', ':' or whitespace".into());
    }
    Ok(())
}

/// Resource-level checks: selectors, CIDRs, interface.
fn check_resource(
    eip: &EgressIP,
) -> Result<(Selector, Selector, Selector, BTreeSet<Ipv4Net>), Problem> {
    let spec = &eip.spec;
    let bad_selector = |field: &str, e: crate::selector::SelectorError| {
        Problem::new("InvalidSelector", format!("spec.{field}: {e}"))
    };
    let ns = Selector::parse(&spec.namespace_selector)
        .map_err(|e| bad_selector("namespaceSelector", e))?;
    let pod = Selector::parse_optional(spec.pod_selector.as_ref())
        .map_err(|e| bad_selector("podSelector", e))?;
    let node = Selector::parse_optional(spec.node_selector.as_ref())
        .map_err(|e| bad_selector("nodeSelector", e))?;
    let mut excluded = BTreeSet::new();
    for (i, raw) in spec.excluded_cidrs.iter().enumerate() {
        let net = raw
            .parse::<Ipv4Net>()
            .or_else(|_| raw.parse::<Ipv4Addr>().map(Ipv4Net::from))
            .map_err(|_| {
                Problem::new(
                    "InvalidCIDR",
                    format!("spec.excludedCIDRs[{i}] {raw:?} is not an IPv4 CIDR"),
                )
            })?;
        excluded.insert(net.trunc());
    }
    if let Some(ifname) = &spec.interface {
        parse_interface(ifname).map_err(|why| {
            Problem::new(
                "InvalidInterface",
                format!("spec.interface {ifname:?} {why}"),
            )
        })?;
    }
    Ok((ns, pod, node, excluded))
}

fn parse_ip(raw: &str) -> Result<Ipv4Addr, Problem> {
    match raw.trim().parse::<Ipv4Addr>() {
        Ok(ip)
            if ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.is_link_local() =>
        {
            Err(Problem::new(
                "UnusableIP",
                format!("{raw} is not a unicast address usable on a node network"),
            ))
        }
        Ok(ip) => Ok(ip),
        Err(_) if raw.parse::<Ipv6Addr>().is_ok() => Err(Problem::new(
            "UnsupportedFamily",
            format!("{raw} is IPv6; only IPv4 egress IPs are supported"),
        )),
        Err(_) => Err(Problem::new(
            "MalformedIP",
            format!("{raw:?} is not an IPv4 address"),
        )),
    }
}

/// Validates every EgressIP against the others and the nodes. The result is
/// in precedence order.
pub fn check_all(eips: &[EgressIP], nodes: &[NodeInfo], cfg: &PlanConfig) -> Vec<Checked> {
    let node_addrs: BTreeMap<Ipv4Addr, &str> = nodes
        .iter()
        .flat_map(|n| n.addresses.iter().map(|a| (*a, n.name.as_str())))
        .collect();
    let mut owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut out = Vec::new();
    for eip in precedence(eips) {
        let name = eip.metadata.name.clone().unwrap_or_default();
        let resource = check_resource(eip);
        let (invalid, (namespace_selector, pod_selector, node_selector, excluded)) = match resource
        {
            Ok(parts) => (None, parts),
            Err(p) => (
                Some(p),
                (
                    Selector::everything(),
                    Selector::everything(),
                    Selector::everything(),
                    BTreeSet::new(),
                ),
            ),
        };
        let mut checked = Checked {
            name: name.clone(),
            generation: eip.metadata.generation,
            invalid,
            namespace_selector,
            pod_selector,
            node_selector,
            excluded,
            failure_policy: eip.spec.failure_policy.into(),
            interface: eip.spec.interface.clone(),
            ips: Vec::new(),
        };
        let mut seen = BTreeSet::new();
        for raw in &eip.spec.egress_ips {
            let verdict = if let Some(p) = &checked.invalid {
                IpVerdict::Invalid(Problem::new(
                    "ResourceInvalid",
                    format!("not applied: {}", p.message),
                ))
            } else {
                match parse_ip(raw) {
                    Err(p) => IpVerdict::Invalid(p),
                    Ok(ip) if !seen.insert(ip) => IpVerdict::Invalid(Problem::new(
                        "DuplicateInSpec",
                        format!("{ip} is listed more than once in spec.egressIPs"),
                    )),
                    Ok(ip) => {
                        if let Some(node) = node_addrs.get(&ip) {
                            IpVerdict::Conflict(Problem::new(
                                "NodeAddress",
                                format!("{ip} is an address of node {node}"),
                            ))
                        } else if let Some(other) = owner.get(&ip) {
                            IpVerdict::Conflict(Problem::new(
                                "DuplicateEgressIP",
                                format!(
                                    "{ip} is already used by EgressIP {other}, which takes precedence (older, or same age and name sorts first)"
                                ),
                            ))
                        } else {
                            owner.insert(ip, name.clone());
                            let holders = nodes
                                .iter()
                                .filter(|n| checked.node_eligible(n, cfg) && n.can_hold(ip))
                                .count();
                            if holders == 0 {
                                IpVerdict::Invalid(Problem::new(
                                    "NoEligibleSubnet",
                                    format!(
                                        "no node labeled {}{} publishes a subnet containing {ip}",
                                        cfg.assignable_label,
                                        if eip.spec.node_selector.is_some() {
                                            " and matching spec.nodeSelector"
                                        } else {
                                            ""
                                        }
                                    ),
                                ))
                            } else {
                                IpVerdict::Valid(ip)
                            }
                        }
                    }
                }
            };
            checked.ips.push(IpEntry {
                raw: raw.clone(),
                verdict,
            });
        }
        out.push(checked);
    }
    out
}

/// Which EgressIP each selected pod uses, and which resources lost pods to an
/// older one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Pod IP -> index into the `Checked` slice.
    pub winner: BTreeMap<Ipv4Addr, usize>,
    /// Loser resource name -> (pod `namespace/name`, winner resource name).
    pub shadowed: BTreeMap<String, Vec<(String, String)>>,
}

/// Applies the selectors. Resources with a resource-level problem select
/// nothing; among the others the first in precedence order wins.
///
/// The namespace selectors are evaluated once per namespace, not once per
/// pod: node agents select over every pod of the cluster.
pub fn select_pods(
    checked: &[Checked],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    pods: &[PodInfo],
) -> Selection {
    let mut sel = Selection::default();
    // Namespace -> the resources whose namespace selector matches it.
    let mut candidates: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for pod in pods {
        let Some(ns_labels) = namespaces.get(&pod.namespace) else {
            continue;
        };
        let of_namespace = candidates.entry(&pod.namespace).or_insert_with(|| {
            checked
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.invalid.is_none() && c.namespace_selector.matches(Some(ns_labels))
                })
                .map(|(i, _)| i)
                .collect()
        });
        let mut matching = of_namespace
            .iter()
            .map(|i| (*i, &checked[*i]))
            .filter(|(_, c)| c.pod_selector.matches(Some(&pod.labels)));
        let Some((wi, w)) = matching.next() else {
            continue;
        };
        sel.winner.insert(pod.ip, wi);
        for (_, loser) in matching {
            sel.shadowed
                .entry(loser.name.clone())
                .or_default()
                .push((format!("{}/{}", pod.namespace, pod.name), w.name.clone()));
        }
    }
    sel
}

/// Where each valid IP goes: a node name, or why none.
pub type Assignments = BTreeMap<Ipv4Addr, Result<String, Problem>>;

/// Places every valid IP on a node.
///
/// - A node can hold an IP when it carries the assignable label, matches the
///   resource's `nodeSelector`, publishes a subnet containing the IP, is
///   `Ready`, not cordoned, and not in `down` (failed our direct probes).
/// - An IP stays where `previous` put it while that node can still hold it:
///   unrelated changes never move IPs, and a node that comes back gets only
///   new work (no failback).
/// - Otherwise it goes to the node holding the fewest IPs (then by name), never
///   to a node that already holds another IP of the same resource.
pub fn assign(
    checked: &[Checked],
    nodes: &[NodeInfo],
    previous: &BTreeMap<Ipv4Addr, String>,
    down: &BTreeSet<String>,
    cfg: &PlanConfig,
) -> Assignments {
    let live = |n: &NodeInfo| n.ready && !n.unschedulable && !down.contains(&n.name);
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
    let mut out = Assignments::new();
    let mut used: Vec<BTreeSet<String>> = vec![BTreeSet::new(); checked.len()];

    for (ci, c) in checked.iter().enumerate() {
        for ip in c.valid_ips() {
            let Some(prev) = previous.get(&ip) else {
                continue;
            };
            let Some(node) = nodes.iter().find(|n| &n.name == prev) else {
                continue;
            };
            if c.node_eligible(node, cfg)
                && node.can_hold(ip)
                && live(node)
                && !used[ci].contains(prev)
            {
                used[ci].insert(prev.clone());
                *load
                    .get_mut(node.name.as_str())
                    .expect("every node has a load") += 1;
                out.insert(ip, Ok(prev.clone()));
            }
        }
    }
    for (ci, c) in checked.iter().enumerate() {
        for ip in c.valid_ips() {
            if out.contains_key(&ip) {
                continue;
            }
            let capable: Vec<&NodeInfo> = nodes
                .iter()
                .filter(|n| c.node_eligible(n, cfg) && n.can_hold(ip))
                .collect();
            let best = capable
                .iter()
                .filter(|n| live(n) && !used[ci].contains(&n.name))
                .min_by_key(|n| (load[n.name.as_str()], n.name.as_str()));
            let result = match best {
                Some(n) => {
                    used[ci].insert(n.name.clone());
                    *load
                        .get_mut(n.name.as_str())
                        .expect("every node has a load") += 1;
                    Ok(n.name.clone())
                }
                None => Err(explain_unplaced(ip, &capable, &used[ci], down)),
            };
            out.insert(ip, result);
        }
    }
    out
}

fn explain_unplaced(
    ip: Ipv4Addr,
    capable: &[&NodeInfo],
    used: &BTreeSet<String>,
    down: &BTreeSet<String>,
) -> Problem {
    let why: Vec<String> = capable
        .iter()
        .map(|n| {
            let state = if down.contains(&n.name) {
                "unreachable"
            } else if !n.ready {
                "not Ready"
            } else if n.unschedulable {
                "cordoned"
            } else if used.contains(&n.name) {
                "holds another IP of this EgressIP"
            } else {
                "unavailable"
            };
            format!("{} ({state})", n.name)
        })
        .collect();
    Problem::new(
        "NoAvailableNode",
        format!(
            "no node can hold {ip} now; candidate nodes: {}",
            why.join(", ")
        ),
    )
}

/// The policy id of every valid IP, within `space` (see [`ids::allocate`]).
pub fn allocate_ids(
    checked: &[Checked],
    previous: &BTreeMap<(String, Ipv4Addr), PolicyId>,
    space: &IdSpace,
) -> BTreeMap<Ipv4Addr, PolicyId> {
    ids::allocate(checked, previous, space)
}

/// The assignment and ids recorded in existing statuses.
pub fn previous_from_status(
    eips: &[EgressIP],
) -> (
    BTreeMap<Ipv4Addr, String>,
    BTreeMap<(String, Ipv4Addr), PolicyId>,
) {
    let mut nodes = BTreeMap::new();
    let mut ids = BTreeMap::new();
    for eip in precedence(eips) {
        let name = eip.metadata.name.clone().unwrap_or_default();
        let Some(status) = &eip.status else { continue };
        // OVN-K statuses only have items: honour them when migrating.
        for item in &status.items {
            if let Ok(ip) = item.egress_ip.parse::<Ipv4Addr>() {
                nodes.entry(ip).or_insert_with(|| item.node.clone());
            }
        }
        for s in &status.ips {
            let Ok(ip) = s.egress_ip.parse::<Ipv4Addr>() else {
                continue;
            };
            if let Some(id) = s.policy_id {
                ids.insert((name.clone(), ip), id);
            }
        }
    }
    (nodes, ids)
}

/// Everything needed to write one resource's status.
pub struct StatusInput<'a> {
    pub checked: &'a Checked,
    pub assignments: &'a Assignments,
    pub ids: &'a BTreeMap<Ipv4Addr, PolicyId>,
    /// IP -> nodes whose claim on it is live.
    pub claims: &'a BTreeMap<Ipv4Addr, BTreeSet<String>>,
    pub selection: &'a Selection,
    pub previous: Option<&'a EgressIPStatus>,
    pub now: Timestamp,
    /// Why valid IPs without an id got none (the id space is exhausted).
    pub shortage: Option<&'a Problem>,
    /// Policy id -> (node, error) for each node that failed to program it.
    pub apply_failures: &'a BTreeMap<PolicyId, Vec<(String, String)>>,
}

struct Conds<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
    out: Vec<Condition>,
}

impl Conds<'_> {
    fn set(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let status = if status { "True" } else { "False" };
        // The transition time only moves when the status does, as
        // `kubectl wait` and humans expect.
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(self.now));
        self.out.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: self.generation,
            last_transition_time,
        });
    }
}

/// Builds the status of one resource.
pub fn build_status(input: &StatusInput<'_>) -> EgressIPStatus {
    let c = input.checked;
    let mut items = Vec::new();
    let mut ips = Vec::new();
    for entry in &c.ips {
        let prev_conds = input
            .previous
            .and_then(|p| p.ips.iter().find(|s| s.egress_ip == entry.raw))
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let mut conds = Conds {
            previous: prev_conds,
            generation: c.generation,
            now: input.now,
            out: Vec::new(),
        };
        let mut node = None;
        let mut policy_id = None;
        match &entry.verdict {
            IpVerdict::Invalid(p) => {
                conds.set(
                    condition::ASSIGNED,
                    false,
                    "Invalid",
                    "not assigned: the IP is invalid".into(),
                );
                conds.set(condition::ANNOUNCED, false, "NotAssigned", String::new());
                conds.set(condition::CONFLICT, false, "NoConflict", String::new());
                conds.set(condition::INVALID, true, p.reason, p.message.clone());
            }
            IpVerdict::Conflict(p) => {
                conds.set(
                    condition::ASSIGNED,
                    false,
                    "Conflict",
                    "not assigned: the IP conflicts".into(),
                );
                conds.set(condition::ANNOUNCED, false, "NotAssigned", String::new());
                conds.set(condition::CONFLICT, true, p.reason, p.message.clone());
                conds.set(condition::INVALID, false, "Valid", String::new());
            }
            IpVerdict::Valid(ip) => {
                policy_id = input.ids.get(ip).copied();
                let live: BTreeSet<String> = input.claims.get(ip).cloned().unwrap_or_default();
                let unplaceable = policy_id.is_none().then_some(input.shortage).flatten();
                match unplaceable
                    .map(Err)
                    .or(input.assignments.get(ip).map(|a| a.as_ref()))
                {
                    Some(Err(p)) => {
                        conds.set(condition::ASSIGNED, false, p.reason, p.message.clone());
                        conds.set(condition::ANNOUNCED, false, "NotAssigned", String::new());
                    }
                    Some(Ok(n)) => {
                        node = Some(n.clone());
                        items.push(EgressIPStatusItem {
                            node: n.clone(),
                            egress_ip: ip.to_string(),
                        });
                        conds.set(
                            condition::ASSIGNED,
                            true,
                            "Assigned",
                            format!("{ip} is assigned to node {n}"),
                        );
                        let others: Vec<&String> = live.iter().filter(|h| *h != n).collect();
                        if live.contains(n) && others.is_empty() {
                            conds.set(
                                condition::ANNOUNCED,
                                true,
                                "Claimed",
                                format!("node {n} holds and has announced {ip}"),
                            );
                        } else if !others.is_empty() {
                            conds.set(
                                condition::ANNOUNCED,
                                false,
                                "WaitingForRelease",
                                format!(
                                    "node {n} waits until {} releases {ip} or its claim expires",
                                    others
                                        .iter()
                                        .map(|s| s.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            );
                        } else {
                            conds.set(
                                condition::ANNOUNCED,
                                false,
                                "WaitingForClaim",
                                format!("node {n} has not claimed {ip} yet"),
                            );
                        }
                    }
                    None => {
                        conds.set(condition::ASSIGNED, false, "Pending", String::new());
                        conds.set(condition::ANNOUNCED, false, "NotAssigned", String::new());
                    }
                }
                conds.set(condition::CONFLICT, false, "NoConflict", String::new());
                conds.set(condition::INVALID, false, "Valid", String::new());
            }
        }
        match policy_id.map(|id| (id, input.apply_failures.get(&id))) {
            Some((id, Some(failures))) => conds.set(
                condition::APPLIED,
                false,
                "ApplyFailed",
                format!(
                    "policy {id} could not be programmed on {}",
                    failures
                        .iter()
                        .map(|(node, e)| format!("node {node}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ),
            Some(_) => conds.set(condition::APPLIED, true, "NoFailures", String::new()),
            None => conds.set(condition::APPLIED, false, "NotApplied", String::new()),
        }
        ips.push(EgressIPAddressStatus {
            egress_ip: entry.raw.clone(),
            policy_id,
            node,
            conditions: conds.out,
        });
    }
    let mut conds = Conds {
        previous: input
            .previous
            .map(|p| p.conditions.as_slice())
            .unwrap_or_default(),
        generation: c.generation,
        now: input.now,
        out: Vec::new(),
    };
    match &c.invalid {
        Some(p) => conds.set(condition::INVALID, true, p.reason, p.message.clone()),
        None => conds.set(condition::INVALID, false, "Valid", String::new()),
    }
    match input.selection.shadowed.get(&c.name) {
        Some(lost) => {
            let winners: BTreeSet<&str> = lost.iter().map(|(_, w)| w.as_str()).collect();
            let sample: Vec<&str> = lost.iter().take(5).map(|(p, _)| p.as_str()).collect();
            conds.set(
                condition::CONFLICT,
                true,
                "PodsSelectedByOlderEgressIP",
                format!(
                    "{} selected pod(s) use EgressIP {} instead, which takes precedence (older, then name): {}{}",
                    lost.len(),
                    winners.into_iter().collect::<Vec<_>>().join(", "),
                    sample.join(", "),
                    if lost.len() > sample.len() { ", ..." } else { "" }
                ),
            );
        }
        None => conds.set(condition::CONFLICT, false, "NoConflict", String::new()),
    }
    items.sort();
    EgressIPStatus {
        items,
        ips,
        conditions: conds.out,
        observed_generation: c.generation,
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

//! The exact contents the datapath's control maps should hold: a pure
//! function of the desired [`NodeState`], of this node's [`Environment`]
//! (datapath settings, tunnel, claim fence) and of what its network stack
//! says ([`HostFacts`]: pod interfaces, upstream devices, node addresses).
//! The reconciler (`maps::reconcile`) compares it with the image read back
//! from the maps (`Maps::read_image`) and writes only the difference.

use std::collections::{BTreeMap, BTreeSet};

use egress_common::{DatapathConfig, NodeV4, PodPolicyV4, PolicyV4, RemotePodV4, policy_flags};
use egress_model::{FailurePolicy, NO_USABLE_IP, NodeState};

use egress_config::DatapathSettings;

use crate::host::HostFacts;

/// Facts about this node that the desired state does not carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Environment {
    pub tunnel_ifindex: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub max_flows: u64,
    /// 0: no per-pod cap.
    pub max_flows_per_pod: u32,
    /// `config_flags` bits.
    pub flags: u32,
    /// MSS that fits the tunnel: underlay MTU - VXLAN overhead - IP/TCP headers.
    pub tunnel_mss: u16,
    /// UDP port of the tunnel.
    pub tunnel_port: u16,
    /// Until when (CLOCK_MONOTONIC ns) this node may use the egress IPs it
    /// holds: `u64::MAX` with a static configuration; in Kubernetes mode the
    /// claim fence. Whoever moves the fence (`Maps::set_claims_valid_until`)
    /// updates this too, so that a reconcile never writes a stale stamp back.
    pub claims_valid_until_ns: u64,
}

impl Environment {
    /// The environment for `settings`, with the claims valid forever.
    pub fn new(
        settings: &DatapathSettings,
        tunnel_ifindex: u32,
        tunnel_mss: u16,
        tunnel_port: u16,
    ) -> Self {
        Self {
            tunnel_ifindex,
            nat_port_min: settings.nat_port_min,
            nat_port_max: settings.nat_port_max,
            max_flows: u64::from(settings.max_flows),
            max_flows_per_pod: settings.max_flows_per_pod,
            flags: settings.config_flags(),
            tunnel_mss,
            tunnel_port,
            claims_valid_until_ns: u64::MAX,
        }
    }

    /// This environment with the datapath settings of a reloaded file.
    pub fn with_settings(&self, settings: &DatapathSettings) -> Self {
        Self {
            claims_valid_until_ns: self.claims_valid_until_ns,
            ..Self::new(
                settings,
                self.tunnel_ifindex,
                self.tunnel_mss,
                self.tunnel_port,
            )
        }
    }
}

/// An exclusion as stored in the LPM trie: (policy id or 0, network, prefix length).
pub type Exclusion = (u32, [u8; 4], u8);

/// A pod CIDR as stored in its LPM trie: (network, prefix length).
pub type PodCidr = ([u8; 4], u8);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathImage {
    pub config: DatapathConfig,
    pub policies: BTreeMap<u32, PolicyV4>,
    pub pods: BTreeMap<[u8; 4], PodPolicyV4>,
    pub remote_pods: BTreeMap<[u8; 4], RemotePodV4>,
    /// Pod CIDR -> node address.
    pub pod_cidrs: BTreeMap<PodCidr, [u8; 4]>,
    /// Upstream devices' ifindexes (value 1).
    pub upstream: BTreeMap<u32, u32>,
    pub marks: BTreeMap<u32, u32>,
    pub vnis: BTreeMap<u32, u32>,
    pub exclusions: BTreeSet<Exclusion>,
    pub nodes: BTreeMap<[u8; 4], NodeV4>,
    pub egress_addrs: BTreeMap<[u8; 4], u32>,
}

impl DatapathImage {
    pub fn from_state(state: &NodeState, env: &Environment, host: &HostFacts) -> Self {
        let node_addr = state.node_addr.map(|a| a.octets()).unwrap_or_default();
        let mut image = Self {
            config: DatapathConfig {
                node_addr,
                tunnel_ifindex: env.tunnel_ifindex,
                nat_port_min: env.nat_port_min,
                nat_port_max: env.nat_port_max,
                tunnel_mss: env.tunnel_mss,
                tunnel_port: env.tunnel_port,
                max_flows: env.max_flows,
                max_flows_per_pod: env.max_flows_per_pod,
                flags: env.flags,
                claims_valid_until_ns: env.claims_valid_until_ns,
            },
            ..Default::default()
        };
        for node in &state.nodes {
            image.nodes.insert(
                node.octets(),
                NodeV4 {
                    is_self: u32::from(node.octets() == node_addr),
                    _reserved: 0,
                },
            );
            // Pod-to-node traffic (kubelet probes, NodePorts, node-local
            // services) is east-west: never translated, as in OVN-K.
            image.exclusions.insert((0, node.octets(), 32));
        }
        for (id, policy) in &state.policies {
            let local = state.is_local(policy);
            let mut flags = policy_flags::ACTIVE;
            if local {
                flags |= policy_flags::LOCAL;
                image.egress_addrs.insert(policy.egress_ip.octets(), *id);
            } else if env.tunnel_mss != 0 {
                flags |= policy_flags::CLAMP_MSS;
            }
            if policy.failure_policy == FailurePolicy::FailOpen {
                flags |= policy_flags::FAIL_OPEN;
            }
            if state.selected_by_node(*id) {
                flags |= policy_flags::SELECTED_BY_NODE;
            }
            image.policies.insert(
                *id,
                PolicyV4 {
                    egress_addr: policy.egress_ip.octets(),
                    egress_node: policy.egress_node.map(|n| n.octets()).unwrap_or_default(),
                    flags,
                    group: state.group_of(*id),
                },
            );
            // The policy's own id is the VNI that steers its traffic here;
            // the reserved slot steers nowhere.
            if *id != NO_USABLE_IP {
                image.vnis.insert(*id, *id);
            }
            for net in &policy.excluded {
                image
                    .exclusions
                    .insert((*id, net.network().octets(), net.prefix_len()));
            }
        }
        for net in &state.global_excluded {
            image
                .exclusions
                .insert((0, net.network().octets(), net.prefix_len()));
        }
        // Traffic to any address of this node (a node-local DNS cache, a
        // hostNetwork service on another interface) stays local.
        for addr in host.local_addrs.iter().filter(|a| !a.is_loopback()) {
            image.exclusions.insert((0, addr.octets(), 32));
        }
        image.vnis.extend(state.vnis.iter().map(|(v, p)| (*v, *p)));
        image
            .marks
            .extend(state.marks.iter().map(|(m, p)| (*m, *p)));
        for (pod, id) in &state.pods {
            image.pods.insert(
                pod.octets(),
                PodPolicyV4 {
                    policy_id: *id,
                    // Unresolved: 0, which no packet arrives on (fail-closed).
                    ifindex: host.pod_interfaces.get(pod).copied().unwrap_or(0),
                },
            );
        }
        for (pod, remote) in &state.remote_pods {
            image.remote_pods.insert(
                pod.octets(),
                RemotePodV4 {
                    policy_id: remote.policy,
                    node_addr: remote.node.octets(),
                },
            );
        }
        for (cidr, node) in &state.pod_cidrs {
            image
                .pod_cidrs
                .insert((cidr.network().octets(), cidr.prefix_len()), node.octets());
        }
        image
            .upstream
            .extend(host.upstream.iter().map(|ifindex| (*ifindex, 1)));
        image
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use egress_model::PolicyState;

    use super::*;

    fn env() -> Environment {
        let settings = DatapathSettings {
            max_flows: 1000,
            max_flows_per_pod: 10,
            answer_ping_on_egress_ips: true,
            ..Default::default()
        };
        Environment::new(&settings, 7, 1410, 4789)
    }

    fn state() -> NodeState {
        let mut s = NodeState {
            node_addr: Some(Ipv4Addr::new(172, 18, 0, 11)),
            ..Default::default()
        };
        s.nodes = [Ipv4Addr::new(172, 18, 0, 11), Ipv4Addr::new(172, 18, 0, 12)].into();
        let policy = |ip: [u8; 4], node: Option<[u8; 4]>, fp| PolicyState {
            name: "p".into(),
            egress_ip: ip.into(),
            egress_node: node.map(Into::into),
            failure_policy: fp,
            excluded: ["192.0.2.0/24".parse().unwrap()].into(),
        };
        s.policies.insert(
            1,
            policy(
                [172, 18, 0, 100],
                Some([172, 18, 0, 11]),
                FailurePolicy::FailClosed,
            ),
        );
        s.policies.insert(
            2,
            policy(
                [172, 18, 0, 101],
                Some([172, 18, 0, 12]),
                FailurePolicy::FailClosed,
            ),
        );
        s.policies
            .insert(3, policy([172, 18, 0, 102], None, FailurePolicy::FailOpen));
        s.pods.insert(Ipv4Addr::new(10, 244, 1, 2), 2);
        s.marks.insert(0x2ec40e, 1);
        s.vnis.insert(5000, 3);
        s.global_excluded.insert("10.244.0.0/16".parse().unwrap());
        s
    }

    #[test]
    fn local_policies_own_their_egress_address() {
        let image = DatapathImage::from_state(&state(), &env(), &HostFacts::default());
        assert_eq!(
            image.policies[&1].flags,
            policy_flags::ACTIVE | policy_flags::LOCAL | policy_flags::SELECTED_BY_NODE
        );
        assert_eq!(image.egress_addrs, BTreeMap::from([([172, 18, 0, 100], 1)]));
        assert_eq!(
            image.policies[&2].flags,
            policy_flags::ACTIVE | policy_flags::CLAMP_MSS
        );
        assert_eq!(image.policies[&2].egress_node, [172, 18, 0, 12]);
    }

    #[test]
    fn unowned_policies_carry_their_failure_policy() {
        let image = DatapathImage::from_state(&state(), &env(), &HostFacts::default());
        let p = image.policies[&3];
        assert_eq!(p.egress_node, [0; 4]);
        assert_ne!(p.flags & policy_flags::FAIL_OPEN, 0);
        assert_eq!(image.policies[&1].flags & policy_flags::FAIL_OPEN, 0);
    }

    #[test]
    fn every_policy_id_is_a_vni_and_extras_are_added() {
        let image = DatapathImage::from_state(&state(), &env(), &HostFacts::default());
        assert_eq!(
            image.vnis,
            BTreeMap::from([(1, 1), (2, 2), (3, 3), (5000, 3)])
        );
        assert_eq!(image.marks, BTreeMap::from([(0x2ec40e, 1)]));
    }

    #[test]
    fn exclusions_are_global_or_per_policy() {
        let image = DatapathImage::from_state(&state(), &env(), &HostFacts::default());
        assert!(image.exclusions.contains(&(0, [10, 244, 0, 0], 16)));
        assert!(image.exclusions.contains(&(2, [192, 0, 2, 0], 24)));
        // Node addresses are excluded globally.
        assert!(image.exclusions.contains(&(0, [172, 18, 0, 12], 32)));
        assert_eq!(image.exclusions.len(), 6);
    }

    #[test]
    fn host_facts_fill_pod_interfaces_upstreams_and_local_exclusions() {
        let mut s = state();
        s.pods.insert(Ipv4Addr::new(10, 244, 1, 3), 1);
        s.remote_pods.insert(
            Ipv4Addr::new(10, 244, 2, 7),
            egress_model::RemotePod {
                policy: 2,
                node: Ipv4Addr::new(172, 18, 0, 12),
            },
        );
        s.pod_cidrs.insert(
            "10.244.2.0/24".parse().unwrap(),
            Ipv4Addr::new(172, 18, 0, 12),
        );
        let host = HostFacts {
            pod_interfaces: BTreeMap::from([(Ipv4Addr::new(10, 244, 1, 2), 5)]),
            upstream: BTreeSet::from([9]),
            local_addrs: BTreeSet::from([
                Ipv4Addr::new(169, 254, 20, 10),
                Ipv4Addr::new(172, 18, 0, 11),
            ]),
        };
        let image = DatapathImage::from_state(&s, &env(), &host);
        assert_eq!(image.pods[&[10, 244, 1, 2]].ifindex, 5);
        // Not resolved: the datapath refuses its packets everywhere.
        assert_eq!(image.pods[&[10, 244, 1, 3]].ifindex, 0);
        assert_eq!(
            image.remote_pods[&[10, 244, 2, 7]],
            RemotePodV4 {
                policy_id: 2,
                node_addr: [172, 18, 0, 12]
            }
        );
        assert_eq!(image.pod_cidrs[&([10, 244, 2, 0], 24)], [172, 18, 0, 12]);
        assert_eq!(image.upstream, BTreeMap::from([(9, 1)]));
        assert!(image.exclusions.contains(&(0, [169, 254, 20, 10], 32)));
    }

    #[test]
    fn groups_and_node_selection_reach_the_policy_entries() {
        let mut s = state();
        s.groups.insert(2, 1);
        let image = DatapathImage::from_state(&s, &env(), &HostFacts::default());
        assert_eq!(image.policies[&1].group, 1);
        assert_eq!(image.policies[&2].group, 1);
        assert_eq!(image.policies[&3].group, 3);
        // Policy 1 has a mark, policy 3 an extra VNI: chosen on the pod's node.
        assert_ne!(image.policies[&1].flags & policy_flags::SELECTED_BY_NODE, 0);
        assert_ne!(image.policies[&3].flags & policy_flags::SELECTED_BY_NODE, 0);
        assert_eq!(image.policies[&2].flags & policy_flags::SELECTED_BY_NODE, 0);
    }

    #[test]
    fn the_local_node_is_marked() {
        let image = DatapathImage::from_state(&state(), &env(), &HostFacts::default());
        assert_eq!(image.nodes[&[172, 18, 0, 11]].is_self, 1);
        assert_eq!(image.nodes[&[172, 18, 0, 12]].is_self, 0);
        assert_eq!(image.config.node_addr, [172, 18, 0, 11]);
        assert_eq!(image.config.tunnel_mss, 1410);
    }

    #[test]
    fn the_no_usable_ip_slot_drops_and_steers_nowhere() {
        let mut s = state();
        s.policies.insert(NO_USABLE_IP, PolicyState::no_usable_ip());
        s.pods.insert(Ipv4Addr::new(10, 244, 1, 9), NO_USABLE_IP);
        let image = DatapathImage::from_state(&s, &env(), &HostFacts::default());
        let slot = image.policies[&NO_USABLE_IP];
        // Active, not local, not fail-open, no egress node: pod_ingress
        // drops its pods' external traffic as no_egress_node.
        assert_eq!(slot.flags & !policy_flags::CLAMP_MSS, policy_flags::ACTIVE);
        assert_eq!(slot.egress_node, [0; 4]);
        assert!(!image.vnis.contains_key(&NO_USABLE_IP));
        assert!(!image.egress_addrs.values().any(|id| *id == NO_USABLE_IP));
        assert_eq!(image.pods[&[10, 244, 1, 9]].policy_id, NO_USABLE_IP);
    }

    #[test]
    fn datapath_settings_reach_the_config_entry() {
        let mut env = env();
        let image = DatapathImage::from_state(&state(), &env, &HostFacts::default());
        assert_eq!(image.config.max_flows, 1000);
        assert_eq!(image.config.max_flows_per_pod, 10);
        assert_eq!(
            image.config.flags,
            egress_common::config_flags::ANSWER_PING_ON_EGRESS_IPS
        );
        assert_eq!(image.config.claims_valid_until_ns, u64::MAX);
        // The fence carried by the environment is what a reconcile writes.
        env.claims_valid_until_ns = 123;
        let image = DatapathImage::from_state(&state(), &env, &HostFacts::default());
        assert_eq!(image.config.claims_valid_until_ns, 123);
    }
}

//! The `[kubernetes]` section of the agent's configuration file, turned into
//! [`Options`]. Durations are in milliseconds so that TOML stays plain.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    controller::{Error, Options},
    facts::{DEFAULT_ASSIGNABLE_LABEL, EgressSubnet},
    heartbeat::HeartbeatConfig,
    plan::PlanConfig,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Namespace of the agent (claims and leader Leases).
    pub namespace: String,
    /// Label that makes a node eligible to hold egress IPs.
    pub assignable_label: String,
    /// Pod and service networks: never translated.
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub service_cidrs: Vec<Ipv4Net>,
    /// Interfaces whose subnets this node offers for egress IPs (a trailing
    /// `*` matches a prefix). Empty: every interface with an IPv4 address
    /// except loopback, the tunnel and the pod interfaces. Addresses in the
    /// cluster and service networks are never offered.
    pub egress_interfaces: Vec<String>,
    pub claim_ttl_ms: u64,
    pub claim_renew_ms: u64,
    /// How long a restarting agent's IPs wait for its successor (not on a
    /// drain or node deletion, which hand them over); 0 hands them over on
    /// every stop. See `Options::restart_grace`.
    pub restart_grace_ms: u64,
    /// Take part in the election of the assigner.
    pub assigner: bool,
    /// How many agents stand by as assigner candidates.
    pub assigner_candidates: usize,
    pub leader_lease: String,
    pub leader_ttl_ms: u64,
    pub leader_renew_ms: u64,
    pub drain_timeout_ms: u64,
    pub heartbeat: Option<HeartbeatSection>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSection {
    pub bind: IpAddr,
    pub port: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        let d = HeartbeatConfig::default();
        Self {
            bind: d.bind,
            port: d.port,
            interval_ms: d.interval.as_millis() as u64,
            timeout_ms: d.timeout.as_millis() as u64,
        }
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        let o = Options::default();
        let ms = |d: Duration| d.as_millis() as u64;
        Self {
            namespace: o.namespace,
            assignable_label: DEFAULT_ASSIGNABLE_LABEL.into(),
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            egress_interfaces: Vec::new(),
            claim_ttl_ms: ms(o.claim_ttl),
            claim_renew_ms: ms(o.claim_renew),
            restart_grace_ms: ms(o.restart_grace),
            assigner: o.assigner,
            assigner_candidates: o.assigner_candidates,
            leader_lease: o.leader_lease,
            leader_ttl_ms: ms(o.leader_ttl),
            leader_renew_ms: ms(o.leader_renew),
            drain_timeout_ms: ms(o.drain_timeout),
            heartbeat: Some(HeartbeatSection::default()),
        }
    }
}

/// Whether `name` matches one of `patterns` (`eth0`, `bond*`).
pub fn interface_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

impl KubernetesConfig {
    /// Chooses the subnets to publish from this node's interface addresses
    /// (name, address with prefix).
    pub fn egress_subnets(&self, addresses: &[(String, Ipv4Net)]) -> Vec<EgressSubnet> {
        let mut v: Vec<EgressSubnet> = addresses
            .iter()
            .filter(|(name, addr)| {
                !addr.addr().is_loopback()
                    && !addr.addr().is_link_local()
                    && addr.prefix_len() < 32
                    && (self.egress_interfaces.is_empty()
                        || interface_matches(&self.egress_interfaces, name))
            })
            .map(|(name, addr)| EgressSubnet {
                interface: name.clone(),
                address: *addr,
            })
            .collect();
        v.sort();
        v
    }

    /// The controller options; `subnets` from [`Self::egress_subnets`].
    pub fn options(&self, subnets: Vec<EgressSubnet>) -> Result<Options, Error> {
        let ms = Duration::from_millis;
        let options = Options {
            namespace: self.namespace.clone(),
            plan: PlanConfig {
                assignable_label: self.assignable_label.clone(),
                ..PlanConfig::default()
            },
            global_excluded: self
                .cluster_cidrs
                .iter()
                .chain(&self.service_cidrs)
                .map(|n| n.trunc())
                .collect::<BTreeSet<_>>(),
            node_addr: None,
            subnets,
            claim_ttl: ms(self.claim_ttl_ms),
            claim_renew: ms(self.claim_renew_ms),
            restart_grace: ms(self.restart_grace_ms),
            assigner: self.assigner,
            assigner_candidates: self.assigner_candidates,
            leader_lease: self.leader_lease.clone(),
            leader_ttl: ms(self.leader_ttl_ms),
            leader_renew: ms(self.leader_renew_ms),
            drain_timeout: ms(self.drain_timeout_ms),
            heartbeat: self.heartbeat.as_ref().map(|h| HeartbeatConfig {
                bind: h.bind,
                port: h.port,
                interval: ms(h.interval_ms),
                timeout: ms(h.timeout_ms),
            }),
        };
        options.validate()?;
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns_match_names_or_prefixes() {
        let p = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(interface_matches(&p(&["veth*"]), "veth1"));
        assert!(interface_matches(&p(&["veth*"]), "veth"));
        assert!(!interface_matches(&p(&["veth*"]), "eth0"));
        assert!(interface_matches(&p(&["eth0", "tun0"]), "tun0"));
        assert!(!interface_matches(&p(&["tun0"]), "tun01"));
        assert!(!interface_matches(&[], "eth0"));
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_valid_options() {
        let o = KubernetesConfig::default().options(Vec::new()).unwrap();
        assert_eq!(o.plan.assignable_label, "k8s.ovn.org/egress-assignable");
        assert!(o.heartbeat.is_some());
    }

    #[test]
    fn section_from_json_with_cidrs() {
        let c: KubernetesConfig = serde_json::from_value(serde_json::json!({
            "namespace": "kube-egress",
            "cluster_cidrs": ["10.244.0.0/16"],
            "service_cidrs": ["10.96.0.0/12"],
            "heartbeat": {"port": 9999}
        }))
        .unwrap();
        let o = c.options(Vec::new()).unwrap();
        assert_eq!(o.namespace, "kube-egress");
        assert_eq!(
            o.global_excluded,
            BTreeSet::from([net("10.244.0.0/16"), net("10.96.0.0/12")])
        );
        let hb = o.heartbeat.unwrap();
        assert_eq!((hb.port, hb.interval), (9999, Duration::from_millis(200)));
    }

    #[test]
    fn unknown_fields_and_bad_timings_are_rejected() {
        let e = serde_json::from_value::<KubernetesConfig>(serde_json::json!({"claim_tll_ms": 5}))
            .unwrap_err();
        assert!(e.to_string().contains("claim_tll_ms"), "{e}");
        let c = KubernetesConfig {
            claim_ttl_ms: 1000,
            claim_renew_ms: 800,
            ..Default::default()
        };
        assert!(
            c.options(Vec::new())
                .unwrap_err()
                .to_string()
                .contains("claim renew interval")
        );
    }

    #[test]
    fn subnets_skip_loopback_and_host_routes_and_honour_patterns() {
        let addrs = vec![
            ("lo".to_string(), net("127.0.0.1/8")),
            ("eth0".to_string(), net("172.18.0.11/16")),
            ("eth1".to_string(), net("192.168.50.11/24")),
            ("egress-vxlan".to_string(), net("169.254.1.1/16")),
            ("eth0".to_string(), net("172.18.0.100/32")),
        ];
        let all = KubernetesConfig::default().egress_subnets(&addrs);
        assert_eq!(
            all.iter().map(|s| s.interface.as_str()).collect::<Vec<_>>(),
            ["eth0", "eth1"]
        );
        let only = KubernetesConfig {
            egress_interfaces: vec!["eth1*".into()],
            ..Default::default()
        }
        .egress_subnets(&addrs);
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].address, net("192.168.50.11/24"));
    }
}

//! `[kubernetes]`: the settings of the Kubernetes mode (`run --kubernetes`).
//! The controller (`egress_k8s::Options`) takes this section as it is.
//! Durations keep the file's units (`claim_ttl_ms = 1500`) and are
//! [`Duration`]s in Rust.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_with::{As, DurationMilliSeconds};

/// The label that makes a node eligible to hold egress IPs, by default
/// (OVN-Kubernetes' own).
pub const DEFAULT_ASSIGNABLE_LABEL: &str = "k8s.ovn.org/egress-assignable";

/// The default [`KubernetesConfig::leader_lease`].
pub const DEFAULT_LEADER_LEASE: &str = "egress-assigner";

/// The default [`KubernetesConfig::new_pod_hold`]: far above the Pod's
/// usual trip through the API server (100-300 ms in the lab), short enough
/// that an interface no Pod ever claims is not cut off for long.
pub const DEFAULT_NEW_POD_HOLD: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Namespace of the agent: claims and leader Leases live there.
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
    /// How long a claim stays valid without renewal. Bounds failover time
    /// (a new holder waits for the old claim to expire unless it was
    /// released). A node that cannot renew withdraws its IPs after
    /// `claim_ttl - claim_renew` (at most half a renewal period later), so
    /// before anyone else may claim them.
    #[serde(rename = "claim_ttl_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub claim_ttl: Duration,
    #[serde(rename = "claim_renew_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub claim_renew: Duration,
    /// How long the IPs of a node whose agent stops for a restart (not a
    /// drain or node deletion, which hand them over) stay with it, for its
    /// successor to adopt; zero hands them over on every stop. Default
    /// 30 s: a DaemonSet rolling update kills the pod (the agent exits
    /// within a second), the controller starts the next one once the old
    /// is gone (about a second), the image may have to be pulled (seconds),
    /// and the new agent loads, connects and syncs its watches (one to a
    /// few seconds at 20,000 pods). Longer only costs when the node dies
    /// during a restart: its IPs then wait for the grace to end (dropping,
    /// never leaking) before they fail over.
    #[serde(rename = "restart_grace_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub restart_grace: Duration,
    /// Take part in the assigner election.
    pub assigner: bool,
    /// How many nodes stand by as assigner candidates (watches synced,
    /// probing, claims judged with their own clock), so that the next
    /// leader acts as soon as it is elected: the leader and
    /// `assigner_candidates - 1` standbys. The others do not take part, so
    /// the API load of the election and of the assigner's cluster-wide
    /// watches does not grow with the node count.
    pub assigner_candidates: usize,
    pub leader_lease: String,
    /// The leader Lease lifetime: a standby takes over once the Lease has
    /// not changed for this long. Short (1 s), because the leader only
    /// writes status and status is not what keeps two nodes from holding
    /// one IP (claims and locks are): a short lease bounds how long the
    /// cluster waits for a dead assigner.
    #[serde(rename = "leader_ttl_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub leader_ttl: Duration,
    #[serde(rename = "leader_renew_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub leader_renew: Duration,
    /// How long shutdown waits for the IPs to be handed over.
    #[serde(rename = "drain_timeout_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub drain_timeout: Duration,
    /// Direct liveness probes (the assigner probes, every agent answers);
    /// `None` relies on Node readiness and the agent's own probes only. A
    /// file cannot say `None`: an absent section means the defaults, so
    /// only code (the controller's tests) turns the probes off.
    pub heartbeat: Option<HeartbeatConfig>,
    /// How long a new pod interface is held (agent side): until the Pod
    /// behind it reaches the agent, its traffic reaches only excluded
    /// destinations, so that a pod an EgressIP selects never leaves with
    /// the node's address first. A source still unknown when the hold ends
    /// leaves as the node. Zero: no hold.
    #[serde(rename = "new_pod_hold_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub new_pod_hold: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        let ms = Duration::from_millis;
        Self {
            namespace: "egress-system".into(),
            assignable_label: DEFAULT_ASSIGNABLE_LABEL.into(),
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            egress_interfaces: Vec::new(),
            claim_ttl: ms(1500),
            claim_renew: ms(300),
            restart_grace: Duration::from_secs(30),
            assigner: true,
            assigner_candidates: 3,
            leader_lease: DEFAULT_LEADER_LEASE.into(),
            leader_ttl: ms(1000),
            leader_renew: ms(250),
            drain_timeout: Duration::from_secs(20),
            heartbeat: Some(HeartbeatConfig::default()),
            new_pod_hold: DEFAULT_NEW_POD_HOLD,
        }
    }
}

impl KubernetesConfig {
    /// Checks the timings against each other; the message says which.
    pub fn validate(&self) -> Result<(), String> {
        if self.claim_renew.is_zero() || self.claim_renew * 2 > self.claim_ttl {
            return Err(format!(
                "claim renew interval {:?} must be non-zero and at most half the claim lifetime {:?}",
                self.claim_renew, self.claim_ttl
            ));
        }
        if self.leader_renew.is_zero() || self.leader_renew * 2 > self.leader_ttl {
            return Err(format!(
                "leader renew interval {:?} must be non-zero and at most half the leader lease {:?}",
                self.leader_renew, self.leader_ttl
            ));
        }
        if !self.restart_grace.is_zero() && self.restart_grace < self.claim_ttl {
            return Err(format!(
                "restart grace {:?} must be zero (no grace) or at least the claim lifetime {:?}",
                self.restart_grace, self.claim_ttl
            ));
        }
        if self.assigner_candidates == 0 {
            return Err("assigner candidates must be at least 1".into());
        }
        if let Some(hb) = &self.heartbeat {
            hb.validate()?;
        }
        if self.namespace.is_empty() {
            return Err("namespace must not be empty".into());
        }
        Ok(())
    }

    /// The cluster and service networks, which are never translated.
    pub fn cluster_networks(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.cluster_cidrs
            .iter()
            .chain(&self.service_cidrs)
            .map(|n| n.trunc())
    }
}

/// `[kubernetes.heartbeat]`: direct UDP liveness probes between agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Address the responder listens on.
    pub bind: IpAddr,
    pub port: u16,
    /// How often each node is probed.
    #[serde(rename = "interval_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub interval: Duration,
    /// A node that has not answered for this long is down.
    #[serde(rename = "timeout_ms", with = "As::<DurationMilliSeconds<u64>>")]
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 9471,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(1000),
        }
    }
}

impl HeartbeatConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.interval * 2 > self.timeout {
            return Err(format!(
                "heartbeat interval {:?} must be non-zero and at most half the timeout {:?}",
                self.interval, self.timeout
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let c = KubernetesConfig::default();
        c.validate().unwrap();
        assert_eq!(c.assignable_label, "k8s.ovn.org/egress-assignable");
        assert!(c.heartbeat.is_some());
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
        c.validate().unwrap();
        assert_eq!(c.namespace, "kube-egress");
        assert_eq!(
            c.cluster_networks().collect::<BTreeSet<_>>(),
            BTreeSet::from([net("10.244.0.0/16"), net("10.96.0.0/12")])
        );
        let hb = c.heartbeat.unwrap();
        assert_eq!((hb.port, hb.interval), (9999, Duration::from_millis(200)));
    }

    #[test]
    fn unknown_fields_and_bad_timings_are_rejected() {
        let e = serde_json::from_value::<KubernetesConfig>(serde_json::json!({"claim_tll_ms": 5}))
            .unwrap_err();
        assert!(e.to_string().contains("claim_tll_ms"), "{e}");
        let c = KubernetesConfig {
            claim_ttl: Duration::from_millis(1000),
            claim_renew: Duration::from_millis(800),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("claim renew interval"));
        let c = KubernetesConfig {
            heartbeat: Some(HeartbeatConfig {
                interval: Duration::from_millis(600),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("heartbeat interval"));
    }

    #[test]
    fn timings_are_checked() {
        let error = |c: KubernetesConfig| c.validate().unwrap_err();
        let bad = KubernetesConfig {
            claim_renew: Duration::from_secs(2),
            ..Default::default()
        };
        assert!(error(bad).contains("claim renew"));
        let bad = KubernetesConfig {
            leader_renew: Duration::ZERO,
            ..Default::default()
        };
        assert!(error(bad).contains("leader renew"));
        let bad = KubernetesConfig {
            restart_grace: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(error(bad).contains("restart grace"));
        KubernetesConfig {
            restart_grace: Duration::ZERO,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let bad = KubernetesConfig {
            assigner_candidates: 0,
            ..Default::default()
        };
        assert!(error(bad).contains("candidates"));
        let bad = KubernetesConfig {
            namespace: String::new(),
            ..Default::default()
        };
        assert!(error(bad).contains("namespace"));
    }

    #[test]
    fn heartbeat_timings_are_checked() {
        assert!(HeartbeatConfig::default().validate().is_ok());
        let bad = HeartbeatConfig {
            interval: Duration::from_millis(800),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("at most half"));
    }

    /// Operators' files and deploy/ keep their keys and units.
    #[test]
    fn durations_are_milliseconds_under_their_old_keys() {
        let c: KubernetesConfig = toml::from_str(
            "claim_ttl_ms = 15000\nclaim_renew_ms = 3000\nnew_pod_hold_ms = 0\n\
             [heartbeat]\ninterval_ms = 100\ntimeout_ms = 500\n",
        )
        .unwrap();
        assert_eq!(c.claim_ttl, Duration::from_secs(15));
        assert_eq!(c.claim_renew, Duration::from_secs(3));
        assert!(c.new_pod_hold.is_zero());
        assert_eq!(
            c.heartbeat.as_ref().unwrap().timeout,
            Duration::from_millis(500)
        );
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("claim_ttl_ms = 15000\n"), "{text}");
        assert!(text.contains("interval_ms = 100\n"), "{text}");
        assert_eq!(toml::from_str::<KubernetesConfig>(&text).unwrap(), c);
        let e = toml::from_str::<KubernetesConfig>("claim_ttl_ms = -1\n").unwrap_err();
        assert!(e.to_string().contains("claim_ttl_ms"), "{e}");
    }
}

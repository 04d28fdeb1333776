//! `[datapath]`: map sizes, NAT ports, the egress-IP switches and the flow
//! timeouts of the garbage collector. Durations keep the file's units
//! (`gc_interval_secs`, seconds in `[datapath.timeouts]`) and are
//! [`Duration`]s in Rust.

use std::time::Duration;

use egress_common::CtState;
use serde::{Deserialize, Serialize};
use serde_with::{As, DurationSeconds};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatapathSettings {
    pub max_flows: u32,
    /// Live flows one pod may have (0: no cap), so that one pod cannot take
    /// the whole table; its new flows beyond are dropped (`pod_flow_limit`).
    pub max_flows_per_pod: u32,
    /// Let packets to an egress IP that match no flow through to the host,
    /// instead of dropping them (`no_flow`).
    pub pass_unmatched_to_egress_ips: bool,
    /// Let the host answer ICMP echo requests to egress IPs.
    pub answer_ping_on_egress_ips: bool,
    pub max_policies: u32,
    pub max_pods: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// How often the garbage collector sweeps the flow tables.
    #[serde(rename = "gc_interval_secs", with = "As::<DurationSeconds<u64>>")]
    pub gc_interval: Duration,
    pub timeouts: Timeouts,
}

impl Default for DatapathSettings {
    fn default() -> Self {
        Self {
            max_flows: egress_common::maps::DEFAULT_MAX_FLOWS,
            max_flows_per_pod: DEFAULT_MAX_FLOWS_PER_POD,
            pass_unmatched_to_egress_ips: false,
            answer_ping_on_egress_ips: false,
            max_policies: egress_common::maps::DEFAULT_MAX_POLICIES,
            max_pods: egress_common::maps::DEFAULT_MAX_PODS,
            nat_port_min: 1024,
            nat_port_max: 65535,
            gc_interval: Duration::from_secs(10),
            timeouts: Timeouts::default(),
        }
    }
}

/// A quarter of the default table.
pub const DEFAULT_MAX_FLOWS_PER_POD: u32 = 65_536;

impl DatapathSettings {
    /// `DatapathConfig::flags` for these settings.
    pub fn config_flags(&self) -> u32 {
        let mut flags = 0;
        if self.pass_unmatched_to_egress_ips {
            flags |= egress_common::config_flags::PASS_UNMATCHED_TO_EGRESS_IPS;
        }
        if self.answer_ping_on_egress_ips {
            flags |= egress_common::config_flags::ANSWER_PING_ON_EGRESS_IPS;
        }
        flags
    }

    /// Entries of each NAT map: `max_flows` plus headroom, so that the LRU
    /// never has to evict a live flow before the flow limit refuses new ones
    /// (the kernel's LRU hands out free nodes in per-CPU batches).
    pub fn nat_map_entries(&self) -> u32 {
        self.max_flows
            .saturating_add((self.max_flows / 8).max(4096))
    }
}

/// Inactivity after which a flow is removed, by state; whole seconds in the
/// file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Any flow that has seen no reply (a SYN or a segment picked up
    /// mid-stream that nobody answers, a UDP or ICMP flow without an answer)
    /// lives at most this long idle, whatever its state's own timeout: as
    /// Linux conntrack's 30 s for unreplied UDP and loose TCP pick-up.
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub unreplied: Duration,
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub tcp_syn_sent: Duration,
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub tcp_established: Duration,
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub tcp_closing: Duration,
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub tcp_reset: Duration,
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub udp: Duration,
    #[serde(with = "As::<DurationSeconds<u64>>")]
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let secs = Duration::from_secs;
        Self {
            unreplied: secs(30),
            tcp_syn_sent: secs(60),
            tcp_established: secs(21_600),
            tcp_closing: secs(30),
            tcp_reset: secs(10),
            udp: secs(60),
            icmp: secs(30),
        }
    }
}

impl Timeouts {
    /// How long a flow in `state` of protocol `proto`, with `ct_flags`
    /// `flags`, may stay idle.
    pub fn for_flow(&self, proto: u8, state: CtState, flags: u8) -> Duration {
        let timeout = match (proto, state) {
            (egress_common::proto::TCP, CtState::Unreplied) => self.unreplied,
            (egress_common::proto::TCP, CtState::SynSent) => self.tcp_syn_sent,
            (egress_common::proto::TCP, CtState::Closing | CtState::Closed) => self.tcp_closing,
            (egress_common::proto::TCP, CtState::Reset) => self.tcp_reset,
            (egress_common::proto::TCP, _) => self.tcp_established,
            (egress_common::proto::UDP, _) => self.udp,
            _ => self.icmp,
        };
        if flags & egress_common::ct_flags::SEEN_REPLY == 0 {
            timeout.min(self.unreplied)
        } else {
            timeout
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_follow_protocol_and_state() {
        use egress_common::{ct_flags::SEEN_REPLY, proto};
        let t = Timeouts::default();
        let secs = |p, s, f| t.for_flow(p, s, f).as_secs();
        assert_eq!(secs(proto::TCP, CtState::Established, SEEN_REPLY), 21_600);
        assert_eq!(secs(proto::TCP, CtState::Closed, SEEN_REPLY), 30);
        assert_eq!(secs(proto::UDP, CtState::Open, SEEN_REPLY), 60);
        assert_eq!(secs(proto::ICMP, CtState::Open, SEEN_REPLY), 30);
        assert_eq!(secs(proto::TCP, CtState::Reset, 0), 10);
    }

    #[test]
    fn flows_without_a_reply_get_the_short_unreplied_timeout() {
        use egress_common::proto;
        let t = Timeouts {
            unreplied: Duration::from_secs(7),
            ..Default::default()
        };
        let secs = |p, s| t.for_flow(p, s, 0).as_secs();
        // The repro: lone ACKs picked up mid-stream.
        assert_eq!(secs(proto::TCP, CtState::Unreplied), 7);
        // Entries an older datapath made Established without a reply, too.
        assert_eq!(secs(proto::TCP, CtState::Established), 7);
        assert_eq!(secs(proto::TCP, CtState::SynSent), 7);
        assert_eq!(secs(proto::UDP, CtState::Open), 7);
        assert_eq!(secs(proto::TCP, CtState::Reset), 7);
    }

    #[test]
    fn egress_ip_switches_become_config_flags() {
        use egress_common::config_flags::*;
        let mut d = DatapathSettings::default();
        assert_eq!(d.config_flags(), 0, "no_flow drop and no ping by default");
        d.pass_unmatched_to_egress_ips = true;
        d.answer_ping_on_egress_ips = true;
        assert_eq!(
            d.config_flags(),
            PASS_UNMATCHED_TO_EGRESS_IPS | ANSWER_PING_ON_EGRESS_IPS
        );
    }

    #[test]
    fn nat_maps_have_headroom() {
        let d = DatapathSettings {
            max_flows: 100,
            ..Default::default()
        };
        assert_eq!(d.nat_map_entries(), 4196);
        let d = DatapathSettings {
            max_flows: 1 << 20,
            ..Default::default()
        };
        assert_eq!(d.nat_map_entries(), (1 << 20) + (1 << 17));
    }

    #[test]
    fn durations_keep_the_units_of_their_keys() {
        let d: DatapathSettings =
            toml::from_str("gc_interval_secs = 3\n[timeouts]\nudp = 120\n").unwrap();
        assert_eq!(d.gc_interval, Duration::from_secs(3));
        assert_eq!(d.timeouts.udp, Duration::from_secs(120));
        assert_eq!(d.timeouts.icmp, Duration::from_secs(30));
        let text = toml::to_string(&d).unwrap();
        assert!(text.contains("gc_interval_secs = 3\n"), "{text}");
        assert!(text.contains("udp = 120\n"), "{text}");
        assert_eq!(toml::from_str::<DatapathSettings>(&text).unwrap(), d);
    }
}

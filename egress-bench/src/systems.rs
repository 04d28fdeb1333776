//! The systems under test, each set up on the same topology with the same N
//! policies: policy `i` selects pods `pod_addr(POD1_BASE, i)` (local path)
//! and `pod_addr(POD2_BASE, i)` (remote path) and translates them to
//! `egress_addr(i)`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use egress_config::{
    AgentConfig, ClusterConfig, ClusterNode, DatapathSettings, NodeConfig, NodeWithPods,
    PolicyConfig,
};
use ipnet::Ipv4Net;
use serde::Serialize;

use egress_lab::bench_topology::{
    self as topo, BenchTopology, NODE1, NODE2, POD1_BASE, POD1_CIDR, POD2_BASE, POD2_CIDR,
    POD2_SELECTED, egress_addr, pod_addr,
};
use egress_lab::exec::{self, Process};
use egress_lab::{exec_in, netns};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    None,
    Iptables,
    Nftables,
    /// Ours, with netfilter conntrack hooks registered in the node namespaces
    /// as on a real node running kube-proxy.
    EbpfCt,
    /// Ours, with no netfilter hook loaded in the node namespaces.
    Ebpf,
}

impl System {
    pub const ALL: [Self; 5] = [
        Self::None,
        Self::Iptables,
        Self::Nftables,
        Self::EbpfCt,
        Self::Ebpf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::EbpfCt => "ebpf-ct",
            Self::Ebpf => "ebpf",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .with_context(|| {
                format!("unknown system {s:?} (none, iptables, nftables, ebpf-ct, ebpf)")
            })
    }

    pub fn is_ebpf(self) -> bool {
        matches!(self, Self::Ebpf | Self::EbpfCt)
    }
}

/// Flow-table size given to conntrack and to the agent alike.
pub const FLOW_TABLE: u64 = 1 << 20;
/// The mark of policy `i` (0 means "no policy" to both iptables and nft).
pub fn mark(i: u32) -> u32 {
    i + 1
}

/// What every system needs from outside the topology.
#[derive(Clone, Debug)]
pub struct Env {
    /// `iptables-legacy` (x_tables, linear rule walk as on openshift-sdn's
    /// RHEL 7 nodes) or `iptables-nft`.
    pub iptables: String,
    pub agent: Option<PathBuf>,
    pub work: PathBuf,
    pub tag: String,
}

impl Env {
    pub fn iptables_restore(&self) -> String {
        format!("{}-restore", self.iptables)
    }

    pub fn instance(&self, node: &str) -> String {
        format!("eb{}{node}", self.tag)
    }

    pub fn agent(&self) -> Result<&Path> {
        let a = self.agent.as_deref().context(
            "the ebpf systems need the agent: build it (cargo build --release -p egress-agent) or pass --agent PATH",
        )?;
        if !a.exists() {
            bail!(
                "agent binary {} does not exist: build it (cargo build --release -p egress-agent) or leave ebpf out of --systems",
                a.display()
            );
        }
        Ok(a)
    }
}

/// A system set up on the topology; undone on drop.
pub struct Active<'t> {
    pub system: System,
    pub n: u32,
    pub setup_secs: f64,
    topo: &'t BenchTopology,
    env: Env,
    agents: Vec<Process>,
    pins: Vec<PathBuf>,
}

/// Nft ruleset that registers conntrack in a namespace the way a node's
/// kube-proxy rules do, without translating anything.
const CONNTRACK_BASELINE: &str = "table ip bench_ct {
  chain pre { type filter hook prerouting priority raw + 10; policy accept; ct state new counter; }
  chain post { type nat hook postrouting priority srcnat + 10; policy accept; }
}
";

const TUNNEL_TABLE: &str = "100";
const PLAIN_TUNNEL: &str = "vxb";
/// Kernel VXLAN port of our plain tunnel; distinct from the agent's device so
/// that a leftover of one can never capture the other's packets.
const PLAIN_TUNNEL_PORT: &str = "4790";

pub fn setup<'t>(system: System, topo: &'t BenchTopology, n: u32, env: &Env) -> Result<Active<'t>> {
    if n == 0 || n > topo::MAX_POLICIES {
        bail!("N must be in 1..={}", topo::MAX_POLICIES);
    }
    let mut a = Active {
        system,
        n,
        setup_secs: 0.0,
        topo,
        env: env.clone(),
        agents: Vec::new(),
        pins: Vec::new(),
    };
    let t = Instant::now();
    match system {
        System::None => a.plain_tunnel()?,
        System::Iptables => {
            a.plain_tunnel()?;
            a.claim_egress_addrs()?;
            a.baseline_conntrack()?;
            a.marks()?;
            a.iptables_rules()?;
        }
        System::Nftables => {
            a.plain_tunnel()?;
            a.claim_egress_addrs()?;
            a.baseline_conntrack()?;
            a.marks()?;
            a.nft_map()?;
        }
        System::EbpfCt => {
            a.baseline_conntrack()?;
            a.agents()?;
        }
        System::Ebpf => a.agents()?,
    }
    a.setup_secs = t.elapsed().as_secs_f64();
    Ok(a)
}

impl Active<'_> {
    /// Remote path without our agent: node2 sends selected pods' traffic to
    /// node1 through a kernel VXLAN device, as openshift-sdn's OVS tunnel
    /// does; node1 routes the replies back through it.
    fn plain_tunnel(&mut self) -> Result<()> {
        for (ns, local, remote, addr) in [
            (&self.topo.node1, NODE1, NODE2, "10.250.0.1/30"),
            (&self.topo.node2, NODE2, NODE1, "10.250.0.2/30"),
        ] {
            exec::ip_batch(
                Some(ns),
                &[
                    format!(
                        "link add {PLAIN_TUNNEL} type vxlan id 4242 local {local} remote {remote} dstport {PLAIN_TUNNEL_PORT} dev eth0"
                    ),
                    format!("addr add {addr} dev {PLAIN_TUNNEL}"),
                    format!("link set {PLAIN_TUNNEL} up"),
                ],
            )?;
        }
        exec::ip_batch(
            Some(&self.topo.node1),
            &[format!("route add {POD2_SELECTED} via 10.250.0.2")],
        )?;
        exec::ip_batch(
            Some(&self.topo.node2),
            &[
                format!("rule add from {POD2_SELECTED} lookup {TUNNEL_TABLE} pref 100"),
                format!("route add default via 10.250.0.1 table {TUNNEL_TABLE}"),
            ],
        )?;
        Ok(())
    }

    /// openshift-sdn, like our agent, puts each egress IP on the node's
    /// uplink; doing the same keeps node1's local routing table as large as
    /// with the agent.
    fn claim_egress_addrs(&mut self) -> Result<()> {
        let batch: Vec<String> = (0..self.n)
            .map(|i| {
                format!(
                    "address add {}/{} dev eth0",
                    egress_addr(i),
                    topo::NODE_PREFIX
                )
            })
            .collect();
        exec::ip_batch_timeout(Some(&self.topo.node1), &batch, topo::setup_timeout(self.n))?;
        Ok(())
    }

    fn baseline_conntrack(&mut self) -> Result<()> {
        for ns in [&self.topo.node1, &self.topo.node2] {
            exec::exec_in_with_input(
                ns,
                "nft",
                &["-f", "-"],
                CONNTRACK_BASELINE,
                exec::DEFAULT_TIMEOUT,
            )?;
        }
        Ok(())
    }

    /// Stand-in for OVS setting `pkt_mark` per pod on openshift-sdn: one hash
    /// lookup per packet, the same for iptables and nftables, so that the
    /// systems differ only in the SNAT step.
    fn marks(&mut self) -> Result<()> {
        let mut s = String::from(
            "table ip bench_mark {\n map pod2mark { type ipv4_addr : mark; elements = { ",
        );
        for i in 0..self.n {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                s,
                "{sep}{} : {m}, {} : {m}",
                pod_addr(POD1_BASE, i),
                pod_addr(POD2_BASE, i),
                m = mark(i)
            )?;
        }
        s.push_str(" } }\n chain pre { type filter hook prerouting priority mangle; policy accept; meta mark set ip saddr map @pod2mark; }\n}\n");
        self.nft_in_node1(&s)
    }

    /// openshift-sdn's egress-IP rules: one `-m mark --mark M -j SNAT` per
    /// policy in nat POSTROUTING, policy N-1 last, so the hit-last workload
    /// walks every rule.
    fn iptables_rules(&mut self) -> Result<()> {
        let mut s = String::from("*nat\n");
        for i in 0..self.n {
            writeln!(
                s,
                "-A POSTROUTING -m mark --mark {} -j SNAT --to-source {}",
                mark(i),
                egress_addr(i)
            )?;
        }
        s.push_str("COMMIT\n");
        exec::exec_in_with_input(
            &self.topo.node1,
            &self.env.iptables_restore(),
            &["--noflush"],
            &s,
            topo::setup_timeout(self.n),
        )?;
        Ok(())
    }

    /// Loads an nft ruleset of N elements into node1.
    fn nft_in_node1(&self, ruleset: &str) -> Result<()> {
        exec::exec_in_with_input(
            &self.topo.node1,
            "nft",
            &["-f", "-"],
            ruleset,
            topo::setup_timeout(self.n),
        )?;
        Ok(())
    }

    fn nft_map(&mut self) -> Result<()> {
        let mut s =
            String::from("table ip bench_nat {\n map m { type mark : ipv4_addr; elements = { ");
        for i in 0..self.n {
            let sep = if i == 0 { "" } else { ", " };
            write!(s, "{sep}{} : {}", mark(i), egress_addr(i))?;
        }
        s.push_str(" } }\n chain post { type nat hook postrouting priority srcnat; policy accept; snat to meta mark map @m; }\n}\n");
        self.nft_in_node1(&s)
    }

    fn agents(&mut self) -> Result<()> {
        let agent = self.env.agent()?.to_path_buf();
        let nodes = [
            (
                "node1",
                self.topo.node1.clone(),
                NODE1,
                POD1_CIDR,
                "vethpod*",
            ),
            (
                "node2",
                self.topo.node2.clone(),
                NODE2,
                POD2_CIDR,
                "vethpod*",
            ),
        ];
        let mut ready_files = Vec::new();
        for (name, ns, addr, cidr, ifaces) in nodes {
            let instance = self.env.instance(name);
            let cfg = agent_config(&instance, name, addr, cidr, ifaces, self.n)?;
            let cfg_path = self.env.work.join(format!("agent-{name}.toml"));
            std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
            let ready = self.env.work.join(format!("agent-{name}.ready"));
            let _ = std::fs::remove_file(&ready);
            let log = self.env.work.join(format!("agent-{name}.log"));
            // Each agent keeps its own ledger of claimed addresses: two
            // agents sharing the default would release each other's.
            let state = self.env.work.join(format!("agent-{name}.state"));
            let mut cmd = netns::command_in(&ns, &agent.to_string_lossy())?;
            cmd.args([
                "run".as_ref(),
                "--config".as_ref(),
                cfg_path.as_os_str(),
                "--ready-file".as_ref(),
                ready.as_os_str(),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ]);
            self.pins
                .push(PathBuf::from(format!("/sys/fs/bpf/{instance}")));
            self.agents
                .push(Process::spawn(&format!("egress-agent {name}"), cmd, &log)?);
            ready_files.push((ready, log));
        }
        // The agent claims egress IPs one netlink request at a time (~11 ms
        // each on a quiet machine, over 12 ms under load), so its start-up
        // grows with N: 120 s did not suffice at N = 10,000 under load.
        let limit = Duration::from_secs(60) + Duration::from_millis(40) * self.n;
        let deadline = Instant::now() + limit;
        for (i, (ready, log)) in ready_files.iter().enumerate() {
            while !ready.exists() {
                if let Err(e) = self.agents[i].check_alive() {
                    let tail = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("{e}; log:\n{}", last_lines(&tail, 30));
                }
                if Instant::now() > deadline {
                    bail!(
                        "agent did not become ready in {} s; log {}",
                        limit.as_secs(),
                        log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn agent_instance(&self, node: &str) -> String {
        self.env.instance(node)
    }

    fn teardown(&mut self) {
        for a in &mut self.agents {
            a.stop(Duration::from_secs(10));
        }
        self.agents.clear();
        for p in self.pins.drain(..) {
            // Only the instance directories this run created.
            let _ = std::fs::remove_dir_all(p);
        }
        // Each step may find nothing to undo (the system did not set it
        // up, or it failed half-way): errors are expected and ignored.
        for ns in [&self.topo.node1, &self.topo.node2] {
            let _ = exec_in(ns, "nft", &["flush", "ruleset"]);
            let _ = exec_in(ns, &self.env.iptables, &["-t", "nat", "-F"]);
            let _ = exec_in(ns, "ip", &["link", "del", PLAIN_TUNNEL]);
            // Our agent's device, in case it leaves it behind on exit.
            let _ = exec_in(ns, "ip", &["link", "del", "egress-vxlan"]);
            let _ = exec_in(ns, "conntrack", &["-F"]);
        }
        let n2 = &self.topo.node2;
        let _ = exec_in(n2, "ip", &["rule", "del", "pref", "100"]);
        let _ = exec_in(n2, "ip", &["route", "flush", "table", TUNNEL_TABLE]);
        let n1 = &self.topo.node1;
        let _ = exec_in(n1, "ip", &["route", "del", POD2_SELECTED]);
        // Addresses the agent claimed for egress IPs, if it did not release them.
        let _ = exec_in(
            n1,
            "ip",
            &["addr", "flush", "dev", "eth0", "to", topo::EGRESS_RANGE],
        );
        for ns in [&self.topo.pod1, &self.topo.pod2, &self.topo.srv] {
            let _ = exec_in(ns, "conntrack", &["-F"]);
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Static agent configuration for one node with N policies (ids 1..=N).
pub fn agent_config(
    instance: &str,
    node: &str,
    addr: std::net::Ipv4Addr,
    pod_cidr: &str,
    pod_ifaces: &str,
    n: u32,
) -> Result<AgentConfig> {
    let net = |s: &str| s.parse::<Ipv4Net>().with_context(|| format!("CIDR {s:?}"));
    let node_with_pods = |address, cidr| -> Result<ClusterNode> {
        Ok(ClusterNode::WithPods(NodeWithPods {
            address,
            pod_cidr: Some(net(cidr)?),
        }))
    };
    Ok(AgentConfig {
        instance: instance.into(),
        node: NodeConfig {
            name: node.into(),
            address: Some(addr),
            uplink: Some("eth0".into()),
            pod_cidr: Some(net(pod_cidr)?),
            pod_interfaces: vec![pod_ifaces.into()],
            upstream_interfaces: Vec::new(),
            tunnel_interface: "egress-vxlan".into(),
            tunnel_port: 4789,
        },
        cluster: ClusterConfig {
            nodes: vec![
                node_with_pods(NODE1, POD1_CIDR)?,
                node_with_pods(NODE2, POD2_CIDR)?,
            ],
            excluded_cidrs: vec![net("10.244.0.0/16")?],
        },
        // Everything else, the garbage-collection interval and the
        // timeouts among them, as shipped.
        datapath: DatapathSettings {
            max_flows: u32::try_from(FLOW_TABLE).context("FLOW_TABLE exceeds the agent's u32")?,
            // The benchmark's two client pods make every flow: no per-pod
            // cap, as for the iptables and nftables systems it is compared with.
            max_flows_per_pod: 0,
            max_policies: (n + 2).next_power_of_two().max(16),
            max_pods: 65_536,
            nat_port_min: 1024,
            nat_port_max: 65_535,
            ..DatapathSettings::default()
        },
        policies: (0..n)
            .map(|i| PolicyConfig {
                id: i + 1,
                name: format!("p{}", i + 1),
                egress_ip: egress_addr(i),
                node: Some(NODE1),
                failure_policy: Default::default(),
                pods: vec![pod_addr(POD1_BASE, i), pod_addr(POD2_BASE, i)],
                marks: Vec::new(),
                vnis: Vec::new(),
                excluded_cidrs: Vec::new(),
                group: None,
            })
            .collect(),
        kubernetes: Default::default(),
    })
}

/// Flushes conntrack in every namespace between cells, so that no cell pays
/// for (or benefits from) the previous cell's entries.
pub fn flush_conntrack(topo: &BenchTopology) {
    for ns in topo.all() {
        let _ = exec_in(ns, "conntrack", &["-F"]);
    }
}

pub fn host_sysctl(kv: &str) -> Result<()> {
    exec::exec("sysctl", &["-q", "-w", kv])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_file_passes_the_agents_own_check() {
        let config = agent_config("eb-x", "node1", NODE1, POD1_CIDR, "vethpod*", 3).unwrap();
        let text = toml::to_string(&config).unwrap();
        let parsed =
            AgentConfig::parse_for(&text, Path::new("agent.toml"), egress_config::Mode::Static)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed, config);
        assert_eq!(parsed.policies.len(), 3);
        assert_eq!(parsed.datapath.max_flows_per_pod, 0);
        assert_eq!(parsed.datapath.max_policies, 16);
    }
}

//! Loads the three programs with maps of their own (pinned under a unique
//! directory of /sys/fs/bpf, removed on drop), programs the control maps
//! from a `NodeState` through the agent's image and reconciler, and runs
//! packets through the programs with `BPF_PROG_TEST_RUN` inside a test
//! network namespace (see [`crate::netns`]).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::{AsFd, OwnedFd},
    thread::ThreadId,
};

use anyhow::{Context, Result, bail};
use aya::maps::IterableMap;
use egress_agent::{
    host::HostFacts,
    image::{DatapathImage, Environment},
    loader::{self, Datapath},
    maps::{Maps, PinLayout},
};
use egress_bpf::{SkbContext, TunnelInjector};
use egress_common::{
    DatapathConfig, FlowKeyV4, NatEntryV4, PolicyStats, RevNatEntryV4, maps::programs,
};
use egress_config::DatapathSettings;
use egress_model::NodeState;

use crate::{
    expect::Verdict,
    netns::TestNetns,
    world::{self, Pod},
};

/// The three attach points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Program {
    PodIngress,
    UplinkIngress,
    TunnelIngress,
}

impl Program {
    pub fn name(self) -> &'static str {
        match self {
            Self::PodIngress => programs::POD_INGRESS,
            Self::UplinkIngress => programs::UPLINK_INGRESS,
            Self::TunnelIngress => programs::TUNNEL_INGRESS,
        }
    }
}

/// What one packet did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub retval: u32,
    pub verdict: Verdict,
    /// The frame as the program left it.
    pub packet: Vec<u8>,
}

/// The conntrack maps' contents.
#[derive(Clone, Debug, Default)]
pub struct Flows {
    pub fwd: HashMap<FlowKeyV4, NatEntryV4>,
    pub rev: HashMap<FlowKeyV4, RevNatEntryV4>,
}

/// Small maps: the suite never needs more, and each harness allocates them.
pub fn settings() -> DatapathSettings {
    DatapathSettings {
        max_flows: 4096,
        max_policies: 64,
        max_pods: 256,
        ..Default::default()
    }
}

pub struct Harness {
    // Field order: the programs and maps close before the pins and the
    // namespace go.
    injector: TunnelInjector,
    progs: HashMap<Program, OwnedFd>,
    maps: Maps,
    _datapath: Datapath,
    layout: PinLayout,
    net: TestNetns,
    env: Environment,
    thread: ThreadId,
    ifindexes: HashMap<&'static str, u32>,
}

impl Harness {
    /// A fresh datapath programmed with `state`, in a namespace of its own,
    /// entered by the calling thread (which must be the one that runs packets).
    pub fn new(state: &NodeState) -> Result<Self> {
        let net = TestNetns::create()?;
        let mut ifindexes = HashMap::new();
        for name in world::PODS
            .iter()
            .map(|p| p.interface)
            .chain([world::UPLINK, world::TUNNEL])
        {
            ifindexes.insert(name, net.ifindex(name)?);
        }
        loader::ensure_bpffs()?;
        let layout = PinLayout::for_instance(&net.name);
        // Removed on any failure below, as on drop.
        let pins = Pins(layout.clone());
        if layout.root.exists() {
            bail!("{} exists already", layout.root.display());
        }
        let settings = settings();
        let datapath = Datapath::load(&layout, &settings)?;
        let maps = Maps::open(&layout)?;
        let mut progs = HashMap::new();
        for prog in [
            Program::PodIngress,
            Program::UplinkIngress,
            Program::TunnelIngress,
        ] {
            let fd = egress_bpf::obj_get(&layout.progs().join(prog.name()))?;
            progs.insert(prog, fd);
        }
        let injector = TunnelInjector::load(&progs[&Program::TunnelIngress])
            .context("loading the tunnel-metadata injector")?;
        std::mem::forget(pins);
        let env = Environment::new(
            &settings,
            ifindexes[world::TUNNEL],
            world::TUNNEL_MSS,
            world::TUNNEL_PORT,
        );
        let mut harness = Self {
            injector,
            progs,
            maps,
            _datapath: datapath,
            layout,
            net,
            env,
            thread: std::thread::current().id(),
            ifindexes,
        };
        harness.apply(state)?;
        Ok(harness)
    }

    /// The world's node (see [`crate::world`]).
    pub fn node() -> Result<Self> {
        Self::new(&world::node_state())
    }

    /// Brings the control maps to `state` the way the agent does: the
    /// desired image, compared with what the maps hold, the difference written.
    pub fn apply(&mut self, state: &NodeState) -> Result<()> {
        let image = self.image(state);
        let current = self.maps.read_image()?;
        self.maps.apply(&current, &image)?;
        Ok(())
    }

    fn image(&self, state: &NodeState) -> DatapathImage {
        let mut image = DatapathImage::from_state(state, &self.env, &self.host_facts(state));
        // Claims never lapse here unless a test is about that.
        image.config.claims_valid_until_ns = u64::MAX;
        image
    }

    /// What the agent would find in this namespace's stack: each selected
    /// local pod behind its veth (the /32 route netns.rs gives it), and the
    /// addresses netns.rs puts on the uplink (the node's and the egress IP
    /// it holds).
    pub fn host_facts(&self, state: &NodeState) -> HostFacts {
        HostFacts {
            pod_interfaces: state
                .pods
                .keys()
                .filter_map(|ip| {
                    world::pod_by_ip(*ip).map(|pod| (*ip, self.ifindex(pod.interface)))
                })
                .collect(),
            upstream: Default::default(),
            local_addrs: world::LOCAL_ADDRS.into(),
        }
    }

    /// Changes the `config` entry (flags, limits, claim validity).
    pub fn set_config(&mut self, change: impl FnOnce(&mut DatapathConfig)) -> Result<()> {
        let mut config = self.maps.config.get(&0, 0)?;
        change(&mut config);
        self.maps.config.set(0, config, 0)?;
        Ok(())
    }

    /// Holds `interface` as the agent holds a new pod's, until `until_ns`
    /// (coarse CLOCK_MONOTONIC), with `known` as this node's known pods.
    pub fn hold(&mut self, interface: &str, until_ns: u64, known: &[Ipv4Addr]) -> Result<()> {
        self.maps
            .hold_interface(self.ifindex(interface), until_ns)?;
        self.maps
            .set_local_pods(&known.iter().map(|ip| ip.octets()).collect())?;
        Ok(())
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        Ok(self.maps.config.get(&0, 0)?)
    }

    pub fn ifindex(&self, interface: &str) -> u32 {
        self.ifindexes[interface]
    }

    pub fn namespace(&self) -> &str {
        &self.net.name
    }

    /// Runs `packet` through `prog` as if it had arrived on `ifindex`.
    pub fn run_on(&self, prog: Program, ifindex: u32, mark: u32, packet: &[u8]) -> Result<Outcome> {
        self.test_run(
            &self.progs[&prog],
            prog.name(),
            &SkbContext {
                ifindex,
                mark,
                ..Default::default()
            },
            packet,
        )
    }

    fn test_run(
        &self,
        prog: &OwnedFd,
        name: &str,
        ctx: &SkbContext,
        packet: &[u8],
    ) -> Result<Outcome> {
        if std::thread::current().id() != self.thread {
            bail!("a harness runs packets on the thread that made it (its namespace's)");
        }
        let run = egress_bpf::test_run_skb(prog, packet, ctx, 1)
            .with_context(|| format!("{name} on a {}-byte frame", packet.len()))?;
        Ok(Outcome {
            retval: run.retval,
            verdict: Verdict::from_retval(run.retval),
            packet: run.packet,
        })
    }

    /// A packet from `pod` on its host-side interface.
    pub fn pod_ingress(&self, pod: Pod, packet: &[u8]) -> Result<Outcome> {
        self.run_on(Program::PodIngress, self.ifindex(pod.interface), 0, packet)
    }

    /// A packet on an upstream device that carries openshift-sdn's mark.
    pub fn pod_ingress_marked(&self, pod: Pod, mark: u32, packet: &[u8]) -> Result<Outcome> {
        self.run_on(
            Program::PodIngress,
            self.ifindex(pod.interface),
            mark,
            packet,
        )
    }

    /// A packet arriving on the uplink.
    pub fn uplink_ingress(&self, packet: &[u8]) -> Result<Outcome> {
        self.run_on(
            Program::UplinkIngress,
            self.ifindex(world::UPLINK),
            0,
            packet,
        )
    }

    /// A packet decapsulated by the tunnel device from outer source
    /// `remote` with `vni`, sent to this node's address: the metadata is set
    /// by a program that then tail-calls tunnel_ingress ([`TunnelInjector`]).
    pub fn tunnel_ingress_from(
        &self,
        remote: Ipv4Addr,
        vni: u32,
        packet: &[u8],
    ) -> Result<Outcome> {
        self.tunnel_ingress_to(remote, world::NODE, vni, packet)
    }

    /// [`Self::tunnel_ingress_from`] with the outer destination `local`
    /// (another address of the node, when a pod targets it).
    pub fn tunnel_ingress_to(
        &self,
        remote: Ipv4Addr,
        local: Ipv4Addr,
        vni: u32,
        packet: &[u8],
    ) -> Result<Outcome> {
        let ctx = TunnelInjector::context(
            self.ifindex(world::TUNNEL),
            vni,
            remote.octets(),
            local.octets(),
        );
        let out = self.test_run(
            &self.injector.prog,
            "tunnel metadata + tunnel_ingress",
            &ctx,
            packet,
        )?;
        match out.retval {
            egress_bpf::INJECTOR_SET_KEY_FAILED => {
                bail!("bpf_skb_set_tunnel_key failed in the injector")
            }
            egress_bpf::INJECTOR_TAIL_CALL_FAILED => {
                bail!("the injector's tail call to tunnel_ingress failed")
            }
            _ => Ok(out),
        }
    }

    /// A packet on the tunnel device as `BPF_PROG_TEST_RUN` alone delivers
    /// it: without tunnel metadata.
    pub fn tunnel_ingress(&self, packet: &[u8]) -> Result<Outcome> {
        self.run_on(
            Program::TunnelIngress,
            self.ifindex(world::TUNNEL),
            0,
            packet,
        )
    }

    /// Both conntrack maps, read with batched lookups.
    pub fn flows(&self) -> Result<Flows> {
        let fwd = IterableMap::map(&self.maps.nat_fwd).fd().as_fd();
        let rev = IterableMap::map(&self.maps.nat_rev).fd().as_fd();
        Ok(Flows {
            fwd: egress_bpf::lookup_all::<FlowKeyV4, NatEntryV4>(fwd)
                .context("reading nat_fwd_v4")?
                .into_iter()
                .collect(),
            rev: egress_bpf::lookup_all::<FlowKeyV4, RevNatEntryV4>(rev)
                .context("reading nat_rev_v4")?
                .into_iter()
                .collect(),
        })
    }

    /// Removes one forward entry behind the datapath's back.
    pub fn delete_forward(&mut self, key: &FlowKeyV4) -> Result<()> {
        self.maps.nat_fwd.remove(key)?;
        Ok(())
    }

    /// Writes a flow as the datapath would have made it (both entries and
    /// the created count): the setup step for flows a test run cannot make,
    /// such as those of pods steered here through the tunnel.
    pub fn insert_flow(&mut self, key: &FlowKeyV4, entry: &NatEntryV4) -> Result<()> {
        let rev = RevNatEntryV4 {
            orig_addr: key.src_addr,
            origin_node: entry.origin_node,
            orig_port: key.src_port,
            policy_id: entry.policy_id,
            ..Default::default()
        };
        let reply = key.reply_after_nat(entry.nat_addr, entry.nat_port);
        self.maps.nat_rev.insert(reply, rev, 0)?;
        self.maps.nat_fwd.insert(key, entry, 0)?;
        let created = self
            .maps
            .flow_count
            .get(&egress_common::flow_count::CREATED, 0)?;
        self.maps
            .flow_count
            .set(egress_common::flow_count::CREATED, created + 1, 0)?;
        Ok(())
    }

    /// A policy's counters summed over CPUs.
    pub fn stats(&self, policy: u32) -> Result<PolicyStats> {
        Ok(self.maps.policy_stats(policy)?)
    }

    /// Live flows as the datapath counts them (created - reclaimed - released).
    pub fn live_flows(&self) -> Result<u64> {
        Ok(self.maps.flow_counts()?.live())
    }
}

/// Removes an instance's pins unless forgotten.
struct Pins(PinLayout);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = loader::remove_all(&self.0) {
            eprintln!("removing {}: {e}", self.0.root.display());
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Programs and maps are closed after this (field order); the pins go now.
        if let Err(e) = loader::remove_all(&self.layout) {
            eprintln!("removing {}: {e}", self.layout.root.display());
        }
    }
}

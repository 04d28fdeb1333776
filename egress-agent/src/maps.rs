//! Typed handles on the pinned maps, and the reconciler that brings the
//! control maps from what they hold to a desired [`DatapathImage`] by
//! writing only the difference.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use egress_common::{
    DatapathConfig, ExclusionKeyV4, FlowKeyV4, NatEntryV4, NodeV4, PodCidrKeyV4, PodFlowsV4,
    PodPolicyV4, PolicyStats, PolicyV4, RemotePodV4, RevNatEntryV4, flow_count, maps as names,
    policy_flags,
};

use egress_model::NO_USABLE_IP;

use crate::image::{DatapathImage, Exclusion, PodCidr};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {name}: batched {op}: {source}")]
    Batch {
        name: &'static str,
        op: &'static str,
        source: egress_bpf::Error,
    },
    #[error("map {name}: duplicating its descriptor: {source}")]
    Descriptor {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("starting the conntrack collector's thread: {source}")]
    Thread { source: std::io::Error },
    #[error(
        "pinned map {path} has {what} {found}, this agent needs {wanted}; remove the old state with \
         `egress-agent reset --instance <instance>` (established connections through it will break)"
    )]
    Incompatible {
        path: PathBuf,
        what: &'static str,
        found: u32,
        wanted: u32,
    },
}

type Result<T> = std::result::Result<T, MapsError>;

fn err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Where an instance keeps its pinned objects.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub const BPFFS: &'static str = "/sys/fs/bpf";

    pub fn for_instance(instance: &str) -> Self {
        Self {
            root: Path::new(Self::BPFFS).join(instance),
        }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pinned TCX link of `program` on `interface`.
    pub fn link(&self, program: &str, interface: &str) -> PathBuf {
        self.links().join(format!("{program}@{interface}"))
    }
}

/// The key and value sizes and entry counts a map must have to be reused.
pub struct Shape {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    /// `None` when the count is fixed by the program (not configurable).
    pub max_entries: u32,
}

/// Refuses pinned maps left by an agent with another layout or sizing:
/// reusing them would corrupt state silently.
pub fn check_pinned(layout: &PinLayout, shapes: &[Shape]) -> Result<()> {
    for shape in shapes {
        let path = layout.map(shape.name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(err(shape.name))?;
        let info = data.info().map_err(err(shape.name))?;
        for (what, found, wanted) in [
            ("key size", info.key_size(), shape.key_size),
            ("value size", info.value_size(), shape.value_size),
            ("max_entries", info.max_entries(), shape.max_entries),
        ] {
            if found != wanted {
                return Err(MapsError::Incompatible {
                    path,
                    what,
                    found,
                    wanted,
                });
            }
        }
    }
    Ok(())
}

fn open(layout: &PinLayout, name: &'static str) -> Result<Map> {
    let data = MapData::from_pin(layout.map(name)).map_err(err(name))?;
    Map::from_map_data(data).map_err(err(name))
}

/// The datapath's maps, opened from their pins.
pub struct Maps {
    pub config: Array<MapData, DatapathConfig>,
    pub policies: Array<MapData, PolicyV4>,
    pub pods: HashMap<MapData, [u8; 4], PodPolicyV4>,
    pub remote_pods: HashMap<MapData, [u8; 4], RemotePodV4>,
    pub pod_cidrs: LpmTrie<MapData, PodCidrKeyV4, [u8; 4]>,
    pub upstream: HashMap<MapData, u32, u32>,
    pub inbound: HashMap<MapData, FlowKeyV4, u64>,
    pub marks: HashMap<MapData, u32, u32>,
    pub vnis: HashMap<MapData, u32, u32>,
    pub excluded: LpmTrie<MapData, ExclusionKeyV4, u32>,
    pub nodes: HashMap<MapData, [u8; 4], NodeV4>,
    pub egress_addrs: HashMap<MapData, [u8; 4], u32>,
    pub nat_fwd: HashMap<MapData, FlowKeyV4, NatEntryV4>,
    pub nat_rev: HashMap<MapData, FlowKeyV4, RevNatEntryV4>,
    pub flow_count: Array<MapData, u64>,
    pub pod_flows: HashMap<MapData, [u8; 4], PodFlowsV4>,
    pub pod_released: HashMap<MapData, [u8; 4], u64>,
    pub stats: PerCpuArray<MapData, PolicyStats>,
    pub held_ifaces: HashMap<MapData, u32, u64>,
    pub local_pods: HashMap<MapData, [u8; 4], u32>,
}

macro_rules! typed {
    ($layout:expr, $name:expr) => {
        open($layout, $name)?.try_into().map_err(err($name))?
    };
}

impl Maps {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            config: typed!(layout, names::CONFIG),
            policies: typed!(layout, names::POLICIES_V4),
            pods: typed!(layout, names::POD_POLICY_V4),
            remote_pods: typed!(layout, names::REMOTE_PODS_V4),
            pod_cidrs: typed!(layout, names::POD_CIDRS_V4),
            upstream: typed!(layout, names::UPSTREAM_IFACES),
            inbound: typed!(layout, names::INBOUND_V4),
            marks: typed!(layout, names::MARK_POLICY),
            vnis: typed!(layout, names::VNI_POLICY),
            excluded: typed!(layout, names::EXCLUDED_V4),
            nodes: typed!(layout, names::NODES_V4),
            egress_addrs: typed!(layout, names::EGRESS_ADDRS_V4),
            nat_fwd: typed!(layout, names::NAT_FWD_V4),
            nat_rev: typed!(layout, names::NAT_REV_V4),
            flow_count: typed!(layout, names::FLOW_COUNT),
            pod_flows: typed!(layout, names::POD_FLOWS_V4),
            pod_released: typed!(layout, names::POD_RELEASED_V4),
            stats: typed!(layout, names::POLICY_STATS),
            held_ifaces: typed!(layout, names::HELD_IFACES),
            local_pods: typed!(layout, names::LOCAL_PODS_V4),
        })
    }

    /// What the control maps hold now.
    pub fn read_image(&self) -> Result<DatapathImage> {
        let mut image = DatapathImage {
            config: self.config.get(&0, 0).map_err(err(names::CONFIG))?,
            ..Default::default()
        };
        for id in 0..self.policies.len() {
            let p = self.policies.get(&id, 0).map_err(err(names::POLICIES_V4))?;
            if p.flags & policy_flags::ACTIVE != 0 {
                image.policies.insert(id, p);
            }
        }
        image.pods = collect(&self.pods, names::POD_POLICY_V4)?;
        image.remote_pods = collect(&self.remote_pods, names::REMOTE_PODS_V4)?;
        image.upstream = collect(&self.upstream, names::UPSTREAM_IFACES)?;
        for entry in self.pod_cidrs.iter() {
            let (key, node) = entry.map_err(err(names::POD_CIDRS_V4))?;
            image
                .pod_cidrs
                .insert((key.data().addr, key.prefix_len() as u8), node);
        }
        image.marks = collect(&self.marks, names::MARK_POLICY)?;
        image.vnis = collect(&self.vnis, names::VNI_POLICY)?;
        image.nodes = collect(&self.nodes, names::NODES_V4)?;
        image.egress_addrs = collect(&self.egress_addrs, names::EGRESS_ADDRS_V4)?;
        for key in self.excluded.keys() {
            let key = key.map_err(err(names::EXCLUDED_V4))?;
            let data = key.data();
            let prefix = key
                .prefix_len()
                .saturating_sub(ExclusionKeyV4::POLICY_ID_BITS);
            image.exclusions.insert((
                u32::from_be_bytes(data.policy_id_be),
                data.addr,
                prefix as u8,
            ));
        }
        Ok(image)
    }

    /// Moves the claim-validity stamp only: one write of the `config` entry,
    /// everything else in it as it is.
    pub fn set_claims_valid_until(&mut self, ns: u64) -> Result<()> {
        let mut config = self.config.get(&0, 0).map_err(err(names::CONFIG))?;
        if config.claims_valid_until_ns != ns {
            config.claims_valid_until_ns = ns;
            self.config.set(0, config, 0).map_err(err(names::CONFIG))?;
        }
        Ok(())
    }

    /// Holds the pod interface `ifindex` until `until_ns` (coarse
    /// CLOCK_MONOTONIC): see `egress_ebpf::hold`.
    pub fn hold_interface(&mut self, ifindex: u32, until_ns: u64) -> Result<()> {
        self.held_ifaces
            .insert(ifindex, until_ns, 0)
            .map_err(err(names::HELD_IFACES))
    }

    /// Ends the hold on `ifindex`, if any.
    pub fn release_interface(&mut self, ifindex: u32) -> Result<()> {
        match self.held_ifaces.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(names::HELD_IFACES)(e)),
        }
    }

    /// The held interfaces, with the end of each hold.
    pub fn held_interfaces(&self) -> Result<BTreeMap<u32, u64>> {
        collect(&self.held_ifaces, names::HELD_IFACES)
    }

    /// Makes `local_pods_v4` hold exactly `desired`; returns (added, removed).
    pub fn set_local_pods(&mut self, desired: &BTreeSet<[u8; 4]>) -> Result<(usize, usize)> {
        let removed = self.forget_local_pods_except(desired)?;
        let added = self.add_local_pods(desired)?;
        Ok((added, removed))
    }

    /// Adds to `local_pods_v4` the pods of `desired` it lacks; returns how
    /// many. Done after the policy entries change (see
    /// [`Maps::forget_local_pods_except`] for the other way).
    pub fn add_local_pods(&mut self, desired: &BTreeSet<[u8; 4]>) -> Result<usize> {
        let current: BTreeMap<[u8; 4], u32> = collect(&self.local_pods, names::LOCAL_PODS_V4)?;
        let mut added = 0;
        for pod in desired.iter().filter(|p| !current.contains_key(*p)) {
            self.local_pods
                .insert(*pod, 1, 0)
                .map_err(err(names::LOCAL_PODS_V4))?;
            added += 1;
        }
        Ok(added)
    }

    /// Removes from `local_pods_v4` the pods not in `desired`; returns how
    /// many. Done before the policy entries change, as adding is done after:
    /// a pod being deleted must stop being known before it stops being
    /// selected, or a held interface reusing its address would let it out
    /// with the node's address in between.
    pub fn forget_local_pods_except(&mut self, desired: &BTreeSet<[u8; 4]>) -> Result<usize> {
        let current: BTreeMap<[u8; 4], u32> = collect(&self.local_pods, names::LOCAL_PODS_V4)?;
        let mut removed = 0;
        for pod in current.keys().filter(|p| !desired.contains(*p)) {
            match self.local_pods.remove(pod) {
                Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                Err(e) => return Err(err(names::LOCAL_PODS_V4)(e)),
            }
        }
        Ok(removed)
    }

    /// Writes what differs between `current` (read from the maps) and
    /// `desired`; see [`reconcile`].
    pub fn apply(
        &mut self,
        current: &DatapathImage,
        desired: &DatapathImage,
    ) -> Result<ApplyOutcome> {
        reconcile(self, current, desired)
    }

    /// The flow counters: created and reclaimed by the datapath, released by
    /// the collector.
    pub fn flow_counts(&self) -> Result<FlowCounts> {
        let get = |slot| {
            self.flow_count
                .get(&slot, 0)
                .map_err(err(names::FLOW_COUNT))
        };
        Ok(FlowCounts {
            created: get(flow_count::CREATED)?,
            released: get(flow_count::RELEASED)?,
            reclaimed: get(flow_count::RECLAIMED)?,
        })
    }

    /// Sets the released count; the collector is its only writer.
    pub fn set_released(&mut self, released: u64) -> Result<()> {
        self.flow_count
            .set(flow_count::RELEASED, released, 0)
            .map_err(err(names::FLOW_COUNT))
    }

    /// Counters of one policy summed over CPUs.
    pub fn policy_stats(&self, id: u32) -> Result<PolicyStats> {
        let per_cpu = self.stats.get(&id, 0).map_err(err(names::POLICY_STATS))?;
        let mut total = PolicyStats::default();
        for cpu in per_cpu.iter() {
            total.accumulate(cpu);
        }
        Ok(total)
    }

    pub fn stats_len(&self) -> u32 {
        self.stats.len()
    }
}

fn pod_cidr_key(&(addr, prefix): &PodCidr) -> Key<PodCidrKeyV4> {
    Key::new(u32::from(prefix), PodCidrKeyV4 { addr })
}

fn exclusion_key(&(policy, addr, prefix): &Exclusion) -> Key<ExclusionKeyV4> {
    Key::new(
        ExclusionKeyV4::POLICY_ID_BITS + u32::from(prefix),
        ExclusionKeyV4::new(policy, addr),
    )
}

fn collect<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>> {
    map.iter().map(|r| r.map_err(err(name))).collect()
}

/// The `flow_count` slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub created: u64,
    pub released: u64,
    pub reclaimed: u64,
}

impl FlowCounts {
    /// Live flows as the datapath counts them for `max_flows`.
    pub fn live(&self) -> u64 {
        self.created
            .wrapping_sub(self.reclaimed)
            .wrapping_sub(self.released)
    }
}

/// How many map entries a reconcile wrote and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub written: usize,
    pub removed: usize,
}

impl ApplyReport {
    pub fn is_empty(&self) -> bool {
        self.written == 0 && self.removed == 0
    }
}

/// One map write of a reconcile: an entry put (`Some`) or removed (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Config(DatapathConfig),
    Node([u8; 4], Option<NodeV4>),
    /// `None` clears the slot (the array keeps it, inactive).
    Policy(u32, Option<PolicyV4>),
    EgressAddr([u8; 4], Option<u32>),
    Exclusion(Exclusion, bool),
    Vni(u32, Option<u32>),
    Mark(u32, Option<u32>),
    Pod([u8; 4], Option<PodPolicyV4>),
    Upstream(u32, Option<u32>),
    PodCidr(PodCidr, Option<[u8; 4]>),
    RemotePod([u8; 4], Option<RemotePodV4>),
}

/// Where [`reconcile`] writes: the pinned maps, or a model of them in tests.
pub trait ControlMaps {
    fn write(&mut self, w: Write) -> Result<()>;
}

impl ControlMaps for Maps {
    fn write(&mut self, w: Write) -> Result<()> {
        fn gone(name: &'static str) -> impl FnOnce(MapError) -> Result<()> {
            move |e| match e {
                MapError::KeyNotFound => Ok(()),
                e => Err(err(name)(e)),
            }
        }
        match w {
            Write::Config(c) => self.config.set(0, c, 0).map_err(err(names::CONFIG)),
            Write::Node(k, Some(v)) => self.nodes.insert(k, v, 0).map_err(err(names::NODES_V4)),
            Write::Node(k, None) => self.nodes.remove(&k).or_else(gone(names::NODES_V4)),
            Write::Policy(id, p) => self
                .policies
                .set(id, p.unwrap_or_default(), 0)
                .map_err(err(names::POLICIES_V4)),
            Write::EgressAddr(a, Some(id)) => self
                .egress_addrs
                .insert(a, id, 0)
                .map_err(err(names::EGRESS_ADDRS_V4)),
            Write::EgressAddr(a, None) => self
                .egress_addrs
                .remove(&a)
                .or_else(gone(names::EGRESS_ADDRS_V4)),
            Write::Exclusion(e, true) => self
                .excluded
                .insert(&exclusion_key(&e), 1, 0)
                .map_err(err(names::EXCLUDED_V4)),
            Write::Exclusion(e, false) => self
                .excluded
                .remove(&exclusion_key(&e))
                .or_else(gone(names::EXCLUDED_V4)),
            Write::Vni(v, Some(id)) => self.vnis.insert(v, id, 0).map_err(err(names::VNI_POLICY)),
            Write::Vni(v, None) => self.vnis.remove(&v).or_else(gone(names::VNI_POLICY)),
            Write::Mark(m, Some(id)) => {
                self.marks.insert(m, id, 0).map_err(err(names::MARK_POLICY))
            }
            Write::Mark(m, None) => self.marks.remove(&m).or_else(gone(names::MARK_POLICY)),
            Write::Pod(p, Some(v)) => self.pods.insert(p, v, 0).map_err(err(names::POD_POLICY_V4)),
            Write::Pod(p, None) => self.pods.remove(&p).or_else(gone(names::POD_POLICY_V4)),
            Write::Upstream(i, Some(v)) => self
                .upstream
                .insert(i, v, 0)
                .map_err(err(names::UPSTREAM_IFACES)),
            Write::Upstream(i, None) => self
                .upstream
                .remove(&i)
                .or_else(gone(names::UPSTREAM_IFACES)),
            Write::PodCidr(c, Some(node)) => self
                .pod_cidrs
                .insert(&pod_cidr_key(&c), node, 0)
                .map_err(err(names::POD_CIDRS_V4)),
            Write::PodCidr(c, None) => self
                .pod_cidrs
                .remove(&pod_cidr_key(&c))
                .or_else(gone(names::POD_CIDRS_V4)),
            Write::RemotePod(p, Some(v)) => self
                .remote_pods
                .insert(p, v, 0)
                .map_err(err(names::REMOTE_PODS_V4)),
            Write::RemotePod(p, None) => self
                .remote_pods
                .remove(&p)
                .or_else(gone(names::REMOTE_PODS_V4)),
        }
    }
}

/// What a reconcile did, and the policies it could not program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub report: ApplyReport,
    /// Policy id -> why its entries could not be written. The other
    /// policies were applied; pods and marks of a failed policy were left
    /// without an entry rather than on another policy's address.
    pub failed: BTreeMap<u32, String>,
    /// Policy ids whose entries the datapath may hold after this reconcile:
    /// the desired ones that were written, and those it failed to remove.
    /// A policy id is reused for another meaning only once no node reports
    /// it here.
    pub present: BTreeSet<u32>,
}

impl ApplyOutcome {
    /// An error naming the policies that could not be programmed, if any
    /// (static mode refuses a configuration it cannot apply whole).
    pub fn all_applied(&self) -> std::result::Result<(), PartialApply> {
        if self.failed.is_empty() {
            Ok(())
        } else {
            Err(PartialApply(self.failed.clone()))
        }
    }
}

impl From<ApplyOutcome> for egress_k8s::report::DatapathReport {
    fn from(o: ApplyOutcome) -> Self {
        Self {
            present: o.present,
            failed: o.failed,
        }
    }
}

/// Policies a reconcile could not program (the others were).
#[derive(Debug, thiserror::Error)]
#[error("policies not programmed (the others were): {}", describe(.0))]
pub struct PartialApply(pub BTreeMap<u32, String>);

fn describe(failed: &BTreeMap<u32, String>) -> String {
    failed
        .iter()
        .map(|(id, e)| format!("policy {id}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Brings the control maps from `current` to `desired`, writing only what
/// differs, in dependency order (a policy before the pods, marks and VNIs
/// that point at it; removals in reverse), so that a packet never finds a
/// pod whose policy is missing.
///
/// A failure confined to one policy (its array slot, its egress address,
/// exclusions or VNIs, or a pod or mark pointing at it) does not stop the
/// others: that policy is reported in [`ApplyOutcome::failed`], its slot is
/// cleared if it held an older meaning, and its pods and marks point at the
/// reserved drop slot when it is fail-closed, or get no entry when it is
/// fail-open (never a stale one pointing at another policy). A failure of what every
/// policy depends on (the config entry, the node list, the global
/// exclusions) is an error, and nothing after it is written.
pub fn reconcile(
    maps: &mut impl ControlMaps,
    current: &DatapathImage,
    desired: &DatapathImage,
) -> Result<ApplyOutcome> {
    let mut run = Run {
        maps,
        out: ApplyOutcome::default(),
        uncleared: BTreeSet::new(),
        sink_written: false,
    };
    if current.config != desired.config {
        run.global(Write::Config(desired.config))?;
    }
    for (k, v) in &desired.nodes {
        if current.nodes.get(k) != Some(v) {
            run.global(Write::Node(*k, Some(*v)))?;
        }
    }
    let added: Vec<Exclusion> = desired
        .exclusions
        .difference(&current.exclusions)
        .copied()
        .collect();
    for e in added.iter().filter(|e| e.0 == 0) {
        run.global(Write::Exclusion(*e, true))?;
    }
    // Upstream devices before the pods whose packets they may carry; the
    // other nodes' pod CIDRs before the arrivals they attribute.
    for (k, v) in &desired.upstream {
        if current.upstream.get(k) != Some(v) {
            run.global(Write::Upstream(*k, Some(*v)))?;
        }
    }
    for (k, v) in &desired.pod_cidrs {
        if current.pod_cidrs.get(k) != Some(v) {
            run.global(Write::PodCidr(*k, Some(*v)))?;
        }
    }

    for (id, policy) in &desired.policies {
        let mut writes = Vec::new();
        if current.policies.get(id) != Some(policy) {
            writes.push(Write::Policy(*id, Some(*policy)));
        }
        writes.extend(
            changed_to(&current.egress_addrs, &desired.egress_addrs, *id)
                .map(|a| Write::EgressAddr(a, Some(*id))),
        );
        writes.extend(
            added
                .iter()
                .filter(|e| e.0 == *id)
                .map(|e| Write::Exclusion(*e, true)),
        );
        writes.extend(
            changed_to(&current.vnis, &desired.vnis, *id).map(|v| Write::Vni(v, Some(*id))),
        );
        let mut slot_written = false;
        for w in writes {
            match run.write(w) {
                Ok(()) => slot_written |= matches!(w, Write::Policy(..)),
                Err(e) => {
                    run.fail(*id, e);
                    // Never leave this id meaning something else, nor half
                    // of its new meaning active.
                    if (slot_written || current.policies.contains_key(id))
                        && run.write(Write::Policy(*id, None)).is_err()
                    {
                        run.uncleared.insert(*id);
                    }
                    break;
                }
            }
        }
    }
    // Pods and marks of a policy that could not be programmed: those of a
    // fail-closed policy go to the reserved drop slot (their traffic must
    // not leave with the node's address meanwhile), the others lose their
    // entry (they leave as the node, as fail-open says).
    for (k, id) in &desired.marks {
        let id = if run.failed(*id) {
            run.sink(*id, current, desired)
        } else {
            Some(*id)
        };
        let w = match id {
            Some(id) => (current.marks.get(k) != Some(&id)).then_some(Write::Mark(*k, Some(id))),
            None => current
                .marks
                .contains_key(k)
                .then_some(Write::Mark(*k, None)),
        };
        run.owned(desired.marks[k], w);
    }
    for (k, v) in &desired.pods {
        let id = if run.failed(v.policy_id) {
            run.sink(v.policy_id, current, desired)
        } else {
            Some(v.policy_id)
        };
        let w = match id {
            Some(policy_id) => {
                let v = PodPolicyV4 { policy_id, ..*v };
                (current.pods.get(k) != Some(&v)).then_some(Write::Pod(*k, Some(v)))
            }
            None => current.pods.contains_key(k).then_some(Write::Pod(*k, None)),
        };
        run.owned(v.policy_id, w);
    }
    // Another node's selected pod lets its steered packets through this
    // node's policy: never for a policy that could not be programmed.
    for (k, v) in &desired.remote_pods {
        let w = if run.failed(v.policy_id) {
            current
                .remote_pods
                .contains_key(k)
                .then_some(Write::RemotePod(*k, None))
        } else {
            (current.remote_pods.get(k) != Some(v)).then_some(Write::RemotePod(*k, Some(*v)))
        };
        run.owned(v.policy_id, w);
    }

    for (k, v) in &current.remote_pods {
        if !desired.remote_pods.contains_key(k) {
            run.owned(v.policy_id, Some(Write::RemotePod(*k, None)));
        }
    }
    for (k, v) in &current.pods {
        if !desired.pods.contains_key(k) {
            run.owned(v.policy_id, Some(Write::Pod(*k, None)));
        }
    }
    for (k, id) in &current.marks {
        if !desired.marks.contains_key(k) {
            run.owned(*id, Some(Write::Mark(*k, None)));
        }
    }
    for k in current.upstream.keys() {
        if !desired.upstream.contains_key(k) {
            run.global(Write::Upstream(*k, None))?;
        }
    }
    for k in current.pod_cidrs.keys() {
        if !desired.pod_cidrs.contains_key(k) {
            run.global(Write::PodCidr(*k, None))?;
        }
    }
    for (v, id) in &current.vnis {
        if !desired.vnis.contains_key(v) {
            run.owned(*id, Some(Write::Vni(*v, None)));
        }
    }
    for e in current.exclusions.difference(&desired.exclusions) {
        if e.0 == 0 {
            run.global(Write::Exclusion(*e, false))?;
        } else {
            run.owned(e.0, Some(Write::Exclusion(*e, false)));
        }
    }
    for (a, id) in &current.egress_addrs {
        if !desired.egress_addrs.contains_key(a) {
            run.owned(*id, Some(Write::EgressAddr(*a, None)));
        }
    }
    for id in current.policies.keys() {
        let wanted = desired.policies.contains_key(id) || (*id == NO_USABLE_IP && run.sink_written);
        if !wanted && let Err(e) = run.write(Write::Policy(*id, None)) {
            run.uncleared.insert(*id);
            run.fail(*id, e);
        }
    }
    for k in current.nodes.keys() {
        if !desired.nodes.contains_key(k) {
            run.global(Write::Node(*k, None))?;
        }
    }
    let Run {
        mut out, uncleared, ..
    } = run;
    out.present = desired
        .policies
        .keys()
        .filter(|id| !out.failed.contains_key(id))
        .chain(&uncleared)
        .copied()
        .collect();
    Ok(out)
}

/// The keys of `desired` whose value is `id` and differs from `current`.
fn changed_to<'a, K: Ord + Copy>(
    current: &'a BTreeMap<K, u32>,
    desired: &'a BTreeMap<K, u32>,
    id: u32,
) -> impl Iterator<Item = K> + 'a {
    desired
        .iter()
        .filter(move |(k, v)| **v == id && current.get(k) != Some(v))
        .map(|(k, _)| *k)
}

/// One reconcile's progress.
struct Run<'m, M: ControlMaps> {
    maps: &'m mut M,
    out: ApplyOutcome,
    /// Failed policies whose slot could not be cleared: still present.
    uncleared: BTreeSet<u32>,
    /// The reserved drop slot holds pods or marks of failed policies.
    sink_written: bool,
}

impl<M: ControlMaps> Run<'_, M> {
    fn write(&mut self, w: Write) -> Result<()> {
        self.maps.write(w)?;
        match w {
            Write::Policy(_, None)
            | Write::Node(_, None)
            | Write::EgressAddr(_, None)
            | Write::Exclusion(_, false)
            | Write::Vni(_, None)
            | Write::Mark(_, None)
            | Write::Pod(_, None)
            | Write::Upstream(_, None)
            | Write::PodCidr(_, None)
            | Write::RemotePod(_, None) => self.out.report.removed += 1,
            _ => self.out.report.written += 1,
        }
        Ok(())
    }

    /// A write every policy depends on: its failure ends the reconcile.
    fn global(&mut self, w: Write) -> Result<()> {
        self.write(w)
    }

    /// A write on behalf of policy `id`: its failure fails that policy only.
    fn owned(&mut self, id: u32, w: Option<Write>) {
        if let Some(w) = w
            && let Err(e) = self.write(w)
        {
            self.fail(id, e);
        }
    }

    fn fail(&mut self, id: u32, e: MapsError) {
        self.out.failed.entry(id).or_insert_with(|| e.to_string());
    }

    fn failed(&self, id: u32) -> bool {
        self.out.failed.contains_key(&id)
    }

    /// Where the pods and marks of the failed policy `id` point instead:
    /// the reserved drop slot when `id` is fail-closed (written active here
    /// if the desired image does not have it already), `None` (no entry)
    /// when it is fail-open or the slot cannot be written either.
    fn sink(&mut self, id: u32, current: &DatapathImage, desired: &DatapathImage) -> Option<u32> {
        let fail_open = desired
            .policies
            .get(&id)
            .is_some_and(|p| p.flags & policy_flags::FAIL_OPEN != 0);
        if fail_open || self.failed(NO_USABLE_IP) {
            return None;
        }
        if !self.sink_written {
            let slot = desired
                .policies
                .get(&NO_USABLE_IP)
                .copied()
                .unwrap_or(DROP_SLOT);
            if current.policies.get(&NO_USABLE_IP) != Some(&slot)
                && !desired.policies.contains_key(&NO_USABLE_IP)
                && let Err(e) = self.write(Write::Policy(NO_USABLE_IP, Some(slot)))
            {
                self.fail(NO_USABLE_IP, e);
                return None;
            }
            self.sink_written = true;
        }
        Some(NO_USABLE_IP)
    }
}

/// The reserved slot's meaning when the desired image has none: active, no
/// egress node, not fail-open, so pod_ingress drops as `no_egress_node`.
const DROP_SLOT: PolicyV4 = PolicyV4 {
    egress_addr: [0; 4],
    egress_node: [0; 4],
    flags: policy_flags::ACTIVE,
    group: NO_USABLE_IP,
};

/// Exclusions grouped for display.
pub fn exclusions_by_policy(image: &DatapathImage) -> BTreeMap<u32, BTreeSet<String>> {
    let mut out: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (policy, addr, prefix) in &image.exclusions {
        out.entry(*policy).or_default().insert(format!(
            "{}/{}",
            std::net::Ipv4Addr::from(*addr),
            prefix
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control maps as plain maps: a policy array of `slots` entries
    /// (as the kernel's, a write beyond it fails), and writes that fail on
    /// demand.
    struct Model {
        image: DatapathImage,
        slots: u32,
        fail: Option<Write>,
        writes: Vec<Write>,
    }

    impl Model {
        fn new(image: DatapathImage, slots: u32) -> Self {
            Self {
                image,
                slots,
                fail: None,
                writes: Vec::new(),
            }
        }
    }

    impl ControlMaps for Model {
        fn write(&mut self, w: Write) -> Result<()> {
            if self.fail == Some(w) {
                return Err(MapsError::Batch {
                    name: "injected",
                    op: "write",
                    source: egress_bpf::Error::Command {
                        cmd: egress_bpf::Cmd::MapUpdateElem,
                        source: std::io::Error::from_raw_os_error(libc_enomem()),
                    },
                });
            }
            let i = &mut self.image;
            match w {
                Write::Config(c) => i.config = c,
                Write::Policy(id, _) if id >= self.slots => {
                    return Err(err(names::POLICIES_V4)(MapError::OutOfBounds {
                        index: id,
                        max_entries: self.slots,
                    }));
                }
                Write::Policy(id, Some(p)) => drop(i.policies.insert(id, p)),
                Write::Policy(id, None) => drop(i.policies.remove(&id)),
                Write::Node(k, v) => drop(set(&mut i.nodes, k, v)),
                Write::EgressAddr(k, v) => drop(set(&mut i.egress_addrs, k, v)),
                Write::Exclusion(e, true) => drop(i.exclusions.insert(e)),
                Write::Exclusion(e, false) => drop(i.exclusions.remove(&e)),
                Write::Vni(k, v) => drop(set(&mut i.vnis, k, v)),
                Write::Mark(k, v) => drop(set(&mut i.marks, k, v)),
                Write::Pod(k, v) => drop(set(&mut i.pods, k, v)),
                Write::Upstream(k, v) => drop(set(&mut i.upstream, k, v)),
                Write::PodCidr(k, v) => drop(set(&mut i.pod_cidrs, k, v)),
                Write::RemotePod(k, v) => drop(set(&mut i.remote_pods, k, v)),
            }
            self.writes.push(w);
            Ok(())
        }
    }

    fn libc_enomem() -> i32 {
        12
    }

    fn set<K: Ord, V>(m: &mut BTreeMap<K, V>, k: K, v: Option<V>) -> Option<V> {
        match v {
            Some(v) => m.insert(k, v),
            None => m.remove(&k),
        }
    }

    fn desired(policies: &[(u32, [u8; 4])], pods: &[([u8; 4], u32)]) -> DatapathImage {
        let mut image = DatapathImage::default();
        image.config.max_flows = 1000;
        image.nodes.insert([172, 18, 0, 11], NodeV4::default());
        image.exclusions.insert((0, [10, 244, 0, 0], 16));
        for (id, ip) in policies {
            image.policies.insert(
                *id,
                PolicyV4 {
                    egress_addr: *ip,
                    flags: policy_flags::ACTIVE,
                    ..Default::default()
                },
            );
            image.vnis.insert(*id, *id);
            image.exclusions.insert((*id, [192, 0, 2, 0], 24));
        }
        for (pod, id) in pods {
            image.pods.insert(
                *pod,
                PodPolicyV4 {
                    policy_id: *id,
                    ifindex: 0,
                },
            );
        }
        image
    }

    #[test]
    fn a_policy_the_datapath_cannot_hold_fails_alone() {
        // A policy array of 4 slots (max_policies = 4): id 5 does not fit.
        let want = desired(
            &[
                (1, [172, 18, 0, 100]),
                (2, [172, 18, 0, 101]),
                (5, [172, 18, 0, 105]),
            ],
            &[
                ([10, 244, 1, 1], 1),
                ([10, 244, 1, 2], 2),
                ([10, 244, 1, 5], 5),
            ],
        );
        let mut maps = Model::new(DatapathImage::default(), 4);
        let out = reconcile(&mut maps, &DatapathImage::default(), &want).unwrap();
        assert_eq!(out.failed.keys().copied().collect::<Vec<_>>(), [5]);
        assert!(out.failed[&5].contains("max_entries"), "{}", out.failed[&5]);
        assert_eq!(out.present, BTreeSet::from([1, 2]));
        let got = &maps.image;
        assert_eq!(
            got.policies.keys().copied().collect::<Vec<_>>(),
            [NO_USABLE_IP, 1, 2]
        );
        assert_eq!(got.policies[&NO_USABLE_IP], DROP_SLOT);
        assert_eq!(
            got.pods[&[10, 244, 1, 5]].policy_id,
            NO_USABLE_IP,
            "5 is fail-closed: its pod is dropped, never let out as the node"
        );
        assert!(got.exclusions.contains(&(0, [10, 244, 0, 0], 16)));
        assert!(got.exclusions.contains(&(2, [192, 0, 2, 0], 24)));
        assert_eq!(got.vnis, BTreeMap::from([(1, 1), (2, 2)]));
        // Everything but policy 5 is what was asked; 5's pod is held closed.
        let mut expected = want.clone();
        expected.policies.remove(&5);
        expected.policies.insert(NO_USABLE_IP, DROP_SLOT);
        expected.vnis.remove(&5);
        expected.pods.get_mut(&[10, 244, 1, 5]).unwrap().policy_id = NO_USABLE_IP;
        expected.exclusions.remove(&(5, [192, 0, 2, 0], 24));
        assert_eq!(*got, expected);

        // Fixed on the next reconcile: the pod goes to 5, the slot is cleared.
        let mut maps = Model::new(got.clone(), 4096);
        let current = got.clone();
        let out = reconcile(&mut maps, &current, &want).unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!(maps.image, want);
    }

    #[test]
    fn remote_pods_of_a_failed_policy_are_not_accepted() {
        // Policy 5 does not fit: node2's pod it selects must not be accepted
        // through the tunnel meanwhile; policy 1's is, and the node's pod
        // CIDRs and upstream devices are written before any pod.
        let mut want = desired(
            &[(1, [172, 18, 0, 100]), (5, [172, 18, 0, 105])],
            &[([10, 244, 1, 1], 1)],
        );
        let remote = |policy_id| RemotePodV4 {
            policy_id,
            node_addr: [172, 18, 0, 12],
        };
        want.remote_pods.insert([10, 244, 2, 1], remote(1));
        want.remote_pods.insert([10, 244, 2, 5], remote(5));
        want.pod_cidrs
            .insert(([10, 244, 2, 0], 24), [172, 18, 0, 12]);
        want.upstream.insert(9, 1);
        let mut maps = Model::new(DatapathImage::default(), 4);
        let out = reconcile(&mut maps, &DatapathImage::default(), &want).unwrap();
        assert_eq!(out.failed.keys().copied().collect::<Vec<_>>(), [5]);
        assert_eq!(
            maps.image.remote_pods,
            BTreeMap::from([([10, 244, 2, 1], remote(1))])
        );
        assert_eq!(maps.image.pod_cidrs, want.pod_cidrs);
        let first_pod = maps
            .writes
            .iter()
            .position(|w| matches!(w, Write::Pod(..)))
            .unwrap();
        for early in [
            Write::Upstream(9, Some(1)),
            Write::PodCidr(([10, 244, 2, 0], 24), Some([172, 18, 0, 12])),
        ] {
            let at = maps.writes.iter().position(|w| *w == early).unwrap();
            assert!(at < first_pod, "{early:?} after the first pod");
        }

        // Everything removed again: pods before the upstream devices.
        let current = maps.image.clone();
        let empty = DatapathImage {
            config: want.config,
            nodes: want.nodes.clone(),
            ..Default::default()
        };
        let mut maps = Model::new(current.clone(), 4);
        reconcile(&mut maps, &current, &empty).unwrap();
        assert!(maps.image.remote_pods.is_empty() && maps.image.pod_cidrs.is_empty());
        assert!(maps.image.upstream.is_empty());
        let pod_gone = maps
            .writes
            .iter()
            .position(|w| matches!(w, Write::Pod(_, None)))
            .unwrap();
        let upstream_gone = maps
            .writes
            .iter()
            .position(|w| *w == Write::Upstream(9, None))
            .unwrap();
        assert!(pod_gone < upstream_gone);
    }

    #[test]
    fn pods_of_a_failed_fail_open_policy_get_no_entry() {
        let mut want = desired(&[(5, [172, 18, 0, 105])], &[([10, 244, 1, 5], 5)]);
        want.policies.get_mut(&5).unwrap().flags |= policy_flags::FAIL_OPEN;
        let mut maps = Model::new(DatapathImage::default(), 4);
        let out = reconcile(&mut maps, &DatapathImage::default(), &want).unwrap();
        assert!(out.failed.contains_key(&5));
        assert!(maps.image.pods.is_empty(), "{:?}", maps.image.pods);
        assert!(maps.image.policies.is_empty());
    }

    #[test]
    fn a_failed_policy_leaves_no_pod_on_another_policy_and_no_older_meaning() {
        // Programmed: pod .7 uses policy 1, and slot 2 holds an older policy.
        let before = desired(
            &[(1, [172, 18, 0, 100]), (2, [172, 18, 0, 99])],
            &[([10, 244, 1, 7], 1)],
        );
        let mut maps = Model::new(before.clone(), 4096);
        // Now pod .7 moves to policy 2, which means another IP, and one of
        // 2's entries cannot be written (say its exclusion: the trie is full).
        let mut after = desired(
            &[(1, [172, 18, 0, 100]), (2, [172, 18, 0, 102])],
            &[([10, 244, 1, 7], 2)],
        );
        after.exclusions.insert((2, [198, 51, 100, 0], 24));
        maps.fail = Some(Write::Exclusion((2, [198, 51, 100, 0], 24), true));
        let out = reconcile(&mut maps, &before, &after).unwrap();
        assert_eq!(out.failed.keys().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(
            maps.image.pods[&[10, 244, 1, 7]].policy_id,
            NO_USABLE_IP,
            "the pod is neither left on policy 1 nor put on the failed 2: held closed"
        );
        assert!(
            !maps.image.policies.contains_key(&2),
            "slot 2 keeps neither its older nor half of its new meaning"
        );
        assert!(maps.image.policies.contains_key(&1));
        assert_eq!(out.present, BTreeSet::from([1]));
    }

    #[test]
    fn a_failed_removal_keeps_the_id_present() {
        let before = desired(&[(1, [172, 18, 0, 100]), (3, [172, 18, 0, 103])], &[]);
        let after = desired(&[(1, [172, 18, 0, 100])], &[]);
        let mut maps = Model::new(before.clone(), 4096);
        maps.fail = Some(Write::Policy(3, None));
        let out = reconcile(&mut maps, &before, &after).unwrap();
        assert!(out.failed.contains_key(&3));
        assert_eq!(out.present, BTreeSet::from([1, 3]), "3 may still be held");
    }

    #[test]
    fn what_every_policy_needs_failing_stops_the_reconcile() {
        let want = desired(&[(1, [172, 18, 0, 100])], &[([10, 244, 1, 1], 1)]);
        let mut maps = Model::new(DatapathImage::default(), 4096);
        maps.fail = Some(Write::Exclusion((0, [10, 244, 0, 0], 16), true));
        assert!(reconcile(&mut maps, &DatapathImage::default(), &want).is_err());
        assert!(maps.image.policies.is_empty() && maps.image.pods.is_empty());
    }

    #[test]
    fn writes_go_in_dependency_order_and_only_what_differs() {
        let want = desired(&[(1, [172, 18, 0, 100])], &[([10, 244, 1, 1], 1)]);
        let mut maps = Model::new(DatapathImage::default(), 4096);
        reconcile(&mut maps, &DatapathImage::default(), &want).unwrap();
        let pos = |pred: &dyn Fn(&Write) -> bool| maps.writes.iter().position(pred).unwrap();
        assert!(
            pos(&|w| matches!(w, Write::Policy(1, Some(_))))
                < pos(&|w| matches!(w, Write::Pod(_, Some(_))))
        );
        let again = reconcile(&mut Model::new(want.clone(), 4096), &want, &want).unwrap();
        assert!(again.report.is_empty());
        assert_eq!(again.present, BTreeSet::from([1]));
    }

    #[test]
    fn exclusion_keys_lead_with_the_policy() {
        let k = exclusion_key(&(3, [10, 0, 0, 0], 8));
        assert_eq!(k.prefix_len(), 40);
        assert_eq!(k.data().policy_id_be, [0, 0, 0, 3]);
    }
}

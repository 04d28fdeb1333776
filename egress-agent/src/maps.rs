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

    /// Writes what differs between `current` (read from the maps) and
    /// `desired`. Additions go in dependency order (policies before the pods,
    /// marks and VNIs that point at them) and removals in reverse, so a
    /// packet never finds a pod whose policy is missing.
    pub fn apply(
        &mut self,
        current: &DatapathImage,
        desired: &DatapathImage,
    ) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        if current.config != desired.config {
            self.config
                .set(0, desired.config, 0)
                .map_err(err(names::CONFIG))?;
            report.written += 1;
        }
        report.add(upsert(
            &mut self.nodes,
            &current.nodes,
            &desired.nodes,
            names::NODES_V4,
        )?);
        for (id, policy) in &desired.policies {
            if current.policies.get(id) != Some(policy) {
                self.policies
                    .set(*id, *policy, 0)
                    .map_err(err(names::POLICIES_V4))?;
                report.written += 1;
            }
        }
        report.add(upsert(
            &mut self.egress_addrs,
            &current.egress_addrs,
            &desired.egress_addrs,
            names::EGRESS_ADDRS_V4,
        )?);
        for e in desired.exclusions.difference(&current.exclusions) {
            self.excluded
                .insert(&exclusion_key(e), 1, 0)
                .map_err(err(names::EXCLUDED_V4))?;
            report.written += 1;
        }
        report.add(upsert(
            &mut self.vnis,
            &current.vnis,
            &desired.vnis,
            names::VNI_POLICY,
        )?);
        report.add(upsert(
            &mut self.marks,
            &current.marks,
            &desired.marks,
            names::MARK_POLICY,
        )?);
        // Upstream devices before the pods whose packets they may carry.
        report.add(upsert(
            &mut self.upstream,
            &current.upstream,
            &desired.upstream,
            names::UPSTREAM_IFACES,
        )?);
        report.add(upsert(
            &mut self.pods,
            &current.pods,
            &desired.pods,
            names::POD_POLICY_V4,
        )?);
        for (cidr, node) in &desired.pod_cidrs {
            if current.pod_cidrs.get(cidr) != Some(node) {
                self.pod_cidrs
                    .insert(&pod_cidr_key(cidr), node, 0)
                    .map_err(err(names::POD_CIDRS_V4))?;
                report.written += 1;
            }
        }
        report.add(upsert(
            &mut self.remote_pods,
            &current.remote_pods,
            &desired.remote_pods,
            names::REMOTE_PODS_V4,
        )?);

        report.add(remove(
            &mut self.remote_pods,
            &current.remote_pods,
            &desired.remote_pods,
            names::REMOTE_PODS_V4,
        )?);
        for cidr in current
            .pod_cidrs
            .keys()
            .filter(|c| !desired.pod_cidrs.contains_key(*c))
        {
            match self.pod_cidrs.remove(&pod_cidr_key(cidr)) {
                Ok(()) | Err(MapError::KeyNotFound) => report.removed += 1,
                Err(e) => return Err(err(names::POD_CIDRS_V4)(e)),
            }
        }
        report.add(remove(
            &mut self.pods,
            &current.pods,
            &desired.pods,
            names::POD_POLICY_V4,
        )?);
        report.add(remove(
            &mut self.upstream,
            &current.upstream,
            &desired.upstream,
            names::UPSTREAM_IFACES,
        )?);
        report.add(remove(
            &mut self.marks,
            &current.marks,
            &desired.marks,
            names::MARK_POLICY,
        )?);
        report.add(remove(
            &mut self.vnis,
            &current.vnis,
            &desired.vnis,
            names::VNI_POLICY,
        )?);
        for e in current.exclusions.difference(&desired.exclusions) {
            self.excluded
                .remove(&exclusion_key(e))
                .map_err(err(names::EXCLUDED_V4))?;
            report.removed += 1;
        }
        report.add(remove(
            &mut self.egress_addrs,
            &current.egress_addrs,
            &desired.egress_addrs,
            names::EGRESS_ADDRS_V4,
        )?);
        for id in current
            .policies
            .keys()
            .filter(|id| !desired.policies.contains_key(id))
        {
            self.policies
                .set(*id, PolicyV4::default(), 0)
                .map_err(err(names::POLICIES_V4))?;
            report.removed += 1;
        }
        report.add(remove(
            &mut self.nodes,
            &current.nodes,
            &desired.nodes,
            names::NODES_V4,
        )?);
        Ok(report)
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

fn upsert<K: Pod + Ord, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(err(name))?;
            report.written += 1;
        }
    }
    Ok(report)
}

fn remove<K: Pod + Ord, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    for k in current.keys().filter(|k| !desired.contains_key(*k)) {
        match map.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => report.removed += 1,
            Err(e) => return Err(err(name)(e)),
        }
    }
    Ok(report)
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
    fn add(&mut self, other: Self) {
        self.written += other.written;
        self.removed += other.removed;
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0 && self.removed == 0
    }
}

/// The reply tuple of a forward entry: where its reverse entry lives.
pub fn reverse_key(key: &FlowKeyV4, entry: &NatEntryV4) -> FlowKeyV4 {
    FlowKeyV4::new(
        key.dst_addr,
        entry.nat_addr,
        key.dst_port,
        entry.nat_port,
        key.proto,
    )
}

/// The forward tuple a reverse entry belongs to.
pub fn forward_key(reply: &FlowKeyV4, rev: &RevNatEntryV4) -> FlowKeyV4 {
    FlowKeyV4::new(
        rev.orig_addr,
        reply.src_addr,
        rev.orig_port,
        reply.src_port,
        reply.proto,
    )
}

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
    use egress_common::proto;

    use super::*;

    #[test]
    fn reverse_and_forward_keys_are_inverse() {
        let fwd = FlowKeyV4::new([10, 244, 1, 2], [198, 51, 100, 10], 40000, 80, proto::TCP);
        let entry = NatEntryV4 {
            nat_addr: [172, 18, 0, 100],
            nat_port: 1234,
            ..Default::default()
        };
        let reply = reverse_key(&fwd, &entry);
        assert_eq!(
            reply,
            FlowKeyV4::new([198, 51, 100, 10], [172, 18, 0, 100], 80, 1234, proto::TCP)
        );
        let rev = RevNatEntryV4 {
            orig_addr: [10, 244, 1, 2],
            orig_port: 40000,
            ..Default::default()
        };
        assert_eq!(forward_key(&reply, &rev), fwd);
    }

    #[test]
    fn exclusion_keys_lead_with_the_policy() {
        let k = exclusion_key(&(3, [10, 0, 0, 0], 8));
        assert_eq!(k.prefix_len(), 40);
        assert_eq!(k.data().policy_id_be, [0, 0, 0, 3]);
    }
}

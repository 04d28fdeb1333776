//! Loading the four eBPF objects (embedded by build.rs) with pinned maps,
//! refusing pinned maps of another layout or size, pinning each program,
//! and attaching them with pinned TCX links so that the datapath keeps
//! forwarding while the agent restarts and a new agent replaces the
//! programs atomically. Also what `reset` uses: the pinned links, detach,
//! and removal of everything an instance pinned.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
use egress_common::{
    DatapathConfig, ExclusionKeyV4, FlowKeyV4, NatEntryV4, NodeV4, PodCidrKeyV4, PodFlowsV4,
    PodPolicyV4, PolicyStats, PolicyV4, RemotePodV4, RevNatEntryV4, UNREPLIED_RING_SLOTS,
    flow_count, maps as names,
};

use egress_config::DatapathSettings;

use crate::maps::{MapsError, PinLayout, Shape, check_pinned};

/// The embedded programs, built by build.rs.
const OBJECTS: [(&str, &[u8]); 4] = [
    (
        names::programs::POD_INGRESS,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod_ingress")),
    ),
    (
        names::programs::POD_EGRESS,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod_egress")),
    ),
    (
        names::programs::TUNNEL_INGRESS,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tunnel_ingress")),
    ),
    (
        names::programs::UPLINK_INGRESS,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/uplink_ingress")),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("mounting bpffs at {path}: {source}")]
    Mount {
        path: &'static str,
        source: nix::Error,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("loading {program}: {source}")]
    Load {
        program: &'static str,
        source: Box<aya::EbpfError>,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Mounts bpffs at /sys/fs/bpf unless it already is.
pub fn ensure_bpffs() -> Result<(), LoadError> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(io_err(Path::new("/proc/self/mounts")))?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target == Some(PinLayout::BPFFS) && fstype == Some("bpf")
    });
    if !mounted {
        tracing::info!("mounting bpffs at {}", PinLayout::BPFFS);
        nix::mount::mount(
            Some("bpf"),
            PinLayout::BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| LoadError::Mount {
            path: PinLayout::BPFFS,
            source,
        })?;
    }
    Ok(())
}

/// The sizes every map must have under `settings`.
pub fn shapes(settings: &DatapathSettings) -> Vec<Shape> {
    fn shape<K, V>(name: &'static str, max_entries: u32) -> Shape {
        Shape {
            name,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }
    let nat = settings.nat_map_entries();
    vec![
        shape::<u32, DatapathConfig>(names::CONFIG, 1),
        shape::<u32, PolicyV4>(names::POLICIES_V4, settings.max_policies),
        shape::<[u8; 4], PodPolicyV4>(names::POD_POLICY_V4, settings.max_pods),
        shape::<[u8; 4], RemotePodV4>(names::REMOTE_PODS_V4, settings.max_pods),
        shape::<aya::maps::lpm_trie::Key<PodCidrKeyV4>, [u8; 4]>(
            names::POD_CIDRS_V4,
            names::MAX_NODES,
        ),
        shape::<u32, u32>(names::UPSTREAM_IFACES, names::MAX_UPSTREAM_INTERFACES),
        shape::<FlowKeyV4, u64>(names::INBOUND_V4, nat),
        shape::<u32, u32>(names::MARK_POLICY, names::MAX_MARKS),
        shape::<u32, u32>(names::VNI_POLICY, names::MAX_MARKS),
        shape::<aya::maps::lpm_trie::Key<ExclusionKeyV4>, u32>(
            names::EXCLUDED_V4,
            names::MAX_EXCLUSIONS,
        ),
        shape::<[u8; 4], NodeV4>(names::NODES_V4, names::MAX_NODES),
        shape::<[u8; 4], u32>(names::EGRESS_ADDRS_V4, settings.max_policies),
        shape::<FlowKeyV4, NatEntryV4>(names::NAT_FWD_V4, nat),
        shape::<FlowKeyV4, RevNatEntryV4>(names::NAT_REV_V4, nat),
        shape::<u32, u64>(names::FLOW_COUNT, flow_count::SLOTS),
        // Pods, local or steered here, with live flows.
        shape::<[u8; 4], PodFlowsV4>(names::POD_FLOWS_V4, settings.max_pods),
        shape::<[u8; 4], u64>(names::POD_RELEASED_V4, settings.max_pods),
        shape::<u32, FlowKeyV4>(names::UNREPLIED_RING, UNREPLIED_RING_SLOTS),
        shape::<u32, PolicyStats>(names::POLICY_STATS, settings.max_policies),
        shape::<u32, u64>(names::HELD_IFACES, names::MAX_HELD_IFACES),
        shape::<[u8; 4], u32>(names::LOCAL_PODS_V4, settings.max_pods),
    ]
}

/// The loaded programs. Dropping it closes our handles; pinned links keep
/// the programs attached.
pub struct Datapath {
    layout: PinLayout,
    objects: Vec<(&'static str, Ebpf)>,
}

impl Datapath {
    /// Loads all programs, creating the pinned maps or reusing them.
    pub fn load(layout: &PinLayout, settings: &DatapathSettings) -> Result<Self, LoadError> {
        for dir in [
            layout.root.clone(),
            layout.maps(),
            layout.progs(),
            layout.links(),
        ] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let shapes = shapes(settings);
        check_pinned(layout, &shapes)?;
        let mut objects = Vec::new();
        for (program, bytes) in OBJECTS {
            let mut loader = EbpfLoader::new();
            for shape in &shapes {
                loader.map_pin_path(shape.name, layout.map(shape.name));
                loader.map_max_entries(shape.name, shape.max_entries);
            }
            let mut ebpf = loader.load(bytes).map_err(|source| LoadError::Load {
                program,
                source: Box::new(source),
            })?;
            let prog = classifier(&mut ebpf, program)?;
            prog.load().map_err(|source| LoadError::Program {
                program,
                source: Box::new(source),
            })?;
            // Pinned so that operators and the benchmark can `bpftool prog run pinned` it.
            let pin = layout.progs().join(program);
            if pin.exists() {
                fs::remove_file(&pin).map_err(io_err(&pin))?;
            }
            prog.pin(&pin).map_err(|source| LoadError::Pin {
                path: pin.clone(),
                source,
            })?;
            objects.push((program, ebpf));
        }
        Ok(Self {
            layout: layout.clone(),
            objects,
        })
    }

    /// Attaches `program` to its TC hook of `interface` (egress for
    /// `pod_egress`, ingress for the others), atomically replacing the
    /// program of a link a previous agent pinned there.
    pub fn attach(&mut self, program: &'static str, interface: &str) -> Result<(), LoadError> {
        let path = self.layout.link(program, interface);
        let (_, ebpf) = self
            .objects
            .iter_mut()
            .find(|(name, _)| *name == program)
            .expect("every program in OBJECTS is loaded");
        let prog = classifier(ebpf, program)?;
        let attach_err = |source| LoadError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(source),
        };
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link =
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                        LoadError::Link {
                            path: path.clone(),
                            source,
                        }
                    })?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin keeps the link; our handle can go.
                        drop(prog.take_link(id).map_err(attach_err)?);
                        return Ok(());
                    }
                    Err(e) => {
                        // The interface was recreated: the old link is defunct.
                        tracing::warn!(%interface, program, error = %e, "replacing a stale pinned link");
                        fs::remove_file(&path).map_err(io_err(&path))?;
                    }
                }
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::Link { path, source }),
        }
        let hook = if program == names::programs::POD_EGRESS {
            TcAttachType::Egress
        } else {
            TcAttachType::Ingress
        };
        let id = prog
            .attach_with_options(
                interface,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link: FdLink =
            prog.take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|source| LoadError::Link {
                    path: path.clone(),
                    source,
                })?;
        link.pin(&path)
            .map_err(|source| LoadError::Pin { path, source })?;
        Ok(())
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| LoadError::Program {
            program,
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?;
    prog.try_into().map_err(|source| LoadError::Program {
        program,
        source: Box::new(source),
    })
}

/// The (program, interface) pairs with a pinned link.
pub fn pinned_links(layout: &PinLayout) -> Result<BTreeSet<(String, String)>, LoadError> {
    let dir = layout.links();
    let mut out = BTreeSet::new();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(LoadError::Io {
                path: dir,
                source: e,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((program, interface)) = name.split_once('@') {
            out.insert((program.to_owned(), interface.to_owned()));
        }
    }
    Ok(out)
}

/// Detaches `program` from `interface` by dropping its pinned link.
pub fn detach(layout: &PinLayout, program: &str, interface: &str) -> Result<(), LoadError> {
    let path = layout.link(program, interface);
    match PinnedLink::from_pin(&path) {
        Ok(pinned) => {
            // Unpinning drops the last reference: the kernel detaches the link.
            pinned.unpin().map_err(io_err(&path))?;
            Ok(())
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(source) => Err(LoadError::Link { path, source }),
    }
}

/// Removes everything the instance pinned: links (detaching the programs),
/// programs and maps. Connections through the datapath end.
pub fn remove_all(layout: &PinLayout) -> Result<(), LoadError> {
    for (program, interface) in pinned_links(layout)? {
        detach(layout, &program, &interface)?;
    }
    if layout.root.exists() {
        fs::remove_dir_all(&layout.root).map_err(io_err(&layout.root))?;
    }
    Ok(())
}

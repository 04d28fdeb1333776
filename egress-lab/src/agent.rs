//! The node agents: their static configuration files and their processes.

use std::{
    collections::BTreeSet,
    fs::{self, OpenOptions},
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use egress_common::maps::LOCAL_PODS_V4;
use egress_config::{
    AgentConfig, ClusterConfig, ClusterNode, KubernetesConfig, NodeConfig, NodeWithPods,
    PolicyConfig,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    error::{LabError, Result, io_err},
    exec, netns,
    spec::{self, LabSpec, TUNNEL_INTERFACE, TUNNEL_PORT},
};

/// How long an agent gets for its first full reconcile.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping agent gets to detach before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The agent binary: `EGRESS_AGENT_BIN`, else the workspace's debug build.
pub fn agent_binary() -> Result<PathBuf> {
    let path = std::env::var_os("EGRESS_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/egress-agent"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::AgentBinaryMissing { path })
    }
}

/// The repository root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("egress-lab lives inside the workspace")
        .to_path_buf()
}

/// Instance name of node `n`'s agent: its bpffs directory `/sys/fs/bpf/<instance>`.
pub fn instance_name(prefix: &str, node: u8) -> String {
    format!("{prefix}-n{node}")
}

/// The configuration of node `node`'s agent: static, or for
/// `run --kubernetes` when the spec says so.
pub fn agent_config(prefix: &str, spec: &LabSpec, node: u8) -> AgentConfig {
    let mut config = AgentConfig {
        instance: instance_name(prefix, node),
        node: NodeConfig {
            uplink: Some("eth0".into()),
            pod_cidr: Some(spec::pod_cidr(node)),
            pod_interfaces: vec!["veth*".into()],
            tunnel_interface: TUNNEL_INTERFACE.into(),
            tunnel_port: TUNNEL_PORT,
            ..NodeConfig::default()
        },
        cluster: ClusterConfig {
            nodes: Vec::new(),
            excluded_cidrs: spec.excluded_cidrs.clone(),
        },
        datapath: spec.datapath.clone(),
        policies: Vec::new(),
        kubernetes: KubernetesConfig::default(),
    };
    match &spec.kubernetes {
        // Policies and nodes come from the API server, the node's name and
        // address from NODE_NAME/NODE_IP.
        Some(k) => config.kubernetes = k.agent.clone(),
        None => {
            config.node.name = format!("node{node}");
            config.node.address = Some(spec::node_addr(node));
            config.cluster.nodes = (1..=spec.nodes)
                .map(|n| {
                    ClusterNode::WithPods(NodeWithPods {
                        address: spec::node_addr(n),
                        pod_cidr: Some(spec::pod_cidr(n)),
                    })
                })
                .collect();
            config.policies = spec.policies.iter().map(policy_config).collect();
        }
    }
    config
}

fn policy_config(p: &spec::PolicySpec) -> PolicyConfig {
    PolicyConfig {
        id: p.id,
        name: p.name.clone(),
        egress_ip: p.egress_ip,
        node: p.node.map(spec::node_addr),
        failure_policy: p.failure_policy,
        pods: p
            .pods
            .iter()
            .map(|pod| pod.ip())
            .chain(p.addresses.iter().copied())
            .collect(),
        marks: p.marks.clone(),
        vnis: p.vnis.clone(),
        excluded_cidrs: p.excluded_cidrs.clone(),
        group: p.group.clone(),
    }
}

/// [`agent_config`] as the TOML file the agent reads.
pub fn render_config(prefix: &str, spec: &LabSpec, node: u8) -> Result<String> {
    toml::to_string(&agent_config(prefix, spec, node))
        .map_err(|e| LabError::Spec(format!("cannot render agent config: {e}")))
}

/// Writes `contents` to `path` through a rename so that a watching agent
/// never reads a half-written file.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("toml.tmp");
    fs::write(&tmp, contents).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming onto {}", path.display())))
}

/// The last `lines` lines of a log file, or why it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                "(log is empty)".into()
            } else {
                all[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read log: {e})"),
    }
}

/// One node's agent process, run in the node's network namespace (but the
/// host's mount namespace, so its pins under /sys/fs/bpf outlive it).
#[derive(Debug)]
pub struct Agent {
    pub node: u8,
    pub instance: String,
    pub ns: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub ready_file: PathBuf,
    pub state_dir: PathBuf,
    /// Extra arguments of `run` and environment, applied at the next start.
    pub extra_args: Vec<String>,
    pub extra_env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Agent {
    pub fn new(node: u8, instance: String, ns: String, dir: &Path) -> Self {
        Self {
            node,
            config: dir.join(format!("{instance}.toml")),
            log: dir.join(format!("{instance}.log")),
            ready_file: dir.join(format!("{instance}.ready")),
            state_dir: dir.join("state"),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            instance,
            ns,
            child: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn error(&self, what: impl Into<String>) -> LabError {
        LabError::Agent {
            node: self.node,
            instance: self.instance.clone(),
            what: what.into(),
            log: self.log.clone(),
            tail: log_tail(&self.log, 40),
        }
    }

    /// Starts the agent and waits for its ready file.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(self.error("is already running"));
        }
        let bin = agent_binary()?;
        match fs::remove_file(&self.ready_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", self.ready_file.display()))(e)),
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        // Restarts append to the same log; the marker shows where each run begins.
        writeln!(log, "===== lab: starting {} =====", bin.display())
            .map_err(io_err(format!("writing {}", self.log.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err(format!("duplicating {}", self.log.display())))?;
        let mut cmd = netns::command_in(&self.ns, &bin.to_string_lossy())?;
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&self.ready_file)
            // Inside the lab's directory: the claim ledger lives and dies
            // with the lab instead of piling up under /run.
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("EGRESS_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            // The log is a file: no colour escapes in it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let desc = exec::describe(&cmd);
        let child = cmd
            .spawn()
            .map_err(|source| LabError::Spawn { cmd: desc, source })?;
        tracing::info!(node = self.node, pid = child.id(), "agent started");
        self.child = Some(child);
        self.wait_ready(READY_TIMEOUT)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready_file.exists() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.error(format!("exited before becoming ready ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "did not create its ready file {} within {timeout:?}",
                    self.ready_file.display()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
    /// Returns an error when the agent had to be killed or exited with failure.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Err(self.error(format!("had already exited ({status})")));
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(self.error(format!("exited with {status} on SIGTERM")));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.error(format!(
                        "ignored SIGTERM for {STOP_TIMEOUT:?} and was killed"
                    )));
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(self.error(format!("cannot be waited for: {e}"))),
            }
        }
    }

    /// Sends SIGTERM without waiting (see [`Self::stop`] to wait).
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }

    /// SIGKILL, as a crash would: nothing is detached or unpinned.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Err(self.error("is not running"));
        };
        child
            .kill()
            .map_err(|e| self.error(format!("cannot be killed: {e}")))?;
        let _ = child.wait();
        Ok(())
    }

    /// Runs `egress-agent <args> --instance <instance>` (the CLI reads the pins).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let bin = agent_binary()?;
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--instance", &self.instance]);
        let out = exec::exec_in(&self.ns, &bin.to_string_lossy(), &full)?;
        Ok(out.stdout)
    }

    /// `egress-agent stats --instance <i> --json`, parsed.
    pub fn stats(&self) -> Result<Stats> {
        let text = self.cli(&["stats", "--json"])?;
        Stats::parse(&text).map_err(|reason| LabError::UnexpectedOutput {
            cmd: format!("egress-agent stats --json --instance {}", self.instance),
            reason,
            output: text,
        })
    }

    /// The pods this agent's datapath knows as the node's own
    /// (`local_pods_v4`, read with bpftool from the pinned map): the sources
    /// a held pod interface lets out.
    pub fn local_pods(&self) -> Result<BTreeSet<Ipv4Addr>> {
        let pin = format!("/sys/fs/bpf/{}/maps/{LOCAL_PODS_V4}", self.instance);
        let out = exec::exec("bpftool", &["-j", "map", "dump", "pinned", &pin])?;
        let text = out.stdout;
        local_pod_keys(&text).map_err(|reason| LabError::UnexpectedOutput {
            cmd: format!("bpftool -j map dump pinned {pin}"),
            reason,
            output: text,
        })
    }

    /// Waits until `ip` is no longer one of this agent's known pods.
    pub fn wait_until_pod_unknown(&self, ip: Ipv4Addr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let known = self.local_pods()?;
            if !known.contains(&ip) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Agent {
                    node: self.node,
                    instance: self.instance.clone(),
                    what: format!(
                        "still knows pod {ip} after {timeout:?} (local_pods_v4: {known:?})"
                    ),
                    log: self.log.clone(),
                    tail: log_tail(&self.log, 30),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `egress-agent nat list --instance <i> --json`, parsed.
    pub fn nat_list(&self) -> Result<Vec<Value>> {
        let text = self.cli(&["nat", "list", "--json"])?;
        nat_entries(&text).map_err(|reason| LabError::UnexpectedOutput {
            cmd: format!("egress-agent nat list --json --instance {}", self.instance),
            reason,
            output: text,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The agent's `stats --json` output.
///
/// Accepted shapes, so the lab does not break on cosmetic changes: an array
/// of per-policy objects, or an object holding one under `policies`, or an
/// object keyed by policy id; each per-policy object names its id in `id`,
/// `policy_id` or `policy` (or is keyed by it) and carries `drops` with one
/// field per `DropReason::name`.
#[derive(Clone, Debug)]
pub struct Stats {
    pub raw: Value,
}

impl Stats {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let stats = Self { raw };
        stats.entries()?;
        Ok(stats)
    }

    /// `(policy id, counters)` pairs.
    pub fn entries(&self) -> std::result::Result<Vec<(u32, &Value)>, String> {
        let list = match &self.raw {
            Value::Object(map) if map.contains_key("policies") => &map["policies"],
            other => other,
        };
        let id_of = |v: &Value| {
            ["id", "policy_id", "policy"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_u64))
                .map(|id| id as u32)
        };
        match list {
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    id_of(item)
                        .map(|id| (id, item))
                        .ok_or_else(|| format!("entry without an id field: {item}"))
                })
                .collect(),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| {
                    k.parse::<u32>()
                        .ok()
                        .or_else(|| id_of(v))
                        .map(|id| (id, v))
                        .ok_or_else(|| format!("key `{k}` is not a policy id"))
                })
                .collect(),
            _ => Err("expected an array or object of per-policy counters".into()),
        }
    }

    /// A drop counter (`DropReason::name`) of `policy_id` (0: no policy);
    /// zero when the policy has no entry (nothing counted yet).
    pub fn drops(&self, policy_id: u32, reason: &str) -> std::result::Result<u64, String> {
        let entries = self.entries()?;
        let Some((_, entry)) = entries.iter().find(|(id, _)| *id == policy_id) else {
            return Ok(0);
        };
        entry
            .get("drops")
            .and_then(|d| d.get(reason))
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("policy {policy_id} has no counter drops.{reason}: {entry}"))
    }

    /// A top-level counter of `policy_id` such as `new_flows`.
    pub fn counter(&self, policy_id: u32, name: &str) -> std::result::Result<u64, String> {
        let entries = self.entries()?;
        let Some((_, entry)) = entries.iter().find(|(id, _)| *id == policy_id) else {
            return Ok(0);
        };
        entry
            .get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("policy {policy_id} has no counter {name}: {entry}"))
    }
}

/// Entries of `nat list --json`: an array, or an object holding one under
/// `entries`, `flows` or `nat`.
/// The keys of a `bpftool -j map dump` of `local_pods_v4`: with BTF each
/// entry has `formatted.key` as four numbers, without it `key` as four
/// hex strings.
fn local_pod_keys(text: &str) -> std::result::Result<BTreeSet<Ipv4Addr>, String> {
    let entries: Vec<Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let byte = |v: &Value| -> Option<u8> {
        match v {
            Value::Number(n) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
            Value::String(s) => u8::from_str_radix(s.trim_start_matches("0x"), 16).ok(),
            _ => None,
        }
    };
    entries
        .iter()
        .map(|entry| {
            let key = entry
                .pointer("/formatted/key")
                .or_else(|| entry.get("key"))
                .and_then(Value::as_array)
                .ok_or_else(|| format!("an entry without a key: {entry}"))?;
            let octets: Vec<u8> = key.iter().filter_map(byte).collect();
            <[u8; 4]>::try_from(octets.as_slice())
                .map(Ipv4Addr::from)
                .map_err(|_| format!("a key that is not four bytes: {entry}"))
        })
        .collect()
}

pub fn nat_entries(text: &str) -> std::result::Result<Vec<Value>, String> {
    let raw: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = match &raw {
        Value::Array(_) => &raw,
        Value::Object(map) => ["entries", "flows", "nat"]
            .iter()
            .find_map(|k| map.get(*k))
            .ok_or("object without an `entries` array")?,
        _ => return Err("expected an array of NAT entries".into()),
    };
    list.as_array()
        .cloned()
        .ok_or_else(|| "the entries are not an array".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_pod_keys_read_both_bpftool_shapes() {
        let btf = r#"[{"key":["0x0a","0xf4","0x02","0x02"],"value":["0x01","0x00","0x00","0x00"],
            "formatted":{"key":[10,244,2,2],"value":1}}]"#;
        let raw =
            r#"[{"key":["0x0a","0xf4","0x01","0x03"],"value":["0x01","0x00","0x00","0x00"]}]"#;
        assert_eq!(
            local_pod_keys(btf).unwrap(),
            BTreeSet::from([Ipv4Addr::new(10, 244, 2, 2)])
        );
        assert_eq!(
            local_pod_keys(raw).unwrap(),
            BTreeSet::from([Ipv4Addr::new(10, 244, 1, 3)])
        );
        assert!(local_pod_keys("[]").unwrap().is_empty());
        assert!(local_pod_keys(r#"[{"key":["0x0a"]}]"#).is_err());
    }

    use std::net::Ipv4Addr;

    use super::*;
    use crate::spec::{PodRef, PolicySpec};

    #[test]
    fn config_has_the_example_layout() {
        let mut spec = LabSpec::default();
        spec.policies.push(PolicySpec::new(
            7,
            Ipv4Addr::new(172, 18, 0, 107),
            None,
            vec![],
        ));
        let text = render_config("eg12ab", &spec, 1).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["instance"].as_str(), Some("eg12ab-n1"));
        assert_eq!(v["node"]["address"].as_str(), Some("172.18.0.11"));
        assert_eq!(v["node"]["pod_cidr"].as_str(), Some("10.244.1.0/24"));
        assert_eq!(v["node"]["tunnel_interface"].as_str(), Some("egress-vxlan"));
        assert_eq!(v["node"]["tunnel_port"].as_integer(), Some(4789));
        assert_eq!(v["cluster"]["nodes"].as_array().unwrap().len(), 3);
        assert_eq!(v["datapath"]["timeouts"]["udp"].as_integer(), Some(60));
        let policies = v["policies"].as_array().unwrap();
        assert_eq!(policies[0]["failure_policy"].as_str(), Some("fail-closed"));
        assert_eq!(policies[0]["node"].as_str(), Some("172.18.0.11"));
        assert_eq!(
            policies[0]["pods"].as_array().unwrap()[1].as_str(),
            Some(PodRef::new(2, 1).ip().to_string().as_str())
        );
        // An unheld egress IP has no `node` key at all.
        assert!(policies[2].get("node").is_none());
    }

    /// What the lab writes is what the agent reads, in either mode.
    #[test]
    fn rendered_configs_are_valid_agent_files() {
        use egress_config::Mode;
        let path = Path::new("lab.toml");
        let spec = LabSpec::default();
        let text = render_config("lab", &spec, 2).unwrap();
        let parsed = AgentConfig::parse_for(&text, path, Mode::Static).unwrap();
        assert_eq!(parsed, agent_config("lab", &spec, 2));
        assert_eq!(parsed.datapath.gc_interval, Duration::from_secs(1));
        let spec = LabSpec::kubernetes();
        let text = render_config("lab", &spec, 2).unwrap();
        let parsed = AgentConfig::parse_for(&text, path, Mode::Kubernetes).unwrap();
        assert_eq!(parsed, agent_config("lab", &spec, 2));
        assert_eq!(parsed.kubernetes.drain_timeout, Duration::from_secs(2));
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["kubernetes"]["claim_ttl_ms"].as_integer(), Some(1500));
        assert_eq!(
            v["kubernetes"]["heartbeat"]["port"].as_integer(),
            Some(9471)
        );
        assert!(
            v.get("policies")
                .is_none_or(|p| p.as_array().unwrap().is_empty())
        );
    }

    #[test]
    fn stats_shapes_are_understood() {
        let arr = r#"[{"policy_id":0,"drops":{"unknown_tunnel_peer":3}},{"policy_id":1,"new_flows":2,"drops":{"unknown_tunnel_peer":0}}]"#;
        let s = Stats::parse(arr).unwrap();
        assert_eq!(s.drops(0, "unknown_tunnel_peer").unwrap(), 3);
        assert_eq!(s.counter(1, "new_flows").unwrap(), 2);
        assert_eq!(s.drops(5, "unknown_tunnel_peer").unwrap(), 0);
        let obj = r#"{"policies":{"0":{"drops":{"flow_table_full":9}}}}"#;
        assert_eq!(
            Stats::parse(obj)
                .unwrap()
                .drops(0, "flow_table_full")
                .unwrap(),
            9
        );
        let bad = Stats::parse(r#"[{"drops":{}}]"#).unwrap_err();
        assert!(bad.contains("without an id"), "{bad}");
        let missing = Stats::parse(r#"[{"id":1,"drops":{}}]"#)
            .unwrap()
            .drops(1, "fragment")
            .unwrap_err();
        assert!(missing.contains("drops.fragment"), "{missing}");
    }

    #[test]
    fn nat_list_shapes_are_understood() {
        assert_eq!(nat_entries("[]").unwrap().len(), 0);
        assert_eq!(nat_entries(r#"{"entries":[{},{}]}"#).unwrap().len(), 2);
        assert!(nat_entries(r#"{"x":1}"#).is_err());
    }

    #[test]
    fn missing_agent_binary_is_named() {
        // SAFETY: no other thread of this test binary reads EGRESS_AGENT_BIN.
        unsafe { std::env::set_var("EGRESS_AGENT_BIN", "/nonexistent/egress-agent") };
        let err = agent_binary().unwrap_err().to_string();
        unsafe { std::env::remove_var("EGRESS_AGENT_BIN") };
        assert!(err.contains("/nonexistent/egress-agent"), "{err}");
    }
}

//! Building and tearing down the namespace cluster.
//!
//! ```text
//!  <p>-n1p1 ─veth1┐                          ┌─ eth0 172.18.0.11  <p>-n1
//!  <p>-n1p2 ─veth2┤ <p>-n1 ─eth0──┐           │
//!                                 ├─ br0 172.18.0.1 ── <p>-rt ── srv 198.51.100.1 (MTU 1400)
//!  <p>-n2.. , <p>-n3..  ─eth0─────┘                                  │
//!                                                   <p>-srv eth0 198.51.100.10 (MTU 1400)
//! ```
//!
//! Veths are created straight into their namespaces, so their names never
//! meet in the root namespace and labs with different prefixes coexist.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    agent::{self, Agent},
    error::{LabError, Result, io_err},
    exec,
    kubernetes::{self, KubeApi},
    namespaces, netns,
    spec::{self, LabSpec, PodRef, PolicySpec},
    traffic::wait_for,
};

/// How long a Kubernetes-mode lab gets to publish subnets, assign, claim
/// and program its policies.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

const BPFFS: &str = "/sys/fs/bpf";

/// A running lab. Dropping it stops its agents and deletes every namespace
/// and bpffs directory it created, unless [`Lab::persist`] was called.
pub struct Lab {
    prefix: String,
    spec: LabSpec,
    dir: PathBuf,
    namespaces: Vec<String>,
    agents: BTreeMap<u8, Agent>,
    /// Kubernetes mode: the API server the agents watch.
    kube: Option<KubeApi>,
    persistent: bool,
}

impl Lab {
    /// Builds the topology of `spec` (no agents yet: see [`Lab::start_agents`]).
    pub fn build(spec: LabSpec) -> Result<Self> {
        spec.validate()?;
        let prefix = match &spec.prefix {
            Some(p) => p.clone(),
            None => unique_prefix(),
        };
        reap_orphaned_labs();
        let dir = agent::workspace_root().join("target/lab").join(&prefix);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        fs::write(dir.join(OWNER_FILE), format!("{}\n", std::process::id())).map_err(io_err(
            format!("writing {}", dir.join(OWNER_FILE).display()),
        ))?;
        let mut lab = Self {
            namespaces: Vec::new(),
            agents: BTreeMap::new(),
            kube: None,
            persistent: false,
            prefix,
            spec,
            dir,
        };
        // `lab` now owns cleanup: an error below drops it, which removes
        // whatever part of the topology exists.
        lab.create()?;
        Ok(lab)
    }

    fn create(&mut self) -> Result<()> {
        let started = Instant::now();
        let p = self.prefix.clone();
        let spec = self.spec.clone();
        let rt = self.router_ns();
        let srv = self.server_ns();
        let mut all = vec![rt.clone(), srv.clone()];
        for n in 1..=spec.nodes {
            all.push(self.node_ns(n));
            for i in 1..=spec.pods_per_node {
                all.push(self.pod_ns(PodRef::new(n, i)));
            }
        }
        for ns in &all {
            if netns::netns_path(ns).exists() {
                return Err(LabError::Spec(format!(
                    "namespace `{ns}` already exists: another lab uses prefix `{p}` (remove it with `cargo xtask lab down` or `ip netns del`)"
                )));
            }
        }
        // Recorded before creation so that a failure half-way still cleans up.
        self.namespaces = all.clone();
        exec::ip_batch(
            None,
            &all.iter()
                .map(|ns| format!("netns add {ns}"))
                .collect::<Vec<_>>(),
        )?;

        // Sysctls first: `default` values apply to interfaces created later.
        netns::sysctls(&rt, &[("net.ipv4.ip_forward", "1")])?;
        netns::sysctls(
            &srv,
            &[
                ("net.core.somaxconn", "65535"),
                ("net.ipv4.tcp_max_syn_backlog", "65535"),
            ],
        )?;
        for n in 1..=spec.nodes {
            netns::sysctls(
                &self.node_ns(n),
                &[
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.default.rp_filter", "0"),
                ],
            )?;
        }

        let mut links = vec![format!(
            "link add eth0 mtu {m} netns {srv} type veth peer name srv mtu {m} netns {rt}",
            m = spec.server_link_mtu
        )];
        for n in 1..=spec.nodes {
            let node = self.node_ns(n);
            links.push(format!(
                "link add eth0 mtu {m} netns {node} type veth peer name n{n} mtu {m} netns {rt}",
                m = spec.node_mtu
            ));
            for i in 1..=spec.pods_per_node {
                let pod = PodRef::new(n, i);
                links.push(format!(
                    "link add {host} mtu {m} netns {node} type veth peer name eth0 mtu {m} netns {pns}",
                    host = pod.host_interface(),
                    m = spec.pod_mtu,
                    pns = self.pod_ns(pod),
                ));
            }
        }
        exec::ip_batch(None, &links)?;

        let mut router = vec![
            "link set lo up".to_owned(),
            format!("link add br0 mtu {} type bridge", spec.node_mtu),
            format!(
                "addr add {}/{} dev br0",
                spec::ROUTER_NODE_ADDR,
                spec::NODE_PREFIX_LEN
            ),
            "link set br0 up".to_owned(),
            format!(
                "addr add {}/{} dev srv",
                spec::ROUTER_SERVER_ADDR,
                spec::SERVER_PREFIX_LEN
            ),
            "link set srv up".to_owned(),
        ];
        for n in 1..=spec.nodes {
            router.push(format!("link set n{n} master br0"));
            router.push(format!("link set n{n} up"));
        }
        exec::ip_batch(Some(&rt), &router)?;

        let mut server = vec![
            "link set lo up".to_owned(),
            format!(
                "addr add {}/{} dev eth0",
                spec::SERVER_ADDR,
                spec::SERVER_PREFIX_LEN
            ),
            "link set eth0 up".to_owned(),
        ];
        let mut default = format!("route add default via {}", spec::ROUTER_SERVER_ADDR);
        if let Some(mss) = spec.server_advmss {
            default.push_str(&format!(" advmss {mss}"));
        }
        server.push(default);
        exec::ip_batch(Some(&srv), &server)?;

        for n in 1..=spec.nodes {
            let mut node = vec![
                "link set lo up".to_owned(),
                format!(
                    "addr add {}/{} dev eth0",
                    spec::node_addr(n),
                    spec::NODE_PREFIX_LEN
                ),
                "link set eth0 up".to_owned(),
                format!("route add default via {}", spec::ROUTER_NODE_ADDR),
            ];
            for m in (1..=spec.nodes).filter(|m| *m != n) {
                node.push(format!(
                    "route add {} via {}",
                    spec::pod_cidr(m),
                    spec::node_addr(m)
                ));
            }
            for i in 1..=spec.pods_per_node {
                let pod = PodRef::new(n, i);
                let host = pod.host_interface();
                node.push(format!("addr add {}/32 dev {host}", spec::pod_gateway(n)));
                node.push(format!("link set {host} up"));
                node.push(format!("route add {}/32 dev {host}", pod.ip()));
            }
            exec::ip_batch(Some(&self.node_ns(n)), &node)?;

            for i in 1..=spec.pods_per_node {
                let pod = PodRef::new(n, i);
                exec::ip_batch(
                    Some(&self.pod_ns(pod)),
                    &[
                        "link set lo up".to_owned(),
                        format!("addr add {}/32 dev eth0", pod.ip()),
                        "link set eth0 up".to_owned(),
                        format!(
                            "route add default via {} dev eth0 onlink",
                            spec::pod_gateway(n)
                        ),
                    ],
                )?;
            }

            // What a CNI does for pods without an egress IP.
            exec::exec_in(
                &self.node_ns(n),
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    "10.244.0.0/16",
                    "!",
                    "-d",
                    "10.244.0.0/16",
                    "-j",
                    "MASQUERADE",
                ],
            )?;
        }

        if spec.kubernetes.is_some() {
            self.kube = Some(KubeApi::start(&rt, &self.dir, &spec)?);
        }
        for n in 1..=spec.nodes {
            let mut agent = Agent::new(n, self.instance(n), self.node_ns(n), &self.dir);
            (agent.extra_args, agent.extra_env) = self.agent_launch(n);
            agent::write_atomically(
                &agent.config,
                &agent::render_config(&self.prefix, &self.spec, n)?,
            )?;
            self.agents.insert(n, agent);
        }
        tracing::info!(
            prefix = %self.prefix,
            namespaces = self.namespaces.len(),
            elapsed = ?started.elapsed(),
            "lab built"
        );
        Ok(())
    }

    /// Arguments and environment of node `n`'s agent: the spec's, plus
    /// what Kubernetes mode needs.
    fn agent_launch(&self, n: u8) -> (Vec<String>, Vec<(String, String)>) {
        let mut args = self.spec.agent_args.clone();
        let mut env = self.spec.agent_env.clone();
        if let Some(kube) = &self.kube {
            args.push("--kubernetes".into());
            let with_node_ip = self.spec.kubernetes.as_ref().is_some_and(|k| k.node_ip_env);
            env.extend(
                kube.agent_env(n)
                    .into_iter()
                    .filter(|(k, _)| with_node_ip || k != "NODE_IP"),
            );
        }
        (args, env)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The API server of a Kubernetes-mode lab.
    pub fn kube(&self) -> Option<&KubeApi> {
        self.kube.as_ref()
    }

    fn kube_or_err(&self) -> Result<&KubeApi> {
        self.kube
            .as_ref()
            .ok_or_else(|| LabError::Spec("the lab is not in Kubernetes mode".into()))
    }

    /// Deletes `pod`'s Pod object (Kubernetes mode): its traffic is then
    /// nobody's and leaves with its node's address.
    pub fn delete_pod_object(&mut self, pod: PodRef) -> Result<()> {
        self.kube_or_err()?;
        self.kube
            .as_mut()
            .expect("checked just above")
            .delete_pod(pod)
    }

    /// Deletes `pod`'s interface pair, as when a pod's sandbox goes away
    /// (its network namespace stays, empty).
    pub fn unplug_pod(&self, pod: PodRef) -> Result<()> {
        exec::ip_batch(
            Some(&self.node_ns(pod.node)),
            &[format!("link del {}", pod.host_interface())],
        )
    }

    /// Gives `pod` its interface pair again, configured as at build time:
    /// the pair, the node side (address, state, route), then the pod side,
    /// so that the pod's first packet finds its gateway answering at once.
    pub fn plug_pod(&self, pod: PodRef) -> Result<()> {
        let n = pod.node;
        let host = pod.host_interface();
        let node = self.node_ns(n);
        let pns = self.pod_ns(pod);
        exec::ip_batch(
            Some(&node),
            &[
                format!(
                    "link add {host} mtu {m} type veth peer name eth0 mtu {m} netns {pns}",
                    m = self.spec.pod_mtu
                ),
                format!("addr add {}/32 dev {host}", spec::pod_gateway(n)),
                format!("link set {host} up"),
                format!("route add {}/32 dev {host}", pod.ip()),
            ],
        )?;
        exec::ip_batch(
            Some(&pns),
            &[
                format!("addr add {}/32 dev eth0", pod.ip()),
                "link set eth0 up".to_owned(),
                format!(
                    "route add default via {} dev eth0 onlink",
                    spec::pod_gateway(n)
                ),
            ],
        )
    }

    /// Creates `pod`'s Pod object again after [`Self::delete_pod_object`].
    pub fn restore_pod_object(&mut self, pod: PodRef) -> Result<()> {
        self.kube_or_err()?;
        let spec = self.spec.clone();
        self.kube
            .as_mut()
            .expect("checked just above")
            .restore_pod(pod, &spec)
    }

    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// Where configs, agent logs and ready files live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn router_ns(&self) -> String {
        format!("{}-rt", self.prefix)
    }

    pub fn server_ns(&self) -> String {
        format!("{}-srv", self.prefix)
    }

    pub fn node_ns(&self, n: u8) -> String {
        format!("{}-n{n}", self.prefix)
    }

    pub fn pod_ns(&self, pod: PodRef) -> String {
        format!("{}-n{}p{}", self.prefix, pod.node, pod.index)
    }

    pub fn instance(&self, n: u8) -> String {
        agent::instance_name(&self.prefix, n)
    }

    pub fn pods(&self) -> Vec<PodRef> {
        (1..=self.spec.nodes)
            .flat_map(|n| (1..=self.spec.pods_per_node).map(move |i| PodRef::new(n, i)))
            .collect()
    }

    /// The policy selecting `pod`, if any.
    pub fn policy_of(&self, pod: PodRef) -> Option<&PolicySpec> {
        if self.kube.as_ref().is_some_and(|k| !k.has_pod(pod)) {
            // Its Pod object is gone: nothing selects its address.
            return None;
        }
        self.spec.policies.iter().find(|p| p.pods.contains(&pod))
    }

    /// The source address the server should see for `pod`'s traffic: its
    /// policy's egress IP, its node's address (masquerade) when unselected or
    /// failing open, `None` when the policy fails closed (dropped).
    pub fn expected_source(&self, pod: PodRef) -> Option<Ipv4Addr> {
        match self.policy_of(pod) {
            Some(p) if p.node.is_some() => Some(p.egress_ip),
            Some(p) if p.failure_policy == egress_model::FailurePolicy::FailClosed => None,
            _ => Some(spec::node_addr(pod.node)),
        }
    }

    pub fn agent(&self, n: u8) -> &Agent {
        self.agents
            .get(&n)
            .unwrap_or_else(|| panic!("node {n} does not exist in lab {}", self.prefix))
    }

    fn agent_mut(&mut self, n: u8) -> Result<&mut Agent> {
        let prefix = self.prefix.clone();
        self.agents
            .get_mut(&n)
            .ok_or_else(|| LabError::Spec(format!("node {n} does not exist in lab {prefix}")))
    }

    /// Starts every node's agent and waits until each is ready. In
    /// Kubernetes mode it then creates the EgressIPs (once every agent has
    /// published its subnets, so that each can be placed on its node at
    /// once) and waits until every agent has programmed them.
    pub fn start_agents(&mut self) -> Result<()> {
        agent::agent_binary()?;
        for n in 1..=self.spec.nodes {
            self.start_agent(n)?;
        }
        if let Some(kube) = &self.kube {
            kube.wait_subnets_published(self.spec.nodes, CONVERGE_TIMEOUT)?;
            kube.apply_policies(&self.spec)?;
            self.wait_converged(CONVERGE_TIMEOUT)?;
        }
        Ok(())
    }

    /// Kubernetes mode: waits until the cluster does what the spec says:
    /// every policy's IP assigned to and announced by its node, on that
    /// node's uplink and no other, and every node's datapath steering the
    /// policy's existing pods to it (and nothing else).
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let kube = self.kube_or_err()?;
        wait_for(
            "the agents program what the Kubernetes objects say",
            timeout,
            || self.convergence_gap(kube),
        )
    }

    /// What still differs from the spec, or `Ok` when nothing does.
    fn convergence_gap(&self, kube: &KubeApi) -> std::result::Result<(), String> {
        let spec = &self.spec;
        for p in &spec.policies {
            let holder = p.node.map(kubernetes::node_name);
            match kube.holder(&p.name, p.egress_ip) {
                Some((node, true)) if Some(&node) == holder.as_ref() => {}
                other => {
                    return Err(format!(
                        "EgressIP {} status for {}: (node, announced) = {other:?}, want {holder:?} announced",
                        p.name, p.egress_ip
                    ));
                }
            }
        }
        for n in 1..=spec.nodes {
            let programmed =
                kubernetes::programmed_policies(self.agent(n)).map_err(|e| e.to_string())?;
            let wanted: kubernetes::Programmed = spec
                .policies
                .iter()
                .map(|p| {
                    let pods = p
                        .pods
                        .iter()
                        .filter(|pod| pod.node == n && kube.has_pod(**pod))
                        .map(|pod| pod.ip())
                        .collect();
                    (p.egress_ip, (p.node.map(spec::node_addr), pods))
                })
                .collect();
            if programmed != wanted {
                return Err(format!(
                    "node{n} programmed {programmed:?}, want {wanted:?} (egress IP -> (egress node, pods))"
                ));
            }
            let on_uplink =
                kubernetes::addresses_on(&self.node_ns(n), "eth0").map_err(|e| e.to_string())?;
            for p in &spec.policies {
                if on_uplink.contains(&p.egress_ip) != (p.node == Some(n)) {
                    return Err(format!(
                        "node{n} eth0 has {on_uplink:?}; {} belongs to {:?}",
                        p.egress_ip,
                        p.node.map(kubernetes::node_name)
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn start_agent(&mut self, n: u8) -> Result<()> {
        self.agent_mut(n)?.start()
    }

    /// Graceful stop (SIGTERM).
    pub fn stop_agent(&mut self, n: u8) -> Result<()> {
        self.agent_mut(n)?.stop()
    }

    /// Crash (SIGKILL).
    pub fn kill_agent(&mut self, n: u8) -> Result<()> {
        self.agent_mut(n)?.kill9()
    }

    pub fn restart_agent(&mut self, n: u8) -> Result<()> {
        let agent = self.agent_mut(n)?;
        agent.stop()?;
        agent.start()
    }

    /// Rewrites every node's configuration with `policies`; running agents
    /// pick the change up by watching their file.
    pub fn set_policies(&mut self, policies: Vec<PolicySpec>) -> Result<()> {
        let mut spec = self.spec.clone();
        spec.policies = policies;
        spec.validate()?;
        self.spec = spec;
        self.rewrite_configs()
    }

    /// Rewrites every node's configuration from a modified spec (datapath
    /// settings, exclusions, policies). Sizes and MTUs cannot change.
    pub fn update_spec(&mut self, f: impl FnOnce(&mut LabSpec)) -> Result<()> {
        let mut spec = self.spec.clone();
        f(&mut spec);
        spec.validate()?;
        if (spec.nodes, spec.pods_per_node) != (self.spec.nodes, self.spec.pods_per_node) {
            return Err(LabError::Spec(
                "the number of nodes and pods of a running lab cannot change".into(),
            ));
        }
        self.spec = spec;
        self.rewrite_configs()
    }

    /// Static mode: rewrites the files the agents watch. Kubernetes mode:
    /// rewrites the files (read at the next start) and updates the pods'
    /// labels and the EgressIPs; the agents follow through their watches.
    fn rewrite_configs(&mut self) -> Result<()> {
        for n in 1..=self.spec.nodes {
            let text = agent::render_config(&self.prefix, &self.spec, n)?;
            let (args, env) = self.agent_launch(n);
            let agent = self.agent_mut(n)?;
            agent.extra_args = args;
            agent.extra_env = env;
            agent::write_atomically(&agent.config, &text)?;
        }
        if let Some(kube) = &self.kube {
            kube.apply_policies(&self.spec)?;
        }
        Ok(())
    }

    /// Keeps everything in place when the `Lab` is dropped (`lab up`).
    /// A Kubernetes-mode lab's API server lives in this process and ends
    /// with it.
    pub fn persist(mut self) {
        self.persistent = true;
        // Nobody owns a persistent lab: the reaper must leave it alone.
        let _ = fs::remove_file(self.dir.join(OWNER_FILE));
        // Agents must outlive this process: forget their handles so that
        // Drop does not signal them.
        for (_, agent) in std::mem::take(&mut self.agents) {
            std::mem::forget(agent);
        }
    }

    /// Description of the lab for `target/lab/topology.json`.
    pub fn topology(&self) -> Topology {
        Topology {
            prefix: self.prefix.clone(),
            lab_dir: self.dir.clone(),
            router: RouterInfo {
                namespace: self.router_ns(),
                node_network: format!("{}/{}", spec::ROUTER_NODE_ADDR, spec::NODE_PREFIX_LEN),
                bridge: "br0".into(),
                server_link: format!("{}/{}", spec::ROUTER_SERVER_ADDR, spec::SERVER_PREFIX_LEN),
                server_link_mtu: self.spec.server_link_mtu,
            },
            server: ServerInfo {
                namespace: self.server_ns(),
                address: spec::SERVER_ADDR,
                link_mtu: self.spec.server_link_mtu,
                advmss: self.spec.server_advmss,
                tcp_port: spec::SERVER_TCP_PORT,
                udp_port: spec::SERVER_UDP_PORT,
                iperf3_port: spec::SERVER_IPERF_PORT,
            },
            nodes: (1..=self.spec.nodes)
                .map(|n| {
                    let agent = self.agent(n);
                    NodeInfo {
                        name: format!("node{n}"),
                        namespace: self.node_ns(n),
                        address: spec::node_addr(n),
                        uplink: "eth0".into(),
                        pod_cidr: spec::pod_cidr(n).to_string(),
                        instance: agent.instance.clone(),
                        bpffs: PathBuf::from(BPFFS).join(&agent.instance),
                        config: agent.config.clone(),
                        log: agent.log.clone(),
                        pods: (1..=self.spec.pods_per_node)
                            .map(|i| {
                                let pod = PodRef::new(n, i);
                                PodInfo {
                                    name: pod.to_string(),
                                    namespace: self.pod_ns(pod),
                                    address: pod.ip(),
                                    host_interface: pod.host_interface(),
                                    mtu: self.spec.pod_mtu,
                                    policy: self.policy_of(pod).map(|p| p.id),
                                    expected_source: self.expected_source(pod),
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
            egress_ips: self
                .spec
                .policies
                .iter()
                .map(|p| EgressIpInfo {
                    policy_id: p.id,
                    name: p.name.clone(),
                    egress_ip: p.egress_ip,
                    node: p.node.map(|n| format!("node{n}")),
                    node_address: p.node.map(spec::node_addr),
                    selects: p
                        .pods
                        .iter()
                        .map(|pod| SelectedPod {
                            pod: pod.to_string(),
                            namespace: self.pod_ns(*pod),
                            address: pod.ip(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn write_topology(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        let text = serde_json::to_string_pretty(&self.topology())
            .map_err(|e| LabError::Spec(format!("cannot serialise topology: {e}")))?;
        fs::write(path, text + "\n").map_err(io_err(format!("writing {}", path.display())))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        // Agents first: they detach from interfaces that are about to vanish.
        // All are asked at once, so that their hand-overs overlap.
        for agent in self.agents.values() {
            agent.terminate();
        }
        let agents = std::mem::take(&mut self.agents);
        drop(agents);
        // Then the API server, which they talked to until the end.
        drop(self.kube.take());
        let pins: Vec<PathBuf> = (1..=self.spec.nodes)
            .map(|n| PathBuf::from(BPFFS).join(self.instance(n)))
            .collect();
        teardown(&self.namespaces, &pins);
        if thread::panicking() {
            eprintln!(
                "lab {}: kept configs and agent logs in {} for inspection",
                self.prefix,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Deletes `namespaces` (see [`namespaces::delete_all`]) and removes
/// `pins`. Best effort: it runs from Drop, where nothing can be returned;
/// failures are logged.
fn teardown(namespaces: &[String], pins: &[PathBuf]) {
    namespaces::delete_all(namespaces);
    for pin in pins {
        if pin.exists()
            && let Err(e) = fs::remove_dir_all(pin)
        {
            tracing::warn!(path = %pin.display(), error = %e, "cannot remove pinned state");
        }
    }
}

/// Removes every namespace named `<prefix>-…` and the bpffs directories
/// `/sys/fs/bpf/<prefix>-…` (for `lab down` and after a crashed run).
/// Returns the namespaces it removed.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>> {
    spec::validate_prefix(prefix)?;
    let wanted = format!("{prefix}-");
    let list = |dir: &str| -> Result<Vec<String>> {
        match fs::read_dir(dir) {
            Ok(entries) => Ok(entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&wanted))
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(format!("listing {dir}"))(e)),
        }
    };
    let mut namespaces = list("/run/netns")?;
    namespaces.sort();
    let pins: Vec<PathBuf> = list(BPFFS)?
        .into_iter()
        .map(|name| PathBuf::from(BPFFS).join(name))
        .collect();
    teardown(&namespaces, &pins);
    let left: Vec<&String> = namespaces
        .iter()
        .filter(|ns| netns::netns_path(ns).exists())
        .collect();
    if !left.is_empty() {
        return Err(LabError::Spec(format!(
            "namespaces {left:?} could not be removed"
        )));
    }
    Ok(namespaces)
}

/// Records which process owns a lab, in the lab's directory.
const OWNER_FILE: &str = "owner.pid";

/// Removes labs whose owning process is gone: a test binary killed by a
/// timeout or a signal never runs its destructors, and its namespaces and
/// agents would otherwise stay forever.
fn reap_orphaned_labs() {
    let root = agent::workspace_root().join("target/lab");
    let Ok(entries) = fs::read_dir(&root) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let Ok(pid) = owner.trim().parse::<u32>() else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let prefix = entry.file_name().to_string_lossy().into_owned();
        if spec::validate_prefix(&prefix).is_err() {
            continue;
        }
        match cleanup_prefix(&prefix) {
            Ok(removed) => {
                tracing::info!(%prefix, pid, namespaces = removed.len(), "removed a lab whose owner died");
                let _ = fs::remove_dir_all(&dir);
            }
            Err(e) => tracing::warn!(%prefix, error = %e, "cannot remove an orphaned lab"),
        }
    }
}

/// A prefix no existing namespace uses.
fn unique_prefix() -> String {
    loop {
        let p = spec::random_prefix();
        let taken = fs::read_dir("/run/netns")
            .map(|entries| {
                entries.filter_map(|e| e.ok()).any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{p}-"))
                })
            })
            .unwrap_or(false);
        if !taken {
            return p;
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    pub prefix: String,
    pub lab_dir: PathBuf,
    pub router: RouterInfo,
    pub server: ServerInfo,
    pub nodes: Vec<NodeInfo>,
    pub egress_ips: Vec<EgressIpInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouterInfo {
    pub namespace: String,
    pub bridge: String,
    pub node_network: String,
    pub server_link: String,
    pub server_link_mtu: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerInfo {
    pub namespace: String,
    pub address: Ipv4Addr,
    pub link_mtu: u32,
    pub advmss: Option<u32>,
    /// Where the lab's TCP and UDP observers listen while `demo` or a test runs.
    pub tcp_port: u16,
    pub udp_port: u16,
    /// Where the `iperf3 -s` started by `lab up` listens.
    pub iperf3_port: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub namespace: String,
    pub address: Ipv4Addr,
    pub uplink: String,
    pub pod_cidr: String,
    pub instance: String,
    pub bpffs: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub pods: Vec<PodInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub address: Ipv4Addr,
    pub host_interface: String,
    pub mtu: u32,
    pub policy: Option<u32>,
    /// The source address the server should see for this pod's traffic.
    pub expected_source: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EgressIpInfo {
    pub policy_id: u32,
    pub name: String,
    pub egress_ip: Ipv4Addr,
    pub node: Option<String>,
    pub node_address: Option<Ipv4Addr>,
    pub selects: Vec<SelectedPod>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SelectedPod {
    pub pod: String,
    pub namespace: String,
    pub address: Ipv4Addr,
}

//! Shared fixture of the end-to-end tests: a lab with observers on the
//! external server, and checks whose failure messages say what the server
//! saw, what was expected, and what the agents logged.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Once,
    time::Duration,
};

use egress_lab::{
    ClientOpts, IcmpObserver, Lab, LabSpec, PodRef, Probe, TcpServer, UdpServer, agent::log_tail,
    spec,
};

pub use egress_lab;

/// In the default layout (policy 1: 172.18.0.100 on node1, policy 2:
/// 172.18.0.101 on node2), the selected pods other than node1's own
/// policy-1 pod: node2's and node3's pods of policy 1 and node1's and
/// node3's of policy 2 are steered through the tunnel, node2's pod of
/// policy 2 is translated on node2.
pub const STEERED_IN_THE_DEFAULT_LAYOUT: [(PodRef, Ipv4Addr); 5] = [
    (PodRef::new(2, 1), Ipv4Addr::new(172, 18, 0, 100)),
    (PodRef::new(3, 1), Ipv4Addr::new(172, 18, 0, 100)),
    (PodRef::new(1, 3), Ipv4Addr::new(172, 18, 0, 101)),
    (PodRef::new(3, 3), Ipv4Addr::new(172, 18, 0, 101)),
    (PodRef::new(2, 3), Ipv4Addr::new(172, 18, 0, 101)),
];

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

pub const TCP: SocketAddrV4 = SocketAddrV4::new(spec::SERVER_ADDR, spec::SERVER_TCP_PORT);
pub const UDP: SocketAddrV4 = SocketAddrV4::new(spec::SERVER_ADDR, spec::SERVER_UDP_PORT);

pub fn opts() -> ClientOpts {
    ClientOpts::default()
}

/// A lab plus TCP, UDP and ICMP observers on the external server. Field
/// order matters: the observers go before the lab's namespaces do.
pub struct Cluster {
    pub tcp: TcpServer,
    pub udp: UdpServer,
    pub icmp: IcmpObserver,
    pub lab: Lab,
}

impl Cluster {
    /// Builds `spec` and starts the observers, without agents.
    pub fn without_agents(spec: LabSpec) -> Self {
        init_tracing();
        let lab = Lab::build(spec).unwrap_or_else(|e| panic!("building the lab: {e}"));
        let srv = lab.server_ns();
        Self {
            tcp: TcpServer::start(&srv, TCP).unwrap_or_else(|e| panic!("{e}")),
            udp: UdpServer::start(&srv, UDP).unwrap_or_else(|e| panic!("{e}")),
            icmp: IcmpObserver::start(&srv).unwrap_or_else(|e| panic!("{e}")),
            lab,
        }
    }

    /// Builds `spec`, starts the observers and every node's agent.
    pub fn new(spec: LabSpec) -> Self {
        let mut cluster = Self::without_agents(spec);
        if let Err(e) = cluster.lab.start_agents() {
            panic!("starting the agents: {e}");
        }
        cluster
    }

    pub fn ns(&self, pod: PodRef) -> String {
        self.lab.pod_ns(pod)
    }

    /// Last lines of every agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        (1..=self.lab.spec().nodes)
            .map(|n| {
                let agent = self.lab.agent(n);
                format!(
                    "--- agent of node{n} ({}):\n{}",
                    agent.log.display(),
                    log_tail(&agent.log, 25)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics with `msg`, the agents' logs and the lab's name.
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!(
            "{msg}\n(lab {}, files in {})\n{}",
            self.lab.prefix(),
            self.lab.dir().display(),
            self.agent_logs()
        )
    }

    pub fn expect<T>(&self, what: &str, r: egress_lab::Result<T>) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {e}")))
    }

    fn expected(&self, pod: PodRef) -> Ipv4Addr {
        self.lab
            .expected_source(pod)
            .unwrap_or_else(|| panic!("pod {pod} is not expected to reach the server"))
    }

    /// TCP from `pod`: the server must see `expected_source` (client side and
    /// server side agree), and the exchange must complete.
    pub fn check_tcp(&self, pod: PodRef, opts: ClientOpts) -> Probe {
        let want = self.expected(pod);
        let probe = self.expect(
            &format!("TCP from {pod} ({}) to {TCP}", pod.ip()),
            egress_lab::tcp_probe(&self.ns(pod), TCP, opts),
        );
        if *probe.observed.ip() != want {
            self.fail(format!(
                "TCP from {pod} ({}): server saw source {}, expected {want}",
                probe.local, probe.observed
            ));
        }
        if !self.tcp.saw(probe.observed) {
            self.fail(format!(
                "TCP from {pod}: the server's own log lacks {} (it has {:?})",
                probe.observed,
                self.tcp.seen().iter().map(|s| s.peer).collect::<Vec<_>>()
            ));
        }
        probe
    }

    /// UDP from `pod`, checked like [`Cluster::check_tcp`].
    pub fn check_udp(&self, pod: PodRef, opts: ClientOpts) -> Probe {
        let want = self.expected(pod);
        let probe = self.expect(
            &format!("UDP from {pod} ({}) to {UDP}", pod.ip()),
            egress_lab::udp_probe(&self.ns(pod), UDP, opts),
        );
        if *probe.observed.ip() != want {
            self.fail(format!(
                "UDP from {pod} ({}): server saw source {}, expected {want}",
                probe.local, probe.observed
            ));
        }
        if !self.udp.seen().iter().any(|s| s.peer == probe.observed) {
            self.fail(format!(
                "UDP from {pod}: the server's own log lacks {}",
                probe.observed
            ));
        }
        probe
    }

    /// `pod` is expected to leave as `want`, and does over TCP, UDP and ICMP
    /// echo (identifier `icmp_ident`), each checked on the server's side.
    pub fn check_leaves_as(&self, pod: PodRef, want: Ipv4Addr, icmp_ident: u16) {
        assert_eq!(self.lab.expected_source(pod), Some(want), "{pod}");
        self.check_tcp(pod, opts());
        self.check_udp(pod, opts());
        self.check_icmp(pod, icmp_ident);
    }

    /// The default layout's selected pods that do not sit on their egress
    /// IP's node, and node2's own pod of policy 2: each leaves as
    /// [`STEERED_IN_THE_DEFAULT_LAYOUT`] says, checked as
    /// [`Cluster::check_leaves_as`] does with ICMP identifier
    /// `ident_base + node * 16 + index`.
    pub fn check_steered_pods_of_the_default_layout(&self, ident_base: u16) {
        for (pod, want) in STEERED_IN_THE_DEFAULT_LAYOUT {
            self.check_leaves_as(
                pod,
                want,
                ident_base + u16::from(pod.node) * 16 + u16::from(pod.index),
            );
        }
    }

    /// Waits up to `within` until TCP from `pod` (probed with a 2 s
    /// timeout) leaves with `want`; `when` completes "{pod} leaves with
    /// {want} ..." in the messages.
    pub fn wait_leaves_with(
        &self,
        pod: PodRef,
        want: Ipv4Addr,
        within: Duration,
        when: &str,
    ) -> Probe {
        let ns = self.ns(pod);
        let quick = ClientOpts {
            timeout: Duration::from_secs(2),
            ..opts()
        };
        let what = format!("{pod} leaves with {want} {when}");
        let seen = egress_lab::traffic::wait_for(&what, within, || {
            match egress_lab::tcp_probe(&ns, TCP, quick) {
                Ok(p) if *p.observed.ip() == want => Ok(p),
                Ok(p) => Err(format!("server saw {}", p.observed)),
                Err(e) => Err(e.to_string()),
            }
        });
        self.expect(&what, seen)
    }

    /// ICMP echo from `pod` with identifier `ident`: every request must be
    /// answered (with the pod's own identifier) and every request the server
    /// saw must come from `expected_source`.
    pub fn check_icmp(&self, pod: PodRef, ident: u16) {
        let want = self.expected(pod);
        let result = self.expect(
            &format!("ICMP echo from {pod}"),
            egress_lab::icmp_echo(
                &self.ns(pod),
                spec::SERVER_ADDR,
                ident,
                3,
                Duration::from_secs(5),
            ),
        );
        let seen = self.icmp.seen_of(&result);
        if seen.is_empty() {
            self.fail(format!(
                "ICMP echo from {pod}: the server saw no request (expected source {want}); {} of {} answered",
                result.answered.len(),
                result.sent
            ));
        }
        if let Some(bad) = seen.iter().find(|s| s.src != want) {
            self.fail(format!(
                "ICMP echo from {pod}: server saw a request from {}, expected {want} (all: {seen:?})",
                bad.src
            ));
        }
        if result.answered.len() != usize::from(result.sent) {
            self.fail(format!(
                "ICMP echo from {pod}: {} of {} requests answered with identifier {ident:#x} (server saw {seen:?})",
                result.answered.len(),
                result.sent
            ));
        }
    }
}

impl Cluster {
    /// Node `node`'s drop counter `reason` of policy `policy` (0: drops no
    /// policy can be blamed for).
    pub fn drops(&self, node: u8, policy: u32, reason: &str) -> u64 {
        let stats = self.expect(
            &format!("stats of node{node}"),
            self.lab.agent(node).stats(),
        );
        stats
            .drops(policy, reason)
            .unwrap_or_else(|e| self.fail(format!("stats of node{node}: {e}\n{}", stats.raw)))
    }

    /// Waits until node `node`'s counter `reason` of `policy` reaches `at_least`.
    pub fn wait_drops(&self, node: u8, policy: u32, reason: &str, at_least: u64) {
        let reached = egress_lab::traffic::wait_for(
            &format!("node{node} counts {reason} (policy {policy}) up to {at_least}"),
            Duration::from_secs(10),
            || {
                let now = self.drops(node, policy, reason);
                if now >= at_least {
                    Ok(now)
                } else {
                    Err(format!("at {now}"))
                }
            },
        );
        self.expect("drop counter", reached);
    }

    /// Fails if the UDP observer saw a datagram from `ip` or from source
    /// port `port` (a forged packet that should have been dropped), after
    /// giving stragglers half a second.
    pub fn assert_udp_unseen(&self, what: &str, ip: Option<Ipv4Addr>, port: u16) {
        std::thread::sleep(Duration::from_millis(500));
        let seen = self.udp.seen();
        if let Some(s) = seen
            .iter()
            .find(|s| s.peer.port() == port || Some(*s.peer.ip()) == ip)
        {
            self.fail(format!("{what}: the server saw {} (all: {seen:?})", s.peer));
        }
    }

    /// Runs a shell command line (split on whitespace) in `ns`.
    pub fn sh(&self, ns: &str, cmd: &str) -> String {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        self.expect(cmd, egress_lab::exec_in(ns, args[0], &args[1..]))
            .stdout
    }
}

/// A TCP observer in a child process (see `src/bin/egress-tcp-observer.rs`),
/// so that client and server each get the whole descriptor limit.
pub struct ObserverProcess {
    pub addr: SocketAddrV4,
    child: std::process::Child,
    seen: std::sync::Arc<std::sync::Mutex<Vec<SocketAddrV4>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ObserverProcess {
    /// `bin` is `env!("CARGO_BIN_EXE_egress-tcp-observer")` of the test.
    pub fn start(bin: &str, ns: &str, addr: SocketAddrV4) -> Self {
        use std::{
            io::{BufRead, BufReader},
            process::{Command, Stdio},
        };
        let mut child = Command::new(bin)
            .args([ns, &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        match lines.next() {
            Some(Ok(l)) if l == "ready" => {}
            other => {
                let _ = child.kill();
                panic!("{bin} in {ns} on {addr} did not start: {other:?}");
            }
        }
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(peer) = line.parse::<SocketAddrV4>() {
                    log.lock().expect("observer log poisoned").push(peer);
                }
            }
        });
        Self {
            addr,
            child,
            seen,
            reader: Some(reader),
        }
    }

    /// Peers accepted so far (reported every 100 ms by the child).
    pub fn seen(&self) -> Vec<SocketAddrV4> {
        self.seen.lock().expect("observer log poisoned").clone()
    }
}

impl Drop for ObserverProcess {
    fn drop(&mut self) {
        // Closing stdin asks the child to flush its report and exit.
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Captures the first packet matching `filter` on `eth0` of `ns` (tcpdump
/// `-nn -vv`) while `during` runs, and returns tcpdump's output.
pub fn capture(ns: &str, filter: &str, during: impl FnOnce()) -> String {
    use std::{
        io::{BufRead, BufReader, Read},
        process::Stdio,
    };
    let mut cmd = egress_lab::netns::command_in(ns, "tcpdump").unwrap_or_else(|e| panic!("{e}"));
    cmd.args(["-i", "eth0", "-nn", "-vv", "-l", "-c", "1", filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("tcpdump in {ns}: {e}"));
    // tcpdump says on stderr when it listens.
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut said = String::new();
    while !said.contains("listening") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.kill();
            panic!("tcpdump in {ns} exited: {said}");
        }
        said.push_str(&line);
    }
    during();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut out = String::new();
    let _ = child.stdout.take().expect("piped").read_to_string(&mut out);
    out
}

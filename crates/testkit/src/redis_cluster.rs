//! A Redis Cluster of the test's own: six redis-servers on loopback (three primaries, three
//! replicas) in a temporary directory, for the tests that run the lock on a cluster and
//! kill one of its primaries. Every process it starts is killed by its pid when it is
//! dropped (never by a name pattern: other people run redis-servers on the machine).
// A dev-only harness: a broken test environment must fail the test loudly.
#![allow(clippy::panic)]

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How long the cluster may take to come up, or to fail a primary over, before the test fails.
const BOUND: Duration = Duration::from_secs(30);

/// Nodes of the cluster: three primaries, one replica each.
const NODES: usize = 6;

/// How long a node may be unreachable before the others call it failed (ms). Short, so a
/// killed primary's replica takes over within a couple of seconds.
const NODE_TIMEOUT_MS: u64 = 1_000;

/// One node: its port and its process (`None` once killed).
#[derive(Debug)]
struct Node {
    port: u16,
    child: Option<Child>,
}

/// What `CLUSTER NODES` says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// The primary's id, for a replica.
    pub replica_of: Option<String>,
    /// Marked failed (or possibly failed) by the node asked.
    pub failed: bool,
    /// The slot ranges it serves, for a primary, as `(first, last)`.
    pub slots: Vec<(u16, u16)>,
}

/// A 3-primary, 3-replica Redis Cluster on loopback ports, killed when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts the six nodes, joins them with `redis-cli --cluster create`, and waits until
    /// every node says the cluster is `ok`. `None` when `redis-server` or `redis-cli` is
    /// missing (after [`crate::skip`], which fails the test under CI).
    ///
    /// # Panics
    /// When the cluster cannot be started or does not come up in time.
    pub fn start() -> Option<RedisCluster> {
        for binary in ["redis-server", "redis-cli"] {
            match Command::new(binary)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
            {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    crate::skip(&format!(
                        "no {binary} on the PATH to run a Redis Cluster (install redis-server)"
                    ));
                    return None;
                }
                Err(e) => panic!("cannot run {binary}: {e}"),
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "testkit-redis-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        for port in free_ports() {
            let child = cluster.spawn_node(port);
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            wait_for_port(node.port);
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli --cluster create: {e}"));
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_until(
            "every node to say the cluster is ok, and every replica to be in sync",
            |cluster| {
                cluster.live_ports().iter().all(|&port| {
                    let replication = cli(port, &["info", "replication"]);
                    cluster_info(port).contains("cluster_state:ok")
                        && cluster.nodes_seen_by(port).len() == NODES
                        && (replication.contains("role:master")
                            || replication.contains("master_link_status:up"))
                })
            },
        );
        Some(cluster)
    }

    /// One cluster shared by the tests of this process that run at the same time (the
    /// contract suites, which do not kill nodes); it stops when the last of them drops it.
    /// `None` as [`RedisCluster::start`].
    pub fn shared() -> Option<Arc<RedisCluster>> {
        static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cluster) = shared.upgrade() {
            return Some(cluster);
        }
        let cluster = Arc::new(RedisCluster::start()?);
        *shared = Arc::downgrade(&cluster);
        Some(cluster)
    }

    /// The `REDIS_URL` of the cluster: every node as a seed.
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().map(|node| node.port);
        let first = nodes.next().unwrap_or_default();
        let rest: Vec<String> = nodes.map(|port| format!("node=127.0.0.1:{port}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// The ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// The cluster as a running node sees it.
    ///
    /// # Panics
    /// When no node is running.
    pub fn topology(&self) -> Vec<ClusterNode> {
        let port = *self
            .live_ports()
            .first()
            .unwrap_or_else(|| panic!("no node of the cluster is running"));
        self.nodes_seen_by(port)
    }

    /// The port of the primary serving `slot`, as the running nodes see it.
    pub fn primary_of(&self, slot: u16) -> Option<u16> {
        self.topology()
            .into_iter()
            .find(|node| {
                node.primary
                    && !node.failed
                    && node
                        .slots
                        .iter()
                        .any(|&(first, last)| (first..=last).contains(&slot))
            })
            .map(|node| node.port)
    }

    /// The port of a replica of the primary on `port`.
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        let topology = self.topology();
        let primary = topology.iter().find(|node| node.port == port)?;
        topology
            .iter()
            .find(|node| node.replica_of.as_deref() == Some(primary.id.as_str()))
            .map(|node| node.port)
    }

    /// Kills the node on `port` (`SIGKILL`, by its pid): what it had not replicated is lost.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|node| node.port == port)
            && let Some(mut child) = node.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the node on `port`, by its pid.
    ///
    /// # Panics
    /// When the node is not running or `kill` cannot be run.
    pub fn signal(&self, port: u16, signal: &str) {
        let pid = self
            .nodes
            .iter()
            .find(|node| node.port == port)
            .and_then(|node| node.child.as_ref())
            .map(Child::id)
            .unwrap_or_else(|| panic!("no running node on port {port}"));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Freezes `replica` (`SIGSTOP`) and has `primary` drop its replication link, which
    /// the frozen replica cannot open again: from then on, whatever `primary` acknowledges
    /// does not reach `replica`, and is lost if `primary` is killed before `replica` is
    /// thawed ([`RedisCluster::signal`] with `CONT`).
    ///
    /// # Panics
    /// When the primary still has a replica connected afterwards.
    pub fn hold_back_replication(&self, primary: u16, replica: u16) {
        self.signal(replica, "STOP");
        cli(primary, &["client", "kill", "type", "replica"]);
        self.wait_until("the primary to drop its replica", |_| {
            cli(primary, &["info", "replication"]).contains("connected_slaves:0")
        });
    }

    /// Waits until `slot` is served by a primary other than `old` and every running node
    /// says the cluster is `ok`: the failover after `old` was killed is over.
    ///
    /// # Panics
    /// When it takes longer than 30 s.
    pub fn wait_for_failover(&self, slot: u16, old: u16) -> u16 {
        self.wait_until(
            "a replica to take over the killed primary's slots",
            |cluster| {
                cluster
                    .live_ports()
                    .iter()
                    .all(|&port| cluster_info(port).contains("cluster_state:ok"))
                    && cluster.primary_of(slot).is_some_and(|port| port != old)
            },
        );
        self.primary_of(slot).unwrap_or_default()
    }

    /// Runs `redis-cli -p port args…` and answers its output.
    ///
    /// # Panics
    /// When redis-cli cannot be run.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }

    fn nodes_seen_by(&self, port: u16) -> Vec<ClusterNode> {
        cli(port, &["cluster", "nodes"])
            .lines()
            .filter_map(parse_node)
            .collect()
    }

    fn spawn_node(&self, port: u16) -> Child {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            // No cap on a replica's backlog in its primary: a test that freezes a replica
            // wants the writes held up, not the replica cut off and resynced.
            .args(["--client-output-buffer-limit", "replica 0 0 0"])
            // A replica's first sync starts at once (the default waits 5 s for others to join).
            .args(["--repl-diskless-sync-delay", "0"])
            // A replica that was cut off for a while may still take over: the fault tests
            // want exactly the replica that missed some writes promoted.
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"))
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < BOUND, "waited {BOUND:?} for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // A frozen node ignores nothing but SIGKILL, which this is.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Six ports whose cluster bus ports (port + 10000) are free too, chosen at random.
fn free_ports() -> Vec<u16> {
    // 10000..22000: the bus ports (20000..32000) stay below Linux's ephemeral range
    // (32768..), where an outgoing connection could take one between this check and the
    // node's start.
    let mut ports = Vec::new();
    let started = Instant::now();
    while ports.len() < NODES {
        assert!(
            started.elapsed() < BOUND,
            "found no free ports for the cluster"
        );
        let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if ports.contains(&port) {
            continue;
        }
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if free {
            ports.push(port);
        }
    }
    ports
}

fn wait_for_port(port: u16) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < BOUND,
            "redis-server on {port} did not accept connections within {BOUND:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn cluster_info(port: u16) -> String {
    cli(port, &["cluster", "info"])
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@bus> <flags> <primary id or -> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_node(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [id, address, flags, primary, _, _, _, _, slots @ ..] = fields.as_slice() else {
        return None;
    };
    let port = address
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags: Vec<&str> = flags.split(',').collect();
    let slots = slots
        .iter()
        // `[slot->-id]` entries are slots being migrated: none here.
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
            None => {
                let slot = range.parse().ok()?;
                Some((slot, slot))
            }
        })
        .collect();
    Some(ClusterNode {
        id: (*id).to_owned(),
        port,
        primary: flags.contains(&"master"),
        replica_of: (*primary != "-").then(|| (*primary).to_owned()),
        failed: flags.iter().any(|flag| *flag == "fail" || *flag == "fail?"),
        slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_are_read() {
        let primary = parse_node(
            "07c3 127.0.0.1:30004@40004 myself,master - 0 1426238317239 4 connected 0-5460 5462",
        );
        assert_eq!(
            primary,
            Some(ClusterNode {
                id: "07c3".to_owned(),
                port: 30004,
                primary: true,
                replica_of: None,
                failed: false,
                slots: vec![(0, 5460), (5462, 5462)],
            })
        );
        let replica =
            parse_node("e7d1 127.0.0.1:30002@40002 slave,fail 07c3 0 1426238316232 2 connected");
        assert_eq!(
            replica.map(|node| (node.primary, node.replica_of, node.failed)),
            Some((false, Some("07c3".to_owned()), true))
        );
        assert_eq!(parse_node(""), None);
    }
}

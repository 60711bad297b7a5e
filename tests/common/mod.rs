//! Test support: Redis servers of the tests' own on free loopback ports, stopped by pid
//! when dropped, and the brute-force reference model of the sliding window.
#![allow(dead_code)]

pub mod layout;
pub mod reference;
pub mod tls;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that is free now, and whose cluster-bus twin (port + 10000) is too.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

/// A child process of a test, killed by pid (if still running) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its output discarded.
pub fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

/// Polls `url` every 50 ms until it answers 2xx, or fails after `within`.
pub fn wait_ready(url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::blocking::get(url) {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /v1/usage/{name}` of the node whose HTTP surface is at `base`.
pub async fn usage(base: &str, name: &str) -> serde_json::Value {
    reqwest::get(format!("{base}/v1/usage/{name}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `[requests, input_tokens, output_tokens]` used in one limit set of a usage answer.
pub fn used(set: &serde_json::Value) -> [u64; 3] {
    ["requests", "input_tokens", "output_tokens"].map(|k| set[k]["used"].as_u64().unwrap())
}

/// An Envoy started on free listener and admin ports, ready (its admin `/ready` answers).
/// `config(listener, admin)` gives the YAML for those ports; it is written to `dir`.
/// A free port can be taken by someone else before Envoy binds it: an Envoy that exits
/// before it is ready is started again on fresh ports (three tries), and one that never
/// gets ready fails the test with the end of its log.
pub fn start_envoy(
    dir: &std::path::Path,
    name: &str,
    config: impl Fn(u16, u16) -> String,
) -> (Proc, u16, u16) {
    let mut last_log = String::new();
    for attempt in 0..3 {
        let (listener, admin) = (free_port(), free_port());
        let file = dir.join(format!("{name}.yaml"));
        let log = dir.join(format!("{name}-{attempt}.log"));
        std::fs::write(&file, config(listener, admin)).unwrap();
        let mut envoy = Proc(
            Command::new(envoy_bin())
                .arg("-c")
                .arg(&file)
                .args(["--concurrency", "1", "--base-id", &listener.to_string()])
                .args(["-l", "error"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn envoy"),
        );
        let url = format!("http://127.0.0.1:{admin}/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(reqwest::blocking::get(&url), Ok(r) if r.status().is_success()) {
                return (envoy, listener, admin);
            }
            if let Ok(Some(status)) = envoy.0.try_wait() {
                last_log = std::fs::read_to_string(&log).unwrap_or_default();
                eprintln!("{name}: envoy exited ({status}) before it was ready; retrying on fresh ports:\n{last_log}");
                break;
            }
            let tail = || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text[text.len().saturating_sub(2000)..].to_string()
            };
            assert!(
                Instant::now() < deadline,
                "{name}: envoy never became ready:\n{}",
                tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("{name}: envoy exited three times before it was ready:\n{last_log}");
}

/// The Envoy binary: `ENVOY_BIN`, else the project's `.venv/bin/envoy`.
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

fn wait_for_port(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("redis-server on port {port} exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `redis-server` of this test's own; killed by pid on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_on(free_port(), extra)
    }

    /// A server on `port` (say, the port of one a test killed: Redis coming back).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(redis_server())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test.sh installs it)");
        wait_for_port(port, &mut child);
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }

    /// A server that speaks only TLS, with a certificate for 127.0.0.1 signed by a CA
    /// made by `openssl` in the server's temp dir; `ca_file()` is that CA.
    pub fn start_tls() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        make_certs(dir.path());
        let certs = dir.path().to_path_buf();
        Self::start_tls_in(dir, &certs, &[])
    }

    /// A TLS-only server in `dir`, with the certificates `make_certs` wrote in `certs`.
    pub fn start_tls_in(
        dir: tempfile::TempDir,
        certs: &std::path::Path,
        extra: &[&str],
    ) -> RedisServer {
        let p = |name: &str| certs.join(name).to_string_lossy().into_owned();
        let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
        let port = free_port();
        let mut child = Command::new(redis_server())
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                "no",
            ])
            .args([
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_for_port(port, &mut child);
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self._dir.path().join("ca.pem")
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// The server's process id (to freeze it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, made by `openssl` in `dir`:
/// `ca.pem`, `cert.pem`, `key.pem`.
pub fn make_certs(dir: &std::path::Path) {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("cert.pem"),
        p("key.pem"),
        p("req.csr"),
        p("ext.cnf"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    let steps: [Vec<&str>; 3] = [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=llm-ratelimit test CA",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    ];
    for args in steps {
        let ok = Command::new("openssl")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(ok.success(), "openssl {args:?} failed");
    }
}

fn redis_server() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "redis-server".into())
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The flags field of a `CLUSTER NODES` line (`myself,master`, `slave`, `master,fail?`...).
fn flags(line: &str) -> &str {
    line.split(' ').nth(2).unwrap_or("")
}

/// The ports of the masters, not failing, that serve slots in a `CLUSTER NODES` reply
/// (slot ranges follow the 8 fixed fields), sorted.
fn slot_masters(cluster_nodes: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = cluster_nodes
        .lines()
        .filter(|l| {
            let f = flags(l);
            f.contains("master") && !f.contains("fail") && l.split(' ').nth(8).is_some()
        })
        .filter_map(|l| l.split(' ').nth(1)?.split(['@', ':']).nth(1)?.parse().ok())
        .collect();
    ports.sort();
    ports
}

/// The port of the master, not failing, that serves `slot` in a `CLUSTER NODES` reply.
fn slot_owner(cluster_nodes: &str, slot: u16) -> Option<u16> {
    cluster_nodes
        .lines()
        .filter(|l| {
            let f = flags(l);
            f.contains("master") && !f.contains("fail")
        })
        .find(|l| {
            l.split(' ').skip(8).any(|range| {
                let mut ends = range.splitn(2, '-').map(|e| e.parse::<u16>().ok());
                match (ends.next().flatten(), ends.next()) {
                    (Some(lo), None) => lo == slot,
                    (Some(lo), Some(Some(hi))) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            })
        })
        .and_then(|l| l.split(' ').nth(1)?.split(['@', ':']).nth(1)?.parse().ok())
}

/// A Redis Cluster of `masters` masters and no replicas, made by the test.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_with_replicas(masters, 0)
    }

    /// `masters` masters, each with `replicas` replicas (which take over a dead master).
    pub fn start_with_replicas(masters: usize, replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    // A replica syncs at once (the default waits 5 s for more replicas).
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all_ok = nodes
                .iter()
                .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"));
            if all_ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        // A replica that never synced cannot take over: wait until every one has.
        loop {
            let synced = nodes.iter().all(|n| {
                let info = n.cli(&["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
            if synced {
                break;
            }
            assert!(Instant::now() < deadline, "replicas did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        let cluster = RedisCluster { nodes };
        // A node learns that another became a replica by gossip, a while after
        // `cluster_state:ok`: until then it lists that replica as a master without slots.
        // Wait until every node sees the same masters serving slots and every replica as
        // one, so a test that picks a master (to kill it, say) picks one serving slots.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let views: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| n.cli(&["CLUSTER", "NODES"]))
                .collect();
            let first = slot_masters(&views[0]);
            let agreed = views.iter().all(|v| {
                let seen_replicas = v
                    .lines()
                    .filter(|l| {
                        let f = flags(l);
                        f.contains("slave") && !f.contains("fail")
                    })
                    .count();
                slot_masters(v) == first
                    && first.len() == masters
                    && seen_replicas == masters * replicas
                    && v.lines().count() == masters * (1 + replicas)
            });
            if agreed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes do not agree on the topology:\n{}",
                views.join("\n--\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// The ports of the masters serving slots now, as a live node sees them (a node just
    /// made a replica may still be listed as a master, without slots: it is not one here).
    pub fn masters(&self) -> Vec<u16> {
        slot_masters(&self.nodes[self.nodes.len() - 1].cli(&["CLUSTER", "NODES"]))
    }

    /// The port of the master serving the slot of `key` (a hash tag counts), when every
    /// live node agrees on it; `None` while their views differ or no live master serves it.
    pub fn owner(&self, key: &str) -> Option<u16> {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .ok()?;
        let owners: Vec<Option<u16>> = self
            .nodes
            .iter()
            .map(|n| slot_owner(&n.cli(&["CLUSTER", "NODES"]), slot))
            .collect();
        owners
            .iter()
            .all(|o| *o == owners[0])
            .then_some(owners[0])?
    }

    /// Kills (SIGKILL, by pid) the node on `port`.
    pub fn kill(&mut self, port: u16) {
        self.nodes.retain(|n| n.port != port);
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// A limiter node's HTTP surface (`/v1/check`, `/v1/usage`, ...) on an ephemeral loopback
/// port, over `store` with `config` in force; its base URL.
pub async fn http_node(
    config: llm_ratelimit::config::Config,
    store: llm_ratelimit::engine::Store,
) -> String {
    let limiter = std::sync::Arc::new(llm_ratelimit::admission::Limiter::new(
        std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(config)),
        store,
        std::sync::Arc::new(llm_ratelimit::metrics::Metrics::default()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, llm_ratelimit::http::router(limiter))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// The value of the first line of `text` (Prometheus text, Envoy's admin `/stats`) that
/// starts with `prefix` (the series with its labels and the separator); 0 when absent.
pub fn counter(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

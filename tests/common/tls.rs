//! A Redis Cluster that speaks only TLS (clients, cluster bus and replication), every node's
//! certificate signed by one CA the test makes; for `rediss+cluster://`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{make_certs, RedisServer};

pub struct TlsCluster {
    pub nodes: Vec<RedisServer>,
    certs: tempfile::TempDir,
}

impl TlsCluster {
    pub fn start(masters: usize) -> TlsCluster {
        let certs = tempfile::tempdir().expect("temp dir");
        make_certs(certs.path());
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                RedisServer::start_tls_in(
                    tempfile::tempdir().expect("temp dir"),
                    certs.path(),
                    &[
                        "--tls-cluster",
                        "yes",
                        "--tls-replication",
                        "yes",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let cluster = TlsCluster { nodes, certs };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = cluster
            .cli_command(None)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "TLS cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster.nodes.iter().all(|n| {
            cluster
                .cli(n.port, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
        }) {
            assert!(Instant::now() < deadline, "TLS cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    pub fn ca_file(&self) -> PathBuf {
        self.certs.path().join("ca.pem")
    }

    fn cli_command(&self, port: Option<u16>) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--tls").arg("--cacert").arg(self.ca_file());
        if let Some(port) = port {
            cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        }
        cmd
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = self
            .cli_command(Some(port))
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("rediss+cluster://{}", hosts.join(","))
    }
}

//! The binary as an operator runs it: `check-config` exit codes and messages, and
//! `serve` picking up config edits without restart, never logging a secret.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_llm-ratelimit");

fn key_file(name: &str, secret: &str, rpm: u64) -> String {
    format!("keys:\n  - name: {name}\n    key: {secret}\n    rpm: {rpm}\n    input_tpm: 100000\n    output_tpm: 100000\n")
}

#[test]
fn check_config_exits_0_for_valid_and_1_with_a_location_for_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, key_file("team-a", "sk-check-secret", 5)).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, key_file("team-a", "sk-check-secret", 0)).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:10:", bad.display())), "{err}");
    assert!(err.contains("rpm"), "{err}");
    assert!(!err.contains("sk-check-secret"), "{err}");

    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
}

async fn status(client: &reqwest::Client, base: &str, secret: &str) -> u16 {
    client
        .post(format!("{base}/v1/check"))
        .header("authorization", format!("Bearer {secret}"))
        .body(
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#,
        )
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls `probe` until it returns true, for at most 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(mut probe: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn serve_reloads_a_valid_edit_keeps_the_old_config_on_a_bad_one_and_never_logs_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.yaml");
    std::fs::write(&path, key_file("team-a", "sk-first-secret", 100)).unwrap();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args(["serve", "--http-addr", &format!("127.0.0.1:{port}")])
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "debug")
        .env_remove("REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    assert!(eventually(|| async { status(&client, &base, "sk-first-secret").await == 200 }).await);
    assert_eq!(status(&client, &base, "sk-second-secret").await, 401);

    // A valid edit: the new key works, without restart.
    std::fs::write(&path, key_file("team-b", "sk-second-secret", 100)).unwrap();
    assert!(eventually(|| async { status(&client, &base, "sk-second-secret").await == 200 }).await);
    assert_eq!(status(&client, &base, "sk-first-secret").await, 401);

    // An invalid edit is rejected and counted; the previous config stays in force.
    std::fs::write(&path, key_file("team-c", "sk-third-secret", 0)).unwrap();
    let metrics = || async {
        client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(
        eventually(|| async {
            metrics()
                .await
                .contains("llm_ratelimit_config_reloads_total{outcome=\"rejected\"} 1")
        })
        .await
    );
    assert_eq!(status(&client, &base, "sk-second-secret").await, 200);
    assert_eq!(status(&client, &base, "sk-third-secret").await, 401);

    let _ = child.kill();
    let _ = child.wait();
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("config reloaded"), "{logs}");
    for secret in ["sk-first-secret", "sk-second-secret", "sk-third-secret"] {
        assert!(!logs.contains(secret), "secret in logs: {logs}");
    }
}

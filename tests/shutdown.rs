//! Shutdown as the contract's §8 says: on SIGTERM the node answers `/readyz` 503 and gRPC
//! health NOT_SERVING at once, keeps serving for `--shutdown-delay`, then stops accepting,
//! finishes what is in flight — a settlement whose streamed body is still arriving
//! included — and exits 0. The real binary on a Redis of the test's own, so the
//! settlement can be read back by a second node after the first has gone.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Proc, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITER: &str = env!("CARGO_BIN_EXE_llm-ratelimit");
/// `--shutdown-delay`'s default.
const DEFAULT_DELAY: Duration = Duration::from_secs(5);

const KEYS: &str = "\
keys:
  - name: team-a
    key: sk-shutdown-a
    rpm: 100
    input_tpm: 100000
    output_tpm: 100000
";

/// A child process killed by pid when dropped (if the test did not see it exit).
struct Node {
    proc: Proc,
    http: String,
    grpc: String,
}

/// A node; `shutdown_delay` of `None` leaves the flag at its default (5 s).
fn node(keys: &std::path::Path, redis: &RedisServer, shutdown_delay: Option<&str>) -> Node {
    let (http, grpc) = (free_port(), free_port());
    let child = Command::new(LIMITER)
        .arg("serve")
        .arg("--config")
        .arg(keys)
        .args(["--redis-url", &redis.url()])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(
            shutdown_delay
                .map(|d| ["--shutdown-delay", d])
                .into_iter()
                .flatten(),
        )
        // The settlement below streams its body for longer than the default 2 s a
        // request may run (back-pressure), on purpose: it must outlast the delay.
        .args(["--request-timeout-ms", "30000"])
        // A loaded CI box can hold a loopback Redis call past the default 50 ms; this
        // test is about shutdown, not store latency.
        .args(["--redis-timeout-ms", "2000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llm-ratelimit");
    Node {
        proc: Proc(child),
        http: format!("http://127.0.0.1:{http}"),
        grpc: format!("http://127.0.0.1:{grpc}"),
    }
}

async fn status(url: &str) -> Option<u16> {
    reqwest::get(url).await.ok().map(|r| r.status().as_u16())
}

async fn poll<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within 20s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn serving(grpc: &str) -> Option<bool> {
    let channel = tonic::transport::Endpoint::from_shared(grpc.to_string())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(
        reply.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
    )
}

fn sse(text_chunks: usize, completion_tokens: u64) -> (String, String) {
    let mut first = String::new();
    for _ in 0..text_chunks {
        first.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" word\"}}]}\n\n");
    }
    let rest = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":{completion_tokens}}}}}\n\ndata: [DONE]\n\n"
    );
    (first, rest)
}

fn chunk(text: &str) -> String {
    format!("{:x}\r\n{text}\r\n", text.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flips_readiness_serves_on_and_settles_what_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, KEYS).unwrap();
    let redis = RedisServer::start();
    let mut first = node(&keys, &redis, None);
    poll("ready", || async {
        status(&format!("{}/readyz", first.http)).await == Some(200)
    })
    .await;
    poll("gRPC SERVING", || async {
        serving(&first.grpc).await == Some(true)
    })
    .await;

    // Admitted with 500 output tokens reserved.
    let client = reqwest::Client::new();
    let admitted = client
        .post(format!("{}/v1/check", first.http))
        .header("authorization", "Bearer sk-shutdown-a")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":500,"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(admitted.status(), 200);
    let handle = admitted.headers()["x-llm-ratelimit-reservation"]
        .to_str()
        .unwrap()
        .to_string();

    // The streamed response starts arriving at the settlement endpoint ...
    let port = first.http.rsplit(':').next().unwrap();
    let mut report = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let (head, tail) = sse(5, 37);
    let request = format!(
        "POST /v1/report HTTP/1.1\r\nhost: x\r\nx-llm-ratelimit-reservation: {handle}\r\nx-upstream-status: 200\r\ntransfer-encoding: chunked\r\n\r\n{}",
        chunk(&head)
    );
    report.write_all(request.as_bytes()).await.unwrap();

    // ... when SIGTERM comes.
    let pid = first.proc.0.id().to_string();
    let signalled = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    // Readiness is off at once on both surfaces, while the node still serves.
    poll("/readyz 503", || async {
        status(&format!("{}/readyz", first.http)).await == Some(503)
    })
    .await;
    poll("gRPC NOT_SERVING", || async {
        serving(&first.grpc).await == Some(false)
    })
    .await;
    assert_eq!(status(&format!("{}/healthz", first.http)).await, Some(200));
    assert!(
        first.proc.0.try_wait().unwrap().is_none(),
        "exited before the delay"
    );
    let usage = client
        .get(format!("{}/v1/usage/team-a", first.http))
        .send()
        .await
        .unwrap();
    assert_eq!(usage.status(), 200, "still serving during the delay");
    let early = signalled.elapsed();
    assert!(
        early < DEFAULT_DELAY,
        "checks took {early:?}: cannot tell the delay apart"
    );

    // After the delay: no longer accepting, but the settlement in flight is not dropped.
    poll("listener closed", || async {
        status(&format!("{}/healthz", first.http)).await.is_none()
    })
    .await;
    assert!(signalled.elapsed() >= DEFAULT_DELAY);
    assert!(
        first.proc.0.try_wait().unwrap().is_none(),
        "exited with a settlement in flight"
    );
    report
        .write_all(format!("{}0\r\n\r\n", chunk(&tail)).as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    report.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"output_tokens":37}"#), "{answer}");

    // Exit 0, once drained.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = first.proc.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "did not exit after draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}");

    // Another node on the same Redis sees the real output tokens, not the 500 reserved.
    let second = node(&keys, &redis, Some("0s"));
    poll("second node ready", || async {
        status(&format!("{}/readyz", second.http)).await == Some(200)
    })
    .await;
    let usage: serde_json::Value = client
        .get(format!("{}/v1/usage/team-a", second.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["output_tokens"]["used"], 37, "{usage}");
    assert_eq!(usage["requests"]["used"], 1, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_or_preface_does_not_hold_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, KEYS).unwrap();
    let (http, grpc) = (free_port(), free_port());
    let child = Command::new(LIMITER)
        .arg("serve")
        .arg("--config")
        .arg(&keys)
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--shutdown-delay", "0s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llm-ratelimit");
    let mut node = Proc(child);
    let base = format!("http://127.0.0.1:{http}");
    poll("ready", || async {
        status(&format!("{base}/readyz")).await == Some(200)
    })
    .await;
    // A client that sends part of a request head and then nothing, and stays connected:
    // the node once waited for it forever after SIGTERM (and kept its connection open
    // for as long as it stayed).
    let mut slow = TcpStream::connect(format!("127.0.0.1:{http}"))
        .await
        .unwrap();
    slow.write_all(b"POST /v1/check HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Likewise on the gRPC port, half an HTTP/2 preface.
    let mut slow_grpc = TcpStream::connect(format!("127.0.0.1:{grpc}"))
        .await
        .unwrap();
    slow_grpc.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = node.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "a half-sent request held the node past SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}");
    drop((slow, slow_grpc));
}

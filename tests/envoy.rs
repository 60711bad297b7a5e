//! Through real Envoy: two nodes (Envoy + llm-ratelimit each) on one Redis, in front of
//! the mock upstream — all started by the test on free loopback ports, stopped by pid.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, RedisServer};
use serde_json::{json, Value};

const LIMITER: &str = env!("CARGO_BIN_EXE_llm-ratelimit");
const MOCK: &str = env!("CARGO_BIN_EXE_mock-upstream");

fn envoy_bin() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

/// A child process killed by pid when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
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

const KEYS: &str = "\
keys:
  - name: team-a
    key: sk-e2e-a
    rpm: 100
    input_tpm: 1000000
    output_tpm: 1000000
  - name: tight
    key: sk-e2e-tight
    rpm: 3
    input_tpm: 1000000
    output_tpm: 1000000
  - name: race
    key: sk-e2e-race
    rpm: 25
    input_tpm: 1000000
    output_tpm: 1000000
";

struct Node {
    url: String,
    limiter_http: String,
    _procs: Vec<Proc>,
}

struct Cluster {
    nodes: Vec<Node>,
    _mock: Proc,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

/// One of the repo's Envoy files (`envoy/<file>`) with node 0's ports replaced.
fn envoy_config(file: &str, listener: u16, grpc: u16, upstream: u16, admin: u16) -> String {
    let path = format!("{}/envoy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    text.replace("port_value: 10000", &format!("port_value: {listener}"))
        .replace("port_value: 10100", &format!("port_value: {grpc}"))
        .replace("port_value: 10300", &format!("port_value: {upstream}"))
        .replace("port_value: 10500", &format!("port_value: {admin}"))
}

fn cluster(envoy_file: &'static str, nodes: usize, mock_args: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, KEYS).unwrap();
    let redis = RedisServer::start();
    let mock_port = free_port();
    let mock = spawn(
        Command::new(MOCK)
            .args(["--addr", &format!("127.0.0.1:{mock_port}")])
            .args(mock_args),
    );
    wait_ready(&format!("http://127.0.0.1:{mock_port}/healthz"));
    let nodes = (0..nodes)
        .map(|i| {
            let (listener, grpc, http, admin) =
                (free_port(), free_port(), free_port(), free_port());
            let limiter = spawn(
                Command::new(LIMITER)
                    .args([
                        "serve",
                        "--redis-url",
                        &redis.url(),
                        "--node-id",
                        &format!("node-{i}"),
                    ])
                    .args([
                        "--grpc-addr",
                        &format!("127.0.0.1:{grpc}"),
                        "--http-addr",
                        &format!("127.0.0.1:{http}"),
                    ])
                    .arg("--config")
                    .arg(&keys),
            );
            let limiter_http = format!("http://127.0.0.1:{http}");
            wait_ready(&format!("{limiter_http}/readyz"));
            let config = dir.path().join(format!("envoy-{i}.yaml"));
            std::fs::write(
                &config,
                envoy_config(envoy_file, listener, grpc, mock_port, admin),
            )
            .unwrap();
            let envoy = spawn(Command::new(envoy_bin()).arg("-c").arg(&config).args([
                "--concurrency",
                "1",
                "--base-id",
                &listener.to_string(),
                "-l",
                "error",
            ]));
            wait_ready(&format!("http://127.0.0.1:{admin}/ready"));
            Node {
                url: format!("http://127.0.0.1:{listener}"),
                limiter_http,
                _procs: vec![envoy, limiter],
            }
        })
        .collect();
    Cluster {
        nodes,
        _mock: mock,
        _redis: redis,
        _dir: dir,
    }
}

fn chat(max_tokens: u64, stream: bool) -> String {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count the requests, please."}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

async fn post(client: &reqwest::Client, node: &Node, key: &str, body: String) -> reqwest::Response {
    client
        .post(format!("{}/v1/chat/completions", node.url))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn used(client: &reqwest::Client, node: &Node, name: &str) -> [u64; 3] {
    let u: Value = client
        .get(format!("{}/v1/usage/{name}", node.limiter_http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ["requests", "input_tokens", "output_tokens"].map(|k| u[k]["used"].as_u64().unwrap())
}

/// Polls until the usage of `name` equals `want`, for at most 5 s (settlement is
/// asynchronous to the client's response).
async fn settles_to(client: &reqwest::Client, node: &Node, name: &str, want: [u64; 3]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = used(client, node, name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "usage {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn both_envoy_configs_validate() {
    for file in ["envoy.yaml", "ratelimit-filter.yaml"] {
        let path = format!("{}/envoy/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(envoy_bin())
            .args(["--mode", "validate", "-c", &path])
            .output()
            .expect("run envoy (scripts/test.sh installs it into .venv)");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ratelimit_filter_variant_holds_requests_and_tokens() {
    let c = tokio::task::spawn_blocking(|| cluster("ratelimit-filter.yaml", 2, &[]))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // Requests and input tokens are charged before the call (input from ext_authz's
    // count, as hits_addend); output tokens after it, at the request's maximum.
    let r = post(&client, a, "sk-e2e-tight", chat(30, false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "2");
    let prompt = r.json::<Value>().await.unwrap()["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    settles_to(&client, b, "tight", [1, prompt, 30]).await;
    for node in [b, a] {
        assert_eq!(
            post(&client, node, "sk-e2e-tight", chat(30, false))
                .await
                .status(),
            200
        );
    }
    settles_to(&client, a, "tight", [3, 3 * prompt, 90]).await;

    // The fourth is over rpm on either node: the limiter's OpenAI body and headers.
    let r = post(&client, b, "sk-e2e-tight", chat(30, false)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "requests");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        used(&client, a, "tight").await,
        [3, 3 * prompt, 90],
        "a 429 records nothing"
    );

    // Authentication is still ext_authz's: an unknown key never reaches the limits.
    assert_eq!(
        post(&client, a, "sk-wrong", chat(5, false)).await.status(),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_envoy_admit_settle_and_deny_exactly() {
    // Paced SSE, so "progressively" is visible: 25 ms between chunks.
    let c =
        tokio::task::spawn_blocking(|| cluster("envoy.yaml", 2, &["--stream-interval-ms", "25"]))
            .await
            .unwrap();
    let client = reqwest::Client::new();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // Admitted through node a: usage headers, OpenAI body; settled to the real figure.
    let r = post(&client, a, "sk-e2e-a", chat(50, false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "100");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "99");
    assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
    let body: Value = r.json().await.unwrap();
    let (prompt, completion) = (
        body["usage"]["prompt_tokens"].as_u64().unwrap(),
        body["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert!(completion < 50);
    // Node b sees it: the limiter's input count equals the upstream's prompt_tokens, and
    // the reservation of 50 was settled to completion_tokens by ext_proc.
    settles_to(&client, b, "team-a", [1, prompt, completion]).await;

    // A stream reaches the client as it is produced, and is settled from its usage chunk.
    let started = Instant::now();
    let mut r = post(&client, b, "sk-e2e-a", chat(20, true)).await;
    assert_eq!(r.status(), 200);
    let mut first = None;
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        first.get_or_insert_with(|| started.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let total = started.elapsed();
    assert!(text.contains("data: [DONE]"));
    assert!(
        first.unwrap() * 2 < total,
        "first chunk at {first:?} of {total:?}: not streamed progressively"
    );
    assert_eq!(used(&client, a, "team-a").await[0], 2);
    // The mock answers min(max, 16 + prompt % 48) tokens: the same prompt got `completion`
    // (< 50) above, so with max 20 it streams min(20, completion). No usage chunk was asked
    // for: the settled figure is the streamed text counted, not the reservation of 20.
    settles_to(
        &client,
        a,
        "team-a",
        [2, 2 * prompt, completion + completion.min(20)],
    )
    .await;

    // 401, 400, 413 through Envoy, none counted.
    assert_eq!(
        post(&client, a, "sk-wrong", chat(5, false)).await.status(),
        401
    );
    assert_eq!(
        post(&client, a, "sk-e2e-a", "{nope".into()).await.status(),
        400
    );
    let huge = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(1_100_000)}]}).to_string();
    assert_eq!(post(&client, a, "sk-e2e-a", huge).await.status(), 413);
    assert_eq!(used(&client, a, "team-a").await[0], 2);

    // Over the limit: exact 429 body and headers, whichever node.
    for (i, node) in [a, b, a].into_iter().enumerate() {
        assert_eq!(
            post(&client, node, "sk-e2e-tight", chat(5, false))
                .await
                .status(),
            200,
            "request {i}"
        );
    }
    let r = post(&client, b, "sk-e2e-tight", chat(5, false)).await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    let ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(ms > 50_000 && ms <= 60_100, "{ms}");
    assert_eq!(
        h["retry-after"].to_str().unwrap(),
        ms.div_ceil(1000).to_string()
    );
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Rate limit reached for tight on requests: Limit 3, Used 3, Requested 1."));

    // A race across both nodes admits exactly the limit.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (client, url) = (client.clone(), c.nodes[i % 2].url.clone());
        tasks.push(tokio::spawn(async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .header("authorization", "Bearer sk-e2e-race")
                .body(chat(5, false))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 25, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 35, "{codes:?}");
    assert_eq!(used(&client, b, "race").await[0], 25);
}

/// Runs wrk against `url` for `secs` seconds with a chat-completions body.
fn wrk(url: &str, key: &str, secs: u32, dir: &std::path::Path) -> String {
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"content-type\"] = \"application/json\"\nwrk.headers[\"authorization\"] = \"Bearer {key}\"\nwrk.body = '{}'\n",
            chat(16, false)
        ),
    )
    .unwrap();
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(&script)
        .arg(format!("{url}/v1/chat/completions"))
        .output()
        .expect("run wrk (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const LOAD_KEYS: &str = "keys:\n  - name: load\n    key: sk-e2e-load\n    rpm: 100000000\n    input_tpm: 100000000000\n    output_tpm: 100000000000\n";

/// One counter of a stats or metrics text: the value after `prefix`.
fn counter(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `wait_ready` with room for a starved box: a debug limiter builds its tokenizers and
/// Envoy starts in seconds, but beside two busy loops and a compiler it can take longer.
fn wait_ready_slowly(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !reqwest::blocking::get(url).is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "{url} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node at saturation (wrk's 32 connections as fast as they go, a debug build, maybe a
/// loaded machine) slows down or sheds explicitly; it never fails at random. So every
/// answer is a 2xx or the ext_authz 503 (`status_on_error`: the limiter shed the check,
/// its store timed out, or ext_authz's 250 ms deadline passed), no other error and no
/// broken connection, and every admitted request is counted exactly once. The limiter runs
/// with a small gate (8 running, 64 waiting) so that on a starved CPU it sheds at half
/// ext_authz's deadline rather than letting the deadline pass.
#[test]
fn twenty_seconds_of_maximum_load_through_one_node_slows_or_sheds_explicitly() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, LOAD_KEYS).unwrap();
    let redis = RedisServer::start();
    let (mock_port, listener, grpc, http, admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let _mock = spawn(Command::new(MOCK).args(["--addr", &format!("127.0.0.1:{mock_port}")]));
    let _limiter = spawn(
        Command::new(LIMITER)
            .args(["serve", "--redis-url", &redis.url()])
            .args([
                "--grpc-addr",
                &format!("127.0.0.1:{grpc}"),
                "--http-addr",
                &format!("127.0.0.1:{http}"),
            ])
            .args(["--max-in-flight", "8", "--max-queued", "64"])
            .arg("--config")
            .arg(&keys),
    );
    wait_ready_slowly(&format!("http://127.0.0.1:{http}/readyz"));
    let config = dir.path().join("envoy.yaml");
    std::fs::write(
        &config,
        envoy_config("envoy.yaml", listener, grpc, mock_port, admin),
    )
    .unwrap();
    let _envoy = spawn(Command::new(envoy_bin()).arg("-c").arg(&config).args([
        "--concurrency",
        "2",
        "--base-id",
        &listener.to_string(),
        "-l",
        "error",
    ]));
    wait_ready_slowly(&format!("http://127.0.0.1:{admin}/ready"));

    let report = wrk(
        &format!("http://127.0.0.1:{listener}"),
        "sk-e2e-load",
        20,
        dir.path(),
    );
    // No connection broken, refused or timed out (wrk's own 5 s timeout).
    assert!(!report.contains("Socket errors"), "{report}");
    let get = |url: String| reqwest::blocking::get(url).unwrap().text().unwrap();
    let stats = get(format!(
        "http://127.0.0.1:{admin}/stats?filter=^http\\.llm\\."
    ));
    let metrics = get(format!("http://127.0.0.1:{http}/metrics"));
    let envoy = |name: &str| counter(&stats, &format!("http.llm.{name}: "));
    let (ok, rq_4xx, rq_5xx) = (
        envoy("downstream_rq_2xx"),
        envoy("downstream_rq_4xx"),
        envoy("downstream_rq_5xx"),
    );
    let authz_errors = envoy("ext_authz.error");
    let shed = counter(
        &metrics,
        "llm_ratelimit_shed_total{surface=\"ext_authz\",reason=\"queue_full\"} ",
    ) + counter(
        &metrics,
        "llm_ratelimit_shed_total{surface=\"ext_authz\",reason=\"waited\"} ",
    );
    let timed_out = counter(
        &metrics,
        "llm_ratelimit_shed_total{surface=\"ext_authz\",reason=\"timeout\"} ",
    );
    let store_failed = counter(
        &metrics,
        "llm_ratelimit_rejections_total{reason=\"store_unavailable\"} ",
    );
    let breakdown = format!(
        "2xx {ok}, 4xx {rq_4xx}, 5xx {rq_5xx}; ext_authz errors {authz_errors}: limiter shed \
         {shed} waiting + {timed_out} running; store failures (checks and settlements) \
         {store_failed}"
    );
    eprintln!("{breakdown}");
    assert_eq!(rq_4xx, 0, "{breakdown}\n{stats}");
    // Every 5xx is ext_authz's status_on_error, and each explicit shed reached the client.
    assert_eq!(rq_5xx, authz_errors, "{breakdown}\n{stats}");
    // (Store failures are left out: settlements count theirs in the same series.)
    assert!(shed + timed_out <= authz_errors, "{breakdown}");
    // It did serve. No throughput floor: a debug build beside two busy loops and a
    // compiler admitted as few as 17 of 2,182 (the rest shed or past ext_authz's deadline),
    // and how fast a node is belongs to scripts/bench.sh, not to a test that must not flake.
    assert!(ok > 0, "{breakdown}\n{report}");
    // Every admitted request is counted once; a shed one never. Requests still in flight
    // on wrk's 32 connections when it stopped were admitted but never completed for the
    // client, and a check that ran out of time after its store call may have been counted.
    // /v1/usage passes the same gate, so on a starved box it may itself be shed (503) or
    // its store call time out while the last checks drain: ask until it answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let used = loop {
        let answer = reqwest::blocking::get(format!("http://127.0.0.1:{http}/v1/usage/load"))
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json::<Value>());
        if let Some(used) = answer.ok().and_then(|u| u["requests"]["used"].as_u64()) {
            break used;
        }
        assert!(Instant::now() < deadline, "/v1/usage never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    let may_have_counted = authz_errors - shed;
    assert!(
        used >= ok && used <= ok + 32 + may_have_counted,
        "{used} counted, {ok} answered 2xx; {breakdown}\n{report}"
    );
    eprintln!("{report}");
}

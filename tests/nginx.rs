//! Through real Nginx (Debian's nginx 1.22 with libnginx-mod-http-lua) running the shipped
//! `nginx/nginx.conf` and `nginx/llm_ratelimit.lua`: two nodes (Nginx + llm-ratelimit
//! each) on one Redis in front of the mock upstream — the exact race, settlement of JSON
//! and SSE, streaming, a client gone mid-stream, every denial shape; and, with stand-ins
//! for the limiter and the upstream, what the config hands each of them (path, headers,
//! the report). Everything is started by the test on free loopback ports and stopped by pid.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{counter, free_port, spawn, wait_ready, Proc, RedisServer};
use serde_json::{json, Value};

const LIMITER: &str = env!("CARGO_BIN_EXE_llm-ratelimit");
const MOCK: &str = env!("CARGO_BIN_EXE_mock-upstream");

fn nginx_bin() -> PathBuf {
    std::env::var_os("NGINX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// Polls `probe` every 20 ms until it returns `Ok`, for at most `secs` seconds; its last
/// `Err` is the failure message.
fn poll<T>(secs: u64, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(Instant::now() < deadline, "{last}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One Nginx master (and its worker) on the shipped config with node 0's ports replaced,
/// in a prefix of its own (`-p`: temp files, logs, pid, the Lua module). Dropped: SIGQUIT
/// to the master, which ends its workers too (SIGKILL would leave them serving).
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    addr: String,
}

impl Nginx {
    fn start(listener: u16, limiter_http: u16, upstream: u16, status: u16) -> Nginx {
        let root = env!("CARGO_MANIFEST_DIR");
        let dir = tempfile::tempdir().unwrap();
        // Nginx's workers run as an unprivileged user when the master is root: they must be
        // able to reach the temp directories under the prefix.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("logs")).unwrap();
        let text = std::fs::read_to_string(format!("{root}/nginx/nginx.conf")).unwrap();
        let config = nginx_config(&text, listener, limiter_http, upstream, status);
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        std::fs::copy(
            format!("{root}/nginx/llm_ratelimit.lua"),
            dir.path().join("llm_ratelimit.lua"),
        )
        .unwrap();
        let prefix = dir.path().to_str().unwrap().to_string();
        let child = Command::new(nginx_bin())
            .args(["-p", &prefix, "-c", "nginx.conf"])
            .args(["-e", &format!("{prefix}/logs/error.log")])
            .args(["-g", &format!("daemon off; pid {prefix}/nginx.pid;")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx (apt-get install nginx libnginx-mod-http-lua)");
        let mut nginx = Nginx {
            child,
            dir,
            url: format!("http://127.0.0.1:{listener}"),
            addr: format!("127.0.0.1:{listener}"),
        };
        let ready = format!("http://127.0.0.1:{status}/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::blocking::get(&ready).is_ok_and(|r| r.status().is_success()) {
            let exited = nginx.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nginx not ready ({exited:?}); its error log:\n{}",
                nginx.log("error.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(name)).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nginx/nginx.conf` with node 0's four ports (listener 10000, limiter HTTP 10200,
/// upstream 10300, status 10500) replaced, as scripts/cluster.sh does.
fn nginx_config(
    text: &str,
    listener: u16,
    limiter_http: u16,
    upstream: u16,
    status: u16,
) -> String {
    for port in ["10000", "10200", "10300", "10500"] {
        assert!(
            text.contains(&format!("127.0.0.1:{port}")),
            "no port {port}"
        );
    }
    text.replace("127.0.0.1:10000", &format!("127.0.0.1:{listener}"))
        .replace("127.0.0.1:10200", &format!("127.0.0.1:{limiter_http}"))
        .replace("127.0.0.1:10300", &format!("127.0.0.1:{upstream}"))
        .replace("127.0.0.1:10500", &format!("127.0.0.1:{status}"))
}

#[test]
fn the_shipped_nginx_config_loads_with_the_lua_module() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::copy(
        format!("{root}/nginx/nginx.conf"),
        dir.path().join("nginx.conf"),
    )
    .unwrap();
    std::fs::copy(
        format!("{root}/nginx/llm_ratelimit.lua"),
        dir.path().join("llm_ratelimit.lua"),
    )
    .unwrap();
    let prefix = dir.path().to_str().unwrap();
    let out = Command::new(nginx_bin())
        .args(["-t", "-p", prefix, "-c", "nginx.conf"])
        .args(["-e", &format!("{prefix}/logs/error.log")])
        .args(["-g", &format!("pid {prefix}/nginx.pid;")])
        .output()
        .expect("run nginx -t");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("test is successful"), "{stderr}");
}

// --- two real nodes -----------------------------------------------------------------------

const KEYS: &str = "\
keys:
  - name: team-a
    key: sk-e2e-a
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
  - name: race
    key: sk-e2e-race
    rpm: 25
    input_tpm: 1000000
    output_tpm: 1000000
  - name: stream
    key: sk-e2e-stream
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
  - name: gone
    key: sk-e2e-gone
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 1000000
  - name: tight
    key: sk-e2e-tight
    rpm: 2
    input_tpm: 1000000
    output_tpm: 500
";

struct Node {
    nginx: Nginx,
    limiter_http: String,
    limiter: Option<Proc>,
}

struct Cluster {
    nodes: Vec<Node>,
    _mock: Proc,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

/// The mock streams one SSE event every 20 ms.
const STREAM_INTERVAL_MS: u64 = 20;

fn cluster(nodes: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, KEYS).unwrap();
    let redis = RedisServer::start();
    let mock_port = free_port();
    let mock = spawn(Command::new(MOCK).args([
        "--addr",
        &format!("127.0.0.1:{mock_port}"),
        "--stream-interval-ms",
        &STREAM_INTERVAL_MS.to_string(),
    ]));
    wait_ready(
        &format!("http://127.0.0.1:{mock_port}/healthz"),
        Duration::from_secs(30),
    );
    let nodes = (0..nodes)
        .map(|i| {
            let http = free_port();
            let limiter = spawn(
                Command::new(LIMITER)
                    .args(["serve", "--redis-url", &redis.url()])
                    .args(["--node-id", &format!("node-{i}")])
                    // A debug build on a loaded 2-core box: no 50 ms store deadline.
                    .args(["--redis-timeout-ms", "2000"])
                    .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
                    .args(["--http-addr", &format!("127.0.0.1:{http}")])
                    .arg("--config")
                    .arg(&keys),
            );
            let limiter_http = format!("http://127.0.0.1:{http}");
            wait_ready(&format!("{limiter_http}/readyz"), Duration::from_secs(30));
            let nginx = Nginx::start(free_port(), http, mock_port, free_port());
            Node {
                nginx,
                limiter_http,
                limiter: Some(limiter),
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

fn chat(max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Count the requests, please."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn post(
    url: &str,
    key: Option<&str>,
    body: impl Into<reqwest::blocking::Body>,
) -> reqwest::blocking::Response {
    let mut request = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.send().unwrap()
}

/// A key's `[requests, input, output]` used in the current window.
fn used(node: &Node, name: &str) -> [u64; 3] {
    let u: Value = reqwest::blocking::get(format!("{}/v1/usage/{name}", node.limiter_http))
        .unwrap()
        .json()
        .unwrap();
    ["requests", "input_tokens", "output_tokens"].map(|k| u[k]["used"].as_u64().unwrap())
}

/// Polls until the usage of `name` equals `want` (settlement follows the response).
fn settles_to(node: &Node, name: &str, want: [u64; 3]) {
    poll(10, || {
        let got = used(node, name);
        if got == want {
            Ok(())
        } else {
            Err(format!("{name}: usage {got:?}, expected {want:?}"))
        }
    });
}

fn settlements(node: &Node, outcome: &str) -> u64 {
    let text = reqwest::blocking::get(format!("{}/metrics", node.limiter_http))
        .unwrap()
        .text()
        .unwrap();
    counter(
        &text,
        &format!("llm_ratelimit_settlements_total{{outcome=\"{outcome}\"}} "),
    )
}

/// What a client got: status, the headers named `x-ratelimit-*`, `retry-after*`,
/// `x-should-retry` and `content-type`, and the body.
fn answer(response: reqwest::blocking::Response) -> (u16, Vec<(String, String)>, String) {
    let status = response.status().as_u16();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.starts_with("x-ratelimit-")
                || n.starts_with("retry-after")
                || n == "x-should-retry"
                || n == "content-type"
        })
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    headers.sort();
    (status, headers, response.text().unwrap())
}

/// The limiter's own `/v1/check` answer for the same request, as Nginx would ask it.
fn direct_check(
    node: &Node,
    key: Option<&str>,
    body: impl Into<reqwest::blocking::Body>,
) -> (u16, Vec<(String, String)>, String) {
    let mut request = client()
        .post(format!("{}/v1/check", node.limiter_http))
        .header("content-type", "application/json")
        .header("x-original-uri", "/v1/chat/completions")
        .header("x-original-method", "POST")
        .body(body);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    answer(request.send().unwrap())
}

/// Reads an SSE response line by line: the `data:` lines and when each arrived.
fn sse_lines(
    response: reqwest::blocking::Response,
    stop_after: Option<usize>,
) -> Vec<(Instant, String)> {
    let mut reader = BufReader::new(response);
    let mut lines = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.starts_with("data:") {
            lines.push((Instant::now(), line.trim_end().to_string()));
            if Some(lines.len()) == stop_after {
                break;
            }
        }
        line.clear();
    }
    lines
}

#[test]
fn two_nginx_nodes_race_settle_stream_and_deny_exactly() {
    let mut cluster = cluster(2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    // The exact race: 60 requests at once, half through each Nginx, on one key of 25
    // requests per minute: exactly 25 admitted, across both nodes.
    let urls = [a.nginx.url.clone(), b.nginx.url.clone()];
    let threads: Vec<_> = (0..60)
        .map(|i| {
            let url = urls[i % 2].clone();
            std::thread::spawn(move || {
                post(&url, Some("sk-e2e-race"), chat(5, false).to_string())
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let denied = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((admitted, denied), (25, 35), "{statuses:?}");
    assert_eq!(used(b, "race")[0], 25);

    // Settlement of a JSON answer: reserved 200, settled to the usage the upstream
    // reported, through node a; the shared window says so on node b.
    let response = post(&a.nginx.url, Some("sk-e2e-a"), chat(200, false).to_string());
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body: Value = response.json().unwrap();
    let (input, output) = (
        body["usage"]["prompt_tokens"].as_u64().unwrap(),
        body["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert!(output < 200, "{body}");
    settles_to(b, "team-a", [1, input, output]);
    // The admission's headers reached the client.
    assert_eq!(headers["x-ratelimit-limit-requests"], "1000");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "999");
    for name in [
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-input-tokens",
        "x-ratelimit-remaining-output-tokens",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ] {
        assert!(headers.contains_key(name), "{name} missing: {headers:?}");
    }
    assert!(!headers.contains_key("x-llm-ratelimit-reservation"));

    // SSE through node b: the events arrive as the mock produces them (one per 20 ms),
    // not all at the end; the stream's usage chunk settles the reservation.
    let started = Instant::now();
    let response = post(
        &b.nginx.url,
        Some("sk-e2e-stream"),
        chat(60, true).to_string(),
    );
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-limit-requests"], "1000");
    let lines = sse_lines(response, None);
    assert_eq!(lines.last().unwrap().1, "data: [DONE]");
    let usage: Value = lines
        .iter()
        .rev()
        .find_map(|(_, l)| {
            let v: Value = serde_json::from_str(l.strip_prefix("data: ")?).ok()?;
            v.get("usage").filter(|u| u.is_object()).cloned()
        })
        .expect("a usage chunk");
    let (input, output) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    // The mock needs (events − 1) × 20 ms from first to last event; buffered by Nginx,
    // all would arrive within a few ms of each other. A third of that span is asked for:
    // a slow box stretches the mock's pauses rather than shortening them, and only a test
    // thread starved for most of the stream could read the events in one burst.
    let span = lines.last().unwrap().0 - lines[0].0;
    let produced = Duration::from_millis(STREAM_INTERVAL_MS * (lines.len() as u64 - 1));
    assert!(
        span >= produced / 3,
        "{} events arrived within {span:?} of the first (produced over {produced:?}; \
         whole stream took {:?}): buffered?",
        lines.len(),
        started.elapsed()
    );
    settles_to(a, "stream", [1, input, output]);

    // A client gone mid-stream: the reservation (300 output tokens) is settled to what had
    // streamed by then, counted from the text: fewer than the reservation, more than 0.
    let response = post(&a.nginx.url, Some("sk-e2e-gone"), {
        let mut body = chat(300, true);
        body["stream_options"] = Value::Null;
        body.to_string()
    });
    assert_eq!(response.status(), 200);
    let first = sse_lines(response, Some(3));
    assert_eq!(first.len(), 3);
    let settled = poll(10, || {
        let got = used(a, "gone");
        if got[2] > 0 && got[2] < 300 {
            Ok(got)
        } else {
            Err(format!(
                "gone: usage {got:?}, expected output settled below 300"
            ))
        }
    });
    assert_eq!(settled[0], 1);

    // Every admitted request with a reservation settled exactly once, none twice: 25
    // race + 1 JSON + 1 SSE + 1 gone, over both limiters.
    poll(10, || {
        let applied = settlements(a, "applied") + settlements(b, "applied");
        let other: u64 = ["unknown", "expired", "no_usage"]
            .iter()
            .map(|o| settlements(a, o) + settlements(b, o))
            .sum();
        if applied == 28 && other == 0 {
            Ok(())
        } else {
            Err(format!("{applied} settlements applied, {other} otherwise"))
        }
    });

    // Every denial shape: exactly what the limiter's /v1/check answers for the same
    // request (status, body, headers), and nothing counted.
    let big = format!(
        "{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(1_100_000)
    );
    let cases: Vec<(&str, Option<&str>, String)> = vec![
        ("unknown key", Some("sk-nobody"), chat(5, false).to_string()),
        ("no key", None, chat(5, false).to_string()),
        ("not JSON", Some("sk-e2e-a"), "{not json".to_string()),
        (
            "not a chat request",
            Some("sk-e2e-a"),
            json!({"model": "gpt-4o-mini"}).to_string(),
        ),
        ("over 1 MiB", Some("sk-e2e-a"), big),
        (
            "can never fit",
            Some("sk-e2e-tight"),
            chat(600, false).to_string(),
        ),
    ];
    let before = used(a, "team-a");
    for (what, key, body) in &cases {
        let through = answer(post(&b.nginx.url, *key, body.clone()));
        let direct = direct_check(a, *key, body.clone());
        assert_eq!(through, direct, "{what}");
        assert!(
            [400, 401, 413, 429].contains(&through.0),
            "{what}: {}",
            through.0
        );
    }
    let too_large = answer(post(
        &b.nginx.url,
        Some("sk-e2e-tight"),
        chat(600, false).to_string(),
    ));
    assert!(
        too_large
            .1
            .contains(&("x-should-retry".into(), "false".into())),
        "{too_large:?}"
    );
    // Over the limit: two admitted, then the 429 as the limiter writes it (its wait and
    // reset figures move with the clock, so those are compared by shape).
    for _ in 0..2 {
        assert_eq!(
            post(
                &a.nginx.url,
                Some("sk-e2e-tight"),
                chat(5, false).to_string()
            )
            .status(),
            200
        );
    }
    let (status, headers, body) = answer(post(
        &b.nginx.url,
        Some("sk-e2e-tight"),
        chat(5, false).to_string(),
    ));
    let (d_status, d_headers, d_body) =
        direct_check(a, Some("sk-e2e-tight"), chat(5, false).to_string());
    assert_eq!((status, d_status), (429, 429));
    let names = |h: &[(String, String)]| h.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&headers), names(&d_headers));
    assert_eq!(names(&headers).len(), 15, "{headers:?}");
    let (error, d_error): (Value, Value) = (
        serde_json::from_str(&body).unwrap(),
        serde_json::from_str(&d_body).unwrap(),
    );
    assert_eq!(error["error"]["type"], "requests");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], d_error["error"]["type"]);
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Rate limit reached for tight on requests: Limit 2, Used 2, Requested 1."));
    // Rejections left no trace.
    assert_eq!(used(a, "team-a"), before);
    assert_eq!(used(a, "tight")[0], 2);
    // An unknown POST endpoint: the limiter's 404, counted nowhere, never upstream.
    let response = client()
        .post(format!("{}/v1/files", a.nginx.url))
        .header("authorization", "Bearer sk-e2e-a")
        .body("{}")
        .send()
        .unwrap();
    let through = answer(response);
    let direct = answer(
        client()
            .post(format!("{}/v1/check", a.limiter_http))
            .header("authorization", "Bearer sk-e2e-a")
            .header("x-original-uri", "/v1/files")
            .header("x-original-method", "POST")
            .body("{}")
            .send()
            .unwrap(),
    );
    assert_eq!(through, direct);
    assert_eq!(through.0, 404, "{through:?}");
    assert!(
        through.2.contains("\"code\":\"unknown_url\""),
        "{through:?}"
    );
    assert_eq!(used(a, "team-a"), before);

    // The access log names the key, never its secret.
    let log = a.nginx.log("access.log") + &b.nginx.log("access.log");
    assert!(log.contains("key=team-a"), "{log}");
    assert!(!log.contains("sk-e2e"), "{log}");

    // The limiter gone: 503 with an OpenAI body, not Nginx's page.
    let b = &mut cluster.nodes[1];
    b.limiter = None;
    let (status, headers, body) = answer(post(
        &b.nginx.url,
        Some("sk-e2e-a"),
        chat(5, false).to_string(),
    ));
    assert_eq!(status, 503, "{body}");
    assert!(
        headers.contains(&("retry-after".into(), "1".into())),
        "{headers:?}"
    );
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
}

// --- stand-ins: what Nginx hands the limiter and the upstream ------------------------------

#[derive(Default)]
struct Seen {
    /// Each /v1/check: x-original-uri, x-original-method, the header names, the body's length.
    checks: Vec<(String, String, Vec<String>, usize)>,
    /// Each /v1/check's and each /v1/report's `traceparent` and `tracestate` (empty: none).
    check_traces: Vec<(String, String)>,
    /// Each /v1/report: reservation, x-upstream-status, body.
    reports: Vec<(String, String, String)>,
    report_traces: Vec<(String, String)>,
    /// Each upstream request: method, path, x-llm-ratelimit-key, accept-encoding.
    upstream: Vec<(String, String, String, String)>,
}

/// Nginx in front of the stand-ins for the limiter and the upstream, ready; and the
/// limiter stand-in's port.
fn nginx_on_stand_ins(runtime: &tokio::runtime::Runtime) -> (Arc<Mutex<Seen>>, Nginx, u16) {
    let (limiter, upstream) = (free_port(), free_port());
    let seen = stand_ins(runtime, limiter, upstream);
    let nginx = Nginx::start(free_port(), limiter, upstream, free_port());
    wait_ready(
        &format!("http://127.0.0.1:{upstream}/"),
        Duration::from_secs(30),
    );
    (seen, nginx, limiter)
}

/// A limiter that admits everything (reservation `r-N`) and records; an upstream that
/// records and answers a JSON body naming the request.
fn stand_ins(runtime: &tokio::runtime::Runtime, limiter: u16, upstream: u16) -> Arc<Mutex<Seen>> {
    use axum::http::HeaderMap;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let header = |h: &HeaderMap, name: &str| {
        h.get(name).map_or(String::new(), |v| {
            v.to_str().unwrap_or_default().to_string()
        })
    };
    let (check_seen, report_seen, upstream_seen) = (seen.clone(), seen.clone(), seen.clone());
    let limiter_app = axum::Router::new()
        .route(
            "/v1/check",
            axum::routing::post(move |h: HeaderMap, request_body: axum::body::Bytes| {
                let seen = check_seen.clone();
                async move {
                    let mut names: Vec<String> = h.keys().map(|k| k.to_string()).collect();
                    names.sort();
                    let mut seen = seen.lock().unwrap();
                    seen.checks.push((
                        header(&h, "x-original-uri"),
                        header(&h, "x-original-method"),
                        names,
                        request_body.len(),
                    ));
                    let trace = (header(&h, "traceparent"), header(&h, "tracestate"));
                    seen.check_traces.push(trace);
                    let n = seen.checks.len();
                    (
                        [
                            ("x-llm-ratelimit-key", "stand-in".to_string()),
                            ("x-llm-ratelimit-reservation", format!("r-{n}")),
                            ("x-ratelimit-limit-requests", "7".to_string()),
                        ],
                        "",
                    )
                }
            }),
        )
        .route(
            "/v1/report",
            axum::routing::post(move |h: HeaderMap, body: String| {
                let seen = report_seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    seen.reports.push((
                        header(&h, "x-llm-ratelimit-reservation"),
                        header(&h, "x-upstream-status"),
                        body,
                    ));
                    let trace = (header(&h, "traceparent"), header(&h, "tracestate"));
                    seen.report_traces.push(trace);
                    axum::Json(json!({"output_tokens": 1}))
                }
            }),
        );
    let upstream_app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let seen = upstream_seen.clone();
        async move {
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.upstream.push((
                    request.method().to_string(),
                    request.uri().to_string(),
                    header(request.headers(), "x-llm-ratelimit-key"),
                    header(request.headers(), "accept-encoding"),
                ));
                seen.upstream.len()
            };
            // `?slow`: an upstream still working when the client gives up.
            if request.uri().query() == Some("slow") {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            axum::Json(json!({"object": "recorded", "n": n}))
        }
    });
    for (port, app) in [(limiter, limiter_app), (upstream, upstream_app)] {
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    }
    seen
}

/// Sends one raw HTTP/1.1 request (so the target goes exactly as written); status, body.
fn send_raw(addr: &str, target: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("POST {target} HTTP/1.1\r\nhost: llm\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    tcp.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{target}: no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// Request targets as a client may write them, and the path (and query) both the limiter
/// and the upstream must then see: the limiter's own normalisation
/// (src/openai/endpoint.rs `normalise`). `None`: refused with 400 before either sees it.
const PATH_VARIANTS: &[(&str, Option<&str>)] = &[
    ("/v1/chat/completions", Some("/v1/chat/completions")),
    ("/v1//chat/completions", Some("/v1/chat/completions")),
    ("//v1/chat/completions", Some("/v1/chat/completions")),
    ("/v1/./chat/completions", Some("/v1/chat/completions")),
    ("/v1/x/../chat/completions", Some("/v1/chat/completions")),
    (
        "/v1/chat/%2e%2E/chat/completions",
        Some("/v1/chat/completions"),
    ),
    ("/v1/chat/%63ompletions", Some("/v1/chat/completions")),
    (
        "/v1/chat/comp%6Cetions?api-version=1",
        Some("/v1/chat/completions?api-version=1"),
    ),
    ("/V1/Chat/Completions", Some("/V1/Chat/Completions")),
    ("/v1\\chat\\completions", Some("/v1/chat/completions")),
    ("/v1/chat/completions/", Some("/v1/chat/completions")),
    (
        "/v1/chat/completions/../completions",
        Some("/v1/chat/completions"),
    ),
    (
        "http://llm/v1//chat/completions",
        Some("/v1/chat/completions"),
    ),
    (
        "/openai/deployments/prod%2Dgpt4o//chat/completions?api-version=2024-10-21",
        Some("/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21"),
    ),
    // A double-encoded slash is not a slash; other escapes are kept, upper-cased.
    ("/v1/chat/%252F", Some("/v1/chat/%252F")),
    ("/v1/chat/%7b", Some("/v1/chat/%7B")),
    // The query is not the path: left as it came.
    (
        "/v1/chat/completions?a=%2F&b=..//",
        Some("/v1/chat/completions?a=%2F&b=..//"),
    ),
    ("/v1/chat/completions;x", Some("/v1/chat/completions;x")),
    ("/v1/chat/completions#x", Some("/v1/chat/completions")),
    // Encoded slashes and backslashes: refused by llm_ratelimit.lua; `..` above the root
    // and an encoded NUL: refused by Nginx itself.
    ("/v1/chat%2Fcompletions", None),
    ("/v1/chat%2fcompletions", None),
    ("/v1/chat%5Ccompletions", None),
    ("/openai/deployments/a%2Fb/chat/completions", None),
    ("/../v1/chat/completions", None),
    ("/v1/chat/completions%00", None),
];

#[test]
fn nginx_hands_limiter_and_upstream_the_same_path_and_reports_each_response_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (seen, nginx, _) = nginx_on_stand_ins(&runtime);
    let seen = || seen.lock().unwrap();
    let body = chat(5, false).to_string();
    let headers = [
        ("authorization", "Bearer sk-secret"),
        ("content-type", "application/json"),
        ("cookie", "session=1"),
        ("accept-encoding", "gzip, deflate, br"),
        // A client cannot name the key the upstream sees, nor the path the limiter meters.
        ("x-llm-ratelimit-key", "forged"),
        ("x-original-uri", "/v1/embeddings"),
    ];
    let mut admitted = 0;
    for (i, (target, normalised)) in PATH_VARIANTS.iter().enumerate() {
        let (checks, upstreams) = {
            let seen = seen();
            (seen.checks.len(), seen.upstream.len())
        };
        // The client's trace context, one trace per request.
        let traceparent = format!("00-{:032x}-{:016x}-01", i + 1, i + 1);
        let tracestate = format!("vendor=v{i}");
        let mut headers = headers.to_vec();
        headers.push(("traceparent", traceparent.as_str()));
        headers.push(("tracestate", tracestate.as_str()));
        let (status, answer) = send_raw(&nginx.addr, target, &headers, &body);
        let Some(normalised) = normalised else {
            assert_eq!(status, 400, "{target}: {answer}");
            let error: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(error["error"]["type"], "invalid_request_error", "{target}");
            assert_eq!(seen().checks.len(), checks, "{target} reached the limiter");
            assert_eq!(
                seen().upstream.len(),
                upstreams,
                "{target} reached the upstream"
            );
            continue;
        };
        assert_eq!(status, 200, "{target}: {answer}");
        admitted += 1;
        let (check, up) = {
            let seen = seen();
            (
                seen.checks[checks..].to_vec(),
                seen.upstream[upstreams..].to_vec(),
            )
        };
        assert_eq!(check.len(), 1, "{target}: {check:?}");
        assert_eq!(up.len(), 1, "{target}: {up:?}");
        assert_eq!(check[0].0, *normalised, "{target}: the limiter's path");
        assert_eq!(check[0].1, "POST");
        assert_eq!(check[0].3, body.len(), "{target}: the body the limiter got");
        assert_eq!(up[0].1, *normalised, "{target}: the upstream's path");
        assert_eq!(up[0].0, "POST");
        assert_eq!(up[0].2, "stand-in", "{target}: the key the upstream sees");
        // The upstream answers uncompressed, so the report can read its usage.
        assert_eq!(up[0].3, "", "{target}: accept-encoding");
        // The limiter gets the key, the body's type and the original request; no cookie.
        assert!(check[0].2.contains(&"authorization".to_string()));
        assert!(
            !check[0].2.contains(&"cookie".to_string()),
            "{:?}",
            check[0].2
        );
    }
    // Azure OpenAI's `api-key` header reaches the limiter too, and a chunked body is
    // forwarded whole.
    let checks = seen().checks.len();
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/v1/chat/completions", nginx.url))
        .header("api-key", "sk-secret")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            body.clone(),
        )))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    admitted += 1;
    {
        let seen = seen();
        assert_eq!(seen.checks.len(), checks + 1);
        assert!(seen.checks[checks].2.contains(&"api-key".to_string()));
        assert_eq!(seen.checks[checks].3, body.len());
    }
    // A GET is asked about too, as a GET. Its tracestate is over the 512 bytes the
    // report passes on: the check gets it, the report only the traceparent.
    let long_state = format!("vendor={}", "a".repeat(600));
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/v1/models", nginx.url))
        .header("authorization", "Bearer sk-secret")
        .header("traceparent", format!("00-{:032x}-{:016x}-01", 999, 999))
        .header("tracestate", &long_state)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-limit-requests"], "7");
    admitted += 1;
    assert_eq!(seen().checks.last().unwrap().1, "GET");
    let get_handle = seen().checks.len();
    // Each admitted response reported once, with its reservation, the upstream's status,
    // exactly the body the client got and the trace context its check had: the client's,
    // or none (the api-key request sent none), or the GET's without its long tracestate.
    let reports = poll(10, || {
        let reports = seen().reports.clone();
        if reports.len() == admitted {
            Ok(reports)
        } else {
            Err(format!(
                "{} reports for {admitted} responses",
                reports.len()
            ))
        }
    });
    let (check_traces, report_traces) = {
        let seen = seen();
        (seen.check_traces.clone(), seen.report_traces.clone())
    };
    let mut handles: Vec<usize> = reports
        .iter()
        .zip(&report_traces)
        .map(|((r, status, body), trace)| {
            assert_eq!(status, "200");
            let n: usize = r.strip_prefix("r-").unwrap().parse().unwrap();
            let answer: Value = serde_json::from_str(body).unwrap();
            assert_eq!(answer["object"], "recorded", "{body}");
            let want = if n == get_handle {
                assert_eq!(check_traces[n - 1].1, long_state);
                (check_traces[n - 1].0.clone(), String::new())
            } else {
                check_traces[n - 1].clone()
            };
            assert_eq!(trace, &want, "{r}: the report's trace context");
            n
        })
        .collect();
    let traced = check_traces.iter().filter(|(p, _)| !p.is_empty()).count();
    assert_eq!(traced, admitted - 1, "{check_traces:?}");
    assert!(check_traces
        .iter()
        .all(|(p, s)| p.is_empty() == s.is_empty()));
    handles.sort();
    assert_eq!(handles, (1..=admitted).collect::<Vec<_>>());
    // Nothing reported twice, later.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seen().reports.len(), admitted);
    let log = nginx.log("access.log") + &nginx.log("error.log");
    assert!(!log.contains("sk-secret"), "{log}");
    assert!(log.contains("key=stand-in"), "{log}");
}

/// A client that gives up before the upstream answers leaves its reservation as it was:
/// the upstream may have generated (and billed) output by then, and nobody saw how much.
/// Reporting it as an upstream failure (`502`) would release the whole output reservation,
/// so a client could have large generations run uncounted by hanging up on each; Envoy's
/// ext_proc leaves such a reservation standing too.
#[test]
fn a_client_gone_before_the_upstream_answers_releases_nothing() {
    use std::io::Write;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (seen, nginx, limiter) = nginx_on_stand_ins(&runtime);
    let seen = || seen.lock().unwrap();
    let body = chat(5, false).to_string();
    let mut tcp = std::net::TcpStream::connect(&nginx.addr).unwrap();
    let request = format!(
        "POST /v1/chat/completions?slow HTTP/1.1\r\nhost: llm\r\nauthorization: Bearer sk-secret\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).unwrap();
    poll(10, || match seen().upstream.len() {
        1 => Ok(()),
        n => Err(format!("{n} upstream requests")),
    });
    drop(tcp);
    let reports = poll(10, || {
        let reports = seen().reports.clone();
        if reports.is_empty() {
            Err("no report".to_string())
        } else {
            Ok(reports)
        }
    });
    assert_eq!(reports.len(), 1, "{reports:?}");
    let (reservation, status, reported) = &reports[0];
    assert_eq!(reservation, "r-1");
    assert_eq!(status, "", "no upstream status: not an upstream error");
    assert_eq!(reported, "");
    // An upstream Nginx cannot reach did no work: Nginx's own 502 is reported, and the
    // limiter releases the output reservation.
    let unreachable = Nginx::start(free_port(), limiter, free_port(), free_port());
    let response = post(&unreachable.url, Some("sk-secret"), body.clone());
    assert_eq!(response.status(), 502);
    let reports = poll(10, || {
        let reports = seen().reports.clone();
        if reports.len() == 2 {
            Ok(reports)
        } else {
            Err(format!("{} reports", reports.len()))
        }
    });
    assert_eq!(reports[1].0, "r-2");
    assert_eq!(reports[1].1, "502");
}

/// A few hundred request targets built at random (fixed seed) from pieces that exercise
/// the path rules: through Nginx with stand-ins, every target the limiter would refuse is
/// refused before anyone sees it, and every admitted one reaches the limiter and the
/// upstream as one clean path that the limiter meters as the same route as the raw target
/// (`Route::from_path`). Nginx's own parser refuses more (invalid escapes, `..` above the
/// root), never less.
#[test]
fn random_targets_are_metered_as_the_route_they_name() {
    use llm_ratelimit::openai::Route;
    const PIECES: &[&str] = &[
        "/",
        "//",
        "/.",
        "/..",
        "/%2e",
        "/%2E%2e",
        "%2F",
        "%2f",
        "%5C",
        "%5c",
        "%41",
        "%7b",
        "%7E",
        "%",
        "%2",
        "%zz",
        "%252F",
        "v1",
        "V1",
        "chat",
        "completions",
        "Completions",
        "embeddings",
        "openai",
        "deployments",
        "prod-1",
        "\\",
        ";x",
        "?q=1",
        "?a=/../",
        "#f",
        "a",
        "~",
        "-",
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (seen, nginx, _) = nginx_on_stand_ins(&runtime);
    let headers = [("authorization", "Bearer sk-secret")];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        // xorshift64*: deterministic, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    let (mut admitted, mut refused_by_nginx) = (0, 0);
    for _ in 0..300 {
        let mut target = String::from("/");
        for _ in 0..1 + next(8) {
            target.push_str(PIECES[next(PIECES.len())]);
        }
        let (checks, upstreams) = {
            let seen = seen.lock().unwrap();
            (seen.checks.len(), seen.upstream.len())
        };
        let (status, answer) = send_raw(&nginx.addr, &target, &headers, "{}");
        let seen = seen.lock().unwrap();
        let raw_route = Route::from_path(&target);
        if status == 400 {
            assert_eq!(seen.checks.len(), checks, "{target} reached the limiter");
            assert_eq!(
                seen.upstream.len(),
                upstreams,
                "{target} reached the upstream"
            );
            if raw_route.is_ok() {
                // Nginx's own parser is stricter (`..` above the root): refused, not let by.
                // Only for what its parser refuses: an invalid escape (`%zz`, a stray
                // `%`), or a `..` (perhaps encoded) that may climb above the root.
                let lower = target.to_ascii_lowercase();
                let invalid_escape = target.match_indices('%').any(|(i, _)| {
                    !target
                        .get(i + 1..i + 3)
                        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                });
                assert!(
                    invalid_escape || lower.contains("..") || lower.contains("%2e"),
                    "{target}: refused by Nginx alone"
                );
                refused_by_nginx += 1;
            }
            continue;
        }
        assert_eq!(status, 200, "{target}: {answer}");
        assert!(
            raw_route.is_ok(),
            "{target}: the limiter refuses it, Nginx let it by"
        );
        admitted += 1;
        let (path, _, _, _) = &seen.checks[checks];
        assert_eq!(*path, seen.upstream[upstreams].1, "{target}");
        let bare = path.split('?').next().unwrap();
        assert!(bare.starts_with('/'), "{target} → {path}");
        // No empty, `.` or `..` segment, no backslash (the root is `/` alone).
        let padded = format!("{}/", bare.trim_end_matches('/'));
        for bad in ["//", "/./", "/../", "\\"] {
            assert!(bare == "/" || !padded.contains(bad), "{target} → {path}");
        }
        assert_eq!(Route::from_path(path), raw_route, "{target} → {path}");
    }
    assert!(admitted > 100, "{admitted} of 300 admitted");
    assert!(
        refused_by_nginx < 100,
        "{refused_by_nginx} refused by Nginx alone ({admitted} admitted)"
    );
}

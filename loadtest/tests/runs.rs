//! `llm-loadtest` end to end: the binary against servers this test starts in-process on
//! ephemeral loopback ports — the mock upstream (counting what it receives) for `http`,
//! the limiter's gRPC surface on the in-process store for `grpc`, and for `http` through
//! a limiter, a small gateway doing what Nginx does with `/v1/check` and `/v1/report`.
//! Runs are 1 to 2 s each.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use llm_ratelimit::admission::{ClientRequest, Handle, Limiter};
use llm_ratelimit::config::Config;
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::Store;
use llm_ratelimit::metrics::Metrics;
use llm_ratelimit::mock::{router, Options};
use llm_ratelimit::openai::Tokenizer;
use serde_json::Value;

/// Secrets that must never show in anything the tool writes.
const SECRET_A: &str = "sk-loadtest-secret-alpha";
const SECRET_B: &str = "sk-loadtest-secret-bravo";
const SECRET_TINY: &str = "sk-loadtest-secret-tiny";

/// A mock upstream on an ephemeral port; counts the requests it receives.
async fn mock(latency: Duration) -> (String, Arc<AtomicU64>) {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let app = router(
        Arc::new(Tokenizer::new()),
        Options {
            latency,
            stream_interval: Duration::ZERO,
            ..Options::default()
        },
    )
    .layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            counter.fetch_add(1, Ordering::Relaxed);
            next.run(request)
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

const KEYS: &str = "keys:
  - name: team-big
    key: sk-loadtest-secret-alpha
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
  - name: team-tiny
    key: sk-loadtest-secret-tiny
    rpm: 20
    input_tpm: 100000000
    output_tpm: 100000000
";

/// The limiter's gRPC surface on the in-process store, and its config file.
async fn limiter(dir: &Path) -> (String, PathBuf) {
    limiter_with(dir, KEYS).await
}

/// A limiter on the in-process store with config `yaml`, and that config's file.
fn node(dir: &Path, yaml: &str) -> (Arc<Limiter>, PathBuf) {
    let path = dir.join("keys.yaml");
    std::fs::write(&path, yaml).unwrap();
    let limiter = Arc::new(Limiter::new(
        Arc::new(ArcSwap::from_pointee(
            Config::parse(yaml, "keys.yaml").unwrap(),
        )),
        Store::Memory(MemoryStore::new()),
        Arc::new(Metrics::default()),
    ));
    (limiter, path)
}

/// [`node`]'s gRPC surface, and its config file.
async fn limiter_with(dir: &Path, yaml: &str) -> (String, PathBuf) {
    let (limiter, path) = node(dir, yaml);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        llm_ratelimit::grpc::serve(listener, limiter, std::future::pending())
            .await
            .unwrap()
    });
    (addr, path)
}

/// Runs the tool to completion off the runtime, so the in-process servers keep serving.
async fn loadtest(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_llm-loadtest"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// A command line's words (no argument here contains a space).
fn args(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

/// The run's JSON, after checking the run succeeded and leaked no secret.
fn summary(out: &Output, json: &Path) -> Value {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "status {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(json).unwrap();
    for secret in [SECRET_A, SECRET_B, SECRET_TINY] {
        for (what, s) in [("stdout", &*stdout), ("stderr", &*stderr), ("json", &*text)] {
            assert!(!s.contains(secret), "the secret appears in {what}");
        }
    }
    serde_json::from_str(&text).unwrap()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_closed_loop_sends_only_to_its_targets_and_counts_every_request() {
    let (a, seen_a) = mock(Duration::ZERO).await;
    let (b, seen_b) = mock(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = loadtest(args(&format!(
        "http --target {a} --target {b} --key {SECRET_A} --key {SECRET_B} --duration 1s \
         --concurrency 4 --threads 1 --stream --max-tokens 20 --json {}",
        json.display()
    )))
    .await;
    let s = summary(&out, &json);

    let requests = &s["requests"];
    let total = u(&requests["total"]);
    assert!(total > 50, "{s}");
    assert_eq!(u(&requests["ok"]), total);
    assert_eq!(u(&requests["rate_limited"]), 0);
    assert_eq!(u(&requests["errors"]), 0);
    // Every request reached one of the two targets, and is counted against it.
    let targets = s["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(
        (targets[0]["name"].as_str(), targets[1]["name"].as_str()),
        (Some(&*a), Some(&*b))
    );
    assert_eq!(u(&targets[0]["total"]), seen_a.load(Ordering::Relaxed));
    assert_eq!(u(&targets[1]["total"]), seen_b.load(Ordering::Relaxed));
    assert_eq!(u(&targets[0]["total"]) + u(&targets[1]["total"]), total);
    let keys = s["keys"].as_array().unwrap();
    assert_eq!(
        (keys[0]["name"].as_str(), keys[1]["name"].as_str()),
        (Some("key-1"), Some("key-2"))
    );
    assert_eq!(u(&keys[0]["total"]) + u(&keys[1]["total"]), total);

    assert!(s["throughput_rps"].as_f64().unwrap() > 0.0);
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(s["latency_ms"][p].as_f64().unwrap() > 0.0, "{p}: {s}");
    }
    assert_eq!(s["mode"], "http");
    assert_eq!(s["loop"], "closed");
    assert_eq!(s["concurrency"], 4);
    assert_eq!(s["threads"], 1);
    assert_eq!(s["duration_s"], 1.0);
    // Usage came from the streams' final chunks: 100 prompt tokens (the default) each,
    // and the mock's rule min(max_tokens, 16 + prompt % 48) = 20 completion tokens.
    assert_eq!(u(&s["tokens"]["prompt"]), 100 * total);
    assert_eq!(u(&s["tokens"]["completion"]), 20 * total);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("p99.9") && stdout.contains("key-2"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_schedule_and_counts_latency_from_the_slot() {
    let (url, seen) = mock(Duration::from_millis(100)).await;
    let dir = tempfile::tempdir().unwrap();

    // Enough connections: every slot of 200/s × 1 s goes out on time; latency is the
    // server's 100 ms.
    let json = dir.path().join("free.json");
    let out = loadtest(args(&format!(
        "http --target {url} --key {SECRET_A} --duration 1s --rate 200/s --json {}",
        json.display()
    )))
    .await;
    let s = summary(&out, &json);
    let total = u(&s["requests"]["total"]);
    assert_eq!(total + u(&s["unsent"]), 200, "{s}");
    // A loaded CI box may delay a few slots past the end; the claim is that the schedule
    // is kept, not that the machine is idle.
    assert!(total >= 180, "{s}");
    assert_eq!(u(&s["requests"]["ok"]), total);
    assert_eq!(s["loop"], "open");
    assert_eq!(s["rate"], 200.0);
    let p50 = s["latency_ms"]["p50"].as_f64().unwrap();
    // Never below the server's 100 ms; the upper bound only says the wait is not counted.
    assert!((100.0..400.0).contains(&p50), "{s}");
    assert!(u(&s["workers"]) >= 15, "about 20 in flight are needed: {s}");

    // Five connections can carry 50/s: the schedule falls behind, and each request's
    // latency counts the wait for its turn, not just the server's 100 ms.
    let json = dir.path().join("capped.json");
    let before = seen.load(Ordering::Relaxed);
    let out = loadtest(args(&format!(
        "http --target {url} --key {SECRET_A} --duration 1s --rate 200 --max-in-flight 5 \
         --json {}",
        json.display()
    )))
    .await;
    let s = summary(&out, &json);
    let total = u(&s["requests"]["total"]);
    assert_eq!(total, seen.load(Ordering::Relaxed) - before);
    // At most 5 connections × 1 s / 100 ms (+ the ones in flight at the end); fewer
    // only if the machine is slower than the server's 100 ms.
    assert!((20..=60).contains(&total), "{s}");
    assert_eq!(total + u(&s["unsent"]), 200, "{s}");
    assert_eq!(u(&s["workers"]), 5);
    let latency = &s["latency_ms"];
    assert!(latency["p90"].as_f64().unwrap() > 400.0, "{s}");
    assert!(latency["max"].as_f64().unwrap() > 600.0, "{s}");
    assert!(s["send_lag_ms"]["p90"].as_f64().unwrap() > 300.0, "{s}");
}

/// `grpc --api API` with a 20-rpm key: exactly 20 admitted in a 1 s run, every other
/// request a 429 naming `requests`; keys named from the config.
async fn grpc_admits_exactly_the_rpm(api: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (addr, config) = limiter(dir.path()).await;
    let json = dir.path().join("run.json");
    let out = loadtest(args(&format!(
        "grpc --api {api} --target {addr} --key {SECRET_TINY} --key {SECRET_A} \
         --key-weights 1,1 --duration 1s --concurrency 4 --connections 2 --verify {} \
         --json {}",
        config.display(),
        json.display()
    )))
    .await;
    let s = summary(&out, &json);
    assert_eq!(s["mode"], "grpc");
    assert_eq!(s["api"], api);
    let keys = s["keys"].as_array().unwrap();
    let (tiny, big) = (&keys[0], &keys[1]);
    assert_eq!(tiny["name"], "team-tiny");
    assert_eq!(big["name"], "team-big");
    assert!(u(&tiny["total"]) > 40, "{s}");
    assert_eq!(u(&tiny["ok"]), 20, "{s}");
    assert_eq!(u(&tiny["rate_limited"]), u(&tiny["total"]) - 20, "{s}");
    assert_eq!(u(&big["ok"]), u(&big["total"]), "{s}");
    assert_eq!(u(&s["requests"]["errors"]), 0, "{s}");
    assert_eq!(
        u(&s["denied_by"]["requests"]),
        u(&tiny["rate_limited"]),
        "{s}"
    );
    assert_eq!(
        u(&s["status_codes"]["429"]),
        u(&tiny["rate_limited"]),
        "{s}"
    );
    assert!(s.get("verify").is_some(), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_authz_admits_exactly_the_rpm() {
    grpc_admits_exactly_the_rpm("authz").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ratelimit_admits_exactly_the_rpm() {
    grpc_admits_exactly_the_rpm("ratelimit").await;
}

/// `grpc --api authz --settle-output 3` with `--max-tokens 100` on a key of 2,000 output
/// TPM: each admission reserves 100 and is then settled through ext_proc to 3, so far
/// more than the 20 that reservations alone would allow get in, the limiter's window
/// holds exactly 3 output tokens per admitted request, and the audit agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_authz_settle_output_settles_every_admission_through_ext_proc() {
    let dir = tempfile::tempdir().unwrap();
    let (limiter, config) = node(
        dir.path(),
        "keys:
  - name: team-out
    key: sk-loadtest-secret-alpha
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 2000
",
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let serving = limiter.clone();
    tokio::spawn(async move {
        llm_ratelimit::grpc::serve(listener, serving, std::future::pending())
            .await
            .unwrap()
    });
    let json = dir.path().join("run.json");
    let out = loadtest(args(&format!(
        "grpc --api authz --target {addr} --key {SECRET_A} --max-tokens 100 \
         --settle-output 3 --duration 2s --concurrency 2 --verify {} --verify-strict \
         --json {}",
        config.display(),
        json.display()
    )))
    .await;
    let s = summary(&out, &json);
    let ok = u(&s["requests"]["ok"]);
    assert_eq!(u(&s["requests"]["errors"]), 0, "{s}");
    assert!(ok > 20, "reservations were not settled: {s}");
    assert_eq!(u(&s["tokens"]["completion"]), 3 * ok, "{s}");
    assert_eq!(s["settle_output"], 3, "{s}");
    assert_eq!(s["verify"]["passed"], true, "{s}");
    // Every settlement ended before its record did: the window holds the settled output.
    let usage = limiter.usage("team-out").await.unwrap();
    assert_eq!(usage["requests"]["used"], ok, "{usage}");
    assert_eq!(usage["output_tokens"]["used"], 3 * ok, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_unreachable_targets_fail_clearly_and_quickly() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cases: [(Vec<String>, i32, &str); 7] = [
        (
            args(&format!(
                "http --target http://127.0.0.1:{port} --key {SECRET_A} --duration 1s \
                 --concurrency 1"
            )),
            1,
            "cannot connect to --target",
        ),
        (
            args(&format!(
                "grpc --api authz --target 127.0.0.1:{port} --key {SECRET_A} --duration 1s \
                 --concurrency 1"
            )),
            1,
            "cannot connect to --target",
        ),
        (
            args(&format!(
                "http --target http://127.0.0.1:1 --key {SECRET_A} --duration 1s \
                 --concurrency 1 --rate 5"
            )),
            2,
            "--rate",
        ),
        (
            args(&format!(
                "http --target http://127.0.0.1:1 --key {SECRET_A} --key-weights 1,2 \
                 --duration 1s --rate 5"
            )),
            2,
            "--key-weights has 2 values for 1 keys",
        ),
        (
            args(&format!(
                "http --target https://127.0.0.1:1 --key {SECRET_A} --duration 1s --rate 5"
            )),
            1,
            "https is not supported",
        ),
        (
            // Checked before the run, not after it.
            args(&format!(
                "http --target http://127.0.0.1:1 --key {SECRET_A} --duration 1h --rate 5 \
                 --json /nonexistent-dir/run.json"
            )),
            1,
            "--json: cannot write /nonexistent-dir/run.json",
        ),
        (
            args(&format!(
                "grpc --api ratelimit --target 127.0.0.1:1 --key {SECRET_A} --duration 1s \
                 --concurrency 1 --settle-output 5"
            )),
            2,
            "--settle-output applies to --api authz only",
        ),
    ];
    for (args, code, message) in cases {
        let started = Instant::now();
        let out = loadtest(args.clone()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !stderr.contains(SECRET_A) && !String::from_utf8_lossy(&out.stdout).contains(SECRET_A)
        );
        assert!(
            // "Quickly": not the run's hour, nor a connect timeout's minutes; loose
            // enough for a loaded 2-core CI box.
            started.elapsed() < Duration::from_secs(30),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}

/// Every kind of limit beside a key's own per window, each tight enough that a short run
/// fills it: team-a allows gpt-4o 2 requests (a `models` entry) and 30 a day in all; team-b
/// and team-c, roomy alone, share pool `research` of 20 requests per window. No limit of
/// a key's own, and no token limit, is ever near.
const LIMITS: &str = "keys:
  - name: team-a
    key: sk-loadtest-secret-alpha
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
    per_day:
      requests: 30
    models:
      - match: gpt-4o
        rpm: 2
  - name: team-b
    key: sk-loadtest-secret-bravo
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
    pool: research
  - name: team-c
    key: sk-loadtest-secret-tiny
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
    pool: research
pools:
  - name: research
    rpm: 20
";

/// Nginx's part in front of the limiter, in process: `check` each request (as
/// `/v1/check` does), answer the limiter's refusal as it is, else hand the request to the
/// mock upstream and settle the reservation from its answer (as `/v1/report` does)
/// before the client gets it, so a record's settlement is done by its last byte.
async fn gateway(limiter: Arc<Limiter>) -> String {
    use axum::body::{to_bytes, Body};
    use axum::response::Response;
    use tower::ServiceExt;

    let upstream = router(Arc::new(Tokenizer::new()), Options::default());
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (limiter, upstream) = (limiter.clone(), upstream.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = to_bytes(body, 1 << 20).await.unwrap();
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            let verdict = limiter
                .check(ClientRequest {
                    method: parts.method.as_str(),
                    authorization: header("authorization"),
                    api_key: header("api-key"),
                    path: parts.uri.path(),
                    body: &body,
                })
                .await;
            let Some(admitted) = verdict.admitted else {
                let answer = verdict.answer;
                let mut response = Response::new(Body::from(answer.body));
                *response.status_mut() = answer.status.try_into().unwrap();
                for (name, value) in answer.headers {
                    response.headers_mut().insert(name, value.parse().unwrap());
                }
                return response;
            };
            let request = axum::extract::Request::from_parts(parts, Body::from(body));
            let (parts, body) = upstream.oneshot(request).await.unwrap().into_parts();
            let body = to_bytes(body, 1 << 24).await.unwrap();
            let handle = admitted.reservation.as_deref().and_then(Handle::parse);
            let handle = handle.expect("an admitted chat request has a reservation");
            let mut meter = handle.meter();
            meter.feed(&body, limiter.tokenizer());
            limiter
                .settle(&handle.reservation, Some(parts.status.as_u16()), meter)
                .await
                .unwrap();
            Response::from_parts(parts, Body::from(body))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// `--verify-strict` on a run that fills a model entry, a key's per-day limit and a pool
/// with two `--model`s: the limiter admits exactly each limit, every 429 is held against
/// the limit its message names (none against a key's own), and the audit finds nothing
/// wrong (exit 0). Each of the three limits denied, so the audit had something to judge.
async fn every_kind_of_limit_is_audited(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let target = match mode {
        "http" => gateway(node(dir.path(), LIMITS).0).await,
        _ => limiter_with(dir.path(), LIMITS).await.0,
    };
    let config = dir.path().join("keys.yaml");
    let json = dir.path().join("run.json");
    let out = loadtest(args(&format!(
        "{mode} --target {target} --key {SECRET_A} --key {SECRET_B} --key {SECRET_TINY} \
         --key-weights 2,1,1 --model gpt-4o --model gpt-4o-mini --max-tokens 20 \
         --duration 2s --concurrency 4 --verify {} --verify-strict --json {}",
        config.display(),
        json.display()
    )))
    .await;
    // Exit 0: `--verify-strict` found no over-admission and no false 429.
    let s = summary(&out, &json);
    let keys: Vec<(&str, u64, u64)> = s["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap(),
                u(&k["ok"]),
                u(&k["rate_limited"]),
            )
        })
        .collect();
    assert_eq!(u(&s["requests"]["errors"]), 0, "{s}");
    // Enough traffic that every limit filled: team-a got exactly its day, the pool's two
    // keys exactly the pool's window, and all three were refused beyond that.
    assert_eq!(keys[0].0, "team-a", "{s}");
    assert_eq!(keys[0].1, 30, "{s}");
    assert_eq!(keys[1].1 + keys[2].1, 20, "{s}");
    assert!(keys.iter().all(|k| k.2 > 0), "{s}");

    let verify = &s["verify"];
    assert_eq!(verify["passed"], true, "{s}");
    let audited = |name: &str| -> (u64, u64) {
        let k = verify["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("no audited limit {name}: {verify}"));
        let false_429: u64 = k["limits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| u(&l["denials"]["false_429"]))
            .sum();
        assert_eq!(false_429, 0, "{name}: {verify}");
        (u(&k["admitted"]), u(&k["denied"]))
    };
    // The 429s went to the limits their messages named; the key's own never denied.
    for name in ["team-a model gpt-4o", "team-a per_day", "pool research"] {
        assert!(audited(name).1 > 0, "no 429 named {name}: {verify}");
    }
    for name in ["team-a", "team-b", "team-c"] {
        assert_eq!(audited(name).1, 0, "{name}: {verify}");
    }
    // Only gpt-4o requests count against team-a's gpt-4o entry.
    assert_eq!(audited("team-a model gpt-4o").0, 2, "{verify}");
    assert_eq!(audited("team-a per_day").0, 30, "{verify}");
    assert_eq!(audited("pool research").0, 20, "{verify}");
    // The denials named something: every 429 was the denial of one audited limit.
    let named: u64 = verify["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| u(&k["denied"]))
        .sum();
    assert_eq!(named, u(&s["requests"]["rate_limited"]), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_verify_audits_model_day_and_pool_limits() {
    every_kind_of_limit_is_audited("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_authz_verify_audits_model_day_and_pool_limits() {
    every_kind_of_limit_is_audited("grpc --api authz").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ratelimit_verify_audits_model_day_and_pool_limits() {
    every_kind_of_limit_is_audited("grpc --api ratelimit").await;
}

//! The HTTP surface end to end: `/v1/check`, `/v1/report`, `/v1/usage`, health and
//! metrics, on nodes that share one Redis the test starts, and on the in-process store.

mod common;

use std::time::Duration;

use common::{usage, used, RedisServer};
use llm_ratelimit::config::Config;
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::redis::RedisStore;
use llm_ratelimit::engine::Store;
use serde_json::{json, Value};

const SECRET: &str = "sk-test-very-secret-a";

fn config(rpm: u64, input_tpm: u64, output_tpm: u64) -> Config {
    Config::parse(
        &format!(
            "window: 60s\nprecision: 100ms\ndefault_max_output_tokens: 64\nmax_body_bytes: 4096\nkeys:\n  - name: team-a\n    key: {SECRET}\n    rpm: {rpm}\n    input_tpm: {input_tpm}\n    output_tpm: {output_tpm}\n"
        ),
        "test.yaml",
    )
    .unwrap()
}

/// A node: the HTTP router on an ephemeral loopback port.
async fn node(config: Config, store: Store) -> String {
    common::http_node(config, store).await
}

async fn redis_store(redis: &RedisServer) -> Store {
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_secs(1)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "store did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store
}

fn chat(max_tokens: Option<u64>) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Say hello to the rate limiter."}],
    });
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    body
}

async fn check(base: &str, auth: Option<&str>, body: &str) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/check"))
        .header("x-original-uri", "/v1/chat/completions")
        .body(body.to_string());
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_admit_count_deny_and_settle() {
    let redis = RedisServer::start();
    let a = node(config(3, 10_000, 10_000), redis_store(&redis).await).await;
    let b = node(config(3, 10_000, 10_000), redis_store(&redis).await).await;
    let auth = format!("Bearer {SECRET}");

    // Admitted on node a: headers for the client and the upstream, and a reservation.
    let r = check(&a, Some(&auth), &chat(Some(100)).to_string()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-llm-ratelimit-key"), "team-a");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "2");
    assert_eq!(header(&r, "x-ratelimit-limit-output-tokens"), "10000");
    assert_eq!(header(&r, "x-ratelimit-remaining-output-tokens"), "9900");
    assert!(!header(&r, "x-ratelimit-reset-requests").is_empty());
    let handle = header(&r, "x-llm-ratelimit-reservation");
    assert!(!handle.is_empty());
    // Node b sees node a's request: one Redis, one window.
    let u = used(&usage(&b, "team-a").await);
    assert_eq!(u[0], 1);
    let input = u[1];
    assert!(input > 10, "input tokens counted: {input}");
    assert_eq!(u[2], 100);

    // Settled on node b from the upstream's JSON usage; a second report changes nothing.
    for _ in 0..2 {
        let r = reqwest::Client::new()
            .post(format!("{b}/v1/report"))
            .header("x-llm-ratelimit-reservation", &handle)
            .header("x-upstream-status", "200")
            .body(json!({"object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": input, "completion_tokens": 17, "total_tokens": input + 17}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["output_tokens"], 17);
        assert_eq!(used(&usage(&a, "team-a").await), [1, input, 17]);
    }

    // A stream without a usage chunk is counted from its text.
    let r = check(&b, Some(&auth), &chat(None).to_string()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        used(&usage(&a, "team-a").await)[2],
        17 + 64,
        "default reservation"
    );
    let sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}]}\n\ndata: [DONE]\n\n";
    let r = reqwest::Client::new()
        .post(format!("{a}/v1/report"))
        .header(
            "x-llm-ratelimit-reservation",
            header(&r, "x-llm-ratelimit-reservation"),
        )
        .body(sse)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["output_tokens"], 2);
    assert_eq!(used(&usage(&a, "team-a").await)[2], 17 + 2);

    // An upstream error with no usage releases the output reservation.
    let r = check(&a, Some(&auth), &chat(Some(500)).to_string()).await;
    assert_eq!(r.status(), 200);
    let r = reqwest::Client::new()
        .post(format!("{b}/v1/report"))
        .header(
            "x-llm-ratelimit-reservation",
            header(&r, "x-llm-ratelimit-reservation"),
        )
        .header("x-upstream-status", "500")
        .body(r#"{"error":{"message":"boom","type":"server_error"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["output_tokens"], 0);
    let before = usage(&a, "team-a").await;
    assert_eq!(used(&before), [3, 3 * input, 19]);

    // The fourth request is over rpm on either node: 429, OpenAI body, honest retry.
    let r = check(&b, Some(&auth), &chat(Some(10)).to_string()).await;
    assert_eq!(r.status(), 429);
    let retry_ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!(retry_ms > 59_000 && retry_ms <= 60_100, "{retry_ms}");
    assert_eq!(
        header(&r, "retry-after"),
        retry_ms.div_ceil(1000).to_string()
    );
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("Rate limit reached for team-a on requests: Limit 3, Used 3, Requested 1. Please try again in "), "{msg}");
    assert_eq!(
        used(&usage(&a, "team-a").await),
        used(&before),
        "a 429 counts nothing"
    );
}

#[tokio::test]
async fn bad_requests_are_answered_and_never_counted() {
    let base = node(config(100, 1_000, 1_000), Store::Memory(MemoryStore::new())).await;
    let auth = format!("Bearer {SECRET}");
    let ok = chat(Some(10)).to_string();

    let r = check(&base, None, &ok).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let r = check(&base, Some("Bearer sk-wrong"), &ok).await;
    assert_eq!(r.status(), 401);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("sk-wrong"),
        "the presented key is never echoed"
    );

    for (body, param) in [
        ("{not json", None),
        (r#"{"model":"gpt-4o"}"#, Some("messages")),
        (
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":-5}"#,
            Some("max_tokens"),
        ),
        (r#"{"model":"gpt-4o","messages":"hi"}"#, Some("messages")),
    ] {
        let r = check(&base, Some(&auth), body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}");
        }
    }
    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let r = check(&base, Some(&auth), &big.to_string()).await;
    assert_eq!(r.status(), 413);

    // A request larger than a limit can never fit: 429 with x-should-retry: false.
    let r = check(&base, Some(&auth), &chat(Some(5_000)).to_string()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-should-retry"), "false");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Request too large for team-a on output_tokens"));

    assert_eq!(used(&usage(&base, "team-a").await), [0, 0, 0]);

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("llm_ratelimit_rejections_total{reason=\"unauthorized\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("llm_ratelimit_rejections_total{reason=\"invalid_request\"} 4"));
    assert!(metrics.contains("llm_ratelimit_rejections_total{reason=\"body_too_large\"} 1"));
    assert!(metrics.contains("key=\"team-a\""));
    assert!(!metrics.contains(SECRET));

    let r = reqwest::Client::new()
        .post(format!("{base}/v1/report"))
        .header("x-llm-ratelimit-reservation", "nonsense")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        reqwest::get(format!("{base}/v1/usage/nobody"))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_store_that_is_down_gives_503_and_not_ready() {
    let redis = RedisServer::start();
    let store = redis_store(&redis).await;
    let base = node(config(100, 10_000, 10_000), store).await;
    drop(redis);
    let r = check(
        &base,
        Some(&format!("Bearer {SECRET}")),
        &chat(Some(10)).to_string(),
    )
    .await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Script calls Redis has answered so far (every store call is one).
fn script_calls(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with("cmdstat_eval") || l.starts_with("cmdstat_fcall"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_at_once_share_their_reading_of_the_windows() {
    // `/metrics` passes no gate, and each reading of the window gauges is one store call
    // per key: 32 scrapes at once on 40 keys were 1,280 store calls, one reading each.
    const KEYS: usize = 40;
    const SCRAPES: usize = 32;
    let mut yaml = String::from("keys:\n");
    for i in 0..KEYS {
        yaml.push_str(&format!(
            "  - name: k{i}\n    key: sk-scrape-{i}\n    rpm: 10\n    input_tpm: 1000\n    output_tpm: 1000\n"
        ));
    }
    let redis = RedisServer::start();
    let base = node(
        Config::parse(&yaml, "k.yaml").unwrap(),
        redis_store(&redis).await,
    )
    .await;
    let scrape = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // One scrape alone reads every key's windows (once Redis holds the scripts).
    let _ = scrape().await;
    let before = script_calls(&redis);
    let text = scrape().await;
    assert!(text
        .contains(r#"llm_ratelimit_window_limit{key="k39",limit="requests",scope="window"} 10"#));
    assert_eq!(script_calls(&redis) - before, KEYS as u64);
    // Many at once share: one reading in flight, the others take the next.
    let before = script_calls(&redis);
    let all = futures_util::future::join_all((0..SCRAPES).map(|_| scrape())).await;
    assert!(all.iter().all(|t| t.contains("llm_ratelimit_window_used")));
    let calls = script_calls(&redis) - before;
    assert!(
        calls <= (SCRAPES / 4 * KEYS) as u64,
        "{SCRAPES} scrapes at once made {calls} store calls"
    );
}

//! Admission rules that decide what is metered, through `/v1/check` on the in-process
//! store: where the key comes from (`Authorization: Bearer` or Azure's `api-key`), what a
//! request to a path the limiter cannot meter gets, how many output tokens a request
//! reserves, and that a large body is counted exactly like a small one.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use llm_ratelimit::admission::Limiter;
use llm_ratelimit::config::Config;
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::Store;
use llm_ratelimit::metrics::Metrics;
use llm_ratelimit::openai::{Endpoint, Tokenizer};
use serde_json::{json, Value};

const SECRET: &str = "sk-test-admission-secret";

fn config(extra: &str) -> Config {
    Config::parse(
        &format!(
            "window: 60s\nprecision: 100ms\ndefault_max_output_tokens: 64\n{extra}keys:\n  - name: team-a\n    key: {SECRET}\n    rpm: 1000\n    input_tpm: 10000000\n    output_tpm: 10000\n"
        ),
        "test.yaml",
    )
    .unwrap()
}

/// A node on the in-process store: the HTTP router on an ephemeral loopback port.
async fn node(config: Config) -> String {
    let limiter = Arc::new(Limiter::new(
        Arc::new(ArcSwap::from_pointee(config)),
        Store::Memory(MemoryStore::new()),
        Arc::new(Metrics::default()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, llm_ratelimit::http::router(limiter))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// `/v1/check` for a client request: method, path, headers, body.
async fn check(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/check"))
        .header("x-original-uri", path)
        .header("x-original-method", method)
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, body, headers)
}

async fn used(base: &str) -> [u64; 3] {
    let u: Value = reqwest::get(format!("{base}/v1/usage/team-a"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ["requests", "input_tokens", "output_tokens"].map(|k| u[k]["used"].as_u64().unwrap())
}

fn chat(content: &str, max_tokens: u64) -> String {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
        .to_string()
}

fn input_tokens(endpoint: Endpoint, body: &str) -> u64 {
    Tokenizer::new()
        .understand(endpoint, body.as_bytes())
        .unwrap()
        .input_tokens
}

const BEARER: (&str, &str) = ("authorization", "Bearer sk-test-admission-secret");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_comes_from_bearer_auth_or_azures_api_key_header() {
    let base = node(config("")).await;
    let body = chat("hello", 10);
    let (status, _, headers) = check(
        &base,
        "POST",
        "/v1/chat/completions",
        &[("api-key", SECRET)],
        &body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-llm-ratelimit-key"], "team-a");
    let (status, body401, _) = check(
        &base,
        "POST",
        "/v1/chat/completions",
        &[("api-key", "sk-wrong")],
        &body,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body401["error"]["code"], "invalid_api_key");
    assert!(!body401.to_string().contains("sk-wrong"));
    let (status, missing, _) = check(&base, "POST", "/v1/chat/completions", &[], &body).await;
    assert_eq!(status, 401);
    assert!(missing["error"]["message"]
        .as_str()
        .unwrap()
        .contains("didn't provide an API key"));
    // Only the admitted request counted.
    assert_eq!(
        used(&base).await,
        [
            1,
            input_tokens(Endpoint::ChatCompletions, &chat("hello", 10)),
            10
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_limiter_cannot_meter_is_refused_and_counts_nothing() {
    let base = node(config("")).await;
    for path in [
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v2/chat/completions",
        "/v1/responses/resp_1/cancel",
    ] {
        let (status, body, _) = check(&base, "POST", path, &[BEARER], r#"{"model":"x"}"#).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{path}");
        assert_eq!(body["error"]["code"], "unknown_url", "{path}");
    }
    // Any method that carries a body is work for the upstream too.
    let (status, _, _) = check(&base, "PUT", "/v1/files/f1", &[BEARER], "data").await;
    assert_eq!(status, 404);
    assert_eq!(used(&base).await, [0, 0, 0]);

    // A bodiless GET (list models, fetch a response) counts one request.
    let (status, _, _) = check(&base, "GET", "/v1/models", &[BEARER], "").await;
    assert_eq!(status, 200);
    let (status, _, _) = check(&base, "GET", "/v1/chat/completions", &[BEARER], "").await;
    assert_eq!(status, 200);
    assert_eq!(used(&base).await, [2, 0, 0]);
    // A GET that carries a body to a metered path is metered like the POST it resembles.
    let body = chat("hello there", 7);
    let (status, _, _) = check(&base, "GET", "/v1/chat/completions", &[BEARER], &body).await;
    assert_eq!(status, 200);
    assert_eq!(
        used(&base).await,
        [3, input_tokens(Endpoint::ChatCompletions, &body), 7]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoints_count_forwards_them_as_one_request() {
    let base = node(config("unknown_endpoints: count\n")).await;
    let (status, _, headers) = check(
        &base,
        "POST",
        "/v1/images/generations",
        &[BEARER],
        r#"{"prompt":"a cat"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-llm-ratelimit-key"], "team-a");
    assert!(headers.get("x-llm-ratelimit-reservation").is_none());
    assert_eq!(used(&base).await, [1, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_is_counted_exactly_like_a_small_one() {
    let base = node(config("max_body_bytes: 1048576\n")).await;
    // ~600 KiB of varied text: tokenized on a blocking thread.
    let text: String = (0..60_000).map(|i| format!("w{} ", i % 977)).collect();
    let body = chat(&text, 5);
    assert!(body.len() > 256 * 1024);
    let want = input_tokens(Endpoint::ChatCompletions, &body);
    let (status, _, _) = check(&base, "POST", "/v1/chat/completions", &[BEARER], &body).await;
    assert_eq!(status, 200);
    assert_eq!(used(&base).await, [1, want, 5]);
    // A bad large body is a 400 like a small one, and counts nothing.
    let bad = &body[..body.len() - 1]; // the closing brace cut off
    let (status, err, _) = check(&base, "POST", "/v1/chat/completions", &[BEARER], bad).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(used(&base).await, [1, want, 5]);
}

//! Admission rules that decide what is metered, through `/v1/check` on the in-process
//! store: where the key comes from (`Authorization: Bearer` or Azure's `api-key`), what a
//! request to a path the limiter cannot meter gets, how many output tokens a request
//! reserves, and that a large body is counted exactly like a small one.

mod common;

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
    common::http_node(config, Store::Memory(MemoryStore::new())).await
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
    common::used(&common::usage(base, "team-a").await)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_reserved_for_every_completion_asked_for() {
    let base = node(config("")).await;
    // n: 8 × max_tokens 100 = 800 of the key's 10,000 output tokens.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 8}).to_string();
    let (status, _, headers) = check(&base, "POST", "/v1/chat/completions", &[BEARER], &body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ratelimit-remaining-output-tokens"], "9200");
    // Completions: max(n, best_of) × prompts = 3 × 2 × 50 = 300; no max_tokens on chat
    // takes the default (64) × n.
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "n": 2, "best_of": 3, "max_tokens": 50}).to_string();
    let (status, _, _) = check(&base, "POST", "/v1/completions", &[BEARER], &body).await;
    assert_eq!(status, 200);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 2})
        .to_string();
    let (status, _, _) = check(&base, "POST", "/v1/chat/completions", &[BEARER], &body).await;
    assert_eq!(status, 200);
    assert_eq!(used(&base).await[2], 800 + 300 + 128);

    // A reservation that alone exceeds the limit can never fit: "Request too large", no retry.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "n": 11}).to_string();
    let (status, err, headers) =
        check(&base, "POST", "/v1/chat/completions", &[BEARER], &body).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(err["error"]["type"], "output_tokens");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Request too large"));

    // Bad counts are 400s that count nothing.
    for bad in [r#""n":0"#, r#""n":-1"#, r#""n":1.5"#, r#""n":"2""#] {
        let body =
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],{bad}}}"#);
        let (status, err, _) = check(&base, "POST", "/v1/chat/completions", &[BEARER], &body).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_eq!(err["error"]["param"], "n", "{bad}");
    }
    let body = json!({"model": "davinci-002", "prompt": "x", "n": 3, "best_of": 2}).to_string();
    let (status, err, _) = check(&base, "POST", "/v1/completions", &[BEARER], &body).await;
    assert_eq!(status, 400, "{err}");
    let body = json!({"model": "davinci-002", "prompt": ["x", 1]}).to_string();
    let (status, _, _) = check(&base, "POST", "/v1/completions", &[BEARER], &body).await;
    assert_eq!(status, 400);
    assert_eq!(used(&base).await[0], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_variants_and_azure_deployments_are_metered_as_the_upstream_routes_them() {
    let base = node(config(
        "azure_deployments:\n  prod-4o: gpt-4o\n  legacy: gpt-4\n",
    ))
    .await;
    let body = chat(
        "Расскажите о скользящих окнах: 日本語のテキスト、トークン数。",
        20,
    );
    let tokens = input_tokens(Endpoint::ChatCompletions, &body);
    let variants = [
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat/%63ompletions",
        "/V1/Chat/Completions",
        "/v1/chat/completions/",
        "/v1/chat/completions?stream=false",
        "/openai/v1/chat/completions",
    ];
    for (i, path) in variants.iter().enumerate() {
        let (status, err, _) = check(&base, "POST", path, &[BEARER], &body).await;
        assert_eq!(status, 200, "{path}: {err}");
        let n = i as u64 + 1;
        assert_eq!(used(&base).await, [n, n * tokens, n * 20], "{path}");
    }
    let before = used(&base).await;
    // An encoded slash would change which endpoint the path names: refused, not counted.
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1%2fchat/completions",
        "/v1/chat%5Ccompletions",
    ] {
        let (status, err, _) = check(&base, "POST", path, &[BEARER], &body).await;
        assert_eq!(status, 400, "{path}: {err}");
        assert!(
            !err.to_string().contains(path),
            "the path is not echoed: {err}"
        );
    }
    assert_eq!(used(&base).await, before);

    // Azure: key in api-key, no model in the body; the deployment's model picks the
    // tokenizer (gpt-4 → cl100k), an unmapped deployment is its own model name (o200k).
    let azure_body = json!({"messages": [{"role": "user", "content": "Расскажите о скользящих окнах: 日本語のテキスト、トークン数。"}], "max_tokens": 20}).to_string();
    let with_model = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "Расскажите о скользящих окнах: 日本語のテキスト、トークン数。"}], "max_tokens": 20}).to_string()
    };
    let cl100k = input_tokens(Endpoint::ChatCompletions, &with_model("gpt-4"));
    let o200k = input_tokens(Endpoint::ChatCompletions, &with_model("gpt-4o"));
    assert_ne!(cl100k, o200k, "the test needs the two encodings to differ");
    let azure = [
        (
            "/openai/deployments/legacy/chat/completions?api-version=2024-10-21",
            cl100k,
        ),
        (
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            o200k,
        ),
        (
            "/openai/deployments/unmapped-name/chat/completions?api-version=2024-10-21",
            o200k,
        ),
    ];
    for (path, tokens) in azure {
        let before = used(&base).await;
        let (status, err, _) =
            check(&base, "POST", path, &[("api-key", SECRET)], &azure_body).await;
        assert_eq!(status, 200, "{path}: {err}");
        let after = used(&base).await;
        assert_eq!(after[0] - before[0], 1, "{path}");
        assert_eq!(after[1] - before[1], tokens, "{path}");
        assert_eq!(after[2] - before[2], 20, "{path}");
    }
    // Azure embeddings: input only.
    let before = used(&base).await;
    let (status, _, _) = check(
        &base,
        "POST",
        "/openai/deployments/prod-4o/embeddings?api-version=2024-10-21",
        &[("api-key", SECRET)],
        r#"{"input":"The food was delicious and the waiter..."}"#,
    )
    .await;
    assert_eq!(status, 200);
    let after = used(&base).await;
    assert_eq!([after[0] - before[0], after[2] - before[2]], [1, 0]);
    assert!(after[1] > before[1]);
    // A deployment path without a deployment is refused, not let through uncounted.
    let (status, _, _) = check(
        &base,
        "POST",
        "/openai/deployments/completions",
        &[("api-key", SECRET)],
        &azure_body,
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_frees_the_state_of_keys_no_longer_configured() {
    let with_key = config("");
    let without_key = Config::parse("keys: []\n", "empty.yaml").unwrap();
    let current = Arc::new(ArcSwap::from_pointee(with_key.clone()));
    let limiter = Limiter::new(
        current.clone(),
        Store::Memory(MemoryStore::new()),
        Arc::new(Metrics::default()),
    );
    let admit = || async {
        let body = chat("hello", 10);
        limiter
            .check(llm_ratelimit::admission::ClientRequest {
                method: "POST",
                authorization: Some("Bearer sk-test-admission-secret"),
                api_key: None,
                path: "/v1/chat/completions",
                body: body.as_bytes(),
            })
            .await
    };
    let requests = |u: Value| u["requests"]["used"].as_u64().unwrap();
    assert!(admit().await.admitted.is_some());
    assert_eq!(requests(limiter.usage("team-a").await.unwrap()), 1);

    // A reload without the key frees its ring; the key coming back starts afresh. (A
    // reload that only re-applies the same keys keeps their windows.)
    limiter.forget_unconfigured();
    assert_eq!(requests(limiter.usage("team-a").await.unwrap()), 1);
    current.store(Arc::new(without_key));
    limiter.forget_unconfigured();
    current.store(Arc::new(with_key.clone()));
    assert_eq!(requests(limiter.usage("team-a").await.unwrap()), 0);

    // A changed window is a new shape: the old shape's ring is freed the same way.
    assert!(admit().await.admitted.is_some());
    let longer = Config::parse(
        &format!("window: 120s\nkeys:\n  - name: team-a\n    key: {SECRET}\n    rpm: 1000\n    input_tpm: 10000000\n    output_tpm: 10000\n"),
        "longer.yaml",
    )
    .unwrap();
    current.store(Arc::new(longer));
    limiter.forget_unconfigured();
    current.store(Arc::new(with_key));
    assert_eq!(requests(limiter.usage("team-a").await.unwrap()), 0);
}

//! Request shapes that must not escape their limits, through `/v1/check` on the in-process
//! store: a client holding a valid key sends something the upstream acts on, and the
//! limiter must meter at least what the upstream uses — the model it routes to, the
//! output it may generate — or refuse the request and count nothing.

mod common;

use llm_ratelimit::config::Config;
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::Store;
use serde_json::{json, Value};

const SECRET: &str = "sk-test-shapes-secret";

/// One key with a `gpt-4o` models entry of one request per window, and Azure deployments
/// that serve gpt-4o (`prod-4o`) and gpt-4 (`legacy`, another encoding).
async fn node() -> String {
    let config = Config::parse(
        &format!(
            "window: 60s\nprecision: 100ms\ndefault_max_output_tokens: 64\n\
             azure_deployments:\n  prod-4o: gpt-4o\n  legacy: gpt-4\n\
             keys:\n  - name: team-a\n    key: {SECRET}\n    rpm: 1000\n    input_tpm: 10000000\n    output_tpm: 100000\n\
             \x20   models:\n      - match: gpt-4o\n        rpm: 1\n      - match: gpt-4\n        rpm: 1000\n"
        ),
        "test.yaml",
    )
    .unwrap();
    common::http_node(config, Store::Memory(MemoryStore::new())).await
}

/// `/v1/check` for a POST to `path` with the key in `api-key`: status and body.
async fn check(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/check"))
        .header("x-original-uri", path)
        .header("api-key", SECRET)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The key's usage: `[requests, input_tokens, output_tokens]` of its own limits and of
/// its `models` entry `match`.
async fn used(base: &str, entry: &str) -> ([u64; 3], [u64; 3]) {
    let u: Value = reqwest::get(format!("{base}/v1/usage/team-a"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let three = |v: &Value| {
        ["requests", "input_tokens", "output_tokens"].map(|k| v[k]["used"].as_u64().unwrap())
    };
    let model = u["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["match"] == entry)
        .unwrap_or_else(|| panic!("no models entry {entry}: {u}"));
    (three(&u), three(model))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_named_in_the_body_or_in_another_case_is_metered_as_its_model() {
    let base = node().await;
    let text = "Расскажите о скользящих окнах: 日本語のテキスト、トークン数。";
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5});
    // Azure's v1 API: the deployment is the body's `model`. The first takes the gpt-4o
    // entry's one request; every other spelling of that deployment is then refused.
    let (status, err) = check(&base, "/openai/v1/chat/completions", &chat("prod-4o")).await;
    assert_eq!(status, 200, "{err}");
    let (_, model) = used(&base, "gpt-4o").await;
    assert_eq!(model[0], 1);
    let escapes = [
        ("/openai/v1/chat/completions", chat("prod-4o")),
        ("/openai/v1/chat/completions", chat("PROD-4O")),
        ("/v1/chat/completions", chat("GPT-4o")),
        (
            "/openai/responses?api-version=2025-04-01-preview",
            json!({"model": "prod-4o", "input": text}),
        ),
        (
            "/openai/deployments/Prod-4O/chat/completions?api-version=2024-10-21",
            json!({"messages": [{"role": "user", "content": text}]}),
        ),
    ];
    for (path, body) in escapes {
        let (status, err) = check(&base, path, &body).await;
        assert_eq!(status, 429, "{path} {body}: {err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("(model gpt-4o)"),
            "{err}"
        );
    }
    let (key, model) = used(&base, "gpt-4o").await;
    assert_eq!((key[0], model[0]), (1, 1), "denials count nothing");

    // A deployment of another encoding is counted with its model's tokenizer.
    let legacy = chat("legacy");
    let (status, err) = check(&base, "/openai/v1/chat/completions", &legacy).await;
    assert_eq!(status, 200, "{err}");
    let (_, gpt4) = used(&base, "gpt-4").await;
    let tokens = llm_ratelimit::openai::Tokenizer::new()
        .understand(
            llm_ratelimit::openai::Endpoint::ChatCompletions,
            chat("gpt-4").to_string().as_bytes(),
        )
        .unwrap()
        .input_tokens;
    assert_eq!(gpt4, [1, tokens, 5]);
}

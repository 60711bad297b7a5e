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
    let u = common::usage(base, "team-a").await;
    let model = u["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["match"] == entry)
        .unwrap_or_else(|| panic!("no models entry {entry}: {u}"));
    (common::used(&u), common::used(model))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_named_in_the_body_is_metered_as_its_model() {
    let base = node().await;
    let text = "Расскажите о скользящих окнах: 日本語のテキスト、トークン数。";
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5});
    // Azure's v1 API: the deployment is the body's `model`. The first takes the gpt-4o
    // entry's one request; every other way of naming that deployment is then refused.
    let (status, err) = check(&base, "/openai/v1/chat/completions", &chat("prod-4o")).await;
    assert_eq!(status, 200, "{err}");
    let (_, model) = used(&base, "gpt-4o").await;
    assert_eq!(model[0], 1);
    let escapes = [
        ("/openai/v1/chat/completions", chat("prod-4o")),
        (
            "/openai/responses?api-version=2025-04-01-preview",
            json!({"model": "prod-4o", "input": text}),
        ),
        (
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
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

type Headers<'a> = &'a [(&'a str, &'a str)];

/// `/v1/check` for a POST to chat with the key in `api-key`, the body as raw bytes and
/// extra headers: the status.
async fn check_raw(base: &str, headers: Headers<'_>, body: Vec<u8>) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/check"))
        .header("x-original-uri", "/v1/chat/completions")
        .header("api-key", SECRET)
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_an_upstream_may_read_differently_are_refused_or_read_as_it_reads_them() {
    let base = node().await;
    let chat = r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    // Bytes a lenient upstream might still decode to a request (Python's json.loads
    // takes a UTF-8 BOM and UTF-16; a server may inflate a gzip body): the limiter cannot
    // count them, so it refuses them, counting nothing.
    let mut bom = "\u{feff}".as_bytes().to_vec();
    bom.extend_from_slice(chat.as_bytes());
    let utf16: Vec<u8> = chat.encode_utf16().flat_map(u16::to_le_bytes).collect();
    // A gzip member's header and a stored (uncompressed) deflate block of the body: what
    // `Content-Encoding: gzip` sends (the trailer's checksum is never read).
    let mut gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    let len = chat.len() as u16;
    gzip.extend_from_slice(&len.to_le_bytes());
    gzip.extend_from_slice(&(!len).to_le_bytes());
    gzip.extend_from_slice(chat.as_bytes());
    gzip.extend_from_slice(&[0; 8]);
    let nan = chat.replace(r#""max_tokens":5"#, r#""max_tokens":5,"temperature":NaN"#);
    let refused: [(&str, Headers, Vec<u8>); 4] = [
        ("utf-8 bom", &[], bom),
        (
            "utf-16",
            &[("content-type", "application/json; charset=utf-16")],
            utf16,
        ),
        ("gzip", &[("content-encoding", "gzip")], gzip),
        ("NaN", &[], nan.into_bytes()),
    ];
    for (what, headers, body) in refused {
        assert_eq!(check_raw(&base, headers, body).await, 400, "{what}");
    }
    let (key, _) = used(&base, "gpt-4").await;
    assert_eq!(key, [0, 0, 0], "refusals count nothing");

    // Duplicate keys: Python, Go, JavaScript and nlohmann::json keep the last, and so
    // does the limiter (model, messages, budgets alike).
    let duplicated = r#"{"model":"gpt-4o","model":"gpt-4","messages":[{"role":"user","content":"x"}],
        "messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_tokens":4000,"n":1,"n":3}"#;
    assert_eq!(
        check_raw(&base, &[], duplicated.as_bytes().to_vec()).await,
        200
    );
    let input = llm_ratelimit::openai::Tokenizer::new()
        .understand(
            llm_ratelimit::openai::Endpoint::ChatCompletions,
            chat.as_bytes(),
        )
        .unwrap()
        .input_tokens;
    let (_, gpt4) = used(&base, "gpt-4").await;
    assert_eq!(gpt4, [1, input, 4000 * 3]);
}

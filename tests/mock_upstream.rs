//! The mock upstream end to end, over HTTP on an ephemeral port: its usage agrees with the
//! limiter's own counting (prompt tokens at admission, output tokens at settlement), and
//! its bodies and streams have OpenAI's shapes.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llm_ratelimit::mock::{router, Options, DEFAULT_MAX_OUTPUT_TOKENS};
use llm_ratelimit::openai::{Endpoint, OutputMeter, OutputSource, Tokenizer};
use serde_json::{json, Value};

fn tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    Arc::clone(TOKENIZER.get_or_init(|| Arc::new(Tokenizer::new())))
}

/// Starts the mock on a loopback port; returns its base URL.
async fn mock(options: Options) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let app = router(tokenizer(), options);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

struct Answer {
    status: u16,
    content_type: String,
    text: String,
}

async fn post(base: &str, path: &str, body: &Value) -> Answer {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Answer {
        status,
        content_type,
        text: response.text().await.unwrap(),
    }
}

/// What the limiter charges at admission for this body.
fn input_tokens(endpoint: Endpoint, body: &Value) -> u64 {
    tokenizer()
        .understand(endpoint, body.to_string().as_bytes())
        .unwrap()
        .input_tokens
}

/// What the limiter settles from this response body.
fn settled(endpoint: Endpoint, model: &str, text: &str) -> (u64, OutputSource) {
    let mut meter = OutputMeter::new(endpoint, model);
    let tokenizer = tokenizer();
    // Odd chunk sizes, as a proxy would deliver them.
    for piece in text.as_bytes().chunks(7) {
        meter.feed(piece, &tokenizer);
    }
    let count = meter.finish(&tokenizer).unwrap();
    (count.tokens, count.source)
}

/// `data:` payloads of an SSE body, with the `event:` name before each, if any.
fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    assert!(text.ends_with("\n\n"), "events end with a blank line");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let mut name = None;
            let mut data = None;
            for line in event.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(d.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (name, data.expect("every event has data"))
        })
        .collect()
}

fn chat_body(model: &str, content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content}
        ]
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn chat_usage_matches_the_limiters_counts() {
    let base = mock(Options::default()).await;
    let cases = [
        chat_body("gpt-4o", "Hello there", json!({})),
        chat_body(
            "gpt-4",
            "Hello there, in the cl100k family",
            json!({"max_tokens": 20}),
        ),
        chat_body(
            "gpt-4o-mini",
            "x",
            json!({"max_tokens": 100, "max_completion_tokens": 3}),
        ),
        chat_body(
            "gpt-4o",
            "nothing at all",
            json!({"max_completion_tokens": 0}),
        ),
        chat_body(
            "gpt-4o",
            "with a tool",
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]}),
        ),
    ];
    for body in cases {
        let answer = post(&base, "/v1/chat/completions", &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.content_type, "application/json");
        let v: Value = serde_json::from_str(&answer.text).unwrap();
        let model = body["model"].as_str().unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model);
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        let content = choice["message"]["content"].as_str().unwrap();

        let usage = &v["usage"];
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert_eq!(prompt, input_tokens(Endpoint::ChatCompletions, &body));
        assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
        let max = body["max_completion_tokens"]
            .as_u64()
            .or(body["max_tokens"].as_u64())
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        assert!(completion <= max);
        assert_eq!(
            completion,
            (16 + prompt % 48).min(max),
            "the documented rule"
        );
        assert_eq!(tokenizer().count_text(model, content), completion);
        let finish = if max < 16 + prompt % 48 {
            "length"
        } else {
            "stop"
        };
        assert_eq!(choice["finish_reason"], finish);
        assert_eq!(
            settled(Endpoint::ChatCompletions, model, &answer.text),
            (completion, OutputSource::Usage)
        );
    }
}

#[tokio::test]
async fn chat_stream_has_openais_shape_and_its_text_counts_to_the_usage() {
    let base = mock(Options::default()).await;
    for model in ["gpt-4o", "gpt-3.5-turbo"] {
        let plain = chat_body(model, "Stream me something", json!({"max_tokens": 30}));
        let (expected, finish_reason) = {
            let v: Value =
                serde_json::from_str(&post(&base, "/v1/chat/completions", &plain).await.text)
                    .unwrap();
            let n = v["usage"]["completion_tokens"].as_u64().unwrap();
            (n, v["choices"][0]["finish_reason"].clone())
        };
        for include_usage in [None, Some(false), Some(true)] {
            let mut body = plain.clone();
            body["stream"] = json!(true);
            if let Some(include) = include_usage {
                body["stream_options"] = json!({"include_usage": include});
            }
            let answer = post(&base, "/v1/chat/completions", &body).await;
            assert_eq!(answer.status, 200);
            assert!(answer.content_type.starts_with("text/event-stream"));
            let events = sse_events(&answer.text);
            let (last, chunks) = events.split_last().unwrap();
            assert_eq!(last, &(None, "[DONE]".to_owned()));
            let chunks: Vec<Value> = chunks
                .iter()
                .map(|(name, data)| {
                    assert_eq!(name, &None);
                    serde_json::from_str(data).unwrap()
                })
                .collect();
            let wants_usage = include_usage == Some(true);
            let (usage_chunk, chunks) = if wants_usage {
                let (usage, rest) = chunks.split_last().unwrap();
                (Some(usage), rest)
            } else {
                (None, &chunks[..])
            };
            let id = &chunks[0]["id"];
            for chunk in chunks.iter().chain(usage_chunk) {
                assert_eq!(chunk["object"], "chat.completion.chunk");
                assert_eq!(chunk["model"], model);
                assert_eq!(&chunk["id"], id);
                // `usage: null` on every chunk with include_usage, no field at all without.
                assert_eq!(chunk.get("usage").is_some(), wants_usage);
            }
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let (end, body_chunks) = chunks.split_last().unwrap();
            assert_eq!(end["choices"][0]["finish_reason"], finish_reason);
            assert_eq!(end["choices"][0]["delta"], json!({}));
            let mut text = String::new();
            for chunk in body_chunks {
                assert!(chunk["choices"][0]["finish_reason"].is_null());
                assert!(chunk["usage"].is_null());
                text += chunk["choices"][0]["delta"]["content"].as_str().unwrap();
            }
            assert_eq!(tokenizer().count_text(model, &text), expected);
            match usage_chunk {
                Some(usage_chunk) => {
                    assert_eq!(usage_chunk["choices"], json!([]));
                    let usage = &usage_chunk["usage"];
                    assert_eq!(usage["completion_tokens"].as_u64().unwrap(), expected);
                    assert_eq!(
                        usage["prompt_tokens"].as_u64().unwrap(),
                        input_tokens(Endpoint::ChatCompletions, &body)
                    );
                    assert_eq!(
                        settled(Endpoint::ChatCompletions, model, &answer.text),
                        (expected, OutputSource::Usage)
                    );
                }
                None => assert_eq!(
                    settled(Endpoint::ChatCompletions, model, &answer.text),
                    (expected, OutputSource::CountedStream)
                ),
            }
        }
    }
}

#[tokio::test]
async fn completions_answer_in_json_and_in_a_stream() {
    let base = mock(Options::default()).await;
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["Say this is a test", "and again"], "max_tokens": 7});
    let answer = post(&base, "/v1/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let v: Value = serde_json::from_str(&answer.text).unwrap();
    assert_eq!(v["object"], "text_completion");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(prompt, input_tokens(Endpoint::Completions, &body));
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion <= 7);
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        tokenizer().count_text("gpt-3.5-turbo-instruct", text),
        completion
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let answer = post(&base, "/v1/completions", &streamed).await;
    assert!(answer.content_type.starts_with("text/event-stream"));
    let events = sse_events(&answer.text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["completion_tokens"].as_u64().unwrap(),
        completion
    );
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed_text, text);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    streamed["stream_options"] = json!({"include_usage": false});
    let answer = post(&base, "/v1/completions", &streamed).await;
    assert!(!answer.text.contains("\"usage\""));
    assert_eq!(
        settled(
            Endpoint::Completions,
            "gpt-3.5-turbo-instruct",
            &answer.text
        ),
        (completion, OutputSource::CountedStream)
    );
}

#[tokio::test]
async fn responses_answer_in_json_and_in_a_stream() {
    let base = mock(Options::default()).await;
    let body = json!({"model": "gpt-4.1", "instructions": "Be brief.", "input": "Describe a rate limiter"});
    let answer = post(&base, "/v1/responses", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let v: Value = serde_json::from_str(&answer.text).unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["type"], "message");
    let content = &v["output"][0]["content"][0];
    assert_eq!(content["type"], "output_text");
    let usage = &v["usage"];
    let input = usage["input_tokens"].as_u64().unwrap();
    let output = usage["output_tokens"].as_u64().unwrap();
    assert_eq!(input, input_tokens(Endpoint::Responses, &body));
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), input + output);
    assert_eq!(
        tokenizer().count_text("gpt-4.1", content["text"].as_str().unwrap()),
        output
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let answer = post(&base, "/v1/responses", &streamed).await;
    assert!(answer.content_type.starts_with("text/event-stream"));
    let events = sse_events(&answer.text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(names[0], "response.created");
    assert_eq!(names[names.len() - 1], "response.completed");
    assert!(names[1..names.len() - 1]
        .iter()
        .all(|n| *n == "response.output_text.delta"));
    let mut text = String::new();
    for (name, data) in &events {
        let event: Value = serde_json::from_str(data).unwrap();
        assert_eq!(event["type"], name.as_deref().unwrap());
        if let Some(delta) = event["delta"].as_str() {
            text += delta;
        }
    }
    assert_eq!(tokenizer().count_text("gpt-4.1", &text), output);
    let completed: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(completed["response"]["usage"], *usage);
    assert_eq!(
        settled(Endpoint::Responses, "gpt-4.1", &answer.text),
        (output, OutputSource::Usage)
    );

    // Cut short by max_output_tokens: OpenAI's "incomplete", in JSON and in the stream.
    streamed["max_output_tokens"] = json!(2);
    let answer = post(&base, "/v1/responses", &streamed).await;
    let events = sse_events(&answer.text);
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("response.incomplete"));
    let last: Value = serde_json::from_str(data).unwrap();
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(last["response"]["usage"]["output_tokens"], 2);
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

#[tokio::test]
async fn embeddings_give_one_vector_per_input_and_no_completion() {
    let base = mock(Options::default()).await;
    let cases = [
        (json!("The food was delicious and the waiter..."), 1),
        (json!(["one", "two", "three"]), 3),
        (json!([1, 2, 3]), 1),
        (json!([[1, 2], [3]]), 2),
    ];
    for (input, vectors) in cases {
        let body = json!({"model": "text-embedding-3-small", "input": input});
        let answer = post(&base, "/v1/embeddings", &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let v: Value = serde_json::from_str(&answer.text).unwrap();
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), vectors, "{input}");
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            assert!(!item["embedding"].as_array().unwrap().is_empty());
        }
        let prompt = input_tokens(Endpoint::Embeddings, &body);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": prompt, "total_tokens": prompt})
        );
    }
}

#[tokio::test]
async fn models_are_listed() {
    let base = mock(Options::default()).await;
    let v: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"gpt-4o") && ids.contains(&"gpt-4"));
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn invalid_requests_get_openais_400() {
    let base = mock(Options::default()).await;
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ] {
        let response = reqwest::Client::new()
            .post(format!("{base}{path}"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let v: Value = response.json().await.unwrap();
        let error = &v["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["message"]
            .as_str()
            .unwrap()
            .starts_with("We could not parse the JSON body"));
        assert!(error["param"].is_null() && error["code"].is_null());
        assert!(error.as_object().unwrap().contains_key("param"));
    }
    // A valid JSON body that is not a valid request names the field at fault.
    let answer = post(&base, "/v1/chat/completions", &json!({"model": "gpt-4o"})).await;
    assert_eq!(answer.status, 400);
    let v: Value = serde_json::from_str(&answer.text).unwrap();
    assert_eq!(v["error"]["param"], "messages");
    let answer = post(
        &base,
        "/v1/chat/completions",
        &chat_body(
            "gpt-4o",
            "hi",
            json!({"stream": true, "stream_options": {"include_usage": "yes"}}),
        ),
    )
    .await;
    assert_eq!(answer.status, 400);
    // Unknown paths: OpenAI's 404.
    let response = reqwest::get(format!("{base}/v1/nothing")).await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn latency_and_stream_interval_pace_the_answer() {
    let base = mock(Options {
        latency: Duration::from_millis(150),
        stream_interval: Duration::from_millis(20),
    })
    .await;
    let body = chat_body("gpt-4o", "hi", json!({"max_tokens": 4, "stream": true}));
    let start = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let headers_after = start.elapsed();
    let text = response.text().await.unwrap();
    let total = start.elapsed();
    assert!(
        headers_after >= Duration::from_millis(150),
        "{headers_after:?}"
    );
    // role chunk, 4 tokens, finish chunk, [DONE]: 7 events, 6 pauses.
    assert_eq!(sse_events(&text).len(), 7);
    assert!(
        total >= Duration::from_millis(150 + 6 * 20),
        "{total:?} for a paced stream"
    );
}

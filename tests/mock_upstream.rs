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
    // Two prompts: one choice each, usage summed over both.
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 2);
    let counted: Vec<u64> = texts
        .iter()
        .map(|t| tokenizer().count_text("gpt-3.5-turbo-instruct", t))
        .collect();
    assert!(counted.iter().all(|&c| c <= 7));
    assert_eq!(counted.iter().sum::<u64>(), completion);

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
    assert_eq!(streamed_texts(&chunks, "text"), texts);
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert_eq!(finishes, [&json!("length"), &json!("length")]);

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

/// The text of each choice of a stream, by `index`: chunks carry one choice each and the
/// choices interleave. `field` is `text` (completions) or `content` (chat deltas).
fn streamed_texts(chunks: &[Value], field: &str) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().unwrap() as usize;
            let piece = choice
                .get(field)
                .or_else(|| choice["delta"].get(field))
                .and_then(Value::as_str)
                .unwrap_or_default();
            if texts.len() <= index {
                texts.resize(index + 1, String::new());
            }
            texts[index] += piece;
        }
    }
    texts
}

/// The mock's documented rule for generation `g` of a request with `prompt` tokens.
fn rule(prompt: u64, max: u64, g: u64) -> u64 {
    (16 + (prompt + g) % 48).min(max)
}

#[tokio::test]
async fn chat_n_gives_n_choices_and_summed_usage() {
    let base = mock(Options::default()).await;
    let body = chat_body(
        "gpt-4o",
        "Three ways to say hello",
        json!({"n": 3, "max_tokens": 40}),
    );
    let prompt = input_tokens(Endpoint::ChatCompletions, &body);
    let want: Vec<u64> = (0..3).map(|g| rule(prompt, 40, g)).collect();
    let total: u64 = want.iter().sum();
    assert!(
        want[0] != want[1],
        "choices differ, so a sum is not n × one"
    );

    let answer = post(&base, "/v1/chat/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let v: Value = serde_json::from_str(&answer.text).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let text = choice["message"]["content"].as_str().unwrap();
        assert_eq!(
            tokenizer().count_text("gpt-4o", text),
            want[i],
            "choice {i}"
        );
    }
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], total);
    assert_eq!(v["usage"]["total_tokens"], prompt + total);
    assert_eq!(
        settled(Endpoint::ChatCompletions, "gpt-4o", &answer.text),
        (total, OutputSource::Usage)
    );

    for include_usage in [true, false] {
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": include_usage});
        let answer = post(&base, "/v1/chat/completions", &streamed).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let events = sse_events(&answer.text);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(_, d)| serde_json::from_str(d).unwrap())
            .collect();
        // Every choice gets its role chunk and its finish chunk.
        for i in 0..3 {
            let of_choice: Vec<&Value> = chunks
                .iter()
                .filter(|c| c["choices"][0]["index"] == i)
                .collect();
            assert_eq!(of_choice[0]["choices"][0]["delta"]["role"], "assistant");
            assert!(!of_choice.last().unwrap()["choices"][0]["finish_reason"].is_null());
        }
        let texts = streamed_texts(&chunks, "content");
        let counted: Vec<u64> = texts
            .iter()
            .map(|t| tokenizer().count_text("gpt-4o", t))
            .collect();
        assert_eq!(counted, want);
        let settles = settled(Endpoint::ChatCompletions, "gpt-4o", &answer.text);
        if include_usage {
            let usage = &chunks.last().unwrap()["usage"];
            assert_eq!(usage["completion_tokens"], total);
            assert_eq!(settles, (total, OutputSource::Usage));
        } else {
            assert_eq!(settles, (total, OutputSource::CountedStream));
        }
    }
}

#[tokio::test]
async fn completions_bill_every_candidate_of_every_prompt() {
    let base = mock(Options::default()).await;
    let model = "gpt-3.5-turbo-instruct";
    // 2 prompts × best_of 3: 6 generations billed, 1 returned per prompt.
    let body = json!({"model": model, "prompt": ["Say this is a test", "and again"], "best_of": 3, "max_tokens": 30});
    let prompt = input_tokens(Endpoint::Completions, &body);
    let answer = post(&base, "/v1/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let v: Value = serde_json::from_str(&answer.text).unwrap();
    let total: u64 = (0..6).map(|g| rule(prompt, 30, g)).sum();
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], total);
    let choices = v["choices"].as_array().unwrap();
    let counted: Vec<(u64, u64)> = choices
        .iter()
        .map(|c| {
            let text = c["text"].as_str().unwrap();
            (
                c["index"].as_u64().unwrap(),
                tokenizer().count_text(model, text),
            )
        })
        .collect();
    // Choice p is prompt p's first candidate: generation 3p.
    assert_eq!(
        counted,
        [(0, rule(prompt, 30, 0)), (1, rule(prompt, 30, 3))]
    );
    assert_eq!(
        settled(Endpoint::Completions, model, &answer.text),
        (total, OutputSource::Usage)
    );

    // n 2 of best_of 3: choices 2p and 2p + 1 are generations 3p and 3p + 1.
    let mut two = body.clone();
    two["n"] = json!(2);
    let v: Value = serde_json::from_str(&post(&base, "/v1/completions", &two).await.text).unwrap();
    let lengths: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| tokenizer().count_text(model, c["text"].as_str().unwrap()))
        .collect();
    let want: Vec<u64> = [0, 1, 3, 4].iter().map(|&g| rule(prompt, 30, g)).collect();
    assert_eq!(lengths, want);
    assert_eq!(v["usage"]["completion_tokens"], total);

    // best_of cannot be streamed (OpenAI's rule; the hidden candidates would escape a
    // settlement that counts the streamed text).
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let answer = post(&base, "/v1/completions", &streamed).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    let v: Value = serde_json::from_str(&answer.text).unwrap();
    assert_eq!(v["error"]["param"], "best_of");
    // An empty prompt list asks for nothing: refused.
    let answer = post(
        &base,
        "/v1/completions",
        &json!({"model": model, "prompt": []}),
    )
    .await;
    assert_eq!(answer.status, 400);
}

/// Sends one HTTP/1.1 request exactly as written (reqwest would normalise the path first)
/// and returns the status and body.
async fn raw(base: &str, method: &str, target: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://").to_owned();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn path_variants_are_routed_as_the_endpoint_they_mean() {
    let base = mock(Options::default()).await;
    let body = chat_body("gpt-4o", "routed", json!({"max_tokens": 5}));
    let want = input_tokens(Endpoint::ChatCompletions, &body);
    for target in [
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat/%63ompletions",
        "/V1/Chat/Completions/",
        "/openai/v1/chat/completions?api-version=1",
    ] {
        let (status, text) = raw(&base, "POST", target, &body.to_string()).await;
        assert_eq!(status, 200, "{target}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion", "{target}");
        assert_eq!(v["usage"]["prompt_tokens"], want, "{target}");
    }

    // Azure: the deployment names the model; the body needs none.
    let mut azure = body.clone();
    azure.as_object_mut().unwrap().remove("model");
    let (status, text) = raw(
        &base,
        "POST",
        "/openai/deployments/gpt-4/chat/completions?api-version=2024-10-21",
        &azure.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["model"], "gpt-4");
    let as_gpt4 = tokenizer()
        .understand_with(
            Endpoint::ChatCompletions,
            azure.to_string().as_bytes(),
            Some("gpt-4"),
        )
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], as_gpt4.input_tokens);
    let (status, text) = raw(
        &base,
        "POST",
        "/openai/deployments/emb/embeddings?api-version=2024-10-21",
        r#"{"input":"hello"}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");

    // What the proxies refuse, the mock refuses too.
    let (status, text) = raw(&base, "POST", "/v1/chat%2Fcompletions", &body.to_string()).await;
    assert_eq!(status, 400, "{text}");
    let (status, _) = raw(&base, "POST", "/openai/deployments/completions", "{}").await;
    assert_eq!(status, 400);
    // Sub-resources are not the endpoint.
    let (status, _) = raw(&base, "POST", "/v1/chat/completions/..", &body.to_string()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn any_path_answers_every_other_request() {
    let strict = mock(Options::default()).await;
    let any = mock(Options {
        any_path: true,
        ..Options::default()
    })
    .await;
    for (method, target) in [
        ("POST", "/v1/nothing"),
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/responses/resp_1"),
        ("PUT", "/"),
    ] {
        let (status, _) = raw(&strict, method, target, "").await;
        assert_eq!(status, 404, "{method} {target}");
        let (status, text) = raw(&any, method, target, "").await;
        assert_eq!(status, 200, "{method} {target}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, json!({"object": "mock.any", "path": target}));
    }
    // What it serves, it still serves as before.
    let answer = post(
        &any,
        "/v1/chat/completions",
        &chat_body("gpt-4o", "hi", json!({})),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(answer.text.contains("chat.completion"));
    let (status, text) = raw(&any, "GET", "/v1/models", "").await;
    assert_eq!(status, 200);
    assert!(text.contains("\"list\""));
}

#[tokio::test]
async fn received_totals_count_every_answered_request() {
    let base = mock(Options {
        any_path: true,
        ..Options::default()
    })
    .await;
    let totals = || async {
        reqwest::get(format!("{base}/mock/received"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(
        totals().await,
        json!({"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
    );
    let chat = chat_body("gpt-4o", "count me", json!({"n": 2, "max_tokens": 20}));
    let v: Value =
        serde_json::from_str(&post(&base, "/v1/chat/completions", &chat).await.text).unwrap();
    let chat_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let chat_completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    let embed = json!({"model": "text-embedding-3-small", "input": ["a b", "c"]});
    let embed_prompt = input_tokens(Endpoint::Embeddings, &embed);
    assert_eq!(post(&base, "/v1/embeddings", &embed).await.status, 200);
    // A streamed chat with its usage in the last chunk.
    let streamed = chat_body(
        "gpt-4o",
        "stream me",
        json!({"stream": true, "max_tokens": 3}),
    );
    let stream_prompt = input_tokens(Endpoint::ChatCompletions, &streamed);
    assert_eq!(
        post(&base, "/v1/chat/completions", &streamed).await.status,
        200
    );
    // Errors, other paths and the models list count as requests with no tokens.
    assert_eq!(
        post(&base, "/v1/chat/completions", &json!({})).await.status,
        400
    );
    assert_eq!(
        raw(&base, "POST", "/v1/chat%2Fcompletions", "{}").await.0,
        400
    );
    assert_eq!(raw(&base, "GET", "/v1/models", "").await.0, 200);
    assert_eq!(raw(&base, "PATCH", "/anything", "").await.0, 200);
    // Counted, though under /mock/: answered as an endpoint.
    let sneaky = chat_body("gpt-4o", "sneaky", json!({"max_tokens": 2}));
    let sneaky_prompt = input_tokens(Endpoint::ChatCompletions, &sneaky);
    let (status, _) = raw(
        &base,
        "POST",
        "/mock/../v1/chat/completions",
        &sneaky.to_string(),
    )
    .await;
    assert_eq!(status, 200);
    // Not counted: the mock's own endpoints.
    assert_eq!(raw(&base, "GET", "/healthz", "").await.0, 200);
    assert_eq!(raw(&base, "GET", "/mock/other", "").await.0, 200);
    totals().await;
    assert_eq!(
        totals().await,
        json!({
            "requests": 8,
            "prompt_tokens": chat_prompt + embed_prompt + stream_prompt + sneaky_prompt,
            "completion_tokens": chat_completion + 3 + 2,
        })
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
        ..Options::default()
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

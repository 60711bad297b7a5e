//! Understanding OpenAI-compatible traffic: which endpoint a request is for, what model it
//! names, how many input tokens it carries and how many output tokens it may produce
//! (admission), and how many output tokens the upstream really produced (reconcile).
//!
//! - [`Route`] — what a request path is metered as: its [`Endpoint`] and, on Azure OpenAI
//!   paths, the deployment; the path is normalised first, as the proxies do, and a path
//!   they would refuse is a [`RouteError`] (HTTP 400).
//! - [`Tokenizer`] — owns the BPE encoders; [`Tokenizer::understand`] turns a body into an
//!   [`LlmRequest`] or a [`RequestError`] (HTTP 400); [`Tokenizer::understand_with`] takes
//!   the model from an Azure deployment instead of the body.
//! - [`OutputMeter`] — reads an upstream response (JSON or SSE, in chunks) and reports the
//!   real output tokens.
//!
//! Counting follows OpenAI's own accounting where it is documented (the cookbook "How to
//! count tokens with tiktoken"); the places where it is an estimate say so in their docs.

mod chat;
mod endpoint;
mod error;
mod json;
mod output;
mod request;
mod responses;
mod tokens;

pub(crate) use endpoint::normalise as normalise_path;
pub use endpoint::{Endpoint, Route, RouteError};
pub use error::RequestError;
pub use output::{OutputCount, OutputMeter, OutputSource};
pub use request::LlmRequest;
pub use tokens::{Encoding, Tokenizer};

/// Robustness: every body a client or an upstream can send must be answered, never panic.
#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::tokens::tests::tokenizer;
    use super::*;

    const ENDPOINTS: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Other,
    ];

    /// Field names the parsers look at, so random documents reach deep code paths.
    const KEYS: [&str; 36] = [
        "model",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "name",
        "tools",
        "functions",
        "function",
        "parameters",
        "properties",
        "enum",
        "description",
        "input",
        "prompt",
        "instructions",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "stream",
        "choices",
        "delta",
        "message",
        "usage",
        "completion_tokens",
        "output_tokens",
        "response",
        "output",
        "index",
        "tool_calls",
        "arguments",
        "detail",
        "image_url",
    ];
    const WORDS: [&str; 12] = [
        "user",
        "assistant",
        "system",
        "text",
        "input_text",
        "image_url",
        "function",
        "message",
        "response.output_text.delta",
        "low",
        "gpt-4",
        "gpt-4o",
    ];

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e20f64..1e20).prop_map(Value::from),
            prop::sample::select(&WORDS[..]).prop_map(Value::from),
            "\\PC{0,24}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 96, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(&KEYS[..]), inner), 0..6).prop_map(
                    |members| Value::Object(
                        members
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect()
                    )
                ),
            ]
        })
    }

    /// A request-shaped object: a real model name plus random known fields.
    fn request_body() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(&["gpt-4o", "gpt-4", "o3-mini"][..]),
            prop::collection::vec((prop::sample::select(&KEYS[..]), json_value()), 0..6),
        )
            .prop_map(|(model, members)| {
                let mut object: Map<String, Value> = members
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                object.insert("model".to_owned(), Value::from(model));
                serde_json::to_vec(&Value::Object(object)).unwrap()
            })
    }

    /// An upstream body: raw bytes, a JSON document, or SSE lines of JSON documents.
    fn response_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            prop::collection::vec(json_value(), 0..6).prop_map(|events| {
                let mut sse = Vec::new();
                for event in events {
                    sse.extend_from_slice(b"data: ");
                    sse.extend_from_slice(&serde_json::to_vec(&event).unwrap());
                    sse.extend_from_slice(b"\r\n\n");
                }
                sse.extend_from_slice(b"data: [DONE]\n\n");
                sse
            }),
        ]
    }

    fn meter(endpoint: Endpoint, body: &[u8], chunk: usize) -> Option<OutputCount> {
        let mut m = OutputMeter::new(endpoint, "gpt-4o");
        for piece in body.chunks(chunk.max(1)) {
            m.feed(piece, tokenizer());
        }
        m.finish(tokenizer())
    }

    proptest! {
        #[test]
        fn understand_answers_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
            for endpoint in ENDPOINTS {
                let _ = tokenizer().understand(endpoint, &body);
            }
        }

        #[test]
        fn understand_answers_arbitrary_json(value in json_value()) {
            let body = serde_json::to_vec(&value).unwrap();
            for endpoint in ENDPOINTS {
                let _ = tokenizer().understand(endpoint, &body);
                let _ = tokenizer().understand_with(endpoint, &body, Some("gpt-4"));
            }
        }

        #[test]
        fn understand_answers_request_shaped_json(body in request_body()) {
            for endpoint in ENDPOINTS {
                match tokenizer().understand(endpoint, &body) {
                    Err(e) => prop_assert!(!e.message.is_empty()),
                    // Every accepted request asks for at least one completion, so the
                    // output reservation is never multiplied down to nothing.
                    Ok(r) => prop_assert!(r.completions >= 1),
                }
            }
        }

        #[test]
        fn output_meter_answers_any_body_in_any_chunking(body in response_body(), chunk in 1usize..64) {
            for endpoint in ENDPOINTS {
                // Chunk boundaries must not change the answer.
                prop_assert_eq!(meter(endpoint, &body, chunk), meter(endpoint, &body, body.len()));
            }
        }
    }
}

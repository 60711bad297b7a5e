//! `POST /v1/embeddings`: one small vector per input; usage has prompt and total tokens
//! only (embeddings generate nothing).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{to_json, Turn};

/// Dimensions of every vector (the request's `dimensions` is not honoured).
const DIMENSIONS: usize = 8;

#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: [f32; DIMENSIONS],
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Deserialize)]
struct Request {
    input: Value,
}

/// `body` was already accepted by the tokenizer, so `input` is a string, an array of
/// strings, an array of token ids (one input) or an array of token-id arrays.
pub(crate) fn body(turn: &Turn, body: &[u8]) -> Vec<u8> {
    let inputs = match serde_json::from_slice::<Request>(body).map(|r| r.input) {
        Ok(Value::Array(items)) if items.first().is_some_and(Value::is_number) => 1,
        Ok(Value::Array(items)) => items.len(),
        _ => 1,
    };
    to_json(&List {
        object: "list",
        data: (0..inputs)
            .map(|index| Embedding {
                object: "embedding",
                index,
                embedding: vector(index),
            })
            .collect(),
        model: turn.model,
        usage: Usage {
            prompt_tokens: turn.reply.prompt_tokens,
            total_tokens: turn.reply.prompt_tokens,
        },
    })
}

/// A deterministic unit vector that differs between inputs of one request.
fn vector(index: usize) -> [f32; DIMENSIONS] {
    let mut v = [0.0f32; DIMENSIONS];
    for (k, x) in v.iter_mut().enumerate() {
        *x = ((index + 1) as f32 * (k + 1) as f32).sin();
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.map(|x| x / norm)
}

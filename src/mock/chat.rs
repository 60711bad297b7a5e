//! `POST /v1/chat/completions`: a `chat.completion`, or a stream of
//! `chat.completion.chunk`s.

use std::time::Duration;

use axum::response::Response;
use serde::Serialize;

use super::reply::interleaved;
use super::sse::Events;
use super::{to_json, Id, Turn, Usage};

const FINGERPRINT: &str = "fp_mock";

#[derive(Serialize)]
struct Completion<'a> {
    id: Id,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice>,
    usage: Usage,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct Choice {
    index: u32,
    message: Message,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: &'static str,
    refusal: Option<()>,
    annotations: [(); 0],
}

pub(crate) fn body(turn: &Turn) -> Vec<u8> {
    to_json(&Completion {
        id: Id::new("chatcmpl-", turn.serial),
        object: "chat.completion",
        created: turn.created,
        model: turn.model,
        choices: turn
            .choices
            .iter()
            .zip(0..)
            .map(|(reply, index)| Choice {
                index,
                message: Message {
                    role: "assistant",
                    content: reply.text(),
                    refusal: None,
                    annotations: [],
                },
                logprobs: None,
                finish_reason: reply.finish_reason(),
            })
            .collect(),
        usage: turn.usage,
        system_fingerprint: FINGERPRINT,
    })
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: Id,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice],
    /// Absent unless the client asked for usage; then `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Delta,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'static str>,
}

/// The stream OpenAI sends: a chunk with the role, one chunk per token of content, a chunk
/// with the finish reason, the usage chunk (`choices: []`) only when
/// `stream_options.include_usage` is true, then `data: [DONE]`. With several choices (`n`)
/// each chunk carries one choice, named by its `index`, and the choices' chunks interleave
/// (role chunks, then token chunks round by round, then finish chunks); the usage chunk
/// sums them all.
pub(crate) fn stream(turn: &Turn, interval: Duration) -> Response {
    let choice = |index, delta, finish_reason| ChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason,
    };
    let mut events = Events::default();
    for index in (0..).take(turn.choices.len()) {
        let first = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        events.data(&chunk(turn, &[choice(index, first, None)], None));
    }
    for (index, piece) in interleaved(&turn.choices) {
        let delta = Delta {
            role: None,
            content: Some(piece),
        };
        events.data(&chunk(turn, &[choice(index, delta, None)], None));
    }
    for (reply, index) in turn.choices.iter().zip(0..) {
        let last = choice(index, Delta::default(), Some(reply.finish_reason()));
        events.data(&chunk(turn, &[last], None));
    }
    if turn.include_usage {
        events.data(&chunk(turn, &[], Some(turn.usage)));
    }
    events.done();
    events.into_response(interval)
}

/// One chunk; `usage` is the usage chunk's figure (`None`: `null`, or no field at all when
/// the client did not ask for usage).
fn chunk<'a>(turn: &'a Turn, choices: &'a [ChunkChoice], usage: Option<Usage>) -> Chunk<'a> {
    Chunk {
        id: Id::new("chatcmpl-", turn.serial),
        object: "chat.completion.chunk",
        created: turn.created,
        model: turn.model,
        system_fingerprint: FINGERPRINT,
        choices,
        usage: turn.include_usage.then_some(usage),
    }
}

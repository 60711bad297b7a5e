//! `POST /v1/responses`: a `response` whose one output item is an assistant message, or
//! the stream of events that builds it.

use std::time::Duration;

use axum::response::Response;
use serde::Serialize;

use super::sse::Events;
use super::{to_json, Id, Turn};

#[derive(Serialize)]
struct ResponseObject<'a> {
    id: Id,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    incomplete_details: Option<Incomplete>,
    model: &'a str,
    output: &'a [OutputItem],
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Incomplete {
    reason: &'static str,
}

#[derive(Serialize)]
struct OutputItem {
    r#type: &'static str,
    id: Id,
    status: &'static str,
    role: &'static str,
    content: [OutputText; 1],
}

#[derive(Serialize)]
struct OutputText {
    r#type: &'static str,
    text: &'static str,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
}

/// The finished response. A reply cut short by `max_output_tokens` is `incomplete`, as
/// OpenAI reports it.
fn finished<'a>(turn: &'a Turn, output: &'a [OutputItem]) -> ResponseObject<'a> {
    let status = if turn.reply.truncated {
        "incomplete"
    } else {
        "completed"
    };
    ResponseObject {
        id: Id::new("resp_", turn.serial),
        object: "response",
        created_at: turn.created,
        status,
        incomplete_details: turn.reply.truncated.then_some(Incomplete {
            reason: "max_output_tokens",
        }),
        model: turn.model,
        output,
        usage: Some(Usage {
            input_tokens: turn.reply.prompt_tokens,
            output_tokens: turn.reply.completion_tokens,
            total_tokens: turn.reply.total_tokens(),
        }),
    }
}

fn message(turn: &Turn) -> OutputItem {
    OutputItem {
        r#type: "message",
        id: Id::new("msg_", turn.serial),
        status: if turn.reply.truncated {
            "incomplete"
        } else {
            "completed"
        },
        role: "assistant",
        content: [OutputText {
            r#type: "output_text",
            text: turn.reply.text(),
            annotations: [],
        }],
    }
}

pub(crate) fn body(turn: &Turn) -> Vec<u8> {
    to_json(&finished(turn, &[message(turn)]))
}

#[derive(Serialize)]
struct Lifecycle<'a> {
    r#type: &'static str,
    sequence_number: u64,
    response: ResponseObject<'a>,
}

#[derive(Serialize)]
struct TextDelta {
    r#type: &'static str,
    sequence_number: u64,
    item_id: Id,
    output_index: u32,
    content_index: u32,
    delta: &'static str,
}

/// `response.created` (in progress, no output), one `response.output_text.delta` per token,
/// then `response.completed` with the whole response and its usage — or
/// `response.incomplete` when `max_output_tokens` cut it short, as OpenAI does. Responses
/// streams have no `[DONE]`.
pub(crate) fn stream(turn: &Turn, interval: Duration) -> Response {
    let mut events = Events::default();
    let mut sequence = 0..;
    let created = ResponseObject {
        status: "in_progress",
        incomplete_details: None,
        output: &[],
        usage: None,
        ..finished(turn, &[])
    };
    events.named(
        "response.created",
        &Lifecycle {
            r#type: "response.created",
            sequence_number: sequence.next().unwrap_or_default(),
            response: created,
        },
    );
    for piece in turn.reply.pieces() {
        events.named(
            "response.output_text.delta",
            &TextDelta {
                r#type: "response.output_text.delta",
                sequence_number: sequence.next().unwrap_or_default(),
                item_id: Id::new("msg_", turn.serial),
                output_index: 0,
                content_index: 0,
                delta: piece,
            },
        );
    }
    let last = if turn.reply.truncated {
        "response.incomplete"
    } else {
        "response.completed"
    };
    let output = [message(turn)];
    events.named(
        last,
        &Lifecycle {
            r#type: last,
            sequence_number: sequence.next().unwrap_or_default(),
            response: finished(turn, &output),
        },
    );
    events.into_response(interval)
}

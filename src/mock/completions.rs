//! `POST /v1/completions` (legacy): a `text_completion`, or a stream of them.

use std::time::Duration;

use axum::response::Response;
use serde::Serialize;

use super::sse::Events;
use super::{to_json, Id, Turn, Usage};

#[derive(Serialize)]
struct Completion<'a> {
    id: Id,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice],
    /// Always present on a JSON body; on a stream, as for chat: absent unless the client
    /// asked for usage, then `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct Choice {
    text: &'static str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

fn completion<'a>(
    turn: &'a Turn,
    choices: &'a [Choice],
    usage: Option<Option<Usage>>,
) -> Completion<'a> {
    Completion {
        id: Id::new("cmpl-", turn.serial),
        object: "text_completion",
        created: turn.created,
        model: turn.model,
        choices,
        usage,
    }
}

pub(crate) fn body(turn: &Turn) -> Vec<u8> {
    let choice = Choice {
        text: turn.reply.text(),
        index: 0,
        logprobs: None,
        finish_reason: Some(turn.reply.finish_reason()),
    };
    to_json(&completion(
        turn,
        &[choice],
        Some(Some(Usage::from(&turn.reply))),
    ))
}

/// One chunk per token of text, a chunk with the finish reason and empty text, the usage
/// chunk (`choices: []`) only with `stream_options.include_usage`, then `data: [DONE]`.
pub(crate) fn stream(turn: &Turn, interval: Duration) -> Response {
    let usage = |figure: Option<Usage>| turn.include_usage.then_some(figure);
    let choice = |text, finish_reason| Choice {
        text,
        index: 0,
        logprobs: None,
        finish_reason,
    };
    let mut events = Events::default();
    for piece in turn.reply.pieces() {
        events.data(&completion(turn, &[choice(piece, None)], usage(None)));
    }
    let last = choice("", Some(turn.reply.finish_reason()));
    events.data(&completion(turn, &[last], usage(None)));
    if turn.include_usage {
        events.data(&completion(
            turn,
            &[],
            usage(Some(Usage::from(&turn.reply))),
        ));
    }
    events.done();
    events.into_response(interval)
}

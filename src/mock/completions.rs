//! `POST /v1/completions` (legacy): a `text_completion`, or a stream of them.

use std::time::Duration;

use axum::response::Response;
use serde::Serialize;

use super::reply::interleaved;
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

/// `n` choices per prompt, prompt by prompt (choice `p·n + k` is prompt `p`'s `k`-th);
/// usage sums every generation, `best_of`'s hidden candidates included.
pub(crate) fn body(turn: &Turn) -> Vec<u8> {
    let choices: Vec<Choice> = turn
        .choices
        .iter()
        .zip(0..)
        .map(|(reply, index)| Choice {
            text: reply.text(),
            index,
            logprobs: None,
            finish_reason: Some(reply.finish_reason()),
        })
        .collect();
    to_json(&completion(turn, &choices, Some(Some(turn.usage))))
}

/// One chunk per token of text, a chunk with the finish reason and empty text, the usage
/// chunk (`choices: []`) only with `stream_options.include_usage`, then `data: [DONE]`.
/// With several choices each chunk carries one, named by its `index`, interleaved round
/// by round; the usage chunk sums them all.
pub(crate) fn stream(turn: &Turn, interval: Duration) -> Response {
    let usage = |figure: Option<Usage>| turn.include_usage.then_some(figure);
    let choice = |text, index, finish_reason| Choice {
        text,
        index,
        logprobs: None,
        finish_reason,
    };
    let mut events = Events::default();
    for (index, piece) in interleaved(&turn.choices) {
        events.data(&completion(
            turn,
            &[choice(piece, index, None)],
            usage(None),
        ));
    }
    for (reply, index) in turn.choices.iter().zip(0..) {
        let last = choice("", index, Some(reply.finish_reason()));
        events.data(&completion(turn, &[last], usage(None)));
    }
    if turn.include_usage {
        events.data(&completion(turn, &[], usage(Some(turn.usage))));
    }
    events.done();
    events.into_response(interval)
}

//! What an answer body tells the records: the token usage of a 2xx (JSON or a whole SSE
//! stream), and the limit a 429 names in OpenAI's error body (`error.type`).
//!
//! Usage is found by scanning for its fields rather than parsing the body: a stream is
//! many JSON documents, usage sits in the last one that has it (chat's final chunk,
//! Responses' `response.completed`), and a scan costs far less than a parse on the hot
//! path. The field names are quoted with their closing quote, so `"input_tokens_details"`
//! never matches `"input_tokens"`.

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem::FinderRev;
use serde::Deserialize;

use crate::record::{LimitKind, LimitSet};

/// What the records keep of one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub denied_by: Option<LimitKind>,
    pub denied_in: Option<LimitSet>,
}

impl Seen {
    /// Reads the body of an answer with this HTTP status.
    pub fn read(status: u16, body: &[u8]) -> Seen {
        match status {
            200..=299 => Seen {
                prompt_tokens: number(&PROMPT, body).or_else(|| number(&INPUT, body)),
                completion_tokens: number(&COMPLETION, body).or_else(|| number(&OUTPUT, body)),
                denied_by: None,
                denied_in: None,
            },
            429 => Seen {
                denied_by: denied_by(body),
                denied_in: denied_in(body),
                ..Seen::default()
            },
            _ => Seen::default(),
        }
    }
}

static PROMPT: LazyLock<FinderRev<'static>> =
    LazyLock::new(|| FinderRev::new(b"\"prompt_tokens\""));
static INPUT: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\"input_tokens\""));
static COMPLETION: LazyLock<FinderRev<'static>> =
    LazyLock::new(|| FinderRev::new(b"\"completion_tokens\""));
static OUTPUT: LazyLock<FinderRev<'static>> =
    LazyLock::new(|| FinderRev::new(b"\"output_tokens\""));

/// The whole number after the last `"field"` and its colon.
fn number(field: &FinderRev<'_>, body: &[u8]) -> Option<u32> {
    let at = field.rfind(body)?;
    let rest = skip_space(&body[at + field.needle().len()..]);
    let rest = skip_space(rest.strip_prefix(b":")?);
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&rest[..digits])
        .ok()?
        .parse::<u64>()
        .ok()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn skip_space(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: ErrorFields<'a>,
}

#[derive(Deserialize)]
struct ErrorFields<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
}

/// Whose limit a 429 names: `Rate limit reached for team-a (pool research) on ...`; the
/// key's own when the message names no other, `None` when it is not one of ours.
pub fn denied_in(body: &[u8]) -> Option<LimitSet> {
    let body: ErrorBody = serde_json::from_slice(body).ok()?;
    let message = body.error.message?;
    let who = message
        .strip_prefix("Rate limit reached for ")
        .or_else(|| message.strip_prefix("Request too large for "))?;
    let who = &who[..who.find(" on ")?];
    Some(match who.split_once(" (") {
        None => LimitSet::Key,
        Some((_, "per day)")) => LimitSet::KeyDay,
        Some((_, s)) if s.starts_with("model ") => LimitSet::Model,
        Some((_, s)) if s.starts_with("pool ") && s.ends_with(", per day)") => LimitSet::PoolDay,
        Some((_, s)) if s.starts_with("pool ") => LimitSet::Pool,
        Some(_) => LimitSet::Key,
    })
}

/// The limit a 429 body names, when it names one of ours.
pub fn denied_by(body: &[u8]) -> Option<LimitKind> {
    let body: ErrorBody = serde_json::from_slice(body).ok()?;
    LimitKind::parse(body.error.kind.as_deref()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_usage() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let seen = Seen::read(200, body);
        assert_eq!(
            (seen.prompt_tokens, seen.completion_tokens),
            (Some(12), Some(30))
        );
    }

    #[test]
    fn pretty_printed_usage() {
        let body = b"{\"usage\": {\n  \"prompt_tokens\" : 7,\n  \"completion_tokens\":\t9\n}}";
        let seen = Seen::read(200, body);
        assert_eq!(
            (seen.prompt_tokens, seen.completion_tokens),
            (Some(7), Some(9))
        );
    }

    #[test]
    fn stream_usage_is_the_last_chunks() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
                     data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n\
                     data: [DONE]\n\n";
        let seen = Seen::read(200, body);
        assert_eq!(
            (seen.prompt_tokens, seen.completion_tokens),
            (Some(5), Some(3))
        );
    }

    #[test]
    fn responses_usage() {
        let body = br#"event: response.completed
data: {"type":"response.completed","response":{"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15}}}

"#;
        let seen = Seen::read(200, body);
        assert_eq!(
            (seen.prompt_tokens, seen.completion_tokens),
            (Some(11), Some(4))
        );
    }

    #[test]
    fn no_usage() {
        let seen = Seen::read(200, b"data: {\"usage\":null}\n\n");
        assert_eq!(seen, Seen::default());
        assert_eq!(
            Seen::read(200, b"{\"usage\":{\"prompt_tokens\":}}"),
            Seen::default()
        );
    }

    #[test]
    fn denials() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"input_tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            Seen::read(429, body).denied_by,
            Some(LimitKind::InputTokens)
        );
        assert_eq!(denied_by(br#"{"error":{"type":"tokens"}}"#), None);
        assert_eq!(denied_by(b"not json"), None);
        let message = |who: &str| {
            format!(
                r#"{{"error":{{"message":"Rate limit reached for {who} on requests: Limit 1","type":"requests"}}}}"#
            )
        };
        for (who, set) in [
            ("team-a", LimitSet::Key),
            ("team-a (per day)", LimitSet::KeyDay),
            ("team-a (model gpt-4o)", LimitSet::Model),
            ("team-a (pool research)", LimitSet::Pool),
            ("team-a (pool research, per day)", LimitSet::PoolDay),
        ] {
            assert_eq!(denied_in(message(who).as_bytes()), Some(set), "{who}");
        }
        assert_eq!(denied_in(b"{}"), None);
        // A 2xx body is never read as a denial, nor a 429 for usage.
        assert_eq!(Seen::read(200, body).denied_by, None);
        assert_eq!(
            Seen::read(429, br#"{"usage":{"prompt_tokens":3}}"#).prompt_tokens,
            None
        );
    }
}

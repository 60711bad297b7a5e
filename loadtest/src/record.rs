//! What one request left behind: the raw material of every report the tool writes.
//!
//! The runners (`http`, `grpc`) push one [`Record`] per request they finished. The table
//! and JSON summary, `--verify` and `--html` are all computed afterwards from the same
//! records, so they can never disagree with each other.

use serde::Serialize;

/// How a request ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// HTTP 2xx, or an authz/ratelimit answer that lets the request through.
    Ok,
    /// HTTP 429, or a denial with 429 / OVER_LIMIT.
    RateLimited,
    /// Anything else: another status, a transport error, a timeout.
    Other,
}

impl Outcome {
    /// The outcome of an answer with this HTTP status (0: no answer).
    pub fn of_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Ok,
            429 => Outcome::RateLimited,
            _ => Outcome::Other,
        }
    }
}

/// The three limits of a key, as the limiter names them (`error.type` of its 429 body).
pub use llm_ratelimit::engine::LimitKind;

/// Whose limit a 429 names, as its message says (`team-a (model gpt-4o)`, ...): the
/// key's own per window (nothing said), per day, its model entry's, its pool's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSet {
    Key,
    KeyDay,
    Model,
    Pool,
    PoolDay,
}

/// One finished request. Instants are microseconds since the run's start (one monotonic
/// clock for the whole run, taken in the tool's process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Index into the run's target list.
    pub target: u16,
    /// Index into the run's key list.
    pub key: u16,
    /// Index into the run's `--model` list.
    pub model: u16,
    /// When the request was meant to go out: its slot in the schedule with `--rate`, the
    /// same as `sent_us` with `--concurrency`. Latency is `done_us - intended_us`, which
    /// corrects coordinated omission in open loop.
    pub intended_us: u64,
    /// When its first byte was handed to the connection.
    pub sent_us: u64,
    /// When its last response byte arrived (or the error was seen).
    pub done_us: u64,
    pub outcome: Outcome,
    /// HTTP status (gRPC mode: the HTTP status the answer would give: 200, 429, ...);
    /// 0 when no response arrived.
    pub status: u16,
    /// On a 429: the limit the limiter named (`error.type` in the body), when it did.
    pub denied_by: Option<LimitKind>,
    /// On a 429: whose limit it names (its message), when it says.
    pub denied_in: Option<LimitSet>,
    /// Input tokens: `usage.prompt_tokens` of the response; 0 when unknown.
    pub prompt_tokens: u32,
    /// Output tokens: `usage.completion_tokens` of the response; 0 when unknown.
    pub completion_tokens: u32,
    /// The output reservation the request asked for (`max_tokens` sent), which the
    /// limiter holds between admission and settlement.
    pub max_tokens: u32,
}

impl Record {
    /// Latency as the client experienced it, from the intended send instant.
    pub fn latency_us(&self) -> u64 {
        self.done_us.saturating_sub(self.intended_us)
    }
}

/// A key's sliding-window usage of one limit over the run, as `--verify` replays it;
/// drawn by `--html` as one line against the limit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageSeries {
    /// The key's name in the config (never its secret).
    pub key: String,
    pub limit: LimitKind,
    /// The configured limit per window.
    pub limit_value: u64,
    /// (seconds since the run's start, usage of the window ending then).
    pub points: Vec<(f64, u64)>,
}

//! The mock upstream: answers OpenAI's API the way OpenAI does, without a model.
//!
//! It stands behind Envoy and the limiter in tests, demos and load tests, so it must agree
//! with the limiter and never be the bottleneck:
//! - `usage.prompt_tokens` is [`Tokenizer::understand`]'s `input_tokens` for the same body,
//!   the figure the limiter charged at admission;
//! - `completion_tokens` follows one documented, deterministic rule ([`Reply::for_request`])
//!   and the generated text counts to exactly that figure, so settling from `usage` or from
//!   the streamed text gives the same number;
//! - a request is parsed once, answered from borrowed data, and the tokenizer is built once.
//!
//! Endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses` (JSON, or SSE with `"stream": true`), `GET /v1/models`, `GET /healthz`.
//! An invalid body is a 400 with OpenAI's error body; an unknown path a 404.

mod chat;
mod completions;
mod embeddings;
mod models;
mod reply;
mod responses;
mod sse;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize, Serializer};

use crate::answer::Answer;
use crate::openai::{Endpoint, LlmRequest, Tokenizer};

pub use reply::{Reply, DEFAULT_MAX_OUTPUT_TOKENS};

/// How the mock paces its answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Delay before answering (before the first byte of a stream).
    pub latency: Duration,
    /// Delay between two SSE events of a stream.
    pub stream_interval: Duration,
}

/// Shared by every request.
struct Mock {
    tokenizer: Arc<Tokenizer>,
    options: Options,
    next_id: AtomicU64,
}

/// The mock's HTTP service.
pub fn router(tokenizer: Arc<Tokenizer>, options: Options) -> Router {
    let mock = Arc::new(Mock {
        tokenizer,
        options,
        next_id: AtomicU64::new(1),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/models", get(models::list))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .fallback(not_found)
        .with_state(mock)
}

/// One understood request and what the mock replies to it.
pub(crate) struct Turn<'a> {
    /// Distinguishes this answer's ids (`chatcmpl-…`, `resp_…`) from every other's.
    pub serial: u64,
    /// Unix seconds.
    pub created: u64,
    pub model: &'a str,
    pub reply: Reply,
    /// `stream_options.include_usage` of a streamed request.
    pub include_usage: bool,
}

/// An OpenAI-style object id such as `chatcmpl-000000000000002a`, written straight into the
/// JSON without an intermediate `String`.
#[derive(Clone, Copy)]
pub(crate) struct Id {
    prefix: &'static str,
    serial: u64,
}

impl Id {
    pub fn new(prefix: &'static str, serial: u64) -> Id {
        Id { prefix, serial }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}{:016x}", self.prefix, self.serial)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Usage as chat and completions report it.
#[derive(Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<&Reply> for Usage {
    fn from(reply: &Reply) -> Usage {
        Usage {
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            total_tokens: reply.total_tokens(),
        }
    }
}

/// The one field the tokenizer's [`LlmRequest`] does not carry and a stream needs.
#[derive(Deserialize)]
struct StreamFields {
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl Mock {
    /// Decides the reply to a request the tokenizer accepted. `Err` is a 400.
    fn turn<'b>(&self, body: &'b [u8], request: &'b LlmRequest) -> Result<Turn<'b>, Answer> {
        let include_usage = if request.stream {
            // Only streams need it, so the common non-streaming request is parsed once.
            match serde_json::from_slice::<StreamFields>(body) {
                Ok(fields) => fields
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
                Err(_) => {
                    return Err(Answer::invalid_request(
                        "Invalid type for 'stream_options': expected an object with a boolean \
                         'include_usage'.",
                        Some("stream_options"),
                    ))
                }
            }
        } else {
            false
        };
        Ok(Turn {
            serial: self.next_id.fetch_add(1, Ordering::Relaxed),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: &request.model,
            reply: Reply::for_request(request.input_tokens, request.max_output_tokens),
            include_usage,
        })
    }

    /// The configured latency, before any answer (including a 400, as a server would).
    async fn think(&self) {
        if !self.options.latency.is_zero() {
            tokio::time::sleep(self.options.latency).await;
        }
    }
}

/// The shared shape of the four generating endpoints: understand, wait, answer.
async fn answer(
    mock: &Mock,
    endpoint: Endpoint,
    body: &[u8],
    respond: impl FnOnce(&Turn, &LlmRequest, Duration) -> Response,
) -> Response {
    mock.think().await;
    let request = match mock.tokenizer.understand(endpoint, body) {
        Ok(request) => request,
        Err(e) => return render(Answer::invalid_request(&e.message, e.param.as_deref())),
    };
    match mock.turn(body, &request) {
        Ok(turn) => respond(&turn, &request, mock.options.stream_interval),
        Err(answer) => render(answer),
    }
}

async fn chat_completions(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    answer(
        &mock,
        Endpoint::ChatCompletions,
        &body,
        |turn, request, interval| {
            if request.stream {
                chat::stream(turn, interval)
            } else {
                json(chat::body(turn))
            }
        },
    )
    .await
}

async fn completions(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    answer(
        &mock,
        Endpoint::Completions,
        &body,
        |turn, request, interval| {
            if request.stream {
                completions::stream(turn, interval)
            } else {
                json(completions::body(turn))
            }
        },
    )
    .await
}

async fn responses(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    answer(
        &mock,
        Endpoint::Responses,
        &body,
        |turn, request, interval| {
            if request.stream {
                responses::stream(turn, interval)
            } else {
                json(responses::body(turn))
            }
        },
    )
    .await
}

async fn embeddings(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    answer(&mock, Endpoint::Embeddings, &body, |turn, _, _| {
        json(embeddings::body(turn, &body))
    })
    .await
}

/// OpenAI's answer to a path it does not serve.
async fn not_found(method: Method, uri: Uri) -> Response {
    let mut response = render(Answer::invalid_request(
        &format!("Invalid URL ({method} {})", uri.path()),
        None,
    ));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

/// A 200 JSON body.
fn json(body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn render(answer: Answer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in answer.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// Serializes one of our own response structs. They hold only strings, numbers and
/// sequences, which cannot fail to serialize.
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

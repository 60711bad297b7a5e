//! The mock upstream: answers OpenAI's API the way OpenAI does, without a model.
//!
//! It stands behind Envoy and the limiter in tests, demos and load tests, so it must agree
//! with the limiter and never be the bottleneck:
//! - `usage.prompt_tokens` is [`Tokenizer::understand`]'s `input_tokens` for the same body,
//!   the figure the limiter charged at admission;
//! - `completion_tokens` follows one documented, deterministic rule ([`Reply::for_request`])
//!   and the generated text counts to exactly that figure, so settling from `usage` or from
//!   the streamed text gives the same number;
//! - a request is parsed once, answered from borrowed data, and the tokenizer is built once;
//! - it routes like a lenient upstream: the path is read by the limiter's own
//!   [`Route::from_path`], so every variant the limiter meters as chat (`/v1//chat/...`,
//!   `/V1/...`, `%63`, Azure deployment paths) is answered as chat, and an end-to-end test
//!   can compare what reached it (`GET /mock/received`) with what the limiter counted.
//!
//! Endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses` (JSON, or SSE with `"stream": true`) and their Azure deployment forms,
//! `GET /v1/models`, `GET /healthz`, `GET /mock/received`. An invalid body is a 400 with
//! OpenAI's error body; an unknown path a 404, or with [`Options::any_path`] a 200.

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
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize, Serializer};

use crate::answer::Answer;
use crate::openai::{Endpoint, LlmRequest, Route, Tokenizer};

pub use reply::{Reply, DEFAULT_MAX_OUTPUT_TOKENS};

/// How the mock paces its answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Delay before answering (before the first byte of a stream).
    pub latency: Duration,
    /// Delay between two SSE events of a stream.
    pub stream_interval: Duration,
    /// Answer every path and method the mock does not serve with 200 and a small JSON
    /// body (`{"object":"mock.any","path":...}`) instead of a 404, as a catch-all upstream
    /// would: a test can then see whether a request the limiter did not meter got through.
    pub any_path: bool,
}

/// Shared by every request.
struct Mock {
    tokenizer: Arc<Tokenizer>,
    options: Options,
    next_id: AtomicU64,
    received: Received,
}

/// Totals of what the mock answered since start (`GET /mock/received`): every request on
/// any path and method except `/healthz` and `/mock/*`, with the usage it reported.
#[derive(Default)]
struct Received {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// The JSON of `GET /mock/received`.
#[derive(Serialize)]
struct ReceivedTotals {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Received {
    fn add(&self, prompt_tokens: u64, completion_tokens: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion_tokens, Ordering::Relaxed);
    }

    fn totals(&self) -> ReceivedTotals {
        ReceivedTotals {
            requests: self.requests.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
        }
    }
}

/// The mock's HTTP service.
pub fn router(tokenizer: Arc<Tokenizer>, options: Options) -> Router {
    let mock = Arc::new(Mock {
        tokenizer,
        options,
        next_id: AtomicU64::new(1),
        received: Received::default(),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/mock/received", get(received))
        .fallback(dispatch)
        .with_state(mock)
}

/// One understood request and what the mock replies to it.
pub(crate) struct Turn<'a> {
    /// Distinguishes this answer's ids (`chatcmpl-…`, `resp_…`) from every other's.
    pub serial: u64,
    /// Unix seconds.
    pub created: u64,
    pub model: &'a str,
    /// The first choice: the whole reply of an API without `n` (responses, embeddings).
    pub reply: Reply,
    /// The choices returned, in `index` order: chat's `n`; completions' `n` per prompt.
    pub choices: Vec<Reply>,
    /// What `usage` reports: the prompt, and every completion generated — returned or,
    /// for completions' `best_of`, not.
    pub usage: Usage,
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
#[derive(Clone, Copy, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The one field the tokenizer's [`LlmRequest`] does not carry and a stream needs.
#[derive(Deserialize)]
struct StreamFields {
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// Completions' `n`: how many of the `max(n, best_of)` candidates per prompt are returned.
/// The tokenizer has validated it (an integer in 1..=128, or absent / null).
#[derive(Deserialize)]
struct ChoiceFields {
    #[serde(default)]
    n: Option<u64>,
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
        let (choices, generated) = generate(body, request);
        let reply = Reply::for_request(request.input_tokens, request.max_output_tokens);
        let completion_tokens = if request.reserves_output {
            generated.iter().map(|r| r.completion_tokens).sum()
        } else {
            0
        };
        Ok(Turn {
            serial: self.next_id.fetch_add(1, Ordering::Relaxed),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: &request.model,
            reply,
            choices,
            usage: Usage {
                prompt_tokens: request.input_tokens,
                completion_tokens,
                total_tokens: request.input_tokens + completion_tokens,
            },
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

/// Every generation of a request, and the ones returned as choices. A generation's length
/// follows [`Reply::for_choice`] with its number `g` (0-based over the request), so choices
/// differ and a sum cannot be mistaken for `n ×` one reply.
///
/// Chat: `n` generations, all returned. Completions: `max(n, best_of)` per prompt
/// (`completions` in all); of prompt `p`'s, the first `n` are returned as choices
/// `p·n … p·n + n − 1`, the rest are `best_of`'s hidden candidates, billed but not shown.
fn generate(body: &[u8], request: &LlmRequest) -> (Vec<Reply>, Vec<Reply>) {
    let reply = |g: u64| Reply::for_choice(request.input_tokens, request.max_output_tokens, g);
    let generated: Vec<Reply> = (0..request.completions).map(reply).collect();
    if request.endpoint != Endpoint::Completions {
        return (generated.clone(), generated);
    }
    let n = serde_json::from_slice::<ChoiceFields>(body)
        .ok()
        .and_then(|f| f.n)
        .unwrap_or(1)
        .clamp(1, request.completions);
    // completions = per_prompt × prompts and per_prompt = max(n, best_of) ≥ n, so per
    // prompt, the first n of each run of per_prompt generations are the choices.
    let per_prompt = best_of(body).unwrap_or(n).max(n);
    let choices = generated
        .chunks(per_prompt as usize)
        .flat_map(|candidates| candidates.iter().take(n as usize).copied())
        .collect();
    (choices, generated)
}

/// Completions' `best_of`, as the tokenizer validated it.
fn best_of(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct BestOf {
        #[serde(default)]
        best_of: Option<u64>,
    }
    serde_json::from_slice::<BestOf>(body).ok()?.best_of
}

/// Every request but `/healthz` and `/mock/received`: routed the way the limiter reads the
/// path, answered, and added to the received totals (unless it is one of the mock's own).
async fn dispatch(
    State(mock): State<Arc<Mock>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let (response, usage) = mock.route(&method, target, uri.path(), &body).await;
    // The mock's own `/mock/*` paths are not traffic; but one that names an endpoint
    // (`/mock/../v1/chat/completions`, `/mock/v1/embeddings`) was answered as one, so it counts.
    let own = uri.path().starts_with("/mock/")
        && Route::from_path(target).map_or(true, |r| r.endpoint == Endpoint::Other);
    if !own {
        let (prompt, completion) = usage.map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
        mock.received.add(prompt, completion);
    }
    response
}

async fn received(State(mock): State<Arc<Mock>>) -> Response {
    json(to_json(&mock.received.totals()))
}

impl Mock {
    /// The answer to one request, and the usage it reports (`None`: no usage, e.g. an error).
    async fn route(
        &self,
        method: &Method,
        target: &str,
        path: &str,
        body: &[u8],
    ) -> (Response, Option<Usage>) {
        let route = match Route::from_path(target) {
            Ok(route) => route,
            Err(e) => return (render(Answer::invalid_request(&e.to_string(), None)), None),
        };
        if route.endpoint != Endpoint::Other && method == Method::POST {
            return self.generate(route, body).await;
        }
        // The models list under any spelling the limiter would also normalise.
        let is_models = crate::openai::normalise_path(target)
            .is_ok_and(|p| p.eq_ignore_ascii_case("/v1/models"));
        if is_models && method == Method::GET {
            (models::list().await, None)
        } else if self.options.any_path {
            (
                json(to_json(&AnyPath {
                    object: "mock.any",
                    path,
                })),
                None,
            )
        } else {
            (not_found(method, path), None)
        }
    }

    /// The four generating endpoints: understand (the deployment, if any, names the model,
    /// as on Azure), wait, answer.
    async fn generate(&self, route: Route, body: &[u8]) -> (Response, Option<Usage>) {
        self.think().await;
        let endpoint = route.endpoint;
        let request =
            match self
                .tokenizer
                .understand_with(endpoint, body, route.deployment.as_deref())
            {
                Ok(request) => request,
                Err(e) => {
                    return (
                        render(Answer::invalid_request(&e.message, e.param.as_deref())),
                        None,
                    )
                }
            };
        let turn = match self.turn(body, &request) {
            Ok(turn) => turn,
            Err(answer) => return (render(answer), None),
        };
        let interval = self.options.stream_interval;
        let response = match (endpoint, request.stream) {
            (Endpoint::ChatCompletions, true) => chat::stream(&turn, interval),
            (Endpoint::ChatCompletions, false) => json(chat::body(&turn)),
            (Endpoint::Completions, true) => completions::stream(&turn, interval),
            (Endpoint::Completions, false) => json(completions::body(&turn)),
            (Endpoint::Responses, true) => responses::stream(&turn, interval),
            (Endpoint::Responses, false) => json(responses::body(&turn)),
            (Endpoint::Embeddings, _) => json(embeddings::body(&turn, body)),
            (Endpoint::Other, _) => not_found(&Method::POST, ""),
        };
        (response, Some(turn.usage))
    }
}

/// `--any-path`'s answer.
#[derive(Serialize)]
struct AnyPath<'a> {
    object: &'static str,
    path: &'a str,
}

/// OpenAI's answer to a path it does not serve.
fn not_found(method: &Method, path: &str) -> Response {
    let mut response = render(Answer::invalid_request(
        &format!("Invalid URL ({method} {path})"),
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

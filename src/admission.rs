//! The request path, in one place for every caller (HTTP `/v1/check` and `/v1/report`
//! now, Envoy's gRPC APIs next): key from the bearer header → the OpenAI request
//! understood (input tokens, output reservation) → one store call → an [`Answer`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::answer::{headline, Answer};
use tokio::sync::Semaphore;

use crate::config::{Applied, Config, KeySpec, LimitScope, UnknownEndpoints};
use crate::engine::{
    Bound, Charge, Claim, KeyName, LimitKind, Limits, RingRef, Settlement, Snapshot, Store,
    StoreError, Usage, Verdict as Decided,
};
use crate::metrics::{
    DecisionLabels, Metrics, OutcomeLabels, StoreErrorLabels, TokenLabels, WindowLabels,
};
use crate::openai::{Encoding, Endpoint, LlmRequest, OutputMeter, RequestError, Route, Tokenizer};
use crate::shutdown::Drain;
use crate::telemetry;

/// A client request as it reached the gateway.
pub struct ClientRequest<'a> {
    /// The HTTP method (`POST`, `GET`, ...).
    pub method: &'a str,
    /// The `Authorization` header (`Bearer <key>`).
    pub authorization: Option<&'a str>,
    /// Azure OpenAI's `api-key` header, the other place a client puts its key.
    pub api_key: Option<&'a str>,
    /// The path and query the upstream receives.
    pub path: &'a str,
    pub body: &'a [u8],
}

/// A request understood: whose it is, what it is for, what it asks of the limits.
struct Understood {
    spec: KeySpec,
    endpoint: Endpoint,
    request: LlmRequest,
    want: Usage,
}

/// Bodies larger than this are tokenized on a blocking thread (about half a
/// millisecond of tokenizing at ~35 ns per byte).
const OFFLOAD_BYTES: usize = 16 * 1024;

/// An admitted request: what the upstream and the settlement hook need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub key: KeyName,
    /// Opaque handle for the post-response hook; `None` when nothing is to settle.
    pub reservation: Option<String>,
    pub input_tokens: u64,
    pub output_reserved: u64,
    /// The request's model (empty when it has none): Envoy's `ratelimit` filter passes it
    /// back as the `model` descriptor entry, so ShouldRateLimit holds it to the same
    /// `models` entry.
    pub model: String,
}

/// What `check` decided: the answer to give, and on admission what was admitted.
pub struct Verdict {
    pub answer: Answer,
    pub admitted: Option<Admitted>,
}

impl From<Answer> for Verdict {
    fn from(answer: Answer) -> Verdict {
        Verdict {
            answer,
            admitted: None,
        }
    }
}

/// What an Envoy `ShouldRateLimit` charge came to for one key.
#[derive(Debug)]
pub enum Charged {
    /// No configured key has this secret; as in envoyproxy/ratelimit, what the limiter
    /// does not know is not limited (authentication is ext_authz's job).
    UnknownKey,
    /// Recorded; `limits` and `snapshot` give the headers: per limit, the per-window
    /// ring with the least room (see [`headline`]). `claimed`: the store left the marker
    /// asked for, so a refund by it gives back exactly this charge; false when nothing was
    /// asked for, or when the store let the request through without recording it
    /// (`on_store_error: allow`), which there is then nothing to undo.
    Admitted {
        key: KeyName,
        limits: Limits,
        snapshot: Snapshot,
        claimed: bool,
    },
    /// Not recorded: the 429 to give, and the ring of the limit that denied it (for the
    /// statuses): its limits, its usage, and its window's length (the config's window, or
    /// a day for a `per_day` limit).
    Denied {
        limits: Limits,
        snapshot: Snapshot,
        window: Duration,
        answer: Answer,
    },
    /// The store failed.
    Failed(Answer),
}

/// What a settlement found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// The real output tokens settled; `None` when the response showed none and the
    /// reservation was left as it was.
    pub output_tokens: Option<u64>,
    pub settlement: Option<Settlement>,
}

pub struct Limiter {
    config: Arc<ArcSwap<Config>>,
    store: Store,
    tokenizer: Arc<Tokenizer>,
    /// Large bodies tokenized at once on blocking threads: half the cores, so they
    /// never take every CPU from small requests.
    offload: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// Shutdown: readiness off once draining begins; settlements in flight counted.
    drain: Arc<Drain>,
    /// When the last complete reading of the window gauges started; held while one runs,
    /// so scrapes read the store one at a time (see [`Limiter::observe_windows_once`]).
    windows_read: tokio::sync::Mutex<Option<Instant>>,
}

/// The client's secret: `Authorization: Bearer <key>`, else Azure's `api-key: <key>`.
fn client_secret<'a>(req: &ClientRequest<'a>) -> Option<&'a str> {
    bearer(req.authorization).or_else(|| req.api_key.map(str::trim).filter(|key| !key.is_empty()))
}

/// The bearer secret from an `Authorization` value (`Bearer <key>`, any case).
pub(crate) fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The OpenTelemetry GenAI `gen_ai.operation.name` of an endpoint.
fn operation_name(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => Some("chat"),
        Endpoint::Completions => Some("text_completion"),
        Endpoint::Embeddings => Some("embeddings"),
        Endpoint::Other => None,
    }
}

/// The span's `llm_ratelimit.decision` for an answer given before or instead of a decision.
fn refusal(answer: &Answer) -> &'static str {
    match answer.status {
        401 => "unauthorized",
        503 => "unavailable",
        429 => "denied",
        _ => "invalid_request",
    }
}

/// What the current span (admission) learns once the request is understood.
fn record_understood(u: &Understood) {
    if !telemetry::enabled() {
        return;
    }
    telemetry::record("llm_ratelimit.key", u.spec.name.as_str());
    if let Some(op) = operation_name(u.endpoint) {
        telemetry::record("gen_ai.operation.name", op);
    }
    if !u.request.model.is_empty() {
        telemetry::record_text("gen_ai.request.model", &u.request.model);
    }
    telemetry::record("gen_ai.usage.input_tokens", u.want.input_tokens);
    telemetry::record("gen_ai.request.max_tokens", u.want.output_tokens);
}

/// How to read the response travels inside the settlement handle:
/// `<endpoint letter><encoding letter><engine handle>`.
const ENDPOINTS: [(Endpoint, char); 5] = [
    (Endpoint::ChatCompletions, 'c'),
    (Endpoint::Completions, 't'),
    (Endpoint::Embeddings, 'e'),
    (Endpoint::Responses, 'r'),
    (Endpoint::Other, 'o'),
];
const ENCODINGS: [(Encoding, char); 2] = [(Encoding::O200k, 'o'), (Encoding::Cl100k, 'k')];

fn letter<T: PartialEq + Copy>(table: &[(T, char)], value: T) -> char {
    table
        .iter()
        .find(|(v, _)| *v == value)
        .map_or('?', |(_, c)| *c)
}

fn from_letter<T: Copy>(table: &[(T, char)], c: char) -> Option<T> {
    table.iter().find(|(_, l)| *l == c).map(|(v, _)| *v)
}

/// A settlement handle read back: how to read the response, and what to settle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    pub endpoint: Endpoint,
    pub encoding: Encoding,
    pub reservation: Claim,
}

impl Handle {
    pub fn encode(endpoint: Endpoint, model: &str, reservation: &Claim) -> String {
        format!(
            "{}{}{}",
            letter(&ENDPOINTS, endpoint),
            letter(&ENCODINGS, Encoding::for_model(model)),
            reservation.handle()
        )
    }

    /// `None` for anything that is not one of ours.
    pub fn parse(handle: &str) -> Option<Handle> {
        let mut chars = handle.chars();
        let endpoint = from_letter(&ENDPOINTS, chars.next()?)?;
        let encoding = from_letter(&ENCODINGS, chars.next()?)?;
        Some(Handle {
            endpoint,
            encoding,
            reservation: Claim::from_handle(chars.as_str())?,
        })
    }

    /// A meter for the response this handle's request gets.
    pub fn meter(&self) -> OutputMeter {
        OutputMeter::with_encoding(self.endpoint, self.encoding)
    }
}

impl Limiter {
    pub fn new(config: Arc<ArcSwap<Config>>, store: Store, metrics: Arc<Metrics>) -> Limiter {
        Limiter {
            config,
            store,
            tokenizer: Arc::new(Tokenizer::new()),
            offload: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            )),
            metrics,
            drain: Arc::new(Drain::default()),
            windows_read: tokio::sync::Mutex::new(None),
        }
    }

    /// The node's shutdown state (see [`crate::shutdown`]).
    pub fn drain(&self) -> &Arc<Drain> {
        &self.drain
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Who is asking and for what: the key from the request's headers, the request
    /// understood (input tokens counted, output reservation decided), or the answer to
    /// give instead. A body above [`OFFLOAD_BYTES`] is tokenized on a blocking thread.
    async fn understand(
        &self,
        config: &Config,
        req: &ClientRequest<'_>,
    ) -> Result<Understood, Answer> {
        let Some(secret) = client_secret(req) else {
            self.metrics.reject("unauthorized");
            return Err(Answer::invalid_api_key(
                req.authorization.is_none() && req.api_key.is_none(),
            ));
        };
        let Some(spec) = config.key_by_secret(secret) else {
            self.metrics.reject("unauthorized");
            return Err(Answer::invalid_api_key(false));
        };
        if req.body.len() > config.max_body_bytes() {
            self.metrics.reject("body_too_large");
            return Err(Answer::body_too_large(config.max_body_bytes()));
        }
        let route = Route::from_path(req.path).map_err(|e| {
            self.metrics.reject("invalid_request");
            Answer::invalid_request(&e.to_string(), None)
        })?;
        let endpoint = route.endpoint;
        // A request with a body (or a POST) asks the upstream to do work: it is metered,
        // or, when its endpoint is not one the limiter can meter, refused — else it could
        // reach a lenient upstream uncounted. A bodiless GET, HEAD, DELETE counts one request.
        let carries_work = req.method.eq_ignore_ascii_case("POST") || !req.body.is_empty();
        let metered = endpoint != Endpoint::Other && carries_work;
        if endpoint == Endpoint::Other
            && carries_work
            && config.unknown_endpoints() == UnknownEndpoints::Deny
        {
            self.metrics.reject("unknown_endpoint");
            return Err(Answer::unknown_endpoint(req.method));
        }
        // Azure routes by the deployment in the path: its model, as configured, else the
        // deployment's own name, picks the tokenizer.
        let model_hint = route
            .deployment
            .as_deref()
            .map(|d| config.azure_model(d).unwrap_or(d).to_owned());
        let from_path = model_hint.is_some();
        let request = match if metered {
            self.understand_body(endpoint, req.body, model_hint).await
        } else {
            self.tokenizer.understand(Endpoint::Other, b"")
        } {
            // A deployment in the path already named the model (mapped once, not twice).
            Ok(request) if from_path => Ok(request),
            Ok(request) => self.deployment_in_body(config, request, req.body).await,
            Err(e) => Err(e),
        }
        .map_err(|e| {
            self.metrics.reject("invalid_request");
            Answer::invalid_request(&e.message, e.param.as_deref())
        })?;
        // Each completion asked for (`n`, `best_of` × prompts) may produce the whole budget.
        let output_reserved = if request.reserves_output {
            request
                .max_output_tokens
                .unwrap_or(config.default_max_output_tokens())
                .saturating_mul(request.completions)
        } else {
            0
        };
        let want = Usage {
            requests: 1,
            input_tokens: request.input_tokens,
            output_tokens: output_reserved,
        };
        Ok(Understood {
            spec: spec.clone(),
            endpoint,
            request,
            want,
        })
    }

    /// Azure's v1 API (`/openai/v1/chat/completions`) and its Responses API
    /// (`/openai/responses`) take the deployment in the body's `model`, so a body `model`
    /// that names a configured deployment is metered as that deployment's model, like a
    /// deployment in the path: else `prod-gpt4o` would escape the `gpt-4o` entry of
    /// `models` (and be tokenized as an unknown model). The body is counted again only
    /// when the mapped model uses another encoding.
    async fn deployment_in_body(
        &self,
        config: &Config,
        request: LlmRequest,
        body: &[u8],
    ) -> Result<LlmRequest, RequestError> {
        let Some(model) = config
            .azure_model(&request.model)
            .filter(|m| *m != request.model)
        else {
            return Ok(request);
        };
        if Encoding::for_model(model) == Encoding::for_model(&request.model) {
            return Ok(LlmRequest {
                model: model.to_owned(),
                ..request
            });
        }
        self.understand_body(request.endpoint, body, Some(model.to_owned()))
            .await
    }

    /// Parses and tokenizes a body. A small one is done in place (a few µs); a large one
    /// (up to milliseconds per MiB) on a blocking thread, at most `offload` at once, so
    /// large bodies never stall the async workers that answer small requests. The slot
    /// goes with the blocking work, which runs to its end even when the caller stops
    /// waiting (a deadline, the request timeout): released with the caller, it let one more
    /// body onto the blocking threads per caller that gave up, each with a copy of its body.
    async fn understand_body(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        model_hint: Option<String>,
    ) -> Result<LlmRequest, RequestError> {
        // The semaphore is never closed; were it, the body is tokenized in place.
        let permit = if body.len() > OFFLOAD_BYTES {
            self.offload.clone().acquire_owned().await.ok()
        } else {
            None
        };
        let Some(permit) = permit else {
            return self
                .tokenizer
                .understand_with(endpoint, body, model_hint.as_deref());
        };
        let (tokenizer, body) = (self.tokenizer.clone(), body.to_vec());
        let work = move || {
            let _slot = permit;
            tokenizer.understand_with(endpoint, &body, model_hint.as_deref())
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            // The task panicked (a bug): answer as for a body we could not read.
            Err(_) => Err(RequestError::unparsable_body()),
        }
    }

    /// Authentication and counting only, no store call: for the wiring where Envoy's
    /// `ratelimit` filter charges the counts (`envoy/ratelimit-filter.yaml`).
    pub async fn count(&self, req: ClientRequest<'_>) -> Verdict {
        let config = self.config.load_full();
        let understood = self.understand(&config, &req).await;
        match &understood {
            Ok(u) => {
                record_understood(u);
                telemetry::record("llm_ratelimit.decision", "counted");
            }
            Err(answer) => telemetry::record("llm_ratelimit.decision", refusal(answer)),
        }
        match understood {
            Ok(u) => Verdict {
                answer: Answer {
                    status: 200,
                    headers: Vec::new(),
                    body: String::new(),
                },
                admitted: Some(Admitted {
                    key: u.spec.name,
                    reservation: None,
                    input_tokens: u.want.input_tokens,
                    output_reserved: u.want.output_tokens,
                    model: u.request.model,
                }),
            },
            Err(answer) => answer.into(),
        }
    }

    /// Admission: every limit that applies reserved at once, or a denial that records nothing.
    pub async fn check(&self, req: ClientRequest<'_>) -> Verdict {
        let config = self.config.load_full();
        let Understood {
            spec,
            endpoint,
            request,
            want,
        } = match self.understand(&config, &req).await {
            Ok(u) => {
                record_understood(&u);
                u
            }
            Err(answer) => {
                telemetry::record("llm_ratelimit.decision", refusal(&answer));
                return answer.into();
            }
        };
        let output_reserved = want.output_tokens;
        let applied = config.limits_for(&spec, model_of(&request));
        let set: Vec<Bound> = applied.iter().map(|a| a.bound.clone()).collect();
        let started = Instant::now();
        let decision = self
            .store
            .reserve_all(
                &set,
                &want,
                Charge::Check,
                request.reserves_output.then(rand::random::<u64>),
            )
            .await;
        self.metrics
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(key = %spec.name, error = %e, "store failed; answering 503");
                self.store_failed(&e);
                self.metrics.reject("store_unavailable");
                telemetry::record("llm_ratelimit.decision", "unavailable");
                return Answer::store_unavailable().into();
            }
        };
        let key = spec.name.to_string();
        match decision {
            Decided::Admitted { snapshots, claim } => {
                self.record_admission(&key, &want);
                let (limits, snapshot) = headline_of(&applied, &snapshots);
                if claim.is_some() {
                    self.metrics.reservations.inc();
                }
                telemetry::record("llm_ratelimit.decision", "admitted");
                tracing::debug!(key = %spec.name, input_tokens = want.input_tokens, "admitted");
                Verdict {
                    answer: Answer::admitted(&limits, &snapshot),
                    admitted: Some(Admitted {
                        key: spec.name.clone(),
                        reservation: claim.map(|c| Handle::encode(endpoint, &request.model, &c)),
                        input_tokens: want.input_tokens,
                        output_reserved,
                        model: request.model.clone(),
                    }),
                }
            }
            Decided::Denied {
                snapshots,
                ring,
                limit,
                retry_after_ms,
            } => {
                telemetry::record("llm_ratelimit.decision", "denied");
                telemetry::record("llm_ratelimit.limit", limit.as_str());
                tracing::debug!(key = %spec.name, limit = limit.as_str(), "denied");
                self.record_denial(key, &applied, ring, limit);
                denial(
                    &spec,
                    &applied,
                    &snapshots,
                    ring,
                    limit,
                    &want,
                    retry_after_ms,
                )
                .into()
            }
        }
    }

    fn store_failed(&self, e: &StoreError) {
        self.metrics
            .store_errors
            .get_or_create(&StoreErrorLabels { kind: e.kind() })
            .inc();
    }

    /// [`Limiter::observe_windows`] for a scrape, one reading at a time: a scrape that
    /// arrives while another reads waits for it, and takes the next complete reading that
    /// started after it arrived — its own, or one a scrape waiting with it started. So
    /// what a scrape shows is never older than the scrape, while any number of scrapes at
    /// once cost at most two readings (one store call per key each) rather than one each:
    /// `/metrics` passes no gate, and each reading costs a store call per key.
    pub async fn observe_windows_once(&self) {
        let arrived = Instant::now();
        let mut last = self.windows_read.lock().await;
        if last.is_some_and(|started| started >= arrived) {
            return;
        }
        let started = Instant::now();
        self.observe_windows().await;
        *last = Some(started);
    }

    /// Sets the window gauges (`llm_ratelimit_window_*`) of every configured key from
    /// the store, for every limit set the key is held to (its own per window and per day,
    /// each `models` entry, its pool's), one store call per key (per eight rings), a few
    /// keys at a time; a key whose windows cannot be read is left out. Keys no longer
    /// configured disappear with the next scrape. Cancelled before every read has answered, it changes nothing.
    pub async fn observe_windows(&self) {
        use futures_util::StreamExt;
        let config = self.config.load_full();
        let store = &self.store;
        let config_ref = &config;
        let reads = futures_util::stream::iter(config.keys().to_vec())
            .map(|spec| async move {
                let applied = config_ref.all_limits_of(&spec);
                let rings: Vec<RingRef> = applied.iter().map(|a| a.bound.ring.clone()).collect();
                // A key with many `models` entries has more rings than one call takes.
                let read = async {
                    let mut all = Vec::with_capacity(rings.len());
                    for chunk in rings.chunks(crate::engine::rings::MAX_RINGS) {
                        all.extend(store.usage_all(chunk).await?);
                    }
                    Ok::<_, StoreError>(all)
                };
                let read = read.await.and_then(|v| {
                    if v.len() == applied.len() {
                        Ok(v)
                    } else {
                        Err(StoreError::Protocol(format!(
                            "usage answered for {} rings of {}",
                            v.len(),
                            applied.len()
                        )))
                    }
                });
                (spec, applied, read)
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let m = &self.metrics;
        m.window_used.clear();
        m.window_limit.clear();
        m.window_utilization.clear();
        for (spec, applied, read) in reads {
            let snapshots = match read {
                Ok(s) => s,
                Err(e) => {
                    self.store_failed(&e);
                    continue;
                }
            };
            for (a, snapshot) in applied.iter().zip(&snapshots) {
                let scope = a.scope.metric_scope();
                for kind in LimitKind::ALL {
                    let (used, limit) = (snapshot.usage.of(kind), a.bound.limits.of(kind));
                    // A limit the entry leaves out is not a limit: no series for it.
                    if limit == crate::config::Config::UNLIMITED {
                        continue;
                    }
                    let labels = WindowLabels {
                        key: spec.name.to_string(),
                        limit: kind.as_str(),
                        scope: scope.clone(),
                    };
                    m.window_used.get_or_create(&labels).set(used as i64);
                    m.window_limit.get_or_create(&labels).set(limit as i64);
                    if limit > 0 {
                        m.window_utilization
                            .get_or_create(&labels)
                            .set(used as f64 / limit as f64);
                    }
                }
            }
        }
    }

    /// Counts an admission in the metrics: the decision and the tokens it recorded.
    fn record_admission(&self, key: &str, want: &Usage) {
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                key: key.to_string(),
                outcome: "admitted",
                scope: "all".into(),
            })
            .inc();
        self.count_tokens(key, "input", want.input_tokens);
        self.count_tokens(key, "output_reserved", want.output_tokens);
    }

    /// Counts a denial: the limit and the limit set (`applied[ring]`) that denied.
    fn record_denial(&self, key: String, applied: &[Applied], ring: usize, limit: LimitKind) {
        let scope = applied
            .get(ring)
            .map_or_else(|| "window".to_string(), |a| a.scope.metric_scope());
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                key,
                outcome: limit.as_str(),
                scope,
            })
            .inc();
    }

    fn count_tokens(&self, key: &str, kind: &'static str, n: u64) {
        if n > 0 {
            self.metrics
                .tokens
                .get_or_create(&TokenLabels {
                    key: key.to_string(),
                    kind,
                })
                .inc_by(n);
        }
    }

    /// Settles a reservation from the upstream's response: its usage, or the tokens of
    /// its streamed text; an upstream error without usage releases the reservation. A
    /// response that shows nothing usable leaves the reservation as it was.
    pub async fn settle(
        &self,
        reservation: &Claim,
        upstream_status: Option<u16>,
        meter: OutputMeter,
    ) -> Result<Report, Answer> {
        telemetry::record("llm_ratelimit.key", reservation.key().as_str());
        let failed = upstream_status.is_some_and(|s| s >= 400);
        let tokens = match meter.finish(&self.tokenizer) {
            Some(count) => Some(count.tokens),
            None if failed => Some(0),
            None => None,
        };
        let Some(tokens) = tokens else {
            telemetry::record("llm_ratelimit.settlement", "no_usage");
            self.metrics
                .settlements
                .get_or_create(&OutcomeLabels {
                    outcome: "no_usage",
                })
                .inc();
            return Ok(Report {
                output_tokens: None,
                settlement: None,
            });
        };
        let key = reservation.key();
        let started = Instant::now();
        let settlements = self.store.settle_all(reservation, tokens).await;
        self.metrics
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        let settlements = settlements.map_err(|e| {
            tracing::warn!(key = %key, error = %e, "store failed while settling");
            self.store_failed(&e);
            self.metrics.reject("store_unavailable");
            telemetry::record("llm_ratelimit.settlement", "unavailable");
            Answer::store_unavailable()
        })?;
        telemetry::record("gen_ai.usage.output_tokens", tokens);
        let settlement = summary(&settlements);
        let outcome = match settlement {
            Settlement::Applied { .. } => {
                self.count_tokens(key.as_str(), "output_settled", tokens);
                "applied"
            }
            Settlement::Expired => "expired",
            Settlement::Unknown => "unknown",
        };
        telemetry::record("llm_ratelimit.settlement", outcome);
        tracing::debug!(key = %key, output_tokens = tokens, outcome, "settled");
        self.metrics
            .settlements
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        Ok(Report {
            output_tokens: Some(tokens),
            settlement: Some(settlement),
        })
    }

    /// Envoy's `ratelimit` filter path: charges `want` to the key whose secret is given,
    /// against every limit that applies to it (for `model`, when the descriptors name
    /// one) at once; with `Charge::Force` (after the response) never denied. With a
    /// `marker`, [`Limiter::refund`] can give the charge back to its own buckets.
    pub async fn charge(
        &self,
        secret: &str,
        model: Option<&str>,
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Charged {
        let config = self.config.load();
        let secret = bearer(Some(secret)).unwrap_or(secret.trim());
        let Some(spec) = config.key_by_secret(secret) else {
            telemetry::record("llm_ratelimit.decision", "unknown_key");
            return Charged::UnknownKey;
        };
        if telemetry::enabled() {
            telemetry::record("llm_ratelimit.key", spec.name.as_str());
            if want.input_tokens > 0 {
                telemetry::record("gen_ai.usage.input_tokens", want.input_tokens);
            }
            // After the response (`apply_on_stream_done`) the output hits are real usage.
            if charge == Charge::Force && want.output_tokens > 0 {
                telemetry::record("gen_ai.usage.output_tokens", want.output_tokens);
            }
        }
        let applied = config.limits_for(spec, model);
        let set: Vec<Bound> = applied.iter().map(|a| a.bound.clone()).collect();
        let started = Instant::now();
        let decision = self.store.reserve_all(&set, want, charge, marker).await;
        self.metrics
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        match decision {
            Ok(Decided::Admitted { snapshots, claim }) => {
                telemetry::record("llm_ratelimit.decision", "admitted");
                self.record_admission(&spec.name.to_string(), want);
                let (limits, snapshot) = headline_of(&applied, &snapshots);
                Charged::Admitted {
                    key: spec.name.clone(),
                    limits,
                    snapshot,
                    claimed: claim.is_some(),
                }
            }
            Ok(Decided::Denied {
                snapshots,
                ring,
                limit,
                retry_after_ms,
            }) => {
                telemetry::record("llm_ratelimit.decision", "denied");
                telemetry::record("llm_ratelimit.limit", limit.as_str());
                self.record_denial(spec.name.to_string(), &applied, ring, limit);
                let answer = denial(
                    spec,
                    &applied,
                    &snapshots,
                    ring,
                    limit,
                    want,
                    retry_after_ms,
                );
                // The denying ring's own window for the statuses (the store names one of
                // the rings it was given; were it not, the headline's).
                let (limits, snapshot, window) = match (applied.get(ring), snapshots.get(ring)) {
                    (Some(a), Some(s)) => (
                        a.bound.limits,
                        *s,
                        Duration::from_millis(a.bound.ring.shape.window_ms()),
                    ),
                    _ => {
                        let (limits, snapshot) = headline_of(&applied, &snapshots);
                        (limits, snapshot, config.window())
                    }
                };
                Charged::Denied {
                    limits,
                    snapshot,
                    window,
                    answer,
                }
            }
            Err(e) => {
                tracing::warn!(key = %spec.name, error = %e, "store failed; answering 503");
                self.store_failed(&e);
                self.metrics.reject("store_unavailable");
                telemetry::record("llm_ratelimit.decision", "unavailable");
                Charged::Failed(Answer::store_unavailable())
            }
        }
    }

    /// Envoy's `is_negative_hits`: gives `amount` back to every limit that applies to the
    /// key (for `model`) — to the bucket of the charge `marker` names while it is in the
    /// window, else from the newest buckets.
    pub async fn refund(
        &self,
        secret: &str,
        model: Option<&str>,
        amount: &Usage,
        marker: Option<u64>,
    ) -> Charged {
        let config = self.config.load();
        let secret = bearer(Some(secret)).unwrap_or(secret.trim());
        let Some(spec) = config.key_by_secret(secret) else {
            return Charged::UnknownKey;
        };
        let applied = config.limits_for(spec, model);
        let rings: Vec<RingRef> = applied.iter().map(|a| a.bound.ring.clone()).collect();
        match self.store.refund_all(&rings, amount, marker).await {
            Ok(snapshots) => {
                let (limits, snapshot) = headline_of(&applied, &snapshots);
                Charged::Admitted {
                    key: spec.name.clone(),
                    limits,
                    snapshot,
                    claimed: false,
                }
            }
            Err(e) => {
                tracing::warn!(key = %spec.name, error = %e, "store failed while refunding");
                self.store_failed(&e);
                Charged::Failed(Answer::store_unavailable())
            }
        }
    }

    /// A key's current windows, by name: its own limits per window (at the top level, as
    /// always), then `per_day`, each `models` entry and its pool, each when it has them.
    pub async fn usage(&self, name: &str) -> Result<serde_json::Value, Answer> {
        let config = self.config.load();
        let Some(spec) = config.key_by_name(name) else {
            return Err(Answer::not_found(&format!(
                "No key named '{name}' is configured."
            )));
        };
        let applied = config.all_limits_of(spec);
        let snapshots = self.usage_of(&applied).await?;
        let mut out = serde_json::json!({
            "key": spec.name.as_str(),
            "window_ms": config.shape().window_ms(),
            "precision_ms": config.shape().precision_ms(),
        });
        let mut models = Vec::new();
        let mut pool = serde_json::Map::new();
        for (a, snap) in applied.iter().zip(&snapshots) {
            let parts = usage_parts(&a.bound.limits, snap);
            match &a.scope {
                LimitScope::Key => merge(&mut out, parts),
                LimitScope::KeyDay => out["per_day"] = parts,
                LimitScope::Model(m) => {
                    let mut entry = serde_json::json!({ "match": m.as_str() });
                    merge(&mut entry, parts);
                    models.push(entry);
                }
                LimitScope::Pool(p) => {
                    pool.insert("name".into(), p.as_str().into());
                    let mut window = serde_json::json!({});
                    merge(&mut window, parts);
                    for (k, v) in window.as_object().into_iter().flatten() {
                        pool.insert(k.clone(), v.clone());
                    }
                }
                LimitScope::PoolDay(p) => {
                    pool.insert("name".into(), p.as_str().into());
                    pool.insert("per_day".into(), parts);
                }
            }
        }
        if !models.is_empty() {
            out["models"] = models.into();
        }
        if !pool.is_empty() {
            out["pool"] = pool.into();
        }
        Ok(out)
    }

    /// A pool's current windows, by name: its limits per window and per day, and the keys
    /// that count against it.
    pub async fn pool_usage(&self, name: &str) -> Result<serde_json::Value, Answer> {
        let config = self.config.load();
        let Some(pool) = config.pool_by_name(name) else {
            return Err(Answer::not_found(&format!(
                "No pool named '{name}' is configured."
            )));
        };
        let applied = config.pool_limits(pool);
        let snapshots = self.usage_of(&applied).await?;
        let members: Vec<&str> = config
            .keys()
            .iter()
            .filter(|k| k.pool.as_ref() == Some(&pool.name))
            .map(|k| k.name.as_str())
            .collect();
        let mut out = serde_json::json!({
            "pool": pool.name.as_str(),
            "keys": members,
            "window_ms": config.shape().window_ms(),
            "precision_ms": config.shape().precision_ms(),
        });
        for (a, snap) in applied.iter().zip(&snapshots) {
            let parts = usage_parts(&a.bound.limits, snap);
            match a.scope {
                LimitScope::PoolDay(_) => out["per_day"] = parts,
                _ => merge(&mut out, parts),
            }
        }
        Ok(out)
    }

    /// The windows of `applied`, a few rings per store call (one hash tag each).
    async fn usage_of(&self, applied: &[Applied]) -> Result<Vec<Snapshot>, Answer> {
        let rings: Vec<RingRef> = applied.iter().map(|a| a.bound.ring.clone()).collect();
        let mut out = Vec::with_capacity(rings.len());
        for chunk in rings.chunks(crate::engine::rings::MAX_RINGS) {
            let snaps = self
                .store
                .usage_all(chunk)
                .await
                .map_err(|_| Answer::store_unavailable())?;
            out.extend(snaps);
        }
        Ok(out)
    }

    /// Frees the store's state of keys and window shapes the config in force no longer
    /// has (a renamed key, a changed window): called after each applied reload.
    pub fn forget_unconfigured(&self) {
        let rings = self.config.load().rings();
        self.store.retain(|ring| rings.contains(ring));
    }

    pub async fn ready(&self) -> bool {
        !self.drain.is_draining() && self.store.ping().await.is_ok()
    }
}

/// A request's model as the config's `models` entries match it; `None` when it has none.
fn model_of(request: &LlmRequest) -> Option<&str> {
    Some(request.model.as_str()).filter(|m| !m.is_empty())
}

/// What the `x-ratelimit-*` headers describe: per limit, the per-window ring with the
/// least room left.
fn headline_of(applied: &[Applied], snapshots: &[Snapshot]) -> (Limits, Snapshot) {
    let per_window: Vec<(Limits, Snapshot)> = applied
        .iter()
        .zip(snapshots)
        .filter(|(a, _)| a.scope.per_window())
        .map(|(a, s)| (a.bound.limits, *s))
        .collect();
    headline(&per_window)
}

/// The 429 for a denial by ring `ring` of `applied`.
fn denial(
    spec: &KeySpec,
    applied: &[Applied],
    snapshots: &[Snapshot],
    ring: usize,
    limit: crate::engine::LimitKind,
    want: &Usage,
    retry_after_ms: Option<u64>,
) -> Answer {
    let (limits, snapshot) = headline_of(applied, snapshots);
    let (Some(a), Some(s)) = (applied.get(ring), snapshots.get(ring)) else {
        // The store named a ring the call did not have: answer as the key's own.
        return Answer::rate_limited(&spec.name, &limits, &snapshot, limit, want, retry_after_ms);
    };
    Answer::rate_limited_in(
        &format!("{}{}", spec.name, a.scope.describe()),
        (&a.bound.limits, s),
        limit,
        want,
        retry_after_ms,
        (&limits, &snapshot),
    )
}

/// One settlement for a claim on several rings: applied if any ring took it, else expired
/// if any ring had the reservation, else unknown.
fn summary(settlements: &[Settlement]) -> Settlement {
    settlements
        .iter()
        .find(|s| matches!(s, Settlement::Applied { .. }))
        .or_else(|| settlements.iter().find(|s| **s == Settlement::Expired))
        .copied()
        .unwrap_or(Settlement::Unknown)
}

/// `requests`, `input_tokens`, `output_tokens`, each with `used`, `limit` (`null` when
/// unlimited), `remaining` and `reset_ms`.
fn usage_parts(limits: &Limits, snap: &Snapshot) -> serde_json::Value {
    let part = |kind: crate::engine::LimitKind| {
        let (used, limit) = (snap.usage.of(kind), limits.of(kind));
        let reset_ms = snap.reset(kind).as_millis() as u64;
        if limit >= Config::UNLIMITED {
            serde_json::json!({"used": used, "limit": null, "remaining": null, "reset_ms": reset_ms})
        } else {
            serde_json::json!({"used": used, "limit": limit, "remaining": limit.saturating_sub(used), "reset_ms": reset_ms})
        }
    };
    serde_json::json!({
        "requests": part(crate::engine::LimitKind::Requests),
        "input_tokens": part(crate::engine::LimitKind::InputTokens),
        "output_tokens": part(crate::engine::LimitKind::OutputTokens),
    })
}

/// Adds the fields of object `from` to object `into`.
fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_read_from_the_authorization_header() {
        assert_eq!(bearer(Some("Bearer sk-1")), Some("sk-1"));
        assert_eq!(bearer(Some("bearer   sk-1 ")), Some("sk-1"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_body_holds_its_tokenizing_slot_until_tokenized_even_if_the_caller_gives_up() {
        let config = Config::parse(
            "keys:\n  - name: a\n    key: sk-offload\n    rpm: 1\n    input_tpm: 1\n    output_tpm: 1\n",
            "k.yaml",
        )
        .unwrap();
        let limiter = Limiter::new(
            Arc::new(ArcSwap::from_pointee(config)),
            Store::Memory(crate::engine::memory::MemoryStore::new()),
            Arc::new(Metrics::default()),
        );
        let slots = limiter.offload.available_permits();
        // A body that takes a while to tokenize (one long run of letters: ~0.1 s in a
        // release build, more in a debug one) ...
        let body = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "a".repeat(256 << 10)
        );
        // ... whose caller gives up at once (a gRPC deadline, the request timeout).
        let gave_up = tokio::time::timeout(
            Duration::from_millis(1),
            limiter.understand_body(Endpoint::ChatCompletions, body.as_bytes(), None),
        )
        .await;
        assert!(gave_up.is_err(), "tokenized within 1 ms");
        // The tokenizing goes on, and keeps its slot: else every caller that gives up lets
        // one more body onto the blocking threads, past the bound of half the cores.
        assert!(
            limiter.offload.available_permits() < slots,
            "the slot was given back while the body is still being tokenized"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while limiter.offload.available_permits() < slots {
            assert!(Instant::now() < deadline, "the slot never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn handles_carry_endpoint_encoding_and_reservation() {
        let shape = crate::engine::WindowShape::new(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis(100),
        )
        .unwrap();
        let reservation = Claim {
            rings: vec![RingRef::own(&KeyName::new("team.a").unwrap(), shape)],
            id: 42,
        };
        let h = Handle::encode(
            Endpoint::Completions,
            "gpt-3.5-turbo-instruct",
            &reservation,
        );
        let back = Handle::parse(&h).unwrap();
        assert_eq!(back.endpoint, Endpoint::Completions);
        assert_eq!(back.encoding, Encoding::Cl100k);
        assert_eq!(back.reservation, reservation);
        assert!(Handle::parse("zz").is_none());
        assert!(Handle::parse(&h[1..]).is_none());
    }
}

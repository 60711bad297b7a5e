//! The request path, in one place for every caller (HTTP `/v1/check` and `/v1/report`
//! now, Envoy's gRPC APIs next): key from the bearer header → the OpenAI request
//! understood (input tokens, output reservation) → one store call → an [`Answer`].

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::answer::Answer;
use tokio::sync::Semaphore;

use crate::config::{Config, KeySpec, UnknownEndpoints};
use crate::engine::{Charge, Decision, KeyName, Reservation, Settlement, Store, Usage};
use crate::metrics::{DecisionLabels, Metrics, OutcomeLabels, TokenLabels};
use crate::openai::{Encoding, Endpoint, LlmRequest, OutputMeter, RequestError, Route, Tokenizer};

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
    /// Recorded; `limits` and `snapshot` give the headers.
    Admitted {
        key: KeyName,
        limits: crate::engine::Limits,
        snapshot: crate::engine::Snapshot,
    },
    /// Not recorded: the 429 to give.
    /// Not recorded: the 429 to give, and the window that denied it (for the statuses).
    Denied {
        limits: crate::engine::Limits,
        snapshot: crate::engine::Snapshot,
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
    offload: Semaphore,
    metrics: Arc<Metrics>,
}

/// The client's secret: `Authorization: Bearer <key>`, else Azure's `api-key: <key>`.
fn client_secret<'a>(req: &ClientRequest<'a>) -> Option<&'a str> {
    bearer(req.authorization).or_else(|| req.api_key.map(str::trim).filter(|key| !key.is_empty()))
}

/// The bearer secret from an `Authorization` value (`Bearer <key>`, any case).
fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
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
    pub reservation: Reservation,
}

impl Handle {
    pub fn encode(endpoint: Endpoint, model: &str, reservation: &Reservation) -> String {
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
            reservation: Reservation::from_handle(chars.as_str())?,
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
            offload: Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            ),
            metrics,
        }
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
        let request = if metered {
            self.understand_body(endpoint, req.body, model_hint).await
        } else {
            self.tokenizer.understand(Endpoint::Other, b"")
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

    /// Parses and tokenizes a body. A small one is done in place (a few µs); a large one
    /// (up to milliseconds per MiB) on a blocking thread, at most `offload` at once, so
    /// large bodies never stall the async workers that answer small requests.
    async fn understand_body(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        model_hint: Option<String>,
    ) -> Result<LlmRequest, RequestError> {
        // The semaphore is never closed; were it, the body is tokenized in place.
        let permit = if body.len() > OFFLOAD_BYTES {
            self.offload.acquire().await.ok()
        } else {
            None
        };
        let Some(_permit) = permit else {
            return self
                .tokenizer
                .understand_with(endpoint, body, model_hint.as_deref());
        };
        let (tokenizer, body) = (self.tokenizer.clone(), body.to_vec());
        let work = move || tokenizer.understand_with(endpoint, &body, model_hint.as_deref());
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
        match self.understand(&config, &req).await {
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
                }),
            },
            Err(answer) => answer.into(),
        }
    }

    /// Admission: all three limits reserved at once, or a denial that records nothing.
    pub async fn check(&self, req: ClientRequest<'_>) -> Verdict {
        let config = self.config.load_full();
        let Understood {
            spec,
            endpoint,
            request,
            want,
        } = match self.understand(&config, &req).await {
            Ok(u) => u,
            Err(answer) => return answer.into(),
        };
        let output_reserved = want.output_tokens;
        let started = Instant::now();
        let decision = self
            .store
            .reserve(
                &spec.name,
                config.shape(),
                &spec.limits,
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
                self.metrics.reject("store_unavailable");
                return Answer::store_unavailable().into();
            }
        };
        let key = spec.name.to_string();
        match decision {
            Decision::Admitted {
                snapshot,
                reservation,
            } => {
                self.record_admission(&key, &want);
                Verdict {
                    answer: Answer::admitted(&spec.limits, &snapshot),
                    admitted: Some(Admitted {
                        key: spec.name.clone(),
                        reservation: reservation
                            .map(|r| Handle::encode(endpoint, &request.model, &r)),
                        input_tokens: want.input_tokens,
                        output_reserved,
                    }),
                }
            }
            Decision::Denied {
                snapshot,
                limit,
                retry_after_ms,
            } => {
                self.metrics
                    .decisions
                    .get_or_create(&DecisionLabels {
                        key,
                        outcome: limit.as_str(),
                    })
                    .inc();
                Answer::rate_limited(
                    &spec.name,
                    &spec.limits,
                    &snapshot,
                    limit,
                    &want,
                    retry_after_ms,
                )
                .into()
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
            })
            .inc();
        self.count_tokens(key, "input", want.input_tokens);
        self.count_tokens(key, "output_reserved", want.output_tokens);
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
        reservation: &Reservation,
        upstream_status: Option<u16>,
        meter: OutputMeter,
    ) -> Result<Report, Answer> {
        let failed = upstream_status.is_some_and(|s| s >= 400);
        let tokens = match meter.finish(&self.tokenizer) {
            Some(count) => Some(count.tokens),
            None if failed => Some(0),
            None => None,
        };
        let Some(tokens) = tokens else {
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
        let settlement = self.store.settle(reservation, tokens).await.map_err(|e| {
            tracing::warn!(key = %reservation.key, error = %e, "store failed while settling");
            self.metrics.reject("store_unavailable");
            Answer::store_unavailable()
        })?;
        let outcome = match settlement {
            Settlement::Applied { .. } => {
                self.count_tokens(reservation.key.as_str(), "output_settled", tokens);
                "applied"
            }
            Settlement::Expired => "expired",
            Settlement::Unknown => "unknown",
        };
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
    /// all three limits at once; with `Charge::Force` (after the response) never denied.
    /// With a `marker`, [`Limiter::refund`] can give the charge back to its own bucket.
    pub async fn charge(
        &self,
        secret: &str,
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Charged {
        let config = self.config.load();
        let secret = bearer(Some(secret)).unwrap_or(secret.trim());
        let Some(spec) = config.key_by_secret(secret) else {
            return Charged::UnknownKey;
        };
        match self
            .store
            .reserve(
                &spec.name,
                config.shape(),
                &spec.limits,
                want,
                charge,
                marker,
            )
            .await
        {
            Ok(Decision::Admitted { snapshot, .. }) => {
                self.record_admission(&spec.name.to_string(), want);
                Charged::Admitted {
                    key: spec.name.clone(),
                    limits: spec.limits,
                    snapshot,
                }
            }
            Ok(Decision::Denied {
                snapshot,
                limit,
                retry_after_ms,
            }) => {
                self.metrics
                    .decisions
                    .get_or_create(&DecisionLabels {
                        key: spec.name.to_string(),
                        outcome: limit.as_str(),
                    })
                    .inc();
                Charged::Denied {
                    limits: spec.limits,
                    snapshot,
                    answer: Answer::rate_limited(
                        &spec.name,
                        &spec.limits,
                        &snapshot,
                        limit,
                        want,
                        retry_after_ms,
                    ),
                }
            }
            Err(e) => {
                tracing::warn!(key = %spec.name, error = %e, "store failed; answering 503");
                self.metrics.reject("store_unavailable");
                Charged::Failed(Answer::store_unavailable())
            }
        }
    }

    /// Envoy's `is_negative_hits`: gives `amount` back to the key's window — to the bucket
    /// of the charge `marker` names while it is in the window, else from the newest buckets.
    pub async fn refund(&self, secret: &str, amount: &Usage, marker: Option<u64>) -> Charged {
        let config = self.config.load();
        let secret = bearer(Some(secret)).unwrap_or(secret.trim());
        let Some(spec) = config.key_by_secret(secret) else {
            return Charged::UnknownKey;
        };
        match self
            .store
            .refund(&spec.name, config.shape(), amount, marker)
            .await
        {
            Ok(snapshot) => Charged::Admitted {
                key: spec.name.clone(),
                limits: spec.limits,
                snapshot,
            },
            Err(e) => {
                tracing::warn!(key = %spec.name, error = %e, "store failed while refunding");
                Charged::Failed(Answer::store_unavailable())
            }
        }
    }

    /// A key's current window, by name.
    pub async fn usage(&self, name: &str) -> Result<serde_json::Value, Answer> {
        let config = self.config.load();
        let Some(spec) = config.key_by_name(name) else {
            return Err(Answer::not_found(&format!(
                "No key named '{name}' is configured."
            )));
        };
        let snap = self
            .store
            .usage(&spec.name, config.shape())
            .await
            .map_err(|_| Answer::store_unavailable())?;
        let part = |used: u64, limit: u64, reset_ms: u64| serde_json::json!({"used": used, "limit": limit, "remaining": limit.saturating_sub(used), "reset_ms": reset_ms});
        Ok(serde_json::json!({
            "key": spec.name.as_str(),
            "window_ms": config.shape().window_ms(),
            "precision_ms": config.shape().precision_ms(),
            "requests": part(snap.usage.requests, spec.limits.requests, snap.reset_ms[0]),
            "input_tokens": part(snap.usage.input_tokens, spec.limits.input_tokens, snap.reset_ms[1]),
            "output_tokens": part(snap.usage.output_tokens, spec.limits.output_tokens, snap.reset_ms[2]),
        }))
    }

    /// Frees the store's state of keys and window shapes the config in force no longer
    /// has (a renamed key, a changed window): called after each applied reload.
    pub fn forget_unconfigured(&self) {
        let rings = self.config.load().rings();
        self.store.retain(|ring| rings.contains(ring));
    }

    pub async fn ready(&self) -> bool {
        self.store.ping().await.is_ok()
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

    #[test]
    fn handles_carry_endpoint_encoding_and_reservation() {
        let reservation = Reservation {
            key: KeyName::new("team.a").unwrap(),
            shape: crate::engine::WindowShape::new(
                std::time::Duration::from_secs(60),
                std::time::Duration::from_millis(100),
            )
            .unwrap(),
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

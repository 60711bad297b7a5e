//! `RateLimitService/ShouldRateLimit`: Envoy's standard rate-limit API driving the same
//! sliding-window engine, for the `ratelimit` filter.
//!
//! A descriptor is ours when it has an `api_key` entry (the bearer secret, with or without
//! `Bearer `; of several, the one Check would take, see `secret_of`). Its optional `limit`
//! entry names the limit it is held to (`requests`,
//! `input_tokens`, `output_tokens`; default `requests`; any other value refuses the whole
//! call — a typo must not mean "unlimited"), and it asks for `hits_addend` (the
//! descriptor's, else the request's, else 1). A `phase: response` entry marks a charge
//! made after the response (`apply_on_stream_done`): recorded, never denied.
//! `is_negative_hits` gives the amount back: to the bucket the request's admission charged
//! when the descriptor carries its `request_id` (Envoy's `x-request-id`), else from the
//! newest buckets. Descriptors of one key in one call are charged together in one atomic
//! store call; across keys the call is all or nothing too: every charge leaves a marker,
//! and a denial or a store failure on a later key gives the earlier charges back to their
//! own buckets. Other descriptors are OK, as in envoyproxy/ratelimit. An OK answer sets
//! dynamic metadata `admitted`; an after-response descriptor counts only with an
//! `admitted: true` entry taken from it (see envoy/ratelimit-filter.yaml), so a request
//! Envoy answered 429 is never charged. A call with more than [`MAX_DESCRIPTORS`]
//! descriptors, or a descriptor of more than [`MAX_ENTRIES`] entries, is refused whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, Struct, Value};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::admission::{bearer, Charged, Limiter};
use crate::answer::rate_limit_headers;
use crate::config::Config;
use crate::engine::{Charge, LimitKind, Limits, Snapshot, Usage};
use crate::telemetry::{self, TraceHeaders};
use tracing::Instrument;

/// Dynamic metadata (namespace `envoy.filters.http.ratelimit`) set on an admitted stream.
pub const ADMITTED_FIELD: &str = "admitted";

pub struct RateLimiter {
    limiter: Arc<Limiter>,
}

impl RateLimiter {
    pub fn new(limiter: Arc<Limiter>) -> RateLimiter {
        RateLimiter { limiter }
    }
}

/// One of our descriptors, read.
struct Ask {
    secret: String,
    kind: LimitKind,
    hits: u64,
    after_response: bool,
    refund: bool,
    /// The request's `x-request-id` (descriptor entry `request_id`), when Envoy sends it:
    /// it names the charge a later refund gives back to.
    request_id: Option<String>,
    /// The request's model (descriptor entry `model`): picks the key's `models` entry.
    model: Option<String>,
}

/// The store marker of a charge made for `request_id` in one phase. A refund names the
/// admission-phase charge of its request; hashing keeps the client-visible id (and its
/// length) out of Redis keys.
fn marker_of(request_id: &str, phase: &str) -> u64 {
    let digest = Sha256::digest(format!("{phase}\0{request_id}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
}

/// The most descriptors one call may carry. The shipped Envoy wiring sends three (four
/// with the after-response one); without a bound, one call of a few MB (hundreds of
/// thousands of descriptors, each naming a different secret) held a runtime worker for
/// minutes: grouping compares each descriptor with every group so far, and no await
/// point lets the request timeout cut it short.
pub const MAX_DESCRIPTORS: usize = 256;

/// The most entries one descriptor may have (Envoy's configs here send at most six). Each
/// `api_key` entry is hashed to find its key, so one descriptor of 200,000 entries (a
/// 4 MiB call) would hold a worker for tens of milliseconds.
pub const MAX_ENTRIES: usize = 64;

/// A descriptor that names a limit we do not have. Holding the key to no limit would
/// make a typo in Envoy's config an unlimited key, so the whole call is refused.
struct UnknownLimit(String);

/// The secret a descriptor's `api_key` entries name, read as ext_authz reads the headers
/// they come from (Envoy adds an entry per header present, e.g. `api-key` and
/// `authorization`): a `Bearer` credential first, else a plain key the config knows. An
/// entry that is neither (an `Authorization: Basic ...` beside a valid `api-key`) must not
/// hide the key ext_authz admitted the request as: the request would be charged to no one.
fn secret_of(values: &[&str], config: &Config) -> Option<String> {
    if let Some(key) = values.iter().rev().find_map(|v| bearer(Some(v))) {
        return Some(key.to_string());
    }
    values
        .iter()
        .map(|v| v.trim())
        .find(|v| config.key_by_secret(v).is_some())
        .or_else(|| values.last().map(|v| v.trim()))
        .map(str::to_string)
}

/// Reads one descriptor: `Ok(None)` when it is not ours (no `api_key`) or is an
/// after-response charge for a request that was not admitted.
fn read(
    d: &RateLimitDescriptor,
    request_hits: u32,
    config: &Config,
) -> Result<Option<Ask>, UnknownLimit> {
    let mut secrets = Vec::new();
    let mut kind = LimitKind::Requests;
    let mut after_response = false;
    let mut admitted = false;
    let mut request_id = None;
    let mut model = None;
    for e in &d.entries {
        match e.key.as_str() {
            "api_key" => secrets.push(e.value.as_str()),
            "model" if !e.value.is_empty() => model = Some(e.value.clone()),
            "request_id" if !e.value.is_empty() => request_id = Some(e.value.clone()),
            "limit" => {
                kind = LimitKind::parse(&e.value)
                    .ok_or_else(|| UnknownLimit(e.value.chars().take(64).collect()))?;
            }
            "phase" => after_response = e.value == "response",
            ADMITTED_FIELD => admitted = e.value == "true",
            _ => {}
        }
    }
    // Envoy sends the after-response descriptor at stream end even for a request it
    // answered 429, only without the `admitted` entry: a rejected request never counts.
    if after_response && !admitted {
        return Ok(None);
    }
    let hits = match d.hits_addend.as_ref() {
        Some(h) => h.value,
        None if request_hits > 0 => u64::from(request_hits),
        None => 1,
    };
    Ok(secret_of(&secrets, config).map(|secret| Ask {
        secret,
        kind,
        hits,
        after_response,
        refund: d.is_negative_hits,
        request_id,
        model,
    }))
}

fn add(usage: &mut Usage, kind: LimitKind, n: u64) {
    let slot = match kind {
        LimitKind::Requests => &mut usage.requests,
        LimitKind::InputTokens => &mut usage.input_tokens,
        LimitKind::OutputTokens => &mut usage.output_tokens,
    };
    *slot = slot.saturating_add(n);
}

fn header(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value: value.to_string(),
        raw_value: Vec::new(),
    }
}

/// A group: one key, one way of charging, the descriptors it covers.
struct Group {
    secret: String,
    model: Option<String>,
    after_response: bool,
    refund: bool,
    request_id: Option<String>,
    want: Usage,
    members: Vec<usize>,
    outcome: Option<(Limits, Snapshot)>,
    /// The window `outcome` counts in: the config's, or the denying ring's (a day for a
    /// `per_day` limit).
    window: Duration,
    denied: bool,
}

/// The window as Envoy's `RateLimit` can say it: a whole unit when it is one, else
/// `UNKNOWN` (the name then says the real window).
fn unit_of(window: Duration) -> Unit {
    match window.as_secs() {
        _ if window.subsec_nanos() != 0 => Unit::Unknown,
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Unknown,
    }
}

fn status_of(
    kind: LimitKind,
    window: Duration,
    outcome: Option<&(Limits, Snapshot)>,
    denied: bool,
) -> DescriptorStatus {
    let Some((limits, snapshot)) = outcome else {
        return DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
    };
    let limit = limits.of(kind);
    let reset = snapshot.reset(kind);
    DescriptorStatus {
        code: if denied { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(RateLimit {
            // e.g. `input_tokens per 60s sliding window`: the unit alone cannot say 10s.
            name: format!("{} per {window:?} sliding window", kind.as_str()),
            requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX),
            unit: unit_of(window) as i32,
        }),
        limit_remaining: u32::try_from(limit.saturating_sub(snapshot.usage.of(kind)))
            .unwrap_or(u32::MAX),
        duration_until_reset: Some(ProtoDuration {
            seconds: reset.as_secs() as i64,
            nanos: reset.subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimiter {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        // RateLimitRequest carries no client headers: the parent is the context Envoy's
        // tracer put in the call's gRPC metadata (the ratelimit filter's own span).
        let span = telemetry::admission("ratelimit", || {
            TraceHeaders::from_http(request.metadata().as_ref())
        });
        self.decide(request.into_inner()).instrument(span).await
    }
}

impl RateLimiter {
    async fn decide(
        &self,
        request: RateLimitRequest,
    ) -> Result<Response<RateLimitResponse>, Status> {
        if request.descriptors.len() > MAX_DESCRIPTORS {
            self.limiter.metrics().reject("invalid_request");
            return Err(Status::invalid_argument(format!(
                "{} descriptors in one call; at most {MAX_DESCRIPTORS} are read",
                request.descriptors.len()
            )));
        }
        if let Some(d) = request
            .descriptors
            .iter()
            .find(|d| d.entries.len() > MAX_ENTRIES)
        {
            self.limiter.metrics().reject("invalid_request");
            return Err(Status::invalid_argument(format!(
                "a descriptor of {} entries; at most {MAX_ENTRIES} are read",
                d.entries.len()
            )));
        }
        let config = self.limiter.config();
        let asks: Vec<Option<Ask>> = match request
            .descriptors
            .iter()
            .map(|d| read(d, request.hits_addend, &config))
            .collect()
        {
            Ok(asks) => asks,
            Err(UnknownLimit(value)) => {
                self.limiter.metrics().reject("unknown_limit");
                tracing::warn!(limit = %value, "ShouldRateLimit names an unknown limit; refused");
                return Err(Status::invalid_argument(format!(
                    "unknown `limit` descriptor value `{value}`: expected requests, input_tokens or output_tokens"
                )));
            }
        };
        let window = config.window();
        let mut groups: Vec<Group> = Vec::new();
        for (i, ask) in asks.iter().enumerate() {
            let Some(ask) = ask else { continue };
            let g = match groups.iter().position(|g| {
                g.secret == ask.secret
                    && g.model == ask.model
                    && g.after_response == ask.after_response
                    && g.refund == ask.refund
            }) {
                Some(g) => g,
                None => {
                    groups.push(Group {
                        secret: ask.secret.clone(),
                        model: ask.model.clone(),
                        after_response: ask.after_response,
                        refund: ask.refund,
                        request_id: None,
                        want: Usage::default(),
                        members: Vec::new(),
                        outcome: None,
                        window,
                        denied: false,
                    });
                    groups.len() - 1
                }
            };
            add(&mut groups[g].want, ask.kind, ask.hits);
            groups[g].members.push(i);
            if groups[g].request_id.is_none() {
                groups[g].request_id = ask.request_id.clone();
            }
        }

        // Charges first, each leaving a marker, so that a denial or a store failure on
        // any key gives back exactly what this call charged before it (to the very
        // buckets): the call as a whole records all or nothing. Refunds come last, once
        // every charge fits.
        let mut denial = None;
        let mut failed = false;
        let mut charged: Vec<(usize, u64)> = Vec::new();
        let order: Vec<usize> = (0..groups.len())
            .filter(|g| !groups[*g].refund)
            .chain((0..groups.len()).filter(|g| groups[*g].refund))
            .collect();
        for g in order {
            let group = &groups[g];
            let phase = if group.after_response {
                "response"
            } else {
                "request"
            };
            let result = if group.refund {
                // Back to the bucket the request's admission charged, when we know it.
                let marker = group.request_id.as_deref().map(|r| marker_of(r, "request"));
                self.limiter
                    .refund(&group.secret, group.model.as_deref(), &group.want, marker)
                    .await
            } else {
                let charge = if group.after_response {
                    Charge::Force
                } else {
                    Charge::Check
                };
                // A marker lets a refund by the request's id find this charge later (an
                // admission's), or this call undo it when another group is refused or
                // fails. A charge that needs neither — alone in its call, and after the
                // response or without a request id — leaves none: such markers were never
                // read, and lived as long as the key's longest window (an hour with
                // `per_day`), one per request.
                let refundable = !group.after_response && group.request_id.is_some();
                let marker =
                    (refundable || groups.len() > 1).then(|| match group.request_id.as_deref() {
                        Some(r) => marker_of(r, phase),
                        None => rand::random(),
                    });
                let result = self
                    .limiter
                    .charge(
                        &group.secret,
                        group.model.as_deref(),
                        &group.want,
                        charge,
                        marker,
                    )
                    .await;
                // Only what was recorded is undone: a charge `on_store_error: allow` let
                // through unrecorded left no marker, and a refund by it would take the
                // newest buckets' usage instead.
                if let (Charged::Admitted { claimed: true, .. }, Some(marker)) = (&result, marker) {
                    charged.push((g, marker));
                }
                result
            };
            match result {
                Charged::UnknownKey => {}
                Charged::Admitted {
                    limits, snapshot, ..
                } => groups[g].outcome = Some((limits, snapshot)),
                Charged::Denied {
                    limits,
                    snapshot,
                    window,
                    answer,
                } => {
                    // The denial's own ring and window: no second store call to describe it.
                    groups[g].denied = true;
                    groups[g].outcome = Some((limits, snapshot));
                    groups[g].window = window;
                    denial = Some(answer);
                    break;
                }
                Charged::Failed(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if denial.is_some() || failed {
            for (g, marker) in charged {
                let group = &groups[g];
                if let Charged::Failed(_) = self
                    .limiter
                    .refund(
                        &group.secret,
                        group.model.as_deref(),
                        &group.want,
                        Some(marker),
                    )
                    .await
                {
                    // The store is down for this key too: its charge stays, on the safe
                    // side (it expires with its bucket).
                    tracing::warn!("could not undo a ShouldRateLimit charge; it stays counted");
                }
            }
        }
        if failed {
            return Err(Status::unavailable("the rate-limit store is unavailable"));
        }

        let mut statuses = vec![
            DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            };
            asks.len()
        ];
        for group in &groups {
            for &i in &group.members {
                let kind = asks[i].as_ref().map_or(LimitKind::Requests, |a| a.kind);
                statuses[i] = status_of(kind, group.window, group.outcome.as_ref(), group.denied);
            }
        }
        let response = match denial {
            Some(answer) => RateLimitResponse {
                overall_code: Code::OverLimit as i32,
                statuses,
                response_headers_to_add: answer.headers.iter().map(|(k, v)| header(k, v)).collect(),
                raw_body: answer.body.into_bytes(),
                ..Default::default()
            },
            None => {
                let headers = groups
                    .iter()
                    .find(|g| !g.refund && !g.after_response)
                    .and_then(|g| g.outcome.as_ref())
                    .map(|(limits, snapshot)| rate_limit_headers(limits, snapshot))
                    .unwrap_or_default();
                RateLimitResponse {
                    overall_code: Code::Ok as i32,
                    statuses,
                    response_headers_to_add: headers.iter().map(|(k, v)| header(k, v)).collect(),
                    // Marks the stream admitted, so the after-response descriptor (which
                    // Envoy sends at stream end even for a request it answered 429) can
                    // be skipped for denied requests: `skip_if_absent` on this key.
                    dynamic_metadata: Some(Struct {
                        fields: HashMap::from([(
                            ADMITTED_FIELD.to_string(),
                            Value {
                                kind: Some(Kind::StringValue("true".into())),
                            },
                        )]),
                    }),
                    ..Default::default()
                }
            }
        };
        Ok(Response::new(response))
    }
}

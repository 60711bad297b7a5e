//! ext_authz `Check`: Envoy forwards the client's request (headers and body); the answer
//! is admission as [`Limiter::check`] decides it. A denial is a `DeniedHttpResponse` the
//! client gets as it is (status, OpenAI body, headers); an admission adds the
//! `x-ratelimit-*` headers for the client, `x-llm-ratelimit-key` for the upstream, and the
//! settlement handle in dynamic metadata for ext_proc. A store failure is an
//! `error_response`, so Envoy's `failure_mode_allow` decides fail-open or fail-closed.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::RESERVATION_FIELD;
use crate::admission::{Admitted, ClientRequest, Limiter};
use crate::answer::Answer;
use crate::telemetry::{self, TraceHeaders};
use tracing::Instrument;

/// The `context_extensions` entry that selects count-only admission.
const COUNT_EXTENSION: &str = "llm-ratelimit";

pub struct Admission {
    limiter: Arc<Limiter>,
}

impl Admission {
    pub fn new(limiter: Arc<Limiter>) -> Admission {
        Admission { limiter }
    }
}

/// gRPC status codes (google.rpc.Code).
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const NOT_FOUND: i32 = 5;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        // ext_authz reads `value` (a `raw_value` alone arrives empty through it).
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            raw_value: Vec::new(),
        }),
        ..Default::default()
    }
}

fn string(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn number(n: u64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n as f64)),
    }
}

/// What ext_proc, access logs and the `ratelimit` filter (`hits_addend`) can read.
fn metadata(admitted: &Admitted) -> Struct {
    let mut fields = HashMap::from([
        ("key".to_string(), string(admitted.key.as_str())),
        ("input_tokens".to_string(), number(admitted.input_tokens)),
        (
            "output_tokens".to_string(),
            number(admitted.output_reserved),
        ),
    ]);
    if let Some(handle) = &admitted.reservation {
        fields.insert(RESERVATION_FIELD.to_string(), string(handle.clone()));
    }
    if !admitted.model.is_empty() {
        fields.insert("model".to_string(), string(admitted.model.clone()));
    }
    Struct { fields }
}

fn denied(answer: Answer) -> CheckResponse {
    let code = match answer.status {
        429 => RESOURCE_EXHAUSTED,
        401 => UNAUTHENTICATED,
        400 | 413 => INVALID_ARGUMENT,
        404 => NOT_FOUND,
        503 => UNAVAILABLE,
        _ => PERMISSION_DENIED,
    };
    let reply = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(answer.status),
        }),
        headers: answer.headers.iter().map(|(k, v)| header(k, v)).collect(),
        body: answer.body,
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            ..Default::default()
        }),
        http_response: Some(if code == UNAVAILABLE {
            HttpResponse::ErrorResponse(reply)
        } else {
            HttpResponse::DeniedResponse(reply)
        }),
        dynamic_metadata: None,
    }
}

#[tonic::async_trait]
impl Authorization for Admission {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // Envoy's tracer puts the ext_authz call's own context in the gRPC metadata; without
        // it (tracing off in Envoy) the client's headers as Envoy forwarded them.
        let sent = if telemetry::enabled() {
            TraceHeaders::from_http(request.metadata().as_ref())
        } else {
            TraceHeaders::default()
        };
        let attributes = request.into_inner().attributes.unwrap_or_default();
        // A route of envoy/ratelimit-filter.yaml says `llm-ratelimit: count`: the
        // `ratelimit` filter charges, so only authenticate and count here.
        let count_only = attributes
            .context_extensions
            .get(COUNT_EXTENSION)
            .is_some_and(|v| v == "count");
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        // `pack_as_bytes: true` sends `raw_body`; without it the body comes as text.
        let body = if http.raw_body.is_empty() {
            http.body.as_bytes()
        } else {
            &http.raw_body
        };
        let client = ClientRequest {
            method: &http.method,
            authorization: http.headers.get("authorization").map(String::as_str),
            api_key: http.headers.get("api-key").map(String::as_str),
            path: &http.path,
            body,
        };
        let span = telemetry::admission("ext_authz", || {
            if sent.is_empty() {
                TraceHeaders::from_fn(|name| http.headers.get(name).map(String::as_str))
            } else {
                sent
            }
        });
        let verdict = if count_only {
            self.limiter.count(client).instrument(span).await
        } else {
            self.limiter.check(client).instrument(span).await
        };
        let Some(admitted) = verdict.admitted else {
            return Ok(Response::new(denied(verdict.answer)));
        };
        let ok = OkHttpResponse {
            headers: vec![header("x-llm-ratelimit-key", admitted.key.as_str())],
            // The client never needs the limiter to see its key again, and the upstream
            // must not log it: nothing else changes on the way up.
            response_headers_to_add: verdict
                .answer
                .headers
                .iter()
                .map(|(k, v)| header(k, v))
                .collect(),
            ..Default::default()
        };
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: OK,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(ok)),
            dynamic_metadata: Some(metadata(&admitted)),
        }))
    }
}

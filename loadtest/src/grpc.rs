//! `llm-loadtest grpc`: the same load straight at the sidecar's gRPC port, as Envoy
//! sends it, without Envoy or an upstream.
//!
//! - `--api authz`: `envoy.service.auth.v3.Authorization/Check` with what ext_authz sends
//!   under `with_request_body` + `pack_as_bytes`: method, path, host and headers
//!   (`authorization`, `content-type`, ...) in `attributes.request.http`, the body in
//!   `raw_body`.
//! - `--api ratelimit`: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` in
//!   domain `llm` with the descriptors of `envoy/ratelimit-filter.yaml`'s admission:
//!   `api_key` (requests), `api_key` + `limit: input_tokens` with `hits_addend` = the
//!   prompt's tokens, and with `--max-tokens`, `api_key` + `limit: output_tokens` with
//!   `hits_addend` = that budget.
//!
//! Every message is encoded once before the run; a small codec sends those bytes as
//! they are and decodes only the answer. Each target gets `--connections` HTTP/2
//! channels, which the workers share (requests are multiplexed).
//!
//! Answers become records with the HTTP status the client would see through Envoy:
//! allowed is 200; a denial carries its status (429 is rate limited, with the limit
//! named in its body); `OVER_LIMIT` is 429; a gRPC error is 503 (Envoy's
//! `status_on_error` in this project's configs). No upstream runs, so completion tokens
//! are 0 and prompt tokens are the tool's own count.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use http::uri::PathAndQuery;
use prost::Message;
use tonic::client::Grpc;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tonic_prost::ProstDecoder;

use crate::cli::Api;
use crate::drive::{Client, Clock};
use crate::plan::{Pick, Plan};
use crate::record::{LimitKind, Record};
use crate::response::{denied_by, Seen};

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// The ratelimit filter's domain in `envoy/ratelimit-filter.yaml`.
const DOMAIN: &str = "llm";
/// The `host` a gateway would report; nothing is sent to it.
const HOST: &str = "llm-loadtest";

/// The channels to each target: `[target][connection]`.
pub async fn connect(urls: &[String], connections: usize) -> anyhow::Result<Vec<Vec<Channel>>> {
    let mut all = Vec::with_capacity(urls.len());
    for url in urls {
        let uri = if url.contains("://") {
            url.clone()
        } else {
            format!("http://{url}")
        };
        if !uri.starts_with("http://") {
            return Err(anyhow!(
                "--target {url}: expected host:port or http://host:port (TLS is not supported)"
            ));
        }
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| anyhow!("--target {url}: not an address ({e})"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3));
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
                .await
                .map_err(|_| anyhow!("cannot connect to --target {url}: timed out"))?
                .with_context(|| format!("cannot connect to --target {url}"))?;
            channels.push(channel);
        }
        all.push(channels);
    }
    Ok(all)
}

/// Every request message, encoded: `[key * variants + variant]`.
pub fn messages(api: Api, path: &str, secrets: &[String], plan: &Plan) -> Vec<Bytes> {
    let mut all = Vec::with_capacity(secrets.len() * plan.variants.len());
    for secret in secrets {
        let bearer = format!("Bearer {secret}");
        for variant in &plan.variants {
            let bytes = match api {
                Api::Authz => check_request(path, &bearer, &variant.body).encode_to_vec(),
                Api::Ratelimit => {
                    rate_limit_request(&bearer, variant.prompt_tokens, plan.max_tokens)
                        .encode_to_vec()
                }
            };
            all.push(Bytes::from(bytes));
        }
    }
    all
}

fn check_request(path: &str, bearer: &str, body: &[u8]) -> CheckRequest {
    let headers = HashMap::from([
        (":authority".to_string(), HOST.to_string()),
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), path.to_string()),
        (":scheme".to_string(), "http".to_string()),
        ("authorization".to_string(), bearer.to_string()),
        ("content-type".to_string(), "application/json".to_string()),
        ("content-length".to_string(), body.len().to_string()),
    ]);
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    method: "POST".into(),
                    headers,
                    path: path.into(),
                    host: HOST.into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    size: body.len() as i64,
                    raw_body: body.to_vec(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn rate_limit_request(bearer: &str, prompt_tokens: u32, max_tokens: u32) -> RateLimitRequest {
    let descriptor = |limit: Option<&str>, hits: Option<u64>| {
        let mut entries = vec![Entry {
            key: "api_key".into(),
            value: bearer.into(),
        }];
        if let Some(limit) = limit {
            entries.push(Entry {
                key: "limit".into(),
                value: limit.into(),
            });
        }
        RateLimitDescriptor {
            entries,
            hits_addend: hits.map(|value| UInt64Value { value }),
            ..Default::default()
        }
    };
    let mut descriptors = vec![
        descriptor(None, Some(1)),
        descriptor(
            Some(LimitKind::InputTokens.as_str()),
            Some(u64::from(prompt_tokens)),
        ),
    ];
    if max_tokens > 0 {
        descriptors.push(descriptor(
            Some(LimitKind::OutputTokens.as_str()),
            Some(u64::from(max_tokens)),
        ));
    }
    RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors,
        hits_addend: 0,
    }
}

/// Sends pre-encoded message bytes and decodes answers of type `R`.
struct Preencoded<R>(PhantomData<fn() -> R>);

impl<R> Preencoded<R> {
    fn new() -> Preencoded<R> {
        Preencoded(PhantomData)
    }
}

struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl<R: Message + Default + Send + 'static> Codec for Preencoded<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder::default()
    }
}

/// What every gRPC worker shares.
pub struct Shared {
    pub api: Api,
    pub channels: Vec<Vec<Channel>>,
    pub messages: Vec<Bytes>,
    pub plan: std::sync::Arc<Plan>,
}

/// One worker: a handle on one channel per target.
pub struct GrpcClient {
    shared: std::sync::Arc<Shared>,
    clock: Clock,
    clients: Vec<Grpc<Channel>>,
    path: PathAndQuery,
}

impl GrpcClient {
    /// Worker `n` uses connection `n % connections` of each target.
    pub fn new(shared: std::sync::Arc<Shared>, clock: Clock, n: usize) -> GrpcClient {
        let clients = shared
            .channels
            .iter()
            .map(|c| Grpc::new(c[n % c.len()].clone()))
            .collect();
        let path = PathAndQuery::from_static(match shared.api {
            Api::Authz => CHECK,
            Api::Ratelimit => SHOULD_RATE_LIMIT,
        });
        GrpcClient {
            shared,
            clock,
            clients,
            path,
        }
    }

    /// One call: (sent µs, HTTP status, the limit a 429 names).
    async fn call(&mut self, pick: Pick) -> (u64, u16, Option<LimitKind>) {
        let variants = self.shared.plan.variants.len();
        let message = self.shared.messages
            [usize::from(pick.key) * variants + usize::from(pick.variant)]
        .clone();
        let client = &mut self.clients[usize::from(pick.target)];
        if client.ready().await.is_err() {
            return (self.clock.now_us(), 0, None);
        }
        let sent_us = self.clock.now_us();
        let request = tonic::Request::new(message);
        let (status, denied) = match self.shared.api {
            Api::Authz => match client
                .unary(
                    request,
                    self.path.clone(),
                    Preencoded::<CheckResponse>::new(),
                )
                .await
            {
                Ok(r) => check_answer(r.into_inner()),
                Err(_) => (503, None),
            },
            Api::Ratelimit => match client
                .unary(
                    request,
                    self.path.clone(),
                    Preencoded::<RateLimitResponse>::new(),
                )
                .await
            {
                Ok(r) => rate_limit_answer(r.into_inner()),
                Err(_) => (503, None),
            },
        };
        (sent_us, status, denied)
    }
}

/// The status a client would get from a `Check` answer, and the limit a 429 names.
fn check_answer(response: CheckResponse) -> (u16, Option<LimitKind>) {
    let code = response.status.map_or(0, |s| s.code);
    let denial = match response.http_response {
        Some(HttpResponse::DeniedResponse(d)) | Some(HttpResponse::ErrorResponse(d)) => Some(d),
        _ => None,
    };
    if code == 0 {
        return (200, None);
    }
    let http_status = denial
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|&s| s != 0);
    // Without an explicit status, what Envoy's ext_authz filter answers for the code.
    let status = http_status.unwrap_or(match code {
        8 => 429,  // RESOURCE_EXHAUSTED
        16 => 401, // UNAUTHENTICATED
        14 => 503, // UNAVAILABLE
        _ => 403,
    });
    let denied = if status == 429 {
        denial.and_then(|d| denied_by(d.body.as_bytes()))
    } else {
        None
    };
    (status, denied)
}

/// The status a client would get from a `ShouldRateLimit` answer.
fn rate_limit_answer(response: RateLimitResponse) -> (u16, Option<LimitKind>) {
    match Code::try_from(response.overall_code) {
        Ok(Code::Ok) => (200, None),
        Ok(Code::OverLimit) => (429, denied_by(&response.raw_body)),
        _ => (503, None),
    }
}

impl Client for GrpcClient {
    async fn send(&mut self, pick: Pick, intended_us: u64, deadline: Instant) -> Record {
        let started_us = self.clock.now_us();
        let result = tokio::time::timeout_at(deadline.into(), self.call(pick)).await;
        let done_us = self.clock.now_us();
        let (sent_us, status, denied_by) = result.unwrap_or((started_us, 0, None));
        // No upstream answers here: nothing to settle, and input tokens are the tool's own.
        let seen = Seen {
            denied_by,
            ..Seen::default()
        };
        self.shared
            .plan
            .record(pick, intended_us, (sent_us, done_us), status, seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
    use envoy_types::pb::google::rpc;

    fn check(code: i32, http: Option<HttpResponse>) -> CheckResponse {
        CheckResponse {
            status: Some(rpc::Status {
                code,
                ..Default::default()
            }),
            http_response: http,
            dynamic_metadata: None,
        }
    }

    #[test]
    fn check_answers_map_to_statuses() {
        let ok = check(0, Some(HttpResponse::OkResponse(OkHttpResponse::default())));
        assert_eq!(check_answer(ok), (200, None));
        let denied = |status: i32, body: &str| {
            Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: status }),
                headers: vec![],
                body: body.into(),
            }))
        };
        let limited = check(8, denied(429, r#"{"error":{"type":"requests"}}"#));
        assert_eq!(check_answer(limited), (429, Some(LimitKind::Requests)));
        assert_eq!(check_answer(check(16, denied(401, "{}"))), (401, None));
        assert_eq!(check_answer(check(8, None)), (429, None));
        assert_eq!(check_answer(check(7, None)), (403, None));
    }

    #[test]
    fn rate_limit_answers_map_to_statuses() {
        let answer = |code: Code, body: &str| RateLimitResponse {
            overall_code: code as i32,
            raw_body: body.as_bytes().to_vec(),
            ..Default::default()
        };
        assert_eq!(rate_limit_answer(answer(Code::Ok, "")), (200, None));
        assert_eq!(
            rate_limit_answer(answer(
                Code::OverLimit,
                r#"{"error":{"type":"input_tokens"}}"#
            )),
            (429, Some(LimitKind::InputTokens))
        );
        assert_eq!(rate_limit_answer(answer(Code::Unknown, "")), (503, None));
    }

    #[test]
    fn the_descriptors_are_the_filters() {
        let r = rate_limit_request("Bearer sk-x", 42, 0);
        assert_eq!(r.domain, "llm");
        assert_eq!(r.descriptors.len(), 2);
        assert_eq!(r.descriptors[1].entries[1].value, "input_tokens");
        assert_eq!(
            r.descriptors[1].hits_addend,
            Some(UInt64Value { value: 42 })
        );
        assert_eq!(
            rate_limit_request("Bearer sk-x", 42, 7).descriptors.len(),
            3
        );
    }
}

//! `llm-loadtest grpc`: the same load straight at the sidecar's gRPC port, as Envoy
//! sends it, without Envoy or an upstream.
//!
//! - `--api authz`: `envoy.service.auth.v3.Authorization/Check` with what ext_authz sends
//!   under `with_request_body` + `pack_as_bytes`: method, path, host and headers
//!   (`authorization`, `content-type`, ...) in `attributes.request.http`, the body in
//!   `raw_body`.
//! - `--api ratelimit`: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` in
//!   domain `llm` with the descriptors of `envoy/ratelimit-filter.yaml`'s admission, each
//!   with `api_key` and the request's `model` (so the key's `models` entry applies):
//!   requests, `limit: input_tokens` with `hits_addend` = the prompt's tokens, and with
//!   `--max-tokens`, `limit: output_tokens` with `hits_addend` = that budget.
//!
//! With `--settle-output N` (authz only), each admitted request is then settled through
//! `envoy.service.ext_proc.v3.ExternalProcessor/Process` as Envoy's ext_proc filter does in
//! observability mode once the upstream has answered: the handle `Check` left in its
//! dynamic metadata in `metadata_context` (under ext_authz's namespace, where Envoy puts
//! it), the response's headers, then one body with a usage of N output tokens. The record's
//! answer comes when the limiter has settled it (it ends the stream after settling), so
//! latency and throughput cover a request's whole sidecar work.
//!
//! Every message is encoded once before the run; a small codec sends those bytes as
//! they are and decodes only the answer. Each target gets `--connections` HTTP/2
//! channels, which the workers share (requests are multiplexed).
//!
//! Answers become records with the HTTP status the client would see through Envoy:
//! allowed is 200; a denial carries its status (429 is rate limited, with the limit and
//! whose it is named in its body); `OVER_LIMIT` is 429 (its `raw_body` names them the
//! same way); a gRPC error is 503 (Envoy's `status_on_error` in this project's configs).
//! No upstream runs, so completion tokens are 0 (N once settled with `--settle-output`)
//! and prompt tokens are the tool's own count.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, UInt64Value, Value};
use http::uri::PathAndQuery;
use prost::Message;
use tonic::client::Grpc;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::cli::Api;
use crate::drive::{Client, Clock};
use crate::plan::{Pick, Plan};
use crate::record::{LimitKind, Record};
use crate::response::Seen;
use llm_ratelimit::grpc::{METADATA_NAMESPACE, RESERVATION_FIELD};

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const PROCESS: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";
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

/// Every request message, encoded: `[key * variants + variant]`. `models` are the
/// `--model`s, which [`Plan::variants`] index.
pub fn messages(
    api: Api,
    path: &str,
    secrets: &[String],
    models: &[String],
    plan: &Plan,
) -> Vec<Bytes> {
    let mut all = Vec::with_capacity(secrets.len() * plan.variants.len());
    for secret in secrets {
        let bearer = format!("Bearer {secret}");
        for variant in &plan.variants {
            let bytes = match api {
                Api::Authz => check_request(path, &bearer, &variant.body).encode_to_vec(),
                Api::Ratelimit => {
                    let model = models
                        .get(usize::from(variant.model))
                        .map_or("", String::as_str);
                    rate_limit_request(&bearer, model, variant.prompt_tokens, plan.max_tokens)
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

/// The admission descriptors Envoy's ratelimit filter sends for one request. `model`
/// (from ext_authz's metadata there) is left out when empty, as `skip_if_absent` does.
fn rate_limit_request(
    bearer: &str,
    model: &str,
    prompt_tokens: u32,
    max_tokens: u32,
) -> RateLimitRequest {
    let descriptor = |limit: Option<&str>, hits: Option<u64>| {
        let mut entries = vec![Entry {
            key: "api_key".into(),
            value: bearer.into(),
        }];
        if !model.is_empty() {
            entries.push(Entry {
                key: "model".into(),
                value: model.into(),
            });
        }
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
    /// `--settle-output`: settle each admission to this many output tokens.
    pub settle_output: Option<u32>,
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

    /// One call: (sent µs, HTTP status, the limit a 429 names and whose it is).
    async fn call(&mut self, pick: Pick) -> (u64, u16, Seen) {
        let variants = self.shared.plan.variants.len();
        let message = self.shared.messages
            [usize::from(pick.key) * variants + usize::from(pick.variant)]
        .clone();
        let client = &mut self.clients[usize::from(pick.target)];
        if client.ready().await.is_err() {
            return (self.clock.now_us(), 0, Seen::default());
        }
        let sent_us = self.clock.now_us();
        let request = tonic::Request::new(message);
        let (status, seen) = match self.shared.api {
            Api::Authz => match client
                .unary(
                    request,
                    self.path.clone(),
                    Preencoded::<CheckResponse>::new(),
                )
                .await
            {
                Ok(r) => {
                    let response = r.into_inner();
                    let handle = reservation_of(&response);
                    let (status, mut seen) = check_answer(response);
                    if let (200, Some(output), Some(handle)) =
                        (status, self.shared.settle_output, handle)
                    {
                        let prompt =
                            self.shared.plan.variants[usize::from(pick.variant)].prompt_tokens;
                        if settle(client, handle, prompt, output).await {
                            seen.completion_tokens = Some(output);
                        }
                    }
                    (status, seen)
                }
                Err(_) => (503, Seen::default()),
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
                Err(_) => (503, Seen::default()),
            },
        };
        (sent_us, status, seen)
    }
}

/// The settlement handle an admitting `Check` left in its dynamic metadata, if any.
fn reservation_of(response: &CheckResponse) -> Option<String> {
    match response
        .dynamic_metadata
        .as_ref()?
        .fields
        .get(RESERVATION_FIELD)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The two messages Envoy's ext_proc filter sends for a 200 JSON answer: its headers, with
/// ext_authz's metadata (the handle) in `metadata_context`, then the whole body.
fn settlement_messages(handle: String, prompt: u32, output: u32) -> [ProcessingRequest; 2] {
    let reservation = Struct {
        fields: HashMap::from([(
            RESERVATION_FIELD.to_string(),
            Value {
                kind: Some(Kind::StringValue(handle)),
            },
        )]),
    };
    let header = |key: &str, value: &str| HeaderValue {
        key: key.into(),
        raw_value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    let headers = ProcessingRequest {
        request: Some(Phase::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":status", "200"),
                    header("content-type", "application/json"),
                ],
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        metadata_context: Some(Metadata {
            filter_metadata: HashMap::from([(METADATA_NAMESPACE.to_string(), reservation)]),
            ..Default::default()
        }),
        observability_mode: true,
        ..Default::default()
    };
    let total = u64::from(prompt) + u64::from(output);
    let body = format!(
        r#"{{"id":"chatcmpl-llm-loadtest","object":"chat.completion","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{output},"total_tokens":{total}}}}}"#
    );
    let body = ProcessingRequest {
        request: Some(Phase::ResponseBody(HttpBody {
            body: body.into_bytes(),
            end_of_stream: true,
            ..Default::default()
        })),
        observability_mode: true,
        ..Default::default()
    };
    [headers, body]
}

/// Settles one reservation through ext_proc `Process`; true once the limiter has ended
/// the stream, which it does after settling.
async fn settle(client: &mut Grpc<Channel>, handle: String, prompt: u32, output: u32) -> bool {
    if client.ready().await.is_err() {
        return false;
    }
    let messages = settlement_messages(handle, prompt, output);
    let request = tonic::Request::new(tonic::codegen::tokio_stream::iter(messages));
    let Ok(response) = client
        .streaming(
            request,
            PathAndQuery::from_static(PROCESS),
            ProstCodec::<ProcessingRequest, ProcessingResponse>::default(),
        )
        .await
    else {
        return false;
    };
    let mut replies = response.into_inner();
    loop {
        match replies.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

/// The status a client would get from a `Check` answer, and for a 429 the limit its body
/// names and whose it is (the key's own, per day, a model's, a pool's).
fn check_answer(response: CheckResponse) -> (u16, Seen) {
    let code = response.status.map_or(0, |s| s.code);
    let denial = match response.http_response {
        Some(HttpResponse::DeniedResponse(d)) | Some(HttpResponse::ErrorResponse(d)) => Some(d),
        _ => None,
    };
    if code == 0 {
        return (200, Seen::default());
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
    // Read as the HTTP mode reads a 429's body: only the denial fields (`Seen::read`).
    let seen = match denial {
        Some(d) if status == 429 => Seen::read(429, d.body.as_bytes()),
        _ => Seen::default(),
    };
    (status, seen)
}

/// The status a client would get from a `ShouldRateLimit` answer; an `OVER_LIMIT`'s
/// `raw_body` (the body Envoy answers with) names the limit and whose it is.
fn rate_limit_answer(response: RateLimitResponse) -> (u16, Seen) {
    match Code::try_from(response.overall_code) {
        Ok(Code::Ok) => (200, Seen::default()),
        Ok(Code::OverLimit) => (429, Seen::read(429, &response.raw_body)),
        _ => (503, Seen::default()),
    }
}

impl Client for GrpcClient {
    async fn send(&mut self, pick: Pick, intended_us: u64, deadline: Instant) -> Record {
        let started_us = self.clock.now_us();
        let result = tokio::time::timeout_at(deadline.into(), self.call(pick)).await;
        let done_us = self.clock.now_us();
        let (sent_us, status, seen) = result.unwrap_or((started_us, 0, Seen::default()));
        // No upstream answers here: nothing to settle, and input tokens are the tool's own
        // (`Seen` of a 429 carries no usage).
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

    use crate::record::LimitSet;

    /// What a 429 answer's body tells: the limit and whose it is.
    fn denial(by: LimitKind, set: LimitSet) -> Seen {
        Seen {
            denied_by: Some(by),
            denied_in: Some(set),
            ..Seen::default()
        }
    }

    /// A 429 body as the limiter writes it, naming `who` and `limit`.
    fn body(who: &str, limit: &str) -> String {
        format!(
            r#"{{"error":{{"message":"Rate limit reached for {who} on {limit}: Limit 1, Used 1, Requested 1. Please try again in 1s.","type":"{limit}","param":null,"code":"rate_limit_exceeded"}}}}"#
        )
    }

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
        let none = Seen::default();
        let ok = check(0, Some(HttpResponse::OkResponse(OkHttpResponse::default())));
        assert_eq!(check_answer(ok), (200, none));
        let denied = |status: i32, body: &str| {
            Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: status }),
                headers: vec![],
                body: body.into(),
            }))
        };
        // A body without a message names the limit but not whose it is.
        let limited = check(8, denied(429, r#"{"error":{"type":"requests"}}"#));
        let seen = check_answer(limited);
        assert_eq!(seen.0, 429);
        assert_eq!(
            (seen.1.denied_by, seen.1.denied_in),
            (Some(LimitKind::Requests), None)
        );
        // Whose limit denied, from the message, as the HTTP mode reads it.
        for (who, limit, set) in [
            ("team-a", "requests", LimitSet::Key),
            ("team-a (per day)", "requests", LimitSet::KeyDay),
            ("team-a (model gpt-4o)", "input_tokens", LimitSet::Model),
            ("team-a (pool research)", "requests", LimitSet::Pool),
            (
                "team-a (pool research, per day)",
                "output_tokens",
                LimitSet::PoolDay,
            ),
        ] {
            let kind = LimitKind::parse(limit).unwrap();
            let answer = check(8, denied(429, &body(who, limit)));
            assert_eq!(check_answer(answer), (429, denial(kind, set)), "{who}");
        }
        // Only a 429 is a denial by a limit, whatever its body says.
        let forbidden = check(7, denied(403, &body("team-a (pool research)", "requests")));
        assert_eq!(check_answer(forbidden), (403, none));
        assert_eq!(check_answer(check(16, denied(401, "{}"))), (401, none));
        assert_eq!(check_answer(check(8, None)), (429, none));
        assert_eq!(check_answer(check(7, None)), (403, none));
    }

    #[test]
    fn rate_limit_answers_map_to_statuses() {
        let answer = |code: Code, body: &str| RateLimitResponse {
            overall_code: code as i32,
            raw_body: body.as_bytes().to_vec(),
            ..Default::default()
        };
        let none = Seen::default();
        assert_eq!(rate_limit_answer(answer(Code::Ok, "")), (200, none));
        let bare = rate_limit_answer(answer(
            Code::OverLimit,
            r#"{"error":{"type":"input_tokens"}}"#,
        ));
        assert_eq!(
            (bare.0, bare.1.denied_by, bare.1.denied_in),
            (429, Some(LimitKind::InputTokens), None)
        );
        for (who, limit, set) in [
            ("team-a", "input_tokens", LimitSet::Key),
            ("team-a (pool research)", "requests", LimitSet::Pool),
            ("team-a (model gpt-4o)", "requests", LimitSet::Model),
            ("team-a (per day)", "output_tokens", LimitSet::KeyDay),
        ] {
            let kind = LimitKind::parse(limit).unwrap();
            let over = answer(Code::OverLimit, &body(who, limit));
            assert_eq!(rate_limit_answer(over), (429, denial(kind, set)), "{who}");
        }
        assert_eq!(rate_limit_answer(answer(Code::OverLimit, "")), (429, none));
        assert_eq!(rate_limit_answer(answer(Code::Unknown, "")), (503, none));
    }

    #[test]
    fn the_descriptors_are_the_filters() {
        let entries = |d: &RateLimitDescriptor| -> Vec<(String, String)> {
            d.entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let r = rate_limit_request("Bearer sk-x", "gpt-4o", 42, 0);
        assert_eq!(r.domain, "llm");
        assert_eq!(r.descriptors.len(), 2);
        // Every descriptor names the key and the model, as the filter's actions do.
        assert_eq!(
            entries(&r.descriptors[0]),
            [pair("api_key", "Bearer sk-x"), pair("model", "gpt-4o")]
        );
        assert_eq!(r.descriptors[0].hits_addend, Some(UInt64Value { value: 1 }));
        assert_eq!(
            entries(&r.descriptors[1]),
            [
                pair("api_key", "Bearer sk-x"),
                pair("model", "gpt-4o"),
                pair("limit", "input_tokens")
            ]
        );
        assert_eq!(
            r.descriptors[1].hits_addend,
            Some(UInt64Value { value: 42 })
        );
        let r = rate_limit_request("Bearer sk-x", "gpt-4o-mini", 42, 7);
        assert_eq!(r.descriptors.len(), 3);
        assert_eq!(
            entries(&r.descriptors[2]),
            [
                pair("api_key", "Bearer sk-x"),
                pair("model", "gpt-4o-mini"),
                pair("limit", "output_tokens")
            ]
        );
        assert_eq!(r.descriptors[2].hits_addend, Some(UInt64Value { value: 7 }));
        // No model: no entry (the filter's `skip_if_absent`).
        let r = rate_limit_request("Bearer sk-x", "", 42, 0);
        assert!(r
            .descriptors
            .iter()
            .all(|d| d.entries.iter().all(|e| e.key != "model")));
    }

    #[test]
    fn each_variant_carries_its_own_model() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(
            "llm-loadtest grpc --api ratelimit --target 127.0.0.1:1 --key k --duration 1s \
             --concurrency 1 --prompt-tokens 20-30 --model gpt-4o --model gpt-4o-mini"
                .split_whitespace(),
        )
        .unwrap();
        let settings = crate::cli::Settings::from_cli(cli).unwrap();
        let plan = Plan::build(&settings).unwrap();
        let secrets = ["sk-a".to_string(), "sk-b".to_string()];
        let all = messages(
            Api::Ratelimit,
            "/v1/chat/completions",
            &secrets,
            &settings.models,
            &plan,
        );
        assert_eq!(all.len(), 2 * plan.variants.len());
        for (k, secret) in secrets.iter().enumerate() {
            for (v, variant) in plan.variants.iter().enumerate() {
                let r = RateLimitRequest::decode(all[k * plan.variants.len() + v].clone()).unwrap();
                let model = &settings.models[usize::from(variant.model)];
                for d in &r.descriptors {
                    assert!(d
                        .entries
                        .iter()
                        .any(|e| e.key == "model" && &e.value == model));
                    assert!(d
                        .entries
                        .iter()
                        .any(|e| e.key == "api_key" && e.value == format!("Bearer {secret}")));
                }
            }
        }
    }
}

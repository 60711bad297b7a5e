//! Observability end to end, against the real binary: spans reach an OTLP receiver the
//! test runs (gRPC `TraceService`, and HTTP/protobuf `/v1/traces`) as children of the
//! caller's W3C trace context with the GenAI and `llm_ratelimit.*` attributes; JSON log
//! lines carry the trace and span ids; `/metrics` passes `promtool check metrics`; the
//! example alert rules pass `promtool check rules`; every query of the Grafana dashboard
//! names a series the limiter exports.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{envoy_bin, free_port, Proc};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

const LIMITER: &str = env!("CARGO_BIN_EXE_llm-ratelimit");

const KEYS: &str = "\
window: 60s
keys:
  - name: team-a
    key: sk-obs-secret-a
    rpm: 1000
    input_tpm: 1000000
    output_tpm: 100000
    per_day: { requests: 5000 }
    models:
      - match: gpt-4o-mini
        rpm: 1
    pool: research
  - name: tight
    key: sk-obs-secret-tight
    rpm: 1
    input_tpm: 1000000
    output_tpm: 1000000
pools:
  - name: research
    rpm: 100
    per_day: { requests: 20000 }
";
const PROMPT: &str = "tell me a secret story";

fn body() -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{PROMPT}"}}],"max_tokens":20}}"#
    )
}

/// One exported span, flattened: what the assertions and the docs need.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

type Received = Arc<Mutex<Vec<Got>>>;

fn collect(request: ExportTraceServiceRequest, into: &Received) {
    let mut got = into.lock().unwrap_or_else(|e| e.into_inner());
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(text)
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Got {
                service: service.clone(),
                name: span.name,
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent: hex::encode(&span.parent_span_id),
                attributes: span
                    .attributes
                    .into_iter()
                    .filter_map(|kv| Some((kv.key, text(kv.value?.value.as_ref()?))))
                    .collect(),
            });
        }
    }
}

fn text(v: &AnyValue) -> String {
    match v {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(n) => n.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/gRPC receiver.
struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        collect(request.into_inner(), &self.0);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_collector() -> (u16, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = TraceServiceServer::new(GrpcCollector(received.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (port, received)
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf).
async fn http_collector() -> (u16, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        collect(request, &store);
                        (axum::http::StatusCode::OK, Vec::new())
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, received)
}

/// The limiter binary, killed by pid when dropped; stdout (the logs) read line by line.
struct Limiter {
    child: Child,
    http: String,
    grpc: String,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Limiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the limiter with `env` (and none of the OTEL_*/LOG_* variables the test
/// process may have) and waits for `/readyz`.
async fn limiter(env: &[(&str, String)]) -> Limiter {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keys.yaml");
    std::fs::write(&config, KEYS).unwrap();
    let (http, grpc) = (free_port(), free_port());
    let mut cmd = Command::new(LIMITER);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") || name == "LOG_FORMAT" || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let mut child = cmd.spawn().expect("spawn llm-ratelimit");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    let node = Limiter {
        child,
        http: format!("http://127.0.0.1:{http}"),
        grpc: format!("http://127.0.0.1:{grpc}"),
        lines,
        _dir: dir,
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{}/readyz", node.http)).send().await {
            if r.status().is_success() {
                return node;
            }
        }
        assert!(Instant::now() < deadline, "the limiter never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

/// The spans of `trace` once `n` of them have arrived (polled, with a deadline).
async fn spans_of(received: &Received, trace: &str, n: usize) -> Vec<Got> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<Got> = received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|g| g.trace_id == trace)
            .cloned()
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{n} span(s) of trace {trace} never arrived; have {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attr<'a>(span: &'a Got, key: &str) -> &'a str {
    span.attributes
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("span {} has no {key}: {:?}", span.name, span.attributes))
}

fn check_request(secret: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    headers: HashMap::from([("authorization".into(), format!("Bearer {secret}"))]),
                    raw_body: body().into_bytes(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn with_traceparent<T>(message: T, tp: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    request
}

/// A chat completion as the upstream answers it, with its usage.
const REPLY: &str = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Once upon a time."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;

/// The ext_proc messages Envoy sends for one response: headers, then the whole body.
fn settlement_messages(handle: &str) -> Vec<ProcessingRequest> {
    let metadata = Metadata {
        filter_metadata: HashMap::from([(
            "envoy.filters.http.ext_authz".to_string(),
            Struct {
                fields: [(
                    "reservation".to_string(),
                    Value {
                        kind: Some(Kind::StringValue(handle.into())),
                    },
                )]
                .into_iter()
                .collect(),
            },
        )]),
        ..Default::default()
    };
    let headers = HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![HeaderValue {
                key: ":status".into(),
                raw_value: b"200".to_vec(),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    [
        Phase::ResponseHeaders(headers),
        Phase::ResponseBody(HttpBody {
            body: REPLY.as_bytes().to_vec(),
            end_of_stream: true,
            ..Default::default()
        }),
    ]
    .into_iter()
    .map(|phase| ProcessingRequest {
        request: Some(phase),
        metadata_context: Some(metadata.clone()),
        observability_mode: true,
        ..Default::default()
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_grpc_collector_as_children_of_the_callers_trace() {
    let (port, received) = grpc_collector().await;
    let node = limiter(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ])
    .await;
    let http = reqwest::Client::new();

    // /v1/check and /v1/report, each with the caller's traceparent.
    let trace_http = "4bf92f3577b34da6a3ce929d0e0e4736";
    let check = http
        .post(format!("{}/v1/check", node.http))
        .header("authorization", "Bearer sk-obs-secret-a")
        .header("traceparent", traceparent(trace_http, "00f067aa0ba902b7"))
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 200);
    let handle = check.headers()["x-llm-ratelimit-reservation"]
        .to_str()
        .unwrap()
        .to_string();
    let report = http
        .post(format!("{}/v1/report", node.http))
        .header("x-llm-ratelimit-reservation", &handle)
        .header("traceparent", traceparent(trace_http, "00f067aa0ba902b8"))
        .body(REPLY)
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200);

    // ext_authz Check: admitted, then denied by the requests limit of `tight`.
    let mut authz = AuthorizationClient::connect(node.grpc.clone())
        .await
        .unwrap();
    let trace_admit = "11111111111111111111111111111111";
    let admitted = authz
        .check(with_traceparent(
            check_request("sk-obs-secret-tight"),
            &traceparent(trace_admit, "1111111111111111"),
        ))
        .await
        .unwrap()
        .into_inner();
    let trace_deny = "22222222222222222222222222222222";
    authz
        .check(with_traceparent(
            check_request("sk-obs-secret-tight"),
            &traceparent(trace_deny, "2222222222222222"),
        ))
        .await
        .unwrap();

    // ext_proc settles the admitted Check's reservation.
    let handle = match admitted
        .dynamic_metadata
        .as_ref()
        .and_then(|m| m.fields.get("reservation"))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(h)) => h.clone(),
        other => panic!("no reservation in the Check answer: {other:?}"),
    };
    let trace_settle = "33333333333333333333333333333333";
    let mut ext_proc = ExternalProcessorClient::connect(node.grpc.clone())
        .await
        .unwrap();
    let mut replies = ext_proc
        .process(with_traceparent(
            tokio_stream::iter(settlement_messages(&handle)),
            &traceparent(trace_settle, "3333333333333333"),
        ))
        .await
        .unwrap()
        .into_inner();
    // The server ends its side once the body has ended.
    while replies.message().await.unwrap().is_some() {}

    // ShouldRateLimit: what Envoy's ratelimit filter sends.
    let trace_rls = "44444444444444444444444444444444";
    let mut rls = RateLimitServiceClient::connect(node.grpc.clone())
        .await
        .unwrap();
    let entry = |key: &str, value: &str| Entry {
        key: key.into(),
        value: value.into(),
    };
    rls.should_rate_limit(with_traceparent(
        RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    entry("api_key", "sk-obs-secret-a"),
                    entry("limit", "input_tokens"),
                ],
                ..Default::default()
            }],
            hits_addend: 42,
        },
        &traceparent(trace_rls, "4444444444444444"),
    ))
    .await
    .unwrap();

    let http_spans = spans_of(&received, trace_http, 2).await;
    let admission = http_spans
        .iter()
        .find(|s| s.name == "llm_ratelimit.admission")
        .expect("the /v1/check span");
    assert_eq!(
        admission.service, "llm-ratelimit",
        "the default service.name"
    );
    assert_eq!(admission.parent, "00f067aa0ba902b7");
    assert_eq!(attr(admission, "llm_ratelimit.surface"), "http_check");
    assert_eq!(attr(admission, "gen_ai.operation.name"), "chat");
    assert_eq!(attr(admission, "gen_ai.request.model"), "gpt-4o-mini");
    assert!(
        attr(admission, "gen_ai.usage.input_tokens")
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(attr(admission, "llm_ratelimit.key"), "team-a");
    assert_eq!(attr(admission, "llm_ratelimit.decision"), "admitted");
    let report = http_spans
        .iter()
        .find(|s| s.name == "llm_ratelimit.settlement")
        .expect("the /v1/report span");
    assert_eq!(report.parent, "00f067aa0ba902b8");
    assert_eq!(attr(report, "llm_ratelimit.surface"), "http_report");
    assert_eq!(attr(report, "gen_ai.usage.output_tokens"), "7");
    assert_eq!(attr(report, "llm_ratelimit.settlement"), "applied");

    let admit = &spans_of(&received, trace_admit, 1).await[0];
    assert_eq!(admit.parent, "1111111111111111");
    assert_eq!(attr(admit, "llm_ratelimit.surface"), "ext_authz");
    assert_eq!(attr(admit, "llm_ratelimit.key"), "tight");
    assert_eq!(attr(admit, "llm_ratelimit.decision"), "admitted");
    let deny = &spans_of(&received, trace_deny, 1).await[0];
    assert_eq!(deny.parent, "2222222222222222");
    assert_eq!(attr(deny, "llm_ratelimit.decision"), "denied");
    assert_eq!(attr(deny, "llm_ratelimit.limit"), "requests");

    let settle = &spans_of(&received, trace_settle, 1).await[0];
    assert_eq!(settle.name, "llm_ratelimit.settlement");
    assert_eq!(settle.parent, "3333333333333333");
    assert_eq!(attr(settle, "llm_ratelimit.surface"), "ext_proc");
    assert_eq!(attr(settle, "llm_ratelimit.key"), "tight");
    assert_eq!(attr(settle, "gen_ai.usage.output_tokens"), "7");

    let charge = &spans_of(&received, trace_rls, 1).await[0];
    assert_eq!(charge.parent, "4444444444444444");
    assert_eq!(attr(charge, "llm_ratelimit.surface"), "ratelimit");
    assert_eq!(attr(charge, "llm_ratelimit.key"), "team-a");
    assert_eq!(attr(charge, "gen_ai.usage.input_tokens"), "42");
    assert_eq!(attr(charge, "llm_ratelimit.decision"), "admitted");

    // Only the limiter's own spans, and never a secret or the prompt.
    let all = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for span in &all {
        assert!(span.name.starts_with("llm_ratelimit."), "{span:?}");
        for value in span.attributes.values() {
            assert!(!value.contains("sk-obs-secret"), "{span:?}");
            assert!(!value.contains(PROMPT), "{span:?}");
        }
    }
    // What docs/observability.md shows.
    let shown: Vec<_> = all
        .iter()
        .filter(|s| s.trace_id == trace_http || s.trace_id == trace_deny)
        .collect();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("observability-trace.txt");
    let _ = std::fs::write(&out, format!("{shown:#?}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_http_protobuf_collector() {
    let (port, received) = http_collector().await;
    let node = limiter(&[
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("http://127.0.0.1:{port}/v1/traces"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ("OTEL_SERVICE_NAME", "edge-limiter".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ])
    .await;
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let check = reqwest::Client::new()
        .post(format!("{}/v1/check", node.http))
        .header("authorization", "Bearer sk-obs-secret-a")
        .header("traceparent", traceparent(trace, "50f067aa0ba902b7"))
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 200);
    let span = &spans_of(&received, trace, 1).await[0];
    assert_eq!(span.service, "edge-limiter");
    assert_eq!(span.parent, "50f067aa0ba902b7");
    assert_eq!(attr(span, "llm_ratelimit.decision"), "admitted");

    // A model name is the client's text: a span keeps only its first 256 bytes, whatever
    // the body holds (here 64 KiB; up to max_body_bytes), cut at a character boundary.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let model = format!("gpt-4{}", "é".repeat(32 << 10));
    let check = reqwest::Client::new()
        .post(format!("{}/v1/check", node.http))
        .header("authorization", "Bearer sk-obs-secret-a")
        .header("traceparent", traceparent(trace, "50f067aa0ba902b7"))
        .body(body().replace("gpt-4o-mini", &model))
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 200);
    let span = &spans_of(&received, trace, 1).await[0];
    let kept = attr(span, "gen_ai.request.model");
    assert!(model.starts_with(kept), "{} bytes kept", kept.len());
    assert_eq!(kept.len(), 255);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_level_logs_of_every_crate_hold_no_secret() {
    // RUST_LOG=trace turns on hyper, h2, tonic and tower too: none of them may write a
    // header value (or a descriptor) that holds a client's secret.
    let node = limiter(&[("RUST_LOG", "trace".into())]).await;
    let http = reqwest::Client::new();
    for (header, value) in [
        ("authorization", "Bearer sk-obs-secret-a"),
        ("api-key", "sk-obs-secret-a"),
        ("authorization", "Bearer sk-obs-secret-unknown"),
    ] {
        let r = http
            .post(format!("{}/v1/check", node.http))
            .header(header, value)
            .body(body())
            .send()
            .await
            .unwrap();
        assert!(
            [200, 401, 429].contains(&r.status().as_u16()),
            "{}",
            r.status()
        );
    }
    let mut authz = AuthorizationClient::connect(node.grpc.clone())
        .await
        .unwrap();
    authz.check(check_request("sk-obs-secret-a")).await.unwrap();
    let mut rls = RateLimitServiceClient::connect(node.grpc.clone())
        .await
        .unwrap();
    rls.should_rate_limit(RateLimitRequest {
        domain: "llm".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "api_key".into(),
                value: "sk-obs-secret-a".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    })
    .await
    .unwrap();
    // Every request's own lines are written before its answer; wait until the three
    // decisions of a known key on /v1/check and Check are in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = node.lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let decided = lines
            .iter()
            .filter(|l| l.contains("admitted") || l.contains("denied"))
            .count();
        if decided >= 3 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{decided} decisions logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(lines.iter().any(|l| l.contains("TRACE")), "no trace lines");
    for line in &lines {
        assert!(!line.contains("sk-obs-secret"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_with_the_callers_trace_id() {
    let node = limiter(&[
        ("LOG_FORMAT", "json".into()),
        ("RUST_LOG", "info,llm_ratelimit=debug".into()),
    ])
    .await;
    let trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let check = reqwest::Client::new()
        .post(format!("{}/v1/check", node.http))
        .header("authorization", "Bearer sk-obs-secret-a")
        .header("traceparent", traceparent(trace, "60f067aa0ba902b7"))
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let admitted = loop {
        let lines = node.lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let objects: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(objects
            .iter()
            .all(|o| o.is_object() && o["level"].is_string()));
        if let Some(o) = objects.into_iter().find(|o| o["message"] == "admitted") {
            break o;
        }
        assert!(Instant::now() < deadline, "no admission logged: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(admitted["trace_id"], trace);
    let span_id = admitted["span_id"].as_str().unwrap();
    // The limiter's own span: a new id under the caller's trace.
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, "60f067aa0ba902b7");
    assert_eq!(admitted["key"], "team-a");
    let all = node
        .lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .join("\n");
    assert!(!all.contains("sk-obs-secret"));
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Every metric name a PromQL expression mentions (`llm_ratelimit_*`).
fn series_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("llm_ratelimit_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` string in a JSON document (Grafana panels and targets nest freely).
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == "expr" => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_the_dashboard_and_alerts_name_exported_series() {
    let node = limiter(&[]).await;
    let http = reqwest::Client::new();
    let check = || async {
        http.post(format!("{}/v1/check", node.http))
            .header("authorization", "Bearer sk-obs-secret-a")
            .body(body())
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(check().await, 200);
    // The second is denied by the model entry's rpm of 1, while every other limit has room.
    assert_eq!(check().await, 429);
    let scrape = http
        .get(format!("{}/metrics", node.http))
        .send()
        .await
        .unwrap();
    assert!(scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = scrape.text().await.unwrap();
    let out = promtool(&["check", "metrics"], Some(&text));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The window gauges hold what the admission reserved, per key and limit.
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        value(r#"llm_ratelimit_window_used{key="team-a",limit="requests",scope="window"}"#),
        1.0
    );
    assert_eq!(
        value(r#"llm_ratelimit_window_limit{key="team-a",limit="output_tokens",scope="window"}"#),
        100000.0
    );
    assert_eq!(
        value(
            r#"llm_ratelimit_window_utilization_ratio{key="team-a",limit="output_tokens",scope="window"}"#
        ),
        20.0 / 100000.0
    );
    assert_eq!(
        value(
            r#"llm_ratelimit_window_utilization_ratio{key="tight",limit="requests",scope="window"}"#
        ),
        0.0
    );
    // Every other limit set of the key has its gauges too: per day, the model entry, the
    // pool per window and per day — each holding the one admitted request.
    for (scope, limit) in [
        ("per_day", 5000.0),
        ("model:gpt-4o-mini", 1.0),
        ("pool:research", 100.0),
        ("pool_per_day:research", 20000.0),
    ] {
        let series = |name: &str| {
            format!(r#"llm_ratelimit_{name}{{key="team-a",limit="requests",scope="{scope}"}}"#)
        };
        assert_eq!(value(&series("window_used")), 1.0, "{scope}");
        assert_eq!(value(&series("window_limit")), limit, "{scope}");
        assert_eq!(
            value(&series("window_utilization_ratio")),
            1.0 / limit,
            "{scope}"
        );
    }
    // A limit an entry leaves out is no limit: no series for the model entry's tokens.
    assert!(
        !text.contains(r#"limit="input_tokens",scope="model:gpt-4o-mini""#),
        "{text}"
    );
    assert_eq!(
        value(r#"llm_ratelimit_decisions_total{key="team-a",outcome="admitted",scope="all"}"#),
        1.0
    );
    assert_eq!(
        value(
            r#"llm_ratelimit_decisions_total{key="team-a",outcome="requests",scope="model:gpt-4o-mini"}"#
        ),
        1.0
    );
    assert_eq!(value("llm_ratelimit_reservations_total"), 1.0);
    assert!(!text.contains("sk-obs-secret"));

    // The families the limiter exports (a histogram's samples add suffixes).
    let exported: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .flat_map(|name| ["", "_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}")))
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/docs/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 8, "{queries:?}");
    let alerts = std::fs::read_to_string(format!("{root}/docs/alerts.yml")).unwrap();
    queries.extend(
        alerts
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string),
    );
    for query in &queries {
        let names = series_in(query);
        assert!(!names.is_empty(), "a query that names no series: {query}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{name} (in `{query}`) is not exported"
            );
        }
    }

    let out = promtool(
        &["check", "rules", &format!("{root}/docs/alerts.yml")],
        None,
    );
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_ok(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shipped envoy/envoy.yaml, its tracer pointed at the test's collector: one trace
/// holds Envoy's spans and the limiter's admission and settlement under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_shows_envoy_the_limiter_and_the_upstream_call() {
    let (collector, received) = grpc_collector().await;
    let node = limiter(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{collector}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ])
    .await;
    let mock_port = free_port();
    let _mock = Proc(
        Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
            .args(["--addr", &format!("127.0.0.1:{mock_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ok(&format!("http://127.0.0.1:{mock_port}/healthz")).await;
    let (listener, admin) = (free_port(), free_port());
    let grpc_port = node.grpc.rsplit(':').next().unwrap();
    let config =
        std::fs::read_to_string(format!("{}/envoy/envoy.yaml", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .replace("port_value: 10000", &format!("port_value: {listener}"))
            .replace("port_value: 10100", &format!("port_value: {grpc_port}"))
            .replace("port_value: 10300", &format!("port_value: {mock_port}"))
            .replace("port_value: 10500", &format!("port_value: {admin}"))
            .replace("port_value: 4317", &format!("port_value: {collector}"))
            // A debug build on a loaded box can outlast the shipped 0.25 s deadline.
            .replace(" timeout: 0.25s", " timeout: 5s");
    assert!(config.contains(&format!("port_value: {collector}")));
    let path = node._dir.path().join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let _envoy = Proc(
        Command::new(envoy_bin())
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--base-id",
                &listener.to_string(),
                "-l",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("envoy (scripts/test.sh installs it into .venv)"),
    );
    wait_ok(&format!("http://127.0.0.1:{admin}/ready")).await;

    let trace = "7bf92f3577b34da6a3ce929d0e0e4736";
    let reply = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{listener}/v1/chat/completions"))
        .header("authorization", "Bearer sk-obs-secret-a")
        .header("content-type", "application/json")
        .header("traceparent", traceparent(trace, "70f067aa0ba902b7"))
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let _ = reply.text().await.unwrap();

    // Envoy's spans come in its own batches: wait for both of the limiter's spans and for
    // the Envoy spans they hang from.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = spans_of(&received, trace, 2).await;
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let ours: Vec<&Got> = spans
            .iter()
            .filter(|s| s.service == "llm-ratelimit")
            .collect();
        let complete = ours.len() == 2
            && ours.iter().all(|s| ids.contains(s.parent.as_str()))
            && spans
                .iter()
                .any(|s| s.service == "envoy" && s.parent == "70f067aa0ba902b7")
            && spans.iter().filter(|s| s.service == "envoy").count() >= 4;
        if complete {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "the trace never completed: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by_id: HashMap<&str, &Got> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for name in ["llm_ratelimit.admission", "llm_ratelimit.settlement"] {
        let ours = spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name}: {spans:#?}"));
        let parent = by_id[ours.parent.as_str()];
        assert_eq!(parent.service, "envoy", "{name} hangs from {parent:?}");
    }
    let admission = spans
        .iter()
        .find(|s| s.name == "llm_ratelimit.admission")
        .unwrap();
    assert_eq!(attr(admission, "llm_ratelimit.surface"), "ext_authz");
    assert_eq!(attr(admission, "llm_ratelimit.decision"), "admitted");
    // The upstream call has its own span, Envoy's, in the same trace.
    assert!(
        spans.iter().any(|s| s.service == "envoy"
            && s.name != "ingress"
            && s.attributes.get("upstream_cluster").map(String::as_str) == Some("upstream")),
        "no upstream span: {spans:#?}"
    );
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("envoy-trace.txt");
    let _ = std::fs::write(&out, format!("{spans:#?}\n"));
}

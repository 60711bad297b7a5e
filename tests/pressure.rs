//! Back-pressure end to end, in process: a node whose store stalls (Redis writes paused)
//! sheds what it cannot take at once — gRPC `RESOURCE_EXHAUSTED`, HTTP 503 with
//! `retry-after` — instead of queueing it; health and metrics still answer; ext_proc
//! streams over their cap are ended at once.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::{counter, RedisServer};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use llm_ratelimit::admission::{ClientRequest, Limiter};
use llm_ratelimit::config::Config;
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::redis::RedisStore;
use llm_ratelimit::engine::Store;
use llm_ratelimit::metrics::Metrics;
use llm_ratelimit::pressure::{Gate, Pressure};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const KEYS: &str = "keys:\n  - name: team-a\n    key: sk-pressure-a\n    rpm: 100000\n    input_tpm: 100000000\n    output_tpm: 100000000\n";
const BODY: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;

struct Node {
    grpc: String,
    http: String,
    limiter: Arc<Limiter>,
}

/// A node on `store` with both listeners behind one gate of `pressure`'s sizes.
async fn node(store: Store, pressure: Pressure) -> Node {
    let metrics = Arc::new(Metrics::default());
    let gate = Arc::new(Gate::new(&pressure, &metrics));
    let limiter = Arc::new(Limiter::new(
        Arc::new(ArcSwap::from_pointee(
            Config::parse(KEYS, "k.yaml").unwrap(),
        )),
        store,
        metrics,
    ));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = Node {
        grpc: format!("http://{}", grpc.local_addr().unwrap()),
        http: format!("http://{}", http.local_addr().unwrap()),
        limiter: limiter.clone(),
    };
    let router = llm_ratelimit::http::router_with(limiter.clone(), gate.clone());
    tokio::spawn(async move { axum::serve(http, router).await.unwrap() });
    tokio::spawn(async move {
        llm_ratelimit::grpc::serve_with(
            grpc,
            limiter,
            gate,
            pressure.max_settlement_streams,
            std::future::pending(),
        )
        .await
        .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.limiter.ready().await {
        assert!(Instant::now() < deadline, "the store never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node
}

fn check_request() -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    headers: HashMap::from([(
                        "authorization".into(),
                        "Bearer sk-pressure-a".into(),
                    )]),
                    raw_body: BODY.as_bytes().to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Redis answers no write (so no reservation script) for `ms` milliseconds.
fn pause_writes(redis: &RedisServer, ms: u64) {
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "CLIENT",
            "PAUSE",
            &ms.to_string(),
            "WRITE",
        ])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_limit_and_queue_is_shed_at_once_not_queued() {
    let redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_secs(10)).unwrap());
    let node = node(
        store,
        Pressure {
            max_in_flight: 2,
            max_queued: 2,
            queue_wait: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            ..Pressure::default()
        },
    )
    .await;
    let client = AuthorizationClient::connect(node.grpc.clone())
        .await
        .unwrap();
    // One admission first, so the reservation script is loaded before writes pause.
    let first = client.clone().check(check_request()).await.unwrap();
    assert_eq!(first.into_inner().status.unwrap().code, 0);

    let pause = Duration::from_millis(3000);
    pause_writes(&redis, pause.as_millis() as u64);
    let started = Instant::now();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let answer = client.check(check_request()).await;
                (answer.map(|r| r.into_inner()), started.elapsed())
            })
        })
        .collect();
    // While the store is stalled: 2 run, 2 wait, the other 8 are shed at once.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = http
            .get(format!("{}/metrics", node.http))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let shed = counter(
            &text,
            "llm_ratelimit_shed_total{surface=\"ext_authz\",reason=\"queue_full\"} ",
        );
        if shed == 8 {
            assert_eq!(counter(&text, "llm_ratelimit_in_flight "), 2, "{text}");
            assert_eq!(counter(&text, "llm_ratelimit_queued "), 2, "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "not shed at once: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // HTTP admission shares the gate: a 503 with retry-after and an OpenAI body, at once.
    let asked = Instant::now();
    let answer = http
        .post(format!("{}/v1/check", node.http))
        .header("authorization", "Bearer sk-pressure-a")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["retry-after"], "1");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    // Health and readiness are never shed.
    for path in ["/healthz", "/metrics"] {
        let r = http
            .get(format!("{}{path}", node.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert!(asked.elapsed() < pause / 2, "answered only after the stall");

    let mut shed = Vec::new();
    let mut admitted = 0;
    for call in calls {
        match call.await.unwrap() {
            (Ok(answer), _) => {
                assert_eq!(answer.status.unwrap().code, 0);
                admitted += 1;
            }
            (Err(status), at) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                shed.push(at);
            }
        }
    }
    assert_eq!((admitted, shed.len()), (4, 8));
    assert!(shed.iter().all(|at| *at < pause / 2), "{shed:?}");
    // Admitted requests counted once each (the first one too); shed ones not at all.
    let usage = node.limiter.usage("team-a").await.unwrap();
    assert_eq!(usage["requests"]["used"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_grpc_request_is_shed_at_half_its_deadline() {
    let redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_secs(10)).unwrap());
    let node = node(
        store,
        Pressure {
            max_in_flight: 1,
            max_queued: 8,
            queue_wait: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            ..Pressure::default()
        },
    )
    .await;
    let client = AuthorizationClient::connect(node.grpc.clone())
        .await
        .unwrap();
    client.clone().check(check_request()).await.unwrap();
    pause_writes(&redis, 3000);
    let running = tokio::spawn({
        let mut client = client.clone();
        async move { client.check(check_request()).await }
    });
    // Wait until the first holds the only slot.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !node
        .limiter
        .metrics()
        .render()
        .contains("llm_ratelimit_in_flight 1")
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut request = tonic::Request::new(check_request());
    request.set_timeout(Duration::from_millis(800));
    let asked = Instant::now();
    let status = client.clone().check(request).await.unwrap_err();
    // Shed by the limiter at 400 ms (half the deadline), not cancelled by the deadline.
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(asked.elapsed() < Duration::from_millis(800));
    assert!(asked.elapsed() >= Duration::from_millis(400));
    assert!(running.await.unwrap().is_ok());
}

fn settlement_message(handle: &str) -> ProcessingRequest {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "reservation".to_string(),
        Value {
            kind: Some(Kind::StringValue(handle.into())),
        },
    );
    ProcessingRequest {
        request: Some(Phase::ResponseHeaders(HttpHeaders::default())),
        metadata_context: Some(Metadata {
            filter_metadata: HashMap::from([(
                "envoy.filters.http.ext_authz".to_string(),
                Struct {
                    fields: fields.into_iter().collect(),
                },
            )]),
            ..Default::default()
        }),
        observability_mode: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ext_proc_stream_over_the_cap_is_ended_at_once() {
    let node = node(
        Store::Memory(MemoryStore::new()),
        Pressure {
            max_settlement_streams: 2,
            ..Pressure::default()
        },
    )
    .await;
    let handle = node
        .limiter
        .check(ClientRequest {
            method: "POST",
            authorization: Some("Bearer sk-pressure-a"),
            api_key: None,
            path: "/v1/chat/completions",
            body: BODY.as_bytes(),
        })
        .await
        .admitted
        .unwrap()
        .reservation
        .unwrap();
    let client = ExternalProcessorClient::connect(node.grpc.clone())
        .await
        .unwrap();
    // A stream whose response has begun and not ended: it stays open.
    let open = |mut client: ExternalProcessorClient<_>| {
        let handle = handle.clone();
        async move {
            let (tx, rx) = mpsc::channel(4);
            tx.send(settlement_message(&handle)).await.unwrap();
            let answer = client.process(ReceiverStream::new(rx)).await;
            (tx, answer)
        }
    };
    let (first, answer) = open(client.clone()).await;
    assert!(answer.is_ok());
    let (_second, answer) = open(client.clone()).await;
    assert!(answer.is_ok());
    let (_third, answer) = open(client.clone()).await;
    assert_eq!(
        answer.unwrap_err().code(),
        tonic::Code::ResourceExhausted,
        "a third stream over a cap of 2"
    );
    let text = node.limiter.metrics().render();
    assert!(
        text.contains("llm_ratelimit_shed_total{surface=\"ext_proc\",reason=\"streams\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("llm_ratelimit_settlement_streams 2"),
        "{text}"
    );
    // The first response ends (Envoy closes its side): its place is free again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_tx, answer) = open(client.clone()).await;
        if answer.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the cap was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! The gRPC surface without Envoy: ShouldRateLimit's descriptor rules, Check's answers,
//! and health — against the in-process server on an ephemeral loopback port.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use common::RedisServer;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use llm_ratelimit::admission::Limiter;
use llm_ratelimit::config::Config;
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::redis::{ring_key, RedisStore};
use llm_ratelimit::engine::{KeyName, Store};
use llm_ratelimit::metrics::Metrics;
use serde_json::Value;

const KEYS: &str = "keys:\n  - name: team-a\n    key: sk-grpc-a\n    rpm: 5\n    input_tpm: 1000\n    output_tpm: 1000\n";

async fn server() -> (String, Arc<Limiter>) {
    server_on(Store::Memory(MemoryStore::new()), KEYS).await
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>, negative: bool) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits.map(|value| UInt64Value { value }),
        is_negative_hits: negative,
        ..Default::default()
    }
}

async fn used(limiter: &Limiter) -> [u64; 3] {
    used_by(limiter, "team-a").await
}
#[tokio::test]
async fn should_rate_limit_charges_descriptors_together_all_or_nothing() {
    let (addr, limiter) = server().await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    let call = |descriptors: Vec<RateLimitDescriptor>, hits: u32| RateLimitRequest {
        domain: "llm".into(),
        descriptors,
        hits_addend: hits,
    };

    // Requests by default (hits 1), input tokens by hits_addend, an unknown descriptor OK.
    let r = client
        .should_rate_limit(call(
            vec![
                descriptor(&[("api_key", "Bearer sk-grpc-a")], None, false),
                descriptor(
                    &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
                    Some(300),
                    false,
                ),
                descriptor(&[("remote_address", "10.0.0.1")], None, false),
            ],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 3);
    assert_eq!(r.statuses[0].limit_remaining, 4);
    assert_eq!(r.statuses[1].limit_remaining, 700);
    assert_eq!(r.statuses[2].code, Code::Ok as i32);
    assert!(r
        .response_headers_to_add
        .iter()
        .any(|h| h.key == "x-ratelimit-remaining-requests" && h.value == "4"));
    assert_eq!(used(&limiter).await, [1, 300, 0]);

    // Over on input: nothing of this call is recorded, not even its request.
    let r = client
        .should_rate_limit(call(
            vec![
                descriptor(&[("api_key", "sk-grpc-a")], None, false),
                descriptor(
                    &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
                    Some(701),
                    false,
                ),
            ],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
    let body: Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["type"], "input_tokens");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(r
        .response_headers_to_add
        .iter()
        .any(|h| h.key == "retry-after-ms"));
    assert_eq!(used(&limiter).await, [1, 300, 0]);

    // The request-level hits_addend applies where a descriptor has none.
    let r = client
        .should_rate_limit(call(
            vec![descriptor(
                &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
                None,
                false,
            )],
            50,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(used(&limiter).await, [1, 350, 0]);

    // After the response of a request Envoy answered 429 (no `admitted` entry): nothing.
    let after = |admitted: bool| {
        let mut entries = vec![
            ("api_key", "sk-grpc-a"),
            ("limit", "output_tokens"),
            ("phase", "response"),
        ];
        if admitted {
            entries.push(("admitted", "true"));
        }
        descriptor(&entries, Some(1500), false)
    };
    let r = client
        .should_rate_limit(call(vec![after(false)], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(used(&limiter).await, [1, 350, 0]);

    // After the response of an admitted one: charged even over the limit, never denied.
    let r = client
        .should_rate_limit(call(vec![after(true)], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(used(&limiter).await, [1, 350, 1500]);
    let admitted = r.dynamic_metadata.unwrap().fields;
    assert!(
        admitted.contains_key("admitted"),
        "an OK marks the stream admitted"
    );

    // is_negative_hits gives tokens back.
    let r = client
        .should_rate_limit(call(
            vec![descriptor(
                &[("api_key", "sk-grpc-a"), ("limit", "output_tokens")],
                Some(1200),
                true,
            )],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(used(&limiter).await, [1, 350, 300]);

    // An unknown secret is not ours to limit.
    let r = client
        .should_rate_limit(call(
            vec![descriptor(&[("api_key", "sk-nobody")], Some(99), false)],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
}

#[tokio::test]
async fn an_unknown_limit_is_an_error_never_unlimited_and_statuses_describe_the_window() {
    let (addr, limiter) = server().await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    let call = |descriptors: Vec<RateLimitDescriptor>| RateLimitRequest {
        domain: "llm".into(),
        descriptors,
        hits_addend: 0,
    };
    // A typo in Envoy's config (`input_token`) must not make the key unlimited, and the
    // call charges nothing, not even its valid descriptors.
    let err = client
        .should_rate_limit(call(vec![
            descriptor(&[("api_key", "sk-grpc-a")], None, false),
            descriptor(
                &[("api_key", "sk-grpc-a"), ("limit", "input_token")],
                Some(5000),
                false,
            ),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("input_token"), "{}", err.message());
    assert!(!err.message().contains("sk-grpc-a"), "{}", err.message());
    assert_eq!(used(&limiter).await, [0, 0, 0]);
    let metrics = limiter.metrics().render();
    assert!(
        metrics.contains(r#"llm_ratelimit_rejections_total{reason="unknown_limit"} 1"#),
        "{metrics}"
    );

    // The default 60 s window is a minute; its name says it is a sliding window.
    let r = client
        .should_rate_limit(call(vec![descriptor(
            &[("api_key", "sk-grpc-a"), ("limit", "output_tokens")],
            Some(10),
            false,
        )]))
        .await
        .unwrap()
        .into_inner();
    let limit = r.statuses[0].current_limit.clone().unwrap();
    assert_eq!(limit.unit, Unit::Minute as i32);
    assert_eq!(limit.requests_per_unit, 1000);
    assert_eq!(limit.name, "output_tokens per 60s sliding window");
    assert!(r.statuses[0].duration_until_reset.is_some());
}

/// A call refused whole for going over `bound`: `INVALID_ARGUMENT` naming the bound and
/// no secret.
#[track_caller]
fn assert_refused_naming(err: &tonic::Status, bound: usize) {
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains(&bound.to_string()),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("sk-"), "{}", err.message());
}

#[tokio::test]
async fn a_call_with_more_descriptors_than_envoy_ever_sends_is_refused_charging_nothing() {
    use llm_ratelimit::grpc::MAX_DESCRIPTORS;
    let (addr, limiter) = server().await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    // One of ours, then descriptors each naming a different unknown secret: grouping them
    // once cost a runtime worker time quadratic in their number (40,000 of them, a 0.6 MB
    // call, held it for ~27 s in a debug build), past the reach of the request timeout.
    let many = |n: usize| {
        let mut d = vec![descriptor(
            &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
            Some(7),
            false,
        )];
        d.extend(
            (1..n).map(|i| descriptor(&[("api_key", &format!("sk-unknown-{i}"))], None, false)),
        );
        call(d)
    };
    let err = client
        .should_rate_limit(many(MAX_DESCRIPTORS + 1))
        .await
        .unwrap_err();
    assert_refused_naming(&err, MAX_DESCRIPTORS);
    assert_eq!(used(&limiter).await, [0, 0, 0]);
    // Up to the bound the call is read as always.
    let r = client
        .should_rate_limit(many(MAX_DESCRIPTORS))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), MAX_DESCRIPTORS);
    assert_eq!(used(&limiter).await, [0, 7, 0]);
}

#[tokio::test]
async fn a_descriptor_with_more_entries_than_envoy_ever_sends_is_refused_charging_nothing() {
    use llm_ratelimit::grpc::MAX_ENTRIES;
    let (addr, limiter) = server().await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    // Our key, then `api_key` entries each naming an unknown secret: each is hashed to
    // look it up, so their number must be bounded.
    let many = |n: usize| {
        let unknown: Vec<(String, String)> = (1..n)
            .map(|i| ("api_key".to_string(), format!("sk-unknown-{i}")))
            .collect();
        let mut entries = vec![("api_key", "Bearer sk-grpc-a")];
        entries.extend(unknown.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        call(vec![descriptor(&entries, Some(5), false)])
    };
    let err = client
        .should_rate_limit(many(MAX_ENTRIES + 1))
        .await
        .unwrap_err();
    assert_refused_naming(&err, MAX_ENTRIES);
    assert_eq!(used(&limiter).await, [0, 0, 0]);
    let r = client
        .should_rate_limit(many(MAX_ENTRIES))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(used(&limiter).await, [5, 0, 0]);
}

const TWO_KEYS: &str = "window: 10s\nkeys:\n  - name: team-a\n    key: sk-grpc-a\n    rpm: 50\n    input_tpm: 1000\n    output_tpm: 1000\n  - name: team-b\n    key: sk-grpc-b\n    rpm: 50\n    input_tpm: 1000\n    output_tpm: 1000\n";

async fn server_on(store: Store, keys: &str) -> (String, Arc<Limiter>) {
    let limiter = Arc::new(Limiter::new(
        Arc::new(ArcSwap::from_pointee(
            Config::parse(keys, "k.yaml").unwrap(),
        )),
        store,
        Arc::new(Metrics::default()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let l = limiter.clone();
    tokio::spawn(async move {
        llm_ratelimit::grpc::serve(listener, l, std::future::pending())
            .await
            .unwrap();
    });
    (addr, limiter)
}

async fn used_by(limiter: &Limiter, name: &str) -> [u64; 3] {
    let u = limiter.usage(name).await.unwrap();
    ["requests", "input_tokens", "output_tokens"].map(|k| u[k]["used"].as_u64().unwrap())
}

fn call(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "llm".into(),
        descriptors,
        hits_addend: 0,
    }
}

/// A Redis store on `redis`, once it answers.
async fn redis_store(redis: &RedisServer) -> Store {
    let store =
        Store::Redis(RedisStore::connect(&redis.url(), std::time::Duration::from_secs(1)).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "store did not connect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_on_the_second_key_leaves_the_first_uncharged() {
    let redis = RedisServer::start();
    let store = redis_store(&redis).await;
    let (addr, limiter) = server_on(store, TWO_KEYS).await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    // A real store failure on team-b alone: its ring key holds a value of the wrong
    // type, so the script on it errors (WRONGTYPE) while team-a's works.
    let shape = limiter.config().shape();
    let ring_b = ring_key(&KeyName::new("team-b").unwrap(), shape);
    redis.cli(&["SADD", &ring_b, "not-a-ring"]);
    let both = || {
        call(vec![
            descriptor(
                &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
                Some(100),
                false,
            ),
            descriptor(
                &[("api_key", "sk-grpc-b"), ("limit", "input_tokens")],
                Some(100),
                false,
            ),
        ])
    };
    let err = client.should_rate_limit(both()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    // team-a was charged first, then given back: the call recorded nothing.
    assert_eq!(used_by(&limiter, "team-a").await, [0, 0, 0]);
    // With the store whole again, the same call charges both.
    redis.cli(&["DEL", &ring_b]);
    let r = client.should_rate_limit(both()).await.unwrap().into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(used_by(&limiter, "team-a").await, [0, 100, 0]);
    assert_eq!(used_by(&limiter, "team-b").await, [0, 100, 0]);
}

/// A charge leaves a reservation marker in Redis only when something may read it: a
/// refund by the request's id (an admission with `request_id`), or this call undoing it.
/// The after-response charge of the shipped wiring, alone in its call, leaves none (its
/// markers were never read and lived as long as the key's longest window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_charge_something_may_undo_leaves_a_marker() {
    let redis = RedisServer::start();
    let store = redis_store(&redis).await;
    let (addr, limiter) = server_on(store, TWO_KEYS).await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    let markers = || {
        redis
            .cli(&["--scan", "--pattern", "llmrl:*:m:*"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    let ok = |r: envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse| {
        assert_eq!(r.overall_code, Code::Ok as i32)
    };
    // After the response, alone in its call: charged, no marker.
    let after = descriptor(
        &[
            ("api_key", "sk-grpc-a"),
            ("limit", "output_tokens"),
            ("phase", "response"),
            ("admitted", "true"),
            ("request_id", "req-1"),
        ],
        Some(40),
        false,
    );
    ok(client
        .should_rate_limit(call(vec![after]))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(used_by(&limiter, "team-a").await, [0, 0, 40]);
    assert_eq!(markers(), 0);
    // An admission without a request id, alone: nothing can refer to it either.
    let plain = descriptor(&[("api_key", "sk-grpc-a")], None, false);
    ok(client
        .should_rate_limit(call(vec![plain]))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(markers(), 0);
    // An admission with a request id: a later refund finds it by its marker.
    let admission = |negative: bool| {
        descriptor(
            &[
                ("api_key", "sk-grpc-a"),
                ("limit", "input_tokens"),
                ("request_id", "req-2"),
            ],
            Some(30),
            negative,
        )
    };
    ok(client
        .should_rate_limit(call(vec![admission(false)]))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(markers(), 1);
    ok(client
        .should_rate_limit(call(vec![admission(true)]))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(used_by(&limiter, "team-a").await, [1, 0, 40]);
    // Two groups in one call: each may have to be undone if the other is refused.
    let two = vec![
        descriptor(&[("api_key", "sk-grpc-a")], None, false),
        descriptor(&[("api_key", "sk-grpc-b")], None, false),
    ];
    let before = markers();
    ok(client
        .should_rate_limit(call(two))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(markers(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_with_the_request_id_goes_back_to_the_bucket_it_was_charged_in() {
    const T0: u64 = 1_700_000_000_000;
    let now = Arc::new(AtomicU64::new(T0));
    let read = now.clone();
    let store = Store::Memory(MemoryStore::with_clock(Arc::new(move || {
        read.load(Ordering::SeqCst)
    })));
    let (addr, limiter) = server_on(store, TWO_KEYS).await;
    let mut client = RateLimitServiceClient::connect(addr).await.unwrap();
    let charge = |id: &str, negative: bool| {
        call(vec![descriptor(
            &[
                ("api_key", "sk-grpc-a"),
                ("limit", "input_tokens"),
                ("request_id", id),
            ],
            Some(100),
            negative,
        )])
    };
    // Request r1 at 0 s, r2 at 5 s; then r1's charge is refunded.
    client.should_rate_limit(charge("r1", false)).await.unwrap();
    now.store(T0 + 5_000, Ordering::SeqCst);
    client.should_rate_limit(charge("r2", false)).await.unwrap();
    client.should_rate_limit(charge("r1", true)).await.unwrap();
    assert_eq!(used_by(&limiter, "team-a").await, [0, 100, 0]);
    // Once r1's bucket has left the 10 s window, r2's 100 must still be counted: the
    // refund took r1's tokens from r1's bucket, not from the newest (r2's).
    now.store(T0 + 10_200, Ordering::SeqCst);
    assert_eq!(used_by(&limiter, "team-a").await, [0, 100, 0]);
    // Without a request id the refund is newest-first (documented): r3 at 10.2 s, a
    // refund without id takes r3's bucket, and r2 still leaves on time.
    client
        .should_rate_limit(call(vec![descriptor(
            &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
            Some(100),
            false,
        )]))
        .await
        .unwrap();
    client
        .should_rate_limit(call(vec![descriptor(
            &[("api_key", "sk-grpc-a"), ("limit", "input_tokens")],
            Some(100),
            true,
        )]))
        .await
        .unwrap();
    assert_eq!(used_by(&limiter, "team-a").await, [0, 100, 0]);
    now.store(T0 + 15_200, Ordering::SeqCst);
    assert_eq!(used_by(&limiter, "team-a").await, [0, 0, 0]);
}

fn check_request(auth: &str, body: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    path: "/v1/chat/completions".into(),
                    headers: HashMap::from([("authorization".to_string(), auth.to_string())]),
                    raw_body: body.as_bytes().to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn check_allows_with_headers_and_metadata_and_denies_with_the_client_answer() {
    let (addr, limiter) = server().await;
    let mut client = AuthorizationClient::connect(addr.clone()).await.unwrap();
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":7}"#;
    let r = client
        .check(check_request("Bearer sk-grpc-a", body))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
        panic!("ok response expected");
    };
    let up = ok
        .headers
        .iter()
        .find_map(|h| h.header.as_ref().filter(|h| h.key == "x-llm-ratelimit-key"));
    assert_eq!(up.unwrap().value, "team-a");
    assert!(ok.response_headers_to_add.iter().any(|h| h
        .header
        .as_ref()
        .is_some_and(|h| h.key == "x-ratelimit-remaining-requests" && h.value == "4")));
    let meta = r.dynamic_metadata.unwrap().fields;
    assert!(meta.contains_key("reservation"));
    assert_eq!(used(&limiter).await[2], 7);

    let r = client
        .check(check_request("Bearer sk-wrong", body))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = r.http_response else {
        panic!("denied response expected");
    };
    assert_eq!(denied.status.unwrap().code, 401);
    assert!(denied.body.contains("invalid_api_key"));

    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if s == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_a_bounded_number_of_streams() {
    let p = llm_ratelimit::pressure::Pressure::default();
    let bound = llm_ratelimit::grpc::streams_per_connection(
        p.max_in_flight + p.max_queued,
        p.max_settlement_streams,
    ) as usize;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (addr, _limiter) = server().await;
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    let watch = || {
        let mut health = health.clone();
        async move {
            health
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // Health `Watch` (like reflection) is never shed and stays open as long as the
    // client likes: without a bound one connection held any number of them.
    let mut open = Vec::new();
    while open.len() < bound {
        let n = (bound - open.len()).min(256);
        let batch: Vec<_> = (0..n).map(|_| tokio::spawn(watch())).collect();
        for stream in batch {
            open.push(stream.await.unwrap());
        }
    }
    // One more waits for a place (the server's SETTINGS_MAX_CONCURRENT_STREAMS) ...
    let mut extra = tokio::spawn(watch());
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut extra)
            .await
            .is_err(),
        "a stream over the bound was opened"
    );
    // ... and gets it as soon as one closes.
    drop(open.pop());
    let extra = tokio::time::timeout(std::time::Duration::from_secs(30), extra)
        .await
        .expect("a freed place was not given to the waiting stream");
    assert!(extra.is_ok());
}

#[tokio::test]
async fn reflection_lets_grpcurl_call_without_proto_files() {
    let (addr, _limiter) = server().await;
    let grpcurl = std::env::var("GRPCURL_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/grpcurl").to_string());
    let target = addr.trim_start_matches("http://").to_string();
    let run = move |args: Vec<String>| {
        let out = std::process::Command::new(&grpcurl)
            .args(args)
            .output()
            .expect("run grpcurl (scripts/test.sh installs it into .venv)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = {
        let (run, target) = (run.clone(), target.clone());
        tokio::task::spawn_blocking(move || run(vec!["-plaintext".into(), target, "list".into()]))
            .await
            .unwrap()
    };
    for service in [
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "envoy.service.ratelimit.v3.RateLimitService",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.contains(service), "{listed}");
    }
    let answer = tokio::task::spawn_blocking(move || {
        run(vec![
            "-plaintext".into(),
            "-d".into(),
            r#"{"domain":"llm","descriptors":[{"entries":[{"key":"api_key","value":"sk-grpc-a"}]}]}"#.into(),
            target,
            "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit".into(),
        ])
    })
    .await
    .unwrap();
    assert!(answer.contains("\"overallCode\": \"OK\""), "{answer}");
}

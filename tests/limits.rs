//! Several limits per request (a key's own per window and per day, a model entry's, a
//! pool's shared by keys): checked and recorded in one atomic step by both stores, and
//! checked against the brute-force reference model, one reference per ring.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::reference::{Reference, Settled};
use common::{RedisCluster, RedisServer};
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::redis::{ring_key_of, RedisStore};
use llm_ratelimit::engine::{
    Bound, Charge, Claim, Clock, KeyName, LimitKind, Limits, ModelMatch, RingRef, Scope,
    Settlement, Store, Usage, Verdict, WindowShape,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const T0: u64 = 1_700_000_000_000;

fn shape(window_ms: u64, precision_ms: u64) -> WindowShape {
    WindowShape::new(
        Duration::from_millis(window_ms),
        Duration::from_millis(precision_ms),
    )
    .unwrap()
}

fn key(name: &str) -> KeyName {
    KeyName::new(name).unwrap()
}

fn unique(prefix: &str) -> KeyName {
    static N: AtomicU64 = AtomicU64::new(0);
    key(&format!("{prefix}-{}", N.fetch_add(1, Ordering::SeqCst)))
}

fn usage(a: [u64; 3]) -> Usage {
    Usage {
        requests: a[0],
        input_tokens: a[1],
        output_tokens: a[2],
    }
}

fn limits(a: [u64; 3]) -> Limits {
    Limits {
        requests: a[0],
        input_tokens: a[1],
        output_tokens: a[2],
    }
}

fn arr(l: &Limits) -> [u64; 3] {
    [l.requests, l.input_tokens, l.output_tokens]
}

/// Two keys, `a` and `b`, in one pool: `a` has a per-window limit of its own, a coarser
/// "per day" one and a model entry; `b` its own per-window limit; the pool has a
/// per-window limit and a coarser one. All under the pool's hash tag.
struct World {
    a_own: Bound,
    a_day: Bound,
    a_model: Bound,
    b_own: Bound,
    pool: Bound,
    pool_day: Bound,
}

impl World {
    fn new(minute: WindowShape, day: WindowShape, l: [[u64; 3]; 6]) -> World {
        let tag = unique("pool");
        let (a, b) = (unique("a"), unique("b"));
        let ring = |scope: Scope, shape: WindowShape, lim: [u64; 3]| Bound {
            ring: RingRef {
                tag: tag.clone(),
                scope,
                shape,
            },
            limits: limits(lim),
        };
        let model = ModelMatch::new("gpt-4o*").unwrap();
        World {
            a_own: ring(Scope::Key(a.clone()), minute, l[0]),
            a_day: ring(Scope::Key(a.clone()), day, l[1]),
            a_model: ring(Scope::Model(a, model), minute, l[2]),
            b_own: ring(Scope::Key(b), minute, l[3]),
            pool: ring(Scope::Pool, minute, l[4]),
            pool_day: ring(Scope::Pool, day, l[5]),
        }
    }

    /// The rings a request of key `who` (0 = a, 1 = b) is held to; `a` with the model
    /// entry when `model`.
    fn set(&self, who: usize, model: bool) -> Vec<Bound> {
        if who == 0 {
            let mut s = vec![self.a_own.clone(), self.a_day.clone()];
            if model {
                s.push(self.a_model.clone());
            }
            s.push(self.pool.clone());
            s
        } else {
            vec![self.b_own.clone(), self.pool.clone(), self.pool_day.clone()]
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        who: usize,
        model: bool,
        want: [u64; 3],
        marker: bool,
        force: bool,
    },
    Settle {
        pick: usize,
        actual: u64,
    },
    Refund {
        who: usize,
        amount: [u64; 3],
        pick: Option<usize>,
    },
    Usage {
        who: usize,
    },
    Wait {
        ms: u64,
    },
    Back {
        ms: u64,
    },
}

fn tokens() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 3 => 0u64..60]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..2, any::<bool>(), (0u64..3, tokens(), tokens()), any::<bool>(),
              prop::bool::weighted(0.1))
            .prop_map(|(who, model, (r, i, o), marker, force)| Op::Reserve {
                who,
                model,
                want: [r, i, o],
                marker,
                force,
            }),
        2 => (any::<usize>(), 0u64..90).prop_map(|(pick, actual)| Op::Settle { pick, actual }),
        1 => (0usize..2, (0u64..3, 0u64..80, 0u64..80),
              prop::option::weighted(0.6, any::<usize>()))
            .prop_map(|(who, (r, i, o), pick)| Op::Refund {
                who,
                amount: [r, i, o],
                pick,
            }),
        1 => (0usize..2).prop_map(|who| Op::Usage { who }),
        4 => prop_oneof![0u64..150, 0u64..1200, 1000u64..5000, 20_000u64..130_000]
            .prop_map(|ms| Op::Wait { ms }),
        1 => (1u64..1500).prop_map(|ms| Op::Back { ms }),
    ]
}

fn settled(s: Settlement) -> Settled {
    match s {
        Settlement::Applied { delta } => Settled::Applied(delta),
        Settlement::Expired => Settled::Expired,
        Settlement::Unknown => Settled::Unknown,
    }
}

/// The reference of each ring, made on first use.
struct Model(HashMap<RingRef, Reference>);

impl Model {
    fn of(&mut self, r: &RingRef) -> &mut Reference {
        self.0
            .entry(r.clone())
            .or_insert_with(|| Reference::new(r.shape.window_ms(), r.shape.precision_ms()))
    }
}

/// Runs one sequence on both stores and the references, checking after every step that
/// the stores agree with each other exactly and with every ring's reference exactly.
async fn run_sequence(redis_url: &str, world: World, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let start = T0 + 37;
    let now_cell = Arc::new(AtomicU64::new(start));
    let read = now_cell.clone();
    let clock: Clock = Arc::new(move || read.load(Ordering::SeqCst));
    let memory = Store::Memory(MemoryStore::with_clock(clock.clone()));
    let redis = Store::Redis(
        RedisStore::connect_with_clock(redis_url, Duration::from_secs(2), clock)
            .await
            .unwrap(),
    );
    let mut model = Model(HashMap::new());
    // Each marker id left so far, with the rings it was left in.
    let mut claims: Vec<Claim> = Vec::new();
    let mut next_id = 1u64;
    for op in ops {
        let now = now_cell.load(Ordering::SeqCst);
        match op {
            Op::Wait { ms } => {
                now_cell.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Back { ms } => {
                now_cell.fetch_sub(ms, Ordering::SeqCst);
            }
            Op::Usage { who } => {
                let rings: Vec<RingRef> =
                    world.set(who, true).into_iter().map(|b| b.ring).collect();
                let m = memory.usage_all(&rings).await.unwrap();
                let r = redis.usage_all(&rings).await.unwrap();
                prop_assert_eq!(&m, &r);
                for (ring, snap) in rings.iter().zip(&m) {
                    let reference = model.of(ring);
                    reference.touch(now, false);
                    prop_assert_eq!(snap.usage, usage(reference.bucketed(now)));
                    prop_assert_eq!(snap.reset_ms, reference.resets(now));
                }
            }
            Op::Refund { who, amount, pick } => {
                let rings: Vec<RingRef> =
                    world.set(who, false).into_iter().map(|b| b.ring).collect();
                let id =
                    pick.and_then(|p| (!claims.is_empty()).then(|| claims[p % claims.len()].id));
                let a = usage(amount);
                let m = memory.refund_all(&rings, &a, id).await.unwrap();
                let r = redis.refund_all(&rings, &a, id).await.unwrap();
                prop_assert_eq!(&m, &r);
                for (ring, snap) in rings.iter().zip(&m) {
                    let reference = model.of(ring);
                    reference.touch(now, false);
                    reference.refund(now, amount, id);
                    prop_assert_eq!(snap.usage, usage(reference.bucketed(now)));
                    prop_assert_eq!(snap.reset_ms, reference.tail_resets(now));
                }
            }
            Op::Settle { pick, actual } => {
                if claims.is_empty() {
                    continue;
                }
                let claim = claims[pick % claims.len()].clone();
                let m = memory.settle_all(&claim, actual).await.unwrap();
                let r = redis.settle_all(&claim, actual).await.unwrap();
                prop_assert_eq!(&m, &r);
                for (ring, s) in claim.rings.iter().zip(m) {
                    prop_assert_eq!(settled(s), model.of(ring).settle(claim.id, now, actual));
                }
            }
            Op::Reserve {
                who,
                model: with_model,
                want,
                marker,
                force,
            } => {
                let set = world.set(who, with_model);
                let id = marker.then(|| {
                    next_id += 1;
                    next_id
                });
                let charge = if force { Charge::Force } else { Charge::Check };
                let w = usage(want);
                let m = memory.reserve_all(&set, &w, charge, id).await.unwrap();
                let r = redis.reserve_all(&set, &w, charge, id).await.unwrap();
                prop_assert_eq!(&m, &r);
                let too_large = !force
                    && set
                        .iter()
                        .any(|b| (0..3).any(|k| want[k] > arr(&b.limits)[k]));
                for b in &set {
                    model.of(&b.ring).touch(now, !too_large);
                }
                let fits: Vec<bool> = set
                    .iter()
                    .map(|b| force || model.of(&b.ring).fits(now, want, arr(&b.limits)))
                    .collect();
                match m {
                    Verdict::Admitted { snapshots, claim } => {
                        prop_assert!(fits.iter().all(|f| *f), "admitted but a ring is full");
                        for (b, snap) in set.iter().zip(&snapshots) {
                            let reference = model.of(&b.ring);
                            reference.admit(now, want, id);
                            prop_assert_eq!(snap.usage, usage(reference.bucketed(now)));
                            prop_assert_eq!(snap.reset_ms, reference.tail_resets(now));
                        }
                        prop_assert_eq!(claim.as_ref().map(|c| c.id), id);
                        if let Some(c) = claim {
                            let rings: Vec<RingRef> = set.iter().map(|b| b.ring.clone()).collect();
                            prop_assert_eq!(&c.rings, &rings);
                            claims.push(c);
                        }
                    }
                    Verdict::Denied {
                        snapshots,
                        ring,
                        limit,
                        retry_after_ms,
                    } => {
                        prop_assert!(!fits.iter().all(|f| *f), "denied but every ring fits");
                        for (b, snap) in set.iter().zip(&snapshots) {
                            let reference = model.of(&b.ring);
                            prop_assert_eq!(snap.usage, usage(reference.bucketed(now)));
                            prop_assert_eq!(snap.reset_ms, reference.resets(now));
                        }
                        if too_large {
                            prop_assert_eq!(retry_after_ms, None);
                            let first = set
                                .iter()
                                .position(|b| (0..3).any(|k| want[k] > arr(&b.limits)[k]));
                            prop_assert_eq!(Some(ring), first);
                            continue;
                        }
                        // Each full ring's first fit; the answer is the latest of them.
                        let mut expected: Option<(usize, u64)> = None;
                        for (i, b) in set.iter().enumerate() {
                            if fits[i] {
                                continue;
                            }
                            let at = model.of(&b.ring).first_fit(now, want, arr(&b.limits));
                            let at = at.expect("a request that fits alone fits some time");
                            if expected.is_none_or(|(_, t)| at > t) {
                                expected = Some((i, at));
                            }
                        }
                        let (i, at) = expected.expect("a full ring");
                        prop_assert_eq!(ring, i);
                        prop_assert_eq!(retry_after_ms.map(|ms| now + ms), Some(at));
                        let used = model.of(&set[i].ring).bucketed(now);
                        let l = arr(&set[i].limits);
                        let first = (0..3).find(|k| used[*k] + want[*k] > l[*k]);
                        prop_assert_eq!(LimitKind::ALL.iter().position(|k| *k == limit), first);
                    }
                }
            }
        }
    }
    // Every ring the sequence touched keeps the layout's invariants: block sums, the
    // head's empty slot, totals = slots + the head's counts.
    for ring in model.0.keys() {
        common::layout::check_ring(redis_url, &ring_key_of(ring), ring.shape).await?;
    }
    Ok(())
}

#[test]
fn stores_agree_with_the_reference_over_several_rings() {
    let redis = RedisServer::start();
    let url = redis.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A per-window ring beside a coarser one: the real day shape (1,441 one-minute
    // buckets) or small ones that wrap within a sequence.
    let shapes = prop_oneof![
        Just(((2000u64, 100u64), None)),
        Just(((1000, 250), Some((6000u64, 500u64)))),
        Just(((60_000, 100), Some((120_000, 1000)))),
    ];
    let lim = || (1u64..8, 1u64..200, 1u64..200).prop_map(|(r, i, o)| [r, i, o]);
    let strategy = (
        shapes,
        prop::array::uniform6(lim()),
        prop::collection::vec(op(), 1..60),
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    });
    let result = runner.run(&strategy, |(((w, p), day), l, ops)| {
        let day = day.map_or(WindowShape::DAY, |(w, p)| shape(w, p));
        rt.block_on(run_sequence(&url, World::new(shape(w, p), day, l), ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Each of `nodes` connections fires `per_node` concurrent reservations, spread over the
/// sets given (keys sharing a pool); returns how many each set had admitted.
async fn race(
    url: &str,
    nodes: usize,
    per_node: usize,
    sets: Vec<Vec<Bound>>,
    want: Usage,
) -> Vec<usize> {
    let mut stores = Vec::new();
    for _ in 0..nodes {
        let store = Arc::new(Store::Redis(
            RedisStore::connect(url, Duration::from_secs(2)).unwrap(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.ping().await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "store did not connect"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stores.push(store);
    }
    let sets = Arc::new(sets);
    let mut tasks = Vec::new();
    for (n, store) in stores.iter().enumerate() {
        for j in 0..per_node {
            let (store, sets) = (store.clone(), sets.clone());
            let which = (n + j) % sets.len();
            tasks.push(tokio::spawn(async move {
                let v = store
                    .reserve_all(&sets[which], &want, Charge::Check, Some(rand::random()))
                    .await
                    .unwrap();
                (which, matches!(v, Verdict::Admitted { .. }))
            }));
        }
    }
    let mut admitted = vec![0; sets.len()];
    for t in tasks {
        let (which, ok) = t.await.unwrap();
        admitted[which] += usize::from(ok);
    }
    admitted
}

/// Keys sharing a pool, hit at once from three nodes, admit exactly the pool's limit; a
/// model entry's limit holds while the key's own has room. Returns the rings to look for.
async fn races_hold_every_limit(url: &str) -> Vec<RingRef> {
    let minute = shape(60_000, 100);
    let big = limits([1_000_000, 1_000_000, 1_000_000]);
    let tag = unique("research");
    let ring = |scope: Scope, lim: Limits| Bound {
        ring: RingRef {
            tag: tag.clone(),
            scope,
            shape: minute,
        },
        limits: lim,
    };
    let pool = ring(Scope::Pool, limits([100, 1_000_000, 1_000_000]));
    let keys: Vec<KeyName> = (0..3).map(|_| unique("member")).collect();
    let sets: Vec<Vec<Bound>> = keys
        .iter()
        .map(|k| vec![ring(Scope::Key(k.clone()), big), pool.clone()])
        .collect();
    let admitted = race(url, 3, 150, sets, usage([1, 7, 3])).await;
    assert_eq!(admitted.iter().sum::<usize>(), 100, "{admitted:?}");
    let store = Store::Redis(RedisStore::connect(url, Duration::from_secs(2)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let used = store
        .usage_all(std::slice::from_ref(&pool.ring))
        .await
        .unwrap();
    assert_eq!(used[0].usage.requests, 100);

    // A model entry of 40 requests under a key that allows 1,000.
    let key_name = unique("modelled");
    let model = ring(
        Scope::Model(key_name.clone(), ModelMatch::new("gpt-4o").unwrap()),
        limits([40, 1_000_000, 1_000_000]),
    );
    let own = ring(Scope::Key(key_name), limits([1000, 1_000_000, 1_000_000]));
    let with_model = vec![own.clone(), model.clone()];
    let without = vec![own.clone()];
    let admitted = race(url, 3, 100, vec![with_model, without], usage([1, 1, 1])).await;
    assert_eq!(
        admitted,
        vec![40, 150],
        "the model's 40, and every other request"
    );
    let used = store
        .usage_all(&[own.ring.clone(), model.ring.clone()])
        .await
        .unwrap();
    assert_eq!((used[0].usage.requests, used[1].usage.requests), (190, 40));
    vec![pool.ring, own.ring, model.ring]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_hold_pool_and_model_limits() {
    let redis = RedisServer::start();
    races_hold_every_limit(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_hold_pool_and_model_limits_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let rings = races_hold_every_limit(&cluster.url()).await;
    // Every ring of one tag is in the slot of that tag, on one master.
    for ring in rings {
        let name = ring_key_of(&ring);
        let node = &cluster.nodes[0];
        assert_eq!(
            node.cli(&["CLUSTER", "KEYSLOT", &name]),
            node.cli(&["CLUSTER", "KEYSLOT", ring.tag.as_str()]),
            "{name}"
        );
        let holders = cluster
            .nodes
            .iter()
            .filter(|n| n.cli(&["EXISTS", &name]) == "1")
            .count();
        assert_eq!(holders, 1, "{name} should be on exactly one master");
    }
}

#[tokio::test]
async fn a_set_of_rings_under_two_tags_is_refused() {
    let store = Store::Memory(MemoryStore::new());
    let s = shape(60_000, 100);
    let set = vec![
        Bound {
            ring: RingRef::own(&key("x"), s),
            limits: limits([1, 1, 1]),
        },
        Bound {
            ring: RingRef::own(&key("y"), s),
            limits: limits([1, 1, 1]),
        },
    ];
    assert!(store
        .reserve_all(&set, &usage([1, 0, 0]), Charge::Check, None)
        .await
        .is_err());
}

// ---- The HTTP surface with per-model, per-day and pool limits ----

const TEAM_A: &str = "sk-test-limits-team-a";
const TEAM_B: &str = "sk-test-limits-team-b";

/// team-a: 3 requests a window on gpt-4o, 20 a day; team-a and team-b share pool
/// `research` of 5 requests a window.
fn pooled_config() -> llm_ratelimit::config::Config {
    llm_ratelimit::config::Config::parse(&pooled_yaml("gpt-4o", 3), "limits.yaml").unwrap()
}

/// [`pooled_config`]'s text with team-a's first `models` entry as `model_match` and
/// `model_rpm`.
fn pooled_yaml(model_match: &str, model_rpm: u64) -> String {
    format!(
        "window: 60s\nprecision: 100ms\ndefault_max_output_tokens: 50\nkeys:
  - name: team-a
    key: {TEAM_A}
    rpm: 100
    input_tpm: 100000
    output_tpm: 100000
    per_day:
      requests: 20
    models:
      - match: \"{model_match}\"
        rpm: {model_rpm}
      - match: \"o3*\"
        output_tpm: 120
    pool: research
  - name: team-b
    key: {TEAM_B}
    rpm: 100
    input_tpm: 100000
    output_tpm: 100000
    pool: research
pools:
  - name: research
    rpm: 5
"
    )
}

async fn check_as(base: &str, secret: &str, model: &str) -> reqwest::Response {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
    });
    reqwest::Client::new()
        .post(format!("{base}/v1/check"))
        .header("x-original-uri", "/v1/chat/completions")
        .header("authorization", format!("Bearer {secret}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn json_at(base: &str, path: &str) -> serde_json::Value {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn per_model_and_pool_limits_hold_over_http(store: Store) {
    let base = common::http_node(pooled_config(), store).await;
    // gpt-4o: 3 for team-a, while the key's own 100 have room.
    for _ in 0..3 {
        assert_eq!(check_as(&base, TEAM_A, "gpt-4o").await.status(), 200);
    }
    let denied = check_as(&base, TEAM_A, "gpt-4o").await;
    assert_eq!(denied.status(), 429);
    let remaining = denied.headers()["x-ratelimit-remaining-requests"]
        .to_str()
        .unwrap()
        .to_string();
    let body: serde_json::Value = denied.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for team-a (model gpt-4o) on requests: Limit 3, Used 3, Requested 1."
        ),
        "{message}"
    );
    assert_eq!(body["error"]["type"], "requests");
    // The headers describe the per-window limit with least room: the model's 0.
    assert_eq!(remaining, "0");
    // Another model is held by the pool only: 2 more fit (5 in all), team-b's too.
    assert_eq!(check_as(&base, TEAM_A, "gpt-4o-mini").await.status(), 200);
    assert_eq!(check_as(&base, TEAM_B, "gpt-4o-mini").await.status(), 200);
    let denied = check_as(&base, TEAM_B, "gpt-4o-mini").await;
    assert_eq!(denied.status(), 429);
    let body: serde_json::Value = denied.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for team-b (pool research) on requests: Limit 5, Used 5,"
        ),
        "{message}"
    );
    // Usage shows every limit.
    let u = json_at(&base, "/v1/usage/team-a").await;
    assert_eq!(u["requests"]["used"], 4);
    assert_eq!(u["per_day"]["requests"]["used"], 4);
    assert_eq!(u["per_day"]["requests"]["limit"], 20);
    assert!(u["per_day"]["input_tokens"]["limit"].is_null());
    assert_eq!(u["models"][0]["match"], "gpt-4o");
    assert_eq!(u["models"][0]["requests"]["used"], 3);
    assert_eq!(u["models"][1]["match"], "o3*");
    assert_eq!(u["models"][1]["output_tokens"]["limit"], 120);
    assert_eq!(u["pool"]["name"], "research");
    assert_eq!(u["pool"]["requests"]["used"], 5);
    let p = json_at(&base, "/v1/usage/pools/research").await;
    assert_eq!(p["requests"]["used"], 5);
    assert_eq!(p["requests"]["remaining"], 0);
    assert_eq!(p["keys"], serde_json::json!(["team-a", "team-b"]));
    let missing = reqwest::get(format!("{base}/v1/usage/pools/nope"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn per_model_and_pool_limits_hold_over_http_in_process() {
    per_model_and_pool_limits_hold_over_http(Store::Memory(MemoryStore::new())).await;
}

#[tokio::test]
async fn per_model_and_pool_limits_hold_over_http_on_redis() {
    let redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_secs(1)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    per_model_and_pool_limits_hold_over_http(store).await;
}

#[tokio::test]
async fn settlement_corrects_every_limit_the_reservation_touched_once() {
    let base = common::http_node(pooled_config(), Store::Memory(MemoryStore::new())).await;
    // o3-mini: own, per day, the o3* entry, the pool: 50 output tokens reserved in each.
    let admitted = check_as(&base, TEAM_A, "o3-mini").await;
    assert_eq!(admitted.status(), 200);
    let handle = admitted.headers()["x-llm-ratelimit-reservation"]
        .to_str()
        .unwrap()
        .to_string();
    let outputs = |u: &serde_json::Value| {
        [
            u["output_tokens"]["used"].as_u64().unwrap(),
            u["per_day"]["output_tokens"]["used"].as_u64().unwrap(),
            u["models"][1]["output_tokens"]["used"].as_u64().unwrap(),
            u["pool"]["output_tokens"]["used"].as_u64().unwrap(),
        ]
    };
    assert_eq!(outputs(&json_at(&base, "/v1/usage/team-a").await), [50; 4]);
    let report = || async {
        reqwest::Client::new()
            .post(format!("{base}/v1/report"))
            .header("x-llm-ratelimit-reservation", &handle)
            .body(r#"{"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(report().await.status(), 200);
    assert_eq!(outputs(&json_at(&base, "/v1/usage/team-a").await), [7; 4]);
    // Delivered twice: nothing changes.
    assert_eq!(report().await.status(), 200);
    assert_eq!(outputs(&json_at(&base, "/v1/usage/team-a").await), [7; 4]);
}

/// The ShouldRateLimit service over an in-process limiter of `config`.
fn in_process_rls(config: llm_ratelimit::config::Config) -> llm_ratelimit::grpc::RateLimiter {
    let limiter = Arc::new(llm_ratelimit::admission::Limiter::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(config)),
        Store::Memory(MemoryStore::new()),
        Arc::new(llm_ratelimit::metrics::Metrics::default()),
    ));
    llm_ratelimit::grpc::RateLimiter::new(limiter)
}

/// A ShouldRateLimit request of one hit and one descriptor of these entries.
fn rls_request(
    entries: &[(&str, &str)],
) -> tonic::Request<envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest> {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    tonic::Request::new(
        envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(key, value)| Entry {
                        key: key.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
                ..Default::default()
            }],
            hits_addend: 1,
        },
    )
}

#[tokio::test]
async fn should_rate_limit_holds_the_models_entry_its_descriptors_name() {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;

    let rls = in_process_rls(pooled_config());
    let bearer = format!("Bearer {TEAM_A}");
    let call = |model: Option<&str>| {
        let mut entries = vec![("api_key", bearer.as_str()), ("limit", "requests")];
        if let Some(m) = model {
            entries.push(("model", m));
        }
        rls_request(&entries)
    };
    let code = |r: tonic::Response<_>| {
        let r: envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse = r.into_inner();
        (
            Code::try_from(r.overall_code).unwrap(),
            String::from_utf8_lossy(&r.raw_body).into_owned(),
        )
    };
    // team-a's gpt-4o entry allows 3.
    for _ in 0..3 {
        let (c, _) = code(rls.should_rate_limit(call(Some("gpt-4o"))).await.unwrap());
        assert_eq!(c, Code::Ok);
    }
    let (c, body) = code(rls.should_rate_limit(call(Some("gpt-4o"))).await.unwrap());
    assert_eq!(c, Code::OverLimit);
    assert!(body.contains("team-a (model gpt-4o) on requests"), "{body}");
    // Without a model the entry does not apply; the pool (5) still counts every charge.
    let (c, _) = code(rls.should_rate_limit(call(None)).await.unwrap());
    assert_eq!(c, Code::Ok);
    let (c, _) = code(
        rls.should_rate_limit(call(Some("gpt-4o-mini")))
            .await
            .unwrap(),
    );
    assert_eq!(c, Code::Ok);
    let (c, body) = code(rls.should_rate_limit(call(None)).await.unwrap());
    assert_eq!(c, Code::OverLimit);
    assert!(
        body.contains("team-a (pool research) on requests"),
        "{body}"
    );
}

const DAILY: &str = "sk-test-limits-daily";

/// `daily`: 2 requests a day, 100 a window: the day denies first.
fn daily_config() -> llm_ratelimit::config::Config {
    llm_ratelimit::config::Config::parse(
        &format!(
            "window: 60s\nprecision: 100ms\ndefault_max_output_tokens: 50\nkeys:
  - name: daily
    key: {DAILY}
    rpm: 100
    input_tpm: 100000
    output_tpm: 100000
    per_day:
      requests: 2
"
        ),
        "daily.yaml",
    )
    .unwrap()
}

#[tokio::test]
async fn should_rate_limit_names_the_day_window_of_a_per_day_denial() {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;

    let rls = in_process_rls(daily_config());
    let call = || rls_request(&[("api_key", DAILY), ("limit", "requests")]);
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(rls.should_rate_limit(call()).await.unwrap().into_inner());
    }
    // Admitted: the status describes the per-window limit (the headline).
    let admitted = answers[0].statuses[0].current_limit.clone().unwrap();
    for answer in &answers[..2] {
        assert_eq!(Code::try_from(answer.overall_code).unwrap(), Code::Ok);
    }
    assert_eq!(Unit::try_from(admitted.unit).unwrap(), Unit::Minute);
    assert_eq!(admitted.requests_per_unit, 100);
    // Denied by the day: the status is the day's, named as a day.
    let denied = &answers[2];
    assert_eq!(
        Code::try_from(denied.overall_code).unwrap(),
        Code::OverLimit
    );
    let status = &denied.statuses[0];
    assert_eq!(Code::try_from(status.code).unwrap(), Code::OverLimit);
    let limit = status.current_limit.clone().unwrap();
    assert_eq!(Unit::try_from(limit.unit).unwrap(), Unit::Day, "{limit:?}");
    assert_eq!(limit.requests_per_unit, 2);
    assert_eq!(status.limit_remaining, 0);
    assert_eq!(limit.name, "requests per 86400s sliding window");
    // The first request leaves the day window in about a day (1-minute buckets).
    let reset = status.duration_until_reset.unwrap().seconds;
    assert!((86_000..=86_460).contains(&reset), "{reset}");
    let body = String::from_utf8_lossy(&denied.raw_body);
    assert!(
        body.contains(
            "Rate limit reached for daily (per day) on requests: Limit 2, Used 2, Requested 1."
        ),
        "{body}"
    );
}

#[tokio::test]
async fn should_rate_limit_charges_the_key_ext_authz_admitted_beside_a_non_bearer_authorization() {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
    use llm_ratelimit::admission::{ClientRequest, Limiter};

    // envoy/ratelimit-filter.yaml: ext_authz (count only) authenticates, the ratelimit
    // filter charges. A client sends its key in `api-key` and any other credential in
    // `Authorization`; Envoy puts both in the descriptors, `authorization` last.
    let limiter = Arc::new(Limiter::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(daily_config())),
        Store::Memory(MemoryStore::new()),
        Arc::new(llm_ratelimit::metrics::Metrics::default()),
    ));
    let rls = llm_ratelimit::grpc::RateLimiter::new(limiter.clone());
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for authorization in ["Basic dXNlcjpwdw==", "Bearer", "sk-not-a-key"] {
        let counted = limiter
            .count(ClientRequest {
                method: "POST",
                authorization: Some(authorization),
                api_key: Some(DAILY),
                path: "/v1/chat/completions",
                body,
            })
            .await;
        // ext_authz reads the key from `api-key` (the Authorization is no Bearer key) ...
        let admitted = counted
            .admitted
            .expect("ext_authz admits the api-key's key");
        assert_eq!(admitted.key.as_str(), "daily");
    }
    // ... so the ratelimit filter's charges must go to that key too: 2 a day.
    let mut codes = Vec::new();
    for authorization in ["Basic dXNlcjpwdw==", "Bearer", "sk-not-a-key"] {
        let call = rls_request(&[
            ("api_key", DAILY),
            ("api_key", authorization),
            ("limit", "requests"),
        ]);
        let answer = rls.should_rate_limit(call).await.unwrap().into_inner();
        codes.push(Code::try_from(answer.overall_code).unwrap());
    }
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::OverLimit]);
    let usage = limiter.usage("daily").await.unwrap();
    assert_eq!(usage["per_day"]["requests"]["used"], 2, "{usage}");
    // A Bearer key still wins over `api-key`, as in ext_authz.
    let call = rls_request(&[
        ("api_key", "sk-other"),
        ("api_key", &format!("Bearer {DAILY}")),
    ]);
    let answer = rls.should_rate_limit(call).await.unwrap().into_inner();
    assert_eq!(
        Code::try_from(answer.overall_code).unwrap(),
        Code::OverLimit
    );
}

#[tokio::test]
async fn window_gauges_cover_a_key_with_more_limit_sets_than_one_store_call_takes() {
    // Own per window, per day and seven model entries: nine rings, more than one store
    // call takes (MAX_RINGS), all under one hash tag.
    let mut yaml = "keys:\n  - name: many\n    key: sk-test-limits-many\n    rpm: 100\n    input_tpm: 100000\n    output_tpm: 100000\n    per_day:\n      requests: 1000\n    models:\n".to_string();
    for i in 0..7 {
        yaml.push_str(&format!("      - match: \"m{i}*\"\n        rpm: 10\n"));
    }
    let config = llm_ratelimit::config::Config::parse(&yaml, "many.yaml").unwrap();
    let base = common::http_node(config, Store::Memory(MemoryStore::new())).await;
    assert_eq!(
        check_as(&base, "sk-test-limits-many", "m6-large")
            .await
            .status(),
        200
    );
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let used = |scope: &str| {
        common::counter(
            &text,
            &format!(
                r#"llm_ratelimit_window_used{{key="many",limit="requests",scope="{scope}"}} "#
            ),
        )
    };
    assert_eq!(used("window"), 1, "{text}");
    assert_eq!(used("per_day"), 1, "{text}");
    assert_eq!(used("model:m6*"), 1, "{text}");
    assert!(text.contains(r#"scope="model:m0*""#), "{text}");
    // Reading them is no store error.
    let errors = r#"llm_ratelimit_store_errors_total{kind="protocol"} "#;
    assert_eq!(common::counter(&text, errors), 0, "{text}");
}

#[tokio::test]
async fn a_per_day_denial_over_http_names_the_day_window() {
    let base = common::http_node(daily_config(), Store::Memory(MemoryStore::new())).await;
    for _ in 0..2 {
        assert_eq!(check_as(&base, DAILY, "gpt-4o").await.status(), 200);
    }
    let denied = check_as(&base, DAILY, "gpt-4o").await;
    assert_eq!(denied.status(), 429);
    let retry: u64 = denied.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((86_000..=86_460).contains(&retry), "{retry}");
    // The x-ratelimit-* headers describe the per-window limit (100, 2 used).
    assert_eq!(denied.headers()["x-ratelimit-limit-requests"], "100");
    assert_eq!(denied.headers()["x-ratelimit-remaining-requests"], "98");
    let body: serde_json::Value = denied.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for daily (per day) on requests: Limit 2, Used 2, Requested 1."
        ),
        "{message}"
    );
    assert_eq!(body["error"]["type"], "requests");
}

// ---- Hot reload keeps the usage of limits that did not change ----

/// Replaces `path`'s content in one step, as editors and config tools do.
fn write_atomically(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Through the watcher, as `serve` reloads (swap, then free what is no longer
/// configured): a changed limit keeps its ring's usage; a changed match is a new ring.
async fn a_reload_keeps_the_usage_of_limits_that_did_not_change(store: Store) {
    use llm_ratelimit::config::{spawn_watcher, ReloadOutcome};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.yaml");
    std::fs::write(&path, pooled_yaml("gpt-4o", 3)).unwrap();
    let current = Arc::new(arc_swap::ArcSwap::from_pointee(pooled_config()));
    let limiter = Arc::new(llm_ratelimit::admission::Limiter::new(
        current.clone(),
        store,
        Arc::new(llm_ratelimit::metrics::Metrics::default()),
    ));
    let (tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let watcher = {
        let limiter = limiter.clone();
        spawn_watcher(
            path.clone(),
            current,
            Duration::from_millis(20),
            move |outcome| {
                if let ReloadOutcome::Applied = outcome {
                    limiter.forget_unconfigured();
                }
                let _ = tx.send(outcome.clone());
            },
        )
    };
    async fn next(
        outcomes: &mut tokio::sync::mpsc::UnboundedReceiver<ReloadOutcome>,
    ) -> ReloadOutcome {
        tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
            .await
            .expect("the watcher reports within 10s")
            .expect("the watcher runs")
    }
    let first = next(&mut outcomes).await;
    assert!(matches!(first, ReloadOutcome::Unchanged), "{first:?}");

    let admit = |model: &'static str| {
        let limiter = limiter.clone();
        async move {
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
            })
            .to_string();
            let verdict = limiter
                .check(llm_ratelimit::admission::ClientRequest {
                    method: "POST",
                    authorization: Some(&format!("Bearer {TEAM_A}")),
                    api_key: None,
                    path: "/v1/chat/completions",
                    body: body.as_bytes(),
                })
                .await;
            assert!(
                verdict.admitted.is_some(),
                "{}",
                verdict.answer.body.as_str()
            );
        }
    };
    // [own, per day, models[0], pool] requests used, and models[0]'s match and limit.
    let used = || {
        let limiter = limiter.clone();
        async move {
            let u = limiter.usage("team-a").await.unwrap();
            let n = |v: &serde_json::Value| v["used"].as_u64().unwrap();
            (
                [
                    n(&u["requests"]),
                    n(&u["per_day"]["requests"]),
                    n(&u["models"][0]["requests"]),
                    n(&u["pool"]["requests"]),
                ],
                u["models"][0]["match"].as_str().unwrap().to_string(),
                u["models"][0]["requests"]["limit"].as_u64().unwrap(),
            )
        }
    };
    admit("gpt-4o").await;
    admit("gpt-4o").await;
    assert_eq!(used().await, ([2, 2, 2, 2], "gpt-4o".into(), 3));

    // The model entry's rpm changes (3 -> 4): the same ring, its usage kept.
    write_atomically(&path, &pooled_yaml("gpt-4o", 4));
    let outcome = next(&mut outcomes).await;
    assert!(matches!(outcome, ReloadOutcome::Applied), "{outcome:?}");
    assert_eq!(used().await, ([2, 2, 2, 2], "gpt-4o".into(), 4));

    // Its match changes (gpt-4o -> gpt-4o*): a new limit, starting afresh; the key's,
    // the day's and the pool's usage stay.
    write_atomically(&path, &pooled_yaml("gpt-4o*", 4));
    let outcome = next(&mut outcomes).await;
    assert!(matches!(outcome, ReloadOutcome::Applied), "{outcome:?}");
    assert_eq!(used().await, ([2, 2, 0, 2], "gpt-4o*".into(), 4));
    admit("gpt-4o-mini").await;
    assert_eq!(used().await, ([3, 3, 1, 3], "gpt-4o*".into(), 4));
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_usage_of_limits_that_did_not_change_in_process() {
    a_reload_keeps_the_usage_of_limits_that_did_not_change(Store::Memory(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_usage_of_limits_that_did_not_change_on_redis() {
    let redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_secs(1)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a_reload_keeps_the_usage_of_limits_that_did_not_change(store).await;
}

// ---- The pool race through config and nodes ----

const RACE_A: &str = "sk-test-limits-race-a";
const RACE_B: &str = "sk-test-limits-race-b";

/// Two keys with room of their own (1,000 a window) sharing pool `shared` of 60.
fn race_config() -> llm_ratelimit::config::Config {
    llm_ratelimit::config::Config::parse(
        &format!(
            "window: 60s\nprecision: 100ms\ndefault_max_output_tokens: 16\nkeys:
  - name: race-a
    key: {RACE_A}
    rpm: 1000
    input_tpm: 10000000
    output_tpm: 10000000
    pool: shared
  - name: race-b
    key: {RACE_B}
    rpm: 1000
    input_tpm: 10000000
    output_tpm: 10000000
    pool: shared
pools:
  - name: shared
    rpm: 60
"
        ),
        "race.yaml",
    )
    .unwrap()
}

/// Three nodes (each its own limiter and store connection) on a Redis Cluster, the
/// config's pool shared by two keys, 150 concurrent `/v1/check`s spread over nodes and
/// keys: exactly the pool's 60 are admitted, and the pool's usage says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_admit_exactly_a_configured_pools_limit_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    // Built side by side: each node's limiter builds its tokenizers (seconds unoptimised).
    let nodes: Vec<_> = (0..3)
        .map(|_| {
            let url = cluster.url();
            tokio::spawn(async move {
                let store =
                    Store::Redis(RedisStore::connect(&url, Duration::from_secs(2)).unwrap());
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while store.ping().await.is_err() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "store did not connect"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                common::http_node(race_config(), store).await
            })
        })
        .collect();
    let mut bases = Vec::new();
    for node in nodes {
        bases.push(node.await.unwrap());
    }
    let mut tasks = Vec::new();
    for i in 0..150 {
        let base = bases[i % 3].clone();
        let secret = if (i / 3) % 2 == 0 { RACE_A } else { RACE_B };
        tasks.push(tokio::spawn(async move {
            check_as(&base, secret, "gpt-4o").await.status().as_u16()
        }));
    }
    let mut statuses = HashMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0u32) += 1;
    }
    assert_eq!(statuses, HashMap::from([(200, 60), (429, 90)]));
    // Every node reads the same shared pool; the keys' own counts add up to it.
    for base in &bases {
        let p = json_at(base, "/v1/usage/pools/shared").await;
        assert_eq!(p["requests"]["used"], 60, "{p}");
        assert_eq!(p["requests"]["remaining"], 0, "{p}");
    }
    let own = |u: serde_json::Value| u["requests"]["used"].as_u64().unwrap();
    let a = own(json_at(&bases[0], "/v1/usage/race-a").await);
    let b = own(json_at(&bases[1], "/v1/usage/race-b").await);
    assert_eq!(a + b, 60, "race-a {a}, race-b {b}");
    assert!(a > 0 && b > 0, "both keys raced: race-a {a}, race-b {b}");
}

/// A day ring's bucket is a whole minute, shared by every key of a pool: its requests
/// counter holds far more than a u16 (65,535), so a busy key or pool is never refused below
/// its per-day limits, on either store; a per-window ring's sub-second bucket keeps the
/// u16 and refuses past it until the next bucket, alike on both stores.
#[tokio::test]
async fn a_day_bucket_counts_past_65535_requests() {
    let redis = RedisServer::start();
    let now = Arc::new(AtomicU64::new(T0 + 5));
    let read = now.clone();
    let clock: Clock = Arc::new(move || read.load(Ordering::SeqCst));
    let stores = [
        Store::Memory(MemoryStore::with_clock(clock.clone())),
        Store::Redis(
            RedisStore::connect_with_clock(&redis.url(), Duration::from_secs(2), clock)
                .await
                .unwrap(),
        ),
    ];
    let big = limits([10_000_000, 10_000_000, 10_000_000]);
    for store in &stores {
        let tag = unique("busy-pool");
        let day = Bound {
            ring: RingRef {
                tag: tag.clone(),
                scope: Scope::Pool,
                shape: WindowShape::DAY,
            },
            limits: big,
        };
        let minute = Bound {
            ring: RingRef {
                tag: tag.clone(),
                scope: Scope::Key(key("member")),
                shape: shape(60_000, 100),
            },
            limits: big,
        };
        let check = |set: Vec<Bound>, requests: u64| async move {
            store
                .reserve_all(&set, &usage([requests, 1, 1]), Charge::Check, None)
                .await
                .unwrap()
        };
        // 40,000 and 40,000 in one minute of the day ring, in two 100 ms buckets of the
        // per-window ring.
        for step in 0..2u64 {
            now.store(T0 + 5 + 100 * step, Ordering::SeqCst);
            let v = check(vec![day.clone(), minute.clone()], 40_000).await;
            let Verdict::Admitted { snapshots, .. } = v else {
                panic!("request {step} refused below every limit: {v:?}");
            };
            assert_eq!(snapshots[0].usage.requests, 40_000 * (step + 1));
        }
        // The per-window ring's bucket holds 40,000 of at most 65,535: 30,000 more is
        // refused, for the next bucket, though every limit has room.
        let v = check(vec![minute.clone()], 30_000).await;
        let Verdict::Denied { retry_after_ms, .. } = v else {
            panic!("a sub-second bucket took more than a u16: {v:?}");
        };
        assert_eq!(retry_after_ms, Some(100 - 5));
        let day_used = store
            .usage_all(std::slice::from_ref(&day.ring))
            .await
            .unwrap();
        assert_eq!(day_used[0].usage.requests, 80_000);
    }
}

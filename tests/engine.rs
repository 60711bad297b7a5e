//! The engine's rules, checked against a real Redis (standalone and Cluster) the tests
//! start, against the in-process store, and against the brute-force reference model.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::reference::{Reference, Settled};
use common::{RedisCluster, RedisServer};
use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::redis::{marker_key, ring_key, RedisStore};
use llm_ratelimit::engine::{
    Charge, Clock, Decision, KeyName, LimitKind, Limits, Reservation, Settlement, Store,
    StoreError, Usage, WindowShape,
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

fn manual_clock(start: u64) -> (Arc<AtomicU64>, Clock) {
    let now = Arc::new(AtomicU64::new(start));
    let read = now.clone();
    (now, Arc::new(move || read.load(Ordering::SeqCst)))
}

fn unique_key(prefix: &str) -> KeyName {
    static N: AtomicU64 = AtomicU64::new(0);
    KeyName::new(&format!("{prefix}-{}", N.fetch_add(1, Ordering::SeqCst))).unwrap()
}

/// A marker id, as admission picks them.
fn rand_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::SeqCst)
}

fn usage(a: [u64; 3]) -> Usage {
    Usage {
        requests: a[0],
        input_tokens: a[1],
        output_tokens: a[2],
    }
}

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        want: [u64; 3],
        marker: bool,
        force: bool,
    },
    Settle {
        pick: usize,
        actual: u64,
    },
    Refund {
        amount: [u64; 3],
        /// By the marker of this pick among those ever left; `None` = newest first.
        pick: Option<usize>,
    },
    Usage,
    Wait {
        ms: u64,
    },
    /// Idle a whole window and then some.
    Idle {
        extra_ms: u64,
    },
    /// The clock steps back (a failover to a node whose clock is behind).
    Back {
        ms: u64,
    },
}

/// A token count; often zero, so that empty charges (whose buckets hold nothing until
/// settled) come up.
fn tokens() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 3 => 0u64..60]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..3, tokens(), tokens(), any::<bool>(), prop::bool::weighted(0.1)).prop_map(
            |(r, i, o, marker, force)| Op::Reserve {
                want: [r, i, o],
                marker,
                force,
            }
        ),
        2 => (any::<usize>(), 0u64..90).prop_map(|(pick, actual)| Op::Settle { pick, actual }),
        2 => (0u64..3, 0u64..80, 0u64..80, prop::option::weighted(0.6, any::<usize>()))
            .prop_map(|(r, i, o, pick)| Op::Refund {
                amount: [r, i, o],
                pick,
            }),
        1 => Just(Op::Usage),
        4 => prop_oneof![0u64..150, 0u64..1200, 1000u64..5000].prop_map(|ms| Op::Wait { ms }),
        1 => (0u64..1000).prop_map(|extra_ms| Op::Idle { extra_ms }),
        1 => (1u64..1500).prop_map(|ms| Op::Back { ms }),
    ]
}

fn settlement(s: Settlement) -> Settled {
    match s {
        Settlement::Applied { delta } => Settled::Applied(delta),
        Settlement::Expired => Settled::Expired,
        Settlement::Unknown => Settled::Unknown,
    }
}

/// Runs one sequence on both stores and the reference, checking after every step that
/// the stores agree with each other exactly, with the bucketed reference exactly, and
/// with the exact sliding window within one bucket.
async fn run_sequence(
    redis_url: &str,
    window_ms: u64,
    precision_ms: u64,
    limits: [u64; 3],
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let shape = shape(window_ms, precision_ms);
    let (clock_now, clock) = manual_clock(T0 + 37);
    let memory = Store::Memory(MemoryStore::with_clock(clock.clone()));
    let redis = Store::Redis(
        RedisStore::connect_with_clock(redis_url, Duration::from_secs(2), clock)
            .await
            .unwrap(),
    );
    let key = unique_key("prop");
    let lim = Limits {
        requests: limits[0],
        input_tokens: limits[1],
        output_tokens: limits[2],
    };
    let mut model = Reference::new(window_ms, precision_ms);
    // Every marker id left so far (settled, used up and expired ones too).
    let mut ids: Vec<u64> = Vec::new();
    // What forced charges and settlements above their reservations added: the exact window
    // may exceed a limit by that much, no more.
    let mut slack = [0u64; 3];
    let mut latest = 0;
    for op in ops {
        let now = clock_now.load(Ordering::SeqCst);
        latest = latest.max(now);
        match op {
            Op::Wait { ms } => {
                clock_now.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Idle { extra_ms } => {
                clock_now.fetch_add(window_ms + extra_ms, Ordering::SeqCst);
            }
            Op::Back { ms } => {
                clock_now.fetch_sub(ms, Ordering::SeqCst);
            }
            Op::Usage => {
                let m = memory.usage(&key, shape).await.unwrap();
                let r = redis.usage(&key, shape).await.unwrap();
                prop_assert_eq!(m, r);
                model.touch(now, false);
                prop_assert_eq!(m.usage, usage(model.bucketed(now)));
                prop_assert_eq!(m.reset_ms, model.resets(now));
            }
            Op::Refund { amount, pick } => {
                let id = pick.and_then(|p| (!ids.is_empty()).then(|| ids[p % ids.len()]));
                let a = usage(amount);
                let m = memory.refund(&key, shape, &a, id).await.unwrap();
                let r = redis.refund(&key, shape, &a, id).await.unwrap();
                prop_assert_eq!(m, r);
                model.touch(now, false);
                model.refund(now, amount, id);
                prop_assert_eq!(m.usage, usage(model.bucketed(now)));
                prop_assert_eq!(m.reset_ms, model.tail_resets(now));
            }
            Op::Reserve {
                want,
                marker,
                force,
            } => {
                let w = usage(want);
                let charge = if force { Charge::Force } else { Charge::Check };
                let id = marker.then(|| ids.len() as u64 + 1);
                let m = memory
                    .reserve(&key, shape, &lim, &w, charge, id)
                    .await
                    .unwrap();
                let r = redis
                    .reserve(&key, shape, &lim, &w, charge, id)
                    .await
                    .unwrap();
                let too_large = !force && (0..3).any(|k| want[k] > limits[k]);
                model.touch(now, !too_large);
                let fits = force || model.fits(now, want, limits);
                // Behind an instant already seen: the exact window is not defined then.
                let stepped_back = now < latest;
                match (&m, &r) {
                    (
                        Decision::Admitted {
                            snapshot: ms,
                            reservation: mr,
                        },
                        Decision::Admitted {
                            snapshot: rs,
                            reservation: rr,
                        },
                    ) => {
                        prop_assert_eq!(ms, rs);
                        prop_assert!(fits, "admitted but the reference says it does not fit");
                        model.admit(now, want, id);
                        if let Some(id) = id {
                            ids.push(id);
                        }
                        if force {
                            for k in 0..3 {
                                slack[k] += want[k];
                            }
                        }
                        prop_assert_eq!(ms.usage, usage(model.bucketed(now)));
                        prop_assert_eq!(ms.reset_ms, model.tail_resets(now));
                        // Never over a limit in the exact window, but for the slack.
                        if !stepped_back {
                            let exact = model.exact(now, window_ms);
                            for k in 0..3 {
                                prop_assert!(exact[k] <= limits[k] + slack[k]);
                            }
                        }
                        prop_assert_eq!(mr.as_ref().map(|r| r.id), id);
                        prop_assert_eq!(rr.as_ref().map(|r| r.id), id);
                    }
                    (
                        Decision::Denied {
                            snapshot: ms,
                            limit: ml,
                            retry_after_ms: mretry,
                        },
                        Decision::Denied {
                            snapshot: rs,
                            limit: rl,
                            retry_after_ms: rretry,
                        },
                    ) => {
                        prop_assert_eq!(ms, rs);
                        prop_assert_eq!(ml, rl);
                        prop_assert_eq!(mretry, rretry);
                        prop_assert!(!fits, "denied but the reference says it fits");
                        prop_assert_eq!(ms.usage, usage(model.bucketed(now)));
                        prop_assert_eq!(ms.reset_ms, model.resets(now));
                        // The limit the request alone exceeds, else the first one full.
                        let used = if too_large {
                            [0; 3]
                        } else {
                            model.bucketed(now)
                        };
                        let first = (0..3).find(|k| used[*k] + want[*k] > limits[*k]);
                        prop_assert_eq!(LimitKind::ALL.iter().position(|k| k == ml), first);
                        // A denial is justified by the window stretched by one bucket.
                        if !stepped_back {
                            let stretched = model.exact(now, window_ms + precision_ms);
                            prop_assert!(
                                too_large || (0..3).any(|k| stretched[k] + want[k] > limits[k])
                            );
                        }
                        match mretry {
                            None => prop_assert!(too_large),
                            Some(retry) => {
                                let at = model.first_fit(now, want, limits);
                                prop_assert_eq!(Some(now + retry), at);
                            }
                        }
                    }
                    _ => prop_assert!(false, "stores disagree: memory {m:?} redis {r:?}"),
                }
            }
            Op::Settle { pick, actual } => {
                if ids.is_empty() {
                    continue;
                }
                let id = ids[pick % ids.len()];
                let res = Reservation {
                    key: key.clone(),
                    shape,
                    id,
                };
                let m = settlement(memory.settle(&res, actual).await.unwrap());
                let r = settlement(redis.settle(&res, actual).await.unwrap());
                prop_assert_eq!(m, r);
                let expected = model.settle(id, now, actual);
                prop_assert_eq!(m, expected);
                if let Settled::Applied(d) = expected {
                    slack[2] += d.max(0) as u64;
                }
            }
        }
    }
    let now = clock_now.load(Ordering::SeqCst);
    let m = memory.usage(&key, shape).await.unwrap();
    prop_assert_eq!(m, redis.usage(&key, shape).await.unwrap());
    model.touch(now, false);
    prop_assert_eq!(m.usage, usage(model.bucketed(now)));
    common::layout::check_ring(redis_url, &ring_key(&key, shape), shape).await
}

#[test]
fn stores_agree_with_each_other_and_the_reference() {
    // One Redis and one runtime for all cases (each case uses its own key), owned by this
    // test so that the server is killed when it ends (a static would outlive the process).
    let redis = RedisServer::start();
    let url = redis.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The production shape (601 slots) beside small ones that idle and wrap often.
    let strategy = (
        prop_oneof![
            Just((60_000u64, 100u64)),
            Just((2000, 100)),
            Just((1000, 250)),
            Just((3000, 500)),
            Just((3000, 100))
        ],
        (1u64..8, 1u64..200, 1u64..200),
        prop::collection::vec(op(), 1..80),
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    });
    let result = runner.run(&strategy, |((window_ms, precision_ms), limits, ops)| {
        rt.block_on(run_sequence(
            &url,
            window_ms,
            precision_ms,
            [limits.0, limits.1, limits.2],
            ops,
        ))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn big_limits() -> Limits {
    Limits {
        requests: 1_000_000,
        input_tokens: 1_000_000,
        output_tokens: 1_000_000,
    }
}

/// `amounts` reserved under limits far away (so admitted), at `at` on the manual clock.
async fn admit_at(
    store: &Store,
    now: &AtomicU64,
    key: &KeyName,
    shape: WindowShape,
    at: u64,
    amounts: [u64; 3],
) -> Decision {
    now.store(at, Ordering::SeqCst);
    store
        .reserve(
            key,
            shape,
            &big_limits(),
            &usage(amounts),
            Charge::Check,
            None,
        )
        .await
        .unwrap()
}

/// Both stores, on one manual clock.
/// A Redis store at `url` whose scripts take the test's manual clock, started at `start`.
async fn redis_on_manual_clock(url: &str, start: u64) -> (Arc<AtomicU64>, Store) {
    let (now, clock) = manual_clock(start);
    let store = RedisStore::connect_with_clock(url, Duration::from_secs(2), clock)
        .await
        .unwrap();
    (now, Store::Redis(store))
}

async fn both_stores(redis: &RedisServer, start: u64) -> (Arc<AtomicU64>, Vec<Store>) {
    let (now, clock) = manual_clock(start);
    let r = RedisStore::connect_with_clock(&redis.url(), Duration::from_secs(2), clock.clone())
        .await
        .unwrap();
    (
        now,
        vec![
            Store::Memory(MemoryStore::with_clock(clock)),
            Store::Redis(r),
        ],
    )
}

#[tokio::test]
async fn a_denied_request_leaves_usage_unchanged() {
    let redis = RedisServer::start();
    let (_, stores) = both_stores(&redis, T0).await;
    let shape = shape(60_000, 100);
    let limits = Limits {
        requests: 5,
        input_tokens: 100,
        output_tokens: 100,
    };
    for store in &stores {
        let key = unique_key("deny");
        let ok = store
            .reserve(
                &key,
                shape,
                &limits,
                &usage([1, 60, 60]),
                Charge::Check,
                Some(rand_id()),
            )
            .await
            .unwrap();
        assert!(matches!(ok, Decision::Admitted { .. }));
        let before = store.usage(&key, shape).await.unwrap();
        for want in [[1, 41, 1], [1, 1, 41], [1, 101, 1]] {
            let d = store
                .reserve(
                    &key,
                    shape,
                    &limits,
                    &usage(want),
                    Charge::Check,
                    Some(rand_id()),
                )
                .await
                .unwrap();
            assert!(
                matches!(d, Decision::Denied { .. }),
                "{want:?} should be denied: {d:?}"
            );
        }
        assert_eq!(store.usage(&key, shape).await.unwrap(), before);
    }
}

/// Reserves `want` under generous limits, leaving a reservation to settle.
async fn admitted_for_settlement(
    store: &Store,
    key: &KeyName,
    shape: WindowShape,
    want: [u64; 3],
) -> llm_ratelimit::engine::Reservation {
    match store
        .reserve(
            key,
            shape,
            &big_limits(),
            &usage(want),
            Charge::Check,
            Some(rand_id()),
        )
        .await
        .unwrap()
    {
        Decision::Admitted {
            reservation: Some(r),
            ..
        } => r,
        other => panic!("admission with a reservation expected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_duplicate_report_settles_once_and_a_late_one_changes_nothing() {
    let redis = RedisServer::start();
    let (now, stores) = both_stores(&redis, T0).await;
    let shape = shape(2_000, 100);
    for store in &stores {
        let key = unique_key("settle");
        let res = admitted_for_settlement(store, &key, shape, [1, 10, 500]).await;
        assert_eq!(
            store.settle(&res, 120).await.unwrap(),
            Settlement::Applied { delta: -380 }
        );
        assert_eq!(store.settle(&res, 120).await.unwrap(), Settlement::Unknown);
        assert_eq!(
            store.usage(&key, shape).await.unwrap().usage.output_tokens,
            120
        );

        // Higher than reserved is settled too.
        let up = admitted_for_settlement(store, &key, shape, [1, 0, 10]).await;
        assert_eq!(
            store.settle(&up, 25).await.unwrap(),
            Settlement::Applied { delta: 15 }
        );
        assert_eq!(
            store.usage(&key, shape).await.unwrap().usage.output_tokens,
            145
        );

        // A reservation whose bucket has left the window changes nothing, even a fresh one.
        let late = admitted_for_settlement(store, &key, shape, [1, 0, 300]).await;
        now.fetch_add(2_100, Ordering::SeqCst);
        let fresh = store
            .reserve(
                &key,
                shape,
                &big_limits(),
                &usage([1, 0, 7]),
                Charge::Check,
                None,
            )
            .await
            .unwrap();
        assert!(matches!(fresh, Decision::Admitted { .. }));
        let before = store.usage(&key, shape).await.unwrap();
        assert_eq!(before.usage, usage([1, 0, 7]));
        let s = store.settle(&late, 0).await.unwrap();
        assert!(
            matches!(s, Settlement::Expired | Settlement::Unknown),
            "{s:?}"
        );
        assert_eq!(store.usage(&key, shape).await.unwrap(), before);
    }
}

/// A window full of uneven buckets, with gaps, and output tokens only in its second half:
/// denials that fit only after a given share of it leaves get the same answer from both
/// stores (the Redis script finds it on its block sums, the in-process store bucket by
/// bucket), and that answer is the bucket where the freed usage first suffices.
#[tokio::test]
async fn a_denial_deep_in_a_full_window_says_when_it_fits() {
    let redis = RedisServer::start();
    let (now, stores) = both_stores(&redis, T0).await;
    let shape = shape(60_000, 100);
    let amounts = |i: u64| -> [u64; 3] {
        if i % 37 == 5 {
            return [0, 0, 0];
        }
        [
            1,
            1 + (i * 7) % 13,
            if i < 300 { 0 } else { 1 + (i * 11) % 17 },
        ]
    };
    let start = T0 - T0 % 100 + 100;
    let mut decisions: Vec<Vec<Decision>> = Vec::new();
    for store in &stores {
        let key = unique_key("deep");
        for i in 0..600u64 {
            let d = admit_at(store, &now, &key, shape, start + i * 100, amounts(i)).await;
            assert!(matches!(d, Decision::Admitted { .. }), "{d:?}");
        }
        let at = start + 599 * 100 + 50;
        now.store(at, Ordering::SeqCst);
        let totals = (0..600)
            .map(amounts)
            .fold([0u64; 3], |t, a| [t[0] + a[0], t[1] + a[1], t[2] + a[2]]);
        let limits = Limits {
            requests: totals[0],
            input_tokens: totals[1],
            output_tokens: totals[2],
        };
        let mut seen = Vec::new();
        for kind in 0..3 {
            for share in [1u64, 5, 30, 50, 77, 99] {
                // Ask for what the oldest `share` % of the window's usage of this limit frees.
                let upto = 600 * share / 100;
                let mut want = [0u64; 3];
                want[kind] = (0..upto).map(|i| amounts(i)[kind]).sum::<u64>().max(1);
                let d = store
                    .reserve(&key, shape, &limits, &usage(want), Charge::Check, None)
                    .await
                    .unwrap();
                let Decision::Denied {
                    retry_after_ms,
                    snapshot,
                    ..
                } = &d
                else {
                    panic!("denial expected, got {d:?}");
                };
                // The first bucket whose leaving frees `want`.
                let mut freed = 0;
                let fits_after = (0..600u64)
                    .find(|&i| {
                        freed += amounts(i)[kind];
                        freed >= want[kind]
                    })
                    .unwrap();
                let leaves = (start / 100 + fits_after + 601) * 100;
                assert_eq!(*retry_after_ms, Some(leaves - at), "kind {kind}, {share} %");
                assert_eq!(snapshot.usage, usage(totals));
                seen.push(d);
            }
        }
        decisions.push(seen);
    }
    assert_eq!(decisions[0], decisions[1], "the stores disagree");
}

#[tokio::test]
async fn a_denial_says_when_the_request_fits_from_the_buckets() {
    let redis = RedisServer::start();
    let (now, stores) = both_stores(&redis, T0).await;
    let shape = shape(60_000, 100);
    let limits = Limits {
        requests: 3,
        input_tokens: 1000,
        output_tokens: 1000,
    };
    for store in &stores {
        now.store(T0, Ordering::SeqCst);
        let key = unique_key("retry");
        for step in [0, 10_000, 20_000] {
            now.store(T0 + step, Ordering::SeqCst);
            let d = store
                .reserve(&key, shape, &limits, &usage([1, 1, 1]), Charge::Check, None)
                .await
                .unwrap();
            assert!(matches!(d, Decision::Admitted { .. }));
        }
        now.store(T0 + 30_050, Ordering::SeqCst);
        let Decision::Denied {
            retry_after_ms,
            limit,
            snapshot,
        } = store
            .reserve(&key, shape, &limits, &usage([1, 1, 1]), Charge::Check, None)
            .await
            .unwrap()
        else {
            panic!("denial expected");
        };
        assert_eq!(limit.as_str(), "requests");
        // The first request's bucket [T0, T0+100) leaves the window at T0 + 60_100.
        assert_eq!(retry_after_ms, Some(60_100 - 30_050));
        assert_eq!(snapshot.reset_ms[0], 60_100 - 30_050);
    }
}

#[tokio::test]
async fn a_busy_ring_stays_bounded() {
    let redis = RedisServer::start();
    let (now, store) = redis_on_manual_clock(&redis.url(), T0).await;
    let shape = shape(60_000, 100);
    let key = unique_key("mem");
    for i in 0..3_000u64 {
        admit_at(&store, &now, &key, shape, T0 + i * 37, [1, 100, 50]).await;
    }
    let ring = ring_key(&key, shape);
    let len: usize = redis.cli(&["STRLEN", &ring]).parse().unwrap();
    // header (with the head bucket's counts), 601 slots, and 25 block sums of 25 slots
    // (the last one of 1)
    assert_eq!(len, 60 + 10 * 601 + 24 * 25, "ring is {len} bytes");
}

/// Polls until `key` is gone from `redis`, or fails at the deadline.
fn wait_until_gone(redis: &RedisServer, key: &str, deadline: std::time::Instant) {
    while redis.cli(&["EXISTS", key]) != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "{key} still there (PTTL {})",
            redis.cli(&["PTTL", key])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On Redis's own clock (no test clock): the ring and the marker carry a TTL of a window
/// and two buckets, and an idle key's ring and marker are gone once it has passed.
#[tokio::test]
async fn an_idle_key_expires_on_redis_time() {
    let redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_secs(2)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "store did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shape = shape(1_000, 100);
    let key = unique_key("idle");
    let id = rand_id();
    let d = store
        .reserve(
            &key,
            shape,
            &big_limits(),
            &usage([1, 5, 5]),
            Charge::Check,
            Some(id),
        )
        .await
        .unwrap();
    assert!(matches!(d, Decision::Admitted { .. }), "{d:?}");
    let started = std::time::Instant::now();
    let ring = ring_key(&key, shape);
    let marker = marker_key(&key, id);
    for k in [&ring, &marker] {
        let ttl: i64 = redis.cli(&["PTTL", k]).parse().unwrap();
        assert!(ttl > 0 && ttl <= shape.ttl_ms() as i64, "{k}: PTTL {ttl}");
    }
    // Idle past the window: both go by themselves, soon after their TTL.
    let deadline = started + Duration::from_millis(shape.ttl_ms()) + Duration::from_secs(5);
    wait_until_gone(&redis, &ring, deadline);
    wait_until_gone(&redis, &marker, deadline);
    assert!(started.elapsed() >= Duration::from_millis(shape.window_ms()));
    // And the key starts afresh.
    assert_eq!(
        store.usage(&key, shape).await.unwrap().usage,
        Usage::default()
    );
}

/// `nodes` independent connections fire `per_node` concurrent reservations each at one key.
async fn race(
    url: &str,
    nodes: usize,
    per_node: usize,
    limits: Limits,
    want: Usage,
) -> (usize, KeyName) {
    let shape = shape(60_000, 100);
    let key = unique_key("race");
    let mut stores = Vec::new();
    for _ in 0..nodes {
        let s = RedisStore::connect(url, Duration::from_secs(2)).unwrap();
        let store = Arc::new(Store::Redis(s));
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
    let mut tasks = Vec::new();
    for store in &stores {
        for _ in 0..per_node {
            let (store, key) = (store.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                store
                    .reserve(&key, shape, &limits, &want, Charge::Check, Some(rand_id()))
                    .await
                    .unwrap()
            }));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Decision::Admitted { .. }) {
            admitted += 1;
        }
    }
    let used = stores[0].usage(&key, shape).await.unwrap().usage;
    assert_eq!(used.requests, admitted as u64 * want.requests);
    assert_eq!(used.input_tokens, admitted as u64 * want.input_tokens);
    (admitted, key)
}

/// Races on three keys; returns their names.
async fn races_admit_exactly_the_limit(url: &str) -> Vec<KeyName> {
    let by_requests = Limits {
        requests: 100,
        input_tokens: 1_000_000,
        output_tokens: 1_000_000,
    };
    let (n, a) = race(url, 3, 150, by_requests, usage([1, 7, 3])).await;
    assert_eq!(n, 100);
    let by_input = Limits {
        requests: 10_000,
        input_tokens: 1_000,
        output_tokens: 1_000_000,
    };
    let (n, b) = race(url, 3, 150, by_input, usage([1, 7, 3])).await;
    assert_eq!(n, 1_000 / 7);
    let by_output = Limits {
        requests: 10_000,
        input_tokens: 1_000_000,
        output_tokens: 999,
    };
    let (n, c) = race(url, 3, 150, by_output, usage([1, 7, 10])).await;
    assert_eq!(n, 99);
    vec![a, b, c]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    races_admit_exactly_the_limit(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_admit_exactly_the_limit_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let keys = races_admit_exactly_the_limit(&cluster.url()).await;
    // Each key's ring exists on exactly one master, in the slot of the key's hash tag.
    for key in keys {
        let ring = ring_key(&key, shape(60_000, 100));
        let node = &cluster.nodes[0];
        let slot = node.cli(&["CLUSTER", "KEYSLOT", &ring]);
        assert_eq!(
            slot,
            node.cli(&["CLUSTER", "KEYSLOT", key.as_str()]),
            "{ring}"
        );
        let holders: Vec<_> = cluster
            .nodes
            .iter()
            .filter(|n| n.cli(&["EXISTS", &ring]) == "1")
            .collect();
        assert_eq!(holders.len(), 1, "{ring} should be on exactly one master");
        let keys_in_slot = holders[0].cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
        assert!(
            keys_in_slot.lines().any(|k| k == ring),
            "{ring} not in slot {slot}"
        );
    }
}

#[tokio::test]
async fn a_store_that_does_not_answer_errors_within_its_deadline() {
    let redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url(), Duration::from_millis(50)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Freeze Redis: the call must fail with a timeout rather than hang.
    let pid = redis
        .cli(&["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let r = store
        .reserve(
            &unique_key("stuck"),
            shape(60_000, 100),
            &big_limits(),
            &usage([1, 1, 1]),
            Charge::Check,
            None,
        )
        .await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(matches!(r, Err(StoreError::Timeout(_))), "{r:?}");
}

#[tokio::test]
async fn rediss_urls_speak_tls() {
    let redis = RedisServer::start_tls();
    // The server's certificate is verified against the test's own CA (rustls-native-certs
    // reads SSL_CERT_FILE); no other test in this binary uses TLS.
    std::env::set_var("SSL_CERT_FILE", redis.ca_file());
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let (_, store) = redis_on_manual_clock(&url, T0).await;
    let key = unique_key("tls");
    let shape = shape(60_000, 100);
    let d = store
        .reserve(
            &key,
            shape,
            &big_limits(),
            &usage([1, 5, 5]),
            Charge::Check,
            None,
        )
        .await
        .unwrap();
    assert!(matches!(d, Decision::Admitted { .. }));
    assert_eq!(
        store.usage(&key, shape).await.unwrap().usage,
        usage([1, 5, 5])
    );
}

/// A refund without a marker larger than the window holds walks back only over the
/// buckets that can hold some of it (from the head to the tail), not a whole window: on a
/// day ring (1,441 buckets) with one request in it, a handful of reads, not ~1,400.
#[tokio::test]
async fn a_refund_larger_than_the_window_reads_only_its_non_empty_buckets() {
    let redis = RedisServer::start();
    let (now, store) = redis_on_manual_clock(&redis.url(), T0).await;
    let day = WindowShape::DAY;
    let key = unique_key("refund-day");
    admit_at(&store, &now, &key, day, T0, [1, 100, 50]).await;
    // Ten minutes on: the head moved, the request sits ten buckets back.
    now.store(T0 + 600_000, Ordering::SeqCst);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let s = store
        .refund(&key, day, &usage([5, 999, 999]), None)
        .await
        .unwrap();
    assert_eq!(s.usage, usage([0, 0, 0]));
    let stats = redis.cli(&["INFO", "commandstats"]);
    let reads: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_getrange:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(reads <= 20, "a refund read {reads} ranges:\n{stats}");
}

#[tokio::test]
async fn a_refund_takes_back_from_the_newest_buckets_and_never_below_zero() {
    let redis = RedisServer::start();
    let (now, stores) = both_stores(&redis, T0).await;
    let shape = shape(2_000, 100);
    let mut seen = Vec::new();
    for store in &stores {
        now.store(T0, Ordering::SeqCst);
        let key = unique_key("refund");
        for (step, want) in [(0, [1, 10, 5]), (500, [1, 20, 5]), (900, [2, 30, 5])] {
            now.store(T0 + step, Ordering::SeqCst);
            let d = store
                .reserve(
                    &key,
                    shape,
                    &big_limits(),
                    &usage(want),
                    Charge::Check,
                    None,
                )
                .await
                .unwrap();
            assert!(matches!(d, Decision::Admitted { .. }));
        }
        // 40 input: 30 from the newest bucket, 10 from the one before.
        let s = store
            .refund(&key, shape, &usage([1, 40, 0]), None)
            .await
            .unwrap();
        assert_eq!(s.usage, usage([3, 20, 15]));
        // What leaves the window first is the oldest bucket: still holding its 10 input.
        now.store(T0 + 2_150, Ordering::SeqCst);
        assert_eq!(
            store.usage(&key, shape).await.unwrap().usage,
            usage([2, 10, 10])
        );
        // More than the window holds: down to zero, not below.
        let s = store
            .refund(&key, shape, &usage([9, 999, 999]), None)
            .await
            .unwrap();
        assert_eq!(s.usage, usage([0, 0, 0]));
        let fresh = store
            .reserve(
                &key,
                shape,
                &big_limits(),
                &usage([1, 1, 1]),
                Charge::Check,
                None,
            )
            .await
            .unwrap();
        let Decision::Admitted { snapshot, .. } = fresh else {
            panic!("admission expected");
        };
        assert_eq!(snapshot.usage, usage([1, 1, 1]));
        seen.push(snapshot);
    }
    assert_eq!(seen[0], seen[1], "both stores answer alike");
}

/// Reserves `want` under generous limits with marker `id`.
async fn charge_with_marker(
    store: &Store,
    key: &KeyName,
    shape: WindowShape,
    want: [u64; 3],
    id: u64,
) -> Reservation {
    match store
        .reserve(
            key,
            shape,
            &big_limits(),
            &usage(want),
            Charge::Check,
            Some(id),
        )
        .await
        .unwrap()
    {
        Decision::Admitted {
            reservation: Some(r),
            ..
        } => r,
        other => panic!("admission with a marker expected, got {other:?}"),
    }
}

/// A ring evicted (here: deleted) while a marker survives: settling or refunding by that
/// marker must not touch the fresh ring's buckets (the epochs differ).
#[tokio::test]
async fn a_marker_that_outlived_its_ring_changes_nothing_in_the_new_one() {
    let redis = RedisServer::start();
    let (_, store) = redis_on_manual_clock(&redis.url(), T0).await;
    let shape = shape(60_000, 100);
    let key = unique_key("evicted");
    let settled = charge_with_marker(&store, &key, shape, [1, 10, 500], rand_id()).await;
    let refunded = charge_with_marker(&store, &key, shape, [1, 10, 500], rand_id()).await;
    assert_eq!(redis.cli(&["DEL", &ring_key(&key, shape)]), "1");
    // Other requests, in the same bucket, in the ring made afresh.
    for _ in 0..3 {
        charge_with_marker(&store, &key, shape, [1, 20, 300], rand_id()).await;
    }
    let before = store.usage(&key, shape).await.unwrap();
    assert_eq!(before.usage, usage([3, 60, 900]));
    assert_eq!(
        store.settle(&settled, 0).await.unwrap(),
        Settlement::Expired
    );
    assert_eq!(store.usage(&key, shape).await.unwrap(), before);
    store
        .refund(&key, shape, &usage([1, 10, 500]), Some(refunded.id))
        .await
        .unwrap();
    assert_eq!(store.usage(&key, shape).await.unwrap(), before);
}

/// A refund by marker goes back to the bucket the charge went into, at most what the
/// charge added; a settlement after a partial refund corrects against what is left.
#[tokio::test]
async fn a_refund_by_marker_frees_the_charged_bucket_only() {
    let redis = RedisServer::start();
    let (now, stores) = both_stores(&redis, T0).await;
    let shape = shape(2_000, 100);
    let mut seen = Vec::new();
    for store in &stores {
        now.store(T0, Ordering::SeqCst);
        let key = unique_key("refund-marker");
        let old = charge_with_marker(store, &key, shape, [1, 10, 100], rand_id()).await;
        now.store(T0 + 1_000, Ordering::SeqCst);
        charge_with_marker(store, &key, shape, [2, 40, 200], rand_id()).await;
        // More than the charge added: only what it added, and only from its bucket.
        let s = store
            .refund(&key, shape, &usage([5, 50, 80]), Some(old.id))
            .await
            .unwrap();
        assert_eq!(s.usage, usage([2, 40, 220]));
        // Newest-first would have emptied the newer bucket instead; here it is intact once
        // the old bucket has left the window.
        now.store(T0 + 2_150, Ordering::SeqCst);
        assert_eq!(
            store.usage(&key, shape).await.unwrap().usage,
            usage([2, 40, 200])
        );

        // Partial refund of output, then settlement against the rest of the reservation.
        now.store(T0 + 3_000, Ordering::SeqCst);
        let key = unique_key("refund-settle");
        let res = charge_with_marker(store, &key, shape, [1, 10, 500], rand_id()).await;
        store
            .refund(&key, shape, &usage([0, 0, 200]), Some(res.id))
            .await
            .unwrap();
        // 300 still reserved: settling at 120 gives back 180, to 120 in all.
        assert_eq!(
            store.settle(&res, 120).await.unwrap(),
            Settlement::Applied { delta: -180 }
        );
        assert_eq!(
            store.usage(&key, shape).await.unwrap().usage,
            usage([1, 10, 120])
        );

        // A marker used up by refunds is gone: its settlement is unknown, and a further
        // refund under it falls back to the newest buckets.
        let res = charge_with_marker(store, &key, shape, [1, 5, 5], rand_id()).await;
        let s = store
            .refund(&key, shape, &usage([1, 5, 5]), Some(res.id))
            .await
            .unwrap();
        assert_eq!(s.usage, usage([1, 10, 120]));
        assert_eq!(store.settle(&res, 1).await.unwrap(), Settlement::Unknown);
        let s = store
            .refund(&key, shape, &usage([1, 0, 0]), Some(res.id))
            .await
            .unwrap();
        assert_eq!(s.usage, usage([0, 10, 120]));

        // A forced charge leaves a marker too, and a refund by it undoes exactly it.
        let forced = match store
            .reserve(
                &key,
                shape,
                &Limits {
                    requests: 1,
                    input_tokens: 1,
                    output_tokens: 1,
                },
                &usage([3, 30, 30]),
                Charge::Force,
                Some(rand_id()),
            )
            .await
            .unwrap()
        {
            Decision::Admitted {
                reservation: Some(r),
                ..
            } => r,
            other => panic!("a forced charge is admitted with its marker: {other:?}"),
        };
        let s = store
            .refund(&key, shape, &usage([9, 99, 99]), Some(forced.id))
            .await
            .unwrap();
        assert_eq!(s.usage, usage([0, 10, 120]));
        seen.push(s);
    }
    assert_eq!(seen[0], seen[1], "both stores answer alike");
}

/// A denial's answer is computed in the script: the reply is a few integers, not the ring
/// (which at 60 s / 100 ms is 6 KB), however full the ring is.
#[tokio::test]
async fn a_denial_reply_is_small_however_full_the_ring() {
    let redis = RedisServer::start();
    let (now, store) = redis_on_manual_clock(&redis.url(), T0).await;
    let shape = shape(60_000, 100);
    let key = unique_key("full");
    for j in 0..600u64 {
        admit_at(&store, &now, &key, shape, T0 + j * 100, [1, 100, 50]).await;
    }
    now.store(T0 + 60_000, Ordering::SeqCst);
    let at_limit = Limits {
        requests: 600,
        ..big_limits()
    };
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let d = store
        .reserve(
            &key,
            shape,
            &at_limit,
            &usage([1, 1, 1]),
            Charge::Check,
            None,
        )
        .await
        .unwrap();
    let sent: u64 = redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The oldest bucket leaves at T0 + 60_100; every limit's oldest usage is in it.
    assert_eq!(
        d,
        Decision::Denied {
            snapshot: llm_ratelimit::engine::Snapshot {
                now_ms: T0 + 60_000,
                usage: usage([600, 60_000, 30_000]),
                reset_ms: [100, 100, 100],
            },
            limit: LimitKind::Requests,
            retry_after_ms: Some(100),
        }
    );
    assert!(sent < 300, "the denial cost {sent} bytes from Redis");
}

/// An empty charge's bucket may sit before the tail; settling output into it must move the
/// tail back, or resets and retries would be computed from a later bucket.
#[tokio::test]
async fn a_settlement_into_an_empty_bucket_counts_from_that_bucket() {
    let redis = RedisServer::start();
    let (now, stores) = both_stores(&redis, T0).await;
    let shape = shape(2_000, 100);
    for store in &stores {
        now.store(T0, Ordering::SeqCst);
        let key = unique_key("empty");
        let res = charge_with_marker(store, &key, shape, [0, 0, 0], rand_id()).await;
        now.store(T0 + 500, Ordering::SeqCst);
        charge_with_marker(store, &key, shape, [1, 1, 1], rand_id()).await;
        assert_eq!(
            store.settle(&res, 50).await.unwrap(),
            Settlement::Applied { delta: 50 }
        );
        // The bucket of T0 leaves the window at T0 + 2_100.
        now.store(T0 + 600, Ordering::SeqCst);
        let limits = Limits {
            requests: 10,
            input_tokens: 10,
            output_tokens: 51,
        };
        let d = store
            .reserve(&key, shape, &limits, &usage([0, 0, 1]), Charge::Check, None)
            .await
            .unwrap();
        let Decision::Denied {
            snapshot,
            retry_after_ms,
            ..
        } = d
        else {
            panic!("denial expected: {d:?}");
        };
        assert_eq!(retry_after_ms, Some(1_500));
        assert_eq!(snapshot.reset_ms, [2_000, 2_000, 1_500]);
        let Decision::Admitted { snapshot, .. } = store
            .reserve(
                &key,
                shape,
                &big_limits(),
                &usage([0, 0, 1]),
                Charge::Check,
                None,
            )
            .await
            .unwrap()
        else {
            panic!("admission expected");
        };
        assert_eq!(snapshot.reset_ms, [1_500, 1_500, 1_500]);
    }
}

/// An upstream's usage is not ours to trust: a settlement of an absurd output count (say
/// `"completion_tokens": 18446744073709551615`) saturates the bucket, as the slot's width
/// allows, in both stores alike, and never wraps back to a small count (a release).
#[tokio::test]
async fn an_absurd_settlement_saturates_the_bucket_in_both_stores() {
    let redis = RedisServer::start();
    let (_, stores) = both_stores(&redis, T0).await;
    let shape = shape(2_000, 100);
    let mut answers = Vec::new();
    for store in &stores {
        let key = unique_key("absurd");
        let res = admitted_for_settlement(store, &key, shape, [1, 0, 10]).await;
        let settled = store.settle(&res, u64::MAX).await.unwrap();
        let used = store.usage(&key, shape).await.unwrap().usage;
        answers.push((settled, used));
    }
    let full = u64::from(u32::MAX);
    let expected = (
        Settlement::Applied {
            delta: full as i64 - 10,
        },
        usage([1, 0, full]),
    );
    assert_eq!(answers, [expected, expected]);
}

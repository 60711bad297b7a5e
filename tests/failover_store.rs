//! The failover layer over real Redis, without a proxy: the circuit breaker opens on a
//! frozen Redis and fails fast, each `on_store_error` policy answers, local reservations
//! settle locally, and the breaker closes when Redis answers again. Then Redis HA: a
//! Sentinel failover and a Cluster master lost under load. Every Redis, replica and
//! Sentinel is started by the test on free loopback ports and stopped by pid.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, redis_cli, RedisCluster, RedisServer};
use llm_ratelimit::engine::failover::{FailoverStore, Hooks, Mode, OnStoreError};
use llm_ratelimit::engine::redis::RedisStore;
use llm_ratelimit::engine::{
    Charge, Decision, KeyName, Limits, Settlement, Store, StoreError, Usage, WindowShape,
};

/// The TLS tests set `SSL_CERT_FILE` (read when a TLS connection is made) to their own CA.
static ONE_CA: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const POLICIES: [OnStoreError; 3] = [OnStoreError::Deny, OnStoreError::Allow, OnStoreError::Local];

/// A policy the test switches, and the mode changes the store reported.
struct Harness {
    policy: Arc<AtomicU8>,
    modes: Arc<Mutex<Vec<(Mode, Mode)>>>,
}

impl Harness {
    fn new(policy: OnStoreError) -> Harness {
        let h = Harness {
            policy: Arc::new(AtomicU8::new(0)),
            modes: Arc::new(Mutex::new(Vec::new())),
        };
        h.set(policy);
        h
    }

    fn set(&self, policy: OnStoreError) {
        let i = POLICIES.iter().position(|p| *p == policy).unwrap();
        self.policy.store(i as u8, Ordering::SeqCst);
    }

    fn hooks(&self) -> Hooks {
        let (policy, modes) = (self.policy.clone(), self.modes.clone());
        Hooks {
            policy: Arc::new(move || POLICIES[policy.load(Ordering::SeqCst) as usize]),
            on_mode: Arc::new(move |from, to| modes.lock().unwrap().push((from, to))),
            on_nodes: Arc::new(|_| {}),
        }
    }

    fn store(&self, url: &str, deadline: Duration) -> Store {
        Store::Failover(FailoverStore::new(
            RedisStore::connect(url, deadline).unwrap(),
            "test-node",
            self.hooks(),
        ))
    }
}

fn mode(store: &Store) -> Mode {
    match store {
        Store::Failover(f) => f.mode(),
        _ => unreachable!(),
    }
}

fn shape() -> WindowShape {
    WindowShape::new(Duration::from_secs(60), Duration::from_millis(100)).unwrap()
}

fn key(name: &str) -> KeyName {
    KeyName::new(name).unwrap()
}

fn limits(requests: u64) -> Limits {
    Limits {
        requests,
        input_tokens: 1_000_000,
        output_tokens: 1_000_000,
    }
}

const ONE: Usage = Usage {
    requests: 1,
    input_tokens: 10,
    output_tokens: 100,
};

async fn reserve(
    store: &Store,
    k: &KeyName,
    limit: u64,
    marker: Option<u64>,
) -> Result<Decision, StoreError> {
    store
        .reserve(k, shape(), &limits(limit), &ONE, Charge::Check, marker)
        .await
}

async fn until(what: &str, secs: u64, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok().await {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_a_frozen_redis_fails_fast_and_closes_when_it_answers() {
    const DEADLINE: Duration = Duration::from_millis(100);
    let redis = RedisServer::start();
    let h = Harness::new(OnStoreError::Deny);
    let store = h.store(&redis.url(), DEADLINE);
    until("connected", 10, async || store.ping().await.is_ok()).await;
    let k = key("breaker");
    // A reservation in Redis, to settle after the outage.
    let Ok(Decision::Admitted {
        reservation: Some(in_redis),
        ..
    }) = reserve(&store, &k, 100, Some(1)).await
    else {
        panic!("not admitted in Redis");
    };

    signal("-STOP", redis.pid());
    // Calls that reach the frozen Redis fail at the deadline...
    let mut calls = 0;
    while mode(&store) == Mode::Exact {
        let r = reserve(&store, &k, 100, Some(2)).await;
        assert!(matches!(r, Err(StoreError::Timeout(_))), "{r:?}");
        calls += 1;
        assert!(calls <= 3, "still closed after {calls} timeouts");
    }
    assert_eq!(mode(&store), Mode::CircuitOpen);
    // ... then the breaker answers at once, without waiting for Redis.
    let started = Instant::now();
    for _ in 0..100 {
        let r = reserve(&store, &k, 100, Some(3)).await;
        assert!(matches!(r, Err(StoreError::CircuitOpen)), "{r:?}");
    }
    let each = started.elapsed() / 100;
    assert!(
        each < DEADLINE / 10,
        "a call with the breaker open took {each:?}"
    );
    // deny: not ready. allow and local: the node decides without Redis, so it is ready.
    assert!(store.ping().await.is_err());
    // A Redis reservation cannot be settled now: an error, and it stays as reserved.
    assert!(store.settle(&in_redis, 5).await.is_err());

    h.set(OnStoreError::Allow);
    assert!(store.ping().await.is_ok());
    let d = reserve(&store, &k, 1, Some(4)).await.unwrap();
    assert!(
        matches!(
            d,
            Decision::Admitted {
                reservation: None,
                ..
            }
        ),
        "allow admits and counts nothing: {d:?}"
    );

    h.set(OnStoreError::Local);
    assert!(store.ping().await.is_ok());
    let k = key("breaker-local");
    // One live node (the only one ever announced): the whole limit, on the local store.
    let Ok(Decision::Admitted {
        reservation: Some(local),
        snapshot,
    }) = reserve(&store, &k, 2, Some(5)).await
    else {
        panic!("local did not admit");
    };
    assert_eq!(snapshot.usage.requests, 1, "the local window starts empty");
    assert!(matches!(
        reserve(&store, &k, 2, Some(6)).await,
        Ok(Decision::Admitted { .. })
    ));
    assert!(matches!(
        reserve(&store, &k, 2, Some(7)).await,
        Ok(Decision::Denied { .. })
    ));
    // A local reservation settles locally, once.
    assert_eq!(
        store.settle(&local, 40).await.unwrap(),
        Settlement::Applied { delta: -60 }
    );
    assert_eq!(store.settle(&local, 40).await.unwrap(), Settlement::Unknown);
    until("mode reported local", 5, async || {
        mode(&store) == Mode::Local
    })
    .await;

    let back = Instant::now();
    signal("-CONT", redis.pid());
    until("exact again", 5, async || mode(&store) == Mode::Exact).await;
    eprintln!("exact again {:?} after SIGCONT", back.elapsed());
    // Exact: the Redis window, which never saw this key's two local admissions (what is
    // decided locally is not carried into Redis).
    let Ok(Decision::Admitted { snapshot, .. }) = reserve(&store, &k, 100, Some(8)).await else {
        panic!("not admitted after recovery");
    };
    assert_eq!(snapshot.usage.requests, 1, "{snapshot:?}");
    // The reservation made in Redis before the outage settles now.
    assert!(matches!(
        store.settle(&in_redis, 5).await.unwrap(),
        Settlement::Applied { .. }
    ));
    let modes = h.modes.lock().unwrap().clone();
    assert_eq!(
        modes,
        [
            (Mode::Exact, Mode::Exact),
            (Mode::Exact, Mode::CircuitOpen),
            (Mode::CircuitOpen, Mode::Local),
            (Mode::Local, Mode::Exact)
        ]
    );
}

/// A Sentinel of the test's own, watching `master` as `mymaster`; killed by pid on drop.
struct Sentinel {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// With `tls`, the directory of `common::make_certs`' files: the Sentinel then speaks
    /// only TLS, to clients and to Redis.
    fn start(master: u16, tls: Option<&std::path::Path>) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let listen = match tls {
            None => format!("port {port}\n"),
            Some(certs) => format!(
                "port 0\ntls-port {port}\ntls-replication yes\ntls-auth-clients no\n\
                 tls-cert-file {0}/cert.pem\ntls-key-file {0}/key.pem\ntls-ca-cert-file {0}/ca.pem\n",
                certs.display()
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 10000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let s = Sentinel {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "Sentinel did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_continue_after_a_sentinel_failover() {
    let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let sentinel = Sentinel::start(master.port, None);
    // The Sentinel must know the replica before the master dies, or it has none to promote.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis_cli(sentinel.port, &["SENTINEL", "replicas", "mymaster"])
        .contains(&replica.port.to_string())
        || !replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "Sentinel never saw the replica");
        std::thread::sleep(Duration::from_millis(50));
    }
    let h = Harness::new(OnStoreError::Deny);
    let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port);
    let store = h.store(&url, Duration::from_millis(250));
    until("connected through Sentinel", 10, async || {
        store.ping().await.is_ok()
    })
    .await;
    let k = key("sentinel");
    for _ in 0..3 {
        assert!(matches!(
            reserve(&store, &k, 10, None).await,
            Ok(Decision::Admitted { .. })
        ));
    }
    // The replica has the writes before the master goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while master
        .cli(&["INFO", "replication"])
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        != replica
            .cli(&["INFO", "replication"])
            .lines()
            .find_map(|l| l.strip_prefix("slave_repl_offset:"))
    {
        assert!(Instant::now() < deadline, "replica never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    drop(master);
    // Decisions continue on the promoted replica: the breaker's probe asks the Sentinel
    // for the master and follows it.
    let mut after = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while after.is_none() {
        assert!(Instant::now() < deadline, "no decision after the failover");
        if let Ok(Decision::Admitted { snapshot, .. }) = reserve(&store, &k, 10, None).await {
            after = Some(snapshot);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "decisions again {:?} after the master was killed",
        killed.elapsed()
    );
    assert!(replica.cli(&["ROLE"]).starts_with("master"));
    // The window came along: 3 before, this one after.
    assert_eq!(after.unwrap().usage.requests, 4);
    // And it is exact: the limit of 10 holds.
    let mut admitted = 4;
    for _ in 0..10 {
        if let Ok(Decision::Admitted { .. }) = reserve(&store, &k, 10, None).await {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_losing_a_master_under_load_answers_per_policy_and_stays_exact() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let h = Harness::new(OnStoreError::Deny);
    let store = Arc::new(h.store(&cluster.url(), Duration::from_millis(250)));
    until("connected to the Cluster", 10, async || {
        store.ping().await.is_ok()
    })
    .await;
    // Load over keys in every slot range while a master dies.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(Mutex::new((0u64, 0u64, Duration::ZERO)));
    let mut load = Vec::new();
    for t in 0..4 {
        let (store, stop, answered) = (store.clone(), stop.clone(), answered.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = key(&format!("load-{t}-{}", i % 16));
                let started = Instant::now();
                let r = reserve(&store, &k, 1_000_000, None).await;
                let took = started.elapsed();
                {
                    let mut a = answered.lock().unwrap();
                    match r {
                        Ok(_) => a.0 += 1,
                        Err(_) => a.1 += 1,
                    }
                    a.2 = a.2.max(took);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The redis-cli calls below block their thread: `block_in_place` hands this worker's
    // other tasks (the load among them) to another thread meanwhile, so the load keeps
    // running through the outage instead of waiting behind them.
    // The victim is the master that every node says serves the slot of a key the load
    // uses, so the outage is on the load's path.
    let deadline = Instant::now() + Duration::from_secs(20);
    let victim = loop {
        if let Some(port) = tokio::task::block_in_place(|| cluster.owner("load-0-0")) {
            break port;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never agreed who serves load-0-0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(victim));
    // A replica takes over the dead master's slots (cluster-node-timeout 2 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let promoted = tokio::task::block_in_place(|| {
            let ok = cluster
                .nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let masters = cluster.masters();
            ok && masters.len() == 3
                && !masters.contains(&victim)
                && cluster.owner("load-0-0").is_some_and(|p| p != victim)
        });
        if promoted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no replica took over {victim}: masters {:?}\n{}",
            cluster.masters(),
            cluster.nodes[0].cli(&["CLUSTER", "NODES"])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "replica promoted {:?} after the master was killed",
        killed.elapsed()
    );
    // Decisions everywhere again, within a few seconds of the promotion: under load, and
    // once more after it (the load's last failures may have opened the breaker for a probe).
    let every_slot_answers = async || {
        for i in 0..32 {
            let k = key(&format!("probe-{i}"));
            if reserve(&store, &k, 1_000_000, None).await.is_err() {
                return false;
            }
        }
        true
    };
    until("every slot answers under load", 20, every_slot_answers).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    until("every slot answers", 20, every_slot_answers).await;
    let (ok, failed, slowest) = *answered.lock().unwrap();
    eprintln!("under load: {ok} decided, {failed} answered 503 (deny), slowest {slowest:?}");
    assert!(
        ok > 0 && failed > 0,
        "the outage was not seen: {ok} ok, {failed} failed"
    );
    // Every call answered within its deadline (plus room for a loaded box).
    assert!(
        slowest < Duration::from_millis(250) + Duration::from_secs(1),
        "{slowest:?}"
    );

    // The exact race after the failover: 200 concurrent reservations, limit 25.
    let k = key("race-after-failover");
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { reserve(&store, &k, 25, None).await })
        })
        .collect();
    let (mut admitted, mut errors) = (0, Vec::new());
    for c in calls {
        match c.await.unwrap() {
            Ok(Decision::Admitted { .. }) => admitted += 1,
            Ok(Decision::Denied { .. }) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(admitted, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_urls_keep_tls() {
    let cluster = common::tls::TlsCluster::start(3);
    let _ca = ONE_CA.lock().await;
    // The nodes' certificates are verified against the test's own CA (rustls-native-certs
    // reads SSL_CERT_FILE).
    std::env::set_var("SSL_CERT_FILE", cluster.ca_file());
    let h = Harness::new(OnStoreError::Deny);
    let store = h.store(&cluster.url(), Duration::from_millis(500));
    until("connected to the TLS Cluster", 20, async || {
        store.ping().await.is_ok()
    })
    .await;
    // Keys in every slot range: each master answers over TLS.
    for i in 0..16 {
        let d = reserve(&store, &key(&format!("tls-{i}")), 10, None).await;
        assert!(matches!(d, Ok(Decision::Admitted { .. })), "{d:?}");
    }
    // The plain-text URL to the same nodes finds no one to talk to.
    let plain = cluster
        .url()
        .replace("rediss+cluster://", "redis+cluster://");
    let h = Harness::new(OnStoreError::Deny);
    let store = h.store(&plain, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(reserve(&store, &key("tls-plain"), 10, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel_urls_speak_tls_to_the_sentinels_and_the_master() {
    let master = RedisServer::start_tls();
    let certs = master.ca_file().parent().unwrap().to_path_buf();
    let sentinel = Sentinel::start(master.port, Some(&certs));
    // No other test in this binary uses TLS but the Cluster one, whose CA is another:
    // the two never run at once (ONE_CA).
    let _ca = ONE_CA.lock().await;
    std::env::set_var("SSL_CERT_FILE", master.ca_file());
    let h = Harness::new(OnStoreError::Deny);
    let url = format!("rediss+sentinel://127.0.0.1:{}/mymaster", sentinel.port);
    let store = h.store(&url, Duration::from_millis(500));
    until("connected through a TLS Sentinel", 20, async || {
        store.ping().await.is_ok()
    })
    .await;
    let k = key("sentinel-tls");
    for n in 1..=3 {
        let Ok(Decision::Admitted { snapshot, .. }) = reserve(&store, &k, 10, None).await else {
            panic!("not admitted over TLS");
        };
        assert_eq!(snapshot.usage.requests, n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_rate_limit_charges_follow_the_policy_and_refund_where_they_were_made() {
    use llm_ratelimit::admission::{Charged, Limiter};
    let redis = RedisServer::start();
    let h = Harness::new(OnStoreError::Deny);
    let store = h.store(&redis.url(), Duration::from_millis(100));
    until("connected", 10, async || store.ping().await.is_ok()).await;
    let config = llm_ratelimit::config::Config::parse(
        "keys:\n  - name: rls\n    key: sk-rls\n    rpm: 4\n    input_tpm: 1000\n    output_tpm: 1000\n",
        "keys.yaml",
    )
    .unwrap();
    let limiter = Limiter::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(config)),
        store,
        Arc::new(llm_ratelimit::metrics::Metrics::default()),
    );
    let one = Usage {
        requests: 1,
        input_tokens: 0,
        output_tokens: 0,
    };
    // Recorded in Redis, with the marker asked for: a refund by it undoes exactly this.
    assert!(matches!(
        limiter
            .charge("sk-rls", None, &one, Charge::Check, Some(1))
            .await,
        Charged::Admitted { claimed: true, .. }
    ));
    signal("-STOP", redis.pid());
    // deny: the store's failure, fast once the breaker is open.
    for _ in 0..5 {
        let c = limiter
            .charge("sk-rls", None, &one, Charge::Check, Some(2))
            .await;
        assert!(
            matches!(c, Charged::Failed(ref a) if a.status == 503),
            "{c:?}"
        );
    }
    // local: charged on this node's store (the whole limit: one live node), and a refund
    // naming the charge gives it back there, so the room is there again.
    h.set(OnStoreError::Local);
    for id in 10..14 {
        let c = limiter
            .charge("sk-rls", None, &one, Charge::Check, Some(id))
            .await;
        assert!(
            matches!(c, Charged::Admitted { claimed: true, .. }),
            "{c:?}"
        );
    }
    let c = limiter
        .charge("sk-rls", None, &one, Charge::Check, Some(14))
        .await;
    assert!(matches!(c, Charged::Denied { .. }), "{c:?}");
    let c = limiter.refund("sk-rls", None, &one, Some(13)).await;
    let Charged::Admitted { snapshot, .. } = c else {
        panic!("local refund failed: {c:?}");
    };
    assert_eq!(snapshot.usage.requests, 3);
    // A refund of the charge Redis holds cannot be made now: it stays (the safe side).
    let c = limiter.refund("sk-rls", None, &one, Some(1)).await;
    assert!(matches!(c, Charged::Failed(_)), "{c:?}");
    // allow: admitted, nothing counted, and it says so (`claimed: false`), so a
    // ShouldRateLimit call refused later on does not "undo" it from others' usage.
    h.set(OnStoreError::Allow);
    for id in 20..30 {
        let c = limiter
            .charge("sk-rls", None, &one, Charge::Check, Some(id))
            .await;
        assert!(
            matches!(c, Charged::Admitted { claimed: false, .. }),
            "{c:?}"
        );
    }
    signal("-CONT", redis.pid());
}

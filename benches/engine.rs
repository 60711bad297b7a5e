//! Engine benchmark: decisions/s of the Redis store, the ceiling of the same Lua script
//! under `redis-benchmark`, and the memory of one key's ring.
//!
//! Run with `cargo bench --bench engine`. It starts its own `redis-server` on a free
//! 127.0.0.1 port (see `tests/common`), bounds every load in time, kills the server at the
//! end, and prints Markdown sections to stdout (progress goes to stderr).
//!
//! `ENGINE_BENCH_SECS` (default 5) sets each measured interval; warm-up is 1 s.
//! `ENGINE_BENCH_ONLY=denials` runs only the denied-vs-admitted section, `=memory` only the
//! memory section, `=limits` only the cost of 1, 3, 5 and 6 rings per request.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_ratelimit::engine::redis::{ring_key, ring_key_of, RedisStore};
use llm_ratelimit::engine::{
    Bound, Charge, Clock, Decision, KeyName, Limits, ModelMatch, RingRef, Scope, Store, StoreError,
    Usage, Verdict, WindowShape,
};
use redis::aio::MultiplexedConnection;

const WINDOW_LUA: &str = include_str!("../lua/window.lua");
const RESERVE_LUA: &str = include_str!("../lua/reserve.lua");

const KEYS: usize = 100;
const HUGE: u64 = 1_000_000_000_000;
const LIMITS: Limits = Limits {
    requests: HUGE,
    input_tokens: HUGE,
    output_tokens: HUGE,
};
const WANT: Usage = Usage {
    requests: 1,
    input_tokens: 150,
    output_tokens: 256,
};
const WARM_UP: Duration = Duration::from_secs(1);
/// The production default deadline of one store call (`redis::DEFAULT_TIMEOUT`).
const PROD_DEADLINE_US: u32 = 50_000;
/// The bench's own deadline: long, so that it measures throughput rather than timeouts;
/// calls slower than the production deadline are counted separately.
const BENCH_TIMEOUT: Duration = Duration::from_secs(2);

fn shape() -> WindowShape {
    WindowShape::new(Duration::from_secs(60), Duration::from_millis(100)).unwrap()
}

fn measure_secs() -> u64 {
    std::env::var("ENGINE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0 && *s <= 60)
        .unwrap_or(5)
}

fn main() {
    let server = common::RedisServer::start();
    let port = server.port;
    let url = server.url();
    eprintln!("redis-server on 127.0.0.1:{port}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let workers = rt.metrics().num_workers();

    machine_section(workers);
    rt.block_on(async {
        let mut probe = Probe::connect(&url).await;
        let only = std::env::var("ENGINE_BENCH_ONLY").unwrap_or_default();
        if only == "limits" {
            limits_section(&url, &mut probe).await;
            return;
        }
        if only == "memory" {
            memory_section(&url, &mut probe).await;
            return;
        }
        denial_section(&url, &mut probe).await;
        if only == "denials" {
            return;
        }
        let (engine, steady) = engine_section(&url, &mut probe).await;
        let (ceiling, full) = ceiling_section(port, &url, &mut probe).await;
        summary_section(&engine, &steady, &ceiling, &full);
        memory_section(&url, &mut probe).await;
        limits_section(&url, &mut probe).await;
    });
    drop(rt);
    drop(server); // kills redis-server by pid
    eprintln!("done; redis-server stopped");
}

// ---------------------------------------------------------------------------------------
// Denied vs admitted: what a storm of denials costs next to admissions

/// One run of the denial section.
struct Storm {
    label: &'static str,
    decisions: u64,
    other: u64,
    secs: f64,
    p50: u32,
    p99: u32,
    evalsha: CmdStat,
    bytes_per_call: f64,
}

/// 128 callers over 100 keys whose rings hold a reservation in each of the last 600
/// buckets (a busy key at 60 s / 100 ms), on a clock held at the end of that minute: once
/// under limits that deny every request (at the limit, wanting a little: the usual
/// denial; then a limit of 1 request, the worst case, which must free the whole window),
/// once under limits that admit every request.
async fn denial_section(url: &str, probe: &mut Probe) {
    probe.flushall().await;
    let shape = shape();
    let (store, at) = clocked_store(url).await;
    let denied_keys: Arc<Vec<KeyName>> = Arc::new(
        (0..KEYS)
            .map(|i| KeyName::new(&format!("deny-{i}")).unwrap())
            .collect(),
    );
    let admitted_keys: Arc<Vec<KeyName>> = Arc::new(
        (0..KEYS)
            .map(|i| KeyName::new(&format!("admit-{i}")).unwrap())
            .collect(),
    );
    let first = 1_700_000_000_000;
    let mut all: Vec<KeyName> = denied_keys.to_vec();
    all.extend(admitted_keys.iter().cloned());
    let took = fill(&store, &at, &all, first).await;
    eprintln!("denials: filled {} rings in {took:?}", all.len());
    let window = (shape.slots() as u64 - 1) * shape.precision_ms();
    at.store(first + window, Ordering::Relaxed);
    let used = store
        .usage(&denied_keys[0], shape)
        .await
        .expect("usage")
        .usage;
    let at_limit = Limits {
        requests: used.requests,
        ..LIMITS
    };
    let one = Limits {
        requests: 1,
        ..LIMITS
    };
    let measure = Duration::from_secs(measure_secs());
    let mut runs = Vec::new();
    for (label, keys, limits, want_denied) in [
        ("denied, at the limit", &denied_keys, at_limit, true),
        (
            "denied, limit 1 (frees the whole window)",
            &denied_keys,
            one,
            true,
        ),
        ("admitted", &admitted_keys, LIMITS, false),
    ] {
        eprintln!("denials: {label}, {WARM_UP:?} warm-up + {measure:?}");
        let start = Instant::now();
        let (from, end) = (start + WARM_UP, start + WARM_UP + measure);
        let tasks: Vec<_> = (0..128)
            .map(|_| {
                let (store, keys) = (store.clone(), keys.clone());
                tokio::spawn(async move {
                    storm_caller(&store, &keys, limits, want_denied, from, end).await
                })
            })
            .collect();
        tokio::time::sleep_until(from.into()).await;
        probe.reset_stats().await;
        tokio::time::sleep_until(end.into()).await;
        let evalsha = probe.evalsha_stats().await;
        let out: f64 = probe
            .info("stats")
            .await
            .get("total_net_output_bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let mut lat = Vec::new();
        let mut other = 0;
        for t in tasks {
            let (l, o) = t.await.expect("storm task");
            lat.extend(l);
            other += o;
        }
        lat.sort_unstable();
        runs.push(Storm {
            label,
            decisions: lat.len() as u64,
            other,
            secs: measure.as_secs_f64(),
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
            evalsha,
            bytes_per_call: out / evalsha.calls.max(1) as f64,
        });
    }
    println!("\n## Denied vs admitted (Redis store, full rings)\n");
    println!(
        "| run | decisions/s | p50 µs | p99 µs | EVALSHA µs/call (Redis) | bytes sent by Redis per call | wrong outcome |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {} | {} | {:.2} | {:.0} | {} |",
            r.label,
            r.decisions as f64 / r.secs,
            r.p50,
            r.p99,
            r.evalsha.usec_per_call,
            r.bytes_per_call,
            r.other
        );
    }
    println!(
        "\n{KEYS} keys per run, each ring first filled with one reservation (1/150/256) in each \
         of the 600 buckets of one minute of injected time; the clock (passed as `now_ms`) is \
         then held at the end of that minute, so every ring holds {} requests. 128 callers, \
         {WARM_UP:?} warm-up + {measure:?}. \"at the limit\": `requests` limit = {} (the usual \
         denial: freeing the oldest bucket is enough); \"limit 1\": the request fits only once \
         the whole window has left. Bytes per call: `total_net_output_bytes` / EVALSHA calls \
         (includes the probe's few INFO replies).\n",
        used.requests, used.requests
    );
}

/// Reserves (no marker) until `end`; returns the latencies of the expected outcome and
/// how many calls had another.
async fn storm_caller(
    store: &Store,
    keys: &[KeyName],
    limits: Limits,
    want_denied: bool,
    from: Instant,
    end: Instant,
) -> (Vec<u32>, u64) {
    let shape = shape();
    let want = Usage {
        requests: 1,
        input_tokens: 1,
        output_tokens: 1,
    };
    let (mut lat, mut other) = (Vec::with_capacity(64 * 1024), 0);
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let key = &keys[rand::random_range(0..keys.len())];
        let d = store
            .reserve(key, shape, &limits, &want, Charge::Check, None)
            .await;
        let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
        if t0 < from {
            continue;
        }
        match d {
            Ok(Decision::Denied { .. }) if want_denied => lat.push(us),
            Ok(Decision::Admitted { .. }) if !want_denied => lat.push(us),
            _ => other += 1,
        }
    }
    (lat, other)
}

// ---------------------------------------------------------------------------------------
// Machine

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("({cmd} failed: {e})"))
}

fn machine_section(workers: usize) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("## Engine benchmark: machine\n");
    println!("| | |\n|---|---|");
    println!(
        "| date (UTC) | {} |",
        sh("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    println!("| `nproc` | {} |", sh("nproc", &[]));
    println!("| CPU model | {model} |");
    println!(
        "| `redis-server --version` | {} |",
        sh("redis-server", &["--version"])
    );
    println!("| `rustc --version` | {} |", sh("rustc", &["--version"]));
    println!("| tokio worker threads | {workers} |");
    println!(
        "| command | `cargo bench --bench engine` (ENGINE_BENCH_SECS={}) |",
        measure_secs()
    );
    println!(
        "\nEverything runs on this one machine: redis-server (started by the bench on a free \
         127.0.0.1 port, `--save '' --appendonly no`), the bench's tokio runtime, and \
         redis-benchmark share the same cores.\n"
    );
}

// ---------------------------------------------------------------------------------------
// Redis probe: INFO, CONFIG RESETSTAT, MEMORY USAGE on a connection of its own.

struct Probe {
    con: MultiplexedConnection,
}

impl Probe {
    async fn connect(url: &str) -> Probe {
        let client = redis::Client::open(url).expect("redis url");
        let con = client
            .get_multiplexed_async_connection()
            .await
            .expect("probe connection");
        Probe { con }
    }

    async fn cmd<T: redis::FromRedisValue>(&mut self, args: &[&str]) -> T {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query_async(&mut self.con)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    async fn info(&mut self, section: &str) -> HashMap<String, String> {
        let text: String = self.cmd(&["INFO", section]).await;
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }

    /// Redis process CPU (user + sys), seconds.
    async fn cpu(&mut self) -> f64 {
        let i = self.info("cpu").await;
        let f = |k: &str| i.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        f("used_cpu_user") + f("used_cpu_sys")
    }

    async fn used_memory(&mut self) -> i64 {
        let i = self.info("memory").await;
        i.get("used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    async fn evalsha_stats(&mut self) -> CmdStat {
        let i = self.info("commandstats").await;
        CmdStat::parse(i.get("cmdstat_evalsha").map(String::as_str).unwrap_or(""))
    }

    async fn reset_stats(&mut self) {
        let _: () = self.cmd(&["CONFIG", "RESETSTAT"]).await;
    }

    async fn flushall(&mut self) {
        let _: () = self.cmd(&["FLUSHALL"]).await;
    }
}

/// One line of `INFO commandstats`.
#[derive(Default, Debug, Clone, Copy)]
struct CmdStat {
    calls: u64,
    usec_per_call: f64,
    failed_calls: u64,
    rejected_calls: u64,
}

impl CmdStat {
    fn parse(line: &str) -> CmdStat {
        let mut s = CmdStat::default();
        for kv in line.split(',') {
            if let Some((k, v)) = kv.split_once('=') {
                match k {
                    "calls" => s.calls = v.parse().unwrap_or(0),
                    "usec_per_call" => s.usec_per_call = v.parse().unwrap_or(0.0),
                    "failed_calls" => s.failed_calls = v.parse().unwrap_or(0),
                    "rejected_calls" => s.rejected_calls = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        s
    }
}

/// This process's CPU time (all threads, user + sys), seconds; `/proc/self/stat` ticks.
fn self_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // fields 14 (utime) and 15 (stime); field 3 is index 0 after the ')'
    (tick(11) + tick(12)) as f64 / 100.0
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------
// 2. Decisions/s through the engine

struct Level {
    callers: usize,
    decisions: u64,
    secs: f64,
    p50: u32,
    p99: u32,
    max: u32,
    over_deadline: u64,
    denied: u64,
    errors: u64,
    evalsha: CmdStat,
    redis_cpu_us: f64,
    client_cpu_us: f64,
}

impl Level {
    fn rate(&self) -> f64 {
        self.decisions as f64 / self.secs
    }
}

#[derive(Default)]
struct TaskResult {
    lat: Vec<u32>,
    denied: u64,
    errors: u64,
}

async fn engine_section(url: &str, probe: &mut Probe) -> (Vec<Level>, Level) {
    let store = RedisStore::connect(url, BENCH_TIMEOUT).expect("redis url");
    let store = Arc::new(Store::Redis(store));
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "RedisStore did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: Arc<Vec<KeyName>> = Arc::new(
        (0..KEYS)
            .map(|i| KeyName::new(&format!("bench-{i}")).unwrap())
            .collect(),
    );
    let measure = Duration::from_secs(measure_secs());

    let mut levels = Vec::new();
    for callers in [1usize, 16, 128] {
        probe.flushall().await;
        eprintln!("engine: {callers} callers, {WARM_UP:?} warm-up + {measure:?}");
        let start = Instant::now();
        let from = start + WARM_UP;
        let end = from + measure;
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (store, keys) = (store.clone(), keys.clone());
                tokio::spawn(async move { caller(&store, &keys, from, end).await })
            })
            .collect();
        tokio::time::sleep_until(from.into()).await;
        probe.reset_stats().await;
        let (cpu0, self0) = (probe.cpu().await, self_cpu());
        tokio::time::sleep_until(end.into()).await;
        let (cpu1, self1) = (probe.cpu().await, self_cpu());
        let evalsha = probe.evalsha_stats().await;
        let mut all = TaskResult::default();
        for t in tasks {
            let r = t.await.expect("caller task");
            all.lat.extend(r.lat);
            all.denied += r.denied;
            all.errors += r.errors;
        }
        all.lat.sort_unstable();
        let decisions = all.lat.len() as u64;
        let per = |d: f64| d * 1e6 / decisions.max(1) as f64;
        levels.push(Level {
            callers,
            decisions,
            secs: measure.as_secs_f64(),
            p50: percentile(&all.lat, 0.50),
            p99: percentile(&all.lat, 0.99),
            max: all.lat.last().copied().unwrap_or(0),
            over_deadline: all.lat.iter().filter(|l| **l > PROD_DEADLINE_US).count() as u64,
            denied: all.denied,
            errors: all.errors,
            evalsha,
            redis_cpu_us: per(cpu1 - cpu0),
            client_cpu_us: per(self1 - self0),
        });
    }

    eprintln!("engine: steady state (full windows), 128 callers");
    let steady = steady_level(url, probe, &keys, measure).await;

    println!("## Engine: decisions/s through `Store::reserve` (Redis store)\n");
    println!(
        "`Store::Redis(RedisStore::connect(..))`, one shared store (one multiplexed \
         connection, as on a node), real Redis `TIME`; window 60 s at 100 ms precision \
         (601 slots); limits {HUGE} on all three so every call is admitted; want = \
         {{requests 1, input 150, output 256}}, `Charge::Check`, `settle_later = true` \
         (each call leaves a reservation marker; none settled); keys picked at random from \
         {KEYS}. Callers are tokio tasks on a multi-thread runtime, each looping `reserve` \
         back to back; {}s warm-up then {}s measured; latencies are per call, measured in \
         the caller, sorted exactly (no histogram). FLUSHALL before each level. Store \
         deadline {BENCH_TIMEOUT:?} (production default 50 ms: calls over 50 ms are counted). \
         Redis CPU is `INFO cpu` (user+sys) over the measured interval per decision; bench \
         CPU is this process's `/proc/self/stat` ticks per decision; `usec_per_call` is \
         `INFO commandstats` `cmdstat_evalsha` (script execution inside Redis only).\n",
        WARM_UP.as_secs(),
        measure.as_secs()
    );
    println!(
        "| callers | decisions/s | p50 µs | p99 µs | max µs | > 50 ms | denied | errors | \
         EVALSHA calls | EVALSHA usec_per_call | Redis CPU µs/decision | bench CPU µs/decision |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for l in &levels {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} |",
            l.callers,
            l.rate(),
            l.p50,
            l.p99,
            l.max,
            l.over_deadline,
            l.denied,
            l.errors,
            l.evalsha.calls,
            l.evalsha.usec_per_call,
            l.redis_cpu_us,
            l.client_cpu_us
        );
    }
    let l = &steady;
    println!(
        "| 128, full windows* | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} |",
        l.rate(),
        l.p50,
        l.p99,
        l.max,
        l.over_deadline,
        l.denied,
        l.errors,
        l.evalsha.calls,
        l.evalsha.usec_per_call,
        l.redis_cpu_us,
        l.client_cpu_us
    );
    println!(
        "\n\\* The rows above start from empty rings (FLUSHALL), so during their few seconds \
         each ring holds at most ~{} s of history. A busy key in steady state has every \
         bucket of the last 60 s filled, and `settle_tail` then reads a batch of up to 128 \
         slots per call. The last row measures that: `RedisStore::connect_with_clock` (a \
         clock that is the system clock, passed as `now_ms` instead of Redis `TIME`), each \
         of the {KEYS} rings first filled with one reservation in each of the 600 buckets of the \
         preceding minute of injected time (no markers), then 128 callers as above. Not part \
         of the fresh-ring comparison below; it is compared with a full-window redis-benchmark \
         run instead.\n",
        WARM_UP.as_secs() + measure.as_secs()
    );
    (levels, steady)
}

async fn caller(store: &Store, keys: &[KeyName], from: Instant, end: Instant) -> TaskResult {
    let shape = shape();
    let mut r = TaskResult {
        lat: Vec::with_capacity(64 * 1024),
        ..TaskResult::default()
    };
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let key = &keys[rand::random_range(0..keys.len())];
        let d = store
            .reserve(
                key,
                shape,
                &LIMITS,
                &WANT,
                Charge::Check,
                Some(rand::random()),
            )
            .await;
        let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
        if t0 < from {
            continue;
        }
        match d {
            Ok(Decision::Admitted { .. }) => r.lat.push(us),
            Ok(Decision::Denied { .. }) => r.denied += 1,
            Err(_) => r.errors += 1,
        }
    }
    r
}

fn sys_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A store whose clock is `at` when that is non-zero and the system clock otherwise.
async fn clocked_store(url: &str) -> (Arc<Store>, Arc<AtomicU64>) {
    let at = Arc::new(AtomicU64::new(0));
    let clock: Clock = {
        let at = at.clone();
        Arc::new(move || match at.load(Ordering::Relaxed) {
            0 => sys_ms(),
            t => t,
        })
    };
    let store = RedisStore::connect_with_clock(url, BENCH_TIMEOUT, clock)
        .await
        .expect("connect_with_clock");
    (Arc::new(Store::Redis(store)), at)
}

/// Fills the rings of `names`: one reservation (no marker) in each of the 600 buckets
/// starting at `first_ms`, all names concurrently per bucket. Returns how long it took.
async fn fill(store: &Arc<Store>, at: &AtomicU64, names: &[KeyName], first_ms: u64) -> Duration {
    let shape = shape();
    let started = Instant::now();
    for j in 0..(shape.slots() as u64 - 1) {
        at.store(first_ms + j * shape.precision_ms(), Ordering::Relaxed);
        let mut set = tokio::task::JoinSet::new();
        for k in names {
            let (store, k) = (store.clone(), k.clone());
            set.spawn(async move {
                store
                    .reserve(&k, shape, &LIMITS, &WANT, Charge::Check, None)
                    .await
            });
        }
        while let Some(r) = set.join_next().await {
            let d = r.expect("fill task").expect("fill reserve");
            assert!(matches!(d, Decision::Admitted { .. }), "fill not admitted");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "fill too slow"
        );
    }
    started.elapsed()
}

/// 128 callers against rings whose whole window is already filled.
async fn steady_level(
    url: &str,
    probe: &mut Probe,
    keys: &Arc<Vec<KeyName>>,
    measure: Duration,
) -> Level {
    probe.flushall().await;
    let shape = shape();
    let (store, at) = clocked_store(url).await;
    // Fill the minute that ends a little after the fill does (60,000 calls, ~13 s on the
    // 2-core machine), so the window is still full when the measurement starts.
    let window = (shape.slots() as u64 - 1) * shape.precision_ms();
    let lead = 16_000;
    let first = sys_ms() + lead - window;
    let took = fill(&store, &at, keys, first).await;
    eprintln!("engine: filled {} rings in {took:?}", keys.len());
    while sys_ms() < first + window {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    at.store(0, Ordering::Relaxed); // follow the system clock from here

    let start = Instant::now();
    let (from, end) = (start + WARM_UP, start + WARM_UP + measure);
    let tasks: Vec<_> = (0..128)
        .map(|_| {
            let (store, keys) = (store.clone(), keys.clone());
            tokio::spawn(async move { caller(&store, &keys, from, end).await })
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    probe.reset_stats().await;
    let (cpu0, self0) = (probe.cpu().await, self_cpu());
    tokio::time::sleep_until(end.into()).await;
    let (cpu1, self1) = (probe.cpu().await, self_cpu());
    let evalsha = probe.evalsha_stats().await;
    let mut all = TaskResult::default();
    for t in tasks {
        let r = t.await.expect("caller task");
        all.lat.extend(r.lat);
        all.denied += r.denied;
        all.errors += r.errors;
    }
    all.lat.sort_unstable();
    let decisions = all.lat.len() as u64;
    let per = |d: f64| d * 1e6 / decisions.max(1) as f64;
    Level {
        callers: 128,
        decisions,
        secs: measure.as_secs_f64(),
        p50: percentile(&all.lat, 0.50),
        p99: percentile(&all.lat, 0.99),
        max: all.lat.last().copied().unwrap_or(0),
        over_deadline: all.lat.iter().filter(|l| **l > PROD_DEADLINE_US).count() as u64,
        denied: all.denied,
        errors: all.errors,
        evalsha,
        redis_cpu_us: per(cpu1 - cpu0),
        client_cpu_us: per(self1 - self0),
    }
}

// ---------------------------------------------------------------------------------------
// 3. Ceiling: redis-benchmark on the same script

struct RbRun {
    label: &'static str,
    clients: usize,
    pipeline: usize,
    rps: f64,
    avg_ms: String,
    evalsha: CmdStat,
    redis_cpu_us: f64,
    command: String,
}

fn script_text() -> String {
    // exactly as `Scripts::new` in src/engine/redis.rs: window.lua, "\n", reserve.lua
    format!("{WINDOW_LUA}\n{RESERVE_LUA}")
}

/// `-n` large enough never to finish: every run is stopped by time.
const RB_N: u64 = 100_000_000;

fn rb_args(port: u16, sha: &str, now_ms: u64, c: usize, p: usize) -> Vec<String> {
    let shape = shape();
    let mut a: Vec<String> = vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-n".into(),
        RB_N.to_string(),
        "-c".into(),
        c.to_string(),
    ];
    if p > 1 {
        a.extend(["-P".into(), p.to_string()]);
    }
    a.extend(["-r".into(), KEYS.to_string()]);
    a.extend([
        "EVALSHA".to_string(),
        sha.to_string(),
        "2".into(),
        // ring over KEYS names; the marker over KEYS^3 names, so that nearly every
        // call creates a new marker as the engine's random reservation ids do
        format!(
            "llmrl:{{rb-__rand_int__}}:v4:w{}:p{}",
            shape.window_ms(),
            shape.precision_ms()
        ),
        "llmrl:{rb-__rand_int__}:m:__rand_int__-__rand_int__".to_string(),
        // reserve.lua's layout: now, one ring, want, marker, not forced; then the ring's
        // precision, slots, limits, ttl and marker ttl
        now_ms.to_string(),
        "1".into(),
        WANT.requests.to_string(),
        WANT.input_tokens.to_string(),
        WANT.output_tokens.to_string(),
        "1".into(),
        "0".into(),
        shape.precision_ms().to_string(),
        shape.slots().to_string(),
        HUGE.to_string(),
        HUGE.to_string(),
        HUGE.to_string(),
        shape.ttl_ms().to_string(),
        shape.marker_ttl_ms().to_string(),
    ]);
    a
}

/// Runs redis-benchmark for the warm-up plus `measure`, then kills it; req/s and Redis CPU
/// come from Redis itself over the measured interval (as for the engine), the average
/// latency from redis-benchmark's last progress line.
async fn rb_timed(args: &[String], probe: &mut Probe, measure: Duration) -> (CmdStat, f64, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("rb.out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let mut child = Command::new("redis-benchmark")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("run redis-benchmark");
    let start = Instant::now();
    tokio::time::sleep_until((start + WARM_UP).into()).await;
    probe.reset_stats().await;
    let cpu0 = probe.cpu().await;
    tokio::time::sleep_until((start + WARM_UP + measure).into()).await;
    let cpu1 = probe.cpu().await;
    let stats = probe.evalsha_stats().await;
    let finished_early = child.try_wait().ok().flatten().is_some();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !finished_early,
        "redis-benchmark ended before the measurement did"
    );
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    // "...: rps=9870.0 (overall: 9912.3) avg_msec=12.345 (overall: 12.101)"
    let avg = text
        .split(['\r', '\n'])
        .rfind(|l| l.contains("avg_msec="))
        .and_then(|l| l.rsplit_once("(overall: "))
        .map(|(_, r)| r.trim_end_matches(')').trim().to_string())
        .unwrap_or_else(|| "-".into());
    (stats, cpu1 - cpu0, avg)
}

async fn ceiling_section(port: u16, url: &str, probe: &mut Probe) -> (Vec<RbRun>, RbRun) {
    let text = script_text();
    let load = |c: &mut redis::Cmd| {
        c.arg("LOAD").arg(&text);
    };
    let mut c = redis::cmd("SCRIPT");
    load(&mut c);
    let sha: String = c.query_async(&mut probe.con).await.expect("SCRIPT LOAD");
    assert_eq!(
        sha,
        redis::Script::new(&text).get_hash(),
        "SCRIPT LOAD sha differs from the engine's script hash"
    );
    // one call by hand: the arguments must give an admitted decision
    probe.flushall().await;
    let args = rb_args(port, &sha, 0, 1, 1);
    let cmd_at = args.iter().position(|a| a == "EVALSHA").unwrap();
    let mut check = redis::cmd("EVALSHA");
    for a in &args[cmd_at + 1..] {
        check.arg(a.replace("__rand_int__", "000000000000"));
    }
    let v: Vec<redis::Value> = check
        .query_async(&mut probe.con)
        .await
        .expect("EVALSHA check");
    assert_eq!(
        v.first(),
        Some(&redis::Value::Int(1)),
        "check call not admitted: {v:?}"
    );

    let measure = Duration::from_secs(measure_secs());
    let quote = |args: &[String]| {
        format!(
            "redis-benchmark {}",
            args.iter()
                .map(|a| if a.contains('{') {
                    format!("'{a}'")
                } else {
                    a.clone()
                })
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let mut runs = Vec::new();
    for (label, clients, pipeline) in [
        ("unpipelined", 16usize, 1usize),
        ("unpipelined", 128, 1),
        ("pipelined", 16, 16),
        ("pipelined", 128, 16),
    ] {
        probe.flushall().await;
        let args = rb_args(port, &sha, 0, clients, pipeline);
        eprintln!("redis-benchmark: -c {clients} -P {pipeline}");
        let (evalsha, cpu, avg_ms) = rb_timed(&args, probe, measure).await;
        runs.push(RbRun {
            label,
            clients,
            pipeline,
            rps: evalsha.calls as f64 / measure.as_secs_f64(),
            avg_ms,
            redis_cpu_us: cpu * 1e6 / evalsha.calls.max(1) as f64,
            evalsha,
            command: quote(&args),
        });
    }

    // Full windows: the 100 rings redis-benchmark will hit are filled first (600 buckets
    // ending at T), then every call is made at the fixed instant T (now_ms = T) so the
    // windows stay full for the whole run.
    probe.flushall().await;
    let shape = shape();
    let names: Vec<KeyName> = (0..KEYS)
        .map(|i| KeyName::new(&format!("rb-{i:012}")).unwrap())
        .collect();
    let (store, at) = clocked_store(url).await;
    let window = (shape.slots() as u64 - 1) * shape.precision_ms();
    let t = sys_ms() / shape.precision_ms() * shape.precision_ms();
    let took = fill(&store, &at, &names, t - window).await;
    eprintln!(
        "redis-benchmark: filled {} rings in {took:?}; -c 128 full windows",
        names.len()
    );
    let args = rb_args(port, &sha, t, 128, 1);
    let (evalsha, cpu, avg_ms) = rb_timed(&args, probe, measure).await;
    let full = RbRun {
        label: "unpipelined, full windows*",
        clients: 128,
        pipeline: 1,
        rps: evalsha.calls as f64 / measure.as_secs_f64(),
        avg_ms,
        redis_cpu_us: cpu * 1e6 / evalsha.calls.max(1) as f64,
        evalsha,
        command: quote(&args),
    };

    println!("## Ceiling: the same script under `redis-benchmark`\n");
    println!(
        "The script text is assembled exactly as `Scripts::new` does (`window.lua` + \"\\n\" + \
         `reserve.lua`), loaded with `SCRIPT LOAD` (sha `{sha}`, the same as the engine's), and \
         driven by redis-benchmark with the engine's arguments: `now_ms 0` (Redis `TIME`), \
         precision 100, 601 slots, want 1/150/256, limits {HUGE} x3, ttl 60200, marker 1, \
         force 0. `-r {KEYS}` turns each `__rand_int__` into an independent 12-digit number \
         in 0..{}, re-drawn for every command: the ring key spreads over {KEYS} keys like the \
         engine run; the marker name holds three, so nearly every call creates a new marker \
         (like the engine's random reservation ids). Each run is timed like an engine level: \
         FLUSHALL, start redis-benchmark with an `-n` it cannot finish, {}s warm-up, CONFIG \
         RESETSTAT, {}s measured, then the bench kills it. req/s = `cmdstat_evalsha` calls / \
         measured seconds (Redis's own count, as redis-benchmark's CSV summary only exists for a \
         run that completes, and a completed `-n` run lasts as long as its rate makes it, which \
         changes how much history the rings hold — see the full-window row); avg ms is \
         redis-benchmark's last progress line (overall, warm-up included). Redis CPU is `INFO \
         cpu` (user+sys) per EVALSHA; redis-benchmark itself runs on the same 2 cores.\n",
        KEYS - 1,
        WARM_UP.as_secs(),
        measure.as_secs()
    );
    println!(
        "| mode | clients (-c) | pipeline (-P) | req/s | avg ms | EVALSHA calls | failed | \
         EVALSHA usec_per_call | Redis CPU µs/call |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs.iter().chain([&full]) {
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {:.2} | {:.1} |",
            r.label,
            r.clients,
            r.pipeline,
            r.rps,
            r.avg_ms,
            r.evalsha.calls,
            r.evalsha.failed_calls + r.evalsha.rejected_calls,
            r.evalsha.usec_per_call,
            r.redis_cpu_us
        );
    }
    println!(
        "\n\\* The {KEYS} rings `rb-000000000000`..`rb-{:012}` filled first with one \
         reservation in each of the 600 buckets before instant T (through the engine, \
         injected clock), then every call made at `now_ms` = T, so each call finds a full \
         60 s window.\n",
        KEYS - 1
    );
    println!("Exact commands (PORT is the bench's own server; T and the sha as printed):\n\n```sh");
    for r in runs.iter().chain([&full]) {
        println!("{}", r.command);
    }
    println!("```\n");
    (runs, full)
}

fn summary_section(engine: &[Level], steady: &Level, ceiling: &[RbRun], full: &RbRun) {
    let best_engine = engine.iter().map(Level::rate).fold(0.0, f64::max);
    let best_unpiped = ceiling
        .iter()
        .filter(|r| r.pipeline == 1)
        .map(|r| r.rps)
        .fold(0.0, f64::max);
    let best_piped = ceiling
        .iter()
        .filter(|r| r.pipeline > 1)
        .map(|r| r.rps)
        .fold(0.0, f64::max);
    let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
    println!("## Engine against the ceiling\n");
    println!("| rings | engine best decisions/s | redis-benchmark req/s | engine as % of it |");
    println!("|---|---:|---:|---:|");
    println!(
        "| fresh (FLUSHALL, ≤ 6 s of history) | {best_engine:.0} | unpipelined {best_unpiped:.0} | {:.0}% |",
        pct(best_engine, best_unpiped)
    );
    println!(
        "| fresh (FLUSHALL, ≤ 6 s of history) | {best_engine:.0} | pipelined -P 16 {best_piped:.0} | {:.0}% |",
        pct(best_engine, best_piped)
    );
    println!(
        "| full 60 s windows, 128 callers / -c 128 | {:.0} | unpipelined {:.0} | {:.0}% |",
        steady.rate(),
        full.rps,
        pct(steady.rate(), full.rps)
    );
    println!();
}

// ---------------------------------------------------------------------------------------
// 4. Memory per key

struct MemRow {
    variant: String,
    start_slot: i64,
    reservations: u64,
    settled: u64,
    memory_usage: i64,
    strlen: i64,
    markers: u64,
    marker_bytes: i64,
    used_memory_delta: i64,
}

async fn memory_section(url: &str, probe: &mut Probe) {
    let shape = shape();
    let slots = shape.slots();
    // Slots per block sum: ⌈√slots⌉, as lua/window.lua lays the ring out.
    let blocks = {
        let per_block = (slots as f64).sqrt().ceil() as i64;
        (slots + per_block - 1) / per_block
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // the first bucket of a ring turn: bucket % slots == 0
    let turn = slots as u64 * shape.precision_ms();
    let slot0 = now_ms / turn * turn;
    let at = Arc::new(AtomicU64::new(slot0));
    let clock: Clock = {
        let at = at.clone();
        Arc::new(move || at.load(Ordering::Relaxed))
    };
    let store = Store::Redis(
        RedisStore::connect_with_clock(url, BENCH_TIMEOUT, clock)
            .await
            .expect("connect_with_clock"),
    );

    let variants: [(&str, u64, bool); 3] = [
        ("settled, ring starts at slot 0", slot0, true),
        (
            "settled, ring starts at the last slot",
            slot0 + (slots as u64 - 1) * shape.precision_ms(),
            true,
        ),
        ("unsettled, ring starts at slot 0", slot0, false),
    ];
    let mut rows = Vec::new();
    for (n, (variant, t0, settle)) in variants.into_iter().enumerate() {
        eprintln!("memory: {variant}");
        probe.flushall().await;
        let key = KeyName::new(&format!("mem-{n}")).unwrap();
        let before = probe.used_memory().await;
        let (mut reservations, mut settled) = (0u64, 0u64);
        let started = Instant::now();
        for i in 0..6_000u64 {
            at.store(t0 + i * 10, Ordering::Relaxed);
            let d = store
                .reserve(
                    &key,
                    shape,
                    &LIMITS,
                    &WANT,
                    Charge::Check,
                    Some(rand::random()),
                )
                .await
                .unwrap_or_else(|e: StoreError| panic!("reserve: {e}"));
            let Decision::Admitted {
                reservation: Some(res),
                ..
            } = d
            else {
                panic!("memory run: not admitted: {d:?}");
            };
            reservations += 1;
            if settle {
                store.settle(&res, 100).await.expect("settle");
                settled += 1;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "memory run too slow"
            );
        }
        let ring = ring_key(&key, shape);
        let memory_usage: i64 = probe.cmd(&["MEMORY", "USAGE", &ring]).await;
        let strlen: i64 = probe.cmd(&["STRLEN", &ring]).await;
        let pattern = format!("llmrl:{{{key}}}:m:*");
        let mut markers = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let (next, batch): (String, Vec<String>) = probe
                .cmd(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
                .await;
            markers.extend(batch);
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let mut marker_bytes = 0i64;
        for m in &markers {
            let b: Option<i64> = probe.cmd(&["MEMORY", "USAGE", m]).await;
            marker_bytes += b.unwrap_or(0);
        }
        let after = probe.used_memory().await;
        rows.push(MemRow {
            variant: variant.to_string(),
            start_slot: (t0 / shape.precision_ms()) as i64 % slots,
            reservations,
            settled,
            memory_usage,
            strlen,
            markers: markers.len() as u64,
            marker_bytes,
            used_memory_delta: after - before,
        });
    }

    println!("## Memory per key\n");
    println!(
        "`RedisStore::connect_with_clock` with a manual clock: one key hit every 10 ms of \
         injected time for a whole 60 s window at 100 ms precision (6,000 reservations with \
         want 1/150/256, `settle_later = true`); in the settled variants each reservation is \
         settled at once with `store.settle(&reservation, 100)`, so no marker lingers. The ring \
         is one Redis string: 60-byte header (with the head bucket's counts) + {slots} slots \
         x 10 bytes + {blocks} block sums \
         x 24 bytes = {} bytes, created at full length by its first write (the two \
         first-slot variants differ only in where the window starts). `MEMORY USAGE` counts the key, value and \
         allocator size class; markers are `llmrl:{{name}}:m:*` found by SCAN, summed by \
         `MEMORY USAGE`; `used_memory` delta is `INFO memory` after minus before (FLUSHALL \
         before each variant). Target: ring ≤ 8 KiB (8192 bytes).\n",
        60 + 10 * slots + 24 * blocks
    );
    println!(
        "| variant | first slot | reservations | settled | ring `MEMORY USAGE` B | ring `STRLEN` B | \
         ≤ 8 KiB | markers | markers B (sum) | B/marker | `used_memory` delta B |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.variant,
            r.start_slot,
            r.reservations,
            r.settled,
            r.memory_usage,
            r.strlen,
            if r.memory_usage <= 8192 {
                "yes"
            } else {
                "**no**"
            },
            r.markers,
            r.marker_bytes,
            if r.markers > 0 {
                format!("{:.0}", r.marker_bytes as f64 / r.markers as f64)
            } else {
                "-".into()
            },
            r.used_memory_delta
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------
// Limits per request: the cost of one decision over 1, 3, 5 and 6 rings

/// Key `i`'s first `n` rings, all under the hash tag of its own pool: its own per minute,
/// its own per day, a model entry, the pool per minute, the pool per day (the most a
/// config gives one request), and a sixth (a second model entry's) to show the trend.
fn ring_set(i: usize, n: usize) -> Vec<Bound> {
    let tag = KeyName::new(&format!("bench-pool-{i}")).unwrap();
    let key = KeyName::new(&format!("bench-key-{i}")).unwrap();
    let model = |m: &str| Scope::Model(key.clone(), ModelMatch::new(m).unwrap());
    let rings = [
        (Scope::Key(key.clone()), shape()),
        (model("gpt-4o"), shape()),
        (Scope::Key(key.clone()), WindowShape::DAY),
        (Scope::Pool, shape()),
        (Scope::Pool, WindowShape::DAY),
        (model("o3*"), shape()),
    ];
    rings
        .into_iter()
        .take(n)
        .map(|(scope, shape)| Bound {
            ring: RingRef {
                tag: tag.clone(),
                scope,
                shape,
            },
            limits: LIMITS,
        })
        .collect()
}

async fn limits_section(url: &str, probe: &mut Probe) {
    let store = Arc::new(Store::Redis(
        RedisStore::connect(url, BENCH_TIMEOUT).expect("connect"),
    ));
    while store.ping().await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let measure = Duration::from_secs(measure_secs());
    println!("\n## Limits per request (Redis store)\n");
    println!(
        "128 callers over {KEYS} keys, each request admitted (limits far away) with a marker \
         and settled, as admission and the response hook do: `reserve_all`, then \
         `settle_all` at once or 500 ms later (by the same caller, before its next request), \
         over the key's rings (own per minute, a model entry, own per day, the \
         pool per minute, the pool per day, a second model entry). EVALSHA µs/call is Redis's \
         own time per script call (`INFO commandstats`, reserve and settle together); memory is \
         `MEMORY USAGE` of one key's rings after the run (the day rings hold 1,441 one-minute \
         slots, the minute rings 601).\n"
    );
    println!(
        "| rings | limits | settled | decisions/s | p50 µs | p99 µs | EVALSHA µs/call (Redis) | rings `MEMORY USAGE` B | B per ring |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    // At once (the bucket is still the head: a settlement touches the headers only), and
    // 500 ms later, as a response hook does after a model answered (the bucket has left
    // the head: a settlement writes its slot and block sum in every ring).
    for (n, later) in [1usize, 2, 3, 5, 6]
        .into_iter()
        .flat_map(|n| [(n, Duration::ZERO), (n, Duration::from_millis(500))])
    {
        probe.flushall().await;
        let sets: Arc<Vec<Vec<Bound>>> = Arc::new((0..KEYS).map(|i| ring_set(i, n)).collect());
        eprintln!("limits: {n} rings, settled after {later:?}, {WARM_UP:?} warm-up + {measure:?}");
        let start = Instant::now();
        let (from, end) = (start + WARM_UP, start + WARM_UP + measure);
        let tasks: Vec<_> = (0..128)
            .map(|_| {
                let (store, sets) = (store.clone(), sets.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(64 * 1024);
                    let mut waiting = std::collections::VecDeque::new();
                    loop {
                        // Claims made `later` ago are settled first, oldest first.
                        let due = Instant::now();
                        while waiting
                            .front()
                            .is_some_and(|(at, _)| due.duration_since(*at) >= later)
                        {
                            let (_, c) = waiting.pop_front().expect("front");
                            let _ = store.settle_all(&c, 100).await;
                        }
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let set = &sets[rand::random_range(0..sets.len())];
                        let v = store
                            .reserve_all(set, &WANT, Charge::Check, Some(rand::random()))
                            .await;
                        let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        if let Ok(Verdict::Admitted { claim: Some(c), .. }) = v {
                            if later.is_zero() {
                                let _ = store.settle_all(&c, 100).await;
                            } else {
                                waiting.push_back((t0, c));
                            }
                            if t0 >= from {
                                lat.push(us);
                            }
                        }
                    }
                    // After the measurement: whatever is still waiting.
                    for (_, c) in waiting {
                        let _ = store.settle_all(&c, 100).await;
                    }
                    lat
                })
            })
            .collect();
        tokio::time::sleep_until(from.into()).await;
        probe.reset_stats().await;
        tokio::time::sleep_until(end.into()).await;
        let evalsha = probe.evalsha_stats().await;
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("limits task"));
        }
        lat.sort_unstable();
        let mut bytes = 0i64;
        for b in &sets[0] {
            let used: Option<i64> = probe.cmd(&["MEMORY", "USAGE", &ring_key_of(&b.ring)]).await;
            bytes += used.unwrap_or(0);
        }
        // Every reservation was settled: no marker is left behind.
        let left: Vec<String> = probe.cmd(&["KEYS", "llmrl:*:m:*"]).await;
        assert!(
            left.is_empty(),
            "markers left after settling: {}",
            left.len()
        );
        let settled = if later.is_zero() {
            "at once".to_string()
        } else {
            format!("after {} ms", later.as_millis())
        };
        println!(
            "| {n} | {} | {settled} | {:.0} | {} | {} | {:.1} | {bytes} | {:.0} |",
            3 * n,
            lat.len() as f64 / measure.as_secs_f64(),
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            evalsha.usec_per_call,
            bytes as f64 / n as f64
        );
    }
    println!();
}

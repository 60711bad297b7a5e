//! Measures the in-process store (`MemoryStore`): admissions/s from one and two threads
//! over many keys, and its resident memory while keys and window shapes come and go. The
//! figures in docs/performance.md ("The in-process store") come from this program.
//! `MEMORY_BENCH_SECS` (default 5) sets each throughput run.
//!
//! ```sh
//! nice -n 10 cargo run --release --example memory_store -- throughput
//! nice -n 10 cargo run --release --example memory_store -- reloads
//! nice -n 10 cargo run --release --example memory_store -- keys
//! ```
//!
//! It uses the server's allocator (mimalloc), so its RSS is what the server's would be.
//! `reloads` and `keys` drive a hand-moved clock and print the rings and open reservations
//! the store holds, with VmRSS from /proc/self/status, at intervals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_ratelimit::engine::memory::MemoryStore;
use llm_ratelimit::engine::{Charge, Decision, KeyName, Limits, Store, Usage, WindowShape};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "throughput" => throughput(),
        "reloads" => reloads(),
        "keys" => keys(),
        _ => {
            eprintln!("usage: memory_store throughput|reloads|keys");
            std::process::exit(2);
        }
    }
}

/// A memory store on a clock moved by hand, in ms.
fn manual_store() -> (Store, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(1_000_000_000));
    let clock = now.clone();
    let memory = MemoryStore::with_clock(Arc::new(move || clock.load(Ordering::Relaxed)));
    (Store::Memory(memory), now)
}

/// Rings and open reservations the store holds.
fn held(store: &Store) -> (usize, usize) {
    match store {
        Store::Memory(m) => (m.rings_held(), m.markers_held()),
        Store::Redis(_) | Store::Failover(_) => (0, 0),
    }
}

/// The process's resident set, in kB, from /proc/self/status.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn key(i: usize) -> KeyName {
    KeyName::new(&format!("key-{i}")).expect("a valid key name")
}

/// One admission as the server makes it: reserve (leaving a reservation), then settle.
fn admit(store: &Store, key: &KeyName, shape: WindowShape) {
    let decision = block_on(store.reserve(
        key,
        shape,
        &LIMITS,
        &WANT,
        Charge::Check,
        Some(rand::random()),
    ))
    .expect("the memory store always answers");
    if let Decision::Admitted {
        reservation: Some(r),
        ..
    } = decision
    {
        block_on(store.settle(&r, 100)).expect("the memory store always answers");
    }
}

/// The memory store's futures never wait, so one poll finishes them.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("the memory store never waits"),
    }
}

/// Reserve + settle pairs per second from 1 and 2 threads, each picking keys at random
/// among 1,000 (60 s window at 100 ms, the default shape), on the store's own clock.
fn throughput() {
    const KEYS: usize = 1_000;
    let secs: u64 = std::env::var("MEMORY_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let shape = WindowShape::new(Duration::from_secs(60), Duration::from_millis(100))
        .expect("a valid shape");
    let keys: Arc<Vec<KeyName>> = Arc::new((0..KEYS).map(key).collect());
    println!("| threads | keys | admissions (reserve + settle) / s |");
    println!("|---:|---:|---:|");
    for threads in [1, 2] {
        let store = Arc::new(Store::Memory(MemoryStore::new()));
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let started = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (store, keys, done) = (store.clone(), keys.clone(), done.clone());
                std::thread::spawn(move || {
                    // xorshift: a cheap, deterministic key order per thread.
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1);
                    let mut n = 0u64;
                    while n % 256 != 0 || Instant::now() < deadline {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        admit(&store, &keys[(x % KEYS as u64) as usize], shape);
                        n += 1;
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a worker thread");
        }
        let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        println!("| {threads} | {KEYS} | {rate:.0} |");
    }
}

/// Leaves a reservation open (a response that never reports back), as every tenth
/// admission below does, so that markers come and go too.
fn admit_unsettled(store: &Store, key: &KeyName, shape: WindowShape) {
    block_on(store.reserve(
        key,
        shape,
        &LIMITS,
        &WANT,
        Charge::Check,
        Some(rand::random()),
    ))
    .expect("the memory store always answers");
}

/// 1,000 reloads, each changing the window (precision 1..999 ms, always 600 buckets wide,
/// so every ring has the same size): `retain` to the new shape, then one admission on
/// each of 1,000 keys. The clock stands still, so nothing goes idle: only `retain` frees.
fn reloads() {
    const KEYS: usize = 1_000;
    let (store, _) = manual_store();
    let keys: Vec<KeyName> = (0..KEYS).map(key).collect();
    println!("| reloads | rings | open reservations | VmRSS |");
    println!("|---:|---:|---:|---:|");
    for reload in 0..=1_000u64 {
        let precision = reload % 999 + 1;
        let shape = WindowShape::new(
            Duration::from_millis(600 * precision),
            Duration::from_millis(precision),
        )
        .expect("a valid shape");
        store.retain(|ring| ring.shape == shape);
        for (i, k) in keys.iter().enumerate() {
            if i % 10 == 0 {
                admit_unsettled(&store, k, shape);
            } else {
                admit(&store, k, shape);
            }
        }
        if reload % 100 == 0 {
            let (rings, markers) = held(&store);
            println!(
                "| {reload} | {rings} | {markers} | {} MB |",
                rss_kb() / 1024
            );
        }
    }
}

/// 100,000 keys cycled through: each used three times (every tenth admission left
/// unsettled) and never again, the clock moving 1 ms a key, with a 10 s window at 100 ms;
/// no reload, so only the amortised sweep of idle rings and expired markers frees.
fn keys() {
    let (store, now) = manual_store();
    let shape = WindowShape::new(Duration::from_secs(10), Duration::from_millis(100))
        .expect("a valid shape");
    println!("| keys used | rings | open reservations | VmRSS |");
    println!("|---:|---:|---:|---:|");
    let mut admissions = 0u64;
    for i in 0..=100_000usize {
        let k = key(i);
        for _ in 0..3 {
            if admissions % 10 == 0 {
                admit_unsettled(&store, &k, shape);
            } else {
                admit(&store, &k, shape);
            }
            admissions += 1;
        }
        now.fetch_add(1, Ordering::Relaxed);
        if i % 10_000 == 0 {
            let (rings, markers) = held(&store);
            println!("| {i} | {rings} | {markers} | {} MB |", rss_kb() / 1024);
        }
    }
}

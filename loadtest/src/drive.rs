//! Pacing: when each request goes out, for either runner (HTTP or gRPC).
//!
//! - Closed loop (`--concurrency N`): N workers, each sending its next request as soon as
//!   the previous one is answered. A request's intended instant is its send instant.
//! - Open loop (`--rate R`): request `i` has the slot `i / R` seconds after the start,
//!   whatever happened to the others. A dispatcher releases slots as they fall due; an
//!   idle worker takes the oldest; when none is idle a new worker (a new connection) is
//!   started, up to `--max-in-flight`. A slot no worker could take in time is sent late and
//!   its latency still counts from the slot, so a slow server cannot hide the queueing it
//!   causes (coordinated omission). Slots still waiting when the run ends are counted as
//!   unsent.
//!
//! Only requests sent within `--duration` count. Each request's deadline is its
//! `--timeout`, and never later than the end plus `--grace`, so every worker has returned
//! by then and every request it sent has a [`Record`] (a timeout is an error). Ctrl-C ends
//! the run early, keeping what was recorded; a second one exits at once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::cli::Pace;
use crate::plan::{rng, Pick, Plan};
use crate::progress::{Board, Progress, Tally};
use crate::record::Record;

/// The run's one clock: microseconds since its start.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.us(Instant::now())
    }

    pub fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    pub fn at(&self, us: u64) -> Instant {
        self.start + Duration::from_micros(us)
    }
}

/// Sends one request and tells how it ended. One client per worker; it owns that
/// worker's connection(s).
pub trait Client: Send + 'static {
    /// Sends `pick`, meant for `intended_us`, giving up at `deadline`. The record's
    /// `sent_us` is when the request's first byte went to the connection.
    fn send(
        &mut self,
        pick: Pick,
        intended_us: u64,
        deadline: Instant,
    ) -> impl Future<Output = Record> + Send;
}

/// How a run is paced and bounded.
pub struct Pacing {
    pub pace: Pace,
    pub duration: Duration,
    pub timeout: Duration,
    pub grace: Duration,
    pub seed: Option<u64>,
}

/// What a run left.
pub struct Finished {
    /// Every request sent, in order of sending.
    pub records: Vec<Record>,
    /// Open loop: slots that fell due but found no worker before the run ended.
    pub unsent: u64,
    /// Workers (HTTP: connection slots) used.
    pub workers: usize,
    /// How long requests were sent (shorter than `--duration` after Ctrl-C).
    pub sending: Duration,
    /// Workers that had not returned by the end plus grace (a bug if ever non-zero);
    /// their requests are missing from `records`.
    pub lost_workers: usize,
}

/// What every worker shares.
struct Ctx {
    clock: Clock,
    /// End of sending, µs; moved earlier by Ctrl-C.
    end_us: AtomicU64,
    timeout: Duration,
    grace: Duration,
    seed: Option<u64>,
    plan: Arc<Plan>,
    board: Arc<Board>,
}

impl Ctx {
    fn end_us(&self) -> u64 {
        self.end_us.load(Ordering::Relaxed)
    }

    fn deadline(&self, now: Instant) -> Instant {
        (now + self.timeout).min(self.clock.at(self.end_us()) + self.grace)
    }
}

/// Runs the load. `make` builds one worker's client.
pub async fn drive<C, F>(pacing: &Pacing, plan: Arc<Plan>, clock: Clock, make: F) -> Finished
where
    C: Client,
    F: Fn(usize) -> C + Send + Sync + 'static,
{
    let ctx = Arc::new(Ctx {
        clock,
        end_us: AtomicU64::new(pacing.duration.as_micros() as u64),
        timeout: pacing.timeout,
        grace: pacing.grace,
        seed: pacing.seed,
        plan,
        board: Arc::new(Board::default()),
    });
    let progress = Progress::start(ctx.board.clone(), clock);
    let interrupt = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                ctx.end_us.fetch_min(ctx.clock.now_us(), Ordering::Relaxed);
            }
            // A second Ctrl-C does not wait for the requests still in flight.
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        })
    };
    let (handles, unsent) = match pacing.pace {
        Pace::Closed { concurrency } => {
            let handles = (0..concurrency)
                .map(|n| {
                    let (ctx, client) = (ctx.clone(), make(n));
                    tokio::spawn(closed(client, n, ctx))
                })
                .collect();
            (handles, None)
        }
        Pace::Open {
            rate,
            max_in_flight,
        } => {
            // The schedule runs on a thread of its own: OS sleeps are precise to tens of
            // µs, where the runtime's timers round up to the next millisecond.
            let dispatcher = {
                let ctx = ctx.clone();
                tokio::task::spawn_blocking(move || dispatch(&ctx, rate, max_in_flight, &make))
            };
            match dispatcher.await {
                Ok((handles, released)) => (handles, Some(released)),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
    };
    let workers = handles.len();
    let (records, lost_workers) = collect(handles, &ctx).await;
    interrupt.abort();
    progress.finish();
    let unsent = unsent.map_or(0, |released| released.saturating_sub(records.len() as u64));
    let sending = Duration::from_micros(ctx.end_us());
    Finished {
        records,
        unsent,
        workers,
        sending,
        lost_workers,
    }
}

/// A closed-loop worker.
async fn closed<C: Client>(mut client: C, n: usize, ctx: Arc<Ctx>) -> Vec<Record> {
    let tally = ctx.board.tally();
    let mut rng = rng(ctx.seed, n);
    let mut records = Vec::with_capacity(1024);
    loop {
        let now = Instant::now();
        let now_us = ctx.clock.us(now);
        if now_us >= ctx.end_us() {
            break;
        }
        let pick = ctx.plan.picker.pick(&mut rng);
        let record = client.send(pick, now_us, ctx.deadline(now)).await;
        tally.count(record.outcome);
        records.push(record);
    }
    records
}

/// The open-loop schedule, shared by the dispatcher and its workers.
struct Slots {
    /// One permit per slot released and not yet taken.
    due: Semaphore,
    /// Slots taken so far; the next taker's slot number.
    taken: AtomicU64,
    /// Workers waiting for a slot (or just started).
    idle: AtomicUsize,
    /// µs between slots.
    interval: f64,
}

/// Releases the slots on time and starts workers as needed; returns the workers and the
/// number of slots released. Runs on a blocking thread inside the runtime.
fn dispatch<C, F>(
    ctx: &Arc<Ctx>,
    rate: f64,
    max_in_flight: usize,
    make: &F,
) -> (Vec<JoinHandle<Vec<Record>>>, u64)
where
    C: Client,
    F: Fn(usize) -> C,
{
    let slots = Arc::new(Slots {
        due: Semaphore::new(0),
        taken: AtomicU64::new(0),
        idle: AtomicUsize::new(0),
        interval: 1e6 / rate,
    });
    let slot_us = |i: u64| (i as f64 * slots.interval) as u64;
    let mut handles = Vec::new();
    let mut released = 0u64;
    loop {
        let (now_us, end_us) = (ctx.clock.now_us(), ctx.end_us());
        // Slots whose instant has come, and that lie before the end.
        let due = ((now_us.min(end_us.saturating_sub(1)) as f64 / slots.interval) as u64 + 1)
            .min((end_us as f64 / slots.interval).ceil() as u64);
        if due > released {
            let batch = (due - released) as usize;
            let idle = slots.idle.load(Ordering::Relaxed);
            let start = batch
                .saturating_sub(idle)
                .min(max_in_flight - handles.len());
            for _ in 0..start {
                let n = handles.len();
                slots.idle.fetch_add(1, Ordering::Relaxed);
                handles.push(tokio::spawn(open(make(n), n, ctx.clone(), slots.clone())));
            }
            slots.due.add_permits(batch);
            released = due;
        }
        let end_us = ctx.end_us();
        if ctx.clock.now_us() >= end_us {
            break;
        }
        // Until the next slot, or the end once all are released (the backlog drains
        // until then); at most 100 ms, so Ctrl-C is seen.
        let next = ctx.clock.at(slot_us(released).min(end_us));
        let now = Instant::now();
        std::thread::sleep(
            next.saturating_duration_since(now)
                .min(Duration::from_millis(100)),
        );
    }
    slots.due.close();
    (handles, released)
}

/// An open-loop worker: takes due slots until the run ends.
async fn open<C: Client>(mut client: C, n: usize, ctx: Arc<Ctx>, slots: Arc<Slots>) -> Vec<Record> {
    let tally: Arc<Tally> = ctx.board.tally();
    let mut rng = rng(ctx.seed, n);
    let mut records = Vec::with_capacity(256);
    // `idle` already counts this worker: the dispatcher counted it when starting it.
    loop {
        let permit = slots.due.acquire().await;
        slots.idle.fetch_sub(1, Ordering::Relaxed);
        match permit {
            Ok(permit) => permit.forget(),
            Err(_) => break,
        }
        let slot = slots.taken.fetch_add(1, Ordering::Relaxed);
        let intended_us = (slot as f64 * slots.interval) as u64;
        let now = Instant::now();
        if ctx.clock.us(now) >= ctx.end_us() {
            break;
        }
        let pick = ctx.plan.picker.pick(&mut rng);
        let record = client.send(pick, intended_us, ctx.deadline(now)).await;
        tally.count(record.outcome);
        records.push(record);
        slots.idle.fetch_add(1, Ordering::Relaxed);
    }
    records
}

/// Joins the workers; each has returned by the end plus grace, since every request it
/// sends has that deadline. A worker still running a second later is aborted and counted.
async fn collect(handles: Vec<JoinHandle<Vec<Record>>>, ctx: &Ctx) -> (Vec<Record>, usize) {
    let limit = ctx.clock.at(ctx.end_us()) + ctx.grace + Duration::from_secs(1);
    let mut records = Vec::new();
    let mut lost = 0;
    for mut handle in handles {
        match tokio::time::timeout_at(limit.into(), &mut handle).await {
            Ok(Ok(mut r)) => records.append(&mut r),
            Ok(Err(_)) => lost += 1,
            Err(_) => {
                handle.abort();
                lost += 1;
            }
        }
    }
    records.sort_by_key(|r| r.sent_us);
    (records, lost)
}

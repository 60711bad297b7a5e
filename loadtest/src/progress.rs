//! The live line on stderr while a run goes: elapsed time, requests per second over the
//! last second, and 2xx / 429 / other so far. Printed once a second, and only when stderr
//! is a terminal, so logs and pipes stay clean.
//!
//! Each worker counts into a [`Tally`] of its own (one writer, on its own cache line), so
//! counting costs a plain store on the hot path; the printer sums the tallies.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::drive::Clock;
use crate::record::Outcome;

/// One worker's counts.
#[derive(Default)]
#[repr(align(64))]
pub struct Tally {
    counts: [AtomicU64; 3],
}

impl Tally {
    /// Only the owning worker calls this, so a load and a store are enough.
    pub fn count(&self, outcome: Outcome) {
        let slot = &self.counts[outcome as usize];
        slot.store(slot.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// Every worker's tally.
#[derive(Default)]
pub struct Board {
    tallies: Mutex<Vec<Arc<Tally>>>,
}

impl Board {
    /// A tally for a new worker.
    pub fn tally(&self) -> Arc<Tally> {
        let tally = Arc::new(Tally::default());
        if let Ok(mut tallies) = self.tallies.lock() {
            tallies.push(tally.clone());
        }
        tally
    }

    /// 2xx, 429, other so far.
    fn totals(&self) -> [u64; 3] {
        let mut sum = [0; 3];
        if let Ok(tallies) = self.tallies.lock() {
            for t in tallies.iter() {
                for (s, c) in sum.iter_mut().zip(&t.counts) {
                    *s += c.load(Ordering::Relaxed);
                }
            }
        }
        sum
    }
}

/// The printer; dropping it (or [`Progress::finish`]) stops it and clears the line.
pub struct Progress {
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts printing when stderr is a terminal.
    pub fn start(board: Arc<Board>, clock: Clock) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = (0u64, 0u64);
            loop {
                tick.tick().await;
                let [ok, limited, other] = board.totals();
                let (total, now) = (ok + limited + other, clock.now_us());
                let rate = (total - last.0) as f64 * 1e6 / (now - last.1).max(1) as f64;
                last = (total, now);
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{:>6.1}s  {:>9.0} req/s  2xx {ok}  429 {limited}  other {other}",
                    now as f64 / 1e6,
                    rate
                );
                let _ = err.flush();
            }
        });
        Progress { task: Some(task) }
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

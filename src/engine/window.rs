//! Bucket arithmetic shared by both stores: the window's shape, and the timing a denial
//! carries (when the request would fit, when each limit next gains room), computed from
//! the buckets so that both stores answer alike.

use std::time::Duration;

/// A sliding window of `window` measured in buckets of `precision`. It keeps
/// `window / precision + 1` buckets: at any instant the counted span covers the exact
/// window and at most one bucket more, so usage is never under-counted and a request is
/// never refused more than one bucket early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WindowShape {
    window_ms: u64,
    precision_ms: u64,
}

impl WindowShape {
    /// The `per_day` limits' window: 24 hours in buckets of one minute (1,441 slots).
    pub const DAY: WindowShape = WindowShape {
        window_ms: 86_400_000,
        precision_ms: 60_000,
    };

    /// Most buckets a window may have (the config's bound): bounds a ring's memory and work.
    pub const MAX_BUCKETS: u64 = 36_000;

    /// Longest a reservation marker is kept: a day ring's marker would otherwise live a
    /// day; a response is settled within minutes, and one never settled keeps its
    /// reservation counted (the safe side).
    pub const MAX_MARKER_TTL_MS: u64 = 3_600_000;

    pub fn new(window: Duration, precision: Duration) -> Result<WindowShape, String> {
        let (window_ms, precision_ms) = (window.as_millis() as u64, precision.as_millis() as u64);
        // The config allows only precisions under 1s; the stores take any shape of at most
        // MAX_BUCKETS whole-millisecond buckets, so the day window's minutes too.
        if precision_ms == 0 {
            return Err("precision must be at least 1ms".into());
        }
        if window_ms < precision_ms || window_ms % precision_ms != 0 {
            return Err("window must be a whole multiple of precision".into());
        }
        if window_ms / precision_ms > Self::MAX_BUCKETS {
            return Err(format!(
                "a window has at most {} buckets",
                Self::MAX_BUCKETS
            ));
        }
        Ok(WindowShape {
            window_ms,
            precision_ms,
        })
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    pub fn precision_ms(&self) -> u64 {
        self.precision_ms
    }

    /// Buckets kept: the window's plus the one being filled.
    pub fn slots(&self) -> i64 {
        (self.window_ms / self.precision_ms) as i64 + 1
    }

    pub fn bucket(&self, now_ms: u64) -> i64 {
        (now_ms / self.precision_ms) as i64
    }

    /// When bucket `b` leaves the window, in ms since the epoch.
    fn leaves_at(&self, b: i64) -> u64 {
        ((b + self.slots()) as u64).saturating_mul(self.precision_ms)
    }

    /// How long a store keeps an idle key (and an unsettled reservation): past this, all
    /// of it has left the window.
    pub fn ttl_ms(&self) -> u64 {
        self.window_ms + 2 * self.precision_ms
    }

    /// How long a reservation's marker is kept: until its bucket leaves the window, at
    /// most [`WindowShape::MAX_MARKER_TTL_MS`].
    pub fn marker_ttl_ms(&self) -> u64 {
        self.ttl_ms().min(Self::MAX_MARKER_TTL_MS)
    }

    /// Per limit, the wait until the oldest bucket holding usage leaves the window.
    pub(crate) fn resets(
        &self,
        now_ms: u64,
        head: i64,
        slot: impl Fn(i64) -> [u64; 3],
    ) -> [u64; 3] {
        let mut reset = [0u64; 3];
        let mut open = 3;
        for x in head - self.slots() + 1..=head {
            let v = slot(x);
            for k in 0..3 {
                if reset[k] == 0 && v[k] > 0 {
                    reset[k] = self.leaves_at(x).saturating_sub(now_ms).max(1);
                    open -= 1;
                }
            }
            if open == 0 {
                break;
            }
        }
        reset
    }

    /// Per limit, the wait until the oldest counted usage leaves, when all that is known is
    /// the oldest non-empty bucket (`tail`).
    pub(crate) fn resets_from_tail(&self, now_ms: u64, tail: i64, usage: [u64; 3]) -> [u64; 3] {
        let wait = self.leaves_at(tail).saturating_sub(now_ms).max(1);
        usage.map(|u| if u > 0 { wait } else { 0 })
    }

    /// The wait until `want` fits beside `totals` as buckets leave, assuming nothing else
    /// arrives; `head` is the current bucket. A request that fits the totals but was refused
    /// (its bucket is full) waits for the next bucket.
    pub(crate) fn retry_after(
        &self,
        now_ms: u64,
        head: i64,
        totals: [u64; 3],
        want: [u64; 3],
        limits: [u64; 3],
        slot: impl Fn(i64) -> [u64; 3],
    ) -> u64 {
        let fits = |freed: &[u64; 3]| {
            (0..3).all(|k| totals[k].saturating_sub(freed[k]) + want[k] <= limits[k])
        };
        let mut freed = [0u64; 3];
        if fits(&freed) {
            return ((head + 1) as u64 * self.precision_ms)
                .saturating_sub(now_ms)
                .max(1);
        }
        for x in head - self.slots() + 1..=head {
            let v = slot(x);
            for k in 0..3 {
                freed[k] += v[k];
            }
            if fits(&freed) {
                return self.leaves_at(x).saturating_sub(now_ms).max(1);
            }
        }
        self.leaves_at(head).saturating_sub(now_ms).max(1)
    }
}

//! The brute-force reference: every admitted charge kept as an event with its instant and
//! its bucket, and usage summed over the events afresh at every question. Slow and
//! obviously right. It models what the stores are specified to do: buckets of `precision`,
//! a clock that steps back acting in the newest bucket seen, refunds from the newest
//! buckets or from a marker's bucket, and settlements against a marker's remaining output.
use std::collections::{BTreeMap, HashMap};

/// One admitted charge; its amounts shrink as refunds and settlements change its bucket.
#[derive(Clone, Debug)]
pub struct Event {
    /// The instant it counts from: its own, or its bucket's start if later.
    pub at_ms: u64,
    pub bucket: u64,
    pub amounts: [u64; 3],
}

/// A marker: what one charge still holds in its bucket.
#[derive(Clone, Debug)]
pub struct Marker {
    pub event: usize,
    pub bucket: u64,
    pub amounts: [u64; 3],
    pub expires_ms: u64,
}

/// What a settlement does, as `Settlement` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    Applied(i64),
    Expired,
    Unknown,
}

pub struct Reference {
    pub window_ms: u64,
    pub precision_ms: u64,
    pub events: Vec<Event>,
    pub markers: HashMap<u64, Marker>,
    /// The newest bucket any call has brought the window to; 0 before the first.
    pub head: u64,
}

impl Reference {
    pub fn new(window_ms: u64, precision_ms: u64) -> Reference {
        Reference {
            window_ms,
            precision_ms,
            events: Vec::new(),
            markers: HashMap::new(),
            head: 0,
        }
    }

    fn bucket(&self, t: u64) -> u64 {
        t / self.precision_ms
    }

    /// Buckets counted besides the current one.
    fn n(&self) -> u64 {
        self.window_ms / self.precision_ms
    }

    /// The bucket a call at `now` acts in: its own, or the newest seen if the clock
    /// stepped back.
    pub fn acting(&self, now: u64) -> u64 {
        self.bucket(now).max(self.head)
    }

    /// A call that brings the window up to `now` (reserve, usage, refund); `creates` for
    /// one that makes the window when there is none (reserve).
    pub fn touch(&mut self, now: u64, creates: bool) {
        if self.head != 0 || creates {
            self.head = self.acting(now);
        }
    }

    pub fn ttl_ms(&self) -> u64 {
        self.window_ms + 2 * self.precision_ms
    }

    /// How long a marker counts: until its bucket leaves, at most an hour (a day ring's).
    pub fn marker_ttl_ms(&self) -> u64 {
        self.ttl_ms().min(3_600_000)
    }

    /// The exact sliding sum over the instants (now - span, now].
    pub fn exact(&self, now: u64, span: u64) -> [u64; 3] {
        let mut sum = [0; 3];
        for e in self
            .events
            .iter()
            .filter(|e| e.at_ms + span > now && e.at_ms <= now)
        {
            for (s, a) in sum.iter_mut().zip(e.amounts) {
                *s += a;
            }
        }
        sum
    }

    /// What bucket `b` holds.
    fn slot(&self, b: u64) -> [u64; 3] {
        self.slots().get(&b).copied().unwrap_or([0; 3])
    }

    /// Every bucket that holds anything.
    fn slots(&self) -> BTreeMap<u64, [u64; 3]> {
        let mut slots = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.amounts != [0; 3]) {
            let s: &mut [u64; 3] = slots.entry(e.bucket).or_default();
            for (s, a) in s.iter_mut().zip(e.amounts) {
                *s += a;
            }
        }
        slots
    }

    /// The buckets in the window of bucket `b`: `b` and the `window / precision` before it.
    fn in_window(&self, b: u64) -> BTreeMap<u64, [u64; 3]> {
        let mut slots = self.slots();
        slots.retain(|x, _| *x + self.n() >= b && *x <= b);
        slots
    }

    fn window_at(&self, b: u64) -> [u64; 3] {
        let mut sum = [0; 3];
        for v in self.in_window(b).values() {
            for (s, a) in sum.iter_mut().zip(v) {
                *s += a;
            }
        }
        sum
    }

    /// The sum the engine is specified to see at `now`.
    pub fn bucketed(&self, now: u64) -> [u64; 3] {
        if self.head == 0 {
            return [0; 3];
        }
        self.window_at(self.acting(now))
    }

    pub fn fits(&self, now: u64, want: [u64; 3], limits: [u64; 3]) -> bool {
        let used = self.bucketed(now);
        (0..3).all(|k| used[k] + want[k] <= limits[k])
    }

    /// The first bucket boundary after `now` at which `want` fits if nothing else arrives;
    /// found by trying each.
    pub fn first_fit(&self, now: u64, want: [u64; 3], limits: [u64; 3]) -> Option<u64> {
        let a = self.acting(now);
        (1..=self.n() + 2).map(|j| a + j).find_map(|b| {
            let used = self.window_at(b);
            (0..3)
                .all(|k| used[k] + want[k] <= limits[k])
                .then_some(b * self.precision_ms)
        })
    }

    fn leaves_after(&self, x: u64, now: u64) -> u64 {
        ((x + self.n() + 1) * self.precision_ms)
            .saturating_sub(now)
            .max(1)
    }

    /// Per limit, the wait from `now` until the oldest bucket holding it leaves (0: none).
    pub fn resets(&self, now: u64) -> [u64; 3] {
        let mut reset = [0; 3];
        if self.head == 0 {
            return reset;
        }
        for (x, v) in self.in_window(self.acting(now)) {
            for k in 0..3 {
                if reset[k] == 0 && v[k] > 0 {
                    reset[k] = self.leaves_after(x, now);
                }
            }
        }
        reset
    }

    /// The resets an admission or refund reports: for every limit holding anything, the
    /// wait until the oldest non-empty bucket leaves.
    pub fn tail_resets(&self, now: u64) -> [u64; 3] {
        if self.head == 0 {
            return [0; 3];
        }
        let window = self.in_window(self.acting(now));
        let Some(tail) = window.keys().next().copied() else {
            return [0; 3];
        };
        let used = self.bucketed(now);
        used.map(|u| {
            if u > 0 {
                self.leaves_after(tail, now)
            } else {
                0
            }
        })
    }

    /// Records an admitted charge (the caller calls `touch` first); with `marker`, leaves
    /// one under that id.
    pub fn admit(&mut self, now: u64, amounts: [u64; 3], marker: Option<u64>) {
        let bucket = self.acting(now);
        self.events.push(Event {
            // Counted in the newest bucket if the clock stepped back: as if it came then.
            at_ms: now.max(bucket * self.precision_ms),
            bucket,
            amounts,
        });
        if let Some(id) = marker {
            self.markers.insert(
                id,
                Marker {
                    event: self.events.len() - 1,
                    bucket,
                    amounts,
                    expires_ms: now + self.marker_ttl_ms(),
                },
            );
        }
    }

    /// Takes up to `left` from bucket `b`, newest events first; returns what it took.
    fn take(&mut self, b: u64, left: [u64; 3]) -> [u64; 3] {
        let mut taken = [0; 3];
        for e in self.events.iter_mut().rev().filter(|e| e.bucket == b) {
            for k in 0..3 {
                let t = (left[k] - taken[k]).min(e.amounts[k]);
                e.amounts[k] -= t;
                taken[k] += t;
            }
        }
        taken
    }

    /// A refund at `now` (the caller calls `touch` first).
    pub fn refund(&mut self, now: u64, amount: [u64; 3], marker: Option<u64>) {
        if self.head == 0 {
            return;
        }
        let a = self.acting(now);
        let live = marker.filter(|id| {
            let expired = self.markers.get(id).is_some_and(|m| m.expires_ms <= now);
            if expired {
                self.markers.remove(id);
            }
            self.markers.contains_key(id)
        });
        if let Some(id) = live {
            let m = self.markers[&id].clone();
            if m.bucket + self.n() >= a {
                let cap = [0, 1, 2].map(|k| amount[k].min(m.amounts[k]));
                let taken = self.take(m.bucket, cap);
                let rest = [0, 1, 2].map(|k| m.amounts[k] - taken[k]);
                if rest == [0; 3] {
                    self.markers.remove(&id);
                } else if let Some(m) = self.markers.get_mut(&id) {
                    m.amounts = rest;
                }
            }
            return;
        }
        let mut left = amount;
        for b in (a.saturating_sub(self.n())..=a).rev() {
            let taken = self.take(b, left);
            for k in 0..3 {
                left[k] -= taken[k];
            }
        }
    }

    /// Settles marker `id` to `actual` output tokens at `now`.
    pub fn settle(&mut self, id: u64, now: u64, actual: u64) -> Settled {
        let Some(m) = self.markers.remove(&id) else {
            return Settled::Unknown;
        };
        if m.expires_ms <= now {
            return Settled::Unknown;
        }
        if self.head == 0 || self.acting(now) > m.bucket + self.n() {
            return Settled::Expired;
        }
        let old = self.slot(m.bucket)[2];
        let new = (old + actual).saturating_sub(m.amounts[2]);
        let delta = new as i64 - old as i64;
        if delta >= 0 {
            self.events[m.event].amounts[2] += delta as u64;
        } else {
            // Its own event first, then the bucket's others (a refund may have taken the
            // marker's tokens from them).
            let mut owed = (-delta) as u64;
            let own = owed.min(self.events[m.event].amounts[2]);
            self.events[m.event].amounts[2] -= own;
            owed -= own;
            self.take(m.bucket, [0, 0, owed]);
        }
        Settled::Applied(delta)
    }
}

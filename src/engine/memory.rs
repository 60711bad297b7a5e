//! The in-process store: the same ring and the same rules as the Lua scripts in `lua/`,
//! for a node that runs alone (no `--redis-url`). Each key's ring has its own mutex, so
//! keys never wait on each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    system_clock, Charge, Clock, Decision, KeyName, LimitKind, Limits, Reservation, Settlement,
    Snapshot, Usage, WindowShape,
};

/// Widths of a slot's counters, as in the Redis ring (u16 requests, u32 tokens).
const SLOT_MAX: [u64; 3] = [u16::MAX as u64, u32::MAX as u64, u32::MAX as u64];

/// One key's window: a ring of buckets plus the running totals of those in the window.
struct Ring {
    slots: Vec<[u64; 3]>,
    /// The newest bucket; 0 while empty.
    head: i64,
    /// A lower bound of the oldest non-empty bucket in the window.
    tail: i64,
    totals: [u64; 3],
    /// Which life of the ring this is (the Redis ring's epoch): a new one each time it
    /// starts afresh, so a marker of an earlier life never touches its buckets.
    epoch: u64,
}

/// Ring epochs, unique within the process.
fn next_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Ring {
    fn new(shape: WindowShape) -> Ring {
        Ring {
            slots: vec![[0; 3]; shape.slots() as usize],
            head: 0,
            tail: 0,
            totals: [0; 3],
            epoch: 0,
        }
    }

    fn index(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.slots.len() as i64) as usize
    }

    fn slot(&self, bucket: i64) -> [u64; 3] {
        self.slots[self.index(bucket)]
    }

    /// Brings the ring to bucket `b` (see `advance` in lua/window.lua); returns the bucket
    /// to act in, which stays at the head if the clock stepped back.
    fn advance(&mut self, b: i64) -> i64 {
        let n = self.slots.len() as i64;
        if self.head == 0 || b - self.head >= n {
            self.slots.iter_mut().for_each(|s| *s = [0; 3]);
            self.head = b;
            self.tail = b;
            self.totals = [0; 3];
            self.epoch = next_epoch();
            return b;
        }
        if b <= self.head {
            return self.head;
        }
        for x in self.head + 1..=b {
            let i = self.index(x);
            for k in 0..3 {
                self.totals[k] -= self.slots[i][k];
            }
            self.slots[i] = [0; 3];
        }
        self.head = b;
        b
    }

    /// Moves the tail to the oldest non-empty bucket in the window (`settle_tail` in Lua).
    fn settle_tail(&mut self) {
        let first = self.head - self.slots.len() as i64 + 1;
        self.tail = self.tail.max(first);
        if self.totals == [0; 3] {
            self.tail = self.head;
            return;
        }
        let found = (self.tail..=self.head).find(|x| self.slot(*x) != [0; 3]);
        self.tail = found.unwrap_or(self.head);
    }
}

/// What one charge added to one bucket of one ring (see `read_marker` in lua/window.lua).
struct Marker {
    bucket: i64,
    epoch: u64,
    amounts: [u64; 3],
    expires_ms: u64,
}

/// Markers by ring and id, as Redis names them (`marker_key`).
type MarkerId = (KeyName, WindowShape, u64);

/// Rings by key and window shape (a changed shape starts a fresh ring, as in Redis).
type Rings = HashMap<(KeyName, WindowShape), Arc<Mutex<Ring>>>;

pub struct MemoryStore {
    clock: Clock,
    rings: Mutex<Rings>,
    markers: Mutex<Markers>,
}

#[derive(Default)]
struct Markers {
    open: HashMap<MarkerId, Marker>,
    /// Size after the last sweep of expired markers; the next sweep waits for it to double.
    swept_at: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a ring cannot leave it half-updated in a way later calls
    // depend on more than on availability, so keep serving rather than poison every call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_clock(system_clock())
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A store on the given clock (tests drive time with it).
    pub fn with_clock(clock: Clock) -> MemoryStore {
        MemoryStore {
            clock,
            rings: Mutex::new(HashMap::new()),
            markers: Mutex::new(Markers::default()),
        }
    }

    fn ring(&self, key: &KeyName, shape: WindowShape) -> Arc<Mutex<Ring>> {
        lock(&self.rings)
            .entry((key.clone(), shape))
            .or_insert_with(|| Arc::new(Mutex::new(Ring::new(shape))))
            .clone()
    }

    pub(super) fn reserve(
        &self,
        key: &KeyName,
        shape: WindowShape,
        limits: &Limits,
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Decision {
        let now = (self.clock)();
        let ring = self.ring(key, shape);
        let mut ring = lock(&ring);
        let b = ring.advance(shape.bucket(now));
        let (want_a, limit_a) = (
            want.to_array(),
            [limits.requests, limits.input_tokens, limits.output_tokens],
        );
        let cur = ring.slot(b);
        let fits = charge == Charge::Force
            || (0..3).all(|k| {
                cur[k] + want_a[k] <= SLOT_MAX[k] && ring.totals[k] + want_a[k] <= limit_a[k]
            });
        if !fits {
            let limit = LimitKind::ALL
                .into_iter()
                .find(|k| ring.totals[k.index()] + want_a[k.index()] > limit_a[k.index()])
                .unwrap_or(LimitKind::Requests);
            let slot = |x| ring.slot(x);
            let snapshot = Snapshot {
                now_ms: now,
                usage: Usage::from_array(ring.totals),
                reset_ms: shape.resets(now, b, slot),
            };
            let retry = shape.retry_after(now, b, ring.totals, want_a, limit_a, slot);
            return Decision::Denied {
                snapshot,
                limit,
                retry_after_ms: Some(retry),
            };
        }
        let i = ring.index(b);
        let mut added = [0; 3];
        for k in 0..3 {
            // Only what the slot can hold is added, so the totals stay the sums of the slots.
            let add = want_a[k].min(SLOT_MAX[k] - ring.slots[i][k]);
            ring.slots[i][k] += add;
            ring.totals[k] += add;
            added[k] = add;
        }
        let epoch = ring.epoch;
        ring.settle_tail();
        let snapshot = Snapshot {
            now_ms: now,
            usage: Usage::from_array(ring.totals),
            reset_ms: shape.resets_from_tail(now, ring.tail, ring.totals),
        };
        drop(ring);
        let reservation = marker.map(|id| {
            self.open_marker(
                (key.clone(), shape, id),
                Marker {
                    bucket: b,
                    epoch,
                    amounts: added,
                    expires_ms: now + shape.ttl_ms(),
                },
                now,
            );
            Reservation {
                key: key.clone(),
                shape,
                id,
            }
        });
        Decision::Admitted {
            snapshot,
            reservation,
        }
    }

    fn open_marker(&self, id: MarkerId, marker: Marker, now: u64) {
        let mut markers = lock(&self.markers);
        if markers.open.len() >= 2 * markers.swept_at.max(1024) {
            markers.open.retain(|_, m| m.expires_ms > now);
            markers.swept_at = markers.open.len();
        }
        markers.open.insert(id, marker);
    }

    pub(super) fn settle(&self, reservation: &Reservation, output_tokens: u64) -> Settlement {
        let now = (self.clock)();
        let id = (reservation.key.clone(), reservation.shape, reservation.id);
        let Some(marker) = lock(&self.markers).open.remove(&id) else {
            return Settlement::Unknown;
        };
        if marker.expires_ms <= now {
            return Settlement::Unknown;
        }
        let shape = reservation.shape;
        let ring = self.ring(&reservation.key, shape);
        let mut ring = lock(&ring);
        if ring.head == 0
            || ring.epoch != marker.epoch
            || shape.bucket(now).max(ring.head) - marker.bucket >= shape.slots()
        {
            return Settlement::Expired;
        }
        let i = ring.index(marker.bucket);
        let old = ring.slots[i][2];
        // Against what the marker still holds: a refund by it may have taken some back.
        let new = (old + output_tokens)
            .saturating_sub(marker.amounts[2])
            .min(SLOT_MAX[2]);
        ring.slots[i][2] = new;
        ring.totals[2] = ring.totals[2] + new - old;
        if new > 0 && marker.bucket < ring.tail {
            // A bucket that held nothing may sit before the tail; keep it a lower bound.
            ring.tail = marker.bucket;
        }
        Settlement::Applied {
            delta: new as i64 - old as i64,
        }
    }

    /// Takes `amount` back from a marker's bucket, or from the newest buckets (see
    /// lua/refund.lua).
    pub(super) fn refund(
        &self,
        key: &KeyName,
        shape: WindowShape,
        amount: &Usage,
        marker: Option<u64>,
    ) -> Snapshot {
        let now = (self.clock)();
        let ring = self.ring(key, shape);
        let mut ring = lock(&ring);
        if ring.head == 0 {
            return Snapshot::empty(now);
        }
        let b = ring.advance(shape.bucket(now));
        let mut left = amount.to_array();
        let mut markers = lock(&self.markers);
        let id = marker.map(|id| (key.clone(), shape, id));
        if let Some(id) = &id {
            if markers.open.get(id).is_some_and(|m| m.expires_ms <= now) {
                markers.open.remove(id);
            }
        }
        if let Some(id) = &id {
            let mut used_up = false;
            if let Some(m) = markers.open.get_mut(id) {
                // Only the charged bucket, and at most what the marker still holds.
                if m.epoch == ring.epoch && m.bucket > b - shape.slots() {
                    let i = ring.index(m.bucket);
                    for (k, owed) in left.iter().enumerate() {
                        let take = (*owed).min(m.amounts[k]).min(ring.slots[i][k]);
                        ring.slots[i][k] -= take;
                        ring.totals[k] -= take;
                        m.amounts[k] -= take;
                    }
                    used_up = m.amounts == [0; 3];
                }
                left = [0; 3];
            }
            if used_up {
                markers.open.remove(id);
            }
        }
        drop(markers);
        let mut x = b;
        while left != [0; 3] && x > b - shape.slots() {
            let i = ring.index(x);
            for (k, owed) in left.iter_mut().enumerate() {
                let take = (*owed).min(ring.slots[i][k]);
                ring.slots[i][k] -= take;
                ring.totals[k] -= take;
                *owed -= take;
            }
            x -= 1;
        }
        ring.settle_tail();
        Snapshot {
            now_ms: now,
            usage: Usage::from_array(ring.totals),
            reset_ms: shape.resets_from_tail(now, ring.tail, ring.totals),
        }
    }

    pub(super) fn usage(&self, key: &KeyName, shape: WindowShape) -> Snapshot {
        let now = (self.clock)();
        let ring = self.ring(key, shape);
        let mut ring = lock(&ring);
        if ring.head == 0 {
            return Snapshot::empty(now);
        }
        let b = ring.advance(shape.bucket(now));
        ring.settle_tail();
        Snapshot {
            now_ms: now,
            usage: Usage::from_array(ring.totals),
            reset_ms: shape.resets(now, b, |x| ring.slot(x)),
        }
    }
}

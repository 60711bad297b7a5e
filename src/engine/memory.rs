//! The in-process store: the same ring and the same rules as the Lua scripts in `lua/`,
//! for a node that runs alone (no `--redis-url`).
//!
//! Its structure answers three needs of a long-running process:
//! - **No process-wide lock on a decision.** Rings and reservation markers sit in sharded
//!   concurrent maps (`dashmap`): a decision holds one shard's lock only to look its ring up,
//!   then the ring's own mutex, so keys never wait on each other.
//! - **Memory bounded by the config in force.** [`MemoryStore::retain`] drops the rings and
//!   markers of keys or window shapes a reload removed; an amortised sweep drops idle rings
//!   and expired markers without any reload (see `MemoryStore::tick` for why a sweep
//!   every so many reservations rather than a thread or a timer).
//! - **Time that never steps.** The default clock is [`monotonic_clock`]: an NTP step of
//!   the wall clock neither wipes nor freezes a window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dashmap::DashMap;

use super::rings::{Bound, Claim, RingRef, Verdict};
use super::{system_clock, Charge, Clock, LimitKind, Settlement, Snapshot, Usage, WindowShape};

/// Widths of a slot's counters, as in the Redis ring (`lua/window.lua`): requests are a
/// u16 in buckets shorter than a second and a u32 in longer ones (a day's one-minute
/// buckets, shared by a pool's keys); tokens are u32s.
fn slot_max(shape: WindowShape) -> [u64; 3] {
    let requests = if shape.precision_ms() >= 1000 {
        u32::MAX
    } else {
        u16::MAX.into()
    };
    [requests.into(), u32::MAX.into(), u32::MAX.into()]
}

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

    /// Whether nothing of the ring is in the window at `now` any more: the next `advance`
    /// would clear it, so dropping it and starting a fresh one later changes no answer.
    fn is_idle(&self, shape: WindowShape, now: u64) -> bool {
        self.head == 0 || shape.bucket(now) - self.head >= shape.slots()
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
type MarkerId = (RingRef, u64);

/// Rings by name (a changed shape starts a fresh ring, as in Redis).
///
/// A caller clones a ring's `Arc` only while it holds the ring's shard lock, so a sweep,
/// which holds that shard's write lock, knows from the count alone whether anyone is
/// between looking a ring up and writing to it; it never drops such a ring, so no write
/// lands in a ring that has left the map.
type Rings = DashMap<RingRef, Arc<Mutex<Ring>>>;

/// Reservations waiting for their settlement (and charges a refund may name), by ring and id.
type Markers = DashMap<MarkerId, Marker>;

/// The fewest reservations between two sweeps, so that a small store does not sweep on
/// every call.
const SWEEP_EVERY_AT_LEAST: u64 = 1024;

pub struct MemoryStore {
    clock: Clock,
    rings: Rings,
    markers: Markers,
    /// Reservations so far: the only calls that make a ring or a marker.
    reservations: AtomicU64,
    /// The reservation count at which the next sweep runs; `u64::MAX` while one runs.
    sweep_due: AtomicU64,
}

/// The default clock: the wall clock read once, when the clock is made (the store's
/// start), then advanced by the monotonic clock (`Instant`, which NTP may slew but never
/// steps). Its readings stay comparable with ms timestamps since the Unix epoch (as in
/// Redis), but an NTP step of the wall clock after start neither moves a window back
/// (which would freeze it: the ring stays at its head) nor forward (which would wipe it).
/// A process running for months may drift from the wall clock by what NTP slewed; nothing
/// outside the process compares with it.
pub fn monotonic_clock() -> Clock {
    let wall_at_start = (system_clock())();
    let start = Instant::now();
    Arc::new(move || wall_at_start + start.elapsed().as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a ring cannot leave it half-updated in a way later calls
    // depend on more than on availability, so keep serving rather than poison every call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_clock(monotonic_clock())
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
            rings: Rings::default(),
            markers: Markers::default(),
            reservations: AtomicU64::new(0),
            sweep_due: AtomicU64::new(SWEEP_EVERY_AT_LEAST),
        }
    }

    /// Drops the rings, and the reservations, of every ring `keep` refuses: the server
    /// calls it after each applied reload with the config now in force, so a renamed key,
    /// a removed model entry or pool, or a changed window frees its memory at once. A
    /// reservation dropped here settles as unknown in that ring; a call already in flight
    /// on a dropped ring finishes on it, and what it counts goes with the ring.
    pub fn retain(&self, keep: impl Fn(&RingRef) -> bool) {
        self.rings.retain(|ring, _| keep(ring));
        self.markers.retain(|(ring, _), _| keep(ring));
    }

    /// How many rings the store holds (for tests and measurements).
    pub fn rings_held(&self) -> usize {
        self.rings.len()
    }

    /// How many reservations wait for their settlement (for tests and measurements).
    pub fn markers_held(&self) -> usize {
        self.markers.len()
    }

    /// Counts one reservation and, when one is due, sweeps: drops idle rings and expired
    /// markers. Only a reservation makes a ring or a marker, so only reservations count
    /// (reads and settlements stay cheaper). A sweep visits every ring and marker, and the
    /// next one waits for as many reservations as the store then holds (at least
    /// [`SWEEP_EVERY_AT_LEAST`]), so sweeping costs O(1) per reservation amortised, and the
    /// store holds at most about twice what was in use within a window, plus that minimum.
    /// Sweeping on a count rather than on a timer needs no thread and no runtime, costs
    /// nothing while the node is idle (when nothing grows either), and makes the counts a
    /// function of the calls alone, which the tests rely on. Called before any ring is
    /// locked: a sweep takes the rings' shard locks and then their mutexes.
    fn tick(&self, now: u64) {
        let n = self.reservations.fetch_add(1, Ordering::Relaxed) + 1;
        let due = self.sweep_due.load(Ordering::Relaxed);
        // Exactly one caller claims a due sweep; the others carry on without waiting.
        if n < due
            || self
                .sweep_due
                .compare_exchange(due, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.rings.retain(|id, ring| {
            // Held elsewhere: a caller is about to use it (see `Rings`), so it stays.
            Arc::strong_count(ring) > 1 || !lock(ring).is_idle(id.shape, now)
        });
        self.markers.retain(|_, marker| marker.expires_ms > now);
        let held = (self.rings.len() + self.markers.len()) as u64;
        self.sweep_due
            .store(n + held.max(SWEEP_EVERY_AT_LEAST), Ordering::Relaxed);
    }

    /// The ring, made if there is none.
    fn ring(&self, id: &RingRef) -> Arc<Mutex<Ring>> {
        // The common case takes the shard's read lock only; the guard is gone before
        // `entry` takes the write lock of the same shard.
        if let Some(ring) = self.rings.get(id).map(|r| Arc::clone(r.value())) {
            return ring;
        }
        self.rings
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Ring::new(id.shape))))
            .value()
            .clone()
    }

    /// The ring if there is one. A missing ring reads as an empty one, so calls that only
    /// read or take back do not make one.
    fn existing_ring(&self, id: &RingRef) -> Option<Arc<Mutex<Ring>>> {
        self.rings.get(id).map(|r| Arc::clone(r.value()))
    }

    /// Checks every ring of `set` and, only if the request fits them all, records `want`
    /// in each one's current bucket (see lua/reserve.lua). The rings are locked together,
    /// in the one order every caller uses, so no other call sees some recorded and others
    /// not, and two calls never wait on each other in a cycle.
    pub(super) fn reserve_all(
        &self,
        set: &[Bound],
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Verdict {
        let now = (self.clock)();
        self.tick(now);
        let held: Vec<Arc<Mutex<Ring>>> = set.iter().map(|b| self.ring(&b.ring)).collect();
        let mut order: Vec<usize> = (0..set.len()).collect();
        order.sort_by(|a, b| set[*a].ring.order_key().cmp(&set[*b].ring.order_key()));
        let mut guards: Vec<Option<MutexGuard<'_, Ring>>> = set.iter().map(|_| None).collect();
        for i in order {
            guards[i] = Some(lock(&held[i]));
        }
        let mut rings: Vec<MutexGuard<'_, Ring>> = guards.into_iter().flatten().collect();
        let want_a = want.to_array();
        let heads: Vec<i64> = rings
            .iter_mut()
            .zip(set)
            .map(|(ring, b)| ring.advance(b.ring.shape.bucket(now)))
            .collect();
        let fits: Vec<bool> = rings
            .iter()
            .zip(set)
            .zip(&heads)
            .map(|((ring, b), &head)| {
                let (cur, limits) = (ring.slot(head), b.limits.to_array());
                let max = slot_max(b.ring.shape);
                charge == Charge::Force
                    || (0..3).all(|k| {
                        cur[k] + want_a[k] <= max[k] && ring.totals[k] + want_a[k] <= limits[k]
                    })
            })
            .collect();
        if fits.contains(&false) {
            let mut snapshots = Vec::with_capacity(set.len());
            let mut waits = Vec::with_capacity(set.len());
            for (i, b) in set.iter().enumerate() {
                let (ring, shape, head) = (&rings[i], b.ring.shape, heads[i]);
                let slot = |x| ring.slot(x);
                snapshots.push(Snapshot {
                    now_ms: now,
                    usage: Usage::from_array(ring.totals),
                    reset_ms: shape.resets(now, head, slot),
                });
                waits.push((!fits[i]).then(|| {
                    let limits = b.limits.to_array();
                    shape.retry_after(now, head, ring.totals, want_a, limits, slot)
                }));
            }
            let (ring, retry) = longest_wait(&waits);
            let limits = set[ring].limits.to_array();
            let totals = rings[ring].totals;
            let limit = LimitKind::ALL
                .into_iter()
                .find(|k| totals[k.index()] + want_a[k.index()] > limits[k.index()])
                .unwrap_or(LimitKind::Requests);
            return Verdict::Denied {
                snapshots,
                ring,
                limit,
                retry_after_ms: Some(retry),
            };
        }
        let mut snapshots = Vec::with_capacity(set.len());
        let mut charged = Vec::with_capacity(set.len());
        for (i, b) in set.iter().enumerate() {
            let ring = &mut rings[i];
            let idx = ring.index(heads[i]);
            let max = slot_max(b.ring.shape);
            let mut added = [0; 3];
            for k in 0..3 {
                // Only what the slot can hold is added, so the totals stay the sums of the
                // slots.
                let add = want_a[k].min(max[k] - ring.slots[idx][k]);
                ring.slots[idx][k] += add;
                ring.totals[k] += add;
                added[k] = add;
            }
            ring.settle_tail();
            snapshots.push(Snapshot {
                now_ms: now,
                usage: Usage::from_array(ring.totals),
                reset_ms: b.ring.shape.resets_from_tail(now, ring.tail, ring.totals),
            });
            charged.push(Marker {
                bucket: heads[i],
                epoch: ring.epoch,
                amounts: added,
                expires_ms: now + b.ring.shape.marker_ttl_ms(),
            });
        }
        drop(rings);
        let claim = marker.map(|id| {
            for (b, m) in set.iter().zip(charged) {
                self.open_marker((b.ring.clone(), id), m, now);
            }
            Claim {
                rings: set.iter().map(|b| b.ring.clone()).collect(),
                id,
            }
        });
        Verdict::Admitted { snapshots, claim }
    }

    fn open_marker(&self, id: MarkerId, marker: Marker, now: u64) {
        // Expired markers go in the sweep (`tick`); a new one is never expired.
        debug_assert!(marker.expires_ms > now);
        self.markers.insert(id, marker);
    }

    /// Corrects the claim's bucket in each of its rings to the real output tokens, once.
    pub(super) fn settle_all(&self, claim: &Claim, output_tokens: u64) -> Vec<Settlement> {
        let now = (self.clock)();
        claim
            .rings
            .iter()
            .map(|ring| self.settle_ring(ring, claim.id, output_tokens, now))
            .collect()
    }

    fn settle_ring(&self, id: &RingRef, marker: u64, output_tokens: u64, now: u64) -> Settlement {
        let Some((_, marker)) = self.markers.remove(&(id.clone(), marker)) else {
            return Settlement::Unknown;
        };
        if marker.expires_ms <= now {
            return Settlement::Unknown;
        }
        let shape = id.shape;
        let Some(ring) = self.existing_ring(id) else {
            return Settlement::Expired;
        };
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
        // Saturating: the count comes from the upstream's response, and may be anything.
        let new = old
            .saturating_add(output_tokens)
            .saturating_sub(marker.amounts[2])
            .min(u32::MAX.into());
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

    /// Takes `amount` back from each ring: from its marker's bucket, or from the newest
    /// buckets (see lua/refund.lua).
    pub(super) fn refund_all(
        &self,
        rings: &[RingRef],
        amount: &Usage,
        marker: Option<u64>,
    ) -> Vec<Snapshot> {
        let now = (self.clock)();
        rings
            .iter()
            .map(|ring| self.refund_ring(ring, amount, marker, now))
            .collect()
    }

    fn refund_ring(&self, id: &RingRef, amount: &Usage, marker: Option<u64>, now: u64) -> Snapshot {
        let shape = id.shape;
        let Some(ring) = self.existing_ring(id) else {
            return Snapshot::empty(now);
        };
        let mut ring = lock(&ring);
        if ring.head == 0 {
            return Snapshot::empty(now);
        }
        let b = ring.advance(shape.bucket(now));
        let mut left = amount.to_array();
        if let Some(mid) = marker.map(|m| (id.clone(), m)) {
            self.markers.remove_if(&mid, |_, m| m.expires_ms <= now);
            let mut used_up = false;
            if let Some(mut m) = self.markers.get_mut(&mid) {
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
            // The entry guard is gone: removing from the same shard cannot deadlock.
            if used_up {
                self.markers.remove(&mid);
            }
        }
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

    /// Each ring's current window.
    pub(super) fn usage_all(&self, rings: &[RingRef]) -> Vec<Snapshot> {
        let now = (self.clock)();
        rings
            .iter()
            .map(|ring| self.usage_ring(ring, now))
            .collect()
    }

    fn usage_ring(&self, id: &RingRef, now: u64) -> Snapshot {
        let Some(ring) = self.existing_ring(id) else {
            return Snapshot::empty(now);
        };
        let mut ring = lock(&ring);
        if ring.head == 0 {
            return Snapshot::empty(now);
        }
        let b = ring.advance(id.shape.bucket(now));
        ring.settle_tail();
        Snapshot {
            now_ms: now,
            usage: Usage::from_array(ring.totals),
            reset_ms: id.shape.resets(now, b, |x| ring.slot(x)),
        }
    }
}

/// Of the rings that do not fit (`Some` wait), the one with the longest wait, the first on
/// a tie, and that wait: the first instant every ring has room, since each ring's room
/// only grows while nothing arrives.
pub(crate) fn longest_wait(waits: &[Option<u64>]) -> (usize, u64) {
    let mut best = (0, 0);
    let mut found = false;
    for (i, w) in waits.iter().enumerate() {
        if let Some(w) = *w {
            if !found || w > best.1 {
                best = (i, w);
                found = true;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;
    use crate::engine::{Decision, KeyName, Limits, Reservation};

    const LIMITS: Limits = Limits {
        requests: 1_000_000,
        input_tokens: 1_000_000_000,
        output_tokens: 1_000_000_000,
    };
    const WANT: Usage = Usage {
        requests: 1,
        input_tokens: 10,
        output_tokens: 20,
    };

    /// A store on a clock the test moves by hand, starting at `t0` ms.
    fn store_at(t0: u64) -> (MemoryStore, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(t0));
        let clock = now.clone();
        let store = MemoryStore::with_clock(Arc::new(move || clock.load(Ordering::SeqCst)));
        (store, now)
    }

    fn shape(window_ms: u64, precision_ms: u64) -> WindowShape {
        WindowShape::new(
            Duration::from_millis(window_ms),
            Duration::from_millis(precision_ms),
        )
        .expect("a valid shape")
    }

    fn key(name: &str) -> KeyName {
        KeyName::new(name).expect("a valid key name")
    }

    impl MemoryStore {
        /// The one-ring calls, as `Store` makes them.
        fn reserve(
            &self,
            key: &KeyName,
            shape: WindowShape,
            limits: &Limits,
            want: &Usage,
            charge: Charge,
            marker: Option<u64>,
        ) -> Decision {
            let set = [Bound {
                ring: RingRef::own(key, shape),
                limits: *limits,
            }];
            Decision::from_verdict(self.reserve_all(&set, want, charge, marker), key, shape)
                .expect("a one-ring verdict holds one snapshot")
        }

        fn settle(&self, r: &Reservation, output_tokens: u64) -> Settlement {
            let (now, ring) = ((self.clock)(), RingRef::own(&r.key, r.shape));
            self.settle_ring(&ring, r.id, output_tokens, now)
        }

        fn usage(&self, key: &KeyName, shape: WindowShape) -> Snapshot {
            self.usage_ring(&RingRef::own(key, shape), (self.clock)())
        }
    }

    /// Reserves `WANT` with a reservation to settle later, and returns it.
    fn reserve(store: &MemoryStore, key: &KeyName, shape: WindowShape, id: u64) -> Reservation {
        match store.reserve(key, shape, &LIMITS, &WANT, Charge::Check, Some(id)) {
            Decision::Admitted {
                reservation: Some(r),
                ..
            } => r,
            other => panic!("expected an admission with a reservation, got {other:?}"),
        }
    }

    #[test]
    fn retain_frees_the_rings_and_markers_of_removed_keys_and_shapes() {
        let (store, _) = store_at(1_000_000);
        let (kept, renamed) = (key("kept"), key("renamed"));
        let (old, new) = (shape(60_000, 100), shape(30_000, 100));
        let r_kept = reserve(&store, &kept, old, 1);
        let r_renamed = reserve(&store, &renamed, old, 2);
        let r_reshaped = reserve(&store, &kept, new, 3);
        assert_eq!((store.rings_held(), store.markers_held()), (3, 3));

        store.retain(|r| r.tag == kept && r.shape == old);

        assert_eq!((store.rings_held(), store.markers_held()), (1, 1));
        // What stays is untouched: its usage and its reservation.
        assert_eq!(store.usage(&kept, old).usage, WANT);
        assert_eq!(store.settle(&r_kept, 20), Settlement::Applied { delta: 0 });
        // What went is gone: nothing counted, reservations unknown.
        assert_eq!(store.usage(&renamed, old).usage, Usage::default());
        assert_eq!(store.usage(&kept, new).usage, Usage::default());
        assert_eq!(store.settle(&r_renamed, 5), Settlement::Unknown);
        assert_eq!(store.settle(&r_reshaped, 5), Settlement::Unknown);
        // Reading a key's window does not make a ring for it.
        assert_eq!(store.rings_held(), 1);
    }

    #[test]
    fn an_idle_ring_is_freed_after_a_window_without_a_reload() {
        // 1 s at 100 ms: 11 buckets. `reference` sees the same calls on `idle` but is never
        // swept (too few reservations), to show that freeing changes no answer.
        let (store, now) = store_at(1_000_000);
        let (reference, reference_now) = store_at(1_000_000);
        let s = shape(1_000, 100);
        let (idle, busy) = (key("idle"), key("busy"));
        reserve(&store, &idle, s, 1);
        reserve(&reference, &idle, s, 1);
        let advance = |ms: u64| {
            now.fetch_add(ms, Ordering::SeqCst);
            reference_now.fetch_add(ms, Ordering::SeqCst);
        };
        // Any run of this many reservations holds a sweep (the store holds little); `busy`
        // keeps one ring of its own.
        let sweep = || {
            for _ in 0..SWEEP_EVERY_AT_LEAST {
                store.reserve(&busy, s, &LIMITS, &WANT, Charge::Check, None);
            }
        };
        // Ten buckets on, its bucket is still in the window: the sweep keeps it.
        advance(1_000);
        sweep();
        assert_eq!((store.rings_held(), store.markers_held()), (2, 1));
        // Eleven on, it has left: the sweep frees the ring; the marker lives out its ttl
        // (a window and two buckets), then goes too.
        advance(100);
        sweep();
        assert_eq!((store.rings_held(), store.markers_held()), (1, 1));
        assert_eq!(store.usage(&idle, s), reference.usage(&idle, s));
        advance(100);
        sweep();
        assert_eq!((store.rings_held(), store.markers_held()), (1, 0));
        // The key starts afresh exactly as the never-swept ring goes on.
        let again = |st: &MemoryStore| st.reserve(&idle, s, &LIMITS, &WANT, Charge::Check, None);
        assert_eq!(again(&store), again(&reference));
    }

    #[test]
    fn counts_stay_bounded_while_100k_keys_cycle_through_idleness() {
        // Every key is used three times (two settled, one left open) and never again; the
        // clock moves 1 ms a key, so about 1,000 keys are in the 1 s window at any time.
        let (store, now) = store_at(1_000_000);
        let s = shape(1_000, 100);
        let (mut most_rings, mut most_markers) = (0, 0);
        for i in 0..100_000u64 {
            let k = key(&format!("k{i}"));
            for j in 0..3 {
                let r = reserve(&store, &k, s, 3 * i + j);
                if j > 0 {
                    store.settle(&r, 7);
                }
            }
            now.fetch_add(1, Ordering::SeqCst);
            most_rings = most_rings.max(store.rings_held());
            most_markers = most_markers.max(store.markers_held());
        }
        // ~1,100 keys live within a window (plus a bucket) and ~1,200 open markers within
        // their ttl; a sweep every max(held, 1,024) reservations (3 a key) lets at most
        // about that many more accumulate between two sweeps.
        assert!(most_rings <= 3_000, "rings peaked at {most_rings}");
        assert!(most_markers <= 3_000, "markers peaked at {most_markers}");
    }

    #[test]
    fn counts_stay_bounded_while_100k_keys_cycle_through_reloads() {
        // Batches of 1,000 keys, each batch alone in the config in force; the clock stands
        // still, so nothing is ever idle and only `retain` frees anything.
        let (store, _) = store_at(1_000_000);
        let s = shape(60_000, 100);
        let (mut most_rings, mut most_markers) = (0, 0);
        for batch in 0..100u64 {
            let keys: Vec<KeyName> = (0..1_000)
                .map(|i| key(&format!("k{}", batch * 1_000 + i)))
                .collect();
            let config: std::collections::HashSet<&KeyName> = keys.iter().collect();
            store.retain(|r| config.contains(&r.tag));
            for (i, k) in keys.iter().enumerate() {
                reserve(&store, k, s, batch * 10_000 + i as u64);
                most_rings = most_rings.max(store.rings_held());
                most_markers = most_markers.max(store.markers_held());
            }
        }
        assert_eq!((most_rings, most_markers), (1_000, 1_000));
    }

    #[test]
    fn a_ring_in_use_is_never_swept() {
        // A caller holding a ring's Arc (between lookup and write) keeps it in the map even
        // when it is idle, so its write cannot land in a ring that has left the map.
        let (store, now) = store_at(1_000_000);
        let s = shape(1_000, 100);
        let k = key("held");
        let held = store.ring(&RingRef::own(&k, s));
        now.fetch_add(10_000, Ordering::SeqCst);
        let sweep = || {
            for _ in 0..SWEEP_EVERY_AT_LEAST {
                store.reserve(&key("other"), s, &LIMITS, &WANT, Charge::Check, None);
            }
        };
        sweep();
        assert_eq!(store.rings_held(), 2);
        drop(held);
        sweep();
        assert_eq!(store.rings_held(), 1);
    }

    #[test]
    fn the_default_clock_starts_at_the_wall_clock_and_never_goes_back() {
        let wall = (system_clock())();
        let clock = monotonic_clock();
        let mut last = clock();
        // Generous bounds: a loaded machine may pause between the two readings.
        assert!(last >= wall && last - wall < 60_000, "{last} vs {wall}");
        for _ in 0..10_000 {
            let t = clock();
            assert!(t >= last);
            last = t;
        }
    }
}

//! The Redis store as the request path uses it: a circuit breaker in front of
//! [`RedisStore`], and what a node does while Redis fails (`on_store_error`).
//!
//! - **Breaker.** After [`OPEN_AFTER`] failed calls in a row (errors or timeouts) the
//!   breaker opens: store calls then fail at once, without touching Redis, so an outage
//!   does not cost each request the full deadline. A probe pings Redis every
//!   [`PROBE_EVERY`] (on a Cluster, redis-rs sends `PING` to every master); the first
//!   answer closes the breaker (back to exact decisions). One breaker per node, not per
//!   Cluster master.
//! - **Policy.** A call that fails, or meets the open breaker, is answered by the policy in
//!   force: `deny` passes the error on (503), `allow` admits and counts nothing, `local`
//!   decides on this node's in-process store with each limit divided by the number of
//!   live nodes. Nodes announce themselves in Redis every [`ANNOUNCE_EVERY`]; the last
//!   count seen is kept through an outage.
//! - **Settlements.** A reservation made locally settles locally (this node remembers its
//!   markers); a Redis reservation that cannot be settled stays counted at its reservation
//!   and expires with its bucket (the safe side).
//!
//! What is lost on the way back: usage decided locally is not carried into Redis, and
//! Redis usage from before the outage is not seen by the local stores. A window that
//! spans the outage's start or end may so hold up to the limit on each side of it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::rings::{Bound, Claim, RingRef, Verdict};
use super::{Charge, Limits, Settlement, Snapshot, StoreError, Usage};

/// Failed calls in a row that open the breaker.
pub const OPEN_AFTER: u32 = 3;
/// How often the open breaker's probe pings Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How often a node says it is alive, and learns how many are.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// A node not heard from for this long no longer counts as alive.
pub const NODE_TTL: Duration = Duration::from_secs(3);

/// What a node does while the store fails (`on_store_error`, CONTRACT §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 with an OpenAI `server_error` body and `retry-after`.
    Deny,
    /// Admit, counting nothing.
    Allow,
    /// Decide on the node's in-process store, each limit divided by the live nodes.
    Local,
}

impl OnStoreError {
    pub fn parse(word: &str) -> Option<OnStoreError> {
        match word {
            "deny" => Some(OnStoreError::Deny),
            "allow" => Some(OnStoreError::Allow),
            "local" => Some(OnStoreError::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Deny => "deny",
            OnStoreError::Allow => "allow",
            OnStoreError::Local => "local",
        }
    }
}

/// Which way a node decides now (the `llm_ratelimit_store_mode` gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every decision in Redis.
    Exact,
    /// The breaker is open; `deny` or `allow` answers.
    CircuitOpen,
    /// The breaker is open; decisions on the node's own store.
    Local,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Exact, Mode::CircuitOpen, Mode::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::CircuitOpen => "circuit_open",
            Mode::Local => "local",
        }
    }

    fn of(open: bool, policy: OnStoreError) -> Mode {
        match (open, policy) {
            (false, _) => Mode::Exact,
            (true, OnStoreError::Local) => Mode::Local,
            (true, _) => Mode::CircuitOpen,
        }
    }

    fn from_u8(n: u8) -> Mode {
        Mode::ALL[usize::from(n).min(2)]
    }
}

/// What the failover layer needs from the rest of the node: the policy in force (it
/// follows config reloads) and where to report its mode and the live node count.
#[derive(Clone)]
pub struct Hooks {
    pub policy: Arc<dyn Fn() -> OnStoreError + Send + Sync>,
    /// Called with (from, to) at each change of mode, and once with (exact, exact) at start.
    pub on_mode: Arc<dyn Fn(Mode, Mode) + Send + Sync>,
    pub on_nodes: Arc<dyn Fn(u64) + Send + Sync>,
}

struct Shared {
    redis: RedisStore,
    local: MemoryStore,
    /// Markers of reservations made on `local`, until they expire: their settlement and
    /// refund go to `local`, not Redis.
    local_markers: DashMap<(RingRef, u64), Instant>,
    failures: AtomicU32,
    open: AtomicBool,
    /// The mode last reported, as [`Mode::ALL`]'s index.
    mode: AtomicU8,
    /// Live nodes as last seen in Redis; 1 until the first announcement is answered.
    nodes: AtomicU64,
    node_id: String,
    hooks: Hooks,
}

/// [`RedisStore`] behind a circuit breaker, with a policy for when it fails.
pub struct FailoverStore {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FailoverStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A limit's share on one of `nodes` nodes: at least 1, so that a key keeps working.
fn share(limit: u64, nodes: u64) -> u64 {
    (limit / nodes.max(1)).max(1)
}

/// Each limit divided by the live node count.
pub fn shares(limits: &Limits, nodes: u64) -> Limits {
    Limits {
        requests: share(limits.requests, nodes),
        input_tokens: share(limits.input_tokens, nodes),
        output_tokens: share(limits.output_tokens, nodes),
    }
}

impl FailoverStore {
    /// Wraps `redis`; starts the probe and the announcements (on the current runtime).
    pub fn new(redis: RedisStore, node_id: &str, hooks: Hooks) -> FailoverStore {
        let shared = Arc::new(Shared {
            redis,
            local: MemoryStore::new(),
            local_markers: DashMap::new(),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            mode: AtomicU8::new(0),
            nodes: AtomicU64::new(1),
            node_id: node_id.to_string(),
            hooks,
        });
        (shared.hooks.on_mode)(Mode::Exact, Mode::Exact);
        (shared.hooks.on_nodes)(1);
        let probe = tokio::spawn(probe(Arc::downgrade(&shared)));
        let announce = tokio::spawn(announce(Arc::downgrade(&shared)));
        FailoverStore {
            shared,
            tasks: vec![probe, announce],
        }
    }

    /// The way this node decides now.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.shared.mode.load(Ordering::Relaxed))
    }

    /// Live nodes as last seen in Redis.
    pub fn nodes(&self) -> u64 {
        self.shared.nodes.load(Ordering::Relaxed)
    }

    pub(super) async fn reserve_all(
        &self,
        set: &[Bound],
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Result<Verdict, StoreError> {
        let s = &self.shared;
        let exact = s
            .guarded(s.redis.reserve_all(set, want, charge, marker))
            .await;
        let err = match exact {
            Ok(d) => return Ok(d),
            Err(e) => e,
        };
        match s.policy() {
            OnStoreError::Deny => Err(err),
            OnStoreError::Allow => Ok(Verdict::Admitted {
                snapshots: vec![Snapshot::empty(now_ms()); set.len()],
                claim: None,
            }),
            OnStoreError::Local => {
                let nodes = s.nodes.load(Ordering::Relaxed);
                let shared: Vec<Bound> = set
                    .iter()
                    .map(|b| Bound {
                        ring: b.ring.clone(),
                        limits: shares(&b.limits, nodes),
                    })
                    .collect();
                let d = s.local.reserve_all(&shared, want, charge, marker);
                if let Verdict::Admitted { claim: Some(c), .. } = &d {
                    for r in &c.rings {
                        s.local_markers.insert(
                            (r.clone(), c.id),
                            Instant::now() + Duration::from_millis(r.shape.marker_ttl_ms()),
                        );
                    }
                }
                Ok(d)
            }
        }
    }

    pub(super) async fn settle_all(
        &self,
        claim: &Claim,
        output_tokens: u64,
    ) -> Result<Vec<Settlement>, StoreError> {
        let s = &self.shared;
        // Kept until it expires: a second report of it is answered locally too (Unknown).
        let local = claim
            .rings
            .first()
            .is_some_and(|r| s.local_markers.contains_key(&(r.clone(), claim.id)));
        if local {
            return Ok(s.local.settle_all(claim, output_tokens));
        }
        // A Redis reservation that cannot be settled stays counted as reserved and
        // expires with its bucket, whatever the policy.
        s.guarded(s.redis.settle_all(claim, output_tokens)).await
    }

    pub(super) async fn usage_all(&self, rings: &[RingRef]) -> Result<Vec<Snapshot>, StoreError> {
        let s = &self.shared;
        let err = match s.guarded(s.redis.usage_all(rings)).await {
            Ok(snap) => return Ok(snap),
            Err(e) => e,
        };
        match s.policy() {
            OnStoreError::Deny => Err(err),
            OnStoreError::Allow => Ok(vec![Snapshot::empty(now_ms()); rings.len()]),
            OnStoreError::Local => Ok(s.local.usage_all(rings)),
        }
    }

    pub(super) async fn refund_all(
        &self,
        rings: &[RingRef],
        amount: &Usage,
        marker: Option<u64>,
    ) -> Result<Vec<Snapshot>, StoreError> {
        let s = &self.shared;
        if let (Some(id), Some(first)) = (marker, rings.first()) {
            if s.local_markers.contains_key(&(first.clone(), id)) {
                return Ok(s.local.refund_all(rings, amount, marker));
            }
        }
        let err = match s.guarded(s.redis.refund_all(rings, amount, marker)).await {
            Ok(snap) => return Ok(snap),
            Err(e) => e,
        };
        match (s.policy(), marker) {
            // A refund of a charge Redis holds cannot be made elsewhere: the charge stays,
            // on the safe side.
            (OnStoreError::Deny, _) | (_, Some(_)) => Err(err),
            (OnStoreError::Allow, None) => Ok(vec![Snapshot::empty(now_ms()); rings.len()]),
            (OnStoreError::Local, None) => Ok(s.local.refund_all(rings, amount, None)),
        }
    }

    pub(super) fn retain(&self, keep: impl Fn(&RingRef) -> bool) {
        self.shared.local.retain(&keep);
        self.shared.local_markers.retain(|(r, _), _| keep(r));
    }

    /// Readiness: with `allow` or `local` the node decides without Redis, so it is ready;
    /// with `deny` it is ready while Redis answers (at once not, while the breaker is open).
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        if s.policy() != OnStoreError::Deny {
            return Ok(());
        }
        if s.open.load(Ordering::Relaxed) {
            return Err(StoreError::CircuitOpen);
        }
        s.redis.ping().await
    }
}

impl Shared {
    fn policy(&self) -> OnStoreError {
        (self.hooks.policy)()
    }

    /// One store call through the breaker: refused at once while it is open; a success
    /// resets the count of failures, a failure adds to it and may open it.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if self.open.load(Ordering::Relaxed) {
            return Err(StoreError::CircuitOpen);
        }
        let r = call.await;
        match &r {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(e) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= OPEN_AFTER && !self.open.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        error = %e,
                        failures = n,
                        policy = self.policy().as_str(),
                        "store failing: circuit breaker open; calls fail fast until Redis answers"
                    );
                    self.report_mode();
                }
            }
        }
        r
    }

    fn close(&self, opened: Instant) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!(
                open_ms = opened.elapsed().as_millis() as u64,
                "Redis answers again: circuit breaker closed, decisions exact"
            );
            self.report_mode();
        }
    }

    /// Reports the mode when it changed (a transition, or a reload of the policy).
    fn report_mode(&self) {
        let mode = Mode::of(self.open.load(Ordering::Acquire), self.policy());
        let before = Mode::from_u8(self.mode.swap(mode as u8, Ordering::AcqRel));
        if before != mode {
            if mode == Mode::Local {
                tracing::warn!(
                    nodes = self.nodes.load(Ordering::Relaxed),
                    "store mode local: deciding on this node's store with each limit divided by the live nodes"
                );
            }
            tracing::info!(from = before.as_str(), to = mode.as_str(), "store mode");
            (self.hooks.on_mode)(before, mode);
        }
    }
}

fn now_ms() -> u64 {
    (super::system_clock())()
}

/// While the breaker is open, pings Redis every [`PROBE_EVERY`] and closes it at the first
/// answer. Ends when the store is dropped.
async fn probe(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut opened: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        if !s.open.load(Ordering::Acquire) {
            opened = None;
            continue;
        }
        let since = *opened.get_or_insert_with(Instant::now);
        if s.redis.ping().await.is_ok() {
            s.close(since);
            opened = None;
        } else {
            // The policy may have been reloaded meanwhile.
            s.report_mode();
        }
    }
}

/// Every [`ANNOUNCE_EVERY`] while the breaker is closed: says this node is alive and keeps
/// the live count; forgets local markers past their window.
async fn announce(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        if !s.open.load(Ordering::Acquire) {
            // Not through the breaker: a slow announcement must not open it.
            if let Ok(n) = s.redis.announce(&s.node_id, NODE_TTL).await {
                let n = n.max(1);
                if s.nodes.swap(n, Ordering::Relaxed) != n {
                    tracing::info!(nodes = n, "live nodes");
                }
                (s.hooks.on_nodes)(n);
            }
        }
        if !s.local_markers.is_empty() {
            let now = Instant::now();
            s.local_markers.retain(|_, expires| *expires > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_back_their_words() {
        for p in [OnStoreError::Deny, OnStoreError::Allow, OnStoreError::Local] {
            assert_eq!(OnStoreError::parse(p.as_str()), Some(p));
        }
        assert_eq!(OnStoreError::parse("open"), None);
    }

    #[test]
    fn shares_never_sum_above_the_limit_unless_below_one_each() {
        let limits = Limits {
            requests: 100,
            input_tokens: 10,
            output_tokens: 2,
        };
        let s = shares(&limits, 3);
        assert_eq!((s.requests, s.input_tokens, s.output_tokens), (33, 3, 1));
        assert!(s.requests * 3 <= 100 && s.input_tokens * 3 <= 10);
        // Unknown or zero node count: the node is taken to be alone.
        assert_eq!(shares(&limits, 0), limits);
        assert_eq!(shares(&limits, 1), limits);
    }

    #[test]
    fn the_mode_follows_the_breaker_and_the_policy() {
        assert_eq!(Mode::of(false, OnStoreError::Local), Mode::Exact);
        assert_eq!(Mode::of(true, OnStoreError::Local), Mode::Local);
        assert_eq!(Mode::of(true, OnStoreError::Deny), Mode::CircuitOpen);
        assert_eq!(Mode::of(true, OnStoreError::Allow), Mode::CircuitOpen);
        for m in Mode::ALL {
            assert_eq!(Mode::from_u8(m as u8), m);
        }
    }
}

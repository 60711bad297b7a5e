//! The sliding-window engine: every limit set that applies to a request (each a ring of
//! three limits), checked and reserved together in one atomic step, settled once after
//! the response. It knows nothing of HTTP, gRPC or OpenAI.
//!
//! Two stores hold the same rules: [`redis::RedisStore`] (Lua scripts in `lua/`, shared by
//! every node) and [`memory::MemoryStore`] (one process). [`Store`] picks one at start-up;
//! a node on Redis runs it behind [`failover::FailoverStore`] (circuit breaker and
//! `on_store_error`).

pub mod failover;
pub mod memory;
pub mod redis;
pub mod rings;
mod window;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use rings::{Bound, Claim, ModelMatch, RingRef, Scope, Verdict};
pub use window::WindowShape;

/// The three per-key limits, each per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limits {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// An amount in each of the three limits: what a request asks for, or what a window holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One of the three limits. Serialized (in reports) by its [`LimitKind::as_str`] name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    Requests,
    InputTokens,
    OutputTokens,
}

impl LimitKind {
    pub const ALL: [LimitKind; 3] = [
        LimitKind::Requests,
        LimitKind::InputTokens,
        LimitKind::OutputTokens,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The OpenAI error `type` and header word: `requests`, `input_tokens`, `output_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::InputTokens => "input_tokens",
            LimitKind::OutputTokens => "output_tokens",
        }
    }

    /// The limit named by [`LimitKind::as_str`]'s word.
    pub fn parse(word: &str) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|k| k.as_str() == word)
    }
}

impl Limits {
    pub fn of(&self, kind: LimitKind) -> u64 {
        self.to_array()[kind.index()]
    }

    fn to_array(self) -> [u64; 3] {
        [self.requests, self.input_tokens, self.output_tokens]
    }
}

impl Usage {
    pub fn of(&self, kind: LimitKind) -> u64 {
        [self.requests, self.input_tokens, self.output_tokens][kind.index()]
    }

    fn from_array(a: [u64; 3]) -> Usage {
        Usage {
            requests: a[0],
            input_tokens: a[1],
            output_tokens: a[2],
        }
    }

    fn to_array(self) -> [u64; 3] {
        [self.requests, self.input_tokens, self.output_tokens]
    }
}

/// A key's stable, non-secret name: used in store keys, metrics, logs and headers.
/// Limited to `[A-Za-z0-9._-]{1,64}`, so it can sit inside a Redis hash tag.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName(Arc<str>);

impl KeyName {
    /// Builds a name, or says why it is not one.
    pub fn new(name: &str) -> Result<KeyName, String> {
        if name.is_empty() || name.len() > 64 {
            return Err(format!(
                "key name must be 1 to 64 characters, got {}",
                name.len()
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "key name may contain only letters, digits, '.', '_' and '-', found {bad:?}"
            ));
        }
        Ok(KeyName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({})", self.0)
    }
}

/// A key's window as of one instant of the store's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's clock, in ms since the Unix epoch (Redis `TIME` for the Redis store).
    pub now_ms: u64,
    pub usage: Usage,
    /// Per limit, how long until the oldest usage counted in the window leaves it, so that
    /// room next grows; zero when the limit has nothing counted.
    pub reset_ms: [u64; 3],
}

impl Snapshot {
    /// A window with nothing in it.
    pub fn empty(now_ms: u64) -> Snapshot {
        Snapshot {
            now_ms,
            usage: Usage::default(),
            reset_ms: [0; 3],
        }
    }

    pub fn reset(&self, kind: LimitKind) -> Duration {
        Duration::from_millis(self.reset_ms[kind.index()])
    }
}

/// A reservation to settle after the response: names the key, its window shape and the
/// store's marker. Travels as an opaque handle (`x-llm-ratelimit-reservation`, Envoy metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub key: KeyName,
    pub shape: WindowShape,
    pub id: u64,
}

impl Reservation {
    /// `v1.<window_ms>.<precision_ms>.<id hex>.<name>`; the name goes last because it may hold dots.
    pub fn handle(&self) -> String {
        format!(
            "v1.{}.{}.{:016x}.{}",
            self.shape.window_ms(),
            self.shape.precision_ms(),
            self.id,
            self.key
        )
    }

    /// Reads a handle back; `None` for anything that is not one.
    pub fn from_handle(handle: &str) -> Option<Reservation> {
        let mut parts = handle.splitn(5, '.');
        if parts.next()? != "v1" {
            return None;
        }
        let window_ms: u64 = parts.next()?.parse().ok()?;
        let precision_ms: u64 = parts.next()?.parse().ok()?;
        let id = u64::from_str_radix(parts.next()?, 16).ok()?;
        let key = KeyName::new(parts.next()?).ok()?;
        let shape = WindowShape::new(
            Duration::from_millis(window_ms),
            Duration::from_millis(precision_ms),
        )
        .ok()?;
        Some(Reservation { key, shape, id })
    }
}

/// The engine's answer to one reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Recorded; `snapshot` includes this request.
    Admitted {
        snapshot: Snapshot,
        reservation: Option<Reservation>,
    },
    /// Nothing recorded.
    Denied {
        snapshot: Snapshot,
        /// The first limit (requests, input, output) that does not fit.
        limit: LimitKind,
        /// How long until this request would fit if nothing else arrived, from the
        /// buckets; `None` when it can never fit (it alone exceeds a limit).
        retry_after_ms: Option<u64>,
    },
}

/// Whether a reservation may be refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Admit only if every limit fits (admission).
    Check,
    /// Record whatever fits or not (accounting after the fact, e.g. Envoy's
    /// `apply_on_stream_done`); never denied.
    Force,
}

/// What settling a reservation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Its bucket now holds the real output tokens; `delta` was added to it.
    Applied { delta: i64 },
    /// Settled, but its bucket had already left the window, or its ring is not the one
    /// charged (evicted or idled and recreated since, a new epoch): nothing changed.
    Expired,
    /// Unknown: settled before (a duplicate report), or older than the window.
    Unknown,
}

/// A store that could not answer: the request gets 503 and nothing is counted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the rate-limit store failed: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("the rate-limit store gave an unexpected answer: {0}")]
    Protocol(String),
    #[error("the rate-limit store is failing: circuit breaker open")]
    CircuitOpen,
}

impl StoreError {
    /// The `kind` label of `llm_ratelimit_store_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Redis(_) => "redis",
            StoreError::Protocol(_) => "protocol",
            StoreError::CircuitOpen => "circuit_open",
        }
    }
}

/// A clock in ms since the Unix epoch; injectable so tests can drive time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// The store in use: shared Redis (many nodes) or in-process (one node).
pub enum Store {
    Memory(memory::MemoryStore),
    Redis(redis::RedisStore),
    /// Redis behind a circuit breaker, with `on_store_error` for when it fails.
    Failover(failover::FailoverStore),
}

/// The first of a store's per-ring answers (a one-ring call has exactly one).
fn first<T>(answers: Vec<T>) -> Result<T, StoreError> {
    answers
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Protocol("a store call answered for no ring".into()))
}

impl Decision {
    /// A one-ring verdict as the one-ring API answers it.
    fn from_verdict(
        verdict: Verdict,
        key: &KeyName,
        shape: WindowShape,
    ) -> Result<Decision, StoreError> {
        Ok(match verdict {
            Verdict::Admitted { snapshots, claim } => Decision::Admitted {
                snapshot: first(snapshots)?,
                reservation: claim.map(|c| Reservation {
                    key: key.clone(),
                    shape,
                    id: c.id,
                }),
            },
            Verdict::Denied {
                snapshots,
                limit,
                retry_after_ms,
                ..
            } => Decision::Denied {
                snapshot: first(snapshots)?,
                limit,
                retry_after_ms,
            },
        })
    }
}

impl Store {
    /// Checks every limit of one key's own ring and, only if all fit, records `want` in
    /// the current bucket: [`Store::reserve_all`] with that one ring.
    ///
    /// With `marker: Some(id)` the charge leaves a marker under `id` (per ring) naming its
    /// bucket, the ring's epoch and the amounts actually added; then, and only then,
    /// `Decision::Admitted.reservation` is `Some`. [`Store::settle`] corrects the output
    /// against it, and [`Store::refund`] with the same id gives back to that bucket. A
    /// marker under an id already in use replaces the older one.
    pub async fn reserve(
        &self,
        key: &KeyName,
        shape: WindowShape,
        limits: &Limits,
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let set = [Bound {
            ring: RingRef::own(key, shape),
            limits: *limits,
        }];
        let verdict = self.reserve_all(&set, want, charge, marker).await?;
        Decision::from_verdict(verdict, key, shape)
    }

    /// Checks every limit of every ring in `set` and, only if the request fits them all,
    /// records `want` in each one's current bucket: one atomic step (one script call on
    /// one Redis hash slot; the rings' locks held together in process). A denial records
    /// nothing. The rings must share one hash tag and be at most [`rings::MAX_RINGS`].
    ///
    /// With `marker: Some(id)` each ring keeps a marker under `id`, and the verdict's
    /// [`Claim`] names them for [`Store::settle_all`] and [`Store::refund_all`].
    pub async fn reserve_all(
        &self,
        set: &[Bound],
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Result<Verdict, StoreError> {
        let refs: Vec<&RingRef> = set.iter().map(|b| &b.ring).collect();
        rings::check_set(&refs).map_err(StoreError::Protocol)?;
        if charge == Charge::Check {
            let alone_too_large = set.iter().enumerate().find_map(|(i, b)| {
                LimitKind::ALL
                    .into_iter()
                    .find(|k| want.of(*k) > b.limits.of(*k))
                    .map(|k| (i, k))
            });
            if let Some((ring, limit)) = alone_too_large {
                // It can never fit: answer without touching the store's counters.
                let rings: Vec<RingRef> = set.iter().map(|b| b.ring.clone()).collect();
                return Ok(Verdict::Denied {
                    snapshots: self.usage_all(&rings).await?,
                    ring,
                    limit,
                    retry_after_ms: None,
                });
            }
        }
        match self {
            Store::Memory(s) => Ok(s.reserve_all(set, want, charge, marker)),
            Store::Redis(s) => s.reserve_all(set, want, charge, marker).await,
            Store::Failover(s) => s.reserve_all(set, want, charge, marker).await,
        }
    }

    /// Corrects a reservation's bucket to the real output tokens, at most once, and only in
    /// the ring it was charged to (same epoch) while its bucket is in the window.
    pub async fn settle(
        &self,
        reservation: &Reservation,
        output_tokens: u64,
    ) -> Result<Settlement, StoreError> {
        let claim = Claim {
            rings: vec![RingRef::own(&reservation.key, reservation.shape)],
            id: reservation.id,
        };
        first(self.settle_all(&claim, output_tokens).await?)
    }

    /// [`Store::settle`] in every ring of the claim, in one step; one answer per ring.
    pub async fn settle_all(
        &self,
        claim: &Claim,
        output_tokens: u64,
    ) -> Result<Vec<Settlement>, StoreError> {
        let refs: Vec<&RingRef> = claim.rings.iter().collect();
        rings::check_set(&refs).map_err(StoreError::Protocol)?;
        match self {
            Store::Memory(s) => Ok(s.settle_all(claim, output_tokens)),
            Store::Redis(s) => s.settle_all(claim, output_tokens).await,
            Store::Failover(s) => s.settle_all(claim, output_tokens).await,
        }
    }

    /// The key's current window.
    pub async fn usage(&self, key: &KeyName, shape: WindowShape) -> Result<Snapshot, StoreError> {
        first(self.usage_all(&[RingRef::own(key, shape)]).await?)
    }

    /// Each ring's current window.
    pub async fn usage_all(&self, rings: &[RingRef]) -> Result<Vec<Snapshot>, StoreError> {
        let refs: Vec<&RingRef> = rings.iter().collect();
        rings::check_set(&refs).map_err(StoreError::Protocol)?;
        match self {
            Store::Memory(s) => Ok(s.usage_all(rings)),
            Store::Redis(s) => s.usage_all(rings).await,
            Store::Failover(s) => s.usage_all(rings).await,
        }
    }

    /// Takes `amount` back from the key's window (Envoy's `is_negative_hits`, or a caller
    /// undoing its own charge); never below zero, never from buckets that have left it.
    ///
    /// With `marker: Some(id)` naming a live marker of this ring's epoch whose bucket is
    /// still in the window, takes `min(amount, what the marker still holds, the slot)` from
    /// that bucket alone and lowers the marker by it (deleting it at zero); a marker of
    /// another epoch, or whose bucket has left, refunds nothing. With no marker, or one that
    /// is missing (expired, used up, never written), takes from the newest buckets backwards.
    pub async fn refund(
        &self,
        key: &KeyName,
        shape: WindowShape,
        amount: &Usage,
        marker: Option<u64>,
    ) -> Result<Snapshot, StoreError> {
        first(
            self.refund_all(&[RingRef::own(key, shape)], amount, marker)
                .await?,
        )
    }

    /// [`Store::refund`] in every ring, each by its own marker under `marker`, in one step.
    pub async fn refund_all(
        &self,
        rings: &[RingRef],
        amount: &Usage,
        marker: Option<u64>,
    ) -> Result<Vec<Snapshot>, StoreError> {
        let refs: Vec<&RingRef> = rings.iter().collect();
        rings::check_set(&refs).map_err(StoreError::Protocol)?;
        match self {
            Store::Memory(s) => Ok(s.refund_all(rings, amount, marker)),
            Store::Redis(s) => s.refund_all(rings, amount, marker).await,
            Store::Failover(s) => s.refund_all(rings, amount, marker).await,
        }
    }

    /// Frees what the store holds for rings `keep` refuses; called after each applied
    /// reload with the config in force. Redis needs nothing: its rings and markers expire
    /// by themselves.
    pub fn retain(&self, keep: impl Fn(&RingRef) -> bool) {
        match self {
            Store::Memory(s) => s.retain(keep),
            Store::Redis(_) => {}
            Store::Failover(s) => s.retain(keep),
        }
    }

    /// Whether the store answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(s) => s.ping().await,
            Store::Failover(s) => s.ping().await,
        }
    }
}

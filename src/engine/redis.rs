//! The Redis store: every node runs the same Lua scripts (`lua/`, compiled in) against
//! one Redis or Redis Cluster, so a decision is one atomic script call with no
//! check-then-set race and no lock. Keys are hash-tagged by key name, so one key's ring
//! and its reservations live in one Cluster slot. Concurrent calls share one multiplexed
//! connection per node (pipelined by redis-rs); each call has a deadline.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Script, ScriptInvocation, Value};

use super::rings::{Bound, Claim, RingRef, Verdict};
use super::{
    Charge, Clock, KeyName, LimitKind, Settlement, Snapshot, StoreError, Usage, WindowShape,
};

const WINDOW_LUA: &str = include_str!("../../lua/window.lua");

/// The default deadline of one store call: a stuck Redis must not hold a request long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Scripts {
    reserve: Script,
    settle: Script,
    usage: Script,
    refund: Script,
    nodes: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_prelude = |body: &str| Script::new(&format!("{WINDOW_LUA}\n{body}"));
        Scripts {
            reserve: with_prelude(include_str!("../../lua/reserve.lua")),
            settle: with_prelude(include_str!("../../lua/settle.lua")),
            usage: with_prelude(include_str!("../../lua/usage.lua")),
            refund: with_prelude(include_str!("../../lua/refund.lua")),
            // Not a window script: no prelude.
            nodes: Script::new(include_str!("../../lua/nodes.lua")),
        }
    }
}

pub struct RedisStore {
    /// Empty until the first connection succeeds; a background task keeps trying.
    conn: Arc<ArcSwapOption<Connection>>,
    scripts: Scripts,
    timeout: Duration,
    /// Set only by tests: the scripts then take this time instead of Redis `TIME`.
    clock: Option<Clock>,
    /// For `redis+sentinel://`: asked for the master again by [`RedisStore::ping`].
    sentinels: Option<Arc<Sentinels>>,
}

/// Where a Redis URL points: one server, the seed nodes of a Cluster, or the Sentinels
/// that name a master.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Single(String),
    /// Seed node URLs, `rediss://` for `rediss+cluster://` (redis-rs takes TLS from them).
    Cluster(Vec<String>),
    Sentinel(SentinelTarget),
}

/// `redis+sentinel://[user:password@]host:port[,host:port...]/<master-name>`.
#[derive(Debug, PartialEq, Eq)]
struct SentinelTarget {
    /// Sentinel addresses as URLs (`redis://h:p` or `rediss://h:p`), no credentials.
    sentinels: Vec<String>,
    master: String,
    tls: bool,
    /// `user:password@` as given (still percent-encoded): for the master, not the Sentinels.
    auth: String,
}

/// Splits `[user:password@]hosts` at the last `@` (a password may hold one).
fn split_auth(rest: &str) -> (String, &str) {
    match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    }
}

fn hosts_of(hosts: &str) -> Vec<&str> {
    hosts.split(',').filter(|h| !h.is_empty()).collect()
}

fn target(url: &str) -> Result<Target, String> {
    for (prefix, scheme) in [
        ("redis+cluster://", "redis"),
        ("rediss+cluster://", "rediss"),
    ] {
        if let Some(rest) = url.strip_prefix(prefix) {
            let (auth, hosts) = split_auth(rest);
            let nodes: Vec<String> = hosts_of(hosts.trim_end_matches('/'))
                .into_iter()
                .map(|h| format!("{scheme}://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(format!("{prefix} needs at least one host:port"));
            }
            return Ok(Target::Cluster(nodes));
        }
    }
    for (prefix, tls) in [("redis+sentinel://", false), ("rediss+sentinel://", true)] {
        if let Some(rest) = url.strip_prefix(prefix) {
            let (auth, rest) = split_auth(rest);
            let (hosts, master) = rest.split_once('/').unwrap_or((rest, ""));
            let master = master.trim_end_matches('/');
            if master.is_empty() || master.contains('/') {
                return Err(format!(
                    "{prefix} needs the master's name after the hosts: {prefix}host:port[,host:port...]/<master-name>"
                ));
            }
            let scheme = if tls { "rediss" } else { "redis" };
            let sentinels: Vec<String> = hosts_of(hosts)
                .into_iter()
                .map(|h| format!("{scheme}://{h}"))
                .collect();
            if sentinels.is_empty() {
                return Err(format!("{prefix} needs at least one Sentinel host:port"));
            }
            return Ok(Target::Sentinel(SentinelTarget {
                sentinels,
                master: master.to_string(),
                tls,
                auth,
            }));
        }
    }
    Ok(Target::Single(url.to_string()))
}

/// The Sentinels of a `redis+sentinel://` URL, asked for the master whenever the store
/// (re)connects: after a failover the master is somewhere else.
struct Sentinels {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// The master's address last connected to.
    master: std::sync::Mutex<Option<redis::ConnectionAddr>>,
}

impl Sentinels {
    fn new(t: &SentinelTarget) -> Result<Sentinels, String> {
        use redis::IntoConnectionInfo;
        let addrs = t
            .sentinels
            .iter()
            .map(|u| {
                u.as_str()
                    .into_connection_info()
                    .map(|i| i.addr().clone())
                    .map_err(|e| format!("invalid Sentinel address: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The credentials, percent-decoded by redis-rs, from a URL made of them alone.
        let creds = format!("redis://{}127.0.0.1", t.auth)
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("invalid credentials in the Redis URL: {e}"))?;
        let mut builder = redis::sentinel::SentinelClientBuilder::new(
            addrs,
            &t.master,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|e| e.to_string())?;
        if let Some(user) = creds.redis_settings().username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = creds.redis_settings().password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if t.tls {
            builder = builder
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        }
        Ok(Sentinels {
            client: tokio::sync::Mutex::new(builder.build().map_err(|e| e.to_string())?),
            master: std::sync::Mutex::new(None),
        })
    }

    /// The master the Sentinels name now.
    async fn master(&self) -> redis::RedisResult<redis::Client> {
        self.client.lock().await.async_get_client().await
    }

    /// Whether `client` points somewhere other than the master last connected to.
    fn moved(&self, client: &redis::Client) -> bool {
        let addr = client.get_connection_info().addr();
        self.master
            .lock()
            .map_or(true, |m| m.as_ref() != Some(addr))
    }

    fn connected_to(&self, client: &redis::Client) {
        if let Ok(mut m) = self.master.lock() {
            *m = Some(client.get_connection_info().addr().clone());
        }
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

async fn open(
    target: &Target,
    sentinels: Option<&Sentinels>,
    timeout: Duration,
) -> redis::RedisResult<Connection> {
    // rediss:// uses rustls; install its ring provider once (a second install is a no-op).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match (target, sentinels) {
        (Target::Cluster(nodes), _) => {
            let client = redis::cluster::ClusterClient::builder(nodes.clone())
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(timeout)
                .build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        }
        (Target::Sentinel(_), Some(sentinels)) => {
            let client = sentinels.master().await?;
            let manager = client
                .get_connection_manager_with_config(manager_config(timeout))
                .await?;
            sentinels.connected_to(&client);
            Ok(Connection::Single(manager))
        }
        (Target::Single(url), _) | (Target::Sentinel(SentinelTarget { master: url, .. }), None) => {
            let client = redis::Client::open(url.as_str())?;
            Ok(Connection::Single(
                client
                    .get_connection_manager_with_config(manager_config(timeout))
                    .await?,
            ))
        }
    }
}

/// What a Redis server's `maxmemory-policy` means for the limiter's keys.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EvictionPolicy {
    /// `noeviction`: Redis refuses writes when full rather than drop keys; the limiter then
    /// sees store errors (and `on_store_error` decides), never silently lost counts.
    Safe,
    /// Any other policy may drop the limiter's keys under memory pressure. Every key it
    /// writes carries a TTL, so the `volatile-*` policies may evict them too. A lost ring
    /// forgets its window's usage (admitting up to a window's worth again); a lost marker
    /// forgets a reservation's settlement.
    Evicts(String),
    /// The policy could not be read (CONFIG is often disabled on managed Redis).
    Unknown(String),
}

impl EvictionPolicy {
    /// Judges the answer to `CONFIG GET maxmemory-policy`.
    pub(crate) fn judge(answer: Result<Vec<String>, String>) -> EvictionPolicy {
        match answer {
            Ok(pair) => match pair.get(1) {
                Some(p) if p.eq_ignore_ascii_case("noeviction") => EvictionPolicy::Safe,
                Some(p) => EvictionPolicy::Evicts(p.clone()),
                None => EvictionPolicy::Unknown("CONFIG GET gave no value".into()),
            },
            Err(e) => EvictionPolicy::Unknown(e),
        }
    }

    fn log(&self, node: &str) {
        match self {
            EvictionPolicy::Safe => {
                tracing::info!(
                    node,
                    "Redis maxmemory-policy is noeviction: limiter keys are never evicted"
                )
            }
            EvictionPolicy::Evicts(policy) => tracing::warn!(
                node,
                policy = policy.as_str(),
                "Redis maxmemory-policy {policy} can evict the limiter's keys (all carry a TTL); \
                 an evicted ring forgets its window's usage. Use noeviction for the limiter's Redis"
            ),
            EvictionPolicy::Unknown(why) => {
                tracing::debug!(
                    node,
                    reason = why.as_str(),
                    "could not read Redis maxmemory-policy"
                )
            }
        }
    }
}

/// Reads `maxmemory-policy` from the server (or each Cluster seed node) and logs what it
/// means for the limiter; never fails the store.
async fn check_eviction_policy(target: &Target) {
    let nodes = match target {
        Target::Single(url) => vec![url.clone()],
        Target::Cluster(nodes) => nodes.clone(),
        // The master moves; the operator checks every server of the set (docs/operations.md).
        Target::Sentinel(_) => return,
    };
    for (i, node) in nodes.iter().enumerate() {
        let answer = async {
            let client = redis::Client::open(node.as_str()).map_err(|e| e.to_string())?;
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async::<Vec<String>>(&mut con)
                .await
                .map_err(|e| e.to_string())
        };
        let answer = tokio::time::timeout(Duration::from_secs(2), answer)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        // Node addresses may carry credentials: name nodes by position only.
        EvictionPolicy::judge(answer).log(&format!("node {i}"));
    }
}

impl RedisStore {
    /// Connects in the background: the store answers `Unavailable` errors until the first
    /// connection succeeds, then redis-rs reconnects by itself. Fails at once only for a URL
    /// that can never work.
    pub fn connect(url: &str, timeout: Duration) -> Result<RedisStore, String> {
        let target = target(url)?;
        let sentinels = match &target {
            Target::Single(url) => {
                redis::Client::open(url.as_str()).map_err(|e| format!("invalid Redis URL: {e}"))?;
                None
            }
            Target::Cluster(_) => None,
            Target::Sentinel(t) => Some(Arc::new(Sentinels::new(t)?)),
        };
        let conn: Arc<ArcSwapOption<Connection>> = Arc::new(ArcSwapOption::empty());
        let (slot, target, found) = (conn.clone(), Arc::new(target), sentinels.clone());
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(50);
            loop {
                match open(&target, found.as_deref(), timeout).await {
                    Ok(c) => {
                        slot.store(Some(Arc::new(c)));
                        tracing::info!("connected to Redis");
                        check_eviction_policy(&target).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis not reachable yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        Ok(RedisStore {
            conn,
            scripts: Scripts::new(),
            timeout,
            clock: None,
            sentinels,
        })
    }

    /// Connects now, and makes every script take `clock`'s time instead of Redis `TIME`.
    /// For tests that drive time; production uses the one Redis clock.
    pub async fn connect_with_clock(
        url: &str,
        timeout: Duration,
        clock: Clock,
    ) -> Result<RedisStore, StoreError> {
        let target = target(url).map_err(StoreError::Protocol)?;
        let sentinels = match &target {
            Target::Sentinel(t) => Some(Arc::new(Sentinels::new(t).map_err(StoreError::Protocol)?)),
            _ => None,
        };
        let c = open(&target, sentinels.as_deref(), timeout).await?;
        Ok(RedisStore {
            conn: Arc::new(ArcSwapOption::new(Some(Arc::new(c)))),
            scripts: Scripts::new(),
            timeout,
            clock: Some(clock),
            sentinels,
        })
    }

    fn now_arg(&self) -> u64 {
        self.clock.as_ref().map_or(0, |c| c())
    }

    async fn call(&self, inv: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let Some(conn) = self.conn.load_full() else {
            return Err(StoreError::Protocol("not connected to Redis yet".into()));
        };
        let run = async {
            match conn.as_ref().clone() {
                Connection::Single(mut c) => inv.invoke_async::<Value>(&mut c).await,
                Connection::Cluster(mut c) => inv.invoke_async::<Value>(&mut c).await,
            }
        };
        self.deadline(run).await
    }

    /// Runs a Redis call under the store's deadline; redis-rs's own response timeout and
    /// ours read the same to callers.
    async fn deadline<T>(
        &self,
        run: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// One `reserve.lua` call over every ring of `set` (see the script for its layout).
    pub(super) async fn reserve_all(
        &self,
        set: &[Bound],
        want: &Usage,
        charge: Charge,
        marker: Option<u64>,
    ) -> Result<Verdict, StoreError> {
        let mut inv = self.scripts.reserve.prepare_invoke();
        for b in set {
            inv.key(ring_key_of(&b.ring));
        }
        inv.key(marker_key_in(
            set.first().map(|b| &b.ring),
            marker.unwrap_or(0),
        ));
        inv.arg(self.now_arg())
            .arg(set.len())
            .arg(want.requests)
            .arg(want.input_tokens)
            .arg(want.output_tokens)
            .arg(u8::from(marker.is_some()))
            .arg(u8::from(charge == Charge::Force));
        for b in set {
            let shape = b.ring.shape;
            inv.arg(shape.precision_ms())
                .arg(shape.slots())
                .arg(b.limits.requests)
                .arg(b.limits.input_tokens)
                .arg(b.limits.output_tokens)
                .arg(shape.ttl_ms())
                .arg(shape.marker_ttl_ms());
        }
        let reply = Reply::new(self.call(&inv).await?)?;
        let now = reply.int(1)?;
        if reply.int(0)? == 1 {
            // Per ring: totals ×3, tail.
            let mut snapshots = Vec::with_capacity(set.len());
            for (i, b) in set.iter().enumerate() {
                let at = 2 + 4 * i;
                let totals = [reply.int(at)?, reply.int(at + 1)?, reply.int(at + 2)?];
                let tail = reply.int(at + 3)? as i64;
                snapshots.push(Snapshot {
                    now_ms: now,
                    usage: Usage::from_array(totals),
                    reset_ms: b.ring.shape.resets_from_tail(now, tail, totals),
                });
            }
            return Ok(Verdict::Admitted {
                snapshots,
                claim: marker.map(|id| Claim {
                    rings: set.iter().map(|b| b.ring.clone()).collect(),
                    id,
                }),
            });
        }
        // The script found the answers where the rings are (see scan_window in window.lua).
        let ring = (reply.int(2)? as usize)
            .checked_sub(1)
            .filter(|r| *r < set.len())
            .ok_or_else(|| StoreError::Protocol("reserve.lua named no ring".into()))?;
        let limit = match reply.int(3)? {
            1 => LimitKind::Requests,
            2 => LimitKind::InputTokens,
            3 => LimitKind::OutputTokens,
            other => {
                return Err(StoreError::Protocol(format!(
                    "reserve.lua named limit {other}"
                )))
            }
        };
        let retry = reply.int(4)?;
        let snapshots = (0..set.len())
            .map(|i| reply.snapshot(now, 5 + 6 * i))
            .collect::<Result<_, _>>()?;
        Ok(Verdict::Denied {
            snapshots,
            ring,
            limit,
            retry_after_ms: Some(retry),
        })
    }

    pub(super) async fn settle_all(
        &self,
        claim: &Claim,
        output_tokens: u64,
    ) -> Result<Vec<Settlement>, StoreError> {
        let mut inv = self.scripts.settle.prepare_invoke();
        for r in &claim.rings {
            inv.key(ring_key_of(r));
        }
        inv.key(marker_key_in(claim.rings.first(), claim.id));
        inv.arg(self.now_arg())
            .arg(claim.rings.len())
            .arg(output_tokens);
        for r in &claim.rings {
            inv.arg(r.shape.precision_ms()).arg(r.shape.slots());
        }
        let reply = Reply::new(self.call(&inv).await?)?;
        (0..claim.rings.len())
            .map(|i| {
                Ok(match reply.int(2 * i)? {
                    1 => Settlement::Applied {
                        delta: reply.signed(2 * i + 1)?,
                    },
                    2 => Settlement::Expired,
                    _ => Settlement::Unknown,
                })
            })
            .collect()
    }

    pub(super) async fn usage_all(&self, rings: &[RingRef]) -> Result<Vec<Snapshot>, StoreError> {
        let mut inv = self.scripts.usage.prepare_invoke();
        for r in rings {
            inv.key(ring_key_of(r));
        }
        inv.arg(self.now_arg()).arg(rings.len());
        for r in rings {
            inv.arg(r.shape.precision_ms())
                .arg(r.shape.slots())
                .arg(r.shape.ttl_ms());
        }
        let reply = Reply::new(self.call(&inv).await?)?;
        let now = reply.int(0)?;
        (0..rings.len())
            .map(|i| reply.snapshot(now, 1 + 6 * i))
            .collect()
    }

    pub(super) async fn refund_all(
        &self,
        rings: &[RingRef],
        amount: &Usage,
        marker: Option<u64>,
    ) -> Result<Vec<Snapshot>, StoreError> {
        let mut inv = self.scripts.refund.prepare_invoke();
        for r in rings {
            inv.key(ring_key_of(r));
        }
        inv.key(marker_key_in(rings.first(), marker.unwrap_or(0)));
        inv.arg(self.now_arg())
            .arg(rings.len())
            .arg(amount.requests)
            .arg(amount.input_tokens)
            .arg(amount.output_tokens)
            .arg(u8::from(marker.is_some()));
        for r in rings {
            inv.arg(r.shape.precision_ms())
                .arg(r.shape.slots())
                .arg(r.shape.ttl_ms());
        }
        let reply = Reply::new(self.call(&inv).await?)?;
        let now = reply.int(0)?;
        rings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = 1 + 4 * i;
                let totals = [reply.int(at)?, reply.int(at + 1)?, reply.int(at + 2)?];
                Ok(Snapshot {
                    now_ms: now,
                    usage: Usage::from_array(totals),
                    reset_ms: r
                        .shape
                        .resets_from_tail(now, reply.int(at + 3)? as i64, totals),
                })
            })
            .collect()
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        if let Some(sentinels) = &self.sentinels {
            self.follow_master(sentinels).await?;
        }
        let Some(conn) = self.conn.load_full() else {
            return Err(StoreError::Protocol("not connected to Redis yet".into()));
        };
        let cmd = redis::cmd("PING");
        let run = async {
            match conn.as_ref().clone() {
                Connection::Single(mut c) => cmd.query_async::<Value>(&mut c).await,
                Connection::Cluster(mut c) => cmd.query_async::<Value>(&mut c).await,
            }
        };
        self.deadline(run).await.map(|_| ())
    }

    /// Asks the Sentinels which server is the master and, when it is not the one this
    /// store talks to (a failover happened), connects to it instead.
    async fn follow_master(&self, sentinels: &Sentinels) -> Result<(), StoreError> {
        let ask = async {
            let client = sentinels.master().await?;
            if !sentinels.moved(&client) && self.conn.load().is_some() {
                return Ok(());
            }
            let manager = client
                .get_connection_manager_with_config(manager_config(self.timeout))
                .await?;
            self.conn.store(Some(Arc::new(Connection::Single(manager))));
            sentinels.connected_to(&client);
            tracing::info!(
                master = %client.get_connection_info().addr(),
                "Sentinel names a new master; connected to it"
            );
            Ok::<(), redis::RedisError>(())
        };
        // Asking a Sentinel and connecting may take longer than one call's deadline.
        match tokio::time::timeout(Duration::from_secs(2), ask).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(Duration::from_secs(2))),
        }
    }

    /// Says this node is alive (`node` in the ZSET of live nodes, scored by Redis `TIME`),
    /// drops nodes silent for `ttl`, and answers how many are alive.
    pub(super) async fn announce(&self, node: &str, ttl: Duration) -> Result<u64, StoreError> {
        let mut inv = self.scripts.nodes.key(NODES_KEY);
        inv.arg(node).arg(ttl.as_millis() as u64);
        match self.call(&inv).await? {
            Value::Int(n) => Ok(n.max(0) as u64),
            other => Err(StoreError::Protocol(format!(
                "nodes.lua answered {other:?}"
            ))),
        }
    }
}

/// The ZSET of live nodes (node id → last seen, ms of Redis `TIME`); one Cluster slot.
pub const NODES_KEY: &str = "llmrl:{nodes}:alive";

/// A ring's Redis key: `llmrl:{<tag>}:v4:<scope>w<window_ms>:p<precision_ms>`. The hash tag
/// keeps every ring of one decision (a key's, its model entries', its pool's) in one slot.
/// A key's own ring under its own tag has an empty scope: the name rings had before scopes.
/// `v4` is the ring layout with the head bucket's counts in the header (`lua/window.lua`;
/// `v3` kept them in the head's slot): rings of older layouts live under other names, so
/// nodes of both versions never misread a ring.
pub fn ring_key_of(ring: &RingRef) -> String {
    format!(
        "llmrl:{{{}}}:v4:{}w{}:p{}",
        ring.tag,
        ring.scope_text(),
        ring.shape.window_ms(),
        ring.shape.precision_ms()
    )
}

/// A reservation's marker: one per reservation, under the hash tag its rings share, with
/// an entry per ring (`lua/window.lua`, `read_marker`), so settling or refunding a request
/// held to six limit sets reads and writes one key, not six. The id is the request's (say,
/// a hash of `x-request-id`). `m` rather than the per-ring markers' `r` of earlier
/// versions: a node of another version never misreads one.
pub fn marker_key(tag: &KeyName, id: u64) -> String {
    format!("llmrl:{{{tag}}}:m:{id:016x}")
}

/// The marker of a reservation over rings whose first is `first` (all share its tag).
fn marker_key_in(first: Option<&RingRef>, id: u64) -> String {
    match first {
        Some(r) => marker_key(&r.tag, id),
        None => format!("llmrl:{{none}}:m:{id:016x}"),
    }
}

/// A key's own ring (see [`ring_key_of`]).
pub fn ring_key(key: &KeyName, shape: WindowShape) -> String {
    ring_key_of(&RingRef::own(key, shape))
}

/// A script's array reply.
struct Reply(Vec<Value>);

impl Reply {
    fn new(v: Value) -> Result<Reply, StoreError> {
        match v {
            Value::Array(items) => Ok(Reply(items)),
            other => Err(StoreError::Protocol(format!(
                "expected an array, got {other:?}"
            ))),
        }
    }

    fn signed(&self, i: usize) -> Result<i64, StoreError> {
        match self.0.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(StoreError::Protocol(format!(
                "expected an integer at {i}, got {other:?}"
            ))),
        }
    }

    fn int(&self, i: usize) -> Result<u64, StoreError> {
        self.signed(i).map(|n| n.max(0) as u64)
    }

    /// A ring's totals ×3 and resets ×3 from `at` on.
    fn snapshot(&self, now_ms: u64, at: usize) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            now_ms,
            usage: Usage::from_array([self.int(at)?, self.int(at + 1)?, self.int(at + 2)?]),
            reset_ms: [self.int(at + 3)?, self.int(at + 4)?, self.int(at + 5)?],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_seed_node_and_keep_tls() {
        assert_eq!(
            target("redis://127.0.0.1:6379").unwrap(),
            Target::Single("redis://127.0.0.1:6379".into())
        );
        let cluster =
            |nodes: &[&str]| Target::Cluster(nodes.iter().map(|n| n.to_string()).collect());
        assert_eq!(
            target("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap(),
            cluster(&["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"])
        );
        assert_eq!(
            target("redis+cluster://:pw@h1:1,h2:2").unwrap(),
            cluster(&["redis://:pw@h1:1", "redis://:pw@h2:2"])
        );
        // TLS is not dropped: redis-rs takes it from the seed nodes' scheme.
        assert_eq!(
            target("rediss+cluster://u:p@h1:1,h2:2/").unwrap(),
            cluster(&["rediss://u:p@h1:1", "rediss://u:p@h2:2"])
        );
        assert!(target("redis+cluster://").is_err());
        assert!(target("rediss+cluster://").is_err());
    }

    #[test]
    fn sentinel_urls_name_the_sentinels_and_the_master() {
        assert_eq!(
            target("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster").unwrap(),
            Target::Sentinel(SentinelTarget {
                sentinels: vec![
                    "redis://10.0.0.1:26379".into(),
                    "redis://10.0.0.2:26379".into()
                ],
                master: "mymaster".into(),
                tls: false,
                auth: ":s3cret@".into(),
            })
        );
        let Target::Sentinel(t) = target("rediss+sentinel://h:1/m").unwrap() else {
            panic!("not a Sentinel target");
        };
        assert!(t.tls && t.sentinels == ["rediss://h:1"] && t.master == "m");
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel:///m",
            "redis+sentinel://h:1/m/x",
        ] {
            let err = target(bad).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
        assert!(Sentinels::new(&t).is_ok());
    }

    #[test]
    fn every_policy_but_noeviction_can_evict_the_limiters_keys() {
        let answer = |p: &str| Ok(vec!["maxmemory-policy".to_string(), p.to_string()]);
        assert_eq!(
            EvictionPolicy::judge(answer("noeviction")),
            EvictionPolicy::Safe
        );
        for p in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert_eq!(
                EvictionPolicy::judge(answer(p)),
                EvictionPolicy::Evicts(p.to_string())
            );
        }
        assert!(matches!(
            EvictionPolicy::judge(Err("ERR unknown command 'CONFIG'".into())),
            EvictionPolicy::Unknown(_)
        ));
        assert!(matches!(
            EvictionPolicy::judge(Ok(vec![])),
            EvictionPolicy::Unknown(_)
        ));
    }

    #[test]
    fn ring_keys_carry_the_hash_tag_and_shape() {
        let shape = WindowShape::new(Duration::from_secs(60), Duration::from_millis(100)).unwrap();
        let key = KeyName::new("team-a").unwrap();
        assert_eq!(ring_key(&key, shape), "llmrl:{team-a}:v4:w60000:p100");
        assert_eq!(marker_key(&key, 255), "llmrl:{team-a}:m:00000000000000ff");
    }
}

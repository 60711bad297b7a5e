//! Prometheus metrics, every series prefixed `llm_ratelimit_`. Keys appear by *name*
//! only; a secret never reaches a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub key: String,
    /// `admitted`, or the limit that denied: `requests`, `input_tokens`, `output_tokens`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `unauthorized`, `invalid_request`, `body_too_large`, `unknown_endpoint`,
    /// `unknown_limit`, `store_unavailable`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub key: String,
    /// `input`, `output_reserved`, `output_settled`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `ext_authz`, `ratelimit`, `ext_proc`, `http_check`, `http_report`, `http_usage`.
    pub surface: &'static str,
    /// `queue_full`, `waited`, `timeout`, `streams` (see `pressure::Shed`).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// `exact`, `circuit_open`, `local` (see `engine::failover::Mode`).
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// `open` or `closed`.
    pub to: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub rejections: Family<RejectLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub settlements: Family<OutcomeLabels, Counter>,
    pub config_reloads: Family<OutcomeLabels, Counter>,
    pub config_keys: Gauge,
    pub store_seconds: Histogram,
    pub shed: Family<ShedLabels, Counter>,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub settlement_streams: Gauge,
    pub store_mode: Family<ModeLabels, Gauge>,
    pub store_breaker: Family<BreakerLabels, Counter>,
    pub store_nodes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("llm_ratelimit");
        let m = Metrics {
            decisions: Family::default(),
            rejections: Family::default(),
            tokens: Family::default(),
            settlements: Family::default(),
            config_reloads: Family::default(),
            config_keys: Gauge::default(),
            store_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 14)),
            shed: Family::default(),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            settlement_streams: Gauge::default(),
            store_mode: Family::default(),
            store_breaker: Family::default(),
            store_nodes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "decisions",
            "Admission decisions by key and outcome",
            m.decisions.clone(),
        );
        registry.register(
            "rejections",
            "Requests answered before a decision (401, 400, 413, 503)",
            m.rejections.clone(),
        );
        registry.register(
            "tokens",
            "Tokens counted by key: input, output reserved, output settled",
            m.tokens.clone(),
        );
        registry.register(
            "settlements",
            "Reservation settlements by outcome",
            m.settlements.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by outcome (applied, rejected)",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_keys",
            "Keys in the config in force",
            m.config_keys.clone(),
        );
        registry.register(
            "store_call_seconds",
            "Latency of one store call",
            m.store_seconds.clone(),
        );
        registry.register(
            "shed",
            "Requests and ext_proc streams refused because the node was at capacity, by surface and reason",
            m.shed.clone(),
        );
        registry.register(
            "in_flight",
            "Admission requests running (gRPC and HTTP, behind the back-pressure gate)",
            m.in_flight.clone(),
        );
        registry.register(
            "queued",
            "Admission requests waiting for a running slot",
            m.queued.clone(),
        );
        registry.register(
            "settlement_streams",
            "ext_proc streams open",
            m.settlement_streams.clone(),
        );
        registry.register(
            "store_mode",
            "How the node decides: 1 for the mode in force (exact, circuit_open, local), else 0",
            m.store_mode.clone(),
        );
        registry.register(
            "store_breaker_transitions",
            "Circuit breaker transitions in front of the store, by the state entered",
            m.store_breaker.clone(),
        );
        registry.register(
            "store_nodes",
            "Live nodes as last seen in Redis (divides each limit under on_store_error: local)",
            m.store_nodes.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn shed(&self, surface: &'static str, reason: &'static str) {
        self.shed
            .get_or_create(&ShedLabels { surface, reason })
            .inc();
    }

    /// The store's mode changed from `from` to `to` (both among `modes`).
    pub fn store_mode(&self, modes: &[&'static str], from: &'static str, to: &'static str) {
        for mode in modes {
            self.store_mode
                .get_or_create(&ModeLabels { mode })
                .set(i64::from(*mode == to));
        }
        let breaker = match (from == "exact", to == "exact") {
            (true, false) => "open",
            (false, true) => "closed",
            _ => return,
        };
        self.store_breaker
            .get_or_create(&BreakerLabels { to: breaker })
            .inc();
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectLabels { reason })
            .inc();
    }
}

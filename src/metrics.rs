//! Prometheus metrics, every series prefixed `llm_ratelimit_`. Keys appear by *name*
//! only; a secret never reaches a label. docs/observability.md says what each series means.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub key: String,
    /// `admitted`, or the limit that denied: `requests`, `input_tokens`, `output_tokens`.
    pub outcome: &'static str,
    /// `all` when admitted (every limit had room), else the limit set that denied
    /// (`LimitScope::metric_scope`: `window`, `per_day`, `model:<match>`, `pool:<name>`,
    /// `pool_per_day:<name>`).
    pub scope: String,
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
pub struct StoreErrorLabels {
    /// `timeout`, `redis`, `protocol`, `circuit_open` (see `engine::StoreError::kind`).
    pub kind: &'static str,
}

/// One limit of one key. More limits per key (per model, per day, pools) add labels
/// beside these rather than new series names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabels {
    pub key: String,
    /// `requests`, `input_tokens`, `output_tokens`.
    pub limit: &'static str,
    /// Which of the key's limit sets (`LimitScope::metric_scope`): `window` for its own
    /// per-window limits, `per_day`, `model:<match>`, `pool:<name>`, `pool_per_day:<name>`.
    pub scope: String,
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
    pub store_errors: Family<StoreErrorLabels, Counter>,
    pub reservations: Counter,
    pub window_used: Family<WindowLabels, Gauge>,
    pub window_limit: Family<WindowLabels, Gauge>,
    pub window_utilization: Family<WindowLabels, Gauge<f64, AtomicU64>>,
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
            store_errors: Family::default(),
            reservations: Counter::default(),
            window_used: Family::default(),
            window_limit: Family::default(),
            window_utilization: Family::default(),
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
            "Latency of one store call (admission, ShouldRateLimit charge, settlement)",
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
            "store_errors",
            "Store calls that failed, by kind (timeout, redis, protocol, circuit_open)",
            m.store_errors.clone(),
        );
        registry.register(
            "reservations",
            "Output reservations opened by admission, to be settled after the response",
            m.reservations.clone(),
        );
        registry.register(
            "window_used",
            "What each key's sliding window holds now, per limit (read at scrape time)",
            m.window_used.clone(),
        );
        registry.register(
            "window_limit",
            "Each key's configured limit per window",
            m.window_limit.clone(),
        );
        registry.register(
            "window_utilization_ratio",
            "Fraction of each key's limit its sliding window holds now (used / limit; can pass 1 after forced charges)",
            m.window_utilization.clone(),
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
        m.start_at_zero();
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Every series whose labels are known ahead starts at 0, so the family is on the
    /// first scrape and `rate()` / `increase()` see the first event.
    fn start_at_zero(&self) {
        for reason in [
            "unauthorized",
            "invalid_request",
            "body_too_large",
            "unknown_endpoint",
            "unknown_limit",
            "store_unavailable",
        ] {
            let _ = self.rejections.get_or_create(&RejectLabels { reason });
        }
        for kind in ["timeout", "redis", "protocol", "circuit_open"] {
            let _ = self.store_errors.get_or_create(&StoreErrorLabels { kind });
        }
        for outcome in ["applied", "expired", "unknown", "no_usage"] {
            let _ = self.settlements.get_or_create(&OutcomeLabels { outcome });
        }
        for to in ["open", "closed"] {
            let _ = self.store_breaker.get_or_create(&BreakerLabels { to });
        }
        for outcome in ["applied", "rejected"] {
            let _ = self
                .config_reloads
                .get_or_create(&OutcomeLabels { outcome });
        }
        for surface in [
            "ext_authz",
            "ratelimit",
            "http_check",
            "http_report",
            "http_usage",
        ] {
            for reason in ["queue_full", "waited", "timeout"] {
                let _ = self.shed.get_or_create(&ShedLabels { surface, reason });
            }
        }
        let _ = self.shed.get_or_create(&ShedLabels {
            surface: "ext_proc",
            reason: "streams",
        });
    }

    /// The Prometheus text exposition (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        prometheus_text(&out)
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

/// prometheus-client writes OpenMetrics: a counter's `# HELP` / `# TYPE` name the family
/// (`x`) while its sample is `x_total`, and the text ends in `# EOF`. Served as the
/// Prometheus text format that is wrong (`promtool check metrics`: "x_total no help
/// text"), so the family lines of counters take the sample's name and `# EOF` goes.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(name)
                .then(|| (p, name, &rest[name.len()..]))
        });
        match family {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_described_under_their_sample_name() {
        let m = Metrics::default();
        m.reservations.inc();
        m.config_keys.set(2);
        let text = m.render();
        assert!(text.contains("# HELP llm_ratelimit_reservations_total Output"));
        assert!(text.contains("# TYPE llm_ratelimit_reservations_total counter\n"));
        assert!(text.contains("\nllm_ratelimit_reservations_total 1\n"));
        // Gauges keep their own name; the OpenMetrics end marker is gone.
        assert!(text.contains("# TYPE llm_ratelimit_config_keys gauge\n"));
        assert!(!text.contains("# EOF"));
    }
}

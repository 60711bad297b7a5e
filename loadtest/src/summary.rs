//! The run in numbers: throughput, latency percentiles from an HDR histogram, and
//! 2xx / 429 / other counts per target and per key — computed once from the records,
//! then printed as a table (stdout) and written as JSON (`--json`), so the two always agree.
//!
//! Latency is `done - intended` (in open loop it includes any wait for the slot's turn)
//! over the requests that got an answer; requests with no answer (connection errors,
//! timeouts) are counted as errors but kept out of the percentiles. Keys appear by label
//! (config name, or `key-N`), never by secret.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{Mode, Pace, Settings};
use crate::drive::Finished;
use crate::record::{LimitKind, Outcome};

#[derive(Serialize)]
pub struct Summary {
    pub mode: &'static str,
    /// gRPC: `authz` or `ratelimit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<&'static str>,
    pub endpoint: &'static str,
    pub model: String,
    pub stream: bool,
    /// `closed` (`--concurrency`) or `open` (`--rate`).
    #[serde(rename = "loop")]
    pub pace: &'static str,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub max_in_flight: Option<usize>,
    pub duration_s: f64,
    /// How long requests were really sent (shorter after Ctrl-C).
    pub sent_for_s: f64,
    pub threads: usize,
    pub workers: usize,
    pub prompt_tokens: PromptRange,
    pub max_tokens: Option<u32>,
    /// `grpc --settle-output`: output tokens each admission was settled to.
    pub settle_output: Option<u32>,
    pub requests: Counts,
    /// Open loop: slots that found no free worker before the end.
    pub unsent: u64,
    pub throughput_rps: f64,
    pub ok_rps: f64,
    pub latency_ms: Percentiles,
    /// `sent - intended`: how late the tool itself sent (open loop: behind schedule).
    pub send_lag_ms: Percentiles,
    /// Count per HTTP status (`0`: no answer).
    pub status_codes: BTreeMap<u16, u64>,
    /// 429s by the limit they named.
    pub denied_by: BTreeMap<&'static str, u64>,
    pub tokens: Tokens,
    pub targets: Vec<Labelled>,
    pub keys: Vec<Labelled>,
    /// With `--verify`: the replay's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<serde_json::Value>,
}

#[derive(Serialize)]
pub struct PromptRange {
    pub min: u32,
    pub max: u32,
}

#[derive(Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub total: u64,
    pub ok: u64,
    pub rate_limited: u64,
    /// Any other status, and requests without an answer.
    pub errors: u64,
}

impl Counts {
    fn add(&mut self, outcome: Outcome) {
        self.total += 1;
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::RateLimited => self.rate_limited += 1,
            Outcome::Other => self.errors += 1,
        }
    }
}

#[derive(Serialize)]
pub struct Labelled {
    pub name: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        }
    }
}

#[derive(Default, Serialize)]
pub struct Tokens {
    /// Sum over admitted (2xx) requests.
    pub prompt: u64,
    pub completion: u64,
}

/// Microsecond histogram up to an hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

impl Summary {
    pub fn new(
        settings: &Settings,
        finished: &Finished,
        targets: &[String],
        keys: &[String],
    ) -> Summary {
        let mut latency = histogram();
        let mut lag = histogram();
        let mut requests = Counts::default();
        let mut per_target = vec![Counts::default(); targets.len()];
        let mut per_key = vec![Counts::default(); keys.len()];
        let mut status_codes = BTreeMap::new();
        let mut denied_by = BTreeMap::new();
        let mut tokens = Tokens::default();
        for r in &finished.records {
            requests.add(r.outcome);
            if let Some(c) = per_target.get_mut(usize::from(r.target)) {
                c.add(r.outcome);
            }
            if let Some(c) = per_key.get_mut(usize::from(r.key)) {
                c.add(r.outcome);
            }
            *status_codes.entry(r.status).or_insert(0) += 1;
            if let Some(kind) = r.denied_by {
                *denied_by.entry(kind.as_str()).or_insert(0) += 1;
            }
            if r.outcome == Outcome::Ok {
                tokens.prompt += u64::from(r.prompt_tokens);
                tokens.completion += u64::from(r.completion_tokens);
            }
            if r.status != 0 {
                latency.saturating_record(r.latency_us().max(1));
            }
            lag.saturating_record(r.sent_us.saturating_sub(r.intended_us).max(1));
        }
        let seconds = finished.sending.as_secs_f64().max(1e-6);
        let (pace, concurrency, rate, max_in_flight) = match settings.pace {
            Pace::Closed { concurrency } => ("closed", Some(concurrency), None, None),
            Pace::Open {
                rate,
                max_in_flight,
            } => ("open", None, Some(rate), Some(max_in_flight)),
        };
        let labelled = |names: &[String], counts: Vec<Counts>| {
            names
                .iter()
                .zip(counts)
                .map(|(name, counts)| Labelled {
                    name: name.clone(),
                    counts,
                })
                .collect()
        };
        Summary {
            mode: match settings.mode {
                Mode::Http => "http",
                Mode::Grpc { .. } => "grpc",
            },
            api: match settings.mode {
                Mode::Http => None,
                Mode::Grpc { api, .. } => Some(api.as_str()),
            },
            endpoint: settings.endpoint.as_str(),
            model: settings.models.join(","),
            stream: settings.stream,
            pace,
            concurrency,
            rate,
            max_in_flight,
            duration_s: settings.duration.as_secs_f64(),
            sent_for_s: seconds,
            threads: settings.threads,
            workers: finished.workers,
            prompt_tokens: PromptRange {
                min: settings.prompt_tokens.min,
                max: settings.prompt_tokens.max,
            },
            max_tokens: settings.max_tokens,
            settle_output: match settings.mode {
                Mode::Http => None,
                Mode::Grpc { settle_output, .. } => settle_output,
            },
            requests,
            unsent: finished.unsent,
            throughput_rps: round1(requests.total as f64 / seconds),
            ok_rps: round1(requests.ok as f64 / seconds),
            latency_ms: Percentiles::of(&latency),
            send_lag_ms: Percentiles::of(&lag),
            status_codes,
            denied_by,
            tokens,
            targets: labelled(targets, per_target),
            keys: labelled(keys, per_key),
            verify: None,
        }
    }

    /// The table for stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let how = match (self.concurrency, self.rate) {
            (Some(c), _) => format!("closed loop, {c} in flight"),
            (_, Some(r)) => format!("open loop, {r} req/s"),
            _ => String::new(),
        };
        let api = self.api.map(|a| format!(" {a}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "llm-loadtest {}{api}: {} {}, {how}, {:.1}s, {} threads, {} workers",
            self.mode, self.endpoint, self.model, self.sent_for_s, self.threads, self.workers
        );
        let r = &self.requests;
        let _ = writeln!(
            out,
            "requests    {:>10}   {:>10.1} req/s   2xx {}   429 {}   other {}",
            r.total, self.throughput_rps, r.ok, r.rate_limited, r.errors
        );
        if self.unsent > 0 {
            let _ = writeln!(
                out,
                "unsent      {:>10}   scheduled slots that found every connection busy until the end",
                self.unsent
            );
        }
        let row = |name: &str, p: &Percentiles| {
            format!(
                "{name:<11} p50 {:.3}   p90 {:.3}   p99 {:.3}   p99.9 {:.3}   max {:.3}\n",
                p.p50, p.p90, p.p99, p.p999, p.max
            )
        };
        let answered = r.total - self.status_codes.get(&0).copied().unwrap_or(0);
        if answered == 0 {
            out.push_str("latency ms  no answers\n");
        } else {
            out.push_str(&row("latency ms", &self.latency_ms));
        }
        if self.rate.is_some() {
            out.push_str(&row("send lag ms", &self.send_lag_ms));
        }
        let statuses: Vec<String> = self
            .status_codes
            .iter()
            .map(|(s, n)| match s {
                0 => format!("no answer {n}"),
                s => format!("{s} {n}"),
            })
            .collect();
        let _ = writeln!(out, "statuses    {}", statuses.join("   "));
        if !self.denied_by.is_empty() {
            let denied: Vec<String> = LimitKind::ALL
                .iter()
                .filter_map(|k| {
                    self.denied_by
                        .get(k.as_str())
                        .map(|n| format!("{} {n}", k.as_str()))
                })
                .collect();
            let _ = writeln!(out, "429 by      {}", denied.join("   "));
        }
        for (title, rows) in [("target", &self.targets), ("key", &self.keys)] {
            let width = rows
                .iter()
                .map(|l| l.name.len())
                .max()
                .unwrap_or(0)
                .max(title.len());
            let _ = writeln!(
                out,
                "\n{title:<width$}  {:>10} {:>10} {:>8} {:>8}",
                "total", "2xx", "429", "other"
            );
            for l in rows {
                let c = &l.counts;
                let _ = writeln!(
                    out,
                    "{:<width$}  {:>10} {:>10} {:>8} {:>8}",
                    l.name, c.total, c.ok, c.rate_limited, c.errors
                );
            }
        }
        out
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Labels for the keys: config names when known, else `key-1`, `key-2`, ...
pub fn key_labels(count: usize, names: Option<Vec<String>>) -> Vec<String> {
    names.unwrap_or_else(|| (1..=count).map(|i| format!("key-{i}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_ms() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 500.0).abs() < 1.0, "{}", p.p50);
        assert!((p.p99 - 990.0).abs() < 1.0, "{}", p.p99);
        assert!((p.max - 1000.0).abs() < 1.0, "{}", p.max);
    }
}

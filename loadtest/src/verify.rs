//! `--verify CONFIG`: the limiter's accuracy measured from outside, from the records alone.
//!
//! The tool cannot see when the limiter decided a request, only that it decided at some
//! instant `a` between the request's send (`sent_us`) and its last response byte
//! (`done_us`). It cannot see settlement either, only that it happened by `done_us`. So
//! every figure here is computed for *all* decision instants the records allow, and a
//! finding is reported only when it holds for every one of them: what this module calls
//! an error, the limiter certainly made, and made at least that large.
//!
//! # What counts
//!
//! An admitted request (2xx) adds 1 request, `prompt_tokens` input tokens and its output
//! reservation (`max_tokens`, or the config's `default_max_output_tokens` when the record
//! says 0) at `a`, corrected to `completion_tokens` at settlement. An answer that is
//! neither 2xx nor 429 (an upstream 5xx, a timeout) may have been admitted before it failed:
//! it never proves anything, but it is counted wherever an *upper* bound is needed. A 429
//! counts nothing. A token count of 0 means "unknown" (`record.rs`): an unknown output is
//! taken as the reservation wherever an upper bound is needed and as 0 for a lower one.
//!
//! # Over-admission
//!
//! The limiter promises that no window of length `W` ever holds more than the limit.
//! Per key and limit, over windows `[s, s + W)`:
//! - **definite** usage counts the 2xx requests whose whole interval `[sent, done]` lies in
//!   the window, each with the least it ever held there (`min(reservation, output)`): all
//!   of them were certainly decided inside the window;
//! - **possible** usage counts every request that may have been counted (2xx and unknown
//!   answers) whose interval meets the window, with the most it ever held there;
//! - **estimate** places each 2xx request at the midpoint of its interval with its settled
//!   amounts: what the window most likely held; it is also the `series` drawn by `--html`.
//!
//! `definite ≤ estimate ≤ possible`, and the true peak lies between the first and the
//! last. If some set of admitted requests holds more than the limit and spans (first send
//! to last receive) only `W − e`, the limiter certainly admitted it within a window of
//! `W − e`: it behaved like a window at least `e` ms too short; `e` is the
//! **over-admission error**, the largest over all such sets. It is found exactly by one
//! sweep over the sends from last to first with a Fenwick tree over the receive instants
//! (O(n log n)), not by stepping through time.
//!
//! # False 429s
//!
//! A 429 naming limit `k` (`denied_by`; none named = "any of the three") was decided at
//! some `a ∈ [sent, done]` over a window `(a − W, a]`. Every request that may have been
//! counted there sent before `done` and received after `sent − W`; their sum, each with
//! the most it could have held at that moment (its reservation if it might not have been
//! settled by then, i.e. it received after this `sent`), is an upper bound of the window's
//! content at every possible `a`. If that bound plus what the 429 asked for (1 request, its
//! prompt tokens, its reservation) still fits the limit, the window certainly had room:
//! a **false 429**. Its error is how much further back the window would have had to reach
//! for the denial to be justified: the smallest `e` for which the bound over
//! `(sent − W − e, done]` no longer fits; "unbounded" when even the whole run before it does
//! not fill the limit. A 429 naming no limit is false only if all three limits had room,
//! and its error is the smallest of the three.
//!
//! # What passes
//!
//! The bucketed window counts between `W` and `W + p` (`docs/design.md`): it never
//! over-admits, and may refuse up to one bucket `p` early. Both errors above are lower
//! bounds, so [`Report::passed`] is: no over-admission error above `p` and no false 429 with
//! an error above `p` (an unbounded one fails). The margin `p` for over-admission, where the
//! design promises 0, absorbs the drift between the limiter's clock (Redis `TIME`) and the
//! tool's over a run. The other side of honesty: a limiter off by less than about the
//! send-to-receive time can go unseen, so the report states that time (p50/p99/max).
//!
//! All targets are taken to share one limiter (one Redis): records are pooled per key.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use llm_ratelimit::config::Config;
use serde::{Serialize, Serializer};

use crate::record::{LimitKind, LimitSet, Outcome, Record, UsageSeries};

/// One amount per limit, in the order of [`LimitKind::ALL`].
type Amounts = [u64; 3];

const OUTPUT: usize = 2;

/// The limits `--verify` checks the records against, read from the limiter's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audit {
    pub window_ms: u64,
    pub precision_ms: u64,
    /// The output reservation of a request that sends no `max_tokens`.
    pub default_max_output_tokens: u64,
    /// Each `--key`'s config name, in the same order.
    pub key_names: Vec<String>,
    /// Every limit the run's requests were held to: each key's own per window, its
    /// `per_day`, each `models` entry a `--model` matches, its pool's (per window and per
    /// day).
    pub keys: Vec<AuditKey>,
}

/// One set of three limits, by config name (never a secret), and the requests it counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditKey {
    /// `team-a`, `team-a per_day`, `team-a model gpt-4o`, `pool research`, ...
    pub name: String,
    /// In the order of [`LimitKind::ALL`]; [`Config::UNLIMITED`] for one left out.
    pub limits: [u64; 3],
    pub window_ms: u64,
    pub precision_ms: u64,
    /// The `--key`s (indexes) whose requests count here, each with the `--model`s
    /// (indexes) that do, `None` for every model.
    pub members: Vec<(u16, Option<Vec<u16>>)>,
    /// The 429s that are this limit's: those whose message names this kind of limit.
    pub scope: LimitSet,
}

impl AuditKey {
    /// A key's own limits per window, counting every request of `--key` number `key`.
    pub fn own(
        name: &str,
        limits: [u64; 3],
        key: u16,
        window_ms: u64,
        precision_ms: u64,
    ) -> AuditKey {
        AuditKey {
            name: name.to_owned(),
            limits,
            window_ms,
            precision_ms,
            members: vec![(key, None)],
            scope: LimitSet::Key,
        }
    }

    /// Whether record `r` counts against this limit.
    fn counts(&self, r: &Record) -> bool {
        self.members
            .iter()
            .any(|(k, models)| *k == r.key && models.as_ref().is_none_or(|m| m.contains(&r.model)))
    }

    /// Whether 429 `r` is this limit's denial.
    fn denied(&self, r: &Record) -> bool {
        self.counts(r) && r.denied_in.unwrap_or(LimitSet::Key) == self.scope
    }
}

fn limits_of(l: &llm_ratelimit::engine::Limits) -> [u64; 3] {
    [l.requests, l.input_tokens, l.output_tokens]
}

impl Audit {
    /// Reads the limiter's config with the limiter's own parser and finds each secret's
    /// key, and every limit its requests for `models` are held to. An unknown secret is an
    /// error naming its position, never the secret.
    pub fn load(config: &Path, secrets: &[String], models: &[String]) -> anyhow::Result<Audit> {
        let parsed = Config::load(config).context("--verify")?;
        let (window_ms, precision_ms) = (
            duration_ms(parsed.window()),
            duration_ms(parsed.precision()),
        );
        let day = parsed.day_shape();
        let (day_ms, day_precision_ms) = (day.window_ms(), day.precision_ms());
        let mut specs = Vec::with_capacity(secrets.len());
        for (i, secret) in secrets.iter().enumerate() {
            let Some(spec) = parsed.key_by_secret(secret) else {
                bail!(
                    "--verify: the {} --key is not a key of {}",
                    ordinal(i + 1),
                    config.display()
                );
            };
            specs.push(spec);
        }
        let key_names: Vec<String> = specs.iter().map(|s| s.name.to_string()).collect();
        // The --key indexes of one key (a secret may be given twice).
        let of = |name: &str| -> Vec<u16> {
            (0..specs.len() as u16)
                .filter(|&i| key_names[usize::from(i)] == name)
                .collect()
        };
        let mut keys: Vec<AuditKey> = Vec::new();
        let mut pools: Vec<String> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.name.as_str();
            if key_names[..i].iter().any(|n| n == name) {
                continue;
            }
            let idx = of(name);
            let every = |models: Option<Vec<u16>>| -> Vec<(u16, Option<Vec<u16>>)> {
                idx.iter().map(|&i| (i, models.clone())).collect()
            };
            keys.push(AuditKey {
                members: every(None),
                ..AuditKey::own(name, limits_of(&spec.limits), 0, window_ms, precision_ms)
            });
            if let Some(d) = spec.per_day {
                keys.push(AuditKey {
                    name: format!("{name} per_day"),
                    limits: limits_of(&d),
                    window_ms: day_ms,
                    precision_ms: day_precision_ms,
                    members: every(None),
                    scope: LimitSet::KeyDay,
                });
            }
            for entry in &spec.models {
                let matched: Vec<u16> = models
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| spec.model_entry(m) == Some(entry))
                    .map(|(j, _)| j as u16)
                    .collect();
                if matched.is_empty() {
                    continue;
                }
                keys.push(AuditKey {
                    name: format!("{name} model {}", entry.matches),
                    limits: limits_of(&entry.limits),
                    window_ms,
                    precision_ms,
                    members: every(Some(matched)),
                    scope: LimitSet::Model,
                });
            }
            if let Some(pool) = &spec.pool {
                if !pools.iter().any(|p| p == pool.as_str()) {
                    pools.push(pool.to_string());
                }
            }
        }
        for pool_name in pools {
            let Some(pool) = parsed.pool_by_name(&pool_name) else {
                continue;
            };
            let members: Vec<(u16, Option<Vec<u16>>)> = specs
                .iter()
                .enumerate()
                .filter(|(_, k)| k.pool.as_ref() == Some(&pool.name))
                .map(|(i, _)| (i as u16, None))
                .collect();
            if let Some(l) = pool.limits {
                keys.push(AuditKey {
                    name: format!("pool {pool_name}"),
                    limits: limits_of(&l),
                    window_ms,
                    precision_ms,
                    members: members.clone(),
                    scope: LimitSet::Pool,
                });
            }
            if let Some(d) = pool.per_day {
                keys.push(AuditKey {
                    name: format!("pool {pool_name} per_day"),
                    limits: limits_of(&d),
                    window_ms: day_ms,
                    precision_ms: day_precision_ms,
                    members,
                    scope: LimitSet::PoolDay,
                });
            }
        }
        Ok(Audit {
            window_ms,
            precision_ms,
            default_max_output_tokens: parsed.default_max_output_tokens(),
            key_names,
            keys,
        })
    }

    /// Replays the records against every limit. A record counts against each limit whose
    /// members include its key (and model); one that counts nowhere (a key index beyond
    /// the audit's) is left out and counted in `Report::ignored`. A 429 is the denial of
    /// the limits its message names (a key's own when it names none).
    pub fn replay(&self, records: &[Record]) -> Report {
        let run_end = records.iter().map(|r| r.done_us).max().unwrap_or(0) as i64;
        let mut counted: Vec<Vec<Counted>> = vec![Vec::new(); self.keys.len()];
        let mut denied: Vec<Vec<Denial>> = vec![Vec::new(); self.keys.len()];
        let (mut ignored, mut unknown, mut admitted, mut refused) = (0u64, 0u64, 0u64, 0u64);
        let mut network = Vec::new();
        for r in records {
            if !self.keys.iter().any(|k| k.counts(r)) {
                ignored += 1;
                continue;
            }
            let reserved = if r.max_tokens == 0 {
                self.default_max_output_tokens
            } else {
                u64::from(r.max_tokens)
            };
            // Everything is done in µs, signed, so `sent − W` needs no care at the run's start.
            let sent = r.sent_us as i64;
            // A clock can't go backwards within the tool, but a record must not break the sweep.
            let done = (r.done_us as i64).max(sent);
            match r.outcome {
                Outcome::RateLimited => refused += 1,
                Outcome::Ok => {
                    admitted += 1;
                    network.push((done - sent) as u64);
                }
                Outcome::Other => unknown += 1,
            }
            for (k, key) in self.keys.iter().enumerate() {
                match r.outcome {
                    Outcome::RateLimited if key.denied(r) => denied[k].push(Denial {
                        sent,
                        done,
                        want: [1, u64::from(r.prompt_tokens), reserved],
                        named: r.denied_by.map(limit_index),
                    }),
                    Outcome::RateLimited => {}
                    outcome if key.counts(r) => {
                        let ok = outcome == Outcome::Ok;
                        counted[k].push(Counted::new(sent, done, ok, r, reserved));
                    }
                    _ => {}
                }
            }
        }

        let network = Spread::of(network);
        let run_precision = self.precision_ms.min(1 << 40) as i64 * 1000;
        let step = run_precision.max(run_end / 600).max(1);
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut series = Vec::with_capacity(self.keys.len() * 3);
        for ((key, counted), denied) in self.keys.iter().zip(&counted).zip(&denied) {
            let window = key.window_ms.clamp(1, 1 << 40) as i64 * 1000;
            let (report, key_series) = audit_key(key, counted, denied, window, run_end, step);
            keys.push(report);
            // A limit left out (unlimited) has no line worth drawing.
            series.extend(
                key_series
                    .into_iter()
                    .filter(|s| s.limit_value < Config::UNLIMITED),
            );
        }
        let passed = self.keys.iter().zip(&keys).all(|(audit, k)| {
            let precision = audit.precision_ms.min(1 << 40) as i64 * 1000;
            let within = |e: &Option<WindowError>| match e {
                None => true,
                Some(WindowError::Us(us)) => *us <= precision,
                Some(WindowError::Unbounded) => false,
            };
            within(&k.unnamed_denials.error_max)
                && k.limits.iter().all(|l| {
                    l.over_admission
                        .as_ref()
                        .is_none_or(|o| o.error_us <= precision)
                        && within(&l.denials.error_max)
                })
        });
        Report {
            window_ms: self.window_ms,
            precision_ms: self.precision_ms,
            passed,
            admitted,
            denied: refused,
            unknown,
            ignored,
            network,
            keys,
            series,
        }
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn limit_index(kind: LimitKind) -> usize {
    match kind {
        LimitKind::Requests => 0,
        LimitKind::InputTokens => 1,
        LimitKind::OutputTokens => 2,
    }
}

/// A request the limiter may have counted (a 2xx, or an answer that proves nothing), with
/// the bounds of what it held in the window.
#[derive(Clone, Debug)]
struct Counted {
    sent: i64,
    done: i64,
    /// A 2xx: certainly admitted.
    admitted: bool,
    /// The least it held at any instant after its decision.
    least: Amounts,
    /// What it held once settled, as the limiter most likely saw it.
    settled: Amounts,
    /// The most it could hold once settled.
    most_settled: Amounts,
    /// The most it could hold at any instant, settled or not.
    most: Amounts,
}

impl Counted {
    fn new(sent: i64, done: i64, admitted: bool, r: &Record, reserved: u64) -> Counted {
        let input = u64::from(r.prompt_tokens);
        let output = (r.completion_tokens > 0).then_some(u64::from(r.completion_tokens));
        let larger = reserved.max(output.unwrap_or(0));
        Counted {
            sent,
            done,
            admitted,
            least: [1, input, reserved.min(output.unwrap_or(0))],
            settled: [1, input, output.unwrap_or(reserved)],
            // Only a 2xx with a real count was certainly settled to it; anything else may
            // still hold its reservation (no settlement, or settlement from an unseen text).
            most_settled: [
                1,
                input,
                match output {
                    Some(o) if admitted => o,
                    _ => larger,
                },
            ],
            most: [1, input, larger],
        }
    }
}

/// A 429 and what it asked for.
#[derive(Clone, Debug)]
struct Denial {
    sent: i64,
    done: i64,
    want: Amounts,
    /// The limit the limiter named, as an index into [`LimitKind::ALL`].
    named: Option<usize>,
}

/// The outcome of `--verify`. Serialised into the run's JSON summary; `series` is for the
/// charts only.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub window_ms: u64,
    pub precision_ms: u64,
    pub passed: bool,
    /// 2xx answers.
    pub admitted: u64,
    /// 429 answers.
    pub denied: u64,
    /// Answers neither 2xx nor 429, counted as possibly admitted.
    pub unknown: u64,
    /// Records whose key is not in the audit (none when the runner and the audit agree).
    pub ignored: u64,
    /// Send to last byte of the admitted requests: the span in which each decision hides.
    pub network: Spread,
    pub keys: Vec<KeyReport>,
    #[serde(skip)]
    pub series: Vec<UsageSeries>,
}

/// Percentiles of a duration, in ms.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    fn of(mut us: Vec<u64>) -> Spread {
        us.sort_unstable();
        let at = |q: f64| nearest_rank(&us, q).map_or(0.0, |v| v as f64 / 1000.0);
        Spread {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// The value at quantile `q` of sorted values (nearest rank), `None` when there are none.
fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyReport {
    /// The key's config name.
    pub name: String,
    pub admitted: u64,
    pub denied: u64,
    /// In the order of [`LimitKind::ALL`].
    pub limits: Vec<LimitReport>,
    /// 429s that named no limit: false only if all three limits had room.
    pub unnamed_denials: Denials,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LimitReport {
    pub limit: LimitKind,
    pub limit_value: u64,
    /// The largest usage of any window of length W.
    pub peak: Peak,
    /// `None` when no set of admitted requests over the limit fits in a window of length W.
    pub over_admission: Option<OverAdmission>,
    /// 429s that named this limit.
    pub denials: Denials,
}

/// The largest window usage, bracketed: the truth lies between `definite` and `possible`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Peak {
    pub definite: u64,
    pub estimate: u64,
    pub possible: u64,
    /// The same as fractions of the limit.
    pub definite_fraction: f64,
    pub estimate_fraction: f64,
    pub possible_fraction: f64,
}

/// The tightest set of admitted requests over the limit.
#[derive(Clone, Debug, PartialEq)]
pub struct OverAdmission {
    /// How much shorter than W the set's span is, in µs.
    pub error_us: i64,
    /// The set's first send, in µs since the run's start.
    pub start_us: i64,
}

impl Serialize for OverAdmission {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown {
            error_ms: f64,
            start_s: f64,
        }
        Shown {
            error_ms: self.error_us as f64 / 1000.0,
            start_s: self.start_us as f64 / 1e6,
        }
        .serialize(s)
    }
}

/// 429s of one limit and those among them given while the window certainly had room.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Denials {
    pub total: u64,
    pub false_429: u64,
    /// Over the false 429s (none: `null`).
    #[serde(rename = "error_ms_p99")]
    pub error_p99: Option<WindowError>,
    #[serde(rename = "error_ms_max")]
    pub error_max: Option<WindowError>,
    /// When the false 429 with the largest error was sent, in s since the run's start.
    pub worst_sent_s: Option<f64>,
}

/// How far the window was off: µs (shown as ms), or beyond anything in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WindowError {
    Us(i64),
    Unbounded,
}

impl Serialize for WindowError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WindowError::Us(us) => s.serialize_f64(*us as f64 / 1000.0),
            WindowError::Unbounded => s.serialize_str("unbounded"),
        }
    }
}

impl std::fmt::Display for WindowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowError::Us(us) => write!(f, "{} ms", ms(*us)),
            WindowError::Unbounded => f.write_str("unbounded"),
        }
    }
}

impl Denials {
    fn collect(total: u64, mut found: Vec<(WindowError, i64)>) -> Denials {
        found.sort_unstable();
        Denials {
            total,
            false_429: found.len() as u64,
            error_p99: nearest_rank(&found, 0.99).map(|f| f.0),
            error_max: found.last().map(|f| f.0),
            worst_sent_s: found.last().map(|f| f.1 as f64 / 1e6),
        }
    }
}

/// Milliseconds with one decimal, for text.
fn ms(us: i64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

impl Report {
    /// True when the limiter kept to its design: see the module doc, "What passes".
    pub fn passed(&self) -> bool {
        self.passed
    }

    /// The report for a terminal: one line per key and limit, then what the numbers mean.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "verify: window {} ms, precision {} ms; {} admitted, {} denied (429), {} other answers (counted as possibly admitted){}",
            self.window_ms,
            self.precision_ms,
            self.admitted,
            self.denied,
            self.unknown,
            if self.ignored > 0 {
                format!(", {} records of unknown keys ignored", self.ignored)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "send to last byte of admitted requests: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.network.p50_ms, self.network.p99_ms, self.network.max_ms
        );
        let name_width = self
            .keys
            .iter()
            .map(|k| k.name.len())
            .chain([3])
            .max()
            .unwrap_or(3);
        let limit_width = self
            .keys
            .iter()
            .flat_map(|k| &k.limits)
            .map(|l| l.limit_value.to_string().len())
            .chain([10])
            .max()
            .unwrap_or(10);
        let _ = writeln!(
            out,
            "{:<name_width$}  {:<13} {:>limit_width$}  {:>8} {:>8} {:>8}  {:>16}  {:>7} {:>6}  {:>22}",
            "key",
            "limit",
            "per window",
            "definite",
            "estimate",
            "possible",
            "over-admission",
            "429s",
            "false",
            "false 429 error p99/max",
        );
        for key in &self.keys {
            // A limit a `per_day`, `models` or pool entry leaves out is unlimited: no row.
            for l in key
                .limits
                .iter()
                .filter(|l| l.limit_value < Config::UNLIMITED)
            {
                let _ = writeln!(
                    out,
                    "{:<name_width$}  {:<13} {:>limit_width$}  {:>7.1}% {:>7.1}% {:>7.1}%  {:>16}  {:>7} {:>6}  {:>22}",
                    key.name,
                    l.limit.as_str(),
                    l.limit_value,
                    l.peak.definite_fraction * 100.0,
                    l.peak.estimate_fraction * 100.0,
                    l.peak.possible_fraction * 100.0,
                    l.over_admission
                        .as_ref()
                        .map_or("none".to_owned(), |o| format!("{} ms", ms(o.error_us))),
                    l.denials.total,
                    l.denials.false_429,
                    error_pair(&l.denials),
                );
            }
            if key.unnamed_denials.total > 0 {
                let d = &key.unnamed_denials;
                let _ = writeln!(
                    out,
                    "{:<name_width$}  {:<13} {:>limit_width$}  {:>8} {:>8} {:>8}  {:>16}  {:>7} {:>6}  {:>22}",
                    key.name, "(unnamed)", "", "", "", "", "", d.total, d.false_429, error_pair(d),
                );
            }
        }
        let _ = writeln!(
            out,
            "The limiter decided each request at an unknown instant between its send and its last byte \
             (the span above). \"definite\" counts only requests wholly inside a window, \"possible\" \
             every request that meets it, \"estimate\" places each at its midpoint: the true peak lies \
             between definite and possible. Errors are lower bounds, reported only when they hold for \
             every possible decision instant, so an error smaller than about that span can go unseen; \
             an error up to one precision bucket ({} ms) is the design.",
            self.precision_ms
        );
        let _ = writeln!(
            out,
            "verify: {} (no over-admission and no false 429 with an error above one bucket, {} ms)",
            if self.passed { "PASS" } else { "FAIL" },
            self.precision_ms
        );
        out
    }
}

fn error_pair(d: &Denials) -> String {
    match (&d.error_p99, &d.error_max) {
        (Some(p99), Some(max)) => format!("{p99} / {max}"),
        _ => "-".to_owned(),
    }
}

/// Everything about one key: its report and its three usage series.
fn audit_key(
    key: &AuditKey,
    counted: &[Counted],
    denied: &[Denial],
    window: i64,
    run_end: i64,
    step: i64,
) -> (KeyReport, Vec<UsageSeries>) {
    let admitted: Vec<Counted> = counted.iter().filter(|c| c.admitted).cloned().collect();
    let definite = definite_sweep(&admitted, window, key.limits);
    let mids = Midpoints::new(&admitted);
    let bounds = Bounds::new(counted);

    let mut verdicts: Vec<[Verdict; 3]> = vec![[Verdict::Justified; 3]; denied.len()];
    let mut limits = Vec::with_capacity(3);
    let mut series = Vec::with_capacity(3);
    for (l, kind) in LimitKind::ALL.into_iter().enumerate() {
        let limit = key.limits[l];
        let lane = bounds.lane(l);
        for (v, d) in verdicts.iter_mut().zip(denied) {
            v[l] = lane.verdict(d, window, limit);
        }
        let named: Vec<(WindowError, i64)> = denied
            .iter()
            .zip(&verdicts)
            .filter(|(d, _)| d.named == Some(l))
            .filter_map(|(d, v)| v[l].error().map(|e| (e, d.sent)))
            .collect();
        let total = denied.iter().filter(|d| d.named == Some(l)).count() as u64;
        let fraction = |v: u64| v as f64 / limit.max(1) as f64;
        let estimate = mids.peak(l, window);
        let possible = lane.possible_peak(window);
        limits.push(LimitReport {
            limit: kind,
            limit_value: limit,
            peak: Peak {
                definite: definite[l].peak,
                estimate,
                possible,
                definite_fraction: fraction(definite[l].peak),
                estimate_fraction: fraction(estimate),
                possible_fraction: fraction(possible),
            },
            over_admission: definite[l].tightest.filter(|&(span, _)| span < window).map(
                |(span, start)| OverAdmission {
                    error_us: window - span,
                    start_us: start,
                },
            ),
            denials: Denials::collect(total, named),
        });
        series.push(UsageSeries {
            key: key.name.clone(),
            limit: kind,
            limit_value: limit,
            points: (0..=(run_end as u64).div_ceil(step as u64) as i64)
                .map(|i| {
                    let t = i * step;
                    (t as f64 / 1e6, mids.usage(l, t, window))
                })
                .collect(),
        });
    }
    // A 429 naming no limit was justified if any one limit was full; its error is the
    // smallest extension that fills any of them.
    let unnamed: Vec<(WindowError, i64)> = denied
        .iter()
        .zip(&verdicts)
        .filter(|(d, _)| d.named.is_none())
        .filter_map(|(d, v)| {
            let errors: Option<Vec<WindowError>> = v.iter().map(|v| v.error()).collect();
            Some((errors?.into_iter().min()?, d.sent))
        })
        .collect();
    let report = KeyReport {
        name: key.name.clone(),
        admitted: admitted.len() as u64,
        denied: denied.len() as u64,
        limits,
        unnamed_denials: Denials::collect(
            denied.iter().filter(|d| d.named.is_none()).count() as u64,
            unnamed,
        ),
    };
    (report, series)
}

/// What the definite sweep finds for one limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Definite {
    /// The largest definite usage of a window of length W.
    peak: u64,
    /// The smallest span (first send to last receive) of a set of admitted requests that
    /// holds more than the limit, with that set's first send.
    tightest: Option<(i64, i64)>,
}

/// Finds, for each limit, the peak definite usage of a window of length `window` and the
/// tightest over-limit set, in one sweep.
///
/// A window (or a set's span) starting at `s` holds the requests sent at or after `s` and
/// received before its end. Sweeping `s` over the sends from last to first, each request
/// enters a Fenwick tree indexed by its rank among the receive instants when `s` reaches
/// its send; then "received before s + W" is a prefix of the tree, and "the first receive
/// instant at which the held amount exceeds the limit" is a descent of the tree. O(n log n).
fn definite_sweep(items: &[Counted], window: i64, limits: Amounts) -> [Definite; 3] {
    let n = items.len();
    let mut by_done: Vec<u32> = (0..n as u32).collect();
    by_done.sort_unstable_by_key(|&i| items[i as usize].done);
    let done_sorted: Vec<i64> = by_done.iter().map(|&i| items[i as usize].done).collect();
    let mut rank = vec![0u32; n];
    for (r, &i) in by_done.iter().enumerate() {
        rank[i as usize] = r as u32;
    }
    drop(by_done);
    let mut by_sent: Vec<u32> = (0..n as u32).collect();
    by_sent.sort_unstable_by_key(|&i| std::cmp::Reverse(items[i as usize].sent));

    let mut tree = Fenwick::new(n);
    let mut held: Amounts = [0; 3];
    let mut found = [Definite::default(); 3];
    let mut inside = n;
    let mut g = 0;
    while g < n {
        let s = items[by_sent[g] as usize].sent;
        // Every request sent at `s` enters before any window starting at `s` is read.
        while g < n && items[by_sent[g] as usize].sent == s {
            let i = by_sent[g] as usize;
            tree.add(rank[i] as usize, items[i].least);
            for (h, v) in held.iter_mut().zip(items[i].least) {
                *h += v;
            }
            g += 1;
        }
        // `s` only decreases, so the receive instants before `s + W` only shrink.
        while inside > 0 && done_sorted[inside - 1] >= s.saturating_add(window) {
            inside -= 1;
        }
        let usage = tree.prefix(inside);
        for l in 0..3 {
            if usage[l] > found[l].peak {
                found[l].peak = usage[l];
            }
            if held[l] > limits[l] {
                // `first` is the rank at which the cumulative amount first exceeds the
                // limit; it holds a request already in the tree, sent at or after `s`.
                let first = tree.ranks_within(l, limits[l]);
                if let Some(&end) = done_sorted.get(first) {
                    let span = end - s;
                    if found[l].tightest.is_none_or(|(best, _)| span < best) {
                        found[l].tightest = Some((span, s));
                    }
                }
            }
        }
    }
    found
}

/// A Fenwick (binary indexed) tree of three amounts per position.
struct Fenwick {
    /// 1-based; `tree[i]` sums positions `i − lowbit(i) … i − 1` (0-based).
    tree: Vec<Amounts>,
}

impl Fenwick {
    fn new(n: usize) -> Fenwick {
        Fenwick {
            tree: vec![[0; 3]; n + 1],
        }
    }

    fn add(&mut self, position: usize, v: Amounts) {
        let mut i = position + 1;
        while i < self.tree.len() {
            for (t, v) in self.tree[i].iter_mut().zip(v) {
                *t += v;
            }
            i += i & i.wrapping_neg();
        }
    }

    /// The sums over positions `0 … count − 1`.
    fn prefix(&self, count: usize) -> Amounts {
        let mut sum = [0; 3];
        let mut i = count.min(self.tree.len() - 1);
        while i > 0 {
            for (s, t) in sum.iter_mut().zip(self.tree[i]) {
                *s += t;
            }
            i &= i - 1;
        }
        sum
    }

    /// The number of leading positions whose sum in `lane` stays within `limit`.
    fn ranks_within(&self, lane: usize, limit: u64) -> usize {
        let n = self.tree.len() - 1;
        let mut pos = 0;
        let mut rest = limit;
        let mut step = if n == 0 { 0 } else { 1 << n.ilog2() };
        while step > 0 {
            let next = pos + step;
            if next <= n && self.tree[next][lane] <= rest {
                pos = next;
                rest -= self.tree[next][lane];
            }
            step >>= 1;
        }
        pos
    }
}

/// The admitted requests placed at the midpoints of their intervals, with settled amounts:
/// the estimate and the chart series.
struct Midpoints {
    at: Vec<i64>,
    /// `prefix[l][i]`: the amount of the first `i` midpoints in limit `l`.
    prefix: [Vec<u64>; 3],
}

impl Midpoints {
    fn new(items: &[Counted]) -> Midpoints {
        let mut points: Vec<(i64, Amounts)> = items
            .iter()
            .map(|c| (c.sent + (c.done - c.sent) / 2, c.settled))
            .collect();
        points.sort_unstable_by_key(|p| p.0);
        let prefix = [0, 1, 2].map(|l| prefix_sums(points.iter().map(|p| p.1[l])));
        Midpoints {
            at: points.into_iter().map(|p| p.0).collect(),
            prefix,
        }
    }

    /// Usage of limit `l` in the window `(t − W, t]`.
    fn usage(&self, l: usize, t: i64, window: i64) -> u64 {
        let upto = |x: i64| self.at.partition_point(|&m| m <= x);
        self.prefix[l][upto(t)] - self.prefix[l][upto(t - window)]
    }

    /// The largest usage of any window: a window ending at a midpoint, by two pointers.
    fn peak(&self, l: usize, window: i64) -> u64 {
        let mut peak = 0;
        let mut from = 0;
        for end in 0..self.at.len() {
            // Windows end at the last of equal midpoints only.
            if self.at.get(end + 1) == Some(&self.at[end]) {
                continue;
            }
            while self.at[from] <= self.at[end] - window {
                from += 1;
            }
            peak = peak.max(self.prefix[l][end + 1] - self.prefix[l][from]);
        }
        peak
    }
}

fn prefix_sums(values: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut sums = Vec::with_capacity(values.size_hint().0 + 1);
    let mut total = 0u64;
    sums.push(0);
    for v in values {
        total += v;
        sums.push(total);
    }
    sums
}

/// Every request that may have been counted, sorted by send and by receive: the upper
/// bounds (possible peak, false 429s) are differences of prefix sums over these.
struct Bounds<'a> {
    items: &'a [Counted],
    by_sent: Vec<u32>,
    by_done: Vec<u32>,
    sent_sorted: Vec<i64>,
    done_sorted: Vec<i64>,
}

/// [`Bounds`] for one limit.
struct Lane<'a> {
    /// The limit's index in [`LimitKind::ALL`].
    index: usize,
    sent_sorted: &'a [i64],
    done_sorted: &'a [i64],
    /// The most each request can hold once settled, summed in send order and in receive
    /// order; `extra_*` is what an unsettled one can hold beyond that (output only).
    settled_by_sent: Vec<u64>,
    settled_by_done: Vec<u64>,
    extra_by_sent: Vec<u64>,
    extra_by_done: Vec<u64>,
}

impl<'a> Bounds<'a> {
    fn new(items: &'a [Counted]) -> Bounds<'a> {
        let mut by_sent: Vec<u32> = (0..items.len() as u32).collect();
        by_sent.sort_unstable_by_key(|&i| items[i as usize].sent);
        let mut by_done: Vec<u32> = (0..items.len() as u32).collect();
        by_done.sort_unstable_by_key(|&i| items[i as usize].done);
        Bounds {
            items,
            sent_sorted: by_sent.iter().map(|&i| items[i as usize].sent).collect(),
            done_sorted: by_done.iter().map(|&i| items[i as usize].done).collect(),
            by_sent,
            by_done,
        }
    }

    fn lane(&self, l: usize) -> Lane<'_> {
        let sums = |order: &[u32], f: &dyn Fn(&Counted) -> u64| {
            prefix_sums(order.iter().map(|&i| f(&self.items[i as usize])))
        };
        let settled = |c: &Counted| c.most_settled[l];
        let extra = |c: &Counted| c.most[l] - c.most_settled[l];
        // Requests and input tokens never change at settlement: no extra to keep.
        let (extra_by_sent, extra_by_done) = if l == OUTPUT {
            (sums(&self.by_sent, &extra), sums(&self.by_done, &extra))
        } else {
            (Vec::new(), Vec::new())
        };
        Lane {
            index: l,
            sent_sorted: &self.sent_sorted,
            done_sorted: &self.done_sorted,
            settled_by_sent: sums(&self.by_sent, &settled),
            settled_by_done: sums(&self.by_done, &settled),
            extra_by_sent,
            extra_by_done,
        }
    }
}

/// What the records say about one 429 in one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The window may have been full: nothing to report.
    Justified,
    /// The window certainly had room; the error it implies.
    False(WindowError),
}

impl Verdict {
    fn error(self) -> Option<WindowError> {
        match self {
            Verdict::Justified => None,
            Verdict::False(e) => Some(e),
        }
    }
}

impl Lane<'_> {
    fn sent_upto(&self, x: i64) -> usize {
        self.sent_sorted.partition_point(|&s| s <= x)
    }

    fn done_upto(&self, x: i64) -> usize {
        self.done_sorted.partition_point(|&d| d <= x)
    }

    fn extra(sums: &[u64], count: usize) -> u64 {
        sums.get(count).copied().unwrap_or(0)
    }

    /// The most the window can have held at the decision of `d`, over every instant in
    /// `[d.sent, d.done]`: requests sent by `d.done` and received after `d.sent − W`, each
    /// with its reservation if it may have been unsettled then (received after `d.sent`).
    fn most_held(&self, d: &Denial, window: i64) -> u64 {
        let sent = self.sent_upto(d.done);
        // Requests received by `d.sent − W` (or by `d.sent`) were all sent by `d.done`, so
        // each subtraction removes a subset of what the first sum holds.
        let settled =
            self.settled_by_sent[sent] - self.settled_by_done[self.done_upto(d.sent - window)];
        let unsettled = Self::extra(&self.extra_by_sent, sent)
            - Self::extra(&self.extra_by_done, self.done_upto(d.sent));
        settled + unsettled
    }

    /// Whether `d` was denied while this limit certainly had room, and if so how much
    /// further back the window would have had to reach: the requests received by
    /// `d.sent − W` are added from the latest back (all settled by then) until the bound
    /// no longer fits.
    fn verdict(&self, d: &Denial, window: i64, limit: u64) -> Verdict {
        let want = d.want[self.index];
        let held = self.most_held(d, window);
        if want.saturating_add(held) > limit {
            return Verdict::Justified;
        }
        let room = limit - want - held;
        let edge = d.sent - window;
        let older = self.done_upto(edge);
        let before = self.settled_by_done[older];
        if before <= room {
            return Verdict::False(WindowError::Unbounded);
        }
        // The latest receive instant from which the older requests no longer fit.
        let need = before - room;
        let first = self.settled_by_done[..=older].partition_point(|&x| x < need);
        Verdict::False(WindowError::Us(edge - self.done_sorted[first - 1]))
    }

    /// The largest possible usage of a window `[s, s + W)`: the requests sent before its
    /// end and received at or after its start, each with the most it can hold. It changes
    /// only where a request leaves (just after a receive instant), so the windows starting
    /// at receive instants are the only ones to look at.
    fn possible_peak(&self, window: i64) -> u64 {
        let most = |settled: &[u64], extra: &[u64], i: usize| settled[i] + Self::extra(extra, i);
        let mut peak = 0;
        let mut sent = 0;
        let mut gone = 0;
        for &s in self.done_sorted {
            while sent < self.sent_sorted.len() && self.sent_sorted[sent] < s.saturating_add(window)
            {
                sent += 1;
            }
            while self.done_sorted[gone] < s {
                gone += 1;
            }
            let held = most(&self.settled_by_sent, &self.extra_by_sent, sent)
                - most(&self.settled_by_done, &self.extra_by_done, gone);
            peak = peak.max(held);
        }
        peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: i64 = 1000;

    fn audit(window_ms: u64, precision_ms: u64, limits: &[[u64; 3]]) -> Audit {
        Audit {
            window_ms,
            precision_ms,
            default_max_output_tokens: 16,
            key_names: (0..limits.len()).map(|i| format!("key-{i}")).collect(),
            keys: limits
                .iter()
                .enumerate()
                .map(|(i, &limits)| {
                    AuditKey::own(
                        &format!("key-{i}"),
                        limits,
                        i as u16,
                        window_ms,
                        precision_ms,
                    )
                })
                .collect(),
        }
    }

    fn record(key: u16, sent_us: i64, done_us: i64, outcome: Outcome) -> Record {
        Record {
            target: 0,
            key,
            model: 0,
            intended_us: sent_us as u64,
            sent_us: sent_us as u64,
            done_us: done_us as u64,
            outcome,
            status: match outcome {
                Outcome::Ok => 200,
                Outcome::RateLimited => 429,
                Outcome::Other => 503,
            },
            denied_by: None,
            denied_in: None,
            prompt_tokens: 10,
            completion_tokens: if outcome == Outcome::Ok { 5 } else { 0 },
            max_tokens: 8,
        }
    }

    fn denial(key: u16, sent_us: i64, done_us: i64, by: Option<LimitKind>) -> Record {
        Record {
            denied_by: by,
            ..record(key, sent_us, done_us, Outcome::RateLimited)
        }
    }

    fn only_key(report: &Report) -> &KeyReport {
        assert_eq!(report.keys.len(), 1);
        &report.keys[0]
    }

    /// A limiter simulated from its decision instants: what the real one does, with
    /// the window and bucket under the test's control.
    #[derive(Clone, Copy, Debug)]
    struct SimLimiter {
        window: i64,
        /// 0: an exact sliding log; else buckets of this width, as `docs/design.md`.
        bucket: i64,
        limits: Amounts,
        /// Deny every n-th request whatever the window holds.
        deny_every: Option<usize>,
    }

    #[derive(Clone, Debug)]
    struct Arrival {
        key: u16,
        /// The decision instant, unknown to the tool.
        at: i64,
        before: i64,
        after: i64,
        /// Settlement, after the decision and by the last byte.
        settle: i64,
        prompt: u32,
        max_tokens: u32,
        completion: u32,
    }

    fn simulate(limiters: &[SimLimiter], arrivals: &[Arrival]) -> Vec<Record> {
        let mut order: Vec<&Arrival> = arrivals.iter().collect();
        order.sort_by_key(|a| a.at);
        // Per key: (decision, settlement instant, reserved, settled).
        let mut held: Vec<Vec<(i64, i64, Amounts, Amounts)>> = vec![Vec::new(); limiters.len()];
        let mut records = Vec::new();
        for (n, a) in order.into_iter().enumerate() {
            let lim = limiters[a.key as usize];
            let from = if lim.bucket > 0 {
                (a.at.div_euclid(lim.bucket) - lim.window / lim.bucket) * lim.bucket
            } else {
                a.at - lim.window + 1
            };
            let mut usage = [0u64; 3];
            for (at, settle, reserved, settled) in &held[a.key as usize] {
                if *at >= from {
                    let amount = if *settle <= a.at { settled } else { reserved };
                    for l in 0..3 {
                        usage[l] += amount[l];
                    }
                }
            }
            // No max_tokens: the config's default (16 in `audit`) is reserved.
            let reserved = if a.max_tokens == 0 { 16 } else { a.max_tokens };
            let want = [1, u64::from(a.prompt), u64::from(reserved)];
            let over = (0..3).find(|&l| usage[l] + want[l] > lim.limits[l]);
            let forced = lim.deny_every.is_some_and(|k| n % k == k - 1);
            let mut r = Record {
                target: 0,
                key: a.key,
                model: 0,
                intended_us: (a.at - a.before) as u64,
                sent_us: (a.at - a.before) as u64,
                done_us: (a.at + a.after) as u64,
                outcome: Outcome::Ok,
                status: 200,
                denied_by: None,
                denied_in: None,
                prompt_tokens: a.prompt,
                completion_tokens: a.completion,
                max_tokens: a.max_tokens,
            };
            if over.is_some() || forced {
                r.outcome = Outcome::RateLimited;
                r.status = 429;
                r.denied_by = Some(LimitKind::ALL[over.unwrap_or(0)]);
                r.completion_tokens = 0;
            } else {
                held[a.key as usize].push((
                    a.at,
                    a.at + a.settle,
                    want,
                    [1, u64::from(a.prompt), u64::from(a.completion)],
                ));
            }
            records.push(r);
        }
        records
    }

    /// A deterministic stream of arrivals: one every `gap` ± jitter, latencies up to
    /// `latency` on each side of the decision.
    fn steady(key: u16, count: usize, gap: i64, latency: i64, seed: u64) -> Vec<Arrival> {
        let mut state = seed | 1;
        let mut next = move |bound: i64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound.max(1) as u64) as i64
        };
        let mut at = latency + 1;
        (0..count)
            .map(|_| {
                at += gap / 2 + next(gap);
                let after = next(latency + 1);
                let completion = 1 + next(8) as u32;
                Arrival {
                    key,
                    at,
                    before: next(latency + 1),
                    after,
                    settle: next(after + 1),
                    prompt: 1 + next(20) as u32,
                    max_tokens: 8,
                    completion,
                }
            })
            .collect()
    }

    fn limiter(window: i64, limits: Amounts) -> SimLimiter {
        SimLimiter {
            window,
            bucket: 0,
            limits,
            deny_every: None,
        }
    }

    fn arrival() -> impl Strategy<Value = Arrival> {
        (
            0u16..2,
            0i64..20_000,
            0i64..300,
            0i64..300,
            0u32..400,
            1u32..30,
            0u32..30,
            0u32..=100,
        )
            .prop_map(
                |(
                    key,
                    at_ms,
                    before_ms,
                    after_ms,
                    settle_permille,
                    prompt,
                    max_tokens,
                    completion,
                )| {
                    let after = after_ms * MS;
                    Arrival {
                        key,
                        at: at_ms * MS + before_ms * MS,
                        before: before_ms * MS,
                        after,
                        settle: after * i64::from(settle_permille) / 400,
                        prompt,
                        max_tokens,
                        // Sometimes longer than the reservation, as a misbehaving upstream might.
                        completion: completion * max_tokens.max(1) / 90,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// An exact sliding log, whatever the latencies around its decisions: the records
        /// can prove neither an over-admission nor a false 429.
        #[test]
        fn exact_limiter_shows_no_error(
            arrivals in prop::collection::vec(arrival(), 0..250),
            limits in (1u64..20, 10u64..200, 10u64..200),
        ) {
            let limits = [limits.0, limits.1, limits.2];
            let records = simulate(&[limiter(2000 * MS, limits); 2], &arrivals);
            let report = audit(2000, 100, &[limits, limits]).replay(&records);
            for key in &report.keys {
                for l in &key.limits {
                    prop_assert!(l.over_admission.is_none(), "{}", report.render_text());
                    prop_assert!(l.peak.definite <= l.limit_value);
                    prop_assert_eq!(l.denials.false_429, 0, "{}", report.render_text());
                }
                prop_assert_eq!(key.unnamed_denials.false_429, 0);
            }
            prop_assert!(report.passed());
        }

        /// The bucketed window of `docs/design.md` counts between W and W + p: it never
        /// over-admits, and refuses at most one bucket early.
        #[test]
        fn bucketed_limiter_passes(
            arrivals in prop::collection::vec(arrival(), 0..250),
            limits in (1u64..20, 10u64..200, 10u64..200),
        ) {
            let limits = [limits.0, limits.1, limits.2];
            let sim = SimLimiter { bucket: 100 * MS, ..limiter(2000 * MS, limits) };
            let records = simulate(&[sim; 2], &arrivals);
            let report = audit(2000, 100, &[limits, limits]).replay(&records);
            for key in &report.keys {
                for l in &key.limits {
                    prop_assert!(l.over_admission.is_none(), "{}", report.render_text());
                    if let Some(e) = l.denials.error_max {
                        prop_assert!(e <= WindowError::Us(100 * MS), "{}", report.render_text());
                    }
                }
            }
            prop_assert!(report.passed(), "{}", report.render_text());
        }
    }

    /// With latencies of ~1 ms the bucketed window's early refusals become visible:
    /// false 429s, each within one bucket, which is the design and passes.
    #[test]
    fn the_bucket_error_shows_as_false_429s_within_one_bucket() {
        let arrivals = steady(0, 1200, 50 * MS, MS, 11);
        let limits = [100, 1 << 40, 1 << 40];
        let sim = SimLimiter {
            bucket: 100 * MS,
            ..limiter(10_000 * MS, limits)
        };
        let report = audit(10_000, 100, &[limits]).replay(&simulate(&[sim], &arrivals));
        let d = &only_key(&report).limits[0].denials;
        assert!(d.false_429 > 0);
        assert!(d
            .error_max
            .is_some_and(|e| e > WindowError::Us(50 * MS) && e <= WindowError::Us(100 * MS)));
        assert!(report.passed(), "{}", report.render_text());
    }

    #[test]
    fn window_2s_too_short_is_measured_as_2s_over_admission() {
        // 10 s window, 100 requests allowed, one arrival every ~50 ms: the limit binds.
        let (latency, gap) = (20 * MS, 50 * MS);
        let arrivals = steady(0, 1200, gap, latency, 7);
        let records = simulate(&[limiter(8000 * MS, [100, 1 << 40, 1 << 40])], &arrivals);
        let report = audit(10_000, 100, &[[100, 1 << 40, 1 << 40]]).replay(&records);
        let requests = &only_key(&report).limits[0];
        let error = requests
            .over_admission
            .as_ref()
            .expect("over-admission")
            .error_us;
        // A lower bound: short of 2 s by at most both latencies and one arrival gap.
        assert!(error <= 2000 * MS, "{error}");
        assert!(error >= 2000 * MS - 2 * latency - 3 * gap / 2, "{error}");
        assert!(requests.peak.definite > 100);
        assert!(!report.passed());
        assert!(report.render_text().contains("FAIL"));
    }

    #[test]
    fn window_2s_too_long_gives_false_429s_of_2s() {
        let (latency, gap) = (20 * MS, 50 * MS);
        let arrivals = steady(0, 1200, gap, latency, 11);
        let records = simulate(&[limiter(12_000 * MS, [100, 1 << 40, 1 << 40])], &arrivals);
        let report = audit(10_000, 100, &[[100, 1 << 40, 1 << 40]]).replay(&records);
        let requests = &only_key(&report).limits[0];
        assert!(requests.over_admission.is_none());
        assert!(requests.denials.false_429 > 0);
        let Some(WindowError::Us(max)) = requests.denials.error_max else {
            panic!("{:?}", requests.denials)
        };
        assert!(max <= 2000 * MS, "{max}");
        assert!(max >= 2000 * MS - 2 * latency - 3 * gap / 2, "{max}");
        assert!(!report.passed());
    }

    #[test]
    fn denials_with_room_to_spare_are_false_and_unbounded() {
        let sim = SimLimiter {
            deny_every: Some(10),
            ..limiter(10_000 * MS, [1000, 1 << 40, 1 << 40])
        };
        let arrivals = steady(0, 300, 50 * MS, 20 * MS, 3);
        let records = simulate(&[sim], &arrivals);
        let report = audit(10_000, 100, &[[1000, 1 << 40, 1 << 40]]).replay(&records);
        let d = &only_key(&report).limits[0].denials;
        assert_eq!((d.total, d.false_429), (30, 30));
        assert_eq!(d.error_max, Some(WindowError::Unbounded));
        assert!(!report.passed());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["keys"][0]["limits"][0]["denials"]["error_ms_max"],
            "unbounded"
        );
    }

    #[test]
    fn a_hand_computed_run() {
        // Limit 2 requests per 1 s. Three admitted requests spanning 0 … 900 ms: a window
        // 100 ms short of 1 s already held three.
        let records = vec![
            record(0, 0, 10 * MS, Outcome::Ok),
            record(0, 100 * MS, 110 * MS, Outcome::Ok),
            record(0, 500 * MS, 900 * MS, Outcome::Ok),
            // Denied at 2.5 s: the window (1.5 s, 2.5 s] at most held the one received at
            // 1.6 s; it would have had to reach back to 900 ms (600 ms further) to be full.
            record(0, 1500 * MS, 1600 * MS, Outcome::Ok),
            denial(0, 2500 * MS, 2510 * MS, Some(LimitKind::Requests)),
        ];
        let report = audit(1000, 100, &[[2, 1000, 1000]]).replay(&records);
        let l = &only_key(&report).limits[0];
        assert_eq!(l.peak.definite, 3);
        assert_eq!(l.peak.possible, 3);
        assert_eq!(l.peak.estimate, 3);
        assert_eq!(l.peak.definite_fraction, 1.5);
        assert_eq!(
            l.over_admission,
            Some(OverAdmission {
                error_us: 100 * MS,
                start_us: 0
            })
        );
        assert_eq!(l.denials.false_429, 1);
        assert_eq!(l.denials.error_max, Some(WindowError::Us(600 * MS)));
        assert_eq!(l.denials.worst_sent_s, Some(2.5));
        // Input: 10 per request against 1000: nothing to see.
        assert!(report.keys[0].limits[1].over_admission.is_none());
        assert_eq!(report.network.max_ms, 400.0);
        assert!(!report.passed());
    }

    #[test]
    fn an_unknown_answer_may_have_filled_the_window() {
        // The 503 may have been admitted before failing: the 429 is not provably false.
        let records = vec![
            record(0, 0, 10 * MS, Outcome::Other),
            denial(0, 500 * MS, 510 * MS, Some(LimitKind::Requests)),
        ];
        let report = audit(1000, 100, &[[1, 1000, 1000]]).replay(&records);
        let l = &only_key(&report).limits[0];
        assert_eq!(l.denials.false_429, 0);
        assert_eq!((l.peak.definite, l.peak.possible), (0, 1));
        assert_eq!(report.unknown, 1);
        assert!(report.passed());
    }

    #[test]
    fn an_unnamed_denial_is_false_only_if_every_limit_had_room() {
        let mut records = vec![
            record(0, 0, 10 * MS, Outcome::Ok),
            denial(0, 500 * MS, 510 * MS, None),
        ];
        // Input limit 20: 10 held + 10 wanted fits; requests limit 5 fits too.
        let report = audit(1000, 100, &[[5, 20, 1000]]).replay(&records);
        assert_eq!(only_key(&report).unnamed_denials.false_429, 1);
        // Input limit 19: that limit may have been the one.
        let report = audit(1000, 100, &[[5, 19, 1000]]).replay(&records);
        assert_eq!(only_key(&report).unnamed_denials.false_429, 0);
        // The error is the smallest of the three. Denied at 1.5 s, the window reached back
        // to 0.5 s and held nothing; requests (limit 2) would have been full had it reached
        // the one received at 1 ms, 499 ms further; input and output never fill.
        records.insert(0, record(0, 0, MS, Outcome::Ok));
        records[2] = denial(0, 1500 * MS, 1510 * MS, None);
        let report = audit(1000, 100, &[[2, 1000, 1000]]).replay(&records);
        let d = &only_key(&report).unnamed_denials;
        assert_eq!(d.false_429, 1);
        assert_eq!(d.error_max, Some(WindowError::Us(499 * MS)));
    }

    #[test]
    fn keys_are_independent() {
        let mut arrivals = steady(0, 800, 50 * MS, 20 * MS, 5);
        arrivals.extend(steady(1, 800, 50 * MS, 20 * MS, 9));
        let limits = [100, 1 << 40, 1 << 40];
        let sims = [limiter(8000 * MS, limits), limiter(10_000 * MS, limits)];
        let records = simulate(&sims, &arrivals);
        let report = audit(10_000, 100, &[limits, limits]).replay(&records);
        assert!(report.keys[0].limits[0].over_admission.is_some());
        assert!(report.keys[1].limits[0].over_admission.is_none());
        assert_eq!(report.keys[1].limits[0].denials.false_429, 0);
        // Key 1 alone gives the same verdict as key 1 among others.
        let alone: Vec<Record> = records
            .iter()
            .filter(|r| r.key == 1)
            .map(|r| Record {
                key: 0,
                ..r.clone()
            })
            .collect();
        let report_alone = audit(10_000, 100, &[limits]).replay(&alone);
        assert_eq!(report_alone.keys[0].limits, report.keys[1].limits);
    }

    #[test]
    fn an_empty_run_passes_and_renders() {
        let report = audit(60_000, 100, &[[600, 1000, 1000]]).replay(&[]);
        assert!(report.passed());
        assert_eq!(report.admitted + report.denied, 0);
        assert_eq!(report.series.len(), 3);
        assert!(report.series.iter().all(|s| s.points == vec![(0.0, 0)]));
        assert!(report.render_text().contains("PASS"));
        serde_json::to_string(&report).unwrap();
        // No keys at all, and records of keys beyond the audit.
        let report = audit(60_000, 100, &[]).replay(&[record(3, 0, 1, Outcome::Ok)]);
        assert_eq!(report.ignored, 1);
        assert!(report.passed());
    }

    #[test]
    fn the_series_is_the_midpoint_window() {
        let records = vec![
            record(0, 0, 200 * MS, Outcome::Ok),          // midpoint 100 ms
            record(0, 300 * MS, 500 * MS, Outcome::Ok),   // midpoint 400 ms
            record(0, 1200 * MS, 1400 * MS, Outcome::Ok), // midpoint 1300 ms
        ];
        let report = audit(1000, 100, &[[10, 1000, 1000]]).replay(&records);
        let requests = &report.series[0];
        assert_eq!(
            (requests.limit, requests.limit_value),
            (LimitKind::Requests, 10)
        );
        let at = |s: f64| {
            requests
                .points
                .iter()
                .find(|p| (p.0 - s).abs() < 1e-9)
                .map(|p| p.1)
        };
        assert_eq!(at(0.0), Some(0));
        assert_eq!(at(0.1), Some(1));
        assert_eq!(at(0.4), Some(2));
        assert_eq!(at(1.1), Some(1)); // the first left at 1.1 s
        assert_eq!(at(1.4), Some(1)); // the second left at 1.4 s, the third came at 1.3 s
        assert_eq!(requests.points.last().map(|p| p.0), Some(1.4));
        // Output settled to the real 5 tokens, not the reservation of 8.
        assert_eq!(report.series[2].points[5].1, 10);
    }

    #[test]
    fn ordinals() {
        let shown: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111]
            .map(ordinal)
            .into();
        assert_eq!(
            shown,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
                "111th"
            ]
        );
    }

    #[test]
    fn secrets_never_appear_in_text_json_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(
            &path,
            "window: 10s\nprecision: 100ms\nkeys:\n  - name: team-a\n    key: sk-very-secret-a\n    rpm: 5\n    input_tpm: 100\n    output_tpm: 100\n  - name: team-b\n    key: sk-very-secret-b\n    rpm: 7\n    input_tpm: 200\n    output_tpm: 300\n",
        )
        .unwrap();
        let secrets = vec!["sk-very-secret-b".to_owned(), "sk-very-secret-a".to_owned()];
        let audit = Audit::load(&path, &secrets, &[]).unwrap();
        assert_eq!((audit.window_ms, audit.precision_ms), (10_000, 100));
        assert_eq!(audit.keys[0].name, "team-b");
        assert_eq!(audit.keys[0].limits, [7, 200, 300]);
        assert_eq!(audit.keys[1].name, "team-a");
        let records: Vec<Record> = (0..40)
            .map(|i| {
                record(
                    i % 2,
                    i64::from(i) * 100 * MS,
                    i64::from(i) * 100 * MS + 5,
                    Outcome::Ok,
                )
            })
            .collect();
        let report = audit.replay(&records);
        let text = report.render_text();
        let json = serde_json::to_string(&report).unwrap();
        let series = format!("{:?}", report.series);
        for shown in [&text, &json, &series] {
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains("team-a") || shown == &series);
        }
        let missing = vec!["sk-very-secret-a".to_owned(), "sk-not-there".to_owned()];
        let err = format!("{:#}", Audit::load(&path, &missing, &[]).unwrap_err());
        assert!(err.contains("the 2nd --key is not a key of"), "{err}");
        assert!(!err.contains("sk-"), "{err}");
        let err = format!(
            "{:#}",
            Audit::load(&dir.path().join("absent.yaml"), &secrets, &[]).unwrap_err()
        );
        assert!(err.contains("cannot read config"), "{err}");
    }

    #[test]
    fn every_limit_of_the_config_is_audited_per_model_per_day_and_per_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(
            &path,
            "window: 10s\nprecision: 100ms\nkeys:\n  - name: team-a\n    key: sk-very-secret-a\n    rpm: 100\n    input_tpm: 10000\n    output_tpm: 10000\n    per_day:\n      requests: 1000\n    models:\n      - match: gpt-4o\n        rpm: 2\n      - match: o3*\n        rpm: 1\n    pool: research\n  - name: team-b\n    key: sk-very-secret-b\n    rpm: 100\n    input_tpm: 10000\n    output_tpm: 10000\n    pool: research\npools:\n  - name: research\n    rpm: 5\n",
        )
        .unwrap();
        let secrets = vec!["sk-very-secret-a".to_owned(), "sk-very-secret-b".to_owned()];
        let models = vec!["gpt-4o".to_owned(), "gpt-4o-mini".to_owned()];
        let audit = Audit::load(&path, &secrets, &models).unwrap();
        let names: Vec<&str> = audit.keys.iter().map(|k| k.name.as_str()).collect();
        // No o3 model is sent: that entry is not audited.
        assert_eq!(
            names,
            [
                "team-a",
                "team-a per_day",
                "team-a model gpt-4o",
                "team-b",
                "pool research"
            ]
        );
        assert_eq!(audit.key_names, ["team-a", "team-b"]);
        assert_eq!(audit.keys[1].window_ms, 86_400_000);
        // 3 of team-a's gpt-4o and 3 of team-b's, all within a second: the model entry's
        // 2 and the pool's 5 were exceeded; the keys' own 100 were not.
        let with = |key: u16, model: u16, i: i64| Record {
            model,
            ..record(key, i * 100 * MS, i * 100 * MS + 5, Outcome::Ok)
        };
        let mut records: Vec<Record> = (0..3).map(|i| with(0, 0, i)).collect();
        records.extend((3..6).map(|i| with(1, 1, i)));
        // A 429 naming the pool, given while... the pool was over, so justified; one
        // naming team-a's per-day limit, which had room: false.
        let denial = |set: LimitSet, i: i64| Record {
            denied_by: Some(LimitKind::Requests),
            denied_in: Some(set),
            ..record(0, i * 100 * MS, i * 100 * MS + 5, Outcome::RateLimited)
        };
        records.push(denial(LimitSet::Pool, 7));
        records.push(denial(LimitSet::KeyDay, 8));
        let report = audit.replay(&records);
        let by = |name: &str| report.keys.iter().find(|k| k.name == name).unwrap();
        assert!(by("team-a model gpt-4o").limits[0].over_admission.is_some());
        assert!(by("pool research").limits[0].over_admission.is_some());
        assert!(by("team-a").limits[0].over_admission.is_none());
        assert_eq!(by("team-a model gpt-4o").admitted, 3);
        assert_eq!(by("pool research").admitted, 6);
        assert_eq!(by("pool research").limits[0].denials.total, 1);
        assert_eq!(by("pool research").limits[0].denials.false_429, 0);
        assert_eq!(by("team-a per_day").limits[0].denials.false_429, 1);
        assert_eq!(by("team-a").limits[0].denials.total, 0);
        assert_eq!((report.admitted, report.denied), (6, 2));
        assert!(!report.passed());
    }

    // ---- the sweeps against brute force ----

    fn counted(
        sent: i64,
        len: i64,
        admitted: bool,
        input: u32,
        reserved: u32,
        output: u32,
    ) -> Counted {
        let r = Record {
            prompt_tokens: input,
            completion_tokens: output,
            max_tokens: reserved,
            ..record(0, sent, sent + len, Outcome::Ok)
        };
        Counted::new(sent, sent + len, admitted, &r, u64::from(reserved))
    }

    fn brute_definite(items: &[Counted], window: i64, limit: u64, l: usize) -> Definite {
        let mut found = Definite::default();
        for s in items.iter().map(|c| c.sent) {
            let sum = |end: &dyn Fn(i64) -> bool| -> u64 {
                items
                    .iter()
                    .filter(|c| c.sent >= s && end(c.done))
                    .map(|c| c.least[l])
                    .sum()
            };
            found.peak = found.peak.max(sum(&|d| d < s + window));
            for end in items.iter().map(|c| c.done) {
                if sum(&|d| d <= end) > limit && found.tightest.is_none_or(|t| end - s < t.0) {
                    found.tightest = Some((end - s, s));
                }
            }
        }
        found
    }

    fn brute_possible(items: &[Counted], window: i64, l: usize) -> u64 {
        let starts = items
            .iter()
            .flat_map(|c| [c.done, c.sent, c.sent - window + 1, c.done + 1]);
        starts
            .map(|s| {
                items
                    .iter()
                    .filter(|c| c.sent < s + window && c.done >= s)
                    .map(|c| c.most[l])
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }

    fn brute_estimate(items: &[Counted], window: i64, l: usize) -> u64 {
        let mid = |c: &Counted| c.sent + (c.done - c.sent) / 2;
        items
            .iter()
            .map(|t| {
                items
                    .iter()
                    .filter(|c| mid(c) <= mid(t) && mid(c) > mid(t) - window)
                    .map(|c| c.settled[l])
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }

    fn brute_verdict(items: &[Counted], d: &Denial, window: i64, limit: u64, l: usize) -> Verdict {
        let bound = |reach: i64| -> u64 {
            items
                .iter()
                .filter(|c| c.sent <= d.done && c.done > reach)
                .map(|c| {
                    if c.done > d.sent {
                        c.most[l]
                    } else {
                        c.most_settled[l]
                    }
                })
                .sum()
        };
        let want = d.want[l];
        if bound(d.sent - window) + want > limit {
            return Verdict::Justified;
        }
        let edge = d.sent - window;
        let mut older: Vec<i64> = items
            .iter()
            .map(|c| c.done)
            .filter(|&x| x <= edge)
            .collect();
        older.sort_unstable_by(|a, b| b.cmp(a));
        for x in older {
            if bound(x - 1) + want > limit {
                return Verdict::False(WindowError::Us(edge - x));
            }
        }
        Verdict::False(WindowError::Unbounded)
    }

    fn any_counted() -> impl Strategy<Value = Counted> {
        (
            0i64..5000,
            0i64..1500,
            prop::bool::weighted(0.8),
            0u32..5,
            1u32..6,
            0u32..8,
        )
            .prop_map(|(s, len, admitted, input, reserved, output)| {
                counted(s, len, admitted, input, reserved, output)
            })
    }

    fn any_denial() -> impl Strategy<Value = Denial> {
        (0i64..6000, 0i64..500, 0u64..4, 1u64..6).prop_map(|(sent, len, input, reserved)| Denial {
            sent,
            done: sent + len,
            want: [1, input, reserved],
            named: None,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn sweeps_agree_with_brute_force(
            items in prop::collection::vec(any_counted(), 0..40),
            denials in prop::collection::vec(any_denial(), 0..10),
            window in 1i64..3000,
            limits in (1u64..10, 1u64..30, 1u64..30),
        ) {
            let limits = [limits.0, limits.1, limits.2];
            let admitted: Vec<Counted> = items.iter().filter(|c| c.admitted).cloned().collect();
            let definite = definite_sweep(&admitted, window, limits);
            let mids = Midpoints::new(&admitted);
            let bounds = Bounds::new(&items);
            for l in 0..3 {
                let brute = brute_definite(&admitted, window, limits[l], l);
                prop_assert_eq!(definite[l].peak, brute.peak);
                prop_assert_eq!(definite[l].tightest.map(|t| t.0), brute.tightest.map(|t| t.0));
                prop_assert_eq!(mids.peak(l, window), brute_estimate(&admitted, window, l));
                let lane = bounds.lane(l);
                prop_assert_eq!(lane.possible_peak(window), brute_possible(&items, window, l));
                for d in &denials {
                    prop_assert_eq!(
                        lane.verdict(d, window, limits[l]),
                        brute_verdict(&items, d, window, limits[l], l)
                    );
                }
            }
        }
    }

    /// `cargo test -p llm-loadtest --release -- --ignored --nocapture replay_speed`
    #[test]
    #[ignore]
    fn replay_speed_2m_records() {
        let keys = 4;
        let mut records = Vec::with_capacity(2_000_000);
        let mut state = 0x9e3779b97f4a7c15u64;
        for i in 0..2_000_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 2 M requests over 120 s, 1-40 ms each, about one in five denied.
            let sent = i * 60 + state % 50;
            let outcome = match state % 10 {
                0 | 1 => Outcome::RateLimited,
                2 if state % 100 == 2 => Outcome::Other,
                _ => Outcome::Ok,
            };
            records.push(Record {
                key: (state % keys) as u16,
                denied_by: (outcome == Outcome::RateLimited)
                    .then(|| LimitKind::ALL[(state >> 8) as usize % 3]),
                ..record(
                    0,
                    sent as i64,
                    (sent + 1000 + (state >> 20) % 40_000) as i64,
                    outcome,
                )
            });
        }
        let audit = audit(60_000, 100, &[[100_000, 10_000_000, 5_000_000]; 4]);
        let start = std::time::Instant::now();
        let report = audit.replay(&records);
        let took = start.elapsed();
        println!("{}", report.render_text());
        println!("replay of {} records: {took:?}", records.len());
    }
}

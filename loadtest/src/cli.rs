//! The command line: `llm-loadtest http ...` and `llm-loadtest grpc ...`, parsed by clap
//! and then checked into [`Settings`], the one description of a run the rest of the tool
//! reads. Every check that can fail does so here, before a connection is opened, with a
//! message that names the flag — and never echoes an API key.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "llm-loadtest",
    version,
    about = "Load generator for OpenAI-compatible APIs and the llm-ratelimit sidecar",
    after_help = "Exit status: 0 done, 1 the run failed (e.g. a target is unreachable), \
                  2 bad flags, 3 --verify-strict found the limiter wrong."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// OpenAI requests over HTTP/1.1 (Envoy in front of the limiter, or any
    /// OpenAI-compatible server such as mock-upstream).
    Http {
        #[command(flatten)]
        load: Load,
    },
    /// The same load straight at the sidecar's gRPC port, as Envoy would send it.
    Grpc {
        #[command(flatten)]
        load: Load,
        /// Which Envoy API to call: ext_authz `Check` or `ShouldRateLimit`.
        #[arg(long, value_enum)]
        api: Api,
        /// HTTP/2 connections per target; requests are multiplexed over them.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// With `--api authz`: settle each admitted request through ext_proc `Process`, as
        /// Envoy does once the upstream has answered, reporting this many output tokens in
        /// a JSON usage body; the request's latency then ends when its settlement has.
        /// Without it nothing is settled: each admission keeps its output reservation
        /// until its bucket leaves the window.
        #[arg(long)]
        settle_output: Option<u32>,
    },
}

/// The flags both modes share.
#[derive(Args)]
pub struct Load {
    /// Where to send: a base URL (`http://host:port`, optionally with a path prefix) for
    /// `http`, an address (`host:port` or `http://host:port`) for `grpc`. Repeat for
    /// several; each request goes to one chosen at random.
    #[arg(long, required = true)]
    pub target: Vec<String>,
    /// An API key (bearer secret). Repeat for several. Never printed: reports call keys by
    /// their config name with --verify, else key-1, key-2, ...
    #[arg(
        long,
        required = true,
        env = "LLM_LOADTEST_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub key: Vec<String>,
    /// Relative weights of the keys, e.g. `3,1` (default: uniform).
    #[arg(long, value_delimiter = ',')]
    pub key_weights: Option<Vec<u32>>,
    /// How long to send, e.g. `30s`, `500ms`, `2m`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    /// Closed loop: this many requests in flight, each sent as soon as the previous
    /// one on its connection is answered.
    #[arg(long, required_unless_present = "rate", conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: requests per second on a fixed schedule (`200`, `200/s`, `6000/m`);
    /// latency counts from each request's slot, so a slow answer cannot hide the delay
    /// it causes (no coordinated omission).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Open loop: most connections (http) or requests in flight (grpc) opened to keep
    /// the schedule.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Input tokens per request: `N`, or a range `A-B` drawn uniformly.
    #[arg(long, default_value = "100")]
    pub prompt_tokens: PromptTokens,
    /// `max_tokens` (chat, completions) / `max_output_tokens` (responses) to send;
    /// absent: not sent (the limiter then reserves its configured default).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// The OpenAI API to call.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// The `model` field; it also picks the tokenizer for the tool's own token counts.
    /// May repeat: each request picks one at random.
    #[arg(long, default_value = "gpt-4o-mini")]
    pub model: Vec<String>,
    /// Streamed answers (SSE, read to the end; usage from the final chunk).
    #[arg(long)]
    pub stream: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest wait for one answer before it counts as an error.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// After --duration, how long requests still in flight are awaited; those still
    /// unanswered then count as errors.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub grace: Duration,
    /// Seed for the random choices of target, key and prompt (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The limiter's key config: names keys in reports, and replays the admitted
    /// requests against the limits (the limiter's error measured from outside).
    #[arg(long)]
    pub verify: Option<PathBuf>,
    /// Exit 3 when --verify finds the limiter wrong.
    #[arg(long, requires = "verify")]
    pub verify_strict: bool,
    /// Write the summary as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an HTML report with charts.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write the report's charts as SVG files into this directory.
    #[arg(long)]
    pub svg_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// envoy.service.auth.v3.Authorization/Check, with the body as ext_authz sends it.
    Authz,
    /// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit.
    Ratelimit,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Authz => "authz",
            Api::Ratelimit => "ratelimit",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
        }
    }

    /// The path below `/v1`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
        }
    }

    pub fn api(self) -> llm_ratelimit::openai::Endpoint {
        use llm_ratelimit::openai::Endpoint as E;
        match self {
            Endpoint::Chat => E::ChatCompletions,
            Endpoint::Completions => E::Completions,
            Endpoint::Embeddings => E::Embeddings,
            Endpoint::Responses => E::Responses,
        }
    }
}

/// Input tokens per request: fixed, or a uniform range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptTokens {
    pub min: u32,
    pub max: u32,
}

impl FromStr for PromptTokens {
    type Err = String;

    fn from_str(s: &str) -> Result<PromptTokens, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("expected `N` or `A-B` (whole numbers), found `{s}`"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(s)?, number(s)?),
        };
        if min > max {
            return Err(format!("the range `{s}` is empty: {min} > {max}"));
        }
        if max > 1_000_000 {
            return Err(format!(
                "{max} prompt tokens is more than this tool builds (1000000)"
            ));
        }
        Ok(PromptTokens { min, max })
    }
}

/// Loop discipline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// `n` requests in flight, back to back.
    Closed { concurrency: usize },
    /// `rate` requests per second on a fixed schedule, at most `max_in_flight` at once.
    Open { rate: f64, max_in_flight: usize },
}

/// Which runner and its own settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Http,
    Grpc {
        api: Api,
        connections: usize,
        /// Output tokens each admitted `Check` is settled to through ext_proc, if any.
        settle_output: Option<u32>,
    },
}

/// A checked run description.
pub struct Settings {
    pub mode: Mode,
    pub targets: Vec<String>,
    /// The bearer secrets; only the request builders and `--verify` read them.
    pub secrets: Vec<String>,
    pub key_weights: Vec<u32>,
    pub duration: Duration,
    pub pace: Pace,
    pub prompt_tokens: PromptTokens,
    pub max_tokens: Option<u32>,
    pub endpoint: Endpoint,
    /// At least one; each request picks one.
    pub models: Vec<String>,
    pub stream: bool,
    pub threads: usize,
    pub timeout: Duration,
    pub grace: Duration,
    pub seed: Option<u64>,
    pub verify: Option<PathBuf>,
    pub verify_strict: bool,
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub svg_dir: Option<PathBuf>,
}

impl Settings {
    /// Checks what clap cannot. `Err` is a message for the user (exit 2).
    pub fn from_cli(cli: Cli) -> Result<Settings, String> {
        let (load, mode) = match cli.command {
            Command::Http { load } => (load, Mode::Http),
            Command::Grpc {
                load,
                api,
                connections,
                settle_output,
            } => {
                if connections == 0 || connections > 1024 {
                    return Err("--connections must be between 1 and 1024".into());
                }
                if settle_output.is_some() && api != Api::Authz {
                    return Err("--settle-output applies to --api authz only".into());
                }
                if settle_output == Some(0) {
                    return Err("--settle-output must be at least 1".into());
                }
                (
                    load,
                    Mode::Grpc {
                        api,
                        connections,
                        settle_output,
                    },
                )
            }
        };
        if load.target.len() > usize::from(u16::MAX) {
            return Err("too many --target values".into());
        }
        if load.key.len() > usize::from(u16::MAX) {
            return Err("too many --key values".into());
        }
        for (i, key) in load.key.iter().enumerate() {
            // The key goes into an `authorization` header: no spaces or control bytes,
            // which would also let a key inject headers of its own.
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "--key number {} is empty or has characters a header cannot carry \
                     (spaces, control or non-ASCII characters)",
                    i + 1
                ));
            }
        }
        let key_weights = match load.key_weights {
            None => vec![1; load.key.len()],
            Some(w) if w.len() != load.key.len() => {
                return Err(format!(
                    "--key-weights has {} values for {} keys",
                    w.len(),
                    load.key.len()
                ))
            }
            Some(w) if w.contains(&0) => return Err("--key-weights must all be above 0".into()),
            Some(w) if w.iter().map(|&w| u64::from(w)).sum::<u64>() > u64::from(u32::MAX) => {
                return Err("--key-weights add up to more than 4294967295".into())
            }
            Some(w) => w,
        };
        if load.duration.is_zero() || load.duration > Duration::from_secs(24 * 3600) {
            return Err("--duration must be above 0 and at most 24h".into());
        }
        let pace = match (load.concurrency, load.rate) {
            (Some(0), _) => return Err("--concurrency must be at least 1".into()),
            (Some(n), _) if n > 100_000 => {
                return Err("--concurrency above 100000 is not supported".into())
            }
            (Some(concurrency), None) => Pace::Closed { concurrency },
            (None, Some(rate)) => {
                if load.max_in_flight == 0 {
                    return Err("--max-in-flight must be at least 1".into());
                }
                Pace::Open {
                    rate,
                    max_in_flight: load.max_in_flight,
                }
            }
            _ => return Err("give exactly one of --concurrency and --rate".into()),
        };
        if load.endpoint == Endpoint::Embeddings {
            if load.stream {
                return Err("--stream does not apply to --endpoint embeddings".into());
            }
            if load.max_tokens.is_some() {
                return Err("--max-tokens does not apply to --endpoint embeddings".into());
            }
        }
        if load.model.len() > 64 {
            return Err("at most 64 --model values".into());
        }
        if load
            .model
            .iter()
            .any(|m| m.is_empty() || m.contains(['"', '\\']))
        {
            return Err("--model must be a plain model name".into());
        }
        let threads = match load.threads {
            Some(0) => return Err("--threads must be at least 1".into()),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if load.timeout.is_zero() {
            return Err("--timeout must be above 0".into());
        }
        Ok(Settings {
            mode,
            targets: load.target,
            secrets: load.key,
            key_weights,
            duration: load.duration,
            pace,
            prompt_tokens: load.prompt_tokens,
            max_tokens: load.max_tokens,
            endpoint: load.endpoint,
            models: load.model,
            stream: load.stream,
            threads,
            timeout: load.timeout,
            grace: load.grace,
            seed: load.seed,
            verify: load.verify,
            verify_strict: load.verify_strict,
            json: load.json,
            html: load.html,
            svg_dir: load.svg_dir,
        })
    }
}

/// `30s`, `500ms`, `2m`, `1.5s`, `1h`: one number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit: write e.g. `30s` or `500ms`"))?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("expected a duration such as `30s` or `500ms`, found `{s}`"))?;
    let seconds = match unit {
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit in `{s}`: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{s}` is out of range"))
}

/// `200`, `200/s`, `6000/m`: requests per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let (number, per) = s.split_once('/').unwrap_or((s, "s"));
    let number: f64 = number
        .parse()
        .map_err(|_| format!("expected a rate such as `200/s`, found `{s}`"))?;
    let per_second = match per {
        "s" => number,
        "m" => number / 60.0,
        _ => return Err(format!("unknown unit in `{s}`: use /s or /m")),
    };
    if !(per_second.is_finite() && per_second > 0.0 && per_second <= 10_000_000.0) {
        return Err(format!(
            "the rate `{s}` must be above 0 and at most 10000000/s"
        ));
    }
    Ok(per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200"), Ok(200.0));
        assert_eq!(parse_rate("200/s"), Ok(200.0));
        assert_eq!(parse_rate("600/m"), Ok(10.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("5/h").is_err());
    }

    #[test]
    fn prompt_tokens() {
        assert_eq!("64".parse(), Ok(PromptTokens { min: 64, max: 64 }));
        assert_eq!("10-20".parse(), Ok(PromptTokens { min: 10, max: 20 }));
        assert!("20-10".parse::<PromptTokens>().is_err());
        assert!("x".parse::<PromptTokens>().is_err());
    }

    fn settings(args: &[&str]) -> Result<Settings, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        Settings::from_cli(cli)
    }

    #[test]
    fn a_bad_key_is_refused_without_being_echoed() {
        let base = ["llm-loadtest", "http", "--target", "http://127.0.0.1:1"];
        let mut args = base.to_vec();
        args.extend([
            "--key",
            "sk-se cret",
            "--duration",
            "1s",
            "--concurrency",
            "1",
        ]);
        let e = settings(&args).err().unwrap_or_default();
        assert!(e.contains("--key number 1"), "{e}");
        assert!(!e.contains("cret"), "{e}");
    }

    #[test]
    fn weights_must_match_keys() {
        let e = settings(&[
            "llm-loadtest",
            "http",
            "--target",
            "http://127.0.0.1:1",
            "--key",
            "a",
            "--key",
            "b",
            "--key-weights",
            "1",
            "--duration",
            "1s",
            "--rate",
            "5",
        ])
        .err()
        .unwrap_or_default();
        assert!(e.contains("--key-weights has 1 values for 2 keys"), "{e}");
    }
}

//! What gets sent, decided before the first request: the request bodies (one per prompt
//! size drawn from `--prompt-tokens`), their input tokens as the limiter's own tokenizer
//! counts them, and the random choice of target, key and body for each request.
//!
//! The runners turn these bodies into their wire form once (HTTP request bytes, encoded
//! protobuf), so the hot path only picks three indexes and writes bytes it already has.

use bytes::Bytes;
use llm_ratelimit::openai::Tokenizer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::cli::{Endpoint, PromptTokens, Settings};
use crate::record::{Outcome, Record};
use crate::response::Seen;

/// Most distinct bodies built for a `--prompt-tokens` range.
const MAX_VARIANTS: u32 = 16;

/// Filler text: each word is one token in o200k_base and cl100k_base, and the
/// tokenizers' pre-split keeps words (each starting with a space) apart, so `n` words
/// count as `n` tokens.
const WORDS: [&str; 16] = [
    " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and", " then",
    " it", " runs", " back", " to", " its",
];

/// One prebuilt body.
pub struct Variant {
    /// The JSON body.
    pub body: Bytes,
    /// Index of its model in `--model`.
    pub model: u16,
    /// Its input tokens, counted as the limiter counts them.
    pub prompt_tokens: u32,
}

/// Everything the runners send, indexed by [`Pick`].
pub struct Plan {
    pub variants: Vec<Variant>,
    /// `max_tokens` sent, 0 when none is.
    pub max_tokens: u32,
    pub picker: Picker,
}

/// One request's choices: indexes into the targets, the keys and [`Plan::variants`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub target: u16,
    pub key: u16,
    pub variant: u16,
}

/// Draws a [`Pick`]: target uniform, key by weight, body uniform.
pub struct Picker {
    targets: u16,
    variants: u16,
    /// Running sums of the key weights; `None` when uniform.
    cumulative: Option<Vec<u32>>,
    keys: u16,
}

impl Picker {
    pub fn new(targets: usize, weights: &[u32], variants: usize) -> Picker {
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let cumulative = (!uniform).then(|| {
            weights
                .iter()
                .scan(0u32, |sum, &w| {
                    *sum += w;
                    Some(*sum)
                })
                .collect()
        });
        Picker {
            targets: targets as u16,
            variants: variants as u16,
            cumulative,
            keys: weights.len() as u16,
        }
    }

    pub fn pick(&self, rng: &mut SmallRng) -> Pick {
        let index = |rng: &mut SmallRng, n: u16| {
            if n <= 1 {
                0
            } else {
                rng.random_range(0..n)
            }
        };
        let key = match &self.cumulative {
            None => index(rng, self.keys),
            Some(sums) => {
                let total = sums.last().copied().unwrap_or(1);
                let x = rng.random_range(0..total);
                sums.partition_point(|&s| s <= x) as u16
            }
        };
        Pick {
            target: index(rng, self.targets),
            key,
            variant: index(rng, self.variants),
        }
    }
}

/// A random generator for one worker: from `--seed` when given (worker `n` gets its own
/// stream), else from the OS.
pub fn rng(seed: Option<u64>, worker: usize) -> SmallRng {
    match seed {
        Some(seed) => {
            SmallRng::seed_from_u64(seed ^ (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        }
        None => SmallRng::from_os_rng(),
    }
}

impl Plan {
    /// The record of one request, from what its runner saw: latency counts from
    /// `intended_us` (a request is never sent before its slot), a limit named only on a
    /// 429, the tool's own prompt count when the answer carried no usage, and the output
    /// reservation it asked for.
    pub fn record(
        &self,
        pick: Pick,
        intended_us: u64,
        (sent_us, done_us): (u64, u64),
        status: u16,
        seen: Seen,
    ) -> Record {
        let outcome = Outcome::of_status(status);
        Record {
            target: pick.target,
            key: pick.key,
            model: self.variants[usize::from(pick.variant)].model,
            intended_us,
            sent_us: sent_us.max(intended_us),
            done_us,
            outcome,
            status,
            denied_by: seen.denied_by.filter(|_| outcome == Outcome::RateLimited),
            denied_in: seen.denied_in.filter(|_| outcome == Outcome::RateLimited),
            prompt_tokens: seen
                .prompt_tokens
                .unwrap_or(self.variants[usize::from(pick.variant)].prompt_tokens),
            completion_tokens: seen.completion_tokens.unwrap_or(0),
            max_tokens: self.max_tokens,
        }
    }

    /// Builds the bodies. Counting tokens takes the tokenizer's start-up (~0.2 s) plus a
    /// few counts per body.
    pub fn build(settings: &Settings) -> anyhow::Result<Plan> {
        let tokenizer = Tokenizer::new();
        let sizes = sizes(settings.prompt_tokens);
        // Every model with every prompt size: a uniform pick of a body is a uniform pick
        // of a model.
        let mut variants = Vec::with_capacity(sizes.len() * settings.models.len());
        for (m, model) in settings.models.iter().enumerate() {
            for &target in &sizes {
                variants.push(fit(&tokenizer, settings, m as u16, model, target)?);
            }
        }
        Ok(Plan {
            picker: Picker::new(
                settings.targets.len(),
                &settings.key_weights,
                variants.len(),
            ),
            variants,
            max_tokens: settings.max_tokens.unwrap_or(0),
        })
    }
}

/// The prompt sizes to build: evenly spread over the range.
fn sizes(range: PromptTokens) -> Vec<u32> {
    let span = range.max - range.min;
    let n = (span + 1).min(MAX_VARIANTS);
    if n == 1 {
        return vec![range.min];
    }
    (0..n)
        .map(|i| range.min + (u64::from(span) * u64::from(i) / u64::from(n - 1)) as u32)
        .collect()
}

/// `n` filler words.
fn filler(n: u32) -> String {
    let mut text = String::with_capacity(n as usize * 6);
    for i in 0..n as usize {
        text.push_str(WORDS[i % WORDS.len()]);
    }
    text.trim_start().to_string()
}

/// The body for `settings` with `words` words of prompt, for `model`.
fn body(settings: &Settings, model: &str, words: u32) -> Value {
    let text = filler(words);
    let mut body = match settings.endpoint {
        Endpoint::Chat => json!({"model": model, "messages": [{"role": "user", "content": text}]}),
        Endpoint::Completions => json!({"model": model, "prompt": text}),
        Endpoint::Embeddings => json!({"model": model, "input": text}),
        Endpoint::Responses => json!({"model": model, "input": text}),
    };
    if let Some(max) = settings.max_tokens {
        let field = match settings.endpoint {
            Endpoint::Responses => "max_output_tokens",
            _ => "max_tokens",
        };
        body[field] = json!(max);
    }
    if settings.stream {
        body["stream"] = json!(true);
        if matches!(settings.endpoint, Endpoint::Chat | Endpoint::Completions) {
            // Usage comes only in a final chunk, and only when asked for.
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    body
}

/// The body whose input tokens come closest to `target` (exact, unless `target` is
/// below the request's fixed overhead, e.g. chat's per-message tokens).
fn fit(
    tokenizer: &Tokenizer,
    settings: &Settings,
    m: u16,
    model: &str,
    target: u32,
) -> anyhow::Result<Variant> {
    let endpoint = settings.endpoint.api();
    let count = |words: u32| -> anyhow::Result<(Vec<u8>, u32)> {
        let body = serde_json::to_vec(&body(settings, model, words))?;
        let request = tokenizer.understand(endpoint, &body).map_err(|e| {
            anyhow::anyhow!(
                "the tool built a request the tokenizer refuses: {}",
                e.message
            )
        })?;
        Ok((
            body,
            u32::try_from(request.input_tokens).unwrap_or(u32::MAX),
        ))
    };
    let (mut best, mut best_tokens) = count(0)?;
    let overhead = best_tokens;
    let mut words = target.saturating_sub(overhead);
    // Words are one token each, so one correction normally lands exactly; a few rounds
    // cover an encoding that merges differently.
    for _ in 0..4 {
        if words == 0 || best_tokens == target {
            break;
        }
        let (body, tokens) = count(words)?;
        if tokens.abs_diff(target) < best_tokens.abs_diff(target) {
            (best, best_tokens) = (body, tokens);
        }
        if tokens == target {
            break;
        }
        words = (i64::from(words) + i64::from(target) - i64::from(tokens)).max(1) as u32;
    }
    Ok(Variant {
        body: Bytes::from(best),
        model: m,
        prompt_tokens: best_tokens,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn settings(extra: &[&str]) -> Settings {
        let mut args = vec![
            "llm-loadtest",
            "http",
            "--target",
            "http://127.0.0.1:1",
            "--key",
            "k",
            "--duration",
            "1s",
            "--concurrency",
            "1",
        ];
        args.extend(extra);
        Settings::from_cli(Cli::try_parse_from(args).unwrap()).unwrap()
    }

    #[test]
    fn bodies_carry_exactly_the_prompt_tokens_asked_for() {
        let tokenizer = Tokenizer::new();
        for extra in [
            &["--endpoint", "chat", "--stream", "--max-tokens", "9"][..],
            &["--endpoint", "completions"],
            &[
                "--endpoint",
                "embeddings",
                "--model",
                "text-embedding-3-small",
            ],
            &[
                "--endpoint",
                "responses",
                "--model",
                "gpt-4",
                "--max-tokens",
                "9",
            ],
        ] {
            let settings = settings(extra);
            for target in [20, 137, 1000] {
                let v = fit(&tokenizer, &settings, 0, &settings.models[0], target).unwrap();
                assert_eq!(v.prompt_tokens, target, "{extra:?}");
                let request = tokenizer
                    .understand(settings.endpoint.api(), &v.body)
                    .unwrap();
                assert_eq!(request.input_tokens, u64::from(target));
                assert_eq!(request.stream, settings.stream);
                assert_eq!(
                    request.max_output_tokens,
                    settings.max_tokens.map(u64::from)
                );
            }
        }
        // Below chat's per-message overhead: the smallest body there is.
        let v = fit(&tokenizer, &settings(&[]), 0, "gpt-4o-mini", 1).unwrap();
        assert!(
            v.prompt_tokens > 1 && v.prompt_tokens < 12,
            "{}",
            v.prompt_tokens
        );
    }

    #[test]
    fn sizes_spread_over_the_range() {
        assert_eq!(sizes(PromptTokens { min: 7, max: 7 }), vec![7]);
        assert_eq!(sizes(PromptTokens { min: 1, max: 3 }), vec![1, 2, 3]);
        let s = sizes(PromptTokens {
            min: 100,
            max: 2000,
        });
        assert_eq!(s.len(), MAX_VARIANTS as usize);
        assert_eq!((s[0], s[s.len() - 1]), (100, 2000));
    }

    #[test]
    fn weighted_keys_follow_their_weights() {
        let picker = Picker::new(2, &[3, 1], 1);
        let mut rng = rng(Some(7), 0);
        let mut keys = [0u32; 2];
        let mut targets = [0u32; 2];
        for _ in 0..40_000 {
            let p = picker.pick(&mut rng);
            keys[usize::from(p.key)] += 1;
            targets[usize::from(p.target)] += 1;
        }
        let share = f64::from(keys[0]) / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "{keys:?}");
        assert!(targets[0].abs_diff(targets[1]) < 2_000, "{targets:?}");
    }
}

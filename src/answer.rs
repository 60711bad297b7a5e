//! What a client sees: the one mapping from an admission outcome to an HTTP status,
//! OpenAI-format error body and `x-ratelimit-*` headers. HTTP (`/v1/check`) and Envoy
//! (ext_authz) both render an [`Answer`]; neither builds bodies of its own.

use serde_json::json;

use crate::engine::{KeyName, LimitKind, Limits, Snapshot, Usage};

/// A status, headers and (for errors) an OpenAI error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// JSON text; empty for an admission.
    pub body: String,
}

fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> String {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}}).to_string()
}

impl Answer {
    fn error(
        status: u16,
        message: &str,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: error_body(message, kind, param, code),
        }
    }

    /// 401: no bearer key, or one no key in the config has. The presented key is never echoed.
    pub fn invalid_api_key(missing: bool) -> Answer {
        let message = if missing {
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        } else {
            "Incorrect API key provided. You can find your API key in your account settings."
        };
        Answer::error(
            401,
            message,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        )
    }

    /// 400: not a valid OpenAI request for its path.
    pub fn invalid_request(message: &str, param: Option<&str>) -> Answer {
        Answer::error(400, message, "invalid_request_error", param, None)
    }

    /// 413: a body over the configured size.
    pub fn body_too_large(limit: usize) -> Answer {
        let message =
            format!("The request body is larger than the {limit} bytes this endpoint accepts.");
        Answer::error(
            413,
            &message,
            "invalid_request_error",
            None,
            Some("request_too_large"),
        )
    }

    /// 503: the store could not decide; nothing was counted.
    /// 503 while the store fails under `on_store_error: deny`; a retry after a second
    /// meets a store the breaker has probed several times since.
    pub fn store_unavailable() -> Answer {
        let mut a = Answer::error(
            503,
            "The rate limiter is temporarily unavailable. Please retry your request.",
            "server_error",
            None,
            Some("rate_limiter_unavailable"),
        );
        a.headers.push(("retry-after", "1".into()));
        a.headers.push(("retry-after-ms", "1000".into()));
        a
    }

    /// 404: a request the limiter cannot meter, refused so that it never reaches the
    /// upstream uncounted (`unknown_endpoints: deny`). Worded as OpenAI words an unknown URL.
    pub fn unknown_endpoint(method: &str) -> Answer {
        let message = format!(
            "Invalid URL ({method}): this gateway meters only /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses (and their Azure OpenAI deployment forms)."
        );
        Answer::error(
            404,
            &message,
            "invalid_request_error",
            None,
            Some("unknown_url"),
        )
    }

    pub fn not_found(what: &str) -> Answer {
        Answer::error(404, what, "invalid_request_error", None, Some("not_found"))
    }

    /// 200 for an admitted request: the `x-ratelimit-*` headers after this request.
    pub fn admitted(limits: &Limits, snapshot: &Snapshot) -> Answer {
        Answer {
            status: 200,
            headers: rate_limit_headers(limits, snapshot),
            body: String::new(),
        }
    }

    /// 429 for a request the key's own limits denied. `retry_after_ms` of `None` means
    /// it can never fit.
    pub fn rate_limited(
        key: &KeyName,
        limits: &Limits,
        snapshot: &Snapshot,
        limit: LimitKind,
        want: &Usage,
        retry_after_ms: Option<u64>,
    ) -> Answer {
        Answer::rate_limited_in(
            key.as_str(),
            (limits, snapshot),
            limit,
            want,
            retry_after_ms,
            (limits, snapshot),
        )
    }

    /// 429 for a request one of its limits denied: `who` names the key and, when the
    /// limit is not the key's own per window, which one (`team-a (model gpt-4o)`,
    /// `team-a (pool research)`); `denied` is that limit and its window; the
    /// `x-ratelimit-*` headers describe `headline` (see [`headline`]).
    pub fn rate_limited_in(
        who: &str,
        denied: (&Limits, &Snapshot),
        limit: LimitKind,
        want: &Usage,
        retry_after_ms: Option<u64>,
        headline: (&Limits, &Snapshot),
    ) -> Answer {
        let (limits, snapshot) = denied;
        let (l, u, r) = (limits.of(limit), snapshot.usage.of(limit), want.of(limit));
        let mut headers = vec![("content-type", "application/json".to_string())];
        let message = match retry_after_ms {
            Some(ms) => {
                headers.push(("retry-after", ms.div_ceil(1000).to_string()));
                headers.push(("retry-after-ms", ms.to_string()));
                format!(
                    "Rate limit reached for {who} on {}: Limit {l}, Used {u}, Requested {r}. Please try again in {}.",
                    limit.as_str(),
                    go_duration(ms)
                )
            }
            None => {
                headers.push(("x-should-retry", "false".into()));
                format!(
                    "Request too large for {who} on {}: Limit {l}, Requested {r}. The input or output tokens must be reduced in order to run successfully.",
                    limit.as_str()
                )
            }
        };
        headers.extend(rate_limit_headers(headline.0, headline.1));
        Answer {
            status: 429,
            headers,
            body: error_body(&message, limit.as_str(), None, Some("rate_limit_exceeded")),
        }
    }
}

/// Of several per-window limits (a key's own, its model entry's, its pool's), for each of
/// requests, input tokens and output tokens the one with the least room left: what the
/// `x-ratelimit-*` headers describe. Empty `rings` gives nothing counted and no limit.
pub fn headline(rings: &[(Limits, Snapshot)]) -> (Limits, Snapshot) {
    let mut limits = [0u64; 3];
    let mut used = [0u64; 3];
    let mut reset = [0u64; 3];
    let now_ms = rings.first().map_or(0, |(_, s)| s.now_ms);
    for kind in LimitKind::ALL {
        let k = kind as usize;
        let tightest = rings
            .iter()
            .min_by_key(|(l, s)| l.of(kind).saturating_sub(s.usage.of(kind)));
        if let Some((l, s)) = tightest {
            limits[k] = l.of(kind);
            used[k] = s.usage.of(kind);
            reset[k] = s.reset_ms[k];
        }
    }
    (
        Limits {
            requests: limits[0],
            input_tokens: limits[1],
            output_tokens: limits[2],
        },
        Snapshot {
            now_ms,
            usage: Usage {
                requests: used[0],
                input_tokens: used[1],
                output_tokens: used[2],
            },
            reset_ms: reset,
        },
    )
}

/// Per limit `x-ratelimit-{limit,remaining,reset}-{requests,input-tokens,output-tokens}`,
/// and OpenAI's own `-tokens` trio for the token limit with the least room left.
pub fn rate_limit_headers(limits: &Limits, snapshot: &Snapshot) -> Vec<(&'static str, String)> {
    const NAMES: [[&str; 3]; 3] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-input-tokens",
            "x-ratelimit-remaining-input-tokens",
            "x-ratelimit-reset-input-tokens",
        ],
        [
            "x-ratelimit-limit-output-tokens",
            "x-ratelimit-remaining-output-tokens",
            "x-ratelimit-reset-output-tokens",
        ],
    ];
    let mut headers = Vec::with_capacity(12);
    let remaining = |k: LimitKind| limits.of(k).saturating_sub(snapshot.usage.of(k));
    for (kind, names) in LimitKind::ALL.into_iter().zip(NAMES) {
        headers.push((names[0], limits.of(kind).to_string()));
        headers.push((names[1], remaining(kind).to_string()));
        headers.push((
            names[2],
            go_duration(snapshot.reset(kind).as_millis() as u64),
        ));
    }
    // Least room as a share of the limit: input vs output.
    let share = |k: LimitKind| remaining(k) as f64 / limits.of(k).max(1) as f64;
    let tightest = if share(LimitKind::OutputTokens) < share(LimitKind::InputTokens) {
        LimitKind::OutputTokens
    } else {
        LimitKind::InputTokens
    };
    headers.push(("x-ratelimit-limit-tokens", limits.of(tightest).to_string()));
    headers.push((
        "x-ratelimit-remaining-tokens",
        remaining(tightest).to_string(),
    ));
    headers.push((
        "x-ratelimit-reset-tokens",
        go_duration(snapshot.reset(tightest).as_millis() as u64),
    ));
    headers
}

/// A duration as Go prints it: `0s`, `12ms`, `1.2s`, `6m0s`, `1h2m3.5s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut secs = s.to_string();
    if frac > 0 {
        secs.push_str(format!(".{frac:03}").trim_end_matches('0'));
    }
    match (h, m) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(12), "12ms");
        assert_eq!(go_duration(1200), "1.2s");
        assert_eq!(go_duration(1234), "1.234s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(61_500), "1m1.5s");
        assert_eq!(go_duration(3_723_000), "1h2m3s");
    }

    fn snapshot(usage: [u64; 3], reset_ms: [u64; 3]) -> Snapshot {
        Snapshot {
            now_ms: 0,
            usage: Usage {
                requests: usage[0],
                input_tokens: usage[1],
                output_tokens: usage[2],
            },
            reset_ms,
        }
    }

    #[test]
    fn a_429_names_the_limit_and_when_to_retry() {
        let limits = Limits {
            requests: 10,
            input_tokens: 1000,
            output_tokens: 500,
        };
        let key = KeyName::new("team-a").unwrap();
        let want = Usage {
            requests: 1,
            input_tokens: 300,
            output_tokens: 100,
        };
        let a = Answer::rate_limited(
            &key,
            &limits,
            &snapshot([4, 800, 100], [1, 2, 3]),
            LimitKind::InputTokens,
            &want,
            Some(1234),
        );
        assert_eq!(a.status, 429);
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            body["error"]["message"],
            "Rate limit reached for team-a on input_tokens: Limit 1000, Used 800, Requested 300. Please try again in 1.234s."
        );
        assert_eq!(body["error"]["type"], "input_tokens");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert!(body["error"]["param"].is_null());
        let h = |n: &str| {
            a.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("retry-after"), Some("2"));
        assert_eq!(h("retry-after-ms"), Some("1234"));
        assert_eq!(h("x-should-retry"), None);
        assert_eq!(h("x-ratelimit-remaining-requests"), Some("6"));
        assert_eq!(h("x-ratelimit-remaining-input-tokens"), Some("200"));
        assert_eq!(h("x-ratelimit-reset-output-tokens"), Some("3ms"));
        // input has 20% left, output 80%: the -tokens trio follows input.
        assert_eq!(h("x-ratelimit-limit-tokens"), Some("1000"));
        assert_eq!(h("x-ratelimit-remaining-tokens"), Some("200"));
    }

    #[test]
    fn headers_describe_the_per_window_limit_with_least_room() {
        let own = Limits {
            requests: 600,
            input_tokens: 200_000,
            output_tokens: 50_000,
        };
        let model = Limits {
            requests: 100,
            input_tokens: crate::config::Config::UNLIMITED,
            output_tokens: crate::config::Config::UNLIMITED,
        };
        let pool = Limits {
            requests: 2000,
            input_tokens: 100_000,
            output_tokens: 200_000,
        };
        let (l, s) = headline(&[
            (own, snapshot([10, 1000, 100], [5, 6, 7])),
            (model, snapshot([10, 1000, 100], [8, 9, 10])),
            (pool, snapshot([1990, 99_000, 100], [11, 12, 13])),
        ]);
        // requests: the pool has 10 left, the model 90, the key 590.
        assert_eq!(
            (l.requests, s.usage.requests, s.reset_ms[0]),
            (2000, 1990, 11)
        );
        // input: the pool's 1,000 left.
        assert_eq!((l.input_tokens, s.reset_ms[1]), (100_000, 12));
        // output: the key's own 49,900 left.
        assert_eq!(
            (l.output_tokens, s.usage.output_tokens, s.reset_ms[2]),
            (50_000, 100, 7)
        );
        let a = Answer::rate_limited_in(
            "team-a (model gpt-4o)",
            (&model, &snapshot([100, 0, 0], [1, 0, 0])),
            LimitKind::Requests,
            &Usage {
                requests: 1,
                input_tokens: 0,
                output_tokens: 0,
            },
            Some(1500),
            (&l, &s),
        );
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            body["error"]["message"],
            "Rate limit reached for team-a (model gpt-4o) on requests: Limit 100, Used 100, Requested 1. Please try again in 1.5s."
        );
        assert!(a
            .headers
            .contains(&("x-ratelimit-remaining-requests", "10".to_string())));
    }

    #[test]
    fn a_request_that_can_never_fit_says_not_to_retry() {
        let limits = Limits {
            requests: 10,
            input_tokens: 1000,
            output_tokens: 500,
        };
        let key = KeyName::new("k").unwrap();
        let want = Usage {
            requests: 1,
            input_tokens: 10,
            output_tokens: 501,
        };
        let a = Answer::rate_limited(
            &key,
            &limits,
            &snapshot([0; 3], [0; 3]),
            LimitKind::OutputTokens,
            &want,
            None,
        );
        assert!(a
            .body
            .contains("Request too large for k on output_tokens: Limit 500, Requested 501."));
        assert!(a.headers.contains(&("x-should-retry", "false".into())));
        assert!(!a.headers.iter().any(|(k, _)| *k == "retry-after"));
    }
}

//! `Config::parse` on any UTF-8 text an operator (or a broken ConfigMap) can produce: never
//! panics; what it accepts holds the invariants the server relies on; and no error, nor
//! the parsed config's debug form, repeats a bearer secret written in the file.
//!
//! `$K` in the input stands for a known secret, so seeds can put it where real secrets go
//! (`key: $K`). The secret check applies when every occurrence of it is on a line of its
//! own as `key: <secret>` (block style): text elsewhere (a name, a duration) is no secret
//! and may rightly be quoted back.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llm_ratelimit::config::Config;

const SECRET: &str = "sk-fuzz-5ecret-Q7x";

/// Every line that holds the secret is `key: <secret>` or `- key: <secret>`.
fn secret_only_in_key_lines(text: &str) -> bool {
    text.lines()
        .filter(|line| line.contains(SECRET))
        .all(|line| {
            let line = line.trim();
            let line = line.strip_prefix("- ").map_or(line, str::trim_start);
            line.strip_prefix("key:").map(str::trim) == Some(SECRET)
        })
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let text = input.replace("$K", SECRET);
    let check_secret = text.contains(SECRET) && secret_only_in_key_lines(&text);
    match Config::parse(&text, "fuzz.yaml") {
        Ok(config) => {
            let (window, precision) = (config.window(), config.precision());
            assert!(precision > Duration::ZERO && precision < Duration::from_secs(1));
            assert!(window >= precision);
            assert_eq!(window.as_nanos() % precision.as_nanos(), 0);
            assert_eq!(config.shape().window_ms() as u128, window.as_millis());
            assert_eq!(config.shape().precision_ms() as u128, precision.as_millis());
            assert!(config.default_max_output_tokens() > 0);
            assert!(config.max_body_bytes() > 0);
            for key in config.keys() {
                let found = config.key_by_name(key.name.as_str());
                assert_eq!(found, Some(key), "names are unique and found");
                let limits = key.limits;
                assert!(limits.requests > 0 && limits.input_tokens > 0 && limits.output_tokens > 0);
            }
            if check_secret {
                assert!(!format!("{config:?}").contains(SECRET));
            }
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            if check_secret {
                let shown = e.to_string();
                assert!(!shown.contains(SECRET), "secret in the error: {shown}");
                assert!(!format!("{e:?}").contains(SECRET));
            }
        }
    }
});

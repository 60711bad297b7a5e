//! Key configuration: the YAML file that says which bearer secrets exist, the name
//! each one is known by, and its limits: its own per window, and when it has them its
//! `per_day`, its `models` entries and its pool's. [`Config::limits_for`] gives every
//! limit set that applies to a request.
//!
//! [`Config::parse`] is the only way in: it validates everything and reports the first
//! problem with its file, line and column ([`ConfigError`]). The same parser serves
//! `serve` and `check-config`. A parsed `Config` holds no secret, only SHA-256 digests,
//! so it can be cloned, compared and logged freely. [`watch`] reloads it while the
//! server runs.

mod applied;
mod duration;
mod error;
mod parse;
pub mod watch;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::engine::failover::OnStoreError;
use crate::engine::{KeyName, Limits, ModelMatch, WindowShape};

pub use applied::{Applied, LimitScope};
pub use duration::parse_duration;
pub use error::ConfigError;
pub use parse::field_names;
pub use watch::{spawn_watcher, ReloadOutcome};

/// One API key as the limiter sees it: a stable name and its limits. The secret is
/// not here; lookups go through [`Config::key_by_secret`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub name: KeyName,
    /// Per window (`window`, a minute by default).
    pub limits: Limits,
    /// Per 24 hours, in buckets of a minute; `None` when the key has none.
    pub per_day: Option<Limits>,
    /// Limits per model, on top of the key's own; no two entries match one model.
    pub models: Vec<ModelLimits>,
    /// The pool the key also counts against.
    pub pool: Option<KeyName>,
}

/// One `models` entry: the models it matches and their limits per window. A limit the
/// entry leaves out is [`Config::UNLIMITED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    pub matches: ModelMatch,
    pub limits: Limits,
}

/// A pool: limits shared by every key that names it. A limit it leaves out is
/// [`Config::UNLIMITED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: KeyName,
    /// Per window; `None` when the pool sets only `per_day`.
    pub limits: Option<Limits>,
    pub per_day: Option<Limits>,
}

/// What admission does with a `POST` to a path it cannot meter (CONTRACT §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownEndpoints {
    /// Refuse it with 404, counting nothing: no request reaches the upstream uncounted.
    Deny,
    /// Forward it, counting one request and no tokens.
    Count,
}

/// A validated configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    window: Duration,
    precision: Duration,
    shape: WindowShape,
    default_max_output_tokens: u64,
    max_body_bytes: usize,
    unknown_endpoints: UnknownEndpoints,
    /// What a node does while the store fails (CONTRACT §8).
    on_store_error: OnStoreError,
    /// Azure OpenAI deployment name → the model it serves (picks the tokenizer).
    azure_deployments: HashMap<String, String>,
    keys: Vec<KeySpec>,
    pools: Vec<PoolSpec>,
    /// SHA-256 of each secret → index into `keys`.
    by_digest: HashMap<[u8; 32], usize>,
    by_name: HashMap<String, usize>,
}

impl Config {
    pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
    pub(crate) const DEFAULT_PRECISION: Duration = Duration::from_millis(100);
    pub(crate) const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 1024;
    pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
    /// Most buckets one window may have: bounds every ring's memory and work.
    pub const MAX_BUCKETS: u64 = 36_000;
    /// Largest `max_body_bytes`: tokenizing is linear in the body, so this bounds the work
    /// one admission can ask for.
    pub const MAX_BODY_BYTES_BOUND: usize = 64 * 1024 * 1024;
    /// Largest limit: the Lua scripts count in doubles, exact below 2^53; this leaves room
    /// for a window's total plus one request.
    pub const MAX_LIMIT: u64 = 1_000_000_000_000_000;
    /// A limit a `per_day`, `models` or pool entry leaves out: above every limit one can
    /// set, so it never denies (and `/v1/usage` shows it as `null`).
    pub const UNLIMITED: u64 = Self::MAX_LIMIT + 1;
    /// Most `models` entries one key may have: bounds `/v1/usage` and the config's size.
    pub const MAX_MODELS: usize = 64;

    /// Parses and validates `text`; `origin` is the path shown in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        parse::parse(text, origin)
    }

    /// Reads and parses the file at `path`. A read failure is a `ConfigError` with no
    /// location.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::unlocated(&origin, format!("cannot read config: {e}")))?;
        Config::parse(&text, &origin)
    }

    /// Length of the sliding window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Width of one bucket of the window: the window's error bound.
    pub fn precision(&self) -> Duration {
        self.precision
    }

    /// The window as the stores count it.
    pub fn shape(&self) -> WindowShape {
        self.shape
    }

    /// Output tokens reserved for a request that sets no maximum.
    pub fn default_max_output_tokens(&self) -> u64 {
        self.default_max_output_tokens
    }

    /// Largest request body accepted; larger ones are answered 413.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// What to do with a `POST` the limiter cannot meter.
    pub fn unknown_endpoints(&self) -> UnknownEndpoints {
        self.unknown_endpoints
    }

    /// What a node does while the store fails: deny, allow, or decide locally.
    pub fn on_store_error(&self) -> OnStoreError {
        self.on_store_error
    }

    /// The model an Azure OpenAI deployment serves, when the config maps it (by its exact
    /// name).
    pub fn azure_model(&self, deployment: &str) -> Option<&str> {
        self.azure_deployments.get(deployment).map(String::as_str)
    }

    /// The keys in file order.
    pub fn keys(&self) -> &[KeySpec] {
        &self.keys
    }

    /// The key whose secret is `secret`. The secret is hashed and the digest looked up,
    /// so no comparison ever runs over the secret's bytes and stops at its first
    /// difference.
    pub fn key_by_secret(&self, secret: &str) -> Option<&KeySpec> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest).map(|&i| &self.keys[i])
    }

    /// The key called `name`.
    pub fn key_by_name(&self, name: &str) -> Option<&KeySpec> {
        self.by_name.get(name).map(|&i| &self.keys[i])
    }

    /// The pools in file order.
    pub fn pools(&self) -> &[PoolSpec] {
        &self.pools
    }

    /// The pool called `name`.
    pub fn pool_by_name(&self, name: &str) -> Option<&PoolSpec> {
        self.pools.iter().find(|p| p.name.as_str() == name)
    }
}

/// Shows everything but the digests: a digest of a weak secret can be brute-forced, so
/// it has no place in logs either.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("window", &self.window)
            .field("precision", &self.precision)
            .field("default_max_output_tokens", &self.default_max_output_tokens)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("unknown_endpoints", &self.unknown_endpoints)
            .field("on_store_error", &self.on_store_error)
            .field("azure_deployments", &self.azure_deployments)
            .field("keys", &self.keys)
            .field("pools", &self.pools)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reads_the_example_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/example.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.window(), Duration::from_secs(60));
        assert_eq!(config.keys().len(), 2);
        assert_eq!(
            config
                .key_by_secret("sk-test-tier-b")
                .unwrap()
                .name
                .as_str(),
            "team-b"
        );
        assert_eq!(config.key_by_name("team-b").unwrap().limits.requests, 60);
    }

    #[test]
    fn load_failure_is_an_unlocated_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.yaml");
        let err = Config::load(&path).unwrap_err();
        assert_eq!((err.line, err.column), (0, 0));
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}: cannot read config: ", path.display())),
            "{shown}"
        );
    }

    #[test]
    fn load_reports_errors_against_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "keys: []\nprecision: 2s\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2:12: precision must be less than 1s, got `2s`",
                path.display()
            )
        );
    }
}

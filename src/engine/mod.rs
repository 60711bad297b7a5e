//! The sliding-window engine: three limits per key, checked and reserved in one atomic
//! step, settled once after the response. It knows nothing of HTTP, gRPC or OpenAI.

use std::fmt;
use std::sync::Arc;

/// The three per-key limits, each per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limits {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A key's stable, non-secret name: used in store keys, metrics, logs and headers.
/// Validated by config to `[A-Za-z0-9._-]{1,64}`, so it can sit inside a Redis hash tag.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName(Arc<str>);

impl KeyName {
    /// Builds a name, or says why it is not one.
    pub fn new(name: &str) -> Result<KeyName, String> {
        if name.is_empty() || name.len() > 64 {
            return Err(format!("key name must be 1 to 64 characters, got {}", name.len()));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "key name may contain only letters, digits, '.', '_' and '-', found {bad:?}"
            ));
        }
        Ok(KeyName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({})", self.0)
    }
}

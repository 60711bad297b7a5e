//! From YAML text to a validated [`Config`].
//!
//! Two steps: serde reads the text into `Raw*` structs that mirror the file and keep
//! each value's location (`Spanned`), catching syntax errors, unknown fields, missing
//! fields and wrong types; then [`validate`] checks what serde cannot (ranges,
//! duplicates, the window/precision relation) and builds the `Config`. The first
//! problem found is the one reported.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};
use sha2::{Digest, Sha256};

use super::duration::parse_duration;
use super::{Config, ConfigError, KeySpec};
use crate::engine::{KeyName, Limits};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    window: Option<Spanned<String>>,
    precision: Option<Spanned<String>>,
    default_max_output_tokens: Option<Spanned<i128>>,
    max_body_bytes: Option<Spanned<i128>>,
    keys: Vec<Spanned<RawKey>>,
}

// No Debug, here or on `SecretText`: this struct holds a secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Spanned<String>,
    key: Option<Spanned<SecretText>>,
    key_sha256: Option<Spanned<String>>,
    rpm: Spanned<i128>,
    input_tpm: Spanned<i128>,
    output_tpm: Spanned<i128>,
}

/// A bearer secret while the file is being read; only its digest outlives parsing.
#[derive(Deserialize)]
#[serde(transparent)]
struct SecretText(String);

pub(super) fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawFile =
        serde_saphyr::from_str(text).map_err(|e| ConfigError::from_yaml(origin, text, &e))?;
    validate(raw, origin)
}

fn validate(raw: RawFile, origin: &str) -> Result<Config, ConfigError> {
    let err = |at: Location, message: String| ConfigError::at(origin, at, message);

    let (window, precision) = window_and_precision(&raw, origin)?;

    let default_max_output_tokens = match &raw.default_max_output_tokens {
        Some(v) => positive(v, "default_max_output_tokens", u64::MAX as i128)
            .map_err(|m| err(v.referenced, m))? as u64,
        None => Config::DEFAULT_MAX_OUTPUT_TOKENS,
    };
    let max_body_bytes = match &raw.max_body_bytes {
        Some(v) => positive(v, "max_body_bytes", usize::MAX as i128)
            .map_err(|m| err(v.referenced, m))? as usize,
        None => Config::DEFAULT_MAX_BODY_BYTES,
    };

    let mut keys = Vec::with_capacity(raw.keys.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    // Digest → (index, where its secret was written), to name the first holder.
    let mut by_digest: HashMap<[u8; 32], usize> = HashMap::new();
    let mut name_lines = Vec::with_capacity(raw.keys.len());

    for entry in &raw.keys {
        let entry_at = entry.referenced;
        let entry = &entry.value;

        let name = KeyName::new(&entry.name.value).map_err(|m| err(entry.name.referenced, m))?;
        if let Some(&first) = by_name.get(name.as_str()) {
            return Err(err(
                entry.name.referenced,
                format!(
                    "duplicate key name `{name}` (first defined at line {})",
                    name_lines[first]
                ),
            ));
        }

        let (digest, secret_at) = match (&entry.key, &entry.key_sha256) {
            (Some(_), Some(hashed)) => {
                return Err(err(
                    hashed.referenced,
                    format!("key `{name}` sets both `key` and `key_sha256`; set exactly one"),
                ))
            }
            (None, None) => {
                return Err(err(
                    entry_at,
                    format!("key `{name}` sets neither `key` nor `key_sha256`; set exactly one"),
                ))
            }
            (Some(secret), None) => {
                if secret.value.0.is_empty() {
                    return Err(err(secret.referenced, format!("key `{name}` has an empty `key`")));
                }
                let digest: [u8; 32] = Sha256::digest(secret.value.0.as_bytes()).into();
                (digest, secret.referenced)
            }
            (None, Some(hashed)) => (
                sha256_hex(&hashed.value)
                    .map_err(|m| err(hashed.referenced, format!("key `{name}`: {m}")))?,
                hashed.referenced,
            ),
        };
        if let Some(&first) = by_digest.get(&digest) {
            let first: &KeySpec = &keys[first];
            return Err(err(
                secret_at,
                format!("key `{name}` has the same secret as key `{}`", first.name),
            ));
        }

        let limits = Limits {
            requests: limit(&entry.rpm, "rpm", origin)?,
            input_tokens: limit(&entry.input_tpm, "input_tpm", origin)?,
            output_tokens: limit(&entry.output_tpm, "output_tpm", origin)?,
        };

        let index = keys.len();
        by_name.insert(name.as_str().to_owned(), index);
        by_digest.insert(digest, index);
        name_lines.push(entry.name.referenced.line());
        keys.push(KeySpec { name, limits });
    }

    Ok(Config {
        window,
        precision,
        default_max_output_tokens,
        max_body_bytes,
        keys,
        by_digest,
        by_name,
    })
}

/// The window and bucket width, checked against each other. A problem with their
/// relation is reported on `window` when the file sets it, else on `precision`.
fn window_and_precision(raw: &RawFile, origin: &str) -> Result<(Duration, Duration), ConfigError> {
    let err = |at: Location, message: String| ConfigError::at(origin, at, message);
    let read = |field: &Option<Spanned<String>>, name: &str, default: Duration| match field {
        Some(text) => parse_duration(&text.value)
            .map(|d| (d, format!("`{}`", text.value), Some(text.referenced)))
            .map_err(|m| err(text.referenced, format!("{name}: {m}"))),
        None => Ok((default, format!("{default:?} (the default)"), None)),
    };
    let (precision, precision_text, precision_at) =
        read(&raw.precision, "precision", Config::DEFAULT_PRECISION)?;
    let (window, window_text, window_at) = read(&raw.window, "window", Config::DEFAULT_WINDOW)?;

    if let Some(at) = precision_at {
        if precision.is_zero() {
            return Err(err(at, "precision must be greater than 0".into()));
        }
        if precision >= Duration::from_secs(1) {
            return Err(err(
                at,
                format!("precision must be less than 1s, got {precision_text}"),
            ));
        }
    }
    // Both are known to be set here if they break a rule: the defaults agree.
    let Some(at) = window_at.or(precision_at) else {
        return Ok((window, precision));
    };
    if window.is_zero() {
        return Err(err(at, "window must be greater than 0".into()));
    }
    if window < precision {
        return Err(err(
            at,
            format!("window {window_text} is shorter than precision {precision_text}"),
        ));
    }
    if window.as_nanos() % precision.as_nanos() != 0 {
        return Err(err(
            at,
            format!("window {window_text} is not a whole multiple of precision {precision_text}"),
        ));
    }
    Ok((window, precision))
}

fn limit(value: &Spanned<i128>, field: &str, origin: &str) -> Result<u64, ConfigError> {
    positive(value, field, u64::MAX as i128)
        .map(|v| v as u64)
        .map_err(|m| ConfigError::at(origin, value.referenced, m))
}

/// `value` if it is in `1..=max`, else the message saying why not.
fn positive(value: &Spanned<i128>, field: &str, max: i128) -> Result<i128, String> {
    match value.value {
        v if v <= 0 => Err(format!("{field} must be greater than 0, got {v}")),
        v if v > max => Err(format!("{field} must be at most {max}, got {v}")),
        v => Ok(v),
    }
}

/// Decodes a `key_sha256` value. The message never repeats the value: a digest is
/// not the secret, but it is not for logs either.
fn sha256_hex(text: &str) -> Result<[u8; 32], String> {
    let what = "`key_sha256` must be 64 hexadecimal characters (a SHA-256 digest)";
    if text.len() != 64 {
        return Err(format!("{what}, got {} characters", text.chars().count()));
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text, &mut digest)
        .map_err(|_| format!("{what}, found a character that is not hexadecimal"))?;
    Ok(digest)
}

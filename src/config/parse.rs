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
use super::{Config, ConfigError, KeySpec, ModelLimits, PoolSpec, UnknownEndpoints};
use crate::engine::failover::OnStoreError;
use crate::engine::WindowShape;
use crate::engine::{KeyName, Limits, ModelMatch};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    window: Option<Spanned<String>>,
    precision: Option<Spanned<String>>,
    default_max_output_tokens: Option<Spanned<Count>>,
    max_body_bytes: Option<Spanned<Count>>,
    unknown_endpoints: Option<Spanned<String>>,
    on_store_error: Option<Spanned<String>>,
    azure_deployments: Option<HashMap<Spanned<String>, Spanned<String>>>,
    keys: Vec<Spanned<RawKey>>,
    pools: Option<Vec<Spanned<RawPool>>>,
}

// No Debug, here or on `SecretText`: this struct holds a secret. Every field is
// optional so that a missing one is reported by `validate`, at the entry and with the
// key's name, rather than by serde at wherever the mapping happened to end.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<Spanned<String>>,
    key: Option<Spanned<SecretText>>,
    key_sha256: Option<Spanned<String>>,
    rpm: Option<Spanned<Count>>,
    input_tpm: Option<Spanned<Count>>,
    output_tpm: Option<Spanned<Count>>,
    per_day: Option<Spanned<RawDay>>,
    models: Option<Spanned<Vec<Spanned<RawModel>>>>,
    pool: Option<Spanned<String>>,
}

/// `per_day`, of a key or a pool: limits over 24 hours.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDay {
    requests: Option<Spanned<Count>>,
    input_tokens: Option<Spanned<Count>>,
    output_tokens: Option<Spanned<Count>>,
}

/// One `models` entry of a key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(rename = "match")]
    matches: Option<Spanned<String>>,
    rpm: Option<Spanned<Count>>,
    input_tpm: Option<Spanned<Count>>,
    output_tpm: Option<Spanned<Count>>,
}

/// One `pools` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Option<Spanned<String>>,
    rpm: Option<Spanned<Count>>,
    input_tpm: Option<Spanned<Count>>,
    output_tpm: Option<Spanned<Count>>,
    per_day: Option<Spanned<RawDay>>,
}

/// An integer as written, sign and all, so that `rpm: -5` is reported as "must be
/// greater than 0" rather than as a type error. Anything else that is not an
/// integer is refused without repeating it (it may be a misplaced secret).
struct Count(i128);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Count, E> {
                i128::try_from(v)
                    .map(Count)
                    .map_err(|_| E::custom("number is too large"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Count, E> {
                // The YAML layer hands over integers beyond 64 bits as floats; keep
                // them as (saturated) integers so the range check names the field.
                if v.fract() == 0.0 && v.abs() > i64::MAX as f64 {
                    return Ok(Count(v as i128));
                }
                Err(E::custom(format!("expected a whole number, found {v}")))
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Count, E> {
                Err(E::custom("expected a whole number, found text"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
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
        Some(v) => positive(v, "max_body_bytes", Config::MAX_BODY_BYTES_BOUND as i128)
            .map_err(|m| err(v.referenced, m))? as usize,
        None => Config::DEFAULT_MAX_BODY_BYTES,
    };
    let unknown_endpoints = match &raw.unknown_endpoints {
        None => UnknownEndpoints::Deny,
        Some(v) => match v.value.as_str() {
            "deny" => UnknownEndpoints::Deny,
            "count" => UnknownEndpoints::Count,
            other => {
                return Err(err(
                    v.referenced,
                    format!("unknown_endpoints must be `deny` or `count`, got `{other}`"),
                ))
            }
        },
    };
    let on_store_error = match &raw.on_store_error {
        None => OnStoreError::Deny,
        Some(v) => OnStoreError::parse(&v.value).ok_or_else(|| {
            err(
                v.referenced,
                format!(
                    "on_store_error must be `deny`, `allow` or `local`, got `{}`",
                    v.value
                ),
            )
        })?,
    };
    let azure_deployments = azure_deployments(raw.azure_deployments.as_ref(), origin)?;
    let pools = pools(raw.pools.as_deref().unwrap_or_default(), origin)?;

    let mut keys = Vec::with_capacity(raw.keys.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    // Digest → index into `keys`, so a duplicate secret can name its first holder.
    let mut by_digest: HashMap<[u8; 32], usize> = HashMap::new();
    let mut name_lines = Vec::with_capacity(raw.keys.len());
    // Where each name is, to refuse one that is also a key's secret (below).
    let mut name_spans = Vec::with_capacity(raw.keys.len());

    for (position, entry) in raw.keys.iter().enumerate() {
        let entry_at = entry.referenced;
        let entry = &entry.value;

        let Some(raw_name) = &entry.name else {
            return Err(err(
                entry_at,
                format!("entry {} of `keys` is missing `name`", position + 1),
            ));
        };
        let name = KeyName::new(&raw_name.value).map_err(|m| err(raw_name.referenced, m))?;
        if let Some(&first) = by_name.get(name.as_str()) {
            return Err(err(
                raw_name.referenced,
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
                    return Err(err(
                        secret.referenced,
                        format!("key `{name}` has an empty `key`"),
                    ));
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

        let limit = |value: &Option<Spanned<Count>>, field: &str| match value {
            None => Err(err(entry_at, format!("key `{name}` is missing `{field}`"))),
            Some(v) => positive(v, field, Config::MAX_LIMIT as i128)
                .map(|n| n as u64)
                .map_err(|m| err(v.referenced, m)),
        };
        let limits = Limits {
            requests: limit(&entry.rpm, "rpm")?,
            input_tokens: limit(&entry.input_tpm, "input_tpm")?,
            output_tokens: limit(&entry.output_tpm, "output_tpm")?,
        };

        let owner = format!("key `{name}`");
        let per_day = match &entry.per_day {
            Some(day) => Some(day_limits(day, &owner, origin)?),
            None => None,
        };
        let models = match &entry.models {
            Some(list) => models(list, &owner, origin)?,
            None => Vec::new(),
        };
        let pool = match &entry.pool {
            None => None,
            Some(p) => match pools.iter().find(|pool| pool.name.as_str() == p.value) {
                Some(pool) => Some(pool.name.clone()),
                None => {
                    return Err(err(
                        p.referenced,
                        format!(
                            "key `{name}` names pool `{}`, which `pools` does not define",
                            p.value
                        ),
                    ))
                }
            },
        };

        let index = keys.len();
        by_name.insert(name.as_str().to_owned(), index);
        by_digest.insert(digest, index);
        name_lines.push(raw_name.referenced.line());
        name_spans.push(raw_name.referenced);
        keys.push(KeySpec {
            name,
            limits,
            per_day,
            models,
            pool,
        });
    }

    // A name goes into logs, metrics, headers and Redis keys; a name that is some key's
    // secret would put that secret there. The message says where, never the name.
    for (spec, at) in keys.iter().zip(&name_spans) {
        let digest: [u8; 32] = Sha256::digest(spec.name.as_str().as_bytes()).into();
        if by_digest.contains_key(&digest) {
            return Err(err(
                *at,
                "this key name is also a key's secret: names appear in logs, metrics and \
                 Redis keys, so a name must not be a secret"
                    .to_string(),
            ));
        }
    }

    let shape =
        WindowShape::new(window, precision).map_err(|m| ConfigError::unlocated(origin, m))?;
    Ok(Config {
        window,
        precision,
        shape,
        default_max_output_tokens,
        max_body_bytes,
        unknown_endpoints,
        on_store_error,
        azure_deployments,
        keys,
        pools,
        by_digest,
        by_name,
    })
}

/// Limits of which some may be left out (`None`: the field is absent): each one set is
/// checked; one left out is unlimited. At least one must be set.
fn some_limits(
    fields: [(&Option<Spanned<Count>>, &str); 3],
    owner: &str,
    origin: &str,
) -> Result<Option<Limits>, ConfigError> {
    let mut values = [Config::UNLIMITED; 3];
    let mut set = false;
    for (value, (field, name)) in values.iter_mut().zip(fields) {
        if let Some(v) = field {
            *value = positive(v, name, Config::MAX_LIMIT as i128)
                .map_err(|m| ConfigError::at(origin, v.referenced, format!("{owner}: {m}")))?
                as u64;
            set = true;
        }
    }
    Ok(set.then_some(Limits {
        requests: values[0],
        input_tokens: values[1],
        output_tokens: values[2],
    }))
}

/// A `per_day` block: at least one of its three limits.
fn day_limits(day: &Spanned<RawDay>, owner: &str, origin: &str) -> Result<Limits, ConfigError> {
    let v = &day.value;
    let fields = [
        (&v.requests, "requests"),
        (&v.input_tokens, "input_tokens"),
        (&v.output_tokens, "output_tokens"),
    ];
    some_limits(fields, &format!("{owner} per_day"), origin)?.ok_or_else(|| {
        ConfigError::at(
            origin,
            day.referenced,
            format!("{owner}: per_day sets no limit; set requests, input_tokens or output_tokens"),
        )
    })
}

/// A key's `models` entries: each a valid match with at least one limit, and no two
/// matching one model (which one applied would depend on their order).
fn models(
    list: &Spanned<Vec<Spanned<RawModel>>>,
    owner: &str,
    origin: &str,
) -> Result<Vec<ModelLimits>, ConfigError> {
    let err = |at: Location, message: String| ConfigError::at(origin, at, message);
    if list.value.len() > Config::MAX_MODELS {
        return Err(err(
            list.referenced,
            format!(
                "{owner} has {} models entries; at most {} are allowed",
                list.value.len(),
                Config::MAX_MODELS
            ),
        ));
    }
    let mut out: Vec<ModelLimits> = Vec::with_capacity(list.value.len());
    for (position, entry) in list.value.iter().enumerate() {
        let Some(text) = &entry.value.matches else {
            return Err(err(
                entry.referenced,
                format!("{owner}: models entry {} is missing `match`", position + 1),
            ));
        };
        let matches = ModelMatch::new(&text.value)
            .map_err(|m| err(text.referenced, format!("{owner}: {m}")))?;
        if let Some(other) = out.iter().find(|o| o.matches.overlaps(&matches)) {
            return Err(err(
                text.referenced,
                format!(
                    "{owner}: models match `{matches}` overlaps `{}`: a model may match only one entry",
                    other.matches
                ),
            ));
        }
        let v = &entry.value;
        let this = format!("{owner} models `{matches}`");
        let fields = [
            (&v.rpm, "rpm"),
            (&v.input_tpm, "input_tpm"),
            (&v.output_tpm, "output_tpm"),
        ];
        let limits = some_limits(fields, &this, origin)?.ok_or_else(|| {
            err(
                entry.referenced,
                format!("{this} sets no limit; set rpm, input_tpm or output_tpm"),
            )
        })?;
        out.push(ModelLimits { matches, limits });
    }
    Ok(out)
}

/// `pools`: unique names, each with at least one limit.
fn pools(raw: &[Spanned<RawPool>], origin: &str) -> Result<Vec<PoolSpec>, ConfigError> {
    let err = |at: Location, message: String| ConfigError::at(origin, at, message);
    let mut out: Vec<PoolSpec> = Vec::with_capacity(raw.len());
    let mut lines: Vec<u64> = Vec::with_capacity(raw.len());
    for (position, entry) in raw.iter().enumerate() {
        let Some(raw_name) = &entry.value.name else {
            return Err(err(
                entry.referenced,
                format!("entry {} of `pools` is missing `name`", position + 1),
            ));
        };
        let name = KeyName::new(&raw_name.value)
            .map_err(|m| err(raw_name.referenced, m.replace("key name", "pool name")))?;
        if let Some(first) = out.iter().position(|p| p.name == name) {
            return Err(err(
                raw_name.referenced,
                format!(
                    "duplicate pool name `{name}` (first defined at line {})",
                    lines[first]
                ),
            ));
        }
        let v = &entry.value;
        let owner = format!("pool `{name}`");
        let fields = [
            (&v.rpm, "rpm"),
            (&v.input_tpm, "input_tpm"),
            (&v.output_tpm, "output_tpm"),
        ];
        let limits = some_limits(fields, &owner, origin)?;
        let per_day = match &v.per_day {
            Some(day) => Some(day_limits(day, &owner, origin)?),
            None => None,
        };
        if limits.is_none() && per_day.is_none() {
            return Err(err(
                entry.referenced,
                format!("{owner} sets no limit; set rpm, input_tpm, output_tpm or per_day"),
            ));
        }
        lines.push(raw_name.referenced.line());
        out.push(PoolSpec {
            name,
            limits,
            per_day,
        });
    }
    Ok(out)
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
        // The stores count buckets in whole milliseconds (Redis TIME is read in ms).
        if precision.subsec_nanos() % 1_000_000 != 0 {
            return Err(err(
                at,
                format!("precision must be a whole number of milliseconds, got {precision_text}"),
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
    // Each store keeps one slot per bucket for every key: this bounds a key's memory
    // (36,000 × 10 B ≈ 352 KiB in Redis) and the work of a ring that advances a whole window.
    let buckets = window.as_nanos() / precision.as_nanos();
    if buckets > Config::MAX_BUCKETS as u128 {
        return Err(err(
            at,
            format!(
                "window {window_text} / precision {precision_text} is {buckets} buckets; at most {} are allowed (use a longer precision)",
                Config::MAX_BUCKETS
            ),
        ));
    }
    Ok((window, precision))
}

/// `azure_deployments`: deployment name → model. A name is one path segment.
fn azure_deployments(
    raw: Option<&HashMap<Spanned<String>, Spanned<String>>>,
    origin: &str,
) -> Result<HashMap<String, String>, ConfigError> {
    let err = |at: Location, message: String| ConfigError::at(origin, at, message);
    // In file order, so the first problem in the file is the one reported.
    let mut entries: Vec<_> = raw.into_iter().flatten().collect();
    entries.sort_by_key(|(name, _)| (name.referenced.line(), name.referenced.column()));
    let mut map = HashMap::new();
    for (name, model) in entries {
        let bad = |c: char| c == '/' || c == '\\' || c == '?' || c == '#' || c.is_control();
        if name.value.is_empty() || name.value.contains(bad) {
            return Err(err(
                name.referenced,
                format!(
                    "azure_deployments: `{}` is not a deployment name (one path segment, not empty)",
                    name.value
                ),
            ));
        }
        if model.value.is_empty() {
            return Err(err(
                model.referenced,
                format!(
                    "azure_deployments: deployment `{}` has an empty model",
                    name.value
                ),
            ));
        }
        if map
            .insert(name.value.clone(), model.value.clone())
            .is_some()
        {
            return Err(err(
                name.referenced,
                format!(
                    "azure_deployments: deployment `{}` is listed twice",
                    name.value
                ),
            ));
        }
    }
    Ok(map)
}

/// `value` if it is in `1..=max`, else the message saying why not.
fn positive(value: &Spanned<Count>, field: &str, max: i128) -> Result<i128, String> {
    match value.value.0 {
        v if v <= 0 => Err(format!("{field} must be greater than 0, got {v}")),
        // Not "got {v}": a value this large may have been rounded on the way in.
        v if v > max => Err(format!("{field} must be at most {max}")),
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

/// Every field name the file accepts, by where it may appear (`azure_deployments` takes
/// any deployment name, so its entries are not listed). Read from the `Raw*` structs
/// themselves — serde hands a struct's deserializer the names of its fields, renames
/// applied — so the list cannot drift from the parser; `tests/docs.rs` holds the
/// reference to it.
pub fn field_names() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("top level", fields_of::<RawFile>()),
        ("a `keys` entry", fields_of::<RawKey>()),
        ("`per_day`", fields_of::<RawDay>()),
        ("a `models` entry", fields_of::<RawModel>()),
        ("a `pools` entry", fields_of::<RawPool>()),
    ]
}

/// The field names `T`'s derived `Deserialize` asks for: a deserializer that only
/// records what `deserialize_struct` is given, and fails.
fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::value::Error;
    use serde::de::{Error as _, Visitor};

    struct Fields(&'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0 = fields;
            Err(Error::custom("field names read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut fields = Fields(&[]);
    let _ = T::deserialize(&mut fields);
    fields.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256 of `sk-test-tier-b`.
    const TIER_B_SHA256: &str = "0f8b43cc04dd00411e678eb452ffa207345b57430267115e59dbbba21ef45372";

    const VALID: &str = "\
window: 1m30s
precision: 250ms
default_max_output_tokens: 512
max_body_bytes: 2048
keys:
  - name: team-a
    key: sk-test-tier-a
    rpm: 600
    input_tpm: 200000
    output_tpm: 50000
  - name: team.b_2
    key_sha256: 0F8B43CC04DD00411E678EB452FFA207345B57430267115E59DBBBA21EF45372
    rpm: 1
    input_tpm: 2
    output_tpm: 3
";

    /// One valid key entry at lines 2-6, for tests to break one line of.
    fn one_key(extra_top: &str, entry: &str) -> String {
        format!("{extra_top}keys:\n{entry}")
    }

    const ENTRY: &str =
        "  - name: a\n    key: sk-secret-one\n    rpm: 1\n    input_tpm: 1\n    output_tpm: 1\n";

    /// Parses `text`, expecting an error at `line:column` whose message contains
    /// `needle`, and checks that no secret leaked into it.
    #[track_caller]
    fn assert_error(text: &str, line: usize, column: usize, needle: &str) {
        let err = match parse(text, "cfg.yaml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        let shown = err.to_string();
        assert_eq!((err.line, err.column), (line, column), "{shown}");
        assert!(err.message.contains(needle), "{shown:?} lacks {needle:?}");
        assert!(
            shown.starts_with(&format!("cfg.yaml:{line}:{column}: ")),
            "{shown}"
        );
        // Every secret in these tests starts with `sk-`; digests are not echoed either.
        assert!(
            !shown.contains("sk-") && !format!("{err:?}").contains("sk-"),
            "{shown}"
        );
        assert!(!shown.to_lowercase().contains("0f8b43cc"), "{shown}");
    }

    #[test]
    fn valid_file_parses_to_its_values() {
        let config = parse(VALID, "cfg.yaml").unwrap();
        assert_eq!(config.window(), Duration::from_secs(90));
        assert_eq!(config.precision(), Duration::from_millis(250));
        assert_eq!(config.default_max_output_tokens(), 512);
        assert_eq!(config.max_body_bytes(), 2048);
        let names: Vec<_> = config.keys().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["team-a", "team.b_2"]);
        assert_eq!(
            config.key_by_secret("sk-test-tier-a").unwrap().limits,
            Limits {
                requests: 600,
                input_tokens: 200_000,
                output_tokens: 50_000
            }
        );
        // Found through `key_sha256` alone (written in upper case).
        let b = config.key_by_secret("sk-test-tier-b").unwrap();
        assert_eq!(b.name.as_str(), "team.b_2");
        assert_eq!(
            b.limits,
            Limits {
                requests: 1,
                input_tokens: 2,
                output_tokens: 3
            }
        );
        assert!(config.key_by_secret("sk-test-tier-c").is_none());
        assert!(config.key_by_secret("").is_none());
        assert_eq!(
            config.key_by_name("team-a"),
            config.key_by_secret("sk-test-tier-a")
        );
        assert!(config.key_by_name("sk-test-tier-a").is_none());
    }

    #[test]
    fn omitted_settings_take_their_defaults() {
        let config = parse(&one_key("", ENTRY), "cfg.yaml").unwrap();
        assert_eq!(config.window(), Duration::from_secs(60));
        assert_eq!(config.precision(), Duration::from_millis(100));
        assert_eq!(config.default_max_output_tokens(), 1024);
        assert_eq!(config.max_body_bytes(), 1024 * 1024);
    }

    #[test]
    fn empty_key_list_is_allowed() {
        let config = parse("keys: []\n", "cfg.yaml").unwrap();
        assert!(config.keys().is_empty());
        assert!(config.key_by_secret("anything").is_none());
    }

    #[test]
    fn debug_output_shows_no_secret_or_digest() {
        let shown = format!("{:?}", parse(VALID, "cfg.yaml").unwrap());
        assert!(shown.contains("team-a"), "{shown}");
        assert!(!shown.contains("sk-"), "{shown}");
        assert!(!shown.to_lowercase().contains("0f8b43cc"), "{shown}");
        // The digest of `sk-test-tier-a`, as bytes: 0xcc, 0x94, ...
        assert!(!shown.contains("204, 148"), "{shown}");
    }

    #[test]
    fn a_window_has_at_most_36000_buckets() {
        // The example of the issue: 3.6 billion buckets, tens of GB per ring.
        assert_error(
            &one_key("window: 1000h\nprecision: 1ms\n", ENTRY),
            1,
            9,
            "is 3600000000 buckets; at most 36000 are allowed",
        );
        assert_error(
            &one_key("window: 36001ms\nprecision: 1ms\n", ENTRY),
            1,
            9,
            "36001 buckets",
        );
        // Only precision set: the default 60s window at 1ms is 60,000 buckets.
        assert_error(&one_key("precision: 1ms\n", ENTRY), 1, 12, "60000 buckets");
        assert!(parse(&one_key("window: 36s\nprecision: 1ms\n", ENTRY), "c").is_ok());
        assert!(parse(&one_key("window: 10h\nprecision: 1s\n", ENTRY), "c").is_err());
        assert!(parse(&one_key("window: 9h\nprecision: 900ms\n", ENTRY), "c").is_ok());
    }

    #[test]
    fn body_size_is_bounded() {
        assert_error(
            &one_key("max_body_bytes: 1000000000\n", ENTRY),
            1,
            17,
            "max_body_bytes must be at most 67108864",
        );
    }

    #[test]
    fn on_store_error_is_deny_allow_or_local() {
        let c = parse(&one_key("", ENTRY), "c").unwrap();
        assert_eq!(c.on_store_error(), OnStoreError::Deny);
        for (word, policy) in [
            ("deny", OnStoreError::Deny),
            ("allow", OnStoreError::Allow),
            ("local", OnStoreError::Local),
        ] {
            let c = parse(&one_key(&format!("on_store_error: {word}\n"), ENTRY), "c").unwrap();
            assert_eq!(c.on_store_error(), policy);
        }
        assert_error(
            &one_key("on_store_error: open\n", ENTRY),
            1,
            17,
            "on_store_error must be `deny`, `allow` or `local`, got `open`",
        );
    }

    #[test]
    fn unknown_endpoints_is_deny_or_count() {
        let c = parse(&one_key("", ENTRY), "c").unwrap();
        assert_eq!(c.unknown_endpoints(), UnknownEndpoints::Deny);
        let c = parse(&one_key("unknown_endpoints: count\n", ENTRY), "c").unwrap();
        assert_eq!(c.unknown_endpoints(), UnknownEndpoints::Count);
        assert_error(
            &one_key("unknown_endpoints: allow\n", ENTRY),
            1,
            20,
            "unknown_endpoints must be `deny` or `count`, got `allow`",
        );
    }

    #[test]
    fn azure_deployments_map_names_to_models() {
        let top = "azure_deployments:\n  prod-gpt4o: gpt-4o\n  legacy: gpt-35-turbo\n";
        let c = parse(&one_key(top, ENTRY), "c").unwrap();
        assert_eq!(c.azure_model("prod-gpt4o"), Some("gpt-4o"));
        assert_eq!(c.azure_model("legacy"), Some("gpt-35-turbo"));
        assert_eq!(c.azure_model("other"), None);
        assert_error(
            &one_key("azure_deployments:\n  a/b: gpt-4o\n", ENTRY),
            2,
            3,
            "`a/b` is not a deployment name",
        );
        assert_error(
            &one_key("azure_deployments:\n  ok: gpt-4o\n  x: ''\n", ENTRY),
            3,
            6,
            "deployment `x` has an empty model",
        );
        assert_error(&one_key("azure_deployments: [gpt-4o]\n", ENTRY), 1, 20, "");
    }

    #[test]
    fn yaml_syntax_error() {
        let text = "keys:\n  - name: a\n    key: \"sk-unterminated\n    rpm: 1\n";
        assert_error(text, 3, 10, "unclosed quote");
        assert_error(
            "window: 60s\n  precision: 100ms\nkeys: []\n",
            2,
            12,
            "mapping values are not allowed",
        );
    }

    #[test]
    fn unknown_fields_anywhere() {
        assert_error("windo: 60s\nkeys: []\n", 1, 1, "unknown field `windo`");
        let entry = format!("{ENTRY}    burst: 3\n");
        assert_error(&one_key("", &entry), 7, 5, "unknown field `burst`");
    }

    #[test]
    fn missing_required_fields() {
        assert_error("window: 60s\n", 1, 1, "missing field `keys`");
        let entry = ENTRY.replace("    output_tpm: 1\n", "");
        assert_error(
            &one_key("", &entry),
            2,
            5,
            "key `a` is missing `output_tpm`",
        );
        let entry = ENTRY.replace("  - name: a\n    key", "  - key");
        assert_error(
            &one_key("", &entry),
            2,
            5,
            "entry 1 of `keys` is missing `name`",
        );
    }

    #[test]
    fn wrong_types() {
        assert_error(
            &one_key("", &ENTRY.replace("rpm: 1", "rpm: lots")),
            4,
            10,
            "whole number",
        );
        assert_error(
            &one_key("", &ENTRY.replace("rpm: 1", "rpm: 1.5")),
            4,
            10,
            "whole number",
        );
        // A secret pasted into a number field is not repeated.
        assert_error(
            &one_key("", &ENTRY.replace("rpm: 1", "rpm: sk-oops")),
            4,
            10,
            "text",
        );
        assert_error(
            &one_key("", &ENTRY.replace("key: sk-secret-one", "key: [sk-a]")),
            3,
            10,
            "expected string",
        );
        assert_error("window: [1]\nkeys: []\n", 1, 9, "expected string");
        assert_error("keys: {}\n", 1, 7, "expected sequence");
        assert_error("- a\n", 1, 1, "expected mapping");
    }

    #[test]
    fn zero_or_negative_limits() {
        let zero = one_key("", &ENTRY.replace("input_tpm: 1", "input_tpm: 0"));
        assert_error(&zero, 5, 16, "input_tpm must be greater than 0, got 0");
        let negative = one_key("", &ENTRY.replace("output_tpm: 1", "output_tpm: -5"));
        assert_error(
            &negative,
            6,
            17,
            "output_tpm must be greater than 0, got -5",
        );
        let huge = one_key("", &ENTRY.replace("rpm: 1", "rpm: 18446744073709551616"));
        assert_error(&huge, 4, 10, "rpm must be at most 1000000000000000");
        let over = one_key("", &ENTRY.replace("rpm: 1", "rpm: 1000000000000001"));
        assert_error(&over, 4, 10, "rpm must be at most 1000000000000000");
        let huge = one_key(
            "",
            &ENTRY.replace("rpm: 1", "rpm: 99999999999999999999999999999999999999999"),
        );
        assert_error(&huge, 4, 10, "rpm must be at most 1000000000000000");
        let over = one_key("", &ENTRY.replace("rpm: 1", "rpm: 1000000000000001"));
        assert_error(&over, 4, 10, "rpm must be at most 1000000000000000");
        assert_error(
            &one_key("default_max_output_tokens: 0\n", ENTRY),
            1,
            28,
            "greater than 0",
        );
        assert_error(
            &one_key("max_body_bytes: -1\n", ENTRY),
            1,
            17,
            "greater than 0",
        );
    }

    #[test]
    fn precision_must_be_whole_milliseconds() {
        assert_error(
            &one_key("window: 1s\nprecision: 500us\n", ENTRY),
            2,
            12,
            "whole number of milliseconds, got `500us`",
        );
        let ok =
            Config::parse(&one_key("window: 2s\nprecision: 250ms\n", ENTRY), "c.yaml").unwrap();
        assert_eq!(ok.shape().slots(), 9);
    }

    #[test]
    fn precision_must_be_under_a_second_and_not_zero() {
        assert_error(
            &one_key("precision: 1s\n", ENTRY),
            1,
            12,
            "less than 1s, got `1s`",
        );
        assert_error(
            &one_key("precision: 1500ms\n", ENTRY),
            1,
            12,
            "less than 1s",
        );
        assert_error(
            &one_key("precision: 0ms\n", ENTRY),
            1,
            12,
            "precision must be greater than 0",
        );
        assert_error(&one_key("precision: 100\n", ENTRY), 1, 12, "no unit");
        assert!(parse(&one_key("precision: 999ms\nwindow: 999ms\n", ENTRY), "c").is_ok());
    }

    #[test]
    fn window_must_be_a_whole_multiple_of_precision() {
        let text = one_key("precision: 100ms\nwindow: 1050ms\n", ENTRY);
        assert_error(
            &text,
            2,
            9,
            "window `1050ms` is not a whole multiple of precision `100ms`",
        );
        let text = one_key("window: 50ms\n", ENTRY);
        assert_error(&text, 1, 9, "shorter than precision 100ms (the default)");
        // Only precision set, and the default window does not divide by it.
        let text = one_key("precision: 70ms\n", ENTRY);
        assert_error(
            &text,
            1,
            12,
            "window 60s (the default) is not a whole multiple",
        );
        assert_error(
            &one_key("window: 0s\n", ENTRY),
            1,
            9,
            "window must be greater than 0",
        );
        assert_error(
            &one_key("window: 1.5.s\n", ENTRY),
            1,
            9,
            "window: expected a duration",
        );
    }

    #[test]
    fn duplicate_names() {
        let second = ENTRY.replace("sk-secret-one", "sk-secret-two");
        let text = one_key("", &format!("{ENTRY}{second}"));
        assert_error(
            &text,
            7,
            11,
            "duplicate key name `a` (first defined at line 2)",
        );
    }

    #[test]
    fn a_name_that_is_a_secret_is_refused_without_repeating_it() {
        // Its own secret, and another key's (found through its digest too).
        let own = ENTRY.replace("name: a", "name: sk-secret-one");
        let text = one_key("", &own);
        assert_error(&text, 2, 11, "this key name is also a key's secret");
        let e = Config::parse(&text, "k.yaml").unwrap_err().to_string();
        assert!(!e.contains("sk-secret-one"), "{e}");
        let other = format!(
            "{ENTRY}  - name: sk-test-tier-b\n    key: sk-other\n    rpm: 1\n    input_tpm: 1\n    output_tpm: 1\n\
             \x20 - name: c\n    key_sha256: {TIER_B_SHA256}\n    rpm: 1\n    input_tpm: 1\n    output_tpm: 1\n"
        );
        let e = Config::parse(&one_key("", &other), "k.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("this key name is also a key's secret"), "{e}");
        assert!(!e.contains("sk-test-tier-b"), "{e}");
    }

    #[test]
    fn duplicate_secrets_name_both_keys() {
        let second = ENTRY.replace("name: a", "name: b");
        let text = one_key("", &format!("{ENTRY}{second}"));
        assert_error(&text, 8, 10, "key `b` has the same secret as key `a`");

        // The same secret once in clear and once as its digest.
        let clear = ENTRY.replace("sk-secret-one", "sk-test-tier-b");
        let hashed = format!(
            "  - name: b\n    key_sha256: {TIER_B_SHA256}\n    rpm: 1\n    input_tpm: 1\n    output_tpm: 1\n"
        );
        assert_error(
            &one_key("", &format!("{clear}{hashed}")),
            8,
            17,
            "key `b` has the same secret as key `a`",
        );
        // And the same digest twice, either case.
        let upper = hashed
            .replace("name: b", "name: c")
            .replace(TIER_B_SHA256, &TIER_B_SHA256.to_uppercase());
        assert_error(
            &one_key("", &format!("{hashed}{upper}")),
            8,
            17,
            "key `c` has the same secret as key `b`",
        );
    }

    #[test]
    fn exactly_one_of_key_and_key_sha256() {
        let both = ENTRY.replace(
            "    rpm",
            &format!("    key_sha256: {TIER_B_SHA256}\n    rpm"),
        );
        assert_error(
            &one_key("", &both),
            4,
            17,
            "sets both `key` and `key_sha256`",
        );
        let neither = ENTRY.replace("    key: sk-secret-one\n", "");
        assert_error(
            &one_key("", &neither),
            2,
            5,
            "sets neither `key` nor `key_sha256`",
        );
        let empty = ENTRY.replace("key: sk-secret-one", "key: ''");
        assert_error(&one_key("", &empty), 3, 10, "empty `key`");
    }

    #[test]
    fn bad_hex_digest() {
        let entry =
            |digest: &str| ENTRY.replace("key: sk-secret-one", &format!("key_sha256: {digest}"));
        let short = one_key("", &entry("abc123"));
        assert_error(
            &short,
            3,
            17,
            "64 hexadecimal characters (a SHA-256 digest), got 6 characters",
        );
        let not_hex = one_key("", &entry(&format!("{}zz", &TIER_B_SHA256[..62])));
        assert_error(&not_hex, 3, 17, "not hexadecimal");
    }

    #[test]
    fn bad_name() {
        let text = one_key("", &ENTRY.replace("name: a", "name: team a"));
        assert_error(&text, 2, 11, "may contain only letters");
        let text = one_key("", &ENTRY.replace("name: a", "name: ''"));
        assert_error(&text, 2, 11, "1 to 64 characters");
    }

    const LIMITED: &str = "\
keys:
  - name: team-a
    key: sk-test-tier-a
    rpm: 600
    input_tpm: 200000
    output_tpm: 50000
    per_day:
      requests: 20000
    models:
      - match: gpt-4o
        rpm: 100
      - match: \"o3*\"
        rpm: 10
        input_tpm: 10000
        output_tpm: 10000
    pool: research
  - name: team-b
    key: sk-test-tier-b
    rpm: 60
    input_tpm: 20000
    output_tpm: 5000
pools:
  - name: research
    input_tpm: 1000000
    per_day:
      output_tokens: 5000000
";

    #[test]
    fn per_day_models_and_pools_parse_to_their_limits() {
        let c = parse(LIMITED, "cfg.yaml").unwrap();
        let a = c.key_by_name("team-a").unwrap();
        let u = Config::UNLIMITED;
        assert_eq!(
            a.per_day,
            Some(Limits {
                requests: 20_000,
                input_tokens: u,
                output_tokens: u
            })
        );
        assert_eq!(a.models.len(), 2);
        assert_eq!(a.model_entry("gpt-4o").unwrap().limits.requests, 100);
        assert!(a.model_entry("gpt-4o-mini").is_none());
        assert_eq!(
            a.model_entry("o3-mini").unwrap().limits.input_tokens,
            10_000
        );
        assert_eq!(a.pool.as_ref().unwrap().as_str(), "research");
        assert_eq!(a.tag().as_str(), "research");
        let pool = c.pool_by_name("research").unwrap();
        assert_eq!(pool.limits.unwrap().input_tokens, 1_000_000);
        assert_eq!(pool.limits.unwrap().requests, u);
        assert_eq!(pool.per_day.unwrap().output_tokens, 5_000_000);
        // team-a on gpt-4o: own, per day, the model entry, the pool, the pool per day —
        // all under the pool's hash tag.
        let applied = c.limits_for(a, Some("gpt-4o"));
        assert_eq!(applied.len(), 5);
        assert!(applied
            .iter()
            .all(|x| x.bound.ring.tag.as_str() == "research"));
        assert_eq!(c.limits_for(a, Some("gpt-3.5-turbo")).len(), 4);
        let b = c.key_by_name("team-b").unwrap();
        assert_eq!(c.limits_for(b, Some("gpt-4o")).len(), 1);
        assert_eq!(c.limits_for(b, None)[0].bound.ring.tag.as_str(), "team-b");
        assert_eq!(c.rings().len(), 1 + 1 + 2 + 2 + 1);
    }

    #[test]
    fn limits_left_alone_keep_their_rings_across_reloads() {
        let before = parse(LIMITED, "cfg.yaml").unwrap();
        let after = parse(&LIMITED.replace("rpm: 100", "rpm: 150"), "cfg.yaml").unwrap();
        // Same rings (their usage stays), other limits.
        assert_eq!(before.rings(), after.rings());
        let moved = parse(&LIMITED.replace("match: gpt-4o", "match: gpt-4o*"), "c").unwrap();
        assert_eq!(before.rings().difference(&moved.rings()).count(), 1);
    }

    #[test]
    fn model_and_pool_mistakes_are_located() {
        assert_error(
            &LIMITED.replace("pool: research", "pool: reserch"),
            16,
            11,
            "key `team-a` names pool `reserch`, which `pools` does not define",
        );
        assert_error(
            &LIMITED.replace("match: \"o3*\"", "match: \"gpt-4*\""),
            12,
            16,
            "models match `gpt-4*` overlaps `gpt-4o`",
        );
        assert_error(
            &LIMITED.replace("match: \"o3*\"", "match: gpt-4o"),
            12,
            16,
            "overlaps `gpt-4o`",
        );
        assert_error(
            &LIMITED.replace("match: \"o3*\"", "match: \"o*3\""),
            12,
            16,
            "'*' may only end a match",
        );
        assert_error(
            &LIMITED.replace("        rpm: 100\n", "        burst: 100\n"),
            11,
            9,
            "unknown field `burst`",
        );
        assert_error(
            &LIMITED.replace("      requests: 20000", "      requests: 0"),
            8,
            17,
            "key `team-a` per_day: requests must be greater than 0",
        );
        assert_error(
            &LIMITED.replace("      requests: 20000", "      minutes: 5"),
            8,
            7,
            "unknown field `minutes`",
        );
        assert_error(
            &format!("{LIMITED}  - name: research\n    rpm: 5\n"),
            27,
            11,
            "duplicate pool name `research` (first defined at line 23)",
        );
        assert_error(
            &format!("{LIMITED}  - name: empty\n"),
            27,
            5,
            "pool `empty` sets no limit",
        );
        assert_error(
            &LIMITED.replace("        rpm: 100\n", ""),
            10,
            9,
            "models `gpt-4o` sets no limit",
        );
        let many: String = (0..65)
            .map(|i| format!("      - match: m{i}\n        rpm: 1\n"))
            .collect();
        let text = LIMITED.replace("      - match: gpt-4o\n        rpm: 100\n", &many);
        assert_error(&text, 10, 7, "at most 64 are allowed");
    }

    #[test]
    fn parser_messages_have_secrets_redacted() {
        // A message built by the YAML parser, on the line of a secret.
        let text = "keys:\n  - name: a\n    key: sk-secret-one: oops\n";
        let err = parse(text, "cfg.yaml").unwrap_err();
        assert_eq!((err.line, err.column), (3, 23), "{err}");
        assert!(!err.to_string().contains("sk-secret-one"), "{err}");
    }

    #[test]
    fn field_names_are_those_the_parser_accepts() {
        // An unknown field at each place: serde's refusal lists what that place accepts,
        // which must be exactly what `field_names` says.
        let places = [
            ("top level", "zzz: 1\n".to_string() + LIMITED),
            (
                "a `keys` entry",
                LIMITED.replace("    pool: research\n", "    pool: research\n    zzz: 1\n"),
            ),
            (
                "`per_day`",
                LIMITED.replace(
                    "      requests: 20000\n",
                    "      requests: 20000\n      zzz: 1\n",
                ),
            ),
            (
                "a `models` entry",
                LIMITED.replace("        rpm: 100\n", "        rpm: 100\n        zzz: 1\n"),
            ),
            (
                "a `pools` entry",
                LIMITED.replace(
                    "    input_tpm: 1000000\n",
                    "    input_tpm: 1000000\n    zzz: 1\n",
                ),
            ),
        ];
        let names = field_names();
        assert_eq!(
            names.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            places.iter().map(|(p, _)| *p).collect::<Vec<_>>()
        );
        for ((place, text), (_, fields)) in places.iter().zip(&names) {
            let err = parse(text, "c").unwrap_err().to_string();
            let expected = format!("unknown field `zzz`, expected one of {}", fields.join(", "));
            assert!(err.ends_with(&expected), "{place}: {err}\nvs {expected}");
        }
        // The rename is honoured: the file says `match`, the struct `matches`.
        assert!(names[3].1.contains(&"match"));
    }
}

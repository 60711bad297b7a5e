//! Several limits, one decision: every limit that applies to a request (a key's per-minute
//! and per-day limits, the `models` entry its model matches, its pool's limits) is kept in
//! a ring of its own, and a decision checks and records all of them in one atomic step.
//!
//! A ring is named by a [`RingRef`]: the hash tag every ring of one decision shares (the
//! pool's name when the key has a pool, else the key's), what the ring counts within that
//! tag ([`Scope`]), and its window shape. The name depends on nothing else, so a reload
//! that changes a ring's limits keeps its usage, and one that changes what it counts (a
//! renamed key, another match, another pool) starts a fresh ring.

use std::fmt;
use std::sync::Arc;

use super::{KeyName, LimitKind, Limits, Snapshot, WindowShape};

/// What one ring counts, within its hash tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// A key's own limits (per-minute or per-day, told apart by the shape).
    Key(KeyName),
    /// A key's limits for the models one `models` entry matches (`match` as written).
    Model(KeyName, ModelMatch),
    /// The limits of the pool the tag names, shared by every key in it.
    Pool,
}

/// A `models` entry's `match`: an exact model name, or a prefix ending in `*`. Limited to
/// printable ASCII without spaces, `|`, `{` or `}`, so it can sit in a store key and in a
/// reservation handle.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelMatch(Arc<str>);

impl ModelMatch {
    /// Builds a match, or says why it is not one.
    pub fn new(text: &str) -> Result<ModelMatch, String> {
        if text.is_empty() || text.len() > 128 {
            return Err(format!(
                "a model match must be 1 to 128 characters, got {}",
                text.len()
            ));
        }
        if let Some(bad) = text
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '|' | '{' | '}'))
        {
            return Err(format!(
                "a model match may not contain {bad:?} (printable ASCII only, no spaces, '|', '{{' or '}}')"
            ));
        }
        if text[..text.len() - 1].contains('*') {
            return Err(format!(
                "`{text}`: '*' may only end a match (a prefix), not appear inside it"
            ));
        }
        Ok(ModelMatch(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix, when the match is one (`o3*` → `o3`).
    pub fn prefix(&self) -> Option<&str> {
        self.0.strip_suffix('*')
    }

    /// Whether `model` is one this entry limits.
    pub fn matches(&self, model: &str) -> bool {
        match self.prefix() {
            Some(prefix) => model.starts_with(prefix),
            None => model == &*self.0,
        }
    }

    /// Whether some model name would match both (a config error: which entry applies
    /// would depend on their order).
    pub fn overlaps(&self, other: &ModelMatch) -> bool {
        match (self.prefix(), other.prefix()) {
            (Some(a), Some(b)) => a.starts_with(b) || b.starts_with(a),
            (Some(a), None) => other.as_str().starts_with(a),
            (None, Some(b)) => self.as_str().starts_with(b),
            (None, None) => self == other,
        }
    }
}

impl fmt::Display for ModelMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelMatch({})", self.0)
    }
}

/// One ring: the hash tag it lives under, what it counts, and its window.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RingRef {
    pub tag: KeyName,
    pub scope: Scope,
    pub shape: WindowShape,
}

impl RingRef {
    /// A key's own ring under its own name: the only ring a key without pool, per-day
    /// limits or models has, named in the store exactly as before rings had scopes.
    pub fn own(key: &KeyName, shape: WindowShape) -> RingRef {
        RingRef {
            tag: key.clone(),
            scope: Scope::Key(key.clone()),
            shape,
        }
    }

    /// The part of the store key between the hash tag and the shape: empty for a key's
    /// own ring under its own tag (the name rings had before scopes), else a prefix that no
    /// other scope can produce (key names hold no `:`).
    pub fn scope_text(&self) -> String {
        match &self.scope {
            Scope::Key(k) if *k == self.tag => String::new(),
            Scope::Key(k) => format!("key:{k}:"),
            Scope::Model(k, m) => format!("model:{k}:{m}:"),
            Scope::Pool => "pool:".into(),
        }
    }

    /// Reads [`RingRef::scope_text`] back.
    fn from_scope_text(tag: KeyName, text: &str, shape: WindowShape) -> Option<RingRef> {
        let scope = if text.is_empty() {
            Scope::Key(tag.clone())
        } else if text == "pool:" {
            Scope::Pool
        } else if let Some(rest) = text.strip_prefix("key:") {
            Scope::Key(KeyName::new(rest.strip_suffix(':')?).ok()?)
        } else {
            let rest = text.strip_prefix("model:")?.strip_suffix(':')?;
            let (key, m) = rest.split_once(':')?;
            Scope::Model(KeyName::new(key).ok()?, ModelMatch::new(m).ok()?)
        };
        Some(RingRef { tag, scope, shape })
    }

    /// An order every caller locks rings in, so two decisions never wait on each other.
    pub(crate) fn order_key(&self) -> (&KeyName, &Scope, u64, u64) {
        (
            &self.tag,
            &self.scope,
            self.shape.window_ms(),
            self.shape.precision_ms(),
        )
    }
}

/// A ring held to its limits in one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub ring: RingRef,
    pub limits: Limits,
}

/// A reservation in several rings, to settle after the response: the rings it touched and
/// the id of its markers (one per ring). Travels as an opaque handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub rings: Vec<RingRef>,
    pub id: u64,
}

impl Claim {
    /// The key the claim was made for: the one its first ring counts (a pool ring names
    /// only its pool).
    pub fn key(&self) -> KeyName {
        match self.rings.first().map(|r| (&r.scope, &r.tag)) {
            Some((Scope::Key(k) | Scope::Model(k, _), _)) => k.clone(),
            Some((Scope::Pool, tag)) => tag.clone(),
            None => KeyName(Arc::from("unknown")),
        }
    }

    /// `v2|<id hex>|<tag>|<window_ms>.<precision_ms>|<scope>|...` (a shape and a scope per
    /// ring); `|` is in no name. A claim on a key's own ring alone is written as a v1
    /// handle, which nodes of the previous version read too (a rolling upgrade).
    pub fn handle(&self) -> String {
        if let [only] = self.rings.as_slice() {
            if only.scope == Scope::Key(only.tag.clone()) {
                return super::Reservation {
                    key: only.tag.clone(),
                    shape: only.shape,
                    id: self.id,
                }
                .handle();
            }
        }
        let tag = self.rings.first().map_or("", |r| r.tag.as_str());
        let mut out = format!("v2|{:016x}|{tag}", self.id);
        for r in &self.rings {
            out.push_str(&format!(
                "|{}.{}|{}",
                r.shape.window_ms(),
                r.shape.precision_ms(),
                r.scope_text()
            ));
        }
        out
    }

    /// Reads a handle back; `None` for anything that is not one. A v1 handle (one ring,
    /// from a node of the previous version) reads as a claim on that ring.
    pub fn from_handle(handle: &str) -> Option<Claim> {
        if let Some(r) = super::Reservation::from_handle(handle) {
            return Some(Claim {
                rings: vec![RingRef::own(&r.key, r.shape)],
                id: r.id,
            });
        }
        let mut parts = handle.split('|');
        if parts.next()? != "v2" {
            return None;
        }
        let id = u64::from_str_radix(parts.next()?, 16).ok()?;
        let tag = KeyName::new(parts.next()?).ok()?;
        let mut rings = Vec::new();
        while let Some(shape) = parts.next() {
            let (w, p) = shape.split_once('.')?;
            let shape = WindowShape::new(
                std::time::Duration::from_millis(w.parse().ok()?),
                std::time::Duration::from_millis(p.parse().ok()?),
            )
            .ok()?;
            rings.push(RingRef::from_scope_text(tag.clone(), parts.next()?, shape)?);
            if rings.len() > MAX_RINGS {
                return None;
            }
        }
        (!rings.is_empty()).then_some(Claim { rings, id })
    }
}

/// Most rings one decision may touch: a key's two, a model entry's, a pool's two, and
/// room to spare. Bounds a handle and a script call.
pub const MAX_RINGS: usize = 8;

/// The engine's answer to a reservation in several rings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Recorded in every ring; `snapshots[i]` is ring `i` including this request.
    Admitted {
        snapshots: Vec<Snapshot>,
        claim: Option<Claim>,
    },
    /// Recorded in none.
    Denied {
        snapshots: Vec<Snapshot>,
        /// The ring that denied: of those that do not fit, the one with the longest wait
        /// (the first of them on a tie); for a request that can never fit, the first ring
        /// it alone exceeds.
        ring: usize,
        /// That ring's first limit that does not fit.
        limit: LimitKind,
        /// How long until every ring has room for the request if nothing else arrives;
        /// `None` when it can never fit.
        retry_after_ms: Option<u64>,
    },
}

/// Checks a set of rings: at most [`MAX_RINGS`], one hash tag, no ring twice.
pub(crate) fn check_set(rings: &[&RingRef]) -> Result<(), String> {
    if rings.is_empty() || rings.len() > MAX_RINGS {
        return Err(format!(
            "a decision touches 1 to {MAX_RINGS} rings, got {}",
            rings.len()
        ));
    }
    if rings.iter().any(|r| r.tag != rings[0].tag) {
        return Err("the rings of one decision must share one hash tag".into());
    }
    for (i, r) in rings.iter().enumerate() {
        if rings[..i].contains(r) {
            return Err("a decision names one ring twice".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(n: &str) -> KeyName {
        KeyName::new(n).unwrap()
    }

    fn m(t: &str) -> ModelMatch {
        ModelMatch::new(t).unwrap()
    }

    #[test]
    fn matches_are_exact_or_prefixes() {
        assert!(m("gpt-4o").matches("gpt-4o"));
        assert!(!m("gpt-4o").matches("gpt-4o-mini"));
        assert!(m("o3*").matches("o3-mini"));
        assert!(m("o3*").matches("o3"));
        assert!(!m("o3*").matches("o1"));
        assert!(m("*").matches("anything"));
        assert!(ModelMatch::new("a*b").is_err());
        assert!(ModelMatch::new("a b").is_err());
        assert!(ModelMatch::new("a|b").is_err());
        assert!(ModelMatch::new("").is_err());
    }

    #[test]
    fn overlapping_matches_are_found() {
        let cases = [
            ("gpt-4o", "gpt-4o", true),
            ("gpt-4o", "gpt-4o-mini", false),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4*", true),
            ("gpt-4o*", "o3*", false),
            ("o3*", "o3", true),
            ("*", "o3", true),
        ];
        for (a, b, overlap) in cases {
            assert_eq!(m(a).overlaps(&m(b)), overlap, "{a} {b}");
            assert_eq!(m(b).overlaps(&m(a)), overlap, "{b} {a}");
        }
    }

    #[test]
    fn claims_round_trip_through_handles() {
        let minute = WindowShape::new(Duration::from_secs(60), Duration::from_millis(100)).unwrap();
        let day = WindowShape::DAY;
        let tag = key("research");
        let claim = Claim {
            id: 77,
            rings: vec![
                RingRef {
                    tag: tag.clone(),
                    scope: Scope::Key(key("team.a")),
                    shape: minute,
                },
                RingRef {
                    tag: tag.clone(),
                    scope: Scope::Key(key("team.a")),
                    shape: day,
                },
                RingRef {
                    tag: tag.clone(),
                    scope: Scope::Model(key("team.a"), m("ft:gpt-4o:org:x*")),
                    shape: minute,
                },
                RingRef {
                    tag: tag.clone(),
                    scope: Scope::Pool,
                    shape: minute,
                },
            ],
        };
        let h = claim.handle();
        assert_eq!(Claim::from_handle(&h), Some(claim));
        // A key's own ring under its own tag has the name rings always had.
        let own = RingRef::own(&key("team-a"), minute);
        assert_eq!(own.scope_text(), "");
        let back = Claim::from_handle(
            &Claim {
                rings: vec![own.clone()],
                id: 1,
            }
            .handle(),
        );
        assert_eq!(back.unwrap().rings, vec![own]);
        for bad in [
            "v2|zz|a|60000.100|",
            "v2|1|a",
            "v2|1|a|60000.100|nope:",
            "v3|1|a",
        ] {
            assert_eq!(Claim::from_handle(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_set_is_one_tag_and_no_ring_twice() {
        let s = WindowShape::DAY;
        let (a, b) = (RingRef::own(&key("a"), s), RingRef::own(&key("b"), s));
        assert!(check_set(&[&a]).is_ok());
        assert!(check_set(&[&a, &b]).is_err());
        assert!(check_set(&[&a, &a]).is_err());
        assert!(check_set(&[]).is_err());
    }
}

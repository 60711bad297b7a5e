//! Which limits apply to a request, as rings: the key's own per window, its `per_day`, the
//! first `models` entry matching the request's model, and its pool's limits (per window and
//! per day). All of one key's rings carry one hash tag — its pool's name when it has a
//! pool, else its own — so the engine checks and records them in one atomic step.

use std::collections::HashSet;

use super::{Config, KeySpec, PoolSpec};
use crate::engine::{Bound, KeyName, Limits, ModelMatch, RingRef, Scope, WindowShape};

/// Which of a key's limits a ring holds, as the 429 message and `/v1/usage` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitScope {
    /// The key's own limits per window.
    Key,
    /// The key's `per_day` limits.
    KeyDay,
    /// A `models` entry's limits per window.
    Model(ModelMatch),
    /// The pool's limits per window.
    Pool(KeyName),
    /// The pool's `per_day` limits.
    PoolDay(KeyName),
}

impl LimitScope {
    /// Whether the ring counts per window (`x-ratelimit-*` describe those), not per day.
    pub fn per_window(&self) -> bool {
        matches!(
            self,
            LimitScope::Key | LimitScope::Model(_) | LimitScope::Pool(_)
        )
    }

    /// How a 429 message names the limit, after the key's name: empty for the key's own
    /// per-window limits (the message they always had).
    pub fn describe(&self) -> String {
        match self {
            LimitScope::Key => String::new(),
            LimitScope::KeyDay => " (per day)".into(),
            LimitScope::Model(m) => format!(" (model {m})"),
            LimitScope::Pool(p) => format!(" (pool {p})"),
            LimitScope::PoolDay(p) => format!(" (pool {p}, per day)"),
        }
    }

    /// The name `/v1/usage` gives the limit.
    pub fn label(&self) -> String {
        match self {
            LimitScope::Key => "window".into(),
            LimitScope::KeyDay | LimitScope::PoolDay(_) => "per_day".into(),
            LimitScope::Model(m) => m.to_string(),
            LimitScope::Pool(p) => p.to_string(),
        }
    }

    /// The `scope` label of the metrics: `window` (the key's own per window), `per_day`,
    /// `model:<match>`, `pool:<name>`, `pool_per_day:<name>` — distinct for every limit
    /// set of one key.
    pub fn metric_scope(&self) -> String {
        match self {
            LimitScope::Key => "window".into(),
            LimitScope::KeyDay => "per_day".into(),
            LimitScope::Model(m) => format!("model:{m}"),
            LimitScope::Pool(p) => format!("pool:{p}"),
            LimitScope::PoolDay(p) => format!("pool_per_day:{p}"),
        }
    }
}

/// One limit that applies: what it is, and its ring with its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub scope: LimitScope,
    pub bound: Bound,
}

impl KeySpec {
    /// The hash tag of every ring of this key.
    pub fn tag(&self) -> &KeyName {
        self.pool.as_ref().unwrap_or(&self.name)
    }

    /// The first `models` entry matching `model` (entries never overlap, so the only one).
    pub fn model_entry(&self, model: &str) -> Option<&super::ModelLimits> {
        self.models.iter().find(|m| m.matches.matches(model))
    }
}

impl Config {
    /// The per-day window shape (24 h in minutes).
    pub fn day_shape(&self) -> WindowShape {
        WindowShape::DAY
    }

    fn ring(&self, tag: &KeyName, scope: Scope, shape: WindowShape) -> RingRef {
        RingRef {
            tag: tag.clone(),
            scope,
            shape,
        }
    }

    fn applied(
        &self,
        tag: &KeyName,
        scope: LimitScope,
        ring: Scope,
        day: bool,
        limits: Limits,
    ) -> Applied {
        let shape = if day { self.day_shape() } else { self.shape() };
        Applied {
            scope,
            bound: Bound {
                ring: self.ring(tag, ring, shape),
                limits,
            },
        }
    }

    /// Every limit that applies to a request of `key` for `model` (`None`: a request with
    /// no model, such as a `GET`), in the order the engine checks them: the key's own,
    /// its per-day, the model entry's, the pool's, the pool's per-day.
    pub fn limits_for(&self, key: &KeySpec, model: Option<&str>) -> Vec<Applied> {
        let mut out = self.key_limits(key);
        if let Some(entry) = model.and_then(|m| key.model_entry(m)) {
            out.push(self.model_limits(key, entry));
        }
        out.extend(self.limits_of_pool_of(key));
        out
    }

    /// The key's own limits: per window, and per day when it has them.
    fn key_limits(&self, key: &KeySpec) -> Vec<Applied> {
        let mut out = vec![self.applied(
            key.tag(),
            LimitScope::Key,
            Scope::Key(key.name.clone()),
            false,
            key.limits,
        )];
        if let Some(day) = key.per_day {
            out.push(self.applied(
                key.tag(),
                LimitScope::KeyDay,
                Scope::Key(key.name.clone()),
                true,
                day,
            ));
        }
        out
    }

    /// The limits of one of the key's `models` entries.
    fn model_limits(&self, key: &KeySpec, entry: &super::ModelLimits) -> Applied {
        self.applied(
            key.tag(),
            LimitScope::Model(entry.matches.clone()),
            Scope::Model(key.name.clone(), entry.matches.clone()),
            false,
            entry.limits,
        )
    }

    /// The limits of the key's pool, none without one.
    fn limits_of_pool_of(&self, key: &KeySpec) -> Vec<Applied> {
        key.pool
            .as_ref()
            .and_then(|p| self.pool_by_name(p.as_str()))
            .map(|pool| self.pool_limits(pool))
            .unwrap_or_default()
    }

    /// Every limit of a key, for `/v1/usage`: its own, per day, every `models` entry, its
    /// pool's.
    pub fn all_limits_of(&self, key: &KeySpec) -> Vec<Applied> {
        let mut out = self.key_limits(key);
        for entry in &key.models {
            out.push(self.model_limits(key, entry));
        }
        out.extend(self.limits_of_pool_of(key));
        out
    }

    /// A pool's limits: per window and per day, those it sets.
    pub fn pool_limits(&self, pool: &PoolSpec) -> Vec<Applied> {
        let mut out = Vec::with_capacity(2);
        if let Some(limits) = pool.limits {
            out.push(self.applied(
                &pool.name,
                LimitScope::Pool(pool.name.clone()),
                Scope::Pool,
                false,
                limits,
            ));
        }
        if let Some(day) = pool.per_day {
            out.push(self.applied(
                &pool.name,
                LimitScope::PoolDay(pool.name.clone()),
                Scope::Pool,
                true,
                day,
            ));
        }
        out
    }

    /// Every ring this config counts in: a store keeps these after a reload and may free
    /// the rest.
    pub fn rings(&self) -> HashSet<RingRef> {
        let mut rings = HashSet::new();
        for key in &self.keys {
            rings.extend(self.all_limits_of(key).into_iter().map(|a| a.bound.ring));
        }
        rings
    }
}

//! Placeholder for `--verify` (issue 4, item 4): names the keys from the limiter's config
//! and returns an empty report. The real replay replaces this file.
#![allow(dead_code)] // a placeholder: the real module uses every field

use std::path::Path;

use serde::Serialize;

use crate::record::{Record, UsageSeries};

pub struct Audit {
    pub window_ms: u64,
    pub precision_ms: u64,
    pub keys: Vec<AuditKey>,
}

pub struct AuditKey {
    pub name: String,
    /// In the order of `LimitKind::ALL`.
    pub limits: [u64; 3],
}

impl Audit {
    /// Reads the limiter's config and finds each secret's key; error if one is missing.
    pub fn load(config: &Path, secrets: &[String]) -> anyhow::Result<Audit> {
        let config =
            llm_ratelimit::config::Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut keys = Vec::with_capacity(secrets.len());
        for (i, secret) in secrets.iter().enumerate() {
            let spec = config
                .key_by_secret(secret)
                .ok_or_else(|| anyhow::anyhow!("--key number {} is not in the config", i + 1))?;
            let l = spec.limits;
            keys.push(AuditKey {
                name: spec.name.as_str().to_string(),
                limits: [l.requests, l.input_tokens, l.output_tokens],
            });
        }
        Ok(Audit {
            window_ms: config.window().as_millis() as u64,
            precision_ms: config.precision().as_millis() as u64,
            keys,
        })
    }

    /// Replays the records; `key` indexes of records refer to `self.keys`.
    pub fn replay(&self, _records: &[Record]) -> Report {
        Report { series: Vec::new() }
    }
}

#[derive(Serialize)]
pub struct Report {
    #[serde(skip)]
    pub series: Vec<UsageSeries>,
}

impl Report {
    pub fn render_text(&self) -> String {
        "verify: not implemented in this build\n".to_string()
    }

    pub fn passed(&self) -> bool {
        true
    }
}

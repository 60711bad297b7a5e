//! Hot reload: keep the in-force [`Config`] in step with its file.
//!
//! Polls rather than using inotify. Kubernetes updates a mounted ConfigMap by writing a
//! new timestamped directory and atomically re-pointing the `..data` symlink, so
//! `config.yaml -> ..data/config.yaml` changes content without any event on the path
//! we were given; a watch on the file's inode would follow the old directory.
//! Reading the path afresh on every tick follows every swap, and costs one small read
//! per interval.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::{Config, ConfigError};

/// What happened when the watcher saw the file's bytes change (or read it first).
#[derive(Debug)]
pub enum ReloadOutcome {
    /// A new, valid config is now in force.
    Applied,
    /// The file is valid and says the same as the config in force (first read, an
    /// edit of comments only, or a revert after a rejected edit); nothing swapped.
    Unchanged,
    /// The file is invalid; the previous config stays in force.
    Rejected(ConfigError),
}

/// Watches `path` every `interval` and swaps `current` when the file's content changes
/// and parses. An invalid edit keeps the old config, is logged at `warn` and reported
/// through `on_outcome`. The outcome of the first read is reported too, usually
/// `Unchanged`. Content that has not changed since the last read reports nothing; a
/// file that cannot be read (mid-swap, briefly missing) is retried on the next tick.
///
/// Runs until the returned task is aborted.
pub fn spawn_watcher(
    path: PathBuf,
    current: Arc<ArcSwap<Config>>,
    interval: Duration,
    on_outcome: impl Fn(&ReloadOutcome) + Send + Sync + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let origin = path.display().to_string();
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_seen: Option<[u8; 32]> = None;
        loop {
            ticks.tick().await;
            // `read` opens the path anew, resolving every symlink on the way.
            let bytes = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::debug!(path = %origin, error = %e, "config not readable; retrying");
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            if last_seen == Some(digest) {
                continue;
            }
            last_seen = Some(digest);
            let outcome = reload(&bytes, &origin, &current);
            match &outcome {
                ReloadOutcome::Applied => tracing::info!(path = %origin, "config reloaded"),
                ReloadOutcome::Unchanged => {}
                ReloadOutcome::Rejected(e) => {
                    tracing::warn!(error = %e, "config edit rejected; previous config stays in force")
                }
            }
            on_outcome(&outcome);
        }
    })
}

fn reload(bytes: &[u8], origin: &str, current: &ArcSwap<Config>) -> ReloadOutcome {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            return ReloadOutcome::Rejected(ConfigError::unlocated(
                origin,
                format!("config is not valid UTF-8: {e}"),
            ))
        }
    };
    match Config::parse(text, origin) {
        Err(e) => ReloadOutcome::Rejected(e),
        Ok(new) if new == **current.load() => ReloadOutcome::Unchanged,
        Ok(new) => {
            current.store(Arc::new(new));
            ReloadOutcome::Applied
        }
    }
}

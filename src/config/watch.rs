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
#[derive(Clone, Debug)]
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use tokio::sync::mpsc;

    use super::*;

    const INTERVAL: Duration = Duration::from_millis(20);

    fn text(rpm: u64) -> String {
        format!(
            "keys:\n  - name: a\n    key: sk-watch-secret\n    rpm: {rpm}\n    input_tpm: 10\n    output_tpm: 10\n"
        )
    }

    /// Replaces `path`'s content in one step, as editors and config tools do, so the
    /// watcher never reads a half-written file.
    fn write_atomically(path: &Path, content: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    fn rpm(current: &ArcSwap<Config>) -> u64 {
        current.load().keys()[0].limits.requests
    }

    struct Watched {
        current: Arc<ArcSwap<Config>>,
        outcomes: mpsc::UnboundedReceiver<ReloadOutcome>,
        task: JoinHandle<()>,
    }

    impl Watched {
        /// Loads `path`, starts the watcher and waits for its first read.
        async fn start(path: &Path) -> Watched {
            let current = Arc::new(ArcSwap::from_pointee(Config::load(path).unwrap()));
            let (tx, outcomes) = mpsc::unbounded_channel();
            let task = spawn_watcher(path.to_owned(), current.clone(), INTERVAL, move |o| {
                let _ = tx.send(o.clone());
            });
            let mut watched = Watched {
                current,
                outcomes,
                task,
            };
            assert!(matches!(watched.next().await, ReloadOutcome::Unchanged));
            watched
        }

        async fn next(&mut self) -> ReloadOutcome {
            tokio::time::timeout(Duration::from_secs(10), self.outcomes.recv())
                .await
                .expect("no reload outcome within 10s")
                .expect("watcher stopped")
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn valid_edit_applies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        fs::write(&path, text(1)).unwrap();
        let mut watched = Watched::start(&path).await;

        write_atomically(&path, &text(2));
        assert!(matches!(watched.next().await, ReloadOutcome::Applied));
        assert_eq!(rpm(&watched.current), 2);
    }

    #[tokio::test]
    async fn invalid_edit_is_rejected_and_old_config_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        fs::write(&path, text(1)).unwrap();
        let mut watched = Watched::start(&path).await;

        write_atomically(&path, &text(1).replace("rpm: 1", "rpm: 0"));
        match watched.next().await {
            ReloadOutcome::Rejected(e) => {
                assert_eq!((e.line, e.column), (4, 10), "{e}");
                assert_eq!(e.origin, path.display().to_string());
                assert!(!e.to_string().contains("sk-watch-secret"), "{e}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(rpm(&watched.current), 1);

        // Putting the in-force content back changes nothing; a later valid edit applies.
        write_atomically(&path, &text(1));
        assert!(matches!(watched.next().await, ReloadOutcome::Unchanged));
        write_atomically(&path, &text(3));
        assert!(matches!(watched.next().await, ReloadOutcome::Applied));
        assert_eq!(rpm(&watched.current), 3);
    }

    #[tokio::test]
    async fn missing_file_is_retried_not_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        fs::write(&path, text(1)).unwrap();
        let mut watched = Watched::start(&path).await;

        fs::remove_file(&path).unwrap();
        // Several ticks with no file: nothing to report.
        let quiet = tokio::time::timeout(INTERVAL * 5, watched.outcomes.recv()).await;
        assert!(quiet.is_err(), "reported {quiet:?} for a missing file");
        assert_eq!(rpm(&watched.current), 1);

        write_atomically(&path, &text(4));
        assert!(matches!(watched.next().await, ReloadOutcome::Applied));
        assert_eq!(rpm(&watched.current), 4);
    }

    #[tokio::test]
    async fn follows_a_kubernetes_configmap_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("..2026_01_01")).unwrap();
        fs::write(root.join("..2026_01_01/config.yaml"), text(1)).unwrap();
        symlink("..2026_01_01", root.join("..data")).unwrap();
        symlink("..data/config.yaml", root.join("config.yaml")).unwrap();
        let mut watched = Watched::start(&root.join("config.yaml")).await;

        // What the kubelet does: a new timestamped directory, a temporary symlink to
        // it, renamed over `..data` in one step, then the old directory removed.
        fs::create_dir(root.join("..2026_01_02")).unwrap();
        fs::write(root.join("..2026_01_02/config.yaml"), text(5)).unwrap();
        symlink("..2026_01_02", root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        fs::remove_dir_all(root.join("..2026_01_01")).unwrap();

        assert!(matches!(watched.next().await, ReloadOutcome::Applied));
        assert_eq!(rpm(&watched.current), 5);
        assert!(fs::symlink_metadata(root.join("config.yaml"))
            .unwrap()
            .is_symlink());
    }
}

//! Shutdown as a node does it (SIGTERM): readiness off at once, serve on for the
//! `--shutdown-delay` while proxies and Kubernetes stop sending, then stop accepting and
//! finish what is in flight — admissions and settlements — before exiting.
//!
//! [`Drain`] is the node's one shared record of that: whether draining has begun (read by
//! `/readyz` and gRPC health) and how much settlement work is still running. Settlements
//! need the count because an ext_proc stream is settled in a task of its own, which can
//! outlive the HTTP/2 stream Envoy closes; the listeners' own graceful shutdown covers
//! request/response calls.

use std::sync::Arc;

use tokio::sync::watch;

/// Whether the node is draining, and the settlements still running.
#[derive(Debug)]
pub struct Drain {
    draining: watch::Sender<bool>,
    in_flight: watch::Sender<usize>,
}

impl Default for Drain {
    fn default() -> Drain {
        Drain {
            draining: watch::Sender::new(false),
            in_flight: watch::Sender::new(0),
        }
    }
}

/// One piece of settlement work in flight; the count drops when this does.
#[derive(Debug)]
pub struct Work {
    drain: Arc<Drain>,
}

impl Drop for Work {
    fn drop(&mut self) {
        self.drain.in_flight.send_modify(|n| *n -= 1);
    }
}

impl Drain {
    /// Readiness off from now on; idempotent.
    pub fn begin(&self) {
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Completes once [`Drain::begin`] has been called.
    pub async fn begun(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Counts one piece of settlement work until the returned guard is dropped.
    pub fn work(self: &Arc<Self>) -> Work {
        self.in_flight.send_modify(|n| *n += 1);
        Work {
            drain: self.clone(),
        }
    }

    /// Settlement work running now.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Completes when no settlement work is running.
    pub async fn settled(&self) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn settled_waits_for_every_piece_of_work() {
        let drain = Arc::new(Drain::default());
        let (a, b) = (drain.work(), drain.work());
        assert_eq!(drain.in_flight(), 2);
        drop(a);
        let waiting = tokio::time::timeout(Duration::from_millis(50), drain.settled()).await;
        assert!(waiting.is_err(), "settled with one piece still running");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), drain.settled())
            .await
            .expect("settled once all work is done");
    }

    #[tokio::test]
    async fn begin_is_seen_by_waiters_and_readers() {
        let drain = Arc::new(Drain::default());
        assert!(!drain.is_draining());
        let waiter = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.begun().await })
        };
        drain.begin();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("begun() completes")
            .unwrap();
        assert!(drain.is_draining());
        drain.begin();
        assert!(drain.is_draining());
    }
}

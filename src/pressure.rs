//! Back-pressure: how much work a node takes on at once, and what it answers beyond that.
//!
//! Admission work (ext_authz `Check`, `ShouldRateLimit`, HTTP `/v1/check`, `/v1/report`,
//! `/v1/usage`) passes one [`Gate`] per node: at most `max_in_flight` requests run, at
//! most `max_queued` more wait (first come, first served) and none waits longer than
//! `queue_wait`; a request beyond that is *shed* at once — gRPC `RESOURCE_EXHAUSTED`, HTTP
//! 503 with `retry-after` and an OpenAI `server_error` body — instead of joining a queue
//! that only grows. A request that runs past `request_timeout` is answered the same way.
//! Health, readiness, metrics and reflection never pass the gate: an overloaded node must
//! still say how it is. ext_proc streams live as long as the response they meter, so they
//! are bounded apart, by a count of open streams (`grpc::ext_proc`).
//!
//! Why queue at all: a short burst over `max_in_flight` is better served a few
//! milliseconds late than refused; why bound the wait: a caller (Envoy's ext_authz has a
//! 250 ms deadline) gains nothing from an answer after it gave up. A gRPC request's own
//! `grpc-timeout` therefore caps its wait at half that deadline and its whole time at four
//! fifths, so the shed reaches the caller while it still listens.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::answer::Answer;
use crate::metrics::{Metrics, ShedLabels};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

/// The sizes of the gate and of the ext_proc stream cap (`serve` flags; see
/// docs/operations.md for how the defaults were chosen).
#[derive(Clone, Copy, Debug)]
pub struct Pressure {
    /// Requests running at once.
    pub max_in_flight: usize,
    /// Requests waiting for a running slot; beyond it a request is shed at once.
    pub max_queued: usize,
    /// The longest a request waits for a running slot before it is shed.
    pub queue_wait: Duration,
    /// The longest a request runs (after its wait) before it is answered as shed.
    pub request_timeout: Duration,
    /// ext_proc streams open at once; a stream over the cap is ended at once.
    pub max_settlement_streams: usize,
}

impl Default for Pressure {
    fn default() -> Pressure {
        Pressure {
            max_in_flight: 256,
            max_queued: 1024,
            queue_wait: Duration::from_millis(100),
            request_timeout: Duration::from_secs(2),
            max_settlement_streams: 1024,
        }
    }
}

/// Why a request was shed: the label of `llm_ratelimit_shed_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Every running slot and every queue place was taken.
    QueueFull,
    /// It waited `queue_wait` (or half its gRPC deadline) without a running slot.
    Waited,
    /// It ran longer than `request_timeout`.
    TimedOut,
    /// An ext_proc stream over `max_settlement_streams`.
    Streams,
}

impl Shed {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::Waited => "waited",
            Shed::TimedOut => "timeout",
            Shed::Streams => "streams",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Shed::TimedOut => "llm-ratelimit did not finish in time; please retry shortly",
            _ => "llm-ratelimit is overloaded; please retry shortly",
        }
    }

    /// The gRPC answer. RESOURCE_EXHAUSTED, not UNAVAILABLE: both make Envoy's ext_authz
    /// answer `status_on_error` (or admit under `failure_mode_allow`), but UNAVAILABLE is
    /// the code gRPC clients and Envoy retry policies retry by default, and retrying into
    /// an overloaded node only adds load.
    pub(crate) fn status(self) -> tonic::Status {
        tonic::Status::resource_exhausted(self.message())
    }

    /// The HTTP answer: 503, `retry-after: 1`, an OpenAI `server_error` body.
    pub(crate) fn answer(self) -> Answer {
        let body = serde_json::json!({"error": {
            "message": self.message(),
            "type": "server_error",
            "param": null,
            "code": "overloaded",
        }});
        Answer {
            status: 503,
            headers: vec![
                ("content-type", "application/json".into()),
                ("retry-after", "1".into()),
                ("retry-after-ms", "1000".into()),
            ],
            body: body.to_string(),
        }
    }
}

/// One node's admission gate; shared (`Arc`) by the gRPC and HTTP servers.
pub struct Gate {
    /// Running slots plus queue places: the most admissions the gate holds at once.
    admissions: usize,
    running: Arc<Semaphore>,
    queue: Semaphore,
    queue_wait: Duration,
    request_timeout: Duration,
    shed: Family<ShedLabels, Counter>,
    in_flight: Gauge,
    queued: Gauge,
}

/// A running slot; gives it back when dropped.
pub(crate) struct Pass {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Gate {
    /// A gate of `pressure`'s sizes, counted in `metrics`.
    pub fn new(pressure: &Pressure, metrics: &Metrics) -> Gate {
        Gate {
            admissions: pressure.max_in_flight.max(1) + pressure.max_queued,
            running: Arc::new(Semaphore::new(pressure.max_in_flight.max(1))),
            queue: Semaphore::new(pressure.max_queued),
            queue_wait: pressure.queue_wait,
            request_timeout: pressure.request_timeout,
            shed: metrics.shed.clone(),
            in_flight: metrics.in_flight.clone(),
            queued: metrics.queued.clone(),
        }
    }

    /// The most admissions the gate holds at once, running and queued.
    pub fn admissions(&self) -> usize {
        self.admissions
    }

    /// A running slot at once, else after a wait of at most `wait` in the queue, else the
    /// reason to shed.
    pub(crate) async fn enter(&self, wait: Duration) -> Result<Pass, Shed> {
        let permit = match self.running.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let Ok(_place) = self.queue.try_acquire() else {
                    return Err(Shed::QueueFull);
                };
                self.queued.inc();
                let waited = tokio::time::timeout(wait, self.running.clone().acquire_owned()).await;
                self.queued.dec();
                match waited {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(Shed::Waited),
                }
            }
        };
        self.in_flight.inc();
        Ok(Pass {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        })
    }

    /// The wait and the whole time allowed to a request: `queue_wait` and
    /// `request_timeout`, and when its gRPC caller set a deadline (`grpc-timeout`), at
    /// most half of it to wait and four fifths in all, so the shed arrives while the
    /// caller still listens.
    fn budget(&self, headers: &HeaderMap) -> (Duration, Duration) {
        match headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
        {
            Some(deadline) => (
                self.queue_wait.min(deadline / 2),
                self.request_timeout.min(deadline * 4 / 5),
            ),
            None => (self.queue_wait, self.request_timeout),
        }
    }

    fn count(&self, surface: &'static str, shed: Shed) {
        self.shed
            .get_or_create(&ShedLabels {
                surface,
                reason: shed.label(),
            })
            .inc();
    }
}

/// A `grpc-timeout` header value: at most 8 digits and a unit (`H M S m u n`).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A tower layer putting a [`Gate`] in front of a server's routes. `surface_of` names the
/// surface a request path belongs to (the metric label), or `None` for paths that are
/// never shed; `shed` builds the server's answer to a shed request.
pub(crate) struct GateLayer<B> {
    gate: Arc<Gate>,
    surface_of: fn(&str) -> Option<&'static str>,
    shed: fn(Shed) -> Response<B>,
}

impl<B> GateLayer<B> {
    pub(crate) fn new(
        gate: Arc<Gate>,
        surface_of: fn(&str) -> Option<&'static str>,
        shed: fn(Shed) -> Response<B>,
    ) -> GateLayer<B> {
        GateLayer {
            gate,
            surface_of,
            shed,
        }
    }
}

impl<B> Clone for GateLayer<B> {
    fn clone(&self) -> Self {
        GateLayer {
            gate: self.gate.clone(),
            surface_of: self.surface_of,
            shed: self.shed,
        }
    }
}

impl<S, B> tower::Layer<S> for GateLayer<B> {
    type Service = Gated<S, B>;

    fn layer(&self, inner: S) -> Gated<S, B> {
        Gated {
            inner,
            layer: self.clone(),
        }
    }
}

/// The routes of a server behind its [`Gate`].
pub(crate) struct Gated<S, B> {
    inner: S,
    layer: GateLayer<B>,
}

impl<S: Clone, B> Clone for Gated<S, B> {
    fn clone(&self) -> Self {
        Gated {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, ReqBody, B> tower::Service<Request<ReqBody>> for Gated<S, B>
where
    S: tower::Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service made ready by `poll_ready` serves this call; its clone the next.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let Some(surface) = (self.layer.surface_of)(request.uri().path()) else {
            return Box::pin(inner.call(request));
        };
        let (gate, shed) = (self.layer.gate.clone(), self.layer.shed);
        let (wait, total) = gate.budget(request.headers());
        let deadline = tokio::time::Instant::now() + total;
        Box::pin(async move {
            let _pass = match gate.enter(wait).await {
                Ok(pass) => pass,
                Err(why) => {
                    gate.count(surface, why);
                    return Ok(shed(why));
                }
            };
            match tokio::time::timeout_at(deadline, inner.call(request)).await {
                Ok(answer) => answer,
                Err(_) => {
                    gate.count(surface, Shed::TimedOut);
                    Ok(shed(Shed::TimedOut))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(in_flight: usize, queued: usize) -> Gate {
        Gate::new(
            &Pressure {
                max_in_flight: in_flight,
                max_queued: queued,
                queue_wait: Duration::from_secs(5),
                ..Pressure::default()
            },
            &Metrics::default(),
        )
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("m"), None);
        assert_eq!(grpc_timeout("123456789m"), None);
        assert_eq!(grpc_timeout("10x"), None);
        assert_eq!(grpc_timeout(""), None);
    }

    #[tokio::test]
    async fn beyond_the_running_slots_and_the_queue_requests_are_shed_at_once() {
        let gate = Arc::new(gate(2, 1));
        let a = gate.enter(Duration::from_secs(5)).await.unwrap();
        let _b = gate.enter(Duration::from_secs(5)).await.unwrap();
        // The third waits in the queue; the fourth finds the queue full.
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter(Duration::from_secs(5)).await.is_ok() }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gate.queue.available_permits() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never queued");
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        assert_eq!(
            gate.enter(Duration::from_secs(5)).await.err(),
            Some(Shed::QueueFull)
        );
        assert!(started.elapsed() < Duration::from_millis(100));
        // A slot given back goes to the one waiting.
        drop(a);
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn a_wait_longer_than_allowed_is_shed() {
        let gate = gate(1, 4);
        let _a = gate.enter(Duration::ZERO).await.unwrap();
        assert_eq!(
            gate.enter(Duration::from_millis(20)).await.err(),
            Some(Shed::Waited)
        );
        assert_eq!(gate.queued.get(), 0);
        assert_eq!(gate.in_flight.get(), 1);
    }

    #[test]
    fn a_grpc_deadline_caps_the_wait_and_the_run() {
        let gate = gate(1, 1);
        let mut headers = HeaderMap::new();
        assert_eq!(
            gate.budget(&headers),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        headers.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            gate.budget(&headers),
            (Duration::from_millis(125), Duration::from_millis(200))
        );
    }

    #[test]
    fn the_http_shed_is_an_openai_server_error_with_retry_after() {
        let answer = Shed::QueueFull.answer();
        assert_eq!(answer.status, 503);
        assert!(answer.headers.contains(&("retry-after", "1".into())));
        let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(Shed::Waited.status().code(), tonic::Code::ResourceExhausted);
    }
}

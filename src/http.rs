//! The HTTP surface (`--http-addr`): admission and settlement for Nginx and other
//! non-Envoy callers, usage, health, readiness and metrics. Handlers only translate
//! HTTP to [`Limiter`] calls and [`Answer`]s back. `/v1/*` passes the node's
//! back-pressure [`Gate`] (a shed is 503 with `retry-after` and an OpenAI `server_error`
//! body); `/healthz`, `/readyz` and `/metrics` never do.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::admission::{ClientRequest, Handle, Limiter};
use crate::answer::Answer;
use crate::pressure::{Gate, GateLayer, Pressure, Shed};
use crate::telemetry::{self, TraceHeaders};
use tracing::Instrument;

/// The routes behind a gate of the default [`Pressure`] sizes of their own.
pub fn router(limiter: Arc<Limiter>) -> Router {
    let gate = Arc::new(Gate::new(&Pressure::default(), limiter.metrics()));
    router_with(limiter, gate)
}

/// The surface an HTTP path belongs to, for the gate; `None` is never shed.
fn surface_of(path: &str) -> Option<&'static str> {
    match path {
        "/v1/check" => Some("http_check"),
        "/v1/report" => Some("http_report"),
        _ if path.starts_with("/v1/") => Some("http_usage"),
        _ => None,
    }
}

fn shed(why: Shed) -> Response {
    render(why.answer())
}

/// The routes, `/v1/*` behind `gate`.
pub fn router_with(limiter: Arc<Limiter>, gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/usage/{name}", get(usage))
        .route("/v1/usage/pools/{name}", get(pool_usage))
        .route("/v1/check", post(check))
        .route("/v1/report", post(report))
        .layer(GateLayer::new(gate, surface_of, shed))
        .with_state(limiter)
}

fn render(answer: Answer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in answer.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.append(name, v);
        }
    }
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn readyz(State(limiter): State<Arc<Limiter>>) -> Response {
    if limiter.ready().await {
        (StatusCode::OK, "ready\n").into_response()
    } else if limiter.drain().is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
    }
}

/// The longest a scrape waits for the store to read the windows of every key.
const WINDOW_READ_BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

async fn metrics(State(limiter): State<Arc<Limiter>>) -> Response {
    // The window gauges are read from the store now, so a scrape sees the window as it is;
    // a stalled store keeps the last reading rather than holding the scrape.
    let _ = tokio::time::timeout(WINDOW_READ_BUDGET, limiter.observe_windows_once()).await;
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        limiter.metrics().render(),
    )
        .into_response()
}

async fn usage(State(limiter): State<Arc<Limiter>>, Path(name): Path<String>) -> Response {
    match limiter.usage(&name).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(answer) => render(answer),
    }
}

async fn pool_usage(State(limiter): State<Arc<Limiter>>, Path(name): Path<String>) -> Response {
    match limiter.pool_usage(&name).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(answer) => render(answer),
    }
}

/// Reads at most `limit` bytes of body; `None` when there are more.
async fn body_within(body: Body, limit: usize) -> Option<axum::body::Bytes> {
    to_bytes(body, limit).await.ok()
}

async fn check(State(limiter): State<Arc<Limiter>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let limit = limiter.config().max_body_bytes();
    // One byte over the limit is enough to know it is too large.
    let Some(body) = body_within(body, limit + 1).await else {
        limiter.metrics().reject("body_too_large");
        return render(Answer::body_too_large(limit));
    };
    let path = header(&parts.headers, "x-original-uri").unwrap_or("/v1/chat/completions");
    let span = telemetry::admission("http_check", || TraceHeaders::from_http(&parts.headers));
    let verdict = limiter
        .check(ClientRequest {
            // The client's method, when the proxy passes it; `/v1/check` is asked for
            // requests with bodies, so POST otherwise.
            method: header(&parts.headers, "x-original-method").unwrap_or("POST"),
            authorization: header(&parts.headers, "authorization"),
            api_key: header(&parts.headers, "api-key"),
            path,
            body: &body,
        })
        .instrument(span)
        .await;
    let mut response = render(verdict.answer);
    if let Some(admitted) = verdict.admitted {
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(admitted.key.as_str()) {
            headers.insert("x-llm-ratelimit-key", v);
        }
        if let Some(Ok(v)) = admitted.reservation.as_deref().map(HeaderValue::from_str) {
            headers.insert("x-llm-ratelimit-reservation", v);
        }
    }
    response
}

async fn report(State(limiter): State<Arc<Limiter>>, request: Request) -> Response {
    // Shutdown waits for a settlement whose body is still arriving.
    let _work = limiter.drain().work();
    let (parts, body) = request.into_parts();
    let Some(handle) =
        header(&parts.headers, "x-llm-ratelimit-reservation").and_then(Handle::parse)
    else {
        return render(Answer::invalid_request(
            "x-llm-ratelimit-reservation is missing or is not a reservation handle.",
            Some("x-llm-ratelimit-reservation"),
        ));
    };
    let status = header(&parts.headers, "x-upstream-status").and_then(|s| s.trim().parse().ok());
    let span = telemetry::settlement("http_report", || TraceHeaders::from_http(&parts.headers));
    let mut meter = handle.meter();
    let tokenizer = limiter.tokenizer();
    let mut stream = body.into_data_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => meter.feed(&bytes, tokenizer),
            Err(_) => break,
        }
    }
    match limiter
        .settle(&handle.reservation, status, meter)
        .instrument(span)
        .await
    {
        Ok(report) => {
            axum::Json(serde_json::json!({ "output_tokens": report.output_tokens })).into_response()
        }
        Err(answer) => render(answer),
    }
}

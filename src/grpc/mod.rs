//! The gRPC surface (`--grpc-addr`, HTTP/2): Envoy's ext_authz `Check` (admission),
//! ext_proc `Process` (settlement after the response), `ShouldRateLimit` (Envoy's
//! `ratelimit` filter), `grpc.health.v1.Health` and server reflection. Each service only
//! translates Envoy's messages to [`Limiter`] calls. `Check` and `ShouldRateLimit` pass
//! the node's back-pressure [`Gate`] (shed as `RESOURCE_EXHAUSTED`); ext_proc streams are
//! capped by their own count; health and reflection are never shed.

mod authz;
mod ext_proc;
mod rls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::admission::Limiter;
use crate::pressure::{Gate, GateLayer, Pressure, Shed};

pub use authz::Admission;
pub use ext_proc::Settlement;
pub use rls::{RateLimiter, MAX_DESCRIPTORS, MAX_ENTRIES};

/// Where ext_authz puts our dynamic metadata, and ext_proc finds it again.
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.ext_authz";
/// The metadata field holding the settlement handle.
pub const RESERVATION_FIELD: &str = "reservation";

/// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`):
/// every admission the gate runs or queues (`admissions`), every ext_proc stream, and 64
/// for health and reflection, so Envoy, whatever it multiplexes on one connection, never
/// meets the bound before the node's own. tonic sets no bound, and health `Watch` and
/// reflection streams pass no gate and stay open as long as the caller likes: one
/// connection could hold any number of them.
pub fn streams_per_connection(admissions: usize, settlement_streams: usize) -> u32 {
    let n = admissions
        .saturating_add(settlement_streams)
        .saturating_add(64);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Descriptors of the Envoy services, for reflection (`scripts/gen-proto-descriptors.sh`).
const ENVOY_DESCRIPTORS: &[u8] = include_bytes!("../../proto/envoy-services.desc");

/// The surface a gRPC path belongs to, for the gate; `None` is never shed (health,
/// reflection, and ext_proc, whose streams are capped apart).
fn surface_of(path: &str) -> Option<&'static str> {
    if path.starts_with("/envoy.service.auth.v3.Authorization/") {
        Some("ext_authz")
    } else if path.starts_with("/envoy.service.ratelimit.v3.RateLimitService/") {
        Some("ratelimit")
    } else {
        None
    }
}

fn shed(why: Shed) -> axum::http::Response<tonic::body::Body> {
    why.status().into_http()
}

/// Serves every gRPC service on `listener` until `shutdown` completes, behind a gate of
/// the default [`Pressure`] sizes of its own.
pub async fn serve(
    listener: TcpListener,
    limiter: Arc<Limiter>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pressure = Pressure::default();
    let gate = Arc::new(Gate::new(&pressure, limiter.metrics()));
    serve_with(
        listener,
        limiter,
        gate,
        pressure.max_settlement_streams,
        shutdown,
    )
    .await
}

/// Serves every gRPC service on `listener` until `shutdown` completes. Health reports
/// SERVING while the store answers. `Check` and `ShouldRateLimit` pass `gate`; at most
/// `max_settlement_streams` ext_proc streams are open at once.
pub async fn serve_with(
    listener: TcpListener,
    limiter: Arc<Limiter>,
    gate: Arc<Gate>,
    max_settlement_streams: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl and ghz releases still ask for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ENVOY_DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);
    let watch = {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            loop {
                let status = if limiter.ready().await {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for service in [
                    "",
                    "envoy.service.auth.v3.Authorization",
                    "envoy.service.ext_proc.v3.ExternalProcessor",
                    "envoy.service.ratelimit.v3.RateLimitService",
                ] {
                    reporter.set_service_status(service, status).await;
                }
                if limiter.drain().is_draining() {
                    break; // NOT_SERVING from now on
                }
                // Shutdown flips health at once, not at the next tick.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = limiter.drain().begun() => {}
                }
            }
        })
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(streams_per_connection(
            gate.admissions(),
            max_settlement_streams,
        ))
        .layer(GateLayer::new(gate, surface_of, shed))
        .add_service(AuthorizationServer::new(Admission::new(limiter.clone())))
        .add_service(ExternalProcessorServer::new(Settlement::new(
            limiter.clone(),
            max_settlement_streams,
        )))
        .add_service(RateLimitServiceServer::new(RateLimiter::new(limiter)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // TCP_NODELAY: without it Nagle and delayed ACKs add ~40 ms to small replies.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    watch.abort();
    Ok(result?)
}

//! A minimal OTLP/gRPC trace receiver that counts the spans it is sent and prints the
//! count every 5 seconds: the collector of the tracing-cost runs (`scripts/bench.sh --only
//! tracing`, docs/observability.md), and a quick way to see that a node exports at all.
//! Not a collector: it keeps nothing.
//!
//! ```sh
//! cargo run --release --example otlp_sink -- 127.0.0.1:4317
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
//!   llm-ratelimit serve --config keys.yaml
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into())
        .parse()?;
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            println!("spans received: {}", counted.load(Ordering::Relaxed));
        }
    });
    println!("OTLP/gRPC trace sink on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink(spans)))
        .serve(addr)
        .await?;
    Ok(())
}

//! ext_proc `Process`: the post-response hook. Envoy runs it in observability mode with
//! the response body STREAMED, so SSE reaches the client as it is produced while a copy
//! comes here. The handle that ext_authz put in dynamic metadata arrives through
//! `metadata_context`; the body is metered (usage, or the streamed text counted) and the
//! reservation settled at end of stream.
//!
//! The stream is ended by us right after end-of-stream, and at once when the request
//! carries no reservation (a 429, an embeddings call): Envoy otherwise holds each
//! observability stream open until its `deferred_close_timeout`, and under load the open
//! streams exhaust the cluster's circuit breakers (see FIELD-NOTES).
//!
//! At most `max_settlement_streams` streams are open at once: one over the cap is ended at
//! once with `RESOURCE_EXHAUSTED` and counted (`llm_ratelimit_shed_total{surface="ext_proc"}`);
//! its reservation stays counted at the reserved amount until its bucket leaves the
//! window — the safe side. Each open stream holds at most the meter's bounded memory
//! ([`crate::openai::OutputMeter`]).

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, HttpHeaders, ProcessingRequest, ProcessingResponse,
    TrailersResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{METADATA_NAMESPACE, RESERVATION_FIELD};
use crate::admission::{Handle, Limiter};
use crate::pressure::Shed;
use crate::shutdown::Work;
use crate::telemetry::{self, TraceHeaders};
use tracing::Instrument;

pub struct Settlement {
    limiter: Arc<Limiter>,
    streams: Arc<Semaphore>,
}

impl Settlement {
    pub fn new(limiter: Arc<Limiter>, max_streams: usize) -> Settlement {
        Settlement {
            limiter,
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }
}

/// One open stream's place under the cap, and its count in the gauge.
struct OpenStream {
    _permit: OwnedSemaphorePermit,
    /// Shutdown waits for this stream's settlement.
    _work: Work,
    limiter: Arc<Limiter>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.limiter.metrics().settlement_streams.dec();
    }
}

/// The settlement handle ext_authz left in dynamic metadata, if any.
fn handle_of(message: &ProcessingRequest) -> Option<Handle> {
    let fields = &message
        .metadata_context
        .as_ref()?
        .filter_metadata
        .get(METADATA_NAMESPACE)?
        .fields;
    match fields.get(RESERVATION_FIELD)?.kind.as_ref()? {
        Kind::StringValue(s) => Handle::parse(s),
        _ => None,
    }
}

fn status_of(headers: &HttpHeaders) -> Option<u16> {
    let h = headers
        .headers
        .as_ref()?
        .headers
        .iter()
        .find(|h| h.key == ":status")?;
    let text = if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    };
    text.trim().parse().ok()
}

/// The empty answer to one message, for a processor not in observability mode.
fn pass(phase: &Phase) -> ProcessingResponse {
    let response = match phase {
        Phase::RequestHeaders(_) => Reply::RequestHeaders(HeadersResponse::default()),
        Phase::ResponseHeaders(_) => Reply::ResponseHeaders(HeadersResponse::default()),
        Phase::RequestBody(_) => Reply::RequestBody(BodyResponse::default()),
        Phase::ResponseBody(_) => Reply::ResponseBody(BodyResponse::default()),
        Phase::RequestTrailers(_) => Reply::RequestTrailers(TrailersResponse::default()),
        Phase::ResponseTrailers(_) => Reply::ResponseTrailers(TrailersResponse::default()),
    };
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

async fn run(
    open: OpenStream,
    mut inbound: Streaming<ProcessingRequest>,
    replies: mpsc::Sender<Result<ProcessingResponse, Status>>,
) {
    let limiter = open.limiter.clone();
    let tokenizer = limiter.tokenizer();
    let mut handle: Option<Handle> = None;
    let mut meter = None;
    let mut status = None;
    let mut saw_body = false;
    let mut done = false;
    while let Ok(Some(message)) = inbound.message().await {
        if handle.is_none() {
            handle = handle_of(&message);
            let Some(h) = &handle else {
                break; // nothing to settle: end the stream now
            };
            meter = Some(h.meter());
        }
        let Some(phase) = message.request.as_ref() else {
            continue;
        };
        let end = match phase {
            Phase::ResponseHeaders(h) => {
                status = status_of(h);
                h.end_of_stream
            }
            Phase::ResponseBody(b) => {
                saw_body = true;
                if let Some(m) = meter.as_mut() {
                    m.feed(&b.body, tokenizer);
                }
                b.end_of_stream
            }
            Phase::ResponseTrailers(_) => true,
            _ => false,
        };
        if !message.observability_mode && replies.send(Ok(pass(phase))).await.is_err() {
            break;
        }
        if end {
            done = true;
            break;
        }
    }
    // A response cut short (the client went away) is settled from what was seen of it.
    if let (Some(h), Some(m)) = (handle, meter) {
        if done || saw_body {
            if let Err(answer) = limiter.settle(&h.reservation, status, m).await {
                tracing::warn!(status = answer.status, "settlement failed");
            }
        }
    }
    drop(replies); // ends our side of the stream
    drop(open);
}

#[tonic::async_trait]
impl ExternalProcessor for Settlement {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            self.limiter
                .metrics()
                .shed("ext_proc", Shed::Streams.label());
            return Err(Shed::Streams.status());
        };
        self.limiter.metrics().settlement_streams.inc();
        let open = OpenStream {
            _permit: permit,
            _work: self.limiter.drain().work(),
            limiter: self.limiter.clone(),
        };
        let (tx, rx) = mpsc::channel(8);
        // The stream's span covers the response as it streams; its parent is the context
        // Envoy's tracer put in the stream's metadata.
        let span = telemetry::settlement("ext_proc", || {
            TraceHeaders::from_http(request.metadata().as_ref())
        });
        tokio::spawn(run(open, request.into_inner(), tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

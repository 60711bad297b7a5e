//! Logs and traces: the `tracing` subscriber the binary installs (text or JSON lines, by
//! `LOG_FORMAT`), and OpenTelemetry export of the admission and settlement spans when
//! the standard `OTEL_*` variables name a collector (docs/observability.md).
//!
//! With no `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (and text
//! logs) no OpenTelemetry layer is installed and [`admission`] / [`settlement`] return
//! `Span::none()`: the request path pays one relaxed atomic load. Only this crate's spans
//! reach the exporter; h2, tonic, hyper and tower stay out whatever `RUST_LOG` says.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "llm-ratelimit";

/// Whether spans are built at all: set once by [`init`], read on every request.
static SPANS: AtomicBool = AtomicBool::new(false);

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans not yet exported.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is queued (bounded by `OTEL_BSP_EXPORT_TIMEOUT`) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
            }
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the standard variables ask for trace export.
fn export_wanted() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

fn resource() -> Resource {
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

/// Installs the global subscriber. Call inside the Tokio runtime: the OTLP exporters
/// (tonic, hyper) and the batch processor run on it.
///
/// `LOG_FORMAT=json` gives one JSON object per line, with `trace_id` and `span_id` for
/// events inside a span; then spans are built (ids propagated from the caller) even with
/// no collector, only not exported.
pub fn init() -> anyhow::Result<Telemetry> {
    let json = match env("LOG_FORMAT").as_deref().map(str::to_ascii_lowercase) {
        None => false,
        Some(f) if f == "text" => false,
        Some(f) if f == "json" => true,
        Some(other) => anyhow::bail!("LOG_FORMAT must be text or json, not {other:?}"),
    };
    let provider = if export_wanted() {
        // Protocol (grpc | http/protobuf), endpoint, headers and timeout from OTEL_*.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP trace exporter: {e}"))?;
        let batch =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        // The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG.
        Some(
            SdkTracerProvider::builder()
                .with_span_processor(batch)
                .with_resource(resource())
                .build(),
        )
    } else if json {
        // Ids for the log lines, nothing exported.
        Some(SdkTracerProvider::builder().build())
    } else {
        None
    };
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .map_event_format(WithTraceIds)
            .with_filter(logs)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_filter(logs).boxed()
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("llm-ratelimit"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("llm_ratelimit", tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;
    SPANS.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// The W3C trace context a caller sent (`traceparent`, `tracestate`), from whichever
/// headers or metadata its protocol carries them in.
#[derive(Default)]
pub struct TraceHeaders(HashMap<&'static str, String>);

impl TraceHeaders {
    const NAMES: [&'static str; 2] = ["traceparent", "tracestate"];

    /// Reads the two headers through `get` (lower-case names).
    pub fn from_fn<'a>(get: impl Fn(&str) -> Option<&'a str>) -> TraceHeaders {
        let mut found = HashMap::new();
        for name in Self::NAMES {
            if let Some(v) = get(name) {
                found.insert(name, v.to_string());
            }
        }
        TraceHeaders(found)
    }

    /// From an HTTP (or gRPC metadata) header map.
    pub fn from_http(headers: &axum::http::HeaderMap) -> TraceHeaders {
        Self::from_fn(|name| headers.get(name).and_then(|v| v.to_str().ok()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key.to_ascii_lowercase().as_str())
            .map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().copied().collect()
    }
}

/// Whether spans are being built (an exporter or JSON logs are on).
pub fn enabled() -> bool {
    SPANS.load(Ordering::Relaxed)
}

fn parented(span: Span, carrier: impl FnOnce() -> TraceHeaders) -> Span {
    let headers = carrier();
    if !headers.is_empty() {
        let parent = TraceContextPropagator::new().extract(&headers);
        // Fails only when the span is already started, which it is not here.
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of one admission (`surface`: `ext_authz`, `http_check`, `ratelimit`), child
/// of the caller's trace context. `carrier` is only called when spans are on.
pub fn admission(surface: &'static str, carrier: impl FnOnce() -> TraceHeaders) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "llm_ratelimit.admission",
        otel.kind = "server",
        llm_ratelimit.surface = surface,
        gen_ai.operation.name = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.request.max_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        llm_ratelimit.key = tracing::field::Empty,
        llm_ratelimit.decision = tracing::field::Empty,
        llm_ratelimit.limit = tracing::field::Empty,
    );
    parented(span, carrier)
}

/// The span of one settlement (`surface`: `ext_proc`, `http_report`).
pub fn settlement(surface: &'static str, carrier: impl FnOnce() -> TraceHeaders) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "llm_ratelimit.settlement",
        otel.kind = "server",
        llm_ratelimit.surface = surface,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        llm_ratelimit.key = tracing::field::Empty,
        llm_ratelimit.settlement = tracing::field::Empty,
    );
    parented(span, carrier)
}

/// Records `value` as `field` on the current span, when spans are on (else free).
pub fn record(field: &'static str, value: impl tracing::Value) {
    if enabled() {
        Span::current().record(field, value);
    }
}

/// The longest text a span attribute takes from a request (OpenAI model names are under
/// 64 bytes). The SDK sets no bound on an attribute's length, and the exporter queues up
/// to 2,048 spans: a client's 1 MiB `model` kept whole would hold a GiB of a node's
/// memory and make each export batch too large for a collector to take.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

/// Records client-supplied `text` as `field`, cut to its first [`MAX_ATTRIBUTE_BYTES`]
/// (at a character boundary).
pub fn record_text(field: &'static str, text: &str) {
    if !enabled() {
        return;
    }
    let mut end = text.len().min(MAX_ATTRIBUTE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Span::current().record(field, &text[..end]);
}

/// The JSON event format with the OpenTelemetry `trace_id` and `span_id` of the span the
/// event happened in added to the object.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx.lookup_current().and_then(|_| {
            let cx = Span::current().context();
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        let Some((trace_id, span_id)) = ids else {
            return writer.write_str(&line);
        };
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line.trim_end()) {
            Ok(mut object) => {
                object.insert("trace_id".into(), trace_id.into());
                object.insert("span_id".into(), span_id.into());
                writeln!(writer, "{}", serde_json::Value::Object(object))
            }
            Err(_) => writer.write_str(&line),
        }
    }
}

//! `mock-upstream`: an OpenAI-compatible upstream that generates no text of value, for
//! tests, demos and load tests behind Envoy and the limiter. Thin: the work is in
//! [`llm_ratelimit::mock`].

use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use llm_ratelimit::mock::{router, Options};
use llm_ratelimit::openai::Tokenizer;

#[derive(Parser)]
#[command(
    name = "mock-upstream",
    version,
    about = "An OpenAI-compatible mock upstream: chat, completions, embeddings, responses, models"
)]
struct Cli {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    addr: SocketAddr,
    /// Delay before answering each request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between two events of a streamed answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    stream_interval_ms: u64,
    /// Answer every path and method it does not serve with 200 and
    /// `{"object":"mock.any","path":...}` instead of 404 (a catch-all upstream).
    #[arg(long)]
    any_path: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let options = Options {
        latency: Duration::from_millis(cli.latency_ms),
        stream_interval: Duration::from_millis(cli.stream_interval_ms),
        any_path: cli.any_path,
    };
    let listener = match tokio::net::TcpListener::bind(cli.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %cli.addr, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let app = router(Arc::new(Tokenizer::new()), options);
    tracing::info!(addr = %cli.addr, ?options, "mock upstream listening");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // TCP_NODELAY: small replies must not wait for Nagle.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

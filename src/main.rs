//! The `llm-ratelimit` binary: `serve` and `check-config`. Thin: the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use llm_ratelimit::config::{parse_duration, Config};
use llm_ratelimit::pressure::Pressure;
use llm_ratelimit::serve::{run, Options};

// glibc malloc took ~15 % of the limiter's CPU under load (docs/performance.md); mimalloc
// keeps per-thread free lists and is much cheaper for the many small gRPC/JSON buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "llm-ratelimit",
    version,
    about = "Sliding-window RPM / input TPM / output TPM limits for OpenAI-compatible traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the limiter.
    Serve {
        /// The key configuration (YAML).
        #[arg(long, env = "LLM_RATELIMIT_CONFIG")]
        config: PathBuf,
        /// gRPC listener (Envoy ext_authz, ext_proc, ShouldRateLimit).
        #[arg(long, default_value = "127.0.0.1:8081")]
        grpc_addr: SocketAddr,
        /// HTTP listener (/v1/check, /v1/report, /v1/usage, /metrics, /healthz, /readyz).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// redis://, rediss://, redis+cluster://host:port[,host:port...], rediss+cluster://...,
        /// redis+sentinel://host:port[,host:port...]/<master>, rediss+sentinel://...;
        /// absent = in-process store.
        #[arg(long, env = "REDIS_URL")]
        redis_url: Option<String>,
        /// Deadline of one store call, in milliseconds.
        #[arg(long, default_value_t = 50)]
        redis_timeout_ms: u64,
        /// This node's name in logs (default: the hostname).
        #[arg(long, env = "NODE_ID")]
        node_id: Option<String>,
        /// Admission requests (gRPC Check/ShouldRateLimit, HTTP /v1/*) running at once.
        #[arg(long, default_value_t = Pressure::default().max_in_flight)]
        max_in_flight: usize,
        /// Admission requests waiting for a running slot; beyond it requests are shed at once.
        #[arg(long, default_value_t = Pressure::default().max_queued)]
        max_queued: usize,
        /// The longest a request waits for a running slot (gRPC: at most half its deadline), ms.
        #[arg(long, default_value_t = Pressure::default().queue_wait.as_millis() as u64)]
        queue_wait_ms: u64,
        /// The longest an admission request runs before it is answered as shed, ms.
        #[arg(long, default_value_t = Pressure::default().request_timeout.as_millis() as u64)]
        request_timeout_ms: u64,
        /// ext_proc streams open at once; a stream over the cap is ended at once.
        #[arg(long, default_value_t = Pressure::default().max_settlement_streams)]
        max_settlement_streams: usize,
        /// After SIGTERM: keep serving this long with readiness off (/readyz 503, gRPC
        /// NOT_SERVING), then stop accepting and finish what is in flight.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        shutdown_delay: Duration,
    },
    /// Validate a config file: exit 0 if valid, else 1 with file:line:col and why.
    CheckConfig { path: PathBuf },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { path } => match Config::load(&path) {
            Ok(config) => {
                println!("{}: ok, {} keys", path.display(), config.keys().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            config,
            grpc_addr,
            http_addr,
            redis_url,
            redis_timeout_ms,
            node_id,
            max_in_flight,
            max_queued,
            queue_wait_ms,
            request_timeout_ms,
            max_settlement_streams,
            shutdown_delay,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Logs, and traces when OTEL_* names a collector; the exporter runs on the runtime.
            let telemetry = match runtime.block_on(async { llm_ratelimit::telemetry::init() }) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("llm-ratelimit: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let options = Options {
                config,
                grpc_addr,
                http_addr,
                redis_url: redis_url.filter(|u| !u.is_empty()),
                redis_timeout: Duration::from_millis(redis_timeout_ms),
                node_id: node_id.unwrap_or_else(hostname),
                pressure: Pressure {
                    max_in_flight,
                    max_queued,
                    queue_wait: Duration::from_millis(queue_wait_ms),
                    request_timeout: Duration::from_millis(request_timeout_ms),
                    max_settlement_streams,
                },
                shutdown_delay,
            };
            let result = runtime.block_on(run(options));
            telemetry.shutdown();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("llm-ratelimit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

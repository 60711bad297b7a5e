//! `llm-ratelimit serve`: loads the config, opens the store, watches the config file,
//! and runs the listeners until SIGTERM or Ctrl-C, then shuts down as [`crate::shutdown`]
//! describes: readiness off, `shutdown_delay` of serving on, stop accepting, drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::admission::Limiter;
use crate::config::{spawn_watcher, Config, ReloadOutcome};
use crate::engine::failover::{FailoverStore, Hooks, Mode};
use crate::engine::memory::MemoryStore;
use crate::engine::redis::RedisStore;
use crate::engine::Store;
use crate::metrics::{Metrics, OutcomeLabels};

use crate::pressure::{Gate, Pressure};

pub struct Options {
    pub config: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub redis_url: Option<String>,
    pub redis_timeout: Duration,
    pub node_id: String,
    /// Back-pressure: the gate's sizes and the ext_proc stream cap.
    pub pressure: Pressure,
    /// After SIGTERM: how long to keep serving, not ready, before no longer accepting.
    pub shutdown_delay: Duration,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let config = Config::load(&options.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let metrics = Arc::new(Metrics::default());
    metrics.config_keys.set(config.keys().len() as i64);
    let config = Arc::new(ArcSwap::from_pointee(config));

    let store = match &options.redis_url {
        Some(url) => Store::Failover(FailoverStore::new(
            RedisStore::connect(url, options.redis_timeout).map_err(anyhow::Error::msg)?,
            &options.node_id,
            failover_hooks(&config, &metrics),
        )),
        None => {
            // One node on its own store: always exact.
            let modes = Mode::ALL.map(Mode::as_str);
            metrics.store_mode(&modes, "exact", "exact");
            Store::Memory(MemoryStore::new())
        }
    };
    // One gate for both listeners: gRPC and HTTP admission share the node's CPU.
    let gate = Arc::new(Gate::new(&options.pressure, &metrics));
    let limiter = Arc::new(Limiter::new(config.clone(), store, metrics.clone()));
    let watcher = {
        let limiter = limiter.clone();
        spawn_watcher(
            options.config.clone(),
            config,
            Duration::from_secs(1),
            move |outcome| {
                let label = match outcome {
                    ReloadOutcome::Applied => {
                        let keys = limiter.config().keys().len();
                        metrics.config_keys.set(keys as i64);
                        // State of keys or window shapes no longer configured is freed.
                        limiter.forget_unconfigured();
                        tracing::info!(keys, "config reloaded");
                        "applied"
                    }
                    ReloadOutcome::Unchanged => return,
                    ReloadOutcome::Rejected(_) => "rejected",
                };
                metrics
                    .config_reloads
                    .get_or_create(&OutcomeLabels { outcome: label })
                    .inc();
            },
        )
    };

    let http = tokio::net::TcpListener::bind(options.http_addr).await?;
    let grpc = tokio::net::TcpListener::bind(options.grpc_addr).await?;
    let http_addr = http.local_addr()?;
    tracing::info!(
        node = %options.node_id,
        http = %http_addr,
        grpc = %grpc.local_addr()?,
        store = if options.redis_url.is_some() { "redis" } else { "memory" },
        "llm-ratelimit serving"
    );
    // One signal stops both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Each request head has a deadline, and shutdown waits for no half-sent head (src/listen.rs).
    let http = crate::listen::serve(
        http,
        crate::http::router_with(limiter.clone(), gate.clone()),
        crate::listen::HEAD_TIMEOUT,
        options.pressure.request_timeout.max(Duration::from_secs(5)),
        wait(stopped.clone()),
    );
    let drain = limiter.drain().clone();
    let grace = options.pressure.request_timeout.max(Duration::from_secs(5));
    let grpc_stopped = wait(stopped.clone());
    let grpc = crate::grpc::serve_with(
        grpc,
        limiter,
        gate,
        options.pressure.max_settlement_streams,
        wait(stopped),
    );
    // tonic's shutdown waits for every connection to close, also one that never finishes
    // its HTTP/2 preface: at most `grace` after the stop (ext_proc settlements still in
    // flight are waited for below, through the drain).
    let grpc = async move {
        let mut grpc = std::pin::pin!(grpc);
        tokio::select! {
            served = &mut grpc => served,
            () = async {
                grpc_stopped.await;
                tokio::time::sleep(grace).await;
            } => Ok(()),
        }
    };
    let signal = {
        let drain = drain.clone();
        let delay = options.shutdown_delay;
        async move {
            shutdown().await;
            // Not ready at once (/readyz 503, gRPC NOT_SERVING), but still serving, so
            // proxies and Kubernetes stop sending before the listeners close. A second
            // signal cuts the delay short.
            drain.begin();
            tracing::info!(delay = ?delay, "shutting down: not ready, serving on for the shutdown delay");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown() => {}
            }
            tracing::info!("shutting down: no longer accepting; finishing what is in flight");
            let _ = stop.send(true);
        }
    };
    let ((), grpc, ()) = tokio::join!(http, grpc, signal);
    // The listeners have finished their calls; settlements run in tasks of their own
    // (an ext_proc stream can end before its settlement is written), so wait for those.
    if drain.in_flight() > 0 {
        tracing::info!(
            settlements = drain.in_flight(),
            "waiting for settlements in flight"
        );
    }
    drain.settled().await;
    watcher.abort();
    tracing::info!("stopped");
    grpc
}

/// The failover layer follows the config's `on_store_error` and reports to the metrics.
fn failover_hooks(config: &Arc<ArcSwap<Config>>, metrics: &Arc<Metrics>) -> Hooks {
    let (config, mode_metrics, node_metrics) = (config.clone(), metrics.clone(), metrics.clone());
    let modes = Mode::ALL.map(Mode::as_str);
    Hooks {
        policy: Arc::new(move || config.load().on_store_error()),
        on_mode: Arc::new(move |from: Mode, to: Mode| {
            mode_metrics.store_mode(&modes, from.as_str(), to.as_str())
        }),
        on_nodes: Arc::new(move |n| {
            node_metrics.store_nodes.set(n as i64);
        }),
    }
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

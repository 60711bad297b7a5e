//! The HTTP listener: the [`crate::http`] routes served by hyper's HTTP/1 server with a
//! deadline on each request's head.
//!
//! `axum::serve` runs hyper without a timer, so hyper's header read timeout never fires:
//! a client that sends part of a request head and then nothing held its connection (a
//! task, a file descriptor, buffers) for as long as it liked, and as many such connections
//! as it opened; and since a half-read head is not an idle connection, graceful shutdown
//! waited for it too, so one such client kept a node from ever exiting after SIGTERM.
//! Here a head must arrive within [`HEAD_TIMEOUT`] of the connection being ready for it —
//! which also ends a kept-alive connection idle that long.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long a client may take to send a request's head (from the connection's start or
/// the end of its previous request). Longer than the 60 s the shipped Nginx keeps an idle
/// connection to the limiter (`nginx/llm_ratelimit.lua`), so Nginx always closes an idle
/// connection before the limiter does and never sends on one the limiter is closing.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(75);

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and
/// waits, at most `grace`, for the connections open to finish what they are doing (an
/// idle one closes at once). A request still running after `grace` is left to the
/// caller's own drain (settlements are tracked by [`crate::shutdown::Drain`]); a
/// connection still sending its head is not waited for.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    head_timeout: Duration,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, for one: wait rather than spin, as axum does.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // TCP_NODELAY: small replies must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            // A connection's end (a client gone, a head too slow) is no error of ours.
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_head_not_sent_in_time_ends_its_connection_and_shutdown_waits_for_no_head() {
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            Duration::from_millis(300),
            Duration::from_secs(1),
            async move {
                let _ = stopped.await;
            },
        ));
        // Half a head, then nothing: the server ends the connection.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut rest));
        assert!(
            read.await.is_ok(),
            "a connection without a whole head was kept"
        );
        // A whole request is served as always.
        let mut fast = TcpStream::connect(addr).await.unwrap();
        fast.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        fast.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Shutdown with another half head open still ends (within the grace).
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("shutdown waited for a head that never came")
            .unwrap();
    }
}

//! `llm-loadtest http`: OpenAI requests over plain HTTP/1.1 keep-alive connections.
//!
//! The HTTP/1.1 exchange is hyper's connection-level client (`client::conn::http1`) over a
//! tokio `TcpStream` with TCP_NODELAY: one connection per worker and target, one request at
//! a time on it, like wrk. A maintained client rather than one of our own: against the mock
//! upstream it sends as many requests per second as wrk does, though with more CPU per
//! request than the hand-written exchange it replaced (docs/loadtest.md, "Its own
//! ceiling"). Nothing is built on the hot path: the header map of every target and key and
//! the body of every prompt size exist before the run, and a request clones
//! reference-counted bytes. An answer is read to its end (a JSON body or a whole SSE
//! stream) and its usage found by [`Seen::read`].
//!
//! A connection is reused once hyper says it is ready for the next request, and replaced
//! when the server has closed it. A request goes out a second time, on a fresh connection,
//! only when hyper hands it back unwritten. One whose bytes may have reached the server is
//! never sent again, since the limiter would count it twice: it is recorded as an error.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::cli::Endpoint;
use crate::drive::{Client, Clock};
use crate::plan::{Pick, Plan};
use crate::record::Record;
use crate::response::Seen;

/// Largest answer body the tool reads (a guard against a runaway server).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// What a request carries as its body.
type Body = Full<Bytes>;

/// Where requests for one `--target` go.
pub struct Target {
    pub addr: SocketAddr,
    /// The `host` header.
    host: HeaderValue,
    /// The request path: the URL's path prefix, `/v1` and the endpoint's path.
    path: Uri,
}

impl Target {
    /// Parses and resolves a `--target` URL (once, before the run).
    pub async fn resolve(url: &str, endpoint: Endpoint) -> anyhow::Result<Target> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| anyhow!("--target {url}: not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "--target {url}: https is not supported; point the tool at a plain-HTTP listener"
            ),
            _ => bail!("--target {url}: expected a URL such as http://127.0.0.1:10000"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("--target {url}: no host"))?;
        if authority.as_str().contains('@') {
            bail!("--target {url}: credentials in the URL are not supported");
        }
        if uri.query().is_some() {
            bail!("--target {url}: a query string is not supported");
        }
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addr = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host, port)),
        )
        .await
        .map_err(|_| anyhow!("--target {url}: resolving {host} timed out"))?
        .with_context(|| format!("--target {url}: cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("--target {url}: {host} has no address"))?;
        let prefix = uri.path().trim_end_matches('/');
        let path = if prefix.ends_with("/v1") {
            format!("{prefix}{}", endpoint.path())
        } else {
            format!("{prefix}/v1{}", endpoint.path())
        };
        let path = path
            .parse()
            .map_err(|e| anyhow!("--target {url}: not a request path: {path} ({e})"))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| anyhow!("--target {url}: not a host header ({e})"))?;
        Ok(Target { addr, host, path })
    }
}

/// Opens and drops one connection to each target, so an unreachable one is a clear
/// error before the run rather than a run of errors.
pub async fn preflight(urls: &[String], targets: &[Target]) -> anyhow::Result<()> {
    for (url, target) in urls.iter().zip(targets) {
        match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target.addr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("cannot connect to --target {url} ({}): {e}", target.addr),
            Err(_) => bail!(
                "cannot connect to --target {url} ({}): timed out after 3s",
                target.addr
            ),
        }
    }
    Ok(())
}

/// Everything a request carries, built before the run and shared by the workers.
pub struct Requests {
    targets: Vec<Target>,
    keys: usize,
    /// `[target * keys + key]`: every header; `content-length` is a placeholder each
    /// request overwrites with its body's (in place: the map keeps its size).
    headers: Vec<HeaderMap>,
    /// `[variant]`: the body and its `content-length`.
    bodies: Vec<(Bytes, HeaderValue)>,
    plan: Arc<Plan>,
}

impl Requests {
    pub fn build(
        targets: Vec<Target>,
        secrets: &[String],
        stream: bool,
        plan: Arc<Plan>,
    ) -> anyhow::Result<Requests> {
        let accept = HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        });
        let user_agent =
            HeaderValue::from_static(concat!("llm-loadtest/", env!("CARGO_PKG_VERSION")));
        let mut authorizations = Vec::with_capacity(secrets.len());
        for (i, secret) in secrets.iter().enumerate() {
            // The error must not show the key.
            let mut value = HeaderValue::from_str(&format!("Bearer {secret}"))
                .map_err(|_| anyhow!("--key number {}: not valid in a header", i + 1))?;
            value.set_sensitive(true);
            authorizations.push(value);
        }
        let mut headers = Vec::with_capacity(targets.len() * secrets.len());
        for target in &targets {
            for authorization in &authorizations {
                let mut map = HeaderMap::with_capacity(6);
                map.insert(HOST, target.host.clone());
                map.insert(AUTHORIZATION, authorization.clone());
                map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                map.insert(ACCEPT, accept.clone());
                map.insert(USER_AGENT, user_agent.clone());
                map.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
                headers.push(map);
            }
        }
        let bodies = plan
            .variants
            .iter()
            .map(|v| (v.body.clone(), HeaderValue::from(v.body.len())))
            .collect();
        Ok(Requests {
            keys: secrets.len(),
            targets,
            headers,
            bodies,
            plan,
        })
    }

    /// The request for `pick`.
    fn request(&self, pick: Pick) -> Request<Body> {
        let t = usize::from(pick.target);
        let (body, length) = &self.bodies[usize::from(pick.variant)];
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.targets[t].path.clone();
        let headers = request.headers_mut();
        *headers = self.headers[t * self.keys + usize::from(pick.key)].clone();
        headers.insert(CONTENT_LENGTH, length.clone());
        request
    }
}

/// One worker's HTTP client.
pub struct HttpClient {
    requests: Arc<Requests>,
    clock: Clock,
    /// `[target]`: the open connection, if any.
    connections: Vec<Option<Connection>>,
    /// Reused for answer bodies.
    body: Vec<u8>,
}

impl HttpClient {
    pub fn new(requests: Arc<Requests>, clock: Clock) -> HttpClient {
        HttpClient {
            connections: (0..requests.targets.len()).map(|_| None).collect(),
            requests,
            clock,
            body: Vec::new(),
        }
    }
}

impl Client for HttpClient {
    async fn send(&mut self, pick: Pick, intended_us: u64, deadline: Instant) -> Record {
        let started_us = self.clock.now_us();
        let t = usize::from(pick.target);
        let request = self.requests.request(pick);
        let addr = self.requests.targets[t].addr;
        let exchange = exchange(
            &mut self.connections[t],
            addr,
            request,
            &mut self.body,
            self.clock,
        );
        let (sent_us, done_us, status, seen) =
            match tokio::time::timeout_at(deadline.into(), exchange).await {
                Ok((sent_us, Ok(answer))) => (sent_us, answer.done_us, answer.status, answer.seen),
                Ok((sent_us, Err(NoAnswer))) => (sent_us, self.clock.now_us(), 0, Seen::default()),
                Err(_) => {
                    // Timed out: whatever the connection was doing is abandoned.
                    self.connections[t] = None;
                    (started_us, self.clock.now_us(), 0, Seen::default())
                }
            };
        self.requests
            .plan
            .record(pick, intended_us, (sent_us, done_us), status, seen)
    }
}

/// One answer, as far as the records care.
struct Answer {
    status: u16,
    seen: Seen,
    /// When its last byte arrived.
    done_us: u64,
}

/// The exchange failed: no connection, an error on it, or an answer cut short or too
/// large. The records keep no more than that (status 0).
#[derive(Debug)]
struct NoAnswer;

/// One keep-alive connection: hyper's handle for sending on it. The connection itself is
/// driven by a task of its own, which ends when the server closes it or the handle is
/// dropped.
struct Connection {
    sender: SendRequest<Body>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        // An error on the connection also fails the request it was serving, which is where
        // it is recorded.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender })
    }
}

/// Sends `request` on the connection in `slot` (opening one when there is none or the
/// server closed it) and reads the answer to its end. Returns when the request went out,
/// in µs, with the answer. The connection is left in `slot` only when it may serve again.
async fn exchange(
    slot: &mut Option<Connection>,
    addr: SocketAddr,
    mut request: Request<Body>,
    body: &mut Vec<u8>,
    clock: Clock,
) -> (u64, Result<Answer, NoAnswer>) {
    let mut sent_us = clock.now_us();
    let mut handed_back = false;
    let response = loop {
        let reusable = match slot.take() {
            Some(mut c) => c.sender.ready().await.is_ok().then_some(c),
            None => None,
        };
        // A connection the server closed is dropped, and its task has ended.
        let mut connection = match reusable {
            Some(c) => c,
            None => match Connection::open(addr).await {
                Ok(c) => c,
                Err(_) => return (sent_us, Err(NoAnswer)),
            },
        };
        sent_us = clock.now_us();
        match connection.sender.try_send_request(request).await {
            Ok(response) => {
                *slot = Some(connection);
                break response;
            }
            Err(mut e) => match e.take_message() {
                // hyper hands a request back only when not one byte of it was written
                // (the connection closed first), so it can go out on a fresh connection.
                // Once, so a server that closes every connection cannot keep us here.
                Some(unsent) if !handed_back => {
                    handed_back = true;
                    request = unsent;
                }
                _ => return (sent_us, Err(NoAnswer)),
            },
        }
    };
    let status = response.status().as_u16();
    let mut incoming = response.into_body();
    body.clear();
    while let Some(frame) = incoming.frame().await {
        let data = match frame.map(|f| f.into_data()) {
            Ok(Ok(data)) => data,
            // Trailers.
            Ok(Err(_)) => continue,
            Err(_) => {
                *slot = None;
                return (sent_us, Err(NoAnswer));
            }
        };
        if body.len() + data.len() > MAX_BODY {
            *slot = None;
            return (sent_us, Err(NoAnswer));
        }
        body.extend_from_slice(&data);
    }
    let done_us = clock.now_us();
    let seen = Seen::read(status, body);
    (
        sent_us,
        Ok(Answer {
            status,
            seen,
            done_us,
        }),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A request as the tool would send it, to `/`.
    fn request() -> Request<Body> {
        let body = Bytes::from_static(b"{}");
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static("/v1/chat/completions");
        let headers = request.headers_mut();
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(2usize));
        request
    }

    /// Reads one whole request (head and `content-length` body); false at the end of the
    /// stream.
    async fn read_request(s: &mut TcpStream) -> bool {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + length {
                    return true;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One exchange on a fresh connection with a server that answers with a fixed byte
    /// string, in the pieces given.
    async fn answer_with(pieces: Vec<&'static [u8]>) -> Answer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut s).await);
            for p in pieces {
                s.write_all(p).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut slot = None;
        let (_, answer) =
            exchange(&mut slot, addr, request(), &mut Vec::new(), Clock::start()).await;
        server.await.unwrap();
        answer.unwrap()
    }

    #[tokio::test]
    async fn chunked_stream_with_usage_split_across_chunks() {
        let a = answer_with(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"19\r\ndata: {\"usage\":{\"prompt_t\r\n",
            b"2e;ext=1\r\nokens\":5,\"completion_tokens\":3}}\n\ndata: [DONE]\r\n",
            b"0\r\nx-trailer: 1\r\n\r\n",
        ])
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(
            (a.seen.prompt_tokens, a.seen.completion_tokens),
            (Some(5), Some(3))
        );
    }

    #[tokio::test]
    async fn a_429_names_its_limit() {
        let a = answer_with(vec![
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 35\r\n\r\n",
            b"{\"error\":{\"type\":\"output_tokens\"}}\n",
        ])
        .await;
        assert_eq!(a.status, 429);
        assert_eq!(
            a.seen.denied_by,
            Some(crate::record::LimitKind::OutputTokens)
        );
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_to_its_end() {
        let a = answer_with(vec![
            b"HTTP/1.0 200 OK\r\n\r\n{\"usage\":{\"prompt_tokens\":",
            b"7,\"completion_tokens\":2}}",
        ])
        .await;
        assert_eq!(
            (a.status, a.seen.prompt_tokens, a.seen.completion_tokens),
            (200, Some(7), Some(2))
        );
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";

    /// A server whose first connection answers `answered` requests with `first`, then
    /// reads one more request when `then_read`, and closes; later connections answer
    /// every request. Counts the connections and the requests it received.
    fn server(
        listener: TcpListener,
        first: &'static [u8],
        answered: usize,
        then_read: bool,
    ) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (connections, requests) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counts = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = connections.fetch_add(1, Ordering::SeqCst);
                let requests = requests.clone();
                tokio::spawn(async move {
                    let mut served = 0;
                    while n > 0 || served < answered {
                        if !read_request(&mut s).await {
                            return;
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        s.write_all(if n == 0 { first } else { OK }).await.unwrap();
                        served += 1;
                    }
                    if then_read && read_request(&mut s).await {
                        requests.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        counts
    }

    async fn status(slot: &mut Option<Connection>, addr: SocketAddr) -> u16 {
        let (_, answer) = exchange(slot, addr, request(), &mut Vec::new(), Clock::start()).await;
        answer.map_or(0, |a| a.status)
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced() {
        for first in [
            // Closed after the answer, while idle.
            OK,
            // Closed as the answer says.
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".as_slice(),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (connections, requests) = server(listener, first, 1, false);
            let mut slot = None;
            assert_eq!(status(&mut slot, addr).await, 200);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(status(&mut slot, addr).await, 200);
            assert_eq!(connections.load(Ordering::SeqCst), 2);
            assert_eq!(requests.load(Ordering::SeqCst), 2);
        }
    }

    #[tokio::test]
    async fn a_request_that_reached_the_server_is_never_sent_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The second request on the first connection is read, then the connection closes
        // without an answer: that request is an error, not a retry.
        let (connections, requests) = server(listener, OK, 1, true);
        let mut slot = None;
        assert_eq!(status(&mut slot, addr).await, 200);
        assert_eq!(status(&mut slot, addr).await, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        // The next request goes out on a fresh connection.
        assert_eq!(status(&mut slot, addr).await, 200);
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }
}

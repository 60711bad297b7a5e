//! `llm-loadtest http`: OpenAI requests over plain HTTP/1.1 keep-alive connections.
//!
//! The client is a minimal HTTP/1.1 exchange on a tokio `TcpStream` (TCP_NODELAY), one
//! request at a time per connection, like wrk: every request's bytes are built before
//! the run (a head per target and key, a content-length line and body per prompt size),
//! sent with one `writev`, and the answer is parsed in place with `httparse` — status,
//! `content-length` or chunked framing, `connection: close` — and its body scanned for
//! usage without a copy. One task per connection and no per-request allocation keep the
//! tool's own CPU per request low, which matters when it shares a small machine with what
//! it measures: in the same closed loop against the mock upstream, hyper's
//! `client::conn::http1` (a sender and a connection task per connection) reached the same
//! req/s with about a third more user CPU per request (docs/loadtest.md).
//!
//! Each worker keeps one connection per target, opened on first use and reopened after
//! the server closes it or an error. A request on a reused connection that fails before
//! any byte of an answer (the server had closed the idle connection) is sent once more on
//! a fresh one, as browsers and hyper do.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::Endpoint;
use crate::drive::{Client, Clock};
use crate::plan::{Pick, Plan};
use crate::record::{Outcome, Record};
use crate::response::Seen;

/// Largest response head or body the tool reads (a guard against a runaway server).
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Where requests for one `--target` go.
pub struct Target {
    pub addr: SocketAddr,
    /// The `host` header.
    host: String,
    /// The request path: the URL's path prefix, `/v1` and the endpoint's path.
    path: String,
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
        Ok(Target {
            addr,
            host: authority.as_str().to_string(),
            path,
        })
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

/// The wire form of every request, shared by the workers.
pub struct Requests {
    targets: Vec<Target>,
    keys: usize,
    /// `[target * keys + key]`: request line and headers up to `content-length`.
    heads: Vec<Bytes>,
    /// `[variant]`: `content-length`, the blank line and the body.
    tails: Vec<Bytes>,
    plan: Arc<Plan>,
}

impl Requests {
    pub fn build(
        targets: Vec<Target>,
        secrets: &[String],
        stream: bool,
        plan: Arc<Plan>,
    ) -> Requests {
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let mut heads = Vec::with_capacity(targets.len() * secrets.len());
        for target in &targets {
            for secret in secrets {
                heads.push(Bytes::from(format!(
                    "POST {} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {secret}\r\n\
                     content-type: application/json\r\naccept: {accept}\r\n\
                     user-agent: llm-loadtest/{}\r\n",
                    target.path,
                    target.host,
                    env!("CARGO_PKG_VERSION"),
                )));
            }
        }
        let tails = plan
            .variants
            .iter()
            .map(|v| {
                let mut tail = format!("content-length: {}\r\n\r\n", v.body.len()).into_bytes();
                tail.extend_from_slice(&v.body);
                Bytes::from(tail)
            })
            .collect();
        Requests {
            keys: secrets.len(),
            targets,
            heads,
            tails,
            plan,
        }
    }
}

/// One worker's HTTP client.
pub struct HttpClient {
    requests: Arc<Requests>,
    clock: Clock,
    /// `[target]`: the open connection, if any.
    connections: Vec<Option<Connection>>,
    /// Reused for de-chunked bodies.
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

    /// Connects if needed and exchanges one request; `Err` carries when it was sent.
    async fn exchange(&mut self, pick: Pick) -> (u64, io::Result<Answer>) {
        let t = usize::from(pick.target);
        let head = &self.requests.heads[t * self.requests.keys + usize::from(pick.key)];
        let tail = &self.requests.tails[usize::from(pick.variant)];
        let mut sent_us = self.clock.now_us();
        for attempt in 0..2 {
            let reused = self.connections[t].is_some();
            if !reused {
                match Connection::open(self.requests.targets[t].addr).await {
                    Ok(c) => self.connections[t] = Some(c),
                    Err(e) => return (sent_us, Err(e)),
                }
            }
            let Some(connection) = self.connections[t].as_mut() else {
                continue;
            };
            sent_us = self.clock.now_us();
            match connection.exchange(head, tail, &mut self.body).await {
                Ok(answer) => {
                    if !answer.keep_alive {
                        self.connections[t] = None;
                    }
                    return (sent_us, Ok(answer));
                }
                Err(failure) => {
                    self.connections[t] = None;
                    // A kept-alive connection the server closed in the meantime: the
                    // request never reached it, so it can go out once more.
                    if !(reused && failure.unanswered && attempt == 0) {
                        return (sent_us, Err(failure.error));
                    }
                }
            }
        }
        (sent_us, Err(io::Error::other("no connection")))
    }
}

impl Client for HttpClient {
    async fn send(&mut self, pick: Pick, intended_us: u64, deadline: Instant) -> Record {
        let started_us = self.clock.now_us();
        let result = tokio::time::timeout_at(deadline.into(), self.exchange(pick)).await;
        let done_us = self.clock.now_us();
        let plan: &Plan = &self.requests.plan;
        let own_prompt = plan.variants[usize::from(pick.variant)].prompt_tokens;
        let (sent_us, status, seen) = match result {
            Ok((sent_us, Ok(answer))) => (sent_us, answer.status, answer.seen),
            Ok((sent_us, Err(_))) => (sent_us, 0, Seen::default()),
            Err(_) => {
                // Timed out: whatever the connection was doing is abandoned.
                self.connections[usize::from(pick.target)] = None;
                (started_us, 0, Seen::default())
            }
        };
        Record {
            target: pick.target,
            key: pick.key,
            intended_us,
            sent_us: sent_us.max(intended_us),
            done_us,
            outcome: outcome(status),
            status,
            denied_by: seen.denied_by,
            prompt_tokens: seen.prompt_tokens.unwrap_or(own_prompt),
            completion_tokens: seen.completion_tokens.unwrap_or(0),
            max_tokens: plan.max_tokens,
        }
    }
}

pub fn outcome(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Ok,
        429 => Outcome::RateLimited,
        _ => Outcome::Other,
    }
}

/// One answer, as far as the records care.
struct Answer {
    status: u16,
    seen: Seen,
    keep_alive: bool,
}

/// A failed exchange; `unanswered` when not one byte of an answer arrived.
struct Failure {
    error: io::Error,
    unanswered: bool,
}

impl Failure {
    fn new(error: io::Error, unanswered: bool) -> Failure {
        Failure { error, unanswered }
    }
}

/// How the body of an answer is delimited.
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A parsed response head.
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .to_ascii_lowercase()
                .windows(7)
                .any(|w| w == b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = h.value.to_ascii_lowercase();
            if v.windows(5).any(|w| w == b"close") {
                keep_alive = false;
            } else if v.windows(10).any(|w| w == b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Some(Head {
        len,
        status,
        framing,
        keep_alive,
    }))
}

/// One keep-alive connection and its read buffer.
struct Connection {
    stream: TcpStream,
    buf: BytesMut,
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-answer")
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "answer too large")
}

impl Connection {
    async fn open(addr: SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    /// Reads more of the answer; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads until `buf` holds `n` bytes.
    async fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(eof());
            }
        }
        Ok(())
    }

    async fn write(&mut self, head: &[u8], tail: &[u8]) -> io::Result<()> {
        let n = self
            .stream
            .write_vectored(&[IoSlice::new(head), IoSlice::new(tail)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < head.len() {
            self.stream.write_all(&head[n..]).await?;
            self.stream.write_all(tail).await
        } else {
            self.stream.write_all(&tail[n - head.len()..]).await
        }
    }

    async fn exchange(
        &mut self,
        head: &[u8],
        tail: &[u8],
        body: &mut Vec<u8>,
    ) -> Result<Answer, Failure> {
        // No pipelining: anything left over would be a server's protocol error.
        self.buf.clear();
        self.write(head, tail)
            .await
            .map_err(|e| Failure::new(e, true))?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf).map_err(|e| Failure::new(e, false))? {
                if matches!(head.status, 100..=199) {
                    self.buf.advance(head.len);
                    continue;
                }
                break head;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Failure::new(too_large(), false));
            }
            let unanswered = self.buf.is_empty();
            match self.fill().await {
                Ok(0) => return Err(Failure::new(eof(), unanswered)),
                Ok(_) => {}
                Err(e) => return Err(Failure::new(e, unanswered)),
            }
        };
        self.buf.advance(head.len);
        let fail = |e| Failure::new(e, false);
        let (seen, keep_alive) = match head.framing {
            Framing::Empty => (Seen::read(head.status, &[]), head.keep_alive),
            Framing::Length(n) => {
                if n > MAX_BODY {
                    return Err(fail(too_large()));
                }
                self.fill_to(n).await.map_err(fail)?;
                let seen = Seen::read(head.status, &self.buf[..n]);
                self.buf.advance(n);
                (seen, head.keep_alive)
            }
            Framing::Chunked => {
                self.dechunk(body).await.map_err(fail)?;
                (Seen::read(head.status, body), head.keep_alive)
            }
            Framing::UntilClose => {
                while self.fill().await.map_err(fail)? > 0 {
                    if self.buf.len() > MAX_BODY {
                        return Err(fail(too_large()));
                    }
                }
                (Seen::read(head.status, &self.buf), false)
            }
        };
        Ok(Answer {
            status: head.status,
            seen,
            keep_alive,
        })
    }

    /// The position of the next CRLF, reading as needed.
    async fn line(&mut self) -> io::Result<usize> {
        loop {
            if let Some(i) = memchr::memmem::find(&self.buf, b"\r\n") {
                return Ok(i);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(too_large());
            }
            if self.fill().await? == 0 {
                return Err(eof());
            }
        }
    }

    /// Reads a chunked body into `body`.
    async fn dechunk(&mut self, body: &mut Vec<u8>) -> io::Result<()> {
        body.clear();
        loop {
            let end = self.line().await?;
            let size_text = self.buf[..end]
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default();
            let size = std::str::from_utf8(size_text)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            self.buf.advance(end + 2);
            if size == 0 {
                // Trailers, if any, then the blank line.
                loop {
                    let end = self.line().await?;
                    self.buf.advance(end + 2);
                    if end == 0 {
                        return Ok(());
                    }
                }
            }
            if body.len() + size > MAX_BODY {
                return Err(too_large());
            }
            self.fill_to(size + 2).await?;
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk end"));
            }
            self.buf.advance(size + 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.keep_alive, h.len), (200, true, 38));
        assert!(matches!(h.framing, Framing::Length(5)));
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.framing, Framing::Chunked) && !h.keep_alive);
        let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(matches!(h.framing, Framing::UntilClose) && !h.keep_alive);
        let h = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Empty) && h.keep_alive);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-len")
            .unwrap()
            .is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    /// A server that answers with a fixed byte string, in the pieces given.
    async fn answer_with(pieces: Vec<&'static [u8]>) -> Answer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let _ = s.read(&mut request).await.unwrap();
            for p in pieces {
                s.write_all(p).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut c = Connection::open(addr).await.unwrap();
        let mut body = Vec::new();
        let answer = c
            .exchange(
                b"POST / HTTP/1.1\r\n",
                b"content-length: 0\r\n\r\n",
                &mut body,
            )
            .await
            .map_err(|f| f.error)
            .unwrap();
        server.await.unwrap();
        answer
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
        assert!(a.keep_alive);
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
}

//! Server-sent events as OpenAI sends them: one JSON document per `data:` line, optionally
//! named by an `event:` line (Responses), paced by `--stream-interval-ms`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures_util::stream;
use serde::Serialize;

use super::to_json;

/// The events of one stream, in order, already framed.
#[derive(Default)]
pub(crate) struct Events {
    frames: Vec<Bytes>,
}

impl Events {
    /// `data: {json}` — chat and completions chunks.
    pub fn data<T: Serialize>(&mut self, value: &T) {
        self.push(None, value);
    }

    /// `event: {name}` then `data: {json}` — Responses events.
    pub fn named<T: Serialize>(&mut self, name: &str, value: &T) {
        self.push(Some(name), value);
    }

    /// `data: [DONE]`, the end of a chat or completions stream.
    pub fn done(&mut self) {
        self.frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }

    fn push<T: Serialize>(&mut self, name: Option<&str>, value: &T) {
        let mut frame = Vec::with_capacity(256);
        if let Some(name) = name {
            frame.extend_from_slice(b"event: ");
            frame.extend_from_slice(name.as_bytes());
            frame.push(b'\n');
        }
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(&to_json(value));
        frame.extend_from_slice(b"\n\n");
        self.frames.push(frame.into());
    }

    /// A `text/event-stream` response. Without an interval the whole stream is one body
    /// (cheapest); with one, each event is sent on its own after the pause.
    pub fn into_response(self, interval: Duration) -> Response {
        let body = if interval.is_zero() {
            Body::from(self.frames.concat())
        } else {
            let frames = self.frames.into_iter().enumerate();
            Body::from_stream(stream::unfold(frames, move |mut frames| async move {
                let (i, frame) = frames.next()?;
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                Some((Ok::<_, std::convert::Infallible>(frame), frames))
            }))
        };
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

//! Finding the real output tokens in an upstream response, for reconcile.
//!
//! The body arrives in chunks split at arbitrary bytes: either one JSON document or the SSE
//! text of a stream. The meter prefers the `usage` the upstream reports; a stream without a
//! usage chunk (the client did not ask for `stream_options.include_usage`) is counted from
//! its streamed text instead. Memory stays bounded: a JSON body is buffered up to
//! [`MAX_JSON_BODY`], a stream keeps one partial line plus the generated text, capped.

use super::endpoint::Endpoint;
use super::json::Json;
use super::tokens::{Encoding, Tokenizer};

/// Past this a JSON body is not parsed at all (→ `None`): real completions are far smaller.
const MAX_JSON_BODY: usize = 8 << 20;
/// One SSE line. The Responses `response.completed` event repeats the whole output, so it
/// may be large; a longer line is skipped.
const MAX_SSE_LINE: usize = 8 << 20;
/// Generated text kept for counting. Beyond it the remaining bytes are only measured and
/// estimated at the tokens-per-byte rate of the text kept (~1M tokens in: never in practice).
const MAX_COUNTED_TEXT: usize = 4 << 20;
/// Separately counted text streams (choices × tool calls); more is folded into the estimate.
const MAX_SEGMENTS: usize = 256;

/// The real output tokens of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputCount {
    pub tokens: u64,
    pub source: OutputSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputSource {
    /// The upstream's own `usage` figure.
    Usage,
    /// Counted with the model's encoding from the generated text of the response (a stream
    /// without a usage chunk, or a JSON body without `usage`).
    CountedStream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Nothing but whitespace seen yet.
    Undecided,
    Json,
    Sse,
    /// Embeddings and other endpoints produce no output tokens.
    Ignored,
}

/// Finds the real output tokens in an upstream response body, fed in chunks of any size.
#[derive(Debug)]
pub struct OutputMeter {
    endpoint: Endpoint,
    encoding: Encoding,
    format: Format,
    /// The JSON body so far, or the current partial SSE line.
    buffer: Vec<u8>,
    /// The JSON body or the current SSE line outgrew its cap and is being dropped.
    overflowed: bool,
    usage: Option<u64>,
    /// A choice, delta or output item was seen: the response did generate (maybe nothing).
    saw_output: bool,
    text: GeneratedText,
}

impl OutputMeter {
    pub fn new(endpoint: Endpoint, model: &str) -> OutputMeter {
        OutputMeter::with_encoding(endpoint, Encoding::for_model(model))
    }

    /// A meter that counts streamed text in `encoding` (when only the encoding of the
    /// request's model travelled with its reservation).
    pub fn with_encoding(endpoint: Endpoint, encoding: Encoding) -> OutputMeter {
        OutputMeter {
            endpoint,
            encoding,
            format: if endpoint.reserves_output() {
                Format::Undecided
            } else {
                Format::Ignored
            },
            buffer: Vec::new(),
            overflowed: false,
            usage: None,
            saw_output: false,
            text: GeneratedText::default(),
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.format == Format::Undecided {
            // A JSON body starts with `{`; an SSE stream with `data:`, `event:` or `:`.
            match chunk.iter().find(|b| !b.is_ascii_whitespace()) {
                None => return,
                Some(b'{' | b'[') => self.format = Format::Json,
                Some(_) => self.format = Format::Sse,
            }
        }
        match self.format {
            Format::Json => self.feed_json(chunk),
            Format::Sse => self.feed_sse(chunk),
            Format::Undecided | Format::Ignored => {}
        }
    }

    /// Ends the body. Usage from the response if present (chat/completions:
    /// `usage.completion_tokens`; responses: `usage.output_tokens`, including the
    /// `response.completed` SSE event); else the tokens of the generated text (chat:
    /// `choices[].delta.content` / `message.content`, refusals, tool-call names and
    /// arguments; completions: `choices[].text`; responses: the `*.delta` events, or the
    /// output items of a JSON body), counted with the model's encoding. `None` when nothing
    /// usable was seen (an error body, an oversized JSON body, embeddings).
    pub fn finish(mut self, tokenizer: &Tokenizer) -> Option<OutputCount> {
        match self.format {
            Format::Undecided | Format::Ignored => return None,
            Format::Json if self.overflowed => return None,
            Format::Json => {
                let body = std::mem::take(&mut self.buffer);
                if let Ok(response) = Json::parse(&body) {
                    self.observe(&response, true);
                }
            }
            Format::Sse => {
                if !self.overflowed && !self.buffer.is_empty() {
                    let line = std::mem::take(&mut self.buffer);
                    self.sse_line(&line);
                }
            }
        }
        if let Some(tokens) = self.usage {
            return Some(OutputCount {
                tokens,
                source: OutputSource::Usage,
            });
        }
        if !self.saw_output {
            return None;
        }
        Some(OutputCount {
            tokens: self.text.count(tokenizer, self.encoding),
            source: OutputSource::CountedStream,
        })
    }

    fn feed_json(&mut self, chunk: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.buffer.len() + chunk.len() > MAX_JSON_BODY {
            self.overflowed = true;
            self.buffer = Vec::new();
            return;
        }
        self.buffer.extend_from_slice(chunk);
    }

    fn feed_sse(&mut self, mut chunk: &[u8]) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            let head = &chunk[..end];
            chunk = &chunk[end + 1..];
            if self.overflowed {
                // The tail of a line too long to keep: drop it and start afresh.
                self.overflowed = false;
            } else if self.buffer.is_empty() {
                self.sse_line(head);
            } else if self.buffer.len() + head.len() <= MAX_SSE_LINE {
                let mut line = std::mem::take(&mut self.buffer);
                line.extend_from_slice(head);
                self.sse_line(&line);
                line.clear();
                self.buffer = line;
            }
            self.buffer.clear();
        }
        if self.overflowed {
            return;
        }
        if self.buffer.len() + chunk.len() > MAX_SSE_LINE {
            self.overflowed = true;
            self.buffer = Vec::new();
        } else {
            self.buffer.extend_from_slice(chunk);
        }
    }

    /// One SSE line. OpenAI puts each event's JSON on a single `data:` line, so each data
    /// line is parsed on its own; this also copes with servers that omit the blank line
    /// between events. Other fields (`event:`, `id:`) and comments are not needed.
    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        if let Ok(event) = Json::parse(data) {
            self.observe(&event, false);
        }
    }

    /// Takes usage and generated text from one stream event or a whole JSON body.
    fn observe(&mut self, event: &Json, whole_body: bool) {
        match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions => self.observe_choices(event),
            Endpoint::Responses => self.observe_response(event, whole_body),
            Endpoint::Embeddings | Endpoint::Other => {}
        }
    }

    fn observe_choices(&mut self, event: &Json) {
        if let Some(tokens) = event
            .field("usage")
            .and_then(|u| u.field("completion_tokens"))
            .and_then(Json::as_u64)
        {
            self.usage = Some(tokens);
        }
        let Some(choices) = event.field("choices").and_then(Json::as_array) else {
            return;
        };
        for (position, choice) in choices.iter().enumerate() {
            self.saw_output = true;
            let index = choice
                .field("index")
                .and_then(Json::as_u64)
                .unwrap_or(position as u64);
            if self.endpoint == Endpoint::Completions {
                self.append(Segment::new(index, 0, Part::Content), choice.field("text"));
                continue;
            }
            // Stream chunks carry a `delta`, a JSON body a `message`; both have the same fields.
            let Some(message) = choice.field("delta").or_else(|| choice.field("message")) else {
                continue;
            };
            self.append(
                Segment::new(index, 0, Part::Content),
                message.field("content"),
            );
            self.append(
                Segment::new(index, 0, Part::Refusal),
                message.field("refusal"),
            );
            if let Some(call) = message.field("function_call") {
                self.append(
                    Segment::new(index, u64::MAX, Part::ToolName),
                    call.field("name"),
                );
                self.append(
                    Segment::new(index, u64::MAX, Part::ToolArguments),
                    call.field("arguments"),
                );
            }
            let calls = message
                .field("tool_calls")
                .and_then(Json::as_array)
                .unwrap_or_default();
            for (call_position, call) in calls.iter().enumerate() {
                let call_index = call
                    .field("index")
                    .and_then(Json::as_u64)
                    .unwrap_or(call_position as u64);
                let Some(function) = call.field("function") else {
                    continue;
                };
                self.append(
                    Segment::new(index, call_index, Part::ToolName),
                    function.field("name"),
                );
                self.append(
                    Segment::new(index, call_index, Part::ToolArguments),
                    function.field("arguments"),
                );
            }
        }
    }

    fn observe_response(&mut self, event: &Json, whole_body: bool) {
        // Stream events wrap the response object (`response.completed` etc.); a JSON body is it.
        let response = event.field("response").unwrap_or(event);
        if let Some(tokens) = response
            .field("usage")
            .and_then(|u| u.field("output_tokens"))
            .and_then(Json::as_u64)
        {
            self.usage = Some(tokens);
        }
        if whole_body {
            // Output items of a non-streamed response (only needed when it has no usage).
            let items = response
                .field("output")
                .and_then(Json::as_array)
                .unwrap_or_default();
            for (output_index, item) in items.iter().enumerate() {
                self.saw_output = true;
                let output_index = output_index as u64;
                let parts = item
                    .field("content")
                    .and_then(Json::as_array)
                    .unwrap_or_default();
                for (content_index, part) in parts.iter().enumerate() {
                    let segment = Segment::new(output_index, content_index as u64, Part::Content);
                    self.append(
                        segment,
                        part.field("text").or_else(|| part.field("refusal")),
                    );
                }
                self.append(
                    Segment::new(output_index, 0, Part::ToolName),
                    item.field("name"),
                );
                self.append(
                    Segment::new(output_index, 0, Part::ToolArguments),
                    item.field("arguments"),
                );
            }
            return;
        }
        let part = match event.field("type").and_then(Json::as_str) {
            Some("response.output_text.delta" | "response.refusal.delta") => Part::Content,
            Some(
                "response.function_call_arguments.delta" | "response.custom_tool_call_input.delta",
            ) => Part::ToolArguments,
            _ => return,
        };
        self.saw_output = true;
        let output_index = event
            .field("output_index")
            .and_then(Json::as_u64)
            .unwrap_or(0);
        let content_index = event
            .field("content_index")
            .and_then(Json::as_u64)
            .unwrap_or(0);
        self.append(
            Segment::new(output_index, content_index, part),
            event.field("delta"),
        );
    }

    fn append(&mut self, segment: Segment, text: Option<&Json>) {
        if let Some(text) = text.and_then(Json::as_str) {
            self.text.append(segment, text);
        }
    }
}

/// Which stream of generated text a piece belongs to. Pieces of one stream are joined
/// before counting (BPE merges across delta boundaries); different streams are counted
/// apart, as the model produced them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    index: u64,
    sub_index: u64,
    part: Part,
}

impl Segment {
    fn new(index: u64, sub_index: u64, part: Part) -> Segment {
        Segment {
            index,
            sub_index,
            part,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Content,
    Refusal,
    ToolName,
    ToolArguments,
}

#[derive(Debug, Default)]
struct GeneratedText {
    segments: Vec<(Segment, String)>,
    kept_bytes: usize,
    /// Bytes not kept (caps reached); estimated at the end.
    dropped_bytes: u64,
}

impl GeneratedText {
    fn append(&mut self, segment: Segment, text: &str) {
        if text.is_empty() {
            return;
        }
        // Once anything is dropped, everything after is too, so no segment gets a gap.
        if self.dropped_bytes > 0 || self.kept_bytes + text.len() > MAX_COUNTED_TEXT {
            self.dropped_bytes += text.len() as u64;
            return;
        }
        // The current segment is nearly always the last one.
        match self.segments.iter().rposition(|(s, _)| *s == segment) {
            Some(i) => self.segments[i].1.push_str(text),
            None if self.segments.len() < MAX_SEGMENTS => {
                self.segments.push((segment, text.to_owned()))
            }
            None => {
                self.dropped_bytes += text.len() as u64;
                return;
            }
        }
        self.kept_bytes += text.len();
    }

    fn count(&self, tokenizer: &Tokenizer, encoding: Encoding) -> u64 {
        let counted: u64 = self
            .segments
            .iter()
            .map(|(_, text)| tokenizer.count(encoding, text))
            .sum();
        if self.dropped_bytes == 0 {
            return counted;
        }
        // Estimate the rest at the rate of what was counted (or ~4 bytes a token).
        let (tokens, bytes) = if counted > 0 {
            (counted, self.kept_bytes as u64)
        } else {
            (1, 4)
        };
        counted + (self.dropped_bytes * tokens).div_ceil(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::tokens::tests::tokenizer;

    fn meter(endpoint: Endpoint, model: &str, body: &str) -> Option<OutputCount> {
        let mut m = OutputMeter::new(endpoint, model);
        m.feed(body.as_bytes());
        m.finish(tokenizer())
    }

    /// Feeds the body in every chunk size from 1 to 17 bytes and checks all agree.
    fn meter_chunked(endpoint: Endpoint, model: &str, body: &str) -> Option<OutputCount> {
        let whole = meter(endpoint, model, body);
        for size in 1..=17 {
            let mut m = OutputMeter::new(endpoint, model);
            for chunk in body.as_bytes().chunks(size) {
                m.feed(chunk);
            }
            assert_eq!(m.finish(tokenizer()), whole, "chunk size {size}");
        }
        whole
    }

    fn usage(tokens: u64) -> Option<OutputCount> {
        Some(OutputCount {
            tokens,
            source: OutputSource::Usage,
        })
    }

    fn counted(tokens: u64) -> Option<OutputCount> {
        Some(OutputCount {
            tokens,
            source: OutputSource::CountedStream,
        })
    }

    #[test]
    fn chat_json_body_reports_usage() {
        let body = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,
            "message":{"role":"assistant","content":"Hello there, how may I assist you today?"},
            "finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        assert_eq!(
            meter_chunked(Endpoint::ChatCompletions, "gpt-4o", body),
            usage(12)
        );
    }

    #[test]
    fn json_body_without_usage_is_counted_from_its_text() {
        let body =
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello world!"}}]}"#;
        // "Hello", " world", "!"
        assert_eq!(meter(Endpoint::ChatCompletions, "gpt-4o", body), counted(3));
        let body = r#"{"choices":[{"index":0,"text":"Hello world!"}]}"#;
        assert_eq!(
            meter(Endpoint::Completions, "gpt-3.5-turbo-instruct", body),
            counted(3)
        );
        let body = r#"{"id":"resp_1","output":[{"type":"message","content":[{"type":"output_text","text":"Hello world!"}]}]}"#;
        assert_eq!(meter(Endpoint::Responses, "gpt-4o", body), counted(3));
    }

    #[test]
    fn error_bodies_give_nothing() {
        let body = r#"{"error":{"message":"Rate limit","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(meter(Endpoint::ChatCompletions, "gpt-4o", body), None);
        assert_eq!(
            meter(
                Endpoint::ChatCompletions,
                "gpt-4o",
                "upstream connect error"
            ),
            None
        );
        assert_eq!(meter(Endpoint::ChatCompletions, "gpt-4o", ""), None);
        assert_eq!(
            meter(Endpoint::ChatCompletions, "gpt-4o", r#"{"choices":[{"mess"#),
            None
        );
        let sse_error = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert_eq!(meter(Endpoint::ChatCompletions, "gpt-4o", sse_error), None);
    }

    #[test]
    fn embeddings_and_other_have_no_output() {
        let body =
            r#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"completion_tokens":8}}"#;
        assert_eq!(
            meter(Endpoint::Embeddings, "text-embedding-3-small", body),
            None
        );
        assert_eq!(meter(Endpoint::Other, "", body), None);
    }

    const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo wor\"}}]}\r\n\r\n",
        ": keep-alive\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ld!\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    );

    #[test]
    fn chat_stream_without_usage_is_counted_from_the_joined_deltas() {
        // Joined: "Hello world!" = 3 tokens; counting each delta apart would give more.
        let body = format!("{CHAT_STREAM}data: [DONE]\n\n");
        assert_eq!(
            meter_chunked(Endpoint::ChatCompletions, "gpt-4o", &body),
            counted(3)
        );
        // Truncated stream without [DONE] or final newline still counts what arrived.
        let cut = &CHAT_STREAM[..CHAT_STREAM.len() - 2];
        assert_eq!(meter(Endpoint::ChatCompletions, "gpt-4o", cut), counted(3));
    }

    #[test]
    fn chat_stream_usage_chunk_wins() {
        let body = format!(
            "{CHAT_STREAM}data: {{\"id\":\"c\",\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":4}}}}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(
            meter_chunked(Endpoint::ChatCompletions, "gpt-4o", &body),
            usage(4)
        );
        // Earlier chunks with `"usage":null` (include_usage) do not count as usage.
        let nulls =
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
        assert_eq!(
            meter(Endpoint::ChatCompletions, "gpt-4o", nulls),
            counted(1)
        );
    }

    #[test]
    fn chat_stream_tool_calls_and_choices_are_counted_apart() {
        let t = tokenizer();
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"Hello world!\"}}]}\n\n",
            "data: [DONE]\n\n",
        );
        let want = t.count_text("gpt-4o", "get_weather")
            + t.count_text("gpt-4o", r#"{"city":"Paris"}"#)
            + 3;
        assert_eq!(
            meter_chunked(Endpoint::ChatCompletions, "gpt-4o", body),
            counted(want)
        );
    }

    #[test]
    fn completions_stream_counts_text() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"text\":\"\\n\\nThis is\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\" indeed a test\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        // "\n\n", "This", " is", " indeed", " a", " test" in cl100k_base.
        assert_eq!(
            meter_chunked(Endpoint::Completions, "gpt-3.5-turbo-instruct", body),
            counted(6)
        );
    }

    const RESPONSES_STREAM: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello\"}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"output_index\":0,\"content_index\":0,\"delta\":\" world!\"}\n\n",
    );

    #[test]
    fn responses_stream_counts_deltas_or_takes_completed_usage() {
        assert_eq!(
            meter_chunked(Endpoint::Responses, "gpt-4o", RESPONSES_STREAM),
            counted(3)
        );
        let completed = format!(
            "{RESPONSES_STREAM}event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\
             \"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"Hello world!\"}}]}}],\
             \"usage\":{{\"input_tokens\":9,\"output_tokens\":11,\"total_tokens\":20}}}}}}\n\n"
        );
        assert_eq!(
            meter_chunked(Endpoint::Responses, "gpt-4o", &completed),
            usage(11)
        );
        let body = r#"{"id":"resp_1","output":[],"usage":{"input_tokens":9,"output_tokens":5}}"#;
        assert_eq!(meter(Endpoint::Responses, "gpt-4o", body), usage(5));
    }

    #[test]
    fn oversized_json_body_gives_up() {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        m.feed(b"{\"usage\":{\"completion_tokens\":5},\"pad\":\"");
        let pad = vec![b'x'; 1 << 20];
        for _ in 0..9 {
            m.feed(&pad);
        }
        m.feed(b"\"}");
        assert!(m.buffer.capacity() <= MAX_JSON_BODY);
        assert_eq!(m.finish(tokenizer()), None);
    }

    #[test]
    fn huge_stream_keeps_bounded_memory_and_estimates_the_rest() {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        // " hello" is one token; 6 bytes. 5 MiB of deltas → past the 4 MiB text cap.
        let words = " hello".repeat(1000);
        let event = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{words}\"}}}}]}}\n\n"
        );
        let events = 5 * (1 << 20) / words.len();
        for _ in 0..events {
            m.feed(event.as_bytes());
        }
        assert!(m.text.kept_bytes <= MAX_COUNTED_TEXT);
        assert!(m.buffer.capacity() < 2 * event.len());
        let count = m.finish(tokenizer()).unwrap();
        assert_eq!(count.source, OutputSource::CountedStream);
        let exact = (events * 1000) as u64;
        assert!(
            count.tokens.abs_diff(exact) <= exact / 100,
            "{} vs {exact}",
            count.tokens
        );
    }

    #[test]
    fn an_overlong_sse_line_is_skipped_and_the_stream_resumes() {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        m.feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"");
        let pad = vec![b'x'; 1 << 20];
        for _ in 0..9 {
            m.feed(&pad);
        }
        m.feed(b"\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello world!\"}}]}\n\n");
        assert_eq!(m.finish(tokenizer()), counted(3));
    }
}

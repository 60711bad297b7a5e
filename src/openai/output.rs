//! Finding the real output tokens in an upstream response, for reconcile.
//!
//! The body arrives in chunks split at arbitrary bytes: either one JSON document or the SSE
//! text of a stream. The meter prefers the `usage` the upstream reports; a stream without a
//! usage chunk (the client did not ask for `stream_options.include_usage`) is counted from
//! its streamed text instead.
//!
//! Memory per meter is bounded whatever the response's size, because ext_proc holds one
//! meter per open stream:
//! - A JSON document (the body, or one SSE line) is kept whole up to [`HEAD_CAP`] (32 KiB)
//!   and parsed at its end. A longer one keeps only its last [`TAIL`] (8 KiB) and its
//!   `usage` object is read from there: OpenAI writes `usage` after `choices`/`output`,
//!   followed by a few short fields only. A JSON body's `usage` objects are also caught as
//!   they pass (up to 4 KiB each, two held), so one written earlier (vLLM puts
//!   `prompt_logprobs` after it) is found too. A long document without `usage` gives
//!   nothing (a JSON body: the reservation stays as reserved, the safe side; an SSE line: it
//!   is skipped).
//! - Generated text is counted in pieces as it arrives: each stream of text keeps only the
//!   part not yet counted, cut after [`PIECE`] (1 KiB) at a space between two non-space
//!   characters — where tiktoken's pre-tokenizer always starts a new piece, so counting in
//!   pieces gives exactly the count of the whole text. Text with no such space for
//!   [`FORCED_CUT`] (4 KiB: CJK, base64) is counted as it is, which may differ from the
//!   whole count by about one token per cut (tests measure it). At most [`MAX_SEGMENTS`]
//!   streams of text are kept apart, and at most [`MAX_COUNTED_TEXT`] bytes tokenized
//!   (this bounds CPU); the rest is estimated at the tokens-per-byte rate of what was
//!   counted.
//!
//! So one meter holds at most `HEAD_CAP + 2·TAIL` bytes of document, 8 KiB of usage, and
//! `MAX_SEGMENTS × (FORCED_CUT + one event's text)` of pending text: about 200 KiB in the
//! worst case (64 KiB + 32 × 4 KiB, with events under the line cap), a few KiB for a
//! usual one-choice stream.

use super::endpoint::Endpoint;
use super::json::Json;
use super::tokens::{Encoding, Tokenizer};

/// A JSON body or SSE line kept whole up to this; a longer one keeps only its tail.
pub const HEAD_CAP: usize = 32 << 10;
/// What is kept of a longer document: its end, where `usage` is.
pub const TAIL: usize = 8 << 10;
/// Pending text of one stream is counted once it is longer than this, up to its last
/// space between two non-space characters.
pub const PIECE: usize = 1 << 10;
/// Pending text with no such space is counted as it is once longer than this.
pub const FORCED_CUT: usize = 4 << 10;
/// Generated text tokenized per response (bounds the CPU one response costs); the rest is
/// estimated at the rate of what was counted (~1M tokens in: never in practice).
pub const MAX_COUNTED_TEXT: usize = 4 << 20;
/// Separately counted text streams (choices × tool calls); more is folded into the estimate.
pub const MAX_SEGMENTS: usize = 32;

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
    document: Document,
    usage: Option<u64>,
    /// A choice, delta or output item was seen: the response did generate (maybe nothing).
    saw_output: bool,
    text: GeneratedText,
    /// Every `"usage":{...}` object of a JSON body, as it passes: a body too long to keep
    /// whole may have its usage anywhere (vLLM writes `prompt_logprobs` after it, which
    /// a client can make as long as its prompt).
    usage_scan: UsageScan,
    /// The response generated output that is not text (audio, images): billed as output
    /// tokens, but not countable from text, so again only `usage` will do.
    opaque_output: bool,
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
            document: Document::default(),
            usage: None,
            saw_output: false,
            text: GeneratedText::default(),
            opaque_output: false,
            usage_scan: UsageScan::default(),
        }
    }

    /// Takes the next chunk of the body; generated text is counted with `tokenizer` as it
    /// arrives.
    pub fn feed(&mut self, mut chunk: &[u8], tokenizer: &Tokenizer) {
        if self.format == Format::Undecided {
            // A JSON body starts with `{`; an SSE stream with `data:`, `event:` or `:`.
            // Whitespace before that is skipped whichever chunk it comes in, so the answer
            // never depends on where the body was split (found by fuzzing: a leading tab
            // kept in one chunking and dropped in another).
            let Some(start) = chunk.iter().position(|b| !b.is_ascii_whitespace()) else {
                return;
            };
            chunk = &chunk[start..];
            self.format = match chunk[0] {
                b'{' | b'[' => Format::Json,
                _ => Format::Sse,
            };
        }
        match self.format {
            Format::Json => {
                self.document.push(chunk);
                self.usage_scan.feed(chunk);
            }
            Format::Sse => self.feed_sse(chunk, tokenizer),
            Format::Undecided | Format::Ignored => {}
        }
    }

    /// Bytes this meter holds now (buffers' capacity): what the per-stream bound is about.
    pub fn retained_bytes(&self) -> usize {
        self.document.bytes.capacity()
            + self.text.retained_bytes()
            + self.usage_scan.object.capacity()
            + self.usage_scan.last.capacity()
    }

    /// Ends the body. Usage from the response if present (chat/completions:
    /// `usage.completion_tokens`; responses: `usage.output_tokens`, including the
    /// `response.completed` SSE event); else the tokens of the generated text (chat:
    /// `choices[].delta.content` / `message.content`, refusals, reasoning text
    /// (`reasoning_content`, `reasoning`), tool-call names and arguments; completions:
    /// `choices[].text`; responses: the text, reasoning and arguments `*.delta` events, or
    /// the output items of a JSON body, reasoning summaries included), counted with the
    /// model's encoding. `None` when nothing
    /// usable was seen (an error body, an oversized JSON body without `usage` at its end,
    /// embeddings).
    pub fn finish(mut self, tokenizer: &Tokenizer) -> Option<OutputCount> {
        match self.format {
            Format::Undecided | Format::Ignored => return None,
            Format::Json => {
                let body = std::mem::take(&mut self.document);
                if body.overflowed {
                    self.usage_from_tail(&body.bytes);
                    if self.usage.is_none() {
                        let usage = std::mem::take(&mut self.usage_scan).last;
                        self.usage_from_object(&usage);
                    }
                } else if let Ok(response) = Json::parse(&body.bytes) {
                    self.observe(&response, true, tokenizer);
                }
            }
            Format::Sse => {
                let line = std::mem::take(&mut self.document);
                self.end_of_line(&line, tokenizer);
            }
        }
        if let Some(tokens) = self.usage {
            return Some(OutputCount {
                tokens,
                source: OutputSource::Usage,
            });
        }
        if !self.saw_output || self.opaque_output {
            return None;
        }
        Some(OutputCount {
            tokens: self.text.finish(tokenizer, self.encoding),
            source: OutputSource::CountedStream,
        })
    }

    fn feed_sse(&mut self, mut chunk: &[u8], tokenizer: &Tokenizer) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            let head = &chunk[..end];
            chunk = &chunk[end + 1..];
            if self.document.is_empty() {
                self.sse_line(head, tokenizer);
            } else {
                let mut line = std::mem::take(&mut self.document);
                line.push(head);
                self.end_of_line(&line, tokenizer);
                line.clear();
                self.document = line; // keeps its allocation for the next partial line
            }
        }
        self.document.push(chunk);
    }

    /// A complete SSE line that was kept in `document`: parsed, or, if it outgrew the cap,
    /// its `usage` read from its tail.
    fn end_of_line(&mut self, line: &Document, tokenizer: &Tokenizer) {
        if line.overflowed {
            self.usage_from_tail(&line.bytes);
        } else if !line.bytes.is_empty() {
            self.sse_line(&line.bytes, tokenizer);
        }
    }

    /// The output tokens of a `usage` object's text.
    fn usage_from_object(&mut self, object: &[u8]) {
        let field = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions => "completion_tokens",
            Endpoint::Responses => "output_tokens",
            Endpoint::Embeddings | Endpoint::Other => return,
        };
        if let Some(tokens) = Json::parse(object)
            .ok()
            .and_then(|usage| usage.field(field).and_then(Json::as_u64))
        {
            self.usage = Some(tokens);
        }
    }

    /// Usage from the end of a document too long to keep: the last `"usage":{...}` in it.
    /// The bytes `"usage"` cannot occur inside a JSON string (its quotes would be escaped),
    /// so the last one is a key; in OpenAI's objects it is the response's own.
    fn usage_from_tail(&mut self, tail: &[u8]) {
        let field = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions => "completion_tokens",
            Endpoint::Responses => "output_tokens",
            Endpoint::Embeddings | Endpoint::Other => return,
        };
        if let Some(tokens) = last_usage_object(tail)
            .and_then(|object| Json::parse(object).ok())
            .and_then(|usage| usage.field(field).and_then(Json::as_u64))
        {
            self.usage = Some(tokens);
        }
    }

    /// One SSE line. OpenAI puts each event's JSON on a single `data:` line, so each data
    /// line is parsed on its own; this also copes with servers that omit the blank line
    /// between events. Other fields (`event:`, `id:`) and comments are not needed.
    fn sse_line(&mut self, line: &[u8], tokenizer: &Tokenizer) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        if let Ok(event) = Json::parse(data) {
            self.observe(&event, false, tokenizer);
        }
    }

    /// Takes usage and generated text from one stream event or a whole JSON body.
    fn observe(&mut self, event: &Json, whole_body: bool, tokenizer: &Tokenizer) {
        match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions => {
                self.observe_choices(event, tokenizer)
            }
            Endpoint::Responses => self.observe_response(event, whole_body, tokenizer),
            Endpoint::Embeddings | Endpoint::Other => {}
        }
    }

    fn observe_choices(&mut self, event: &Json, tokenizer: &Tokenizer) {
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
                self.append(
                    Segment::new(index, 0, Part::Content),
                    choice.field("text"),
                    tokenizer,
                );
                continue;
            }
            // Stream chunks carry a `delta`, a JSON body a `message`; both have the same fields.
            let Some(message) = choice.field("delta").or_else(|| choice.field("message")) else {
                continue;
            };
            self.append(
                Segment::new(index, 0, Part::Content),
                message.field("content"),
                tokenizer,
            );
            self.append(
                Segment::new(index, 0, Part::Refusal),
                message.field("refusal"),
                tokenizer,
            );
            // Audio output (`modalities: ["audio"]`): its tokens are not its transcript.
            if message.field("audio").is_some() {
                self.opaque_output = true;
            }
            // Reasoning text that OpenAI-compatible servers stream beside the answer
            // (vLLM, SGLang, DeepSeek: `reasoning_content`; vLLM, Ollama, OpenRouter,
            // Groq: `reasoning`): output tokens the model generated and bills. Servers in
            // transition send both with the same text: one of them is counted.
            self.append(
                Segment::new(index, 0, Part::Reasoning),
                message
                    .field("reasoning")
                    .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
                    .or_else(|| message.field("reasoning_content")),
                tokenizer,
            );
            if let Some(call) = message.field("function_call") {
                self.append(
                    Segment::new(index, u64::MAX, Part::ToolName),
                    call.field("name"),
                    tokenizer,
                );
                self.append(
                    Segment::new(index, u64::MAX, Part::ToolArguments),
                    call.field("arguments"),
                    tokenizer,
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
                    tokenizer,
                );
                self.append(
                    Segment::new(index, call_index, Part::ToolArguments),
                    function.field("arguments"),
                    tokenizer,
                );
            }
        }
    }

    fn observe_response(&mut self, event: &Json, whole_body: bool, tokenizer: &Tokenizer) {
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
                let output_index = output_index as u64;
                self.saw_output = true;
                if let Some("image_generation_call") = item.field("type").and_then(Json::as_str) {
                    self.opaque_output = true;
                }
                self.append(
                    Segment::new(output_index, 0, Part::ToolArguments),
                    item.field("code"),
                    tokenizer,
                );
                let parts = item
                    .field("content")
                    .and_then(Json::as_array)
                    .unwrap_or_default();
                for (content_index, part) in parts.iter().enumerate() {
                    let segment = Segment::new(output_index, content_index as u64, Part::Content);
                    self.append(
                        segment,
                        part.field("text").or_else(|| part.field("refusal")),
                        tokenizer,
                    );
                }
                // A reasoning item's summary is generated text too.
                let summary = item
                    .field("summary")
                    .and_then(Json::as_array)
                    .unwrap_or_default();
                for (summary_index, part) in summary.iter().enumerate() {
                    let segment = Segment::new(output_index, summary_index as u64, Part::Reasoning);
                    self.append(segment, part.field("text"), tokenizer);
                }
                self.append(
                    Segment::new(output_index, 0, Part::ToolName),
                    item.field("name"),
                    tokenizer,
                );
                self.append(
                    Segment::new(output_index, 0, Part::ToolArguments),
                    item.field("arguments"),
                    tokenizer,
                );
            }
            return;
        }
        let part = match event.field("type").and_then(Json::as_str) {
            Some("response.output_text.delta" | "response.refusal.delta") => Part::Content,
            Some(
                "response.function_call_arguments.delta"
                | "response.custom_tool_call_input.delta"
                | "response.mcp_call_arguments.delta"
                | "response.code_interpreter_call_code.delta",
            ) => Part::ToolArguments,
            // Generated images and audio are billed output that is not text.
            Some(kind)
                if kind.starts_with("response.image_generation_call.")
                    || kind.starts_with("response.audio.") =>
            {
                self.saw_output = true;
                self.opaque_output = true;
                return;
            }
            // Reasoning an upstream shows (gpt-oss on vLLM streams its reasoning text;
            // OpenAI streams summaries): generated output like the answer.
            Some(
                "response.reasoning_text.delta"
                | "response.reasoning_summary_text.delta"
                | "response.reasoning.delta"
                | "response.reasoning_summary.delta",
            ) => Part::Reasoning,
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
            tokenizer,
        );
    }

    fn append(&mut self, segment: Segment, text: Option<&Json>, tokenizer: &Tokenizer) {
        if let Some(text) = text.and_then(Json::as_str) {
            self.text.append(segment, text, tokenizer, self.encoding);
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
    Reasoning,
    ToolName,
    ToolArguments,
}

/// A JSON document (a body, or one SSE line) as it arrives: whole up to [`HEAD_CAP`],
/// beyond that only its last [`TAIL`] bytes (at most `2 × TAIL` held between trims).
#[derive(Debug, Default)]
struct Document {
    bytes: Vec<u8>,
    /// Longer than `HEAD_CAP`: `bytes` is its tail.
    overflowed: bool,
}

impl Document {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && !self.overflowed
    }

    fn push(&mut self, chunk: &[u8]) {
        if !self.overflowed {
            if self.bytes.len() + chunk.len() <= HEAD_CAP {
                extend_within(&mut self.bytes, chunk, HEAD_CAP);
                return;
            }
            self.overflowed = true;
            let keep = self.bytes.len().saturating_sub(TAIL);
            self.bytes.drain(..keep);
        }
        let chunk = &chunk[chunk.len().saturating_sub(TAIL)..];
        if self.bytes.len() + chunk.len() > 2 * TAIL {
            let drop = (self.bytes.len() + chunk.len() - TAIL).min(self.bytes.len());
            self.bytes.drain(..drop);
        }
        extend_within(&mut self.bytes, chunk, HEAD_CAP.max(2 * TAIL));
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.overflowed = false;
    }
}

/// Appends without letting the vector's doubling take its capacity past `cap`.
fn extend_within(bytes: &mut Vec<u8>, more: &[u8], cap: usize) {
    let needed = bytes.len() + more.len();
    if needed > bytes.capacity() {
        let target = needed.max((2 * bytes.capacity()).min(cap));
        bytes.reserve_exact(target - bytes.len());
    }
    bytes.extend_from_slice(more);
}

/// Finds `"usage":{...}` objects in a JSON body fed in chunks of any size, keeping the
/// last whole one. `"usage"` followed by `:` is a key (a string value is never followed
/// by a colon, and a quote inside a string is escaped); the object is followed to its
/// matching brace, strings and escapes skipped, and dropped if longer than
/// [`UsageScan::CAP`] (OpenAI's are a few hundred bytes).
#[derive(Debug, Default)]
struct UsageScan {
    /// Bytes of `"usage"` matched so far.
    matched: usize,
    state: ScanState,
    object: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The last whole usage object seen.
    last: Vec<u8>,
}

#[derive(Debug, Default, PartialEq)]
enum ScanState {
    #[default]
    Key,
    /// After the key: whitespace, then `:`.
    Colon,
    /// After the colon: whitespace, then `{`.
    Open,
    Object,
}

impl UsageScan {
    const KEY: &'static [u8] = b"\"usage\"";
    const CAP: usize = 4 << 10;

    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            match self.state {
                ScanState::Key => {
                    if b == Self::KEY[self.matched] {
                        self.matched += 1;
                        if self.matched == Self::KEY.len() {
                            self.matched = 0;
                            self.state = ScanState::Colon;
                        }
                    } else {
                        // `"` is the only byte of the key that also starts it.
                        self.matched = usize::from(b == b'"');
                    }
                }
                ScanState::Colon | ScanState::Open if b.is_ascii_whitespace() => {}
                ScanState::Colon if b == b':' => self.state = ScanState::Open,
                ScanState::Open if b == b'{' => {
                    self.state = ScanState::Object;
                    self.object.clear();
                    self.object.push(b);
                    (self.depth, self.in_string, self.escaped) = (1, false, false);
                }
                ScanState::Colon | ScanState::Open => {
                    self.state = ScanState::Key;
                    self.matched = usize::from(b == b'"');
                }
                ScanState::Object => self.object_byte(b),
            }
        }
    }

    fn object_byte(&mut self, b: u8) {
        if self.object.len() == Self::CAP {
            // Not a usage object of any upstream we know: dropped, its memory too.
            self.object = Vec::new();
            self.state = ScanState::Key;
            return;
        }
        self.object.push(b);
        match (self.in_string, b) {
            (true, _) if self.escaped => self.escaped = false,
            (true, b'\\') => self.escaped = true,
            (true, b'"') => self.in_string = false,
            (true, _) => {}
            (false, b'"') => self.in_string = true,
            (false, b'{') => self.depth += 1,
            (false, b'}') => {
                self.depth -= 1;
                if self.depth == 0 {
                    std::mem::swap(&mut self.last, &mut self.object);
                    self.state = ScanState::Key;
                }
            }
            (false, _) => {}
        }
    }
}

/// The `{...}` after the last `"usage"` key in `tail`, if it is whole there.
fn last_usage_object(tail: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"usage\"";
    let at = tail.windows(KEY.len()).rposition(|w| w == KEY)?;
    let rest = &tail[at + KEY.len()..];
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    if rest.first() != Some(&b'{') {
        return None; // `"usage": null`
    }
    // The matching brace, skipping strings (which may hold braces and escaped quotes).
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in rest.iter().enumerate() {
        match (in_string, b) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') => in_string = false,
            (true, _) => {}
            (false, b'"') => in_string = true,
            (false, b'{') => depth += 1,
            (false, b'}') => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            (false, _) => {}
        }
    }
    None
}

/// Where pending text may be cut so that counting the two sides apart gives the count of
/// the whole: before the last space that sits between two non-whitespace characters.
/// tiktoken's pre-tokenizer (cl100k and o200k) starts a new piece at such a space — no
/// pattern runs through a space into the next word — so BPE never merges across it.
fn cut_point(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (1..bytes.len().saturating_sub(1)).rev().find(|&i| {
        bytes[i] == b' '
            && text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
            && text[i + 1..]
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace())
    })
}

/// The generated text of a response, counted in pieces as it arrives.
#[derive(Debug, Default)]
struct GeneratedText {
    /// Per stream of text, the part not yet counted.
    segments: Vec<(Segment, String)>,
    /// Tokens of the pieces counted so far.
    counted: u64,
    /// Bytes taken for counting (counted or pending).
    kept_bytes: usize,
    /// Bytes not kept (caps reached); estimated at the end.
    dropped_bytes: u64,
    /// Pieces counted without a clean cut (text without spaces): each may be off by a token.
    forced_cuts: u64,
}

impl GeneratedText {
    fn append(&mut self, segment: Segment, text: &str, tokenizer: &Tokenizer, encoding: Encoding) {
        if text.is_empty() {
            return;
        }
        // Once anything is dropped, everything after is too, so no segment gets a gap.
        if self.dropped_bytes > 0 || self.kept_bytes + text.len() > MAX_COUNTED_TEXT {
            self.dropped_bytes += text.len() as u64;
            return;
        }
        // The current segment is nearly always the last one.
        let i = match self.segments.iter().rposition(|(s, _)| *s == segment) {
            Some(i) => i,
            None if self.segments.len() < MAX_SEGMENTS => {
                self.segments.push((segment, String::new()));
                self.segments.len() - 1
            }
            None => {
                self.dropped_bytes += text.len() as u64;
                return;
            }
        };
        self.kept_bytes += text.len();
        let pending = &mut self.segments[i].1;
        pending.push_str(text);
        if pending.len() <= PIECE {
            return;
        }
        let cut = match cut_point(pending) {
            Some(cut) => cut,
            None if pending.len() > FORCED_CUT => {
                self.forced_cuts += 1;
                pending.len()
            }
            None => return,
        };
        self.counted += tokenizer.count(encoding, &pending[..cut]);
        pending.drain(..cut);
    }

    fn retained_bytes(&self) -> usize {
        self.segments.capacity() * std::mem::size_of::<(Segment, String)>()
            + self
                .segments
                .iter()
                .map(|(_, t)| t.capacity())
                .sum::<usize>()
    }

    /// Counts what is pending and estimates what was dropped.
    fn finish(&mut self, tokenizer: &Tokenizer, encoding: Encoding) -> u64 {
        for (_, pending) in self.segments.drain(..) {
            self.counted += tokenizer.count(encoding, &pending);
        }
        if self.dropped_bytes == 0 {
            return self.counted;
        }
        // Estimate the rest at the rate of what was counted (or ~4 bytes a token).
        let (tokens, bytes) = if self.counted > 0 {
            (self.counted, self.kept_bytes as u64)
        } else {
            (1, 4)
        };
        self.counted + (self.dropped_bytes * tokens).div_ceil(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::tokens::tests::tokenizer;

    fn meter(endpoint: Endpoint, model: &str, body: &str) -> Option<OutputCount> {
        let mut m = OutputMeter::new(endpoint, model);
        m.feed(body.as_bytes(), tokenizer());
        m.finish(tokenizer())
    }

    /// Feeds the body in every chunk size from 1 to 17 bytes and checks all agree.
    fn meter_chunked(endpoint: Endpoint, model: &str, body: &str) -> Option<OutputCount> {
        let whole = meter(endpoint, model, body);
        for size in 1..=17 {
            let mut m = OutputMeter::new(endpoint, model);
            for chunk in body.as_bytes().chunks(size) {
                m.feed(chunk, tokenizer());
            }
            assert_eq!(m.finish(tokenizer()), whole, "chunk size {size}");
        }
        whole
    }

    #[test]
    fn leading_whitespace_counts_the_same_in_any_chunking() {
        // Found by cargo-fuzz (fuzz/regressions/output_meter/): a body that starts with a
        // tab before `data:` was a counted stream when the tab came in its own chunk, and
        // no stream when it came with the line.
        let body = "\tdata: {\"choices\":[{}]}";
        let whole = meter(Endpoint::ChatCompletions, "gpt-4o", body);
        let mut split = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        split.feed(&body.as_bytes()[..1], tokenizer());
        split.feed(&body.as_bytes()[1..], tokenizer());
        assert_eq!(split.finish(tokenizer()), whole);
        meter_chunked(Endpoint::ChatCompletions, "gpt-4o", body);
        meter_chunked(
            Endpoint::ChatCompletions,
            "gpt-4o",
            "\n \r\n\tdata: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        );
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
    fn streamed_reasoning_text_is_output() {
        // vLLM / DeepSeek stream the reasoning in `reasoning_content`, others in
        // `reasoning`; without a usage chunk it must still be counted.
        let thought = "I think".to_owned() + &" so".repeat(499);
        let n = tokenizer().count_text("gpt-4o", &thought);
        assert_eq!(n, 501);
        for field in ["reasoning_content", "reasoning"] {
            let body = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"{field}\":\"{thought}\"}}}}]}}\n\n\
                 data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hello world!\"}}}}]}}\n\n\
                 data: [DONE]\n\n"
            );
            assert_eq!(
                meter_chunked(Endpoint::ChatCompletions, "gpt-4o", &body),
                counted(n + 3),
                "{field}"
            );
            let json = format!(
                "{{\"choices\":[{{\"index\":0,\"message\":{{\"{field}\":\"{thought}\",\"content\":\"Hello world!\"}}}}]}}"
            );
            assert_eq!(
                meter(Endpoint::ChatCompletions, "gpt-4o", &json),
                counted(n + 3),
                "{field} body"
            );
        }
        // A server that sends the same reasoning in both fields generated it once.
        let both = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"reasoning_content\":\"{thought}\",\"reasoning\":\"{thought}\"}}}}]}}\n\n\
             data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hello world!\"}}}}]}}\n\n\
             data: [DONE]\n\n"
        );
        assert_eq!(
            meter_chunked(Endpoint::ChatCompletions, "gpt-4o", &both),
            counted(n + 3)
        );
        let responses = format!(
            "data: {{\"type\":\"response.reasoning_text.delta\",\"output_index\":0,\"content_index\":0,\"delta\":\"{thought}\"}}\n\n\
             data: {{\"type\":\"response.reasoning_summary_text.delta\",\"output_index\":0,\"summary_index\":0,\"delta\":\"Hello world!\"}}\n\n"
        );
        assert_eq!(
            meter_chunked(Endpoint::Responses, "gpt-4o", &responses),
            counted(n + 3)
        );
        let body = format!(
            "{{\"output\":[{{\"type\":\"reasoning\",\"summary\":[{{\"type\":\"summary_text\",\"text\":\"{thought}\"}}]}}]}}"
        );
        assert_eq!(meter(Endpoint::Responses, "gpt-4o", &body), counted(n));
    }

    #[test]
    fn audio_or_image_output_settles_only_on_usage() {
        // Audio tokens are billed far above their transcript; images have no text.
        let audio = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"audio\":{\"id\":\"a\",\"data\":\"UklGR\",\"transcript\":\"Hi\"}}}]}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            meter_chunked(Endpoint::ChatCompletions, "gpt-4o-audio-preview", audio),
            None
        );
        let body = r#"{"choices":[{"index":0,"message":{"content":null,"audio":{"id":"a","data":"UklGR","transcript":"Hi"}}}]}"#;
        assert_eq!(
            meter(Endpoint::ChatCompletions, "gpt-4o-audio-preview", body),
            None
        );
        let with_usage = r#"{"choices":[{"index":0,"message":{"audio":{"id":"a"}}}],"usage":{"completion_tokens":301}}"#;
        assert_eq!(
            meter(
                Endpoint::ChatCompletions,
                "gpt-4o-audio-preview",
                with_usage
            ),
            usage(301)
        );
        let image = concat!(
            "data: {\"type\":\"response.output_text.delta\",\"output_index\":1,\"content_index\":0,\"delta\":\"Here\"}\n\n",
            "data: {\"type\":\"response.image_generation_call.partial_image\",\"output_index\":0,\"partial_image_b64\":\"iVBOR\"}\n\n",
        );
        assert_eq!(meter_chunked(Endpoint::Responses, "gpt-4o", image), None);
        let body = r#"{"output":[{"type":"image_generation_call","result":"iVBOR"}]}"#;
        assert_eq!(meter(Endpoint::Responses, "gpt-4o", body), None);
        // Code the model writes for a built-in tool is output text.
        let code = "data: {\"type\":\"response.code_interpreter_call_code.delta\",\"output_index\":0,\"delta\":\"print(1)\"}\n\n";
        let want = tokenizer().count_text("gpt-4o", "print(1)");
        assert_eq!(
            meter_chunked(Endpoint::Responses, "gpt-4o", code),
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
    fn an_oversized_json_body_keeps_its_tail_and_finds_usage_there() {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        m.feed(
            b"{\"choices\":[{\"index\":0,\"message\":{\"content\":\"",
            tokenizer(),
        );
        let pad = vec![b'x'; 1 << 20];
        for _ in 0..9 {
            m.feed(&pad, tokenizer());
            assert!(m.retained_bytes() <= HEAD_CAP, "{}", m.retained_bytes());
        }
        // usage after choices, then short fields, as OpenAI writes it; a brace in a string.
        m.feed(
            br#""}}],"usage":{"prompt_tokens":9,"completion_tokens":1234,"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_}{\"x"}"#,
            tokenizer(),
        );
        assert_eq!(m.finish(tokenizer()), usage(1234));
        // Usage before a long tail (vLLM's `prompt_logprobs` follow it) is found too, in
        // any chunking; without any usage an oversized body gives nothing.
        let head =
            br#"{"choices":[],"usage": {"completion_tokens":5,"x":"}\"{"} ,"prompt_logprobs":""#;
        for split in [1, 7, head.len()] {
            let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
            for piece in head.chunks(split) {
                m.feed(piece, tokenizer());
            }
            for _ in 0..3 {
                m.feed(&pad, tokenizer());
            }
            m.feed(b"\"}", tokenizer());
            assert_eq!(m.finish(tokenizer()), usage(5), "{split}");
        }
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        m.feed(
            b"{\"text\":\"usage\",\"\\\"usage\":1,\"pad\":\"",
            tokenizer(),
        );
        m.feed(&pad, tokenizer());
        m.feed(b"\"}", tokenizer());
        assert_eq!(m.finish(tokenizer()), None);
    }

    #[test]
    fn usage_objects_are_found_at_the_end_of_a_tail() {
        assert_eq!(
            last_usage_object(br#"..."usage" : {"a":{"b":"}"}} ,"x":1}"#),
            Some(&br#"{"a":{"b":"}"}}"#[..])
        );
        assert_eq!(last_usage_object(br#""usage":null}"#), None);
        assert_eq!(last_usage_object(br#""usage":{"completion_tok"#), None);
        // An escaped "usage" inside a string is not a key.
        assert_eq!(
            last_usage_object(br#""usage":{"n":1},"t":"\"usage\":{\"n\":2}""#),
            Some(&br#"{"n":1}"#[..])
        );
    }

    #[test]
    fn an_overlong_responses_completed_event_still_gives_its_usage() {
        let text = "word ".repeat(20_000); // 100 KB: past the line cap
        let body = format!(
            "{RESPONSES_STREAM}event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\
             \"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\
             \"usage\":{{\"input_tokens\":9,\"output_tokens\":20001,\"total_tokens\":20010}},\"user\":null,\"metadata\":{{}}}}}}\n\n"
        );
        let mut m = OutputMeter::new(Endpoint::Responses, "gpt-4o");
        for chunk in body.as_bytes().chunks(1000) {
            m.feed(chunk, tokenizer());
        }
        assert!(m.retained_bytes() < HEAD_CAP + 2 * TAIL);
        assert_eq!(m.finish(tokenizer()), usage(20001));
    }

    /// An SSE stream whose deltas, joined, are `text`; each delta about `size` bytes.
    fn stream_of(text: &str, size: usize) -> String {
        let mut body = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut end = size.min(rest.len());
            while !rest.is_char_boundary(end) {
                end += 1;
            }
            let delta = serde_json::to_string(&rest[..end]).unwrap();
            body.push_str(&format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{delta}}}}}]}}\n\n"
            ));
            rest = &rest[end..];
        }
        body + "data: [DONE]\n\n"
    }

    /// Tokens counted by the meter, and its forced cuts.
    fn counted_in_pieces(text: &str, size: usize) -> (u64, u64) {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        for chunk in stream_of(text, size).as_bytes().chunks(997) {
            m.feed(chunk, tokenizer());
        }
        let forced = m.text.forced_cuts;
        (m.finish(tokenizer()).unwrap().tokens, forced)
    }

    #[test]
    fn counting_in_pieces_equals_counting_at_once() {
        let prose = "The quick brown fox, who's 3.14 years old, jumps over the lazy dog!\n\n\
                     Voilà: naïve café résumé — “quotes” and 12345678 numbers.\tTabs  and   spaces;\
                     code: fn main() { println!(\"hi\"); }\r\n    indented line\n- item 1\n";
        let text = prose.repeat(400); // ~70 KB: many pieces
        let whole = tokenizer().count(Encoding::O200k, &text);
        for size in [1, 7, 64, 333, 5000] {
            assert_eq!(
                counted_in_pieces(&text, size),
                (whole, 0),
                "deltas of {size} bytes"
            );
        }
    }

    #[test]
    fn text_without_spaces_is_counted_within_a_token_per_forced_cut() {
        let cjk = "人工智能正在改变世界。我们需要负责任地开发它。".repeat(600);
        let base64 =
            "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3ODk+/"
                .repeat(600);
        for text in [cjk, base64] {
            let whole = tokenizer().count(Encoding::O200k, &text);
            let (pieces, forced) = counted_in_pieces(&text, 50);
            assert!(forced > 0);
            assert!(
                pieces.abs_diff(whole) <= forced,
                "{pieces} in pieces, {whole} at once, {forced} forced cuts"
            );
        }
    }

    #[test]
    fn a_50_mb_stream_is_metered_in_bounded_memory() {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        // " hello" is one token; 6 bytes. Events of ~24 KB, 50 MB in all.
        let words = " hello".repeat(4000);
        let event = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{words}\"}}}}]}}\n\n"
        );
        let events = (50 << 20) / event.len();
        let mut most = 0;
        for _ in 0..events {
            // Split mid-line, as the network does.
            let (a, b) = event.as_bytes().split_at(event.len() / 3);
            m.feed(a, tokenizer());
            m.feed(b, tokenizer());
            most = most.max(m.retained_bytes());
        }
        eprintln!("a 50 MB stream: at most {most} bytes held");
        assert!(most <= HEAD_CAP + FORCED_CUT + 2 * words.len(), "{most}");
        let count = m.finish(tokenizer()).unwrap();
        assert_eq!(count.source, OutputSource::CountedStream);
        let exact = (events * 4000) as u64;
        assert!(
            count.tokens.abs_diff(exact) <= exact / 100,
            "{} vs {exact}",
            count.tokens
        );
    }

    #[test]
    fn an_overlong_sse_line_is_skipped_and_the_stream_resumes() {
        let mut m = OutputMeter::new(Endpoint::ChatCompletions, "gpt-4o");
        m.feed(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"",
            tokenizer(),
        );
        let pad = vec![b'x'; 1 << 20];
        for _ in 0..9 {
            m.feed(&pad, tokenizer());
        }
        m.feed(b"\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello world!\"}}]}\n\n", tokenizer());
        assert_eq!(m.finish(tokenizer()), counted(3));
    }
}

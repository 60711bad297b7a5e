//! Understanding OpenAI-compatible traffic: which endpoint a request is for, what model it
//! names, how many input tokens it carries and how many output tokens it may produce
//! (admission), and how many output tokens the upstream really produced (reconcile).
//!
//! - [`Endpoint`] — the API a request path addresses.
//! - [`Tokenizer`] — owns the BPE encoders; [`Tokenizer::understand`] turns a body into an
//!   [`LlmRequest`] or a [`RequestError`] (HTTP 400).
//! - [`OutputMeter`] — reads an upstream response (JSON or SSE, in chunks) and reports the
//!   real output tokens.
//!
//! Counting follows OpenAI's own accounting where it is documented (the cookbook "How to
//! count tokens with tiktoken"); the places where it is an estimate say so in their docs.

mod chat;
mod endpoint;
mod error;
mod json;
mod output;
mod request;
mod responses;
mod tokens;

pub use endpoint::Endpoint;
pub use error::RequestError;
pub use output::{OutputCount, OutputMeter, OutputSource};
pub use request::LlmRequest;
pub use tokens::Tokenizer;

//! llm-ratelimit: a sliding-window limiter for OpenAI-compatible LLM traffic.
//!
//! The path of one request reads top to bottom: a caller's message (HTTP `/v1/check`
//! here, Envoy gRPC later) → [`openai`] understands the request (model, input tokens,
//! output reservation) → [`engine`] makes one atomic store call → [`admission`] turns the
//! decision into what the client sees.

pub mod config;
pub mod engine;
pub mod openai;

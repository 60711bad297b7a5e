//! llm-ratelimit: a sliding-window limiter for OpenAI-compatible LLM traffic.
//!
//! The path of one request reads top to bottom: a caller's message (HTTP `/v1/check`
//! here, Envoy gRPC next) → [`openai`] understands the request (model, input tokens,
//! output reservation) → [`engine`] makes one atomic store call → [`answer`] turns the
//! decision into what the client sees. [`admission`] is that path, shared by every caller.

pub mod admission;
pub mod answer;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod pressure;
pub mod serve;
pub mod shutdown;
pub mod telemetry;

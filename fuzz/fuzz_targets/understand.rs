//! Request understanding (`Tokenizer::understand`) on any body a client can send: it must
//! answer every input with an `LlmRequest` or an OpenAI-format error, never panic.
//!
//! Two modes, picked by the first byte, so one corpus serves both:
//! - raw (`< 0x80`): the rest is a body, understood as each endpoint in turn;
//! - structured (`>= 0x80`): its low bits pick a path form a gateway may send
//!   (prefix, trailing slash, query), which goes through `Endpoint::from_path` as a real
//!   request's path does; the rest is the body for that one endpoint.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llm_ratelimit::openai::{Endpoint, Tokenizer};

/// Building the encoders takes ~200 ms: once per process, not once per input.
fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(Tokenizer::new)
}

const ENDPOINTS: [Endpoint; 5] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Other,
];

const APIS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    "/v1/responses/resp_1",
];
const PREFIXES: [&str; 4] = ["", "/openai", "/gateway/tenant-a", "/openai/deployments/d"];
const SUFFIXES: [&str; 4] = ["", "/", "?api-version=2024-10-21", "/#x"];

/// Output budgets above this are refused by the parser (`MAX_OUTPUT_TOKENS` in request.rs).
const MAX_OUTPUT_TOKENS: u64 = 16_777_216;

fn check(endpoint: Endpoint, body: &[u8]) {
    match tokenizer().understand(endpoint, body) {
        Ok(request) => {
            assert_eq!(request.endpoint, endpoint);
            if endpoint == Endpoint::Other {
                assert_eq!(request.input_tokens, 0);
                assert!(!request.reserves_output);
            } else {
                assert!(!request.model.is_empty(), "admitted without a model");
            }
            if endpoint == Endpoint::Embeddings {
                assert!(!request.reserves_output);
            }
            if let Some(max) = request.max_output_tokens {
                assert!(max <= MAX_OUTPUT_TOKENS, "budget {max} passed the cap");
            }
        }
        // Every refusal is an answer a client can read.
        Err(e) => assert!(!e.message.is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    if mode < 0x80 {
        for endpoint in ENDPOINTS {
            check(endpoint, body);
        }
    } else {
        let m = usize::from(mode & 0x7f);
        let path = format!(
            "{}{}{}",
            PREFIXES[m % PREFIXES.len()],
            APIS[(m / PREFIXES.len()) % APIS.len()],
            SUFFIXES[(m / (PREFIXES.len() * APIS.len())) % SUFFIXES.len()],
        );
        check(Endpoint::from_path(&path), body);
    }
});

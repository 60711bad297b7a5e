//! Output metering (`OutputMeter`) of any upstream response, JSON or SSE, fed in any
//! chunking: never panics, and the answer does not depend on where the chunks split
//! (Envoy hands ext_proc the body split wherever the network split it).
//!
//! Input layout: byte 0 picks the endpoint and the model's encoding; byte 1 is the number
//! of split points `n` (mod 16); the next `2n` bytes are split offsets (little-endian u16,
//! taken modulo the body length); the rest is the body.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llm_ratelimit::openai::{Endpoint, OutputCount, OutputMeter, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(Tokenizer::new)
}

const ENDPOINTS: [Endpoint; 5] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
    Endpoint::Other,
];
/// One model per encoding.
const MODELS: [&str; 2] = ["gpt-4o", "gpt-4"];

/// Feeds `body` split at `cuts` (sorted offsets into it), then finishes.
fn meter(endpoint: Endpoint, model: &str, body: &[u8], cuts: &[usize]) -> Option<OutputCount> {
    let mut m = OutputMeter::new(endpoint, model);
    let mut from = 0;
    for &cut in cuts {
        m.feed(&body[from..cut], tokenizer());
        from = cut;
    }
    m.feed(&body[from..], tokenizer());
    m.finish(tokenizer())
}

fuzz_target!(|data: &[u8]| {
    let [pick, splits, rest @ ..] = data else {
        return;
    };
    let endpoint = ENDPOINTS[usize::from(pick % 5)];
    let model = MODELS[usize::from(pick / 5 % 2)];
    let n = usize::from(splits % 16);
    if rest.len() < 2 * n {
        return;
    }
    let (offsets, body) = rest.split_at(2 * n);
    let mut cuts: Vec<usize> = offsets
        .chunks_exact(2)
        .map(|o| usize::from(u16::from_le_bytes([o[0], o[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();

    let whole = meter(endpoint, model, body, &[]);
    assert_eq!(
        meter(endpoint, model, body, &cuts),
        whole,
        "split at {cuts:?} changed the answer"
    );
    // One byte at a time is the hardest chunking; small bodies only, to keep runs fast.
    if body.len() <= 512 {
        let every: Vec<usize> = (1..body.len()).collect();
        assert_eq!(
            meter(endpoint, model, body, &every),
            whole,
            "byte-wise feed changed the answer"
        );
    }
    if !matches!(
        endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
    ) {
        assert_eq!(whole, None, "{endpoint:?} produces no output tokens");
    }
});

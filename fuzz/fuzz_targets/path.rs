//! `Endpoint::from_path` on any request path: never panics, and the parts of a path that
//! do not name the API (query, fragment) do not change which endpoint it is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_ratelimit::openai::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let endpoint = Endpoint::from_path(path);
    // A query or fragment after the path never changes the answer.
    if !path.contains(['?', '#']) {
        assert_eq!(
            Endpoint::from_path(&format!("{path}?a=/v1/embeddings")),
            endpoint
        );
        assert_eq!(
            Endpoint::from_path(&format!("{path}#/v1/responses")),
            endpoint
        );
    }
});

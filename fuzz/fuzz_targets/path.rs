//! `Route::from_path` on any request path: never panics; a query or fragment never
//! changes what is metered; normalising is idempotent in effect (a route read from a path
//! reads the same from that path with its dot segments and doubled slashes spelled out);
//! and a metered route never comes from a path with an encoded slash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_ratelimit::openai::{Endpoint, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let route = Route::from_path(path);
    // The legacy reading agrees: an error is `Other`.
    assert_eq!(
        Endpoint::from_path(path),
        route.as_ref().map_or(Endpoint::Other, |r| r.endpoint)
    );
    if !path.contains(['?', '#']) {
        assert_eq!(Route::from_path(&format!("{path}?a=/v1/embeddings")), route);
        assert_eq!(Route::from_path(&format!("{path}#/v1/responses")), route);
        // Spelling the same path with a `./` segment or a doubled slash in front of it
        // routes it the same (the proxies normalise these away).
        if let Some(rest) = path.strip_prefix('/') {
            assert_eq!(Route::from_path(&format!("/./{rest}")), route);
            assert_eq!(Route::from_path(&format!("//{rest}")), route);
        }
    }
    if let Ok(r) = &route {
        if r.endpoint != Endpoint::Other {
            let lower = path.to_ascii_lowercase();
            let before_query = lower.split(['?', '#']).next().unwrap_or_default();
            assert!(!before_query.contains("%2f") && !before_query.contains("%5c"));
        }
    }
});

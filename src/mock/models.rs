//! `GET /v1/models`: a fixed list, one model of each tokenizer family.

use axum::response::Response;
use serde::Serialize;

use super::{json, to_json};

/// Served models: `o200k_base` ones first, then `cl100k_base` ones (see
/// [`crate::openai::Encoding::for_model`]). Any other model name is answered too.
const MODELS: [&str; 6] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
];

/// 2024-05-13, a fixed date so the list never changes between calls.
const CREATED: u64 = 1_715_558_400;

#[derive(Serialize)]
struct List {
    object: &'static str,
    data: [Model; MODELS.len()],
}

#[derive(Serialize)]
struct Model {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

pub(crate) async fn list() -> Response {
    json(to_json(&List {
        object: "list",
        data: MODELS.map(|id| Model {
            id,
            object: "model",
            created: CREATED,
            owned_by: "openai",
        }),
    }))
}

//! The OpenAI API a request path addresses.

/// The APIs whose traffic is counted; everything else is [`Endpoint::Other`] (counted as a
/// request only, body ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Endpoint {
    /// From a request path such as `/v1/chat/completions?x=1`. The query and a trailing
    /// slash are ignored, and any prefix before `/v1/` is allowed (`/openai/v1/responses`),
    /// so gateways that mount the API under a path still match. Sub-resources such as
    /// `/v1/responses/{id}` are [`Endpoint::Other`].
    pub fn from_path(path: &str) -> Endpoint {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = path.strip_suffix('/').unwrap_or(path);
        const ROUTES: [(&str, Endpoint); 4] = [
            ("/v1/chat/completions", Endpoint::ChatCompletions),
            ("/v1/completions", Endpoint::Completions),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/v1/responses", Endpoint::Responses),
        ];
        ROUTES
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix))
            .map_or(Endpoint::Other, |&(_, endpoint)| endpoint)
    }

    /// Whether a response from this endpoint produces output tokens worth reserving.
    pub(crate) fn reserves_output(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint::{self, *};

    #[test]
    fn paths_map_to_endpoints() {
        let cases = [
            ("/v1/chat/completions", ChatCompletions),
            ("/v1/chat/completions?api-version=1", ChatCompletions),
            ("/v1/chat/completions/", ChatCompletions),
            ("/openai/v1/chat/completions", ChatCompletions),
            ("/v1/completions", Completions),
            ("/v1/embeddings#frag", Embeddings),
            ("/v1/responses", Responses),
            ("/v1/responses/resp_123", Other),
            ("/v1/models", Other),
            ("/chat/completions", Other),
            ("/v1/chat/completionsx", Other),
            ("", Other),
            ("?", Other),
        ];
        for (path, want) in cases {
            assert_eq!(Endpoint::from_path(path), want, "{path}");
        }
    }

    #[test]
    fn only_generating_endpoints_reserve_output() {
        assert!(ChatCompletions.reserves_output());
        assert!(Responses.reserves_output());
        assert!(Completions.reserves_output());
        assert!(!Embeddings.reserves_output());
        assert!(!Other.reserves_output());
    }
}

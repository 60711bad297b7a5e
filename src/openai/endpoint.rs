//! What a request path addresses: the OpenAI API it is metered as ([`Endpoint`]) and, on
//! Azure OpenAI's deployment paths, the deployment ([`Route`]).
//!
//! The limiter must meter the path the upstream routes, not the bytes the client sent. A
//! lenient upstream (or the shipped proxies, which normalise before forwarding) treats
//! `/v1//chat/completions`, `/v1/./chat/completions`, `/v1/chat/%63ompletions` and
//! `/V1/Chat/Completions` as chat; if the limiter matched the raw text, each of those would
//! be a request with no tokens. So [`Route::from_path`] first normalises the path the way
//! the proxies do (RFC 3986 §6.2.2 plus slash merging), then matches it, and refuses what
//! the proxies refuse (encoded slashes and backslashes).

use std::borrow::Cow;

/// The APIs whose traffic is counted; everything else is [`Endpoint::Other`] (admission
/// decides by method and config whether that is refused or counted as one request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Endpoint {
    /// The endpoint of [`Route::from_path`], with a path it refuses also read as
    /// [`Endpoint::Other`]. Kept for callers not yet moved to [`Route`]; a caller that meters
    /// must use [`Route::from_path`] and answer its error with a 400, or an encoded slash
    /// becomes an unmetered request.
    pub fn from_path(path: &str) -> Endpoint {
        Route::from_path(path).map_or(Endpoint::Other, |route| route.endpoint)
    }

    /// Whether a response from this endpoint produces output tokens worth reserving.
    pub(crate) fn reserves_output(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
        )
    }
}

/// What a request path is metered as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    /// The Azure OpenAI deployment of `/openai/deployments/{deployment}/...`, as sent
    /// (case kept; only unreserved characters, so it is safe in logs). `None` on every
    /// other path. Its model (config `azure_deployments`, else the name itself) is the
    /// model hint for [`Tokenizer::understand_with`](super::Tokenizer::understand_with).
    pub deployment: Option<String>,
}

/// A path the limiter refuses to meter → HTTP 400 `invalid_request_error`. The messages
/// name no part of the path but the fault, so nothing the client sent is echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `%2F` or `%5C`: the proxies refuse them (a decoded one would change which endpoint
    /// the path names), so the limiter does too.
    #[error(
        "Invalid URL: the path contains an encoded '/' or '\\' (%2F or %5C), which is not allowed."
    )]
    EncodedSeparator,
    /// `/openai/deployments/chat` and the like: an Azure deployment path whose deployment
    /// segment is missing.
    #[error("Invalid URL: the Azure OpenAI deployment is missing from the path (expected /openai/deployments/{{deployment}}/...).")]
    DeploymentMissing,
    /// A deployment segment with a character outside ALPHA / DIGIT / `-` `.` `_` `~`; Azure
    /// deployment names never have one, and the name is used as a model name.
    #[error("Invalid URL: the Azure OpenAI deployment name may only contain letters, digits, '-', '.', '_' and '~'.")]
    InvalidDeployment,
}

/// The metered APIs, by the path segments that follow `/v1` (or a deployment). Matched
/// exactly, so sub-resources (`/v1/responses/{id}`, `/v1/chat/completions/{id}`) are not.
const ENDPOINTS: [(&[&str], Endpoint); 4] = [
    (&["chat", "completions"], Endpoint::ChatCompletions),
    (&["completions"], Endpoint::Completions),
    (&["embeddings"], Endpoint::Embeddings),
    (&["responses"], Endpoint::Responses),
];

impl Route {
    /// From a request target such as `/v1/chat/completions?x=1` or
    /// `/openai/deployments/prod/chat/completions?api-version=2024-10-21`.
    ///
    /// The path is normalised first ([`normalise`]), then matched case-insensitively:
    /// - OpenAI: `.../v1/{endpoint}` with any prefix (`/openai/v1/responses`);
    /// - Azure: `.../openai/deployments/{deployment}/{endpoint}` (chat, completions,
    ///   embeddings; and responses, which Azure does not document under a deployment but a
    ///   lenient upstream may route, so it is metered rather than let through), and
    ///   `.../openai/responses` (Azure's Responses API, model in the body).
    ///
    /// When both forms match (`/openai/deployments/v1/chat/completions`) the Azure reading
    /// wins: it is what Azure's route template makes of the path. By the same template,
    /// `/openai/deployments/chat/completions` is the completions API of a deployment named
    /// `chat` (metered as such; its chat-shaped body then fails validation), while
    /// `/openai/deployments/completions`, with no segment left for a deployment, is
    /// [`RouteError::DeploymentMissing`] rather than an unmetered path.
    pub fn from_path(path: &str) -> Result<Route, RouteError> {
        let normal = normalise(path)?;
        let segments: Vec<&str> = normal.split('/').filter(|s| !s.is_empty()).collect();
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let ends_with = |tail: &[&str]| {
            segments.len() >= tail.len()
                && segments[segments.len() - tail.len()..]
                    .iter()
                    .zip(tail)
                    .all(|(s, t)| eq(s, t))
        };
        // Each endpoint's tail and the segments before it, for the endpoints the path ends in.
        let matches = || {
            ENDPOINTS
                .iter()
                .filter(|(tail, _)| ends_with(tail))
                .map(|&(tail, endpoint)| (&segments[..segments.len() - tail.len()], endpoint))
        };
        let azure_root = |openai: &str, deployments: &str| {
            eq(openai, "openai") && eq(deployments, "deployments")
        };
        // Azure first: .../openai/deployments/{deployment}/{endpoint}.
        for (before, endpoint) in matches() {
            if let [.., openai, deployments, deployment] = before {
                if azure_root(openai, deployments) {
                    return Ok(Route {
                        endpoint,
                        deployment: Some(deployment_name(deployment)?),
                    });
                }
            }
        }
        for (before, endpoint) in matches() {
            match before {
                [.., v1] if eq(v1, "v1") => return Ok(Route::plain(endpoint)),
                [.., openai] if eq(openai, "openai") && endpoint == Endpoint::Responses => {
                    return Ok(Route::plain(endpoint))
                }
                _ => {}
            }
        }
        // A deployment path with no segment left for the deployment.
        for (before, _) in matches() {
            if let [.., openai, deployments] = before {
                if azure_root(openai, deployments) {
                    return Err(RouteError::DeploymentMissing);
                }
            }
        }
        Ok(Route::plain(Endpoint::Other))
    }

    fn plain(endpoint: Endpoint) -> Route {
        Route {
            endpoint,
            deployment: None,
        }
    }
}

fn deployment_name(segment: &str) -> Result<String, RouteError> {
    if segment.bytes().all(is_unreserved) {
        Ok(segment.to_owned())
    } else {
        Err(RouteError::InvalidDeployment)
    }
}

/// RFC 3986 `unreserved`: the characters whose percent-encoding means the same as the
/// character itself (§2.3), so decoding them never changes what a path names.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path as the proxies forward it: query and fragment dropped; percent-encoded
/// unreserved characters decoded (other escapes kept, so `%252F` stays a literal, and a
/// stray `%` becomes `%25`); an encoded `/` or `\` refused; `\` read as `/`; repeated
/// slashes merged; `.` and `..` segments removed (RFC 3986 §5.2.4; `..` never climbs above
/// the root). The result starts with `/` and, apart from the root, has no trailing slash.
/// Normalising it again changes nothing.
///
/// Only ASCII is ever decoded, so the result is valid UTF-8 for any input, and the work is
/// linear in the path's length.
pub(crate) fn normalise(path: &str) -> Result<String, RouteError> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Ok(normal)
}

/// Decodes `%XX` where XX encodes an unreserved character; refuses `%2F` and `%5C` (any
/// case); keeps every other escape (upper-cased); writes a `%` that starts no escape as
/// `%25`.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, RouteError> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes.get(i), bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(b'%'), Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(b'/' | b'\\') => return Err(RouteError::EncodedSeparator),
            Some(b) if is_unreserved(b) => {
                out.push(char::from(b));
                i += 3;
            }
            Some(_) => {
                // Kept escaped, in upper case as RFC 3986 §6.2.2.1 recommends.
                out.push_str(&path[i..i + 3].to_ascii_uppercase());
                i += 3;
            }
            None if bytes[i] == b'%' => {
                // A '%' that starts no escape is written as one, so no later decoding can
                // read it together with what follows (`%2%46` must not become `%2F`).
                out.push_str("%25");
                i += 1;
            }
            None => {
                // Copy up to the next '%' in one go; '%' is ASCII, so the cut is on a char
                // boundary.
                let end = path[i..].find('%').map_or(path.len(), |j| i + j);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(Cow::Owned(out))
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::Endpoint::{self, *};
    use super::*;
    use proptest::prelude::*;

    fn openai(endpoint: Endpoint) -> Result<Route, RouteError> {
        Ok(Route {
            endpoint,
            deployment: None,
        })
    }

    fn azure(endpoint: Endpoint, deployment: &str) -> Result<Route, RouteError> {
        Ok(Route {
            endpoint,
            deployment: Some(deployment.to_owned()),
        })
    }

    #[test]
    fn paths_map_to_routes() {
        let long_prefix = "/x".repeat(5000) + "/v1/chat/completions";
        let long_dots = "/a".repeat(3000) + &"/..".repeat(3000) + "/v1/embeddings";
        let long_other = "/v1/".to_owned() + &"%41".repeat(10_000);
        let cases: Vec<(&str, Result<Route, RouteError>)> = vec![
            // The plain OpenAI paths, with query, fragment, trailing slash, prefix.
            ("/v1/chat/completions", openai(ChatCompletions)),
            (
                "/v1/chat/completions?api-version=1",
                openai(ChatCompletions),
            ),
            ("/v1/chat/completions/", openai(ChatCompletions)),
            ("/v1/chat/completions/?a=/x/../", openai(ChatCompletions)),
            ("/openai/v1/chat/completions", openai(ChatCompletions)),
            ("/v1/completions", openai(Completions)),
            ("/v1/embeddings#frag", openai(Embeddings)),
            ("/v1/responses", openai(Responses)),
            (
                "/openai/v1/responses?api-version=preview",
                openai(Responses),
            ),
            // Variants a lenient upstream routes as the endpoint they mean.
            ("/v1//chat/completions", openai(ChatCompletions)),
            ("//v1///chat//completions//", openai(ChatCompletions)),
            ("/v1/./chat/completions", openai(ChatCompletions)),
            ("/v1/chat/./completions/.", openai(ChatCompletions)),
            ("/v1/x/../chat/completions", openai(ChatCompletions)),
            ("/v1/chat/x/y/../../completions", openai(ChatCompletions)),
            ("/../../v1/chat/completions", openai(ChatCompletions)),
            ("/v1/chat/%63ompletions", openai(ChatCompletions)),
            ("/%76%31/%43hat/completion%73", openai(ChatCompletions)),
            ("/v1/x/%2e%2e/chat/completions", openai(ChatCompletions)),
            ("/v1/x/%2E./chat/completions", openai(ChatCompletions)),
            ("/v1/%2e/embeddings", openai(Embeddings)),
            ("/V1/Chat/Completions", openai(ChatCompletions)),
            ("/V1/RESPONSES/", openai(Responses)),
            ("\\v1\\chat\\completions", openai(ChatCompletions)),
            ("/v1\\chat/completions", openai(ChatCompletions)),
            (long_prefix.as_str(), openai(ChatCompletions)),
            (long_dots.as_str(), openai(Embeddings)),
            // Azure OpenAI deployment paths.
            (
                "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21",
                azure(ChatCompletions, "prod-gpt4o"),
            ),
            (
                "/openai/deployments/d1/completions",
                azure(Completions, "d1"),
            ),
            (
                "/openai/deployments/emb/embeddings",
                azure(Embeddings, "emb"),
            ),
            ("/openai/deployments/r/responses", azure(Responses, "r")),
            (
                "/OpenAI/Deployments/Prod/Chat/Completions",
                azure(ChatCompletions, "Prod"),
            ),
            (
                "/openai/deployments/my%2Ddep/chat/completions",
                azure(ChatCompletions, "my-dep"),
            ),
            (
                "/openai//deployments/x/./chat//completions",
                azure(ChatCompletions, "x"),
            ),
            (
                "/gw/openai/deployments/x/embeddings",
                azure(Embeddings, "x"),
            ),
            (
                "/openai/deployments/x/y/../chat/completions",
                azure(ChatCompletions, "x"),
            ),
            // Both readings possible: Azure's route template wins.
            (
                "/openai/deployments/v1/chat/completions",
                azure(ChatCompletions, "v1"),
            ),
            (
                "/openai/deployments/chat/completions",
                azure(Completions, "chat"),
            ),
            (
                "/openai/deployments//chat/completions",
                azure(Completions, "chat"),
            ),
            (
                "/openai/responses?api-version=2025-04-01-preview",
                openai(Responses),
            ),
            // A deployment path that names no deployment must not pass unmetered.
            (
                "/openai/deployments/completions",
                Err(RouteError::DeploymentMissing),
            ),
            (
                "/openai/deployments/embeddings",
                Err(RouteError::DeploymentMissing),
            ),
            (
                "/openai/deployments//responses",
                Err(RouteError::DeploymentMissing),
            ),
            (
                "/openai/deployments/x/../completions",
                Err(RouteError::DeploymentMissing),
            ),
            (
                "/openai/deployments/a%20b/chat/completions",
                Err(RouteError::InvalidDeployment),
            ),
            (
                "/openai/deployments/a%C3%A9/embeddings",
                Err(RouteError::InvalidDeployment),
            ),
            (
                "/openai/deployments/é/embeddings",
                Err(RouteError::InvalidDeployment),
            ),
            // What the proxies refuse.
            ("/v1/chat%2Fcompletions", Err(RouteError::EncodedSeparator)),
            ("/v1/chat%2fcompletions", Err(RouteError::EncodedSeparator)),
            ("/v1%5Cchat/completions", Err(RouteError::EncodedSeparator)),
            ("/v1/models%2f", Err(RouteError::EncodedSeparator)),
            // Everything else is Other: sub-resources, other APIs, escapes that stay escaped.
            ("/v1/chat/completions/..", openai(Other)),
            ("/v1/chat/completions/%2e%2e", openai(Other)),
            ("/v1/responses/resp_123", openai(Other)),
            ("/v1/chat/completions/chatcmpl-1", openai(Other)),
            ("/v1/chat/completions/x/..", openai(ChatCompletions)),
            ("/v1/models", openai(Other)),
            ("/chat/completions", openai(Other)),
            ("/completions", openai(Other)),
            ("/v1/chat/completionsx", openai(Other)),
            ("/v1/chat/completions%00", openai(Other)),
            ("/v1/chat%252Fcompletions", openai(Other)),
            ("/v1/chat/completions%", openai(Other)),
            ("/v1/chat/completions%2", openai(Other)),
            ("/v1/chat/%zzcompletions", openai(Other)),
            ("/v1/chat/%FFcompletions", openai(Other)),
            ("/v1/chat/%E2%82%ACcompletions", openai(Other)),
            ("/openai/chat/completions", openai(Other)),
            ("/openai/deployments", openai(Other)),
            ("/openai/deployments/x", openai(Other)),
            ("/openai/deployments/x/models", openai(Other)),
            ("/v1", openai(Other)),
            (long_other.as_str(), openai(Other)),
            ("", openai(Other)),
            ("?", openai(Other)),
            ("/", openai(Other)),
            ("..", openai(Other)),
            ("%", openai(Other)),
            ("/€/v1/€", openai(Other)),
        ];
        for (path, want) in cases {
            let shown: String = path.chars().take(80).collect();
            assert_eq!(Route::from_path(path), want, "{shown}");
        }
    }

    #[test]
    fn normalise_follows_rfc_3986_dot_segment_removal() {
        let cases = [
            ("", "/"),
            ("/a/b/c/./../../g", "/a/g"),
            ("mid/content=5/../6", "/mid/6"),
            ("/a/%7Eb/%41%5a%30-%2E_", "/a/~b/AZ0-._"),
            ("/a/%20b/%3F", "/a/%20b/%3F"),
            ("/a/%41%", "/a/A%25"),
            ("/a/%%41", "/a/%25A"),
            ("/a/%2%46", "/a/%252F"),
            ("/a/%3f%e2%82%ac", "/a/%3F%E2%82%AC"),
            ("/€/%41", "/€/A"),
        ];
        for (path, want) in cases {
            assert_eq!(normalise(path).as_deref(), Ok(want), "{path}");
        }
    }

    #[test]
    fn endpoint_from_path_is_the_routes_endpoint() {
        assert_eq!(Endpoint::from_path("/V1//embeddings"), Embeddings);
        assert_eq!(
            Endpoint::from_path("/openai/deployments/x/chat/completions"),
            ChatCompletions
        );
        assert_eq!(Endpoint::from_path("/v1/chat%2Fcompletions"), Other);
    }

    #[test]
    fn only_generating_endpoints_reserve_output() {
        assert!(ChatCompletions.reserves_output());
        assert!(Responses.reserves_output());
        assert!(Completions.reserves_output());
        assert!(!Embeddings.reserves_output());
        assert!(!Other.reserves_output());
    }

    /// Pieces that reach every branch of the normaliser and the matcher.
    fn path_piece() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(
                &[
                    "/",
                    "//",
                    "\\",
                    ".",
                    "..",
                    "%",
                    "%2",
                    "%2e",
                    "%2E",
                    "%2f",
                    "%5C",
                    "%25",
                    "%41",
                    "%FF",
                    "%C3%A9",
                    "?",
                    "#",
                    "v1",
                    "V1",
                    "openai",
                    "deployments",
                    "chat",
                    "completions",
                    "embeddings",
                    "responses",
                    "é",
                    "\0",
                ][..]
            )
            .prop_map(str::to_owned),
            "\\PC{0,6}",
        ]
    }

    proptest! {
        #[test]
        fn from_path_never_panics(pieces in prop::collection::vec(path_piece(), 0..24)) {
            let path = pieces.concat();
            let _ = Route::from_path(&path);
            let _ = Endpoint::from_path(&path);
        }

        #[test]
        fn normalising_twice_changes_nothing(pieces in prop::collection::vec(path_piece(), 0..24)) {
            let path = pieces.concat();
            if let Ok(once) = normalise(&path) {
                // No escape is created by decoding (a stray `%` is written `%25`), so a
                // second pass finds nothing left to do.
                prop_assert_eq!(normalise(&once), Ok(once.clone()));
                prop_assert_eq!(Route::from_path(&once), Route::from_path(&path));
            }
        }
    }
}

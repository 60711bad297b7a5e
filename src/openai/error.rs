//! The one error a request body can cause: it is not a valid OpenAI request (HTTP 400,
//! `invalid_request_error`). Messages follow the wording of OpenAI's own validator so a
//! client sees the same text whether the limiter or the upstream rejects it.

use super::json::Json;

/// A request that is not a valid OpenAI request for its path → HTTP 400, type
/// `invalid_request_error`. `param` names the offending field OpenAI-style
/// (`messages[2].role`), or is `None` when the whole body is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub message: String,
    pub param: Option<String>,
}

impl RequestError {
    pub(crate) fn unparsable_body() -> RequestError {
        RequestError {
            message: "We could not parse the JSON body of your request. (HINT: This likely \
                      means you aren't using your HTTP library correctly. The OpenAI API \
                      expects a JSON payload, but what was sent was not valid JSON. If you \
                      have trouble figuring out how to fix this, please contact us through \
                      our help center at help.openai.com.)"
                .to_owned(),
            param: None,
        }
    }

    pub(crate) fn body_not_object(got: &Json) -> RequestError {
        RequestError {
            message: format!(
                "Invalid type for request body: expected an object, but got {} instead.",
                got.kind()
            ),
            param: None,
        }
    }

    pub(crate) fn missing(param: impl Into<String>) -> RequestError {
        let param = param.into();
        RequestError {
            message: format!("Missing required parameter: '{param}'."),
            param: Some(param),
        }
    }

    pub(crate) fn invalid_type(
        param: impl Into<String>,
        expected: &str,
        got: &Json,
    ) -> RequestError {
        let param = param.into();
        RequestError {
            message: format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                got.kind()
            ),
            param: Some(param),
        }
    }

    /// A string outside its allowed set, e.g. an unknown message role.
    pub(crate) fn unsupported_value(
        param: impl Into<String>,
        value: &str,
        supported: &str,
    ) -> RequestError {
        RequestError {
            message: format!("Invalid value: '{value}'. Supported values are: {supported}."),
            param: Some(param.into()),
        }
    }

    /// `detail` completes "Invalid '<param>': ...".
    pub(crate) fn invalid_value(param: impl Into<String>, detail: &str) -> RequestError {
        let param = param.into();
        RequestError {
            message: format!("Invalid '{param}': {detail}"),
            param: Some(param),
        }
    }
}

//! From a request body to an [`LlmRequest`]: validate what admission relies on, count the
//! input tokens, read the output budget. Chat and Responses inputs have their own files;
//! the fields every endpoint shares, and the simple Completions / Embeddings inputs, are here.

use super::chat;
use super::endpoint::Endpoint;
use super::error::RequestError;
use super::json::Json;
use super::responses;
use super::tokens::{Encoding, Tokenizer};

/// What admission needs to know about one client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub input_tokens: u64,
    /// `max_completion_tokens`, else `max_tokens` (chat / completions), `max_output_tokens`
    /// (responses); `None` when the request sets none (admission then applies the
    /// configured default).
    pub max_output_tokens: Option<u64>,
    /// `false` for embeddings and [`Endpoint::Other`]: no output reservation at all.
    pub reserves_output: bool,
    pub stream: bool,
}

/// The largest output budget we accept. No model comes near it; a bigger number is a
/// client bug, and would reserve a whole output limit for one request.
const MAX_OUTPUT_TOKENS: u64 = 16_777_216;

impl Tokenizer {
    /// Parses the body for its endpoint, validates it, counts input tokens.
    ///
    /// [`Endpoint::Other`]: the body is ignored (it may be empty or not JSON), input tokens
    /// are 0, the model is empty and nothing is reserved.
    pub fn understand(&self, endpoint: Endpoint, body: &[u8]) -> Result<LlmRequest, RequestError> {
        if endpoint == Endpoint::Other {
            return Ok(LlmRequest {
                endpoint,
                model: String::new(),
                input_tokens: 0,
                max_output_tokens: None,
                reserves_output: false,
                stream: false,
            });
        }
        let root = Json::parse(body).map_err(|_| RequestError::unparsable_body())?;
        if root.as_object().is_none() {
            return Err(RequestError::body_not_object(&root));
        }
        let model = model(&root)?;
        let encoding = Encoding::for_model(model);
        let (input_tokens, max_output_tokens, stream) = match endpoint {
            Endpoint::ChatCompletions => {
                let input = chat::count_request(self, encoding, &root)?;
                let max_completion = output_budget(&root, "max_completion_tokens")?;
                let max_tokens = output_budget(&root, "max_tokens")?;
                (input, max_completion.or(max_tokens), stream(&root)?)
            }
            Endpoint::Completions => {
                let prompt = root
                    .field("prompt")
                    .ok_or_else(|| RequestError::missing("prompt"))?;
                let mut input = count_prompt(self, encoding, prompt, "prompt")?;
                // The suffix is text the model reads too (insert mode).
                match root.field("suffix") {
                    None => {}
                    Some(Json::Str(s)) => input += self.count(encoding, s),
                    Some(other) => {
                        return Err(RequestError::invalid_type("suffix", "a string", other))
                    }
                }
                (input, output_budget(&root, "max_tokens")?, stream(&root)?)
            }
            Endpoint::Embeddings => {
                let input = root
                    .field("input")
                    .ok_or_else(|| RequestError::missing("input"))?;
                (count_prompt(self, encoding, input, "input")?, None, false)
            }
            Endpoint::Responses => {
                let input = responses::count_request(self, encoding, &root)?;
                (
                    input,
                    output_budget(&root, "max_output_tokens")?,
                    stream(&root)?,
                )
            }
            Endpoint::Other => unreachable!("handled above"),
        };
        Ok(LlmRequest {
            endpoint,
            model: model.to_owned(),
            input_tokens,
            max_output_tokens: if endpoint.reserves_output() {
                max_output_tokens
            } else {
                None
            },
            reserves_output: endpoint.reserves_output(),
            stream,
        })
    }
}

fn model<'j>(root: &'j Json) -> Result<&'j str, RequestError> {
    match root.field("model") {
        None => Err(RequestError::missing("model")),
        Some(Json::Str(m)) if m.is_empty() => Err(RequestError {
            message: "you must provide a model parameter".to_owned(),
            param: Some("model".to_owned()),
        }),
        Some(Json::Str(m)) => Ok(m),
        Some(other) => Err(RequestError::invalid_type("model", "a string", other)),
    }
}

/// An output-token budget field: absent or null → `None`; otherwise an integer in
/// `0..=MAX_OUTPUT_TOKENS`.
fn output_budget(root: &Json, name: &str) -> Result<Option<u64>, RequestError> {
    match root.field(name) {
        None => Ok(None),
        Some(Json::UInt(n)) if *n <= MAX_OUTPUT_TOKENS => Ok(Some(*n)),
        Some(Json::UInt(n)) => Err(RequestError::invalid_value(
            name,
            &format!(
                "integer above maximum value. Expected a value <= {MAX_OUTPUT_TOKENS}, but got {n} instead."
            ),
        )),
        Some(Json::NegInt(n)) => Err(RequestError::invalid_value(
            name,
            &format!("integer below minimum value. Expected a value >= 0, but got {n} instead."),
        )),
        Some(other) => Err(RequestError::invalid_type(name, "an integer", other)),
    }
}

fn stream(root: &Json) -> Result<bool, RequestError> {
    match root.field("stream") {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(RequestError::invalid_type("stream", "a boolean", other)),
    }
}

/// A Completions `prompt` or an Embeddings `input`: a string, an array of strings, an array
/// of token ids, or an array of token-id arrays. Token arrays count as their length.
fn count_prompt(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    value: &Json,
    param: &str,
) -> Result<u64, RequestError> {
    const EXPECTED: &str =
        "a string, an array of strings, an array of integers, or an array of integer arrays";
    let items = match value {
        Json::Str(s) => return Ok(tokenizer.count(encoding, s)),
        Json::Array(items) => items,
        other => return Err(RequestError::invalid_type(param, EXPECTED, other)),
    };
    let Some(first) = items.first() else {
        return Ok(0);
    };
    let mut total = 0;
    for (i, item) in items.iter().enumerate() {
        // OpenAI rejects mixed forms; so do we, which also keeps the count well defined.
        let same_form = std::mem::discriminant(item) == std::mem::discriminant(first);
        match item {
            Json::Str(s) if same_form => total += tokenizer.count(encoding, s),
            Json::UInt(_) if same_form => total += 1,
            Json::Array(ids) if same_form => {
                for (j, id) in ids.iter().enumerate() {
                    if id.as_u64().is_none() {
                        return Err(RequestError::invalid_type(
                            format!("{param}[{i}][{j}]"),
                            "an integer",
                            id,
                        ));
                    }
                }
                total += ids.len() as u64;
            }
            other => {
                return Err(RequestError::invalid_type(
                    format!("{param}[{i}]"),
                    EXPECTED,
                    other,
                ))
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::tokens::tests::tokenizer;

    fn understand(endpoint: Endpoint, body: &str) -> Result<LlmRequest, RequestError> {
        tokenizer().understand(endpoint, body.as_bytes())
    }

    fn param_of(endpoint: Endpoint, body: &str) -> Option<String> {
        understand(endpoint, body).expect_err(body).param
    }

    #[test]
    fn other_endpoints_ignore_the_body() {
        let r = understand(Endpoint::Other, "not json at all").unwrap();
        assert_eq!(r.input_tokens, 0);
        assert_eq!(r.model, "");
        assert!(!r.reserves_output);
        assert_eq!(r.max_output_tokens, None);
    }

    #[test]
    fn body_must_be_a_json_object() {
        let e = understand(Endpoint::ChatCompletions, "{not json").unwrap_err();
        assert!(e
            .message
            .starts_with("We could not parse the JSON body of your request."));
        assert_eq!(e.param, None);
        let e = understand(Endpoint::Embeddings, "[1,2]").unwrap_err();
        assert_eq!(
            e.message,
            "Invalid type for request body: expected an object, but got an array instead."
        );
        assert!(understand(Endpoint::Completions, "").is_err());
    }

    #[test]
    fn model_is_required_and_a_nonempty_string() {
        let e = understand(Endpoint::Embeddings, r#"{"input":"x"}"#).unwrap_err();
        assert_eq!(e.message, "Missing required parameter: 'model'.");
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = understand(Endpoint::Embeddings, r#"{"model":7,"input":"x"}"#).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid type for 'model': expected a string, but got an integer instead."
        );
        assert_eq!(
            param_of(Endpoint::Embeddings, r#"{"model":"","input":"x"}"#).as_deref(),
            Some("model")
        );
    }

    #[test]
    fn output_budget_prefers_max_completion_tokens() {
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],
                       "max_tokens":100,"max_completion_tokens":50,"stream":true}"#;
        let r = understand(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(r.max_output_tokens, Some(50));
        assert!(r.stream && r.reserves_output);
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"max_completion_tokens":null}"#;
        assert_eq!(
            understand(Endpoint::ChatCompletions, body)
                .unwrap()
                .max_output_tokens,
            Some(100)
        );
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let r = understand(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!((r.max_output_tokens, r.stream), (None, false));
    }

    #[test]
    fn output_budget_must_be_a_sane_integer() {
        let chat = |extra: &str| {
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#)
        };
        let e = understand(Endpoint::ChatCompletions, &chat(r#""max_tokens":-5"#)).unwrap_err();
        assert_eq!(e.message, "Invalid 'max_tokens': integer below minimum value. Expected a value >= 0, but got -5 instead.");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = understand(
            Endpoint::ChatCompletions,
            &chat(r#""max_completion_tokens":16777217"#),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        assert!(e.message.contains("integer above maximum value"));
        let ok = understand(
            Endpoint::ChatCompletions,
            &chat(r#""max_completion_tokens":16777216"#),
        )
        .unwrap();
        assert_eq!(ok.max_output_tokens, Some(16_777_216));
        let e = understand(Endpoint::ChatCompletions, &chat(r#""max_tokens":1.5"#)).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid type for 'max_tokens': expected an integer, but got a decimal instead."
        );
        assert_eq!(
            param_of(Endpoint::ChatCompletions, &chat(r#""max_tokens":"10""#)).as_deref(),
            Some("max_tokens")
        );
        let e = understand(Endpoint::ChatCompletions, &chat(r#""stream":"yes""#)).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid type for 'stream': expected a boolean, but got a string instead."
        );
        let r = understand(
            Endpoint::Responses,
            r#"{"model":"gpt-4o","input":"hi","max_output_tokens":-1}"#,
        );
        assert_eq!(r.unwrap_err().param.as_deref(), Some("max_output_tokens"));
    }

    #[test]
    fn completions_count_every_prompt_form() {
        // API reference, "Create completion" example: "Say this is a test" reports
        // usage.prompt_tokens = 5. (The example predates cl100k; these five common words are
        // one token each in cl100k_base too.)
        let one =
            r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test","max_tokens":7}"#;
        let r = understand(Endpoint::Completions, one).unwrap();
        assert_eq!(r.input_tokens, 5);
        assert_eq!(r.max_output_tokens, Some(7));
        assert!(r.reserves_output);
        let cases = [
            (r#"["Say this is a test","Say this is a test"]"#, 10),
            ("[1,2,3]", 3),
            ("[[1,2],[3],[]]", 3),
            ("[]", 0),
            (r#""""#, 0),
        ];
        for (prompt, want) in cases {
            let body = format!(r#"{{"model":"gpt-3.5-turbo-instruct","prompt":{prompt}}}"#);
            assert_eq!(
                understand(Endpoint::Completions, &body)
                    .unwrap()
                    .input_tokens,
                want,
                "{prompt}"
            );
        }
        let with_suffix =
            r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this","suffix":" is a test"}"#;
        assert_eq!(
            understand(Endpoint::Completions, with_suffix)
                .unwrap()
                .input_tokens,
            5
        );
    }

    #[test]
    fn completions_reject_malformed_prompts() {
        let e = understand(Endpoint::Completions, r#"{"model":"davinci-002"}"#).unwrap_err();
        assert_eq!(e.message, "Missing required parameter: 'prompt'.");
        let p = |prompt: &str| {
            param_of(
                Endpoint::Completions,
                &format!(r#"{{"model":"davinci-002","prompt":{prompt}}}"#),
            )
        };
        assert_eq!(p("42").as_deref(), Some("prompt"));
        assert_eq!(p(r#"["a",1]"#).as_deref(), Some("prompt[1]"));
        assert_eq!(p("[[1,-2]]").as_deref(), Some("prompt[0][1]"));
        assert_eq!(p("[1.5]").as_deref(), Some("prompt[0]"));
    }

    #[test]
    fn embeddings_count_input_and_reserve_nothing() {
        // API reference, "Create embeddings" example: input "The food was delicious and the
        // waiter..." with text-embedding-ada-002 reports usage.prompt_tokens = 8.
        let body = r#"{"model":"text-embedding-ada-002","input":"The food was delicious and the waiter...","max_tokens":99,"stream":true}"#;
        let r = understand(Endpoint::Embeddings, body).unwrap();
        assert_eq!(r.input_tokens, 8);
        assert!(!r.reserves_output);
        assert_eq!(r.max_output_tokens, None);
        assert!(!r.stream);
        let body = r#"{"model":"text-embedding-3-small","input":[[5,6,7],[8]]}"#;
        assert_eq!(
            understand(Endpoint::Embeddings, body).unwrap().input_tokens,
            4
        );
        let e = understand(
            Endpoint::Embeddings,
            r#"{"model":"text-embedding-3-small","input":null}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
    }
}

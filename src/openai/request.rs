//! From a request body to an [`LlmRequest`]: validate what admission relies on, count the
//! input tokens, read the output budget and how many completions it buys. Chat and Responses inputs have their own files;
//! the fields every endpoint shares, and the simple Completions / Embeddings inputs, are here.

use super::chat::{self, ImageCost};
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
    /// How many completions the upstream generates, each up to the output budget: chat's
    /// `n`; for completions `max(n, best_of)` × the number of prompts (best_of's hidden
    /// candidates are billed too); 1 for responses, embeddings and [`Endpoint::Other`].
    /// Admission reserves `max_output_tokens.unwrap_or(default) × completions`
    /// (saturating): reserving one budget for `n: 8` would let 8× the output through.
    pub completions: u64,
    pub stream: bool,
}

/// OpenAI's maximum for `n` (chat and completions).
const MAX_N: u64 = 128;
/// OpenAI's maximum for completions' `best_of`.
const MAX_BEST_OF: u64 = 20;

/// The largest output budget we accept. No model comes near it; a bigger number is a
/// client bug, and would reserve a whole output limit for one request.
const MAX_OUTPUT_TOKENS: u64 = 16_777_216;

impl Tokenizer {
    /// Parses the body for its endpoint, validates it, counts input tokens. The model is
    /// the body's `model` (required); see [`Tokenizer::understand_with`] for Azure paths.
    ///
    /// [`Endpoint::Other`]: the body is ignored (it may be empty or not JSON), input tokens
    /// are 0, the model is empty and nothing is reserved.
    pub fn understand(&self, endpoint: Endpoint, body: &[u8]) -> Result<LlmRequest, RequestError> {
        self.understand_with(endpoint, body, None)
    }

    /// As [`Tokenizer::understand`], with the model given from outside: `model_hint` is the
    /// model of an Azure OpenAI deployment path (config `azure_deployments[deployment]`, else
    /// the deployment name). Azure routes by the path and ignores the body's `model`, so
    /// with a hint the body's `model` is optional and not read at all: the hint names the
    /// tokenizer and the model that is metered. An empty hint counts as none.
    pub fn understand_with(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        model_hint: Option<&str>,
    ) -> Result<LlmRequest, RequestError> {
        if endpoint == Endpoint::Other {
            return Ok(LlmRequest {
                endpoint,
                model: String::new(),
                input_tokens: 0,
                max_output_tokens: None,
                reserves_output: false,
                completions: 1,
                stream: false,
            });
        }
        let root = Json::parse(body).map_err(|_| RequestError::unparsable_body())?;
        if root.as_object().is_none() {
            return Err(RequestError::body_not_object(&root));
        }
        let model = match model_hint.filter(|m| !m.is_empty()) {
            Some(hint) => hint,
            None => model(&root)?,
        };
        let encoding = Encoding::for_model(model);
        let images = ImageCost::for_model(model);
        let (input_tokens, max_output_tokens, completions, stream) = match endpoint {
            Endpoint::ChatCompletions => {
                let input = chat::count_request(self, encoding, images, &root)?;
                let max_completion = output_budget(&root, "max_completion_tokens")?;
                let max_tokens = output_budget(&root, "max_tokens")?;
                let n = choice_count(&root, "n", MAX_N)?;
                (input, max_completion.or(max_tokens), n, stream(&root)?)
            }
            Endpoint::Completions => {
                let prompt = root
                    .field("prompt")
                    .ok_or_else(|| RequestError::missing("prompt"))?;
                let (mut input, prompts) = count_prompt(self, encoding, prompt, "prompt")?;
                // The suffix is text the model reads too (insert mode).
                match root.field("suffix") {
                    None => {}
                    Some(Json::Str(s)) => input += self.count(encoding, s),
                    Some(other) => {
                        return Err(RequestError::invalid_type("suffix", "a string", other))
                    }
                }
                let stream = stream(&root)?;
                let per_prompt = completions_per_prompt(&root, stream)?;
                let max_tokens = output_budget(&root, "max_tokens")?;
                (
                    input,
                    max_tokens,
                    per_prompt.saturating_mul(prompts),
                    stream,
                )
            }
            Endpoint::Embeddings => {
                let input = root
                    .field("input")
                    .ok_or_else(|| RequestError::missing("input"))?;
                let (tokens, _) = count_prompt(self, encoding, input, "input")?;
                (tokens, None, 1, false)
            }
            Endpoint::Responses => {
                let input = responses::count_request(self, encoding, images, &root)?;
                (
                    input,
                    output_budget(&root, "max_output_tokens")?,
                    1,
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
            completions,
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

/// A count of completions (`n`, `best_of`): absent or null → 1; otherwise an integer in
/// `1..=max`. A float such as `2.0` is refused like any non-integer: the safe reading.
fn choice_count(root: &Json, name: &str, max: u64) -> Result<u64, RequestError> {
    match root.field(name) {
        None => Ok(1),
        Some(Json::UInt(n)) if (1..=max).contains(n) => Ok(*n),
        Some(Json::UInt(n)) if *n > max => Err(RequestError::invalid_value(
            name,
            &format!(
                "integer above maximum value. Expected a value <= {max}, but got {n} instead."
            ),
        )),
        Some(Json::UInt(n)) => Err(below_one(name, *n as i64)),
        Some(Json::NegInt(n)) => Err(below_one(name, *n)),
        Some(other) => Err(RequestError::invalid_type(name, "an integer", other)),
    }
}

fn below_one(name: &str, n: i64) -> RequestError {
    RequestError::invalid_value(
        name,
        &format!("integer below minimum value. Expected a value >= 1, but got {n} instead."),
    )
}

/// Completions per prompt of a Completions request: `max(n, best_of)`, since the upstream
/// generates `best_of` candidates and bills them all. OpenAI requires `best_of >= n` and
/// does not stream `best_of` results; a stream would also hide the extra candidates from a
/// settlement that counts streamed text.
fn completions_per_prompt(root: &Json, stream: bool) -> Result<u64, RequestError> {
    let n = choice_count(root, "n", MAX_N)?;
    let best_of = match root.field("best_of") {
        None => None,
        Some(_) => Some(choice_count(root, "best_of", MAX_BEST_OF)?),
    };
    match best_of {
        None => Ok(n),
        Some(best_of) if best_of < n => Err(RequestError::invalid_value(
            "best_of",
            &format!(
                "must be greater than or equal to 'n'. Expected a value >= {n}, but got {best_of} instead."
            ),
        )),
        Some(best_of) if best_of > 1 && stream => Err(RequestError::invalid_value(
            "best_of",
            "cannot be used with 'stream'. Expected 1 or no value when streaming, but got a larger value instead.",
        )),
        Some(best_of) => Ok(best_of),
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
/// of token ids, or an array of token-id arrays. Returns its tokens (token arrays count as
/// their length) and how many prompts it holds: a string or one token array is one, an
/// array of strings or of token arrays one per element. An empty array is refused, as
/// OpenAI does: it would be a request for zero completions.
fn count_prompt(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    value: &Json,
    param: &str,
) -> Result<(u64, u64), RequestError> {
    const EXPECTED: &str =
        "a string, an array of strings, an array of integers, or an array of integer arrays";
    let items = match value {
        Json::Str(s) => return Ok((tokenizer.count(encoding, s), 1)),
        Json::Array(items) => items,
        other => return Err(RequestError::invalid_type(param, EXPECTED, other)),
    };
    let Some(first) = items.first() else {
        return Err(RequestError::invalid_value(
            param,
            "empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ));
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
    // An array of token ids is one prompt; any other array holds one prompt per element.
    let prompts = match first {
        Json::UInt(_) => 1,
        _ => items.len() as u64,
    };
    Ok((total, prompts))
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

    fn completions_of(endpoint: Endpoint, body: &str) -> u64 {
        understand(endpoint, body).expect(body).completions
    }

    #[test]
    fn chat_reserves_for_every_choice_it_asks_for() {
        let chat = |extra: &str| {
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
        };
        assert_eq!(completions_of(Endpoint::ChatCompletions, &chat("")), 1);
        assert_eq!(
            completions_of(Endpoint::ChatCompletions, &chat(r#","n":null"#)),
            1
        );
        let r = understand(
            Endpoint::ChatCompletions,
            &chat(r#","n":8,"max_tokens":100"#),
        )
        .unwrap();
        assert_eq!((r.completions, r.max_output_tokens), (8, Some(100)));
        assert_eq!(
            completions_of(Endpoint::ChatCompletions, &chat(r#","n":128"#)),
            128
        );
        let refused = [
            (r#","n":0"#, "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
            (r#","n":-1"#, "Invalid 'n': integer below minimum value. Expected a value >= 1, but got -1 instead."),
            (r#","n":129"#, "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead."),
            (r#","n":18446744073709551615"#, "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 18446744073709551615 instead."),
            (r#","n":1.5"#, "Invalid type for 'n': expected an integer, but got a decimal instead."),
            (r#","n":"2""#, "Invalid type for 'n': expected an integer, but got a string instead."),
            (r#","n":[2]"#, "Invalid type for 'n': expected an integer, but got an array instead."),
        ];
        for (extra, message) in refused {
            let e = understand(Endpoint::ChatCompletions, &chat(extra)).unwrap_err();
            assert_eq!(e.message, message, "{extra}");
            assert_eq!(e.param.as_deref(), Some("n"), "{extra}");
        }
    }

    #[test]
    fn completions_reserve_for_every_candidate_of_every_prompt() {
        let body = |prompt: &str, extra: &str| {
            format!(r#"{{"model":"gpt-3.5-turbo-instruct","prompt":{prompt}{extra}}}"#)
        };
        let cases = [
            (r#""one""#, "", 1),
            (r#""one""#, r#","n":3"#, 3),
            (r#""one""#, r#","best_of":5"#, 5),
            (r#""one""#, r#","n":2,"best_of":5"#, 5),
            (r#"["a","b"]"#, "", 2),
            (r#"["a","b"]"#, r#","best_of":3"#, 6),
            (r#"["a","b","c"]"#, r#","n":4,"best_of":null"#, 12),
            ("[1,2,3]", r#","n":2"#, 2),
            ("[[1,2],[3],[]]", r#","n":2,"best_of":2"#, 6),
            (r#""x""#, r#","best_of":1,"stream":true"#, 1),
            (r#""x""#, r#","n":3,"stream":true"#, 3),
            (r#"["x","y"]"#, r#","n":128"#, 256),
            (r#"["x","y"]"#, r#","n":20,"best_of":20"#, 40),
        ];
        for (prompt, extra, want) in cases {
            assert_eq!(
                completions_of(Endpoint::Completions, &body(prompt, extra)),
                want,
                "{prompt}{extra}"
            );
        }
        let refused = [
            ("[]", "", "prompt"),
            (r#""x""#, r#","n":0"#, "n"),
            (r#""x""#, r#","n":"2""#, "n"),
            (r#""x""#, r#","best_of":0"#, "best_of"),
            (r#""x""#, r#","best_of":-3"#, "best_of"),
            (r#""x""#, r#","best_of":21"#, "best_of"),
            (r#""x""#, r#","best_of":2.5"#, "best_of"),
            (r#""x""#, r#","n":3,"best_of":2"#, "best_of"),
            (r#""x""#, r#","n":2,"best_of":3,"stream":true"#, "best_of"),
            (r#"["a",[1]]"#, "", "prompt[1]"),
            (r#"[[1],"a"]"#, "", "prompt[1]"),
            (r#"[1,[2]]"#, "", "prompt[1]"),
            (r#"[true]"#, "", "prompt[0]"),
            (r#"[{"text":"a"}]"#, "", "prompt[0]"),
        ];
        for (prompt, extra, param) in refused {
            let e = understand(Endpoint::Completions, &body(prompt, extra)).expect_err(prompt);
            assert_eq!(
                e.param.as_deref(),
                Some(param),
                "{prompt}{extra}: {}",
                e.message
            );
        }
        let e = understand(Endpoint::Completions, &body("[]", "")).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an empty array instead."
        );
        let e = understand(
            Endpoint::Completions,
            &body(r#""x""#, r#","n":3,"best_of":2"#),
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "Invalid 'best_of': must be greater than or equal to 'n'. Expected a value >= 3, but got 2 instead."
        );
    }

    #[test]
    fn other_apis_ask_for_one_completion() {
        let cases = [
            (
                Endpoint::Responses,
                r#"{"model":"gpt-4o","input":"hi","n":5}"#,
            ),
            (
                Endpoint::Embeddings,
                r#"{"model":"text-embedding-3-small","input":["a","b"],"n":5}"#,
            ),
            (Endpoint::Other, "anything"),
        ];
        for (endpoint, body) in cases {
            assert_eq!(completions_of(endpoint, body), 1, "{body}");
        }
        let e = understand(
            Endpoint::Embeddings,
            r#"{"model":"text-embedding-3-small","input":[]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
    }

    #[test]
    fn a_model_hint_replaces_the_bodys_model() {
        let t = tokenizer();
        // Azure bodies carry no model: with a hint that is fine, without one it is not.
        let azure = r#"{"messages":[{"role":"user","content":"Hello there, tokenizer"}]}"#;
        let r = t
            .understand_with(Endpoint::ChatCompletions, azure.as_bytes(), Some("gpt-4"))
            .unwrap();
        assert_eq!(r.model, "gpt-4");
        let openai =
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"Hello there, tokenizer"}]}"#;
        assert_eq!(r, understand(Endpoint::ChatCompletions, openai).unwrap());
        assert_eq!(
            param_of(Endpoint::ChatCompletions, azure).as_deref(),
            Some("model")
        );
        // The hint wins over the body's model (Azure ignores it), whatever its type.
        for body_model in [r#""gpt-4o""#, "7", r#""""#] {
            let body = format!(r#"{{"model":{body_model},"prompt":"x"}}"#);
            let r = t
                .understand_with(Endpoint::Completions, body.as_bytes(), Some("prod-deploy"))
                .unwrap();
            assert_eq!(r.model, "prod-deploy", "{body_model}");
        }
        // An empty hint is no hint.
        let r = t.understand_with(
            Endpoint::Embeddings,
            br#"{"model":"m","input":"x"}"#,
            Some(""),
        );
        assert_eq!(r.unwrap().model, "m");
        // The hint picks the tokenizer: a cl100k model counts this text differently.
        let text = r#"{"input":"Bonjour tout le monde, ceci est un test"}"#;
        let counts: Vec<u64> = ["gpt-4o", "gpt-4"]
            .iter()
            .map(|m| {
                t.understand_with(Endpoint::Embeddings, text.as_bytes(), Some(m))
                    .unwrap()
                    .input_tokens
            })
            .collect();
        let direct = |m: &str| {
            t.count(
                Encoding::for_model(m),
                "Bonjour tout le monde, ceci est un test",
            )
        };
        assert_eq!(counts, vec![direct("gpt-4o"), direct("gpt-4")]);
    }
}

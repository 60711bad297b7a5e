//! Responses API input tokens.
//!
//! OpenAI publishes no token formula for the Responses API. Its input items are rendered
//! into the same chat format, so we apply the Chat Completions accounting to them: each
//! message-like item costs [`TOKENS_PER_MESSAGE`] plus its role and content, `instructions`
//! count as one system message, and the reply is primed once. This is an estimate that
//! equals the chat count for the same conversation.

use super::chat::{
    count_call, count_format, count_parts, count_tools, ImageCost, REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
};
use super::error::RequestError;
use super::json::Json;
use super::tokens::{Encoding, Tokenizer};

const ROLES: [&str; 4] = ["user", "assistant", "system", "developer"];
const ROLES_SUPPORTED: &str = "'assistant', 'system', 'developer', and 'user'";

pub(crate) fn count_request(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    images: ImageCost,
    root: &Json,
) -> Result<u64, RequestError> {
    let mut total = REPLY_PRIMING;
    match root.field("instructions") {
        None => {}
        Some(Json::Str(text)) => total += message(tokenizer, encoding, "system", text),
        Some(other) => {
            return Err(RequestError::invalid_type(
                "instructions",
                "a string",
                other,
            ))
        }
    }
    match root.field("input") {
        // A request may continue a stored conversation or use a stored prompt instead of
        // sending input; those tokens live upstream and cannot be counted here.
        None if ["prompt", "previous_response_id", "conversation"]
            .iter()
            .any(|k| root.field(k).is_some()) => {}
        None => return Err(RequestError::missing("input")),
        Some(Json::Str(text)) => total += message(tokenizer, encoding, "user", text),
        Some(Json::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                total += count_item(tokenizer, encoding, images, i, item)?;
            }
        }
        Some(other) => {
            return Err(RequestError::invalid_type(
                "input",
                "a string or an array",
                other,
            ))
        }
    }
    if let Some(tools) = root.field("tools") {
        total += count_tools(tokenizer, encoding, tools, "tools")?;
    }
    // A stored prompt's own text lives upstream, but the variables substituted into it
    // are here: strings, or input items (text, images, files).
    // (Each value apart: a variable may be called `id` or `url`.)
    let variables = root.field("prompt").and_then(|p| p.field("variables"));
    for (_, value) in variables.and_then(Json::as_object).unwrap_or_default() {
        total += item_text(tokenizer, encoding, images, value);
    }
    // Structured outputs: `text.format` holds the schema itself (name, schema, ...).
    total += count_format(
        tokenizer,
        encoding,
        root.field("text").and_then(|t| t.field("format")),
    );
    Ok(total)
}

fn message(tokenizer: &Tokenizer, encoding: Encoding, role: &str, text: &str) -> u64 {
    TOKENS_PER_MESSAGE + tokenizer.count(encoding, role) + tokenizer.count(encoding, text)
}

/// One input item. Messages (with or without `"type":"message"`), function calls and their
/// outputs are counted as chat counts them; every other item counts the text it holds
/// ([`item_text`]); an item reference counts nothing (the item is stored upstream).
fn count_item(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    images: ImageCost,
    i: usize,
    item: &Json,
) -> Result<u64, RequestError> {
    if item.as_object().is_none() {
        return Err(RequestError::invalid_type(
            format!("input[{i}]"),
            "an object",
            item,
        ));
    }
    let kind = item.field("type").and_then(Json::as_str);
    match kind {
        None | Some("message") => {
            let role = match item.field("role") {
                None => return Err(RequestError::missing(format!("input[{i}].role"))),
                Some(Json::Str(role)) if ROLES.contains(&role.as_ref()) => role,
                Some(Json::Str(role)) => {
                    return Err(RequestError::unsupported_value(
                        format!("input[{i}].role"),
                        role,
                        ROLES_SUPPORTED,
                    ))
                }
                Some(other) => {
                    return Err(RequestError::invalid_type(
                        format!("input[{i}].role"),
                        "a string",
                        other,
                    ))
                }
            };
            let content = match item.field("content") {
                None => return Err(RequestError::missing(format!("input[{i}].content"))),
                Some(Json::Str(text)) => tokenizer.count(encoding, text),
                Some(Json::Array(parts)) => {
                    count_parts(tokenizer, encoding, images, parts, &|| {
                        format!("input[{i}].content")
                    })?
                }
                Some(other) => {
                    return Err(RequestError::invalid_type(
                        format!("input[{i}].content"),
                        "a string or an array",
                        other,
                    ))
                }
            };
            Ok(TOKENS_PER_MESSAGE + tokenizer.count(encoding, role) + content)
        }
        Some("function_call" | "custom_tool_call") => {
            Ok(TOKENS_PER_MESSAGE + count_call(tokenizer, encoding, item))
        }
        Some("function_call_output" | "custom_tool_call_output") => {
            let output = match item.field("output") {
                Some(Json::Str(text)) => tokenizer.count(encoding, text),
                Some(Json::Array(parts)) => {
                    count_parts(tokenizer, encoding, images, parts, &|| {
                        format!("input[{i}].output")
                    })?
                }
                _ => 0,
            };
            Ok(TOKENS_PER_MESSAGE + output)
        }
        // Every other item (shell, MCP, computer, search, code-interpreter calls and their
        // outputs, reasoning summaries, items of types added later): what text it holds
        // is put before the model, so it is counted. An item reference points at a
        // stored item the limiter cannot see.
        Some("item_reference") => Ok(0),
        Some(_) => Ok(match item_text(tokenizer, encoding, images, item) {
            0 => 0,
            text => TOKENS_PER_MESSAGE + text,
        }),
    }
}

/// Members of an item that name or point at something rather than hold text the model
/// reads: identifiers, states, and media (an image counts as one, below; a data URL's
/// base64 is not text). `encrypted_content` is a reasoning item's hidden reasoning, which
/// OpenAI may drop from the context: not counted (its size says little about its tokens).
const NOT_TEXT: [&str; 10] = [
    "type",
    "id",
    "call_id",
    "status",
    "encrypted_content",
    "image_url",
    "file_data",
    "file_id",
    "file_url",
    "url",
];

/// The text of an item of a type [`count_item`] does not model: every string under it
/// but [`NOT_TEXT`] members, and an image's cost for each image or screenshot in it.
fn item_text(tokenizer: &Tokenizer, encoding: Encoding, images: ImageCost, value: &Json) -> u64 {
    match value {
        Json::Str(text) => tokenizer.count(encoding, text),
        Json::Array(items) => items
            .iter()
            .map(|item| item_text(tokenizer, encoding, images, item))
            .sum(),
        Json::Object(members) => {
            let image = match value.field("type").and_then(Json::as_str) {
                Some("input_image" | "computer_screenshot") => images.tokens(value.field("detail")),
                _ => 0,
            };
            image
                + members
                    .iter()
                    .filter(|(key, _)| !NOT_TEXT.contains(&key.as_ref()))
                    .map(|(_, v)| item_text(tokenizer, encoding, images, v))
                    .sum::<u64>()
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use crate::openai::endpoint::Endpoint;
    use crate::openai::tokens::tests::tokenizer;
    use crate::openai::{LlmRequest, RequestError};

    fn responses(body: &str) -> Result<LlmRequest, RequestError> {
        tokenizer().understand(Endpoint::Responses, body.as_bytes())
    }

    #[test]
    fn string_input_counts_like_one_user_message() {
        let r = responses(
            r#"{"model":"gpt-4o","input":"hello world","max_output_tokens":64,"stream":true}"#,
        )
        .unwrap();
        // 3 (message) + 1 ("user") + 2 ("hello", " world") + 3 (priming)
        assert_eq!(r.input_tokens, 9);
        assert_eq!(r.max_output_tokens, Some(64));
        assert!(r.reserves_output && r.stream);
    }

    #[test]
    fn responses_and_chat_agree_on_the_same_conversation() {
        let chat = r#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":"hello world"},
            {"role":"assistant","content":"hi"}]}"#;
        let resp = r#"{"model":"gpt-4o","instructions":"Be brief.","input":[
            {"role":"user","content":[{"type":"input_text","text":"hello world"}]},
            {"type":"message","role":"assistant","content":[{"type":"output_text","text":"hi"}]}]}"#;
        let chat = tokenizer()
            .understand(Endpoint::ChatCompletions, chat.as_bytes())
            .unwrap();
        let resp = responses(resp).unwrap();
        assert_eq!(resp.input_tokens, chat.input_tokens);
        // 3 + 1 + 3 ("Be", " brief", ".") | 3 + 1 + 2 | 3 + 1 + 1 | 3
        assert_eq!(resp.input_tokens, 21);
    }

    #[test]
    fn function_items_and_flat_tools_are_counted() {
        let t = tokenizer();
        let body = r#"{"model":"gpt-4o","input":[
            {"type":"function_call","call_id":"c1","name":"get_weather","arguments":"{}"},
            {"type":"function_call_output","call_id":"c1","output":"sunny"},
            {"type":"reasoning","summary":[]}],
            "tools":[{"type":"function","name":"get_weather","description":"Weather.","parameters":{"type":"object","properties":{}}},
                     {"type":"web_search"}]}"#;
        let want = 3
            + t.count_text("gpt-4o", "get_weather")
            + t.count_text("gpt-4o", "{}")
            + 3
            + t.count_text("gpt-4o", "sunny")
            + 3
            + 7
            + t.count_text("gpt-4o", "get_weather:Weather")
            + 12;
        assert_eq!(responses(body).unwrap().input_tokens, want);
    }

    #[test]
    fn text_in_any_input_item_is_counted() {
        let t = tokenizer();
        let text = "secret".to_owned() + &" word".repeat(999);
        assert_eq!(t.count_text("gpt-4o", &text), 1000);
        let items = [
            format!(
                r#"{{"type":"local_shell_call_output","id":"x","call_id":"c","output":"{text}"}}"#
            ),
            format!(
                r#"{{"type":"mcp_call","id":"x","server_label":"s","name":"n","arguments":"{{}}","output":"{text}"}}"#
            ),
            format!(
                r#"{{"type":"reasoning","id":"rs_1","summary":[{{"type":"summary_text","text":"{text}"}}],"encrypted_content":"gAAAA"}}"#
            ),
            format!(r#"{{"type":"some_future_item","payload":{{"deep":["{text}"]}}}}"#),
        ];
        for item in items {
            let body = format!(r#"{{"model":"gpt-4o","input":[{item}]}}"#);
            let counted = responses(&body).unwrap().input_tokens;
            assert!(counted >= 1000, "{counted}: {}", &item[..60]);
        }
        // Identifiers, encrypted reasoning and media data are not text.
        let opaque = r#"{"model":"gpt-4o","input":[{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":"gAAAAABoZXhhbXBsZQ=="},{"type":"item_reference","id":"msg_1"}]}"#;
        assert_eq!(responses(opaque).unwrap().input_tokens, 3);
        let screenshot = r#"{"model":"gpt-4o","input":[{"type":"computer_call_output","call_id":"c","output":{"type":"computer_screenshot","image_url":"data:image/png;base64,iVBORw0KGgo="}}]}"#;
        assert_eq!(responses(screenshot).unwrap().input_tokens, 3 + 3 + 765);
    }

    #[test]
    fn a_stored_prompts_variables_are_counted() {
        let text = "secret".to_owned() + &" word".repeat(999);
        let body = format!(
            r#"{{"model":"gpt-4o","prompt":{{"id":"pmpt_1","version":"2","variables":{{"url":"{text}","doc":{{"type":"input_text","text":"{text}"}}}}}}}}"#
        );
        assert!(responses(&body).unwrap().input_tokens >= 3 + 2000);
    }

    #[test]
    fn a_text_format_schema_is_counted() {
        let text = "secret".to_owned() + &" word".repeat(999);
        let base =
            responses(r#"{"model":"gpt-4o","input":"hi","text":{"format":{"type":"text"}}}"#)
                .unwrap()
                .input_tokens;
        assert_eq!(
            base,
            responses(r#"{"model":"gpt-4o","input":"hi"}"#)
                .unwrap()
                .input_tokens
        );
        let body = format!(
            r#"{{"model":"gpt-4o","input":"hi","text":{{"format":{{"type":"json_schema","name":"s","strict":true,"schema":{{"type":"object","description":"{text}"}}}}}}}}"#
        );
        assert!(responses(&body).unwrap().input_tokens >= base + 1000);
    }

    #[test]
    fn input_is_validated() {
        let e = responses(r#"{"model":"gpt-4o"}"#).unwrap_err();
        assert_eq!(e.message, "Missing required parameter: 'input'.");
        assert!(responses(r#"{"model":"gpt-4o","previous_response_id":"resp_1"}"#).is_ok());
        let param = |body: &str| responses(body).expect_err(body).param;
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":3}"#).as_deref(),
            Some("input")
        );
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":[7]}"#).as_deref(),
            Some("input[0]")
        );
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":[{"content":"x"}]}"#).as_deref(),
            Some("input[0].role")
        );
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":[{"role":"tool","content":"x"}]}"#).as_deref(),
            Some("input[0].role")
        );
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":[{"role":"user"}]}"#).as_deref(),
            Some("input[0].content")
        );
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":[{"role":"user","content":[{"type":"input_text","text":1}]}]}"#).as_deref(),
            Some("input[0].content[0].text")
        );
        assert_eq!(
            param(r#"{"model":"gpt-4o","input":"x","instructions":[]}"#).as_deref(),
            Some("instructions")
        );
    }
}

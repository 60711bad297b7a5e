//! Chat Completions input tokens, counted the way OpenAI bills them.
//!
//! The rules are the ones published in the OpenAI cookbook "How to count tokens with
//! tiktoken" (`num_tokens_from_messages`, `num_tokens_for_tools`): every message costs
//! [`TOKENS_PER_MESSAGE`] plus the tokens of each of its string fields, a `name` costs
//! [`TOKENS_PER_NAME`] more, the reply is primed with [`REPLY_PRIMING`] tokens, and tool
//! definitions follow the cookbook's per-function / per-property formula. The Responses API
//! reuses the pieces ([`count_parts`], [`count_tools`]) for its own input items.

use super::error::RequestError;
use super::json::Json;
use super::tokens::{Encoding, Tokenizer};

/// `<|start|>{role/name}\n{content}<|end|>\n` framing of each message.
pub(crate) const TOKENS_PER_MESSAGE: u64 = 3;
pub(crate) const TOKENS_PER_NAME: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
pub(crate) const REPLY_PRIMING: u64 = 3;

/// What one image costs a model, per OpenAI's vision docs ("Calculating costs"). The
/// real figure depends on the image's size, which we cannot know without fetching and
/// decoding it, so `high`/`auto` detail is charged the documented cost of a 1024×1024
/// image, a fixed estimate; `low` detail is the model's fixed base cost.
///
/// - Tile models: base + tile × 512 px tiles (4 for 1024×1024). gpt-4o, gpt-4.1 and the
///   rest: 85 + 4 × 170 = 765 (o-series and gpt-5 cost a little less; they are charged
///   this too). gpt-4o-mini bills images at about 33× those tokens: 2,833 + 4 × 5,667.
/// - Patch models (gpt-4.1-mini/-nano, gpt-5-mini/-nano, o4-mini): 32 px patches
///   (1,024 for 1024×1024) times a per-model multiplier; charged so whatever the detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ImageCost {
    low: u64,
    high: u64,
}

impl ImageCost {
    const TILES: ImageCost = ImageCost {
        low: 85,
        high: 85 + 4 * 170,
    };
    const GPT_4O_MINI: ImageCost = ImageCost {
        low: 2833,
        high: 2833 + 4 * 5667,
    };

    /// 1,024 patches × `multiplier` / 100, rounded up.
    const fn patches(multiplier: u64) -> ImageCost {
        let tokens = (1024 * multiplier).div_ceil(100);
        ImageCost {
            low: tokens,
            high: tokens,
        }
    }

    pub(crate) fn for_model(model: &str) -> ImageCost {
        // As for the encoding: a fine-tune costs what its base model does, a provider
        // prefix is ignored.
        let model = match model.strip_prefix("ft:") {
            Some(rest) => rest.split(':').next().unwrap_or_default(),
            None => model,
        };
        let model = model.rsplit('/').next().unwrap_or_default();
        const TABLE: [(&str, ImageCost); 6] = [
            ("gpt-4o-mini", ImageCost::GPT_4O_MINI),
            ("gpt-4.1-mini", ImageCost::patches(162)),
            ("gpt-5-mini", ImageCost::patches(162)),
            ("gpt-4.1-nano", ImageCost::patches(246)),
            ("gpt-5-nano", ImageCost::patches(246)),
            ("o4-mini", ImageCost::patches(172)),
        ];
        TABLE
            .iter()
            .find(|(prefix, _)| model.starts_with(prefix))
            .map_or(ImageCost::TILES, |&(_, cost)| cost)
    }

    pub(crate) fn tokens(self, detail: Option<&Json>) -> u64 {
        match detail.and_then(Json::as_str) {
            Some("low") => self.low,
            _ => self.high,
        }
    }
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const ROLES_SUPPORTED: &str = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'";

/// Input tokens of a chat request: its `messages`, plus `tools` and legacy `functions`.
pub(crate) fn count_request(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    images: ImageCost,
    root: &Json,
) -> Result<u64, RequestError> {
    let messages = match root.field("messages") {
        None => return Err(RequestError::missing("messages")),
        Some(Json::Array(items)) => items,
        Some(other) => return Err(RequestError::invalid_type("messages", "an array", other)),
    };
    if messages.is_empty() {
        return Err(RequestError::invalid_value(
            "messages",
            "empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ));
    }
    let mut total = REPLY_PRIMING;
    for (i, message) in messages.iter().enumerate() {
        total += count_message(tokenizer, encoding, images, i, message)?;
    }
    for param in ["tools", "functions"] {
        if let Some(tools) = root.field(param) {
            total += count_tools(tokenizer, encoding, tools, param)?;
        }
    }
    // Structured outputs: the schema is put in front of the model too.
    if let Some(format) = root.field("response_format") {
        total += count_format(tokenizer, encoding, format.field("json_schema"));
    }
    // Not OpenAI's, but OpenAI-compatible servers put them in the prompt: vLLM renders
    // `documents` (RAG) through the chat template, TensorRT-LLM takes `prompt_token_ids`
    // as the tokenized prompt.
    if let Some(documents) = root.field("documents") {
        total += schema_text(tokenizer, encoding, documents);
    }
    if let Some(ids) = root.field("prompt_token_ids").and_then(Json::as_array) {
        total += ids.len() as u64;
    }
    Ok(total)
}

/// A structured-output format (Chat's `response_format.json_schema`, Responses'
/// `text.format`): its name, description and schema are rendered into the prompt, in a
/// form OpenAI does not document, so every key and value they hold is counted (see
/// [`schema_text`]). `strict` and `type` are switches, not text.
pub(crate) fn count_format(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    format: Option<&Json>,
) -> u64 {
    let members = format.and_then(Json::as_object).unwrap_or_default();
    members
        .iter()
        .filter(|(key, _)| !matches!(key.as_ref(), "strict" | "type"))
        .map(|(_, value)| schema_text(tokenizer, encoding, value))
        .sum()
}

/// Every key and scalar value of a JSON subtree, each counted as text: a lower bound on
/// what rendering it into the prompt costs, whatever the rendering. Used for the parts of
/// a schema the cookbook formula does not cover, so no text the upstream reads is free.
fn schema_text(tokenizer: &Tokenizer, encoding: Encoding, value: &Json) -> u64 {
    match value {
        Json::Array(items) => items
            .iter()
            .map(|item| schema_text(tokenizer, encoding, item))
            .sum(),
        Json::Object(members) => members
            .iter()
            .map(|(key, value)| {
                tokenizer.count(encoding, key) + schema_text(tokenizer, encoding, value)
            })
            .sum(),
        scalar => scalar_tokens(tokenizer, encoding, scalar),
    }
}

fn count_message(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    images: ImageCost,
    i: usize,
    message: &Json,
) -> Result<u64, RequestError> {
    let Some(members) = message.as_object() else {
        return Err(RequestError::invalid_type(
            format!("messages[{i}]"),
            "an object",
            message,
        ));
    };
    match message.field("role") {
        None => return Err(RequestError::missing(format!("messages[{i}].role"))),
        Some(Json::Str(role)) if ROLES.contains(&role.as_ref()) => {}
        Some(Json::Str(role)) => {
            return Err(RequestError::unsupported_value(
                format!("messages[{i}].role"),
                role,
                ROLES_SUPPORTED,
            ))
        }
        Some(other) => {
            return Err(RequestError::invalid_type(
                format!("messages[{i}].role"),
                "a string",
                other,
            ))
        }
    }
    let mut total = TOKENS_PER_MESSAGE;
    for (key, value) in members {
        total += match (key.as_ref(), value) {
            ("content", content) => count_content(tokenizer, encoding, images, content, &|| {
                format!("messages[{i}].content")
            })?,
            ("name", Json::Str(name)) => tokenizer.count(encoding, name) + TOKENS_PER_NAME,
            ("name", Json::Null) => 0,
            ("name", other) => {
                return Err(RequestError::invalid_type(
                    format!("messages[{i}].name"),
                    "a string",
                    other,
                ))
            }
            ("tool_calls", calls) => count_tool_calls(tokenizer, encoding, calls, i)?,
            ("function_call", call) => count_call(tokenizer, encoding, call),
            // Every other string field (role, tool_call_id, refusal, ...) is text the model
            // reads, as in the cookbook's loop over the message's values.
            (_, Json::Str(text)) => tokenizer.count(encoding, text),
            // Non-string fields (e.g. an `audio` reference) carry no text we can count.
            _ => 0,
        };
    }
    Ok(total)
}

/// Message content: a string, `null` (assistant messages with tool calls), or an array of
/// parts (see [`count_parts`]).
fn count_content(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    images: ImageCost,
    content: &Json,
    param: &dyn Fn() -> String,
) -> Result<u64, RequestError> {
    match content {
        Json::Null => Ok(0),
        Json::Str(text) => Ok(tokenizer.count(encoding, text)),
        Json::Array(parts) => count_parts(tokenizer, encoding, images, parts, param),
        other => Err(RequestError::invalid_type(
            param(),
            "a string or an array",
            other,
        )),
    }
}

/// Content parts of Chat (`text`, `image_url`, `refusal`, ...) and Responses (`input_text`,
/// `output_text`, `input_image`, ...). Text parts count their text, summed with no joiner
/// or per-part framing: an approximation, as OpenAI does not document how parts are joined
/// (one text part counts exactly like a string content). Images use the vision rule above. Audio and file parts are not counted: their token cost depends on
/// decoding the media, which the limiter does not do.
pub(crate) fn count_parts(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    images: ImageCost,
    parts: &[Json],
    param: &dyn Fn() -> String,
) -> Result<u64, RequestError> {
    let mut total = 0;
    for (j, part) in parts.iter().enumerate() {
        if part.as_object().is_none() {
            return Err(RequestError::invalid_type(
                format!("{}[{j}]", param()),
                "an object",
                part,
            ));
        }
        let kind = match part.field("type") {
            None => return Err(RequestError::missing(format!("{}[{j}].type", param()))),
            Some(Json::Str(kind)) => kind.as_ref(),
            Some(other) => {
                return Err(RequestError::invalid_type(
                    format!("{}[{j}].type", param()),
                    "a string",
                    other,
                ))
            }
        };
        total += match kind {
            "text" | "input_text" | "output_text" => match part.field("text") {
                Some(Json::Str(text)) => tokenizer.count(encoding, text),
                None => return Err(RequestError::missing(format!("{}[{j}].text", param()))),
                Some(other) => {
                    return Err(RequestError::invalid_type(
                        format!("{}[{j}].text", param()),
                        "a string",
                        other,
                    ))
                }
            },
            "refusal" => part
                .field("refusal")
                .and_then(Json::as_str)
                .map_or(0, |t| tokenizer.count(encoding, t)),
            "image_url" => images.tokens(part.field("image_url").and_then(|i| i.field("detail"))),
            "input_image" => images.tokens(part.field("detail")),
            _ => 0,
        };
    }
    Ok(total)
}

/// An assistant message's earlier tool calls. An approximation: OpenAI does not document how
/// it renders them, so we count the text that must be in the prompt — each function's name
/// and its arguments — and no framing.
fn count_tool_calls(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    calls: &Json,
    i: usize,
) -> Result<u64, RequestError> {
    match calls {
        Json::Null => Ok(0),
        Json::Array(calls) => Ok(calls
            .iter()
            .map(|call| {
                // `function` tool calls carry name + arguments; `custom` ones name + input.
                let body = call.field("function").or_else(|| call.field("custom"));
                body.map_or(0, |b| count_call(tokenizer, encoding, b))
            })
            .sum()),
        other => Err(RequestError::invalid_type(
            format!("messages[{i}].tool_calls"),
            "an array",
            other,
        )),
    }
}

/// Name plus arguments (or custom-tool input) of one call. Same approximation as above.
pub(crate) fn count_call(tokenizer: &Tokenizer, encoding: Encoding, call: &Json) -> u64 {
    ["name", "arguments", "input"]
        .iter()
        .filter_map(|key| call.field(key).and_then(Json::as_str))
        .map(|text| tokenizer.count(encoding, text))
        .sum()
}

/// Constants of the cookbook's `num_tokens_for_tools`. They were measured against the API
/// for gpt-4o / gpt-4o-mini (o200k) and gpt-3.5-turbo / gpt-4 (cl100k); other models of the
/// same encoding get the same constants.
struct ToolsOverhead {
    func_init: u64,
    prop_init: u64,
    prop_key: u64,
    /// The cookbook's `enum_init` is -3; it always follows a `prop_key` (+3), so we apply it
    /// as a discount on that property and never go below zero.
    enum_discount: u64,
    enum_item: u64,
    func_end: u64,
}

impl ToolsOverhead {
    fn for_encoding(encoding: Encoding) -> ToolsOverhead {
        let func_init = match encoding {
            Encoding::O200k => 7,
            Encoding::Cl100k => 10,
        };
        ToolsOverhead {
            func_init,
            prop_init: 3,
            prop_key: 3,
            enum_discount: 3,
            enum_item: 3,
            func_end: 12,
        }
    }
}

/// Tokens of tool definitions, by the cookbook formula: per function `func_init` plus
/// `name:description` (one trailing period dropped); if it has properties, `prop_init` and
/// per property `prop_key` plus `key:type:description`, and for an enum `enum_item` plus
/// the tokens of each value (minus the enum discount); `func_end` once for the list.
///
/// Accepts Chat tools (`{"type":"function","function":{...}}`), legacy `functions`
/// (the function objects themselves) and Responses tools (flat `{"type":"function",
/// "name":...}`). Built-in tools without a name (web search, ...) are skipped.
///
/// The cookbook formula reads only each property's type, description and enum; the
/// upstream renders the whole schema. So everything else — nested `properties`, `items`,
/// `anyOf`, `$defs`, defaults, a custom tool's grammar `format` — is counted on top, key by
/// key and value by value ([`schema_text`]): a flat tool (every example OpenAI measured)
/// costs exactly the formula, and a deep one can no longer hide a prompt in a nested
/// description.
pub(crate) fn count_tools(
    tokenizer: &Tokenizer,
    encoding: Encoding,
    tools: &Json,
    param: &str,
) -> Result<u64, RequestError> {
    let tools = match tools {
        Json::Null => return Ok(0),
        Json::Array(tools) => tools,
        other => return Err(RequestError::invalid_type(param, "an array", other)),
    };
    let k = ToolsOverhead::for_encoding(encoding);
    let mut total = 0;
    let mut functions = 0;
    let mut line = String::new();
    for (i, tool) in tools.iter().enumerate() {
        if tool.as_object().is_none() {
            return Err(RequestError::invalid_type(
                format!("{param}[{i}]"),
                "an object",
                tool,
            ));
        }
        let function = tool
            .field("function")
            .or_else(|| tool.field("custom"))
            .unwrap_or(tool);
        let Some(name) = function.field("name").and_then(Json::as_str) else {
            continue;
        };
        functions += 1;
        let description = function
            .field("description")
            .and_then(Json::as_str)
            .unwrap_or_default();
        line.clear();
        line.push_str(name);
        line.push(':');
        line.push_str(description.strip_suffix('.').unwrap_or(description));
        total += k.func_init + tokenizer.count(encoding, &line);
        // What the formula does not read: the function's other members (a custom tool's
        // `format`), and the parameters' members but `type`, `properties` and `required`.
        total += extra_members(
            tokenizer,
            encoding,
            function,
            &["name", "description", "parameters", "strict", "type"],
        );
        let parameters = function.field("parameters");
        if let Some(parameters) = parameters {
            total += extra_members(
                tokenizer,
                encoding,
                parameters,
                &["type", "properties", "required", "additionalProperties"],
            );
        }

        let properties = parameters
            .and_then(|p| p.field("properties"))
            .and_then(Json::as_object)
            .unwrap_or_default();
        if properties.is_empty() {
            continue;
        }
        total += k.prop_init;
        for (key, schema) in properties {
            let mut cost = k.prop_key;
            if let Some(values) = schema.field("enum").and_then(Json::as_array) {
                cost -= k.enum_discount;
                for value in values {
                    cost += k.enum_item + scalar_tokens(tokenizer, encoding, value);
                }
            }
            let p_type = schema
                .field("type")
                .and_then(Json::as_str)
                .unwrap_or_default();
            let p_desc = schema
                .field("description")
                .and_then(Json::as_str)
                .unwrap_or_default();
            line.clear();
            line.push_str(key);
            line.push(':');
            line.push_str(p_type);
            line.push(':');
            line.push_str(p_desc.strip_suffix('.').unwrap_or(p_desc));
            total += cost + tokenizer.count(encoding, &line);
            total += extra_members(
                tokenizer,
                encoding,
                schema,
                &["type", "description", "enum"],
            );
        }
    }
    if functions > 0 {
        total += k.func_end;
    }
    Ok(total)
}

/// [`schema_text`] of an object's members other than `read` (those the formula counts).
/// Not an object: nothing (a malformed schema is the upstream's to refuse).
fn extra_members(tokenizer: &Tokenizer, encoding: Encoding, object: &Json, read: &[&str]) -> u64 {
    object
        .as_object()
        .unwrap_or_default()
        .iter()
        .filter(|(key, _)| !read.contains(&key.as_ref()))
        .map(|(key, value)| {
            tokenizer.count(encoding, key) + schema_text(tokenizer, encoding, value)
        })
        .sum()
}

/// An enum value as the model sees it: strings as themselves, numbers as their digits.
fn scalar_tokens(tokenizer: &Tokenizer, encoding: Encoding, value: &Json) -> u64 {
    match value {
        Json::Str(s) => tokenizer.count(encoding, s),
        Json::UInt(n) => tokenizer.count(encoding, &n.to_string()),
        Json::NegInt(n) => tokenizer.count(encoding, &n.to_string()),
        Json::Float(f) => tokenizer.count(encoding, &f.to_string()),
        Json::Bool(b) => tokenizer.count(encoding, if *b { "true" } else { "false" }),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use crate::openai::endpoint::Endpoint;
    use crate::openai::tokens::tests::tokenizer;
    use crate::openai::{LlmRequest, RequestError};

    fn chat(body: &str) -> Result<LlmRequest, RequestError> {
        tokenizer().understand(Endpoint::ChatCompletions, body.as_bytes())
    }

    fn input_tokens(body: &str) -> u64 {
        chat(body).expect(body).input_tokens
    }

    /// The example conversation of the cookbook "How to count tokens with tiktoken",
    /// section 6 (openai/openai-cookbook, examples/How_to_count_tokens_with_tiktoken.ipynb).
    const COOKBOOK_MESSAGES: &str = r#"[
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
    ]"#;

    #[test]
    fn cookbook_conversation_matches_the_api_prompt_tokens() {
        // The notebook prints `response.usage.prompt_tokens` from the API for each model:
        // 129 for gpt-3.5-turbo, gpt-4-0613 and gpt-4 (cl100k_base); 124 for gpt-4o and
        // gpt-4o-mini (o200k_base).
        for (model, api_prompt_tokens) in [
            ("gpt-3.5-turbo", 129),
            ("gpt-4-0613", 129),
            ("gpt-4", 129),
            ("gpt-4o", 124),
            ("gpt-4o-mini", 124),
        ] {
            let body =
                format!(r#"{{"model":"{model}","messages":{COOKBOOK_MESSAGES},"max_tokens":1}}"#);
            assert_eq!(input_tokens(&body), api_prompt_tokens, "{model}");
        }
    }

    #[test]
    fn cookbook_tools_example_matches_the_api_prompt_tokens() {
        // Same notebook, section 7 (`num_tokens_for_tools`): the API reported 105 prompt
        // tokens for gpt-3.5-turbo and gpt-4, 101 for gpt-4o and gpt-4o-mini.
        let function = r#"{
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
            }, "required": ["location"]}}"#;
        let tools = format!(r#"[{{"type": "function", "function": {function}}}]"#);
        let messages = r#"[
            {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
            {"role": "user", "content": "What's the weather like in San Francisco?"}]"#;
        for (model, api_prompt_tokens) in [
            ("gpt-3.5-turbo", 105),
            ("gpt-4", 105),
            ("gpt-4o", 101),
            ("gpt-4o-mini", 101),
        ] {
            let body = format!(r#"{{"model":"{model}","messages":{messages},"tools":{tools}}}"#);
            assert_eq!(input_tokens(&body), api_prompt_tokens, "{model}");
            // Legacy `functions` carry the same definitions unwrapped: same cost.
            let legacy =
                format!(r#"{{"model":"{model}","messages":{messages},"functions":[{function}]}}"#);
            assert_eq!(
                input_tokens(&legacy),
                api_prompt_tokens,
                "{model} functions"
            );
        }
    }

    #[test]
    fn a_170_token_prompt_counts_exactly() {
        // "hello" followed by 162 × " hello": each word is one token in both encodings, so
        // the content is 163 tokens; + 3 (message) + 1 ("user") + 3 (priming) = 170.
        let content = format!("hello{}", " hello".repeat(162));
        for model in ["gpt-4o", "gpt-4"] {
            let body = format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":"{content}"}}]}}"#
            );
            assert_eq!(input_tokens(&body), 170, "{model}");
        }
    }

    /// A long text (each word one token) hidden where the cookbook formula does not look.
    fn hidden() -> String {
        "secret".to_owned() + &" word".repeat(999)
    }

    #[test]
    fn text_anywhere_in_a_tool_schema_is_counted() {
        let t = tokenizer();
        let text = hidden();
        let n = t.count_text("gpt-4o", &text);
        assert_eq!(n, 1000);
        let with_tool = |function: &str| {
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{function}}}]}}"#
            )
        };
        let flat = with_tool(
            r#"{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"object","description":"x"}}}}"#,
        );
        let base = input_tokens(&flat);
        let hiding_places = [
            // A nested property's description.
            format!(
                r#"{{"name":"f","parameters":{{"type":"object","properties":{{"a":{{"type":"object","description":"x","properties":{{"b":{{"type":"string","description":"{text}"}}}}}}}}}}}}"#
            ),
            // Array items, $defs, a default value.
            format!(
                r#"{{"name":"f","parameters":{{"type":"object","properties":{{"a":{{"type":"object","description":"x","items":{{"description":"{text}"}}}}}}}}}}"#
            ),
            format!(
                r#"{{"name":"f","parameters":{{"type":"object","properties":{{"a":{{"type":"object","description":"x"}}}},"$defs":{{"d":{{"description":"{text}"}}}}}}}}"#
            ),
            format!(
                r#"{{"name":"f","parameters":{{"type":"object","properties":{{"a":{{"type":"object","description":"x","default":"{text}"}}}}}}}}"#
            ),
        ];
        for function in hiding_places {
            let counted = input_tokens(&with_tool(&function));
            assert!(
                counted >= base + n,
                "{counted} < {base} + {n}: {}",
                &function[..80]
            );
        }
        // A custom tool's grammar is text the model reads as well.
        let custom = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"custom","custom":{{"name":"g","format":{{"type":"grammar","grammar":{{"syntax":"lark","definition":"{text}"}}}}}}}}]}}"#
        );
        assert!(input_tokens(&custom) >= n);
    }

    #[test]
    fn server_extensions_that_reach_the_prompt_are_counted() {
        let text = hidden();
        let plain = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let base = input_tokens(plain);
        let documents = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"documents":[{{"title":"t","text":"{text}"}}]}}"#
        );
        assert!(input_tokens(&documents) >= base + 1000);
        let ids = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"prompt_token_ids":[{}]}}"#,
            vec!["7"; 5000].join(",")
        );
        assert_eq!(input_tokens(&ids), base + 5000);
    }

    #[test]
    fn a_structured_output_schema_is_counted() {
        let text = hidden();
        let plain = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let base = input_tokens(plain);
        let json_object = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#;
        assert_eq!(input_tokens(json_object), base);
        let schema = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"response_format":{{"type":"json_schema","json_schema":{{"name":"s","strict":true,"schema":{{"type":"object","properties":{{"a":{{"type":"string","description":"{text}"}}}}}}}}}}}}"#
        );
        assert!(input_tokens(&schema) >= base + 1000);
    }

    #[test]
    fn content_parts_and_images() {
        let text = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#;
        let parts = r#"{"model":"gpt-4o","messages":[{"role":"user","content":[
            {"type":"text","text":"hello"},{"type":"text","text":" world"}]}]}"#;
        // 3 + 1 ("user") + 2 + 3
        assert_eq!(input_tokens(text), 9);
        assert_eq!(input_tokens(parts), 9);
        let image = |detail: &str| {
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[
                {{"type":"image_url","image_url":{{"url":"https://x/y.png"{detail}}}}}]}}]}}"#
            )
        };
        assert_eq!(input_tokens(&image(r#","detail":"low""#)), 7 + 85);
        assert_eq!(input_tokens(&image(r#","detail":"high""#)), 7 + 765);
        assert_eq!(input_tokens(&image("")), 7 + 765);
    }

    #[test]
    fn an_image_costs_what_its_model_bills() {
        // gpt-4o-mini bills an image at ~33× gpt-4o's tokens; patch models at 1,024
        // patches (a 1024×1024 image) × their multiplier. Charging everyone gpt-4o's 765
        // let a gpt-4o-mini client send each image for 3% of its cost.
        let image = |model: &str, detail: &str| {
            input_tokens(&format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":[
                {{"type":"image_url","image_url":{{"url":"https://x/y.png","detail":"{detail}"}}}}]}}]}}"#
            )) - 7
        };
        let cases = [
            ("gpt-4o", 85, 765),
            ("gpt-4.1", 85, 765),
            ("gpt-4o-mini", 2833, 25_501),
            ("gpt-4o-mini-2024-07-18", 2833, 25_501),
            ("ft:gpt-4o-mini-2024-07-18:org::id", 2833, 25_501),
            ("gpt-4.1-mini", 1659, 1659),
            ("gpt-5-nano", 2520, 2520),
            ("o4-mini", 1762, 1762),
        ];
        for (model, low, high) in cases {
            assert_eq!(
                (image(model, "low"), image(model, "high")),
                (low, high),
                "{model}"
            );
        }
        // Responses' input_image the same.
        let body = r#"{"model":"gpt-4o-mini","input":[{"role":"user","content":[{"type":"input_image","image_url":"https://x/y.png"}]}]}"#;
        let r = tokenizer()
            .understand(Endpoint::Responses, body.as_bytes())
            .unwrap();
        assert!(r.input_tokens > 25_501, "{}", r.input_tokens);
    }

    #[test]
    fn assistant_tool_calls_and_tool_results_are_counted() {
        let body = r#"{"model":"gpt-4o","messages":[
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"sunny"}]}"#;
        let t = tokenizer();
        let want = 3
            + t.count_text("gpt-4o", "assistant")
            + t.count_text("gpt-4o", "get_weather")
            + t.count_text("gpt-4o", r#"{"city":"Paris"}"#)
            + 3
            + t.count_text("gpt-4o", "tool")
            + t.count_text("gpt-4o", "call_1")
            + t.count_text("gpt-4o", "sunny")
            + 3;
        assert_eq!(input_tokens(body), want);
    }

    #[test]
    fn messages_are_validated() {
        let cases = [
            (r#"{"model":"gpt-4o"}"#, "messages", "Missing required parameter: 'messages'."),
            (r#"{"model":"gpt-4o","messages":"hi"}"#, "messages",
             "Invalid type for 'messages': expected an array, but got a string instead."),
            (r#"{"model":"gpt-4o","messages":[]}"#, "messages",
             "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."),
            (r#"{"model":"gpt-4o","messages":[{"role":"user","content":"a"},"b"]}"#, "messages[1]",
             "Invalid type for 'messages[1]': expected an object, but got a string instead."),
            (r#"{"model":"gpt-4o","messages":[{"content":"a"}]}"#, "messages[0].role",
             "Missing required parameter: 'messages[0].role'."),
            (r#"{"model":"gpt-4o","messages":[{"role":"robot","content":"a"}]}"#, "messages[0].role",
             "Invalid value: 'robot'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."),
            (r#"{"model":"gpt-4o","messages":[{"role":1}]}"#, "messages[0].role",
             "Invalid type for 'messages[0].role': expected a string, but got an integer instead."),
            (r#"{"model":"gpt-4o","messages":[{"role":"user","content":5}]}"#, "messages[0].content",
             "Invalid type for 'messages[0].content': expected a string or an array, but got an integer instead."),
            (r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text"}]}]}"#, "messages[0].content[0].text",
             "Missing required parameter: 'messages[0].content[0].text'."),
            (r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"text":"x"}]}]}"#, "messages[0].content[0].type",
             "Missing required parameter: 'messages[0].content[0].type'."),
            (r#"{"model":"gpt-4o","messages":[{"role":"user","name":3,"content":"x"}]}"#, "messages[0].name",
             "Invalid type for 'messages[0].name': expected a string, but got an integer instead."),
            (r#"{"model":"gpt-4o","messages":[{"role":"assistant","tool_calls":{}}]}"#, "messages[0].tool_calls",
             "Invalid type for 'messages[0].tool_calls': expected an array, but got an object instead."),
            (r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"tools":{}}"#, "tools",
             "Invalid type for 'tools': expected an array, but got an object instead."),
        ];
        for (body, param, message) in cases {
            let e = chat(body).expect_err(body);
            assert_eq!(
                (e.param.as_deref(), e.message.as_str()),
                (Some(param), message),
                "{body}"
            );
        }
    }
}

//! The one error type of the config module: where in which file, and why.
//!
//! Rendered the way compilers and editors expect (`PATH:LINE:COL: message`), so
//! `check-config` output is clickable. The message never contains a secret: every
//! message is built here from field names, key names and numbers, and the only text
//! taken from the YAML parser passes through [`ConfigError::from_yaml`], which drops
//! source snippets and redacts anything that looks like a `key:` value.

use std::fmt;

/// A config file that could not be read or accepted.
///
/// `line` and `column` are 1-based; both are 0 when the error has no location (the
/// file could not be read, for example), and then `Display` leaves them out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.origin, self.line, self.column, self.message
            )
        }
    }
}

impl ConfigError {
    pub(crate) fn at(origin: &str, at: serde_saphyr::Location, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            line: at.line() as usize,
            column: at.column() as usize,
            message: message.into(),
        }
    }

    pub(crate) fn unlocated(origin: &str, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// Turns a parser error into ours. `text` is the document, used only to find the
    /// secrets it holds so they can be cut out of the parser's message.
    pub(crate) fn from_yaml(origin: &str, text: &str, err: &serde_saphyr::Error) -> Self {
        use serde_saphyr::MessageFormatter as _;
        // The snippet rendering quotes neighbouring source lines, which may be a `key:`
        // line, so take the bare message and add the location ourselves.
        let bare = err.without_snippet();
        let message = serde_saphyr::UserMessageFormatter.format_message(bare);
        // The formatter's contract: sanitize before the text reaches a terminal or log.
        let mut message: String = message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        for secret in inline_secrets(text) {
            message = message.replace(secret, "<redacted>");
        }
        let (line, column) = match bare.location() {
            Some(at) => (at.line() as usize, at.column() as usize),
            None => (0, 0),
        };
        ConfigError {
            origin: origin.to_owned(),
            line,
            column,
            message,
        }
    }
}

/// The values of every `key:` entry in `text`, found line by line without a YAML
/// parser (the document may not parse). Defence in depth: the parser's messages
/// name types and fields rather than values, but a misplaced secret must still not
/// reach a log through one.
fn inline_secrets(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    for line in text.lines() {
        // Block style (`key: sk-...`, `- key: sk-...`) and flow style
        // (`{name: a, key: sk-...}`) alike: a `key:` that starts a token.
        for (at, _) in line.match_indices("key:") {
            let starts_token = line[..at]
                .chars()
                .next_back()
                .is_none_or(|c| c.is_whitespace() || matches!(c, '-' | '{' | ',' | '?'));
            if !starts_token {
                continue;
            }
            let rest = line[at + "key:".len()..].trim_start();
            let end = rest.find([',', '}', '#']).unwrap_or(rest.len());
            let value = rest[..end].trim().trim_matches(|c| c == '"' || c == '\'');
            // Short values would redact ordinary words out of messages; a real bearer
            // secret is never this short.
            if value.len() >= 4 {
                found.push(value);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_location() {
        let located = ConfigError {
            origin: "c.yaml".into(),
            line: 3,
            column: 7,
            message: "bad".into(),
        };
        assert_eq!(located.to_string(), "c.yaml:3:7: bad");
        assert_eq!(
            ConfigError::unlocated("c.yaml", "gone").to_string(),
            "c.yaml: gone"
        );
    }

    #[test]
    fn inline_secrets_finds_key_values_in_any_form() {
        let text =
            "keys:\n  - key: sk-plain\n    name: a\n  - name: b\n    key: \"sk-quoted\" # c\n";
        assert_eq!(inline_secrets(text), vec!["sk-plain", "sk-quoted"]);
    }
}

//! The documents stay true: every ```yaml example in README.md and docs/*.md that is a
//! limiter config (it has a top-level `keys:` list) parses with the limiter's own parser,
//! the one `check-config` and `serve` use. New examples, and new config fields in them,
//! are picked up as they are written. And the reference (docs/reference.md) shows every
//! field the parser accepts.

use std::path::Path;

use llm_ratelimit::config::Config;

/// `(file, first line, text)` of every fenced yaml block of a markdown file.
fn yaml_blocks(path: &Path) -> Vec<(String, usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut blocks = vec![];
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut open {
            None if fence.starts_with("```yaml") || fence.starts_with("```yml") => {
                open = Some((i + 2, String::new()));
            }
            Some((first, body)) if fence.starts_with("```") => {
                blocks.push((path.display().to_string(), *first, std::mem::take(body)));
                open = None;
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(
        open.is_none(),
        "{}: an unclosed ```yaml block",
        path.display()
    );
    blocks
}

#[test]
fn docs_examples_are_valid_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut checked = vec![];
    for file in &files {
        for (name, line, text) in yaml_blocks(file) {
            if !text.lines().any(|l| l.starts_with("keys:")) {
                continue;
            }
            let origin = format!("{name} (example from line {line})");
            if let Err(e) = Config::parse(&text, &origin) {
                panic!("{e}");
            }
            checked.push(origin);
        }
    }
    // README's example and the reference's at least: a rename must not empty this test.
    for must in ["README.md", "docs/reference.md"] {
        assert!(
            checked.iter().any(|c| c.contains(must)),
            "no config example found in {must}: {checked:?}"
        );
    }
}

/// The reference keeps up with the config: its example shows every field the parser
/// accepts (as a YAML key in one of its ```yaml blocks, which the test above parses), and
/// it documents the HTTP surface's pool usage. The field list is read from the parser's
/// own structs (`config::field_names`), so a new field fails this until it is documented.
#[test]
fn reference_documents_every_config_field() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let yaml_keys: Vec<String> = yaml_blocks(&path)
        .iter()
        .flat_map(|(_, _, block)| block.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("- ").unwrap_or(line);
            let (key, _) = line.split_once(':')?;
            Some(key.trim_matches('"').to_string())
        })
        .collect();
    let mut missing = vec![];
    for (place, fields) in llm_ratelimit::config::field_names() {
        assert!(!fields.is_empty(), "no field names read for {place}");
        for field in fields {
            if !yaml_keys.iter().any(|k| k == field) {
                missing.push(format!("`{field}` ({place})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/reference.md's config example does not show {}",
        missing.join(", ")
    );
    for route in [
        "/v1/usage/{name}",
        "/v1/usage/pools/{name}",
        "/v1/check",
        "/v1/report",
    ] {
        assert!(
            text.contains(route),
            "docs/reference.md does not mention {route}"
        );
    }
}

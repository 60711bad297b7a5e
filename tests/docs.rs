//! The documents stay true: every ```yaml example in README.md and docs/*.md that is a
//! limiter config (it has a top-level `keys:` list) parses with the limiter's own parser,
//! the one `check-config` and `serve` use. New examples, and new config fields in them,
//! are picked up as they are written.

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

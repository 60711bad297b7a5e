//! `llm-loadtest`: the bundled load generator (issue 4). Until it lands it only answers `--help`.
fn main() {
    println!("llm-loadtest: not built yet (see issue 4)");
}

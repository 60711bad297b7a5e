//! `llm-loadtest`: the bundled load generator (issue 4). Until it lands it only answers `--help`.
#[allow(dead_code)] // until the runner wires --html
mod html;
#[allow(dead_code)] // used by the runners, verify and html as they land
mod record;
#[allow(dead_code)] // until the runner wires --verify
mod verify;

fn main() {
    println!("llm-loadtest: not built yet (see issue 4)");
}

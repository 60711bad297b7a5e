//! `llm-loadtest`: the bundled load generator. `http` sends OpenAI requests to Envoy (or
//! any OpenAI-compatible server); `grpc` sends what Envoy would send straight to the
//! sidecar. Thin: [`run`] is the run, [`cli`] its flags.

mod cli;
mod drive;
mod grpc;
mod html;
mod http;
mod plan;
mod progress;
#[allow(dead_code)] // the full interface, shared with verify and html
mod record;
mod response;
mod run;
mod summary;
mod verify;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Settings};
use crate::run::Verdict;

fn main() -> ExitCode {
    let settings = match Settings::from_cli(Cli::parse()) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run::run(settings));
    // Nothing may outlive the run (a worker stuck past its deadline would block exit).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(Verdict::Done) => ExitCode::SUCCESS,
        Ok(Verdict::VerifyFailed) => ExitCode::from(3),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! One run, top to bottom: key names (from `--verify`'s config), the plan, the runner's
//! connections and wire-form requests, the load, then the reports — table and verify text
//! on stdout, `--json`, `--html`, `--svg-dir`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::{Mode, Settings};
use crate::drive::{drive, Clock, Finished, Pacing};
use crate::grpc::{self, GrpcClient};
use crate::html::{self, Page};
use crate::http::{self, HttpClient, Requests, Target};
use crate::plan::Plan;
use crate::summary::{key_labels, Summary};
use crate::verify::Audit;

/// How a run ended, for the exit status.
pub enum Verdict {
    Done,
    /// `--verify-strict` and the replay found the limiter wrong.
    VerifyFailed,
}

pub async fn run(settings: Settings) -> anyhow::Result<Verdict> {
    writable(&settings)?;
    let audit = match &settings.verify {
        Some(path) => Some(
            Audit::load(path, &settings.secrets, &settings.models)
                .with_context(|| format!("--verify {}", path.display()))?,
        ),
        None => None,
    };
    let keys = key_labels(
        settings.secrets.len(),
        audit.as_ref().map(|a| a.key_names.clone()),
    );
    let plan = Arc::new(Plan::build(&settings)?);
    let pacing = Pacing {
        pace: settings.pace,
        duration: settings.duration,
        timeout: settings.timeout,
        grace: settings.grace,
        seed: settings.seed,
    };
    let finished = match settings.mode {
        Mode::Http => {
            let mut targets = Vec::with_capacity(settings.targets.len());
            for url in &settings.targets {
                targets.push(Target::resolve(url, settings.endpoint).await?);
            }
            http::preflight(&settings.targets, &targets).await?;
            let requests = Arc::new(Requests::build(
                targets,
                &settings.secrets,
                settings.stream,
                plan.clone(),
            )?);
            let clock = Clock::start();
            drive(&pacing, plan, clock, move |_| {
                HttpClient::new(requests.clone(), clock)
            })
            .await
        }
        Mode::Grpc {
            api,
            connections,
            settle_output,
        } => {
            let channels = grpc::connect(&settings.targets, connections).await?;
            let path = format!("/v1{}", settings.endpoint.path());
            let shared = Arc::new(grpc::Shared {
                api,
                settle_output,
                channels,
                messages: grpc::messages(api, &path, &settings.secrets, &settings.models, &plan),
                plan: plan.clone(),
            });
            let clock = Clock::start();
            drive(&pacing, plan, clock, move |n| {
                GrpcClient::new(shared.clone(), clock, n)
            })
            .await
        }
    };
    report(&settings, audit.as_ref(), &keys, &finished)
}

fn report(
    settings: &Settings,
    audit: Option<&Audit>,
    keys: &[String],
    finished: &Finished,
) -> anyhow::Result<Verdict> {
    if finished.lost_workers > 0 {
        eprintln!(
            "warning: {} workers did not stop in time; their requests are missing",
            finished.lost_workers
        );
    }
    let mut summary = Summary::new(settings, finished, &settings.targets, keys);
    print!("{}", summary.table());
    let report = audit.map(|a| a.replay(&finished.records));
    if let Some(report) = &report {
        println!();
        print!("{}", report.render_text());
        summary.verify = Some(serde_json::to_value(report)?);
    }
    if let Some(path) = &settings.json {
        // From the struct, so the file keeps its field order.
        let mut text = serde_json::to_vec_pretty(&summary)?;
        text.push(b'\n');
        write(path, &text)?;
    }
    if settings.html.is_some() || settings.svg_dir.is_some() {
        let json = serde_json::to_value(&summary)?;
        let page = Page {
            title: format!(
                "llm-loadtest {} {}, {}",
                summary.mode,
                summary.endpoint,
                settings.targets.join(", ")
            ),
            targets: &settings.targets,
            keys,
            records: &finished.records,
            series: report.as_ref().map_or(&[], |r| &r.series),
            summary: &json,
        };
        if let Some(path) = &settings.html {
            html::write(path, &page).with_context(|| format!("--html {}", path.display()))?;
        }
        if let Some(dir) = &settings.svg_dir {
            let files = html::write_svgs(dir, &page)
                .with_context(|| format!("--svg-dir {}", dir.display()))?;
            for file in files {
                eprintln!("wrote {}", file.display());
            }
        }
    }
    match report {
        Some(r) if settings.verify_strict && !r.passed() => Ok(Verdict::VerifyFailed),
        _ => Ok(Verdict::Done),
    }
}

/// Creates the output files and directory before the run, so a long run never ends in
/// "cannot write".
fn writable(settings: &Settings) -> anyhow::Result<()> {
    for (flag, path) in [("--json", &settings.json), ("--html", &settings.html)] {
        if let Some(path) = path {
            std::fs::File::create(path)
                .with_context(|| format!("{flag}: cannot write {}", path.display()))?;
        }
    }
    if let Some(dir) = &settings.svg_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--svg-dir: cannot create {}", dir.display()))?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

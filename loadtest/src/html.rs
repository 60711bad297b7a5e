//! Placeholder for `--html` and `--svg-dir` (issue 4, item 3): a trivial page and no
//! charts. The real report replaces this file.
#![allow(dead_code)] // a placeholder: the real module uses every field

use std::path::{Path, PathBuf};

use crate::record::{Record, UsageSeries};

pub struct Page<'a> {
    pub title: String,
    pub targets: &'a [String],
    pub keys: &'a [String],
    pub records: &'a [Record],
    pub series: &'a [UsageSeries],
    pub summary: &'a serde_json::Value,
}

pub fn write(path: &Path, page: &Page) -> std::io::Result<()> {
    let text = format!(
        "<!doctype html><meta charset=utf-8><title>{0}</title><h1>{0}</h1><pre>{1}</pre>\n",
        page.title.replace('<', "&lt;"),
        page.summary.to_string().replace('<', "&lt;")
    );
    std::fs::write(path, text)
}

pub fn write_svgs(dir: &Path, _page: &Page) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    Ok(Vec::new())
}

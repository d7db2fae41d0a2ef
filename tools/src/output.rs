//! What the commands print: aligned tables, times, progress bars, and how they fail.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A command's failure: the message and the exit code (1 failed, 2 usage).
pub struct Failure {
    pub error: anyhow::Error,
    pub code: ExitCode,
}

/// What a command returns: its exit code, or a failure to report.
pub type Outcome = Result<ExitCode, Failure>;

/// The command could not do its work (exit 1).
pub fn failed(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        error: error.into(),
        code: ExitCode::from(1),
    }
}

/// The command was asked something that cannot be done as asked (exit 2).
pub fn usage(message: String) -> Failure {
    Failure {
        error: anyhow::anyhow!(message),
        code: ExitCode::from(2),
    }
}

/// Wall-clock milliseconds as RFC 3339 UTC with milliseconds.
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Prints rows under a header, each column as wide as its widest cell; numbers (cells that
/// parse as numbers) are right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| {
                if cell.parse::<f64>().is_ok() {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A progress bar over `len` steps on stderr, drawn only when stdout is a terminal (a script
/// reading the output sees nothing of it).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} segments")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Prints `value` as pretty JSON.
pub fn json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}

/// A spinner on stderr for a step that reports no progress of its own, drawn only when
/// stdout is a terminal.
pub fn spinner(what: &str) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

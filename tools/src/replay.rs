//! `replay DIR --server URL`: publishes a data directory's message history again, to a
//! running server, in offset order and at a bounded rate.
//!
//! Each message keeps its `from`, `type`, priority, headers, correlation and body; it is
//! addressed to its original `to` unless `--to-address` says otherwise, and carries its
//! original id and offset in the headers `courier-original-id` and `courier-original-offset`.
//! Its publish id is `replay:<offset>:<original id>` (cut to 128 characters), so a resumed
//! replay that sends a message twice within the server's dedupe window stores it once.
//! A failure stops the replay and names the offset to resume from (`--from`).
#![allow(
    clippy::disallowed_methods,
    reason = "the replay paces itself with the monotonic clock"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use courier_storage::io::{Disk, FileDisk};
use courier_storage::record::Frame;
use courier_storage::{segment, Message, Record};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::offline::Selection;
use crate::online::Client;
use crate::output::{self, failed, usage, Outcome};

/// What to replay, and how.
pub struct ReplayOptions {
    pub selection: Selection,
    pub to_address: Option<String>,
    /// Messages per second; 0 for no limit.
    pub rate: f64,
    /// Allow replaying into the server that owns the directory.
    pub into_owner: bool,
    pub json: bool,
}

#[derive(Serialize)]
struct Stopped {
    offset: u64,
    error: String,
}

#[derive(Serialize)]
struct ReplayReport {
    replayed: u64,
    duplicates: u64,
    first_offset: Option<u64>,
    last_offset: Option<u64>,
    /// Where a next run should start (`--from`).
    next_from: u64,
    stopped: Option<Stopped>,
}

/// The publish request that replays a message: its body is passed through as the stored
/// JSON text, never parsed into a tree, so any body the server once accepted replays.
#[derive(Serialize)]
struct Republish<'a> {
    id: String,
    to: &'a str,
    from: &'a str,
    priority: u8,
    headers: BTreeMap<&'a str, &'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<&'a str>,
    body: &'a RawValue,
}

/// The publish request that replays `m`, read at `offset`, as JSON text.
fn republish(offset: u64, m: &Message, to_address: Option<&str>) -> anyhow::Result<String> {
    let original_offset = offset.to_string();
    let mut headers: BTreeMap<&str, &str> = m
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.insert("courier-original-id", &m.id);
    headers.insert("courier-original-offset", &original_offset);
    let mut id = format!("replay:{offset}:{}", m.id);
    id.truncate(128);
    let body: &RawValue = serde_json::from_slice(&m.body).context("a stored body is not JSON")?;
    let publish = Republish {
        id,
        to: to_address.unwrap_or(&m.to),
        from: &m.from,
        priority: m.priority,
        headers,
        kind: m.kind.as_deref(),
        correlation_id: m.correlation_id.as_deref(),
        in_reply_to: m.in_reply_to.as_deref(),
        body,
    };
    Ok(serde_json::to_string(&publish)?)
}

/// Whether the server's segments live in `dir`: then it is the directory's owner.
fn owns(client: &Client, dir: &Path) -> Result<bool, output::Failure> {
    let stats = client.call("GET", "/v1/stats", None)?;
    let Ok(ours) = dir.join("log").canonicalize() else {
        return Ok(false);
    };
    let segments = stats["segments"].as_array().cloned().unwrap_or_default();
    Ok(segments.iter().any(|s| {
        s["path"]
            .as_str()
            .and_then(|p| Path::new(p).canonicalize().ok())
            .is_some_and(|p| p.starts_with(&ours))
    }))
}

/// Paces sends to `rate` per second.
struct Pacer {
    start: Instant,
    interval: Option<Duration>,
    sent: u32,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Self {
            start: Instant::now(),
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            sent: 0,
        }
    }

    fn wait(&mut self) {
        if let Some(interval) = self.interval {
            let due = self.start + interval * self.sent;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        self.sent = self.sent.saturating_add(1);
    }
}

/// The selected messages of one segment.
fn messages_in(
    path: &Path,
    base: courier_storage::Offset,
    selection: &Selection,
) -> Result<Vec<(u64, Message)>, output::Failure> {
    let file = FileDisk
        .open(path, false)
        .with_context(|| format!("opening segment {}", path.display()))
        .map_err(failed)?;
    let mut messages = Vec::new();
    let mut collect = |frame: &Frame, _position, _len| {
        if let Record::Message(m) = &frame.record {
            if selection.wants(frame.offset.0, m) {
                messages.push((frame.offset.0, m.clone()));
            }
        }
        Ok(())
    };
    segment::scan(file.as_ref(), base, false, Some(&mut collect)).map_err(failed)?;
    Ok(messages)
}

/// `replay DIR --server URL`.
pub fn replay(dir: &Path, client: &Client, options: &ReplayOptions) -> Outcome {
    crate::offline::data_dir(dir)?;
    if !options.into_owner && owns(client, dir)? {
        return Err(usage(format!(
            "the server writes {} itself: replaying into it doubles its history; pass \
             --into-owner if that is what you want",
            dir.display()
        )));
    }
    let segments = options.selection.segments(dir)?;
    let from = *options.selection.range()?.start();
    let bar = output::progress(segments.len() as u64, "replaying");
    let mut pacer = Pacer::new(options.rate);
    let mut report = ReplayReport {
        replayed: 0,
        duplicates: 0,
        first_offset: None,
        last_offset: None,
        next_from: from,
        stopped: None,
    };
    'segments: for (base, path) in &segments {
        let messages = messages_in(path, *base, &options.selection)?;
        for (offset, message) in messages {
            pacer.wait();
            let sent = republish(offset, &message, options.to_address.as_deref())
                .map_err(failed)
                .and_then(|body| client.call_raw("POST", "/v1/messages", body));
            match sent {
                Ok(reply) => {
                    report.replayed += 1;
                    report.duplicates += u64::from(reply["duplicate"] == true);
                    report.first_offset.get_or_insert(offset);
                    report.last_offset = Some(offset);
                    report.next_from = offset + 1;
                }
                Err(failure) => {
                    report.next_from = offset;
                    report.stopped = Some(Stopped {
                        offset,
                        error: format!("{:#}", failure.error),
                    });
                    break 'segments;
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_report(&report, options.json);
    Ok(ExitCode::from(u8::from(report.stopped.is_some())))
}

fn print_report(report: &ReplayReport, json: bool) {
    if json {
        output::json(report);
        return;
    }
    match (report.first_offset, report.last_offset) {
        (Some(a), Some(b)) => println!(
            "replayed {} messages, offsets {a}..={b} ({} were already there)",
            report.replayed, report.duplicates
        ),
        _ => println!("replayed no messages"),
    }
    if let Some(stopped) = &report.stopped {
        println!(
            "stopped at offset {}: {}; resume with --from {}",
            stopped.offset, stopped.error, report.next_from
        );
    } else {
        println!(
            "done; a later run can continue with --from {}",
            report.next_from
        );
    }
}

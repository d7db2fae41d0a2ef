//! The offline commands: they read a data directory's files through `courier-storage`.
//! `verify`, `inspect` and `dump` only read, and take no lock; `repair` takes the directory's
//! lock, so it refuses while a server runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use courier_storage::index::EntryState;
use courier_storage::io::{Disk, FileDisk};
use courier_storage::record::Frame;
use courier_storage::segment;
use courier_storage::verify::{self, Problem, VerifyReport};
use courier_storage::{Error, Index, Message, Offset, Record};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::output::{self, failed, usage, Outcome};

/// Checks that `dir` is a data directory: it has `log/`.
pub fn data_dir(dir: &Path) -> Result<PathBuf, output::Failure> {
    let log = dir.join("log");
    if !log.is_dir() {
        return Err(usage(format!(
            "{} is not a Courier data directory (it has no log/); pass the server's data_dir",
            dir.display()
        )));
    }
    Ok(log)
}

/// Whether a server holds the directory (its lock file is locked). Only tries the lock.
fn server_running(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join("log").join(".lock")) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
}

#[derive(Serialize)]
struct SegmentRow {
    file: String,
    base: u64,
    records: u64,
    bytes: u64,
    first_time: Option<String>,
    last_time: Option<String>,
}

fn segment_rows(report: &VerifyReport) -> Vec<SegmentRow> {
    report
        .segments
        .iter()
        .map(|s| SegmentRow {
            file: file_name(&s.path),
            base: s.base.0,
            records: s.records,
            bytes: s.bytes,
            first_time: s.time_range_ms.map(|(a, _)| output::time(a)),
            last_time: s.time_range_ms.map(|(_, b)| output::time(b)),
        })
        .collect()
}

fn print_segments(rows: &[SegmentRow]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.file.clone(),
                r.base.to_string(),
                r.records.to_string(),
                r.bytes.to_string(),
                r.first_time.clone().unwrap_or_else(|| "-".into()),
                r.last_time.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(
        &["SEGMENT", "BASE", "RECORDS", "BYTES", "FIRST", "LAST"],
        &cells,
    );
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[derive(Serialize)]
struct ProblemRow {
    segment: String,
    position: u64,
    bytes: u64,
    reason: String,
    lost_offsets: [u64; 2],
    torn_tail: bool,
}

impl ProblemRow {
    fn of(p: &Problem) -> Self {
        Self {
            segment: p.segment.display().to_string(),
            position: p.position,
            bytes: p.len,
            reason: p.reason.to_string(),
            lost_offsets: [p.lost.start, p.lost.end],
            torn_tail: p.torn_tail,
        }
    }

    fn describe(&self) -> String {
        let lost = match self.lost_offsets {
            [a, b] if a == b => "no complete record lost".to_owned(),
            [a, b] => format!("offsets {a}..{b} lost"),
        };
        let tail = if self.torn_tail {
            " [torn tail: the server truncates it at start]"
        } else {
            ""
        };
        format!(
            "{} at byte {} ({} bytes): {}; {lost}{tail}",
            self.segment, self.position, self.bytes, self.reason
        )
    }
}

#[derive(Serialize)]
struct VerifyJson {
    clean: bool,
    segments: Vec<SegmentRow>,
    records: u64,
    problems: Vec<ProblemRow>,
}

/// `verify DIR`: exit 0 when clean, 1 when damaged (a torn tail counts only with `strict`).
pub fn verify(dir: &Path, strict: bool, json: bool) -> Outcome {
    data_dir(dir)?;
    let spinner = output::spinner("verifying");
    let report = verify::verify(&FileDisk, dir).map_err(failed)?;
    spinner.finish_and_clear();
    let problems: Vec<ProblemRow> = report.problems.iter().map(ProblemRow::of).collect();
    let damaged = problems.iter().any(|p| strict || !p.torn_tail);
    if json {
        output::json(&VerifyJson {
            clean: !damaged,
            segments: segment_rows(&report),
            records: report.records(),
            problems,
        });
    } else {
        print_segments(&segment_rows(&report));
        for p in &problems {
            println!("problem: {}", p.describe());
        }
        let verdict = if damaged { "DAMAGED" } else { "clean" };
        println!(
            "{verdict}: {} segments, {} records, {} problems",
            report.segments.len(),
            report.records(),
            problems.len()
        );
        if damaged {
            println!("stop the server, then `courierctl repair {}` moves the damaged bytes to quarantine/", dir.display());
        }
    }
    Ok(ExitCode::from(u8::from(damaged)))
}

#[derive(Serialize, Default)]
struct AgentRow {
    agent: String,
    registered: bool,
    ready: u64,
    in_flight: u64,
    dead_letters: u64,
}

#[derive(Serialize)]
struct InspectJson {
    server_running: bool,
    segments: Vec<SegmentRow>,
    total_records: u64,
    total_bytes: u64,
    first_offset: Option<u64>,
    next_offset: u64,
    /// Damage other than a torn tail: then agents are not computed (null).
    damaged: bool,
    agents: Option<Vec<AgentRow>>,
}

/// Agents and depths from a replay of the log into a scratch index (nothing in `dir` is
/// opened for writing or locked).
fn agent_rows(dir: &Path) -> anyhow::Result<(Vec<AgentRow>, Offset)> {
    let scratch = tempfile::tempdir().context("creating a scratch directory for the index")?;
    let index = Index::open(scratch.path(), 64 << 20)?;
    let next = courier_storage::replay_into(&FileDisk, &dir.join("log"), &index)?;
    let snapshot = index.snapshot()?;
    let mut rows: BTreeMap<String, AgentRow> = BTreeMap::new();
    fn row<'r>(rows: &'r mut BTreeMap<String, AgentRow>, agent: &str) -> &'r mut AgentRow {
        rows.entry(agent.to_owned()).or_insert_with(|| AgentRow {
            agent: agent.to_owned(),
            ..AgentRow::default()
        })
    }
    for id in snapshot.agents.keys() {
        row(&mut rows, id).registered = true;
    }
    for (inbox, entries) in &snapshot.inboxes {
        for entry in entries {
            match entry.value.state {
                EntryState::Ready { .. } => row(&mut rows, inbox).ready += 1,
                EntryState::Leased { .. } => row(&mut rows, inbox).in_flight += 1,
            }
        }
    }
    for (inbox, dead) in &snapshot.dead_letters {
        row(&mut rows, inbox).dead_letters += dead.len() as u64;
    }
    Ok((rows.into_values().collect(), next))
}

/// `inspect DIR`.
pub fn inspect(dir: &Path, json: bool) -> Outcome {
    data_dir(dir)?;
    let running = server_running(dir);
    let spinner = output::spinner("reading segments");
    let report = verify::verify(&FileDisk, dir).map_err(failed)?;
    let damaged = report.problems.iter().any(|p| !p.torn_tail);
    let (agents, next) = if damaged {
        let next = report.segments.last().map_or(Offset(0), |s| s.next_offset);
        (None, next)
    } else {
        spinner.set_message("replaying the log for agent depths");
        let (agents, next) = agent_rows(dir).map_err(failed)?;
        (Some(agents), next)
    };
    spinner.finish_and_clear();
    let segments = segment_rows(&report);
    let summary = InspectJson {
        server_running: running,
        total_records: report.records(),
        total_bytes: segments.iter().map(|s| s.bytes).sum(),
        first_offset: segments.first().map(|s| s.base),
        next_offset: next.0,
        segments,
        damaged,
        agents,
    };
    let code = ExitCode::from(u8::from(damaged));
    if json {
        output::json(&summary);
        return Ok(code);
    }
    let state = if running {
        "running (the directory is locked)"
    } else {
        "not running"
    };
    println!("data directory {}: server {state}", dir.display());
    print_segments(&summary.segments);
    println!(
        "total: {} segments, {} records, {} bytes, offsets {}..{}",
        summary.segments.len(),
        summary.total_records,
        summary.total_bytes,
        summary.first_offset.unwrap_or(0),
        summary.next_offset
    );
    println!();
    let Some(agents) = &summary.agents else {
        println!(
            "the log is damaged, so agents and depths are not computed: run `courierctl verify {}`",
            dir.display()
        );
        return Ok(code);
    };
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.agent.clone(),
                if a.registered { "yes" } else { "no" }.to_owned(),
                a.ready.to_string(),
                a.in_flight.to_string(),
                a.dead_letters.to_string(),
            ]
        })
        .collect();
    output::table(
        &["AGENT", "REGISTERED", "READY", "IN_FLIGHT", "DEAD_LETTERS"],
        &rows,
    );
    Ok(code)
}

/// Which messages `dump` and `replay` read: an offset range and an agent.
#[derive(clap::Args, Clone, Default)]
pub struct Selection {
    /// First offset (inclusive); where a stopped replay said to resume.
    #[arg(long)]
    pub from: Option<u64>,
    /// Last offset (inclusive).
    #[arg(long)]
    pub to: Option<u64>,
    /// Only messages routed to this agent's inbox.
    #[arg(long)]
    pub agent: Option<String>,
}

impl Selection {
    /// The offsets selected; a usage error if `--from` is after `--to`.
    pub fn range(&self) -> Result<std::ops::RangeInclusive<u64>, output::Failure> {
        let (from, to) = (self.from.unwrap_or(0), self.to.unwrap_or(u64::MAX));
        if from > to {
            return Err(usage(format!("--from {from} is after --to {to}")));
        }
        Ok(from..=to)
    }

    /// Whether the message `m` at `offset` is selected.
    pub fn wants(&self, offset: u64, m: &Message) -> bool {
        let routed = self
            .agent
            .as_ref()
            .is_none_or(|a| m.destinations.iter().any(|d| d == a));
        routed && self.from.unwrap_or(0) <= offset && offset <= self.to.unwrap_or(u64::MAX)
    }

    /// The segments of the data directory `dir` that can hold selected offsets, oldest first
    /// (those that end before `--from` are skipped unread, and those after `--to`).
    pub fn segments(&self, dir: &Path) -> Result<Vec<(Offset, PathBuf)>, output::Failure> {
        let range = self.range()?;
        let listed = courier_storage::list_segments(&FileDisk, &data_dir(dir)?).map_err(failed)?;
        let first = listed
            .iter()
            .rposition(|(base, _)| base.0 <= *range.start())
            .unwrap_or(0);
        Ok(listed
            .into_iter()
            .skip(first)
            .take_while(|(base, _)| base.0 <= *range.end())
            .collect())
    }
}

#[derive(Serialize)]
struct DumpLine<'a> {
    offset: u64,
    id: &'a str,
    from: &'a str,
    to: &'a str,
    destinations: &'a [String],
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    priority: u8,
    headers: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<&'a str>,
    time: String,
    body: &'a RawValue,
}

fn dump_line(frame: &Frame, selection: &Selection) -> Option<String> {
    let Record::Message(m) = &frame.record else {
        return None;
    };
    if !selection.wants(frame.offset.0, m) {
        return None;
    }
    let body = std::str::from_utf8(&m.body)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())?;
    let line = DumpLine {
        offset: frame.offset.0,
        id: &m.id,
        from: &m.from,
        to: &m.to,
        destinations: &m.destinations,
        kind: m.kind.as_deref(),
        priority: m.priority,
        headers: m
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        correlation_id: m.correlation_id.as_deref(),
        in_reply_to: m.in_reply_to.as_deref(),
        time: output::time(frame.timestamp_ms),
        body,
    };
    Some(serde_json::to_string(&line).expect("a dump line serializes"))
}

/// `dump DIR`: messages as JSON lines, oldest first, at most `limit`.
pub fn dump(dir: &Path, selection: &Selection, limit: Option<u64>) -> Outcome {
    let segments = selection.segments(dir)?;
    let bar = output::progress(segments.len() as u64, "dumping");
    let mut printed = 0;
    let limit = limit.unwrap_or(u64::MAX);
    for (base, path) in &segments {
        if printed >= limit {
            break;
        }
        let file = FileDisk
            .open(path, false)
            .with_context(|| format!("opening segment {}", path.display()))
            .map_err(failed)?;
        let mut visit = |frame: &Frame, _position, _len| {
            if let Some(line) = dump_line(frame, selection).filter(|_| printed < limit) {
                bar.suspend(|| println!("{line}"));
                printed += 1;
            }
            Ok(())
        };
        let scan = segment::scan(file.as_ref(), *base, false, Some(&mut visit)).map_err(failed)?;
        if let Some(damage) = scan.damage.first() {
            bar.suspend(|| {
                eprintln!(
                    "courierctl: {} is damaged at byte {} ({}); its later records are skipped: run `courierctl verify`",
                    path.display(),
                    damage.position,
                    damage.reason
                );
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct RepairJson {
    repaired: Vec<RepairRow>,
}

#[derive(Serialize)]
struct RepairRow {
    problem: ProblemRow,
    quarantine_file: String,
}

/// `repair DIR`: refuses while the server runs.
pub fn repair(dir: &Path, json: bool) -> Outcome {
    data_dir(dir)?;
    let spinner = output::spinner("repairing");
    let repaired = verify::repair(&FileDisk, dir, &dir.join("index")).map_err(|e| match e {
        Error::Locked { .. } => failed(anyhow::anyhow!(
            "{} is in use by a running server; stop it, then run repair again",
            dir.display()
        )),
        other => failed(other),
    })?;
    spinner.finish_and_clear();
    let rows: Vec<RepairRow> = repaired
        .iter()
        .map(|q| RepairRow {
            problem: ProblemRow::of(&q.problem),
            quarantine_file: q.file.display().to_string(),
        })
        .collect();
    if json {
        output::json(&RepairJson { repaired: rows });
    } else if rows.is_empty() {
        println!("nothing to repair: the log is clean");
    } else {
        for row in &rows {
            println!(
                "moved {} to {}",
                row.problem.describe(),
                row.quarantine_file
            );
        }
        println!(
            "repaired {} damaged regions; the index is rebuilt from the log at the next start",
            rows.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

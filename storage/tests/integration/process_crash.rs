//! A real process appends from several threads and reports each acknowledged offset; the test
//! SIGKILLs it at random moments, reopens the log and checks that every acknowledged append
//! is there, byte for byte, and that the recovered index equals one rebuilt from the log.
//! CI runs 50 short cycles; `COURIER_SOAK=1` runs 500.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use courier_storage::{Log, LogOptions, Offset, Record};

use crate::support::{seed, soak, Rng};

fn appender() -> PathBuf {
    // `cargo test` builds the examples next to the test binaries: target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("crash_appender");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds examples",
        path.display()
    );
    path
}

fn options() -> LogOptions {
    LogOptions {
        segment_bytes: 64 * 1024,
        index_cache_bytes: 4 << 20,
        ..LogOptions::default()
    }
}

/// When a cycle's SIGKILL lands.
#[derive(Clone, Copy)]
enum Kill {
    /// This long after the spawn: possibly during recovery, before any append.
    AfterSpawn(Duration),
    /// This long after the first acknowledged append: while appending.
    AfterFirstAck(Duration),
}

/// Runs the appender once, kills it as `kill` says, returns what it acknowledged.
fn run_and_kill(exe: &Path, dir: &Path, run: u64, kill: Kill) -> Vec<(u64, String)> {
    let mut child = Command::new(exe)
        .arg(dir)
        .arg(format!("r{run}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first_ack, first_acked) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let (offset, id) = line.split_once(' ').unwrap();
            acked.push((offset.parse().unwrap(), id.to_owned()));
            if acked.len() == 1 {
                let _ = first_ack.send(());
            }
        }
        acked
    });
    // The chaos timing itself, not synchronization: the kill lands wherever the child is.
    match kill {
        Kill::AfterSpawn(delay) => std::thread::sleep(delay),
        Kill::AfterFirstAck(delay) => {
            let _ = first_acked.recv_timeout(Duration::from_secs(60));
            std::thread::sleep(delay);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

#[test]
fn process_killed_at_random_moments_loses_no_acknowledged_append() {
    let exe = appender();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed(0xC0FFEE));
    let cycles: usize = if soak() { 500 } else { 50 };
    let (mut total, mut killed_with_acks) = (0, 0);
    for run in 0..cycles as u64 {
        let delay = Duration::from_millis(rng.below(100));
        let kill = match run % 5 {
            0 => Kill::AfterSpawn(delay),
            _ => Kill::AfterFirstAck(delay),
        };
        let acked = run_and_kill(&exe, dir.path(), run, kill);
        let (log, _) = Log::open(dir.path(), options()).expect("reopen after SIGKILL");
        let end = log.durable_end().0;
        for (offset, id) in &acked {
            assert!(
                *offset < end,
                "run {run}: acknowledged offset {offset} is past the end {end}"
            );
            match log.read(Offset(*offset)).unwrap().record {
                Record::Message(m) => assert_eq!(&m.id, id, "run {run}: offset {offset}"),
                other => panic!("run {run}: offset {offset} holds {other:?}"),
            }
        }
        if run % 10 == 9 {
            let live = log.index().snapshot().unwrap();
            drop(log);
            std::fs::remove_dir_all(dir.path().join("index")).unwrap();
            let (log, _) = Log::open(dir.path(), options()).unwrap();
            assert_eq!(
                log.index().snapshot().unwrap(),
                live,
                "run {run}: index after kill equals rebuild"
            );
        }
        total += acked.len();
        killed_with_acks += usize::from(!acked.is_empty());
    }
    eprintln!("{cycles} kills, {total} acknowledged appends checked");
    assert!(
        killed_with_acks * 2 > cycles,
        "most runs got to append before the kill"
    );
}

//! T9: an fsync or write error is fail-stop. Every append waiting on the failed batch gets an
//! error (never Ok), every later append gets `Poisoned`, nothing is retried; after a restart
//! every append acknowledged before the failure is intact.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;

use courier_storage::io::Disk;
use courier_storage::sim::{SimDisk, TearMode};
use courier_storage::{Error, FsyncPolicy, Log, LogOptions, Offset};
use tempfile::TempDir;

use crate::support::{index_tempdir, message, options, wait_until};

/// A log on a fresh simulated disk, with its options for reopening.
fn open_sim(fsync: FsyncPolicy, segment_bytes: u64) -> (SimDisk, TempDir, LogOptions, Log) {
    let sim = SimDisk::new();
    let index = index_tempdir();
    let opts = options(Arc::new(sim.clone()), fsync, segment_bytes, index.path());
    let (log, _) = Log::open(Path::new(DIR), opts.clone()).unwrap();
    (sim, index, opts, log)
}

const DIR: &str = "/sim/data";

/// Waits until the preallocator has filled and synced `log/.next.seg`: after that it does no
/// I/O until the next roll, so an injected failure can only hit the log's own writes.
fn wait_for_prepared_segment(sim: &SimDisk, segment_bytes: u64) {
    let prepared = Path::new(DIR).join("log").join(".next.seg");
    wait_until(10, "the prepared segment", || {
        let len = sim.open(&prepared, false).and_then(|f| f.len());
        len.is_ok_and(|len| len == segment_bytes) && sim.unsynced_writes() == 0
    });
}

fn check_fail_stop(inject: impl Fn(&SimDisk)) {
    let (sim, _index, opts, log) = open_sim(FsyncPolicy::Always, 1 << 20);
    let dir = Path::new(DIR);
    for n in 0..10 {
        log.append(n, vec![message(&format!("before{n}"), "a", 4, b"{}")])
            .unwrap();
    }
    wait_for_prepared_segment(&sim, 1 << 20);
    inject(&sim);
    let log = Arc::new(log);
    let results: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                log.append(100, vec![message(&format!("during{t}"), "a", 4, b"{}")])
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(
        results.iter().all(Result::is_err),
        "no append after the failure is acknowledged: {results:?}"
    );
    assert!(log.is_poisoned());
    let later = log.append(200, vec![message("later", "a", 4, b"{}")]);
    assert!(matches!(later, Err(Error::Poisoned)), "{later:?}");
    assert_eq!(
        log.durable_end(),
        Offset(10),
        "nothing past the failure becomes visible"
    );
    drop(log);

    sim.crash(TearMode::DropPending, 1);
    let (log, _) = Log::open(dir, opts).unwrap();
    assert!(log.durable_end() >= Offset(10));
    for n in 0..10u64 {
        assert_eq!(
            log.read(Offset(n)).unwrap().record,
            message(&format!("before{n}"), "a", 4, b"{}")
        );
    }
    log.append(300, vec![message("recovered", "a", 4, b"{}")])
        .unwrap();
}

#[test]
fn fsync_interval_syncs_in_the_background_without_further_appends() {
    let policy = FsyncPolicy::Interval(std::time::Duration::from_millis(20));
    let (sim, _index, opts, log) = open_sim(policy, 1 << 20);
    let dir = Path::new(DIR);
    let record = message("interval", "a", 4, b"{}");
    log.append(1, vec![record.clone()]).unwrap();
    wait_until(10, "the interval fsync", || sim.unsynced_writes() == 0);
    sim.crash(TearMode::DropPending, 0);
    drop(log);
    let (log, _) = Log::open(dir, opts).unwrap();
    assert_eq!(log.read(Offset(0)).unwrap().record, record);
}

#[test]
fn fsync_policy_parses_the_config_syntax() {
    let parse = |s: &str| s.parse::<FsyncPolicy>();
    assert_eq!(parse("always"), Ok(FsyncPolicy::Always));
    assert_eq!(parse("never"), Ok(FsyncPolicy::Never));
    let ms = std::time::Duration::from_millis;
    assert_eq!(parse("interval:250ms"), Ok(FsyncPolicy::Interval(ms(250))));
    assert_eq!(parse("interval:2s"), Ok(FsyncPolicy::Interval(ms(2000))));
    // The same durations as every other key (courier_storage::duration), hours included.
    assert_eq!(
        parse("interval:1h"),
        Ok(FsyncPolicy::Interval(ms(3_600_000)))
    );
    for bad in [
        "sometimes",
        "interval:",
        "interval:5",
        "interval:5x",
        "interval:ms",
    ] {
        assert!(parse(bad).is_err(), "{bad} must be refused");
    }
}

#[test]
fn fsync_error_fails_waiters_and_stops_all_writes() {
    check_fail_stop(|sim| sim.fail_sync(ErrorKind::Other));
}

#[test]
fn write_error_enospc_fails_waiters_and_stops_all_writes() {
    check_fail_stop(|sim| sim.fail_write(ErrorKind::StorageFull));
}

/// The preallocator's I/O is not the log's: when it fails, the log logs it, stops preparing
/// segments, and keeps appending and rolling into segments created plain.
#[test]
fn failed_preallocation_is_not_fatal() {
    for inject in [
        (|sim: &SimDisk| sim.fail_write(ErrorKind::StorageFull)) as fn(&SimDisk),
        |sim: &SimDisk| sim.fail_sync(ErrorKind::Other),
    ] {
        let sim = SimDisk::new();
        let index = index_tempdir();
        let opts = options(
            Arc::new(sim.clone()),
            FsyncPolicy::Always,
            600,
            index.path(),
        );
        // Reopening a log writes and syncs nothing, so the first write or fsync after the
        // injection is the preallocator's.
        drop(Log::open(Path::new(DIR), opts.clone()).unwrap());
        inject(&sim);
        let (log, _) = Log::open(Path::new(DIR), opts.clone()).unwrap();
        wait_until(10, "the preallocator to meet the failure", || {
            !sim.failure_pending()
        });
        let prepared = Path::new(DIR).join("log").join(".next.seg");
        wait_until(10, "the failed prepared segment to be removed", || {
            sim.open(&prepared, false).is_err()
        });
        let records: Vec<_> = (0..12)
            .map(|n| message(&format!("m{n}"), "a", 4, &crate::support::body(n, 150)))
            .collect();
        for (n, r) in records.iter().enumerate() {
            log.append(n as u64, vec![r.clone()]).unwrap();
        }
        assert!(!log.is_poisoned());
        assert!(
            log.segments().len() > 2,
            "the appends rolled into new segments"
        );
        drop(log);
        let (log, report) = Log::open(Path::new(DIR), opts).unwrap();
        assert_eq!(report.truncated, None);
        for (n, r) in records.iter().enumerate() {
            assert_eq!(&log.read(Offset(n as u64)).unwrap().record, r);
        }
    }
}

#[test]
fn write_error_during_a_roll_still_answers_every_request() {
    // Tiny segments: every batch of these requests rolls at least once. Without preallocation:
    // each roll wakes the preallocator, whose zero-fill would race the writer for the injected
    // failure (`failed_preallocation_is_not_fatal` covers that side).
    let sim = SimDisk::new();
    let index = index_tempdir();
    let opts = LogOptions {
        preallocate: false,
        ..options(
            Arc::new(sim.clone()),
            FsyncPolicy::Always,
            300,
            index.path(),
        )
    };
    let (log, _) = Log::open(Path::new(DIR), opts).unwrap();
    log.append(
        0,
        vec![message("first", "a", 4, &crate::support::body(0, 200))],
    )
    .unwrap();
    sim.fail_write(ErrorKind::StorageFull);
    let (tx, rx) = std::sync::mpsc::channel();
    for n in 0..8u64 {
        let tx = tx.clone();
        let records =
            (0..3).map(|i| message(&format!("r{n}-{i}"), "a", 4, &crate::support::body(n, 120)));
        log.submit(n, records.collect(), move |result| tx.send(result).unwrap());
    }
    drop(tx);
    for n in 0..8 {
        let result = rx.recv_timeout(std::time::Duration::from_secs(30));
        let result = result.unwrap_or_else(|e| panic!("request {n} never answered: {e}"));
        assert!(
            result.is_err(),
            "nothing after the failed write is acknowledged: {result:?}"
        );
    }
    assert!(log.is_poisoned());
}

/// A completion callback that panics (a bug in the log's user, whose state may now be half
/// changed) is fail-stop too: the log is poisoned, appends queued meanwhile and every later
/// one get an error instead of hanging, and a restart recovers every acknowledged append,
/// including the one whose callback panicked (it was durable).
#[test]
fn a_panicking_completion_callback_poisons_the_log() {
    let (sim, _index, opts, log) = open_sim(FsyncPolicy::Always, 1 << 20);
    let first = log
        .append(1, vec![message("before", "a", 4, b"{}")])
        .unwrap();
    log.submit(2, vec![message("panics", "a", 4, b"{}")], |result| {
        assert!(result.is_ok());
        panic!("a bug in the callback");
    });
    wait_until(10, "the log to be poisoned", || log.is_poisoned());
    let later = log.append(3, vec![message("after", "a", 4, b"{}")]);
    assert!(matches!(later, Err(Error::Poisoned)), "{later:?}");
    let (tx, rx) = std::sync::mpsc::channel();
    log.submit(4, vec![message("after", "a", 4, b"{}")], move |result| {
        tx.send(result.is_err()).unwrap();
    });
    assert!(rx.recv().unwrap(), "a later submit is refused");
    drop(log);
    sim.crash(TearMode::DropPending, 1);
    let (log, _) = Log::open(Path::new(DIR), opts).unwrap();
    assert_eq!(log.durable_end(), Offset(first.first.0 + 2));
    assert!(
        log.read(Offset(first.first.0 + 1)).is_ok(),
        "the panicking append is durable"
    );
}

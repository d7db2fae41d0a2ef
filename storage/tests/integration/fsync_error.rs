//! T9: an fsync or write error is fail-stop. Every append waiting on the failed batch gets an
//! error (never Ok), every later append gets `Poisoned`, nothing is retried; after a restart
//! every append acknowledged before the failure is intact.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;

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

fn check_fail_stop(inject: impl Fn(&SimDisk)) {
    let (sim, _index, opts, log) = open_sim(FsyncPolicy::Always, 1 << 20);
    let dir = Path::new(DIR);
    for n in 0..10 {
        log.append(n, vec![message(&format!("before{n}"), "a", 4, b"{}")])
            .unwrap();
    }
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
    for bad in ["sometimes", "interval:", "interval:5h", "interval:ms"] {
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

#[test]
fn write_error_during_a_roll_still_answers_every_request() {
    // Tiny segments: every batch of these requests rolls at least once.
    let (sim, _index, _, log) = open_sim(FsyncPolicy::Always, 300);
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

//! The log's everyday behaviour: rolls, reopening many segments, concurrent appenders and
//! readers, waking on appends, the record size limit, retention, and the directory lock.

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use courier_storage::{Error, Log, LogOptions, Offset, Record, Retention, Slot};

use crate::support::{append_concurrently, body, message, open_real};

#[test]
fn roll_and_reopen_with_many_segments_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1024);
    let records: Vec<Record> = (0..400)
        .map(|n| message(&format!("m{n}"), "a", 4, &body(n, 120)))
        .collect();
    for chunk in records.chunks(3) {
        log.append(7, chunk.to_vec()).unwrap();
    }
    let segments = log.segments();
    assert!(segments.len() > 50, "{} segments", segments.len());
    for pair in segments.windows(2) {
        assert!(
            pair[0].bytes <= 1024,
            "a segment never grows past segment_bytes"
        );
        assert!(pair[0].base < pair[1].base);
    }
    drop(log);
    let (log, report) = Log::open(
        dir.path(),
        LogOptions {
            segment_bytes: 1024,
            ..LogOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.segments, segments.len());
    assert_eq!(
        report.replayed_records, 0,
        "a clean close leaves a current checkpoint"
    );
    assert_eq!(report.next_offset, Offset(400));
    for (i, r) in records.iter().enumerate() {
        assert_eq!(&log.read(Offset(i as u64)).unwrap().record, r);
    }
    assert!(matches!(log.read(Offset(400)), Err(Error::NotFound(400))));
}

/// Offsets in the orders a reader asks for them: ascending (one receive), descending,
/// scattered with repeats, and past the end.
fn read_orders(count: u64) -> Vec<Vec<Offset>> {
    let ascending: Vec<Offset> = (0..count).map(Offset).collect();
    let descending = ascending.iter().rev().copied().collect();
    let scattered = (0..count * 2)
        .map(|i| Offset((i * 7919) % (count + 3)))
        .collect();
    vec![
        ascending,
        descending,
        scattered,
        vec![Offset(count), Offset(0)],
    ]
}

fn assert_reads_agree(log: &Log, count: u64) {
    for offsets in read_orders(count) {
        let many = log.read_many(&offsets);
        let recent = log.read_many_recent(&offsets);
        assert_eq!(many.len(), offsets.len());
        assert_eq!(recent.len(), offsets.len());
        for ((offset, many), recent) in offsets.iter().zip(many).zip(recent) {
            let one = log.read(*offset);
            match (&one, &many) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "offset {offset:?}"),
                (Err(Error::NotFound(a)), Err(Error::NotFound(b))) => assert_eq!(a, b),
                other => panic!("offset {offset:?}: read and read_many differ: {other:?}"),
            }
            // What can be read without sled is read the same; the rest is left to sled.
            if let Some(recent) = recent {
                assert_eq!(recent.ok(), one.ok(), "offset {offset:?}");
            }
        }
    }
}

#[test]
fn read_many_reads_what_read_reads_in_any_order_across_runs_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 2048);
    let count = 300u64;
    for chunk in (0..count).collect::<Vec<_>>().chunks(7) {
        let records = chunk
            .iter()
            .map(|n| {
                message(
                    &format!("m{n}"),
                    "a",
                    4,
                    &body(*n, 60 + (*n as usize % 5) * 40),
                )
            })
            .collect();
        log.append(7, records).unwrap();
    }
    assert!(log.segments().len() > 10);
    // Before a checkpoint (runs in memory), then from sled after a reopen.
    assert_reads_agree(&log, count);
    drop(log);
    let log = open_real(dir.path(), 2048);
    assert_reads_agree(&log, count);
}

#[test]
fn concurrent_appenders_and_readers_see_whole_records_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open_real(dir.path(), 16 * 1024));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while seen < 800 {
                    let end = log
                        .wait_past(Offset(seen.saturating_sub(1)), Duration::from_secs(10))
                        .0;
                    for o in seen..end {
                        assert!(matches!(
                            log.read(Offset(o)).unwrap().record,
                            Record::Message(_)
                        ));
                    }
                    seen = end;
                }
                seen
            })
        })
        .collect();
    let acked = append_concurrently(&log, 8, 100, |t, n| {
        message(&format!("t{t}-{n}"), "a", 4, &body(t * 1000 + n, 200))
    });
    assert_eq!(acked.len(), 800, "every append is acknowledged");
    let mut all = BTreeMap::new();
    for (offset, r) in acked {
        assert!(
            all.insert(offset, r).is_none(),
            "offset {offset} given twice"
        );
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), 800);
    }
    assert_eq!(
        all.keys().copied().collect::<Vec<_>>(),
        (0..800).collect::<Vec<_>>()
    );
    for (offset, r) in &all {
        assert_eq!(&log.read(Offset(*offset)).unwrap().record, r);
    }
}

#[test]
fn durable_listener_and_waiter_wake_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open_real(dir.path(), 1 << 20));
    let (tx, rx) = mpsc::channel();
    log.on_durable(move |end| tx.send(end).unwrap());
    let waiter = {
        let log = log.clone();
        std::thread::spawn(move || log.wait_past(Offset(0), Duration::from_secs(30)))
    };
    log.append(
        1,
        vec![message("a", "a", 4, b"{}"), message("b", "a", 4, b"{}")],
    )
    .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), Offset(2));
    assert_eq!(waiter.join().unwrap(), Offset(2));
}

#[test]
fn record_over_the_limit_fails_alone_and_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        max_record_bytes: 1000,
        ..LogOptions::default()
    };
    let (log, _) = Log::open(dir.path(), opts).unwrap();
    let log = Arc::new(log);
    let (tx, rx) = mpsc::channel();
    for (n, size) in [(0u64, 100usize), (1, 5000), (2, 100)] {
        let tx = tx.clone();
        let records = vec![
            message("ok", "a", 4, b"{}"),
            message("x", "a", 4, &body(n, size)),
        ];
        log.submit(n, records, move |r| tx.send((n, r)).unwrap());
    }
    let mut results: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
    results.sort_by_key(|(n, _)| *n);
    assert!(
        matches!(
            results[1].1,
            Err(Error::TooLarge {
                max_bytes: 1000,
                ..
            })
        ),
        "{:?}",
        results[1].1
    );
    let firsts: Vec<u64> = [&results[0].1, &results[2].1]
        .iter()
        .map(|r| r.as_ref().unwrap().first.0)
        .collect();
    assert_eq!(firsts, vec![0, 2], "the rejected request took no offsets");
    assert_eq!(log.durable_end(), Offset(4));
}

#[test]
fn retention_by_bytes_keeps_segments_with_pending_messages() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1024);
    log.append(
        1,
        vec![Record::Subscribed {
            agent: "a".into(),
            topic: "t".into(),
            start: Offset(0),
        }],
    )
    .unwrap();
    for n in 0..60u64 {
        log.append(1, vec![message(&format!("m{n}"), "a", 4, &body(n, 150))])
            .unwrap();
    }
    // Ack everything below offset 30; the message at 30 stays pending.
    let acked: Vec<Slot> = (1..30)
        .map(|o| Slot {
            offset: Offset(o),
            priority: 4,
        })
        .collect();
    log.append(
        2,
        vec![Record::Acked {
            inbox: "a".into(),
            slots: acked,
        }],
    )
    .unwrap();
    let before = log.segments();
    let pinned = before.iter().rfind(|s| s.base <= Offset(30)).unwrap().base;
    let deleted = log
        .enforce_retention(
            Retention {
                max_bytes: Some(1),
                max_age_ms: None,
            },
            10,
        )
        .unwrap();
    assert!(!deleted.is_empty());
    let after = log.segments();
    assert_eq!(
        after[0].base, pinned,
        "the segment holding the pending message is kept"
    );
    assert!(deleted.iter().all(|p| !p.exists()));
    assert!(matches!(log.read(Offset(0)), Err(Error::NotFound(0))));
    assert_eq!(
        log.read(Offset(30)).unwrap().record,
        message("m29", "a", 4, &body(29, 150))
    );
    assert_eq!(
        log.index().subscriptions().unwrap().len(),
        1,
        "registrations outlive their segment"
    );
    let live = log.index().snapshot().unwrap();
    drop(log);
    assert_rebuilt_equal(dir.path(), &live, after.len());
}

/// Deletes the index, reopens, and compares the delivery state with `live`.
fn assert_rebuilt_equal(
    dir: &std::path::Path,
    live: &courier_storage::IndexSnapshot,
    segments: usize,
) {
    std::fs::remove_dir_all(dir.join("index")).unwrap();
    let opts = LogOptions {
        segment_bytes: 1024,
        ..LogOptions::default()
    };
    let (log, report) = Log::open(dir, opts).unwrap();
    assert_eq!(report.segments, segments);
    let rebuilt = log.index().snapshot().unwrap();
    assert_eq!(rebuilt.inboxes, live.inboxes);
    assert_eq!(rebuilt.subscriptions, live.subscriptions);
}

#[test]
fn retention_by_age_deletes_expired_segments_and_their_pending_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1024);
    for n in 0..40u64 {
        log.append(
            1_000 + n,
            vec![message(&format!("m{n}"), "a", 4, &body(n, 150))],
        )
        .unwrap();
    }
    log.append(100_000, vec![message("new", "a", 4, &body(99, 150))])
        .unwrap();
    let segments = log.segments().len();
    let deleted = log
        .enforce_retention(
            Retention {
                max_bytes: None,
                max_age_ms: Some(50_000),
            },
            100_000,
        )
        .unwrap();
    assert_eq!(
        deleted.len(),
        segments - 1,
        "every sealed segment was older than max_age"
    );
    let first_kept = log.segments()[0].base;
    let pending: Vec<u64> = log
        .index()
        .inbox("a")
        .map(|e| e.unwrap().slot.offset.0)
        .collect();
    assert!(
        pending.iter().all(|o| *o >= first_kept.0),
        "expired messages leave the inbox: {pending:?}"
    );
    assert!(!pending.is_empty());
}

#[test]
fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1 << 20);
    let err = Log::open(dir.path(), LogOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(log);
    Log::open(dir.path(), LogOptions::default()).unwrap();
}

/// With preallocation (the default), a roll renames the zero-filled `log/.next.seg` into
/// place and cuts the sealed segment to its records: sealed files are exactly their records,
/// the active one is the full segment size while `segments()` reports its records, `verify`
/// is clean, and a reopen finds no torn tail and every record.
#[test]
fn segments_are_preallocated_and_cut_to_their_records_when_sealed() {
    const SEGMENT: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let prepared = dir.path().join("log").join(".next.seg");
    let log = open_real(dir.path(), SEGMENT);
    let mut records = Vec::new();
    while log.segments().len() < 4 {
        crate::support::wait_until(10, "a prepared segment", || prepared.exists());
        append_until_roll(&log, &mut records);
    }
    let segments = log.segments();
    for (i, s) in segments.iter().enumerate() {
        let file_len = std::fs::metadata(&s.path).unwrap().len();
        if i + 1 < segments.len() {
            assert_eq!(
                file_len,
                s.bytes,
                "sealed {} is cut to its records",
                s.path.display()
            );
        } else {
            assert_eq!(file_len, SEGMENT, "the active segment is preallocated");
            assert!(s.bytes < SEGMENT && s.bytes > 0);
        }
    }
    assert_verify_clean(dir.path(), &records);
    drop(log);
    assert!(
        !prepared.exists(),
        "a prepared file nobody took is removed at close"
    );
    assert_reopens_with(dir.path(), &records);
}

/// Appends 900-byte messages, each also pushed to `records`, until the log rolls.
fn append_until_roll(log: &Log, records: &mut Vec<Record>) {
    let before = log.segments().len();
    while log.segments().len() == before {
        let n = records.len() as u64;
        let record = message(&format!("m{n}"), "a", 4, &body(n, 900));
        log.append(1_000, vec![record.clone()]).unwrap();
        records.push(record);
    }
}

/// `verify` finds the log in `dir` clean and holding exactly `records`' count.
fn assert_verify_clean(dir: &std::path::Path, records: &[Record]) {
    let report = courier_storage::verify::verify(&courier_storage::io::FileDisk, dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.records(), records.len() as u64);
}

/// The log in `dir` reopens with no torn tail, and reads back `records` from offset 0.
fn assert_reopens_with(dir: &std::path::Path, records: &[Record]) {
    let (log, report) = Log::open(dir, LogOptions::default()).unwrap();
    assert_eq!(report.truncated, None);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(&log.read(Offset(i as u64)).unwrap().record, r, "record {i}");
    }
}

/// The real file system, reporting as free space whatever the test sets.
#[derive(Debug)]
struct ReportedSpace(Arc<std::sync::atomic::AtomicU64>);

impl courier_storage::io::Disk for ReportedSpace {
    fn create_dir_all(&self, path: &std::path::Path) -> std::io::Result<()> {
        courier_storage::io::FileDisk.create_dir_all(path)
    }
    fn list_dir(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        courier_storage::io::FileDisk.list_dir(dir)
    }
    fn create(
        &self,
        path: &std::path::Path,
    ) -> std::io::Result<Box<dyn courier_storage::io::DiskFile>> {
        courier_storage::io::FileDisk.create(path)
    }
    fn open(
        &self,
        path: &std::path::Path,
        writable: bool,
    ) -> std::io::Result<Box<dyn courier_storage::io::DiskFile>> {
        courier_storage::io::FileDisk.open(path, writable)
    }
    fn remove_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        courier_storage::io::FileDisk.remove_file(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        courier_storage::io::FileDisk.rename(from, to)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        courier_storage::io::FileDisk.sync_dir(dir)
    }
    fn lock(&self, path: &std::path::Path) -> std::io::Result<courier_storage::io::DirLock> {
        courier_storage::io::FileDisk.lock(path)
    }
    fn available_bytes(&self, _dir: &std::path::Path) -> std::io::Result<Option<u64>> {
        Ok(Some(self.0.load(std::sync::atomic::Ordering::SeqCst)))
    }
}

/// While less than four segments' worth of space is free, segments are plain files (cut to
/// their records, no `.next.seg`); once space is free again, the preallocator prepares the
/// next segment after the following roll, and the log stays whole throughout.
#[test]
fn preallocation_pauses_while_space_is_low_and_resumes_after_a_roll() {
    const SEGMENT: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let prepared = dir.path().join("log").join(".next.seg");
    let free = Arc::new(std::sync::atomic::AtomicU64::new(SEGMENT));
    let options = LogOptions {
        disk: Arc::new(ReportedSpace(free.clone())),
        segment_bytes: SEGMENT,
        index_cache_bytes: 4 << 20,
        ..LogOptions::default()
    };
    let log = Log::open(dir.path(), options).unwrap().0;
    let mut records = Vec::new();
    for _ in 0..3 {
        append_until_roll(&log, &mut records);
    }
    assert!(!prepared.exists(), "nothing is prepared while space is low");
    let active = log.segments().last().unwrap().clone();
    assert_eq!(
        std::fs::metadata(&active.path).unwrap().len(),
        active.bytes,
        "a plain segment is only its records"
    );

    free.store(SEGMENT * 100, std::sync::atomic::Ordering::SeqCst);
    append_until_roll(&log, &mut records);
    crate::support::wait_until(10, "a prepared segment after the roll", || {
        prepared.exists()
    });
    append_until_roll(&log, &mut records);
    let active = log.segments().last().unwrap().clone();
    assert_eq!(
        std::fs::metadata(&active.path).unwrap().len(),
        SEGMENT,
        "the segment after space came back is preallocated"
    );
    drop(log);
    assert_verify_clean(dir.path(), &records);
    assert_reopens_with(dir.path(), &records);
}

//! T5: a torn tail (garbage after the last record, or the last record cut at any byte) is
//! truncated at open and reported with segment, offset and bytes dropped; every earlier
//! record is intact and the log takes appends again.

use std::io::Write;
use std::path::{Path, PathBuf};

use courier_storage::{Log, Offset, Record};

use crate::support::{body, capture_logs, copy_dir, message, open_real, Rng};

const RECORDS: u64 = 20;

fn build(dir: &Path) -> (Vec<Record>, PathBuf, u64) {
    let log = open_real(dir, 64 << 20);
    let records: Vec<Record> = (0..RECORDS)
        .map(|n| message(&format!("m{n}"), "a", 4, &body(n, 80)))
        .collect();
    for r in &records {
        log.append(1_000, vec![r.clone()]).unwrap();
    }
    let last = log.index().location(Offset(RECORDS - 1)).unwrap().unwrap();
    let segment = log.segments().last().unwrap().path.clone();
    drop(log);
    (records, segment, last.position)
}

fn check_intact(log: &Log, records: &[Record]) {
    assert_eq!(log.durable_end().0, records.len() as u64);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(&log.read(Offset(i as u64)).unwrap().record, r, "record {i}");
    }
    let next = log
        .append(2_000, vec![message("after", "a", 4, b"{}")])
        .unwrap();
    assert_eq!(
        next.first.0,
        records.len() as u64,
        "appends continue right after the valid records"
    );
}

#[test]
fn torn_tail_garbage_of_any_length_is_truncated_and_reported() {
    let clean = tempfile::tempdir().unwrap();
    let (records, segment, _) = build(clean.path());
    let clean_len = std::fs::metadata(&segment).unwrap().len();
    let header = courier_storage::record::HEADER_BYTES as u64;
    let mut rng = Rng(7);
    for garbage in [1, 7, 37, header - 1, header, header + 1, 4096, 1 << 20] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(clean.path(), dir.path());
        let target = dir.path().join("log").join(segment.file_name().unwrap());
        let bytes: Vec<u8> = (0..garbage)
            .map(|_| u8::try_from(rng.below(255)).unwrap() + 1)
            .collect();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&target)
            .unwrap()
            .write_all(&bytes)
            .unwrap();

        let ((log, report), logs) =
            capture_logs(|| Log::open(dir.path(), Default::default()).unwrap());
        let t = report.truncated.expect("the torn tail is reported");
        let line = logs
            .lines()
            .find(|l| l.contains("truncated torn tail"))
            .expect("a log line");
        for field in [
            format!("segment={}", target.display()),
            format!("offset={RECORDS}"),
            format!("bytes_dropped={garbage}"),
        ] {
            assert!(line.contains(&field), "log line {line:?} lacks {field}");
        }
        assert_eq!(t.segment, target);
        assert_eq!(t.position, clean_len);
        assert_eq!(t.offset, Offset(RECORDS));
        assert_eq!(t.bytes_dropped, garbage, "garbage of {garbage} bytes");
        check_intact(&log, &records[..]);
        drop(log);
        let (_, again) = Log::open(dir.path(), Default::default()).unwrap();
        assert_eq!(again.truncated, None, "a repaired tail stays repaired");
    }
}

#[test]
fn torn_tail_cut_at_every_byte_of_the_last_record_is_truncated() {
    let clean = tempfile::tempdir().unwrap();
    let (records, segment, last_position) = build(clean.path());
    let clean_len = std::fs::metadata(&segment).unwrap().len();
    for cut in 1..clean_len - last_position {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(clean.path(), dir.path());
        let target = dir.path().join("log").join(segment.file_name().unwrap());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        file.set_len(last_position + cut).unwrap();
        drop(file);

        let (log, report) = Log::open(dir.path(), Default::default()).unwrap();
        let t = report.truncated.expect("the cut record is reported");
        assert_eq!(
            (t.position, t.bytes_dropped),
            (last_position, cut),
            "cut {cut}"
        );
        assert!(
            report.index_rebuilt,
            "the index knew the cut record, so it is rebuilt"
        );
        check_intact(&log, &records[..records.len() - 1]);
    }
}

/// Zeros after the newest segment's records are preallocated space (or a crash before an
/// extended file's data was written): kept, not reported, written over by the next appends.
#[test]
fn zero_tail_of_the_newest_segment_is_kept_and_written_over() {
    let clean = tempfile::tempdir().unwrap();
    let (records, segment, _) = build(clean.path());
    let clean_len = std::fs::metadata(&segment).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(clean_len + 5000).unwrap();
    drop(file);
    let (log, report) = Log::open(clean.path(), Default::default()).unwrap();
    assert_eq!(report.truncated, None, "zeros are not a torn tail");
    assert_eq!(log.segments().last().unwrap().bytes, clean_len);
    check_intact(&log, &records);
    drop(log);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), clean_len + 5000);
    let report =
        courier_storage::verify::verify(&courier_storage::io::FileDisk, clean.path()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let (log, report) = Log::open(clean.path(), Default::default()).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(
        log.durable_end().0,
        RECORDS + 1,
        "the append after them survived a reopen"
    );
}

/// Zeroes the bytes from `from` to the next 4 KiB page boundary, as a crash leaves a page
/// that was never written back, and returns that boundary.
fn unwrite_page_rest(segment: &Path, from: u64) -> u64 {
    let boundary = (from / 4096 + 1) * 4096;
    let mut bytes = std::fs::read(segment).unwrap();
    let end = usize::try_from(boundary).unwrap();
    assert!(end < bytes.len(), "valid records follow the page");
    bytes[usize::try_from(from).unwrap()..end].fill(0);
    std::fs::write(segment, bytes).unwrap();
    boundary
}

#[test]
fn unwritten_pages_in_the_newest_segment_end_it_as_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 64 << 20);
    let records: Vec<Record> = (0..60)
        .map(|n| message(&format!("m{n}"), "a", 4, &body(n, 200)))
        .collect();
    for r in &records {
        log.append(1_000, vec![r.clone()]).unwrap();
    }
    // The first record that starts inside the second page and not on its boundary.
    let k = (0..60u64)
        .find(|&n| {
            let p = log.index().location(Offset(n)).unwrap().unwrap().position;
            p > 4096 && !p.is_multiple_of(4096)
        })
        .unwrap();
    let at = log.index().location(Offset(k)).unwrap().unwrap().position;
    let segment = log.segments().last().unwrap().path.clone();
    let file_len = std::fs::metadata(&segment).unwrap().len();
    drop(log);
    unwrite_page_rest(&segment, at);
    let tail = std::fs::read(&segment).unwrap()[usize::try_from(at).unwrap()..].to_vec();

    let report =
        courier_storage::verify::verify(&courier_storage::io::FileDisk, dir.path()).unwrap();
    assert_eq!(report.corruption().count(), 0, "{:?}", report.problems);
    assert_eq!(
        report.problems.len(),
        1,
        "one torn tail: {:?}",
        report.problems
    );
    assert_eq!(report.records(), k);

    let ((log, report), logs) = capture_logs(|| Log::open(dir.path(), Default::default()).unwrap());
    let t = report.truncated.expect("reported as a torn tail");
    assert_eq!((t.position, t.offset), (at, Offset(k)));
    assert_eq!(t.bytes_dropped, file_len - at);
    assert!(t.reason.contains("never written back"), "{}", t.reason);
    assert!(logs.contains("truncated torn tail"), "{logs}");
    let kept = t.quarantined.expect("a tail after unwritten pages is kept");
    assert!(
        kept.starts_with(dir.path().join("quarantine")),
        "{}",
        kept.display()
    );
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        tail,
        "the dropped bytes, whole"
    );
    check_intact(&log, &records[..usize::try_from(k).unwrap()]);
}

#[test]
fn unwritten_pages_in_a_sealed_segment_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 16 * 1024);
    let records: Vec<Record> = (0..150)
        .map(|n| message(&format!("m{n}"), "a", 4, &body(n, 200)))
        .collect();
    for r in &records {
        log.append(1_000, vec![r.clone()]).unwrap();
    }
    let sealed = log.segments().first().unwrap().path.clone();
    assert!(log.segments().len() >= 2);
    let at = log.index().location(Offset(20)).unwrap().unwrap().position;
    drop(log);
    unwrite_page_rest(&sealed, at);

    let report =
        courier_storage::verify::verify(&courier_storage::io::FileDisk, dir.path()).unwrap();
    let problem = report
        .corruption()
        .next()
        .expect("corruption in a sealed segment");
    assert_eq!((&problem.segment, problem.position), (&sealed, at));
    let error = Log::open(dir.path(), Default::default()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("{} at byte {at}", sealed.display())),
        "{error}"
    );
}

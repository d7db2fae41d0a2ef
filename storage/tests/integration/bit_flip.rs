//! T6: a flipped bit in any record that is not the last (header fields or payload, sealed or
//! active segment) is detected: open refuses naming segment and position, `verify` reports
//! it, `repair` moves the bytes to `quarantine/`, and afterwards verify is clean and every
//! undamaged record is still there. Never a silent truncation.

use std::path::{Path, PathBuf};

use courier_storage::io::FileDisk;
use courier_storage::record::{
    HEADER_BYTES, LENGTH_POSITION, OFFSET_POSITION, TIMESTAMP_POSITION, VERSION_POSITION,
};
use courier_storage::verify::{repair, verify};
use courier_storage::{Error, Log, Offset, Record};

use crate::support::{body, copy_dir, message, open_real};

struct Target {
    offset: u64,
    segment: PathBuf,
    position: u64,
    len: u64,
}

fn build(dir: &Path) -> (Vec<Record>, Vec<Target>, usize) {
    let log = open_real(dir, 2048);
    let records: Vec<Record> = (0..60)
        .map(|n| message(&format!("m{n}"), "a", 4, &body(n, 100)))
        .collect();
    for r in &records {
        log.append(1_000, vec![r.clone()]).unwrap();
    }
    let segments = log.segments();
    let path_of = |base: Offset| {
        segments
            .iter()
            .find(|s| s.base == base)
            .unwrap()
            .path
            .clone()
    };
    let mut targets = Vec::new();
    for offset in 0..records.len() as u64 - 1 {
        let loc = log.index().location(Offset(offset)).unwrap().unwrap();
        targets.push(Target {
            offset,
            segment: path_of(loc.segment),
            position: loc.position,
            len: loc.len,
        });
    }
    let count = segments.len();
    drop(log);
    (records, targets, count)
}

#[test]
fn bit_flip_anywhere_but_the_tail_is_refused_reported_and_repaired() {
    let clean = tempfile::tempdir().unwrap();
    let (records, targets, segments) = build(clean.path());
    assert!(segments >= 3, "the log spans several segments");
    let newest = targets.iter().map(|t| t.segment.clone()).max().unwrap();
    // First and middle records of every segment, and the second-to-last record of all.
    let mut chosen: Vec<&Target> = Vec::new();
    for t in &targets {
        let first_of_segment = t.position == 0;
        if first_of_segment || t.offset % 7 == 3 || t.offset + 2 == records.len() as u64 {
            chosen.push(t);
        }
    }
    assert!(
        chosen.iter().any(|t| t.segment == newest),
        "the active segment is covered"
    );
    let fields = [
        0,
        VERSION_POSITION,
        LENGTH_POSITION + 1,
        OFFSET_POSITION,
        TIMESTAMP_POSITION + 3,
        HEADER_BYTES + 5,
    ];
    let mut cases = 0;
    for target in chosen {
        for (i, field) in fields.iter().enumerate() {
            let byte = (target.position + *field as u64).min(target.position + target.len - 1);
            check_flip(clean.path(), &records, target, byte, 1 << (i % 8));
            cases += 1;
        }
    }
    eprintln!("{cases} bit flips detected, refused and repaired");
}

fn check_flip(clean: &Path, records: &[Record], target: &Target, byte: u64, mask: u8) {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(clean, dir.path());
    let segment = dir
        .path()
        .join("log")
        .join(target.segment.file_name().unwrap());
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[usize::try_from(byte).unwrap()] ^= mask;
    std::fs::write(&segment, &bytes).unwrap();
    let what = format!("offset {} byte {byte}", target.offset);

    match Log::open(dir.path(), Default::default()) {
        Err(Error::Corrupt {
            segment: s,
            position,
            ..
        }) => {
            assert_eq!(
                (s, position),
                (segment.clone(), target.position),
                "{what}: named exactly"
            );
        }
        other => panic!("{what}: open must refuse, got {:?}", other.map(|(_, r)| r)),
    }
    let report = verify(&FileDisk, dir.path()).unwrap();
    let problems: Vec<_> = report.corruption().collect();
    assert_eq!(problems.len(), 1, "{what}: {problems:?}");
    assert_eq!(
        (problems[0].segment.clone(), problems[0].position),
        (segment.clone(), target.position)
    );
    assert_eq!(problems[0].lost, target.offset..target.offset + 1);

    let moved = repair(&FileDisk, dir.path(), &dir.path().join("index")).unwrap();
    assert_eq!(moved.len(), 1);
    let quarantined = std::fs::read(&moved[0].file).unwrap();
    let start = usize::try_from(target.position).unwrap();
    assert_eq!(
        quarantined,
        bytes[start..start + quarantined.len()],
        "{what}: the damaged bytes are kept"
    );
    assert!(
        verify(&FileDisk, dir.path()).unwrap().is_clean(),
        "{what}: clean after repair"
    );

    let (log, _) = Log::open(dir.path(), Default::default()).unwrap();
    for (i, r) in records.iter().enumerate() {
        let frame = log.read(Offset(i as u64)).unwrap();
        if i as u64 == target.offset {
            assert!(
                matches!(frame.record, Record::Quarantined { .. }),
                "{what}: placeholder"
            );
        } else {
            assert_eq!(&frame.record, r, "{what}: record {i} survives the repair");
        }
    }
}

#[test]
fn repair_refuses_while_the_log_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1 << 20);
    let err = repair(&FileDisk, dir.path(), &dir.path().join("index")).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(log);
}

#[test]
fn repair_refuses_a_missing_segment_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, segments) = build(dir.path());
    assert!(segments >= 3);
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    std::fs::remove_file(&files[1]).unwrap();
    let report = verify(&FileDisk, dir.path()).unwrap();
    assert_eq!(report.corruption().count(), 1, "{:?}", report.problems);
    let before: Vec<Vec<u8>> = files
        .iter()
        .filter(|p| p.exists())
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let err = repair(&FileDisk, dir.path(), &dir.path().join("index")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    let after: Vec<Vec<u8>> = files
        .iter()
        .filter(|p| p.exists())
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(before, after, "a refused repair changes nothing");
    assert!(!dir.path().join("quarantine").exists());
    let err = Log::open(dir.path(), Default::default()).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { .. }),
        "the gap refuses the open too: {err}"
    );
}

/// Encoded records laid out so that record 1 starts `gap` bytes before the first 4 KiB page
/// boundary, with valid records after the boundary. Returns the bytes and record 1's start.
fn straddling_layout(gap: u64) -> (Vec<u8>, u64) {
    use courier_storage::record::encode_to_vec;
    let target = 4096 - gap;
    let len_with = |n: usize| encode_to_vec(Offset(0), 1, &message("m0", "a", 4, &body(0, n)));
    let first = (1..4096)
        .map(|n| len_with(n).unwrap())
        .find(|f| f.len() as u64 == target)
        .expect("some body length puts record 1 there");
    let mut bytes = first;
    for n in 1..6u64 {
        bytes.extend(encode_to_vec(Offset(n), 1, &message("m", "a", 4, &body(n, 300))).unwrap());
    }
    (bytes, target)
}

/// A flipped bit is never taken for pages that were never written back, not even in a
/// record that starts a few bytes before a page boundary, where "zeros up to the boundary" is
/// the sign of such a page: every flip of every header bit stays corruption.
#[test]
fn bit_flips_next_to_a_page_boundary_are_never_taken_for_unwritten_pages() {
    use courier_storage::io::Disk;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("00000000000000000000.seg");
    for gap in 1..=HEADER_BYTES as u64 + 4 {
        let (clean, start) = straddling_layout(gap);
        for byte in start..start + HEADER_BYTES as u64 {
            for bit in 0..8 {
                let mut bytes = clean.clone();
                bytes[usize::try_from(byte).unwrap()] ^= 1 << bit;
                std::fs::write(&path, &bytes).unwrap();
                let file = FileDisk.open(&path, false).unwrap();
                let scan =
                    courier_storage::segment::scan(file.as_ref(), Offset(0), false, None).unwrap();
                let damage = scan.damage.first().unwrap_or_else(|| {
                    panic!("gap {gap}, byte {byte}, bit {bit}: the flip is damage before valid records")
                });
                assert!(
                    !damage.unwritten,
                    "gap {gap}, byte {byte}, bit {bit}: taken for unwritten pages"
                );
            }
        }
    }
}

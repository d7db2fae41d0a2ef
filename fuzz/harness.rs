//! The fuzz targets' bodies, one function per target, shared by the cargo-fuzz binaries
//! (`fuzz/fuzz_targets/`, nightly) and the corpus replay test of the main workspace
//! (`tests/integration/fuzz_corpus.rs`, stable), which includes this file by path.
//!
//! Each takes arbitrary bytes and must not panic; where the input is accepted, it also checks
//! a property of the result (asserts, which the fuzzer reports as crashes).

use std::io;
use std::path::Path;

use courier_storage::io::DiskFile;
use courier_storage::record::{self, Decoded};
use courier_storage::segment;
use courier_storage::Offset;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("record_decode", record_decode),
    ("segment_scan", segment_scan),
    ("publish_validation", publish_validation),
    ("config_parse", config_parse),
];

/// The record decoder: a frame it accepts re-encodes to a frame that decodes to itself.
pub fn record_decode(data: &[u8]) {
    if let Decoded::Record(frame, len) = record::decode(data) {
        assert!(len <= data.len(), "a frame longer than its input");
        let again = record::encode_to_vec(frame.offset, frame.timestamp_ms, &frame.record)
            .expect("a decoded record encodes");
        match record::decode(&again) {
            Decoded::Record(twice, n) => {
                assert_eq!(twice, frame, "re-encoding changed the record");
                assert_eq!(n, again.len());
            }
            other => panic!("a re-encoded record does not decode: {other:?}"),
        }
    }
}

/// A segment file's bytes in memory.
#[derive(Debug)]
struct MemFile(Vec<u8>);

impl DiskFile for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        let start = usize::try_from(position).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The segment scanner (recovery and `verify`): whatever the bytes, the scan's account of the
/// file is consistent: valid records are consecutive and inside the file, damaged regions are
/// inside it, in order, and do not overlap the records.
pub fn segment_scan(data: &[u8]) {
    let file = MemFile(data.to_vec());
    let base = Offset(0);
    let mut seen = Vec::new();
    let mut visit = |frame: &record::Frame, position: u64, len: u64| {
        seen.push((frame.offset.0, position, len));
        Ok(())
    };
    let scan = segment::scan(&file, base, true, Some(&mut visit)).expect("memory never fails");
    let file_bytes = data.len() as u64;
    assert_eq!(scan.file_bytes, file_bytes);
    assert!(scan.valid_end <= file_bytes);
    assert_eq!(scan.records, seen.len() as u64);
    // Every offset up to the next one is accounted for: a valid record or a lost one.
    let lost: u64 = scan.damage.iter().map(|d| d.lost.end - d.lost.start).sum();
    assert_eq!(scan.next_offset.0, base.0 + scan.records + lost);
    let mut end = 0;
    let mut next = base.0;
    for &(offset, position, len) in &seen {
        assert!(position >= end, "records overlap");
        assert!(position + len <= file_bytes, "a record past the end");
        assert!(offset >= next, "offsets go backwards");
        end = position + len;
        next = offset + 1;
    }
    let mut after = 0;
    for damage in &scan.damage {
        assert!(damage.position >= after, "damaged regions out of order");
        assert!(damage.position + damage.len <= file_bytes);
        after = damage.position + damage.len;
    }
    // Without `continue_after_damage` (recovery), the scan agrees up to its first damage.
    let quick = segment::scan(&file, base, false, None).expect("memory never fails");
    if scan.damage.is_empty() {
        assert_eq!(quick.records, scan.records);
        assert_eq!(quick.valid_end, scan.valid_end);
    }
}

/// Publish validation: the API's parse and checks of one message, with the default limits.
/// What they accept has a valid address (or is a reply without one) and a body that is valid JSON, stored as given, and
/// nested no deeper than `limits.max_json_depth`.
pub fn publish_validation(data: &[u8]) {
    static LIMITS: std::sync::OnceLock<courier::config::Limits> = std::sync::OnceLock::new();
    let limits = LIMITS.get_or_init(|| {
        let config = courier::config::RawConfig::defaults().validate();
        config.expect("the defaults are valid").limits
    });
    let checked = courier::api::error::parse_json::<courier::api::wire::PublishBody>(data)
        .and_then(|body| body.into_outgoing(None, limits));
    if let Ok(outgoing) = checked {
        let message = &outgoing.message;
        serde_json::from_slice::<serde::de::IgnoredAny>(&message.body)
            .expect("an accepted body is valid JSON");
        let text = std::str::from_utf8(&message.body).expect("JSON is UTF-8");
        let depth = courier::api::wire::json_depth(text, usize::MAX);
        assert!(
            depth <= limits.max_json_depth as usize,
            "accepted {depth} deep"
        );
        assert!(message.priority <= 9);
        match &outgoing.to {
            Some(to) => assert_eq!(
                courier::ids::Address::parse(&message.to).as_ref(),
                Ok(to),
                "the stored address is the one routed"
            ),
            // Only a reply may leave `to` out: it goes to the request's sender.
            None => assert!(message.in_reply_to.is_some() && message.to.is_empty()),
        }
    }
}

/// The configuration parser: any TOML text either fails with an error or gives a checked
/// configuration; an accepted one has sane limits.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut raw = courier::config::RawConfig::defaults();
    if raw.merge_toml(text, Path::new("fuzz.toml")).is_err() {
        return;
    }
    if let Ok(config) = raw.validate() {
        assert!(config.segment_bytes >= 4096);
        assert!(config.limits.max_message_bytes > 0);
    }
}

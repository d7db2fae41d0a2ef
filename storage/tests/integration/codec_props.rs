//! The record codec: every record decodes to itself; every truncation and every single-bit
//! flip is detected; arbitrary bytes never panic the decoder.

use courier_storage::record::{self, Decoded, HEADER_BYTES};
use courier_storage::{
    Agent, Backfill, DeadLetter, DeadReason, Lease, Message, Offset, Record, Release, Slot,
};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9:._-]{0,24}").unwrap()
}

fn slot() -> impl Strategy<Value = Slot> {
    (any::<u64>(), 0u8..10).prop_map(|(o, p)| Slot {
        offset: Offset(o),
        priority: p,
    })
}

fn message() -> impl Strategy<Value = Message> {
    (
        (
            text(),
            text(),
            text(),
            proptest::collection::vec(text(), 0..4),
            proptest::option::of(text()),
        ),
        (
            0u8..10,
            proptest::collection::vec((text(), text()), 0..4),
            proptest::option::of(text()),
        ),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(text()),
        ),
        proptest::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(
            |(
                (id, from, to, destinations, kind),
                (priority, headers, corr),
                (nb, exp, key),
                body,
            )| {
                Message {
                    id,
                    from,
                    to,
                    destinations,
                    kind,
                    priority,
                    headers,
                    correlation_id: corr.clone(),
                    in_reply_to: corr,
                    not_before_ms: nb,
                    expires_at_ms: exp,
                    dedupe_until_ms: nb,
                    body,
                    ordering_key: key,
                    request_until_ms: exp,
                }
            },
        )
}

#[expect(clippy::too_many_lines, reason = "one strategy per record variant")]
fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        message().prop_map(Record::Message),
        (
            text(),
            proptest::collection::vec((slot(), any::<u32>(), any::<u64>()), 0..5)
        )
            .prop_map(|(inbox, l)| {
                let leases = l.into_iter().map(|(slot, attempt, deadline_ms)| Lease {
                    slot,
                    attempt,
                    deadline_ms,
                });
                Record::Leased {
                    inbox,
                    leases: leases.collect(),
                }
            }),
        (
            text(),
            text(),
            proptest::collection::vec((slot(), any::<u32>(), any::<u64>()), 0..5)
        )
            .prop_map(|(queue, agent, l)| {
                let leases = l.into_iter().map(|(slot, attempt, deadline_ms)| Lease {
                    slot,
                    attempt,
                    deadline_ms,
                });
                Record::LeasedTo {
                    queue,
                    agent,
                    leases: leases.collect(),
                }
            }),
        (text(), proptest::collection::vec(slot(), 0..5))
            .prop_map(|(inbox, slots)| Record::Acked { inbox, slots }),
        (
            text(),
            proptest::collection::vec((slot(), any::<u64>()), 0..5)
        )
            .prop_map(|(inbox, r)| {
                let releases = r.into_iter().map(|(slot, not_before_ms)| Release {
                    slot,
                    not_before_ms,
                });
                Record::Released {
                    inbox,
                    releases: releases.collect(),
                }
            }),
        (
            text(),
            proptest::collection::vec((slot(), any::<u32>()), 0..5)
        )
            .prop_map(|(inbox, d)| {
                let letters = d.into_iter().map(|(slot, attempts)| DeadLetter {
                    slot,
                    reason: DeadReason::Expired,
                    attempts,
                });
                Record::DeadLettered {
                    inbox,
                    letters: letters.collect(),
                }
            }),
        (text(), proptest::collection::vec(slot(), 0..5))
            .prop_map(|(inbox, slots)| Record::Redriven { inbox, slots }),
        (
            text(),
            proptest::collection::vec(text(), 0..3),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, capabilities, n)| {
                Record::AgentUpserted(Agent {
                    id,
                    capabilities,
                    metadata: b"{}".to_vec(),
                    lease_ms: n.map(u64::from),
                    max_attempts: n,
                    max_in_flight: n,
                    token_hash: None,
                })
            }),
        text().prop_map(|agent| Record::AgentDeleted { agent }),
        (text(), text(), any::<u64>()).prop_map(|(agent, topic, s)| Record::Subscribed {
            agent,
            topic,
            start: Offset(s)
        }),
        (text(), text()).prop_map(|(agent, topic)| Record::Unsubscribed { agent, topic }),
        text().prop_map(|file| Record::Quarantined { file }),
        any::<u64>().prop_map(|b| Record::Truncated { below: Offset(b) }),
        (
            text(),
            text(),
            proptest::collection::vec(
                (
                    slot(),
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(any::<u64>())
                ),
                0..5
            ),
            any::<u64>()
        )
            .prop_map(|(inbox, pattern, m, through)| Record::Backfilled {
                inbox,
                pattern,
                messages: m
                    .into_iter()
                    .map(|(slot, not_before_ms, expires_at_ms)| Backfill {
                        slot,
                        not_before_ms,
                        expires_at_ms,
                        ordering_key: not_before_ms.map(|n| format!("k{}", n % 7)),
                    })
                    .collect(),
                through: Offset(through),
            }),
    ]
}

fn is_record(decoded: &Decoded) -> bool {
    matches!(decoded, Decoded::Record(..))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn codec_any_record_decodes_to_itself(r in record(), offset in any::<u64>(), ts in any::<u64>()) {
        let bytes = record::encode_to_vec(Offset(offset), ts, &r).unwrap();
        match record::decode(&bytes) {
            Decoded::Record(frame, len) => {
                prop_assert_eq!(len, bytes.len());
                prop_assert_eq!(frame.offset, Offset(offset));
                prop_assert_eq!(frame.timestamp_ms, ts);
                prop_assert_eq!(frame.record, r);
            }
            other => prop_assert!(false, "decoded {other:?}"),
        }
    }

    #[test]
    fn codec_truncation_and_bit_flip_are_detected(r in record(), cut in any::<prop::sample::Index>(), bit in any::<prop::sample::Index>()) {
        let bytes = record::encode_to_vec(Offset(7), 9, &r).unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(!is_record(&record::decode(&bytes[..cut])), "cut at {cut} of {}", bytes.len());
        let bit = bit.index(bytes.len() * 8);
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(!is_record(&record::decode(&flipped)), "flip of bit {bit} undetected");
    }

    #[test]
    fn codec_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = record::decode(&bytes);
    }
}

#[test]
fn codec_every_cut_and_every_bit_flip_of_fixed_records_is_detected() {
    let records = [
        crate::support::message("id-1", "inbox", 4, br#"{"hello":"world"}"#),
        Record::Acked {
            inbox: "planner".into(),
            slots: vec![Slot {
                offset: Offset(3),
                priority: 9,
            }],
        },
        Record::Truncated { below: Offset(0) },
    ];
    for r in records {
        let bytes = record::encode_to_vec(Offset(1 << 40), 1_700_000_000_000, &r).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                !is_record(&record::decode(&bytes[..cut])),
                "cut at {cut} undetected"
            );
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !is_record(&record::decode(&flipped)),
                "flip of bit {bit} undetected"
            );
        }
    }
}

#[test]
fn codec_zero_header_means_end_of_data() {
    assert_eq!(record::decode(&[0u8; HEADER_BYTES]), Decoded::Zero);
    assert_eq!(record::decode(&[0u8; 5]), Decoded::Zero);
}

#[test]
fn codec_frame_layout_is_stable() {
    // A fixture: if this changes, the on-disk format changed and VERSION must change with it.
    let bytes =
        record::encode_to_vec(Offset(5), 6, &Record::Truncated { below: Offset(2) }).unwrap();
    assert_eq!(bytes.len(), HEADER_BYTES + 2);
    assert_eq!(&bytes[4..8], &[3, 0, 0, 0], "version 3 and reserved zeros");
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes(), "payload length");
    assert_eq!(&bytes[12..20], &5u64.to_le_bytes(), "offset");
    assert_eq!(&bytes[20..28], &6u64.to_le_bytes(), "timestamp");
    assert_eq!(&bytes[28..], &[11, 2], "variant 11 (Truncated), varint 2");
    assert_eq!(
        &bytes[..4],
        &crc32fast::hash(&bytes[4..]).to_le_bytes(),
        "crc over the rest"
    );
}

/// A frame's bytes with its version set and its length and CRC made right again.
fn reframe(mut bytes: Vec<u8>, version: u8) -> Vec<u8> {
    bytes[4] = version;
    let len = u32::try_from(bytes.len() - HEADER_BYTES).unwrap();
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&bytes[4..]);
    bytes[..4].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Version-1 and version-2 frames still decode: version 1's `Message` without `ordering_key`
/// and `request_until_ms`, both versions' `Backfilled` without its messages' `ordering_key`,
/// the other records as they were; version 4 is refused.
#[test]
fn codec_reads_version_1_and_2_records() {
    let message = Message {
        id: "m".into(),
        from: "a".into(),
        to: "agent:b".into(),
        destinations: vec!["b".into()],
        kind: None,
        priority: 4,
        headers: vec![("k".into(), "v".into())],
        correlation_id: None,
        in_reply_to: Some("r".into()),
        not_before_ms: None,
        expires_at_ms: Some(9),
        dedupe_until_ms: None,
        body: b"[1]".to_vec(),
        ordering_key: None,
        request_until_ms: None,
    };
    // Version 2 appends two `None`s (one zero byte each) to version 1's `Message`.
    let as_version = |record: &Record, version: u8, cut: usize| {
        let mut bytes = record::encode_to_vec(Offset(7), 8, record).unwrap();
        bytes.truncate(bytes.len() - cut);
        reframe(bytes, version)
    };
    let backfilled = Record::Backfilled {
        inbox: "b".into(),
        pattern: "news.*".into(),
        messages: vec![Backfill {
            slot: Slot {
                offset: Offset(3),
                priority: 4,
            },
            not_before_ms: None,
            expires_at_ms: Some(9),
            ordering_key: None,
        }],
        through: Offset(5),
    };
    for record in [
        Record::Message(message),
        backfilled,
        Record::Truncated { below: Offset(3) },
    ] {
        // Version 3 adds one `None` byte per backfilled message, before `through` (1 byte),
        // to versions 1 and 2; version 2 wrote `Message` as now.
        let without_backfill_keys = || {
            let mut v3 = record::encode_to_vec(Offset(7), 8, &record).unwrap();
            let at = v3.len() - 2;
            assert_eq!(v3.remove(at), 0, "the None of ordering_key");
            v3
        };
        let olds = match &record {
            Record::Message(_) => [as_version(&record, 1, 2), as_version(&record, 2, 0)],
            Record::Backfilled { .. } => [
                reframe(without_backfill_keys(), 1),
                reframe(without_backfill_keys(), 2),
            ],
            _ => [as_version(&record, 1, 0), as_version(&record, 2, 0)],
        };
        for old in olds {
            match record::decode(&old) {
                Decoded::Record(frame, len) => {
                    assert_eq!((frame.record, len), (record.clone(), old.len()));
                }
                other => panic!("version {} of {record:?}: {other:?}", old[4]),
            }
        }
        let unknown = as_version(&record, 4, 0);
        assert!(
            matches!(record::decode(&unknown), Decoded::Corrupt(_)),
            "version 4 is not read"
        );
    }
}

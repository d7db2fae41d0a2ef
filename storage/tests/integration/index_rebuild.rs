//! T7: the index is derived. Deleted, it is rebuilt from the log into an equal state; left at
//! an old checkpoint, it catches up to the same state. Also checks what the delivery records
//! do to the index (leases, acks, releases, dead letters, redrive, agents, retention).

use std::path::Path;

use courier_storage::index::{EntryState, RequestValue, TimerKind, TopicSeen};
use courier_storage::{
    Agent, Backfill, DeadLetter, DeadReason, Lease, Log, Message, Offset, Record, Release, Slot,
};

use crate::support::{body, message, open_real};

fn agent(id: &str) -> Record {
    Record::AgentUpserted(Agent {
        id: id.into(),
        capabilities: vec!["plan".into()],
        metadata: br#"{"team":"x"}"#.to_vec(),
        lease_ms: Some(30_000),
        max_attempts: Some(3),
        max_in_flight: None,
        token_hash: None,
    })
}

fn slot(offset: u64, priority: u8) -> Slot {
    Slot {
        offset: Offset(offset),
        priority,
    }
}

/// Part one: offsets 0..=9.
fn part_one(log: &Log) {
    log.append(100, vec![agent("a"), agent("b"), agent("gone")])
        .unwrap(); // 0, 1, 2
    let mut m = match message("dedupe-me", "a", 9, b"{}") {
        Record::Message(m) => m,
        _ => unreachable!(),
    };
    m.dedupe_until_ms = Some(10_000);
    m.expires_at_ms = Some(50_000);
    log.append(200, vec![Record::Message(m)]).unwrap(); // 3
    log.append(
        300,
        (0..4)
            .map(|n| {
                message(
                    &format!("m{n}"),
                    "a",
                    u8::try_from(n).unwrap(),
                    &body(n, 60),
                )
            })
            .collect(),
    )
    .unwrap(); // 4..=7
    log.append(
        400,
        vec![
            message("for-gone", "gone", 4, b"{}"),
            Record::Subscribed {
                agent: "b".into(),
                topic: "news".into(),
                start: Offset(0),
            },
        ],
    )
    .unwrap(); // 8, 9
}

/// Part two: delivery state changes on top of part one.
#[expect(
    clippy::too_many_lines,
    reason = "a scripted sequence of records reads best in one place"
)]
fn part_two(log: &Log) {
    let lease = |o, p, attempt| Lease {
        slot: slot(o, p),
        attempt,
        deadline_ms: 70_000 + o,
    };
    log.append(
        500,
        vec![Record::Leased {
            inbox: "a".into(),
            leases: vec![
                lease(3, 9, 1),
                lease(4, 0, 1),
                lease(5, 1, 1),
                lease(6, 2, 2),
            ],
        }],
    )
    .unwrap();
    log.append(
        600,
        vec![Record::Acked {
            inbox: "a".into(),
            slots: vec![slot(4, 0)],
        }],
    )
    .unwrap();
    log.append(
        700,
        vec![Record::Released {
            inbox: "a".into(),
            releases: vec![Release {
                slot: slot(5, 1),
                not_before_ms: 90_000,
            }],
        }],
    )
    .unwrap();
    log.append(
        800,
        vec![Record::DeadLettered {
            inbox: "a".into(),
            letters: vec![DeadLetter {
                slot: slot(6, 2),
                reason: DeadReason::MaxAttempts,
                attempts: 2,
            }],
        }],
    )
    .unwrap();
    log.append(
        850,
        vec![Record::DeadLettered {
            inbox: "a".into(),
            letters: vec![DeadLetter {
                slot: slot(7, 3),
                reason: DeadReason::Rejected,
                attempts: 0,
            }],
        }],
    )
    .unwrap();
    log.append(
        900,
        vec![Record::Redriven {
            inbox: "a".into(),
            slots: vec![slot(7, 3)],
        }],
    )
    .unwrap();
    log.append(
        950,
        vec![
            Record::AgentDeleted {
                agent: "gone".into(),
            },
            Record::Unsubscribed {
                agent: "b".into(),
                topic: "none".into(),
            },
        ],
    )
    .unwrap();
    log.append(990, vec![message("late", "b", 4, b"[1,2]")])
        .unwrap();
    // Two messages to a topic: one routed to b, one to nobody; both count for the topic.
    let to_topic = |id: &str, destinations: Vec<String>| {
        let mut record = message(id, "b", 4, b"1");
        if let Record::Message(m) = &mut record {
            m.to = "topic:news.eu".into();
            m.destinations = destinations;
        }
        record
    };
    log.append(
        995,
        vec![to_topic("t1", vec!["b".into()]), to_topic("t2", Vec::new())],
    )
    .unwrap();
    // b subscribes to news.* from the earliest message: a backfill from 0, of which one step
    // (the message routed to nobody) is done.
    let subscribed = log
        .append(
            996,
            vec![Record::Subscribed {
                agent: "b".into(),
                topic: "news.*".into(),
                start: Offset(0),
            }],
        )
        .unwrap();
    let topic_message = Offset(subscribed.first.0 - 1);
    log.append(
        997,
        vec![Record::Backfilled {
            inbox: "b".into(),
            pattern: "news.*".into(),
            messages: vec![Backfill {
                slot: Slot {
                    offset: topic_message,
                    priority: 4,
                },
                not_before_ms: None,
                expires_at_ms: None,
                ordering_key: None,
            }],
            through: Offset(5),
        }],
    )
    .unwrap();
    // Three messages to a capability queue: two leased to a, of which one is acked.
    // The first two share an ordering key.
    let to_queue = |id: &str| {
        let mut record = message(id, "b", 4, b"2");
        if let Record::Message(m) = &mut record {
            m.to = "capability:plan".into();
            m.destinations = vec!["capability:plan".into()];
            m.ordering_key = (id != "q3").then(|| "acct-1".into());
        }
        record
    };
    let queued = log
        .append(998, vec![to_queue("q1"), to_queue("q2"), to_queue("q3")])
        .unwrap();
    let q = |n: u64| slot(queued.first.0 + n, 4);
    log.append(
        999,
        vec![Record::LeasedTo {
            queue: "capability:plan".into(),
            agent: "a".into(),
            leases: vec![
                Lease {
                    slot: q(0),
                    attempt: 1,
                    deadline_ms: 80_000,
                },
                Lease {
                    slot: q(1),
                    attempt: 1,
                    deadline_ms: 80_000,
                },
            ],
        }],
    )
    .unwrap();
    log.append(
        1000,
        vec![Record::Acked {
            inbox: "capability:plan".into(),
            slots: vec![q(0)],
        }],
    )
    .unwrap();
    // A request from a, remembered until 200 s, and its first reply.
    let mut request = message("ask-1", "b", 4, b"3");
    let mut answer = message("answer-1", "a", 4, b"4");
    if let (Record::Message(r), Record::Message(a)) = (&mut request, &mut answer) {
        r.from = "a".into();
        r.request_until_ms = Some(200_000);
        a.in_reply_to = Some("ask-1".into());
        // Routed nowhere: the inboxes checked above stay as they are.
        r.destinations.clear();
        a.destinations.clear();
    }
    log.append(1001, vec![request, answer]).unwrap();
    // A signed request's nonce, remembered until 300 s.
    log.append(
        1002,
        vec![Record::NonceUsed {
            signer: "a".into(),
            nonce: "n-1".into(),
            until_ms: 300_000,
        }],
    )
    .unwrap();
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, checked field by field"
)]
fn index_records_change_delivery_state_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1 << 20);
    part_one(&log);
    part_two(&log);
    let index = log.index();
    let inbox: Vec<_> = index.inbox("a").map(Result::unwrap).collect();
    let order: Vec<u64> = inbox.iter().map(|e| e.slot.offset.0).collect();
    assert_eq!(
        order,
        vec![3, 7, 5],
        "priority 9, then 3, then 1; acked and dead ones are gone"
    );
    assert_eq!(
        inbox[0].value.state,
        EntryState::Leased {
            deadline_ms: 70_003
        }
    );
    assert_eq!(inbox[0].value.attempts, 1);
    assert_eq!(inbox[1].value.attempts, 0, "redrive resets attempts");
    assert_eq!(
        inbox[2].value.state,
        EntryState::Ready {
            not_before_ms: Some(90_000)
        }
    );
    let dead = index.dead_letters("a", None, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].slot.offset,
            dead[0].reason,
            dead[0].attempts,
            dead[0].dead_lettered_at_ms
        ),
        (Offset(6), DeadReason::MaxAttempts, 2, 800)
    );
    assert_eq!(index.dedupe("dedupe-me", 9_999).unwrap(), Some(Offset(3)));
    assert_eq!(
        index.dedupe("dedupe-me", 10_000).unwrap(),
        None,
        "the window has passed"
    );
    assert!(index.agent("gone").unwrap().is_none());
    assert_eq!(
        index.inbox("gone").count(),
        0,
        "a deleted agent's inbox goes with it"
    );
    assert_eq!(index.agents().unwrap().len(), 2);
    assert_eq!(
        index.subscriptions().unwrap(),
        vec![
            ("b".into(), "news".into(), Offset(0)),
            ("b".into(), "news.*".into(), Offset(0))
        ]
    );
    let (agent, pattern, next) = index.backfills().unwrap().pop().expect("a backfill");
    assert_eq!((agent.as_str(), pattern.as_str()), ("b", "news.*"));
    assert_eq!(next, Offset(5), "where the Backfilled record left it");
    let news = index
        .topic_offsets("news.eu", Offset(0), Offset(u64::MAX), 10)
        .unwrap();
    assert_eq!(news.len(), 2, "both topic messages are indexed by topic");
    // The last record is the nonce's.
    let end = log.durable_end().0 - 1;
    let leased_offset = end - 6;
    assert_eq!(
        index.nonces().unwrap(),
        vec![(300_000, "a n-1".to_owned())],
        "the used nonce"
    );
    assert_eq!(
        index.requests().unwrap(),
        vec![(
            "ask-1".to_owned(),
            RequestValue {
                offset: Offset(end - 2),
                from: "a".into(),
                until_ms: 200_000,
                reply: Some(Offset(end - 1)),
            }
        )],
        "the request and its first reply"
    );
    let timers: Vec<_> = index.timers().map(Result::unwrap).collect();
    let kinds: Vec<(u64, TimerKind, u64)> = timers
        .iter()
        .map(|t| (t.due_ms, t.kind, t.slot.offset.0))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (50_000, TimerKind::Expiry, 3),
            (70_003, TimerKind::Due, 3),
            (80_000, TimerKind::Due, leased_offset),
            (90_000, TimerKind::Due, 5)
        ]
    );
    // The capability queue: the two messages still pending, the lease a still holds.
    let queue = "capability:plan";
    assert_eq!(index.queues().unwrap(), vec![queue.to_owned()]);
    let pending: Vec<_> = index.inbox(queue).map(Result::unwrap).collect();
    assert_eq!(pending.len(), 2, "the acked one is gone");
    let leased = pending[0].slot;
    assert!(pending[0].value.is_leased() && !pending[1].value.is_leased());
    assert_eq!(
        index.holders().unwrap(),
        vec![(queue.to_owned(), leased, "a".to_owned())],
        "the acked lease has no holder any more"
    );
    assert_eq!(
        index.orderings(queue).unwrap(),
        vec![
            (Offset(leased.offset.0 - 1), "acct-1".to_owned()),
            (leased.offset, "acct-1".to_owned())
        ],
        "ordering keys stay until retention, the acked message's too"
    );
    // The last topic message is just below the Subscribed and Backfilled records, and the
    // five records of the queue.
    let last = Offset(end - 10);
    assert_eq!(
        index.topics().unwrap(),
        vec![(
            "news.eu".into(),
            TopicSeen {
                messages: 2,
                last_offset: last
            }
        )]
    );
    assert_eq!(
        index.inbox("b").count(),
        3,
        "the late message, the topic message routed to b and the backfilled one"
    );
    assert_eq!(index.min_live_offset().unwrap(), Some(Offset(3)));
    assert_eq!(
        index.floor("a").unwrap(),
        Some(Offset(3)),
        "the ack floor of inbox a"
    );
    assert_eq!(index.floor("b").unwrap(), Some(Offset(18)));
    assert_eq!(index.floor("nobody").unwrap(), None);
}

fn reopen_snapshot(
    dir: &Path,
) -> (
    courier_storage::IndexSnapshot,
    courier_storage::RecoveryReport,
) {
    let (log, report) = Log::open(dir, Default::default()).unwrap();
    (log.index().snapshot().unwrap(), report)
}

#[test]
fn index_deleted_is_rebuilt_equal() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 600);
    part_one(&log);
    part_two(&log);
    let live = log.index().snapshot().unwrap();
    assert!(log.segments().len() > 2);
    drop(log);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let (rebuilt, report) = reopen_snapshot(dir.path());
    assert!(report.index_rebuilt);
    assert_eq!(report.replayed_records, live.applied.unwrap().0 + 1);
    assert_eq!(rebuilt, live);
}

#[test]
fn index_damaged_is_set_aside_and_rebuilt_equal() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 600);
    part_one(&log);
    part_two(&log);
    let live = log.index().snapshot().unwrap();
    drop(log);
    // What a restart on a full disk did to sled here: its `conf` file cut short (sled then
    // refuses to open with `Corruption`).
    let conf = dir.path().join("index").join("conf");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&conf)
        .unwrap()
        .set_len(20)
        .unwrap();
    let (rebuilt, report) = reopen_snapshot(dir.path());
    assert!(report.index_rebuilt);
    let aside = report
        .index_set_aside
        .expect("the damaged index was set aside");
    assert_eq!(aside, dir.path().join("index.damaged-1"));
    assert_eq!(std::fs::metadata(aside.join("conf")).unwrap().len(), 20);
    assert_eq!(rebuilt, live);
}

#[test]
fn index_at_an_old_checkpoint_catches_up_equal() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 600);
    part_one(&log);
    let old_applied = log.checkpoint().unwrap();
    drop(log);
    let saved = tempfile::tempdir().unwrap();
    crate::support::copy_dir(&dir.path().join("index"), saved.path());
    let log = open_real(dir.path(), 600);
    part_two(&log);
    let live = log.index().snapshot().unwrap();
    drop(log);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    crate::support::copy_dir(saved.path(), &dir.path().join("index"));
    let (caught_up, report) = reopen_snapshot(dir.path());
    assert_eq!(report.checkpoint, old_applied);
    assert!(!report.index_rebuilt);
    assert_eq!(
        report.replayed_records,
        live.applied.unwrap().0 - old_applied.unwrap().0
    );
    assert_eq!(caught_up, live);
}

#[test]
fn index_message_fields_survive_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1 << 20);
    let m = Message {
        id: "01J0000000000000000000000".into(),
        from: "x".into(),
        to: "topic:news".into(),
        destinations: vec!["a".into(), "b".into()],
        kind: None,
        priority: 0,
        headers: vec![],
        correlation_id: Some("c".into()),
        in_reply_to: Some("r".into()),
        not_before_ms: Some(5),
        expires_at_ms: None,
        dedupe_until_ms: None,
        body: br#"{"raw":   "json kept as sent"}"#.to_vec(),
        ordering_key: None,
        request_until_ms: None,
    };
    log.append(1, vec![Record::Message(m.clone())]).unwrap();
    drop(log);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let (log, _) = Log::open(dir.path(), Default::default()).unwrap();
    assert_eq!(log.read(Offset(0)).unwrap().record, Record::Message(m));
    assert_eq!(
        log.index().inbox("b").count(),
        1,
        "every destination gets the message"
    );
}

#[test]
fn index_entries_stay_exact_across_buckets_checkpoints_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1 << 20);
    let priority = |o: u64| u8::try_from(o % 3).unwrap() * 4; // 0, 4, 8
    for chunk in 0..6u64 {
        let records = (0..500).map(|n| {
            message(
                &format!("m{}", chunk * 500 + n),
                "a",
                priority(chunk * 500 + n),
                b"{}",
            )
        });
        log.append(1, records.collect()).unwrap();
    }
    log.checkpoint().unwrap();
    let acked: Vec<Slot> = (0..3000)
        .filter(|o| o % 3 == 1 || o % 1024 == 0)
        .map(|o| slot(o, priority(o)))
        .collect();
    log.append(
        2,
        vec![Record::Acked {
            inbox: "a".into(),
            slots: acked[..acked.len() / 2].to_vec(),
        }],
    )
    .unwrap();
    log.checkpoint().unwrap();
    log.append(
        3,
        vec![Record::Acked {
            inbox: "a".into(),
            slots: acked[acked.len() / 2..].to_vec(),
        }],
    )
    .unwrap();
    let mut expected: Vec<Slot> = (0..3000)
        .filter(|o| o % 3 != 1 && o % 1024 != 0)
        .map(|o| slot(o, priority(o)))
        .collect();
    expected.sort_by_key(|s| (std::cmp::Reverse(s.priority), s.offset));
    let got =
        |log: &Log| -> Vec<Slot> { log.index().inbox("a").map(|e| e.unwrap().slot).collect() };
    assert_eq!(
        got(&log),
        expected,
        "layers over sled buckets, before reopen"
    );
    assert!(log
        .index()
        .entry("a", slot(1024, priority(1024)))
        .unwrap()
        .is_none());
    assert!(log
        .index()
        .entry("a", slot(1025, priority(1025)))
        .unwrap()
        .is_some());
    drop(log);
    let (log, _) = Log::open(dir.path(), Default::default()).unwrap();
    assert_eq!(got(&log), expected, "after reopen, from sled buckets alone");
}

/// Timer keys across checkpoints: a lease's timer written as new in one layer, checkpointed,
/// replaced by a release's, the same lease deadline taken again (the key sled still has),
/// extended and acked, with checkpoints in between. After each step the live index equals
/// one rebuilt from the log, with exactly the timers of its pending entries.
#[test]
fn timer_keys_stay_exact_across_leases_releases_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_real(dir.path(), 1 << 20);
    log.append(100, vec![agent("a"), message("t", "a", 4, b"{}")])
        .unwrap(); // 0, 1
    let m = slot(1, 4);
    let lease = |attempt, deadline_ms| Record::Leased {
        inbox: "a".into(),
        leases: vec![Lease {
            slot: m,
            attempt,
            deadline_ms,
        }],
    };
    let release = |not_before_ms| Record::Released {
        inbox: "a".into(),
        releases: vec![Release {
            slot: m,
            not_before_ms,
        }],
    };
    let steps: Vec<(Vec<Record>, bool)> = vec![
        (vec![lease(1, 5_000)], true),
        (vec![release(6_000)], false),
        (vec![lease(2, 5_000)], false),
        (vec![lease(2, 7_000)], true),
        (vec![lease(2, 5_000), release(6_000)], false),
        (vec![lease(3, 8_000)], true),
        (
            vec![Record::Acked {
                inbox: "a".into(),
                slots: vec![m],
            }],
            false,
        ),
    ];
    for (n, (records, checkpoint)) in steps.into_iter().enumerate() {
        log.append(200 + n as u64, records).unwrap();
        if checkpoint {
            log.checkpoint().unwrap();
        }
        let live = log.index().snapshot().unwrap();
        let pending: Vec<(u64, u64)> = live
            .inboxes
            .values()
            .flatten()
            .flat_map(|e| e.value.timers().map(move |(due, _)| (due, e.slot.offset.0)))
            .collect();
        let timers: Vec<(u64, u64)> = live
            .timers
            .iter()
            .map(|t| (t.due_ms, t.slot.offset.0))
            .collect();
        assert_eq!(
            timers, pending,
            "step {n}: the timers are the pending entries' timers"
        );
        // A rebuild from the log gives the same index.
        let rebuilt_dir = tempfile::tempdir().unwrap();
        let rebuilt = courier_storage::Index::open(rebuilt_dir.path(), 1 << 20).unwrap();
        courier_storage::replay_into(
            &courier_storage::io::FileDisk,
            &dir.path().join("log"),
            &rebuilt,
        )
        .unwrap();
        assert_eq!(rebuilt.snapshot().unwrap(), live, "step {n}: rebuilt equal");
    }
    // And after a reopen from the last checkpoint plus replay.
    let live = log.index().snapshot().unwrap();
    drop(log);
    let (reopened, _) = reopen_snapshot(dir.path());
    assert_eq!(reopened, live);
}

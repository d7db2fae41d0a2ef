//! Writes the starting corpus of every fuzz target into `fuzz/corpus/<target>/`: real records
//! and a real segment written by the storage engine (the decoder's CRC keeps a fuzzer from
//! finding valid frames by itself), valid and invalid publish bodies, and configuration files.
//! Run by `fuzz/run.sh` before fuzzing; existing files are kept.

use std::path::Path;

use courier_storage::{
    Agent, DeadLetter, DeadReason, Lease, Log, LogOptions, Message, Offset, Record, Release, Slot,
};

fn slot(offset: u64) -> Slot {
    Slot {
        offset: Offset(offset),
        priority: 4,
    }
}

fn records() -> Vec<Record> {
    vec![
        Record::AgentUpserted(Agent {
            id: "planner".into(),
            capabilities: vec!["plan".into()],
            metadata: br#"{"team":"x"}"#.to_vec(),
            lease_ms: Some(30_000),
            max_attempts: Some(5),
            max_in_flight: None,
            token_hash: None,
        }),
        Record::Message(Message {
            id: "01HZX3J6Q8V5M2K9N4P7R1T0WA".into(),
            from: "writer".into(),
            to: "agent:planner".into(),
            destinations: vec!["planner".into()],
            kind: Some("task".into()),
            priority: 7,
            headers: vec![("traceparent".into(), "00-abc-def-01".into())],
            correlation_id: Some("c-1".into()),
            in_reply_to: None,
            not_before_ms: Some(1_700_000_000_500),
            expires_at_ms: Some(1_700_000_060_000),
            dedupe_until_ms: Some(1_700_000_120_000),
            body: br#"{"goal":"ship it","n":[1,2,3]}"#.to_vec(),
            ordering_key: None,
            request_until_ms: None,
        }),
        Record::Leased {
            inbox: "planner".into(),
            leases: vec![Lease {
                slot: slot(1),
                attempt: 1,
                deadline_ms: 1_700_000_030_000,
            }],
        },
        Record::Released {
            inbox: "planner".into(),
            releases: vec![Release {
                slot: slot(1),
                not_before_ms: 1_700_000_031_000,
            }],
        },
        Record::DeadLettered {
            inbox: "planner".into(),
            letters: vec![DeadLetter {
                slot: slot(1),
                reason: DeadReason::MaxAttempts,
                attempts: 5,
            }],
        },
        Record::Redriven {
            inbox: "planner".into(),
            slots: vec![slot(1)],
        },
        Record::Acked {
            inbox: "planner".into(),
            slots: vec![slot(1)],
        },
        Record::Subscribed {
            agent: "planner".into(),
            topic: "news".into(),
            start: Offset(0),
        },
        Record::Truncated { below: Offset(0) },
    ]
}

const PUBLISH: &[&str] = &[
    r#"{"to":"agent:planner","from":"writer","body":{"goal":"x"}}"#,
    r#"{"to":"agent:planner","from":"writer","id":"job-1","type":"task","priority":9,"headers":{"a":"b"},"correlation_id":"c","in_reply_to":"01HZX3J6Q8V5M2K9N4P7R1T0WA","delay_ms":100,"ttl_ms":60000,"body":[1,"two",null,{"x":1.5e3}]}"#,
    r#"{"to":"topic:news","from":"writer","body":"s"}"#,
    r#"{"to":"agent:","from":"w","body":1}"#,
    r#"{"to":"agent:p","from":"w","priority":10,"body":1}"#,
    r#"{"to":"agent:p","from":"w","body":1,"extra":true}"#,
];

const CONFIGS: &[&str] = &[
    "listen = \"127.0.0.1:7070\"\ndata_dir = \"./data\"\nfsync = \"interval:5ms\"\nsegment_bytes = 67108864\n",
    "lease = \"30s\"\nmax_attempts = 5\n[backoff]\ninitial = \"1s\"\nmax = \"5m\"\nmultiplier = 2.0\n",
    "[retention]\nmax_bytes = 1073741824\nmax_age = \"7d\"\n[limits]\nmax_inbox_depth = 1000\npublish_rate = 100\n",
    "[auth]\nmode = \"token\"\n",
];

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    let path = dir.join(name);
    if !path.exists() {
        std::fs::write(path, bytes).expect("write seed");
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = Log::open(dir.path(), LogOptions::default()).expect("open log");
    let mut ts = 1_700_000_000_000;
    for (n, record) in records().into_iter().enumerate() {
        let appended = log.append(ts, vec![record]).expect("append");
        let frame_bytes = courier_storage::record::encode_to_vec(
            appended.first,
            ts,
            &log.read(appended.first).expect("read").record,
        )
        .expect("encode");
        write("record_decode", &format!("seed-{n}"), &frame_bytes);
        ts += 1000;
    }
    log.close().expect("close");
    for segment in courier_storage::list_segments(&courier_storage::io::FileDisk, &dir.path().join("log")).expect("segments") {
        let bytes = std::fs::read(&segment.1).expect("read segment");
        write("segment_scan", "seed-segment", &bytes);
    }
    for (n, body) in PUBLISH.iter().enumerate() {
        write("publish_validation", &format!("seed-{n}"), body.as_bytes());
    }
    for (n, text) in CONFIGS.iter().enumerate() {
        write("config_parse", &format!("seed-{n}"), text.as_bytes());
    }
}

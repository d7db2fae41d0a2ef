//! T10: seeded random sequences of publish / receive / ack / nack / extend / time passing /
//! sweep / redrive / checkpoint / crash, run against the delivery core on the real storage
//! engine (on `SimDisk`, so a crash is a power loss), and checked after every step against a
//! small reference model written independently of the core.
//!
//! A crash drops the log without closing it, tears the simulated disk, reopens it and
//! rebuilds the in-memory state from the recovered index exactly as the server's start-up
//! does (`broker::recover_state`). Checked: the state equals the model's (so attempt counts
//! never reset), every `max_attempts` dead letter had exactly `max_attempts` deliveries, and
//! nothing is both acked and dead-lettered.
//!
//! CI runs 1,000 seeds; `COURIER_SOAK=1` runs 100,000. A failure prints its seed; replay it
//! with `COURIER_SEED=<seed>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use courier::broker::recover_state;
use courier::config::Backoff;
use courier::delivery::{backoff, Outcome, Policy, Receipt, Settle, State};
use courier_storage::index::EntryState;
use courier_storage::sim::{SimDisk, TEAR_MODES};
use courier_storage::{
    Agent, DeadReason, FsyncPolicy, Lease, Log, LogOptions, Message, Offset, Record, Slot,
};

use crate::support::Rng;

const INBOX: &str = "worker";
const MAX_ATTEMPTS: u32 = 3;
const LEASE_MS: u64 = 100;
const STEPS: usize = 60;

fn policy() -> Policy {
    Policy {
        max_attempts: MAX_ATTEMPTS,
        max_in_flight: None,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            multiplier: 2.0,
        },
    }
}

// ---- the reference model -------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ready { not_before: u64 },
    Leased { deadline: u64 },
    Acked,
    Dead(DeadReason),
}

#[derive(Debug, Clone)]
struct ModelMessage {
    priority: u8,
    attempts: u32,
    /// Deliveries since it was published or last redriven.
    deliveries: u32,
    expires_at: Option<u64>,
    status: Status,
}

#[derive(Debug, Default)]
struct Model {
    messages: BTreeMap<u64, ModelMessage>,
}

impl Model {
    fn pending(m: &ModelMessage) -> bool {
        matches!(m.status, Status::Ready { .. } | Status::Leased { .. })
    }

    fn receive(&mut self, max: usize, now: u64) -> Vec<(u64, u32)> {
        let mut ready: Vec<(u8, u64)> = self
            .messages
            .iter()
            .filter(|(_, m)| matches!(m.status, Status::Ready { not_before } if not_before <= now))
            .map(|(o, m)| (9 - m.priority, *o))
            .collect();
        ready.sort_unstable();
        ready
            .into_iter()
            .take(max)
            .map(|(_, offset)| {
                let m = self.messages.get_mut(&offset).expect("listed");
                m.attempts += 1;
                m.deliveries += 1;
                m.status = Status::Leased {
                    deadline: now + LEASE_MS,
                };
                (offset, m.attempts)
            })
            .collect()
    }

    /// Each receipt is judged against the state before the call; a repeat is stale.
    fn settle(&mut self, receipts: &[(u64, u32)], how: Settle, now: u64) -> Vec<Outcome> {
        let before = self.messages.clone();
        let mut seen = BTreeSet::new();
        receipts
            .iter()
            .map(|(offset, attempt)| {
                let Some(m) = before.get(offset) else {
                    return Outcome::Unknown;
                };
                if !Self::pending(m) {
                    return match m.status {
                        Status::Dead(_) => Outcome::Stale,
                        _ => Outcome::Unknown,
                    };
                }
                if m.attempts != *attempt || !seen.insert(*offset) {
                    return Outcome::Stale;
                }
                let leased = matches!(m.status, Status::Leased { .. });
                let target = self.messages.get_mut(offset).expect("exists");
                match how {
                    Settle::Ack => {
                        target.status = Status::Acked;
                        Outcome::Acked
                    }
                    _ if !leased => Outcome::Stale,
                    Settle::Extend { lease_ms } => {
                        target.status = Status::Leased {
                            deadline: now + lease_ms,
                        };
                        Outcome::Extended
                    }
                    Settle::Nack {
                        dead_letter: true, ..
                    } => {
                        target.status = Status::Dead(DeadReason::Rejected);
                        Outcome::DeadLettered
                    }
                    Settle::Nack { .. } if m.attempts >= MAX_ATTEMPTS => {
                        target.status = Status::Dead(DeadReason::MaxAttempts);
                        Outcome::DeadLettered
                    }
                    Settle::Nack { delay_ms, .. } => {
                        target.status = Status::Ready {
                            not_before: now + delay_ms,
                        };
                        Outcome::Nacked
                    }
                }
            })
            .collect()
    }

    fn sweep(&mut self, now: u64) {
        for (offset, m) in &mut self.messages {
            if !Self::pending(m) {
                continue;
            }
            if m.expires_at.is_some_and(|at| at <= now) {
                m.status = Status::Dead(DeadReason::Expired);
            } else if let Status::Leased { deadline } = m.status {
                if deadline <= now {
                    m.status = if m.attempts >= MAX_ATTEMPTS {
                        Status::Dead(DeadReason::MaxAttempts)
                    } else {
                        let delay = backoff::delay_ms(&policy().backoff, m.attempts, *offset);
                        Status::Ready {
                            not_before: now + delay,
                        }
                    };
                }
            }
        }
    }

    fn redrive_all(&mut self, now: u64) -> usize {
        let mut n = 0;
        for m in self.messages.values_mut() {
            if let Status::Dead(_) = m.status {
                m.status = Status::Ready { not_before: now };
                m.attempts = 0;
                m.deliveries = 0;
                m.expires_at = None;
                n += 1;
            }
        }
        n
    }
}

// ---- the system under test ------------------------------------------------------------------

struct System {
    sim: SimDisk,
    index_dir: tempfile::TempDir,
    log: Option<Log>,
    state: State,
}

fn data_dir() -> &'static Path {
    Path::new("/sim/model")
}

impl System {
    fn open(sim: SimDisk, index_dir: tempfile::TempDir) -> Self {
        let options = LogOptions {
            disk: Arc::new(sim.clone()),
            fsync: FsyncPolicy::Always,
            segment_bytes: 4096,
            index_dir: Some(index_dir.path().to_path_buf()),
            checkpoint_interval: Duration::from_secs(3600),
            ..LogOptions::default()
        };
        let (log, _) = Log::open(data_dir(), options).expect("open");
        let (state, _) = recover_state(log.index()).expect("recover state");
        Self {
            sim,
            index_dir,
            log: Some(log),
            state,
        }
    }

    fn log(&self) -> &Log {
        self.log.as_ref().expect("open")
    }

    /// Appends decided records and applies them, as the broker does.
    fn commit(&mut self, records: Vec<Record>, now: u64) {
        if records.is_empty() {
            return;
        }
        let appended = self.log().append(now, records.clone()).expect("append");
        for (n, record) in records.iter().enumerate() {
            self.state
                .apply(record, Offset(appended.first.0 + n as u64), now);
        }
    }

    fn crash(self, rng: &mut Rng) -> Self {
        let Self {
            sim,
            index_dir,
            log,
            ..
        } = self;
        drop(log);
        let mode = TEAR_MODES[rng.below(TEAR_MODES.len() as u64) as usize];
        sim.crash(mode, rng.next());
        Self::open(sim, index_dir)
    }
}

fn message(priority: u8, not_before: Option<u64>, expires_at: Option<u64>) -> Record {
    Record::Message(Message {
        id: String::new(),
        from: "model".into(),
        to: format!("agent:{INBOX}"),
        destinations: vec![INBOX.into()],
        kind: None,
        priority,
        headers: vec![],
        correlation_id: None,
        in_reply_to: None,
        not_before_ms: not_before,
        expires_at_ms: expires_at,
        dedupe_until_ms: None,
        body: b"{}".to_vec(),
    })
}

/// The state equals the model, message by message.
fn check(system: &System, model: &Model, now: u64, context: &str) {
    let dead: BTreeMap<u64, _> = system
        .state
        .dead_letters(INBOX, None, usize::MAX)
        .into_iter()
        .map(|d| (d.slot.offset.0, d))
        .collect();
    for (offset, m) in &model.messages {
        let slot = Slot {
            offset: Offset(*offset),
            priority: m.priority,
        };
        let entry = system.state.entry_of(INBOX, slot);
        let what = format!(
            "{context}: message {offset}: model {m:?}, system {entry:?} / {:?}",
            dead.get(offset)
        );
        match m.status {
            Status::Acked => assert!(entry.is_none() && !dead.contains_key(offset), "{what}"),
            Status::Dead(reason) => {
                assert!(entry.is_none(), "{what}");
                let d = dead.get(offset).unwrap_or_else(|| panic!("{what}"));
                assert_eq!((d.reason, d.attempts), (reason, m.attempts), "{what}");
                if reason == DeadReason::MaxAttempts {
                    assert_eq!(m.deliveries, MAX_ATTEMPTS, "{what}");
                }
            }
            Status::Ready { not_before } => {
                let e = entry.unwrap_or_else(|| panic!("{what}"));
                assert_eq!(
                    (e.attempts, e.expires_at_ms),
                    (m.attempts, m.expires_at),
                    "{what}"
                );
                match e.state {
                    EntryState::Ready {
                        not_before_ms: None,
                    } => assert!(not_before <= now, "{what}"),
                    EntryState::Ready {
                        not_before_ms: Some(t),
                    } => {
                        assert!(t == not_before || (t <= now && not_before <= now), "{what}");
                    }
                    EntryState::Leased { .. } => panic!("{what}"),
                }
            }
            Status::Leased { deadline } => {
                let e = entry.unwrap_or_else(|| panic!("{what}"));
                assert_eq!(e.attempts, m.attempts, "{what}");
                assert_eq!(
                    e.state,
                    EntryState::Leased {
                        deadline_ms: deadline
                    },
                    "{what}"
                );
            }
        }
    }
}

fn pick_receipts(rng: &mut Rng, issued: &[(Slot, u32)]) -> Vec<(Slot, u32)> {
    if issued.is_empty() {
        return Vec::new();
    }
    let n = 1 + rng.below(3) as usize;
    (0..n)
        .map(|_| issued[rng.below(issued.len() as u64) as usize])
        .collect()
}

#[expect(
    clippy::too_many_lines,
    reason = "one match arm per operation reads best in one place"
)]
fn run_seed(seed: u64) {
    let mut rng = Rng(seed);
    let mut system = System::open(SimDisk::new(), tempfile::tempdir().expect("index dir"));
    let mut model = Model::default();
    let mut now: u64 = 1_000_000;
    let mut issued: Vec<(Slot, u32)> = Vec::new();
    let agent = Agent {
        id: INBOX.into(),
        capabilities: vec![],
        metadata: b"{}".to_vec(),
        lease_ms: None,
        max_attempts: Some(MAX_ATTEMPTS),
        max_in_flight: None,
        token_hash: None,
    };
    system.commit(vec![Record::AgentUpserted(agent)], now);
    for step in 0..STEPS {
        let op = rng.below(100);
        let context = format!("seed {seed} step {step} op {op}");
        match op {
            0..=24 => {
                let priority = rng.below(10) as u8;
                let delay = (rng.below(4) == 0).then(|| rng.below(300));
                let ttl = (rng.below(5) == 0).then(|| 1 + rng.below(600));
                let record = message(priority, delay.map(|d| now + d), ttl.map(|t| now + t));
                let offset = system.log().durable_end().0;
                system.commit(vec![record], now);
                model.messages.insert(
                    offset,
                    ModelMessage {
                        priority,
                        attempts: 0,
                        deliveries: 0,
                        expires_at: ttl.map(|t| now + t),
                        status: Status::Ready {
                            not_before: now + delay.unwrap_or(0),
                        },
                    },
                );
            }
            25..=44 => {
                let max = 1 + rng.below(4) as usize;
                let leases: Vec<Lease> = system.state.lease(INBOX, max, now, LEASE_MS, &policy());
                let expected = model.receive(max, now);
                let got: Vec<(u64, u32)> = leases
                    .iter()
                    .map(|l| (l.slot.offset.0, l.attempt))
                    .collect();
                assert_eq!(got, expected, "{context}: receive");
                issued.extend(leases.iter().map(|l| (l.slot, l.attempt)));
                if !leases.is_empty() {
                    let record = Record::Leased {
                        inbox: INBOX.into(),
                        leases,
                    };
                    system.commit(vec![record], now);
                }
            }
            45..=69 => {
                let chosen = pick_receipts(&mut rng, &issued);
                let how = match rng.below(4) {
                    0 | 1 => Settle::Ack,
                    2 => Settle::Nack {
                        delay_ms: rng.below(200),
                        dead_letter: rng.below(4) == 0,
                    },
                    _ => Settle::Extend {
                        lease_ms: 1 + rng.below(300),
                    },
                };
                let receipts: Vec<Option<Receipt>> = chosen
                    .iter()
                    .map(|(slot, attempt)| {
                        Some(Receipt {
                            slot: *slot,
                            attempt: *attempt,
                        })
                    })
                    .collect();
                let (outcomes, records) =
                    system.state.settle(INBOX, &receipts, how, now, &policy());
                let pairs: Vec<(u64, u32)> = chosen.iter().map(|(s, a)| (s.offset.0, *a)).collect();
                let expected = model.settle(&pairs, how, now);
                assert_eq!(outcomes, expected, "{context}: {how:?} of {pairs:?}");
                system.commit(records, now);
            }
            70..=84 => {
                now += rng.below(250);
                let tick = system.state.tick(now, |_| policy());
                system.commit(tick.records, now);
                model.sweep(now);
            }
            85..=89 => {
                let expected = model.redrive_all(now);
                let record = system.state.redrive(INBOX, None);
                let got = match &record {
                    Some(Record::Redriven { slots, .. }) => slots.len(),
                    _ => 0,
                };
                assert_eq!(got, expected, "{context}: redrive");
                system.commit(record.into_iter().collect(), now);
            }
            90..=93 => {
                system.log().checkpoint().expect("checkpoint");
            }
            _ => {
                system = system.crash(&mut rng);
            }
        }
        check(&system, &model, now, &context);
    }
    // Finally: a crash, and the recovered state still equals the model.
    system = system.crash(&mut rng);
    check(
        &system,
        &model,
        now,
        &format!("seed {seed} after the final crash"),
    );
}

#[test]
fn model_check_of_delivery_over_random_operations_and_crashes() {
    let soak = std::env::var_os("COURIER_SOAK").is_some();
    let seeds: u64 = if soak { 100_000 } else { 1_000 };
    let base = std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    if let Some(seed) = base {
        run_seed(seed);
        return;
    }
    std::thread::scope(|scope| {
        for parity in 0..2u64 {
            scope.spawn(move || {
                for n in (parity..seeds).step_by(2) {
                    run_seed(0xC0FF_EE00 + n);
                }
            });
        }
    });
}

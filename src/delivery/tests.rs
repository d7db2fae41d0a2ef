use std::time::Duration;

use courier_storage::{DeadReason, Message, Offset, Record, Slot};

use super::*;

const INBOX: &str = "worker";

fn policy(max_attempts: u32, max_in_flight: Option<u32>) -> Policy {
    Policy {
        max_attempts,
        max_in_flight,
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
        },
    }
}

fn message(priority: u8, not_before_ms: Option<u64>, expires_at_ms: Option<u64>) -> Record {
    Record::Message(Message {
        id: String::new(),
        from: "sender".into(),
        to: format!("agent:{INBOX}"),
        destinations: vec![INBOX.into()],
        kind: None,
        priority,
        headers: vec![],
        correlation_id: None,
        in_reply_to: None,
        not_before_ms,
        expires_at_ms,
        dedupe_until_ms: None,
        body: b"{}".to_vec(),
        ordering_key: None,
        request_until_ms: None,
    })
}

/// A state with messages of the given priorities at offsets 0, 1, 2, …
fn state_with(priorities: &[u8]) -> State {
    let mut state = State::new();
    for (offset, p) in priorities.iter().enumerate() {
        state.apply(&message(*p, None, None), Offset(offset as u64), 0);
    }
    state
}

/// Decides and applies a lease, as the broker does.
fn lease(state: &mut State, max: usize, now: u64, policy: &Policy) -> Vec<Lease> {
    let draws = state.lease(INBOX, &[], max, now, 1000, policy);
    for record in State::lease_records(INBOX, &draws) {
        state.apply(&record, Offset(0), now);
    }
    draws.into_iter().map(|d| d.lease).collect()
}

fn run_tick(state: &mut State, now: u64, policy: &Policy) -> Vec<Record> {
    let tick = state.tick(now, |_| *policy);
    for record in &tick.records {
        state.apply(record, Offset(0), now);
    }
    tick.records
}

fn offsets(leases: &[Lease]) -> Vec<u64> {
    leases.iter().map(|l| l.slot.offset.0).collect()
}

#[test]
fn lease_serves_higher_priority_first_then_oldest() {
    let mut state = state_with(&[4, 9, 4, 0, 9]);
    let got = lease(&mut state, 10, 0, &policy(5, None));
    assert_eq!(offsets(&got), vec![1, 4, 0, 2, 3]);
    assert!(got.iter().all(|l| l.attempt == 1 && l.deadline_ms == 1000));
    assert!(
        lease(&mut state, 10, 0, &policy(5, None)).is_empty(),
        "leased twice"
    );
}

#[test]
fn max_in_flight_caps_leases_until_an_ack() {
    let p = policy(5, Some(2));
    let mut state = state_with(&[4, 4, 4]);
    let first = lease(&mut state, 10, 0, &p);
    assert_eq!(offsets(&first), vec![0, 1]);
    assert!(state.at_cap(INBOX, &p));
    assert!(lease(&mut state, 10, 0, &p).is_empty());
    let receipt = Receipt {
        slot: first[0].slot,
        attempt: 1,
        queue: None,
    };
    let (outcomes, records) =
        state.settle(INBOX, &[Some(receipt)], Settle::Ack, 0, (|_| p, |_| false));
    assert_eq!(outcomes, vec![Outcome::Acked]);
    for record in &records {
        state.apply(record, Offset(0), 0);
    }
    assert_eq!(offsets(&lease(&mut state, 10, 0, &p)), vec![2]);
}

#[test]
fn expired_leases_come_back_after_backoff_then_die_at_max_attempts() {
    let p = policy(2, None);
    let mut state = state_with(&[4]);
    assert_eq!(lease(&mut state, 1, 0, &p)[0].attempt, 1);
    assert!(
        run_tick(&mut state, 999, &p).is_empty(),
        "lease not over yet"
    );
    let records = run_tick(&mut state, 1000, &p);
    let Some(Record::Released { releases, .. }) = records.first() else {
        panic!("expected a release, got {records:?}");
    };
    let not_before = releases[0].not_before_ms;
    assert!((1050..1100).contains(&not_before), "backoff {not_before}");
    assert!(
        lease(&mut state, 1, not_before - 1, &p).is_empty(),
        "delivered before backoff"
    );
    let second = lease(&mut state, 1, not_before, &p);
    assert_eq!(second[0].attempt, 2);
    let records = run_tick(&mut state, not_before + 1000, &p);
    assert_eq!(
        records,
        vec![Record::DeadLettered {
            inbox: INBOX.into(),
            letters: vec![DeadLetter {
                slot: second[0].slot,
                reason: DeadReason::MaxAttempts,
                attempts: 2,
            }],
        }]
    );
    assert_eq!(
        state.depth(INBOX),
        Depth {
            ready: 0,
            in_flight: 0,
            dead_letters: 1
        }
    );
}

#[test]
fn settle_answers_per_receipt() {
    let p = policy(5, None);
    let mut state = state_with(&[4, 4]);
    let leases = lease(&mut state, 2, 0, &p);
    let r0 = Receipt {
        slot: leases[0].slot,
        attempt: 1,
        queue: None,
    };
    let wrong_attempt = Receipt {
        attempt: 2,
        ..r0.clone()
    };
    let never = Receipt {
        slot: Slot {
            offset: Offset(77),
            priority: 4,
        },
        attempt: 1,
        queue: None,
    };
    let (outcomes, records) = state.settle(
        INBOX,
        &[
            Some(r0.clone()),
            Some(wrong_attempt),
            Some(never),
            None,
            Some(r0),
        ],
        Settle::Ack,
        0,
        (|_| p, |_| false),
    );
    assert_eq!(
        outcomes,
        vec![
            Outcome::Acked,
            Outcome::Stale,
            Outcome::Unknown,
            Outcome::Unknown,
            Outcome::Stale
        ]
    );
    assert_eq!(records.len(), 1, "one Acked record for the batch");
}

#[test]
fn a_receipt_of_a_redelivered_message_is_stale() {
    let p = policy(5, None);
    let mut state = state_with(&[4]);
    let first = lease(&mut state, 1, 0, &p)[0];
    run_tick(&mut state, 1000, &p);
    let second = lease(&mut state, 1, 10_000, &p)[0];
    assert_eq!(second.attempt, 2);
    let old = Receipt {
        slot: first.slot,
        attempt: 1,
        queue: None,
    };
    let (outcomes, records) =
        state.settle(INBOX, &[Some(old)], Settle::Ack, 10_000, (|_| p, |_| false));
    assert_eq!((outcomes, records), (vec![Outcome::Stale], vec![]));
}

#[test]
fn nack_delays_or_rejects() {
    let p = policy(5, None);
    let mut state = state_with(&[4, 4]);
    let leases = lease(&mut state, 2, 0, &p);
    let receipt = |l: &Lease| {
        Some(Receipt {
            slot: l.slot,
            attempt: l.attempt,
            queue: None,
        })
    };
    let delay = Settle::Nack {
        delay_ms: 500,
        dead_letter: false,
    };
    let (outcomes, records) = state.settle(
        INBOX,
        &[receipt(&leases[0])],
        delay,
        100,
        (|_| p, |_| false),
    );
    assert_eq!(outcomes, vec![Outcome::Nacked]);
    records.iter().for_each(|r| {
        state.apply(r, Offset(0), 100);
    });
    assert!(
        lease(&mut state, 1, 599, &p).is_empty(),
        "delivered before the nack delay"
    );
    assert_eq!(lease(&mut state, 1, 600, &p)[0].attempt, 2);

    let reject = Settle::Nack {
        delay_ms: 0,
        dead_letter: true,
    };
    let (outcomes, records) = state.settle(
        INBOX,
        &[receipt(&leases[1])],
        reject,
        700,
        (|_| p, |_| false),
    );
    assert_eq!(outcomes, vec![Outcome::DeadLettered]);
    records.iter().for_each(|r| {
        state.apply(r, Offset(0), 700);
    });
    let dead = state.dead_letters(INBOX, None, 10);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::Rejected);
}

#[test]
fn ttl_expiry_dead_letters_with_reason_expired() {
    let p = policy(5, None);
    let mut state = State::new();
    state.apply(&message(4, None, Some(5_000)), Offset(0), 0);
    state.apply(&message(4, None, None), Offset(1), 0);
    assert!(run_tick(&mut state, 4_999, &p).is_empty());
    let records = run_tick(&mut state, 5_000, &p);
    let Some(Record::DeadLettered { letters, .. }) = records.first() else {
        panic!("expected a dead letter, got {records:?}");
    };
    assert_eq!(letters[0].reason, DeadReason::Expired);
    assert_eq!(letters[0].slot.offset, Offset(0));
    assert_eq!(state.depth(INBOX).ready, 1);
}

#[test]
fn delayed_messages_wait_for_their_time() {
    let p = policy(5, None);
    let mut state = State::new();
    state.apply(&message(9, Some(2_000), None), Offset(0), 0);
    state.apply(&message(0, None, None), Offset(1), 0);
    assert_eq!(offsets(&lease(&mut state, 10, 1_999, &p)), vec![1]);
    assert_eq!(
        state.next_due_ms(),
        Some(2_000),
        "the delay ends before the lease"
    );
    assert_eq!(offsets(&lease(&mut state, 10, 2_000, &p)), vec![0]);
}

#[test]
fn redrive_resets_attempts() {
    let p = policy(1, None);
    let mut state = state_with(&[4]);
    lease(&mut state, 1, 0, &p);
    run_tick(&mut state, 1000, &p);
    assert_eq!(state.depth(INBOX).dead_letters, 1);
    let record = state.redrive(INBOX, None).expect("one dead letter");
    state.apply(&record, Offset(0), 1000);
    assert_eq!(state.depth(INBOX).dead_letters, 0);
    assert_eq!(lease(&mut state, 1, 1000, &p)[0].attempt, 1);
    assert!(
        state.redrive(INBOX, Some(&[0, 5])).is_none(),
        "nothing dead"
    );
}

#[test]
fn receipts_round_trip_and_reject_garbage() {
    let receipt = Receipt {
        slot: Slot {
            offset: Offset(u64::MAX - 3),
            priority: 9,
        },
        attempt: 77,
        queue: None,
    };
    assert_eq!(Receipt::parse(&receipt.encode()), Some(receipt.clone()));
    for bad in [
        "",
        "zz",
        &"0".repeat(25),
        &"f".repeat(25),
        &format!("{}x", &receipt.encode()[..24]),
    ] {
        assert_eq!(Receipt::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn a_used_nonce_counts_until_its_time_then_is_forgotten_by_the_record_clock() {
    let mut state = State::default();
    let used = Record::NonceUsed {
        signer: "alice".into(),
        nonce: "n1".into(),
        until_ms: 10_000,
    };
    state.apply(&used, Offset(0), 1_000);
    assert!(state.nonce_used("alice", "n1", 5_000));
    assert!(state.nonce_used("alice", "n1", 10_000));
    assert!(
        !state.nonce_used("alice", "n1", 10_001),
        "past its window it no longer counts"
    );
    assert!(!state.nonce_used("bob", "n1", 5_000));
    // A later record's time passes the window: the nonce is forgotten.
    let later = Record::NonceUsed {
        signer: "bob".into(),
        nonce: "n2".into(),
        until_ms: 90_000,
    };
    state.apply(&later, Offset(1), 20_000);
    assert!(
        !state.nonce_used("alice", "n1", 0),
        "forgotten, not only past"
    );
    assert_eq!(state.nonces.len(), 1);
    assert_eq!(state.nonces.next_expiry(), Some(90_000));
    // Used again later (a replay after its window): it counts until its new time, and the
    // old time passing does not forget it.
    let again = |until_ms| Record::NonceUsed {
        signer: "carol".into(),
        nonce: "n3".into(),
        until_ms,
    };
    state.apply(&again(30_000), Offset(2), 20_000);
    state.apply(&again(60_000), Offset(3), 20_000);
    state.apply(&later, Offset(4), 30_000);
    assert!(state.nonce_used("carol", "n3", 50_000));
    state.apply(&later, Offset(5), 60_000);
    assert!(
        !state.nonce_used("carol", "n3", 0),
        "forgotten at its new time"
    );
}

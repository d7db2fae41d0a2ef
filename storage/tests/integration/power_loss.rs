//! T2/T3: simulated power loss after every I/O operation of a workload (redb's crash
//! countdown) of messages (also fanned out to several inboxes, to a capability queue, with
//! ordering keys), leases, queue leases and acks. With `fsync=always`, every append whose fsync completed survives every crash
//! in every tear mode, and the recovered log is a prefix of what was attempted. With
//! `fsync=never` the same checker finds loss (the negative control shows it can fail).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use courier_storage::sim::{SimDisk, TearMode, TEAR_MODES};

use courier_storage::{FsyncPolicy, Lease, Log, Offset, Record, Slot};

use crate::support::{append_concurrently, body, index_tempdir, message, options};

const APPENDS: u64 = 320;
const SEGMENT_BYTES: u64 = 12 * 1024;
const CHECKPOINT_AT: u64 = 150;

#[derive(Default)]
struct Outcome {
    /// Records whose append returned Ok.
    acked: BTreeMap<u64, Record>,
    /// Every record the workload tried to append, at the offset it would get.
    attempted: BTreeMap<u64, Record>,
}

fn records_for(step: u64) -> Vec<Record> {
    let slot = Slot {
        offset: Offset(step.saturating_sub(1)),
        priority: 4,
    };
    let main = match step % 11 {
        3 => Record::Leased {
            inbox: "a".into(),
            leases: vec![Lease {
                slot,
                attempt: 1,
                deadline_ms: step * 1000,
            }],
        },
        7 => Record::Acked {
            inbox: "a".into(),
            slots: vec![slot],
        },
        // Fan-out: one record routed to several inboxes (a topic), with an ordering key; and
        // a capability queue's message and lease.
        5 | 8 => {
            let mut record = message(&format!("f{step}"), "a", 4, &body(step, 200));
            if let Record::Message(m) = &mut record {
                if step % 11 == 5 {
                    m.to = "topic:news.eu".into();
                    m.destinations = vec!["a".into(), "b".into(), "c".into()];
                    m.ordering_key = Some(format!("k{}", step % 3));
                } else {
                    m.to = "capability:plan".into();
                    m.destinations = vec!["capability:plan".into()];
                }
            }
            record
        }
        10 => Record::LeasedTo {
            queue: "capability:plan".into(),
            agent: "a".into(),
            leases: vec![Lease {
                slot: Slot {
                    offset: Offset(step.saturating_sub(2)),
                    priority: 4,
                },
                attempt: 1,
                deadline_ms: step * 1000,
            }],
        },
        _ => message(
            &format!("m{step}"),
            if step.is_multiple_of(2) { "a" } else { "b" },
            u8::try_from(step % 10).unwrap(),
            &body(step, 40 + usize::try_from(step * 37 % 360).unwrap()),
        ),
    };
    if step % 10 == 9 {
        vec![
            main,
            message(&format!("x{step}"), "b", 2, &body(step, 90)),
            message(&format!("y{step}"), "a", 6, &body(step, 30)),
        ]
    } else {
        vec![main]
    }
}

fn run_workload(log: &Log, out: &mut Outcome) {
    let mut next = 0u64;
    for step in 0..APPENDS {
        let records = records_for(step);
        for (i, r) in records.iter().enumerate() {
            out.attempted.insert(next + i as u64, r.clone());
        }
        let Ok(appended) = log.append(1_000 + step, records.clone()) else {
            return;
        };
        assert_eq!(appended.first.0, next, "offsets are consecutive");
        for (i, r) in records.into_iter().enumerate() {
            out.acked.insert(next + i as u64, r);
        }
        next += appended.count;
        if step == CHECKPOINT_AT && log.checkpoint().is_err() {
            return;
        }
    }
}

fn dir() -> &'static Path {
    Path::new("/sim/data")
}

/// Opens the crashed disk and returns how many acknowledged records were lost; panics on
/// anything that is wrong whatever the policy (a record that was never attempted).
fn recover_and_check(
    sim: &SimDisk,
    index_dir: &Path,
    out: &Outcome,
    compare_rebuild: bool,
) -> usize {
    let opts = options(
        Arc::new(sim.clone()),
        FsyncPolicy::Always,
        SEGMENT_BYTES,
        index_dir,
    );
    let (log, _report) = Log::open(dir(), opts).expect("recovery never fails after a power loss");
    let end = log.durable_end().0;
    for offset in 0..end {
        let frame = log
            .read(Offset(offset))
            .expect("every offset below the end reads");
        assert_eq!(
            Some(&frame.record),
            out.attempted.get(&offset),
            "offset {offset}: prefix property"
        );
    }
    let lost = out.acked.keys().filter(|o| **o >= end).count();
    // The recovered log takes appends again.
    let again = log
        .append(9_999, vec![message("after", "a", 4, b"{}")])
        .expect("append after recovery");
    assert_eq!(again.first.0, end);
    let live = log.index().snapshot().unwrap();
    drop(log);
    if compare_rebuild {
        let fresh = index_tempdir();
        let opts = options(
            Arc::new(sim.clone()),
            FsyncPolicy::Always,
            SEGMENT_BYTES,
            fresh.path(),
        );
        let (log, report) = Log::open(dir(), opts).unwrap();
        assert!(report.index_rebuilt);
        assert_eq!(
            log.index().snapshot().unwrap(),
            live,
            "index rebuilt from the log equals the recovered one"
        );
    }
    lost
}

/// Runs the workload with a crash after `crash_after` operations, then recovers.
fn crash_state(
    fsync: FsyncPolicy,
    crash_after: u64,
    mode: TearMode,
    seed: u64,
    compare: bool,
) -> usize {
    let sim = SimDisk::new();
    let index = index_tempdir();
    let mut out = Outcome::default();
    sim.crash_after(crash_after);
    let opts = options(Arc::new(sim.clone()), fsync, SEGMENT_BYTES, index.path());
    if let Ok((log, _)) = Log::open(dir(), opts) {
        run_workload(&log, &mut out);
        drop(log);
    }
    sim.crash(mode, seed);
    recover_and_check(&sim, index.path(), &out, compare)
}

fn probe_ops(fsync: FsyncPolicy) -> u64 {
    let sim = SimDisk::new();
    let index = index_tempdir();
    let opts = options(Arc::new(sim.clone()), fsync, SEGMENT_BYTES, index.path());
    let (log, _) = Log::open(dir(), opts).unwrap();
    let mut out = Outcome::default();
    run_workload(&log, &mut out);
    assert_eq!(
        out.acked.len(),
        out.attempted.len(),
        "the probe run completes"
    );
    let segments = log.segments().len();
    assert!(
        segments >= 3,
        "the workload spans at least two rolls ({segments} segments)"
    );
    drop(log);
    sim.ops()
}

#[test]
fn power_loss_after_every_io_step_loses_no_fsynced_append() {
    let ops = probe_ops(FsyncPolicy::Always);
    let seed = crate::support::seed(0x5EED);
    // Two threads, one per core, each taking every other crash point.
    let states: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|parity| {
                scope.spawn(move || {
                    let mut states = 0;
                    for crash_after in (parity..=ops).step_by(2) {
                        for (m, mode) in TEAR_MODES.into_iter().enumerate() {
                            let state_seed = seed ^ (crash_after * 3 + m as u64);
                            let lost = crash_state(FsyncPolicy::Always, crash_after, mode, state_seed, crash_after % 29 == 0);
                            assert_eq!(lost, 0, "crash after op {crash_after} in {mode:?} lost {lost} acknowledged appends (seed {seed})");
                            states += 1;
                        }
                    }
                    states
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("crash worker"))
            .sum()
    });
    eprintln!("{states} crash states over {ops} I/O operations");
    assert!(states >= 2_000, "only {states} crash states");
}

#[test]
fn power_loss_with_fsync_never_reports_loss() {
    // Negative control (T3): the same checker must see loss when appends are not fsynced.
    let ops = probe_ops(FsyncPolicy::Never);
    let mut lost_total = 0;
    for crash_after in (0..=ops).step_by(7) {
        lost_total += crash_state(
            FsyncPolicy::Never,
            crash_after,
            TearMode::DropPending,
            crash_after,
            false,
        );
    }
    eprintln!("fsync=never lost {lost_total} acknowledged appends over the crash states");
    assert!(lost_total > 0, "the checker must detect loss without fsync");
}

/// Record `n` of thread `t` in the concurrent workload: 40 per thread, of growing sizes.
fn concurrent_record(t: u64, n: u64) -> Record {
    let size = 60 + usize::try_from(n).unwrap() * 7;
    message(&format!("t{t}-{n}"), "a", 4, &body(t * 100 + n, size))
}

/// Eight threads append concurrently, so appends queue up while the writer writes and fsyncs
/// (group commits of several appends), and the power fails after `crash_after` I/O operations. Every
/// acknowledged append survives; every record that survives was attempted, once. Returns the
/// number of acknowledged appends and the operations the run made before the crash.
fn concurrent_crash_state(crash_after: Option<u64>, mode: TearMode, seed: u64) -> (usize, u64) {
    let sim = SimDisk::new();
    let index = index_tempdir();
    if let Some(n) = crash_after {
        sim.crash_after(n);
    }
    let opts = options(
        Arc::new(sim.clone()),
        FsyncPolicy::Always,
        4096,
        index.path(),
    );
    let mut acked = Vec::new();
    if let Ok((log, _)) = Log::open(dir(), opts.clone()) {
        acked = append_concurrently(&Arc::new(log), 8, 40, concurrent_record);
    }
    let ops = sim.ops();
    sim.crash(mode, seed);
    let (log, _) = Log::open(dir(), opts).expect("recovery never fails after a power loss");
    let end = log.durable_end().0;
    let mut seen = std::collections::HashSet::new();
    for offset in 0..end {
        let Record::Message(m) = log.read(Offset(offset)).unwrap().record else {
            panic!("offset {offset} is not a message");
        };
        assert!(
            m.id.starts_with('t'),
            "offset {offset}: {} was never attempted",
            m.id
        );
        assert!(
            seen.insert(m.id.clone()),
            "offset {offset}: {} appears twice",
            m.id
        );
    }
    for (offset, record) in &acked {
        let at = format!("crash after {crash_after:?} in {mode:?}");
        assert!(
            *offset < end,
            "acknowledged offset {offset} lost (end {end}, {at})"
        );
        assert_eq!(&log.read(Offset(*offset)).unwrap().record, record, "{at}");
    }
    (acked.len(), ops)
}

#[test]
fn power_loss_with_concurrent_appenders_loses_no_fsynced_append() {
    let seed = crate::support::seed(0xC0C0);
    let mut rng = crate::support::Rng(seed);
    // The op count of a concurrent run varies with the batching; probe one to place the
    // crash points from the start of the run to its end.
    let (_, ops) = concurrent_crash_state(None, TearMode::DropPending, seed);
    let (mut states, mut acked) = (0, 0);
    let steps: u64 = if crate::support::soak() { 600 } else { 60 };
    for step in 0..steps {
        let crash_after = ops * step / steps + rng.below(ops / steps + 1);
        for (m, mode) in TEAR_MODES.into_iter().enumerate() {
            let state_seed = seed ^ (step * 3 + m as u64);
            acked += concurrent_crash_state(Some(crash_after), mode, state_seed).0;
            states += 1;
        }
    }
    eprintln!("{states} concurrent crash states over {ops} I/O operations, {acked} acknowledged appends checked");
    assert!(acked > 1000, "the crash points reach far into the workload");
}

/// Writeback out of order (RELIABILITY rule 4 on a file system without ordered data): a batch
/// of several pages is written but its fsync never completes, and the power fails with each
/// page and the length at a random point. Where a later page survived and an earlier one did
/// not, the records after the hole were never acknowledged: the log opens, keeps every
/// acknowledged record, and drops the hole and what follows it as a torn tail.
#[test]
fn power_loss_with_pages_written_back_out_of_order_keeps_every_acked_append() {
    let mut holes = 0;
    for seed in 0..200u64 {
        let sim = SimDisk::new();
        let index = index_tempdir();
        let opts = options(
            Arc::new(sim.clone()),
            FsyncPolicy::Always,
            1 << 20,
            index.path(),
        );
        let (log, _) = Log::open(dir(), opts.clone()).unwrap();
        // Acknowledged: a few records whose last one ends inside a page.
        let acked: Vec<Record> = (0..3 + seed % 5)
            .map(|n| {
                message(
                    &format!("a{n}"),
                    "a",
                    4,
                    &body(n, 500 + (seed * 131 % 900) as usize),
                )
            })
            .collect();
        log.append(1_000, acked.clone()).unwrap();
        // Written, never fsynced: a batch spanning several pages.
        let lost: Vec<Record> = (0..12)
            .map(|n| message(&format!("b{n}"), "a", 4, &body(100 + n, 700)))
            .collect();
        sim.crash_after(1);
        assert!(
            log.append(2_000, lost).is_err(),
            "the fsync fails: power off"
        );
        drop(log);
        sim.crash(TearMode::Pages, seed);
        let (log, report) = Log::open(dir(), opts).unwrap_or_else(|e| {
            panic!("seed {seed}: the log must open after a torn write-back: {e}")
        });
        if let Some(t) = &report.truncated {
            if t.reason.contains("never written") {
                holes += 1;
                assert!(
                    t.quarantined.is_some(),
                    "seed {seed}: the dropped tail is kept"
                );
            }
        }
        for (i, record) in acked.iter().enumerate() {
            assert_eq!(
                &log.read(Offset(i as u64)).unwrap().record,
                record,
                "seed {seed}"
            );
        }
        assert!(log.durable_end().0 >= acked.len() as u64);
    }
    eprintln!("{holes} of 200 crash states had a hole before surviving records");
    assert!(holes > 10, "the tear mode must make holes ({holes})");
}

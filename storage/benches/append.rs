//! Storage benchmarks (criterion). Figures go in the closing notes, never in tests.
//!
//! - `append/<policy>/<appenders>`: 1 KiB messages from 1, 8 and 64 concurrent appenders,
//!   `fsync=always` and `never`; throughput in appends per second.
//! - `append_inflight/<policy>/<inflight>x<batch>`: one driver keeps that many appends of
//!   `batch` 1 KiB records outstanding through `Log::submit`, as the server's tasks do;
//!   throughput in bytes per second.
//! - `append_floor/always/64`: the same 64 appender threads against a bare group commit (a
//!   queue, one writer thread, one `pwrite` and one fdatasync per batch into a preallocated
//!   file; no record format, index or checkpoint): what blocking appenders can reach on this
//!   machine at all, the reference for `append/always/64` as fio is for one appender.
//! - `read/random`: reads by offset through the index over a 100k-record log.
//! - `recovery/*`: opening a log of `COURIER_BENCH_LOG_BYTES` (default 1 GiB) of 1 KiB
//!   messages with a fresh checkpoint (with and without the CRC check of sealed segments)
//!   and with no index at all (full rebuild).
//!
//! Run: `cargo bench -p courier-storage --bench append` (filters work: `-- append/always`).
//! The data lives in `COURIER_BENCH_DIR` (default: a temporary directory under /var/tmp, so
//! that it is on the disk and not on tmpfs).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use courier_storage::{FsyncPolicy, Log, LogOptions, Message, Offset, Record};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn message(n: u64, body_bytes: usize) -> Record {
    Record::Message(Message {
        id: format!("m{n}"),
        from: "bench".into(),
        to: "agent:sink".into(),
        destinations: vec!["sink".into()],
        kind: None,
        priority: 4,
        headers: vec![],
        correlation_id: None,
        in_reply_to: None,
        not_before_ms: None,
        expires_at_ms: None,
        dedupe_until_ms: None,
        body: vec![b'x'; body_bytes],
        ordering_key: None,
        request_until_ms: None,
    })
}

fn bench_root() -> PathBuf {
    std::env::var_os("COURIER_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

fn open(dir: &Path, fsync: FsyncPolicy) -> Log {
    let options = LogOptions {
        fsync,
        ..LogOptions::default()
    };
    Log::open(dir, options).expect("open bench log").0
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for (name, fsync) in [
        ("always", FsyncPolicy::Always),
        ("never", FsyncPolicy::Never),
    ] {
        for appenders in [1u64, 8, 64] {
            let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
            let log = Arc::new(open(dir.path(), fsync));
            group.bench_function(BenchmarkId::new(name, appenders), |b| {
                b.iter_custom(|iters| {
                    let log = log.clone();
                    time_appender_threads(appenders, iters, move |n| {
                        log.append(n, vec![message(n, 1024)]).expect("append");
                    })
                });
            });
            report_batching(&format!("append/{name}/{appenders}"), &log);
        }
    }
    group.finish();
}

/// Runs `iters` appends spread over `appenders` threads, each calling `append` with a number
/// unique to the append; returns the time per append scaled back to `iters`.
fn time_appender_threads(
    appenders: u64,
    iters: u64,
    append: impl Fn(u64) + Clone + Send + 'static,
) -> Duration {
    let per = iters.div_ceil(appenders);
    #[expect(clippy::disallowed_methods, reason = "a benchmark measures time")]
    let start = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|t| {
            let append = append.clone();
            std::thread::spawn(move || (t * per..(t + 1) * per).for_each(&append))
        })
        .collect();
    for t in threads {
        t.join().expect("appender");
    }
    start
        .elapsed()
        .mul_f64(iters as f64 / (per * appenders) as f64)
}

/// One driver keeps `inflight` appends of `batch` records outstanding through `submit`, the
/// way the server's async tasks use the log (no OS thread per request).
fn submit_inflight(log: &Arc<Log>, inflight: u64, batch: u64, total: u64) {
    let (tx, rx) = std::sync::mpsc::channel();
    let submit = |n: u64| {
        let tx = tx.clone();
        let records = (0..batch).map(|i| message(n * batch + i, 1024)).collect();
        log.submit(n, records, move |r| {
            tx.send(r.map(|_| ())).expect("driver alive")
        });
    };
    let mut sent = 0;
    while sent < inflight.min(total) {
        submit(sent);
        sent += 1;
    }
    for _ in 0..total {
        rx.recv().expect("completion").expect("append");
        if sent < total {
            submit(sent);
            sent += 1;
        }
    }
}

fn appends_inflight(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_inflight");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    for (name, fsync) in [
        ("always", FsyncPolicy::Always),
        ("never", FsyncPolicy::Never),
    ] {
        for (inflight, batch) in [(64u64, 1u64), (256, 1), (16, 100)] {
            let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
            let log = Arc::new(open(dir.path(), fsync));
            group.throughput(Throughput::Bytes(batch * 1024));
            let id = BenchmarkId::new(name, format!("{inflight}x{batch}"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    #[expect(clippy::disallowed_methods, reason = "a benchmark measures time")]
                    let start = Instant::now();
                    submit_inflight(&log, inflight, batch, iters);
                    start.elapsed()
                });
            });
            report_batching(&format!("append_inflight/{name}/{inflight}x{batch}"), &log);
        }
    }
    group.finish();
}

/// Prints how many records each fsync and each commit covered (group-commit batch size).
fn report_batching(name: &str, log: &Log) {
    let stats = log.stats();
    let per = |n: u64| stats.records as f64 / n.max(1) as f64;
    eprintln!(
        "{name}: {:.1} records per fsync, {:.1} per commit",
        per(stats.fsyncs),
        per(stats.commits)
    );
}

/// The bare group commit of `append_floor`: appenders push 1 KiB into `queue` and wait on
/// `durable_advanced` until `durable` covers their sequence number.
struct Floor {
    queue: Mutex<FloorQueue>,
    wake_writer: Condvar,
    durable: Mutex<u64>,
    durable_advanced: Condvar,
}

#[derive(Default)]
struct FloorQueue {
    bodies: Vec<Vec<u8>>,
    submitted: u64,
    writer_waiting: bool,
    stop: bool,
}

const FLOOR_FILE_BYTES: u64 = 256 << 20;

impl Floor {
    fn append(&self, body: Vec<u8>) {
        let (mine, wake) = {
            let mut queue = self.queue.lock().expect("floor queue");
            queue.bodies.push(body);
            queue.submitted += 1;
            (queue.submitted, queue.writer_waiting)
        };
        if wake {
            self.wake_writer.notify_one();
        }
        let mut durable = self.durable.lock().expect("floor durable");
        while *durable < mine {
            durable = self.durable_advanced.wait(durable).expect("floor durable");
        }
    }

    /// Returns the number of fsyncs.
    fn write(&self, file: &std::fs::File) -> u64 {
        let (mut position, mut fsyncs, mut buffer) = (0u64, 0u64, Vec::new());
        loop {
            let (bodies, upto) = {
                let mut queue = self.queue.lock().expect("floor queue");
                while queue.bodies.is_empty() && !queue.stop {
                    queue.writer_waiting = true;
                    queue = self.wake_writer.wait(queue).expect("floor queue");
                    queue.writer_waiting = false;
                }
                if queue.bodies.is_empty() {
                    return fsyncs;
                }
                (std::mem::take(&mut queue.bodies), queue.submitted)
            };
            buffer.clear();
            for body in &bodies {
                let len = u32::try_from(body.len()).expect("small body");
                buffer.extend_from_slice(&len.to_le_bytes());
                buffer.extend_from_slice(body);
            }
            if position + buffer.len() as u64 > FLOOR_FILE_BYTES {
                position = 0;
            }
            file.write_all_at(&buffer, position).expect("floor write");
            position += buffer.len() as u64;
            #[expect(clippy::disallowed_methods, reason = "a reference, not the log")]
            file.sync_data().expect("floor fdatasync");
            fsyncs += 1;
            *self.durable.lock().expect("floor durable") = upto;
            self.durable_advanced.notify_all();
        }
    }
}

fn appends_floor(c: &mut Criterion) {
    let appenders = 64u64;
    let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
    let mut file = std::fs::File::create(dir.path().join("floor")).expect("floor file");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..FLOOR_FILE_BYTES >> 20 {
        file.write_all(&zeros).expect("zero-fill");
    }
    #[expect(clippy::disallowed_methods, reason = "a reference, not the log")]
    file.sync_all().expect("sync floor file");
    let floor = Arc::new(Floor {
        queue: Mutex::default(),
        wake_writer: Condvar::new(),
        durable: Mutex::new(0),
        durable_advanced: Condvar::new(),
    });
    let writer = {
        let floor = floor.clone();
        std::thread::spawn(move || floor.write(&file))
    };
    let mut group = c.benchmark_group("append_floor");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("always", appenders), |b| {
        b.iter_custom(|iters| {
            let floor = floor.clone();
            time_appender_threads(appenders, iters, move |_| floor.append(vec![b'x'; 1024]))
        });
    });
    group.finish();
    floor.queue.lock().expect("floor queue").stop = true;
    floor.wake_writer.notify_one();
    let fsyncs = writer.join().expect("floor writer");
    let appended = floor.queue.lock().expect("floor queue").submitted;
    eprintln!(
        "append_floor/always/64: {:.1} records per fsync",
        appended as f64 / fsyncs.max(1) as f64
    );
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
    let log = open(dir.path(), FsyncPolicy::Never);
    let records = 100_000u64;
    for chunk in 0..records / 1000 {
        log.append(
            1,
            (0..1000).map(|n| message(chunk * 1000 + n, 1024)).collect(),
        )
        .expect("fill");
    }
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Elements(1));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    group.bench_function("random", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            log.read(Offset(x % records)).expect("read")
        });
    });
    group.finish();
}

fn fill(dir: &Path, bytes: u64) {
    let log = open(dir, FsyncPolicy::Never);
    let per_batch = 1000u64;
    let batches = bytes / (1100 * per_batch);
    for b in 0..batches {
        log.append(
            b,
            (0..per_batch)
                .map(|n| message(b * per_batch + n, 1024))
                .collect(),
        )
        .expect("fill");
    }
    log.close().expect("close");
}

fn recovery(c: &mut Criterion) {
    let bytes: u64 = std::env::var("COURIER_BENCH_LOG_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let dir = tempfile::tempdir_in(bench_root()).expect("bench dir");
    fill(dir.path(), bytes);
    let mut group = c.benchmark_group("recovery");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (name, verify_sealed) in [("checkpoint", false), ("checkpoint_verify_sealed", true)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let options = LogOptions {
                    verify_sealed,
                    fsync: FsyncPolicy::Never,
                    ..LogOptions::default()
                };
                let (log, report) = Log::open(dir.path(), options).expect("open");
                assert_eq!(report.replayed_records, 0);
                drop(log);
            });
        });
    }
    group.bench_function("no_index_rebuild", |b| {
        b.iter_batched(
            || std::fs::remove_dir_all(dir.path().join("index")).expect("delete index"),
            |()| {
                let options = LogOptions {
                    verify_sealed: false,
                    fsync: FsyncPolicy::Never,
                    ..LogOptions::default()
                };
                let (log, report) = Log::open(dir.path(), options).expect("open");
                assert!(report.index_rebuilt);
                log.close().expect("close");
            },
            criterion::BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(
    benches,
    appends,
    appends_floor,
    appends_inflight,
    reads,
    recovery
);
criterion_main!(benches);

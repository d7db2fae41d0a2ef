//! Helpers shared by the integration tests.

use std::path::Path;
use std::sync::Arc;

use courier_storage::io::Disk;
use courier_storage::{FsyncPolicy, Log, LogOptions, Message, Record};

/// A message to `inbox` whose body is `body` (raw JSON bytes as the server would store them).
pub fn message(id: &str, inbox: &str, priority: u8, body: &[u8]) -> Record {
    Record::Message(Message {
        id: id.to_owned(),
        from: "sender".to_owned(),
        to: format!("agent:{inbox}"),
        destinations: vec![inbox.to_owned()],
        kind: Some("test".to_owned()),
        priority,
        headers: vec![("k".to_owned(), "v".to_owned())],
        correlation_id: None,
        in_reply_to: None,
        not_before_ms: None,
        expires_at_ms: None,
        dedupe_until_ms: None,
        body: body.to_vec(),
        ordering_key: None,
        request_until_ms: None,
    })
}

/// A JSON body of roughly `len` bytes that encodes `n`.
pub fn body(n: u64, len: usize) -> Vec<u8> {
    let mut s = format!("{{\"n\":{n},\"pad\":\"");
    while s.len() + 2 < len {
        s.push(char::from(b'a' + u8::try_from(n % 26).unwrap()));
    }
    s.push_str("\"}");
    s.into_bytes()
}

/// Options with the given disk, policy and segment size, and the index at `index_dir`.
pub fn options(
    disk: Arc<dyn Disk>,
    fsync: FsyncPolicy,
    segment_bytes: u64,
    index_dir: &Path,
) -> LogOptions {
    LogOptions {
        disk,
        fsync,
        segment_bytes,
        index_cache_bytes: 4 << 20,
        index_dir: Some(index_dir.to_path_buf()),
        ..LogOptions::default()
    }
}

/// Opens a log on the real file system in `dir` with small segments.
pub fn open_real(dir: &Path, segment_bytes: u64) -> Log {
    let opts = LogOptions {
        segment_bytes,
        index_cache_bytes: 4 << 20,
        ..LogOptions::default()
    };
    Log::open(dir, opts).expect("open log").0
}

/// A temporary directory for a throwaway sled index: on tmpfs where there is one, because the
/// crash tests create thousands and sled fsyncs its own files.
pub fn index_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

/// Copies a directory tree (for tests that damage a copy of a clean log).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A deterministic pseudo-random sequence (splitmix64) for seeded tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed of a seeded test: `COURIER_SEED` if set, else `default`; printed for replay.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed: {seed} (replay with COURIER_SEED={seed})");
    seed
}

/// Whether the long soak versions were asked for.
pub fn soak() -> bool {
    std::env::var("COURIER_SOAK").is_ok_and(|v| v == "1")
}

/// Polls `done` until it holds, failing after `seconds` (never a sleep used as a wait for a
/// known event: this is for state that changes in the background).
#[expect(
    clippy::disallowed_methods,
    reason = "tests bound their polling by wall time"
)]
pub fn wait_until(seconds: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs `f` with this thread's `tracing` output captured, and returns what `f` returned and
/// the captured text (no colours).
///
/// One global subscriber serves the whole test binary and writes each thread's events to that
/// thread's capture buffer, or nowhere. A scoped subscriber (`with_default`) would be flaky:
/// `tracing` caches each callsite's interest once per process, computed against the default of
/// whichever thread reaches the callsite first, so a test without a subscriber that recovers a
/// log at the same moment caches "never" for the warning this test waits for
/// (tokio-rs/tracing#3611, #2874). With one global subscriber every thread computes the same
/// interest.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::cell::RefCell;

    thread_local! {
        static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    }
    /// Writes to the calling thread's capture buffer while it captures, else drops the bytes.
    struct ThisThread;
    impl std::io::Write for ThisThread {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            CAPTURED.with(|c| {
                if let Some(buffer) = c.borrow_mut().as_mut() {
                    buffer.extend_from_slice(bytes);
                }
            });
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| ThisThread)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the storage tests");
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let result = f();
    let bytes = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (result, String::from_utf8_lossy(&bytes).into_owned())
}

/// Appends from `threads` threads at once, `per_thread` records each, record `n` of thread `t`
/// being `record(t, n)`; a thread stops at its first failed append. Returns every acknowledged
/// (offset, record).
pub fn append_concurrently(
    log: &std::sync::Arc<Log>,
    threads: u64,
    per_thread: u64,
    record: fn(u64, u64) -> Record,
) -> Vec<(u64, Record)> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for n in 0..per_thread {
                    let r = record(t, n);
                    match log.append(n, vec![r.clone()]) {
                        Ok(a) => mine.push((a.first.0, r)),
                        Err(_) => break,
                    }
                }
                mine
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

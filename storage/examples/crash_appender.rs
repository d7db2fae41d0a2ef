//! Appends messages to a log from several threads and prints `<offset> <id>` for each append
//! once it is acknowledged (durable). The storage crash test runs it and kills it with
//! SIGKILL at random moments; it is also a small example of the API.
//!
//! Usage: `crash_appender <data dir> <run id> [threads]`. It stops by itself after 20,000
//! appends or 20 seconds.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use courier_storage::{Log, LogOptions, Message, Record};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(run)) = (args.next(), args.next()) else {
        eprintln!("usage: crash_appender <data dir> <run id> [threads]");
        std::process::exit(2);
    };
    let threads: u64 = args.next().and_then(|t| t.parse().ok()).unwrap_or(4);
    let options = LogOptions {
        segment_bytes: 64 * 1024,
        index_cache_bytes: 4 << 20,
        ..LogOptions::default()
    };
    let (log, _) = Log::open(dir.as_ref(), options).expect("open the log");
    let log = Arc::new(log);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let budget = Arc::new(AtomicU64::new(20_000));
    #[expect(
        clippy::disallowed_methods,
        reason = "an example program bounds its own run time"
    )]
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (log, out, budget, run) = (log.clone(), out.clone(), budget.clone(), run.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    // A checked decrement: the budget must not wrap once it is spent.
                    let spent = budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                        .is_err();
                    if spent || started.elapsed().as_secs() >= 20 {
                        return;
                    }
                    let id = format!("{run}-{t}-{n}");
                    let record = Record::Message(Message {
                        id: id.clone(),
                        from: "appender".into(),
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
                        body: format!(
                            "{{\"id\":\"{id}\",\"pad\":\"{}\"}}",
                            "x".repeat(usize::try_from(n % 300).unwrap_or(0))
                        )
                        .into_bytes(),
                        ordering_key: None,
                        request_until_ms: None,
                    });
                    let appended = log.append(n, vec![record]).expect("append");
                    let mut out = out.lock().expect("stdout lock");
                    writeln!(out, "{} {id}", appended.first.0).expect("stdout");
                    out.flush().expect("stdout");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
}

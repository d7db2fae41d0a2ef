//! T9 on a real full disk: the data directory on a small tmpfs fills up under load. Publishes
//! get 503, never a 2xx after the failure; the server reports not-ready and refuses writes;
//! once space returns, a restart recovers every message acknowledged before. (Mounting needs
//! root; without it the test prints a skip line.) The injected variants (EIO and ENOSPC on
//! write and fsync) are in `failpoints`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, offsets, receipts, send, TestServer};

/// Publishes `body_bytes`-byte messages to `worker` from 4 threads until each has been
/// refused twice with 503 `unavailable`; returns the offsets answered 201. Panics on any 2xx
/// after a thread's first 503, or on any other answer.
pub fn publish_until_refused(server: &TestServer, body_bytes: usize) -> BTreeSet<u64> {
    let addr = server.addr;
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let acked = acked.clone();
            std::thread::spawn(move || {
                let mut refused = 0;
                for n in 0..100_000 {
                    let body = json!({"to": "agent:worker", "from": "p",
                        "body": {"t": t, "n": n, "pad": "x".repeat(body_bytes)}});
                    let bytes = serde_json::to_vec(&body).unwrap();
                    let json = Some("application/json");
                    let r = send(addr, "POST", "/v1/messages", Some(&bytes), json, &[])
                        .expect("the server answers");
                    match r.status {
                        201 => {
                            assert_eq!(refused, 0, "a publish got 201 after a 503: {r:?}");
                            acked
                                .lock()
                                .unwrap()
                                .insert(r.json["offset"].as_u64().unwrap());
                        }
                        503 if r.code() == "unavailable" => {
                            refused += 1;
                            if refused == 2 {
                                return;
                            }
                        }
                        _ => panic!("publish answered {r:?}"),
                    }
                }
                panic!("the disk error never came");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("publisher");
    }
    let acked = acked.lock().unwrap().clone();
    acked
}

/// After a write failed: logged, not ready (but alive), writes refused with `Retry-After`.
pub fn assert_fail_stop(server: &TestServer) {
    let logs = server.logs();
    assert!(logs.contains("further writes"), "no error logged:\n{logs}");
    eventually(Duration::from_secs(5), "not ready", || {
        (server.get("/readyz").status == 503).then_some(())
    });
    assert_eq!(server.get("/healthz").status, 200);
    let refused = server.post(
        "/v1/messages",
        json!({"to": "agent:worker", "from": "p", "body": 1}),
    );
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
}

/// Drains `worker` (acking everything) and asserts every offset of `acked` was delivered;
/// then that the server takes writes again.
pub fn assert_all_delivered(server: &TestServer, acked: &BTreeSet<u64>, name: &str) {
    let mut delivered = BTreeSet::new();
    loop {
        let messages = server.receive("worker", json!({"max": 1000, "wait_ms": 0}));
        if messages.is_empty() {
            break;
        }
        let receipts = receipts(&messages);
        let receipts: Vec<&str> = receipts.iter().map(String::as_str).collect();
        server.settle("worker", "ack", json!({}), &receipts);
        delivered.extend(offsets(&messages));
    }
    let lost: Vec<_> = acked.difference(&delivered).collect();
    println!(
        "{name}: {} acknowledged publishes, {} delivered after the restart, lost {}",
        acked.len(),
        delivered.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "{name}: lost {lost:?}");
    server.publish("worker", json!("writable again"));
}

/// A tmpfs mounted for the test's life (lazily unmounted when dropped).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (for example `4m`) at `dir`; the error if that is not allowed.
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self(dir.to_owned()))
    }

    /// Grows (or shrinks) the file system in place.
    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount -o remount");
        assert!(status.success(), "remount {size} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_publishes_with_503_and_a_restart_recovers_when_space_returns() {
    let mut server = TestServer::unstarted(&[]);
    let tmpfs = match Tmpfs::mount(&server.data_dir(), "6m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            println!("SKIPPED full-disk test: cannot mount a tmpfs here ({why}); run as root");
            return;
        }
    };
    server.restart();
    server.register("worker", json!({}));
    let acked = publish_until_refused(&server, 1024);
    assert!(!acked.is_empty(), "nothing fit on the disk");
    assert_fail_stop(&server);
    // A restart on the still-full disk may fail or start; either way it loses nothing.
    match server.try_restart() {
        Ok(()) => println!("restart on a full disk: started"),
        Err(logs) => {
            assert!(logs.contains("disk is full"), "unclear refusal:\n{logs}");
            println!("restart on a full disk: refused, saying the disk is full");
        }
    }
    tmpfs.resize("64m");
    server.restart();
    if server.logs().contains("moved it aside") {
        println!("the index was damaged by the full disk and rebuilt from the log");
    }
    assert_all_delivered(&server, &acked, "T9 full tmpfs");
    drop(server);
    drop(tmpfs);
}

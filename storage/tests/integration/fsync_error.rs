//! T9: an fsync or write error is fail-stop. Every append waiting on the failed batch gets an
//! error (never Ok), every later append gets `Poisoned`, nothing is retried; after a restart
//! every append acknowledged before the failure is intact.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;

use courier_storage::sim::{SimDisk, TearMode};
use courier_storage::{Error, FsyncPolicy, Log, Offset};

use crate::support::{index_tempdir, message, options};

fn check_fail_stop(inject: impl Fn(&SimDisk)) {
    let sim = SimDisk::new();
    let index = index_tempdir();
    let dir = Path::new("/sim/data");
    let opts = options(
        Arc::new(sim.clone()),
        FsyncPolicy::Always,
        1 << 20,
        index.path(),
    );
    let (log, _) = Log::open(dir, opts.clone()).unwrap();
    for n in 0..10 {
        log.append(n, vec![message(&format!("before{n}"), "a", 4, b"{}")])
            .unwrap();
    }
    inject(&sim);
    let log = Arc::new(log);
    let results: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                log.append(100, vec![message(&format!("during{t}"), "a", 4, b"{}")])
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(
        results.iter().all(Result::is_err),
        "no append after the failure is acknowledged: {results:?}"
    );
    assert!(log.is_poisoned());
    let later = log.append(200, vec![message("later", "a", 4, b"{}")]);
    assert!(matches!(later, Err(Error::Poisoned)), "{later:?}");
    assert_eq!(
        log.durable_end(),
        Offset(10),
        "nothing past the failure becomes visible"
    );
    drop(log);

    sim.crash(TearMode::DropPending, 1);
    let (log, _) = Log::open(dir, opts).unwrap();
    assert!(log.durable_end() >= Offset(10));
    for n in 0..10u64 {
        assert_eq!(
            log.read(Offset(n)).unwrap().record,
            message(&format!("before{n}"), "a", 4, b"{}")
        );
    }
    log.append(300, vec![message("recovered", "a", 4, b"{}")])
        .unwrap();
}

#[test]
fn fsync_error_fails_waiters_and_stops_all_writes() {
    check_fail_stop(|sim| sim.fail_sync(ErrorKind::Other));
}

#[test]
fn write_error_enospc_fails_waiters_and_stops_all_writes() {
    check_fail_stop(|sim| sim.fail_write(ErrorKind::StorageFull));
}

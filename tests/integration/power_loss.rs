//! T4: power loss on a real (FUSE) file system. The data directory is a [`PowerFs`] mount,
//! which keeps what was not fsynced in memory only; each cycle SIGKILLs the server under the
//! crash workload and then drops everything unsynced, as a power cut would, before the
//! restart. With `fsync=always` nothing acknowledged may be lost (20 cuts; soak 200); with
//! `fsync=never` the same checker must report loss (negative control). Without `/dev/fuse`
//! or the right to mount, the tests print a skip line.
#![allow(
    clippy::disallowed_methods,
    reason = "the test paces its power cuts with the clock"
)]

use std::time::Duration;

use crate::powerfs::PowerFs;
use crate::support::{Rng, TestServer};
use crate::workload::{self, Load, Tally};

/// Runs the workload over `cuts` power failures with `--fsync fsync`; `None` if skipped.
fn power_cuts(fsync: &str, cuts: u32) -> Option<Tally> {
    let seed = workload::seed();
    let mut rng = Rng(seed);
    let mut server = TestServer::unstarted(&workload::flags(&[
        "--fsync",
        fsync,
        "--segment-bytes",
        "1048576",
        "--max-attempts",
        "3",
    ]));
    let fs = match PowerFs::mount(&server.data_dir()) {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED T4 power loss ({fsync}): cannot mount the FUSE file system: {why}");
            return None;
        }
    };
    server.restart();
    let load = Load::start(&server, seed);
    let mut lost_bytes = 0;
    for _ in 0..cuts {
        std::thread::sleep(Duration::from_millis(150 + rng.below(300)));
        server.kill9();
        lost_bytes += fs.cut();
        server.restart();
        // Under `never` the registrations and subscriptions themselves can be lost; setting
        // them up again changes nothing otherwise. The clients still knock at the old address
        // meanwhile.
        workload::setup(&server);
        load.follow(&server);
    }
    let tally = load.finish(&server, &format!("T4 fsync={fsync}"));
    println!(
        "T4 fsync={fsync}: {cuts} power cuts dropped {lost_bytes} unsynced bytes; {} file fsyncs",
        fs.fsyncs()
    );
    drop(server);
    drop(fs);
    Some(tally)
}

#[test]
fn power_loss_with_fsync_always_loses_nothing_acknowledged() {
    let cuts = if std::env::var_os("COURIER_SOAK").is_some() {
        200
    } else {
        20
    };
    if let Some(tally) = power_cuts("always", cuts) {
        tally.assert_clean();
    }
}

#[test]
fn power_loss_with_fsync_never_reports_loss() {
    if let Some(tally) = power_cuts("never", 5) {
        assert!(
            !tally.lost.is_empty(),
            "fsync=never lost nothing over 5 power cuts: the checker would miss a real loss"
        );
    }
}

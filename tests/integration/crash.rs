//! T1: SIGKILL under load. The workload of [`crate::workload`] (publishers; consumers that
//! ack, nack, extend, dead-letter or abandon; a redriver) runs against the real binary while
//! it is killed at random moments and restarted on the same data directory; then everything
//! is drained and checked: 0 lost, 0 acked-then-redelivered, 0 unexpected, 0 attempt resets.
//!
//! CI runs 20 kill cycles; `COURIER_SOAK=1` runs 200. The seed is printed; replay with
//! `COURIER_SEED`.
#![allow(
    clippy::disallowed_methods,
    reason = "the test paces its kills with the clock"
)]

use std::time::Duration;

use crate::support::{Rng, TestServer};
use crate::workload::{self, Load};

#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let soak = std::env::var_os("COURIER_SOAK").is_some();
    let cycles = if soak { 200 } else { 20 };
    let seed = workload::seed();
    let mut rng = Rng(seed);
    let mut server = TestServer::start(&workload::flags(&["--max-attempts", "1000"]));
    let load = Load::start(&server, seed);
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
        server.kill9();
        server.restart();
        load.follow(&server);
    }
    load.finish(&server, "T1").assert_clean();
}

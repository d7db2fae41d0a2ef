//! Fail points for the crash-safety tests: named places in the write paths where a test can
//! crash the process or inject an I/O error.
//!
//! They exist only when the crate is built with the `failpoints` feature (the `fail` crate);
//! otherwise every function here is an empty inline call. A process built with the feature
//! reads its configuration from the `FAILPOINTS` environment variable at
//! [`setup_from_env`], in the `fail` crate's syntax, `name=action;name=action`, for example
//! `FAILPOINTS='segment.created=2*off->return'` (crash the third time a segment is created)
//! or `FAILPOINTS='io.sync=return(EIO)'` (every segment fsync fails with EIO).
//!
//! Crash points ([`crash`]) abort the process on `return`, without unwinding or flushing:
//! what a SIGKILL or a power cut leaves behind, minus unsynced data. Error points
//! ([`io_error`]) turn `return(EIO)`, `return(ENOSPC)` or a bare `return` (EIO) into the I/O
//! error the operation then fails with.

use std::io;

/// Reads `FAILPOINTS` and arms the points it names, for the life of the process. Returns
/// whether fail points are compiled in. Call it once, at start.
pub fn setup_from_env() -> bool {
    #[cfg(feature = "failpoints")]
    {
        std::mem::forget(fail::FailScenario::setup());
        true
    }
    #[cfg(not(feature = "failpoints"))]
    false
}

/// A crash point: aborts the process here when `name` is armed with `return`.
#[inline(always)]
pub fn crash(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::eval(name, |_| {
        // Written straight to stderr (unbuffered) so that the test can tell where it crashed.
        eprintln!("courier: crashing at fail point {name}");
        std::process::abort()
    });
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// A panic point: panics here when `name` is armed with `return`, as a bug would (tests of
/// what a panic in a handler or a pipeline thread leads to).
#[inline(always)]
pub fn panic(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::eval(name, |_| panic!("panicking at fail point {name}"));
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// An error point: the I/O error to fail with here when `name` is armed with `return(EIO)`,
/// `return(ENOSPC)` or `return`.
#[inline(always)]
pub fn io_error(name: &str) -> Option<io::Error> {
    #[cfg(feature = "failpoints")]
    return fail::eval(name, |arg| {
        let code = match arg.as_deref() {
            Some("ENOSPC") => 28,
            _ => 5, // EIO
        };
        io::Error::from_raw_os_error(code)
    });
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

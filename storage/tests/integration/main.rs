//! Integration tests of `courier-storage`, one binary (matklad: one test crate).
//! Test numbers (T2…T9) refer to shared/RELIABILITY.md.

mod support;

mod bit_flip; // T6: damage outside the tail is refused, verified, repaired
mod codec_props; // record codec round trips, truncations and bit flips (proptest)
mod fsync_error; // T9: write and fsync errors are fail-stop
mod index_rebuild; // T7: the index rebuilt from the log equals the live one
mod log_basics; // rolls, reopen, concurrency, notifications, retention
mod power_loss; // T2/T3: a crash after every I/O step of a workload on SimDisk
mod process_crash; // SIGKILL of a real appending process
mod torn_tail; // T5: garbage and cut records at the tail

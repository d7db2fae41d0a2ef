//! Integration tests: the real `courier` binary on a loopback port, spoken to over HTTP.
//!
//! - `auth`: T13, every route × {no token, malformed, wrong, another agent's, own, admin}
//!   against the table TESTING.md prints; rotation and deletion revoke (also after SIGKILL);
//!   no raw token in the data directory or the logs.
//! - `signing`: T14, signed publishes, batches and requests: bad MAC, wrong key, skew, a
//!   malformed header and a reused nonce (also after SIGKILL) → 401 with nothing appended.
//! - `slow_clients`: T15, slowloris connections closed by the header timeout while others
//!   are served, 408 for a late body, the connection cap, 414/431, nothing written.
//! - `tls`: HTTPS over TLS 1.2 and 1.3 with a certificate made in the test, SIGHUP reloads
//!   (a broken file keeps the old pair) without dropping open connections, bad files stop
//!   the start.
//! - `config`: a bad value from a flag, a variable or the file stops the start (exit 2) naming
//!   the key, the value and its source; file < environment < flags.
//! - `publish`: validation and its error shape, ids and idempotency (also across a restart),
//!   all-or-nothing batches.
//! - `delivery`: long-poll wake-up, priority order, delays, leases, ack/nack/extend, lease
//!   expiry → redelivery → dead letter → redrive, ttl expiry.
//! - `durability`: SIGKILL and restart keep what was not acked and forget what was; SIGTERM
//!   shuts down cleanly and wakes long-polls.
//! - `crash`: T1, SIGKILL under load, on the shared `workload` (publishers; consumers that
//!   ack, nack, extend, dead-letter or abandon; a redriver), checked the Jepsen way: 0 lost,
//!   0 acked-then-redelivered, 0 unexpected.
//! - `failpoints` (feature `failpoints` only): T8, the same workload crashed at every named
//!   crash point of the write paths, and T9, injected write and fsync errors.
//! - `disk_errors`: T9 on a real full disk (a small tmpfs): 503, not ready, recovery.
//! - `fuzz_corpus`: T11, the saved fuzz corpus replayed through the fuzz targets' bodies.
//! - `hostile`: JSON nested past `limits.max_json_depth` is refused at publish; bodies far
//!   deeper than serde_json's tree reader takes are delivered, listed and redriven intact.
//! - `limits`: `max_in_flight`, inbox depth, open long-polls, body sizes.
//! - `power_loss`: T4, power cuts on a FUSE file system that drops what was not fsynced
//!   (`powerfs`); `fsync=never` as the negative control.
//! - `model`: T10, seeded random operation sequences against a reference model.

mod auth;
mod capabilities;
mod config;
mod crash;
mod delivery;
mod disk_errors;
mod docs;
mod durability;
#[cfg(feature = "failpoints")]
mod failpoints;
mod fuzz_corpus;
mod hostile;
mod limits;
mod metrics;
mod model;
mod ordering;
#[cfg(feature = "otel")]
mod otel;
mod power_loss;
mod powerfs;
mod publish;
mod requests;
mod signing;
mod slow_clients;
mod support;
mod tls;
mod topics;
mod traces;
mod workload;

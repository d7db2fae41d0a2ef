//! Integration tests: the real `courier` binary on a loopback port, spoken to over HTTP.
//!
//! - `publish`: validation and its error shape, ids and idempotency (also across a restart),
//!   all-or-nothing batches.
//! - `delivery`: long-poll wake-up, priority order, delays, leases, ack/nack/extend, lease
//!   expiry → redelivery → dead letter → redrive, ttl expiry.
//! - `durability`: SIGKILL and restart keep what was not acked and forget what was; SIGTERM
//!   shuts down cleanly and wakes long-polls.
//! - `crash`: T1, SIGKILL under load (publishers, acking/nacking/abandoning consumers),
//!   checked the Jepsen way: 0 lost, 0 acked-then-redelivered, 0 unexpected.
//! - `limits`: `max_in_flight`, inbox depth, open long-polls, body sizes.
//! - `model`: T10, seeded random operation sequences against a reference model.

mod crash;
mod delivery;
mod docs;
mod durability;
mod limits;
mod model;
mod publish;
mod support;

//! Integration tests: the real `courier` binary on a loopback port, spoken to over HTTP.
//!
//! - `publish`: validation and its error shape, ids and idempotency (also across a restart),
//!   all-or-nothing batches.
//! - `delivery`: long-poll wake-up, priority order, delays, leases, ack/nack/extend, lease
//!   expiry → redelivery → dead letter → redrive, ttl expiry.
//! - `durability`: SIGKILL and restart keep what was not acked and forget what was; SIGTERM
//!   shuts down cleanly and wakes long-polls.
//! - `limits`: `max_in_flight`, inbox depth, open long-polls, body sizes.
//! - `model`: T10, seeded random operation sequences against a reference model.

mod delivery;
mod docs;
mod durability;
mod limits;
mod model;
mod publish;
mod support;

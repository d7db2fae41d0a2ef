//! `courier`: the server. Agents publish JSON messages over HTTP; each is appended to the
//! durable log of `courier-storage` before the reply; agents receive them by long-poll
//! under leases and ack them; a sweeper redelivers and dead-letters.
//!
//! Module map:
//! - [`config`]: defaults < TOML < `COURIER_*` < flags → a checked [`config::Config`].
//! - [`server`]: start-up (recovery), serving, graceful shutdown.
//! - [`api`]: HTTP only: routes, input checks, wire shapes, the error shape.
//! - [`broker`]: the imperative shell: owns the log and the in-memory state, turns requests
//!   into records, wakes long-polls, runs the sweeper.
//! - [`delivery`]: the pure core: inboxes, leases, attempts, timers, dead letters.
//! - [`ids`]: validated agent ids, message ids and addresses.
//! - [`clock`]: the only place that reads the time.
//! - [`metrics`]: the Prometheus series: events counted as they become durable, state read
//!   when scraped.
//! - [`telemetry`]: logging, request spans joining W3C `traceparent`, and (feature `otel`)
//!   span export over OTLP/HTTP.

pub mod api;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
pub mod connections;
pub mod delivery;
pub mod ids;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod tls;

pub use server::run;

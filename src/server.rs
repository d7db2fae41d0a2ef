//! Start-up, serving and shutdown: opens the log, builds the broker, runs the sweeper and
//! the HTTP server, and on shutdown drains and closes everything in order.

use std::future::Future;
use std::sync::Arc;

use courier_storage::{Log, LogOptions};
use tokio::net::TcpListener;

use crate::api::access::Access;
use crate::api::{self, AppState};
use crate::auth::{load_admin_token, Token};
use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::{AuthMode, Config};
use crate::connections::{self, ConnectionLimits};
use crate::metrics::Metrics;
use crate::tls::Tls;

/// How often retention looks for segments to delete: every 30 s, or a quarter of
/// `retention.max_age` if that is shorter (at least every 100 ms).
fn retention_interval(config: &Config) -> std::time::Duration {
    use std::time::Duration;
    let every = Duration::from_secs(30);
    config.retention_max_age.map_or(every, |age| {
        (age / 4).clamp(Duration::from_millis(100), every)
    })
}

/// Runs the server on `listener` until `shutdown` completes, then shuts down gracefully:
/// stops accepting, wakes long-polls with what they have, lets in-flight requests finish,
/// and closes the log (every queued append is written and synced, the index checkpointed).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    // Before the log is opened: a bad certificate stops the start at once.
    let tls = config.tls.clone().map(Tls::new).transpose()?;
    // Installed at once: from here on a SIGHUP reloads the TLS files, it does not stop us.
    let hangups = tls
        .as_ref()
        .map(|_| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()))
        .transpose()?;
    let clock = Clock::start();
    let metrics = Arc::new(Metrics::new(clock.now_ms() as f64 / 1000.0));
    let (broker, admin) = open(&config, clock, metrics).await?;
    let access = Arc::new(Access::new(&config.auth, admin.as_ref()));
    broker.resume_backfills();
    let sweeper = tokio::spawn(broker.clone().run_sweeper());
    let retention = tokio::spawn(broker.clone().run_retention(retention_interval(&config)));
    let state = AppState {
        broker: broker.clone(),
        config: config.clone(),
        access,
    };
    let closing = broker.clone();
    let limits = ConnectionLimits {
        max_connections: config.limits.max_connections as usize,
        header_timeout: config.limits.header_timeout,
        body_timeout: config.limits.body_timeout,
    };
    let reloader = tls
        .clone()
        .zip(hangups)
        .map(|(tls, hangups)| tokio::spawn(reload_on_sighup(tls, hangups)));
    let acceptor = tls.as_ref().map(Tls::acceptor);
    connections::serve(listener, api::router(state), limits, acceptor, async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; open long-polls return now");
        closing.close();
    })
    .await;
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    broker.close();
    sweeper.await?;
    retention.await?;
    let closer = broker.clone();
    tokio::task::spawn_blocking(move || closer.shutdown_log()).await??;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Reloads the TLS certificate and key at each SIGHUP; a failed reload keeps the old pair.
async fn reload_on_sighup(tls: Tls, mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate and key"),
            Err(error) => {
                tracing::error!("SIGHUP: {error:#}; the previous certificate stays in use");
            }
        }
    }
}

/// Opens (recovers) the log off the async threads and builds the broker's state, counting
/// in `metrics`; with `auth.mode = token`, also finds (or makes) the admin token.
async fn open(
    config: &Arc<Config>,
    clock: Clock,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Arc<Broker>, Option<Token>)> {
    let options = LogOptions {
        fsync: config.fsync,
        segment_bytes: config.segment_bytes,
        max_record_bytes: config.limits.max_batch_bytes + 1024 * 1024,
        observer: Some(metrics.clone()),
        ..LogOptions::default()
    };
    let dir = config.data_dir.clone();
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(Arc<Broker>, Option<Token>)> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!("cannot create the data directory {}: {e}", dir.display())
        })?;
        let (log, report) = Log::open(&dir, options)?;
        tracing::info!(
            data_dir = %dir.display(),
            segments = report.segments,
            replayed_records = report.replayed_records,
            next_offset = report.next_offset.0,
            index_rebuilt = report.index_rebuilt,
            torn_tail_truncated = report.truncated.is_some(),
            "recovered the log"
        );
        // After the log locked the directory: no other server writes the token file.
        let admin = match config.auth.mode {
            AuthMode::Token => Some(load_admin_token(config.auth.admin_token.as_deref(), &dir)?),
            AuthMode::None => None,
        };
        let broker = Broker::new(log, config, clock, metrics)?;
        Ok((Arc::new(broker), admin))
    })
    .await?
}

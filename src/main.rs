//! The `courier` binary: flags → config → logging → serve until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use courier::config::{Cli, Config, RawConfig};

fn load() -> anyhow::Result<Config> {
    let matches = Cli::command().get_matches();
    let mut raw = RawConfig::defaults();
    if let Some(path) = matches.get_one::<PathBuf>("config") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        raw.merge_toml(&text, path)?;
    }
    raw.merge_command_line(&matches)?;
    Ok(raw.validate()?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate.recv() => {}
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    // The one line on stdout: scripts and tests read the bound address from it.
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("courier listening on {scheme}://{address}");
    tracing::info!(
        %address,
        data_dir = %config.data_dir.display(),
        fsync = ?config.fsync,
        "starting courier"
    );
    tracing::info!(?config, "configuration");
    courier::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

fn main() -> ExitCode {
    let config = match load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("courier: {error:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = courier::telemetry::init(&config) {
        eprintln!("courier: cannot start the trace span exporter: {error}");
        return ExitCode::FAILURE;
    }
    if courier_storage::failpoint::setup_from_env() {
        tracing::warn!(
            failpoints = std::env::var("FAILPOINTS").unwrap_or_default(),
            "this build has fail points (feature `failpoints`): a test build, not for production"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("courier: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(serve(config));
    // The spans of the last requests, if they are exported.
    courier::telemetry::flush(std::time::Duration::from_secs(5));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("courier: {error:#}");
            ExitCode::FAILURE
        }
    }
}

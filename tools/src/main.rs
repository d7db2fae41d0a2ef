//! `courierctl`: the operator's tool for Courier data directories.
//!
//! Offline commands read the directory's files through `courier-storage` and never need the
//! server; they take no lock the server needs, so they also work while it runs (`repair`,
//! which rewrites segments, is the exception and refuses then).
//!
//! Exit codes: 0 success; 1 the command ran and found damage or failed (the message says
//! why); 2 usage errors (bad flags, a directory that is not a Courier data directory).

mod bench;
mod offline;
mod online;
mod output;
mod replay;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "courierctl",
    version,
    about = "Inspect, verify, repair, dump and replay Courier data directories; manage dead letters; generate load",
    after_help = "Exit codes: 0 success, 1 damage found or the command failed, 2 usage error.\n\
                  Every command takes --json for scripts."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every CRC and offset in every segment; exit 1 with a report on damage.
    #[command(after_help = "Example: courierctl verify ./courier-data\n\
        A torn tail of the newest segment (a crash mid-write, or a server writing right now)\n\
        is reported but is not damage: the server truncates it at start. --strict counts it.")]
    Verify {
        /// The data directory (holds log/ and index/).
        dir: PathBuf,
        /// Count a torn tail of the newest segment as damage too.
        #[arg(long)]
        strict: bool,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Segments (file, offsets, records, bytes, times), totals, and agents with their depths.
    #[command(after_help = "Example: courierctl inspect ./courier-data --json\n\
        Agents and depths are computed by replaying the log into a scratch index, so they are\n\
        exact as of the log's last complete record and need no lock. On a damaged log they are\n\
        not computed, and the exit code is 1.")]
    Inspect {
        /// The data directory.
        dir: PathBuf,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Messages as JSON lines: offset, id, from, to, headers, body, time.
    #[command(
        after_help = "Example: courierctl dump ./courier-data --agent planner --from 100 --limit 10"
    )]
    Dump {
        /// The data directory.
        dir: PathBuf,
        #[command(flatten)]
        selection: offline::Selection,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<u64>,
        /// Accepted for symmetry: the output is always JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Move damaged bytes into quarantine/ (never deleting them) so that the log opens again.
    #[command(after_help = "Example: courierctl repair ./courier-data\n\
        Stop the server first: repair refuses while the directory is locked. Run verify first\n\
        to see what would be moved. The index is rebuilt from the log at the next start.")]
    Repair {
        /// The data directory.
        dir: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish a data directory's messages again to a running server, at a bounded rate.
    #[command(
        after_help = "Example: courierctl replay ./old-data --server http://127.0.0.1:7070 --agent planner --rate 200\n\
        Each message keeps its fields and carries courier-original-id / courier-original-offset\n\
        headers. A failure stops the replay and prints the --from to resume with. Replaying\n\
        into the server that writes DIR itself needs --into-owner."
    )]
    Replay {
        /// The data directory to read.
        dir: PathBuf,
        #[command(flatten)]
        server: online::ServerArgs,
        #[command(flatten)]
        selection: offline::Selection,
        /// Send every message here instead of its original `to` (for example agent:audit).
        #[arg(long)]
        to_address: Option<String>,
        /// Messages per second (0: as fast as the server answers).
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Allow replaying into the server that owns DIR.
        #[arg(long)]
        into_owner: bool,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load generator: publish/receive/ack throughput and latency percentiles.
    #[command(
        after_help = "Example: courierctl bench --server http://127.0.0.1:7070 --publishers 8 --consumers 4 --size 1024 --duration 10\n\
        Latencies: one publish request; publish -> delivery (send time to a consumer holding the\n\
        message); one ack request. Exit 1 if not everything published was delivered."
    )]
    Bench {
        #[command(flatten)]
        options: bench::BenchOptions,
    },
    /// List or redrive an agent's dead letters on a running server.
    Dlq {
        #[command(subcommand)]
        action: Dlq,
    },
    /// Manage agents on a running server.
    Agents {
        #[command(subcommand)]
        action: Agents,
    },
}

#[derive(Subcommand)]
enum Agents {
    /// Give an agent a new token (the old one stops working at once) and print it.
    #[command(
        after_help = "Example: COURIER_TOKEN=$(cat ./courier-data/admin.token) courierctl agents token-rotate --server http://127.0.0.1:7070 --agent planner\n\
        Needs the admin token (or the agent's own). Hand the printed token to the agent: it is\n\
        shown once and the server keeps only its hash."
    )]
    TokenRotate {
        #[command(flatten)]
        server: online::ServerArgs,
        /// The agent.
        #[arg(long)]
        agent: String,
        /// JSON instead of the bare token.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// Every dead letter of the agent: offset, id, reason, attempts, when.
    #[command(
        after_help = "Example: courierctl dlq list --server http://127.0.0.1:7070 --agent planner"
    )]
    List {
        #[command(flatten)]
        server: online::ServerArgs,
        /// The agent whose dead letters to list.
        #[arg(long)]
        agent: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back into the agent's inbox, attempts reset.
    #[command(
        after_help = "Example: courierctl dlq redrive --server http://127.0.0.1:7070 --agent planner --offset 5 --offset 9"
    )]
    Redrive {
        #[command(flatten)]
        server: online::ServerArgs,
        /// The agent whose dead letters to redrive.
        #[arg(long)]
        agent: String,
        /// Redrive every dead letter.
        #[arg(long, conflicts_with = "offset")]
        all: bool,
        /// Redrive the dead letter at this offset (repeatable).
        #[arg(long)]
        offset: Vec<u64>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn dlq(action: Dlq) -> output::Outcome {
    match action {
        Dlq::List {
            server,
            agent,
            json,
        } => online::dlq_list(&online::Client::new(&server)?, &agent, json),
        Dlq::Redrive {
            server,
            agent,
            all,
            offset,
            json,
        } => online::dlq_redrive(&online::Client::new(&server)?, &agent, all, &offset, json),
    }
}

/// The offline commands here; the online ones in [`online_command`].
fn run(command: Command) -> output::Outcome {
    match command {
        Command::Verify { dir, strict, json } => offline::verify(&dir, strict, json),
        Command::Inspect { dir, json } => offline::inspect(&dir, json),
        Command::Dump {
            dir,
            selection,
            limit,
            json: _,
        } => offline::dump(&dir, &selection, limit),
        Command::Repair { dir, json } => offline::repair(&dir, json),
        online => online_command(online),
    }
}

/// The commands that speak to a server.
fn online_command(command: Command) -> output::Outcome {
    match command {
        Command::Dlq { action } => dlq(action),
        Command::Agents {
            action:
                Agents::TokenRotate {
                    server,
                    agent,
                    json,
                },
        } => online::token_rotate(&online::Client::new(&server)?, &agent, json),
        Command::Bench { options } => bench::bench(&options),
        Command::Replay {
            dir,
            server,
            selection,
            to_address,
            rate,
            into_owner,
            json,
        } => online::Client::new(&server).and_then(|client| {
            let options = replay::ReplayOptions {
                selection,
                to_address,
                rate,
                into_owner,
                json,
            };
            replay::replay(&dir, &client, &options)
        }),
        Command::Verify { .. }
        | Command::Inspect { .. }
        | Command::Dump { .. }
        | Command::Repair { .. } => unreachable!("`run` runs the offline commands"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli.command);
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("courierctl: {:#}", failure.error);
            failure.code
        }
    }
}

//! The `dispatchd` command: `run`, `check-config`, `report`, `review`,
//! `token new`, `simulate call`, `--version`. Parsing only; the work is done in
//! the library. Without `--config`: `$DISPATCHD_CONFIG`, else
//! `/etc/dispatchd/dispatchd.toml`, else `config/dispatchd.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// EX_CONFIG from sysexits.h.
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "dispatchd", version, about = "Incident intake and responder dispatch beside a PBX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Run {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration: exit 0, or 78 naming the offending key.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Service figures of the incidents opened in [since, until), read from Redis.
    Report {
        /// RFC 3339, e.g. 2026-11-23T00:00:00Z; default: 24 hours before `until`.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339, exclusive; default: now.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: dispatchd::cli::Format,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// One incident's timeline with the time between steps, for a post-incident review.
    Review {
        /// The incident id, e.g. INC-00A7K.
        id: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Responder tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Try it without a PBX.
    #[command(subcommand)]
    Simulate(SimulateCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// A fresh token for a responder: the token, the roster line, the console link.
    New {
        /// The responder's id in the roster.
        id: String,
        /// The console's address, e.g. https://dispatch.example.net:8080 (default: from the configuration).
        #[arg(long, value_name = "BASE")]
        url: Option<String>,
        /// Also print the link as a QR code (for a phone's camera).
        #[arg(long)]
        qr: bool,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SimulateCommand {
    /// Place one call to the incident line over SIP, as the PBX would, and print its incident.
    Call {
        /// The caller's IVR choices, e.g. 2,1.
        #[arg(long, default_value = "")]
        ivr: String,
        /// The caller's number.
        #[arg(long, default_value = "+15550100199")]
        caller: String,
        /// The ACD queue the call came through.
        #[arg(long, default_value = "support")]
        queue: String,
        /// The incident line, host:port over UDP (default: sip.udp of the configuration).
        #[arg(long, value_name = "HOST:PORT")]
        to: Option<String>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn load(config: Option<&PathBuf>) -> Result<dispatchd::config::Settings, ExitCode> {
    let path = config.cloned().or_else(dispatchd::cli::default_config);
    dispatchd::config::load(path.as_deref()).map_err(|e| {
        eprintln!("dispatchd: config error: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

/// Prints a command's output, or its one-line error (exit 1).
fn print_or_fail(out: Result<String, String>) -> ExitCode {
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dispatchd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// mimalloc rather than glibc's malloc: about 5 % less CPU per call on the
/// incident line (`deploy/bench cost`, four runs side by side: dispatchd 72.5
/// against 76.5 µs per call at 2,000 calls/s), for about 40 MB more resident
/// at start (74 against 33 MB) and the same per connected responder.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(_) => {
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Report { since, until, format, config } => match load(config.as_ref()) {
            Ok(s) => {
                let (since, until) = dispatchd::cli::default_range(since, until);
                print_or_fail(dispatchd::cli::report(&s, &since, &until, format))
            }
            Err(code) => code,
        },
        Command::Token(TokenCommand::New { id, url, qr, config }) => {
            let base = match url {
                Some(u) => u,
                None => match load(config.as_ref()) {
                    Ok(s) => dispatchd::cli::console_base(&s),
                    Err(code) => return code,
                },
            };
            print_or_fail(dispatchd::cli::token_new(&id, &base, qr))
        }
        Command::Simulate(SimulateCommand::Call { ivr, caller, queue, to, config }) => {
            let to = match to {
                Some(t) => t,
                None => match load(config.as_ref()).map(|s| dispatchd::cli::SimulatedCall::line_of(&s)) {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return print_or_fail(Err(e)),
                    Err(code) => return code,
                },
            };
            print_or_fail(dispatchd::cli::simulate_call(&dispatchd::cli::SimulatedCall { to, ivr, caller, queue }))
        }
        Command::Review { id, config } => match load(config.as_ref()) {
            Ok(s) => print_or_fail(dispatchd::cli::review(&s, &id)),
            Err(code) => code,
        },
        Command::Run { config } => {
            let settings = match load(config.as_ref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            dispatchd::telemetry::init_logging(&settings.log);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(settings.runtime.worker_threads)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dispatchd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let config = config.or_else(dispatchd::cli::default_config);
            match rt.block_on(dispatchd::app::run(settings, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "dispatchd failed");
                    eprintln!("dispatchd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

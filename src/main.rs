//! The `dispatchd` command: `run`, `check-config`, `report`, `review`, `--version`.
//! Parsing only; the work is done in the library.

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
        /// RFC 3339, e.g. 2026-11-23T00:00:00Z.
        #[arg(long)]
        since: String,
        /// RFC 3339, exclusive.
        #[arg(long)]
        until: String,
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
}

fn load(config: Option<&PathBuf>) -> Result<dispatchd::config::Settings, ExitCode> {
    dispatchd::config::load(config.map(PathBuf::as_path)).map_err(|e| {
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
            Ok(s) => print_or_fail(dispatchd::cli::report(&s, &since, &until, format)),
            Err(code) => code,
        },
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
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dispatchd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
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

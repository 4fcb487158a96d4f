//! The `dispatchd` command: `run`, `check-config`, `--version`. Nothing else lives here.

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
}

fn load(config: Option<&PathBuf>) -> Result<dispatchd::config::Settings, ExitCode> {
    dispatchd::config::load(config.map(PathBuf::as_path)).map_err(|e| {
        eprintln!("dispatchd: config error: {e}");
        ExitCode::from(EX_CONFIG)
    })
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
            match rt.block_on(dispatchd::app::run(settings)) {
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

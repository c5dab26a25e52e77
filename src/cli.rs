//! The command line: `ampere start`, `ampere config check`, `ampere schema`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;

use crate::agent::RuntimeDir;
use crate::config::{self, Overrides, Workers};
use crate::error::{Error, Result};
use crate::listeners::Listeners;
use crate::supervisor::{Outcome, Supervisor};
use crate::telemetry::logs::{self, Logs};
use crate::worker::Command;

#[derive(Debug, Parser)]
#[command(name = "ampere", version, about = "A production application server for Node.js", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Serve a Node.js app with N worker processes on one port.
    Start(StartArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the JSON Schema of ampere.toml / ampere.json.
    Schema,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective settings.
    Check(StartArgs),
}

#[derive(Debug, Args)]
struct StartArgs {
    /// The app's directory (default: the current directory).
    dir: Option<PathBuf>,
    /// Config file (default: ampere.toml or ampere.json in DIR).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides server.host).
    #[arg(long, value_name = "ADDR")]
    host: Option<String>,
    /// Port to listen on (overrides server.port).
    #[arg(long, short = 'p', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Worker processes: a number, or "auto" for one per usable CPU
    /// (overrides server.workers).
    #[arg(long, short = 'w', value_name = "N|auto", value_parser = Workers::parse)]
    workers: Option<Workers>,
}

impl StartArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            dir: self.dir.clone(),
            config: self.config.clone(),
            host: self.host.clone(),
            port: self.port,
            workers: self.workers,
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Commands::Start(args) => start(&args),
        Commands::Config(ConfigCommand::Check(args)) => check(&args),
        Commands::Schema => {
            println!("{}", config::schema());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn start(args: &StartArgs) -> Result<ExitCode> {
    let settings = config::resolve(&args.overrides())?;
    let config = &settings.config;
    let listeners = Listeners::bind(
        settings.addr,
        settings.workers,
        config.server.listener,
        config.server.backlog,
    )?;
    let runtime_dir = RuntimeDir::create()?;
    let command = Command::new(&settings, runtime_dir.agent());

    let logs = Logs::start(&config.logger);
    let subscriber = tracing_subscriber::registry()
        .with(logs::level_filter(config.logger.level))
        .with(logs::TracingLayer { logs: logs.clone() });
    let _ = tracing::subscriber::set_global_default(subscriber);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    let outcome =
        runtime.block_on(Supervisor::new(settings, command, listeners, logs.clone()).run());
    logs.flush();
    drop(runtime_dir);
    match outcome {
        Ok(Outcome::Stopped) => Ok(ExitCode::SUCCESS),
        Ok(Outcome::Interrupted(sig)) => Ok(ExitCode::from(128 + sig as u8)),
        Err(e) => Err(Error::io("installing signal handlers", e)),
    }
}

fn check(args: &StartArgs) -> Result<ExitCode> {
    let settings = config::resolve(&args.overrides())?;
    let source = settings.source.as_ref().map_or_else(
        || "none (defaults and flags)".to_owned(),
        |p| p.display().to_string(),
    );
    println!("# config file: {source}");
    println!(
        "# service {:?}: `{}` in {}",
        settings.service,
        settings.launch.describe(),
        settings.app_dir.display()
    );
    println!(
        "# {} worker(s) on {}, node {}",
        settings.workers,
        settings.addr,
        settings.node.display()
    );
    let mut effective = settings.config.clone();
    effective.schema = None;
    let text = toml::to_string_pretty(&effective)
        .map_err(|e| Error::io("rendering the settings", std::io::Error::other(e)))?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

//! ampere: a production application server for Node.js.
//!
//! The supervisor (this binary) owns the listening sockets and hands one to
//! each `node` worker process by file descriptor; a small JS agent preloaded
//! into every worker makes the app's own `listen()` adopt it. See README.md
//! for the architecture.

mod admin;
mod agent;
mod balance;
mod cli;
mod config;
mod error;
mod health;
mod init;
mod listeners;
mod overflow;
mod supervisor;
mod telemetry;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

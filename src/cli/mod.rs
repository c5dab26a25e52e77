//! The command line: `ampere start`, `ampere config check`, `ampere schema`,
//! shell completions, and the management commands (in [`manage`]) that talk
//! to running runtimes.

mod manage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;

use crate::admin;
use crate::agent::RuntimeDir;
use crate::config::{self, Overrides, Workers};
use crate::error::{Error, Result};
use crate::listeners::Listeners;
use crate::overflow;
use crate::supervisor::{Outcome, Supervisor};
use crate::telemetry::logs::{self, Logs};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::probes::{self, ProbeState};
use crate::telemetry::traces;
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
    /// List the ampere runtimes running as this user.
    Ps(manage::PsArgs),
    /// Show each worker of a runtime: state, uptime, restarts, load, memory.
    Status(manage::StatusArgs),
    /// Print a runtime's recent log records; -f to follow.
    Logs(manage::LogsArgs),
    /// Print a runtime's Prometheus metrics.
    Metrics(manage::MetricsArgs),
    /// Replace every worker of a service (or of all), one at a time.
    Restart(manage::RestartArgs),
    /// Re-read the config and apply what changed (worker count, env, ...).
    Reload(manage::TargetArgs),
    /// Stop a runtime gracefully.
    Stop(manage::TargetArgs),
    /// Send an HTTP request to a service through one of its workers.
    Inject(manage::InjectArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
    /// Port of the probe server (/live, /ready), or "off" (overrides
    /// metrics.port).
    #[arg(long, value_name = "N|off", value_parser = parse_metrics_port)]
    metrics_port: Option<MetricsPort>,
}

#[derive(Debug, Clone, Copy)]
struct MetricsPort(Option<u16>);

fn parse_metrics_port(text: &str) -> std::result::Result<MetricsPort, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(MetricsPort(None));
    }
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(MetricsPort(Some(p))),
        _ => Err(format!("{text:?} is not a port (1-65535) or \"off\"")),
    }
}

impl StartArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            dir: self.dir.clone(),
            config: self.config.clone(),
            host: self.host.clone(),
            port: self.port,
            workers: self.workers,
            metrics_port: self.metrics_port.map(|p| p.0),
        }
    }
}

/// Lifts the soft limit on open files to the hard one, as node does for
/// itself: the supervisor holds a descriptor for every connection the
/// overflow listener answers, and the common soft limit of 1,024 is soon
/// reached under the overload that listener is for. Where it cannot be
/// raised, ampere runs with what it has.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// `ampere ps | head -1`: a command whose reader went away ends there, as
/// other command-line tools do, instead of failing on its next write. (Rust
/// ignores SIGPIPE, so every write would fail with EPIPE, and `println!`
/// panics on that.) Not for `start`: a supervisor must outlive a log
/// reader that went away.
fn end_quietly_on_closed_stdout() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: the default disposition runs no code in this process, so no
    // handler can break async-signal safety; this runs first thing, before
    // any other thread exists.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    if !matches!(cli.command, Commands::Start(_)) {
        end_quietly_on_closed_stdout();
    }
    match cli.command {
        Commands::Start(args) => start(&args),
        Commands::Config(ConfigCommand::Check(args)) => check(&args),
        Commands::Schema => {
            println!("{}", config::schema());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Ps(args) => manage::ps(&args),
        Commands::Status(args) => manage::status(&args),
        Commands::Logs(args) => manage::logs(&args),
        Commands::Metrics(args) => manage::metrics(&args),
        Commands::Restart(args) => manage::restart(&args),
        Commands::Reload(args) => manage::reload(&args),
        Commands::Stop(args) => manage::stop(&args),
        Commands::Inject(args) => manage::inject(&args),
        Commands::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ampere", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn start(args: &StartArgs) -> Result<ExitCode> {
    // First, while no other thread exists.
    if let Some(code) = crate::init::stand_in_if_pid1()? {
        return Ok(code);
    }
    let settings = config::resolve(&args.overrides())?;
    raise_fd_limit();
    let config = &settings.config;
    let mut listeners = Listeners::bind(
        settings.addr,
        settings.workers,
        config.server.listener,
        config.server.backlog,
    )?;
    let probe_listener = settings
        .metrics_addr
        .map(|addr| {
            crate::listeners::bind_plain(addr).map_err(|e| Error::Bind {
                addr: addr.to_string(),
                reason: e.to_string(),
                hint: Some("the probe server needs its own port: set [metrics] port, or --metrics-port N|off".into()),
            })
        })
        .transpose()?;
    let runtime_dir = RuntimeDir::create()?;
    let command = Command::new(&settings, runtime_dir.agent());
    let (admin_listener, _) = admin::server::bind(runtime_dir.path())?;

    let logs = Logs::start(&config.logger);
    let subscriber = tracing_subscriber::registry()
        .with(logs::level_filter(config.logger.level))
        .with(logs::TracingLayer { logs: logs.clone() });
    let _ = tracing::subscriber::set_global_default(subscriber);

    if settings.no_ipv6 {
        tracing::warn!("this machine has no IPv6: listening on 0.0.0.0 (IPv4) instead of ::");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    // Learn now, and say once, whether this kernel lets the group be
    // steered; the overflow listener needs it too.
    if (config.balance.load_aware || config.balance.overflow)
        && listeners.can_steer()
        && let Err(e) = listeners.probe_steering()
    {
        if listeners.steering_refused().is_some() {
            tracing::warn!(error = %e, "{}", crate::listeners::STEERING_REFUSED);
        } else {
            tracing::warn!(error = %e, "cannot attach the steering program; trying again on the next change");
        }
    }
    // The overflow listener joins the reuseport group after the slots.
    let overflow = if config.balance.overflow && listeners.can_steer() {
        match listeners.open_overflow() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "no overflow listener: overloaded workers keep their queues");
                None
            }
        }
    } else {
        None
    };
    let retry_after = config.overload.retry_after.get().as_secs();
    // What a reload changes for the admin API and the overflow listener.
    let (config_tx, config_rx) = tokio::sync::watch::channel(redacted(&settings.config));
    let (retry_tx, retry_rx) = tokio::sync::watch::channel(retry_after);
    let applied = Box::new(move |s: &config::Settings| {
        config_tx.send_replace(redacted(&s.config));
        retry_tx.send_replace(s.config.overload.retry_after.get().as_secs());
    });
    let probes = ProbeState::new();
    let metrics = Arc::new(Metrics::new());
    metrics.watch_stdout(logs.stall());
    let metrics_for_overflow = metrics.clone();
    let traces = traces::start(&config.telemetry, &settings.service, metrics.clone())?;
    let (admin_tx, admin_rx) = tokio::sync::mpsc::unbounded_channel();
    let admin_state = Arc::new(admin::server::Admin {
        info: runtime_info(&settings),
        started: std::time::Instant::now(),
        metrics: metrics.clone(),
        tap: logs.tap(),
        config: config_rx,
        commands: admin_tx,
        service_addr: settings.addr,
    });
    // Reloads come from `ampere reload`, run from anywhere: the paths in
    // their errors must not be relative to this process's directory.
    let mut overrides = args.overrides();
    overrides.dir = overrides.dir.map(|d| std::path::absolute(&d).unwrap_or(d));
    overrides.config = overrides
        .config
        .map(|c| std::path::absolute(&c).unwrap_or(c));
    let reloader = Box::new(move || config::resolve(&overrides));
    let mut supervisor = Supervisor::new(
        settings,
        command,
        listeners,
        logs.clone(),
        probes.clone(),
        metrics.clone(),
    );
    let outcome = runtime.block_on(async move {
        if let Some(listener) = probe_listener {
            tokio::spawn(async move {
                if let Err(e) = probes::serve(listener, probes, metrics).await {
                    tracing::error!(error = %e, "the probe server stopped");
                }
            });
        }
        supervisor.set_admin(admin_rx, reloader, applied);
        tokio::spawn(async move {
            if let Err(e) = admin::server::serve(admin_listener, admin_state).await {
                tracing::error!(error = %e, "the admin API stopped");
            }
        });
        if let Some((traces, task)) = traces {
            supervisor.set_traces(traces);
            tokio::spawn(task.run());
        }
        if let Some(listener) = overflow {
            let metrics = metrics_for_overflow;
            tokio::spawn(async move {
                if let Err(e) = overflow::serve(listener, retry_rx, metrics).await {
                    tracing::error!(error = %e, "the overflow listener stopped");
                }
            });
        }
        supervisor.run().await
    });
    logs.flush();
    drop(runtime_dir);
    match outcome {
        Ok(Outcome::Stopped) => Ok(ExitCode::SUCCESS),
        Ok(Outcome::GaveUp) => Ok(ExitCode::FAILURE),
        Ok(Outcome::Interrupted(sig)) => Ok(ExitCode::from(128 + sig as u8)),
        Err(e) => Err(Error::io("installing signal handlers", e)),
    }
}

/// What `GET /v1/runtime` says about this runtime (uptime is filled in per
/// request).
fn runtime_info(settings: &config::Settings) -> admin::RuntimeInfo {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    admin::RuntimeInfo {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        cwd: std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        started_ms,
        uptime_s: 0.0,
        services: vec![admin::ServiceInfo {
            name: settings.service.clone(),
            address: settings.addr.to_string(),
            workers: settings.workers,
            app: settings.launch.describe(),
            dir: settings.app_dir.display().to_string(),
            config: settings.source.as_ref().map(|p| p.display().to_string()),
            metrics: settings.metrics_addr.map(|a| a.to_string()),
        }],
    }
}

/// The effective config for the admin API, without the values of `[env]`
/// (where secrets live).
fn redacted(config: &config::Config) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    if let Some(env) = value.get_mut("env").and_then(|e| e.as_object_mut()) {
        for v in env.values_mut() {
            *v = serde_json::Value::String("[redacted]".into());
        }
    }
    value
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
    match settings.metrics_addr {
        Some(addr) => println!("# probes on http://{addr}/ready and /live"),
        None => println!("# probes off"),
    }
    let mut effective = settings.config.clone();
    effective.schema = None;
    // Worker environment values are often secrets (DATABASE_URL = "${...}"),
    // and this output ends up in CI logs: names only.
    if !effective.env.is_empty() {
        println!("# [env] values are not shown");
        for value in effective.env.values_mut() {
            *value = "(set)".into();
        }
    }
    let text = toml::to_string_pretty(&effective)
        .map_err(|e| Error::io("rendering the settings", std::io::Error::other(e)))?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

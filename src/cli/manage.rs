//! The management commands: `ps`, `status`, `logs`, `metrics`, `restart`,
//! `reload`, `stop`, `inject`, talking to running runtimes through their
//! admin sockets. Read commands take `--json`; tables use colour only on a
//! terminal, and never with NO_COLOR set.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use crate::admin::client::{self, Reply};
use crate::admin::discovery;
use crate::admin::{InjectRequest, InjectResponse, RuntimeInfo, WorkerStatus};
use crate::error::{Error, Result};

/// Which runtime to talk to.
#[derive(Debug, Args)]
pub struct Target {
    /// The runtime: its pid, or the path of its admin socket (default: the
    /// one running).
    #[arg(long, short = 'r', value_name = "PID|SOCKET")]
    runtime: Option<String>,
}

#[derive(Debug, Args)]
pub struct Json {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The runtime: its pid, or the path of its admin socket.
    #[arg(value_name = "RUNTIME", conflicts_with = "runtime_flag")]
    runtime: Option<String>,
    /// The same, as the other commands take it.
    #[arg(
        long = "runtime",
        short = 'r',
        value_name = "PID|SOCKET",
        id = "runtime_flag"
    )]
    runtime_flag: Option<String>,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    target: Target,
    /// Keep printing new records as they come.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only this service's records (and the supervisor's own).
    #[arg(long, short = 's', value_name = "SERVICE")]
    service: Option<String>,
    /// Recent records to print first.
    #[arg(long, short = 'n', default_value_t = 100)]
    lines: usize,
    /// One JSON array of the records instead of the raw stream (not with
    /// --follow).
    #[arg(long, conflicts_with = "follow")]
    json: bool,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    #[command(flatten)]
    target: Target,
    /// Print the samples as JSON instead of the Prometheus text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The service to restart (default: every service).
    service: Option<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The service to send the request to.
    service: String,
    /// HTTP method.
    method: String,
    /// Path and query, e.g. /api/users?limit=1.
    path: String,
    /// A request header, `Name: value` (repeatable).
    #[arg(long, short = 'H', value_name = "HEADER")]
    header: Vec<String>,
    /// The request body.
    #[arg(long, short = 'd', value_name = "BODY")]
    data: Option<String>,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    json: Json,
}

fn runtime_error(socket: &Path, e: client::ClientError) -> Error {
    let hint = match &e {
        client::ClientError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            "the admin socket belongs to another user: run the command as that user (or root)"
        }
        _ => "is the runtime still running? `ampere ps` lists the running ones",
    };
    Error::App {
        message: format!("{} ({})", e, socket.display()),
        hint: Some(hint.into()),
    }
}

/// Runs one call on a fresh current-thread runtime.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the client runtime", e))?;
    Ok(rt.block_on(f))
}

/// A call that must succeed (2xx); its answer.
fn call(socket: &Path, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<Reply> {
    let reply = block_on(client::call(socket, method, path, body))?
        .map_err(|e| runtime_error(socket, e))?;
    if !(200..300).contains(&reply.status) {
        return Err(Error::App {
            message: reply.error_message(),
            hint: None,
        });
    }
    Ok(reply)
}

fn parse<T: serde::de::DeserializeOwned>(reply: &Reply) -> Result<T> {
    serde_json::from_slice(&reply.body).map_err(|e| Error::App {
        message: format!("unexpected answer from the runtime: {e}"),
        hint: Some("are this ampere and the running one the same version?".into()),
    })
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

/// Whether to colour stdout.
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn paint(text: &str, code: &str, on: bool) -> String {
    if on {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Left-aligned columns, two spaces apart; `widths` ignores ANSI codes.
fn table(header: &[&str], rows: &[Vec<(String, Option<&str>)>]) {
    let paint_on = colour();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, (cell, _)) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let head: Vec<String> = header
        .iter()
        .zip(&widths)
        .map(|(h, w)| format!("{h:<w$}"))
        .collect();
    let _ = writeln!(out, "{}", paint(head.join("  ").trim_end(), "1", paint_on));
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|((cell, code), w)| {
                let padded = format!("{cell:<w$}");
                match code {
                    Some(code) => paint(&padded, code, paint_on),
                    None => padded,
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1}MiB", b as f64 / 1048576.0))
}

pub fn ps(args: &PsArgs) -> Result<ExitCode> {
    let mut infos = Vec::new();
    for found in discovery::list() {
        match call(&found.socket, "GET", "/v1/runtime", None).and_then(|r| parse::<RuntimeInfo>(&r))
        {
            Ok(info) => infos.push((found.id, info)),
            Err(e) => eprintln!("warning: runtime {}: {e}", found.id),
        }
    }
    if args.json.json {
        print_json(&infos.iter().map(|(_, i)| i).collect::<Vec<_>>());
        return Ok(ExitCode::SUCCESS);
    }
    if infos.is_empty() {
        println!("no ampere runtime is running as this user");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<(String, Option<&str>)>> = infos
        .iter()
        .map(|(id, i)| {
            let services = i
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let addresses = i
                .services
                .iter()
                .map(|s| s.address.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let workers: usize = i.services.iter().map(|s| s.workers).sum();
            vec![
                // The pid, or `<pid>-<n>` where containers sharing the
                // directory have the same pid: what --runtime takes.
                (id.clone(), None),
                (services, None),
                (addresses, None),
                (workers.to_string(), None),
                (duration(i.uptime_s), None),
                (i.cwd.clone(), None),
            ]
        })
        .collect();
    table(
        &["PID", "SERVICE", "ADDRESS", "WORKERS", "UPTIME", "CWD"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn status(args: &StatusArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.runtime.as_deref().or(args.runtime_flag.as_deref()))?;
    let workers: Vec<WorkerStatus> = parse(&call(&socket, "GET", "/v1/workers", None)?)?;
    if args.json.json {
        print_json(&workers);
        return Ok(ExitCode::SUCCESS);
    }
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
    let rows: Vec<Vec<(String, Option<&str>)>> = workers
        .iter()
        .map(|w| {
            let colour = match w.state.as_str() {
                "ready" => "32",
                "starting" | "draining" => "33",
                _ => "31",
            };
            vec![
                (w.service.clone(), None),
                (w.slot.to_string(), None),
                (w.pid.map_or("-".into(), |p| p.to_string()), None),
                (w.state.clone(), Some(colour)),
                (opt(w.uptime_s, &duration), None),
                (w.restarts.to_string(), None),
                (opt(w.elu, &|e| format!("{:.0}%", e * 100.0)), None),
                (opt(w.delay_p99_ms, &|d| format!("{d:.1}ms")), None),
                (mib(w.heap_used), None),
                (mib(w.rss), None),
                (opt(w.rps, &|r| format!("{r:.0}")), None),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE", "SLOT", "PID", "STATE", "UPTIME", "RESTARTS", "ELU", "LAG P99", "HEAP",
            "RSS", "REQ/S",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn logs(args: &LogsArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.target.runtime.as_deref())?;
    let mut path = format!("/v1/logs?lines={}", args.lines);
    if let Some(s) = &args.service {
        path.push_str("&service=");
        path.push_str(&encode(s));
    }
    if !args.follow {
        let reply = call(&socket, "GET", &path, None)?;
        if args.json {
            let records: Vec<serde_json::Value> = String::from_utf8_lossy(&reply.body)
                .lines()
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|_| serde_json::Value::String(l.to_owned()))
                })
                .collect();
            print_json(&records);
        } else {
            let _ = std::io::stdout().write_all(&reply.body);
        }
        return Ok(ExitCode::SUCCESS);
    }
    path.push_str("&follow=true");
    let mut out = std::io::stdout();
    let status = block_on(client::follow(&socket, &path, |chunk| {
        out.write_all(chunk).and_then(|()| out.flush()).is_ok()
    }))?
    .map_err(|e| runtime_error(&socket, e))?;
    if !(200..300).contains(&status) {
        return Err(Error::App {
            message: format!("the runtime answered {status}"),
            hint: None,
        });
    }
    eprintln!("(the runtime stopped)");
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn metrics(args: &MetricsArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.target.runtime.as_deref())?;
    let reply = call(&socket, "GET", "/v1/metrics", None)?;
    let text = String::from_utf8_lossy(&reply.body);
    if !args.json {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    // One object per sample: {name, labels, value}.
    let samples: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels: BTreeMap<String, String> = split_labels(labels);
            Some(serde_json::json!({
                "name": name,
                "labels": labels,
                "value": value.parse::<f64>().ok(),
            }))
        })
        .collect();
    print_json(&samples);
    Ok(ExitCode::SUCCESS)
}

/// `a="1",b="x,y"` into pairs (values may hold commas, not quotes: the
/// label values ampere writes never do).
fn split_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        out.insert(
            key.trim_start_matches(',').to_owned(),
            after[..end].to_owned(),
        );
        rest = &after[end + 1..];
    }
    out
}

pub fn restart(args: &RestartArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.target.runtime.as_deref())?;
    let path = match &args.service {
        Some(s) => format!("/v1/restart?service={}", encode(s)),
        None => "/v1/restart".into(),
    };
    call(&socket, "POST", &path, None)?;
    println!(
        "rolling restart of {} started; `ampere status` shows its progress",
        args.service.as_deref().unwrap_or("every service")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn reload(args: &TargetArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.target.runtime.as_deref())?;
    let reply = call(&socket, "POST", "/v1/reload", None)?;
    let value: serde_json::Value = parse(&reply)?;
    if args.json.json {
        print_json(&value);
    } else {
        println!("config reloaded:");
        for c in value["changes"].as_array().into_iter().flatten() {
            println!("  {}", c.as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stop(args: &TargetArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.target.runtime.as_deref())?;
    call(&socket, "POST", "/v1/stop", None)?;
    if args.json.json {
        print_json(&serde_json::json!({ "stopping": true }));
    } else {
        println!("stopping: in-flight requests finish first");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn inject(args: &InjectArgs) -> Result<ExitCode> {
    let socket = discovery::pick(args.target.runtime.as_deref())?;
    let info: RuntimeInfo = parse(&call(&socket, "GET", "/v1/runtime", None)?)?;
    if !info.services.iter().any(|s| s.name == args.service) {
        return Err(Error::App {
            message: format!("no service {:?} in runtime {}", args.service, info.pid),
            hint: Some(format!(
                "its services: {}",
                info.services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        });
    }
    let mut headers = BTreeMap::new();
    for h in &args.header {
        let Some((k, v)) = h.split_once(':') else {
            return Err(Error::Flag {
                flag: "--header",
                message: format!("{h:?} is not `Name: value`"),
            });
        };
        headers.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let request = InjectRequest {
        method: args.method.to_uppercase(),
        path: args.path.clone(),
        headers,
        body: args.data.clone(),
    };
    let body = serde_json::to_value(&request)
        .map_err(|e| Error::io("encoding the request", std::io::Error::other(e)))?;
    let response: InjectResponse = parse(&call(&socket, "POST", "/v1/inject", Some(body))?)?;
    if args.json.json {
        print_json(&response);
    } else {
        println!("HTTP {}", response.status);
        for (k, v) in &response.headers {
            println!("{k}: {v}");
        }
        println!();
        print!("{}", response.body);
        if !response.body.ends_with('\n') {
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! Reading the config: finding the file, parsing TOML or JSON with positions
//! in every error, interpolating `${VAR}`, layering flags over the file, and
//! resolving the app, the node executable and the workers' environment.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use super::{Config, Settings, Workers, detect, interpolate};
use crate::error::{Error, Result};

/// What the command line says; each `Some` wins over the config file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub workers: Option<Workers>,
    /// `--metrics-port`: `Some(None)` turns the probe server off.
    pub metrics_port: Option<Option<u16>>,
}

/// The service port that the PORT environment variable gives, if set.
fn port_from_env(value: Option<OsString>) -> Result<Option<u16>> {
    let Some(value) = value else { return Ok(None) };
    match value.to_str().and_then(|v| v.trim().parse::<u16>().ok()) {
        Some(port) if port > 0 => Ok(Some(port)),
        _ => Err(Error::app(
            format!("the PORT environment variable is not a port number: {value:?}"),
            "set PORT to a number from 1 to 65535, unset it, or pass --port",
        )),
    }
}

/// Builds the settings a runtime starts with.
pub fn resolve(flags: &Overrides) -> Result<Settings> {
    let dir = flags.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is a file, not a directory"
        } else {
            "does not exist"
        };
        return Err(Error::app(
            format!("app directory {} {what}", dir.display()),
            "pass the directory of a Node.js app: ampere start path/to/app",
        ));
    }
    let source = find_config(&dir, flags.config.as_deref())?;
    let mut config = match &source {
        Some(path) => parse_file(path)?,
        None => Config::default(),
    };
    let config_dir = source.as_deref().and_then(Path::parent).map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });

    let app_dir = match (&config.app.dir, config_dir) {
        (Some(d), Some(base)) => base.join(d),
        (Some(d), None) => d.clone(),
        (None, _) if flags.dir.is_some() => dir.clone(),
        (None, Some(base)) => base.to_path_buf(),
        (None, None) => dir.clone(),
    };
    let app_dir = std::fs::canonicalize(&app_dir).map_err(|_| {
        Error::app(
            format!("app directory {} does not exist", app_dir.display()),
            "fix app.dir in the config; it is relative to the config file",
        )
    })?;

    if let Some(host) = &flags.host {
        config.server.host = host.as_str().into();
    }
    if let Some(port) = flags.port {
        config.server.port = super::Port(port);
    } else if source.is_none() {
        // Without a config file, the platform's PORT (Heroku, Cloud Run,
        // Render, Fly set it and probe it); a file says "${PORT:-3000}".
        if let Some(port) = port_from_env(std::env::var_os("PORT"))? {
            config.server.port = super::Port(port);
        }
    }
    if let Some(workers) = flags.workers {
        config.server.workers = workers;
    }
    match flags.metrics_port {
        Some(Some(port)) => config.metrics.port = super::Port(port),
        Some(None) => config.metrics.enabled = false,
        None => {}
    }

    let host = parse_host(config.server.host.as_str()).map_err(|message| match &source {
        Some(path) if flags.host.is_none() => error_at_key(path, "server.host", message),
        _ => Error::Flag {
            flag: "--host",
            message,
        },
    })?;
    let (host, mut no_ipv6) = without_ipv6(host);
    let addr = SocketAddr::new(host, config.server.port.0);
    let metrics_addr = if config.metrics.enabled {
        let host = parse_host(config.metrics.host.as_str()).map_err(|message| match &source {
            Some(path) => error_at_key(path, "metrics.host", message),
            None => Error::Flag {
                flag: "--metrics-port",
                message,
            },
        })?;
        let (host, fell_back) = without_ipv6(host);
        no_ipv6 |= fell_back;
        Some(SocketAddr::new(host, config.metrics.port.0))
    } else {
        None
    };
    if let Some(m) = metrics_addr
        && m.port() == addr.port()
        && (m.ip() == addr.ip() || m.ip().is_unspecified() || addr.ip().is_unspecified())
    {
        return Err(Error::app(
            format!(
                "the probe and metrics server would listen on the service's own port {}",
                addr.port()
            ),
            "set [metrics] port (or --metrics-port) to another port, or turn it off with --metrics-port off",
        ));
    }
    let workers = config.server.workers.resolve();

    let (launch, package_name) = detect::detect(&app_dir, &config.app)?;
    let node = find_node(config.node.executable.as_str())?;
    let env = worker_env(&config, &app_dir)?;
    if let super::Launch::Command { program, .. } = &launch
        && !command_exists(program, &app_dir, env.get("PATH"))
    {
        let message = format!(
            "the program `{program}` is not an executable file{}",
            if program.contains('/') {
                format!(" (relative to the app directory {})", app_dir.display())
            } else {
                " on the workers' PATH".to_owned()
            }
        );
        return Err(match &source {
            Some(path) => error_at_key(path, "app.command", message),
            None => Error::app(message, "fix [app] command"),
        });
    }
    let service = config
        .app
        .name
        .clone()
        .or(package_name)
        .or_else(|| {
            app_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "app".to_owned());

    Ok(Settings {
        source,
        config,
        service,
        app_dir,
        addr,
        metrics_addr,
        no_ipv6,
        workers,
        node,
        launch,
        env,
    })
}

/// The explicit `--config`, else `ampere.toml` or `ampere.json` in `dir`.
fn find_config(dir: &Path, explicit: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(path) = explicit {
        if !path.is_file() {
            let what = if path.is_dir() {
                "is a directory, not a file"
            } else {
                "does not exist"
            };
            return Err(Error::Flag {
                flag: "--config",
                message: format!("config file {} {what}", path.display()),
            });
        }
        return Ok(Some(path.to_path_buf()));
    }
    let toml = dir.join("ampere.toml");
    let json = dir.join("ampere.json");
    match (toml.is_file(), json.is_file()) {
        (true, true) => Err(Error::app(
            format!("both {} and {} exist", toml.display(), json.display()),
            "keep one of them, or choose with --config",
        )),
        (true, false) => Ok(Some(toml)),
        (false, true) => Ok(Some(json)),
        (false, false) => Ok(None),
    }
}

/// Parses one config file; `${VAR}` sees the process environment and the
/// `.env` file beside the config (the process environment wins).
pub fn parse_file(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut vars: HashMap<String, String> = HashMap::new();
    if let Some(dotenv) = path
        .parent()
        .map(|d| d.join(".env"))
        .filter(|p| p.is_file())
    {
        vars.extend(read_dotenv(&dotenv)?);
    }
    vars.extend(process_env());
    interpolate::with_vars(vars, || parse_text(path, &text))
}

/// This process's environment. A variable whose name or value is not UTF-8
/// can be neither interpolated nor handed on through the settings, which
/// hold text: it is left out rather than stopping ampere
/// (`std::env::vars` would panic on it).
fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

fn parse_text(path: &Path, text: &str) -> Result<Config> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    let config: Config = if is_json {
        serde_json::from_str(text)
            .map_err(|e| Error::config(path, e.line(), e.column(), serde_json_message(&e)))?
    } else {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_column(text, span.start));
            let message = match e.span().and_then(|span| text.get(span)) {
                // toml says only "duplicate key"; name it, and what to do.
                Some(key) if e.message().trim() == "duplicate key" => {
                    duplicate_key(text, line, key)
                }
                _ => e.message().trim().replace('\n', "; "),
            };
            Error::config(path, line, column, message)
        })?
    };
    config.check_values().map_err(|(key, message)| {
        let (line, column) = key_position(text, key, is_json).unwrap_or((0, 0));
        Error::config(path, line, column, format!("{key}: {message}"))
    })?;
    Ok(config)
}

/// An error in the value of `key` in the config file at `path`, found again
/// in the file to name its line.
fn error_at_key(path: &Path, key: &str, message: String) -> Error {
    let is_json = path.extension().is_some_and(|e| e == "json");
    let (line, column) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| key_position(&text, key, is_json))
        .unwrap_or((0, 0));
    Error::config(path, line, column, format!("{key}: {message}"))
}

/// Where the dotted `key` is set in a config file's text: its value in
/// TOML; in JSON, the first occurrence of its last part as a key.
fn key_position(text: &str, key: &str, is_json: bool) -> Option<(usize, usize)> {
    let offset = if is_json {
        let last = key.rsplit('.').next()?;
        text.find(&format!("\"{last}\""))?
    } else {
        let doc = toml::de::DeTable::parse(text).ok()?;
        let mut table = doc.get_ref();
        let mut parts = key.split('.').peekable();
        loop {
            let part = parts.next()?;
            let value = table.get(part)?;
            if parts.peek().is_none() {
                break value.span().start;
            }
            match value.get_ref() {
                toml::de::DeValue::Table(t) => table = t,
                _ => return None,
            }
        }
    };
    Some(line_column(text, offset))
}

/// serde_json's message without its " at line L column C" suffix (we put the
/// position in front, like every other error).
pub(super) fn serde_json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// What to say about a key or table that TOML found twice, `key` as written
/// on line `line`.
fn duplicate_key(text: &str, line: usize, key: &str) -> String {
    let heading = text
        .lines()
        .nth(line.saturating_sub(1))
        .map(str::trim_start)
        .filter(|l| l.starts_with('['))
        .and_then(|l| l.trim_start_matches('[').split(']').next());
    if let Some(table) = heading {
        let table = table.trim();
        format!("table [{table}] appears twice: put its keys under one [{table}] heading")
    } else {
        format!("key `{key}` is set twice in this table: keep one of them")
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

fn parse_host(host: &str) -> std::result::Result<IpAddr, String> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.trim_matches(['[', ']'])
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address (use e.g. ::, 0.0.0.0, 127.0.0.1)"))
}

/// "::" (every address) is "0.0.0.0" where the kernel has no IPv6, as for
/// node's `listen(port)`; whether it was.
fn without_ipv6(ip: IpAddr) -> (IpAddr, bool) {
    if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && !crate::listeners::ipv6_available() {
        (IpAddr::V4(Ipv4Addr::UNSPECIFIED), true)
    } else {
        (ip, false)
    }
}

/// Finds the node executable: a path as given, or a name on PATH.
fn find_node(executable: &str) -> Result<PathBuf> {
    let hint = "install Node.js, or set [node] executable = \"/path/to/node\" in ampere.toml";
    if executable.contains('/') {
        let path = PathBuf::from(executable);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::app(
                format!("node executable {executable} does not exist or is not executable"),
                hint,
            ))
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(executable))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::app(format!("no `{executable}` executable found on PATH"), hint))
}

/// Whether `[app] command`'s program can be started: as the workers start
/// it, from the app directory, with their PATH.
fn command_exists(program: &str, app_dir: &Path, path_var: Option<&String>) -> bool {
    if program.contains('/') {
        return is_executable(&app_dir.join(program));
    }
    let path_var = path_var
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    std::env::split_paths(&path_var.unwrap_or_default())
        .any(|dir| is_executable(&app_dir.join(dir).join(program)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn read_dotenv(path: &Path) -> Result<Vec<(String, String)>> {
    let iter = dotenvy::from_path_iter(path).map_err(|e| {
        Error::io(
            format!("reading {}", path.display()),
            std::io::Error::other(e),
        )
    })?;
    iter.map(|item| {
        item.map_err(|e| match e {
            dotenvy::Error::LineParse(line, col) => Error::config(
                path,
                0,
                0,
                format!("cannot parse line {line:?} (at character {col})"),
            ),
            other => Error::io(
                format!("reading {}", path.display()),
                std::io::Error::other(other),
            ),
        })
    })
    .collect()
}

/// The environment every worker starts with.
fn worker_env(config: &Config, app_dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let env_file = match &config.app.env_file {
        Some(f) => {
            let path = app_dir.join(f);
            if !path.is_file() {
                return Err(Error::app(
                    format!("env file {} does not exist", path.display()),
                    "fix app.env_file in the config, or remove it",
                ));
            }
            Some(path)
        }
        None => Some(app_dir.join(".env")).filter(|p| p.is_file()),
    };
    if let Some(path) = env_file {
        env.extend(read_dotenv(&path)?);
    }
    env.extend(process_env());
    env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.0.clone())));
    env.insert("PORT".into(), config.server.port.0.to_string());
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        interpolate::with_vars(HashMap::from([("P".into(), "4000".into())]), || {
            parse_text(Path::new("ampere.toml"), text)
        })
    }

    /// The error message for `text` as the config file `name`.
    fn error_of(name: &str, text: &str) -> String {
        parse_text(Path::new(name), text).unwrap_err().to_string()
    }

    #[test]
    fn a_duplicate_key_or_table_is_named() {
        let e = error_of("a.toml", "[server]\nworkers = 2\nworkers = 3\n");
        assert!(e.contains("a.toml:3:1: key `workers` is set twice"), "{e}");
        let e = error_of(
            "a.toml",
            "[server]\nworkers = 2\n[health]\n[server]\nport = 3\n",
        );
        assert!(
            e.contains("a.toml:4:2: table [server] appears twice"),
            "{e}"
        );
        let e = error_of("a.toml", "[env.x]\na = \"1\"\n[env.x]\nb = \"2\"\n");
        assert!(e.contains("table [env.x] appears twice"), "{e}");
    }

    #[test]
    fn negative_durations_and_sizes_say_so() {
        let e = error_of("a.toml", "[shutdown]\ntimeout = \"-1s\"\n");
        assert!(e.contains("a duration cannot be negative"), "{e}");
        let e = error_of("a.toml", "[health]\nmax_rss = \"-5MiB\"\n");
        assert!(e.contains("a size cannot be negative"), "{e}");
    }

    #[test]
    fn settings_that_cannot_work_together_name_their_line() {
        let text = "[worker]\nheartbeat_interval = \"2s\"\n";
        let e = error_of("a.toml", text);
        // Not the interval's line: suspect_after is not in the file.
        assert!(
            e.contains("health.suspect_after: 1s 500ms must be longer"),
            "{e}"
        );
        let text = "[health]\nenabled = true\nsuspect_after = \"400ms\"\n";
        let e = error_of("a.toml", text);
        assert!(e.starts_with("a.toml:3:17: health.suspect_after"), "{e}");
        let text = "[health]\nmax_heap_used = 75\n";
        let e = error_of("a.toml", text);
        assert!(
            e.starts_with("a.toml:2:17: health.max_heap_used: 75 is not a fraction"),
            "{e}"
        );
        let text = "{\"telemetry\": {\"sampling_ratio\": 5}}";
        let e = error_of("a.json", text);
        assert!(
            e.starts_with("a.json:1:16: telemetry.sampling_ratio"),
            "{e}"
        );
        assert!(
            parse_text(
                Path::new("a.toml"),
                "[worker]\nheartbeat_interval = \"200ms\"\n"
            )
            .is_ok()
        );
        let text = "[telemetry]\nenabled = true\nendpoint = \"not a url\"\n";
        let e = error_of("a.toml", text);
        assert!(e.starts_with("a.toml:3:12: telemetry.endpoint"), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = parse("[server]\nport = 1\nportt = 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ampere.toml:3:1: unknown field `portt`"),
            "{err}"
        );
    }

    #[test]
    fn the_port_environment_variable_must_be_a_port() {
        assert_eq!(port_from_env(None).unwrap(), None);
        assert_eq!(port_from_env(Some("8080".into())).unwrap(), Some(8080));
        for bad in ["0", "http", "70000", ""] {
            let e = port_from_env(Some(bad.into())).unwrap_err();
            assert!(e.to_string().contains("PORT"), "{e}");
            assert!(e.hint().is_some());
        }
    }

    #[test]
    fn interpolation_in_port_and_missing_variable() {
        let cfg = parse("[server]\nport = \"${P}\"\n").unwrap();
        assert_eq!(cfg.server.port.0, 4000);
        let err = parse("[server]\nhost = \"${NOPE}\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ampere.toml:2:8:"), "{err}");
        assert!(err.contains("NOPE is not set"), "{err}");
    }

    #[test]
    fn json_errors_have_positions() {
        let err = parse_text(
            Path::new("ampere.json"),
            "{\n  \"server\": {\"nope\": 1}\n}",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("ampere.json:2:"), "{err}");
        assert!(err.contains("unknown field `nope`"), "{err}");
    }

    #[test]
    fn durations_parse() {
        let cfg = parse("[shutdown]\ntimeout = \"2s 500ms\"\n").unwrap();
        assert_eq!(cfg.shutdown.timeout.get().as_millis(), 2500);
        assert!(parse("[shutdown]\ntimeout = \"soon\"\n").is_err());
    }
}

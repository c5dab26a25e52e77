//! Zero-config app detection: how to start the app in a directory, from its
//! package.json (Next.js, `main`, or a `start` script of the form
//! `node <file>`), or from `[app] entry` / `[app] command`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::AppConfig;
use crate::error::{Error, Result};

/// How a worker process is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// `node [node options] --require <agent> <entry> [args]`.
    Script {
        entry: PathBuf,
        args: Vec<String>,
        /// Options found in a `start` script, e.g. `node --enable-source-maps`.
        node_options: Vec<String>,
    },
    /// `node --require <agent> node_modules/next/dist/bin/next start -p PORT -H HOST`.
    Next { bin: PathBuf },
    /// Any program; the agent is loaded through `NODE_OPTIONS`.
    Command { program: String, args: Vec<String> },
}

impl Launch {
    /// One line for logs and `config check`.
    pub fn describe(&self) -> String {
        match self {
            Launch::Script {
                entry,
                args,
                node_options,
            } => {
                let mut parts = vec!["node".to_owned()];
                parts.extend(node_options.iter().cloned());
                parts.push(entry.display().to_string());
                parts.extend(args.iter().cloned());
                parts.join(" ")
            }
            Launch::Next { .. } => "next start".to_owned(),
            Launch::Command { program, args } => std::iter::once(program.clone())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PackageJson {
    name: Option<String>,
    main: Option<String>,
    scripts: BTreeMap<String, serde_json::Value>,
    dependencies: BTreeMap<String, serde_json::Value>,
}

/// Decides how to start the app in `dir`. Returns the launch and the
/// package.json name, if any.
pub fn detect(dir: &Path, app: &AppConfig) -> Result<(Launch, Option<String>)> {
    let package = read_package(dir)?;
    let name = package.as_ref().and_then(|p| p.name.clone());

    if !app.command.is_empty() {
        if app.entry.is_some() {
            return Err(Error::app(
                "app.entry and app.command are both set",
                "keep one: entry = \"server.js\" runs it with node; command = [...] runs a program",
            ));
        }
        let mut words = app.command.iter().map(|w| w.0.clone());
        let program = words.next().unwrap_or_default();
        return Ok((
            Launch::Command {
                program,
                args: words.collect(),
            },
            name,
        ));
    }
    let args: Vec<String> = app.args.iter().map(|a| a.0.clone()).collect();
    let script = |entry| {
        let launch = Launch::Script {
            entry,
            args: args.clone(),
            node_options: Vec::new(),
        };
        Ok((launch, name.clone()))
    };
    if let Some(entry) = &app.entry {
        let entry = resolve_entry(dir, entry.as_str()).ok_or_else(|| {
            Error::app(
                format!("entry file {} not found in {}", entry, dir.display()),
                "check app.entry in the config; it is relative to the app directory",
            )
        })?;
        return script(entry);
    }

    let Some(package) = package else {
        return Err(Error::app(
            format!(
                "cannot tell how to start the app in {}: it has no package.json",
                dir.display()
            ),
            "set the script to run in ampere.toml: [app] entry = \"server.js\"",
        ));
    };

    if package.dependencies.contains_key("next") {
        return detect_next(dir).map(|l| (l, name));
    }
    if let Some(main) = &package.main {
        let entry = resolve_entry(dir, main).ok_or_else(|| {
            Error::app(
                format!(
                    "package.json \"main\" is {main:?}, but no such file is in {}",
                    dir.display()
                ),
                "fix \"main\", or set [app] entry = \"server.js\" in ampere.toml",
            )
        })?;
        return script(entry);
    }
    let start = package.scripts.get("start").and_then(|s| s.as_str());
    if let Some(start) = start {
        if let Some((node_options, file, script_args)) = parse_node_command(start) {
            let entry = resolve_entry(dir, &file).ok_or_else(|| {
                Error::app(
                    format!(
                        "the start script runs {file:?}, but no such file is in {}",
                        dir.display()
                    ),
                    "fix the start script, or set [app] entry = \"server.js\" in ampere.toml",
                )
            })?;
            let mut all_args = script_args;
            all_args.extend(args);
            return Ok((
                Launch::Script {
                    entry,
                    args: all_args,
                    node_options,
                },
                name,
            ));
        }
        return Err(Error::app(
            format!(
                "cannot tell how to start the app in {}: its start script {start:?} is not of the form `node <file>`",
                dir.display()
            ),
            "set the script to run in ampere.toml: [app] entry = \"server.js\", or command = [\"npx\", \"tsx\", \"server.ts\"]",
        ));
    }
    Err(Error::app(
        format!(
            "cannot tell how to start the app in {}: package.json has no \"main\" and no \"start\" script",
            dir.display()
        ),
        "set the script to run in ampere.toml: [app] entry = \"server.js\"",
    ))
}

fn read_package(dir: &Path) -> Result<Option<PackageJson>> {
    let path = dir.join("package.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::config(
            &path,
            e.line(),
            e.column(),
            super::load::serde_json_message(&e),
        )
    })
}

fn detect_next(dir: &Path) -> Result<Launch> {
    let bin = dir.join("node_modules/next/dist/bin/next");
    if !bin.is_file() {
        return Err(Error::app(
            format!(
                "{} is a Next.js app, but next is not installed (no node_modules/next)",
                dir.display()
            ),
            "run `npm install` in the app directory",
        ));
    }
    if !dir.join(".next/BUILD_ID").is_file() {
        return Err(Error::app(
            format!(
                "{} is a Next.js app without a production build (.next/BUILD_ID is missing)",
                dir.display()
            ),
            "run `npx next build` in the app directory first",
        ));
    }
    Ok(Launch::Next { bin })
}

/// Finds a script the way `node <file>` / require would: as given, with
/// `.js`, or as a directory with index.js.
fn resolve_entry(dir: &Path, entry: &str) -> Option<PathBuf> {
    let path = dir.join(entry);
    let candidates = [
        path.clone(),
        PathBuf::from(format!("{}.js", path.display())),
        path.join("index.js"),
    ];
    candidates.into_iter().find(|p| p.is_file())
}

/// Options of node that take a separate value.
const NODE_VALUE_OPTIONS: &[&str] = &["-r", "--require", "--import", "--loader", "--env-file"];

/// Splits `node [options] <file> [args]` into its parts; None for anything
/// else (another program, shell syntax).
fn parse_node_command(script: &str) -> Option<(Vec<String>, String, Vec<String>)> {
    if script.contains(['&', '|', ';', '$', '`', '>', '<', '(', '"', '\'']) {
        return None;
    }
    let mut words = script.split_whitespace();
    if words.next()? != "node" {
        return None;
    }
    let mut options = Vec::new();
    while let Some(word) = words.next() {
        if word.starts_with('-') {
            options.push(word.to_owned());
            if NODE_VALUE_OPTIONS.contains(&word) {
                options.push(words.next()?.to_owned());
            }
        } else {
            return Some((options, word.to_owned(), words.map(str::to_owned).collect()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_start_scripts() {
        assert_eq!(
            parse_node_command("node server.js"),
            Some((vec![], "server.js".into(), vec![]))
        );
        assert_eq!(
            parse_node_command("node -r dotenv/config --enable-source-maps dist/main.js --x"),
            Some((
                vec![
                    "-r".into(),
                    "dotenv/config".into(),
                    "--enable-source-maps".into()
                ],
                "dist/main.js".into(),
                vec!["--x".into()]
            ))
        );
        assert_eq!(parse_node_command("next start"), None);
        assert_eq!(parse_node_command("node a.js && node b.js"), None);
        assert_eq!(parse_node_command("node"), None);
    }
}

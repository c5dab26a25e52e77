//! Bad input: one `error:` line that names the problem and where, a
//! non-zero exit, never a panic or a hang.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs ampere with `args` in `cwd` and returns its output; it must exit on
/// its own.
fn ampere(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(AMPERE)
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ampere {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Asserts a failed run whose stderr starts with `error: ` and contains
/// every one of `needles` on that first line.
fn assert_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic reached the user: {stderr}"
    );
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.starts_with("error: "), "first line: {first:?}");
    for n in needles {
        assert!(first.contains(n), "{first:?} should contain {n:?}");
    }
    let extra: Vec<&str> = stderr
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("hint: "))
        .collect();
    assert!(
        extra.is_empty(),
        "only an error and a hint line expected: {stderr}"
    );
}

fn app_with(config_name: &str, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("server.js"),
        "require('http').createServer().listen(process.env.PORT)",
    )
    .unwrap();
    std::fs::write(dir.path().join(config_name), config).unwrap();
    dir
}

#[test]
fn invalid_toml() {
    let dir = app_with(
        "ampere.toml",
        "[app]\nentry = \"server.js\"\n[server\nport = 1\n",
    );
    let out = ampere(dir.path(), &["start"], &[]);
    assert_error(&out, &["ampere.toml:3:"]);
}

#[test]
fn unknown_key() {
    let dir = app_with(
        "ampere.toml",
        "[app]\nentry = \"server.js\"\n\n[server]\nworkerz = 2\n",
    );
    let out = ampere(dir.path(), &["start"], &[]);
    assert_error(&out, &["ampere.toml:5:1", "unknown field `workerz`"]);
}

#[test]
fn unknown_key_in_json() {
    let dir = app_with(
        "ampere.json",
        "{\n  \"app\": { \"entry\": \"server.js\" },\n  \"servr\": {}\n}\n",
    );
    let out = ampere(dir.path(), &["config", "check"], &[]);
    assert_error(&out, &["ampere.json:3:", "unknown field `servr`"]);
}

#[test]
fn missing_app_directory() {
    let out = ampere(Path::new("."), &["start", "/nonexistent/app"], &[]);
    assert_error(&out, &["app directory /nonexistent/app does not exist"]);
}

#[test]
fn missing_entry_file() {
    let dir = app_with("ampere.toml", "[app]\nentry = \"main.js\"\n");
    let out = ampere(dir.path(), &["start"], &[]);
    assert_error(&out, &["entry file main.js not found"]);
}

#[test]
fn app_that_cannot_be_detected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"scripts":{"start":"tsx server.ts"}}"#,
    )
    .unwrap();
    let out = ampere(dir.path(), &["start"], &[]);
    assert_error(&out, &["cannot tell how to start the app", "tsx server.ts"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hint: set the script to run in ampere.toml")
    );
}

#[test]
fn port_already_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = ampere(
        &fixture("hello"),
        &["start", "--host", "127.0.0.1", "--port", &port],
        &[],
    );
    assert_error(&out, &[&format!("127.0.0.1:{port}"), "already in use"]);
}

#[test]
fn a_runtime_directory_that_cannot_be_made_says_what_to_set() {
    // A read-only root filesystem behaves the same: no directory there.
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let out = ampere(
        &fixture("hello"),
        &[
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--metrics-port",
            "off",
        ],
        &[
            ("TMPDIR", tmp.path().to_str().unwrap()),
            ("XDG_RUNTIME_DIR", ""),
        ],
    );
    assert_error(&out, &["creating runtime directory"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hint: ") && stderr.contains("TMPDIR"),
        "{stderr}"
    );
}

#[test]
fn no_node_executable() {
    let out = ampere(&fixture("hello"), &["start"], &[("PATH", "/nonexistent")]);
    assert_error(&out, &["no `node` executable found on PATH"]);
    let dir = app_with(
        "ampere.toml",
        "[app]\nentry = \"server.js\"\n[node]\nexecutable = \"/opt/none/node\"\n",
    );
    let out = ampere(dir.path(), &["start"], &[]);
    assert_error(&out, &["/opt/none/node does not exist"]);
}

#[test]
fn missing_environment_variable_without_default() {
    let dir = app_with(
        "ampere.toml",
        "[app]\nentry = \"server.js\"\n[env]\nDATABASE_URL = \"${AMPERE_TEST_UNSET_DB}\"\n",
    );
    let out = ampere(dir.path(), &["start"], &[]);
    assert_error(
        &out,
        &["ampere.toml:4:16", "AMPERE_TEST_UNSET_DB is not set"],
    );
}

#[test]
fn bad_flag_values_name_the_flag() {
    let out = ampere(&fixture("hello"), &["start", "--workers", "zero"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("--workers"), "{stderr}");
    let out = ampere(&fixture("hello"), &["start", "--host", "example.com"], &[]);
    assert_error(&out, &["--host", "not an IP address"]);
}

#[test]
fn settings_that_cannot_work_together_are_refused_with_their_line() {
    let dir = app_with(
        "ampere.toml",
        "[app]\nentry = \"server.js\"\n[worker]\nheartbeat_interval = \"2s\"\n[health]\nsuspect_after = \"1s\"\n",
    );
    let out = ampere(dir.path(), &["config", "check"], &[]);
    assert_error(
        &out,
        &[
            "ampere.toml:6:17",
            "health.suspect_after",
            "heartbeat_interval (2s)",
        ],
    );
}

#[test]
fn a_command_that_does_not_exist_is_refused_before_starting() {
    let dir = app_with(
        "ampere.toml",
        "[app]\ncommand = [\"no-such-program\", \"x\"]\n",
    );
    let out = ampere(dir.path(), &["config", "check"], &[]);
    assert_error(
        &out,
        &[
            "ampere.toml:2:11",
            "app.command",
            "`no-such-program` is not an executable file",
        ],
    );
}

#[test]
fn a_type_mismatch_says_what_is_expected() {
    let dir = app_with(
        "ampere.toml",
        "[app]\nentry = \"server.js\"\n[server]\nport = true\n",
    );
    let out = ampere(dir.path(), &["config", "check"], &[]);
    assert_error(&out, &["ampere.toml:4:8", "expected a port number"]);
}

/// `ampere schema | head -c 1`: the reader goes away; ampere ends quietly.
#[test]
fn a_closed_pipe_ends_a_command_without_a_panic() {
    let mut child = Command::new(AMPERE)
        .arg("schema")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before ampere writes the whole schema.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

#[test]
fn a_directory_or_a_file_in_the_wrong_place_is_named_as_such() {
    let dir = app_with("ampere.toml", "[app]\nentry = \"server.js\"\n");
    let d = dir.path().to_str().unwrap();
    let out = ampere(dir.path(), &["config", "check", "--config", d], &[]);
    assert_error(&out, &["--config", "is a directory, not a file"]);
    let file = dir.path().join("server.js");
    let out = ampere(
        dir.path(),
        &["config", "check", file.to_str().unwrap()],
        &[],
    );
    assert_error(&out, &["is a file, not a directory"]);
}

#[test]
fn the_metrics_port_cannot_be_the_service_port() {
    let dir = app_with("ampere.toml", "[app]\nentry = \"server.js\"\n");
    let out = ampere(
        dir.path(),
        &[
            "config",
            "check",
            "--port",
            "18131",
            "--metrics-port",
            "18131",
        ],
        &[],
    );
    assert_error(&out, &["the service's own port 18131"]);
}

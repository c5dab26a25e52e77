//! Configuration: precedence (flags > file > defaults), interpolation, the
//! committed JSON Schema, and `workers = "auto"` under a cgroup CPU quota.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn check(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(AMPERE)
        .args(["config", "check"])
        .arg(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_committed_schema_is_up_to_date() {
    let out = Command::new(AMPERE).arg("schema").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ampere.schema.json"),
    )
    .unwrap();
    assert!(
        generated.trim() == committed.trim(),
        "docs/ampere.schema.json is stale: run `cargo run -- schema > docs/ampere.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown keys must be errors"
    );
    assert!(schema["properties"]["server"].is_object());
}

#[test]
fn flags_override_the_file_which_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.js"), "").unwrap();
    std::fs::write(
        dir.path().join("ampere.toml"),
        "[app]\nentry = \"server.js\"\n[server]\nport = \"${AMPERE_TEST_PORT:-4000}\"\nworkers = 3\n",
    )
    .unwrap();
    let out = check(dir.path(), &[], &[]);
    // "::", as node's listen(port); "0.0.0.0" where the kernel has no IPv6.
    assert!(
        out.contains("3 worker(s) on [::]:4000") || out.contains("3 worker(s) on 0.0.0.0:4000"),
        "{out}"
    );
    assert!(out.contains("backlog = 511"), "defaults are shown: {out}");
    let out = check(
        dir.path(),
        &["--workers", "2", "--host", "127.0.0.1"],
        &[("AMPERE_TEST_PORT", "4100")],
    );
    assert!(out.contains("2 worker(s) on 127.0.0.1:4100"), "{out}");
}

/// `config check` output ends up in CI logs: the workers' environment
/// values (secrets, often) are not in it.
#[test]
fn check_shows_environment_names_not_values() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.js"), "").unwrap();
    std::fs::write(
        dir.path().join("ampere.toml"),
        "[app]\nentry = \"server.js\"\n[env]\nDATABASE_URL = \"${AMPERE_TEST_DB}\"\n",
    )
    .unwrap();
    let out = check(
        dir.path(),
        &[],
        &[("AMPERE_TEST_DB", "postgres://u:hunter2@db/app")],
    );
    assert!(out.contains("DATABASE_URL = \"(set)\""), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
}

#[test]
fn start_scripts_and_main_are_detected() {
    let out = check(&fixture("fastify"), &[], &[]);
    assert!(
        out.contains("`node ") && out.contains("fastify/server.js`"),
        "{out}"
    );
    let out = check(&fixture("hello"), &[], &[]);
    assert!(out.contains("service \"fixture-hello\""), "{out}");
}

/// `workers = "auto"` inside a cgroup (v1) limited to one CPU's worth of
/// quota runs one worker, as a container limit would.
#[test]
fn auto_workers_honour_a_cgroup_cpu_quota() {
    let root = Path::new("/sys/fs/cgroup/cpu");
    if !root.join("cpu.cfs_quota_us").exists() || !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root and a cgroup v1 cpu controller");
        return;
    }
    let group = root.join(format!("ampere-test-{}", std::process::id()));
    std::fs::create_dir(&group).unwrap();
    std::fs::write(group.join("cpu.cfs_period_us"), "100000").unwrap();
    std::fs::write(group.join("cpu.cfs_quota_us"), "100000").unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {AMPERE} config check {} --workers auto",
            group.display(),
            fixture("hello").display()
        ))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&group);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# 1 worker(s)"), "{stdout}");
    if std::thread::available_parallelism().unwrap().get() > 1 {
        let free = check(&fixture("hello"), &["--workers", "auto"], &[]);
        assert!(!free.contains("# 1 worker(s)"), "{free}");
    }
}

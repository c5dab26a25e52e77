//! The log stream: worker output becomes JSON lines with service, worker and
//! pid; pino lines pass through; long lines, partial lines and bytes that
//! are not UTF-8 lose nothing.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;

#[test]
fn worker_output_is_one_json_stream_and_nothing_is_lost() {
    let mut ampere = Ampere::start(&fixture("noisy"), &["--workers", "1"]);
    let pid = ampere.wait_ready(1, Duration::from_secs(30))[0];
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
    let lines = ampere.logs.all();
    assert!(
        lines.iter().all(|l| l.get("unparsed").is_none()),
        "every line is JSON: {lines:?}"
    );
    let from_worker: Vec<_> = lines.iter().filter(|l| l["pid"] == pid).collect();
    for l in &from_worker {
        assert_eq!(l["service"], "fixture-noisy");
        assert_eq!(l["worker"], 0);
    }

    let pino = from_worker
        .iter()
        .find(|l| l["msg"] == "pino says hi")
        .expect("pino line");
    assert_eq!(pino["level"], 40);
    assert_eq!(pino["custom"], 7);

    let plain = from_worker
        .iter()
        .find(|l| l["msg"] == "a plain line")
        .expect("plain line");
    assert_eq!(plain["level"], 30);
    assert_eq!(plain["stream"], "stdout");

    let mut long = String::new();
    let mut pieces = 0;
    for l in from_worker
        .iter()
        .filter(|l| l["msg"].as_str().is_some_and(|m| m.starts_with('é')))
    {
        long.push_str(l["msg"].as_str().unwrap());
        pieces += 1;
        if l["partial"] != true {
            break;
        }
    }
    assert!(pieces > 1, "a 200 kB line is written in pieces");
    assert_eq!(long, format!("{}END", "é".repeat(100000)));

    let raw = from_worker
        .iter()
        .find(|l| l["msg_base64"].is_string())
        .expect("non-UTF-8 line");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw["msg_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, [0x62, 0x61, 0xff, 0xfe, 0x64]);

    let partial = from_worker
        .iter()
        .find(|l| l["msg"] == "last words without a newline")
        .expect("partial last line");
    assert_eq!(partial["level"], 50);
    assert_eq!(partial["stream"], "stderr");
}

#[test]
fn pretty_format_is_for_people() {
    let config = hello_config("[logger]\nformat = \"pretty\"\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    let line = ampere
        .logs
        .wait_for(Duration::from_secs(30), "the worker's line", |l| {
            l["unparsed"]
                .as_str()
                .is_some_and(|s| s.contains("fixture-hello listening"))
        });
    let text = line["unparsed"].as_str().unwrap();
    assert!(text.contains(" INFO  fixture-hello[0:"), "{text}");
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
}

/// A worker printing 50 MiB of log lines as fast as it can: ampere's memory
/// stays bounded (its queue to stdout is bounded and the flooding worker is
/// slowed down to what stdout takes), requests keep succeeding, and every
/// line comes out (ampere drops nothing, so none is counted as dropped).
#[test]
fn a_log_flood_neither_grows_ampere_nor_loses_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ampere.toml");
    let app = fixture("flood").display().to_string();
    std::fs::write(
        &config,
        format!("[app]\ndir = {app:?}\n[env]\nFLOOD_MB = \"50\"\n[health]\nenabled = false\n"),
    )
    .unwrap();
    let mut ampere = Ampere::start(
        &fixture("flood"),
        &["--workers", "2", "--config", config.to_str().unwrap()],
    );
    ampere.logs.count_only("flood-line");
    ampere.wait_ready(2, Duration::from_secs(30));
    let supervisor = ampere.child.id();
    let mut max_rss_kib = 0u64;
    let mut served = 0;
    let started = std::time::Instant::now();
    // For a while, nobody reads ampere's stdout: the flood must wait, not
    // pile up in ampere's memory.
    ampere.logs.pause(true);
    let done = loop {
        if started.elapsed() > Duration::from_secs(2) {
            ampere.logs.pause(false);
        }
        let r = get(ampere.addr(), "/", Duration::from_secs(30))
            .expect("requests succeed during the flood");
        assert_eq!(r.status, 200);
        served += 1;
        let status = std::fs::read_to_string(format!("/proc/{supervisor}/status")).unwrap();
        let rss: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap();
        max_rss_kib = max_rss_kib.max(rss);
        let done = ampere
            .logs
            .all()
            .into_iter()
            .find(|l| msg_is(l, "flood done"));
        if let Some(done) = done {
            break done;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let written: usize = done["msg"].as_str().unwrap()["flood done ".len()..]
        .parse()
        .unwrap();
    assert!(written >= 500_000, "the fixture wrote {written} lines");
    wait_until(
        Duration::from_secs(60),
        "every flood line to come out",
        || ampere.logs.counted() >= written,
    );
    assert_eq!(ampere.logs.counted(), written, "lines lost or duplicated");
    println!(
        "flood: {written} lines, {served} requests served meanwhile, ampere max RSS {max_rss_kib} KiB"
    );
    assert!(max_rss_kib < 64 * 1024, "ampere grew to {max_rss_kib} KiB");
}

/// Nobody reads ampere's stdout for longer than `unresponsive_after` while
/// a Fastify worker logs 20,000 lines through pino: ampere measures and
/// reports the stall (metric, and a record once stdout is read again), the
/// worker's output comes out whole, and the worker keeps its heartbeats
/// (Node's stdout pipe is non-blocking: the lines wait in its memory), so it
/// is not replaced.
#[test]
fn a_stalled_stdout_is_measured_and_reported_and_loses_nothing() {
    let app = prepare_fixture("fastify");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ampere.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\ndir = {:?}\n[worker]\nheartbeat_interval = \"100ms\"\n\
             [health]\nsuspect_after = \"1s\"\nunresponsive_after = \"2s\"\n",
            app.display().to_string()
        ),
    )
    .unwrap();
    let mut ampere = Ampere::start(
        &app,
        &["--workers", "1", "--config", config.to_str().unwrap()],
    );
    ampere.logs.count_only("log-line");
    let pids = ampere.wait_ready(1, Duration::from_secs(30));
    ampere.logs.pause(true);
    // Far more than the pipe and ampere's queue hold.
    let addr = ampere.addr();
    let logging = std::thread::spawn(move || get(addr, "/log?n=20000", Duration::from_secs(60)));
    // Past `unresponsive_after`.
    wait_until(
        Duration::from_secs(30),
        "stdout to be blocked for 3 s",
        || metric(&ampere, "ampere_log_stdout_blocked_seconds", "") >= 3.0,
    );
    ampere.logs.pause(false);
    let r = logging
        .join()
        .unwrap()
        .expect("the logging request succeeds");
    assert_eq!(r.status, 200, "{r:?}");
    let note = ampere
        .logs
        .wait_for(Duration::from_secs(10), "the stall to be reported", |l| {
            msg_is(l, "stdout was not read for")
        });
    assert!(note["stalled_ms"].as_u64().unwrap() >= 3000, "{note}");
    wait_until(
        Duration::from_secs(60),
        "every logged line to come out",
        || ampere.logs.counted() >= 20000,
    );
    assert_eq!(ampere.logs.counted(), 20000, "lines lost or duplicated");
    let supervisor_lines = || {
        ampere
            .logs
            .all()
            .into_iter()
            .filter(|l| l["name"] == "ampere")
            .collect::<Vec<_>>()
    };
    assert_eq!(
        metric(&ampere, "ampere_worker_restarts", ""),
        0.0,
        "a worker was replaced: {:?}",
        supervisor_lines()
    );
    assert_eq!(pids_of_requests(ampere.addr(), "/", 3), vec![pids[0]; 3]);
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
}

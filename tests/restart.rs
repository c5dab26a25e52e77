//! Restarts: a killed worker's slot keeps its socket, so connections queued
//! on it are answered by the replacement; crash loops back off and say why.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);

#[test]
fn connections_queued_on_a_killed_worker_are_answered_by_its_replacement() {
    // Health checks off: this test is about the slot's socket, not about
    // detecting the stopped worker.
    let config = hello_config("[health]\nenabled = false\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "2", "--config", &config.path],
    );
    let before: HashSet<u32> = ampere.wait_ready(2, READY).into_iter().collect();
    let addr = ampere.addr();

    // A steady stream of requests on new connections, one at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (stop, results) = (stop.clone(), results.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = get(addr, "/", Duration::from_secs(10));
                results.lock().unwrap().push(r.map(|r| (r.status, r.pid())));
            }
        })
    };
    wait_until(READY, "load to start", || {
        results.lock().unwrap().len() >= 20
    });

    // Stop one worker so that it accepts nothing, and queue a burst of
    // requests: those the kernel puts in its slot wait in the accept queue.
    let victim = *before.iter().next().unwrap();
    signal(victim, Signal::SIGSTOP);
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let sent = sent_tx.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .map_err(|e| format!("write: {e}"))?;
                sent.send(()).unwrap();
                read_response(&mut s).map_err(|e| format!("read: {e}"))
            })
        })
        .collect();
    for _ in 0..40 {
        sent_rx.recv_timeout(READY).expect("burst requests sent");
    }
    // Now kill it: the supervisor keeps the slot's socket, the replacement
    // accepts from the same queue.
    signal(victim, Signal::SIGKILL);
    let burst: Vec<_> = burst.into_iter().map(|t| t.join().unwrap()).collect();

    let replacement = ampere
        .logs
        .wait_for(READY, "the replacement to be ready", |l| {
            msg_is(l, "worker ready")
                && !before.contains(&(l["worker_pid"].as_u64().unwrap() as u32))
        })["worker_pid"]
        .as_u64()
        .unwrap() as u32;
    wait_until(READY, "more load after the replacement", || {
        results
            .lock()
            .unwrap()
            .iter()
            .any(|r| matches!(r, Ok((_, pid)) if *pid == replacement))
    });
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    for (i, r) in burst.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("burst request {i} failed: {e}"));
        assert_eq!(r.status, 200);
    }
    let by_replacement = burst
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.pid() == replacement))
        .count();
    assert!(
        by_replacement > 0,
        "no queued connection was answered by the replacement"
    );
    // The sequential stream has at most one request in flight in the killed
    // process; everything else must succeed.
    let results = results.lock().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.len() <= 1,
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
}

#[test]
fn crash_loop_backs_off_and_says_why() {
    let mut ampere = Ampere::start(&fixture("crash"), &[]);
    let crashes = |logs: &LogLines| {
        logs.all()
            .into_iter()
            .filter(|l| l["level"] == 50 && l["failures"].is_u64())
            .collect::<Vec<_>>()
    };
    wait_until(READY, "6 crashes", || crashes(&ampere.logs).len() >= 6);
    let crashes = crashes(&ampere.logs);
    let delays: Vec<u64> = crashes
        .iter()
        .map(|l| l["restart_in_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(
        &delays[..6],
        &[0, 50, 100, 200, 400, 400],
        "backoff: {delays:?}"
    );
    let last = &crashes[5];
    let msg = last["msg"].as_str().unwrap();
    assert!(msg.contains("exited before listening"), "{last}");
    assert!(
        msg.contains("Error: cannot connect to database at db:5432"),
        "the log should say why: {last}"
    );
    assert!(
        ampere.child.try_wait().unwrap().is_none(),
        "the supervisor must stay up"
    );
}

/// node's report of an 'error' event nobody listens to runs long (a stack,
/// the error's properties, where it was emitted): its heading is still the
/// reason given.
#[test]
fn a_long_error_report_still_gives_its_heading() {
    let ampere = Ampere::start_with(&fixture("crash"), &[], &[], |cmd| {
        cmd.env("CRASH_WITH", "emitter");
    });
    let crash = ampere.logs.wait_for(READY, "a crash", |l| {
        l["level"] == 50 && l["failures"].is_u64()
    });
    let msg = crash["msg"].as_str().unwrap();
    assert!(
        msg.contains("Error: queue connection refused at mq:5672"),
        "the log should say why: {crash}"
    );
}

/// An app that cannot start at all: once every worker has failed
/// `[restart] give_up_after` times in a row, ampere stops with exit status
/// 1 (for the platform to see the crash loop) and says why.
#[test]
fn when_every_worker_keeps_failing_ampere_gives_up_with_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ampere.toml");
    let app = fixture("crash").display().to_string();
    std::fs::write(
        &config,
        format!(
            "[app]\ndir = {app:?}\nentry = \"server.js\"\n[restart]\ndelay = \"10ms\"\nmax_delay = \"50ms\"\ngive_up_after = 3\n"
        ),
    )
    .unwrap();
    let mut ampere = Ampere::start(
        &fixture("crash"),
        &["--workers", "2", "--config", config.to_str().unwrap()],
    );
    assert_eq!(ampere.wait_exit(READY), Some(1), "ampere should give up");
    let lines = ampere.logs.all();
    let gave_up: Vec<_> = lines
        .iter()
        .filter(|l| {
            msg_is(
                l,
                "every worker failed 3 times in a row and none is serving",
            )
        })
        .collect();
    assert_eq!(gave_up.len(), 1, "{lines:?}");
    for slot in 0..2 {
        let failures: Vec<u64> = lines
            .iter()
            .filter(|l| l["worker"] == slot && l["failures"].is_u64())
            .map(|l| l["failures"].as_u64().unwrap())
            .collect();
        assert!(
            failures.len() >= 3 && failures[..3] == [1, 2, 3],
            "worker {slot}: {failures:?}"
        );
    }
}

/// One worker per pod, and a reload rolls out an environment that cannot
/// start: the replacement fails again and again, while the old worker keeps
/// serving. ampere must not give up on that slot: it is serving.
#[test]
fn a_failing_replacement_does_not_give_up_while_the_old_worker_serves() {
    let config = hello_config(
        "[server]\nworkers = 1\n[restart]\ndelay = \"10ms\"\nmax_delay = \"50ms\"\ngive_up_after = 2\n",
    );
    let mut ampere = Ampere::start(&fixture("hello"), &["--config", &config.path]);
    let old = ampere.wait_ready(1, READY)[0];
    let text = std::fs::read_to_string(&config.path).unwrap();
    std::fs::write(
        &config.path,
        format!("{text}[env]\nNODE_OPTIONS = \"--require /nonexistent/ampere-test.js\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(AMPERE)
        .args(["reload", "--runtime", &ampere.child.id().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failures = |logs: &LogLines| {
        logs.all()
            .iter()
            .filter_map(|l| l["failures"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let pid = ampere.child.id();
    wait_until(READY, "the replacement to fail 4 times", || {
        failures(&ampere.logs) >= 4 || !alive(pid)
    });
    assert!(ampere.child.try_wait().unwrap().is_none(), "ampere gave up");
    let r = get(ampere.addr(), "/", Duration::from_secs(5)).expect("the old worker serves");
    assert_eq!(r.pid(), old);
}

#[test]
fn a_worker_that_never_listens_is_killed_after_the_start_timeout() {
    let mut ampere = Ampere::start(&fixture("silent"), &["--workers", "1"]);
    let line = ampere.logs.wait_for(READY, "a start timeout", |l| {
        l["failures"].is_u64()
            && l["msg"]
                .as_str()
                .is_some_and(|m| m.contains("did not listen on port"))
    });
    assert!(
        line["msg"].as_str().unwrap().contains("within 300ms"),
        "{line}"
    );
    // And it is started again.
    wait_until(READY, "a second start", || {
        ampere.logs.count(|l| msg_is(l, "worker starting")) >= 2
    });
    assert!(ampere.child.try_wait().unwrap().is_none());
}

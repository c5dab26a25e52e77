//! Graceful shutdown: on SIGTERM the kernel stops completing new handshakes,
//! workers take what is queued, finish in-flight requests (with
//! `Connection: close`), close idle keep-alive connections and exit; ampere
//! exits 0 and leaves no process behind. Workers never outlive ampere.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);

/// A request to /slow that takes `ms` on one worker, in flight once this
/// returns (the next request on that worker would count two in flight);
/// its outcome when joined.
fn slow_request_in_flight(
    addr: std::net::SocketAddr,
    ms: u64,
) -> std::thread::JoinHandle<Result<Response, Failure>> {
    let slow = std::thread::spawn(move || {
        get(
            addr,
            &format!("/slow?ms={ms}"),
            Duration::from_secs(ms / 1000 + 30),
        )
    });
    wait_until(READY, "the request to be in flight", || {
        get(addr, "/", Duration::from_secs(5)).is_ok_and(|r| r.body.contains("\"inflight\":2"))
    });
    slow
}

#[test]
fn sigterm_under_load_completes_every_accepted_request() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    let workers = ampere.wait_ready(2, READY);
    let addr = ampere.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let path = if i % 4 == 0 { "/" } else { "/slow?ms=40" };
                while !stop.load(Ordering::Relaxed) {
                    match get(addr, path, Duration::from_secs(10)) {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status)),
                        // Never established: not accepted, so allowed. Once
                        // ampere is gone every connect fails this way.
                        Err(Failure::Connect(_)) => {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                        Err(e @ Failure::AfterConnect(_)) => {
                            failures.lock().unwrap().push(format!("{e:?}"))
                        }
                    }
                }
            })
        })
        .collect();
    wait_until(READY, "steady load", || ok.load(Ordering::Relaxed) >= 100);
    let before = ok.load(Ordering::Relaxed);

    ampere.signal(Signal::SIGTERM);
    let code = ampere.wait_exit(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(code, Some(0), "ampere should exit 0");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "accepted requests failed: {failures:?}"
    );
    assert!(
        ok.load(Ordering::Relaxed) > before,
        "requests in flight at SIGTERM completed"
    );
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived ampere");
    }
    assert!(ampere.logs.count(|l| msg_is(l, "stopped")) == 1);
}

#[test]
fn in_flight_responses_get_connection_close_and_idle_connections_are_closed() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "1"]);
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();

    let mut idle = TcpStream::connect(addr).unwrap();
    let r = request(&mut idle, "/", true, Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200);
    assert_ne!(r.header("connection"), Some("close"));

    let busy = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        request(&mut s, "/slow?ms=1500", true, Duration::from_secs(10))
    });
    wait_until(READY, "the slow request to be in flight", || {
        // The probe itself and the slow request.
        get(addr, "/", Duration::from_secs(5)).is_ok_and(|r| r.body.contains("\"inflight\":2"))
    });
    ampere.signal(Signal::SIGTERM);

    // The idle keep-alive connection is closed by the server: EOF.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        idle.read(&mut buf).unwrap_or(0),
        0,
        "idle keep-alive connection should be closed"
    );

    let r = busy
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn workers_still_busy_after_the_timeout_are_killed() {
    let config = hello_config("[server]\nworkers = 1\n[shutdown]\ntimeout = \"300ms\"\n");
    let mut ampere = Ampere::start(&fixture("hello"), &["--config", &config.path]);
    let workers = ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    let stuck = slow_request_in_flight(addr, 60000);
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
    ampere.logs.wait_for(READY, "the kill", |l| {
        msg_is(l, "workers still running after the shutdown timeout")
    });
    assert!(!alive(workers[0]));
    assert!(
        stuck.join().unwrap().is_err(),
        "the stuck request was cut off"
    );
}

#[test]
fn a_second_signal_stops_at_once() {
    let config = hello_config("[server]\nworkers = 1\n[shutdown]\ntimeout = \"10m\"\n");
    let mut ampere = Ampere::start(&fixture("hello"), &["--config", &config.path]);
    let workers = ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    let _stuck = slow_request_in_flight(addr, 60000);
    ampere.signal(Signal::SIGINT);
    ampere
        .logs
        .wait_for(READY, "shutdown to start", |l| msg_is(l, "shutting down"));
    ampere.signal(Signal::SIGINT);
    // Without the second signal this would wait for the 60 s request.
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(130));
    assert!(!alive(workers[0]));
}

/// `[shutdown] delay`: unready at once, yet new connections are served
/// until it ends (load balancers take a moment to stop sending).
#[test]
fn during_the_shutdown_delay_new_connections_are_still_served() {
    let config = hello_config("[server]\nworkers = 1\n[shutdown]\ndelay = \"10m\"\n");
    let mut ampere = Ampere::start(&fixture("hello"), &["--config", &config.path]);
    let worker = ampere.wait_ready(1, READY)[0];
    assert_eq!(ampere.probe("/ready").unwrap().status, 200);
    ampere.signal(Signal::SIGTERM);
    ampere.logs.wait_for(READY, "the delay to start", |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("unready: serving on"))
    });
    assert_eq!(ampere.probe("/ready").unwrap().status, 503);
    assert_eq!(ampere.probe("/live").unwrap().status, 200);
    for _ in 0..5 {
        let r = get(ampere.addr(), "/", Duration::from_secs(5)).expect("served during the delay");
        assert_eq!(r.status, 200);
    }
    // Still a supervisor meanwhile: a worker that dies is replaced.
    signal(worker, Signal::SIGKILL);
    wait_until(READY, "the replacement", || {
        ampere.logs.count(|l| msg_is(l, "worker ready")) >= 2
    });
    let r = get(ampere.addr(), "/", Duration::from_secs(5)).expect("served by the replacement");
    assert_eq!(r.status, 200);
    assert_eq!(ampere.probe("/ready").unwrap().status, 503);
    // A second signal stops at once.
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(143));
}

#[test]
fn in_kubernetes_the_shutdown_delay_is_5s_unless_set() {
    let mut ampere = Ampere::start_with(&fixture("hello"), &["--workers", "1"], &[], |cmd| {
        cmd.env("KUBERNETES_SERVICE_HOST", "10.0.0.1");
    });
    ampere.wait_ready(1, READY);
    ampere.signal(Signal::SIGTERM);
    let line = ampere.logs.wait_for(READY, "the delay to start", |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("unready: serving on"))
    });
    assert_eq!(line["delay_ms"], 5000, "{line}");
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(143));
}

/// The supervisor's loop runs on while workers drain: `/live` stays 200
/// however long in-flight requests take.
#[test]
fn live_stays_ok_through_a_long_drain() {
    let config = hello_config("[server]\nworkers = 1\n[shutdown]\ntimeout = \"1m\"\n");
    let mut ampere = Ampere::start(&fixture("hello"), &["--config", &config.path]);
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    // Longer than /live's 5 s allowance for a silent loop.
    let slow = slow_request_in_flight(addr, 8000);
    ampere.signal(Signal::SIGTERM);
    let mut answers = Vec::new();
    while !slow.is_finished() {
        answers.push(ampere.probe("/live").map(|r| r.status));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(slow.join().unwrap().expect("the slow request").status, 200);
    assert!(answers.len() > 10, "{answers:?}");
    assert!(answers.iter().all(|a| matches!(a, Ok(200))), "{answers:?}");
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
}

/// Signals whose default action would kill ampere with requests in
/// flight: the user signals are refused with a word, SIGQUIT stops
/// gracefully.
#[test]
fn stray_signals_do_not_kill_ampere_and_sigquit_stops_gracefully() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "1"]);
    ampere.wait_ready(1, READY);
    for sig in [Signal::SIGUSR1, Signal::SIGUSR2] {
        ampere.signal(sig);
        ampere
            .logs
            .wait_for(READY, "the signal to be refused", |l| {
                msg_is(l, "signal ignored") && l["signal"] == sig.as_str()
            });
    }
    let r = get(ampere.addr(), "/", Duration::from_secs(5)).expect("still serving");
    assert_eq!(r.status, 200);
    let addr = ampere.addr();
    let slow = slow_request_in_flight(addr, 1000);
    ampere.signal(Signal::SIGQUIT);
    assert_eq!(slow.join().unwrap().expect("finished").status, 200);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
}

/// Run by a user without privilege, where the kernel refuses that user
/// the socket filter that stops new handshakes (this test's VM does):
/// connections that arrive during the drain are still answered (503 from
/// the overflow listener), never queued to be reset at exit. Where the
/// filter is allowed, they are refused at the socket; either way, no reset.
#[test]
fn connections_arriving_during_the_drain_are_never_reset_without_privilege() {
    if !root_or_skip("to run ampere as another user") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let mut ampere = Ampere::start_with(&fixture("hello"), &["--workers", "2"], &nobody, |cmd| {
        cmd.env("TMPDIR", tmp.path()).env_remove("XDG_RUNTIME_DIR");
    });
    ampere.wait_ready(2, READY);
    let addr = ampere.addr();
    let slow = slow_request_in_flight(addr, 3000);
    ampere.signal(Signal::SIGTERM);
    // The idle worker has drained and gone; the other one accepts no more.
    ampere.logs.wait_for(READY, "the idle worker to stop", |l| {
        msg_is(l, "worker stopped")
    });
    match get(addr, "/", Duration::from_secs(20)) {
        Ok(r) => {
            assert_eq!(r.status, 503, "{r:?}");
            assert!(r.header("retry-after").is_some(), "{r:?}");
        }
        Err(Failure::Connect(_)) => {}
        Err(e) => panic!("a connection during the drain was broken: {e:?}"),
    }
    assert_eq!(slow.join().unwrap().expect("the slow request").status, 200);
    assert_eq!(ampere.wait_exit(READY), Some(0));
}

#[test]
fn workers_die_with_the_supervisor() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    let workers = ampere.wait_ready(2, READY);
    ampere.signal(Signal::SIGKILL);
    ampere.wait_exit(Duration::from_secs(10));
    wait_until(
        Duration::from_secs(10),
        "workers to die with ampere",
        || workers.iter().all(|pid| !alive(*pid)),
    );
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn pgrp(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(2).unwrap().parse().unwrap()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// As a container's first process (PID 1 of a new pid namespace, as under
/// Docker or Kubernetes), ampere reaps the orphans the app leaves behind,
/// and stops on SIGTERM as it does anywhere.
#[test]
fn as_pid_1_orphans_are_reaped_and_sigterm_stops() {
    if !root_or_skip("for a new pid namespace (unshare --pid)") {
        return;
    }
    let mut ampere = Ampere::start_with(
        &fixture("hello"),
        &["--workers", "1"],
        &NEW_PID_NAMESPACE,
        |_| {},
    );
    ampere.wait_ready(1, READY);
    // ampere as PID 1 in there: unshare's child.
    let pid1 = children(ampere.child.id())[0];
    assert_eq!(comm(pid1), "ampere");
    // The supervisor has a process group of its own: a terminal's Ctrl-C,
    // sent to PID 1's group, reaches it once (passed on), not twice.
    let supervisor = children(pid1)
        .into_iter()
        .find(|p| comm(*p) == "ampere")
        .expect("the supervisor under PID 1");
    assert_ne!(pgrp(supervisor), pgrp(pid1));
    let r = get(ampere.addr(), "/orphan?ms=300", Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200);
    wait_until(READY, "the orphan to come under PID 1", || {
        children(pid1).iter().any(|p| comm(*p) == "sleep")
    });
    // Once it has ended, not even a zombie is left.
    wait_until(READY, "the orphan to be reaped", || {
        !children(pid1).iter().any(|p| comm(*p) == "sleep")
    });
    signal(pid1, Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(READY), Some(0));
}

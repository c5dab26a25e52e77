//! Self-healing: a blocked worker is routed around at once and replaced in
//! seconds, a leaking worker is replaced before V8 runs out of heap, rolling
//! restarts lose nothing, steering keeps new connections off a slot without
//! a ready process, and the probes answer whatever the workers do.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients of the tests below: sequential requests with `pause` in
/// between, a short client timeout.
fn new_connections(
    addr: std::net::SocketAddr,
    path: &'static str,
    clients: usize,
    pause: Duration,
) -> Load {
    Load::paced(
        addr,
        clients,
        path,
        false,
        pause,
        CLIENT_TIMEOUT,
        Arc::new(|_: &Response| {}),
    )
}

fn keep_alive_clients(addr: std::net::SocketAddr, clients: usize, pause: Duration) -> Load {
    Load::paced(
        addr,
        clients,
        "/",
        true,
        pause,
        CLIENT_TIMEOUT,
        Arc::new(|_: &Response| {}),
    )
}

/// Waits for the log line of a replacement whose reason mentions `reason`.
fn wait_for_replacement(ampere: &Ampere, reason: &str) -> serde_json::Value {
    ampere.logs.wait_for(
        Duration::from_secs(60),
        &format!("a replacement for {reason:?}"),
        |l| {
            msg_is(l, "replacing worker")
                && l["reason"].as_str().is_some_and(|r| r.contains(reason))
        },
    )
}

fn assert_none_failed(results: &[Result<u32, String>]) {
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
}

fn pid_of(line: &serde_json::Value) -> u32 {
    line["worker_pid"].as_u64().unwrap() as u32
}

#[test]
fn a_blocked_worker_is_routed_around_and_replaced() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    ampere.wait_ready(2, READY);
    let addr = ampere.addr();
    let load = new_connections(addr, "/", 4, Duration::from_millis(10));
    wait_until(READY, "steady load", || load.count() >= 100);

    // Probe /ready all along.
    let probing = Arc::new(AtomicBool::new(true));
    let probe_results = Arc::new(Mutex::new(Vec::new()));
    let prober = {
        let (probing, probe_results, metrics_port) =
            (probing.clone(), probe_results.clone(), ampere.metrics_port);
        std::thread::spawn(move || {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
            while probing.load(Ordering::Relaxed) {
                let r = get(addr, "/ready", Duration::from_secs(1)).map(|r| r.status);
                probe_results.lock().unwrap().push(r);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // One request blocks one worker's event loop for good.
    std::thread::spawn(move || get(addr, "/block-forever", Duration::from_secs(60)));
    let replacing = wait_for_replacement(&ampere, "no heartbeat");
    let blocked = pid_of(&replacing);
    ampere
        .logs
        .wait_for(READY, "the blocked worker to be killed", |l| {
            msg_is(l, "killing blocked worker") && pid_of(l) == blocked
        });
    wait_until(READY, "the blocked worker to be gone", || !alive(blocked));
    let after = load.count();
    wait_until(READY, "load after the replacement", || {
        load.count() >= after + 100
    });
    let results = load.outcomes();
    probing.store(false, Ordering::Relaxed);
    prober.join().unwrap();

    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    let ok = results.len() - failed.len();
    println!(
        "blocked worker: {ok} of {} requests succeeded",
        results.len()
    );
    assert!(
        ok * 100 >= results.len() * 99,
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    let probes = probe_results.lock().unwrap();
    assert!(
        probes.iter().all(|p| *p == Ok(200)),
        "/ready must stay 200: {probes:?}"
    );
    assert!(ampere.child.try_wait().unwrap().is_none());
}

#[test]
fn a_leaking_worker_is_replaced_before_it_runs_out_of_heap() {
    let config = hello_config("[health]\nmax_heap = \"192MiB\"\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "2", "--config", &config.path],
    );
    let first: HashSet<u32> = ampere.wait_ready(2, READY).into_iter().collect();
    // 256 KiB kept per request, ~40 requests a second per client.
    let load = new_connections(ampere.addr(), "/leak?kb=256", 2, Duration::from_millis(25));
    let replacing = wait_for_replacement(&ampere, "memory");
    let leaker = pid_of(&replacing);
    assert!(first.contains(&leaker));
    ampere
        .logs
        .wait_for(READY, "the leaking worker to stop", |l| {
            msg_is(l, "replaced worker stopped") && pid_of(l) == leaker
        });
    let results = load.outcomes();
    let oom = ampere
        .logs
        .where_msg(|m| m.contains("heap out of memory") || m.contains("Allocation failed"));
    assert!(oom.is_empty(), "a worker died of OOM: {oom:?}");
    assert_none_failed(&results);
}

/// A memory cgroup with `limit` bytes, removed when dropped (once the
/// processes in it have ended): cgroup v1's memory hierarchy or v2.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    /// None where this user cannot make one (not root, or a container
    /// without a writable cgroup tree); CI must be able to.
    fn new(limit: u64) -> Option<MemoryCgroup> {
        let root = std::path::Path::new("/sys/fs/cgroup");
        let name = format!("ampere-test-{}", std::process::id());
        let (dir, file) = if root.join("memory").is_dir() {
            (root.join("memory").join(name), "memory.limit_in_bytes")
        } else {
            (root.join(name), "memory.max")
        };
        let made = nix::unistd::geteuid().is_root()
            && std::fs::create_dir(&dir).is_ok()
            && std::fs::write(dir.join(file), limit.to_string()).is_ok();
        if !made {
            let _ = std::fs::remove_dir(&dir);
            assert!(
                std::env::var_os("CI").is_none(),
                "CI cannot make a memory cgroup"
            );
            return None;
        }
        Some(MemoryCgroup(dir))
    }

    /// A launcher for [`Ampere::start_with`] that runs ampere inside the
    /// cgroup.
    fn launcher(&self) -> [&str; 4] {
        [
            "sh",
            "-c",
            "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"",
            self.0.to_str().unwrap(),
        ]
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.0).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// In a container that limits memory, each worker's heap is a share of
/// it: a leaking worker is then replaced before the container runs out.
/// With node's own default (about half the container per worker), four
/// leaking workers outgrow 640 MiB together and the kernel kills one.
#[test]
fn in_a_memory_limited_container_each_worker_gets_a_share_of_the_heap() {
    let Some(cgroup) = MemoryCgroup::new(640 << 20) else {
        eprintln!("skipped: making a memory cgroup needs root and a writable cgroup tree");
        return;
    };
    let mut ampere = Ampere::start_with(
        &fixture("hello"),
        &["--workers", "4"],
        &cgroup.launcher(),
        |_| {},
    );
    let first: HashSet<u32> = ampere.wait_ready(4, READY).into_iter().collect();
    let said = ampere.logs.wait_for(READY, "the heap share log line", |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.contains("a share of the container's memory"))
    });
    // 640 MiB / 4 workers * 3/4.
    assert_eq!(said["heap_limit_mib"], 120, "{said}");
    assert_eq!(said["container_memory_mib"], 640, "{said}");
    wait_until(READY, "every worker's heap limit in the metrics", || {
        (0..4).all(|w| {
            let limit = metric(
                &ampere,
                "nodejs_heap_space_limit_bytes",
                &format!("worker=\"{w}\""),
            );
            (110.0..=130.0).contains(&(limit / 1048576.0))
        })
    });
    // Every worker leaks: 256 KiB kept per request.
    let load = new_connections(ampere.addr(), "/leak?kb=256", 4, Duration::from_millis(10));
    let replacing = wait_for_replacement(&ampere, "memory");
    assert!(first.contains(&pid_of(&replacing)));
    let results = load.outcomes();
    let killed = ampere
        .logs
        .where_msg(|m| m.starts_with("worker crashed") || m.contains("heap out of memory"));
    assert!(killed.is_empty(), "a worker ran out of memory: {killed:?}");
    assert_none_failed(&results);
}

fn rolling_restart_loses_nothing(keep_alive: bool) {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    let old: HashSet<u32> = ampere.wait_ready(2, READY).into_iter().collect();
    let load = if keep_alive {
        keep_alive_clients(ampere.addr(), 4, Duration::from_millis(5))
    } else {
        new_connections(ampere.addr(), "/", 4, Duration::from_millis(5))
    };
    wait_until(READY, "steady load", || load.count() >= 100);
    ampere.signal(Signal::SIGHUP);
    ampere
        .logs
        .wait_for(READY, "the rolling restart to complete", |l| {
            msg_is(l, "rolling restart complete")
        });
    let new: Vec<u32> = ampere
        .logs
        .all()
        .iter()
        .filter(|l| msg_is(l, "worker ready"))
        .map(pid_of)
        .filter(|p| !old.contains(p))
        .collect();
    assert_eq!(new.len(), 2, "both workers replaced");
    // Keep-alive clients stay on whichever new worker they reconnected to,
    // so only ask that the new workers serve, not that each one does.
    wait_until(READY, "the new workers to serve", || {
        new.iter().any(|p| load.answered_by(*p))
    });
    let after = load.count();
    wait_until(READY, "more load after the restart", || {
        load.count() >= after + 100
    });
    let results = load.outcomes();
    assert_none_failed(&results);
    for pid in old {
        assert!(!alive(pid), "old worker {pid} still running");
    }
}

/// A worker whose connections never end (a stream, a WebSocket) cannot
/// finish draining: at the deadline it gets SIGTERM, so that the app's own
/// shutdown runs, rather than being killed outright.
/// The app closes its server by itself, after a stable run, while the
/// process lives on: the agent says so, and the supervisor replaces the
/// worker (the new one first) instead of leaving its slot's connections to
/// wait for an accept that never comes.
#[test]
fn a_worker_whose_app_closes_its_server_is_replaced() {
    let config = hello_config("[restart]\nreset_after = \"200ms\"\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    let old = ampere.wait_ready(1, READY)[0];
    let ready_at = std::time::Instant::now();
    // A stable run: past reset_after.
    wait_until(READY, "a stable run", || {
        ready_at.elapsed() > Duration::from_millis(300)
    });
    let r = get(ampere.addr(), "/close-server", Duration::from_secs(10)).unwrap();
    assert_eq!(r.pid(), old);
    let line = wait_for_replacement(&ampere, "the app closed its server");
    assert_eq!(pid_of(&line), old);
    // The replacement takes the slot's connections.
    wait_until(READY, "the replacement to answer", || {
        get(ampere.addr(), "/", Duration::from_secs(5)).is_ok_and(|r| r.pid() != old)
    });
    assert_eq!(
        metric(&ampere, "ampere_worker_restarts", "server_closed"),
        1.0
    );
}

/// The same right after it started listening (an app that probes the port
/// with a throwaway server, say): the worker is stopped and restarts with
/// backoff, as after a crash, so that such an app cannot spin.
#[test]
fn a_worker_that_closes_its_server_right_away_restarts_with_backoff() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "1"]);
    let old = ampere.wait_ready(1, READY)[0];
    get(ampere.addr(), "/close-server", Duration::from_secs(10)).unwrap();
    let line = ampere.logs.wait_for(READY, "the restart", |l| {
        l["failures"] == 1
            && l["msg"]
                .as_str()
                .is_some_and(|m| m.contains("the app closed its server"))
    });
    assert_eq!(pid_of(&line), old);
    wait_until(READY, "the restarted worker to answer", || {
        get(ampere.addr(), "/", Duration::from_secs(5)).is_ok_and(|r| r.pid() != old)
    });
    assert_eq!(
        metric(&ampere, "ampere_worker_restarts", "server_closed"),
        1.0
    );
}

#[test]
fn a_worker_that_cannot_finish_draining_gets_sigterm_before_sigkill() {
    let config = hello_config("[env]\nHELLO_ON_SIGTERM = \"1\"\n[shutdown]\ntimeout = \"1s\"\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    let old = ampere.wait_ready(1, READY)[0];
    let addr = ampere.addr();
    // Outlasts the drain deadline by far.
    let endless = std::thread::spawn(move || get(addr, "/slow?ms=60000", Duration::from_secs(90)));
    wait_until(READY, "the request in flight", || {
        metric(&ampere, "http_requests_in_flight", "worker=\"0\"") == 1.0
    });
    ampere.signal(Signal::SIGHUP);
    let ran = ampere
        .logs
        .wait_for(READY, "the app's SIGTERM handler", |l| {
            l["msg"] == "fixture-hello: SIGTERM handler ran"
        });
    assert_eq!(ran["pid"].as_u64(), Some(u64::from(old)), "{ran}");
    ampere.logs.wait_for(READY, "the old worker to stop", |l| {
        msg_is(l, "replaced worker stopped") && pid_of(l) == old
    });
    assert_eq!(
        ampere
            .logs
            .count(|l| msg_is(l, "replaced worker did not exit after SIGTERM; killing it")),
        0
    );
    // The request it could not finish was cut, not answered late.
    assert!(endless.join().unwrap().is_err());
}

#[test]
fn rolling_restart_on_new_connections_loses_nothing() {
    rolling_restart_loses_nothing(false);
}

#[test]
fn rolling_restart_on_keep_alive_connections_loses_nothing() {
    rolling_restart_loses_nothing(true);
}

#[test]
fn new_connections_avoid_a_slot_without_a_ready_process() {
    let slow_start = tempfile::NamedTempFile::new().unwrap();
    let mut cmd_env_ampere = {
        let port = free_port();
        let metrics_port = free_port();
        let mut cmd = std::process::Command::new(AMPERE);
        cmd.arg("start")
            .arg(fixture("hello"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "2",
            ])
            .args(["--metrics-port", &metrics_port.to_string()])
            .env("HELLO_SLOW_START_FILE", slow_start.path());
        Ampere::spawn(cmd, port, metrics_port)
    };
    let ampere = &mut cmd_env_ampere;
    let workers = ampere.wait_ready(2, READY);
    let addr = ampere.addr();
    // From now on a new worker takes 3 s to listen.
    std::fs::write(slow_start.path(), "3000").unwrap();
    let (victim, survivor) = (workers[0], workers[1]);
    signal(victim, Signal::SIGKILL);
    let starting = ampere
        .logs
        .wait_for(READY, "the replacement to start", |l| {
            msg_is(l, "worker starting") && !workers.contains(&pid_of(l))
        });
    let replacement = pid_of(&starting);
    // While the slot has no ready process, every new connection goes to the
    // other slot: answered at once by the survivor.
    for i in 0..30 {
        let r = get(addr, "/", CLIENT_TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert_eq!(
            r.pid(),
            survivor,
            "request {i} went to the slot without a ready process"
        );
    }
    assert!(
        ampere
            .logs
            .count(|l| msg_is(l, "worker ready") && pid_of(l) == replacement)
            == 0,
        "the replacement became ready too early for this test to mean anything"
    );
    ampere
        .logs
        .wait_for(READY, "the replacement to listen", |l| {
            msg_is(l, "worker ready") && pid_of(l) == replacement
        });
    let pids = pids_of_requests(addr, "/", 100);
    assert!(
        pids.contains(&replacement) && pids.contains(&survivor),
        "both slots serve again"
    );
}

#[test]
fn probes_answer_while_every_worker_is_blocked() {
    let config = hello_config("[health]\nenabled = false\n[shutdown]\ntimeout = \"3s\"\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "2", "--config", &config.path],
    );
    let workers = ampere.wait_ready(2, READY);
    wait_until(READY, "/ready", || {
        ampere.probe("/ready").is_ok_and(|r| r.status == 200)
    });
    for pid in &workers {
        signal(*pid, Signal::SIGSTOP);
    }
    for path in ["/live", "/status", "/ready"] {
        let r = ampere
            .probe(path)
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    ampere.signal(Signal::SIGTERM);
    ampere
        .logs
        .wait_for(READY, "shutdown to start", |l| msg_is(l, "shutting down"));
    let r = ampere
        .probe("/ready")
        .expect("/ready answers during shutdown");
    assert_eq!(r.status, 503);
    assert_eq!(ampere.probe("/live").unwrap().status, 200);
    for pid in &workers {
        signal(*pid, Signal::SIGCONT);
    }
    assert_eq!(ampere.wait_exit(READY), Some(0));
}

#[test]
fn a_saturated_worker_is_replaced_after_a_sustained_window() {
    let config =
        hello_config("[health]\nmax_elu = 0.6\nelu_grace = \"2s\"\n[overload]\nenabled = false\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    let first = ampere.wait_ready(1, READY)[0];
    // Each request holds the event loop for 50 ms: utilisation near 1.
    let load = new_connections(ampere.addr(), "/block?ms=50", 2, Duration::from_millis(1));
    let line = wait_for_replacement(&ampere, "event-loop utilisation");
    assert_eq!(pid_of(&line), first);
    assert!(line["elu"].as_f64().unwrap() > 0.6, "{line}");
    // Not one sample: the window must have lasted elu_grace.
    let reason = line["reason"].as_str().unwrap();
    let window: Duration =
        humantime::parse_duration(reason.rsplit(" for ").next().unwrap()).unwrap();
    assert!(window >= Duration::from_secs(2), "{reason}");
    let results = load.outcomes();
    assert_none_failed(&results);
}

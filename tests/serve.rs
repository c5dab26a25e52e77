//! Serving: unmodified apps (node:http, Express, Fastify, Next.js) on 2
//! worker processes that accept directly from their slots' sockets.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);

fn shares(pids: &[u32]) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for pid in pids {
        *counts.entry(*pid).or_insert(0) += 1;
    }
    counts
}

#[test]
fn two_workers_answer_new_connections() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    let workers = ampere.wait_ready(2, READY);
    let pids = pids_of_requests(ampere.addr(), "/", 200);
    let counts = shares(&pids);
    assert_eq!(counts.len(), 2, "both workers should answer: {counts:?}");
    for pid in &workers {
        let n = counts.get(pid).copied().unwrap_or(0);
        assert!(
            n >= 40,
            "worker {pid} answered {n} of 200 (< 20%): {counts:?}"
        );
    }
}

/// Zero-config on a platform that sets PORT (Heroku, Cloud Run, Render):
/// that is the port served.
#[test]
fn without_a_config_file_the_port_environment_variable_is_served() {
    let port = free_port();
    let metrics_port = free_port();
    let mut cmd = std::process::Command::new(AMPERE);
    cmd.arg("start")
        .arg(fixture("hello"))
        .args(["--host", "127.0.0.1", "--workers", "1"])
        .args(["--metrics-port", &metrics_port.to_string()])
        .env("PORT", port.to_string());
    let mut ampere = Ampere::spawn(cmd, port, metrics_port);
    ampere.wait_ready(1, READY);
    let r = get(ampere.addr(), "/", Duration::from_secs(5)).expect("served on $PORT");
    assert_eq!(r.status, 200);
}

/// `ampere start` without `--port`/`--host` flags for the address: on the
/// default host, fresh ports, `setup` applied to the command.
fn start_on_default_host(setup: impl FnOnce(&mut std::process::Command)) -> Ampere {
    let (port, metrics_port) = (free_port(), free_port());
    let mut cmd = std::process::Command::new(AMPERE);
    cmd.arg("start")
        .arg(fixture("hello"))
        .args(["--port", &port.to_string(), "--workers", "1"])
        .args(["--metrics-port", &metrics_port.to_string()]);
    setup(&mut cmd);
    let mut ampere = Ampere::spawn(cmd, port, metrics_port);
    ampere.wait_ready(1, READY);
    ampere
}

/// By default ampere listens as node's own `listen(port)` does, on "::":
/// IPv4 and IPv6 clients reach the service and the probes (an IPv6-only
/// Kubernetes cluster needs no setting).
#[test]
fn by_default_ipv4_and_ipv6_clients_reach_the_service_and_the_probes() {
    let ampere = start_on_default_host(|_| {});
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    // A test machine without IPv6 checks the fallback below instead.
    if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    } else {
        eprintln!("no IPv6 loopback here: IPv4 only");
    }
    for ip in ips {
        for (port, path) in [(ampere.port, "/"), (ampere.metrics_port, "/ready")] {
            let addr = SocketAddr::new(ip, port);
            let r = get(addr, path, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e:?}"));
            assert_eq!(r.status, 200, "{addr}{path}");
        }
    }
}

/// Where the kernel has no IPv6 (here a seccomp filter makes IPv6 sockets
/// fail as `ipv6.disable=1` does), the default host falls back to
/// 0.0.0.0, as node's does, and the log says so once.
#[cfg(target_arch = "x86_64")]
#[test]
fn without_ipv6_the_default_host_falls_back_to_ipv4() {
    use std::os::unix::process::CommandExt;
    let hook = deny_syscall(
        libc::SYS_socket,
        &[(0, libc::AF_INET6 as u32)],
        libc::EAFNOSUPPORT,
    );
    let ampere = start_on_default_host(|cmd| {
        // SAFETY: the hook runs between fork and exec and makes only two
        // prctl(2) calls, which are async-signal-safe, on memory it owns.
        unsafe { cmd.pre_exec(hook) };
    });
    let r = get(ampere.addr(), "/", Duration::from_secs(5)).expect("served on IPv4");
    assert_eq!(r.status, 200);
    assert_eq!(ampere.probe("/ready").map(|r| r.status), Ok(200));
    let lines = ampere.logs.all();
    let warned = lines
        .iter()
        .filter(|l| msg_is(l, "this machine has no IPv6"))
        .count();
    assert_eq!(warned, 1, "{lines:?}");
    let starting = lines
        .iter()
        .find(|l| msg_is(l, "starting"))
        .expect("a start line");
    assert_eq!(
        starting["address"],
        format!("0.0.0.0:{}", ampere.port),
        "{starting}"
    );
}

fn serves_framework(name: &str, path: &str, expect: &str) {
    let dir = prepare_fixture(name);
    let mut ampere = Ampere::start(&dir, &["--workers", "2"]);
    let workers = ampere.wait_ready(2, READY);
    let mut seen = HashMap::new();
    for i in 0..100 {
        let r = get(ampere.addr(), path, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains(expect), "body lacks {expect:?}: {}", r.body);
        let pid = r
            .header("x-worker-pid")
            .map(|p| p.parse::<u32>().unwrap())
            .or_else(|| next_pid(&r.body))
            .expect("a worker pid in the response");
        *seen.entry(pid).or_insert(0) += 1;
    }
    for pid in workers {
        assert!(
            seen.contains_key(&pid),
            "worker {pid} answered none of 100: {seen:?}"
        );
    }
}

/// The Next.js fixture renders `data-pid="<pid>"`.
fn next_pid(body: &str) -> Option<u32> {
    let at = body.find("data-pid=\"")? + "data-pid=\"".len();
    body[at..].split('"').next()?.parse().ok()
}

#[test]
fn express_app_unmodified() {
    serves_framework("express", "/", "\"framework\":\"express\"");
}

#[test]
fn fastify_app_unmodified() {
    serves_framework("fastify", "/", "\"framework\":\"fastify\"");
}

#[test]
fn nextjs_app_router_unmodified() {
    serves_framework("next", "/", "Products");
}

/// `listener = "shared"` (the fallback where SO_REUSEPORT does not balance):
/// one socket, accepted from by every worker.
#[test]
fn shared_listener_mode_serves_from_one_socket() {
    // Blocking requests make the loops late: no admission control here.
    let config = hello_config("[server]\nlistener = \"shared\"\n[overload]\nenabled = false\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "2", "--config", &config.path],
    );
    let workers = ampere.wait_ready(2, READY);
    let line = ampere
        .logs
        .wait_for(READY, "the start line", |l| msg_is(l, "starting"));
    assert_eq!(line["listener"], "Shared");
    // Concurrent requests that block a worker's event loop: while one
    // worker is blocked, the other accepts from the one queue.
    let addr = ampere.addr();
    let answers: Vec<u32> = (0..10)
        .map(|_| std::thread::spawn(move || get(addr, "/block?ms=100", Duration::from_secs(10))))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap().expect("request").pid())
        .collect();
    for pid in workers {
        assert!(
            answers.contains(&pid),
            "worker {pid} never accepted: {answers:?}"
        );
    }
}

/// A config for the wrapper fixture running `command`; the file lives as
/// long as the value.
fn wrapper_config(command: &[&str]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ampere.toml");
    let body = format!(
        "[app]\ndir = {:?}\ncommand = {:?}\n",
        fixture("wrapper").display().to_string(),
        command
    );
    std::fs::write(&path, body).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.split(' ').nth(1)?.parse().ok()
}

/// `[app] command` with a program that runs the app in a child process:
/// the app (not the wrapper, whose node preloads the agent too) adopts the
/// slot's socket and reports, and shutdown reaches it.
fn serves_behind_wrapper(command: &[&str]) {
    let (_dir, config) = wrapper_config(command);
    let mut ampere = Ampere::start(
        &fixture("wrapper"),
        &["--workers", "2", "--config", &config],
    );
    let wrappers = ampere.wait_ready(2, READY);
    let pids = pids_of_requests(ampere.addr(), "/", 40);
    let apps = shares(&pids);
    assert_eq!(apps.len(), 2, "two app processes should answer: {apps:?}");
    for app in apps.keys() {
        assert!(!wrappers.contains(app), "the wrapper {app} answered itself");
        // The app runs under one of the wrappers (npm adds a shell).
        let mut up = Some(*app);
        for _ in 0..4 {
            up = up.and_then(parent_of);
            if up.is_some_and(|p| wrappers.contains(&p)) {
                break;
            }
        }
        assert!(
            up.is_some_and(|p| wrappers.contains(&p)),
            "app {app} does not run under a wrapper {wrappers:?}"
        );
    }
    // The app's agent reports: heartbeats reach the metrics.
    wait_until(READY, "the apps' heartbeats", || {
        ampere
            .probe("/metrics")
            .is_ok_and(|r| r.body.matches("nodejs_eventloop_utilization{").count() == 2)
    });
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(READY), Some(0));
    for app in apps.keys() {
        assert!(!alive(*app), "app {app} outlived ampere");
    }
}

#[test]
fn npm_start_command_serves_the_app_it_starts() {
    serves_behind_wrapper(&["npm", "start", "--silent"]);
}

/// A wrapper that gives its child an IPC channel on fd 3, as tsx does.
#[test]
fn wrapper_with_its_own_fd_3_serves_the_app_it_starts() {
    serves_behind_wrapper(&["node", "ipc-wrapper.js"]);
}

/// node accepts one connection per descriptor per turn of its event loop:
/// with `[overload] hold_target`, each worker gets further copies of its
/// slot's socket (fds 66..72 beside 64), so that it takes up to eight per
/// turn (the agent's tests show what they do); without, none.
#[test]
fn with_hold_target_each_worker_accepts_through_several_copies_of_its_socket() {
    for hold in [true, false] {
        let config = hello_config(&format!("[overload]\nhold_target = {hold}\n"));
        let mut ampere = Ampere::start(
            &fixture("hello"),
            &["--workers", "1", "--config", &config.path],
        );
        let workers = ampere.wait_ready(1, READY);
        let socket_of = |fd: i32| std::fs::read_link(format!("/proc/{}/fd/{fd}", workers[0])).ok();
        let listen = socket_of(64).expect("the worker's listening socket at fd 64");
        assert!(
            listen.to_string_lossy().starts_with("socket:"),
            "{listen:?}"
        );
        for fd in 66..=72 {
            let copy = socket_of(fd);
            if hold {
                assert_eq!(copy.as_ref(), Some(&listen), "fd {fd}");
            } else {
                assert_ne!(copy.as_ref(), Some(&listen), "fd {fd}");
            }
        }
        let answer = get(ampere.addr(), "/", Duration::from_secs(10)).expect("request");
        assert_eq!(answer.status, 200);
    }
}

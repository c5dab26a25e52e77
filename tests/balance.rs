//! Load-aware balancing: steering new connections by measured capacity,
//! keep-alive rebalancing, and the overflow listener that answers 503 when
//! every worker is overloaded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(10);

/// The pid of the worker in `slot`, from its "worker ready" log line.
fn pid_of_slot(ampere: &Ampere, slot: u64) -> u32 {
    ampere
        .logs
        .all()
        .iter()
        .find(|l| msg_is(l, "worker ready") && l["worker"].as_u64() == Some(slot))
        .and_then(|l| l["worker_pid"].as_u64())
        .expect("a ready line for the slot") as u32
}

#[test]
fn a_slower_worker_gets_fewer_new_connections() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    ampere.wait_ready(2, READY);
    let slow_pid = pid_of_slot(&ampere, 1);
    let fast_pid = pid_of_slot(&ampere, 0);
    let measuring = Arc::new(AtomicBool::new(false));
    let (slow, fast) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let count = {
        let (measuring, slow, fast) = (measuring.clone(), slow.clone(), fast.clone());
        Arc::new(move |r: &Response| {
            if measuring.load(Ordering::Relaxed) {
                if r.pid() == slow_pid {
                    slow.fetch_add(1, Ordering::Relaxed);
                } else if r.pid() == fast_pid {
                    fast.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Worker 1 burns 3 ms of CPU per request, worker 0 none.
    let load = Load::start(ampere.addr(), 4, "/burn?ms=3&worker=1", false, count);
    wait_until(
        Duration::from_secs(60),
        "the slower worker's share to shrink",
        || metric(&ampere, "ampere_steering_share", "worker=\"1\"") < 0.3,
    );
    measuring.store(true, Ordering::Relaxed);
    wait_until(Duration::from_secs(60), "400 measured requests", || {
        slow.load(Ordering::Relaxed) + fast.load(Ordering::Relaxed) >= 400
    });
    let failures = load.finish();
    let (slow, fast) = (slow.load(Ordering::Relaxed), fast.load(Ordering::Relaxed));
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    // The kernel's hash alone splits new connections about evenly.
    assert!(
        slow * 2 < fast,
        "the slower worker got {slow} new connections, the faster {fast}"
    );
}

#[test]
fn a_busier_worker_sheds_keep_alive_connections_to_the_other() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    ampere.wait_ready(2, READY);
    // 16 keep-alive clients; requests on worker 1 cost 2 ms of CPU, so it
    // runs far busier than worker 0 with about the same connections.
    let load = Load::start(
        ampere.addr(),
        16,
        "/burn?ms=2&worker=1",
        true,
        Arc::new(|_: &Response| {}),
    );
    wait_until(
        Duration::from_secs(60),
        "worker 1 to hand most of its connections over",
        || {
            let shed = metric(
                &ampere,
                "ampere_rebalanced_connections_total",
                "worker=\"1\"",
            );
            let on_1 = metric(&ampere, "ampere_open_connections", "worker=\"1\"");
            let on_0 = metric(&ampere, "ampere_open_connections", "worker=\"0\"");
            shed >= 1.0 && on_0 >= 12.0 && on_1 <= 4.0
        },
    );
    let failures = load.finish();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}

#[test]
fn with_every_worker_overloaded_the_overflow_listener_answers_503() {
    overflow_answers_when_every_worker_is_overloaded(2);
}

/// One worker (a one-CPU pod) has the overflow listener too: without it,
/// clients turned away by the worker reconnect into its accept queue,
/// which overflows into SYN drops and seconds-long retries.
#[test]
fn a_single_overloaded_worker_has_the_overflow_listener_too() {
    overflow_answers_when_every_worker_is_overloaded(1);
}

fn overflow_answers_when_every_worker_is_overloaded(workers: usize) {
    let config = hello_config(
        "[overload]\nmax_inflight = 1\nmax_delay = \"0s\"\n[health]\nenabled = false\n",
    );
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", &workers.to_string(), "--config", &config.path],
    );
    ampere.wait_ready(workers, READY);
    let addr = ampere.addr();
    // Slow requests until each worker has one in flight; the extra ones are
    // rejected with 503.
    let mut slow = Vec::new();
    wait_until(READY, "a slow request in flight on each worker", || {
        let busy = (0..workers).all(|w| {
            metric(
                &ampere,
                "http_requests_in_flight",
                &format!("worker=\"{w}\""),
            ) >= 1.0
        });
        if !busy {
            slow.push(std::thread::spawn(move || {
                get(addr, "/slow?ms=8000", Duration::from_secs(30))
            }));
        }
        busy
    });
    wait_until(READY, "the overflow listener to answer", || {
        let r = get(addr, "/", TIMEOUT).expect("a response");
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("connection"), Some("close"));
        metric(
            &ampere,
            "ampere_rejected_requests_total",
            "reason=\"all_overloaded\"",
        ) >= 1.0
    });
    ampere.logs.wait_for(READY, "the overflow log line", |l| {
        msg_is(l, "every worker is overloaded")
    });
    // Clients whose request is not in when the connection is accepted (a
    // late head, a body in a second write) get the same answer, and a clean
    // close rather than a reset.
    for pieces in [
        &[&b""[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"][..],
        &[
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"[..],
            b"hello",
        ][..],
    ] {
        let answer = exchange_in_pieces(addr, pieces);
        assert!(answer.starts_with("HTTP/1.1 503 "), "{pieces:?}: {answer}");
        assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    }
    // The workers finish what they had in flight.
    let statuses: Vec<u16> = slow
        .into_iter()
        .map(|t| t.join().unwrap().expect("a response").status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        workers,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    wait_until(READY, "the workers to serve again", || {
        get(addr, "/", TIMEOUT).is_ok_and(|r| r.status == 200)
    });
    ampere.logs.wait_for(READY, "the recovery log line", |l| {
        msg_is(l, "workers take new connections again")
    });
}

/// Sends `pieces` 100 ms apart on a new connection (an empty piece: wait
/// only), then reads until the server closes; what it answered. A reset
/// fails the test.
fn exchange_in_pieces(addr: std::net::SocketAddr, pieces: &[&[u8]]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    for (k, piece) in pieces.iter().enumerate() {
        if k > 0 {
            // The client's own pace, not a wait for the server.
            std::thread::sleep(Duration::from_millis(100));
        }
        stream.write_all(piece).expect("write");
    }
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the answer, then a clean close");
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_worker_whose_accept_queue_stalls_gets_no_new_connections() {
    // Health verdicts off: a blocked worker is not replaced or marked
    // suspect, so only the accept-queue watch can steer around it.
    let config = hello_config("[health]\nenabled = false\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "2", "--config", &config.path],
    );
    ampere.wait_ready(2, READY);
    let addr = ampere.addr();
    let (blocked_pid, free_pid) = (pid_of_slot(&ampere, 0), pid_of_slot(&ampere, 1));
    // Block worker 0's event loop for 6 s. /burn?worker=0 burns only there
    // and answers at once on worker 1, so send it until one does not answer.
    let epoch = std::time::Instant::now();
    let pending_since = Arc::new(AtomicU64::new(0));
    let blocker = {
        let pending_since = pending_since.clone();
        std::thread::spawn(move || {
            loop {
                pending_since.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
                let r = get(addr, "/burn?ms=6000&worker=0", Duration::from_secs(30))
                    .expect("a response");
                pending_since.store(0, Ordering::SeqCst);
                if r.pid() == blocked_pid {
                    return;
                }
            }
        })
    };
    wait_until(READY, "worker 0 to be blocked", || {
        let since = pending_since.load(Ordering::SeqCst);
        since > 0 && epoch.elapsed().as_millis() as u64 > since + 300
    });
    // 40 new connections, one every 20 ms, while worker 0 accepts nothing.
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let c = std::thread::spawn(move || get(addr, "/", Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(20));
            c
        })
        .collect();
    let responses: Vec<Response> = clients
        .into_iter()
        .map(|c| c.join().unwrap().expect("a response"))
        .collect();
    blocker.join().unwrap();
    let free = responses
        .iter()
        .filter(|r| r.status == 200 && r.pid() == free_pid)
        .count();
    // Without the watch the kernel's hash sends about half to worker 0,
    // where they wait out the block.
    assert!(
        free >= 30,
        "only {free} of 40 new connections went to the worker that accepts; statuses and pids: {:?}",
        responses
            .iter()
            .map(|r| (r.status, r.header("x-worker-pid").unwrap_or("-")))
            .collect::<Vec<_>>()
    );
    assert!(
        metric(&ampere, "ampere_accept_queue_stalls_total", "worker=\"0\"") >= 1.0,
        "the stall was counted"
    );
}

/// Where the kernel refuses reuseport steering programs (gVisor; here a
/// seccomp filter that denies SO_ATTACH_REUSEPORT_CBPF, as strict container
/// profiles may), ampere says so once at start, runs without steering and
/// the overflow listener, and its workers still share the new connections.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_kernel_that_refuses_steering_is_reported_once_and_worked_around() {
    use std::os::unix::process::CommandExt;
    let (port, metrics_port) = (free_port(), free_port());
    let mut cmd = std::process::Command::new(AMPERE);
    cmd.arg("start")
        .arg(fixture("hello"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--metrics-port", &metrics_port.to_string()])
        .args(["--workers", "2"]);
    const SO_ATTACH_REUSEPORT_CBPF: u32 = 51;
    let hook = deny_syscall(
        libc::SYS_setsockopt,
        &[(1, libc::SOL_SOCKET as u32), (2, SO_ATTACH_REUSEPORT_CBPF)],
        libc::EPERM,
    );
    // SAFETY: the hook runs between fork and exec and makes only two
    // prctl(2) calls, which are async-signal-safe, on memory it owns.
    unsafe { cmd.pre_exec(hook) };
    let mut ampere = Ampere::spawn(cmd, port, metrics_port);
    let pids = ampere.wait_ready(2, READY);
    let answered = pids_of_requests(ampere.addr(), "/", 200);
    for pid in &pids {
        assert!(
            answered.contains(pid),
            "worker {pid} got none of 200 new connections"
        );
    }
    // Heartbeats carrying those requests have reached the balancer, which
    // recomputes its weights on each: it must not try again.
    wait_until(Duration::from_secs(10), "the requests' heartbeats", || {
        metric(&ampere, "http_requests", "") >= 200.0
    });
    let lines = ampere.logs.all();
    let said = |prefix: &str| lines.iter().filter(|l| msg_is(l, prefix)).count();
    assert_eq!(
        said("this kernel refuses reuseport steering programs"),
        1,
        "{lines:?}"
    );
    assert_eq!(said("cannot attach the steering program"), 0, "{lines:?}");
    assert_eq!(said("no overflow listener"), 0, "{lines:?}");
    ampere.signal(Signal::SIGTERM);
    assert_eq!(ampere.wait_exit(Duration::from_secs(30)), Some(0));
}

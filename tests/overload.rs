//! Admission control: an overloaded worker answers 503 with `Retry-After`
//! and `Connection: close` before any app code runs.

mod common;

use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);

#[test]
fn requests_over_the_in_flight_bound_get_503_without_running_the_app() {
    // The agent's own rejections: without the overflow listener, which
    // would take the new connections once the worker rejects.
    let config = hello_config(
        "[overload]\nmax_inflight = 2\nmax_delay = \"0s\"\n[balance]\noverflow = false\n",
    );
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    let slow: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || get(addr, "/slow?ms=3000", Duration::from_secs(30))))
        .collect();
    wait_until(READY, "2 requests in flight", || {
        metric(&ampere, "http_requests_in_flight", "worker=\"0\"") == 2.0
    });
    for i in 0..5 {
        let r =
            get(addr, "/", Duration::from_secs(5)).unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert_eq!(r.status, 503, "request {i}: {r:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("connection"), Some("close"));
    }
    for s in slow {
        assert_eq!(s.join().unwrap().expect("slow request").status, 200);
    }
    // The handler ran for the two slow requests and this one only.
    let r = get(addr, "/", Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("\"handled\":3"),
        "the app saw a rejected request: {}",
        r.body
    );
    ampere.logs.wait_for(READY, "the overload log line", |l| {
        msg_is(l, "worker overloaded")
    });
    wait_until(READY, "the rejections to be counted", || {
        metric(
            &ampere,
            "ampere_rejected_requests_total",
            "reason=\"inflight\"",
        ) == 5.0
    });
}

#[test]
fn requests_that_waited_behind_a_blocked_event_loop_get_503() {
    let config = hello_config(
        "[overload]\nmax_inflight = 0\nmax_delay = \"200ms\"\n[health]\nenabled = false\n",
    );
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    // Answered at once; then the event loop is blocked for a second, while
    // the next request waits.
    assert_eq!(
        get(addr, "/block-after?ms=1000", Duration::from_secs(5))
            .unwrap()
            .status,
        200
    );
    let r = get(addr, "/", Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Once the loop is on time again, requests go through.
    wait_until(READY, "the worker to serve again", || {
        get(addr, "/", Duration::from_secs(5)).is_ok_and(|r| r.status == 200)
    });
    wait_until(READY, "the rejection to be counted", || {
        metric(
            &ampere,
            "ampere_rejected_requests_total",
            "reason=\"delay\"",
        ) >= 1.0
    });
}

/// Requests that wait on I/O (an upstream, a timer, a stream) are not work
/// queued for the event loop: many of them in flight while the loop idles
/// must not turn new requests away.
#[test]
fn requests_waiting_on_io_do_not_count_as_queued_work() {
    // A bound well above what other tests' workers on the same CPUs may
    // delay this one by.
    let config = hello_config("[overload]\nmax_delay = \"250ms\"\n[health]\nenabled = false\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    // 30 clients, each request 10 ms of CPU and then 1.5 s of waiting, the
    // clients 50 ms apart: 30 in flight, 300 ms of work if they all still
    // needed the loop, while the loop idles four fifths of the time.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..30u64)
        .map(|i| {
            let done = done.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50 * i));
                let mut statuses = Vec::new();
                // Four rounds: the agent learns what a request costs from
                // the first that finish (at a heartbeat), and would turn
                // the later rounds away.
                for _ in 0..4 {
                    let r = get(
                        addr,
                        "/burn-then-wait?ms=10&wait=1500",
                        Duration::from_secs(30),
                    );
                    statuses.push(r.map(|r| r.status).map_err(|e| format!("{e:?}")));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                statuses
            })
        })
        .collect();
    wait_until(Duration::from_secs(60), "120 requests answered", || {
        done.load(std::sync::atomic::Ordering::Relaxed) == 120
    });
    let statuses: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let ok = statuses.iter().filter(|s| **s == Ok(200)).count();
    assert_eq!(ok, 120, "{statuses:?}");
}

/// A new worker whose loop is still busy after it listens (a framework that
/// keeps initialising, code still compiling) while a connection waits is
/// starting, not overloaded: once that is over, the requests after it are
/// served, not sent to the overflow listener because its first heartbeat
/// read saturated.
#[test]
fn a_cold_start_is_not_taken_for_overload_once_it_is_over() {
    let mut ampere = Ampere::start_with(&fixture("hello"), &["--workers", "1"], &[], |cmd| {
        cmd.env("HELLO_BLOCK_AFTER_LISTEN_MS", "700");
    });
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    let timeout = Duration::from_secs(30);
    // The first client's connection waits behind the blocked loop, which
    // the supervisor sees as a stalled queue.
    let first = std::thread::spawn(move || get(addr, "/", timeout));
    wait_until(READY, "the queue to stall", || {
        metric(&ampere, "ampere_accept_queue_stalls_total", "worker=\"0\"") >= 1.0
    });
    assert_eq!(first.join().unwrap().map(|r| r.status), Ok(200));
    // One client, one request at a time, until a heartbeat after the block
    // has counted some of them: every one is served.
    let mut statuses = Vec::new();
    wait_until(READY, "a heartbeat after the block", || {
        statuses.push(get(addr, "/", timeout).map(|r| r.status));
        metric(&ampere, "http_requests_total", "worker=\"0\"") >= 3.0
    });
    assert!(statuses.iter().all(|s| *s == Ok(200)), "{statuses:?}");
}

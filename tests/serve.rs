//! Serving: unmodified apps (node:http, Express, Fastify, Next.js) on 2
//! worker processes that accept directly from their slots' sockets.

mod common;

use std::collections::HashMap;
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

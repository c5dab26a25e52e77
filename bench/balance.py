#!/usr/bin/env python3
"""bench/balance: how evenly the workers share the load, ampere against bare
reuseport processes.

Same app (bench/apps/cpu: every request costs a fixed amount of CPU), same
Node.js, 2 workers. First the capacity of the bare setup is measured (closed
loop, keep-alive); then each setup runs at --load (default 0.5) of it, open
loop at a constant arrival rate with latency correction, over --connections
(default 100) keep-alive connections, as a load balancer or k6 would hold
them, after a 3 s warm-up on other connections. The setups are interleaved
over --rounds rounds.

Reported per run: the CPU split between the workers (the busier worker's
share of the workers' CPU time, 50% is perfect), measured after --settle
seconds (keep-alive connections are spread when they are made; ampere then
rebalances them), and p50/p99 over the whole run. Medians with min..max.

Usage: bench/balance.py [--rounds 5] [--duration 20] [--settle 5]
Writes bench/results/balance-<timestamp>.{json,md}. Every run is bounded in
time; every process started is stopped.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (HOST, ROOT, cpu_seconds, ensure_node, ensure_oha,  # noqa: E402
                      ensure_ampere, free_port, machine_meta, start_ampere, start_bare)
from report import write_results  # noqa: E402
from stats import cell, spread  # noqa: E402

APP = ROOT / "bench" / "apps" / "cpu"
# ampere variants: extra config for each.
VARIANTS = {
    "ampere": "",
    "ampere-hash": "[balance]\nload_aware = false\nrebalance = false\n",
    "ampere-steer": "[balance]\nrebalance = false\n",
}


def oha_rate(oha, port, rate, duration, connections):
    cmd = [oha, "-q", str(rate), "--latency-correction", "-z", f"{duration}s", "-c", str(connections),
           "-t", "5s", "--no-tui", "--output-format", "json", f"http://{HOST}:{port}/"]
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=duration + 60)
    return json.loads(out.stdout)


def capacity(oha, port, connections, duration=5):
    cmd = [oha, "-z", f"{duration}s", "-c", str(connections), "--no-tui", "--output-format", "json",
           f"http://{HOST}:{port}/"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, timeout=duration + 60).stdout)
    return out["statusCodeDistribution"].get("200", 0) / out["summary"]["total"]


def one_run(setup, worker_pids, oha, port, rate, args):
    """Load for --duration s; CPU of each worker from --settle s to the end."""
    oha_rate(oha, port, rate, 3, args.connections)  # warm-up (JIT), its own connections
    result = {}

    def load():
        result["oha"] = oha_rate(oha, port, rate, args.duration, args.connections)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(args.settle)  # the measurement window starts here
    before = [cpu_seconds([p]) for p in worker_pids]
    t0 = time.monotonic()
    t.join(timeout=args.duration + 90)
    window = time.monotonic() - t0
    used = [cpu_seconds([p]) - b for p, b in zip(worker_pids, before)]
    r = result["oha"]
    ok = r["statusCodeDistribution"].get("200", 0)
    pct = r["latencyPercentiles"]
    total = sum(used)
    return {
        "rate": rate,
        "requests": sum(r["statusCodeDistribution"].values()),
        "ok": ok,
        "success": ok / max(1, sum(r["statusCodeDistribution"].values()) + sum(r.get("errorDistribution", {}).values())),
        "p50_ms": pct["p50"] * 1000,
        "p99_ms": pct["p99"] * 1000,
        "worker_cpu_s": used,
        "busier_share": max(used) / total if total else None,
        "window_s": window,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=20, help="seconds per run")
    ap.add_argument("--settle", type=int, default=5, help="seconds before the CPU split is measured")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--load", type=float, default=0.5, help="fraction of the measured capacity")
    ap.add_argument("--setups", default="ampere,bare",
                    help="comma-separated: bare, ampere, ampere-steer (no rebalancing), "
                         "ampere-hash (neither: equal weights)")
    ap.add_argument("--ampere", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    node = ensure_node()
    oha = ensure_oha()
    ampere = ensure_ampere(args.ampere)

    port = free_port()
    setup, _ = start_bare(node, port, 2, app=APP)
    try:
        capacity(oha, port, args.connections, 2)  # warm-up
        cap = capacity(oha, port, args.connections)
    finally:
        setup.stop()
    rate = round(cap * args.load)
    print(f"capacity {cap:.0f} req/s (bare, keep-alive); running at {rate} req/s", file=sys.stderr)

    setups = [s for s in args.setups.split(",") if s]
    runs = []
    for rnd in range(args.rounds):
        for name in (setups if rnd % 2 == 0 else setups[::-1]):
            port = free_port()
            if name in VARIANTS:
                setup, _ = start_ampere(ampere, node, port, 2, app=APP, extra=VARIANTS[name])
                workers = [p for p in setup.server_pids if p != setup.procs[0].pid]
            else:
                setup, _ = start_bare(node, port, 2, app=APP)
                workers = setup.server_pids
            try:
                m = one_run(setup, workers, oha, port, rate, args)
            finally:
                setup.stop()
            m.update(setup=name, round=rnd)
            runs.append(m)
            print(f"round {rnd} {name:7} busier worker {m['busier_share'] * 100:.1f}%  p50 {m['p50_ms']:.2f} ms"
                  f"  p99 {m['p99_ms']:.2f} ms  success {m['success'] * 100:.2f}%", file=sys.stderr)

    summary = {name: {k: spread([r[k] for r in runs if r["setup"] == name])
                      for k in ["busier_share", "p50_ms", "p99_ms", "success"]} for name in setups}
    if "ampere" in setups and "bare" in setups:
        summary["ratio"] = {k: summary["ampere"][k]["median"] / summary["bare"][k]["median"]
                            for k in ["p50_ms", "p99_ms"]}
    meta = machine_meta(node, oha)
    meta.update(rounds=args.rounds, duration_s=args.duration, settle_s=args.settle,
                connections=args.connections, capacity_rps=cap, rate=rate, load=args.load)
    fmt = cell
    lines = [
        "# bench/balance: per-worker CPU split, ampere vs bare reusePort processes",
        "",
        f"{meta['time']} on {meta['machine']}; node {meta['node']}; {meta['oha']}; 2 workers; app bench/apps/cpu; "
        f"bare capacity {cap:.0f} req/s, load {rate} req/s ({args.load:.0%}), open loop with latency correction, "
        f"{args.connections} keep-alive connections; {args.rounds} interleaved rounds of {args.duration} s, "
        f"CPU split measured after {args.settle} s. Load average before: {meta['loadavg_before'][0]:.2f}.",
        "",
        "Medians (min..max). Busier worker = its share of the two workers' CPU time (50% = even).",
        "",
        "| setup | busier worker % | p50 ms | p99 ms | success % |",
        "|---|---|---|---|---|",
    ]
    for name in setups:
        s = summary[name]
        lines.append(f"| {name} | {fmt(s['busier_share'], 1, 100)} | {fmt(s['p50_ms'], 2)} | {fmt(s['p99_ms'], 2)} "
                     f"| {fmt(s['success'], 2, 100)} |")
    if "ratio" in summary:
        r = summary["ratio"]
        lines.append(f"| **ampere / bare** | | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | |")
    write_results(args.out, "balance", {"meta": meta, "summary": summary, "runs": runs}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

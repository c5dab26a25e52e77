#!/usr/bin/env python3
"""bench/compare: the talk's Kubernetes comparison on one machine.

Each setup gets the same CPU budget, enforced with a cgroup v1 CPU quota,
and serves the same app on the same Node.js:

- pods:    independent single-worker node processes, each in its own network
           namespace with its own address and its own share of the budget,
           behind a Service address that iptables DNAT spreads over them at
           random (kube-proxy's iptables mode).
- pm2:     PM2 cluster mode, 2 instances, in one "pod" (one cgroup).
- cluster: node:cluster with 2 workers, in one pod.
- watt:    wattpm with 2 workers, in one pod.
- ampere:  2 workers, in one pod.
- bare:    2 node processes listening with reusePort themselves, in one pod.

Load: oha (outside every quota) at constant arrival rates with latency
correction, keep-alive, up to 1,000 connections, 5 s timeout (the talk's
k6 check), for each rate in --rates (multiples of the capacity measured on
`bare`), interleaved over --rounds rounds. Per run: achieved rate, goodput,
p50/p95/p99/max of the 200s, success (200 within 5 s), errors, server CPU
per request, the CPU split between the two busiest processes, RSS, and time
from start to the first 200.

Output: bench/results/compare-<app>-<stamp>.{json,md} and .svg plots
(latency percentiles and goodput against arrival rate, per setup).

Usage (root): bench/compare.py [--app cpu|next] [--budget 1] [--rounds 3]
Every run is bounded in time and removes its processes, namespaces,
cgroups and iptables rules, also when interrupted.
"""

import argparse
import csv
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
import overload  # noqa: E402
import sandbox  # noqa: E402
from overhead import (HOST, ROOT, cpu_seconds, ensure_node, ensure_oha, free_port,  # noqa: E402
                      ensure_ampere, listen_drops, machine_meta, rss_bytes)
from report import write_results  # noqa: E402

# The load generator: its path, and a CPU pinning prefix in pin mode.
OHA = [None]
LOAD_PIN = []
from peers import Running, ensure_peers  # noqa: E402
from stats import cell, percentile as pct, spread  # noqa: E402

SERVICE_IP = "10.96.0.10"
SERVICE_PORT = 80
POD_PORT = 8080
SETUPS = ["pods", "pm2", "cluster", "watt", "ampere", "bare"]


class Deployment:
    """A setup's running pods: where to send load, how to find and stop
    its processes."""

    def __init__(self):
        self.pods, self.groups, self.targets, self.ready_s = [], [], [], 0.0
        self.supervisors = []

    def pids(self):
        return [p for g in self.groups for p in g.pids()]

    def stop(self):
        for running in self.pods:
            try:
                running.stop()
            except Exception as e:  # noqa: BLE001 - the group kill below still runs
                print(f"stopping {running.name}: {e}", file=sys.stderr)
        for g in self.groups:
            g.remove()
        sandbox.cleanup_service()


def layout(setup, args):
    """(pods, workers per pod, CPUs per pod) of `setup`."""
    if setup == "pods":
        return args.pods, 1, args.budget / args.pods
    return max(1, round(args.budget / args.pod_cpus)), 2, args.pod_cpus


def start_plain(name, prefix, node, host, port, app_name, workers, mode):
    """`bare` (reusePort processes), `cluster` (node:cluster primary) or
    `pod` (one plain process)."""
    script, args = overload.launch(app_name, host)
    app = overload.APPS[app_name]["dir"]
    env = {**os.environ, "PORT": str(port), "HOST": host, "BENCH_HOST": host, "NEXT_TELEMETRY_DISABLED": "1"}
    if mode == "cluster":
        env["CLUSTER_WORKERS"] = str(workers)
        env["CLUSTER_SCRIPT"] = str(script)
        cmds = [[str(node), str(ROOT / "bench" / "lib" / "cluster.js"), *args(port)]]
    elif mode == "bare":
        cmds = [[str(node), "--require", str(ROOT / "bench" / "lib" / "reuseport.js"), str(script), *args(port)]
                for _ in range(workers)]
    else:
        cmds = [[str(node), str(script), *args(port)]]
    procs = [subprocess.Popen(prefix + c, cwd=app, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in cmds]

    def stop():
        for p in procs:
            p.kill()
            p.wait()

    return Running(name, procs[0], "/dev/null", stop, lambda: [p.pid for p in procs])


def start(setup, work, node, ampere, app_name, args, cpus_free):
    """Starts `setup` in its layout, pod after pod, each waited for until it
    answers 200; a Deployment."""
    count, workers, cpus = layout(setup, args)
    d = Deployment()
    service = count > 1 and sandbox.MODE["service"] == "dnat"
    namespaces = sandbox.pods(count, SERVICE_IP, SERVICE_PORT, POD_PORT) if service else []
    if service:
        d.targets = [f"http://{SERVICE_IP}:{SERVICE_PORT}"]
    try:
        for k in range(count):
            cpuset = None
            if sandbox.MODE["cpu"] == "pin":
                take = int(cpus)
                cpuset = ",".join(str(c) for c in cpus_free[:take])
                del cpus_free[:take]
            group = sandbox.Group(f"{setup}-{k}", cpus, cpuset)
            d.groups.append(group)
            if service:
                prefix, host, port = group.prefix(namespaces[k][0]), "0.0.0.0", POD_PORT
                url = f"http://{namespaces[k][1]}:{POD_PORT}"
            elif count > 1:
                host, port = f"127.0.1.{k + 1}", POD_PORT
                prefix, url = group.prefix(), f"http://127.0.1.{k + 1}:{POD_PORT}"
                d.targets.append(url)
            else:
                prefix, host, port = group.prefix(), HOST, free_port()
                url = f"http://{HOST}:{port}"
                d.targets.append(url)
            t0 = time.monotonic()
            pod_work = work / f"pod-{k}"
            pod_work.mkdir()
            if setup in ("bare", "cluster", "pods"):
                running = start_plain(setup, prefix, node, host, port, app_name, workers,
                                      "pod" if setup == "pods" else setup)
            else:
                overload.PIN[:] = prefix
                try:
                    running = overload.start(setup, pod_work, node, port, ampere, app_name, host=host)
                finally:
                    overload.PIN[:] = []
                if setup.startswith("ampere"):
                    d.supervisors.append(running.proc.pid)
            d.pods.append(running)
            wait_ok(url)
            d.ready_s = max(d.ready_s, time.monotonic() - t0)
        return d
    except BaseException:
        d.stop()
        raise


def wait_ok(url, limit=60.0):
    import urllib.request
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"nothing answered 200 on {url} within {limit}s")


def drive(targets, duration, rate=None, connections=1000, keepalive=True, timeout_extra=90):
    """oha against every target at once, the rate and connections split
    evenly; the per-request CSV rows of all of them."""
    procs = []
    for url in targets:
        cmd = LOAD_PIN + [OHA[0], "-z", f"{duration}s", "-c", str(max(1, connections // len(targets))), "-t", "5s",
                          "--no-tui", "--output-format", "csv"]
        if rate is not None:
            cmd += ["-q", f"{rate / len(targets):g}", "--latency-correction"]
        if not keepalive:
            cmd.append("--disable-keepalive")
        procs.append(subprocess.Popen(cmd + [url + "/"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=duration + timeout_extra)
        rows += list(csv.DictReader(io.StringIO(out)))
    return rows


def analyse(rows, duration, rate):
    ok = sorted(float(r["request-duration"]) * 1000 for r in rows if r["status"].strip() == "200")
    others = sum(1 for r in rows if r["status"].strip() != "200")
    sent = max(len(rows), rate * duration)
    return {
        "sent": sent,
        "achieved_rps": len(rows) / duration,
        "goodput": len(ok) / duration,
        "success": len(ok) / sent if sent else 0.0,
        "p50_ms": pct(ok, 50), "p95_ms": pct(ok, 95), "p99_ms": pct(ok, 99), "max_ms": ok[-1] if ok else None,
        "non_200": others / sent if sent else 0.0,
        "no_response": (sent - len(rows)) / sent if sent else 0.0,
    }


def per_process_cpu(pids):
    return {p: cpu_seconds([p]) for p in pids}


def setup_cpus(args):
    """The CPUs a setup is pinned to (pin mode): the first `budget` of this
    machine's; oha runs on the rest (LOAD_PIN)."""
    return sorted(os.sched_getaffinity(0))[:int(args.budget)]


def one_run(setup, app_name, rate, args, node, ampere):
    with tempfile.TemporaryDirectory(prefix="ampere-compare-") as tmp:
        d = start(setup, Path(tmp), node, ampere, app_name, args, setup_cpus(args))
        try:
            time.sleep(1)  # settle: the idle footprint, not the start-up peak
            rss_idle = rss_bytes(d.pids()) / 2**20
            sup_idle = rss_bytes(d.supervisors) / 2**20 if d.supervisors else None
            drive(d.targets, args.warmup, rate=max(1, rate // 2))
            # Every process of the setup (PM2's daemon, node:cluster's primary,
            # ampere's supervisor included), from its groups.
            pids = d.pids()
            before = per_process_cpu(pids)
            drops = listen_drops()
            m = analyse(drive(d.targets, args.duration, rate=rate), args.duration, rate)
            m["syn_drops"] = listen_drops() - drops
            after = per_process_cpu(pids)
            used = sorted((after[p] - before.get(p, 0.0) for p in after), reverse=True)
            total = sum(used)
            ok = m["goodput"] * args.duration
            m.update(
                ready_s=d.ready_s,
                cpu_us_per_req=total / ok * 1e6 if ok else None,
                busiest_share=used[0] / (used[0] + used[1]) if len(used) > 1 and used[0] + used[1] > 0 else None,
                rss_mib=rss_bytes(d.pids()) / 2**20,
                rss_idle_mib=rss_idle,
                supervisor_rss_idle_mib=sup_idle,
            )
            return m
        finally:
            d.stop()


def closed_loop(setup, mode, args, node, ampere):
    """Maximum throughput: closed loop, 50 connections, keep-alive or a new
    connection per request (where a primary that hands over every
    connection pays)."""
    with tempfile.TemporaryDirectory(prefix="ampere-compare-") as tmp:
        d = start(setup, Path(tmp), node, ampere, args.app, args, setup_cpus(args))
        try:
            keepalive = mode == "keep-alive"
            drive(d.targets, 3, connections=50, keepalive=keepalive)  # warm-up
            pids = d.pids()
            before = sum(per_process_cpu(pids).values())
            rows = drive(d.targets, args.duration, connections=50, keepalive=keepalive)
            used = sum(per_process_cpu(pids).values()) - before
            ok = sorted(float(r["request-duration"]) * 1000 for r in rows if r["status"].strip() == "200")
            return {"rps": len(ok) / args.duration, "p50_ms": pct(ok, 50) or 0, "p99_ms": pct(ok, 99) or 0,
                    "cpu_us_per_req": used / len(ok) * 1e6 if ok else None}
        finally:
            d.stop()


def capacity(args, node, ampere):
    """Closed-loop keep-alive throughput of `bare` under the budget."""
    with tempfile.TemporaryDirectory(prefix="ampere-compare-") as tmp:
        d = start("bare", Path(tmp), node, ampere, args.app, args, setup_cpus(args))
        try:
            drive(d.targets, 3, connections=50)
            rows = drive(d.targets, 5, connections=50)
            return sum(1 for r in rows if r["status"].strip() == "200") / 5
        finally:
            d.stop()


def svg_plot(path, title, ylabel, series, log=False):
    """A small line chart: series = {name: [(x, y), ...]}."""
    w, h, left, bottom, top, right = 640, 400, 70, 50, 40, 130
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return
    xs = [p[0] for p in pts]
    ys = [max(p[1], 1e-3) if log else p[1] for p in pts]
    import math
    x0, x1 = min(xs), max(xs)
    y0, y1 = (math.log10(min(ys)), math.log10(max(ys))) if log else (0, max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    fx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    fy = lambda y: h - bottom - ((math.log10(max(y, 1e-3)) if log else y) - y0) / (y1 - y0) * (h - top - bottom)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
           f'<text x="{(w - right + left) / 2}" y="{h - 12}" text-anchor="middle">arrival rate (req/s)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">{ylabel}</text>']
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        label = f"{10 ** yv:.3g}" if log else f"{yv:.3g}"
        yy = h - bottom - k / 4 * (h - top - bottom)
        out.append(f'<text x="{left - 5}" y="{yy + 4}" text-anchor="end">{label}</text>')
        out.append(f'<line x1="{left}" y1="{yy}" x2="{w - right}" y2="{yy}" stroke="#eee"/>')
    for x in sorted(set(xs)):
        out.append(f'<text x="{fx(x)}" y="{h - bottom + 16}" text-anchor="middle">{x:g}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = colours[i % len(colours)]
        s = [p for p in s if p[1] is not None]
        if s:
            d = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"/>')
            out += [f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        out.append(f'<text x="{w - right + 10}" y="{top + 16 * i + 10}" fill="{c}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default="cpu", choices=sorted(overload.APPS))
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--rates", default="0.5,1,1.5,2", help="multiples of bare's capacity")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layout", choices=["small", "talk"], default="small",
                    help="small: --budget CPUs per setup, the multi-worker setups in one pod; talk: the talk's "
                         "6 CPUs per setup (6 single-CPU pods, 3 pods of 2 CPUs with 2 workers each), needs 8+ CPUs")
    ap.add_argument("--budget", type=float, default=1.0, help="CPUs per setup")
    ap.add_argument("--pods", type=int, default=2, help="single-worker pods of the pods setup")
    ap.add_argument("--pod-cpus", type=float, default=None,
                    help="CPUs of each 2-worker pod of the other setups (default: the whole budget, one pod)")
    ap.add_argument("--cpu-limit", choices=["auto", "v1", "v2", "pin"], default="auto",
                    help="how budgets are enforced: cgroup v1 or v2 quotas, or pinned CPUs")
    ap.add_argument("--service", choices=["auto", "dnat", "split"], default="auto",
                    help="how load reaches several pods: iptables DNAT over network namespaces, or oha split")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds after which no new run starts; the report covers what ran")
    ap.add_argument("--closed", default="keep-alive,new-connection",
                    help="closed-loop maximum-throughput modes to run ('' for none)")
    ap.add_argument("--ampere", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.layout == "talk":
        args.budget, args.pods, args.pod_cpus = 6.0, 6, 2.0
    if args.pod_cpus is None:
        args.pod_cpus = args.budget
    began = time.monotonic()

    sandbox.need_root()
    sandbox.cleanup_stale()

    def interrupted(signum, _frame):
        sandbox.cleanup()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)

    mode = sandbox.detect(args.cpu_limit, args.service)
    if mode["cpu"] == "pin":
        cpus = sorted(os.sched_getaffinity(0))
        whole = lambda v: float(v).is_integer()
        if not (whole(args.budget) and whole(args.pod_cpus) and whole(args.budget / args.pods)):
            raise SystemExit("pinned CPU budgets need whole CPUs per pod: set --budget, --pods and --pod-cpus, "
                             "or use cgroup quotas (--cpu-limit v1|v2)")
        if len(cpus) < args.budget:
            raise SystemExit(f"--budget {args.budget:g} needs {args.budget:g} CPUs; this machine has {len(cpus)}")
        rest = cpus[int(args.budget):]
        if rest:
            LOAD_PIN[:] = ["taskset", "-c", ",".join(map(str, rest))]
    print(f"CPU budgets: {mode['cpu']}; Service: {mode['service']}", file=sys.stderr)

    node = ensure_node()
    OHA[0] = ensure_oha()
    setups = [s for s in args.setups.split(",") if s]
    peers = (["pm2"] if "pm2" in setups else []) + (["wattpm", "@platformatic/node"] if "watt" in setups else [])
    if "watt" in setups and args.app == "next":
        peers += ["@platformatic/next", "@platformatic/job-queue"]
    if peers:
        ensure_peers(peers)
    if args.app == "next":
        overload.prepare_next(node)
    ampere = ensure_ampere(args.ampere)

    runs, closed, skipped = [], [], 0
    modes = [m for m in args.closed.split(",") if m]
    out_of_time = lambda: args.time_limit is not None and time.monotonic() - began > args.time_limit
    try:
        cap = capacity(args, node, ampere)
        rates = [max(1, round(cap * float(f))) for f in args.rates.split(",")]
        print(f"{args.app}: bare capacity {cap:.0f} req/s with {args.budget:g} CPU; rates {rates}", file=sys.stderr)
        for rnd in range(args.rounds):
            for rate in rates:
                for setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    if out_of_time():
                        skipped += 1
                        continue
                    m = one_run(setup, args.app, rate, args, node, ampere)
                    m.update(setup=setup, rate=rate, round=rnd, loadavg=os.getloadavg()[0])
                    runs.append(m)
                    f = lambda v: "-" if v is None else f"{v:.1f}"
                    print(f"round {rnd} {rate:6}/s {setup:8} goodput {m['goodput']:7.0f}/s success "
                          f"{m['success']:.1%} p50 {f(m['p50_ms'])} p95 {f(m['p95_ms'])} p99 {f(m['p99_ms'])} ms "
                          f"ready {m['ready_s']:.3f}s rss idle {m['rss_idle_mib']:.0f} MiB, loaded "
                          f"{m['rss_mib']:.0f} MiB, SYN drops {m['syn_drops']}", file=sys.stderr)
            for cmode in modes:
                for setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    if out_of_time():
                        skipped += 1
                        continue
                    c = closed_loop(setup, cmode, args, node, ampere)
                    c.update(setup=setup, mode=cmode, round=rnd)
                    closed.append(c)
                    print(f"round {rnd} closed {cmode:14} {setup:8} {c['rps']:7.0f} req/s p50 {c['p50_ms']:.1f} ms "
                          f"p99 {c['p99_ms']:.1f} ms", file=sys.stderr)
    finally:
        sandbox.cleanup()
    if skipped:
        print(f"--time-limit: {skipped} runs skipped", file=sys.stderr)

    keys = ["goodput", "success", "p50_ms", "p95_ms", "p99_ms", "max_ms", "cpu_us_per_req", "busiest_share",
            "rss_mib", "rss_idle_mib", "supervisor_rss_idle_mib", "ready_s"]

    summary = {f"{setup}/{rate}": {k: spread([r[k] for r in runs if (r["setup"], r["rate"]) == (setup, rate)])
                                   for k in keys} for setup in setups for rate in rates}
    summary["footprint"] = {setup: {k: spread([r[k] for r in runs if r["setup"] == setup])
                                    for k in ("rss_idle_mib", "supervisor_rss_idle_mib", "ready_s")}
                            for setup in setups}
    for cmode in modes:
        for setup in setups:
            rs = [c for c in closed if (c["mode"], c["setup"]) == (cmode, setup)]
            summary[f"closed/{cmode}/{setup}"] = {k: spread([c[k] for c in rs])
                                                  for k in ["rps", "p50_ms", "p99_ms", "cpu_us_per_req"]}
    meta = machine_meta(node, OHA[0])
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    meta.update(app=args.app, cpu_model=model, layout=args.layout, budget_cpus=args.budget, pods=args.pods,
                pod_cpus=args.pod_cpus, cpu_limit=mode["cpu"], service=mode["service"], rounds=args.rounds,
                duration_s=args.duration, capacity_rps=cap, rates=rates, runs_skipped=skipped)
    med = cell
    n_multi = max(1, round(args.budget / args.pod_cpus))
    limit = {"v1": "cgroup v1 CPU quota", "v2": "cgroup v2 cpu.max quota", "pin": "pinned CPUs (taskset)"}[mode["cpu"]]
    service = {"dnat": "an iptables DNAT Service over network namespaces",
               "split": "oha split evenly over the pods' loopback addresses (no iptables here)"}[mode["service"]]
    multi = ("2 workers in one pod" if n_multi == 1 else
             f"{n_multi} pods of {args.pod_cpus:g} CPU with 2 workers each, behind {service}")
    lines = [
        f"# bench/compare: {args.app} app, {args.budget:g} CPU per setup ({args.layout} layout)",
        "",
        f"{meta['time']} on {meta['machine']} ({model}); node {meta['node']}; {meta['oha']}; load average "
        f"before {meta['loadavg_before'][0]:.2f}. Budget {args.budget:g} CPU per setup ({limit}); pods = "
        f"{args.pods} single-worker pods of {args.budget / args.pods:g} CPU behind {service}; "
        f"the other setups {multi}. Open loop (oha -q RATE --latency-correction, keep-alive, up to "
        f"1,000 connections, 5 s timeout), {args.duration} s per run, {args.rounds} interleaved rounds"
        + (f" ({skipped} runs skipped at --time-limit)" if skipped else "")
        + f"; bare's closed-loop capacity {cap:.0f} req/s. Medians (min..max).",
        "",
        "| rate/s | setup | goodput/s | success % | p50 ms | p95 ms | p99 ms | CPU µs/req | busiest worker % | RSS MiB | ready s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        for setup in setups:
            s = summary[f"{setup}/{rate}"]
            lines.append(f"| {rate} | {setup} | {med(s['goodput'], 0)} | {med(s['success'], 1, 100)} | "
                         f"{med(s['p50_ms'], 1)} | {med(s['p95_ms'], 1)} | {med(s['p99_ms'], 1)} | "
                         f"{med(s['cpu_us_per_req'], 0)} | {med(s['busiest_share'], 1, 100)} | "
                         f"{med(s['rss_mib'], 0)} | {med(s['ready_s'], 2)} |")
    if "ampere" in setups:
        lines += ["", "Ratios, ampere / setup (medians; latency and below 1 is better for ampere, goodput and "
                  "success above 1):", "",
                  "| rate/s | vs | p50 | p95 | goodput | success |", "|---|---|---|---|---|---|"]
        for rate in rates:
            a = summary[f"ampere/{rate}"]
            for setup in setups:
                if setup == "ampere":
                    continue
                b = summary[f"{setup}/{rate}"]
                ratio = lambda k: "-" if not a[k] or not b[k] or not b[k]["median"] else f"{a[k]['median'] / b[k]['median']:.3f}"
                lines.append(f"| {rate} | {setup} | {ratio('p50_ms')} | {ratio('p95_ms')} | {ratio('goodput')} | "
                             f"{ratio('success')} |")
    lines += ["", "Footprint, over every open-loop run (medians, min..max): RSS of all the setup's processes 1 s "
              "after every pod answered 200, the supervisors' share of it, and the time from starting a pod's "
              "processes to its first 200 (the slowest pod):", "",
              "| setup | idle RSS MiB | over bare MiB | supervisor RSS MiB | start to first 200 s | over bare ms |",
              "|---|---|---|---|---|---|"]
    fb = summary["footprint"].get("bare")
    for setup in setups:
        fp = summary["footprint"][setup]
        over = (f"{fp['rss_idle_mib']['median'] - fb['rss_idle_mib']['median']:+.0f}"
                if fb and fb["rss_idle_mib"] and fp["rss_idle_mib"] else "-")
        late = (f"{(fp['ready_s']['median'] - fb['ready_s']['median']) * 1000:+.0f}"
                if fb and fb["ready_s"] and fp["ready_s"] else "-")
        lines.append(f"| {setup} | {med(fp['rss_idle_mib'], 0)} | {over} | {med(fp['supervisor_rss_idle_mib'], 1)} | "
                     f"{med(fp['ready_s'], 3)} | {late} |")
    if modes:
        lines += ["", "Closed loop, maximum throughput (50 connections; medians, min..max):", "",
                  "| mode | setup | req/s | p50 ms | p99 ms | CPU µs/req | ampere / setup req/s |",
                  "|---|---|---|---|---|---|---|"]
        for cmode in modes:
            a = summary.get(f"closed/{cmode}/ampere", {}).get("rps")
            for setup in setups:
                c = summary[f"closed/{cmode}/{setup}"]
                ratio = f"{a['median'] / c['rps']['median']:.3f}" if a and c["rps"] and c["rps"]["median"] else "-"
                lines.append(f"| {cmode} | {setup} | {med(c['rps'], 0)} | {med(c['p50_ms'], 2)} | "
                             f"{med(c['p99_ms'], 2)} | {med(c['cpu_us_per_req'], 0)} | {ratio} |")
    name = f"compare-{args.app}" + (f"-{args.layout}" if args.layout != "small" else "")
    base = write_results(args.out, name, {"meta": meta, "summary": summary, "runs": runs, "closed": closed},
                         "\n".join(lines) + "\n")
    for key, label, log in [("p50_ms", "p50 latency of 200s (ms, log)", True),
                            ("p99_ms", "p99 latency of 200s (ms, log)", True),
                            ("goodput", "goodput (200s/s)", False)]:
        series = {s: [(r, (summary[f"{s}/{r}"][key] or {}).get("median")) for r in rates] for s in setups}
        svg_plot(Path(f"{base}-{key.replace('_ms', '')}.svg"), f"{args.app}: {label}", label, series, log=log)
    print(f"wrote {base}-*.svg", file=sys.stderr)


if __name__ == "__main__":
    main()

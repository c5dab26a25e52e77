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
import json
import os
import signal
import statistics
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
                      machine_meta, rss_bytes, sh)
from faults import Running, ensure_peers  # noqa: E402

SERVICE_IP = "10.96.0.10"
SERVICE_PORT = 80
POD_PORT = 8080
SETUPS = ["pods", "pm2", "cluster", "watt", "ampere", "bare"]


def cgroup_pids(path):
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def start_plain(name, cg, node, port, app_name, workers, cluster):
    """`bare` (reusePort processes) or `cluster` (node:cluster primary)."""
    script, args = overload.launch(app_name)
    app = overload.APPS[app_name]["dir"]
    env = {**os.environ, "PORT": str(port), "HOST": HOST, "BENCH_HOST": HOST, "NEXT_TELEMETRY_DISABLED": "1"}
    if cluster:
        env["CLUSTER_WORKERS"] = str(workers)
        env["CLUSTER_SCRIPT"] = str(script)
        cmds = [[str(node), str(ROOT / "bench" / "lib" / "cluster.js"), *args(port)]]
    else:
        cmds = [[str(node), "--require", str(ROOT / "bench" / "lib" / "reuseport.js"), str(script), *args(port)]
                for _ in range(workers)]
    procs = [subprocess.Popen(sandbox.run_in(cg) + c, cwd=app, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in cmds]

    def stop():
        sandbox.kill_cgroup(cg)
        for p in procs:
            p.wait()

    return Running(name, procs[0], "/dev/null", stop, lambda: cgroup_pids(cg))


def start_pods(node, app_name, budget, count):
    """`count` single-worker pods, budget / count CPUs each, behind the
    Service address."""
    script, args = overload.launch(app_name)
    app = overload.APPS[app_name]["dir"]
    groups = [sandbox.cgroup(f"pods-{k}", budget / count) for k in range(count)]
    sandbox.pods(count, SERVICE_IP, SERVICE_PORT, POD_PORT)
    env = {**os.environ, "PORT": str(POD_PORT), "HOST": "0.0.0.0", "NEXT_TELEMETRY_DISABLED": "1"}
    for k, cg in enumerate(groups):
        # next start takes -H; node:http apps read HOST.
        pod_args = [a if a != HOST else "0.0.0.0" for a in args(POD_PORT)]
        subprocess.Popen(sandbox.run_in(cg, f"{sandbox.PREFIX}{k}") + [str(node), str(script), *pod_args],
                         cwd=app, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop():
        for cg in groups:
            sandbox.kill_cgroup(cg)
        sandbox.cleanup()

    return Running("pods", None, "/dev/null", stop, lambda: [p for cg in groups for p in cgroup_pids(cg)]), groups


def start(setup, work, node, ampere, app_name, budget, pods_count):
    """Starts `setup`; (running, url, cgroups)."""
    if setup == "pods":
        running, groups = start_pods(node, app_name, budget, pods_count)
        return running, f"http://{SERVICE_IP}:{SERVICE_PORT}", groups
    cg = sandbox.cgroup(setup, budget)
    port = free_port()
    if setup in ("bare", "cluster"):
        running = start_plain(setup, cg, node, port, app_name, 2, cluster=setup == "cluster")
    else:
        overload.PIN[:] = sandbox.run_in(cg)
        try:
            running = overload.start(setup, work, node, port, ampere, app_name)
        finally:
            overload.PIN[:] = []
    return running, f"http://{HOST}:{port}", [cg]


def wait_ok(url, limit=60.0):
    import urllib.request
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing answered 200 on {url} within {limit}s")


def oha(oha_bin, url, duration, rate=None, connections=1000, csv_out=True):
    cmd = [oha_bin, "-z", f"{duration}s", "-c", str(connections), "-t", "5s", "--no-tui",
           "--output-format", "csv" if csv_out else "json", url + "/"]
    if rate is not None:
        cmd[1:1] = ["-q", str(rate), "--latency-correction"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 90)
    return out.stdout


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def analyse(text, duration, rate):
    rows = list(csv.DictReader(io.StringIO(text)))
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


def one_run(setup, app_name, rate, args, node, oha_bin, ampere):
    with tempfile.TemporaryDirectory(prefix="ampere-compare-") as tmp:
        t0 = time.monotonic()
        running, url, groups = start(setup, Path(tmp), node, ampere, app_name, args.budget, args.pods)
        try:
            wait_ok(url)
            ready_s = time.monotonic() - t0
            oha(oha_bin, url, args.warmup, rate=max(1, rate // 2))
            # Every process of the setup (PM2's daemon, node:cluster's primary,
            # ampere's supervisor included), from its cgroups.
            pids = [p for cg in groups for p in cgroup_pids(cg)]
            before = per_process_cpu(pids)
            m = analyse(oha(oha_bin, url, args.duration, rate=rate), args.duration, rate)
            after = per_process_cpu(pids)
            used = sorted((after[p] - before.get(p, 0.0) for p in after), reverse=True)
            total = sum(used)
            ok = m["goodput"] * args.duration
            m.update(
                ready_s=ready_s,
                cpu_us_per_req=total / ok * 1e6 if ok else None,
                busiest_share=used[0] / (used[0] + used[1]) if len(used) > 1 and used[0] + used[1] > 0 else None,
                rss_mib=rss_bytes([p for cg in groups for p in cgroup_pids(cg)]) / 2**20,
            )
            return m
        finally:
            running.stop()
            for cg in groups:
                sandbox.kill_cgroup(cg)


def closed_loop(setup, mode, args, node, oha_bin, ampere):
    """Maximum throughput: closed loop, 50 connections, keep-alive or a new
    connection per request (where a primary that hands over every
    connection pays)."""
    with tempfile.TemporaryDirectory(prefix="ampere-compare-") as tmp:
        running, url, groups = start(setup, Path(tmp), node, ampere, args.app, args.budget, args.pods)
        try:
            wait_ok(url)
            cmd = [oha_bin, "-z", f"{args.duration}s", "-c", "50", "-t", "5s", "--no-tui", "--output-format",
                   "json", url + "/"]
            if mode == "new-connection":
                cmd.insert(1, "--disable-keepalive")
            subprocess.run(cmd[:2] + ["3s"] + cmd[3:], capture_output=True, timeout=120)  # warm-up
            pids = [p for cg in groups for p in cgroup_pids(cg)]
            before = sum(per_process_cpu(pids).values())
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 90).stdout)
            used = sum(per_process_cpu(pids).values()) - before
            ok = out["statusCodeDistribution"].get("200", 0)
            lat = out["latencyPercentiles"]
            return {"rps": ok / out["summary"]["total"], "p50_ms": (lat.get("p50") or 0) * 1000,
                    "p99_ms": (lat.get("p99") or 0) * 1000, "cpu_us_per_req": used / ok * 1e6 if ok else None}
        finally:
            running.stop()
            for cg in groups:
                sandbox.kill_cgroup(cg)


def capacity(args, node, oha_bin, ampere):
    """Closed-loop keep-alive throughput of `bare` under the budget."""
    with tempfile.TemporaryDirectory(prefix="ampere-compare-") as tmp:
        running, url, groups = start("bare", Path(tmp), node, ampere, args.app, args.budget, args.pods)
        try:
            wait_ok(url)
            oha(oha_bin, url, 3, connections=50, csv_out=False)
            out = json.loads(oha(oha_bin, url, 5, connections=50, csv_out=False))
            return out["statusCodeDistribution"].get("200", 0) / out["summary"]["total"]
        finally:
            running.stop()
            for cg in groups:
                sandbox.kill_cgroup(cg)


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
    ap.add_argument("--budget", type=float, default=1.0, help="CPUs per setup")
    ap.add_argument("--pods", type=int, default=2, help="single-worker pods of the pods setup")
    ap.add_argument("--closed", default="keep-alive,new-connection",
                    help="closed-loop maximum-throughput modes to run ('' for none)")
    ap.add_argument("--ampere", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    sandbox.need_root()
    sandbox.cleanup_stale()

    def interrupted(signum, _frame):
        sandbox.cleanup()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)

    node = ensure_node()
    oha_bin = ensure_oha()
    setups = [s for s in args.setups.split(",") if s]
    if {"pm2", "watt"} & set(setups):
        ensure_peers()
    if args.app == "next":
        overload.prepare_next(node)
    ampere = args.ampere
    if ampere is None:
        sh(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
        ampere = ROOT / "target" / "release" / "ampere"

    runs, closed = [], []
    modes = [m for m in args.closed.split(",") if m]
    try:
        cap = capacity(args, node, oha_bin, ampere)
        rates = [max(1, round(cap * float(f))) for f in args.rates.split(",")]
        print(f"{args.app}: bare capacity {cap:.0f} req/s with {args.budget:g} CPU; rates {rates}", file=sys.stderr)
        for rnd in range(args.rounds):
            for rate in rates:
                for setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    m = one_run(setup, args.app, rate, args, node, oha_bin, ampere)
                    m.update(setup=setup, rate=rate, round=rnd, loadavg=os.getloadavg()[0])
                    runs.append(m)
                    f = lambda v: "-" if v is None else f"{v:.1f}"
                    print(f"round {rnd} {rate:6}/s {setup:8} goodput {m['goodput']:7.0f}/s success "
                          f"{m['success']:.1%} p50 {f(m['p50_ms'])} p95 {f(m['p95_ms'])} p99 {f(m['p99_ms'])} ms "
                          f"ready {m['ready_s']:.2f}s rss {m['rss_mib']:.0f} MiB", file=sys.stderr)
            for mode in modes:
                for setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    c = closed_loop(setup, mode, args, node, oha_bin, ampere)
                    c.update(setup=setup, mode=mode, round=rnd)
                    closed.append(c)
                    print(f"round {rnd} closed {mode:14} {setup:8} {c['rps']:7.0f} req/s p50 {c['p50_ms']:.1f} ms "
                          f"p99 {c['p99_ms']:.1f} ms", file=sys.stderr)
    finally:
        sandbox.cleanup()

    keys = ["goodput", "success", "p50_ms", "p95_ms", "p99_ms", "max_ms", "cpu_us_per_req", "busiest_share",
            "rss_mib", "ready_s"]

    def spread(vals):
        vals = [v for v in vals if v is not None]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else None

    summary = {f"{setup}/{rate}": {k: spread([r[k] for r in runs if (r["setup"], r["rate"]) == (setup, rate)])
                                   for k in keys} for setup in setups for rate in rates}
    for mode in modes:
        for setup in setups:
            rs = [c for c in closed if (c["mode"], c["setup"]) == (mode, setup)]
            summary[f"closed/{mode}/{setup}"] = {k: spread([c[k] for c in rs])
                                                 for k in ["rps", "p50_ms", "p99_ms", "cpu_us_per_req"]}
    meta = machine_meta(node, oha_bin)
    meta.update(app=args.app, budget_cpus=args.budget, pods=args.pods, rounds=args.rounds,
                duration_s=args.duration, capacity_rps=cap, rates=rates)
    med = lambda s, d, m=1: "-" if s is None else f"{s['median'] * m:.{d}f} ({s['min'] * m:.{d}f}..{s['max'] * m:.{d}f})"
    lines = [
        f"# bench/compare: {args.app} app, {args.budget:g} CPU per setup",
        "",
        f"{meta['time']} on {meta['machine']}; node {meta['node']}; {meta['oha']}; load average before "
        f"{meta['loadavg_before'][0]:.2f}. Budget {args.budget:g} CPU per setup (cgroup v1 quota); pods = "
        f"{args.pods} single-worker pods of {args.budget / args.pods:g} CPU behind an iptables DNAT Service; "
        f"other setups 2 workers in one cgroup. Open loop (oha -q RATE --latency-correction, keep-alive, up to "
        f"1,000 connections, 5 s timeout), {args.duration} s per run, {args.rounds} interleaved rounds; bare's "
        f"closed-loop capacity {cap:.0f} req/s. Medians (min..max).",
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
    if modes:
        lines += ["", "Closed loop, maximum throughput (50 connections; medians, min..max):", "",
                  "| mode | setup | req/s | p50 ms | p99 ms | CPU µs/req | ampere / setup req/s |",
                  "|---|---|---|---|---|---|---|"]
        for mode in modes:
            a = summary.get(f"closed/{mode}/ampere", {}).get("rps")
            for setup in setups:
                c = summary[f"closed/{mode}/{setup}"]
                ratio = f"{a['median'] / c['rps']['median']:.3f}" if a and c["rps"] and c["rps"]["median"] else "-"
                lines.append(f"| {mode} | {setup} | {med(c['rps'], 0)} | {med(c['p50_ms'], 2)} | "
                             f"{med(c['p99_ms'], 2)} | {med(c['cpu_us_per_req'], 0)} | {ratio} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = args.out / f"compare-{args.app}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs,
                                                     "closed": closed}, indent=2))
    base.with_suffix(".md").write_text(table)
    for key, label, log in [("p50_ms", "p50 latency of 200s (ms, log)", True),
                            ("p99_ms", "p99 latency of 200s (ms, log)", True),
                            ("goodput", "goodput (200s/s)", False)]:
        series = {s: [(r, (summary[f"{s}/{r}"][key] or {}).get("median")) for r in rates] for s in setups}
        svg_plot(Path(f"{base}-{key.replace('_ms', '')}.svg"), f"{args.app}: {label}", label, series, log=log)
    print(f"wrote {base}.{{json,md}} and {base}-*.svg", file=sys.stderr)


if __name__ == "__main__":
    main()

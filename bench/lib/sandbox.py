"""bench sandboxes: CPU budgets and Kubernetes-like pods.

CPU budgets (`Group`), one of, picked by `detect()` or forced:
- v1:  a cgroup v1 CPU quota (/sys/fs/cgroup/cpu), as Kubernetes' CPU
       limits are enforced on cgroup v1 nodes;
- v2:  a cgroup v2 `cpu.max` quota (/sys/fs/cgroup with the cpu controller);
- pin: dedicated CPUs (taskset), as Kubernetes' static CPU manager gives
       a pod with whole CPUs; needs whole CPUs and a machine large enough.

Services, one of:
- dnat:  each pod in its own network namespace with its own address, and a
         Service address that iptables DNAT spreads over them at random
         (kube-proxy's iptables mode, the statistic match); needs `ip` and
         `iptables` with the nat table;
- split: each pod on its own loopback address, with the load generator
         split evenly over them (no namespaces or iptables needed).

Everything created here is recorded and removed by `cleanup()`, which the
benchmark calls in `finally` and on SIGINT/SIGTERM; `cleanup_stale()`
removes what an interrupted earlier run left behind (names carry the `ampb`
prefix). Needs root.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
ROOT_GROUP = "ampere-bench"
PERIOD_US = 100_000
PREFIX = "ampb"
CHAIN = "AMPB-SVC"
# Marks every process started in a group, for finding them without a cgroup.
MARKER = "AMPERE_BENCH_GROUP"
# Pods get 10.201.<k>.2, the host side of their link 10.201.<k>.1.
POD_NET = "10.201"

MODE = {"cpu": None, "service": None}
_created = {"groups": [], "netns": [], "links": [], "iptables": False}


def need_root():
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (cgroups, network namespaces, iptables)")


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _v1_works():
    try:
        if not (CGROUP_V1 / "cpu.cfs_quota_us").exists():
            return False
        (CGROUP_V1 / ROOT_GROUP).mkdir(exist_ok=True)
        return True
    except OSError:
        return False


def _v2_works():
    try:
        if "cpu" not in (CGROUP_V2 / "cgroup.controllers").read_text().split():
            return False
        if "cpu" not in (CGROUP_V2 / "cgroup.subtree_control").read_text().split():
            (CGROUP_V2 / "cgroup.subtree_control").write_text("+cpu")
        root = CGROUP_V2 / ROOT_GROUP
        root.mkdir(exist_ok=True)
        (root / "cgroup.subtree_control").write_text("+cpu")
        probe = root / "probe"
        probe.mkdir(exist_ok=True)
        (probe / "cpu.max").write_text(f"{PERIOD_US} {PERIOD_US}")
        probe.rmdir()
        return True
    except OSError:
        return False


def _dnat_works():
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        return False
    ns, chain = f"{PREFIX}probe", "AMPB-PROBE"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{PREFIX}vprobe", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("iptables", "-t", "nat", "-N", chain)
        sh("iptables", "-t", "nat", "-A", chain, "-p", "tcp", "-m", "statistic", "--mode", "random",
           "--probability", "0.5", "-j", "DNAT", "--to-destination", "10.201.0.2:8080")
        return True
    except (subprocess.CalledProcessError, OSError):
        return False
    finally:
        sh("iptables", "-t", "nat", "-F", chain, check=False)
        sh("iptables", "-t", "nat", "-X", chain, check=False)
        sh("ip", "link", "del", f"{PREFIX}vprobe", check=False)
        sh("ip", "netns", "del", ns, check=False)


def detect(cpu="auto", service="auto"):
    """Picks how CPU budgets and Services are made on this machine; returns
    MODE. Forced modes are taken as given."""
    if cpu == "auto":
        cpu = "v1" if _v1_works() else "v2" if _v2_works() else "pin"
    elif cpu == "v2":
        _v2_works()
    if service == "auto":
        service = "dnat" if _dnat_works() else "split"
    MODE.update(cpu=cpu, service=service)
    return MODE


class Group:
    """A CPU budget that processes are started in: a cgroup quota of `cpus`
    (v1, v2), or the CPUs in `cpuset` (pin). Every process started through
    `prefix()` carries the group's name in its environment."""

    def __init__(self, name, cpus, cpuset=None):
        self.name, self.cpus, self.cpuset, self.path = f"{PREFIX}-{name}", cpus, cpuset, None
        if MODE["cpu"] == "v1":
            self.path = CGROUP_V1 / ROOT_GROUP / name
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))
        elif MODE["cpu"] == "v2":
            self.path = CGROUP_V2 / ROOT_GROUP / name
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "cpu.max").write_text(f"{int(cpus * PERIOD_US)} {PERIOD_US}")
        elif cpuset is None:
            raise SystemExit("pinned CPU budgets need a cpuset")
        _created["groups"].append(self)

    def prefix(self, netns=None):
        """A command prefix that starts a program in this group (and in
        network namespace `netns`); children inherit both."""
        # Into the cgroup first: `ip netns exec` remounts /sys, which hides
        # the cgroup hierarchy from inside.
        enter = ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$0" "$@"'] if self.path else []
        enter += ["ip", "netns", "exec", netns] if netns else []
        enter += ["env", f"{MARKER}={self.name}"]
        return enter + (["taskset", "-c", self.cpuset] if self.cpuset else [])

    def pids(self):
        if self.path:
            try:
                return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return []
        needle = f"{MARKER}={self.name}".encode()
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if needle in (p / "environ").read_bytes().split(b"\0"):
                        out.append(int(p.name))
                except OSError:
                    pass
        return out

    def kill(self):
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def remove(self):
        self.kill()
        if self.path:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        if self in _created["groups"]:
            _created["groups"].remove(self)


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
        # The pod's own resolver (`ip netns exec` binds /etc/netns/<ns>/*
        # over /etc): one that refuses at once, since nothing outside the
        # machine is reachable from a pod (PM2's CLI otherwise waits 10 s
        # for DNS timeouts).
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
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


def cleanup_service():
    """Removes the Service and the pods' namespaces; safe to call twice."""
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
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    for link in _created["links"]:
        sh("ip", "link", "del", link, check=False)
    _created["netns"].clear()
    _created["links"].clear()


def cleanup():
    """Removes everything this run created; safe to call twice."""
    if shutil.which("ip") and shutil.which("iptables"):
        cleanup_service()
    for group in list(_created["groups"]):
        group.remove()
    for base in (CGROUP_V1, CGROUP_V2):
        try:
            (base / ROOT_GROUP).rmdir()
        except OSError:
            pass


def cleanup_stale():
    """What an interrupted run left: namespaces, links, the chain, cgroups,
    marked processes."""
    if shutil.which("ip") and shutil.which("iptables"):
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
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if f"{MARKER}={PREFIX}-".encode() in (p / "environ").read_bytes():
                    os.kill(int(p.name), 9)
            except OSError:
                pass
    for base in (CGROUP_V1, CGROUP_V2):
        root = base / ROOT_GROUP
        if root.exists():
            for child in root.iterdir():
                if child.is_dir():
                    stale = Group.__new__(Group)
                    stale.name, stale.cpus, stale.cpuset, stale.path = child.name, 0, None, child
                    _created["groups"].append(stale)
    cleanup()

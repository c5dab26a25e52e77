'use strict';
// ampere agent: preloaded into every worker process (`node --require`).
//
// - Makes the app's own listen() on the service port adopt the listening
//   socket that the supervisor passed down (AMPERE_LISTEN_FD), so unmodified
//   node:http, Express, Fastify and Next.js apps accept directly from the
//   slot's socket. Other listen() calls are left alone.
// - Talks to the supervisor over an inherited socketpair (AMPERE_CONTROL_FD),
//   newline-delimited JSON: reports `listening` and a periodic `heartbeat`,
//   drains on request, and closes keep-alive connections on a `shed` order
//   so that their clients reconnect to a less busy worker.
// - Admission control: answers 503 before the app's handler while the
//   worker is overloaded.
// - Dependency-free, and does nothing at all when not started by ampere.

const LISTEN_FD = Number(process.env.AMPERE_LISTEN_FD);
const CONTROL_FD = Number(process.env.AMPERE_CONTROL_FD);
const PORT = Number(process.env.AMPERE_PORT);
const HEARTBEAT_MS = Number(process.env.AMPERE_HEARTBEAT_MS) || 1000;
const IDLE_GRACE_MS = 1000;
// Request durations: off with AMPERE_REQUEST_METRICS=0 ([metrics] requests).
const TIME_REQUESTS = process.env.AMPERE_REQUEST_METRICS !== '0';
// prom-client's default buckets, in seconds; the last count is +Inf.
const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'OTHER'];
const METHOD_INDEX = { GET: 0, HEAD: 1, POST: 2, PUT: 3, DELETE: 4, PATCH: 5, OPTIONS: 6 };
// Admission control ([overload]); 0 turns a bound off.
const MAX_INFLIGHT = Number(process.env.AMPERE_MAX_INFLIGHT) || 0;
const MAX_DELAY_MS = Number(process.env.AMPERE_MAX_DELAY_MS) || 0;
const RETRY_AFTER = process.env.AMPERE_RETRY_AFTER || '1';
const LAG_TICK_MS = 10;

// The descriptors belong to this process only: children that the app spawns
// (and that may preload this file through NODE_OPTIONS) must not adopt them.
delete process.env.AMPERE_LISTEN_FD;
delete process.env.AMPERE_CONTROL_FD;

if (Number.isInteger(LISTEN_FD) && Number.isInteger(CONTROL_FD)) {
  start();
}

function start() {
  const net = require('node:net');
  const { performance, monitorEventLoopDelay } = require('node:perf_hooks');
  const v8 = require('node:v8');

  const control = new net.Socket({ fd: CONTROL_FD, readable: true, writable: true });
  // The channel must never keep an app alive that has finished its work.
  control.unref();
  control.setEncoding('utf8');
  const send = (msg) => {
    if (!control.destroyed) control.write(JSON.stringify(msg) + '\n');
  };
  let pending = '';
  control.on('data', (chunk) => {
    pending += chunk;
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      onMessage(msg);
    }
  });
  control.on('error', () => {});
  // The supervisor holds the other end until it exits: end of file means it
  // is gone, and a worker without its supervisor must not linger.
  control.on('end', () => process.exit(1));

  let server = null; // the adopted server
  let draining = false;
  let inflight = 0;
  let requests = 0;
  // Keep-alive connections still to close on the last `shed` order, and
  // those closed since the last heartbeat.
  let shedLeft = 0;
  let shed = 0;
  // Durations since the last heartbeat, keyed by method index * 1000 +
  // status: [sum, count per bucket..., count over the last bucket].
  let histogram = new Map();
  const kStart = Symbol('ampere.start');
  // Shared by every response ('close' calls it with the response as this),
  // so counting allocates nothing per request.
  function onResponseClose() {
    inflight--;
    if (!TIME_REQUESTS) return;
    const seconds = (performance.now() - this[kStart]) / 1000;
    const key = (METHOD_INDEX[this.req?.method] ?? 7) * 1000 + this.statusCode;
    let h = histogram.get(key);
    if (h === undefined) {
      h = new Array(BUCKETS.length + 2).fill(0);
      histogram.set(key, h);
    }
    h[0] += seconds;
    let i = 0;
    while (i < BUCKETS.length && seconds > BUCKETS[i]) i++;
    h[i + 1]++;
  }
  function takeHistogram() {
    const out = [];
    for (const [key, h] of histogram) {
      out.push({ method: METHODS[Math.floor(key / 1000)], status: key % 1000, sum: h[0], counts: h.slice(1) });
    }
    histogram = new Map();
    return out;
  }

  const origListen = net.Server.prototype.listen;
  net.Server.prototype.listen = function listen(...args) {
    if (server === null && isServicePort(args)) {
      server = this;
      adopt(this);
      const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
      return origListen.call(this, { fd: LISTEN_FD }, cb);
    }
    const port = portOf(args);
    if (port !== undefined && port !== 0) {
      this.once('listening', () => send({ type: 'listen_other', port: this.address()?.port ?? port }));
    }
    return origListen.apply(this, args);
  };

  function adopt(srv) {
    srv.once('listening', () => {
      const addr = srv.address();
      send({ type: 'listening', pid: process.pid, node: process.version, address: addr && addr.address, port: addr && addr.port });
    });
    // Count requests inside the app's own handler rather than beside it: a
    // second 'request' listener would make every emit copy the listener
    // array. `.listener` keeps removeListener(handler) working.
    const handlers = srv.listeners('request');
    if (handlers.length === 1) {
      const handler = handlers[0];
      const counted = function (req, res) {
        requests++;
        // Early rejection, before any app code: the two bounds are plain
        // comparisons, so a worker that is not overloaded pays nothing.
        if ((MAX_INFLIGHT !== 0 && inflight >= MAX_INFLIGHT) || (MAX_DELAY_MS !== 0 && lag > MAX_DELAY_MS)) {
          reject(res, inflight >= MAX_INFLIGHT && MAX_INFLIGHT !== 0 ? 'inflight' : 'delay');
          return;
        }
        inflight++;
        if (shedLeft !== 0 && res.shouldKeepAlive) shedOne(res);
        if (TIME_REQUESTS) res[kStart] = performance.now();
        res.on('close', onResponseClose);
        return handler.call(this, req, res);
      };
      counted.listener = handler;
      srv.removeListener('request', handler);
      srv.on('request', counted);
    } else {
      // Several 'request' listeners: counted, but not guarded (rejecting
      // here could not stop the others).
      srv.prependListener('request', (req, res) => {
        inflight++;
        requests++;
        if (shedLeft !== 0 && res.shouldKeepAlive) shedOne(res);
        if (TIME_REQUESTS) res[kStart] = performance.now();
        res.on('close', onResponseClose);
      });
    }
  }

  // Event-loop lag, measured continuously: how late a 10 ms timer fires.
  // After the loop was blocked, timers run before I/O, so the requests that
  // waited behind the block already see it.
  let lag = 0;
  if (MAX_DELAY_MS !== 0) {
    let last = performance.now();
    setInterval(() => {
      const now = performance.now();
      lag = Math.max(0, now - last - LAG_TICK_MS);
      last = now;
    }, LAG_TICK_MS).unref();
  }
  let rejected = { inflight: 0, delay: 0 };
  function reject(res, reason) {
    rejected[reason]++;
    res.writeHead(503, { 'retry-after': RETRY_AFTER, connection: 'close', 'content-type': 'text/plain' });
    res.end('overloaded\n');
  }
  function takeRejected() {
    const out = rejected;
    rejected = { inflight: 0, delay: 0 };
    return out;
  }

  // This response tells its client to reconnect (and be steered anew).
  function shedOne(res) {
    res.shouldKeepAlive = false;
    shedLeft--;
    shed++;
  }

  function onMessage(msg) {
    if (msg.type === 'drain') drain(msg.urgent === true);
    else if (msg.type === 'shed') shedLeft = Math.max(0, Number(msg.connections) || 0);
  }

  function drain(urgent) {
    if (draining) return;
    draining = true;
    if (server === null) {
      send({ type: 'drained' });
      return;
    }
    // Every response whose head is not written yet, in flight now or on a
    // keep-alive connection later, tells its client to reconnect elsewhere.
    // Patched only now, so that serving costs nothing for it.
    const http = require('node:http');
    const writeHead = http.ServerResponse.prototype.writeHead;
    http.ServerResponse.prototype.writeHead = function (...args) {
      if (!this.headersSent) this.shouldKeepAlive = false;
      return writeHead.apply(this, args);
    };
    // Stop accepting, but leave idle keep-alive connections open for now:
    // http.Server#close would close them at once, racing clients that are
    // sending their next request on them. Busy clients get their next
    // response with `Connection: close`; connections still idle after
    // IDLE_GRACE_MS are closed.
    net.Server.prototype.close.call(server, () => send({ type: 'drained' }));
    const idle = setTimeout(() => server.closeIdleConnections?.(), urgent ? 0 : IDLE_GRACE_MS);
    idle.unref();
  }

  // Health, sampled once per heartbeat.
  const delay = monitorEventLoopDelay({ resolution: 10 });
  delay.enable();
  let lastElu = performance.eventLoopUtilization();
  // Heartbeats come faster while the heap is past half of V8's limit, so
  // that a fast leak is seen in time (a worker leaking 40 MiB/s crosses the
  // last quarter of a 256 MiB heap in about a second).
  const beat = () => {
    const elu = performance.eventLoopUtilization(lastElu);
    lastElu = performance.eventLoopUtilization();
    const heap = v8.getHeapStatistics();
    const heapLimit = oldSpaceLimit(heap.heap_size_limit);
    send({
      type: 'heartbeat',
      elu: elu.utilization,
      interval_ms: elu.idle + elu.active,
      delay_p50_ms: delay.percentile(50) / 1e6,
      delay_p99_ms: delay.percentile(99) / 1e6,
      delay_max_ms: delay.max / 1e6,
      heap_used: heap.used_heap_size,
      heap_total: heap.total_heap_size,
      heap_limit: heapLimit,
      rss: process.memoryUsage.rss(),
      cpu_us: cpuUs(),
      http: takeHistogram(),
      rejected: takeRejected(),
      inflight,
      requests,
      conns: server?._connections ?? 0,
      shed,
    });
    shed = 0;
    delay.reset();
    const high = heap.used_heap_size > heapLimit / 2;
    setTimeout(beat, high ? Math.min(100, HEARTBEAT_MS) : HEARTBEAT_MS).unref();
  };
  setTimeout(beat, HEARTBEAT_MS).unref();

  function isServicePort(args) {
    return Number.isInteger(PORT) && portOf(args) === PORT;
  }
}

function cpuUs() {
  const { user, system } = process.cpuUsage();
  return user + system;
}

// V8's heap_size_limit is the old-space limit (--max-old-space-size, where
// V8 gives up with "heap out of memory") plus three semi-spaces of young
// generation (measured: 128 MiB old space -> 176 MiB limit with the default
// 16 MiB semi-space, 140 MiB with --max-semi-space-size=4).
function oldSpaceLimit(heapSizeLimit) {
  const flags = process.execArgv.join(' ') + ' ' + (process.env.NODE_OPTIONS || '');
  const m = /--max-semi-space-size[= ](\d+)/.exec(flags);
  const semi = (m ? Number(m[1]) : 16) * 1048576;
  return heapSizeLimit > 6 * semi ? heapSizeLimit - 3 * semi : heapSizeLimit;
}

// The TCP port a listen() call asks for, or undefined (a path, a handle, an fd).
function portOf(args) {
  const first = args[0];
  if (first !== null && typeof first === 'object') {
    if (first.path !== undefined || first.fd !== undefined || first.handle !== undefined || first._handle !== undefined) return undefined;
    return toPort(first.port);
  }
  if (typeof first === 'function') return 0;
  return toPort(first);
}

function toPort(value) {
  if (value === undefined || value === null) return 0;
  if (typeof value === 'number') return value;
  if (typeof value === 'string' && /^\d+$/.test(value)) return Number(value);
  return undefined;
}

module.exports = { portOf };

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
// - Tracing, when on: continues the W3C `traceparent` of each request (or
//   starts a trace), passes the server span's context on to the app, and
//   ships finished spans to the supervisor in batches.
// - Dependency-free, and does nothing at all when not started by ampere.

const LISTEN_FD = Number(process.env.AMPERE_LISTEN_FD);
// More descriptors of the same listening socket: node (libuv) accepts one
// connection per descriptor per turn of the event loop, so a loop whose
// turns are long would leave new connections waiting in the accept queue
// for many turns. Each of these accepts one more per turn.
const ACCEPT_FDS = (process.env.AMPERE_ACCEPT_FDS || '').split(',').filter((f) => /^\d+$/.test(f)).map(Number);
const CONTROL_FD = Number(process.env.AMPERE_CONTROL_FD);
const PORT = Number(process.env.AMPERE_PORT);
const HEARTBEAT_MS = Number(process.env.AMPERE_HEARTBEAT_MS) || 1000;
// node calls listen(2) again on the adopted socket; keep the supervisor's
// accept-queue length ([server] backlog) rather than node's 511.
const BACKLOG = Number(process.env.AMPERE_BACKLOG) || undefined;
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
// Time waiting for work that counts as the loop having waited: between two
// turns (less is the poll call itself), and over one tick.
const IDLE_GAP_MS = 0.1;
const IDLE_TICK_MS = 1;
const STANDING_HOLD_MS = 1000;
// [overload] hold_target: hold standing queues to the target.
const HOLD_TARGET = process.env.AMPERE_HOLD_TARGET === '1';
const HOLD_AFTER_BEATS = 5;
// A loop that waits for work within HUNGRY_AFTER_MS of its last rejection
// (or in an overload episode) says so, at most every HUNGRY_EVERY_MS. Not
// with HOLD_TARGET: there the new connections it brings arrive in a burst
// and wait past the target (bench/README, "Idle loops under overload").
const HUNGRY = !HOLD_TARGET;
const HUNGRY_AFTER_MS = 2000;
const HUNGRY_EVERY_MS = 20;
const kSince = Symbol('ampere.since');
// Within an overload episode (the supervisor says so, or this worker
// rejects): 0 keeps MAX_DELAY_MS. The episode lasts until the supervisor
// ends it, or 1 s after this worker's last rejection.
const TARGET_DELAY_MS = Number(process.env.AMPERE_TARGET_DELAY_MS) || MAX_DELAY_MS;
const PRESSURE_HOLD_MS = 1000;
// How often the supervisor hears that this worker still rejects (its
// OVERLOADED_HOLD is a little longer).
const OVERLOAD_REPORT_MS = 100;
// The event-loop utilisation (over 100 ms) from which the loop counts as
// saturated; AMPERE_SATURATED_ELU is for tests.
const SATURATED_ELU = Number(process.env.AMPERE_SATURATED_ELU ?? 0.9);
// Tracing ([telemetry]): the share of new traces to record; unset: off.
const TRACE_RATIO = process.env.AMPERE_TRACE_RATIO === undefined ? -1 : Number(process.env.AMPERE_TRACE_RATIO);
const TRACING = TRACE_RATIO >= 0;
const SPAN_BATCH = 256;
const MAX_SPAN_TEXT = 1024;
const MAX_UNSENT_BYTES = 4 * 1048576;

// With `[app] command`, the process ampere starts may be a wrapper (npm,
// npx, tsx) that runs the app in a child: every node process in between
// preloads this file. Then the agent waits, and acts in the process that
// listens on the service port.
const LAZY = process.env.AMPERE_AGENT_LAZY === '1';

if (Number.isInteger(LISTEN_FD) && Number.isInteger(CONTROL_FD)) {
  if (LAZY) awaitServiceListen();
  else start([]);
}

// The descriptors belong to one process: children that the app spawns (and
// that may preload this file through NODE_OPTIONS) must not adopt them.
function claim() {
  delete process.env.AMPERE_LISTEN_FD;
  delete process.env.AMPERE_ACCEPT_FDS;
  delete process.env.AMPERE_HOLD_TARGET;
  delete process.env.AMPERE_CONTROL_FD;
  delete process.env.AMPERE_AGENT_LAZY;
}

// Lazy mode: a process that never listens on the service port leaves the
// descriptors to its children. Servers it started on other ports are
// reported once it does.
function awaitServiceListen() {
  const net = require('node:net');
  const plainListen = net.Server.prototype.listen;
  const others = [];
  net.Server.prototype.listen = function listen(...args) {
    if (isServicePort(args)) {
      net.Server.prototype.listen = plainListen;
      start(others);
      return net.Server.prototype.listen.apply(this, args);
    }
    const port = portOf(args);
    if (port !== undefined && port !== 0) others.push({ server: this, port });
    return plainListen.apply(this, args);
  };
}

// `others`: servers on other ports that this process started before.
function start(others) {
  claim();
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
  const sessions = new Set(); // its open HTTP/2 sessions
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
  const kDone = Symbol('ampere.done');
  const kQueued = Symbol('ampere.queued');
  // Shared by every response ('close' calls it with the response as this),
  // so counting allocates nothing per request.
  function onResponseClose() {
    done(this);
  }
  // A pipelined request whose connection closes before its turn: node
  // drops its response without a 'close'; its request still closes.
  function onQueuedRequestClose() {
    if (this.socket?.destroyed && this[kQueued] !== undefined) done(this[kQueued]);
  }
  function done(res) {
    if (res[kDone] === true) return;
    res[kDone] = true;
    inflight--;
    finished++;
    if (TRACING && res[kSpan] !== undefined) endSpan(res);
    if (!TIME_REQUESTS) return;
    const seconds = (performance.now() - res[kStart]) / 1000;
    const key = (METHOD_INDEX[res.req?.method] ?? 7) * 1000 + res.statusCode;
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
      // An AbortSignal in the options still closes the server.
      const signal = args[0] !== null && typeof args[0] === 'object' ? args[0].signal : undefined;
      // listen(handle, backlog, cb): with a handle, node takes the backlog
      // from the arguments only.
      origListen.call(this, signal ? { fd: LISTEN_FD, signal } : { fd: LISTEN_FD }, BACKLOG, cb);
      if (ACCEPT_FDS.length > 0) this.once('listening', () => acceptMore(this));
      return this;
    }
    if (server !== null && isServicePort(args)) {
      // The port is ampere's, and served through the adopted server: a
      // further server on it (Fastify adds one per other address of
      // `localhost`, such as ::1) would bind a socket of its own, outside
      // ampere, in one worker only. It gets the error node would give.
      const err = new Error(`listen EADDRINUSE: address already in use :::${PORT} (ampere serves this port through the app's first server)`);
      Object.assign(err, { code: 'EADDRINUSE', errno: -98, syscall: 'listen', port: PORT });
      process.nextTick(() => this.emit('error', err));
      return this;
    }
    const port = portOf(args);
    if (port !== undefined && port !== 0) reportOther(this, port);
    return origListen.apply(this, args);
  };
  function reportOther(srv, port) {
    const report = () => send({ type: 'listen_other', port: srv.address()?.port ?? port });
    if (srv.listening) report();
    else srv.once('listening', report);
  }
  for (const { server: srv, port } of others) reportOther(srv, port);

  // Acceptors on the further descriptors (ACCEPT_FDS): each connection
  // they take is handed to the app's server as its own, counted in its
  // connections (so close() waits for it and maxConnections holds).
  const acceptors = [];
  function acceptMore(srv) {
    for (const fd of ACCEPT_FDS) {
      const acceptor = net.createServer({ pauseOnConnect: srv.pauseOnConnect === true }, (socket) => {
        acceptor._connections--;
        if (srv.maxConnections != null && srv._connections >= srv.maxConnections) {
          socket.destroy();
          return;
        }
        socket.server = srv;
        socket._server = srv;
        srv._connections++;
        srv.emit('connection', socket);
      });
      // The app's server, on the same socket, meets the same errors
      // (EMFILE) and reports them.
      acceptor.on('error', () => acceptor.close());
      acceptor.unref();
      origListen.call(acceptor, { fd }, BACKLOG);
      acceptors.push(acceptor);
    }
    const close = srv.close;
    srv.close = function (...args) {
      closeAcceptors();
      return close.apply(this, args);
    };
  }
  function closeAcceptors() {
    for (const acceptor of acceptors.splice(0)) acceptor.close();
  }

  function adopt(srv) {
    srv.once('listening', () => {
      // The app's own start-up (loading modules, compiling) is not lateness
      // that requests waited behind.
      lastTick = performance.now();
      lag = 0;
      const addr = srv.address();
      send({ type: 'listening', pid: process.pid, node: process.version, address: addr && addr.address, port: addr && addr.port });
    });
    // What a new connection's first request can have waited: since before
    // the turn that accepted it.
    if (HOLD_TARGET && MAX_DELAY_MS !== 0) {
      srv.prependListener('connection', (socket) => {
        if (!turnOpen) openTurn(performance.now());
        socket[kSince] = frontier;
      });
    }
    // HTTP/2 sessions, to end with a GOAWAY on drain (an http2 server has
    // no idle connections to close: its clients keep one session open).
    srv.on('session', (session) => {
      if (draining) session.close();
      else {
        sessions.add(session);
        session.once('close', () => sessions.delete(session));
      }
    });
    // The app closed its server on its own (not a drain): it takes no more
    // connections, so the supervisor must replace it.
    srv.once('close', () => {
      if (!draining) send({ type: 'closed' });
    });
    // Every request passes through the server's emit: count and admit it
    // there, before any 'request' listener runs, whether the app's or one
    // that a library attaches later (engine.io takes the listeners over),
    // and without adding one (an http2 server that has a 'request'
    // listener switches its streams to the compatibility API).
    const emit = srv.emit;
    srv.emit = function (event, req, res) {
      if (event !== 'request') return emit.apply(this, arguments);
      requests++;
      // Early rejection, before any app code: two comparisons and one
      // clock read (shared with the request timing).
      if (MAX_INFLIGHT !== 0 && inflight >= MAX_INFLIGHT) {
        reject(res, 'inflight');
        return true;
      }
      const now = performance.now();
      const bound = boundMs(now);
      const ahead = aheadMs();
      // In a standing queue: how long this request can have waited, at most.
      let waited = 0;
      if (HOLD_TARGET && MAX_DELAY_MS !== 0) {
        if (!turnOpen) openTurn(now);
        const since = arrivedAfter(req);
        const busyFor = now - lastIdleAt;
        if (HOLD_TARGET && beatsServed >= HOLD_AFTER_BEATS && (busyFor > MAX_DELAY_MS || (now < standingUntil && busyFor > standingMs()))) {
          waited = now - since;
        }
      }
      const late = waited !== 0 && waited > standingMs();
      if (MAX_DELAY_MS !== 0 && (lag > MAX_DELAY_MS || now - lastTick > LATE_MS || ahead > bound || late)) {
        if (warm) {
          // Beyond max_delay is overload: it starts or extends an episode.
          // Missing only the episode's target must not extend it, or the
          // tighter bound would keep the episode going by itself.
          const beyond = lag > MAX_DELAY_MS || now - lastTick > LATE_MS || ahead > MAX_DELAY_MS;
          if (late) standingUntil = now + STANDING_HOLD_MS;
          if (beyond) press(now + PRESSURE_HOLD_MS);
          reject(res, 'delay', beyond);
          return true;
        }
        // Start-up lateness: forget it once the first request is in.
        lag = 0;
        lastTick = now;
        lastIdleAt = now;
      }
      if (!warm) warmUp();
      inflight++;
      admitted++;
      if (shedLeft !== 0 && res.shouldKeepAlive) shedOne(res);
      if (TIME_REQUESTS) res[kStart] = now;
      if (TRACING) startSpan(req, res);
      res.on('close', onResponseClose);
      // Queued behind another response on its connection (pipelining).
      if (res.socket === null) {
        req[kQueued] = res;
        req.once('close', onQueuedRequestClose);
      }
      return emit.call(this, event, req, res);
    };
  }

  // Event-loop lag, measured continuously: how late a 10 ms timer fires.
  // After the loop was blocked, timers run before I/O, so the requests that
  // waited behind the block already see it. Within one long turn of the
  // loop (hundreds of requests read at once), the timer cannot fire: the
  // time since it last did says how late the loop is running now.
  let lag = 0;
  let lastTick = performance.now();
  // Standing queues (as in CoDel), with HOLD_TARGET: a loop that has not once waited for
  // work in MAX_DELAY_MS is not getting through a burst but falling behind,
  // and every request it lets in waits longer. Then a request is let in
  // only if it can have waited no longer than the target (target_delay,
  // though never below two requests' cost). How long it can have waited
  // comes from the loop's turns: what the loop reads in a turn arrived
  // after the previous turn began, or, if the loop waited for work in
  // between, after that; a connection's first request, after the turn
  // before the one that accepted it. The tick notes when the loop last
  // waited for work.
  let lastIdleAt = performance.now();
  let idleSeen = 0;
  // Each request turned away for the target makes the queue count as
  // standing for a second whenever the loop has not waited for work for
  // the target (rather than max_delay): its idle moments while it
  // oscillates (steering sends its new connections elsewhere, then back)
  // are no sign that it caught up. (Held regardless, a loop whose turns
  // are long, such as a render's, would keep missing the target at any
  // load.)
  let standingUntil = 0;
  // Not in the first heartbeats of serving: a loop that still compiles the
  // app's code misses the target at any load.
  let beatsServed = 0;
  let turnOpen = false;
  let turnStartAt = 0;
  let turnEndAt = 0;
  let idleAtTurnEnd = 0;
  let frontier = 0;
  function openTurn(now) {
    turnOpen = true;
    frontier = performance.nodeTiming.idleTime - idleAtTurnEnd > IDLE_GAP_MS ? turnEndAt : turnStartAt;
    turnStartAt = now;
    setImmediate(endTurn);
  }
  function endTurn() {
    turnOpen = false;
    turnEndAt = performance.now();
    idleAtTurnEnd = performance.nodeTiming.idleTime;
  }
  function arrivedAfter(req) {
    const socket = req.httpVersionMajor === 2 ? undefined : req.socket;
    const since = socket?.[kSince];
    if (since === undefined) return frontier;
    socket[kSince] = undefined;
    return since;
  }
  function standingMs() {
    return Math.min(MAX_DELAY_MS, Math.max(TARGET_DELAY_MS, 2 * costMs));
  }
  // Until the first request is let in, lateness is the app's own start-up
  // (frameworks such as Next.js keep initialising after they listen): the
  // first request waited for it, but shedding it would help nobody.
  let warm = false;
  const LATE_MS = LAG_TICK_MS + MAX_DELAY_MS;
  // Whether the loop had no idle time to speak of over the last 100 ms:
  // its utilisation, or its thread's share of that time on or waiting for
  // a CPU (where workers share CPUs, a loop that waits for its CPU reads as
  // idle in its utilisation).
  let saturated = false;
  let ticks = 0;
  let tickElu = performance.eventLoopUtilization();
  let tickAt = performance.now();
  let tickCpuNs = threadCpuNs();
  // Requests let in during this 100 ms and the one before.
  let admitted = 0;
  let admittedBefore = 0;
  if (MAX_DELAY_MS !== 0) {
    setInterval(() => {
      const now = performance.now();
      lag = Math.max(0, now - lastTick - LAG_TICK_MS);
      lastTick = now;
      const idle = performance.nodeTiming.idleTime;
      if (idle - idleSeen > IDLE_TICK_MS) {
        lastIdleAt = now;
        // Steered away (this worker rejected lately, or the service is in
        // an overload episode), waiting for work, and a request arriving now
        // would be let in (an I/O-bound worker idles at its in-flight
        // bound): say so, so that new connections come here again at once
        // rather than at the next heartbeat (an idle loop under overload is
        // lost goodput).
        if (HUNGRY && (now - rejectedAt < HUNGRY_AFTER_MS || now < pressureUntil) && now - hungrySentAt >= HUNGRY_EVERY_MS &&
            (MAX_INFLIGHT === 0 || inflight < MAX_INFLIGHT) && aheadMs() <= boundMs(now)) {
          hungrySentAt = now;
          send({ type: 'hungry' });
        }
      }
      idleSeen = idle;
      if (++ticks % 10 === 0) {
        const cpuNs = threadCpuNs();
        const demand = (cpuNs - tickCpuNs) / 1e6 / (now - tickAt);
        saturated = performance.eventLoopUtilization(tickElu).utilization >= SATURATED_ELU || demand >= SATURATED_ELU;
        tickElu = performance.eventLoopUtilization();
        tickAt = now;
        tickCpuNs = cpuNs;
        admittedBefore = admitted;
        admitted = 0;
      }
    }, LAG_TICK_MS).unref();
  }
  // Overload episodes: meanwhile, while the loop is saturated, the wait
  // behind the requests in flight is held to TARGET_DELAY_MS instead of
  // MAX_DELAY_MS (a queue that never drains adds latency, not throughput),
  // though never below two requests' cost. A loop with idle time is not
  // held: its requests wait on something else (timers, I/O), and holding
  // them to the target would only idle it further.
  let pressureUntil = 0;
  let pressureMs = MAX_DELAY_MS;
  // How long the requests in flight may keep a new one waiting.
  function boundMs(now) {
    return now < pressureUntil && saturated ? pressureMs : MAX_DELAY_MS;
  }
  // The loop's work ahead of a new request: every request in flight while
  // the loop is saturated; otherwise only those let in lately (the others
  // wait on I/O, a timer or a stream, not on this loop).
  function aheadMs() {
    return (saturated ? inflight : Math.min(inflight, admitted + admittedBefore)) * costMs;
  }
  function press(until) {
    if (performance.now() >= pressureUntil) {
      pressureMs = Math.min(MAX_DELAY_MS, Math.max(TARGET_DELAY_MS, 2 * costMs));
    }
    pressureUntil = Math.max(pressureUntil, until);
  }
  // The event loop's busy time per finished request, smoothed over
  // heartbeats. Times the requests in flight, it is how long a new request
  // would wait behind them: apps whose requests interleave (async
  // rendering) queue there, where the loop's lateness does not show it.
  // Busy time counts at most three times the CPU time (two workers on a
  // CPU see about twice): a process that others keep off the CPU for
  // longer (a throttled cgroup, a crowded machine) looks busy without more
  // work per request.
  let finished = 0;
  let costElu = null;
  let costCpu = 0;
  // The first request is let in: lateness from here on is overload, and
  // what requests cost is measured from here (the app's start-up is not
  // their work).
  function warmUp() {
    warm = true;
    costElu = performance.eventLoopUtilization();
    costCpu = cpuUs();
  }
  let busyMs = 0;
  let cpuMs = 0;
  let costMs = 0;
  function updateCost(activeMs, usedMs) {
    // Measured over at least 10 requests: fewer say more about timers and
    // collections than about what a request costs.
    busyMs += activeMs;
    cpuMs += usedMs;
    if (finished >= 10) {
      const sample = Math.min(busyMs, 3 * cpuMs) / finished;
      costMs = costMs === 0 ? sample : (costMs + sample) / 2;
      finished = 0;
      busyMs = 0;
      cpuMs = 0;
    }
  }
  let rejected = { inflight: 0, delay: 0 };
  // The supervisor hears of overload at once, to steer new connections
  // elsewhere, and again every OVERLOAD_REPORT_MS while it goes on, until
  // the next heartbeat: each report steers all of this worker's share away
  // for a moment, so a short burst costs a moment's share. A heartbeat
  // that counts rejections takes over (the supervisor steers away the
  // share rejected); reports start again after one that counts none.
  let reporting = true;
  let overloadSentAt = -Infinity;
  let overloadSentBeyond = false;
  let rejectedAt = -Infinity;
  let hungrySentAt = -Infinity;
  function reject(res, reason, beyondMax = true) {
    rejected[reason]++;
    const now = performance.now();
    rejectedAt = now;
    if (reporting) {
      if (now - overloadSentAt >= OVERLOAD_REPORT_MS || (beyondMax && !overloadSentBeyond)) {
        overloadSentAt = now;
        overloadSentBeyond = beyondMax;
        send({ type: 'overloaded', reason, beyond_max: beyondMax });
      }
    }
    // HTTP/2 has no Connection header (node 22 warns and drops it): the
    // stream ends with the response.
    if (res.req?.httpVersionMajor === 2) res.writeHead(503, { 'retry-after': RETRY_AFTER, 'content-type': 'text/plain' });
    else res.writeHead(503, { 'retry-after': RETRY_AFTER, connection: 'close', 'content-type': 'text/plain' });
    res.end('overloaded\n');
  }
  function takeRejected() {
    const out = rejected;
    reporting = out.inflight + out.delay === 0;
    overloadSentAt = -Infinity;
    rejected = { inflight: 0, delay: 0 };
    return out;
  }

  // Tracing: one server span per sampled request.
  const kSpan = Symbol('ampere.span');
  const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-|$)/;
  const ZERO_TRACE = '0'.repeat(32);
  const ZERO_SPAN = '0'.repeat(16);
  let spans = [];
  let ids = Buffer.alloc(0);
  let idsAt = 0;
  function randomHex(bytes) {
    if (idsAt + bytes > ids.length) {
      ids = require('node:crypto').randomBytes(4096);
      idsAt = 0;
    }
    idsAt += bytes;
    return ids.toString('hex', idsAt - bytes, idsAt);
  }
  const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
  function startSpan(req, res) {
    const header = req.headers.traceparent;
    const m = typeof header === 'string' ? TRACEPARENT.exec(header) : null;
    let traceId;
    let parent = null;
    let sampled;
    if (m !== null && m[1] !== 'ff' && m[2] !== ZERO_TRACE && m[3] !== ZERO_SPAN) {
      traceId = m[2];
      parent = m[3];
      sampled = (parseInt(m[4], 16) & 1) === 1;
    } else {
      sampled = TRACE_RATIO >= 1 || Math.random() < TRACE_RATIO;
      // Not recorded and nothing to continue: the app sees no context.
      if (!sampled) return;
      traceId = randomHex(16);
    }
    const spanId = randomHex(8);
    // The app, and any instrumentation of its own, continue from this span.
    req.headers.traceparent = `00-${traceId}-${spanId}-${sampled ? '01' : '00'}`;
    if (sampled) res[kSpan] = { traceId, spanId, parent, start: nowUs() };
  }
  function endSpan(res) {
    const span = res[kSpan];
    const req = res.req;
    const url = req?.url ?? '/';
    const q = url.indexOf('?');
    // Express knows the route pattern once it has matched one.
    const route = typeof req?.route?.path === 'string' ? (req.baseUrl || '') + req.route.path : null;
    // A supervisor that does not read its end must not make this grow.
    if (control.writableLength > MAX_UNSENT_BYTES) return;
    spans.push({
      trace_id: span.traceId,
      span_id: span.spanId,
      parent_span_id: span.parent,
      method: req?.method ?? 'GET',
      // Bounded, so that a batch stays well within the channel's line limit.
      path: (q < 0 ? url : url.slice(0, q)).slice(0, MAX_SPAN_TEXT),
      route: route?.slice(0, MAX_SPAN_TEXT) ?? null,
      status: res.statusCode,
      start_us: span.start,
      end_us: nowUs(),
    });
    if (spans.length >= SPAN_BATCH) flushSpans();
  }
  function flushSpans() {
    if (spans.length === 0) return;
    send({ type: 'spans', spans });
    spans = [];
  }

  // This response tells its client to reconnect (and be steered anew).
  function shedOne(res) {
    res.shouldKeepAlive = false;
    // An app's own `Connection: keep-alive` (a proxy passing its upstream's
    // on) would turn it back on.
    res.writeHead = closingWriteHead;
    shedLeft--;
    shed++;
  }
  // writeHead for a response that must close its connection, whatever
  // Connection header the app sets.
  const http = require('node:http');
  const plainWriteHead = http.ServerResponse.prototype.writeHead;
  function closingWriteHead(...args) {
    if (!this.headersSent && this.req?.httpVersionMajor !== 2) {
      this.shouldKeepAlive = false;
      if (this.hasHeader('connection')) this.setHeader('connection', 'close');
      const at = typeof args[1] === 'string' ? 2 : 1;
      const headers = args[at];
      if (headers !== null && typeof headers === 'object' && !Array.isArray(headers)) {
        const key = Object.keys(headers).find((k) => k.toLowerCase() === 'connection');
        if (key !== undefined) args[at] = { ...headers, [key]: 'close' };
      }
    }
    return plainWriteHead.apply(this, args);
  }

  function onMessage(msg) {
    if (msg.type === 'drain') drain(msg.urgent === true);
    else if (msg.type === 'shed') shedLeft = Math.max(0, Number(msg.connections) || 0);
    else if (msg.type === 'ping') send({ type: 'pong' });
    else if (msg.type === 'pressure') {
      if (msg.on === true) press(Infinity);
      else pressureUntil = 0;
    }
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
    http.ServerResponse.prototype.writeHead = closingWriteHead;
    // Stop accepting, but leave idle keep-alive connections open for now:
    // http.Server#close would close them at once, racing clients that are
    // sending their next request on them. Busy clients get their next
    // response with `Connection: close`; connections still idle after
    // IDLE_GRACE_MS are closed.
    let closed = false;
    closeAcceptors();
    net.Server.prototype.close.call(server, () => {
      closed = true;
      send({ type: 'drained' });
    });
    // The app's own graceful shutdown (server.close(cb) on SIGTERM) finds
    // the server closing already: its callback comes once it has closed,
    // without ERR_SERVER_NOT_RUNNING.
    server.close = function close(cb) {
      if (typeof cb === 'function') {
        if (closed) process.nextTick(cb);
        else this.once('close', () => cb());
      }
      return this;
    };
    const idle = setTimeout(() => server.closeIdleConnections?.(), urgent ? 0 : IDLE_GRACE_MS);
    idle.unref();
    // GOAWAY: clients finish their streams in flight and open new sessions
    // elsewhere.
    for (const session of sessions) session.close();
    sessions.clear();
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
    const cpu = cpuUs();
    if (warm) {
      beatsServed++;
      updateCost(performance.eventLoopUtilization(costElu).active, (cpu - costCpu) / 1000);
      costElu = performance.eventLoopUtilization();
      costCpu = cpu;
    }
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
      cpu_us: cpu,
      http: takeHistogram(),
      rejected: takeRejected(),
      inflight,
      requests,
      conns: server?._connections ?? 0,
      cost_ms: costMs,
      shed,
    });
    shed = 0;
    // An order not carried out by the next heartbeat is stale: the
    // supervisor sends a new one if the imbalance remains.
    shedLeft = 0;
    delay.reset();
    if (TRACING) flushSpans();
    const high = heap.used_heap_size > heapLimit / 2;
    setTimeout(beat, high ? Math.min(100, HEARTBEAT_MS) : HEARTBEAT_MS).unref();
  };
  setTimeout(beat, HEARTBEAT_MS).unref();
}

// Nanoseconds this thread has run on a CPU or waited in a run queue for
// one (/proc/thread-self/schedstat); NaN where the kernel does not say.
function threadCpuNs() {
  try {
    const fields = require('node:fs').readFileSync('/proc/thread-self/schedstat', 'latin1').split(' ');
    return Number(fields[0]) + Number(fields[1]);
  } catch {
    return NaN;
  }
}

function isServicePort(args) {
  return Number.isInteger(PORT) && portOf(args) === PORT;
}

function cpuUs() {
  const { user, system } = process.cpuUsage();
  return user + system;
}

// V8's heap_size_limit is the old-space limit (where V8 gives up with
// "heap out of memory") plus the young generation: three semi-spaces. node
// sizes both from the memory it may use (a container's limit included), and
// --max-old-space-size sets only the first. Measured with node 20 and 22:
// 512 MiB of memory -> 259 MiB (256 + 3), 1 GiB -> 524 (512 + 12), 2 GiB ->
// 1048 (1024 + 24), 4 GiB or more -> 2096 (2048 + 48); with
// --max-old-space-size=96 the same young generations: 99, 108, 120, 144.
function oldSpaceLimit(heapSizeLimit) {
  // The command line wins over NODE_OPTIONS: it comes last.
  return oldSpaceFrom(heapSizeLimit, (process.env.NODE_OPTIONS || '') + ' ' + process.execArgv.join(' '));
}
const MiB = 1048576;
function oldSpaceFrom(heapSizeLimit, flags) {
  // node takes the last of a flag given twice.
  const olds = [...flags.matchAll(/--max[-_]old[-_]space[-_]size[= ](\d+)/g)];
  if (olds.length > 0) return Number(olds[olds.length - 1][1]) * MiB;
  const m = /--max[-_]semi[-_]space[-_]size[= ](\d+)/.exec(flags);
  if (m) {
    const young = 3 * Number(m[1]) * MiB;
    return heapSizeLimit > 2 * young ? heapSizeLimit - young : heapSizeLimit;
  }
  // V8's rule: a semi-space is old/128 (old/256 up to 256 MiB), rounded up
  // to its 256 KiB pages, between 1 and 16 MiB. Solved for old by
  // iteration, from the largest young generation.
  let old = heapSizeLimit - 48 * MiB;
  for (let i = 0; i < 6 && old > 0; i++) {
    const semi = Math.min(16 * MiB, Math.max(MiB, Math.ceil(old / (old <= 256 * MiB ? 256 : 128) / (MiB / 4)) * (MiB / 4)));
    old = heapSizeLimit - 3 * semi;
  }
  return old > 0 ? old : heapSizeLimit;
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

module.exports = { portOf, oldSpaceFrom };

'use strict';
// Tests of the agent under node's own test runner, without the supervisor:
// the test plays the supervisor, handing a listening socket and a control
// channel to a child node process that preloads the agent.

const test = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const net = require('node:net');
const http = require('node:http');
const path = require('node:path');
const { once } = require('node:events');

const AGENT = path.join(__dirname, '..', 'agent.js');
const { portOf, oldSpaceFrom } = require(AGENT);

test('portOf reads every form of listen()', () => {
  assert.strictEqual(portOf([3000]), 3000);
  assert.strictEqual(portOf(['3000', '0.0.0.0']), 3000);
  assert.strictEqual(portOf([{ port: 3000, host: '::' }]), 3000);
  assert.strictEqual(portOf([{ port: '8080' }]), 8080);
  assert.strictEqual(portOf([() => {}]), 0);
  assert.strictEqual(portOf([]), 0);
  assert.strictEqual(portOf(['/tmp/app.sock']), undefined);
  assert.strictEqual(portOf([{ path: '/tmp/app.sock' }]), undefined);
  assert.strictEqual(portOf([{ fd: 3 }]), undefined);
});

test('the old-space limit is read from the flags, or from V8\'s heap limit by its own rule', () => {
  const MiB = 1048576;
  const old = (limitMiB, flags = '') => oldSpaceFrom(limitMiB * MiB, flags) / MiB;
  // heap_size_limit as node 20 and 22 report it with 512 MiB, 1, 2 and 4
  // GiB of memory (a container's limit), without flags.
  assert.deepStrictEqual([259, 524, 1048, 2096, 4144].map((h) => old(h)), [256, 512, 1024, 2048, 4096]);
  // --max-old-space-size sets the old space only, the last one given wins.
  assert.strictEqual(old(99, '--max-old-space-size=96'), 96);
  assert.strictEqual(old(144, '--max-old-space-size=512 --max_old_space_size=96'), 96);
  assert.strictEqual(old(268, '--max-semi-space-size=4'), 256);
});

test('a worker started with a heap flag reports that limit', { timeout: 20000 }, async () => {
  // The command line's flag wins over NODE_OPTIONS', as in node.
  const w = await startWorker(APP, { NODE_OPTIONS: '--max-old-space-size=200' }, { nodeArgs: ['--max-old-space-size=96'] });
  try {
    await w.next('listening');
    assert.strictEqual((await w.next('heartbeat')).heap_limit, 96 * 1048576);
  } finally {
    w.child.kill('SIGKILL');
  }
});

// Starts `script` (JS source) in a child that preloads the agent, with a
// listening socket on a free port as fd 3 and a control channel as fd 4,
// and `extraEnv` on top of the agent's settings; `stdout: 'pipe'` to read
// what it prints; `acceptFds`: further copies of the socket, from fd 5 on.
async function startWorker(script, extraEnv = {}, { stdout = 'inherit', nodeArgs = [], acceptFds = 0 } = {}) {
  const listener = net.createServer();
  listener.listen(0, '127.0.0.1');
  await once(listener, 'listening');
  const port = listener.address().port;
  const copies = Array.from({ length: acceptFds }, () => listener._handle.fd);
  const accept = copies.map((_, i) => String(5 + i)).join(',');
  const child = spawn(process.execPath, [...nodeArgs, '--require', AGENT, '-e', script], {
    stdio: ['ignore', stdout, 'inherit', listener._handle.fd, 'pipe', ...copies],
    env: { ...process.env, AMPERE_LISTEN_FD: '3', AMPERE_CONTROL_FD: '4', AMPERE_ACCEPT_FDS: accept, AMPERE_PORT: String(port), PORT: String(port), AMPERE_HEARTBEAT_MS: '50', ...extraEnv },
  });
  // The child holds the socket now; the test process must not accept on it.
  listener.close();
  const control = child.stdio[4];
  control.setEncoding('utf8');
  const messages = [];
  const waiters = [];
  let pending = '';
  control.on('data', (chunk) => {
    pending += chunk;
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const msg = JSON.parse(pending.slice(0, nl));
      pending = pending.slice(nl + 1);
      messages.push(msg);
      for (const w of waiters.splice(0)) w();
    }
  });
  const next = async (type) => {
    for (;;) {
      const i = messages.findIndex((m) => m.type === type);
      if (i >= 0) return messages.splice(i, 1)[0];
      await new Promise((resolve) => waiters.push(resolve));
    }
  };
  return { child, port, control, messages, next, send: (m) => control.write(JSON.stringify(m) + '\n') };
}

// No message of this type has come from the worker so far.
function assertNotSent(w, type) {
  assert.ok(!w.messages.some((m) => m.type === type), `${type} in ${JSON.stringify(w.messages.map((m) => m.type))}`);
}

function get(port, path = '/') {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
    }).on('error', reject);
  });
}

// One keep-alive connection to `port`; fetch(path) resolves to the
// response's Connection header.
function keepAliveClient(port) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const fetch = (path = '/') =>
    new Promise((resolve, reject) => {
      http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.headers.connection));
      }).on('error', reject);
    });
  return { agent, fetch };
}

const APP = `
  const http = require('node:http');
  http.createServer((req, res) => {
    setTimeout(() => res.end(String(process.pid)), req.url === '/slow' ? 300 : 0);
  }).listen(process.env.PORT, () => {});
`;

test('the app listen() on the service port adopts the inherited socket', async () => {
  const w = await startWorker(APP);
  try {
    const ready = await w.next('listening');
    assert.strictEqual(ready.port, w.port);
    const res = await get(w.port);
    assert.strictEqual(res.status, 200);
    assert.strictEqual(Number(res.body), w.child.pid);
    const hb = await w.next('heartbeat');
    for (const key of ['elu', 'delay_p99_ms', 'heap_used', 'heap_limit', 'rss', 'inflight', 'requests', 'cpu_us']) {
      assert.strictEqual(typeof hb[key], 'number', key);
    }
    // The request's duration arrives with a heartbeat, once.
    let timed = hb.http;
    while (timed.length === 0) timed = (await w.next('heartbeat')).http;
    assert.deepStrictEqual(timed.map((h) => [h.method, h.status, h.counts.reduce((a, b) => a + b)]), [['GET', 200, 1]]);
    assert.strictEqual(timed[0].counts.length, 12);
    assert.deepStrictEqual((await w.next('heartbeat')).http, []);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('drain finishes in-flight requests with Connection: close, then reports drained', async () => {
  const w = await startWorker(APP);
  try {
    await w.next('listening');
    const slow = get(w.port, '/slow');
    // Wait until the request is in flight (the heartbeat says so).
    for (;;) {
      const hb = await w.next('heartbeat');
      if (hb.inflight === 1) break;
    }
    w.send({ type: 'drain' });
    const res = await slow;
    assert.strictEqual(res.status, 200);
    assert.strictEqual(res.headers.connection, 'close');
    await w.next('drained');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('a shed order closes that many keep-alive connections, one per response', async () => {
  const w = await startWorker(APP);
  const { agent, fetch } = keepAliveClient(w.port);
  try {
    await w.next('listening');
    assert.strictEqual(await fetch(), 'keep-alive');
    for (;;) {
      const hb = await w.next('heartbeat');
      if (hb.conns === 1) break;
    }
    w.send({ type: 'shed', connections: 1 });
    // Once the order has arrived, the next response closes.
    let first = await fetch();
    for (let i = 0; i < 100 && first !== 'close'; i++) {
      await w.next('heartbeat');
      first = await fetch();
    }
    assert.strictEqual(first, 'close');
    assert.strictEqual(await fetch(), 'keep-alive');
    let shed = 0;
    while (shed === 0) shed = (await w.next('heartbeat')).shed;
    assert.strictEqual(shed, 1);
  } finally {
    agent.destroy();
    w.child.kill('SIGKILL');
  }
});

test('lateness from the app\'s start-up does not reject the first request; later lateness does', async () => {
  // The app blocks its event loop for 300 ms right after it listens, as
  // frameworks that finish initialising after listen() do.
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      if (req.url === '/block') { const t = Date.now(); while (Date.now() - t < 300); }
      res.end('ok');
    }).listen(process.env.PORT, () => { const t = Date.now(); while (Date.now() - t < 300); });
  `, { AMPERE_MAX_DELAY_MS: '100' });
  try {
    await w.next('listening');
    const first = get(w.port);
    assert.strictEqual((await first).status, 200);
    // Once warm, a request that waited behind a blocked loop is shed.
    const block = get(w.port, '/block');
    await new Promise((resolve) => setTimeout(resolve, 50));
    const late = get(w.port);
    assert.strictEqual((await block).status, 200);
    assert.strictEqual((await late).status, 503);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('a loop that waits for work after rejecting says it is hungry, and not before', async () => {
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      if (req.url === '/block') { const t = Date.now(); while (Date.now() - t < 300); }
      res.end('ok');
    }).listen(process.env.PORT);
  `, { AMPERE_MAX_DELAY_MS: '100' });
  try {
    await w.next('listening');
    assert.strictEqual((await get(w.port)).status, 200);
    // Idle and never rejected: it has nothing to say (the loop idles
    // through several 10 ms ticks between these heartbeats).
    for (let i = 0; i < 3; i++) await w.next('heartbeat');
    assertNotSent(w, 'hungry');
    // A request rejected behind a blocked loop; then the loop idles.
    const block = get(w.port, '/block');
    await new Promise((resolve) => setTimeout(resolve, 50));
    const late = get(w.port);
    assert.strictEqual((await block).status, 200);
    assert.strictEqual((await late).status, 503);
    await w.next('overloaded');
    await w.next('hungry');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('a worker that idles at its in-flight bound is not hungry until a request finishes', async () => {
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      setTimeout(() => res.end('ok'), req.url === '/slow' ? 1000 : 0);
    }).listen(process.env.PORT);
  `, { AMPERE_MAX_DELAY_MS: '100', AMPERE_MAX_INFLIGHT: '1' });
  try {
    await w.next('listening');
    assert.strictEqual((await get(w.port)).status, 200);
    const slow = get(w.port, '/slow');
    await w.next('heartbeat');
    assert.strictEqual((await get(w.port)).status, 503);
    // The loop idles with the slow request in flight: no room yet.
    for (let i = 0; i < 3; i++) await w.next('heartbeat');
    assertNotSent(w, 'hungry');
    assert.strictEqual((await slow).status, 200);
    await w.next('hungry');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('requests that would wait longer than max_delay behind those in flight are rejected', async () => {
  // Each request burns 20 ms of the loop after a timer: many can be in
  // flight at once, and the loop is never late when they are let in.
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      setTimeout(() => { const t = Date.now(); while (Date.now() - t < 20); res.end('ok'); }, 20);
    }).listen(process.env.PORT);
  `, { AMPERE_MAX_DELAY_MS: '100' });
  try {
    await w.next('listening');
    // Learn what a request costs: ten of them, one after another.
    for (let i = 0; i < 10; i++) assert.strictEqual((await get(w.port)).status, 200);
    while ((await w.next('heartbeat')).cost_ms === 0);
    // Twelve at once: about five fit in 100 ms, the rest are told to go.
    const statuses = (await Promise.all(Array.from({ length: 12 }, () => get(w.port)))).map((r) => r.status);
    const ok = statuses.filter((s) => s === 200).length;
    assert.ok(ok >= 4 && ok <= 8, `${statuses}`);
    assert.strictEqual(ok + statuses.filter((s) => s === 503).length, 12, `${statuses}`);
    // Beyond max_delay: overload, which starts an episode.
    assert.strictEqual((await w.next('overloaded')).beyond_max, true);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('within an overload episode the wait behind requests in flight is held to target_delay', async () => {
  // The bound holds while the loop is saturated: here, always.
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      setTimeout(() => { const t = Date.now(); while (Date.now() - t < 20); res.end('ok'); }, 20);
    }).listen(process.env.PORT);
  `, { AMPERE_MAX_DELAY_MS: '100', AMPERE_TARGET_DELAY_MS: '45', AMPERE_SATURATED_ELU: '0' });
  const burst = async () => {
    const statuses = (await Promise.all(Array.from({ length: 12 }, () => get(w.port)))).map((r) => r.status);
    assert.strictEqual(statuses.filter((s) => s === 200 || s === 503).length, 12, `${statuses}`);
    return statuses.filter((s) => s === 200).length;
  };
  // Messages are handled in order: once the pong is back, so is the order.
  const tell = async (msg) => {
    w.send(msg);
    w.send({ type: 'ping' });
    await w.next('pong');
  };
  try {
    await w.next('listening');
    for (let i = 0; i < 10; i++) assert.strictEqual((await get(w.port)).status, 200);
    while ((await w.next('heartbeat')).cost_ms === 0);
    // About 20 ms a request: two fit in 45 ms, where five fit in 100 ms.
    await tell({ type: 'pressure', on: true });
    const during = await burst();
    assert.ok(during >= 1 && during <= 3, `${during} let in`);
    // Rejected to hold the target only (three in flight wait 60 ms): that
    // must not extend the episode.
    assert.strictEqual((await w.next('overloaded')).beyond_max, false);
    await tell({ type: 'pressure', on: false });
    const after = await burst();
    assert.ok(after >= 4, `${after} let in`);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('a ping is answered with a pong once the event loop gets to I/O', async () => {
  const w = await startWorker(APP);
  try {
    await w.next('listening');
    w.send({ type: 'ping' });
    await w.next('pong');
  } finally {
    w.child.kill('SIGKILL');
  }
});

async function freePort() {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const { port } = s.address();
  s.close();
  return port;
}

test('other listen() calls are left alone and reported', async () => {
  const otherPort = await freePort();
  const w = await startWorker(`
    require('node:net').createServer((c) => c.end('other')).listen(${otherPort}, '127.0.0.1');
    ${APP}
  `);
  try {
    await w.next('listening');
    const other = await w.next('listen_other');
    assert.strictEqual(other.port, otherPort);
    const reply = await new Promise((resolve) => {
      let data = '';
      net.connect(otherPort, '127.0.0.1').on('data', (c) => (data += c)).on('end', () => resolve(data));
    });
    assert.strictEqual(reply, 'other');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('the worker exits when the supervisor goes away', async () => {
  const w = await startWorker(APP);
  await w.next('listening');
  const exited = once(w.child, 'exit');
  w.control.destroy();
  const [code] = await exited;
  assert.strictEqual(code, 1);
});

test('without ampere the agent changes nothing', async () => {
  const child = spawn(process.execPath, ['--require', AGENT, '-e', `
    const net = require('node:net');
    const pristine = net.Server.prototype.listen.toString().includes('[native code]') ||
      !net.Server.prototype.listen.toString().includes('LISTEN_FD');
    process.stdout.write(String(pristine));
  `], { env: { PATH: process.env.PATH }, stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (c) => (out += c));
  await once(child, 'exit');
  assert.strictEqual(out, 'true');
});

// Waits for a heartbeat that satisfies `pred`; `next` hands them out in order.
async function heartbeatWhere(w, pred) {
  for (;;) {
    const hb = await w.next('heartbeat');
    if (pred(hb)) return hb;
  }
}

test('pipelined requests whose connection closes do not stay counted in flight', { timeout: 20000 }, async () => {
  const w = await startWorker(APP, { AMPERE_MAX_INFLIGHT: '50' });
  try {
    await w.next('listening');
    // 200 requests at once on one connection, which goes away as soon as
    // the first response starts: node drops the responses queued behind it.
    const sock = net.connect(w.port, '127.0.0.1');
    await once(sock, 'connect');
    sock.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(200));
    await once(sock, 'data');
    sock.destroy();
    await heartbeatWhere(w, (hb) => hb.requests > 0);
    const hb = await heartbeatWhere(w, (hb) => hb.inflight === 0);
    assert.strictEqual(hb.inflight, 0);
    // Nothing is left to make the worker turn requests away.
    const statuses = await Promise.all(Array.from({ length: 40 }, () => get(w.port).then((r) => r.status)));
    assert.deepStrictEqual([...new Set(statuses)], [200]);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('an HTTP/2 app on the stream API keeps it: trailers and all', { timeout: 20000 }, async () => {
  const w = await startWorker(`
    const http2 = require('node:http2');
    const server = http2.createServer();
    server.on('stream', (stream) => {
      stream.respond({ ':status': 200 }, { waitForTrailers: true });
      stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
      stream.end('ok');
    });
    server.listen(process.env.PORT);
  `);
  try {
    await w.next('listening');
    const http2 = require('node:http2');
    const session = http2.connect(`http://127.0.0.1:${w.port}`);
    try {
      const req = session.request({ ':path': '/' });
      const [trailers] = await Promise.all([once(req, 'trailers').then(([t]) => t), (async () => {
        req.resume();
        await once(req, 'end');
      })()]);
      assert.strictEqual(trailers['grpc-status'], '0');
    } finally {
      session.close();
    }
    // The worker is still there.
    assert.strictEqual(w.child.exitCode, null);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('requests stay counted when a library takes the request listeners over after listen', { timeout: 20000 }, async () => {
  // As engine.io's attach() does: copy the listeners, remove them all, and
  // call them from its own.
  const w = await startWorker(`
    const http = require('node:http');
    const server = http.createServer((req, res) => res.end('app'));
    server.listen(process.env.PORT, () => {
      const listeners = server.listeners('request').slice(0);
      server.removeAllListeners('request');
      server.on('request', (req, res) => {
        for (const l of listeners) l.call(server, req, res);
      });
    });
  `);
  try {
    await w.next('listening');
    for (let i = 0; i < 3; i++) assert.strictEqual((await get(w.port)).body, 'app');
    // All three counted (a heartbeat may fall between them), none twice.
    const hb = await heartbeatWhere(w, (hb) => hb.requests >= 3);
    assert.strictEqual(hb.requests, 3);
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('an app that closes its server itself is reported; its own close after a drain gets no error', { timeout: 20000 }, async () => {
  const w = await startWorker(`
    const http = require('node:http');
    const server = http.createServer((req, res) => {
      res.end('ok');
      if (req.url === '/close') server.close();
    });
    server.listen(process.env.PORT);
    setInterval(() => {}, 1000);
  `);
  try {
    await w.next('listening');
    await get(w.port, '/close');
    await w.next('closed');
  } finally {
    w.child.kill('SIGKILL');
  }

  const v = await startWorker(`
    const http = require('node:http');
    const server = http.createServer((req, res) => res.end('ok'));
    server.listen(process.env.PORT);
    process.on('SIGTERM', () => server.close((err) => {
      console.log(err ? 'close failed: ' + err.code : 'closed cleanly');
      process.exit(err ? 1 : 0);
    }));
    // Other work keeps it alive once its server has closed (else it would
    // be on its way out when the signal comes).
    setInterval(() => {}, 1000);
  `);
  try {
    await v.next('listening');
    v.send({ type: 'drain', urgent: true });
    await v.next('drained');
    v.child.kill('SIGTERM');
    const [code, signal] = await once(v.child, 'exit');
    assert.deepStrictEqual([code, signal], [0, null]);
  } finally {
    v.child.kill('SIGKILL');
  }
});

test('drain sends HTTP/2 clients a GOAWAY and finishes their streams in flight', { timeout: 20000 }, async () => {
  const w = await startWorker(`
    const http2 = require('node:http2');
    http2.createServer((req, res) => setTimeout(() => res.end('ok'), req.url === '/slow' ? 300 : 0))
      .listen(process.env.PORT);
  `);
  try {
    await w.next('listening');
    const http2 = require('node:http2');
    const session = http2.connect(`http://127.0.0.1:${w.port}`);
    session.on('error', () => {});
    const goaway = once(session, 'goaway');
    const req = session.request({ ':path': '/slow' });
    req.setEncoding('utf8');
    let body = '';
    req.on('data', (c) => (body += c));
    const ended = once(req, 'end');
    await heartbeatWhere(w, (hb) => hb.inflight === 1);
    w.send({ type: 'drain' });
    await goaway;
    await ended;
    assert.strictEqual(body, 'ok');
    await w.next('drained');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('a second server on the service port gets EADDRINUSE instead of a socket outside ampere', { timeout: 20000 }, async () => {
  // As Fastify does for each further address of \`localhost\`.
  const w = await startWorker(`
    const http = require('node:http');
    const main = http.createServer((req, res) => res.end('main'));
    main.listen(process.env.PORT, '127.0.0.1', () => {
      const second = http.createServer((req, res) => res.end('second'));
      second.on('error', (err) => console.log('second: ' + err.code));
      second.on('listening', () => console.log('second: listening'));
      second.listen(process.env.PORT, '::1');
    });
  `, {}, { stdout: 'pipe' });
  try {
    await w.next('listening');
    let out = '';
    w.child.stdout.setEncoding('utf8');
    w.child.stdout.on('data', (c) => (out += c));
    while (!out.includes('second: ')) await once(w.child.stdout, 'data');
    assert.match(out, /second: EADDRINUSE/);
    assert.strictEqual((await get(w.port)).body, 'main');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('listen({ port, signal }): aborting the signal closes the adopted server', { timeout: 20000 }, async () => {
  const w = await startWorker(`
    const http = require('node:http');
    const ac = new AbortController();
    const server = http.createServer((req, res) => {
      res.end('ok');
      if (req.url === '/abort') ac.abort();
    });
    server.listen({ port: Number(process.env.PORT), signal: ac.signal });
    setInterval(() => {}, 1000);
  `);
  try {
    await w.next('listening');
    await get(w.port, '/abort');
    // The app's own abort is the app closing its server.
    await w.next('closed');
  } finally {
    w.child.kill('SIGKILL');
  }
});

test('shedding and draining close the connection even when the app says keep-alive itself', { timeout: 20000 }, async () => {
  // As a proxy does that passes its upstream's Connection header on.
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      if (req.url === '/head') return res.writeHead(200, { Connection: 'keep-alive' }).end('ok');
      res.setHeader('Connection', 'keep-alive');
      res.end('ok');
    }).listen(process.env.PORT);
  `);
  const { agent, fetch } = keepAliveClient(w.port);
  try {
    await w.next('listening');
    assert.strictEqual(await fetch('/set'), 'keep-alive');
    await heartbeatWhere(w, (hb) => hb.conns === 1);
    w.send({ type: 'shed', connections: 1 });
    let first = await fetch('/set');
    for (let i = 0; i < 100 && first !== 'close'; i++) {
      await w.next('heartbeat');
      first = await fetch('/set');
    }
    assert.strictEqual(first, 'close');
    // A new connection, kept alive, for the drain to close.
    assert.strictEqual(await fetch('/set'), 'keep-alive');
    w.send({ type: 'drain' });
    // Wait until the drain has begun: a pong comes after it.
    w.send({ type: 'ping' });
    await w.next('pong');
    assert.strictEqual(await fetch('/head'), 'close');
  } finally {
    agent.destroy();
    w.child.kill('SIGKILL');
  }
});

test('the further descriptors accept more than one new connection per turn of the loop', { timeout: 20000 }, async () => {
  // Twelve connections wait in the accept queue before the app listens
  // (on SIGUSR2); the app counts the connections it gets in each turn of
  // its loop.
  const w = await startWorker(`
    const http = require('node:http');
    const perTurn = [];
    let open = false;
    const server = http.createServer((req, res) => res.end('ok'));
    server.on('connection', () => {
      if (!open) { open = true; perTurn.push(0); setImmediate(() => { open = false; }); }
      perTurn[perTurn.length - 1]++;
      if (perTurn.reduce((a, b) => a + b) === 12) console.log(JSON.stringify(perTurn));
    });
    // (A signal handler does not keep node running; the timer does.)
    const waiting = setInterval(() => {}, 1000);
    process.once('SIGUSR2', () => { clearInterval(waiting); server.listen(process.env.PORT); });
    console.log('ready');
  `, {}, { stdout: 'pipe', acceptFds: 3 });
  const sockets = [];
  try {
    w.child.stdout.setEncoding('utf8');
    const lines = [];
    const line = async () => {
      while (lines.length === 0) {
        const [chunk] = await once(w.child.stdout, 'data');
        lines.push(...chunk.split('\n').filter(Boolean));
      }
      return lines.shift();
    };
    assert.strictEqual(await line(), 'ready');
    for (let i = 0; i < 12; i++) {
      const s = net.connect(w.port, '127.0.0.1');
      await once(s, 'connect');
      sockets.push(s);
    }
    w.child.kill('SIGUSR2');
    const perTurn = JSON.parse(await line());
    // One per turn from the app's own descriptor, one from each copy.
    assert.ok(Math.max(...perTurn) >= 3, `connections per turn: ${perTurn}`);
    // They are the app's connections, served by its server.
    sockets[0].write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    const [reply] = await once(sockets[0], 'data');
    assert.match(String(reply), /^HTTP\/1.1 200/);
  } finally {
    for (const s of sockets) s.destroy();
    w.child.kill('SIGKILL');
  }
});

for (const hold of [true, false]) test(`${hold ? 'with' : 'without'} hold_target, a standing queue ${hold ? 'lets in only requests that waited no longer than target_delay' : 'is bounded by max_delay only'}`, { timeout: 30000 }, async () => {
  // Every request burns 10 ms of the loop. With max_delay at 1 s, turns of
  // a few hundred ms are no overload by themselves; but once the loop has
  // had no idle moment for max_delay, requests that waited longer than the
  // target are turned away.
  const w = await startWorker(`
    const http = require('node:http');
    http.createServer((req, res) => {
      const t = Date.now(); while (Date.now() - t < 10); res.end('ok');
    }).listen(process.env.PORT);
  `, { AMPERE_MAX_DELAY_MS: '1000', AMPERE_TARGET_DELAY_MS: '20', AMPERE_HOLD_TARGET: hold ? '1' : '' });
  try {
    await w.next('listening');
    assert.strictEqual((await get(w.port)).status, 200);
    // 30 keep-alive clients, each sending its next request as soon as it
    // has an answer, until the worker turns some away (or 600 answers).
    const counts = { 200: 0, 503: 0 };
    const client = async () => {
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      try {
        while (counts[503] === 0 && counts[200] + counts[503] < 600) {
          await new Promise((resolve, reject) => {
            http.get({ host: '127.0.0.1', port: w.port, path: '/', agent }, (res) => {
              counts[res.statusCode] = (counts[res.statusCode] || 0) + 1;
              res.resume();
              res.on('end', resolve);
            }).on('error', reject);
          });
        }
      } finally {
        agent.destroy();
      }
    };
    await Promise.all(Array.from({ length: 30 }, client));
    if (hold) {
      assert.ok(counts[503] > 0, `no request turned away: ${JSON.stringify(counts)}`);
      const report = await w.next('overloaded');
      assert.strictEqual(report.reason, 'delay');
    } else {
      assert.strictEqual(counts[503], 0, JSON.stringify(counts));
    }
  } finally {
    w.child.kill('SIGKILL');
  }
});

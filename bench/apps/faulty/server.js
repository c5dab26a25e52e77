// bench app: a plain node:http app that can go bad on request.
//   /               a small JSON answer
//   /block-forever  blocks the event loop for good
//   /leak?kb=N      keeps N KiB alive for good, then answers
const http = require('node:http');

const leaked = [];
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/block-forever') for (;;);
  if (url.pathname === '/leak') leaked.push(new Array((Number(url.searchParams.get('kb')) || 64) * 128).fill(1));
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, ok: true }));
});

server.listen(Number(process.env.PORT) || 3000, process.env.HOST);

// bench app: a plain node:http app whose requests cost CPU, like a handler
// that renders or serialises something. Every request runs CPU_WORK (default
// 400000) iterations of arithmetic, about 1 ms on this machine's cores with
// Node.js 22, then answers a small JSON body. Work is counted in iterations, not time,
// so a worker that gets less CPU takes longer, as a real one would.
const http = require('node:http');

const WORK = Number(process.env.CPU_WORK) || 400000;

function work(n) {
  let x = 0;
  for (let i = 0; i < n; i++) x += Math.sqrt(i);
  return x;
}

const server = http.createServer((req, res) => {
  const x = work(WORK);
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, x }));
});

server.listen(Number(process.env.PORT) || 3000, process.env.HOST);

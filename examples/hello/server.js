// A plain node:http app, unaware of ampere: it listens on PORT like any app.
const http = require('node:http');

const port = Number(process.env.PORT) || 3000;

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.setHeader('x-worker-pid', String(process.pid));
  res.end(JSON.stringify({ hello: 'world', pid: process.pid, url: req.url }));
});

server.listen(port, () => {
  console.log(`hello: listening on ${port}`);
});

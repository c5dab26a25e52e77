'use strict';
// bench: node:cluster with CLUSTER_WORKERS workers (default 2) running an
// unmodified app script (CLUSTER_SCRIPT, with this process's arguments).
// The primary accepts every connection and hands it to a worker
// (round-robin, node's default on Linux), as PM2's cluster mode does.
const cluster = require('node:cluster');

const workers = Number(process.env.CLUSTER_WORKERS) || 2;
cluster.setupPrimary({ exec: process.env.CLUSTER_SCRIPT, args: process.argv.slice(2) });
for (let i = 0; i < workers; i++) cluster.fork();
let stopping = false;
cluster.on('exit', () => {
  if (!stopping) cluster.fork();
});
process.on('SIGTERM', () => {
  stopping = true;
  for (const w of Object.values(cluster.workers)) w.kill();
  process.exit(0);
});

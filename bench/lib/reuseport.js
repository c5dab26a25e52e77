'use strict';
// bench: makes an unmodified app's listen(port[, host][, cb]) listen with
// reusePort (Node >= 22.12), so N plain node processes share one port the
// way ampere's workers do, with nothing in between: the "bare" setup.
// Touches listen() only, never the request path.
const net = require('node:net');

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const cb = typeof args[args.length - 1] === 'function' ? args.pop() : undefined;
  const first = args[0];
  if (first !== null && typeof first === 'object') {
    return listen.call(this, { ...first, reusePort: true }, cb);
  }
  const host = typeof args[1] === 'string' ? args[1] : process.env.BENCH_HOST;
  return listen.call(this, { port: Number(first), host, reusePort: true }, cb);
};

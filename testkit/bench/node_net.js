//! Node.js `net` round trip over a Unix socket with a 64-byte Buffer; prints one JSON object of percentiles (ns).
// Usage: node node_net.js [iterations]
// The echo server runs in a second process (fork); the parent connects, sends 64 bytes, waits for all 64 back.
'use strict';

const { fork } = require('child_process');
const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');

function percentile(sorted, q) {
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1));
  return sorted[idx];
}

if (process.argv[2] === 'server') {
  const sock = process.argv[3];
  const server = net.createServer((conn) => {
    conn.on('data', (d) => conn.write(d));
    conn.on('end', () => conn.end());
    conn.on('close', () => server.close(() => process.exit(0)));
  });
  server.listen(sock, () => process.send('ready'));
  process.on('disconnect', () => process.exit(0));
} else {
  const iterations = parseInt(process.argv[2] || '50000', 10);
  const warmup = Math.max(100, Math.floor(iterations / 10));
  const total = warmup + iterations;
  const dir = process.env.BENCH_TMPDIR || os.tmpdir();
  const sock = path.join(dir, `node-net-${process.pid}.sock`);
  try { fs.unlinkSync(sock); } catch (_) { /* not there */ }
  const child = fork(__filename, ['server', sock], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const payload = crypto.randomBytes(64);
  const samples = new Float64Array(iterations);
  const cleanup = () => {
    try { fs.unlinkSync(sock); } catch (_) { /* already gone */ }
    if (child.connected) child.disconnect();
  };
  child.on('message', () => {
    const conn = net.createConnection(sock);
    let n = 0;
    let start = 0n;
    let got = [];
    let gotLen = 0;
    const send = () => {
      start = process.hrtime.bigint();
      conn.write(payload);
    };
    conn.on('connect', send);
    conn.on('error', (e) => { console.error(`node_net: ${e}`); cleanup(); process.exit(1); });
    conn.on('data', (d) => {
      got.push(d);
      gotLen += d.length;
      if (gotLen < 64) return;
      const elapsed = Number(process.hrtime.bigint() - start);
      const reply = Buffer.concat(got);
      if (gotLen !== 64 || Buffer.compare(reply, payload) !== 0) {
        console.error('node_net: echo mismatch');
        cleanup();
        process.exit(1);
      }
      got = [];
      gotLen = 0;
      if (n >= warmup) samples[n - warmup] = elapsed;
      n += 1;
      if (n < total) {
        send();
      } else {
        conn.end();
        cleanup();
        const sorted = Array.from(samples).sort((a, b) => a - b);
        console.log(JSON.stringify({
          mechanism: 'node net over a Unix socket',
          payload_bytes: 64,
          iterations,
          p50_ns: percentile(sorted, 0.5),
          p99_ns: percentile(sorted, 0.99),
          p999_ns: percentile(sorted, 0.999),
          node: process.version,
        }));
      }
    });
  });
  child.on('exit', (code) => {
    if (code !== 0 && code !== null) console.error(`node_net: server exited with ${code}`);
  });
}

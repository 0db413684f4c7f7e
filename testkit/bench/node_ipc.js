//! Node.js child_process IPC round trip with a 64-byte payload; prints one JSON object of percentiles (ns).
// Usage: node node_ipc.js [iterations] [json|advanced]
// json: the 64 bytes travel as a base64 string inside {n, data}; advanced: as a Buffer (structured clone).
// Both sides are separate processes (fork); the child echoes each message back unchanged.
'use strict';

const { fork } = require('child_process');
const crypto = require('crypto');

function percentile(sorted, q) {
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1));
  return sorted[idx];
}

if (process.argv[2] === 'child') {
  process.on('message', (m) => process.send(m));
  process.on('disconnect', () => process.exit(0));
} else {
  const iterations = parseInt(process.argv[2] || '50000', 10);
  const serialization = process.argv[3] === 'advanced' ? 'advanced' : 'json';
  const warmup = Math.max(100, Math.floor(iterations / 10));
  const total = warmup + iterations;
  const child = fork(__filename, ['child'], { serialization, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const payload = crypto.randomBytes(64);
  const data = serialization === 'advanced' ? payload : payload.toString('base64');
  const samples = new Float64Array(iterations);
  let n = 0;
  let start = 0n;

  const send = () => {
    start = process.hrtime.bigint();
    child.send({ n, data });
  };

  child.on('message', (m) => {
    const elapsed = Number(process.hrtime.bigint() - start);
    const same = serialization === 'advanced'
      ? Buffer.compare(Buffer.from(m.data), payload) === 0
      : m.data === data;
    if (m.n !== n || !same) {
      console.error('node_ipc: echo mismatch');
      child.kill();
      process.exit(1);
    }
    if (n >= warmup) samples[n - warmup] = elapsed;
    n += 1;
    if (n < total) {
      send();
    } else {
      child.disconnect();
      const sorted = Array.from(samples).sort((a, b) => a - b);
      console.log(JSON.stringify({
        mechanism: 'node child_process IPC',
        serialization,
        payload_bytes: 64,
        iterations,
        p50_ns: percentile(sorted, 0.5),
        p99_ns: percentile(sorted, 0.99),
        p999_ns: percentile(sorted, 0.999),
        node: process.version,
      }));
    }
  });
  child.on('exit', (code) => {
    if (n < total) {
      console.error(`node_ipc: child exited early (${code})`);
      process.exit(1);
    }
  });
  send();
}

// Command round-trip benchmark (bench/commands.py): MQTT devices that answer every command.
//
//   node command_devices.mjs CONFIG.json
//
// One MQTT.js client per device (client id = device id, persistent session, so that the
// subscription exists whenever the device is connected, as docs/commands.md asks of devices),
// subscribed at QoS 1 to its command topic. Every command `{"id", "name", "payload"}` is answered
// at once by the hub reply convention: `{"id", "status": "ok", "result": <payload>}` at QoS 1 on
// the device's reply topic. The same devices serve polyhub and the Mosquitto + Python relay.
//
// Talks to bench/commands.py over stdin/stdout, one JSON object or one word per line:
//   out {"event":"ready","connect_s"}  once every device is connected and subscribed
//   in  "measure"                      restarts the CPU clock and the counters
//   in  "stop"                         prints {"event":"result", ...} and exits
//
// config: { url, keepalive, hard_timeout_s, connect_concurrency,
//           devices: [{client_id, command_topic, reply_topic}] }

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import mqtt from 'mqtt';

import { watchGcPauses } from './gc_pauses.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function fail(message) {
  emit({ event: 'error', message: String(message) });
  process.exit(2);
}

setTimeout(() => fail(`hard timeout after ${config.hard_timeout_s}s`), config.hard_timeout_s * 1000).unref();

let shuttingDown = false;
let commands = 0;
let malformed = 0;
let replies = 0;
let cpuStart = process.cpuUsage();
const gc = watchGcPauses();
const clients = [];

function answer(client, device, payload) {
  let command;
  try {
    command = JSON.parse(payload.toString('utf8'));
  } catch {
    malformed += 1;
    return;
  }
  if (command === null || typeof command !== 'object' || typeof command.id !== 'string') {
    malformed += 1;
    return;
  }
  commands += 1;
  const reply = JSON.stringify({ id: command.id, status: 'ok', result: command.payload ?? null });
  client.publish(device.reply_topic, reply, { qos: 1 }, (err) => {
    if (err) {
      if (!shuttingDown) fail(`${device.client_id}: reply not acknowledged: ${err.message}`);
      return;
    }
    replies += 1;
  });
}

function connectDevice(device) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect(config.url, {
      clientId: device.client_id,
      protocolVersion: 4,
      clean: false,
      keepalive: config.keepalive,
      reconnectPeriod: 0, // a reconnect would hide a server fault: fail instead
      connectTimeout: 30_000,
      resubscribe: false,
    });
    const onError = (err) => reject(new Error(`${device.client_id}: ${err.message}`));
    client.once('error', onError);
    client.once('connect', () => {
      // Nagle would add delays that belong to no server under test.
      if (client.stream && typeof client.stream.setNoDelay === 'function') client.stream.setNoDelay(true);
      client.removeListener('error', onError);
      client.on('error', (err) => fail(`${device.client_id}: ${err.message}`));
      client.on('close', () => {
        if (!shuttingDown) fail(`${device.client_id}: connection closed by the server`);
      });
      client.on('message', (_topic, payload) => answer(client, device, payload));
      client.subscribe(device.command_topic, { qos: 1 }, (err, granted) => {
        if (err) return reject(new Error(`${device.client_id}: subscribe: ${err.message}`));
        if (!granted || granted.some((g) => g.qos !== 1)) {
          return reject(new Error(`${device.client_id}: subscription refused: ${JSON.stringify(granted)}`));
        }
        resolve(client);
      });
    });
  });
}

async function connectAll() {
  const started = process.hrtime.bigint();
  const queue = [...config.devices];
  const workers = Array.from({ length: Math.min(config.connect_concurrency, queue.length) }, async () => {
    while (queue.length > 0) {
      const device = queue.shift();
      clients.push(await connectDevice(device));
    }
  });
  await Promise.all(workers);
  return Number(process.hrtime.bigint() - started) / 1e9;
}

function stop() {
  shuttingDown = true;
  const used = process.cpuUsage(cpuStart);
  emit({
    event: 'result',
    devices: clients.length,
    commands,
    replies,
    malformed,
    cpu_s: (used.user + used.system) / 1e6,
    gc: gc.summary(),
  });
  for (const client of clients) client.end(true);
  setTimeout(() => process.exit(0), 200);
}

createInterface({ input: process.stdin }).on('line', (line) => {
  const word = line.trim();
  if (word === 'measure') {
    cpuStart = process.cpuUsage();
    gc.reset();
    commands = 0;
    replies = 0;
  } else if (word === 'stop') {
    stop();
  }
});

connectAll()
  .then((connectS) => emit({ event: 'ready', devices: clients.length, connect_s: connectS }))
  .catch((err) => fail(err.message));

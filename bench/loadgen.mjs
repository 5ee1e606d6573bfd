// polyhub broker benchmark: the load generator.
//
// Built on MQTT.js so that neither broker under test (polyhub, Mosquitto) shares code with the
// client that measures it. bench/run.py starts one or more of these processes (pinned to CPU 0)
// and talks to each over stdin/stdout, one JSON object or one word per line.
//
//   node loadgen.mjs CONFIG.json
//
// Roles (config.role):
//   "load" - connect the subscribers of config.subscribers (if any), subscribe, then connect the
//            publishers of config.publishers (if any) and print {"event":"ready"}. On "go" each
//            publisher sends config.warmup + config.count messages at config.publishers.rate
//            messages/s (paced, open loop); the process prints {"event":"measuring"} once past
//            the warm-up messages and {"event":"published"} once all are sent (and acknowledged at
//            QoS 1). "measure" restarts the CPU clock. After "drain" the subscribers wait until
//            every expected message arrived or config.drain_ms passed; then the process prints
//            {"event":"result"} and exits.
//   "idle" - connect config.clients clients (keepalive config.keepalive, one subscription each) in
//            batches, print ready with connect timings, then sit idle until "stop".
//   "ingest" - 1,000-device JSON telemetry for bench/ingest.py (see runIngest below).
//
// Payload layout (little endian), padded with zeros to config.payload bytes:
//   [0, 8)   process.hrtime.bigint() at send time (CLOCK_MONOTONIC, same clock in every process)
//   [8, 12)  sequence number within the publisher (those below config.warmup are not measured)
//   [12, 14) publisher index (global over all generator processes of the run)

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import mqtt from 'mqtt';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const HEADER_BYTES = 14;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function fail(message) {
  emit({ event: 'error', message: String(message) });
  process.exit(2);
}

// A hard bound on every process, whatever the driver does.
setTimeout(() => fail(`hard timeout after ${config.hard_timeout_s}s`), config.hard_timeout_s * 1000).unref();

// Latency histogram in microseconds: exact below 100 us, then buckets 1% wide, so percentiles are
// good to about 1% without storing every sample. The driver merges the sparse maps.
const LINEAR_US = 100;
const LOG_STEP = Math.log(1.01);
function bucketOf(us) {
  if (us < LINEAR_US) return Math.max(0, Math.floor(us));
  return LINEAR_US + Math.floor(Math.log(us / LINEAR_US) / LOG_STEP);
}

function cpuSeconds(start) {
  const used = process.cpuUsage(start);
  return (used.user + used.system) / 1e6;
}

function connectClient(clientId, extra = {}) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect(config.url, {
      clientId,
      protocolVersion: config.protocol_version,
      clean: true,
      keepalive: config.keepalive,
      reconnectPeriod: 0, // a reconnect would hide a broker fault: count it as an error instead
      connectTimeout: 30_000,
      resubscribe: false,
      ...extra,
    });
    // Nagle on the generator side would add delays that belong to neither broker.
    if (client.stream && typeof client.stream.setNoDelay === 'function') client.stream.setNoDelay(true);
    const onError = (err) => reject(new Error(`${clientId}: ${err.message}`));
    client.once('error', onError);
    client.once('connect', () => {
      client.removeListener('error', onError);
      client.on('error', (err) => fail(`${clientId}: ${err.message}`));
      client.on('close', () => {
        if (!shuttingDown) fail(`${clientId}: connection closed by the broker`);
      });
      resolve(client);
    });
  });
}

function subscribe(client, filter, qos) {
  return new Promise((resolve, reject) => {
    client.subscribe(filter, { qos }, (err, granted) => {
      if (err) return reject(err);
      if (!granted || granted.length !== 1 || granted[0].qos > 2) {
        return reject(new Error(`subscription to ${filter} refused: ${JSON.stringify(granted)}`));
      }
      resolve();
    });
  });
}

// Connect many clients with a bounded number of handshakes in flight, so a listen backlog
// overflow does not turn into SYN retransmits that would measure the kernel instead of the broker.
async function connectAll(specs, concurrency, setup) {
  const clients = new Array(specs.length);
  const connectMs = [];
  let next = 0;
  async function worker() {
    while (next < specs.length) {
      const index = next++;
      const started = performance.now();
      const client = await connectClient(specs[index].clientId, specs[index].options);
      if (setup) await setup(client, specs[index]);
      connectMs.push(performance.now() - started);
      clients[index] = client;
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, specs.length) }, worker));
  return { clients, connectMs };
}

let shuttingDown = false;
function shutdown(clients, code = 0) {
  shuttingDown = true;
  for (const client of clients) client.end(true);
  // end(true) does not wait for the socket; exit once stdout is flushed.
  process.stdout.write('', () => process.exit(code));
}

const commands = createInterface({ input: process.stdin });
const waiters = new Map();
commands.on('line', (line) => {
  const word = line.trim();
  const waiter = waiters.get(word);
  if (waiter) {
    waiters.delete(word);
    waiter();
  }
});
function command(word) {
  return new Promise((resolve) => waiters.set(word, resolve));
}

const TIMELINE_SLOTS = 6000;

function trimTimeline(counts, maxUs) {
  let end = counts.length;
  while (end > 0 && counts[end - 1] === 0) end--;
  return Array.from({ length: end }, (_, i) => [counts[i], Math.round(maxUs[i])]);
}

// The subscribing half of a "load" process: counts, de-duplicates and times every message.
class Receivers {
  constructor(spec) {
    this.spec = spec;
    this.perPublisher = config.warmup + config.count;
    this.expected = spec.expected_per_client * spec.filters.length;
    this.histogram = new Map();
    // One bit per (publisher, sequence) for each local subscriber: tells duplicates from losses.
    this.seen = spec.filters.map(() => new Uint8Array(config.publishers_total * this.perPublisher));
    this.lastSeq = spec.filters.map(() => new Int32Array(config.publishers_total).fill(-1));
    this.received = 0;
    this.warmupReceived = 0;
    this.unique = 0;
    this.duplicates = 0;
    this.reordered = 0;
    this.malformed = 0;
    this.firstReceiveNs = 0n;
    this.lastReceiveNs = 0n;
    this.onComplete = null;
    this.timelineCount = new Uint32Array(TIMELINE_SLOTS);
    this.timelineMaxUs = new Float64Array(TIMELINE_SLOTS);
    this.clients = [];
  }

  async connect() {
    const specs = this.spec.filters.map((filter, local) => ({
      clientId: `${this.spec.client_prefix}${this.spec.first_index + local}`,
      filter,
      local,
    }));
    const { clients } = await connectAll(specs, 50, async (client, spec) => {
      client.on('message', (_topic, payload) => this.onMessage(spec.local, payload));
      await subscribe(client, spec.filter, config.qos);
    });
    this.clients = clients;
  }

  onMessage(local, payload) {
    const now = process.hrtime.bigint();
    this.received++;
    if (payload.length < HEADER_BYTES) {
      this.malformed++;
      return;
    }
    const sentNs = payload.readBigUInt64LE(0);
    const seq = payload.readUInt32LE(8);
    const publisher = payload.readUInt16LE(12);
    if (publisher >= config.publishers_total || seq >= this.perPublisher) {
      this.malformed++;
      return;
    }
    const last = this.lastSeq[local];
    if (seq < last[publisher]) this.reordered++;
    else last[publisher] = seq;
    const slot = publisher * this.perPublisher + seq;
    const bits = this.seen[local];
    if (bits[slot]) {
      this.duplicates++;
      return;
    }
    bits[slot] = 1;
    // Warm-up messages (JIT, TCP slow start, allocator growth) are checked but not measured.
    if (seq < config.warmup) {
      this.warmupReceived++;
      return;
    }
    this.unique++;
    if (this.firstReceiveNs === 0n) this.firstReceiveNs = now;
    this.lastReceiveNs = now;
    const latencyUs = Number(now - sentNs) / 1000;
    const bucket = bucketOf(latencyUs);
    this.histogram.set(bucket, (this.histogram.get(bucket) ?? 0) + 1);
    // Per-100 ms slots of (count, worst latency): shows stalls that a percentile hides.
    const slot100ms = Number((now - this.firstReceiveNs) / 100_000_000n);
    if (slot100ms < TIMELINE_SLOTS) {
      this.timelineCount[slot100ms]++;
      if (latencyUs > this.timelineMaxUs[slot100ms]) this.timelineMaxUs[slot100ms] = latencyUs;
    }
    if (this.onComplete && this.unique >= this.expected) this.onComplete();
  }

  // Resolves once every expected message arrived, or after config.drain_ms.
  drain() {
    return new Promise((resolve) => {
      this.onComplete = resolve;
      if (this.unique >= this.expected) resolve();
      setTimeout(resolve, config.drain_ms);
    });
  }

  result() {
    return {
      clients: this.clients.length,
      expected: this.expected,
      received: this.received,
      warmup_received: this.warmupReceived,
      unique: this.unique,
      duplicates: this.duplicates,
      reordered: this.reordered,
      malformed: this.malformed,
      first_receive_ns: this.firstReceiveNs.toString(),
      last_receive_ns: this.lastReceiveNs.toString(),
      histogram: Object.fromEntries(this.histogram),
      timeline: trimTimeline(this.timelineCount, this.timelineMaxUs),
    };
  }
}

// The publishing half of a "load" process: paced publishers.
class Senders {
  constructor(spec) {
    this.spec = spec;
    this.clients = [];
    this.sent = spec.topics.map(() => 0);
    this.acked = 0;
    this.behindMax = 0;
    this.startNs = 0n;
    this.measureStartNs = 0n;
    this.lastSendNs = 0n;
  }

  async connect() {
    const specs = this.spec.topics.map((topic, local) => ({
      clientId: `${this.spec.client_prefix}${this.spec.first_index + local}`,
      topic,
    }));
    const { clients } = await connectAll(specs, 50);
    this.clients = clients;
  }

  // Publishes every message; calls onMeasuring once all publishers are past the warm-up.
  async run(onMeasuring) {
    const { rate, burst_max: burstMax, first_index: firstIndex, topics } = this.spec;
    const { warmup, qos, payload: payloadBytes } = config;
    const perPublisher = warmup + config.count;
    const clients = this.clients;
    const sent = this.sent;
    let pendingAcks = qos > 0 ? perPublisher * clients.length : 0;
    let allAcked;
    const acksDone = new Promise((resolve) => {
      allAcked = resolve;
      if (pendingAcks === 0) resolve();
    });
    const onAck = (err) => {
      if (err) fail(`publish failed: ${err.message}`);
      this.acked++;
      if (--pendingAcks === 0) allAcked();
    };
    this.startNs = process.hrtime.bigint();
    if (warmup === 0) {
      this.measureStartNs = this.startNs;
      onMeasuring();
    }
    // Pacing: every tick each publisher catches up with rate * elapsed, but never sends more
    // than burst_max in one tick, so a generator that falls behind shows a lower achieved rate
    // instead of an unbounded burst. Ticks are setImmediate when behind and 1 ms timers otherwise.
    await new Promise((resolve) => {
      const tick = () => {
        const elapsedS = Number(process.hrtime.bigint() - this.startNs) / 1e9;
        const target = Math.min(perPublisher, Math.floor(elapsedS * rate) + 1);
        let done = true;
        let behind = false;
        for (let c = 0; c < clients.length; c++) {
          let budget = burstMax;
          while (sent[c] < target && budget-- > 0) {
            const payload = Buffer.alloc(payloadBytes);
            payload.writeBigUInt64LE(process.hrtime.bigint(), 0);
            payload.writeUInt32LE(sent[c], 8);
            payload.writeUInt16LE(firstIndex + c, 12);
            if (qos > 0) clients[c].publish(topics[c], payload, { qos }, onAck);
            else clients[c].publish(topics[c], payload, { qos: 0 });
            sent[c]++;
          }
          if (sent[c] < target) behind = true;
          if (sent[c] < perPublisher) done = false;
          this.behindMax = Math.max(this.behindMax, target - sent[c]);
        }
        if (this.measureStartNs === 0n && sent.every((n) => n >= warmup)) {
          this.measureStartNs = process.hrtime.bigint();
          onMeasuring();
        }
        if (done) return resolve();
        if (behind) setImmediate(tick);
        else setTimeout(tick, 1);
      };
      tick();
    });
    this.lastSendNs = process.hrtime.bigint();
    // Let QoS 0 bytes leave the process before the driver starts the drain clock.
    await Promise.all(
      clients.map(
        (client) =>
          new Promise((resolve) => {
            if (!client.stream.writableNeedDrain) return resolve();
            client.stream.once('drain', resolve);
          }),
      ),
    );
    const ackTimeout = setTimeout(() => allAcked(), config.drain_ms);
    await acksDone;
    clearTimeout(ackTimeout);
  }

  result() {
    const warmupTotal = config.warmup * this.clients.length;
    return {
      clients: this.clients.length,
      sent: this.sent.reduce((a, b) => a + b, 0) - warmupTotal,
      acked: Math.max(0, this.acked - warmupTotal),
      start_ns: this.measureStartNs.toString(),
      last_send_ns: this.lastSendNs.toString(),
      send_seconds: Number(this.lastSendNs - this.measureStartNs) / 1e9,
      max_behind: this.behindMax,
    };
  }
}

async function runLoad() {
  const receivers = config.subscribers ? new Receivers(config.subscribers) : null;
  const senders = config.publishers ? new Senders(config.publishers) : null;
  // Subscribers first, so that no publisher starts before every subscription is in place.
  if (receivers) await receivers.connect();
  if (senders) await senders.connect();
  emit({ event: 'ready' });
  await command('go');
  let cpuStart = process.cpuUsage();
  // The driver says "measure" once every publisher of the run is past its warm-up messages.
  command('measure').then(() => {
    cpuStart = process.cpuUsage();
  });
  const drainCommand = command('drain');
  if (senders) {
    await senders.run(() => emit({ event: 'measuring' }));
    emit({ event: 'published' });
  }
  await drainCommand;
  if (receivers) await receivers.drain();
  emit({
    event: 'result',
    cpu_s: cpuSeconds(cpuStart),
    sub: receivers ? receivers.result() : null,
    pub: senders ? senders.result() : null,
  });
  shutdown([...(receivers ? receivers.clients : []), ...(senders ? senders.clients : [])]);
}

async function runIdle() {
  const specs = [];
  for (let i = 0; i < config.clients; i++) {
    const index = config.first_index + i;
    specs.push({ clientId: `${config.client_prefix}${index}`, filter: `bench/idle/${index}` });
  }
  const started = performance.now();
  const { clients, connectMs } = await connectAll(specs, config.concurrency, (client, spec) =>
    subscribe(client, spec.filter, 1),
  );
  const seconds = (performance.now() - started) / 1000;
  connectMs.sort((a, b) => a - b);
  emit({
    event: 'ready',
    clients: clients.length,
    seconds,
    connect_p50_ms: connectMs[Math.floor(connectMs.length * 0.5)],
    connect_p99_ms: connectMs[Math.min(connectMs.length - 1, Math.floor(connectMs.length * 0.99))],
  });
  await command('stop');
  shutdown(clients);
}

// ------------------------------------------------------------------------------------------
// Role "ingest" (bench/ingest.py): device-style telemetry, as fast as the system sustains.
//
// config.devices: [{client_id, topic}], one MQTT client each (client id = device id, so the
// hub sees the device's presence). On "go" every device publishes JSON {"temp": n, "seq": k}
// at QoS 1, closed loop: at most config.window messages unacknowledged per device, so the
// offered rate is whatever the broker acknowledges. Devices listed in config.probes add
// "t" (CLOCK_MONOTONIC microseconds at send time) and the process records the send time of
// each of their messages, so the driver can time when each became queryable. After
// config.warmup_s the process prints {"event":"measuring"}; after config.duration_s more it
// stops publishing, waits for the outstanding acknowledgements and prints
// {"event":"published"}. config.subscriber (optional: {client_id, filter}) counts every
// delivery of the run at QoS 1 (the raw broker ceiling). After "drain" the subscriber waits
// until it has every acknowledged message or config.drain_ms passed, then {"event":"result"}.
async function runIngest() {
  const monotonicUs = () => Number(process.hrtime.bigint() / 1000n);
  let subscriber = null;
  const delivered = { total: 0, atMeasure: 0, atStop: 0, lastNs: 0n };
  let onAllDelivered = null;
  let expectedTotal = Infinity;
  if (config.subscriber) {
    subscriber = await connectClient(config.subscriber.client_id);
    subscriber.on('message', () => {
      delivered.total++;
      delivered.lastNs = process.hrtime.bigint();
      if (onAllDelivered && delivered.total >= expectedTotal) onAllDelivered();
    });
    await subscribe(subscriber, config.subscriber.filter, 1);
  }
  const specs = config.devices.map((device) => ({ clientId: device.client_id }));
  const { clients } = await connectAll(specs, 50);
  emit({ event: 'ready' });
  await command('go');

  const probeOf = new Map(config.probes.map((index) => [index, []]));
  const seqs = new Uint32Array(clients.length);
  let acked = 0;
  let inFlight = 0;
  let running = true;
  let ackedAtMeasure = 0;
  let measureNs = 0n;
  let stopNs = 0n;
  let cpuStart = process.cpuUsage();
  let idle = null;

  const publishNext = (index) => {
    const seq = seqs[index]++;
    const probe = probeOf.get(index);
    let payload = `{"temp":${20 + (seq % 100) / 10},"seq":${seq}`;
    if (probe) {
      const sentUs = monotonicUs();
      probe.push([seq, sentUs]);
      payload += `,"t":${sentUs}`;
    }
    payload += '}';
    inFlight++;
    clients[index].publish(config.devices[index].topic, payload, { qos: 1 }, (err) => {
      if (err) fail(`publish failed: ${err.message}`);
      acked++;
      inFlight--;
      if (running) publishNext(index);
      else if (inFlight === 0 && idle) idle();
    });
  };

  const startNs = process.hrtime.bigint();
  for (let index = 0; index < clients.length; index++) {
    for (let w = 0; w < config.window; w++) publishNext(index);
  }
  await new Promise((resolve) => setTimeout(resolve, config.warmup_s * 1000));
  measureNs = process.hrtime.bigint();
  ackedAtMeasure = acked;
  delivered.atMeasure = delivered.total;
  cpuStart = process.cpuUsage();
  emit({ event: 'measuring', t_us: Number(measureNs / 1000n) });
  await new Promise((resolve) => setTimeout(resolve, config.duration_s * 1000));
  stopNs = process.hrtime.bigint();
  const ackedAtStop = acked;
  delivered.atStop = delivered.total;
  running = false;
  const cpuS = cpuSeconds(cpuStart);
  await new Promise((resolve) => {
    idle = resolve;
    if (inFlight === 0) resolve();
    setTimeout(resolve, config.drain_ms);
  });
  emit({ event: 'published', t_us: Number(stopNs / 1000n) });
  await command('drain');
  if (subscriber) {
    expectedTotal = acked;
    await new Promise((resolve) => {
      onAllDelivered = resolve;
      if (delivered.total >= expectedTotal) resolve();
      setTimeout(resolve, config.drain_ms);
    });
  }
  const windowS = Number(stopNs - measureNs) / 1e9;
  emit({
    event: 'result',
    cpu_s: cpuS,
    devices: clients.length,
    start_us: Number(startNs / 1000n),
    measure_us: Number(measureNs / 1000n),
    stop_us: Number(stopNs / 1000n),
    window_s: windowS,
    sent_total: seqs.reduce((a, b) => a + b, 0),
    acked_total: acked,
    acked_in_window: ackedAtStop - ackedAtMeasure,
    unacked: inFlight,
    delivered_total: subscriber ? delivered.total : null,
    delivered_in_window: subscriber ? delivered.atStop - delivered.atMeasure : null,
    last_delivery_us: subscriber ? Number(delivered.lastNs / 1000n) : null,
    probes: Object.fromEntries([...probeOf].map(([index, sends]) => [config.devices[index].client_id, sends])),
  });
  shutdown([...clients, ...(subscriber ? [subscriber] : [])]);
}

const roles = { load: runLoad, idle: runIdle, ingest: runIngest };
const run = roles[config.role];
if (!run) fail(`unknown role ${config.role}`);
run().catch((err) => fail(err && err.stack ? err.stack : err));

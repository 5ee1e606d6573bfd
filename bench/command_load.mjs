// Command round-trip benchmark (bench/commands.py): the REST load generator.
//
//   node command_load.mjs CONFIG.json
//
// Sends `POST /devices/{id}/commands` with `{"name", "payload", "wait_ms"}` over keep-alive
// HTTP/1.1 connections (node:http's Agent, a pool of at most config.max_sockets), spread round
// robin over config.devices, and records how long each call took to answer with the command
// acknowledged. It shares no code with any server under test.
//
// Modes (config.mode):
//   "open"   - paced, open loop: call k is due at t0 + k / config.rate, whether or not earlier
//              calls have answered (so a slow server cannot slow the offered load down). Latency
//              is measured from the moment the call is made; how late the generator made it
//              (its own lag behind the schedule) is reported separately.
//   "closed" - config.concurrency callers, each making its next call as soon as the previous
//              one answered: the highest rate the server sustains with that many calls in flight.
// Calls due in the first config.warmup_s seconds are made but not measured; the run lasts
// config.warmup_s + config.duration_s, then waits (bounded) for the calls still open.
//
// Protocol with the driver (stdin/stdout, one JSON object or one word per line):
//   out {"event":"ready"}           after one unmeasured call per socket (connections opened)
//   in  "go"                        starts the run
//   out {"event":"measuring","t_us"} when the warm-up ends (CLOCK_MONOTONIC microseconds)
//   out {"event":"result", ...}     at the end; then the process exits
//
// Histograms: exact below 100 us, then 1% wide buckets (the layout of loadgen.mjs, read by
// run.py's percentile_us).

import { readFileSync, writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import http from 'node:http';

import { watchGcPauses } from './gc_pauses.mjs';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const gc = watchGcPauses();

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function fail(message) {
  emit({ event: 'error', message: String(message) });
  process.exit(2);
}

setTimeout(() => fail(`hard timeout after ${config.hard_timeout_s}s`), config.hard_timeout_s * 1000).unref();

const LINEAR_US = 100;
const LOG_STEP = Math.log(1.01);
function bucketOf(us) {
  if (us < LINEAR_US) return Math.max(0, Math.floor(us));
  return LINEAR_US + Math.floor(Math.log(us / LINEAR_US) / LOG_STEP);
}

// Groups the slow calls' start times into bursts: three or more slow calls, each started within
// config.burst_gap_ms of the previous one.
function slowBursts() {
  const starts = [...slowStartsUs].sort((a, b) => a - b);
  let inBursts = 0;
  let bursts = 0;
  let run = 0;
  const close = () => {
    if (run >= 3) {
      inBursts += run;
      bursts += 1;
    }
  };
  for (let i = 0; i < starts.length; i += 1) {
    if (i > 0 && starts[i] - starts[i - 1] > config.burst_gap_ms * 1000) {
      close();
      run = 0;
    }
    run += 1;
  }
  close();
  return { slow_calls: starts.length, slow_calls_in_bursts: inBursts, slow_bursts: bursts };
}

function nowUs() {
  return Number(process.hrtime.bigint() / 1000n);
}

const url = new URL(config.base_url);
const agent = new http.Agent({ keepAlive: true, maxSockets: config.max_sockets, scheduling: 'lifo' });
const devices = config.devices;
let nextDevice = 0;
let sequence = 0;

/** One POST; resolves {status, state, error} and never rejects. */
function call(device) {
  sequence += 1;
  const body = JSON.stringify({ name: config.command_name, payload: { n: sequence }, wait_ms: config.wait_ms });
  return new Promise((resolve) => {
    const request = http.request(
      {
        host: url.hostname,
        port: url.port,
        method: 'POST',
        path: `/devices/${encodeURIComponent(device)}/commands`,
        agent,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (response) => {
        const chunks = [];
        response.on('data', (chunk) => chunks.push(chunk));
        response.on('end', () => {
          let state = null;
          try {
            state = JSON.parse(Buffer.concat(chunks).toString('utf8')).state ?? null;
          } catch {
            state = null;
          }
          resolve({ status: response.statusCode, state, error: null });
        });
        response.on('error', (err) => resolve({ status: 0, state: null, error: err.message }));
      },
    );
    request.setNoDelay(true);
    request.setTimeout(config.wait_ms + 10_000, () => request.destroy(new Error('no answer in time')));
    request.on('error', (err) => resolve({ status: 0, state: null, error: err.message }));
    request.end(body);
  });
}

function pickDevice() {
  const device = devices[nextDevice];
  nextDevice = (nextDevice + 1) % devices.length;
  return device;
}

const stats = {
  calls: 0,
  measured_calls: 0,
  acknowledged: 0,
  not_acknowledged: 0, // 201, but the wait ended first (or the command failed / expired)
  http_errors: 0,
  transport_errors: 0,
  statuses: {},
  states: {},
  last_error: null,
  histogram: {}, // call -> answer, acknowledged calls only
  lag_histogram: {}, // open loop: how late each call was made
  first_done_us: null,
  last_done_us: null,
  timeline_max_us: [], // slowest acknowledged call per 100 ms of the measured window (by call time)
};
let measureStartUs = 0;
// Calls slower than config.slow_ms, by start time: one stall of the server (or of this machine)
// slows every call in flight, and those come in bursts; a slow command path slows calls one by one.
const slowStartsUs = [];
// Every acknowledged call as [start µs from the measured window's start, latency µs], when
// config.calls_file asks for them (bench/commands.py --calls-dir).
const callLog = config.calls_file ? [] : null;

function record(result, measured, startedUs, doneUs) {
  if (!measured) return;
  stats.measured_calls += 1;
  const statusKey = String(result.status);
  stats.statuses[statusKey] = (stats.statuses[statusKey] ?? 0) + 1;
  if (result.error) {
    stats.transport_errors += 1;
    stats.last_error = result.error;
    return;
  }
  if (result.status !== 201) {
    stats.http_errors += 1;
    return;
  }
  const stateKey = String(result.state);
  stats.states[stateKey] = (stats.states[stateKey] ?? 0) + 1;
  if (result.state !== 'acknowledged') {
    stats.not_acknowledged += 1;
    return;
  }
  stats.acknowledged += 1;
  if (doneUs - startedUs > config.slow_ms * 1000) slowStartsUs.push(startedUs);
  if (callLog) callLog.push([startedUs - measureStartUs, doneUs - startedUs]);
  const slot = Math.max(0, Math.floor((startedUs - measureStartUs) / 100_000));
  while (stats.timeline_max_us.length <= slot) stats.timeline_max_us.push(0);
  stats.timeline_max_us[slot] = Math.max(stats.timeline_max_us[slot], doneUs - startedUs);
  const bucket = bucketOf(doneUs - startedUs);
  stats.histogram[bucket] = (stats.histogram[bucket] ?? 0) + 1;
  if (stats.first_done_us === null) stats.first_done_us = doneUs;
  stats.last_done_us = doneUs;
}

async function openLoop(measureFromUs, endUs, t0) {
  const intervalUs = 1e6 / config.rate;
  const inflight = new Set();
  let k = 0;
  await new Promise((resolve) => {
    const tick = () => {
      const now = nowUs();
      while (true) {
        const due = t0 + k * intervalUs;
        if (due > now || due >= endUs) break;
        k += 1;
        const measured = due >= measureFromUs;
        if (measured) {
          const lag = bucketOf(now - due);
          stats.lag_histogram[lag] = (stats.lag_histogram[lag] ?? 0) + 1;
        }
        stats.calls += 1;
        const startedUs = nowUs();
        const pending = call(pickDevice()).then((result) => {
          record(result, measured, startedUs, nowUs());
          inflight.delete(pending);
        });
        inflight.add(pending);
      }
      const next = t0 + k * intervalUs;
      if (next >= endUs) return resolve();
      // A timer, not a busy loop: the devices share this CPU. Node timers have 1 ms
      // granularity, so calls go out in small bursts; the lag histogram shows how late.
      setTimeout(tick, Math.max(0, (next - nowUs()) / 1000));
    };
    tick();
  });
  await Promise.all([...inflight]);
}

async function closedLoop(measureFromUs, endUs) {
  const worker = async () => {
    while (nowUs() < endUs) {
      const startedUs = nowUs();
      stats.calls += 1;
      const result = await call(pickDevice());
      record(result, startedUs >= measureFromUs, startedUs, nowUs());
    }
  };
  await Promise.all(Array.from({ length: config.concurrency }, worker));
}

async function warmConnections() {
  // One call per socket opens the pool before the clock starts.
  const width = Math.min(config.max_sockets, config.mode === 'closed' ? config.concurrency : config.max_sockets, 32);
  const results = await Promise.all(Array.from({ length: width }, () => call(pickDevice())));
  const bad = results.find((r) => r.error || r.status !== 201);
  if (bad) fail(`warm-up call failed: status ${bad.status} ${bad.error ?? ''}`);
}

async function run() {
  const cpuStart = process.cpuUsage();
  const t0 = nowUs();
  const measureFromUs = t0 + config.warmup_s * 1e6;
  measureStartUs = measureFromUs;
  const endUs = measureFromUs + config.duration_s * 1e6;
  const announce = setTimeout(() => {
    gc.reset();
    emit({ event: 'measuring', t_us: measureFromUs });
  }, config.warmup_s * 1000);
  if (config.mode === 'open') await openLoop(measureFromUs, endUs, t0);
  else await closedLoop(measureFromUs, endUs);
  clearTimeout(announce);
  const used = process.cpuUsage(cpuStart);
  const finishedUs = nowUs();
  if (callLog) writeFileSync(config.calls_file, JSON.stringify({ measure_from_us: measureFromUs, calls: callLog }));
  emit({
    event: 'result',
    mode: config.mode,
    rate: config.rate ?? null,
    concurrency: config.concurrency ?? null,
    window_s: config.duration_s,
    measure_from_us: measureFromUs,
    end_us: endUs,
    finished_us: finishedUs,
    cpu_s: (used.user + used.system) / 1e6,
    run_s: (finishedUs - t0) / 1e6,
    sockets: config.max_sockets,
    gc: gc.summary(),
    ...slowBursts(),
    ...stats,
  });
  agent.destroy();
  setTimeout(() => process.exit(0), 100);
}

createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'go') run().catch((err) => fail(err.stack ?? err.message));
});

warmConnections()
  .then(() => emit({ event: 'ready' }))
  .catch((err) => fail(err.message));

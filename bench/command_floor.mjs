// The harness's floor for bench/commands.py: the same API and wire format as polyhub and
// bench/command_relay.py, with nothing stored. node:http in front of Mosquitto (MQTT.js):
//
// - `POST /devices/{id}/commands` `{"name", "payload"?, "wait_ms"?}`: publishes
//   `{"id", "name", "payload"}` at QoS 1 on `/{hub}/{device}/cmd` and answers 201 with the
//   command as JSON once the device's reply arrives on `/{hub}/{device}/cmd_reply` (state
//   `acknowledged` or `failed`), or when `wait_ms` runs out (state `sent`).
//
// No durability, no state beyond the waiting requests: what it takes is what the load
// generator, the devices, Mosquitto and one event loop take, so its latency is the least any
// server can show in this harness on this machine. It is a reference, not a contender.
//
//     node command_floor.mjs CONFIG.json     (`{"mqtt_port": N, "http_port": N, "hub": "HUB"}`)
//
// Prints `{"event": "ready"}` on stdout once subscribed and listening.

import http from "node:http";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import mqtt from "mqtt";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const PATH = /^\/devices\/([^/]+)\/commands$/;
const waiting = new Map();

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function answer(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
  res.end(data);
}

const client = mqtt.connect(`mqtt://127.0.0.1:${config.mqtt_port}`, {
  clientId: `command-floor-${randomUUID().slice(0, 8)}`,
  clean: true,
  reconnectPeriod: 0,
});
client.on("error", (error) => {
  process.stderr.write(`floor: MQTT error: ${error.message}\n`);
  process.exit(1);
});
client.on("message", (_topic, payload) => {
  let reply;
  try {
    reply = JSON.parse(payload);
  } catch {
    return;
  }
  const pending = reply && waiting.get(reply.id);
  if (!pending) {
    return;
  }
  waiting.delete(reply.id);
  clearTimeout(pending.timer);
  const ok = reply.status === "ok";
  pending.command.state = ok ? "acknowledged" : "failed";
  pending.command.reply = reply.result ?? null;
  answer(pending.res, 201, pending.command);
});

const server = http.createServer({ noDelay: true, keepAliveTimeout: 60_000 }, (req, res) => {
  const found = req.method === "POST" && PATH.exec(req.url);
  if (!found) {
    answer(res, 404, { error: "not_found" });
    req.resume();
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks));
    } catch (error) {
      answer(res, 400, { error: "invalid_request", message: String(error) });
      return;
    }
    if (!body || typeof body.name !== "string") {
      answer(res, 400, { error: "invalid_request", message: "name missing" });
      return;
    }
    const command = { id: `cmd-${randomUUID()}`, device_id: found[1], name: body.name, state: "sent" };
    const message = JSON.stringify({ id: command.id, name: body.name, payload: body.payload ?? null });
    const timer = setTimeout(() => {
      waiting.delete(command.id);
      answer(res, 201, command);
    }, body.wait_ms || 0);
    waiting.set(command.id, { res, command, timer });
    client.publish(`/${config.hub}/${found[1]}/cmd`, message, { qos: 1 });
  });
});

client.on("connect", () => {
  // Nagle would add delays that belong to no server under test.
  if (client.stream && typeof client.stream.setNoDelay === "function") client.stream.setNoDelay(true);
  client.subscribe("/+/+/cmd_reply", { qos: 1 }, (error) => {
    if (error) {
      process.stderr.write(`floor: subscribe failed: ${error.message}\n`);
      process.exit(1);
    }
    server.listen(config.http_port, "127.0.0.1", () => emit({ event: "ready" }));
  });
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
process.stdin.on("data", (line) => {
  if (String(line).trim() === "stop") {
    process.exit(0);
  }
});

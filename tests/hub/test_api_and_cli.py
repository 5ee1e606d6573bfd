"""The REST API's error contract, its OpenAPI document and metrics, and the `polyhub` CLI
(`polyhub hub add`, `polyhub device add`, `polyhub telemetry ...`) against a running polyhub."""

from __future__ import annotations

import json

import pytest

from hub_harness import ApiError, wait_until


def api_error(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    error = caught.value
    # Every error is the documented JSON shape.
    document = json.loads(error.body)
    assert set(document) == {"error"}, document
    assert set(document["error"]) == {"code", "message"}, document
    assert document["error"]["message"], document
    return error


def expect(call, status: int, code: str) -> ApiError:
    error = api_error(call)
    assert (error.status, error.code) == (status, code), error
    return error


def test_api_errors_have_stable_shapes(api):
    assert api.get("/health") == {"status": "ok"}
    assert api.get("/ready") == {"status": "ready"}

    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d", "h")

    # 404: unknown items, everywhere an id is addressed.
    for path in ["/groups/nope", "/hubs/nope", "/devices/nope", "/hubs/nope/parser",
                 "/devices/nope/presence"]:
        expect(lambda: api.get(path), 404, "not_found")
    expect(lambda: api.delete("/devices/nope"), 404, "not_found")
    expect(lambda: api.post("/hubs/nope/start"), 404, "not_found")

    # 409: duplicates and owners that still own something.
    expect(lambda: api.add_group("g"), 409, "conflict")
    expect(lambda: api.add_hub("h", "g"), 409, "conflict")
    expect(lambda: api.add_device("d", "h"), 409, "conflict")
    expect(lambda: api.delete("/groups/g"), 409, "conflict")
    expect(lambda: api.delete("/hubs/h"), 409, "conflict")
    # A hub of a group that does not exist, a device of a hub that does not exist.
    missing_parent = api_error(lambda: api.add_hub("h2", "no-such-group"))
    assert missing_parent.status in (404, 409), missing_parent
    missing_parent = api_error(lambda: api.add_device("d2", "no-such-hub"))
    assert missing_parent.status in (404, 409), missing_parent

    # 400: bad JSON, unknown fields, bad ids, bad values, bad query parameters.
    expect(lambda: api.request("POST", "/groups", raw=b'{"id": '), 400, "invalid_request")
    expect(lambda: api.post("/groups", {"id": "g2", "colour": "red"}), 400, "invalid_request")
    expect(lambda: api.post("/groups", {"id": "bad/id"}), 400, "invalid_request")
    expect(lambda: api.post("/groups", {"id": ""}), 400, "invalid_request")
    expect(lambda: api.post("/groups", {"id": "g3", "metadata": [1]}), 400, "invalid_request")
    expect(lambda: api.add_hub("h3", "g", decoder="xml"), 400, "invalid_request")
    expect(lambda: api.patch("/hubs/h", {"group_id": "other"}), 400, "invalid_request")
    expect(lambda: api.get("/groups", limit="many"), 400, "invalid_request")
    expect(lambda: api.get("/groups", limit=10001), 400, "invalid_request")
    expect(lambda: api.get("/devices/d/telemetry", **{"from": "yesterday"}), 400, "invalid_request")
    expect(lambda: api.get("/devices/d/telemetry/downsample"), 400, "invalid_request")  # no signal
    expect(lambda: api.get("/devices/d/telemetry/downsample", signal="t", interval="0"),
           400, "invalid_request")
    expect(lambda: api.get("/devices/d/telemetry/downsample", signal="t", interval="1ms",
                           **{"from": 0, "to": 10_000_000_000}), 400, "invalid_request")

    # Nothing of the rejected requests was created.
    assert [g["id"] for g in api.get("/groups")["items"]] == ["g"]
    assert [h["id"] for h in api.get("/hubs")["items"]] == ["h"]
    assert [d["id"] for d in api.get("/devices")["items"]] == ["d"]

    # PATCH changes only what it names; DELETE in the right order succeeds.
    patched = api.patch("/devices/d", {"name": "Renamed"})
    assert (patched["name"], patched["hub_id"], patched["protocol"]) == ("Renamed", "h", "mqtt")
    assert api.delete("/devices/d") is None
    assert api.delete("/hubs/h") is None
    assert api.delete("/groups/g") is None
    expect(lambda: api.get("/groups/g"), 404, "not_found")


def test_registry_lists_page_by_id(api):
    api.add_group("g")
    for index in range(5):
        api.add_hub(f"hub-{index}", "g", )
    first = api.get("/hubs", limit=2)
    assert [h["id"] for h in first["items"]] == ["hub-0", "hub-1"]
    assert first["next"] == "hub-1"
    rest = api.get("/hubs", limit=10, after=first["next"])
    assert [h["id"] for h in rest["items"]] == ["hub-2", "hub-3", "hub-4"]
    assert rest["next"] is None
    statuses = {p["hub_id"]: p for p in api.get("/parsers")["items"]}
    assert set(statuses) == {f"hub-{index}" for index in range(5)}


def test_openapi_and_metrics(api, mqtt_clients):
    document = api.get("/openapi.json")
    assert document["openapi"].startswith("3.1"), document["openapi"]
    paths = document["paths"]
    for path, methods in {
        "/health": {"get"},
        "/ready": {"get"},
        "/metrics": {"get"},
        "/groups": {"get", "post"},
        "/groups/{id}": {"get", "patch", "delete"},
        "/hubs": {"get", "post"},
        "/hubs/{id}": {"get", "patch", "delete"},
        "/hubs/{id}/start": {"post"},
        "/hubs/{id}/stop": {"post"},
        "/hubs/{id}/restart": {"post"},
        "/hubs/{id}/parser": {"get"},
        "/hubs/{id}/parser/events": {"get"},
        "/hubs/{id}/presence": {"get"},
        "/parsers": {"get"},
        "/devices": {"get", "post"},
        "/devices/{id}": {"get", "patch", "delete"},
        "/devices/{id}/presence": {"get"},
        "/devices/{id}/account": {"post", "delete"},
        "/devices/{id}/telemetry/latest": {"get"},
        "/devices/{id}/telemetry": {"get"},
        "/devices/{id}/telemetry/downsample": {"get"},
        "/dead-letters": {"get"},
    }.items():
        assert path in paths, f"{path} missing from /openapi.json: {sorted(paths)}"
        assert methods <= set(paths[path]), f"{path}: {sorted(paths[path])}"

    # Ingest something so that the per-hub counters exist.
    api.add_group("g")
    api.add_hub("hm", "g")
    api.add_device("dm", "hm")
    mqtt_clients().publish("/hm/dm/data", '{"t": 1}')
    wait_until(lambda: api.all_rows("dm"), "the row of dm")
    metrics = wait_until(
        lambda: (lambda text: text if "polyhub_ingest_rows_written_total" in text else None)(
            api.text("/metrics")
        ),
        "polyhub_ingest_rows_written_total in /metrics",
    )
    for name in ["polyhub_ingest_messages_total", "polyhub_ingest_rows_written_total",
                 "polyhub_parsers_running", "polyhub_http_requests_total"]:
        assert name in metrics, f"{name} missing from /metrics"
    rows_written = [line for line in metrics.splitlines()
                    if line.startswith("polyhub_ingest_rows_written_total") and 'hub="hm"' in line]
    assert rows_written and float(rows_written[0].split()[-1]) >= 1, rows_written


def test_cli_drives_the_hub(polyhub, mqtt_clients):
    def ok(*args: str) -> str:
        result = polyhub.cli(*args)
        assert result.returncode == 0, f"polyhub {' '.join(args)}: {result.stderr}"
        return result.stdout

    ok("group", "add", "cli-group", "--name", "CLI group", "--metadata", '{"via": "cli"}')
    table = ok("hub", "add", "cli-hub", "--group", "cli-group", "--decoder", "number")
    assert "cli-hub" in table and "number" in table, table
    device = json.loads(ok("device", "add", "cli-dev", "--hub", "cli-hub", "--output", "json"))
    assert (device["id"], device["hub_id"]) == ("cli-dev", "cli-hub")

    hubs = json.loads(ok("hub", "list", "--group", "cli-group", "--output", "json"))
    assert [hub["id"] for hub in hubs["items"]] == ["cli-hub"]
    assert hubs["items"][0]["settings"]["decoder"] == "number"
    listing = ok("device", "list", "--hub", "cli-hub")
    assert listing.splitlines()[0].split()[:2] == ["ID", "HUB"], listing
    assert listing.splitlines()[1].split()[:2] == ["cli-dev", "cli-hub"], listing

    mqtt_clients().publish("/cli-hub/cli-dev/data", "7.25")

    def latest():
        items = json.loads(ok("telemetry", "latest", "cli-dev", "--output", "json"))["items"]
        return items or None

    items = wait_until(latest, "cli-dev's latest value through the CLI")
    assert [(item["signal"], item["value"]) for item in items] == [("value", 7.25)]
    table = ok("telemetry", "range", "cli-dev", "--all")
    assert table.splitlines()[1].split()[-1] == "7.25", table
    merged = json.loads(ok("telemetry", "range", "cli-dev", "--all", "--output", "json"))
    assert [row["value"] for row in merged["rows"]] == [7.25]

    status = ok("hub", "stop", "cli-hub")
    assert "stopped" in status, status
    assert json.loads(ok("hub", "status", "cli-hub", "--output", "json"))["state"] == "stopped"
    ok("hub", "start", "cli-hub")

    # Errors: one line on stderr, exit code 1.
    missing = polyhub.cli("hub", "show", "no-such-hub")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and "(not_found, HTTP 404)" in missing.stderr, missing.stderr
    conflict = polyhub.cli("group", "rm", "cli-group")
    assert conflict.returncode == 1 and "(conflict, HTTP 409)" in conflict.stderr, conflict.stderr

    ok("device", "rm", "cli-dev")
    ok("hub", "rm", "cli-hub")
    assert ok("group", "rm", "cli-group") == "deleted group cli-group\n"

"""A scriptable sgframework (Python) resource for the interop tests: the same signals as the
Rust peer (`crates/polyhub-sdk/examples/sgframework_peer.rs`), named `pysign`.

    python3 sg_resource.py HOST PORT

stdout: `READY` once connected, `CALL <messagetype> <service> <signal> <payload>` per callback.
stdin: `data <signal> <value>`, `command <service> <signal> <value>`, `stop` (clean exit).
The tests kill it with SIGKILL to see its will.
"""

import sys
import threading
import time

import sgframework


def record(_resource, messagetype, servicename, signalname, payload):
    print(f"CALL {messagetype} {servicename} {signalname} {payload}", flush=True)


def upper(resource, messagetype, servicename, signalname, payload):
    record(resource, messagetype, servicename, signalname, payload)
    return payload.upper()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    connected = threading.Event()
    resource = sgframework.Resource("pysign", host, port)
    resource.on_broker_connectionstatus_info = (
        lambda _resource, status: connected.set() if status else connected.clear()
    )
    resource.register_incoming_command(
        "state", record, defaultvalue="False", send_echo_as_retained=True
    )
    resource.register_incoming_command("upper", upper)
    resource.register_incoming_command("mode", record, callback_on_change_only=True)
    resource.register_incoming_command("silent", record, echo=False)
    resource.register_outgoing_data("speed", defaultvalue="0")
    resource.register_outgoing_data("odometer", send_data_as_retained=True)
    resource.start(use_threaded_networking=True)
    if not connected.wait(20):
        print("ERROR not connected", flush=True)
        sys.exit(1)
    time.sleep(0.5)  # sgframework does not wait for SUBACKs; give them time.
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["data"] and len(words) == 3:
            resource.send_data(words[1], words[2])
        elif words[:1] == ["command"] and len(words) == 4:
            resource.send_command(words[1], words[2], words[3])
        elif words == ["stop"]:
            resource.stop()
            print("STOPPED", flush=True)
            return
        else:
            print(f"ERROR unknown request {line!r}", flush=True)
            continue
        print("OK", flush=True)


if __name__ == "__main__":
    main()

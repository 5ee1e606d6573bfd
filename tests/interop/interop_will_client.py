"""A paho client that connects with a last will, says CONNECTED on stdout, then waits to be killed.

Run as a separate process so that a test can SIGKILL it: the broker then sees the TCP connection
die without a DISCONNECT, the case in which it must publish the will.

usage: interop_will_client.py HOST PORT VERSION CLIENT_ID WILL_TOPIC WILL_PAYLOAD WILL_QOS WILL_RETAIN
                              [WILL_DELAY SESSION_EXPIRY]   (MQTT 5 only)
"""

import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PROTOCOLS = {"v31": mqtt.MQTTv31, "v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}


def main() -> int:
    host, port, version, client_id, topic, payload, qos, retain = sys.argv[1:9]
    protocol = PROTOCOLS[version]
    client = mqtt.Client(client_id, protocol=protocol)
    will_properties = connect_properties = None
    if len(sys.argv) > 10:
        will_properties = Properties(PacketTypes.WILLMESSAGE)
        will_properties.WillDelayInterval = int(sys.argv[9])
        connect_properties = Properties(PacketTypes.CONNECT)
        connect_properties.SessionExpiryInterval = int(sys.argv[10])
    client.will_set(topic, payload.encode(), int(qos), retain == "1", properties=will_properties)
    connected = threading.Event()

    def on_connect(_client, _userdata, _flags, rc, _properties=None):
        if getattr(rc, "value", rc) == 0:
            connected.set()

    client.on_connect = on_connect
    if protocol == mqtt.MQTTv5:
        client.connect(host, int(port), keepalive=60, clean_start=True, properties=connect_properties)
    else:
        client.connect(host, int(port), keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        print("NOT CONNECTED", flush=True)
        return 1
    print("CONNECTED", flush=True)
    # Bounded, so an orphan never lingers if the test dies before killing us.
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

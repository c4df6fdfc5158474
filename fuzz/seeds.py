#!/usr/bin/env python3
"""Writes the seed corpora (corpus/<target>/seed-*) from shared/tests/vectors and the topics
documented in shared/src/topic.rs and broker/src/acl.rs. Run from anywhere; rewrites the seeds.
"""
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
VECTORS = FUZZ.parent / "shared" / "tests" / "vectors"


def write(target, name, data):
    d = FUZZ / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


vectors = {p.stem: bytes.fromhex("".join(p.read_text().split())) for p in sorted(VECTORS.glob("*.hex"))}

# codec: every golden vector as it is on the wire.
for name, data in vectors.items():
    write("codec", name, data)

# reducer: length-prefixed frames.
def framed(*frames):
    return b"".join(struct.pack(">H", len(f)) + f for f in frames)

write("reducer", "all", framed(*vectors.values()))
write("reducer", "all-reversed", framed(*reversed(list(vectors.values()))))
write("reducer", "request-and-ack", framed(vectors["request"], vectors["ack"], vectors["request"]))
write("reducer", "birth-death", framed(vectors["birth"], vectors["death"], vectors["status"], vectors["shelter"]))
write("reducer", "alert-ack", framed(vectors["alert"], vectors["ack"], vectors["alert"], vectors["command"]))

# topic: the documented tree, both roots, and the refusals the unit tests name.
SITE = "131041/nishi-shinjuku-es"
suffixes = [
    f"{SITE}/status", f"{SITE}/shelter", f"{SITE}/supplies", f"{SITE}/life",
    f"{SITE}/request/req-0001", f"{SITE}/incident/inc-0001",
    "hq/alert/occ-131041-nishi-shinjuku-es", "hq/ack/alert/a1/sato",
    f"hq/ack/request/{SITE}/req-0001", f"cmd/{SITE}",
]
topics = [f"renkei/v1/{s}" for s in suffixes] + [f"renkei/json/v1/{s}" for s in suffixes] + [
    "renkei/v1/13104/a/status", "renkei/v1/132012/a/status", "renkei/v1/131041/+/status",
    "renkei/v1/131041/#", "renkei/v1/131041//status", "renkei/v1/hq/alert/a/b",
]
for i, t in enumerate(topics):
    write("topic", f"{i:02}", t.encode())

# acl, text mode: [role, ward index] then name \n site \n topic \n filter \n fills...
ROLES = {"demo": 0, "probe": 1, "agent": 2, "ward": 3, "hq": 4, "integrator": 5, "admin": 6}
SHINJUKU = 3  # index of 131041 in WARDS (Chiyoda, Chuo, Minato, Shinjuku, ...)
acl_text = [
    ("agent", "es-1", "es-1", "renkei/v1/131041/es-1/status", "renkei/v1/cmd/131041/es-1"),
    ("agent", "es-1", "es-1", "renkei/v1/131041/es-2/request/r-1", "renkei/v1/cmd/131041/+"),
    ("ward", "tanaka", "", "renkei/v1/hq/ack/alert/a1/tanaka", "$share/dash/renkei/v1/131041/#"),
    ("ward", "tanaka", "", "renkei/v1/hq/ack/request/131041/es-1/r-1", "renkei/v1/+/es-1/status"),
    ("ward", "tanaka", "", "renkei/v1/cmd/131016/es-1", "renkei/json/v1/131041/#"),
    ("hq", "sato", "", "renkei/v1/hq/alert/a1", "#"),
    ("integrator", "dis", "", "renkei/v1/hq/alert/a1", "renkei/json/v1/#"),
    ("admin", "root", "", "renkei/v1/anything/at/all", "renkei/#"),
    ("demo", "", "", "renkei/json/v1/131041/es-1/status", "renkei/v1/hq/#"),
    ("probe", "renkei-broker:probe", "", "renkei/v1/131041/es-1/status", "renkei/v1/#"),
]
for i, (role, name, site, topic, filt) in enumerate(acl_text):
    body = "\n".join([name, site, topic, filt, "x", "es-1/status", ""]).encode()
    write("acl", f"text-{i:02}-{role}", bytes([ROLES[role], SHINJUKU]) + body)


# acl, raw mode (bit 7): MQTT 3.1.1 packets.
def varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client, user, will_topic=None):
    flags = 0x02 | 0x80 | 0x40
    payload = s(client)
    if will_topic is not None:
        flags |= 0x04 | 0x20 | 0x08  # will, retained, QoS 1
        payload += s(will_topic) + struct.pack(">H", 1) + b"\x01"
    payload += s(user) + s("password")
    return packet(0x10, s("MQTT") + bytes([4, flags]) + struct.pack(">H", 30) + payload)


def publish(topic, payload=b"\x01"):
    return packet(0x30, s(topic) + payload)


def subscribe(pkid, *filters):
    return packet(0x82, struct.pack(">H", pkid) + b"".join(s(f) + b"\x01" for f in filters))


raw = [
    ("agent", connect("es-1", "es-1", "renkei/v1/131041/es-1/life")
     + publish("renkei/v1/131041/es-1/status", vectors["status"])
     + subscribe(1, "renkei/v1/cmd/131041/es-1", "renkei/v1/#")),
    ("ward", connect("dash-1", "tanaka")
     + subscribe(2, "renkei/v1/131041/#", "renkei/v1/hq/#", "$share/g/renkei/v1/131041/+/status")
     + publish("renkei/v1/hq/ack/alert/a1/tanaka", vectors["ack"])),
    ("hq", connect("hq-1", "sato", "renkei/v1/hq/alert/a1") + publish("renkei/v1/cmd/131041/es-1")),
    ("integrator", connect("dis", "dis") + subscribe(3, "renkei/json/v1/#", "+/v1/#")),
]
for i, (role, data) in enumerate(raw):
    write("acl", f"raw-{i:02}-{role}", bytes([0x80 | ROLES[role], SHINJUKU]) + data)

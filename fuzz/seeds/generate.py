#!/usr/bin/env python3
"""Writes the committed seed corpus (fuzz/seeds/TARGET/*): valid inputs of each format, so
that the fuzzers start from real structure. Run again after changing it; scripts/fuzz reads
the seeds and never writes here."""

import base64
import hashlib
import json
import re
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def write(target, name, data):
    directory = HERE / target
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# grpc_request: protobuf Request {1: node_uuid string, 2: data bytes}.
def field(tag, payload):
    return bytes([tag << 3 | 2, len(payload)]) + payload


UUID = b"213faf71-17a0-43d7-a88b-0afd96094178"
write("grpc_request", "seal", field(1, UUID) + field(2, bytes(range(32))))
write("grpc_request", "unseal", field(1, UUID) + field(2, bytes(range(44))))
write("grpc_request", "unknown-field", field(1, UUID) + field(3, b"x") + field(2, b"y"))
write("grpc_request", "empty", b"")

# proxy_header: PROXY protocol v1 and v2 headers, some followed by a TLS record's first bytes.
V2 = b"\r\n\r\n\0\r\nQUIT\n"
TLS = bytes([0x16, 3, 1])
write("proxy_header", "v1-tcp4", b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 50051\r\n" + TLS)
write("proxy_header", "v1-tcp6", b"PROXY TCP6 fd00::7 fd00::1 1 50051\r\n")
write("proxy_header", "v1-unknown", b"PROXY UNKNOWN\r\n")
v4 = bytes([10, 1, 2, 3, 10, 0, 0, 1]) + struct.pack(">HH", 40000, 50051)
write("proxy_header", "v2-tcp4", V2 + bytes([0x21, 0x11]) + struct.pack(">H", len(v4)) + v4 + TLS)
write("proxy_header", "v2-local", V2 + bytes([0x20, 0x00, 0, 0]))
v6 = bytes([0xFD] + [0] * 14 + [7, 0xFD] + [0] * 14 + [1]) + struct.pack(">HH", 1, 50051)
noop = bytes([0x04, 0, 3, 0, 0, 0])
write("proxy_header", "v2-tcp6-tlv", V2 + bytes([0x21, 0x21]) + struct.pack(">H", len(v6 + noop)) + v6 + noop)

# config: a selector byte (password and quoting), a split byte, then YAML text.
source = (ROOT / "src/config.rs").read_text()
default = re.search(r'DEFAULT_CONFIG: &str = r#"(.*?)"#;', source, re.S)
default = "\n".join(l for l in default.group(1).splitlines() if "serverKeyPassword" not in l)
legacy = """nodeDbFile: "/etc/talos-kms-server/nodeDbFile.json"
serverCertFile: "/etc/talos-kms-server/server.crt" #Must be a PEM encoded certificate
serverKeyFile: "/etc/talos-kms-server/server.key" #Must be a pkcs8 key
port: 50051
bindAddress: "0.0.0.0"
kmsLogLevel: "INFO"
rootLogLevel: "WARNING"
"""
for selector in range(0, 16, 5):
    write("config", f"default-{selector}", bytes([selector, 128]) + default.encode())
    write("config", f"legacy-{selector}", bytes([selector, 200]) + legacy.encode())
write("config", "metrics", bytes([1, 0]) + b'database: x\nserverCertFile: a\nserverKeyFile: b\n'
      b'metricsAddress: "[::1]:9650"\nauditLogMaxMiB: 5\nauditLogKeep: 3\n')

# legacy_json: the legacy server's file, as docs/protocol.md shows it.
record = {
    "nodeUuid": UUID.decode(),
    "ipAddress": "10.0.0.201",
    "cipherTextB64": "CZVlmwwkZcUjNd0JBcqWqR6BxGh3iGerVwYg6B6gYPpIDQvoIpxHj0nnHiEA0X8n",
    "nonceB64": "Lh1oTReoyx4mI3Y8",
    "lastAccess": "2025-10-11 20:22:24",
    "createdAt": "2025-10-11 20:22:17",
}
write("legacy_json", "one", json.dumps([record], indent=2))
ipv6 = dict(record, lastAccess=None, ipAddress="0:0:0:0:0:0:0:1")
write("legacy_json", "two", json.dumps([record, ipv6]))
untimed = {k: v for k, v in record.items() if k not in ("lastAccess", "createdAt")}
write("legacy_json", "no-times", json.dumps([untimed]))
write("legacy_json", "empty", "[ ]\n")

# luks2_token and luks2_header: the JSON metadata of `cryptsetup luksFormat --type luks2`
# with the sideroKMS token Talos adds.
kms = {"type": "sideroKMS", "keyslots": ["0"],
       "UserData": {"sealedData": "Lh1oTReoyx4mI3Y8AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}}
metadata = {
    "keyslots": {"0": {"type": "luks2", "key_size": 64,
                       "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                       "area": {"type": "raw", "offset": "32768", "size": "258048",
                                "encryption": "aes-xts-plain64", "key_size": 64},
                       "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                               "salt": "NUoAZicacuRPyZOFpLeV55Mj4djEvAVLr/GGYdZrDkQ="}}},
    "tokens": {"0": kms},
    "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic", "iv_tweak": "0",
                       "encryption": "aes-xts-plain64", "sector_size": 4096}},
    "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
                      "iterations": 1000, "salt": "D4NCC2COcXPJrD1mjnsGEhSf3Nu7gxiVqcpWdr6nHJM=",
                      "digest": "vV68YopRo+D/sfeY76j0dpkxnSfL3pbfXq6iV3cojIE="}},
    "config": {"json_size": "12288", "keyslots_size": "16744448"},
}
keyring = {"type": "luks2-keyring", "keyslots": ["2"], "key_description": "k"}
two = dict(metadata, tokens={"0": kms, "1": dict(kms, keyslots=["1"]), "2": keyring})
broken = dict(metadata, tokens={"3": dict(kms, UserData={"sealedData": "bm90IDQ0IGJ5dGVz"})})
# Caught by the luks2_token check: "01" was taken for token 1, whose blob came back though
# not a KMS token.
blob = kms["UserData"]
duplicate = {"tokens": {"1": {"type": "luks2-keyring", "UserData": blob},
                        "01": {"type": "sideroKMS", "UserData": blob}}}
named = [("one", metadata), ("two", two), ("broken", broken), ("duplicate-id", duplicate)]
for name, value in named:
    write("luks2_token", name, json.dumps(value, separators=(",", ":")))


def header(magic, offset, seqid, text, csum="sha256", size=0x4000):
    """A header copy as cryptsetup lays it out (as in src/recover/luks2.rs's tests)."""
    h = bytearray(size)
    h[0:6] = magic
    h[6:8] = struct.pack(">H", 2)
    h[8:16] = struct.pack(">Q", size)
    h[16:24] = struct.pack(">Q", seqid)
    h[72:72 + len(csum)] = csum.encode()
    h[256:264] = struct.pack(">Q", offset)
    h[4096:4096 + len(text)] = text.encode()
    if csum == "sha256":
        h[448:480] = hashlib.sha256(h).digest()
    return bytes(h)


PRIMARY, SECONDARY = b"LUKS\xba\xbe", b"SKUL\xba\xbe"
text = json.dumps(metadata, separators=(",", ":"))
write("luks2_header", "both-copies",
      header(PRIMARY, 0, 4, text) + header(SECONDARY, 0x4000, 4, text))
# An algorithm cryptsetup does not write is not verified: mutations reach the JSON.
write("luks2_header", "unverified", header(PRIMARY, 0, 1, json.dumps(two), csum="none"))
write("luks2_header", "secondary-only",
      bytes(0x4000) + header(SECONDARY, 0x4000, 2, json.dumps(broken), csum="none"))


def chained(body, prev):
    """An audit line as the server writes it: `"prev"` last, base64 of the line before's SHA-256."""
    text = json.dumps(body, separators=(",", ":"))
    return (text[:-1] + ',"prev":"' + base64.b64encode(prev).decode() + '"}').encode()


# audit_chain: three seal lines and the unkeyed stop checkpoint over them (src/audit/chain.rs).
lines, prev = [], bytes(32)
for n in range(3):
    line = chained({"time": f"2026-12-06T00:00:0{n}.000Z", "action": "seal", "outcome": "ok",
                    "peer": "10.0.0.1", "node": f"node-{n}"}, prev)
    lines.append(line)
    prev = hashlib.sha256(line).digest()
covered = b"".join(line + b"\n" for line in lines)
at = "2026-12-06T00:00:09.000Z"
mac_input = (b"talos-kms-server audit checkpoint v1\n" + hashlib.sha256(covered).digest() + prev
             + at.encode() + b"\0" + b"stop 3")
mac = base64.b64encode(hashlib.sha256(mac_input).digest()).decode()
lines.append(chained({"time": at, "checkpoint": {"why": "stop", "lines": 3, "keyed": False,
                                                 "mac": mac}}, prev))
write("audit_chain", "stopped_trail", b"".join(line + b"\n" for line in lines))

"""A PDU-level fuzzer against a running proxy on loopback (issue 5, item 5).

Valid conversations (A-ASSOCIATE-RQ, a C-ECHO-RQ in a P-DATA-TF, A-RELEASE-RQ) are mutated at
the byte level (bit flips, interesting lengths, insertions, deletions, truncation, PDU type
swaps) and sent on raw sockets; bounded in count and time. The server must survive, close
every such association, and still answer C-ECHO. A mutated stream that breaks it is saved
under ``tests/fuzz/crashers/`` (replayed by test_crashers.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest

from peers import associate_rq, echoscu, p_data_tf, wait_for

pytestmark = pytest.mark.integration

CRASHERS = Path(__file__).parent / "crashers"
COUNT = int(os.environ.get("ANONPROXY_PDU_FUZZ_COUNT", "300"))
BUDGET_S = 45.0
INTERESTING = [0, 1, 2, 6, 0x7F, 0x80, 0xFF, 0x4000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def _command_element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, number, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (Implicit VR Little Endian)."""
    body = (
        _command_element(0x0002, b"1.2.840.10008.1.1\x00")
        + _command_element(0x0100, struct.pack("<H", 0x0030))
        + _command_element(0x0110, struct.pack("<H", message_id))
        + _command_element(0x0800, struct.pack("<H", 0x0101))
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


RELEASE = struct.pack(">BBLL", 0x05, 0, 4, 0)
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"


def conversation() -> bytes:
    """A valid C-ECHO conversation of an SCU, as one byte stream."""
    return associate_rq() + p_data_tf([(1, 0x03, c_echo_rq())]) + RELEASE


def _element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    """An Explicit VR Little Endian element (short-length VRs, and OB)."""
    if vr == b"OB":
        return struct.pack("<HH2sHL", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def store_conversation() -> bytes:
    """A valid C-STORE conversation (a CT image's header and 3 KB of pixels), its data set in
    three P-DATA-TF PDUs: two middle fragments and the last, the way the proxy's straight path
    to the data set's file takes them."""
    instance = b"1.2.826.0.1.3680043.8.498.1\x00"
    body = (
        _command_element(0x0002, CT.encode())
        + _command_element(0x0100, struct.pack("<H", 0x0001))
        + _command_element(0x0110, struct.pack("<H", 7))
        + _command_element(0x0700, struct.pack("<H", 0))
        + _command_element(0x0800, struct.pack("<H", 0x0000))
        + _command_element(0x1000, instance)
    )
    command = _command_element(0x0000, struct.pack("<L", len(body))) + body
    data_set = (
        _element(0x0008, 0x0016, b"UI", CT.encode())
        + _element(0x0008, 0x0018, b"UI", instance)
        + _element(0x0008, 0x0060, b"CS", b"CT")
        + _element(0x0010, 0x0010, b"PN", b"FUZZ^PATIENT")
        + _element(0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.8.498.2\x00")
        + _element(0x7FE0, 0x0010, b"OB", bytes(3000))
    )
    third = len(data_set) // 3
    fragments = [data_set[:third], data_set[third : 2 * third], data_set[2 * third :]]
    contexts = [(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)), (3, CT, (EXPLICIT_LITTLE,))]
    return (
        associate_rq(contexts=contexts)
        + p_data_tf([(3, 0x03, command)])
        + p_data_tf([(3, 0x00, fragments[0])])
        + p_data_tf([(3, 0x00, fragments[1])])
        + p_data_tf([(3, 0x02, fragments[2])])
        + RELEASE
    )


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        position = rng.randrange(len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[position] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[position : position + 4] = struct.pack(">L", rng.choice(INTERESTING))
        elif kind == 2:
            out[position : position + 2] = struct.pack(">H", rng.choice(INTERESTING) & 0xFFFF)
        elif kind == 3:
            out[position:position] = rng.randbytes(rng.randint(1, 32))
        elif kind == 4:
            del out[position : position + rng.randint(1, 32)]
        elif kind == 5:
            del out[position:]
        else:  # another PDU type where one starts
            start = rng.choice([0, len(associate_rq())])
            if start < len(out):
                out[start] = rng.randint(0, 9)
    return bytes(out)


def send(port: int, data: bytes) -> None:
    """Send a stream, read what comes back for a moment, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(data)
            sock.settimeout(0.05)
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except OSError:
            pass  # aborted, reset or silent: all fine, as long as the server survives


def _answered_pdu_types(port: int, data: bytes) -> list[int]:
    """The types of the PDUs the server sends back for the stream *data*."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    types = []
    while len(received) >= 6:
        pdu_type, _, length = struct.unpack(">BBL", received[:6])
        types.append(pdu_type)
        received = received[6 + length :]
    return types


@pytest.mark.parametrize("kind", ["echo", "store"])
def test_mutated_pdus_do_not_break_the_server(make_proxy, kind: str) -> None:
    proxy = make_proxy(listen={"max_pdu_size": 16384, "network_timeout": 5, "acse_timeout": 5})
    port = proxy.port
    assert echoscu(port) == 0
    rng = random.Random(20240605)  # CI sends the same streams every time
    base = conversation() if kind == "echo" else store_conversation()
    assert _answered_pdu_types(port, base)[:2] == [0x02, 0x04]  # accepted, a C-STORE/C-ECHO-RSP
    started = time.monotonic()
    sent = 0
    for _ in range(COUNT):
        if time.monotonic() - started > BUDGET_S:
            break
        data = mutate(base, rng)
        try:
            send(port, data)
        except OSError:
            CRASHERS.mkdir(exist_ok=True)
            name = f"pdu-{hashlib.sha256(data).hexdigest()[:16]}.bin"
            (CRASHERS / name).write_bytes(data)
            pytest.fail(f"the server stopped accepting connections; stream saved as {name}")
        sent += 1
    assert sent >= min(COUNT, 100)
    # No fuzzed association lingers past the time-outs, and the server still serves.
    assert wait_for(lambda: proxy.active_associations() == 0, timeout=15), (
        proxy.active_associations()
    )
    assert echoscu(port) == 0

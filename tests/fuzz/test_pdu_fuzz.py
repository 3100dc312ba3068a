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
import threading
import time
from pathlib import Path

import pytest

from peers import associate_rq, conversation, echoscu, store_conversation, wait_for

pytestmark = pytest.mark.integration

CRASHERS = Path(__file__).parent / "crashers"
COUNT = int(os.environ.get("ANONPROXY_PDU_FUZZ_COUNT", "300"))
SEED = int(os.environ.get("ANONPROXY_PDU_FUZZ_SEED", "20240605"))  # CI: the same streams
BUDGET_S = float(os.environ.get("ANONPROXY_PDU_FUZZ_BUDGET_S", "45"))
INTERESTING = [0, 1, 2, 6, 0x7F, 0x80, 0xFF, 0x4000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


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
def test_mutated_pdus_do_not_break_the_server(
    make_proxy, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised: list[str] = []  # exceptions that ended a thread (pynetdicom's DUL thread, say)
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type.__name__))
    proxy = make_proxy(listen={"max_pdu_size": 16384, "network_timeout": 5, "acse_timeout": 5})
    port = proxy.port
    assert echoscu(port) == 0
    rng = random.Random(SEED)
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
    assert raised == []

"""DICOM audit messages over syslog, to a receiver the test runs on loopback."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from conftest import corpus_identifying_values
from peers import Pki, storescu, wait_for

pytestmark = pytest.mark.integration

HEADER = rb"<85>1 "  # facility 10 (authpriv) * 8 + severity 5 (notice)


class Receiver:
    """A syslog server on loopback: UDP datagrams, or RFC 5425 octet-counted TCP/TLS frames."""

    def __init__(self, transport: str, context: ssl.SSLContext | None = None) -> None:
        self.transport = transport
        self.context = context
        self.messages: list[bytes] = []
        self.errors: list[str] = []
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if transport != "udp":
            self.sock.listen()
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.transport == "udp":
                    self.messages.append(self.sock.recv(65535))
                    continue
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(None)
        if self.context is not None:
            connection = self.context.wrap_socket(connection, server_side=True)
        buffer = b""
        with connection:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if not length.isdigit():
                        self.errors.append(f"bad frame: {buffer[:40]!r}")
                        return
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[: int(length)])
                    buffer = rest[int(length) :]

    def audit_messages(self) -> list[ET.Element]:
        roots = []
        for message in self.messages:
            header, bom, xml = message.partition(b"\xef\xbb\xbf")
            assert bom, message[:80]
            fields = header.split(b" ")
            assert fields[0] in {b"<85>1", b"<84>1"}  # authpriv.notice or .warning, version 1
            assert fields[5:7] == [b"IHE+RFC-3881", b"-"], header
            assert fields[3] == b"anonproxy"
            roots.append(ET.fromstring(xml))  # noqa: S314 - from our own proxy
        return roots

    def event_ids(self) -> list[str | None]:
        return [
            r.find("EventIdentification/EventID").get("csd-code") for r in self.audit_messages()
        ]  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


def _ct(corpus: list[Path]) -> Path:
    return next(p for p in corpus if p.name == "CT_small.dcm")


def _send_and_check(
    make_proxy: Any, tmp_path: Path, corpus: list[Path], receiver: Receiver, syslog: dict[str, Any]
) -> None:
    proxy = make_proxy(audit={"path": str(tmp_path / "var" / "audit.jsonl"), "syslog": syslog})
    sent = storescu(proxy.port, [_ct(corpus)])
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert "Store Failed" not in sent.stderr
    # application start, login, logout, one instance transferred
    wanted = {"110100", "110114", "110104"}
    assert wait_for(lambda: wanted <= set(receiver.event_ids()), timeout=20), receiver.event_ids()
    assert receiver.errors == []
    roots = receiver.audit_messages()
    transferred = [
        r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == "110104"
    ]  # type: ignore[union-attr]
    assert len(transferred) == 1
    assert (
        transferred[0].findtext(
            "ParticipantObjectIdentification/ParticipantObjectDescription/Anonymized"
        )
        == "true"
    )
    logins = [
        r
        for r in roots
        if r.find("EventIdentification/EventTypeCode[@csd-code='110122']") is not None
    ]
    assert logins
    assert logins[0].find("ActiveParticipant").get("UserID") == "MODALITY"  # type: ignore[union-attr]
    assert any(m.startswith(HEADER) for m in receiver.messages)
    phi = corpus_identifying_values([_ct(corpus)])
    text = b"\n".join(receiver.messages).decode("utf-8")
    assert not [value for value in phi if value in text]
    proxy.stop(timeout=5)
    assert wait_for(lambda: receiver.event_ids().count("110100") == 2, timeout=5)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_udp_datagrams_and_tcp_octet_counted_frames(
    make_proxy, tmp_path: Path, corpus: list[Path], transport: str
) -> None:
    receiver = Receiver(transport)  # one datagram per message / RFC 5425 framing
    try:
        _send_and_check(
            make_proxy,
            tmp_path,
            corpus,
            receiver,
            {"host": "127.0.0.1", "port": receiver.port, "transport": transport},
        )
    finally:
        receiver.close()


def test_tls_with_the_test_ca(make_proxy, tmp_path: Path, corpus: list[Path]) -> None:
    pki = Pki(tmp_path / "pki").create()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.load_verify_locations(cafile=str(pki.ca))
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    receiver = Receiver("tls", context)
    syslog = {
        "host": "127.0.0.1",
        "port": receiver.port,
        "transport": "tls",
        "ca_certificates": str(pki.ca),
        "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key),
    }
    try:
        _send_and_check(make_proxy, tmp_path, corpus, receiver, syslog)
    finally:
        receiver.close()


def test_dead_syslog_server_does_not_slow_a_store(
    make_proxy, tmp_path: Path, corpus: list[Path]
) -> None:
    with socket.socket() as probe:  # a closed port: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    baseline = make_proxy()
    started = time.monotonic()
    assert storescu(baseline.port, [_ct(corpus)]).returncode == 0
    plain = time.monotonic() - started

    proxy = make_proxy(
        storage={"path": str(tmp_path / "var2"), "min_free_bytes": 0},
        audit={
            "path": str(tmp_path / "var2" / "audit.jsonl"),
            "syslog": {"host": "127.0.0.1", "port": port, "transport": "tcp"},
        },
    )
    started = time.monotonic()
    sent = storescu(proxy.port, [_ct(corpus)])
    elapsed = time.monotonic() - started
    assert sent.returncode == 0
    assert "Store Failed" not in sent.stderr
    assert elapsed < plain + 1.0, (elapsed, plain)
    started = time.monotonic()
    proxy.stop(timeout=5)
    assert time.monotonic() - started < 4.0

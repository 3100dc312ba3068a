"""A scripted hostile peer against a running proxy on loopback (issue 5, items 3 and 4).

Raw-socket peers send protocol violations (an absurd PDU length, garbage after a valid
A-ASSOCIATE-RQ, a PDV longer than its PDU, a P-DATA-TF longer than advertised); a pynetdicom
requestor sends malformed data sets as they are (truncated, bad VR, an undefined-length
sequence without delimiter, odd lengths, an unknown character set, deep nesting, an oversized
instance, a deflate bomb). Each gets an A-ABORT or a failure status and an audit event; the
server survives, and a normal DCMTK storescu association right after succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite

from peers import (
    RawPeer,
    associate_rq,
    echoscu,
    p_data_tf,
    send_body,
    store_conversation,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
A_ABORT = 0x07
A_ASSOCIATE_AC = 0x02


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "var" / "audit.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _events(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in _audit(tmp_path) if e["event"] == name]


def _received(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "var" / "received").rglob("*.dcm"))


def body_of(ds: Dataset) -> bytes:
    """The encoded data set (Explicit VR Little Endian), without preamble and file meta."""
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    (group_length,) = struct.unpack_from("<L", data, 140)  # (0002,0000) UL, after the preamble
    return data[132 + 12 + group_length :]


def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, encoded as given (odd lengths included)."""
    if vr in {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"}:
        return struct.pack("<HH2sHL", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def minimal_ct(**values: str) -> Dataset:
    """A small CT instance without pixel data."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.999.2.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.2.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.2.3"
    ds.Modality = "CT"
    ds.PatientName = values.get("name", "HOSTILE^PEER")
    ds.PatientID = values.get("id", "HOSTILE0001")
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def nested(depth: int, leaf: str) -> Dataset:
    """minimal_ct with RequestAttributesSequence nested *depth* levels deep."""
    ds = minimal_ct()
    current = ds
    for _ in range(depth):
        item = Dataset()
        current.RequestAttributesSequence = [item]
        current = item
    current.RequestedProcedureDescription = leaf
    return ds


def malformed_bodies(ct_small: Path, **plant: str) -> dict[str, tuple[str, bytes]]:
    """Malformed data sets (transfer syntax, body), keyed by what is wrong with them. Every
    one carries the planted values (name, id, desc) somewhere."""
    name, pid, desc = plant.get("name", "HOSTILE^PEER"), plant.get("id", "HOST1"), "HOSTDESC"
    desc = plant.get("desc", desc)
    base = body_of(minimal_ct(name=name, id=pid))
    full = dcmread(ct_small)
    full.PatientName, full.PatientID = name, pid
    whole = body_of(full)
    after = 0x0040  # groups after those of minimal_ct: elements stay in tag order
    no_delimiter = (
        element(after, 0x0275, b"SQ", b"")[:-4]
        + b"\xff\xff\xff\xff"  # undefined length ...
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)  # ... an undefined-length item ...
        + element(after, 0x1001, b"SH", desc.encode().ljust(16)[:16])  # ... never delimited
    )
    bomb = base + element(0x7FE0, 0x0010, b"OB", bytes(24 * 1024 * 1024))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated_bomb = compressor.compress(bomb) + compressor.flush()
    return {
        "truncated": (EXPLICIT_LE, whole[: len(whole) * 3 // 5]),
        "bad_vr": (EXPLICIT_LE, base + element(after, 0x0254, b"ZZ", desc.encode().ljust(16))),
        "undelimited_sequence": (EXPLICIT_LE, base + no_delimiter),
        "odd_length": (
            EXPLICIT_LE,
            base + element(after, 0x0254, b"LO", (desc + "X")[:15].encode().ljust(15)),
        ),
        "unknown_character_set": (
            EXPLICIT_LE,
            element(0x0008, 0x0005, b"CS", b"ISO_IR 999") + base,
        ),
        "too_deep": (EXPLICIT_LE, body_of(nested(40, desc))),
        "too_large": (EXPLICIT_LE, base + element(0x7FE0, 0x0010, b"OB", bytes(3_000_000))),
        "deflate_bomb": (DEFLATED, deflated_bomb),
    }


def _is_abort(pdus: list[tuple[int, bytes]]) -> bool:
    """The last PDU is an A-ABORT from the service provider, invalid-PDU-parameter-value."""
    return bool(pdus) and pdus[-1][0] == A_ABORT and pdus[-1][1][2:4] == b"\x02\x06"


def test_hostile_peer_cannot_crash_the_server_and_storescu_follows(
    make_proxy, tmp_path: Path, corpus: list[Path]
) -> None:
    proxy = make_proxy(
        listen={"max_pdu_size": 16384, "max_instance_bytes": 2_000_000, "network_timeout": 10}
    )
    port = proxy.port

    # 1. An A-ASSOCIATE-RQ declaring 4 GiB: A-ABORT before the body is read.
    peer = RawPeer(port)
    peer.send(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\x00\x01" + bytes(64))
    assert _is_abort(peer.pdus_until_closed())
    peer.close()

    # 2. Garbage after a valid A-ASSOCIATE-RQ: A-ASSOCIATE-AC, then A-ABORT.
    peer = RawPeer(port)
    peer.send(associate_rq() + b"\xde\xad\xbe\xef" * 64)
    pdus = peer.pdus_until_closed()
    assert [p[0] for p in pdus] == [A_ASSOCIATE_AC, A_ABORT]
    assert pdus[-1][1][2:4] == b"\x02\x01"  # service provider, unrecognized PDU
    peer.close()

    # 3. A P-DATA-TF whose PDV claims more than the PDU holds.
    peer = RawPeer(port)
    peer.send(associate_rq())
    assert peer.read_pdu()[0] == A_ASSOCIATE_AC  # type: ignore[index]
    bad_pdv = struct.pack(">BBLLBB", 0x04, 0, 12, 0x7FFFFFFF, 1, 0x03) + b"\x00" * 6
    peer.send(bad_pdv)
    assert _is_abort(peer.pdus_until_closed())
    peer.close()

    # 4. A P-DATA-TF longer than the 16384 bytes advertised: refused on its header alone.
    peer = RawPeer(port)
    peer.send(associate_rq())
    assert peer.read_pdu()[0] == A_ASSOCIATE_AC  # type: ignore[index]
    peer.send(p_data_tf([(1, 0x03, b"\x00" * 20000)]))
    assert _is_abort(peer.pdus_until_closed())
    peer.close()

    # audited as the abort leaves (relayed to the service by an acceptor process: just after)
    assert wait_for(lambda: len(_events(tmp_path, "association.protocol_violation")) >= 4, 10)
    violations = _events(tmp_path, "association.protocol_violation")
    assert [(v["reason"], v["pdu_type"]) for v in violations] == [
        ("pdu_too_long", 0x01),
        ("unknown_pdu_type", 0xDE),
        ("pdv_length_inconsistent", 0x04),
        ("pdu_too_long", 0x04),
    ]
    assert violations[0]["declared_length"] == 0xFFFFFFF0
    assert violations[3]["limit"] == 16384
    closing = {"association.aborted", "association.closed"}  # whichever pynetdicom reports first
    assert wait_for(
        lambda: sum(e["event"] in closing for e in _audit(tmp_path)) >= 3, timeout=10
    ), [e["event"] for e in _audit(tmp_path)]

    # 5. Malformed data sets in C-STORE: each a failure status and an instance.failed record.
    ct_small = next(p for p in corpus if p.name == "CT_small.dcm")
    expected = {
        "too_large": 0xA701,
        "deflate_bomb": 0xA701,
        "too_deep": 0xC000,
        "odd_length": 0xC000,
        "unknown_character_set": 0xC000,
    }
    for name, (syntax, body) in malformed_bodies(ct_small).items():
        status = send_body(port, CT_IMAGE, syntax, body, tmp_path / "raw")
        assert status is not None, name
        code = int(status.Status)
        assert code == expected.get(name, code), (name, hex(code))
        assert 0xA700 <= code <= 0xA7FF or 0xC000 <= code <= 0xCFFF, (name, hex(code))
        assert "ErrorComment" in status, name
    assert wait_for(lambda: len(_events(tmp_path, "instance.failed")) >= 8, 10)
    time.sleep(0.2)  # no ninth record follows
    assert len(_events(tmp_path, "instance.failed")) == 8
    assert not _received(tmp_path)  # nothing un-de-identified goes anywhere

    # The server is still serving: C-ECHO and a normal storescu association succeed.
    assert echoscu(port) == 0
    sent = storescu(port, [ct_small])
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert "Store Failed" not in sent.stderr
    assert wait_for(lambda: len(_received(tmp_path)) == 1, timeout=30)


def _command(number: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, number, len(value)) + value


def test_a_c_store_without_a_data_set_is_refused_and_the_server_serves_on(
    make_proxy, tmp_path: Path
) -> None:
    proxy = make_proxy()
    ct = "1.2.840.10008.5.1.4.1.1.2"
    body = (
        _command(0x0002, ct.encode() + b"\x00")
        + _command(0x0100, struct.pack("<H", 0x0001))  # C-STORE-RQ
        + _command(0x0110, struct.pack("<H", 7))
        + _command(0x0700, struct.pack("<H", 0))
        + _command(0x0800, struct.pack("<H", 0x0101))  # no data set follows
        + _command(0x1000, b"1.2.826.0.1.3680043.10.999.7\x00")
    )
    command = _command(0x0000, struct.pack("<L", len(body))) + body
    peer = RawPeer(proxy.port)
    peer.send(associate_rq(contexts=((1, ct, ("1.2.840.10008.1.2",)),)))
    assert peer.read_pdu()[0] == 0x02  # type: ignore[index]  # A-ASSOCIATE-AC
    peer.send(p_data_tf([(1, 0x03, command)]))
    answer = peer.read_pdu()
    peer.close()
    assert answer is not None
    assert answer[0] == 0x04  # P-DATA-TF: the C-STORE-RSP
    assert struct.pack("<HHLH", 0x0000, 0x0900, 2, 0xC000) in answer[1]  # Status 0xC000
    assert wait_for(lambda: _events(tmp_path, "instance.failed"), 10)
    failed = _events(tmp_path, "instance.failed")
    assert [e["reason"] for e in failed] == ["no data set"]
    assert echoscu(proxy.port) == 0


def test_a_c_store_cut_off_by_a_reset_is_audited_and_leaves_no_file_open(
    make_proxy, tmp_path: Path
) -> None:
    """Peers that reset the connection in the middle of a data set (after its first fragment):
    each association is audited as ended, and each half-received file is removed with its
    descriptor closed. Before, a reset raised in the read of the data set's straight path and
    pynetdicom ended the association without EVT_ABORTED (no audit record); and a data set
    left half-received kept its descriptor, and its blocks on disk, for the life of the
    process (pynetdicom closes a data set's file only after its C-STORE handler)."""
    proxy = make_proxy(listen={"processes": 1, "network_timeout": 5, "acse_timeout": 5})
    deferred = tmp_path / "var" / "spool" / "deferred"
    stream = store_conversation()
    cut = len(stream) - 1500  # into the second of the data set's three PDUs
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(stream[:cut])
            time.sleep(0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_for(lambda: proxy.active_associations() == 0, 15)
    ended = ("association.aborted", "association.closed")
    assert wait_for(lambda: sum(len(_events(tmp_path, name)) for name in ended) == 5, 10)

    def received_open() -> list[str]:  # descriptors of this process on received files
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in links if link.startswith(f"{deferred}/.recv-")]

    assert wait_for(lambda: not any(link.endswith("(deleted)") for link in received_open()), 5)
    assert all(os.path.getsize(link) == 0 for link in received_open())  # created ahead only
    assert [p.name for p in deferred.iterdir() if p.stat().st_size] == []
    assert echoscu(proxy.port) == 0


def test_a_release_is_audited_as_released_when_the_peer_closes_at_once(
    make_proxy, tmp_path: Path
) -> None:
    # The peer closes as soon as the A-RELEASE-RP is on its way; pynetdicom may then report
    # the closed connection before the release.
    proxy = make_proxy()
    for _ in range(10):
        peer = RawPeer(proxy.port)
        peer.send(associate_rq())
        assert peer.read_pdu()[0] == A_ASSOCIATE_AC  # type: ignore[index]
        peer.send(struct.pack(">BBLL", 0x05, 0, 4, 0))  # A-RELEASE-RQ
        assert peer.read_pdu()[0] == 0x06  # type: ignore[index]  # A-RELEASE-RP
        peer.close()
    ending = {"association.released", "association.aborted", "association.closed"}
    assert wait_for(lambda: sum(e["event"] in ending for e in _audit(tmp_path)) >= 10, timeout=10)
    assert [e["event"] for e in _audit(tmp_path) if e["event"] in ending] == [
        "association.released"
    ] * 10


def test_storescu_within_a_small_max_pdu_size_is_not_refused(
    make_proxy, tmp_path: Path, corpus: list[Path]
) -> None:
    """The PDU guard refuses only what exceeds the advertised length: DCMTK and pynetdicom
    senders that honour a 16 KiB maximum get through, deflated instances included."""
    proxy = make_proxy(listen={"max_pdu_size": 16384})
    files = [p for p in corpus if p.name in {"CT_small.dcm", "image_dfl.dcm", "rtplan.dcm"}]
    sent = storescu(proxy.port, files)
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert "Store Failed" not in sent.stderr
    assert wait_for(lambda: len(_received(tmp_path)) == 3, timeout=30)
    ds = minimal_ct()
    status = send_body(proxy.port, CT_IMAGE, EXPLICIT_LE, body_of(ds), tmp_path / "raw")
    assert status is not None
    assert int(status.Status) == 0x0000
    assert not _events(tmp_path, "association.protocol_violation")


PLANTED = {
    "PatientName": "ZQPLANTNAME^XAVERIA",
    "PatientID": "ZQPID7731",
    "AccessionNumber": "ZQACC55120",
    "InstitutionName": "ZQ PLANTED HOSPITAL",
    "StudyDescription": "ZQSTUDYDESC PLANTED",
    "SeriesDescription": "ZQSERIESDESC PLANTED",
}
PLANTED_PRIVATE = "ZQPRIVATE VALUE"
PLANTED_NESTED = "ZQNESTED PROCEDURE"


def plant(source: Path, target: Path) -> Path:
    """A corpus file with distinctive values in identifying attributes, a private element and
    a nested sequence."""
    ds = dcmread(source)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    block = ds.private_block(0x0011, "ZQ CREATOR", create=True)
    block.add_new(0x01, "LO", PLANTED_PRIVATE)
    item = Dataset()
    item.RequestedProcedureDescription = PLANTED_NESTED
    item.ScheduledProcedureStepID = "ZQSPS0042"
    ds.RequestAttributesSequence = [item]
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_no_planted_value_leaks_from_a_running_proxy(tmp_path: Path, corpus: list[Path]) -> None:
    import signal
    import subprocess

    from conftest import serve
    from peers import free_port, wait_port

    names = {"CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm", "image_dfl.dcm"}
    planted = [plant(p, tmp_path / "planted" / p.name) for p in corpus if p.name in names]
    port = free_port()
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port, "max_instance_bytes": 2_000_000},
                "storage": {"path": str(tmp_path / "var"), "min_free_bytes": 0,
                            "keep_rejected_inputs": False},
                "audit": {"path": str(tmp_path / "var" / "audit.jsonl"), "stdout": True},
                "log": {"level": "DEBUG"},
            }
        ),
        "utf-8",
    )  # fmt: skip
    server = serve(config, tmp_path, stdout=subprocess.PIPE)
    comments: list[str] = []
    try:
        wait_port(port, timeout=30)
        sent = storescu(port, planted)
        assert sent.returncode == 0, sent.stderr[-2000:]
        bodies = malformed_bodies(
            planted[0], name=PLANTED["PatientName"], id=PLANTED["PatientID"], desc=PLANTED_NESTED
        )
        for syntax, body in bodies.values():
            status = send_body(port, CT_IMAGE, syntax, body, tmp_path / "raw")
            assert status is not None
            assert int(status.Status) != 0
            comments.append(str(status.get("ErrorComment", "")))
        # A peer that breaks the protocol with planted bytes in its PDUs.
        peer = RawPeer(port)
        peer.send(associate_rq(calling="MODALITY") + p_data_tf([(1, 0x02, body)])[:200])
        peer.pdus_until_closed()
        peer.close()
        assert wait_for(lambda: len(_received(tmp_path)) == len(planted), timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=30)
    values = {*PLANTED.values(), PLANTED_PRIVATE, PLANTED_NESTED, "ZQSPS0042"}
    values |= {v.split("^")[0] for v in values}  # parts of the name, too
    audit = (tmp_path / "var" / "audit.jsonl").read_text("utf-8")
    assert "instance.failed" in audit
    outputs = {
        "audit": audit,
        "stdout": stdout,
        "stderr": stderr,
        "file names": "\n".join(str(p) for p in (tmp_path / "var").rglob("*")),
        "ErrorComments": "\n".join(comments),
    }
    for where, text in outputs.items():
        leaked = sorted(v for v in values if v.lower() in text.lower())
        assert not leaked, (where, leaked)
    for path in _received(tmp_path):
        data = path.read_bytes()
        assert not [v for v in values if v.encode() in data], path.name

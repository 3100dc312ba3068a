"""Parallel associations to one destination (anonproxy.forward's AssociationGate): several
deliver every instance once, a destination that serves fewer gets every instance all the same
(no retry counted, nothing quarantined), a worker hands its sender batches and counts only what
was sent, and the Maximum Length we propose and send with (real peers on loopback: a
pynetdicom SCP, DCMTK storescp)."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from anonproxy.audit import AuditLog
from anonproxy.config import DicomDestinationConfig
from anonproxy.forward import (
    BATCH,
    PROPOSED_MAX_PDU,
    AssociationGate,
    DicomSender,
    ForwardWorker,
    ProcessSender,
    gate_of,
    make_worker,
)
from anonproxy.spool import Spool

import builders
from conftest import audit_records
from peers import RefusingSCP, StoreSCP, free_port, wait_for

pytestmark = pytest.mark.integration


def _destination(port: int, ae_title: str, **fields: object) -> DicomDestinationConfig:
    return DicomDestinationConfig.model_validate(
        {
            "name": "research",
            "ae_title": ae_title,
            "host": "127.0.0.1",
            "port": port,
            "acse_timeout": 10,
            "dimse_timeout": 10,
            "network_timeout": 10,
            **fields,
        }
    )


class Forwarding:
    """A spool with one destination queue and its forward workers, as the service makes them."""

    def __init__(self, root: Path, config: DicomDestinationConfig) -> None:
        self.spool = Spool(root / "storage", ["research"], fsync=False)
        self.audit_path = root / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.workers: list[ForwardWorker] = [
            make_worker(config, self.spool, self.audit, calling_ae_title="ANONPROXY", index=i)
            for i in range(config.max_associations)
        ]
        self.gate = gate_of(self.spool.queues["research"], config.max_associations)

    def put(self, paths: list[Path]) -> list[str]:
        """Commit *paths* to the queue as the pipeline does; returns their SOP Instance UIDs."""
        uids = []
        for path in paths:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            staged = self.spool.stage()
            shutil.copyfile(path, staged)
            self.spool.commit(staged, uid, ["research"])
            self.spool.unstage(staged)
            uids.append(uid)
        return uids

    def start(self) -> None:
        for worker in self.workers:
            assert isinstance(worker.sender, ProcessSender)
            worker.sender.prepare()
        for worker in self.workers:
            assert isinstance(worker.sender, ProcessSender)
            assert worker.sender.started(60)
        for worker in self.workers:
            worker.start()

    def drained(self) -> bool:
        return len(self.spool.queues["research"]) == 0

    def events(self, name: str) -> list[dict[str, object]]:
        return [r for r in audit_records(self.audit_path) if r["event"] == name]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.spool.close()
        for worker in self.workers:
            worker.join(15)


@pytest.fixture
def peers() -> Iterator[list[RefusingSCP]]:
    started: list[RefusingSCP] = []
    yield started
    for peer in started:
        peer.stop()


def test_several_associations_deliver_every_instance_once(
    tmp_path: Path, peers: list[RefusingSCP]
) -> None:
    peer = RefusingSCP(0x0000, delay=0.02).start()  # 20 ms per C-STORE: worth parallel ones
    peers.append(peer)
    forwarding = Forwarding(tmp_path, _destination(peer.port, peer.ae_title, max_associations=4))
    uids = forwarding.put(builders.make_series(tmp_path / "series", 60, rows=32))
    try:
        forwarding.start()
        assert wait_for(forwarding.drained, timeout=60)
    finally:
        forwarding.stop()
    received = Counter(uid for _, uid in peer.stored)
    assert sorted(received) == sorted(uids)
    assert set(received.values()) == {1}  # every instance once
    associations = Counter(association for association, _ in peer.stored)
    assert len(associations) >= 2  # in parallel: more than one association carried them
    assert len(forwarding.events("instance.forwarded")) == 60
    assert not forwarding.events("instance.forward_retry")


def test_a_worker_hands_its_sender_batches_of_what_is_due(
    tmp_path: Path, peers: list[RefusingSCP]
) -> None:
    peer = RefusingSCP(0x0000).start()
    peers.append(peer)
    forwarding = Forwarding(tmp_path, _destination(peer.port, peer.ae_title, max_associations=1))
    uids = forwarding.put(builders.make_series(tmp_path / "series", 4 * BATCH, rows=32))
    (worker,) = forwarding.workers
    assert isinstance(worker.sender, ProcessSender)
    batches: list[int] = []
    send_each = worker.sender.send_each

    def counted(paths: list[Path]) -> Iterator[int | Exception]:
        batches.append(len(paths))
        return send_each(paths)

    worker.sender.send_each = counted  # type: ignore[method-assign]
    try:
        forwarding.start()
        assert wait_for(forwarding.drained, timeout=60)
    finally:
        forwarding.stop()
    assert sorted(uid for _, uid in peer.stored) == sorted(uids)
    assert batches == [BATCH] * 4  # all were due: full batches, one request each
    forwarded = forwarding.events("instance.forwarded")
    assert len(forwarded) == 4 * BATCH
    assert {e["attempts"] for e in forwarded} == {1}


def test_a_worker_takes_one_at_a_time_while_another_association_is_open(tmp_path: Path) -> None:
    """Batches only while its association is the destination's only one: with others open, what
    it leaves in the queue goes out in parallel."""
    forwarding = Forwarding(tmp_path, _destination(free_port(), "RESEARCH", max_associations=2))
    first, second = forwarding.workers
    assert first._batch(BATCH) == BATCH  # none open yet
    forwarding.gate.opened(first.sender)
    assert first._batch(BATCH) == BATCH  # its own, alone
    assert forwarding.gate.admit(second.sender, lambda: 10, 1.0, first=False)
    assert first._batch(BATCH) == BATCH  # a further one being opened: perhaps never answered
    forwarding.gate.opened(second.sender)
    assert first._batch(BATCH) == second._batch(BATCH) == 1
    forwarding.gate.closed(second.sender)
    assert first._batch(BATCH) == BATCH


def test_a_refused_batch_counts_one_attempt_per_instance_sent(
    tmp_path: Path, peers: list[RefusingSCP]
) -> None:
    """Out of Resources for the first instance of a batch: the others are not sent, and
    neither counted nor backed off; the worker backs off once per instance the peer saw."""
    peer = RefusingSCP(0xA700).start()
    peers.append(peer)
    forwarding = Forwarding(tmp_path, _destination(peer.port, peer.ae_title, max_associations=1))
    forwarding.put(builders.make_series(tmp_path / "series", BATCH + 2, rows=32))
    try:
        forwarding.start()
        assert wait_for(lambda: peer.calls >= 3, timeout=30)
    finally:
        forwarding.stop()
    retries = forwarding.events("instance.forward_retry")
    assert len(retries) == peer.calls  # one record, and one back-off, per instance sent
    queue = forwarding.spool.queues["research"]
    assert len(queue) == BATCH + 2  # nothing lost, nothing quarantined
    assert not forwarding.events("instance.quarantined")
    attempts = Counter(str(e["deid_sop_instance_uid"]) for e in retries)
    assert sum(attempts.values()) == peer.calls


@pytest.mark.parametrize("peer_kind", ["rejects a second association", "serves one at a time"])
def test_a_destination_taking_one_association_gets_every_instance_without_quarantine(
    tmp_path: Path, peers: list[RefusingSCP], peer_kind: str
) -> None:
    """pynetdicom with maximum_associations=1 rejects the second (rejected-transient, local
    limit exceeded); DCMTK's storescp without --fork never answers it while the first is
    open. Either way the other workers wait: nothing is retried, quarantined or lost."""
    scp: StoreSCP | None = None
    if peer_kind == "rejects a second association":
        peer = RefusingSCP(0x0000, max_associations=1, delay=0.01).start()
        peers.append(peer)
        config = _destination(peer.port, peer.ae_title, max_associations=4)
    else:
        scp = StoreSCP(tmp_path / "research").start()
        config = _destination(scp.port, "RESEARCH", max_associations=4)
    forwarding = Forwarding(tmp_path, config)
    uids = forwarding.put(builders.make_series(tmp_path / "series", 80, rows=32))
    try:
        forwarding.start()
        assert wait_for(forwarding.drained, timeout=90)
        # degraded to what the destination serves (storescp: once the probe of a further
        # association, which holds no instance, has timed out)
        assert wait_for(lambda: forwarding.gate.limit == 1, timeout=10)
    finally:
        forwarding.stop()
        if scp is not None:
            scp.stop()
    if scp is not None:
        assert len(scp.files()) == 80
    else:
        assert sorted(uid for _, uid in peers[0].stored) == sorted(uids)
    forwarded = forwarding.events("instance.forwarded")
    assert sorted(str(e["deid_sop_instance_uid"]) for e in forwarded) == sorted(uids)
    assert {e["attempts"] for e in forwarded} == {1}  # a refused further association: no try
    assert not forwarding.events("instance.forward_retry")
    assert not forwarding.events("instance.quarantined")
    assert not list((tmp_path / "storage" / "quarantine").glob("*/*.dcm"))


def test_a_further_association_is_opened_before_an_instance_is_taken(tmp_path: Path) -> None:
    """A PACS that serves one association at a time never answers a further one: the worker
    admitted to try one finds out before it takes an instance (it used to take one, and hold
    it the probe's 2 s before giving it back: the last of a series arrived that much later)."""
    scp = StoreSCP(tmp_path / "research").start()  # DCMTK storescp: one association at a time
    holder = AE("HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", scp.port, ae_title="RESEARCH")
    gate = AssociationGate(4)
    gate.opened("another worker")  # the destination's one association
    sender = ProcessSender(
        _destination(scp.port, "RESEARCH", max_associations=4), "ANONPROXY", gate=gate, first=False
    )
    try:
        assert held.is_established
        sender.prepare()
        assert sender.started(60)
        assert sender.ready(lambda: 10, 0.1) is False  # tried, and no instance taken for it
        assert gate.limit == 1
        held.release()  # storescp is free: a further association is established
        gate.limit = 4  # (the gate tries one again after a while)
        assert sender.ready(lambda: 10, 0.1) is True
        assert gate.open == 2
    finally:
        sender.close()
        if held.is_established:
            held.release()
        scp.stop()


def test_proposes_any_length_and_sends_pdus_of_the_destinations_maximum(
    tmp_path: Path, peers: list[RefusingSCP]
) -> None:
    peer = RefusingSCP(0x0000, max_pdu=131072).start()  # DCMTK's and Orthanc's largest
    peers.append(peer)
    (large,) = builders.make_series(tmp_path, 1, rows=512, frames=2)  # 1 MiB of pixels
    sender = DicomSender(_destination(peer.port, peer.ae_title), "ANONPROXY")
    try:
        assert sender.send(large) == 0x0000
    finally:
        sender.close()
    assert peer.requested_max_pdu == [PROPOSED_MAX_PDU] == [0]  # responses of any length
    # PDVs as large as the destination takes (less the PDV item's header), not more
    assert 131072 - 16 < max(peer.pdv_lengths) <= 131072
    assert sum(peer.pdv_lengths) > large.stat().st_size - 1024


def test_storescp_sees_our_maximum_length(tmp_path: Path) -> None:
    """DCMTK's own account of the negotiation (storescp -d): we propose no limit (0), and it
    offers the Maximum Length it was started with."""
    log = tmp_path / "storescp.log"
    scp = StoreSCP(tmp_path / "research", extra=["-d", "--max-pdu", "65536"], log=log).start()
    (instance,) = builders.make_series(tmp_path / "one", 1, rows=256)
    sender = DicomSender(_destination(scp.port, "RESEARCH"), "ANONPROXY")
    try:
        assert sender.send(instance) == 0x0000
    finally:
        sender.close()
        scp.stop()
    text = log.read_text("utf-8", "replace")
    assert re.search(r"Their Max PDU Receive Size: +0\b", text), text[-2000:]
    assert re.search(r"Our Max PDU Receive Size: +65536\b", text)
    assert len(scp.files()) == 1


# --- the gate's rules, without peers ----------------------------------------------------------


def test_gate_opens_one_association_at_a_time_and_further_ones_only_for_a_backlog() -> None:
    gate = AssociationGate(3)
    first, second, third = object(), object(), object()
    assert gate.admit(second, lambda: 10, 0.0, first=False) is None  # none open: not a further
    assert gate.admit(first, lambda: 0, 0.0) is False  # the only one, even with nothing waiting
    assert gate.admit(second, lambda: 10, 0.0, first=False) is None  # first is still opening
    gate.opened(first)
    assert gate.admit(second, lambda: 3, 0.0, first=False) is None  # a short lag: not worth it
    assert gate.admit(second, lambda: 4, 0.0, first=False) is True  # a backlog: a further one
    gate.opened(second)
    gate.opened(third)  # (as if admitted)
    assert gate.open == 3
    fourth = object()
    assert gate.admit(fourth, lambda: 10, 0.0, first=False) is None  # at the maximum
    gate.closed(third)
    assert gate.open == 2


def test_gate_lowers_the_limit_on_a_refusal_and_tries_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("anonproxy.forward.time.monotonic", lambda: clock[0])
    gate = AssociationGate(4)
    first, further = object(), object()
    assert gate.admit(first, lambda: 5, 0.0) is False
    gate.opened(first)
    assert gate.admit(further, lambda: 5, 0.0, first=False) is True
    gate.refused(further)
    assert gate.limit == 1
    assert gate.admit(further, lambda: 5, 0.0, first=False) is None
    clock[0] += 61  # a minute later: one more try
    assert gate.admit(further, lambda: 5, 0.0, first=False) is True
    assert gate.limit == 2
    gate.refused(further)
    assert gate.limit == 1
    clock[0] += 61  # the pause has doubled: not yet
    assert gate.admit(further, lambda: 5, 0.0, first=False) is None
    clock[0] += 60
    assert gate.admit(further, lambda: 5, 0.0, first=False) is True
    gate.opened(further)
    assert gate.open == 2

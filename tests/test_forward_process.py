"""C-STORE from a sender process: outcomes cross the process boundary, a dead or hung sender
process is replaced, and no sender process outlives its owner (real peers on loopback)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from anonproxy.config import DicomDestinationConfig, FolderDestinationConfig
from anonproxy.errors import ConfigError, ForwardError
from anonproxy.forward import (
    UNLIMITED_PEER_PDU,
    DicomSender,
    FolderSender,
    NotSent,
    ProcessSender,
    make_sender,
)

import builders
from peers import RefusingSCP, StoreSCP, free_port, running, wait_for

pytestmark = pytest.mark.integration

CT = Path(str(get_testdata_file("CT_small.dcm")))
MR = Path(str(get_testdata_file("MR_small.dcm")))


def _destination(port: int, ae_title: str = "RESEARCH", **fields: object) -> DicomDestinationConfig:
    return DicomDestinationConfig.model_validate(
        {
            "name": "research",
            "ae_title": ae_title,
            "host": "127.0.0.1",
            "port": port,
            "acse_timeout": 5,
            "dimse_timeout": 5,
            "network_timeout": 5,
            **fields,
        }
    )


@pytest.fixture
def sender(storescp: StoreSCP) -> Iterator[ProcessSender]:
    process_sender = ProcessSender(_destination(storescp.port), "ANONPROXY")
    yield process_sender
    process_sender.close()


@pytest.fixture
def refusing() -> Iterator[list[RefusingSCP]]:
    """Started RefusingSCPs; every one is stopped at the end."""
    peers: list[RefusingSCP] = []
    yield peers
    for peer in peers:
        peer.stop()


def test_delivers_from_one_reused_child(sender: ProcessSender, storescp: StoreSCP) -> None:
    assert sender.pid is None
    assert sender.send(CT) == 0x0000
    pid = sender.pid
    assert pid is not None
    assert pid != os.getpid()
    assert running(pid)
    assert sender.send(MR) == 0x0000
    assert sender.pid == pid  # the same child (and association) for the next instance
    assert wait_for(lambda: len(storescp.files()) == 2, timeout=10)
    assert {p.name.split(".", 1)[0] for p in storescp.files()} == {"CT", "MR"}


def test_a_batch_is_sent_in_one_request_and_answered_path_by_path(
    sender: ProcessSender, storescp: StoreSCP, tmp_path: Path
) -> None:
    paths = builders.make_series(tmp_path / "series", 3)
    outcomes = sender.send_each([CT, tmp_path / "gone.dcm", *paths])
    assert next(outcomes) == 0x0000
    # the child goes on to the next instances while the first outcome is being settled
    assert wait_for(lambda: len(storescp.files()) == 4, timeout=10)
    rest = list(outcomes)
    assert isinstance(rest[0], FileNotFoundError)  # removed meanwhile: the batch goes on
    assert rest[1:] == [0x0000] * 3
    assert sender.send(MR) == 0x0000  # the child's replies and requests still pair up


def test_a_peer_aborting_between_the_sends_of_a_batch_costs_no_instance(
    refusing: list[RefusingSCP], tmp_path: Path
) -> None:
    """The association thread, held between sends, does not see the abort; the next send looks
    for it and associates again (without that, it is sent on the aborted association and
    fails: no C-STORE response)."""
    peer = RefusingSCP(0x0000, abort_after=1).start()
    refusing.append(peer)
    sender = DicomSender(_destination(peer.port, peer.ae_title, dimse_timeout=30), "ANONPROXY")
    paths = builders.make_series(tmp_path / "s", 3)
    try:
        with sender.held():
            started = time.monotonic()
            for path in paths:
                assert sender.send(path) == 0x0000
                time.sleep(0.3)  # the peer aborts 0.05 s after each association's first answer
            assert time.monotonic() - started < 5
    finally:
        sender.close()
    assert len({association for association, _ in peer.stored}) == 3


@pytest.mark.parametrize(("status", "sent"), [(0xA700, 1), (0xC000, 3)])
def test_a_transient_refusal_ends_a_batch_and_a_permanent_one_does_not(
    refusing: list[RefusingSCP], tmp_path: Path, status: int, sent: int
) -> None:
    peer = RefusingSCP(status).start()
    refusing.append(peer)
    process_sender = ProcessSender(_destination(peer.port, peer.ae_title), "ANONPROXY")
    try:
        outcomes = list(process_sender.send_each(builders.make_series(tmp_path / "s", 3)))
        assert peer.calls == sent
        first, *rest = outcomes
        assert isinstance(first, ForwardError)
        assert first.status == status
        if sent == 1:  # Out of Resources: what refused the first would refuse the others
            assert all(isinstance(outcome, NotSent) for outcome in rest)
        else:  # the instance's own fault: each is sent and refused on its own
            assert all(type(o) is ForwardError and o.permanent for o in rest)
    finally:
        process_sender.close()


def test_a_child_dying_in_a_batch_fails_its_instance_and_sends_none_after(
    sender: ProcessSender, storescp: StoreSCP, tmp_path: Path
) -> None:
    assert sender.send(CT) == 0x0000
    first = sender.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # the request is sent; the child dies before it answers
    killer = threading.Timer(0.5, os.kill, (first, signal.SIGKILL))
    killer.start()
    try:
        outcomes = list(sender.send_each(builders.make_series(tmp_path / "s", 3)))
    finally:
        killer.join()
    assert len(outcomes) == 3
    assert type(outcomes[0]) is ForwardError
    assert str(outcomes[0]) == "sender process failed"
    assert all(isinstance(outcome, NotSent) for outcome in outcomes[1:])
    assert sender.send(MR) == 0x0000
    assert sender.pid not in {None, first}


def test_a_batch_left_unread_has_its_child_replaced(
    sender: ProcessSender, storescp: StoreSCP, tmp_path: Path
) -> None:
    outcomes = sender.send_each(builders.make_series(tmp_path / "s", 3))
    assert next(outcomes) == 0x0000
    first = sender.pid
    outcomes.close()  # two replies unread: they would answer the next request
    assert sender.pid is None
    assert first is not None
    assert not running(first)
    assert sender.send(MR) == 0x0000


@pytest.mark.parametrize(
    ("status", "sop_classes", "permanent", "reported"),
    [
        (0xA900, None, True, 0xA900),  # Error: Data Set does not match SOP Class
        (0xC000, None, True, 0xC000),  # Error: Cannot understand
        (0xA700, None, False, 0xA700),  # Refused: Out of Resources
        (0x0000, ["1.2.840.10008.5.1.4.1.1.4"], True, None),  # MR only: CT not supported
    ],
)
def test_refusals_keep_permanent_and_status(
    refusing: list[RefusingSCP],
    status: int,
    sop_classes: list[str] | None,
    permanent: bool,
    reported: int | None,
) -> None:
    peer = RefusingSCP(status, sop_classes=sop_classes).start()
    refusing.append(peer)
    process_sender = ProcessSender(_destination(peer.port, peer.ae_title), "ANONPROXY")
    try:
        with pytest.raises(ForwardError) as raised:
            process_sender.send(CT)
        assert type(raised.value) is ForwardError
        assert raised.value.permanent is permanent
        assert raised.value.status == reported
        if reported is not None:
            assert f"0x{reported:04X}" in str(raised.value)
        else:
            assert "not supported" in str(raised.value)
        pid = process_sender.pid
        assert pid is not None
        assert running(pid)  # a refusal is an answer, not a failure of the child
    finally:
        process_sender.close()


def test_warning_status_is_delivered(refusing: list[RefusingSCP]) -> None:
    peer = RefusingSCP(0xB000).start()  # Warning: Coercion of Data Elements
    refusing.append(peer)
    process_sender = ProcessSender(_destination(peer.port, peer.ae_title), "ANONPROXY")
    try:
        assert process_sender.send(CT) == 0xB000
    finally:
        process_sender.close()


def test_a_peer_taking_pdus_of_any_length_gets_bounded_ones(
    refusing: list[RefusingSCP], tmp_path: Path
) -> None:
    """Maximum Length 0 would make pynetdicom read and send an instance as one PDU."""
    peer = RefusingSCP(0x0000, max_pdu=0).start()
    refusing.append(peer)
    (large,) = builders.make_series(tmp_path, 1, rows=1024, frames=2)  # 4 MiB of pixels
    sender = DicomSender(_destination(peer.port, peer.ae_title), "ANONPROXY")
    try:
        assert sender.send(large) == 0x0000
    finally:
        sender.close()
    assert sum(peer.pdv_lengths) > large.stat().st_size - 1024  # the whole data set arrived
    assert max(peer.pdv_lengths) <= UNLIMITED_PEER_PDU


def test_destination_down_is_transient(tmp_path: Path) -> None:
    process_sender = ProcessSender(_destination(free_port()), "ANONPROXY")
    try:
        with pytest.raises(ForwardError) as raised:
            process_sender.send(CT)
        assert raised.value.permanent is False
        assert "association" in str(raised.value)
    finally:
        process_sender.close()


def test_missing_spool_file_is_file_not_found(sender: ProcessSender, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sender.send(tmp_path / "gone.dcm")
    assert sender.send(CT) == 0x0000


def test_child_killed_while_idle_is_replaced_for_the_next_send(
    sender: ProcessSender, storescp: StoreSCP
) -> None:
    assert sender.send(CT) == 0x0000
    first = sender.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # ended once its threads have (a killed thread group is not reaped before): reaped here
    assert wait_for(lambda: first not in {c.pid for c in multiprocessing.active_children()}, 5)
    assert sender.send(MR) == 0x0000  # no failed attempt: nothing had been sent
    assert sender.pid not in {None, first}
    assert wait_for(lambda: len(storescp.files()) == 2, timeout=10)


def test_child_ending_during_a_send_fails_it_as_transient(
    sender: ProcessSender, storescp: StoreSCP
) -> None:
    assert sender.send(CT) == 0x0000
    first = sender.pid
    assert first is not None
    killer = threading.Timer(0.5, os.kill, (first, signal.SIGKILL))
    os.kill(first, signal.SIGSTOP)  # the request is sent; the child dies before it answers
    killer.start()
    try:
        with pytest.raises(ForwardError) as raised:
            sender.send(MR)
    finally:
        killer.join()
    assert raised.value.permanent is False
    assert str(raised.value) == "sender process failed"
    assert sender.pid is None
    assert not running(first)
    assert sender.send(MR) == 0x0000
    assert sender.pid not in {None, first}
    assert wait_for(lambda: len(storescp.files()) == 2, timeout=10)


def test_hung_child_is_killed_within_the_reply_timeout(
    sender: ProcessSender, storescp: StoreSCP
) -> None:
    assert sender.send(CT) == 0x0000
    hung = sender.pid
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)
    try:
        sender.reply_timeout = 1.0
        started = time.monotonic()
        with pytest.raises(ForwardError) as raised:
            sender.send(MR)
        assert time.monotonic() - started < 5
        assert raised.value.permanent is False
        assert "did not answer" in str(raised.value)
        assert not running(hung)
    finally:
        if running(hung):
            os.kill(hung, signal.SIGKILL)
    sender.reply_timeout = 60.0
    assert sender.send(MR) == 0x0000
    assert sender.pid not in {None, hung}


def test_idle_check_releases_the_association(refusing: list[RefusingSCP]) -> None:
    peer = RefusingSCP(0x0000).start()
    refusing.append(peer)
    config = _destination(peer.port, peer.ae_title, idle_timeout=0.5)
    process_sender = ProcessSender(config, "ANONPROXY")
    try:
        process_sender.idle_check()  # nothing started: nothing to do
        assert process_sender.pid is None
        assert process_sender.send(CT) == 0x0000
        assert len(peer.server.active_associations) == 1
        time.sleep(1.0)
        assert len(peer.server.active_associations) == 1  # held until the worker asks
        process_sender.idle_check()
        assert wait_for(lambda: not peer.server.active_associations, timeout=5)
        assert process_sender.send(CT) == 0x0000  # associates again
        assert peer.calls == 2
    finally:
        process_sender.close()


def test_close_ends_the_child_and_is_idempotent(sender: ProcessSender) -> None:
    assert sender.send(CT) == 0x0000
    pid = sender.pid
    assert pid is not None
    sender.close()
    assert sender.pid is None
    assert not running(pid)
    assert pid not in {p.pid for p in multiprocessing.active_children()}
    sender.close()


def test_a_sender_that_never_sends_starts_no_process(storescp: StoreSCP) -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    process_sender = ProcessSender(_destination(storescp.port), "ANONPROXY")
    process_sender.idle_check()
    assert process_sender.pid is None
    process_sender.close()
    process_sender.close()
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_a_prepared_sender_sends_from_the_child_it_started(storescp: StoreSCP) -> None:
    process_sender = ProcessSender(_destination(storescp.port), "ANONPROXY")
    try:
        process_sender.prepare()
        started = process_sender.pid
        assert started is not None
        assert running(started)
        process_sender.prepare()  # already running: the same child
        assert process_sender.send(CT) == 0x0000
        assert process_sender.pid == started
    finally:
        process_sender.close()
    assert not running(started)


def test_child_ends_when_its_parent_is_killed(storescp: StoreSCP, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from anonproxy.config import DicomDestinationConfig
        from anonproxy.forward import ProcessSender

        config = DicomDestinationConfig(
            name="research", ae_title="RESEARCH", host="127.0.0.1", port={storescp.port}
        )
        sender = ProcessSender(config, "ANONPROXY")
        assert sender.send(Path({str(CT)!r})) == 0
        Path({str(pid_file)!r}).write_text(str(sender.pid))
        time.sleep(60)
        """
    )
    with (tmp_path / "parent.log").open("wb") as log:
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=log)
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=20), (
            tmp_path / "parent.log"
        ).read_text()
        child = int(pid_file.read_text())
        assert running(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_for(lambda: not running(child), timeout=10)
    finally:
        parent.kill()
        parent.wait()


def test_unreadable_tls_certificate_is_a_config_error(tmp_path: Path) -> None:
    config = _destination(free_port(), tls={"ca_certificates": str(tmp_path / "missing-ca.pem")})
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ConfigError, match=r"destinations\.research\.tls"):
        ProcessSender(config, "ANONPROXY")
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_make_sender_sends_dicom_from_a_process_and_folders_in_this_one(tmp_path: Path) -> None:
    dicom = make_sender(_destination(free_port()), "ANONPROXY")
    folder = make_sender(
        FolderDestinationConfig(type="folder", name="folder", path=tmp_path / "out"), "ANONPROXY"
    )
    try:
        assert isinstance(dicom, ProcessSender)
        assert isinstance(folder, FolderSender)
    finally:
        dicom.close()
        folder.close()

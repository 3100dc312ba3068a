"""Each change anonproxy makes to pynetdicom (anonproxy.pynetdicom_patches), shown needed.

Every test runs twice on real pynetdicom objects on loopback: ``patched`` asserts the behaviour
anonproxy needs, ``unpatched`` (the control: the process-wide patch left out with
``install(without=...)``, or the per-association hook not called) asserts that pynetdicom
3.0.4 on its own does not have it. When a pynetdicom upgrade fixes one upstream, its control
fails, and the patch can go.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import types
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dimse_primitives
import pynetdicom.dsutils
import pynetdicom.dul
import pynetdicom.fsm
import pynetdicom.pdu
import pynetdicom.pdu_primitives
import pynetdicom.transport
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from anonproxy import pynetdicom_patches as patches
from anonproxy.config import TlsServerConfig
from anonproxy.deid.files import data_set_offset
from anonproxy.errors import ConfigError
from anonproxy.limits import PduGuard
from anonproxy.tls import server_context

from conftest import corpus_paths
from peers import (
    PEER_ENV,
    Pki,
    RawPeer,
    RefusingSCP,
    StoreSCP,
    associate_rq,
    free_port,
    p_data_tf,
    tool,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
CT = next(p for p in corpus_paths() if p.name == "CT_small.dcm")


@pytest.fixture(autouse=True)
def _all_installed() -> None:
    patches.install()


@pytest.fixture(params=["patched", "unpatched"])
def patched(request: pytest.FixtureRequest) -> bool:
    """For a hook: True, called; False, the control (not called)."""
    return bool(request.param == "patched")


def _without(name: str) -> Any:
    """A fixture for the process-wide patch *name*: True, every patch installed; False, the
    control (every patch but *name*)."""

    @pytest.fixture(params=["patched", "unpatched"], name=name)
    def fixture(request: pytest.FixtureRequest) -> Iterator[bool]:
        patched = request.param == "patched"
        patches.uninstall()
        patches.install(without=() if patched else {name})
        try:
            yield patched
        finally:
            patches.uninstall()
            patches.install()

    return fixture


reactor_waits = _without("reactor_waits")
response_race = _without("response_race")
send_backpressure = _without("send_backpressure")
idle_timer_latch = _without("idle_timer_latch")
file_meta = _without("file_meta")
received_file_meta = _without("received_file_meta")
command_sets = _without("command_sets")
chunked_data_sets = _without("chunked_data_sets")
direct_p_data = _without("direct_p_data")
late_primitives = _without("late_primitives")


# --- the version gate ---------------------------------------------------------------------------


def test_the_pinned_version_is_the_one_in_pyproject() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"pynetdicom=={patches.PINNED_VERSION}" in dependencies
    assert pynetdicom.__version__ == patches.PINNED_VERSION


def test_another_pynetdicom_version_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.5")
    before = patches.installed()
    patches.uninstall()
    try:
        with pytest.raises(patches.UnsupportedPynetdicom) as raised:
            patches.install()
        assert isinstance(raised.value, ConfigError)  # the CLI: one line, exit status 2
        message = str(raised.value)
        assert "\n" not in message
        assert "pynetdicom 3.0.5 is installed" in message
        assert "pynetdicom==3.0.4" in message
        assert patches.installed() == frozenset()  # nothing applied
    finally:
        monkeypatch.undo()
        patches.install()
    assert patches.installed() == before


def test_anonproxy_serve_refuses_another_pynetdicom_with_exit_status_2(tmp_path: Path) -> None:
    program = (
        "import sys, pynetdicom\n"
        "pynetdicom.__version__ = '3.0.5'\n"
        "from anonproxy.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("anonproxy: pynetdicom 3.0.5 is installed")
    assert last.endswith("install pynetdicom==3.0.4")


def test_install_is_idempotent_thread_safe_and_undone_by_uninstall() -> None:
    patches.uninstall()
    originals = (
        Association._run_reactor,
        pynetdicom.dul.DULServiceProvider.send_pdu,
        pynetdicom.dul.time,
        _config.STORE_RECV_CHUNKED_DATASET,
    )
    try:
        threads = [threading.Thread(target=patches.install) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        once = (Association._run_reactor, pynetdicom.dul.DULServiceProvider.send_pdu)
        patches.install()
        assert (Association._run_reactor, pynetdicom.dul.DULServiceProvider.send_pdu) == once
        assert patches.installed() == frozenset(patches.PATCHES)
        assert pynetdicom.dul.time.monotonic is time.monotonic  # only sleep differs
        patches.uninstall()
        assert (
            Association._run_reactor,
            pynetdicom.dul.DULServiceProvider.send_pdu,
            pynetdicom.dul.time,
            _config.STORE_RECV_CHUNKED_DATASET,
        ) == originals
        # Applied in another order, they are still undone exactly.
        patches.install(without={"reactor_waits"})
        patches.install()
        patches.uninstall()
        assert Association._run_reactor is originals[0]
    finally:
        patches.install()


# --- reactor_waits ------------------------------------------------------------------------------


def _echo_server() -> tuple[AE, Any, int]:
    ae = AE("PATCHES")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    return ae, server, port


def test_reactors_wait_for_work_not_for_their_loop_delay(reactor_waits: bool) -> None:
    """With both DULs' loop delay at 5 s, C-ECHOs are answered within a 1 s DIMSE time-out:
    the reactors wake when there is something to do. pynetdicom's sleep the whole delay."""
    _, server, port = _echo_server()
    requestor = AE("CALLER")
    requestor.add_requested_context(Verification)
    requestor.dimse_timeout = 1.0
    assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHES")
    try:
        assert assoc.is_established
        assert wait_for(lambda: len(server.active_associations) == 1, timeout=5, interval=0.01)
        duls = [assoc.dul, server.active_associations[0].dul]
        for dul in duls:
            dul._run_loop_delay = 5.0
        answered = 0
        for _ in range(5):
            status = assoc.send_c_echo() if assoc.is_established else Dataset()
            answered += status.get("Status") == 0x0000
        for dul in duls:
            dul._run_loop_delay = 0.001
        assert answered == (5 if reactor_waits else 0)
    finally:
        if assoc.is_established:
            assoc.release()
        server.shutdown()


@contextlib.contextmanager
def _echo_association() -> Iterator[tuple[Any, Any]]:
    """A Verification SCP here and an association to it: the server and the association."""
    _, server, port = _echo_server()
    requestor = AE("CALLER")
    requestor.add_requested_context(Verification)
    assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHES")
    try:
        assert assoc.is_established
        yield server, assoc
    finally:
        if assoc.is_established:
            assoc.release()
        server.shutdown()


def _count_calls(owner: Any, name: str) -> list[int]:
    """Count the calls of the bound method *name* of *owner* (once per loop of a reactor)."""
    calls = [0]
    method = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(owner, name, counted)
    return calls


def test_idle_reactors_look_rarely(reactor_waits: bool) -> None:
    """Once an association has been idle for a while, its four loops (the requestor's and the
    acceptor's association and DUL threads) each look a few dozen times a second, not every
    1 ms (an idle forwarding association cost 7% of a core)."""
    with _echo_association() as (server, assoc):
        assert wait_for(lambda: len(server.active_associations) == 1, timeout=5, interval=0.01)
        accepted = server.active_associations[0]
        assert assoc.send_c_echo().Status == 0x0000
        time.sleep(patches.IDLE_AFTER_S * 2)
        loops = [
            _count_calls(assoc.dimse, "get_msg"),
            _count_calls(accepted.dimse, "get_msg"),
            _count_calls(assoc.dul, "_is_transport_event"),
            _count_calls(accepted.dul, "_is_transport_event"),
        ]
        time.sleep(0.5)
        counts = [calls[0] for calls in loops]
        assert assoc.send_c_echo().Status == 0x0000  # and it still answers at once
    if reactor_waits:
        assert max(counts) <= 0.5 / patches.IDLE_WAIT_S + 5
    else:
        assert min(counts) > 100


def test_a_wake_up_during_a_clear_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's set() that comes while the DUL thread clears the wake-up pipe still
    wakes its next wait (it used to be read by that clear and leave the pipe silent for good:
    every later wake-up of the association lost, each send then waiting out a time-out)."""
    wakeup = patches._Wakeup()
    read = os.read
    setters: list[threading.Thread] = []

    def read_after_a_set(fd: int, size: int) -> bytes:
        setter = threading.Thread(target=wakeup.set)
        setters.append(setter)
        setter.start()
        setter.join(0.2)  # blocked on the wake-up's lock, or done
        return read(fd, size)

    try:
        wakeup.set()
        monkeypatch.setattr(patches.os, "read", read_after_a_set)
        wakeup.clear()
        monkeypatch.setattr(patches.os, "read", read)
        setters[0].join(5)
        wakeup.set()  # and the next one
        ready, _, _ = select.select([wakeup.read_fd], [], [], 0.5)
        assert ready == [wakeup.read_fd]
    finally:
        wakeup.close()


def test_an_acceptor_waits_for_work_not_on_a_clock(reactor_waits: bool) -> None:
    """While the acceptor's association thread runs a slow handler (de-identification), its DUL
    thread does not wake every 1 ms (each wake took the GIL from the handler); nor does the
    association thread while it waits for the next request, even just after one."""
    done = threading.Event()

    def slow_echo(_: evt.Event) -> int:
        time.sleep(0.3)
        done.set()
        return 0x0000

    ae = AE("PATCHES")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, slow_echo)]
    )
    requestor = AE("CALLER")
    requestor.add_requested_context(Verification)
    assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHES")
    try:
        assert assoc.is_established
        assert wait_for(lambda: len(server.active_associations) == 1, timeout=5, interval=0.01)
        accepted = server.active_associations[0]
        dul_loops = _count_calls(accepted.dul, "_is_transport_event")
        echo = threading.Thread(target=assoc.send_c_echo)
        echo.start()
        assert done.wait(5)
        during_handler = dul_loops[0]
        association_loops = _count_calls(accepted.dimse, "get_msg")
        echo.join(5)
        time.sleep(0.08)  # active: an answer was just sent
        after_answer = association_loops[0]
    finally:
        if assoc.is_established:
            assoc.release()
        server.shutdown()
    if reactor_waits:
        assert during_handler <= 0.3 / patches.IDLE_WAIT_S + 5
        assert after_answer <= 0.08 / patches.IDLE_WAIT_S + 3
    else:
        assert during_handler > 100
        assert after_answer > 30


def test_a_release_request_wakes_the_acceptor_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptor's association thread, waiting (here up to 5 s) for work, is woken by the
    peer's A-RELEASE request: a sender that opens an association per instance is not held.
    (No control: pynetdicom alone looks every 1 ms; this shows the patch's longer waits end.)"""
    monkeypatch.setattr(patches, "IDLE_WAIT_S", 5.0)
    with _echo_association() as (server, assoc):
        assert assoc.send_c_echo().Status == 0x0000
        time.sleep(patches.IDLE_AFTER_S * 2)
        started = time.monotonic()
        assoc.release()
        released = time.monotonic() - started
        assert assoc.is_released
        assert wait_for(lambda: not server.active_associations, timeout=10, interval=0.01)
    assert released < 1.0


def test_a_send_wakes_an_idle_requestor_reactor_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``send_c_echo`` polls until the association thread has paused; an idle one (here made
    to look every 5 s) is woken when the send asks, not at its next look."""
    monkeypatch.setattr(patches, "IDLE_WAIT_S", 5.0)
    with _echo_association() as (_, assoc):
        started = time.monotonic()
        for _ in range(3):
            time.sleep(patches.IDLE_AFTER_S * 2)  # idle: its thread waits 5 s between looks
            assert assoc.send_c_echo().Status == 0x0000
        assert time.monotonic() - started < 2.5  # without the wake-up: 5 s or more


def _slow_acse_server(on_open: Callable[[evt.Event], Any], **options: Any) -> tuple[Any, int]:
    """A Verification SCP that waits 30 s for an association request, calling *on_open* for
    each connection; the server and its port."""
    ae = AE("PATCHES")
    ae.add_supported_context(Verification)
    ae.acse_timeout = 30
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        **options,
    )
    return server, port


def test_a_connection_closed_before_its_association_request_ends_at_once(
    reactor_waits: bool,
) -> None:
    """A TCP health check (connect, close) leaves no association waiting ``acse_timeout`` (a
    stop waits for active associations); pynetdicom's own waits the whole 30 s."""
    opened: list[int] = []
    server, port = _slow_acse_server(lambda _: opened.append(1))
    try:
        socket.create_connection(("127.0.0.1", port)).close()
        assert wait_for(lambda: opened, timeout=5, interval=0.01)
        ended = wait_for(lambda: not server.active_associations, timeout=3, interval=0.05)
        assert ended == reactor_waits
        requestor = AE("CALLER")
        requestor.add_requested_context(Verification)
        assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHES")
        assert assoc.is_established  # and the next one is served
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()


def test_an_acceptor_serves_every_request_and_leaves_no_descriptor(reactor_waits: bool) -> None:
    """Three DCMTK associations of 50 C-ECHOs each; the wake-up pipe of each DUL thread is
    closed when it ends (this one holds in both runs: it guards the patch's own cost)."""
    served: list[int] = []
    ae = AE("PATCHES")
    ae.add_supported_context(Verification)
    port = free_port()
    before = len(os.listdir("/proc/self/fd"))
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_ECHO, lambda _: served.append(1) or 0x0000)],
    )
    try:
        for _ in range(3):
            done = subprocess.run(
                [tool("echoscu"), "-aec", "PATCHES", "--repeat", "50", "127.0.0.1", str(port)],
                env=PEER_ENV,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    assert len(served) == 150
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before, timeout=5, interval=0.05)
    assert not patches._wakeups  # every DUL thread's pipe closed and forgotten


def test_a_wake_up_pending_is_written_once() -> None:
    """A data set of many PDUs: one byte in the pipe until the DUL thread reads it."""
    wakeup = patches._Wakeup()
    try:
        for _ in range(5):
            wakeup.set()
        assert os.read(wakeup.read_fd, 4096) == b"\0"
        wakeup.clear()
        wakeup.set()  # after a read, the next one is written again
        assert os.read(wakeup.read_fd, 4096) == b"\0"
    finally:
        wakeup.close()


# --- held reactors (part of reactor_waits) ------------------------------------------------------


@contextlib.contextmanager
def _store_association(port: int, ae_title: str) -> Iterator[Association]:
    requestor = AE("PATCHES")
    requestor.add_requested_context(
        dcmread(CT, stop_before_pixels=True).SOPClassUID, ExplicitVRLittleEndian
    )
    assoc = requestor.associate("127.0.0.1", port, ae_title=ae_title)
    try:
        assert assoc.is_established
        yield assoc
    finally:
        patches.release_reactor(assoc)
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("held", [True, False])
def test_a_held_requestor_reactor_sleeps_through_a_batch_of_sends(
    held: bool, storescp: StoreSCP
) -> None:
    """Held, the association thread is not woken between sends (no pause handshake); the
    control, each send pauses it and wakes it again."""
    with _store_association(storescp.port, storescp.ae_title) as assoc:
        assert assoc.send_c_store(CT).Status == 0x0000
        looks = [0]
        get_msg = assoc.dimse.get_msg

        def counted(block: bool = False) -> Any:
            looks[0] += not block  # the association thread's look, once a loop
            return get_msg(block)

        assoc.dimse.get_msg = counted  # type: ignore[method-assign]
        if held:
            patches.hold_reactor(assoc)
        for _ in range(5):
            assert assoc.send_c_store(CT).Status == 0x0000
        during = looks[0]
        patches.release_reactor(assoc)
        assert wait_for(lambda: looks[0] > during, timeout=2)  # it runs again
    assert during <= 1 if held else during >= 5


def test_an_aborted_or_killed_association_ends_its_hold(storescp: StoreSCP) -> None:
    """Its thread must run to end; left paused, it would wait forever."""
    with _store_association(storescp.port, storescp.ae_title) as assoc:
        patches.hold_reactor(assoc)
        assert assoc.send_c_store(CT).Status == 0x0000
        assert not assoc._reactor_checkpoint.is_set()  # paused after the send
        assoc.abort()
        assoc.join(5)
        assert not assoc.is_alive()


def test_the_peers_abort_during_a_hold_is_seen_before_the_next_send() -> None:
    """The held thread does not see it; ended_while_held does, and once released the thread
    ends the association as pynetdicom would."""
    peer = RefusingSCP(0x0000, abort_after=1).start()
    try:
        with _store_association(peer.port, peer.ae_title) as assoc:
            patches.hold_reactor(assoc)
            assert assoc.send_c_store(CT).Status == 0x0000
            assert wait_for(lambda: patches.ended_while_held(assoc), timeout=5)
            assert assoc.is_established  # nobody looked
            patches.release_reactor(assoc)
            assoc.join(5)
            assert assoc.is_aborted
    finally:
        peer.stop()


# --- response_race ------------------------------------------------------------------------------


def test_a_requestor_reactor_leaves_responses_to_the_sending_thread(
    response_race: bool, storescp: StoreSCP
) -> None:
    """A response that reaches the DIMSE queue while the requestor's association thread is not
    paused (see docs/upstream/pynetdicom-response-race.md) stays for the thread waiting for it;
    pynetdicom's association thread takes it and drops it ("unexpected ... service message")."""
    ae = AE("PATCHES")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 1.0
    assoc = ae.associate("127.0.0.1", storescp.port, ae_title=storescp.ae_title)
    assert assoc.is_established
    response = C_ECHO()
    response.MessageIDBeingRespondedTo, response.Status = 7, 0x0000
    try:
        assert not assoc._is_paused or wait_for(lambda: not assoc._is_paused, timeout=2)
        assoc.dimse.msg_queue.put((1, response))
        time.sleep(0.2)  # 200 loops of the association thread, unpaused
        taken = assoc.dimse.get_msg(block=True)
        assert taken == ((1, response) if response_race else (None, None))
        assert assoc.is_established
    finally:
        assoc.release()


# --- send_backpressure --------------------------------------------------------------------------


def _large_file(directory: Path, pixel_bytes: int) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns, dataset.BitsAllocated = 1024, pixel_bytes // 1024, 8
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 7, 0
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.PixelData = bytes(pixel_bytes)
    path = directory / "large.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _sc_acceptor(handlers: list[Any], ssl_context: ssl.SSLContext | None = None) -> tuple[Any, int]:
    """A pynetdicom Storage SCP ("PATCHES") of Secondary Capture in Explicit VR Little Endian,
    16 KiB PDUs, with *handlers*; its server and port."""
    acceptor = AE("PATCHES")
    acceptor.maximum_pdu_size = 16384
    acceptor.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = acceptor.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=handlers, ssl_context=ssl_context
    )
    return server, port


def test_a_data_set_sent_from_a_file_is_not_queued_whole(
    send_backpressure: bool, tmp_path: Path
) -> None:
    """A receiver that stops reading: the sending thread queues at most MAX_QUEUED_PDUS P-DATA
    ahead of the DUL thread. pynetdicom queues every fragment of the data set at once."""
    path = _large_file(tmp_path, 16 << 20)
    reading = threading.Event()

    def hold(event: evt.Event) -> None:
        if event.pdu.__class__.__name__ == "P_DATA_TF":
            reading.wait(10)  # the acceptor's DUL thread stops reading

    server, port = _sc_acceptor([(evt.EVT_PDU_RECV, hold), (evt.EVT_C_STORE, lambda _: 0x0000)])
    requestor = AE("CALLER")
    requestor.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    # a handler that sees each PDU sent: the P-DATA go through the DUL thread's queue (not
    # direct_p_data's way), as over TLS
    sent = (evt.EVT_PDU_SENT, lambda _: None)
    assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHES", evt_handlers=[sent])
    statuses: list[Dataset] = []
    try:
        assert assoc.is_established
        sender = threading.Thread(target=lambda: statuses.append(assoc.send_c_store(path)))
        sender.start()
        most = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            most = max(most, assoc.dul.to_provider_queue.qsize())
            time.sleep(0.005)
        reading.set()
        sender.join(60)
        assert statuses
        assert statuses[0].Status == 0x0000
        if send_backpressure:
            assert most <= patches.MAX_QUEUED_PDUS + 1
        else:
            assert most > 200  # of 1024 fragments of 16 KiB
    finally:
        reading.set()
        if assoc.is_established:
            assoc.release()
        server.shutdown()


# --- idle_timer_latch ---------------------------------------------------------------------------


class _FakeAssoc:
    """What DULServiceProvider's constructor reads of its association."""

    def __init__(self) -> None:
        self.ae = AE()
        self.network_timeout = self.ae.network_timeout
        self.is_requestor = False


def test_an_expired_network_time_out_stays_expired_once_seen(idle_timer_latch: bool) -> None:
    """The peer's answer to the A-ABORT restarts pynetdicom's idle timer: the cause of the
    abort must still read as the time-out (the SCP audits association.idle_timeout by it)."""
    dul = pynetdicom.dul.DULServiceProvider(_FakeAssoc())  # type: ignore[arg-type]
    dul._idle_timer.timeout = 0.01
    dul._idle_timer.start()
    assert wait_for(dul.idle_timer_expired, timeout=2, interval=0.01)
    dul._idle_timer.restart()  # a transport event after the abort
    assert not dul._idle_timer.expired
    assert dul.idle_timer_expired() is idle_timer_latch


# --- file_meta ----------------------------------------------------------------------------------


def test_a_file_is_sent_without_decoding_its_file_meta_with_pydicom(
    file_meta: bool, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's split_dataset reads the preamble and decodes group 0002 with pydicom."""
    decoded: list[int] = []
    read_preamble = pynetdicom.dsutils.read_preamble  # only split_dataset uses it

    def counted(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return read_preamble(*args, **kwargs)

    monkeypatch.setattr(pynetdicom.dsutils, "read_preamble", counted)
    ae = AE("PATCHES")
    ae.add_requested_context(dcmread(CT).SOPClassUID, dcmread(CT).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", storescp.port, ae_title=storescp.ae_title)
    try:
        assert assoc.send_c_store(CT).Status == 0x0000
    finally:
        assoc.release()
    assert wait_for(lambda: len(storescp.files()) == 1, timeout=10)
    assert bool(decoded) is not file_meta


# --- received_file_meta -------------------------------------------------------------------------


def test_a_received_file_meta_is_written_without_a_pydicom_data_set(
    received_file_meta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The received file starts with the same bytes; pynetdicom builds (and pydicom validates
    and encodes) a FileMetaDataset for them."""
    built: list[int] = []

    class Counted(FileMetaDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pynetdicom.dsutils, "FileMetaDataset", Counted)
    heads: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        heads.append(Path(event.dataset_path).read_bytes()[:1024])
        return 0x0000

    _store_ct(on_store)
    assert len(built) == (0 if received_file_meta else 1)
    header = dcmread(CT, stop_before_pixels=True)
    expected = DicomBytesIO()
    write_file_meta_info(
        expected,
        pynetdicom.dsutils.create_file_meta(
            sop_class_uid=header.SOPClassUID,
            sop_instance_uid=header.SOPInstanceUID,
            transfer_syntax=header.file_meta.TransferSyntaxUID,
        ),
    )
    (head,) = heads
    assert head.startswith(b"\0" * 128 + b"DICM" + expected.getvalue())


# --- command_sets -------------------------------------------------------------------------------


def test_command_sets_are_coded_without_pydicom_data_sets(
    command_sets: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE request and its response, each sent and received in this process: pynetdicom
    builds each command set it sends as a pydicom data set (and encodes it for its group
    length) and reads each one it receives element by element; the patch does neither, and
    the store succeeds the same."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as anonproxy runs it
    sent: list[int] = []
    group_length = pynetdicom.dimse_messages.DIMSEMessage._set_command_group_length
    monkeypatch.setattr(
        pynetdicom.dimse_messages.DIMSEMessage,
        "_set_command_group_length",
        lambda self: sent.append(1) or group_length(self),
    )
    read: list[int] = []
    iterate = Dataset.__iter__

    def counted_iter(self: Dataset) -> Any:
        if "CommandField" in self:  # a command set
            read.append(1)
        return iterate(self)

    monkeypatch.setattr(Dataset, "__iter__", counted_iter)
    seen: list[tuple[int, str]] = []

    def on_store(event: evt.Event) -> int:
        seen.append((event.request.MessageID, str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    _store_ct(on_store)
    assert seen == [(1, str(dcmread(CT, stop_before_pixels=True).SOPInstanceUID))]
    assert len(sent) == (0 if command_sets else 2)  # the request and the response
    assert len(read) == (0 if command_sets else 4)  # each built, each received


def test_a_dimse_sent_handler_still_gets_pydicom_command_sets() -> None:
    """pynetdicom's EVT_DIMSE_SENT handlers (its debug log) read the message's data set: with
    one bound, the message is pynetdicom's."""
    messages: list[Any] = []
    with _echo_association() as (_, assoc):
        assoc.bind(evt.EVT_DIMSE_SENT, lambda event: messages.append(event.message))
        assert assoc.send_c_echo().Status == 0x0000
    (message,) = messages
    assert isinstance(message.command_set, Dataset)
    assert message.command_set.CommandField == 0x0030  # C-ECHO-RQ


def test_dcmtk_echoes_and_stores_through_the_patched_coding(command_sets: bool) -> None:
    """echoscu and storescu (DCMTK) against a pynetdicom acceptor: their requests decoded and
    the responses encoded by the patch (or by pynetdicom: the control)."""
    header = dcmread(CT, stop_before_pixels=True)
    acceptor = AE("PATCHES")
    acceptor.add_supported_context(Verification)
    acceptor.add_supported_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0xA700 if len(stored) > 1 else 0x0000  # the second: Out of Resources

    port = free_port()
    server = acceptor.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        echo = subprocess.run(
            [tool("echoscu"), "-aec", "PATCHES", "127.0.0.1", str(port)],
            env=PEER_ENV,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert echo.returncode == 0
        stores = [
            subprocess.run(
                [tool("storescu"), "-v", "-aec", "PATCHES", "127.0.0.1", str(port), str(CT)],
                env=PEER_ENV,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            for _ in range(2)
        ]
    finally:
        server.shutdown()
    assert stored == [str(header.SOPInstanceUID)] * 2
    assert stores[0].returncode == 0
    assert "Received Store Response (Success)" in stores[0].stderr
    assert "Received Store Response (Refused: OutOfResources)" in stores[1].stderr


# --- chunked_data_sets --------------------------------------------------------------------------


def test_data_sets_are_streamed_from_and_into_files(
    chunked_data_sets: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent from a file without reading it whole (no dcmread); received into a file as it
    arrives (``event.dataset_path``). pynetdicom decodes both in memory."""
    read_whole: list[int] = []
    dcmread_ = pynetdicom.association.dcmread
    monkeypatch.setattr(
        pynetdicom.association, "dcmread", lambda *a, **k: read_whole.append(1) or dcmread_(*a, **k)
    )
    received: list[bool] = []

    def on_store(event: evt.Event) -> int:
        path = event.dataset_path  # None: pynetdicom decoded the data set in memory
        received.append(path is not None and Path(path).is_file())
        return 0x0000

    _store_ct(on_store)
    assert received == [chunked_data_sets]
    assert bool(read_whole) is not chunked_data_sets


def _store_ct(on_store: Callable[[evt.Event], int]) -> None:
    """C-STORE the CT test file once to a bare pynetdicom acceptor that calls *on_store*."""
    header = dcmread(CT, stop_before_pixels=True)
    acceptor = AE("PATCHES")
    acceptor.add_supported_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    port = free_port()
    server = acceptor.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    requestor = AE("CALLER")
    requestor.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHES")
    try:
        assert assoc.send_c_store(CT).Status == 0x0000
    finally:
        assoc.release()
        server.shutdown()


# --- the file a received data set is written into -----------------------------------------------


def test_received_data_sets_are_written_into_the_hooked_file(patched: bool, tmp_path: Path) -> None:
    """pynetdicom writes a received data set under the system's temporary folder; hooked, into
    the file object anonproxy gives it (the spool's owner-only folder)."""
    seen: list[tuple[Path, object]] = []

    def on_store(event: evt.Event) -> int:
        seen.append((Path(event.dataset_path), patches.received_file(event)))
        return 0x0000

    original = pynetdicom.dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
    if patched:
        patches.receive_data_sets_into(
            lambda: tempfile.NamedTemporaryFile(dir=tmp_path, delete=False)  # noqa: SIM115
        )
    else:  # pynetdicom's own, whatever a proxy started earlier in this process hooked
        pynetdicom.dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile  # type: ignore[attr-defined]
    try:
        _store_ct(on_store)
    finally:
        pynetdicom.dimse_messages.NamedTemporaryFile = original  # type: ignore[attr-defined]
    ((path, file),) = seen
    assert getattr(file, "name", None) == str(path)
    if patched:
        assert path.parent == tmp_path
    else:
        assert path.parent == Path(tempfile.gettempdir())


# --- the PDU guard ------------------------------------------------------------------------------


class _CountedSocket:
    """A socket whose ``recv_into`` calls are counted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def recv_into(self, buffer: memoryview) -> int:
        self.reads += 1
        return self.sock.recv_into(buffer)


def test_the_guard_reads_a_pdu_in_few_system_calls() -> None:
    """A PDU body of 128 KiB waiting in the socket is read in a few calls, not pynetdicom's 32
    reads of 4096 bytes (each with a poll); a peer that closes midway gives a short read."""
    ours, peer = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        body = os.urandom(128 * 1024)
        sender = threading.Thread(target=peer.sendall, args=(body + b"tail",))
        sender.start()
        counted = _CountedSocket(ours)
        transport = type("Transport", (), {"socket": counted})()
        assert patches._read(transport, len(body)) == body  # type: ignore[arg-type]
        sender.join(5)
        assert counted.reads <= 4
        peer.close()
        assert patches._read(transport, 100) == b"tail"  # type: ignore[arg-type]
    finally:
        ours.close()
        peer.close()


class _GuardedServer:
    """A pynetdicom acceptor; with *guarded*, each association behind a PduGuard."""

    def __init__(self, guarded: bool, on_requested: Any = None) -> None:
        self.violations: list[tuple[str, dict[str, object]]] = []
        self.aborted = threading.Event()
        ae = AE("ANONPROXY")
        ae.maximum_pdu_size = 16384
        ae.add_supported_context(Verification)
        self.port = free_port()

        def guard(event: evt.Event) -> None:
            if guarded:
                pdu_guard = PduGuard(16384, lambda r, d: self.violations.append((r, d)))
                patches.guard_pdus(event.assoc, pdu_guard, read_timeout=10)

        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, guard),
            (evt.EVT_ABORTED, lambda _: self.aborted.set()),
        ]
        if on_requested is not None:
            handlers.append((evt.EVT_REQUESTED, on_requested))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def associated_peer(self, timeout: float) -> RawPeer:
        peer = RawPeer(self.port, timeout=timeout)
        peer.send(associate_rq())
        accepted = peer.read_pdu()
        assert accepted is not None
        assert accepted[0] == 0x02
        return peer

    def stop(self) -> None:
        self.server.shutdown()


def test_a_pdu_longer_than_advertised_is_refused_before_its_body_is_read(patched: bool) -> None:
    server = _GuardedServer(patched)
    peer = server.associated_peer(timeout=2 if not patched else 10)
    try:
        peer.send(struct.pack(">BBL", 0x04, 0, 0x7FFFFFF0) + bytes(1024))  # P-DATA-TF, 2 GiB
        answer = peer.read_pdu()
        if patched:
            assert answer is not None
            assert answer[0] == 0x07
            assert answer[1][-1] == 0x06  # invalid-PDU-parameter-value
            assert server.violations[0][0] == "pdu_too_long"
            assert server.violations[0][1]["declared_length"] == 0x7FFFFFF0
        else:  # pynetdicom waits for the 2 GiB body
            assert answer is None
            assert server.violations == []
    finally:
        peer.close()
        server.stop()


def test_an_undecodable_command_set_aborts_the_association(
    patched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's DIMSE decoder raises in the DUL thread, which stops: the peer is told
    nothing and EVT_ABORTED never comes. Guarded, it is an A-ABORT like any other, audited."""
    raised: list[str] = []  # exceptions that ended a thread (pynetdicom's DUL thread)
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type.__name__))
    server = _GuardedServer(patched)
    peer = server.associated_peer(timeout=5)
    try:
        no_command_field = struct.pack("<HHL", 0x0000, 0x0000, 4) + struct.pack("<L", 0)
        peer.send(p_data_tf([(1, 0x03, no_command_field)]))  # last command fragment
        answer = peer.read_pdu()
        assert (answer is not None and answer[0] == 0x07) is patched  # A-ABORT
        assert server.aborted.wait(3) is patched
        reasons = [reason for reason, _ in server.violations]
        assert reasons == (["invalid_dimse_message"] if patched else [])
        assert raised == ([] if patched else ["AttributeError"])  # no Command Field
    finally:
        peer.close()
        server.stop()


def test_nothing_is_read_while_the_association_request_is_decided(
    patched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that sends a P-DATA right behind its A-ASSOCIATE-RQ, in one write: pynetdicom's
    DUL thread reads it while the acceptor decides (Sta3) and answers it with an A-ABORT
    (Sta13), and the acceptor's A-ASSOCIATE-AC then comes too late: the peer never gets its
    answer (a race, so the control tries up to 40 times; before ``late_primitives``, the DUL
    thread died of InvalidEventError on it). Guarded, the answer goes out first, every time."""
    raised: list[str] = []  # exceptions that ended a thread (pynetdicom's DUL thread)
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type.__name__))
    server = _GuardedServer(patched)
    answered_first = True
    try:
        for _ in range(40 if not patched else 10):
            peer = RawPeer(server.port, timeout=5)
            try:
                peer.send(associate_rq() + p_data_tf([(1, 0x03, bytes(8))]))
                pdus = [pdu_type for pdu_type, _ in peer.pdus_until_closed()]
            finally:
                peer.close()
            assert wait_for(lambda: not server.server.active_associations, timeout=5)
            answered_first = pdus == [0x02, 0x07]  # A-ASSOCIATE-AC, then A-ABORT
            if not answered_first:
                break
        assert answered_first is patched
        assert raised == []
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("pdu", "pdu_type"),
    [
        # an even presentation context ID (PS3.8 9.3.2.2: odd integers)
        (associate_rq(contexts=[(2, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))]), 0x01),
        # an A-ABORT from source 3 (PS3.8 9.3.8: 0, 1 or 2), once associated
        (struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 3, 0), 0x07),
    ],
    ids=["even_context_id", "abort_source_3"],
)
def test_a_pdu_with_parameters_pynetdicom_refuses_is_aborted(
    patched: bool, monkeypatch: pytest.MonkeyPatch, pdu: bytes, pdu_type: int
) -> None:
    """pynetdicom turns these PDUs into primitives in the state machine's action, outside any
    try: ValueError kills the DUL thread, and the peer is told nothing (an association request
    waits for ``acse_timeout``; an established association is never audited as aborted).
    Guarded, it is an invalid PDU: an A-ABORT, audited, and EVT_ABORTED once established."""
    raised: list[str] = []  # exceptions that ended a thread (pynetdicom's DUL thread)
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type.__name__))
    server = _GuardedServer(patched)
    try:
        if pdu_type == 0x01:
            peer = RawPeer(server.port, timeout=2)
        else:
            peer = server.associated_peer(timeout=2)
        try:
            peer.send(pdu)
            answer = peer.read_pdu()
        finally:
            peer.close()
        assert (answer is not None and answer[0] == 0x07) is patched  # A-ABORT
        assert server.violations == (
            [("invalid_pdu_parameters", {"pdu_type": pdu_type})] if patched else []
        )
        if pdu_type == 0x07:
            assert server.aborted.wait(3) is patched
        assert raised == ([] if patched else ["ValueError"])
    finally:
        server.stop()


def test_a_valid_association_request_is_converted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's check hands the state machine's action the primitive it made."""
    calls = [0]
    to_primitive = pynetdicom.pdu.A_ASSOCIATE_RQ.to_primitive

    def counted(pdu: pynetdicom.pdu.A_ASSOCIATE_RQ) -> Any:
        calls[0] += 1
        return to_primitive(pdu)

    monkeypatch.setattr(pynetdicom.pdu.A_ASSOCIATE_RQ, "to_primitive", counted)
    server = _GuardedServer(True)
    try:
        server.associated_peer(timeout=5).close()
        assert calls == [1]
    finally:
        server.stop()


@pytest.mark.parametrize("state", ["Sta13", "Sta1"])
def test_a_primitive_after_the_peer_ended_the_association_is_dropped(
    late_primitives: bool, state: str
) -> None:
    """The acceptor answers a release request while a PDU read behind it has the association
    aborted (Sta13: A-ABORT sent, waiting for the connection to close): pynetdicom's state
    machine has no transition for the A-RELEASE response there, and InvalidEventError ends the
    DUL thread (seen in the fuzzer's streams; a race, so shown here on the state machine)."""
    assoc = Association(AE("ANONPROXY"), "acceptor")
    dul = assoc.dul
    dul.state_machine.current_state = state
    response = pynetdicom.pdu_primitives.A_RELEASE()
    response.result = "affirmative"
    dul.to_provider_queue.put(response)
    assert dul._process_recv_primitive()
    event = dul.event_queue.get(False)
    assert event == "Evt14"
    if late_primitives:
        dul.state_machine.do_action(event)
        assert dul.to_provider_queue.empty()  # dropped, not left to be seen again
        assert dul.state_machine.current_state == state
    else:
        with pytest.raises(pynetdicom.fsm.InvalidEventError):
            dul.state_machine.do_action(event)


# --- the TLS handshake in the association's thread ----------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki")).create()


def test_a_silent_tls_client_does_not_stall_the_others(patched: bool, pki: Pki) -> None:
    """pynetdicom shakes hands in its accept loop: one client that connects and says nothing
    holds up every other until it goes. Deferred, each handshake runs in its association's
    thread: the next client is served while the silent one is still connected."""
    config = TlsServerConfig(certificate=pki.server_cert, private_key=pki.server_key)
    if patched:
        context = server_context(config)
        handlers = [
            (evt.EVT_CONN_OPEN, lambda e: patches.finish_tls_handshake(e.assoc, 5.0)),
        ]
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        handlers = []
    ae = AE("PATCHES")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, ssl_context=context, evt_handlers=handlers
    )
    silent = socket.create_connection(("127.0.0.1", port))
    gone = threading.Event()

    def leave() -> None:
        gone.set()
        silent.close()

    timer = threading.Timer(3.0, leave)
    timer.start()
    try:
        client = ssl.create_default_context(cafile=str(pki.ca))
        requestor = AE("CALLER")
        requestor.add_requested_context(Verification)
        assoc = requestor.associate(
            "127.0.0.1", port, ae_title="PATCHES", tls_args=(client, "localhost")
        )
        served_while_silent_connected = not gone.is_set()
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert served_while_silent_connected is patched
    finally:
        timer.join()
        server.shutdown()


def test_a_tls_handshake_is_bounded_by_its_time_out(patched: bool, pki: Pki) -> None:
    """A client that connects and never shakes hands is cut off once the handshake time-out
    passes. Without the hook, the deferred handshake happens on the upper layer's first read,
    unbounded, and the connection stays open until the ACSE time-out (here 30 s)."""
    config = TlsServerConfig(certificate=pki.server_cert, private_key=pki.server_key)
    failures: list[OSError | ValueError | None] = []

    def on_open(event: evt.Event) -> None:
        if patched:
            failures.append(patches.finish_tls_handshake(event.assoc, 0.5))

    server, port = _slow_acse_server(on_open, ssl_context=server_context(config))
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            closed = silent.recv(1) == b""  # the server closed the connection
        except TimeoutError:
            closed = False
        assert closed is patched
        # The handler records the failure once the hook has closed the connection.
        assert wait_for(lambda: len(failures) == int(patched), timeout=5, interval=0.01)
        assert [type(f).__name__ for f in failures] == (["TimeoutError"] if patched else [])
    finally:
        silent.close()
        server.shutdown()


# --- Maximum Length 0 ---------------------------------------------------------------------------


def test_a_peer_that_takes_any_pdu_length_is_sent_bounded_pdus(
    patched: bool, tmp_path: Path
) -> None:
    peer = RefusingSCP(0x0000, max_pdu=0).start()
    path = _large_file(tmp_path, 3 << 20)
    ae = AE("PATCHES")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
    try:
        assert assoc.is_established
        if patched:
            patches.bound_peer_max_length(assoc, 1 << 20)
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
        peer.stop()
    assert sum(peer.pdv_lengths) > 3 << 20
    if patched:
        assert max(peer.pdv_lengths) <= 1 << 20
    else:
        assert max(peer.pdv_lengths) > 3 << 20  # the whole data set as one PDU


# --- data set fragments, straight to the file (guard_pdus) --------------------------------------


class _StoreServer:
    """A pynetdicom Storage SCP (16 KiB PDUs) whose associations are guarded (with *bound* on
    the data set); each C-STORE's received file is kept in :attr:`received`."""

    def __init__(self, *, bound: int | None = None, pdu_handler: bool = False) -> None:
        self.received: list[tuple[bytes, bool]] = []  # the file's bytes, cut by the bound
        self.violations: list[str] = []
        self.guards: list[PduGuard] = []

        def guard(event: evt.Event) -> None:
            pdu_guard = PduGuard(16384, lambda r, d: self.violations.append(r), bound)
            self.guards.append(pdu_guard)
            patches.guard_pdus(event.assoc, pdu_guard, read_timeout=10)

        def store(event: evt.Event) -> int:
            data = Path(event.dataset_path).read_bytes()
            self.received.append((data, self.guards[-1].data_sets.oversized))
            return 0x0000

        handlers: list[Any] = [(evt.EVT_CONN_OPEN, guard), (evt.EVT_C_STORE, store)]
        if pdu_handler:
            handlers.append((evt.EVT_PDU_RECV, lambda _: None))
        self.server, self.port = _sc_acceptor(handlers)

    def store(self, path: Path) -> Dataset:
        requestor = AE("CALLER")
        requestor.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        assoc = requestor.associate("127.0.0.1", self.port, ae_title="PATCHES")
        assert assoc.is_established
        try:
            return assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
            self.server.shutdown()


def _count_pdata_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count P-DATA-TF PDUs decoded, with pynetdicom's logging handlers off (as the service
    runs: they are bound to EVT_PDU_RECV)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    decoded: list[int] = []
    original = pynetdicom.pdu.P_DATA_TF.decode

    def counted(self: Any, bytestream: bytes) -> None:
        decoded.append(len(bytestream))
        original(self, bytestream)

    monkeypatch.setattr(pynetdicom.pdu.P_DATA_TF, "decode", counted)
    return decoded


@pytest.mark.parametrize("pdu_handler", [False, True], ids=["straight", "handler-bound"])
def test_data_set_fragments_go_straight_to_the_file(
    pdu_handler: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data set of 13 PDUs: pynetdicom decodes each into PDU and P-DATA objects and passes
    it through its state machine to the DIMSE layer, which writes it to the file. Guarded, only
    the command and the last fragment go that way (and the response, on the requestor's side);
    the file holds the same data set. A handler bound to EVT_PDU_RECV sees every PDU."""
    decoded = _count_pdata_decodes(monkeypatch)
    source = _large_file(tmp_path, 200_000)
    server = _StoreServer(pdu_handler=pdu_handler)
    assert server.store(source).Status == 0x0000
    ((data, cut),) = server.received
    assert not cut
    with source.open("rb") as handle:
        sent = handle.read()[data_set_offset(handle) :]
    assert data[-len(sent) :] == sent
    assert data.startswith(b"\0" * 128 + b"DICM")
    assert len(data) == data_set_offset(BytesIO(data)) + len(sent)
    data_pdus = -(-len(sent) // (16384 - 6 - 6))  # at most 16384 bytes: PDU and PDV headers
    if pdu_handler:
        assert len(decoded) >= data_pdus + 2
    else:
        assert len(decoded) == 3  # the request's command and last fragment, the response
    assert server.violations == []


class _DataSetFile:
    """What pynetdicom (and _write_fragments) use of the file a data set is received into:
    collects what is written; with *fail_after*, raises on each write after that many."""

    def __init__(self, name: str = "", fail_after: int | None = None) -> None:
        self.name = name
        self.fail_after = fail_after
        self.writes = 0
        self.written = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        self.writes += 1
        if self.fail_after is not None and self.writes > self.fail_after:
            raise OSError(28, "No space left on device")
        self.written += data
        return len(data)

    @property
    def file(self) -> Any:
        return self

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Fits:
    def fits(self, size: int) -> bool:
        return True


_PDVS = st.lists(
    st.tuples(
        st.sampled_from([1, 3, 5]),  # presentation context ID
        st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0xFC]),  # message control header
        st.binary(max_size=300),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(pdvs=_PDVS)
def test_straight_fragments_are_the_values_pynetdicom_decodes(
    pdvs: list[tuple[int, int, bytes]],
) -> None:
    """Any P-DATA-TF body: written straight only when every PDV is a data set fragment of the
    message's context and none the last, and then exactly the fragments pynetdicom's decoder
    gives the DIMSE layer (each value without its control header), in order."""
    primitive = pynetdicom.pdu_primitives.P_DATA()
    primitive.presentation_data_value_list = [[c, bytes([h]) + v] for c, h, v in pdvs]
    body = bytearray(patches.encode_p_data(primitive)[6:])
    file = _DataSetFile()
    message = types.SimpleNamespace(context_id=1, _data_set_file=file)
    undecodable: list[int] = []
    straight = patches._write_fragments(message, _Fits(), body, lambda: undecodable.append(1))
    decoded = pynetdicom.pdu.P_DATA_TF()
    decoded.decode(bytes(patches.encode_p_data(primitive)))
    values = decoded.to_primitive().presentation_data_value_list
    expected = all(c == 1 and not v[0] & 0x03 for c, v in values)
    assert straight is expected
    assert bytes(file.written) == (b"".join(v[1:] for _, v in values) if expected else b"")
    assert undecodable == []


def test_straight_fragments_are_counted_by_the_data_set_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fragments written straight to the file count towards the data set bound; past it, they
    go to the guard's cut (the file keeps no more than the bound, the handler is told)."""
    decoded = _count_pdata_decodes(monkeypatch)
    server = _StoreServer(bound=50_000)
    assert server.store(_large_file(tmp_path, 200_000)).Status == 0x0000
    ((data, cut),) = server.received
    assert cut
    assert data_set_offset(BytesIO(data)) + 40_000 < len(data) <= 50_000 + 1024
    assert len(decoded) > 3  # past the bound, every fragment through the guard's cut


def test_a_straight_fragment_that_cannot_be_written_aborts_the_association(
    tmp_path: Path,
) -> None:
    """As when the DIMSE layer fails to write a fragment: the message is undecodable, the
    association is aborted (and the guard told), nothing is acknowledged."""
    original = pynetdicom.dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
    # preamble, DICM, file meta and two fragments written; the third fails
    patches.receive_data_sets_into(
        lambda: _DataSetFile(str(tmp_path / "received.dcm"), fail_after=5)
    )
    try:
        server = _StoreServer()
        answer = server.store(_large_file(tmp_path, 200_000))
    finally:
        pynetdicom.dimse_messages.NamedTemporaryFile = original  # type: ignore[attr-defined]
    assert "Status" not in answer  # no answer: aborted
    assert server.received == []
    assert server.violations == ["invalid_dimse_message"]


# --- direct_p_data ------------------------------------------------------------------------------


def test_a_p_data_tf_is_encoded_as_pynetdicom_encodes_it() -> None:
    """The same bytes as ``P_DATA_TF(primitive).encode()``, for commands and fragments of
    every size and for several PDVs in one PDU."""
    for values in (
        [(1, b"\x03" + bytes(100))],
        [(3, b"\x00" + os.urandom(16372))],
        [(5, b"\x02"), (5, b"\x01" + b"cmd"), (7, b"\x00" + os.urandom(70000))],
        [(255, b"\x02" + os.urandom(131066))],
    ):
        primitive = pynetdicom.pdu_primitives.P_DATA()
        primitive.presentation_data_value_list = [[c, v] for c, v in values]
        expected = pynetdicom.pdu.P_DATA_TF(primitive).encode()
        assert patches.encode_p_data(primitive) == expected


def _stores(
    path: Path, handlers: list[Any], *, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
) -> tuple[list[bytes], list[int], Any]:
    """C-STORE *path* (16 KiB PDUs) with the requestor's *handlers*, pynetdicom's logging
    handlers off (as the service runs: they are bound to EVT_PDU_SENT); the data sets received,
    the P-DATA-TF PDU objects built to be sent, and the requestor's DUL."""
    received: list[bytes] = []
    level, _config.LOG_HANDLER_LEVEL = _config.LOG_HANDLER_LEVEL, "none"

    def store(event: evt.Event) -> int:
        received.append(Path(event.dataset_path).read_bytes())
        return 0x0000

    server, port = _sc_acceptor([(evt.EVT_C_STORE, store)], tls[0] if tls else None)
    built: list[int] = []
    original = pynetdicom.pdu.P_DATA_TF.__init__

    def counted(self: Any, *args: Any) -> None:
        if args:  # built to be sent (DT-1); one built empty is decoded into
            built.append(1)
        original(self, *args)

    requestor = AE("CALLER")
    requestor.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = requestor.associate(
        "127.0.0.1",
        port,
        ae_title="PATCHES",
        evt_handlers=handlers,
        tls_args=(tls[1], "localhost") if tls else None,
    )
    try:
        assert assoc.is_established
        pynetdicom.pdu.P_DATA_TF.__init__ = counted  # type: ignore[method-assign]
        try:
            assert assoc.send_c_store(path).Status == 0x0000
        finally:
            pynetdicom.pdu.P_DATA_TF.__init__ = original  # type: ignore[method-assign]
        return received, built, assoc.dul
    finally:
        assoc.release()
        server.shutdown()
        _config.LOG_HANDLER_LEVEL = level


def test_a_p_data_is_sent_by_the_thread_sending_it(direct_p_data: bool, tmp_path: Path) -> None:
    """pynetdicom builds a P_DATA_TF object for each PDU it sends (in DT-1, in the DUL
    thread, after a hand-off through its queue); sent directly, none is built and the
    acceptor receives the same data set."""
    source = _large_file(tmp_path, 200_000)
    received, built, _ = _stores(source, [])
    with source.open("rb") as handle:
        sent = handle.read()[data_set_offset(handle) :]
    ((data,),) = [received]
    assert data.endswith(sent)
    fragments = -(-len(sent) // (16384 - 12))
    if direct_p_data:
        assert built == []
    else:  # the command, the fragments, and the acceptor's response
        assert len(built) == fragments + 2


def _store_message(path: Path, offset: int) -> Any:
    request = pynetdicom.dimse_primitives.C_STORE()
    request.MessageID, request.Priority = 7, 0
    request.AffectedSOPClassUID = SecondaryCaptureImageStorage
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request._dataset_path = (path, offset)
    message = pynetdicom.dimse_messages.C_STORE_RQ()
    message.primitive_to_message(request)
    return message


def _message_pdus(path: Path, offset: int, max_pdu: int) -> tuple[bytes, list[Any]]:
    """The P-DATA-TF PDUs ``encode_msg`` gives for a C-STORE of the data set in *path* (from
    *offset*): all of them encoded, and the data set's P-DATA values one at a time."""
    primitives = list(_store_message(path, offset).encode_msg(1, max_pdu))
    encoded = b"".join(
        p.encoded if hasattr(p, "encoded") else patches.encode_p_data(p) for p in primitives
    )
    values = []
    for primitive in primitives[1:]:
        expanded = primitive.primitives() if hasattr(primitive, "primitives") else [primitive]
        values += [pdata.presentation_data_value_list for pdata in expanded]
    return encoded, values


def test_a_data_set_sent_from_a_file_is_encoded_in_windows_of_the_same_pdus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of fragments, each encoded in one buffer: the same bytes as pynetdicom's
    ``encode_msg`` and one P-DATA-TF per P-DATA, for data sets of every length against the
    fragment and window sizes (an empty one is one empty last fragment), and the same P-DATA
    when they must go pynetdicom's way."""
    step = 1000 - 6
    monkeypatch.setattr(patches, "WINDOW_BYTES", 3 * step + 10)  # 3 fragments per window
    offset = 132
    for length in (0, 1, step - 1, step, step + 1, 3 * step, 3 * step + 1, 7 * step + 5):
        path = tmp_path / f"{length}.dcm"
        path.write_bytes(os.urandom(offset + length))
        patches.uninstall()
        patches.install(without={"direct_p_data"})
        expected = _message_pdus(path, offset, 1000)
        patches.install()
        windows = list(_store_message(path, offset).encode_msg(1, 1000))[1:]
        assert len(windows) == max(1, -(-length // (3 * step)))
        assert _message_pdus(path, offset, 1000) == expected, length


def test_a_data_set_sent_from_a_file_takes_one_send_per_window(
    direct_p_data: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom sends a data set in one system call per P-DATA-TF (16 KiB: 13 for 200 KB);
    sent directly, the PDUs of up to WINDOW_BYTES of it go in one."""
    sends: list[int] = []
    send = pynetdicom.transport.AssociationSocket.send

    def counted(self: Any, data: bytes) -> None:
        if threading.current_thread() is threading.main_thread() or not direct_p_data:
            sends.append(len(data))
        send(self, data)

    monkeypatch.setattr(pynetdicom.transport.AssociationSocket, "send", counted)
    source = _large_file(tmp_path, 200_000)
    received, _, _ = _stores(source, [])
    assert len(received) == 1
    with source.open("rb") as handle:
        data_set = len(handle.read()) - data_set_offset(handle)
    fragments = -(-data_set // (16384 - 6))
    p_data = [size for size in sends if size > 1000]  # not the command, response, A-RELEASE
    assert len(p_data) == (1 if direct_p_data else fragments)
    assert sum(p_data) == data_set + 12 * fragments


@pytest.mark.parametrize("case", ["pdu-sent-handler", "tls"])
def test_a_p_data_goes_through_the_dul_thread_when_it_must(
    case: str, tmp_path: Path, pki: Pki
) -> None:
    """With a handler bound to EVT_PDU_SENT (it sees the PDU objects) or over TLS (an SSL
    socket is written by the thread that reads it), every P-DATA goes pynetdicom's way; the
    P-DATA queued are all counted out once sent (a later one may go directly again)."""
    source = _large_file(tmp_path, 100_000)
    seen: list[str] = []
    handlers = [(evt.EVT_PDU_SENT, lambda e: seen.append(type(e.pdu).__name__))]
    tls = None
    if case == "tls":
        server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_side.load_cert_chain(pki.server_cert, pki.server_key)
        tls, handlers = (server_side, ssl.create_default_context(cafile=str(pki.ca))), []
    received, built, dul = _stores(source, handlers, tls=tls)
    assert len(received) == 1
    fragments = 100_000 // (16384 - 12) + 1
    assert len(built) >= fragments + 1  # the command and the fragments: P_DATA_TF, in DT-1
    if case == "pdu-sent-handler":
        assert seen.count("P_DATA_TF") == fragments + 1
    assert patches._sending_of(dul).queued == 0

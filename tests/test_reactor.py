"""Event-driven waits in pynetdicom's reactors (anonproxy.reactor)."""

from __future__ import annotations

import os
import subprocess

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from anonproxy import reactor

from peers import PEER_ENV, StoreSCP, free_port, tool, wait_for


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_install_is_idempotent_and_only_changes_sleep() -> None:
    reactor.install()
    patched = pynetdicom.dul.time
    reactor.install()
    assert pynetdicom.dul.time is patched
    assert pynetdicom.association.time is patched
    assert patched.monotonic is __import__("time").monotonic


def test_an_acceptor_serves_every_request_and_releases_its_wake_up_pipe() -> None:
    reactor.install()
    served: list[int] = []
    duls: list[object] = []

    def on_echo(event: evt.Event) -> int:
        served.append(1)
        duls.append(event.assoc.dul)
        return 0x0000

    ae = AE("REACTOR")
    ae.add_supported_context(Verification)
    port = free_port()
    before = _open_descriptors()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, on_echo)]
    )
    try:
        for _ in range(3):  # three associations of 50 C-ECHOs each, from DCMTK
            done = subprocess.run(
                [tool("echoscu"), "-aec", "REACTOR", "--repeat", "50", "127.0.0.1", str(port)],
                env=PEER_ENV,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    assert len(served) == 150
    dul = duls[-1]
    assert getattr(dul, "_anonproxy_reads", 0) >= 50  # every PDU read went through the hook
    assert getattr(dul, "_anonproxy_wakeup", "gone") is None  # closed when the reactor ended
    assert _open_descriptors() <= before  # no pipe left open per association


def test_a_requestor_reactor_leaves_responses_to_the_sending_thread(storescp: StoreSCP) -> None:
    """pynetdicom's send_c_store does not pause the requestor's association thread, which took
    any message off the DIMSE queue: now and then the C-STORE response (then dropped)."""
    reactor.install()
    ae = AE("REACTOR")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", storescp.port, ae_title=storescp.ae_title)
    assert assoc.is_established
    messages = assoc.dimse.msg_queue
    response, request = C_ECHO(), C_ECHO()
    response.MessageIDBeingRespondedTo, response.Status = 1, 0x0000
    request.MessageID, request.AffectedSOPClassUID = 2, Verification
    try:
        assoc._reactor_checkpoint.clear()  # the real reactor thread stays out of the way
        assert wait_for(lambda: assoc._is_paused, timeout=5)
        reactor._waiter.leave_responses = True  # this thread looks as the reactor does
        messages.put((1, response))
        assert assoc.dimse.get_msg(block=False) == (None, None)
        assert messages.qsize() == 1  # left for the thread waiting on it
        assert assoc.dimse.get_msg(block=True) == (1, response)
        messages.put((1, request))
        assert assoc.dimse.get_msg(block=False) == (1, request)  # requests are served as before
        assert assoc.dimse.get_msg(block=False) == (None, None)
    finally:
        reactor._waiter.leave_responses = False
        assoc._reactor_checkpoint.set()
        assoc.release()


def test_an_expired_network_time_out_stays_expired_once_seen() -> None:
    """The peer's answer to the A-ABORT restarts pynetdicom's idle timer: the cause of the
    abort must still read as the time-out (the SCP audits association.idle_timeout by it)."""
    reactor.install()
    dul = pynetdicom.dul.DULServiceProvider(_FakeAssoc())  # type: ignore[arg-type]
    dul._idle_timer.timeout = 0.01
    dul._idle_timer.start()
    assert wait_for(dul.idle_timer_expired, timeout=2, interval=0.01)
    dul._idle_timer.restart()  # a transport event after the abort
    assert not dul._idle_timer.expired
    assert dul.idle_timer_expired()


class _FakeAssoc:
    """What DULServiceProvider's constructor reads of its association."""

    def __init__(self) -> None:
        self.ae = AE()
        self.network_timeout = self.ae.network_timeout
        self.is_requestor = False


def test_a_wake_up_pending_is_written_once() -> None:
    """A data set of many PDUs: one byte in the pipe until the DUL thread reads it."""
    wakeup = reactor._Wakeup()
    try:
        for _ in range(5):
            wakeup.set()
        assert os.read(wakeup.read_fd, 4096) == b"\0"
        wakeup.clear()
        wakeup.set()  # after a read, the next one is written again
        assert os.read(wakeup.read_fd, 4096) == b"\0"
    finally:
        wakeup.close()

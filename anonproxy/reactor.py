"""Event-driven waits for pynetdicom's reactor loops.

pynetdicom 3.0.4 runs two polling loops per association: the upper layer (DUL) thread sleeps
``_run_loop_delay`` (1 ms) whenever its event queue is empty, and the association thread
sleeps 1 ms before every look at the DIMSE message queue. One sender waits for each C-STORE
response before it sends the next request, so these sleeps are on the critical path of every
instance: a message waits on average half a loop at each of three hand-offs (request bytes to
the DUL, the decoded message to the association thread, the response back to the DUL). Short
sleeps would cut that wait but make every thread wake thousands of times a second, and each
wake-up competes for the interpreter lock with the threads doing the real work.

:func:`install` keeps pynetdicom's loops and delays but turns their sleeps into waits that end
as soon as there is something to do:

* the DUL thread (of acceptors and requestors) waits with ``select`` on its socket and on a
  pipe that :meth:`~pynetdicom.dul.DULServiceProvider.send_pdu` writes to when another thread
  hands it a primitive to send (forwarding: 210 C-STOREs/s to storescp before, 270-290 after);
* the association thread of an acceptor waits on its DIMSE message queue's condition (and
  passes the wake-up on, in case another thread is blocked in ``get`` on the same queue).

It also mends a race of requestors: pynetdicom's association thread takes any message off the
DIMSE queue every millisecond, and ``send_c_store`` does not pause it (``send_c_echo`` does),
so now and then it took the C-STORE response that the sending thread was waiting for and
dropped it: that send waited for the DIMSE time-out (60 s) and was retried. The association
thread of a requestor now leaves responses (messages with a Status) to the sending thread.

It also bounds what a sending thread queues ahead of the DUL thread (:func:`_wait_for_room`),
so that a large data set sent from a file streams from disk instead of filling memory.

And it latches the network time-out (:func:`_idle_timer_expired`): the association thread
aborts when the DUL's idle timer has expired, but the peer closing the connection in answer to
the A-ABORT is a transport event, which restarts that timer, sometimes before the
EVT_ABORTED handlers ask whether the time-out was the cause (the SCP's
``association.idle_timeout`` audit record was then missing).

And it reads the file meta of a data set sent from a file (``send_c_store(path)``) with
:func:`anonproxy.filemeta.read_file_meta`: pynetdicom's ``split_dataset`` decodes the whole
group 0002 with pydicom for the three UIDs it needs (:func:`_split_dataset`).

With nothing to do, each still wakes once per delay (1 ms), as before, to check its timers and
flags. It depends on pynetdicom's internals (the version is pinned) and is a candidate for an
upstream option.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from anonproxy.filemeta import read_file_meta

MAX_QUEUED_PDUS = 16
"""P-DATA PDUs a sending thread may queue ahead of the DUL thread (each at most the peer's
maximum PDU length)."""

_waiter = threading.local()  # .wait: how the current reactor thread waits, if it is one


def _sleep(seconds: float) -> None:
    wait: Callable[[float], None] | None = getattr(_waiter, "wait", None)
    if wait is None:
        time.sleep(seconds)
    else:
        wait(seconds)


class _ReactorTime(types.ModuleType):
    """The :mod:`time` module as pynetdicom's reactors see it: only ``sleep`` differs."""

    sleep = staticmethod(_sleep)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - mirrors the time module
        return getattr(time, name)


class _Wakeup:
    """A pipe that another thread writes to, to end a DUL thread's wait early.

    One byte at a time: while one is unread, :meth:`set` writes no other (a data set sent as
    many PDUs would otherwise cost one system call per PDU)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False
        self._signalled = False

    def set(self) -> None:
        with self._lock:  # never write to a closed (and perhaps reused) descriptor
            if not self._closed and not self._signalled:
                self._signalled = True
                with contextlib.suppress(BlockingIOError):  # already full: already set
                    os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        with self._lock:  # before reading: a set() from now on writes again
            self._signalled = False
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 4096)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._write_fd)
        os.close(self.read_fd)


def _dul_wait(dul: DULServiceProvider, wakeup: _Wakeup) -> Callable[[float], None]:
    reads_at_socket_wake: int | None = None  # set when the socket ended the last wait

    def wait(seconds: float) -> None:
        nonlocal reads_at_socket_wake
        sock = getattr(dul.socket, "socket", None)
        reads = getattr(dul, "_anonproxy_reads", 0)
        if sock is None or sock.fileno() < 0 or reads_at_socket_wake == reads:
            # No socket, or readable data that this state does not read: sleep, not spin.
            reads_at_socket_wake = None
            time.sleep(seconds)
            return
        reads_at_socket_wake = None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data waiting in the SSL buffer: select cannot see it
        try:
            ready, _, _ = select.select([sock, wakeup.read_fd], [], [], seconds)
        except (OSError, ValueError):  # the socket was closed meanwhile: the loop will see it
            return
        if wakeup.read_fd in ready:
            wakeup.clear()
        elif ready:
            reads_at_socket_wake = reads

    return wait


def _read_pdu_data(original: Callable[[DULServiceProvider], None]) -> Callable[..., None]:
    def read_pdu_data(self: DULServiceProvider) -> None:
        self._anonproxy_reads = getattr(self, "_anonproxy_reads", 0) + 1  # type: ignore[attr-defined]
        original(self)

    return read_pdu_data


def _run_dul_reactor(original: Callable[[DULServiceProvider], None]) -> Callable[..., None]:
    def run_reactor(self: DULServiceProvider) -> None:
        wakeup = _Wakeup()
        self._anonproxy_wakeup = wakeup  # type: ignore[attr-defined]
        _waiter.wait = _dul_wait(self, wakeup)
        try:
            original(self)
        finally:
            _waiter.wait = None
            self._anonproxy_wakeup = None  # type: ignore[attr-defined]
            wakeup.close()

    return run_reactor


def _send_pdu(original: Callable[[DULServiceProvider, Any], None]) -> Callable[..., None]:
    def send_pdu(self: DULServiceProvider, primitive: Any) -> None:  # noqa: ANN401
        original(self, primitive)
        wakeup: _Wakeup | None = getattr(self, "_anonproxy_wakeup", None)
        if wakeup is not None:
            wakeup.set()
        if isinstance(primitive, P_DATA) and threading.current_thread() is not self:
            _wait_for_room(self)

    return send_pdu


def _wait_for_room(dul: DULServiceProvider) -> None:
    """Back-pressure: pynetdicom's DIMSE layer queues every P-DATA fragment of a message at
    once, so a data set sent from a file would sit whole in the queue, in memory, while the DUL
    thread sends it. The thread queuing waits until the DUL thread has taken all but
    :data:`MAX_QUEUED_PDUS` (or is gone)."""
    queued = dul.to_provider_queue
    with queued.not_full:  # get() notifies it
        while queued._qsize() > MAX_QUEUED_PDUS and dul.is_alive() and not dul._kill_thread:
            queued.not_full.wait(0.05)


def _run_association_reactor(original: Callable[[Association], None]) -> Callable[..., None]:
    def run_reactor(self: Association) -> None:
        if self.is_requestor:
            _waiter.leave_responses = True
            try:
                original(self)
            finally:
                _waiter.leave_responses = False
            return
        messages = self.dimse.msg_queue

        def wait(seconds: float) -> None:
            with messages.not_empty:  # the queue's mutex: use its unlocked _qsize
                if not messages._qsize():
                    messages.not_empty.wait(seconds)
                if messages._qsize():
                    # put() wakes one waiter: pass it on, in case it was meant for a thread
                    # blocked in get() (a requestor waiting for its C-STORE response).
                    messages.not_empty.notify()

        _waiter.wait = wait
        try:
            original(self)
        finally:
            _waiter.wait = None

    return run_reactor


def _get_msg(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:  # noqa: ANN401
        if block or not getattr(_waiter, "leave_responses", False):
            return original(self, block)
        messages = self.msg_queue
        with messages.mutex:  # look and take at once: the sending thread takes from the head
            if not messages.queue or getattr(messages.queue[0][1], "Status", None) is not None:
                return None, None  # nothing, or a response: the sending thread's
            item = messages._get()
            messages.not_full.notify()
            return item

    return get_msg


def _idle_timer_expired(original: Callable[..., bool]) -> Callable[..., bool]:
    def idle_timer_expired(self: DULServiceProvider) -> bool:
        if getattr(self, "_anonproxy_idle_expired", False):
            return True
        expired = original(self)
        if expired:
            self._anonproxy_idle_expired = True  # type: ignore[attr-defined]
        return expired

    return idle_timer_expired


def _split_dataset(path: Any) -> tuple[FileMetaDataset, int]:  # noqa: ANN401 - a path
    """pynetdicom's ``split_dataset`` (the file meta elements that ``send_c_store`` needs, and
    where the data set starts), from :func:`~anonproxy.filemeta.read_file_meta`."""
    meta = read_file_meta(Path(path))
    elements = FileMetaDataset()
    elements.MediaStorageSOPClassUID = UID(meta.sop_class)
    elements.MediaStorageSOPInstanceUID = UID(meta.sop_instance)
    elements.TransferSyntaxUID = UID(meta.transfer_syntax)
    return elements, meta.offset


def install() -> None:
    """Make pynetdicom's reactor loops wait for work instead of sleeping (idempotent)."""
    if isinstance(getattr(pynetdicom.dul, "time", None), _ReactorTime):
        return
    reactor_time = _ReactorTime("time")
    pynetdicom.dul.time = reactor_time  # type: ignore[attr-defined]
    pynetdicom.association.time = reactor_time  # type: ignore[attr-defined]
    DULServiceProvider.run_reactor = _run_dul_reactor(DULServiceProvider.run_reactor)  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _read_pdu_data(DULServiceProvider._read_pdu_data)  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _send_pdu(DULServiceProvider.send_pdu)  # type: ignore[method-assign]
    Association._run_reactor = _run_association_reactor(Association._run_reactor)  # type: ignore[method-assign]
    DIMSEServiceProvider.get_msg = _get_msg(DIMSEServiceProvider.get_msg)  # type: ignore[method-assign]
    DULServiceProvider.idle_timer_expired = _idle_timer_expired(  # type: ignore[method-assign]
        DULServiceProvider.idle_timer_expired
    )
    pynetdicom.association.split_dataset = _split_dataset  # type: ignore[attr-defined]

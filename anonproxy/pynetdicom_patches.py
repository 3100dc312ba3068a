"""Every change anonproxy makes to pynetdicom's behaviour, in one place.

anonproxy uses pynetdicom for its Storage SCP (:mod:`anonproxy.scp`) and for the C-STORE SCU of
its forwarding (:mod:`anonproxy.forward`). Where pynetdicom's behaviour is not what anonproxy
needs, the change is made here and nowhere else, on pynetdicom's internals as they are in the
pinned version, :data:`PINNED_VERSION`. Each change names the upstream behaviour it corrects
and has a test that fails without it (``tests/test_pynetdicom_patches.py``).

**Version gate.** :func:`install` refuses to run against any other pynetdicom version: it
raises :class:`UnsupportedPynetdicom` (a :class:`~anonproxy.errors.ConfigError`: the service
does not start, ``anonproxy: ...`` on one line, exit status 2). Starting with the patches off
instead was rejected: several of them are correctness or security fixes, not speed-ups (the
response race loses C-STORE responses, the PDU guard bounds what a hostile peer can make the
SCP buffer), and others reach into private names that a new version may rename, so "off" could
not be trusted to mean "pynetdicom's own behaviour" either. Upgrading pynetdicom means
re-reading each patch against the new source, adapting it, and moving the pin and
:data:`PINNED_VERSION` together (a test keeps them equal).

Process-wide patches, applied by :func:`install` (idempotent, thread-safe); each has a name,
and the tests use ``install(without={name})`` and :func:`uninstall` to show it is needed:

``reactor_waits``
    pynetdicom 3.0.4 runs two polling loops per association: the upper layer (DUL) thread
    sleeps ``_run_loop_delay`` (1 ms) whenever its event queue is empty
    (``DULServiceProvider.run_reactor``), and the association thread sleeps 1 ms before every
    look at the DIMSE message queue (``Association._run_reactor``). A sender waits for each
    C-STORE response before it sends the next request, so these sleeps are on the critical
    path of every instance (on average half a loop at each of three hand-offs). Here the loops
    and their delays stay, but their sleeps become waits that end as soon as there is
    something to do: the DUL thread waits with ``select`` on its socket and on a pipe that
    ``send_pdu`` writes to when another thread hands it a primitive (forwarding to storescp:
    210 C-STOREs/s before, 270-290 after); the association thread of an acceptor waits on its
    DIMSE message queue's condition, which the DUL thread also notifies when it passes up an
    A-RELEASE or A-ABORT request; that of a requestor, until a sending thread asks it to pause
    (which ``send_c_store`` polls for: it waited up to a loop delay per C-STORE). Nothing else
    these threads act on needs a finer look, so a DUL thread and an acceptor's association
    thread look every :data:`IDLE_WAIT_S` at most: every 1 ms, each wake took the GIL from the
    thread de-identifying or decoding (one storescu association of MR: 103 -> 134 instances/s,
    CPU 11.3 -> 9.1 ms per instance). A requestor's association thread does so once it has
    had nothing to do for :data:`IDLE_AFTER_S` (an idle forwarding association cost 7% of a
    core waking every 1 ms). A DUL thread is woken at once when it is told to stop. An
    acceptor whose peer closed the connection before its association request ends at once
    (:func:`_release_waiting_acceptor`), not after ``acse_timeout``. A sender may hold a
    requestor's association thread paused across several C-STOREs (:func:`hold_reactor`:
    each then skips the pause handshake, two wake-ups of that thread and a 0.1 ms poll;
    forwarding alone to storescp with batches of 4: MR 577-616 -> 768-851/s); an abort or kill
    of the association ends the hold.
``response_race``
    The association thread of a requestor takes any message off the DIMSE queue, and the
    pause handshake (``_reactor_checkpoint`` / ``_is_paused``) that ``send_c_store`` uses to
    keep it away from the response can let it run one more loop: now and then it took the
    C-STORE response that the sending thread waits for, and dropped it (the send then waited
    ``dimse_timeout``). The association thread of a requestor now leaves responses (messages
    with a Status) to the sending thread. Written up for upstream in
    ``docs/upstream/pynetdicom-response-race.md``.
``send_backpressure``
    pynetdicom's DIMSE layer queues every P-DATA fragment of a message at once, so a data set
    sent from a file would sit whole in the DUL's queue, in memory. The thread sending waits
    until the DUL thread has taken all but :data:`MAX_QUEUED_PDUS` (:func:`_wait_for_room`).
``idle_timer_latch``
    The association thread aborts when the DUL's idle timer (``network_timeout``) has expired,
    but the peer closing the connection in answer to the A-ABORT is a transport event that
    restarts that timer, sometimes before the EVT_ABORTED handlers ask whether the time-out was
    the cause. Once seen expired, ``idle_timer_expired`` stays true.
``file_meta``
    ``send_c_store(path)`` finds the three UIDs it needs with ``split_dataset``, which decodes
    the whole group 0002 with pydicom; :func:`anonproxy.filemeta.read_file_meta` reads them
    (:func:`_split_dataset`).
``received_file_meta``
    The file a received data set is written into starts with group 0002, which pynetdicom
    builds as a pydicom data set and writes with ``write_file_meta_info`` (validated, each
    element through pydicom's writer: ~0.3 ms per instance in the DUL thread, the one reading
    the socket). :func:`anonproxy.filemeta.encode_file_meta` writes the same bytes; values it
    does not take (not plain UIDs) still go through pydicom.
``command_sets``
    pynetdicom builds each DIMSE command set it sends as a pydicom data set, encoded twice
    (once for its group length), and reads each one it receives element by element through a
    pydicom data set: ~0.45 ms per message sent, ~0.15 ms per message received, and an
    instance is two messages in the acceptor and two in a forward sender. Those of C-STORE and
    C-ECHO are coded by :mod:`anonproxy.command_set` (:func:`_encoded_message`,
    :func:`_decoded_primitive`: 7 and 26 µs), byte for byte and value for value the same;
    anything else it does not take (another message, a value that is not plain, a message
    that EVT_DIMSE_SENT handlers will read) goes pynetdicom's way. One storescu association of
    MR: 140 -> 171 instances/s, CPU 10.9 -> 7.9 ms per instance over the proxy's processes.
``chunked_data_sets``
    pynetdicom's documented switches ``STORE_RECV_CHUNKED_DATASET`` (a received C-STORE data
    set is written to a file as it arrives, never held whole) and
    ``STORE_SEND_CHUNKED_DATASET`` (a data set sent from a file is streamed from it).
``direct_p_data``
    pynetdicom hands each P-DATA it sends to the DUL thread (a queue, a wake-up, the state
    machine's DT-1 building and encoding a ``P_DATA_TF`` object): 33 hand-offs for a CT image
    to a PACS taking 16 KiB PDUs, and one for each C-STORE response, on the path the sender
    waits on. On an established plain-TCP association with nothing queued before it and no
    handler bound to see the PDU, the thread sending it encodes it (:func:`encode_p_data`, the
    same bytes) and sends it; all sends of a DUL go under one lock (see
    :func:`_apply_direct_p_data`). One storescu association of CT 512x512 to storescp, 4
    interleaved pairs of runs: 84 -> 99 instances/s; the proxy's CPU per instance 12.3-13.2 ->
    9.7-9.8 ms. A data set sent from a file is read, fragmented (the same fragments) and
    encoded a window of about :data:`WINDOW_BYTES` at a time, and each window sent in one
    system call (a forward sender's CPU per CT 512x512 to storescp with 16 KiB PDUs:
    1.01-1.02 -> 0.66-0.76 ms).
``late_primitives``
    A local primitive (a C-STORE response, an A-RELEASE response) that reaches the state
    machine after the peer had the association aborted (Sta13) or closed (Sta1) has no
    transition there: ``do_action`` raised InvalidEventError in the DUL thread, which died.
    It is dropped (:func:`_apply_late_primitives`).

Hooks, applied where they are needed (each documented at its function):

* :func:`receive_data_sets_into`: the file a received data set is written into (pynetdicom
  uses ``tempfile.NamedTemporaryFile`` in the system's temporary folder; the data sets hold
  PHI), and :func:`received_file`, the object it returned for a C-STORE request;
* :func:`guard_pdus`: per association of the SCP, every PDU header checked before its body is
  read, nothing read while the association request is decided, an undecodable DIMSE
  message or a PDU whose parameters pynetdicom refuses (:func:`_check_parameters`) turned into
  an A-ABORT (the policy: :class:`anonproxy.limits.PduGuard`), and the
  data set fragments of a C-STORE request written straight to its file
  (:func:`_read_pdu_data`);
* :func:`finish_tls_handshake`: the TLS handshake in the association's own thread, bounded,
  instead of in the accept loop (with :func:`anonproxy.tls.server_context`'s sockets, which do
  not shake hands when pynetdicom wraps them);
* :func:`bound_peer_max_length`: a destination that accepts any PDU length (Maximum Length 0)
  is sent PDUs of a bounded length, not a whole instance as one PDU;
* :func:`shared_contexts`: the SCP's supported presentation contexts built once and shared
  by every association, not deep-copied for each.

Not here: :func:`anonproxy.audit.silence_pynetdicom_identifiers` sets pynetdicom's documented
logging switches (``_config.LOG_*``), a choice of what is logged rather than a change of
behaviour, and :func:`anonproxy.sop_classes.register_storage` uses the public
``register_uid``. Only :mod:`anonproxy.scp`, :mod:`anonproxy.forward` and the benchmarks import
this module (an import-linter contract).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import pydicom.filewriter
import pynetdicom
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dsutils
import pynetdicom.dul
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.fsm import TRANSITION_TABLE as TRANSITIONS
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_P_ABORT,
    A_RELEASE,
    P_DATA,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from anonproxy import command_set
from anonproxy.errors import ConfigError
from anonproxy.filemeta import encode_file_meta, read_file_meta
from anonproxy.tls import handshake

PINNED_VERSION = "3.0.4"
"""The pynetdicom version these patches are written for (pyproject.toml pins the same)."""

MAX_QUEUED_PDUS = 16
"""P-DATA PDUs a sending thread may queue ahead of the DUL thread (each at most the peer's
maximum PDU length)."""

PATCHES = (
    "reactor_waits",
    "response_race",
    "send_backpressure",
    "idle_timer_latch",
    "file_meta",
    "received_file_meta",
    "command_sets",
    "chunked_data_sets",
    "direct_p_data",
    "late_primitives",
)
"""The names of the process-wide patches, in the order :func:`install` applies them."""


class UnsupportedPynetdicom(ConfigError):
    """The installed pynetdicom is not the version the patches are written for."""


_lock = threading.Lock()
_applied: dict[str, list[tuple[object, str, object]]] = {}  # name -> (owner, attribute, original)


def check_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedPynetdicom` unless *version* (default: the installed one) is
    :data:`PINNED_VERSION`."""
    found = pynetdicom.__version__ if version is None else version
    if found != PINNED_VERSION:
        msg = (
            f"pynetdicom {found} is installed, but anonproxy's changes to pynetdicom are "
            f"written for {PINNED_VERSION} (the pinned version): install "
            f"pynetdicom=={PINNED_VERSION}"
        )
        raise UnsupportedPynetdicom(msg)


def install(*, without: Iterable[str] = ()) -> None:
    """Apply every process-wide patch not named in *without* and not applied yet (idempotent,
    thread-safe). Raises :class:`UnsupportedPynetdicom` on another pynetdicom version."""
    skipped = set(without)
    unknown = skipped.difference(PATCHES)
    if unknown:
        raise ValueError(f"unknown patches: {sorted(unknown)}")
    check_version()
    with _lock:
        for name in PATCHES:
            if name not in skipped and name not in _applied:
                changes: list[tuple[object, str, object]] = []
                _APPLY[name](functools.partial(_set, changes))
                _applied[name] = changes


def uninstall() -> None:
    """Undo every patch (tests: to run pynetdicom's own behaviour as the control)."""
    with _lock:
        for name in reversed(list(_applied)):  # the reverse of the order applied (they stack)
            for owner, attribute, original in reversed(_applied.pop(name)):
                setattr(owner, attribute, original)


def installed() -> frozenset[str]:
    """The names of the process-wide patches applied now."""
    with _lock:
        return frozenset(_applied)


_Setter = Callable[[object, str, object], None]


def _set(
    changes: list[tuple[object, str, object]], owner: object, attribute: str, value: object
) -> None:
    changes.append((owner, attribute, getattr(owner, attribute)))
    setattr(owner, attribute, value)


# --- reactor_waits ------------------------------------------------------------------------------

_waiter = threading.local()  # .wait: how this reactor thread waits; .leave_responses: requestor
#: A reactor that had nothing to do for this long ...
IDLE_AFTER_S = 0.1
#: ... looks again only this often (instead of every 1 ms).
IDLE_WAIT_S = 0.02


def _wait_s(seconds: float, active: float) -> float:
    """How long a reactor asked to wait *seconds* waits: longer once it had nothing to do
    since *active* (time.monotonic()) for :data:`IDLE_AFTER_S`."""
    if time.monotonic() - active >= IDLE_AFTER_S:
        return max(seconds, IDLE_WAIT_S)
    return seconds


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
        # Read and reset at once: a set() between a reset and a read would have its byte read
        # and leave the flag set, and every later set() would write nothing (a lost wake-up).
        # The waker queues its work before set(); the DUL thread looks for it after clear().
        with self._lock, contextlib.suppress(BlockingIOError):
            self._signalled = False
            os.read(self.read_fd, 4096)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._write_fd)
        os.close(self.read_fd)


# The wake-up pipe of each running DUL thread, beside pynetdicom's objects rather than in them.
_wakeups: weakref.WeakKeyDictionary[DULServiceProvider, _Wakeup] = weakref.WeakKeyDictionary()


def _dul_wait(dul: DULServiceProvider, wakeup: _Wakeup) -> Callable[[float], None]:
    """How a DUL thread sleeps: until its socket has data or another thread hands it work
    (:func:`_wake`), at most :data:`IDLE_WAIT_S`. Nothing else it acts on needs a finer look
    (the ARTIM timer counts seconds); its 1 ms delay woke an acceptor's a dozen times per
    instance while the association thread de-identified, each time taking the GIL from it."""
    reads_at_socket_wake: int | None = None  # set when the socket ended the last wait

    def wait(seconds: float) -> None:
        nonlocal reads_at_socket_wake
        sock = dul.socket.socket if dul.socket is not None else None
        reads: int = _waiter.reads  # PDUs this DUL thread has read
        if sock is None or sock.fileno() < 0 or reads_at_socket_wake == reads:
            # No socket, or readable data that this state does not read: sleep, not spin.
            reads_at_socket_wake = None
            time.sleep(seconds)
            return
        reads_at_socket_wake = None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data waiting in the SSL buffer: select cannot see it
        try:
            ready, _, _ = select.select(
                [sock.fileno(), wakeup.read_fd], [], [], max(seconds, IDLE_WAIT_S)
            )
        except (OSError, ValueError):  # the socket was closed meanwhile: the loop will see it
            return
        if wakeup.read_fd in ready:
            wakeup.clear()
        elif ready:
            reads_at_socket_wake = reads

    return wait


def _wake(dul: DULServiceProvider) -> None:
    """End the current wait of *dul*'s thread (it has something to do)."""
    wakeup = _wakeups.get(dul)
    if wakeup is not None:
        wakeup.set()


def _release_waiting_acceptor(dul: DULServiceProvider) -> None:
    """A peer that closes its connection before its A-ASSOCIATE-RQ (a TCP health check, a port
    scan) ends the DUL thread and leaves pynetdicom's acceptor thread waiting ``acse_timeout``
    for a request that cannot come, counted as an active association (a stop waited for it):
    when the DUL thread ends, it is told at once, as that time-out would tell it (``None``)."""
    if dul.assoc.is_acceptor and dul.assoc.requestor.primitive is None:
        dul.to_user_queue.put(None)  # what receive_pdu returns then


def _acceptor_wait(assoc: Association) -> Callable[[float], None]:
    """How the association thread of an acceptor sleeps: until a DIMSE message is queued or
    the DUL thread passes it a primitive (an A-RELEASE or A-ABORT request, which it looks for
    on the DUL's ``to_user_queue``), at most :data:`IDLE_WAIT_S` (what else it looks at, the
    network time-out and its own stop, is not urgent). Its 1 ms delay woke it, and took the
    GIL from the DUL thread decoding the next data set, a dozen times per instance."""
    messages = assoc.dimse.msg_queue
    primitives = assoc.dul.to_user_queue
    put = primitives.put
    passed = seen = 0  # primitives passed; how many there were when the last wait ended

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:  # noqa: ANN401 - Queue.put's signature
        nonlocal passed
        put(item, block, timeout)
        with messages.not_empty:
            passed += 1
            messages.not_empty.notify_all()

    primitives.put = put_and_wake  # type: ignore[method-assign]

    def wait(seconds: float) -> None:
        nonlocal seen
        with messages.not_empty:  # the queue's mutex: use its unlocked _qsize
            if not messages._qsize() and passed == seen:
                messages.not_empty.wait(max(seconds, IDLE_WAIT_S))
            seen = passed
            if messages._qsize():
                # put() wakes one waiter: pass it on, in case it was meant for a thread
                # blocked in get() (a requestor waiting for its C-STORE response).
                messages.not_empty.notify()

    return wait


class _Checkpoint(threading.Event):
    """An association's ``_reactor_checkpoint`` that wakes its reactor when cleared: a sending
    thread clears it and then polls until the reactor has paused. While *held*
    (:func:`hold_reactor`), a send's ``set()`` leaves the reactor paused for the next send."""

    def __init__(self, *, is_set: bool) -> None:
        super().__init__()
        self.cleared = threading.Condition()
        self.held = False
        if is_set:
            self.set()

    def clear(self) -> None:
        super().clear()
        with self.cleared:
            self.cleared.notify_all()

    def set(self) -> None:
        if not self.held:
            super().set()


def hold_reactor(assoc: Association) -> None:
    """Keep the association thread of the requestor *assoc* paused from its next send until
    :func:`release_reactor`, so that consecutive sends skip the pause handshake (two wake-ups
    of that thread and a 0.1 ms poll each: a fifth of the C-STORE rate to storescp). Meanwhile
    nothing watches for the peer's A-RELEASE or A-ABORT between sends: ask
    :func:`ended_while_held` before each. An abort or kill of the association ends the hold.
    Nothing happens without the ``reactor_waits`` patch."""
    checkpoint = assoc._reactor_checkpoint
    if isinstance(checkpoint, _Checkpoint):
        checkpoint.held = True


def release_reactor(assoc: Association) -> None:
    """End :func:`hold_reactor`: the association thread runs again."""
    checkpoint = assoc._reactor_checkpoint
    if isinstance(checkpoint, _Checkpoint) and checkpoint.held:
        checkpoint.held = False
        checkpoint.set()


def ended_while_held(assoc: Association) -> bool:
    """Whether what the held association thread of *assoc* would act on has come: the peer's
    A-RELEASE or A-ABORT (or the connection's end), or the upper layer's thread ended."""
    return not assoc.dul.is_alive() or isinstance(
        assoc.dul.peek_next_pdu(), (A_RELEASE, A_ABORT, A_P_ABORT)
    )


def _requestor_wait(checkpoint: _Checkpoint) -> Callable[[float], None]:
    """How the association thread of a requestor sleeps: until a sending thread asks it to
    pause, or for as long as asked (longer once idle: a loop that took longer than a few
    sleeps was paused by a send, and is active)."""
    returned = active = time.monotonic()

    def wait(seconds: float) -> None:
        nonlocal returned, active
        now = time.monotonic()
        if now - returned > 5 * seconds:
            active = now
        with checkpoint.cleared:
            if checkpoint.is_set():
                checkpoint.cleared.wait(_wait_s(seconds, active))
        returned = time.monotonic()

    return wait


def _count_read() -> None:
    """One more PDU read by this DUL thread (what its wait looks at, see :func:`_dul_wait`)."""
    _waiter.reads = getattr(_waiter, "reads", 0) + 1


def _apply_reactor_waits(set_: _Setter) -> None:
    read_pdu_data = DULServiceProvider._read_pdu_data
    run_dul_reactor = DULServiceProvider.run_reactor
    send_pdu = DULServiceProvider.send_pdu
    kill_dul = DULServiceProvider.kill_dul
    run_association_reactor = Association._run_reactor

    def counted_read_pdu_data(self: DULServiceProvider) -> None:
        _count_read()
        read_pdu_data(self)

    def waiting_dul_reactor(self: DULServiceProvider) -> None:
        wakeup = _Wakeup()
        _wakeups[self] = wakeup
        _waiter.reads = 0
        _waiter.wait = _dul_wait(self, wakeup)
        try:
            run_dul_reactor(self)
        finally:
            _waiter.wait = None
            _wakeups.pop(self, None)
            wakeup.close()
            _release_waiting_acceptor(self)

    def waking_send_pdu(self: DULServiceProvider, primitive: Any) -> None:  # noqa: ANN401
        send_pdu(self, primitive)
        _wake(self)

    def waking_kill_dul(self: DULServiceProvider) -> None:
        kill_dul(self)
        _wake(self)

    def waiting_association_reactor(self: Association) -> None:
        if self.is_requestor:
            checkpoint = _Checkpoint(is_set=self._reactor_checkpoint.is_set())
            self._reactor_checkpoint = checkpoint
            _waiter.wait = _requestor_wait(checkpoint)
        else:
            _waiter.wait = _acceptor_wait(self)
        try:
            run_association_reactor(self)
        finally:
            _waiter.wait = None

    reactor_time = _ReactorTime("time")
    set_(pynetdicom.dul, "time", reactor_time)
    set_(pynetdicom.association, "time", reactor_time)
    set_(DULServiceProvider, "_read_pdu_data", counted_read_pdu_data)
    set_(DULServiceProvider, "run_reactor", waiting_dul_reactor)
    set_(DULServiceProvider, "send_pdu", waking_send_pdu)
    set_(DULServiceProvider, "kill_dul", waking_kill_dul)
    set_(Association, "_run_reactor", waiting_association_reactor)
    _apply_held_reactors(set_)


def _apply_held_reactors(set_: _Setter) -> None:
    """An association killed or aborted ends :func:`hold_reactor`: its thread must run to end."""
    kill = Association.kill
    abort = Association.abort

    def releasing_kill(self: Association) -> None:
        release_reactor(self)
        kill(self)

    def releasing_abort(self: Association, block: bool = True) -> None:
        release_reactor(self)
        abort(self, block)

    set_(Association, "kill", releasing_kill)
    set_(Association, "abort", releasing_abort)


# --- response_race ------------------------------------------------------------------------------


def _apply_response_race(set_: _Setter) -> None:
    run_association_reactor = Association._run_reactor
    get_msg = DIMSEServiceProvider.get_msg

    def requestor_reactor(self: Association) -> None:
        if not self.is_requestor:
            run_association_reactor(self)
            return
        _waiter.leave_responses = True
        try:
            run_association_reactor(self)
        finally:
            _waiter.leave_responses = False

    def get_request(self: DIMSEServiceProvider, block: bool = False) -> Any:  # noqa: ANN401 - pynetdicom's signature
        if block or not getattr(_waiter, "leave_responses", False):
            return get_msg(self, block)
        messages = self.msg_queue
        with messages.mutex:  # look and take at once: the sending thread takes from the head
            if not messages.queue or getattr(messages.queue[0][1], "Status", None) is not None:
                return None, None  # nothing, or a response: the sending thread's
            item = messages._get()
            messages.not_full.notify()
            return item

    set_(Association, "_run_reactor", requestor_reactor)
    set_(DIMSEServiceProvider, "get_msg", get_request)


# --- send_backpressure --------------------------------------------------------------------------


def _wait_for_room(dul: DULServiceProvider) -> None:
    """Back-pressure: the thread queuing a P-DATA waits until the DUL thread has taken all but
    :data:`MAX_QUEUED_PDUS` (or is gone)."""
    queued = dul.to_provider_queue
    with queued.not_full:  # get() notifies it
        while queued._qsize() > MAX_QUEUED_PDUS and dul.is_alive() and not dul._kill_thread:
            queued.not_full.wait(0.05)


def _apply_send_backpressure(set_: _Setter) -> None:
    send_pdu = DULServiceProvider.send_pdu

    def bounded_send_pdu(self: DULServiceProvider, primitive: Any) -> None:  # noqa: ANN401
        send_pdu(self, primitive)
        if isinstance(primitive, P_DATA) and threading.current_thread() is not self:
            _wait_for_room(self)

    set_(DULServiceProvider, "send_pdu", bounded_send_pdu)


# --- idle_timer_latch ---------------------------------------------------------------------------

_idle_expired: weakref.WeakSet[DULServiceProvider] = weakref.WeakSet()


def _apply_idle_timer_latch(set_: _Setter) -> None:
    idle_timer_expired = DULServiceProvider.idle_timer_expired

    def latched(self: DULServiceProvider) -> bool:
        if self in _idle_expired:
            return True
        expired = idle_timer_expired(self)
        if expired:
            _idle_expired.add(self)
        return expired

    set_(DULServiceProvider, "idle_timer_expired", latched)


# --- file_meta ----------------------------------------------------------------------------------


def _split_dataset(path: str | Path) -> tuple[FileMetaDataset, int]:
    """pynetdicom's ``split_dataset`` (the file meta elements that ``send_c_store`` needs, and
    where the data set starts), from :func:`~anonproxy.filemeta.read_file_meta`."""
    meta = read_file_meta(Path(path))
    elements = FileMetaDataset()
    elements.MediaStorageSOPClassUID = UID(meta.sop_class)
    elements.MediaStorageSOPInstanceUID = UID(meta.sop_instance)
    elements.TransferSyntaxUID = UID(meta.transfer_syntax)
    return elements, meta.offset


def _apply_file_meta(set_: _Setter) -> None:
    set_(pynetdicom.association, "split_dataset", _split_dataset)


# --- received_file_meta -------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncodedFileMeta:
    """The file meta of a received data set, already encoded (:func:`_apply_received_file_meta`)."""

    encoded: bytes


def _apply_received_file_meta(set_: _Setter) -> None:
    # the names pynetdicom.dimse_messages imported from these (it re-exports neither)
    create_file_meta = pynetdicom.dsutils.create_file_meta
    write_file_meta_info = pydicom.filewriter.write_file_meta_info

    def encoded_file_meta(
        *, sop_class_uid: UID, sop_instance_uid: UID, transfer_syntax: UID
    ) -> FileMetaDataset | _EncodedFileMeta:
        encoded = encode_file_meta(
            str(sop_class_uid),
            str(sop_instance_uid),
            str(transfer_syntax),
            PYNETDICOM_IMPLEMENTATION_UID,
            PYNETDICOM_IMPLEMENTATION_VERSION,
        )
        if encoded is None:  # not plain UIDs: pydicom's data set, and its checks
            return create_file_meta(
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                transfer_syntax=transfer_syntax,
            )
        return _EncodedFileMeta(encoded)

    def write_encoded(
        fp: Any,  # noqa: ANN401 - pydicom's DicomFileLike, or what it accepts
        file_meta: FileMetaDataset | _EncodedFileMeta,
        enforce_standard: bool = True,
    ) -> None:
        if isinstance(file_meta, _EncodedFileMeta):
            fp.write(file_meta.encoded)
        else:
            write_file_meta_info(fp, file_meta, enforce_standard)

    set_(pynetdicom.dimse_messages, "create_file_meta", encoded_file_meta)
    set_(pynetdicom.dimse_messages, "write_file_meta_info", write_encoded)


# --- command_sets -------------------------------------------------------------------------------

#: The messages whose command sets :mod:`anonproxy.command_set` encodes and decodes
_COMMAND_SET_MESSAGES = frozenset({"C_STORE_RQ", "C_STORE_RSP", "C_ECHO_RQ", "C_ECHO_RSP"})
#: Command Data Set Type (0000,0800): a data set follows, or none does (PS3.7 E.1)
_DATA_SET_PRESENT, _NO_DATA_SET = 0x0001, 0x0101
#: Command Field (0000,0100) of each of them
_COMMAND_FIELDS = {
    kind.__name__: field
    for field, (_, kind) in pynetdicom.dimse_messages._MESSAGE_TYPES.items()
    if kind.__name__ in _COMMAND_SET_MESSAGES
}
#: The parameters each of them takes from its primitive (the rest: set by _encoded_message)
_PARAMETERS = {
    name: tuple(
        keyword
        for keyword in pynetdicom.dimse_messages._COMMAND_SET_KEYWORDS[name.replace("_", "-")]
        if keyword not in {"CommandGroupLength", "CommandField", "CommandDataSetType"}
    )
    for name in _COMMAND_SET_MESSAGES
}


class _EncodedCommandSet(bytes):
    """A command set already encoded (:func:`_apply_command_sets`)."""


def _encoded_message(primitive: Any) -> pynetdicom.dimse_messages.DIMSEMessage | None:  # noqa: ANN401 - a DIMSE primitive
    """The message pynetdicom's ``send_msg`` would build for *primitive*, its command set
    encoded by :func:`anonproxy.command_set.encode` (what ``primitive_to_message`` puts in
    the command set: each of the message's elements that the primitive has a value for, the
    Command Field, the Command Data Set Type); None for any other message or value."""
    responding = primitive.MessageIDBeingRespondedTo is not None
    kind = (
        pynetdicom.dimse._RSP_TO_MESSAGE if responding else pynetdicom.dimse._RQ_TO_MESSAGE
    ).get(type(primitive))
    if kind is None or kind.__name__ not in _COMMAND_SET_MESSAGES:
        return None
    name = kind.__name__
    values: dict[str, object] = {}
    for keyword in _PARAMETERS[name]:
        if not hasattr(primitive, keyword):
            values[keyword] = None  # pynetdicom leaves it in, without a value
        elif (value := getattr(primitive, keyword)) is not None:
            values[keyword] = value
    data_set_keyword = pynetdicom.dimse_messages._DATASET_KEYWORDS.get(name)
    data_set, present = BytesIO(), False  # a message type without a data set
    if data_set_keyword:
        data_set = getattr(primitive, data_set_keyword)
        present = bool(data_set)
    path = getattr(primitive, "_dataset_path", None)  # a data set sent from a file
    values["CommandField"] = _COMMAND_FIELDS[name]
    values["CommandDataSetType"] = _DATA_SET_PRESENT if present or path else _NO_DATA_SET
    encoded = command_set.encode(values)
    if encoded is None:
        return None
    message = kind.__new__(kind)  # not __init__: it builds the pydicom data set
    message.context_id = None
    message.encoded_command_set = BytesIO()
    message.command_set = _EncodedCommandSet(encoded)  # type: ignore[assignment] # read by encode_msg only
    message.data_set = data_set
    message._data_set_path = path
    message._data_set_file = None
    return message


def _decoded_primitive(message: pynetdicom.dimse_messages.DIMSEMessage) -> Any:  # noqa: ANN401 - a DIMSE primitive
    """The primitive pynetdicom's ``message_to_primitive`` would make of *message*, from
    its command set's bytes by :func:`anonproxy.command_set.decode`; None for any other
    message or value."""
    name = type(message).__name__
    if name not in _COMMAND_SET_MESSAGES:
        return None
    values = command_set.decode(message.encoded_command_set.getvalue())
    if values is None:
        return None
    primitive: Any = pynetdicom.dimse_messages._MSG_TO_PRIMITVE[name[: name.rfind("_R")]]()
    for keyword, value in values.items():
        if hasattr(primitive, keyword):
            setattr(primitive, keyword, value)
    data_set_keyword = pynetdicom.dimse_messages._DATASET_KEYWORDS.get(name)
    if data_set_keyword:
        setattr(primitive, data_set_keyword, message.data_set)
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def _apply_command_sets(set_: _Setter) -> None:
    encode = pynetdicom.dsutils.encode  # the name pynetdicom.dimse_messages imported
    send_msg = DIMSEServiceProvider.send_msg
    message_to_primitive = pynetdicom.dimse_messages.DIMSEMessage.message_to_primitive

    def encoded_or_encode(ds: Any, *args: Any, **kwargs: Any) -> bytes | None:  # noqa: ANN401 - pynetdicom's signature
        return ds if isinstance(ds, _EncodedCommandSet) else encode(ds, *args, **kwargs)

    def send_encoded(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:  # noqa: ANN401
        # EVT_DIMSE_SENT handlers (pynetdicom's debug log) read the message's pydicom data set
        message = (
            None if self.assoc.get_handlers(evt.EVT_DIMSE_SENT) else _encoded_message(primitive)
        )
        if message is None:
            send_msg(self, primitive, context_id)
            return
        for pdata in message.encode_msg(context_id, self.maximum_pdu_size):
            self.dul.send_pdu(pdata)

    def decoded_primitive(self: pynetdicom.dimse_messages.DIMSEMessage) -> Any:  # noqa: ANN401
        primitive = _decoded_primitive(self)
        return message_to_primitive(self) if primitive is None else primitive

    set_(pynetdicom.dimse_messages, "encode", encoded_or_encode)
    set_(DIMSEServiceProvider, "send_msg", send_encoded)
    set_(pynetdicom.dimse_messages.DIMSEMessage, "message_to_primitive", decoded_primitive)


# --- chunked_data_sets --------------------------------------------------------------------------


def _apply_chunked_data_sets(set_: _Setter) -> None:
    set_(_config, "STORE_RECV_CHUNKED_DATASET", True)  # received: to a file as it arrives
    set_(_config, "STORE_SEND_CHUNKED_DATASET", True)  # sent from a file: streamed from it


# --- direct_p_data ------------------------------------------------------------------------------


@dataclass
class _Sending:
    """What a DUL has on its way to the socket: the lock every PDU is sent under, and how many
    P-DATA primitives were queued for its thread and not sent yet (counted under a lock of its
    own, never held while sending: a thread queuing a P-DATA does not wait for a send)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    count_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    queued: int = 0

    def count(self, change: int) -> None:
        with self.count_lock:
            self.queued = max(0, self.queued + change)


_sending: weakref.WeakKeyDictionary[DULServiceProvider, _Sending] = weakref.WeakKeyDictionary()
_sending_lock = threading.Lock()
_P_DATA_SENT_HOOKS = (evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)


def _sending_of(dul: DULServiceProvider) -> _Sending:
    sending = _sending.get(dul)
    if sending is None:
        with _sending_lock:
            sending = _sending.setdefault(dul, _Sending())
    return sending


def encode_p_data(primitive: P_DATA) -> bytes:
    """The P-DATA-TF PDU of *primitive* (PS3.8 9.3.5), as pynetdicom's ``P_DATA_TF`` encodes
    it: each PDV item its length, presentation context ID and value (message control header
    and fragment)."""
    parts = [b""]  # the PDU header, once the length is known
    for context_id, value in primitive.presentation_data_value_list:
        parts += (struct.pack(">LB", len(value) + 1, context_id), value)
    parts[0] = struct.pack(">BBL", 0x04, 0, sum(map(len, parts)))
    return b"".join(parts)  # one copy of each value


def _sends_directly(dul: DULServiceProvider) -> bool:
    """Whether a P-DATA can go to *dul*'s socket from the thread sending it (see
    :func:`_apply_direct_p_data`)."""
    transport = dul.socket
    return (
        dul.state_machine.current_state == "Sta6"
        and transport is not None
        and transport.socket is not None
        and not isinstance(transport.socket, ssl.SSLSocket)
        and not any(dul.assoc.get_handlers(event) for event in _P_DATA_SENT_HOOKS)
    )


WINDOW_BYTES = 1 << 20
"""About how many bytes of a data set sent from a file are read, encoded and sent at once
(``direct_p_data``)."""
_P_DATA_HEADER = struct.Struct(">BBLLBB")  # a P-DATA-TF of one PDV: its header and the PDV's


class _DataSetWindow(P_DATA):
    """Consecutive data set fragments of a message sent from a file, each its own P-DATA, all
    encoded as their P-DATA-TF PDUs in one buffer (:attr:`encoded`): sent with one system call
    where a P-DATA can go straight to the socket, or handed to pynetdicom one P-DATA at a time
    (:meth:`primitives`) where it must go its way."""

    def __init__(self, context_id: int, data: bytes, step: int, last: bool) -> None:
        super().__init__()
        self.context_id = context_id
        self.data = data
        self.step = step  # the length of each fragment but the last of the data set
        self.last = last  # its last fragment is the data set's
        parts: list[bytes | memoryview] = []
        for control, fragment in self._fragments():
            size = len(fragment)
            parts += (
                _P_DATA_HEADER.pack(0x04, 0, size + 6, size + 2, context_id, control),
                fragment,
            )
        self.encoded = b"".join(parts)

    def _fragments(self) -> Iterator[tuple[int, memoryview]]:
        view = memoryview(self.data)
        starts = range(0, len(view), self.step) or range(1)  # an empty data set: one fragment
        for start in starts:
            end = start + self.step
            yield (0x02 if self.last and end >= len(view) else 0x00), view[start:end]

    def primitives(self) -> Iterator[P_DATA]:
        """The P-DATA of each fragment, as pynetdicom's ``encode_msg`` makes them."""
        for control, fragment in self._fragments():
            primitive = P_DATA()
            primitive.presentation_data_value_list.append(
                (self.context_id, bytes([control]) + fragment)
            )
            yield primitive


def _data_set_windows(
    path: Path, offset: int, context_id: int, max_pdu_length: int
) -> Iterator[_DataSetWindow]:
    """The data set of the file at *path* (from *offset* to its end), fragmented as pynetdicom's
    ``encode_msg`` does it (every fragment ``max_pdu_length - 6`` bytes but the last, which is
    the rest, or empty for an empty data set), in windows of whole fragments of about
    :data:`WINDOW_BYTES`: never the whole of a large data set in memory."""
    step = max_pdu_length - 6
    window = max(1, WINDOW_BYTES // step) * step
    with path.open("rb") as handle:
        remaining = handle.seek(0, os.SEEK_END) - handle.seek(offset)
        while True:
            wanted = min(remaining, window)
            data = handle.read(wanted)
            remaining -= len(data)
            last = remaining <= 0 or len(data) < wanted  # the end (or a file cut short)
            yield _DataSetWindow(context_id, data, step, last)
            if last:
                return


def _apply_direct_p_data(set_: _Setter) -> None:
    """pynetdicom hands every P-DATA to the DUL thread: queued, the thread woken, an event for
    the state machine, whose action (DT-1, Sta6 to Sta6) builds a ``P_DATA_TF`` PDU object,
    encodes it and sends it. A data set of 512 KiB to a PACS that takes 16 KiB PDUs is 33 such
    hand-offs, and an acceptor's C-STORE response one more on the path the sender waits on.
    Here, on an established plain-TCP association with nothing queued before it and no handler
    to see the PDU or the transition (EVT_PDU_SENT, EVT_FSM_TRANSITION), the sending thread
    encodes the PDU (:func:`encode_p_data`: the same bytes) and sends it itself, through the
    transport's ``send`` (a failure is Evt17, as in DT-1). Every PDU a DUL sends goes under
    one lock (:class:`_Sending`), so the two threads never interleave their bytes, and a
    P-DATA queued earlier (another case, or another thread) is always sent first: the direct
    path waits until none is left in flight. TLS keeps pynetdicom's way: an SSL socket must not
    be written by one thread while another reads it. A data set sent from a file comes out of
    ``encode_msg`` in windows (:class:`_DataSetWindow`: the PDUs of consecutive fragments in
    one buffer), one system call each instead of one per PDU (34 for a CT image in 16 KiB
    PDUs); a window that must go pynetdicom's way is handed over a P-DATA at a time."""
    send_pdu = DULServiceProvider.send_pdu
    send = DULServiceProvider._send
    encode_msg = pynetdicom.dimse_messages.DIMSEMessage.encode_msg

    def direct_send_pdu(self: DULServiceProvider, primitive: Any) -> None:  # noqa: ANN401
        kind = type(primitive)
        if kind is not P_DATA and kind is not _DataSetWindow:
            send_pdu(self, primitive)
            return
        sending = _sending_of(self)
        transport = self.socket
        if (
            threading.current_thread() is not self
            and transport is not None
            and _sends_directly(self)
        ):
            with sending.lock:  # the DUL thread counts a queued P-DATA out before it unlocks
                if not sending.queued and _sends_directly(self):
                    encoded = primitive.encoded if kind is _DataSetWindow else None
                    transport.send(encode_p_data(primitive) if encoded is None else encoded)
                    return
        if kind is _DataSetWindow:
            for pdata in primitive.primitives():  # one at a time, pynetdicom's way
                direct_send_pdu(self, pdata)
            return
        sending.count(1)  # before it is queued: no direct send overtakes it
        send_pdu(self, primitive)

    def encode_msg_in_windows(
        self: pynetdicom.dimse_messages.DIMSEMessage, context_id: int, max_pdu_length: int
    ) -> Iterator[P_DATA]:
        path = self._data_set_path
        if path is None or self.data_set is not None or max_pdu_length <= 6:  # no room left
            yield from encode_msg(self, context_id, max_pdu_length)
            return
        self._data_set_path = None  # the command set's P-DATA only, as pynetdicom makes them
        try:
            command = list(encode_msg(self, context_id, max_pdu_length))
        finally:
            self._data_set_path = path
        yield from command
        file, offset = path  # type: ignore[misc] # send_c_store made it (path, offset)
        yield from _data_set_windows(Path(file), offset, context_id, max_pdu_length)

    def locked_send(self: DULServiceProvider, pdu: Any) -> None:  # noqa: ANN401 - a PDU
        sending = _sending_of(self)
        with sending.lock:
            send(self, pdu)
            if type(pdu) is P_DATA_TF:
                sending.count(-1)

    set_(DULServiceProvider, "send_pdu", direct_send_pdu)
    set_(DULServiceProvider, "_send", locked_send)
    set_(pynetdicom.dimse_messages.DIMSEMessage, "encode_msg", encode_msg_in_windows)


# --- late_primitives ----------------------------------------------------------------------------

_LOCAL_EVENTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
"""The state machine's events for a primitive of the local user after the association request:
A-ASSOCIATE response (accept, reject), P-DATA, A-RELEASE request and response, A-ABORT."""
_ENDED_STATES = frozenset({"Sta1", "Sta13"})
"""No association (Sta1), or one ended and waiting for the connection to close (Sta13)."""


def _apply_late_primitives(set_: _Setter) -> None:
    """The peer can end an association (an A-ABORT, a reset, a PDU that gets it aborted) while
    the local user answers it: a C-STORE response, the A-RELEASE response to a release request
    followed by garbage. pynetdicom 3.0.4's state machine has no transition for that primitive
    once the association is over (Sta13, Sta1): ``do_action`` raises InvalidEventError in the
    DUL thread, which dies with a traceback on stderr, and a connection still open (Sta13) is
    then never closed by it. Here such a primitive is taken off the queue and dropped: there is
    nobody left to send it to."""
    do_action = StateMachine.do_action

    def dropping_late_primitives(self: StateMachine, event: str) -> None:
        state = self.current_state
        if event in _LOCAL_EVENTS and state in _ENDED_STATES and (event, state) not in TRANSITIONS:
            with contextlib.suppress(queue.Empty):
                self.dul.to_provider_queue.get(False)
            return
        do_action(self, event)

    set_(StateMachine, "do_action", dropping_late_primitives)


_APPLY: dict[str, Callable[[_Setter], None]] = {
    "reactor_waits": _apply_reactor_waits,
    "response_race": _apply_response_race,
    "send_backpressure": _apply_send_backpressure,
    "idle_timer_latch": _apply_idle_timer_latch,
    "file_meta": _apply_file_meta,
    "received_file_meta": _apply_received_file_meta,
    "command_sets": _apply_command_sets,
    "chunked_data_sets": _apply_chunked_data_sets,
    "direct_p_data": _apply_direct_p_data,
    "late_primitives": _apply_late_primitives,
}


# --- the file a received data set is written into -----------------------------------------------


class _Flushable(Protocol):
    def flush(self) -> None: ...


class ReceiveFile(Protocol):
    """What pynetdicom uses of the file it writes a received data set into."""

    @property
    def name(self) -> str:
        """Its path (``event.dataset_path``; pynetdicom removes it after the handler)."""

    def write(self, data: bytes) -> int:
        """Write preamble, file meta and fragments, in order."""

    @property
    def file(self) -> _Flushable:
        """What pynetdicom flushes after each fragment."""

    def close(self) -> None:
        """Called once the handler has answered."""


def receive_data_sets_into(create: Callable[[], ReceiveFile]) -> None:
    """Make pynetdicom write each received C-STORE data set (with ``chunked_data_sets``) into
    the file object that *create* returns, instead of ``tempfile.NamedTemporaryFile`` in the
    system's temporary folder. pynetdicom calls it as ``NamedTemporaryFile(delete=False,
    mode="wb", suffix=".dcm")``, writes the preamble, the file meta and each fragment, and
    reports its ``name`` as ``event.dataset_path``."""

    def named_temporary_file(**_: object) -> ReceiveFile:
        return create()

    # pynetdicom imports the name without exporting it, and it is a class, not this factory.
    pynetdicom.dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[attr-defined,assignment]


def received_file(event: Event) -> object | None:
    """The file object that the ``receive_data_sets_into`` factory returned for the data set of
    an EVT_C_STORE *event* (pynetdicom keeps it on the request), or None when there is none."""
    return getattr(event.request, "_dataset_file", None)


def data_set_in_progress(assoc: Association) -> object | None:
    """The file object of a C-STORE data set *assoc* was receiving and never completed (the
    association ended, or the message was dropped, in the middle of it), or None. pynetdicom
    closes a data set's file only after its C-STORE handler: one left half-received would
    keep its descriptor, and its blocks on disk, for the life of the process."""
    message = assoc.dimse.message
    return getattr(message, "_data_set_file", None) if message is not None else None


# --- the PDU guard ------------------------------------------------------------------------------


class PduFilter(Protocol):
    """What :func:`guard_pdus` needs of a guard (:class:`anonproxy.limits.PduGuard`)."""

    def attach(self, read: Callable[[int], bytearray], abort: Callable[[bytes], None]) -> None:
        """Receive the socket's own ``recv`` and a way to send an A-ABORT and close."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read as ``AssociationSocket.recv`` does (an empty read: the connection is closed)."""

    def take(self, primitive: P_DATA) -> None:
        """See each received P-DATA before the DIMSE layer decodes it (may cut it)."""

    def fits(self, size: int) -> bool:
        """Count *size* bytes of data set fragments written straight to the data set's file;
        False (nothing counted) when they must go through :meth:`take`."""

    def undecodable(self) -> None:
        """The DIMSE layer could not decode a received message (the association is aborted)."""

    def invalid_pdu(self, pdu_type: int) -> None:
        """A received PDU of *pdu_type* has parameters pynetdicom refuses (it is aborted)."""


_guards: weakref.WeakKeyDictionary[Association, PduFilter] = weakref.WeakKeyDictionary()


def _read(transport: AssociationSocket, nr_bytes: int) -> bytearray:
    """*nr_bytes* from the socket of *transport*, fewer if the peer closes first: what
    ``AssociationSocket.recv`` returns, in as few system calls as the socket allows. pynetdicom
    reads 4096 bytes at a time (with a ``poll`` before each, the socket having a time-out): 64
    system calls for a PDU of 128 KiB, ~150 us of CPU more than this."""
    sock = transport.socket
    if sock is None:
        return bytearray()  # closed meanwhile
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    read = 0
    while read < nr_bytes:
        count = sock.recv_into(view[read:])
        if not count:
            del view
            del buffer[read:]
            break
        read += count
    return buffer


def guard_pdus(assoc: Association, guard: PduFilter, *, read_timeout: float | None) -> None:
    """Put *guard* between the upper layer of *assoc* (an acceptor) and its socket; call on
    EVT_CONN_OPEN, before the first read.

    pynetdicom 3.0.4 reads the 6-byte PDU header, then reads (and accumulates) as many bytes
    as the header declares, up to 4 GiB, before it looks at them (``_read_pdu_data``). Here:

    * the ``recv`` of the :class:`~pynetdicom.transport.AssociationSocket` (whose only reader
      is ``_read_pdu_data``: a header, then the body in one call) is the guard's, so that a
      header is checked before its body is read; the guard reads with :func:`_read`;
    * with *read_timeout*, a read that waits longer (a peer that stops in the middle of a PDU)
      fails and the upper layer sees the connection closed: pynetdicom reads a PDU in a
      blocking loop, where its own idle time-out is never checked;
    * nothing is read while the A-ASSOCIATE-RQ is being decided (state Sta3), nor while an
      event read earlier waits: pynetdicom's state machine has no transition for the local
      answer (Evt7/Evt8) once anything read here has moved it on (garbage or an A-ABORT: Sta13
      or Sta1): the peer would never get it (``late_primitives`` drops it; before, the DUL
      thread died with InvalidEventError);
    * a P-DATA-TF whose command set pynetdicom cannot decode (no Command Field, say) raises in
      the DIMSE decoder inside the DUL thread, which stops without an A-ABORT to the peer and
      without EVT_ABORTED: it becomes Evt19 (A-ABORT), as pynetdicom does for messages that
      fail later;
    * an A-ASSOCIATE-RQ, A-RELEASE-RQ/RP or A-ABORT whose parameters pynetdicom refuses is an
      invalid PDU (Evt19, A-ABORT) as soon as it is read (:func:`_check_parameters`), not a
      ValueError that stops the DUL thread;
    * the data set fragments of a C-STORE request go straight from the PDU read to the file
      the data set is received into (:func:`_read_pdu_data`).
    """
    dul = assoc.dul
    transport = dul.socket
    if transport is None:
        return
    raw = transport.socket
    if raw is not None and read_timeout is not None:
        raw.settimeout(read_timeout)

    def abort(pdu: bytes) -> None:
        if raw is None:
            return
        try:
            raw.sendall(pdu)
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already

    guard.attach(functools.partial(_read, transport), abort)
    _guards[assoc] = guard
    transport.recv = guard.recv  # type: ignore[method-assign] # the hook itself
    transport_event = dul._is_transport_event

    def hold_while_deciding() -> bool:
        if dul.state_machine.current_state == "Sta3" or not dul.event_queue.empty():
            return False
        return transport_event()

    dul._is_transport_event = hold_while_deciding  # type: ignore[method-assign] # the hook itself
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def undecodable() -> None:
        abandoned = data_set_in_progress(assoc)
        if abandoned is not None:  # the file is removed with the others left half-received
            with contextlib.suppress(OSError):
                abandoned.close()  # type: ignore[attr-defined]
        dimse.message = None
        guard.undecodable()
        dul.event_queue.put("Evt19")

    def receive_or_abort(primitive: P_DATA) -> None:
        try:
            guard.take(primitive)
            receive(primitive)
        except Exception:  # noqa: BLE001 - any decoding failure is a protocol violation
            undecodable()

    dimse.receive_primitive = receive_or_abort  # type: ignore[method-assign] # the hook itself
    read_pdu_data = functools.partial(_read_pdu_data, dul, transport, guard, undecodable)
    dul._read_pdu_data = read_pdu_data  # type: ignore[method-assign] # the hook itself


_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, control header
_DATA_SET_HOOKS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)


def _read_pdu_data(
    dul: DULServiceProvider,
    transport: AssociationSocket,
    guard: PduFilter,
    undecodable: Callable[[], None],
) -> None:
    """The DUL's ``_read_pdu_data`` behind a guard: a P-DATA-TF PDU that only carries more of
    the data set that a C-STORE request is receiving into a file is written to that file here.

    pynetdicom copies each such PDU three times (``bytes`` of the read, the PDV items, each
    value without its control header), decodes it into PDU and P-DATA objects, queues an event
    for the state machine, whose action (DT-2, Sta6 to Sta6) passes it to the DIMSE layer,
    which writes the values to the file: ~0.25 ms of the DUL thread per PDU of 128 KiB, five
    such PDUs per CT image from storescu, on the path the sender waits on. Here the values are
    written from the read itself, when nothing else can tell the difference: the association is
    established (Sta6) with no event or PDU waiting, the DIMSE message is a C-STORE request
    with its data set file open, every PDV is a data set fragment of its presentation context
    and none is the last, the data set bound counts them (``guard.fits``), and no handler is
    bound to EVT_DATA_RECV, EVT_PDU_RECV or EVT_FSM_TRANSITION (which would have seen them). A
    write that fails is an undecodable message, as in the DIMSE layer. Any other PDU (the
    command, the last fragment) is handed to pynetdicom's own, which reads the header and body
    that were read here (the guard's reads: checked as they were read), or the error a read
    raised here (a connection reset: Evt17 there, then EVT_ABORTED)."""
    read = transport.recv  # the guard's
    pending: list[bytearray | OSError] = []
    try:
        header = read(6)
        pending.append(header)
        message = _receiving_data_set(dul) if len(header) == 6 and header[0] == 0x04 else None
        if message is not None:
            (length,) = struct.unpack_from(">L", header, 2)
            body = read(length)
            pending.append(body)
            if len(body) == length and _write_fragments(message, guard, body, undecodable):
                _count_read()
                return
    except OSError as exc:  # a reset, a time-out: raised to pynetdicom's read, which handles it
        pending.append(exc)

    def replay(nr_bytes: int) -> bytearray:
        del nr_bytes  # the PDU's header, then its body: as they were read (or failed)
        chunk = pending.pop(0)
        if not pending:
            transport.recv = read  # type: ignore[method-assign]
        if isinstance(chunk, OSError):
            raise chunk
        return chunk

    queued = len(dul._recv_pdu.queue)
    transport.recv = replay  # type: ignore[method-assign]
    try:
        type(dul)._read_pdu_data(dul)
    finally:
        transport.recv = read  # type: ignore[method-assign]
    if len(dul._recv_pdu.queue) > queued:
        _check_parameters(dul, guard)


_CONVERTED_PDUS = (A_ASSOCIATE_RQ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT_RQ)
"""The PDUs an acceptor's state machine turns into primitives for its user."""


def _check_parameters(dul: DULServiceProvider, guard: PduFilter) -> None:
    """Turn the PDU just read into its primitive now, in the read, not in the state machine's
    action (AE-6, AR-2, AR-3, AA-3), where pynetdicom 3.0.4 does it outside any ``try``: a
    parameter it refuses (an even presentation context ID, say) raised ValueError there, and
    the DUL thread died without answering the peer, whose connection stayed open until
    ``acse_timeout``. A PDU whose parameters do not convert is an invalid PDU (Evt19: an
    A-ABORT, PS3.8 9.2), and the guard is told; one that converts hands the action the same
    primitive. The DUL thread is the only one queuing events and received PDUs, and reads only
    with its event queue empty (:func:`guard_pdus`): the PDU and event just queued are last."""
    received = dul._recv_pdu
    pdu = received.queue[-1]
    if type(pdu) not in _CONVERTED_PDUS:
        return
    try:
        primitive = pdu.to_primitive()
    except Exception:  # noqa: BLE001 - any parameter pynetdicom refuses: an invalid PDU
        with received.mutex:
            received.queue.pop()
        with dul.event_queue.mutex:
            dul.event_queue.queue[-1] = "Evt19"
        guard.invalid_pdu(pdu.pdu_type)
        return
    pdu.to_primitive = lambda: primitive  # not twice: ~2 ms for 120 contexts


def _receiving_data_set(dul: DULServiceProvider) -> Any:  # noqa: ANN401 - a C_STORE_RQ
    """The DIMSE message whose data set the next P-DATA-TF may write straight to its file
    (see :func:`_read_pdu_data`), or None."""
    assoc = dul.assoc
    if (
        dul.state_machine.current_state != "Sta6"
        or not dul.event_queue.empty()
        or not dul._recv_pdu.empty()
        or any(assoc.get_handlers(event) for event in _DATA_SET_HOOKS)
    ):
        return None
    message = assoc.dimse.message
    if message is None or getattr(message, "_data_set_file", None) is None:
        return None
    return message


def _write_fragments(
    message: Any,  # noqa: ANN401 - a C_STORE_RQ
    guard: PduFilter,
    body: bytearray,
    undecodable: Callable[[], None],
) -> bool:
    """Write the PDV values of the P-DATA-TF *body* (the guard checked that its items fill it)
    to *message*'s data set file; False, with nothing written, unless every one is a data set
    fragment of the message's presentation context, not the last, within the data set bound."""
    spans: list[tuple[int, int]] = []
    size, offset, end = 0, 0, len(body)
    while offset < end:
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if context_id != message.context_id or control & 0x03:  # a command, or the last
            return False
        spans.append((offset + 6, offset + 4 + length))
        size += length - 2
        offset += 4 + length
    if not guard.fits(size):
        return False
    view = memoryview(body)
    try:
        file = message._data_set_file
        for start, stop in spans:
            file.write(view[start:stop])
        file.file.flush()
    except Exception:  # noqa: BLE001 - as the DIMSE layer's decoding failures
        undecodable()
    return True


def pdu_guard(assoc: Association) -> PduFilter | None:
    """The guard :func:`guard_pdus` put on *assoc*, if any."""
    return _guards.get(assoc)


# --- the TLS handshake, in the association's thread ---------------------------------------------


def tls_socket(assoc: Association) -> ssl.SSLSocket | None:
    """The TLS socket of *assoc*, or None for a plain TCP association."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    return sock if isinstance(sock, ssl.SSLSocket) else None


def finish_tls_handshake(assoc: Association, timeout: float) -> OSError | ValueError | None:
    """EVT_CONN_OPEN of a TLS acceptor: complete the handshake within *timeout* seconds.

    pynetdicom 3.0.4 wraps an accepted socket in ``AssociationServer.get_request``, in the
    thread that accepts connections, with the context's default ``do_handshake_on_connect``:
    one client that connects and stays silent stalls every other. The contexts of
    :func:`anonproxy.tls.server_context` defer the handshake; this completes it in the
    association's own thread. On failure the connection is closed, the acceptor gives up at
    once (nothing to negotiate) and the exception is returned, for the audit trail; None when
    the handshake succeeded or *assoc* is not TLS.
    """
    sock = tls_socket(assoc)
    if sock is None:
        return None
    try:
        handshake(sock, timeout)
    except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
        assoc.acse_timeout = 0.001  # nothing to negotiate: let the acceptor give up at once
        if assoc.dul.socket is not None:
            assoc.dul.socket.close()
        return exc
    return None


# --- Maximum Length -----------------------------------------------------------------------------


def bound_peer_max_length(assoc: Association, limit: int) -> None:
    """A requestor's *assoc*, just established: when the acceptor takes PDUs of any length
    (Maximum Length 0, PS3.8 D.1), send at most *limit* bytes per PDU. pynetdicom 3.0.4 reads
    0 as "no limit" and sends, and its peer must read, a whole data set as one PDU."""
    for item in assoc.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification) and not item.maximum_length_received:
            item.maximum_length_received = limit


# --- supported presentation contexts, shared ----------------------------------------------------


class _SharedContext(PresentationContext):
    """A supported presentation context that every association reads and none copies."""

    def __deepcopy__(self, memo: dict[int, object]) -> _SharedContext:
        return self


def shared_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """*contexts* (an AE's supported ones) as contexts that a deep copy returns unchanged.

    It changes what pynetdicom does, through its public ``contexts`` argument of
    ``start_server``/``make_server``: pynetdicom 3.0's
    ``RequestHandler._create_association`` gives each association acceptor
    ``deepcopy(server.contexts)``, which for every Storage SOP Class with every transfer
    syntax costs tens of milliseconds of CPU per association. The acceptor only reads them
    (``presentation.negotiate_as_acceptor`` builds new contexts for its answer, and the roles
    are read), so one set is shared. Test: ``tests/test_acceptors.py`` checks that an
    association's supported contexts are these very objects and that negotiation still
    accepts and rejects as before.
    """
    shared: list[PresentationContext] = []
    for context in contexts:
        copy = _SharedContext()
        copy.abstract_syntax = context.abstract_syntax
        copy.transfer_syntax = list(context.transfer_syntax)
        copy.scu_role = context.scu_role
        copy.scp_role = context.scp_role
        shared.append(copy)
    return shared

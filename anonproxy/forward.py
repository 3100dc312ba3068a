"""Forwarding: workers that drain each destination's spool queue.

Each destination has its own :class:`~anonproxy.spool.DestinationQueue` and its own workers, so a
dead PACS never blocks another destination. A worker owns one sender: a :class:`ProcessSender`
C-STOREs to the research PACS from a child process, a :class:`FolderSender` moves files into a
directory tree.

The worker thread keeps the queue, the back-off, quarantine and the audit trail; only the
network side of C-STORE runs in the child, so that the DICOM upper layer of the SCU does not
compete with the SCP for the service process's interpreter. The child runs a
:class:`DicomSender`, which keeps an association open to the research PACS and reuses it until it
has been idle for ``idle_timeout`` seconds. Parent and child exchange spool paths and outcomes
over a pipe, never data sets. The child is started with its worker, started again after it
has died, and ends when its pipe is closed (the service stopped or died). The child reads only
the file meta of an instance (:mod:`anonproxy.filemeta`) and streams the data set's bytes from
the file as they are: nothing is decoded, unless the destination needs another transfer syntax.
A worker whose association is the destination's only one open hands its child up to
:data:`BATCH` due instances in one request (else one: the others send the rest); the child
sends them one after the other on its association (whose thread it keeps paused meanwhile) and
answers each as it is sent, so that releasing, auditing and taking the next ones in the worker
overlap the sending (forwarding alone to storescp, 2 cores: MR 577-616 -> 768-851/s, CT
466-492 -> 660-692/s).

Parallel associations: a destination has ``max_associations`` workers (default 2), each with its
own child and association, sharing one :class:`AssociationGate`. Associations are opened one at a
time; the first is opened whenever an instance waits, each further one only while the queue
holds more than :data:`FURTHER_BACKLOG` instances beyond one per open association, and only
by a child that has started (every child starts with its worker; no instance waits for an
interpreter to start). A further association is opened before its worker takes an instance
(:meth:`ProcessSender.ready`): one that the destination rejects, aborts or does not accept
within :data:`PROBE_ACSE_TIMEOUT_S` while another is open (a PACS that serves one association
at a time, or limits how many) holds no instance meanwhile, and fails none (a send that must
open one, its association having ended since, gives its instance back to the queue,
uncounted). Either way the gate lowers that destination's limit to the associations open,
raising it again for one more try after a minute, then after ever longer pauses (up to an
hour). Nothing is promised about the order of instances across associations.

Outcomes, as PS3.4 means them: Success and Warning are delivered; Out of Resources (0xA7xx),
rejected or aborted associations, network errors, time-outs and a failed sender process are
transient and retried with exponential back-off and jitter; any other failure status is permanent
and the instance goes to quarantine with the reason. Every outcome is an audit event.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerProcess
from pathlib import Path
from typing import Protocol
from weakref import WeakKeyDictionary

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from anonproxy import codecs, pynetdicom_patches
from anonproxy.audit import AuditLog, configure_logging, get_logger
from anonproxy.config import DicomDestinationConfig, FolderDestinationConfig
from anonproxy.durable import make_directories, sync_data, sync_directory
from anonproxy.errors import ForwardError
from anonproxy.filemeta import read_file_meta
from anonproxy.processes import child_context
from anonproxy.spool import DestinationQueue, QueueItem, Spool, check_uid_name
from anonproxy.tls import client_context

log = get_logger(__name__)

_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_RETRY_BASE_S = 0.5
_STATUS_CATEGORY_DELIVERED = {"Success", "Warning"}
_REPLY_MARGIN_S = 30.0  # start-up of the sender process, transfer syntax conversion
_MIN_THROUGHPUT_BYTES_S = 1_000_000  # the reply time-out grows by 1 s per MB of the instance
_CLOSE_WAIT_S = 5.0  # for the sender process to release its association and exit
# PDU length sent to a peer that takes any (Maximum Length 0): pynetdicom would send, and read,
# a whole instance as one PDU (see pynetdicom_patches.bound_peer_max_length).
UNLIMITED_PEER_PDU = 1 << 20
# The Maximum Length we propose: what the destination may send us, C-STORE responses only.
# 0 (no limit) costs nothing; what we send is cut to the destination's own Maximum Length.
PROPOSED_MAX_PDU = 0
PROBE_ACSE_TIMEOUT_S = 2.0
"""How long a further association to a destination waits for its A-ASSOCIATE-AC while another
is open (a PACS that serves one association at a time never answers it)."""
_LIMIT_RETRY_S = 60.0  # after a refused further association: the first try again
FURTHER_BACKLOG = 2
"""Instances in a queue, beyond one per open association, that a further association needs: a
short lag of the open ones (a burst of a few) is not worth another association and process."""
BATCH = 4
"""Instances a worker takes at once, when that many are due and no other association to the
destination is open, and hands its sender process in one request: the child sends each after
the other while the worker settles the ones answered (releases, audits, takes the next), so
that the association waits on neither."""
_LIMIT_RETRY_MAX_S = 3600.0
_LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Sender(Protocol):
    """Delivers one spooled instance to a destination."""

    def prepare(self) -> None:
        """Get ready before the first instance waits for it."""

    def idle_check(self) -> None:
        """Called when no instance was waiting: release what has been idle too long."""

    # Optional: ``ready(backlog, timeout) -> bool``, whether the sender may take an instance
    # now (*backlog()*: the instances in its queue), waiting up to *timeout* seconds
    # (ProcessSender: its destination's AssociationGate). A sender without it is always ready.
    # Optional: ``send_each(paths)``, the outcome of sending each path, as they come
    # (ProcessSender.send_each). A sender without it is given one instance at a time.

    def send(self, path: Path) -> int:
        """Deliver the file at *path*; return the destination's status (0 for a folder).

        Raise :class:`ForwardError` (``permanent=True`` for refusals that a retry cannot fix).
        """

    def close(self) -> None:
        """Release connections."""


class FolderSender:
    """Writes instances to ``<root>/<study>/<series>/<instance>.dcm``: a copy under a hidden
    name, its data synced, renamed, the folder synced, and every folder created on the way
    synced into its parent (:func:`~anonproxy.durable.make_directories`): once :meth:`send`
    returns, the file survives a crash, and the spool removes its own copy."""

    def __init__(self, config: FolderDestinationConfig, *, fsync: bool = True) -> None:
        self.root = config.path
        self.fsync = fsync

    def prepare(self) -> None:
        """Nothing to prepare."""

    def idle_check(self) -> None:
        """Nothing is held open."""

    def send(self, path: Path) -> int:
        header = dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
        try:
            study, series, instance = (
                check_uid_name(str(header[keyword].value))
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            )
        except (KeyError, ValueError):
            raise ForwardError(
                "instance lacks a valid Study, Series or SOP Instance UID", permanent=True
            ) from None
        directory = self.root / study / series
        target = directory / f"{instance}.dcm"
        tmp = directory / f".{instance}.tmp"
        try:
            make_directories(directory, sync=self.fsync)
            shutil.copyfile(path, tmp)
            if self.fsync:
                sync_data(tmp)
            tmp.replace(target)
            if self.fsync:
                sync_directory(directory)
        except OSError as exc:
            raise ForwardError(f"folder write failed: {exc.strerror}") from None
        return 0

    def close(self) -> None:
        """Nothing to release."""


class DestinationBusy(ForwardError):
    """A further association to a destination was refused while another is open: the
    destination serves fewer in parallel. Not a failure of the instance."""


class NotSent(ForwardError):
    """An instance of a batch was not sent: an earlier one failed in a way that would fail it
    too (see :meth:`ProcessSender.send_each`). Not a failure of the instance."""


class DicomSender:
    """C-STORE to a research PACS over a reused association (in the sender process of a
    :class:`ProcessSender`)."""

    def __init__(self, config: DicomDestinationConfig, calling_ae_title: str) -> None:
        pynetdicom_patches.install()  # spool files streamed, never loaded: chunked_data_sets
        self.config = config
        self.ae = AE(ae_title=config.calling_ae_title or calling_ae_title)
        self.ae.acse_timeout = config.acse_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.ae.network_timeout = config.network_timeout
        self._tls_args: tuple[ssl.SSLContext, str] | None = None
        if config.tls is not None:  # DICOM TLS; a certificate that cannot be read: ConfigError
            key = f"destinations.{config.name}.tls"
            self._tls_args = (client_context(config.tls, key), config.host)
        self._assoc: Association | None = None
        self._last_used = 0.0
        self._wanted: dict[tuple[str, str], None] = {}
        self._holding = False  # see held()

    def _contexts(self) -> list[PresentationContext]:
        """One context per (SOP Class, transfer syntax) seen, plus an uncompressed fallback
        per SOP Class, so that the accepted contexts tell exactly what the peer takes."""
        # Verification is always proposed, so that the association is established even when a
        # peer accepts none of the storage contexts: that refusal is then told apart from a
        # network failure (permanent, not transient).
        contexts = [build_context(Verification)]
        contexts += [build_context(sop_class, syntax) for sop_class, syntax in self._wanted]
        for sop_class in dict.fromkeys(sop_class for sop_class, _ in self._wanted):
            contexts.append(
                build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            )
        return contexts[:_MAX_CONTEXTS]

    def _accepted_syntaxes(self, sop_class: str) -> set[str]:
        if self._assoc is None:
            return set()
        return {
            str(cx.transfer_syntax[0])
            for cx in self._assoc.accepted_contexts
            if cx.abstract_syntax == sop_class
        }

    @property
    def associated(self) -> bool:
        """Whether an association is held (it may since have been ended by the peer)."""
        return self._assoc is not None

    def _associate(self, *, further: bool = False) -> Association:
        """Open the association (and return it); *further*: another to this destination is
        open, so wait :data:`PROBE_ACSE_TIMEOUT_S` at most and raise :class:`DestinationBusy` if
        it is not established."""
        self.close()
        self.ae.acse_timeout = (
            min(self.config.acse_timeout, PROBE_ACSE_TIMEOUT_S)
            if further
            else self.config.acse_timeout
        )
        assoc = self.ae.associate(
            self.config.host,
            self.config.port,
            contexts=self._contexts(),
            ae_title=self.config.ae_title,
            max_pdu=PROPOSED_MAX_PDU,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            tls_args=self._tls_args,
        )
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "failed or aborted"
            if further:
                raise DestinationBusy(f"further association {reason}")
            if self._tls_args is not None and not assoc.is_rejected:
                reason += " (TLS)"
            raise ForwardError(f"association {reason}")
        pynetdicom_patches.bound_peer_max_length(assoc, UNLIMITED_PEER_PDU)
        self._assoc = assoc
        return assoc

    def open_further(self) -> None:
        """Open a further association to this destination now, with no instance waiting on it
        (see :meth:`_associate`: :class:`DestinationBusy` if it is not established)."""
        self._associate(further=True)
        self._last_used = time.monotonic()

    def send(self, path: Path, *, further: bool = False) -> int:
        """C-STORE the file at *path*; *further*: if an association must be opened, another
        to this destination is open (see :meth:`_associate`)."""
        try:
            meta = read_file_meta(path)
        except ValueError:
            raise ForwardError("instance lacks its file meta UIDs", permanent=True) from None
        sop_class = meta.sop_class
        syntax = meta.transfer_syntax
        if self._assoc is not None and (
            time.monotonic() - self._last_used > self.config.idle_timeout
            or (self._holding and pynetdicom_patches.ended_while_held(self._assoc))
        ):
            self.close()
        if (sop_class, syntax) not in self._wanted:
            self._wanted[(sop_class, syntax)] = None
            if len(self._wanted) > _MAX_CONTEXTS // 2:
                self._wanted.pop(next(iter(self._wanted)))
            self.close()  # negotiate again, now with a context for this pair
        assoc = self._assoc if self._assoc is not None else self._associate(further=further)
        accepted = self._accepted_syntaxes(sop_class)
        if not accepted:
            self.close()
            raise ForwardError("SOP class not supported by the destination", permanent=True)
        dataset: Path | Dataset = path
        if syntax not in accepted:
            dataset = self._convert(path, syntax, accepted)
        if self._holding:
            pynetdicom_patches.hold_reactor(assoc)
        try:
            status = assoc.send_c_store(dataset)
        except (RuntimeError, ValueError, OSError) as exc:
            self.close()
            raise ForwardError(f"C-STORE not sent: {type(exc).__name__}") from None
        self._last_used = time.monotonic()
        if not status or "Status" not in status:
            self.close()
            raise ForwardError("no C-STORE response (time-out or aborted association)")
        code = int(status.Status)
        category = code_to_category(code)
        if category in _STATUS_CATEGORY_DELIVERED:
            return code
        permanent = not (0xA700 <= code <= 0xA7FF)
        raise ForwardError(
            f"C-STORE status 0x{code:04X} ({category})", permanent=permanent, status=code
        )

    @staticmethod
    def _convert(path: Path, syntax: str, accepted: set[str]) -> Dataset:
        """Re-encode for a destination that does not accept the spooled transfer syntax."""
        dataset = dcmread(path)
        if UID(syntax).is_compressed:
            codecs.install()  # 12-bit JPEG Extended without the GPL codec
            try:
                dataset.decompress()
            except Exception as exc:  # noqa: BLE001 - any codec failure is a permanent refusal
                raise ForwardError(
                    f"cannot decompress for the destination: {type(exc).__name__}", permanent=True
                ) from None
        target = ExplicitVRLittleEndian if ExplicitVRLittleEndian in accepted else None
        if target is None and ImplicitVRLittleEndian in accepted:
            target = ImplicitVRLittleEndian
        if target is None:
            raise ForwardError("no common transfer syntax with the destination", permanent=True)
        dataset.file_meta.TransferSyntaxUID = target
        return dataset

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Send a batch: the association thread stays paused from one C-STORE to the next
        (:func:`~anonproxy.pynetdicom_patches.hold_reactor`), and the peer's A-RELEASE or
        A-ABORT that it would have answered meanwhile is looked for before each."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._assoc is not None:
                pynetdicom_patches.release_reactor(self._assoc)

    def close(self) -> None:
        if self._assoc is not None:
            assoc, self._assoc = self._assoc, None
            pynetdicom_patches.release_reactor(assoc)
            with contextlib.suppress(Exception):
                if pynetdicom_patches.ended_while_held(assoc):
                    assoc.join(_CLOSE_WAIT_S)  # its thread answers the peer and ends it
                if assoc.is_established:
                    assoc.release()

    def idle_check(self) -> None:
        """Close the association once it has been idle for the configured time."""
        if self._assoc is not None and (
            time.monotonic() - self._last_used > self.config.idle_timeout
        ):
            self.close()


# --- the sender process ----------------------------------------------------------------------
# Requests, parent to child: _Send (answered with one reply per path, in order), _Associate
# (one reply), _Release and _Close (not answered). Every reply says whether the child holds an
# association after it.


@dataclass(frozen=True)
class _Send:
    """Request: C-STORE the spool files *paths*, one after the other (*further*: see
    :meth:`DicomSender.send`). A transient refusal ends the batch: each path after it is
    answered :class:`_Skipped`, not sent (what refused one would refuse the next)."""

    paths: tuple[str, ...]
    further: bool = False


@dataclass(frozen=True)
class _Associate:
    """Request: open an association now, a further one (see :meth:`ProcessSender.ready`)."""


@dataclass(frozen=True)
class _Release:
    """Request: release the association (idle)."""


@dataclass(frozen=True)
class _Close:
    """Request: release the association and exit."""


_Request = _Send | _Associate | _Release | _Close


@dataclass(frozen=True)
class _Stored:
    """Reply: the destination took the instance with this C-STORE status (Success, Warning)."""

    status: int
    associated: bool = True


@dataclass(frozen=True)
class _Refused:
    """Reply: the fields of the :class:`ForwardError` raised in the sender process."""

    message: str
    permanent: bool
    status: int | None
    associated: bool = False
    busy: bool = False  # a DestinationBusy


@dataclass(frozen=True)
class _Missing:
    """Reply: the spool file is gone (an operator removed it)."""

    associated: bool = False


@dataclass(frozen=True)
class _Opened:
    """Reply: the association is open (:class:`_Associate`)."""

    associated: bool = True


@dataclass(frozen=True)
class _Skipped:
    """Reply: not sent, a transient refusal of an earlier path of the batch ended it."""

    associated: bool = False


@dataclass(frozen=True)
class _Started:
    """Sent once by the child, before any reply: it has started and takes requests."""


_Reply = _Stored | _Refused | _Missing | _Opened | _Skipped


def _answer(sender: DicomSender, request: _Associate | str, further: bool = False) -> _Reply:
    """Carry out *request* in the sender process, an :class:`_Associate` or one path of a
    :class:`_Send`; the reply."""
    try:
        if isinstance(request, _Associate):
            if not sender.associated:
                sender.open_further()
            return _Opened()
        return _Stored(sender.send(Path(request), further=further))
    except ForwardError as exc:
        return _Refused(
            str(exc),
            exc.permanent,
            exc.status,
            sender.associated,
            busy=isinstance(exc, DestinationBusy),
        )
    except FileNotFoundError:
        return _Missing(sender.associated)
    except Exception as exc:  # logged here, reported to the parent; the process carries on
        log.exception("forward.unexpected_error", destination=sender.config.name)
        return _Refused(f"unexpected {type(exc).__name__}", False, None, sender.associated)


def _serve_sender(
    conn: Connection, config: DicomDestinationConfig, calling_ae_title: str, log_level: str
) -> None:
    """The sender process: a :class:`DicomSender` that answers the requests on *conn* until it
    is asked to close or the pipe ends (the parent has closed it, or died)."""
    # Ctrl-C reaches the whole process group: the parent, not the signal, ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level)  # pydicom's and pynetdicom's value reports off, as in the parent
    sender = DicomSender(config, calling_ae_title)
    try:
        conn.send(_Started())
        while True:
            request: _Request = conn.recv()
            if isinstance(request, _Close):
                break
            if isinstance(request, _Release):
                sender.close()
                continue
            if isinstance(request, _Associate):
                conn.send(_answer(sender, request))
                continue
            ended = False  # by a transient refusal
            with sender.held():
                for path in request.paths:
                    if ended:
                        reply: _Reply = _Skipped(sender.associated)
                    else:
                        reply = _answer(sender, path, request.further)
                    conn.send(reply)
                    ended = ended or (isinstance(reply, _Refused) and not reply.permanent)
    except (EOFError, OSError):
        pass  # the parent is gone
    finally:
        sender.close()
        conn.close()


def _log_level_name() -> str:
    """The level of the service's operational log (the root logger's), for the child."""
    name = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return name if name in _LEVEL_NAMES else "INFO"


class AssociationGate:
    """The associations that the workers of one destination hold: how many may be open, and
    which worker may open one now (one at a time). See the module's docstring.

    A *member* is a :class:`ProcessSender` (any hashable object in tests)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self._open: set[object] = set()
        self._opening: object | None = None
        self._retry_after_s = _LIMIT_RETRY_S
        self._raise_at = 0.0
        self._cond = threading.Condition()

    @property
    def open(self) -> int:
        """Associations held (or being opened)."""
        with self._cond:
            return len(self._open) + (self._opening is not None)

    @property
    def held(self) -> int:
        """Associations held (not one being opened: a PACS that serves one at a time may not
        answer it for :data:`PROBE_ACSE_TIMEOUT_S`)."""
        with self._cond:
            return len(self._open)

    def admit(
        self, member: object, backlog: Callable[[], int], timeout: float, *, first: bool = True
    ) -> bool | None:
        """Wait up to *timeout* seconds for *member*, holding no association, to be allowed to
        open one, with *backlog()* instances waiting; *first*: it may open the only one (else
        only a further one). Returns None (not now), False (yes, the only one) or True (yes, a
        further one: see :meth:`DicomSender.send`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self.limit < self.maximum and now >= self._raise_at:
                    self.limit += 1  # try one more again
                    self._raise_at = now + self._retry_after_s
                if self._opening in (None, member) and (
                    (first and not self._open)
                    or (
                        self._open
                        and len(self._open) < self.limit
                        and backlog() > len(self._open) + FURTHER_BACKLOG
                    )
                ):
                    self._opening = member
                    return bool(self._open)
                if self._opening is member:  # no longer wanted: let another open one
                    self._opening = None
                    self._cond.notify_all()
                if now >= deadline:
                    return None
                self._cond.wait(deadline - now)

    def opened(self, member: object) -> None:
        """*member* holds an association."""
        with self._cond:
            if self._opening is member:
                self._opening = None
            self._open.add(member)
            self._cond.notify_all()

    def refused(self, member: object) -> None:
        """A further association of *member* was refused: the limit becomes the associations
        open, tried again later."""
        with self._cond:
            if self._opening is member:
                self._opening = None
            self._open.discard(member)
            limit = max(1, len(self._open))
            if limit < self.limit:
                self.limit = limit
                self._raise_at = time.monotonic() + self._retry_after_s
                self._retry_after_s = min(2 * self._retry_after_s, _LIMIT_RETRY_MAX_S)
            self._cond.notify_all()
        log.warning("forward.associations_limited", limit=limit)

    def closed(self, member: object) -> None:
        """*member* holds no association (released, failed, its child ended)."""
        with self._cond:
            if self._opening is member:
                self._opening = None
            self._open.discard(member)
            self._cond.notify_all()


_gates: WeakKeyDictionary[DestinationQueue, AssociationGate] = WeakKeyDictionary()
_gates_lock = threading.Lock()


def gate_of(queue: DestinationQueue, maximum: int) -> AssociationGate:
    """The gate shared by the workers of the destination of *queue*."""
    with _gates_lock:
        gate = _gates.get(queue)
        if gate is None:
            gate = _gates[queue] = AssociationGate(maximum)
        return gate


class ProcessSender:
    """C-STORE to a research PACS from a child process that runs a :class:`DicomSender`.

    The child is started (from the fork server of :mod:`anonproxy.processes`) by
    :meth:`prepare` or on the first :meth:`send`, and reused for every later one, so its
    association stays open as a :class:`DicomSender`'s does. A child that dies during a send,
    or does not answer within :attr:`reply_timeout` seconds (plus one second per megabyte of
    the instance), is killed: that send fails as transient and the next one starts a new
    child. A child found ended before a send is replaced for that send. Used by one thread.

    With a *gate*, the sender opens an association only when the gate admits it
    (:meth:`ready`); without one, whenever it sends. *first*: the sender may open a
    destination's only association (the first worker of a destination), else only further
    ones. *prestart*: :meth:`prepare` starts the child (else the first admission or send does).
    """

    def __init__(
        self,
        config: DicomDestinationConfig,
        calling_ae_title: str,
        *,
        log_level: str | None = None,
        gate: AssociationGate | None = None,
        prestart: bool = True,
        first: bool = True,
    ) -> None:
        if config.tls is not None:  # a certificate that cannot be read: ConfigError, here
            client_context(config.tls, f"destinations.{config.name}.tls")
        self.config = config
        self.calling_ae_title = calling_ae_title
        self.log_level = log_level or _log_level_name()
        # A-RELEASE of an idle association, A-ASSOCIATE, the data set written under the network
        # time-out and its C-STORE response under the DIMSE time-out, and a margin.
        self.reply_timeout = (
            2 * config.acse_timeout + config.network_timeout + config.dimse_timeout
        ) + _REPLY_MARGIN_S
        self._process: ForkServerProcess | None = None
        self._conn: Connection | None = None
        self._last_reply = 0.0
        self._maybe_associated = False  # the child may hold an association: idle check due
        self.gate = gate
        self.prestart = prestart
        self.first = first
        self._further = False  # the gate admitted a further association
        self._started = False  # the child has said _Started

    @property
    def pid(self) -> int | None:
        """The process ID of the running child, if any."""
        return None if self._process is None else self._process.pid

    def _start(self) -> Connection:
        context = child_context()
        conn, child_conn = context.Pipe()
        process = context.Process(
            target=_serve_sender,
            args=(child_conn, self.config, self.calling_ae_title, self.log_level),
            name=f"forward-sender-{self.config.name}",
            daemon=True,  # and the child ends on EOF, should this process be killed
        )
        try:
            process.start()
        except BaseException:
            conn.close()
            raise
        finally:
            child_conn.close()  # the child's end lives in the child only: its death is our EOF
        self._process, self._conn = process, conn
        self._started = False  # until its _Started
        log.info("forward.sender_started", destination=self.config.name, pid=process.pid)
        return conn

    def prepare(self) -> None:
        """Start the child now, so that the first instance does not wait for it (an
        interpreter starting: about half a second), unless *prestart* is false."""
        if self._conn is None and self.prestart:
            self._start()

    def ready(self, backlog: Callable[[], int], timeout: float) -> bool:
        """Whether this sender may take an instance now: it holds an association, or its
        gate admits it to open one (waiting up to *timeout* seconds)."""
        if self.gate is None or self._maybe_associated:
            return True
        admitted = self.gate.admit(self, backlog, timeout, first=self.first)
        if admitted is None:
            return False
        self._further = admitted
        if self._conn is None:
            self._start()
        # No instance waits for an interpreter to start; until then, admitted again next time
        # (unless no longer wanted).
        if not self.started(timeout):
            return False
        # Nor for a further association: one that a PACS serving one association at a time
        # never answers held the instance taken for it PROBE_ACSE_TIMEOUT_S, then gave it back.
        return not admitted or self._open_further()

    def _open_further(self) -> bool:
        """Have the child open the further association the gate admitted; whether it did."""
        conn = self._conn
        if conn is None:
            return False
        request: _Request = _Associate()
        try:
            conn.send(request)
            reply = conn.recv() if conn.poll(self.reply_timeout) else None
        except (EOFError, OSError):
            reply = None
        if reply is None:
            self._failed("sender process failed or did not answer")
            return False
        self._last_reply = time.monotonic()
        if isinstance(reply, _Opened):
            self._associated(True)
            return True
        # Not established (not answered in time, rejected, failed): the destination serves no
        # further association now; the gate tries again later, as after a refusal in a send.
        self._maybe_associated = False
        if self.gate is not None:
            self.gate.refused(self)
        return False

    def started(self, timeout: float) -> bool:
        """Whether the child has started and takes requests, waiting up to *timeout* seconds
        for it (False also when there is no child, or it failed)."""
        if self._started or self._conn is None:
            return self._started
        try:
            if self._conn.poll(timeout):
                self._started = isinstance(self._conn.recv(), _Started)
        except (EOFError, OSError):
            self._failed("sender process failed")
        return self._started

    def _associated(self, held: bool) -> None:
        """Record whether the child holds an association (and tell the gate)."""
        self._maybe_associated = held
        if self.gate is not None:
            if held:
                self.gate.opened(self)
            else:
                self.gate.closed(self)

    def _stop(self, *, graceful: bool) -> int | None:
        """End the child: ask it to close and wait for it (*graceful*), else kill it. Returns
        its exit code (negative: the signal that ended it)."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        self._associated(False)
        if conn is not None and graceful:
            request: _Request = _Close()
            with contextlib.suppress(OSError):
                conn.send(request)
        exitcode = None
        if process is not None:
            if graceful:
                process.join(_CLOSE_WAIT_S)
                if process.is_alive():
                    process.terminate()
                    process.join(1.0)
            if process.is_alive():
                process.kill()
            process.join(_CLOSE_WAIT_S)
            exitcode = process.exitcode
            with contextlib.suppress(ValueError):  # still running after SIGKILL: leave it be
                process.close()
        if conn is not None:
            conn.close()
        return exitcode

    def _failed(self, reason: str) -> ForwardError:
        """Kill the child after a failure; the error that fails the send (transient)."""
        exitcode = self._stop(graceful=False)
        log.warning(
            "forward.sender_failed", destination=self.config.name, reason=reason, exitcode=exitcode
        )
        return ForwardError(reason)

    def send(self, path: Path) -> int:
        (outcome,) = self.send_each([path])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def send_each(self, paths: list[Path]) -> Generator[int | Exception, None, None]:
        """Have the child C-STORE *paths* one after the other, in one request: the outcome of
        each, in order, as its reply arrives (the child goes on to the next meanwhile). An
        outcome is the status (as :meth:`send` returns it) or the exception :meth:`send` would
        raise; a path that a transient failure of an earlier one left unsent:
        :class:`NotSent`. Yields one outcome per path, whatever happens; a caller that stops
        early has the child killed (its replies would answer the next request)."""
        if self._process is not None and not self._process.is_alive():
            # ended while idle (killed, out of memory): nothing of this batch was sent
            exitcode = self._stop(graceful=False)
            log.warning("forward.sender_ended", destination=self.config.name, exitcode=exitcode)
        conn = self._conn or self._start()
        further = self._further and not self._maybe_associated
        request: _Request = _Send(tuple(str(path) for path in paths), further)
        answered = 0
        failure: ForwardError | None = None
        try:
            try:
                conn.send(request)
            except OSError:
                failure = self._failed("sender process failed")
            for path in paths:
                outcome: int | Exception
                if failure is not None:
                    outcome, failure = failure, NotSent("the sender process failed before it")
                else:
                    outcome = self._outcome(conn, path)
                    if self._conn is not conn:  # killed: the rest of the batch is not sent
                        failure = NotSent("the sender process failed before it")
                answered += 1
                yield outcome
        finally:
            if answered < len(paths) and self._conn is conn:
                self._failed("batch abandoned")

    def _outcome(  # noqa: PLR0911 - one return per kind of reply
        self, conn: Connection, path: Path
    ) -> int | Exception:
        """The child's next reply, for *path*, as an outcome (see :meth:`send_each`)."""
        reply = self._reply(conn, path)
        if isinstance(reply, ForwardError):
            return reply
        self._last_reply = time.monotonic()
        if isinstance(reply, _Refused) and reply.busy and self.gate is not None:
            self._maybe_associated = False
            self.gate.refused(self)
            return DestinationBusy(reply.message)
        self._associated(reply.associated)
        if isinstance(reply, _Stored):
            return reply.status
        if isinstance(reply, _Missing):
            return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if isinstance(reply, _Skipped):
            return NotSent("an earlier instance of its batch was refused")
        if isinstance(reply, _Opened):  # not an answer to a send
            return self._failed("sender process answered out of turn")
        return ForwardError(reply.message, permanent=reply.permanent, status=reply.status)

    def _reply(self, conn: Connection, path: Path) -> _Reply | ForwardError:
        """The child's next reply, waited for as long as *path* may take; the child killed
        (and the error of that) when it fails or does not answer in time."""
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # the child answers _Missing
        timeout = self.reply_timeout + size / _MIN_THROUGHPUT_BYTES_S
        deadline = time.monotonic() + timeout
        try:
            while conn.poll(max(0.0, deadline - time.monotonic())):
                reply: _Reply | _Started = conn.recv()
                self._started = True
                if not isinstance(reply, _Started):
                    return reply
        except (EOFError, OSError):
            return self._failed("sender process failed")
        return self._failed(f"sender process did not answer within {timeout:.0f} s")

    def idle_check(self) -> None:
        """Have the child release its association once it has been idle for the configured
        time (as :meth:`DicomSender.idle_check`)."""
        if not self._maybe_associated and self.gate is not None:
            self.gate.closed(self)  # admitted, but no instance came: let another open one
        if self._conn is None or not self._maybe_associated:
            return
        if time.monotonic() - self._last_reply <= self.config.idle_timeout:
            return
        self._associated(False)
        request: _Request = _Release()
        try:
            self._conn.send(request)
        except OSError:
            self._failed("sender process failed")

    def close(self) -> None:
        """Have the child release its association and exit; kill it if it does not."""
        self._stop(graceful=True)


def retry_delay(failures: int, maximum: float) -> float:
    """Exponential back-off with jitter: base 0.5 s doubling per failure, capped at *maximum*."""
    ceiling = min(maximum, _RETRY_BASE_S * (2 ** min(failures, 16)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography


class ForwardWorker(threading.Thread):
    """Drains one destination queue with one sender."""

    def __init__(
        self,
        destination: str,
        spool: Spool,
        sender: Sender,
        audit: AuditLog,
        *,
        index: int = 0,
        retry_max_age_s: float | None = None,
        retry_max_delay_s: float = 30.0,
    ) -> None:
        super().__init__(name=f"forward-{destination}-{index}", daemon=True)
        self.destination = destination
        self.spool = spool
        self.queue: DestinationQueue = spool.queues[destination]
        self.sender = sender
        self.audit = audit
        self.retry_max_age_s = retry_max_age_s
        self.retry_max_delay_s = retry_max_delay_s
        self.failures = 0  # consecutive transient failures: the destination's back-off
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Finish the current batch (at most :data:`BATCH` instances), then stop."""
        self._stop_event.set()

    def run(self) -> None:
        ready = getattr(self.sender, "ready", None)
        send_each = getattr(self.sender, "send_each", None)
        batch = BATCH if send_each is not None else 1
        try:
            self.sender.prepare()
            while not self._stop_event.is_set():
                if ready is not None and not ready(self.queue.__len__, 0.1):
                    continue  # another worker of this destination opens or holds the association
                item = self.queue.take(timeout=0.5)
                if item is None:
                    self.sender.idle_check()
                    continue
                items = [item]
                while len(items) < self._batch(batch) and (more := self.queue.take(0)) is not None:
                    items.append(more)
                self._forward(items, send_each or self._send_one_by_one)
        finally:
            self.sender.close()

    def _batch(self, batch: int) -> int:
        """How many instances to take at once: *batch*, or one while another association to the
        destination is open (it sends in parallel what this worker leaves in the queue)."""
        gate: AssociationGate | None = getattr(self.sender, "gate", None)
        return batch if gate is None or gate.held <= 1 else 1

    def _audit(self, event: str, item: QueueItem, **fields: object) -> None:
        """An audit record about *item* at this destination."""
        self.audit.event(
            event, deid_sop_instance_uid=item.name, destination=self.destination, **fields
        )

    def _back_off(self, item: QueueItem, reason: str) -> None:
        """A transient failure: the item is due again at once, and this worker waits out the
        destination's back-off (a dead PACS costs one attempt per back-off, not one per
        instance)."""
        self.failures += 1
        delay = retry_delay(self.failures, self.retry_max_delay_s)
        self._audit(
            "instance.forward_retry",
            item,
            reason=reason,
            attempt=item.attempts + 1,
            retry_in_s=round(delay, 3),
        )
        self.queue.retry_later(item, 0.0)
        self._stop_event.wait(delay)

    def _send_one_by_one(self, paths: list[Path]) -> Generator[int | Exception, None, None]:
        """:meth:`ProcessSender.send_each` for a sender without it (a folder): the outcome of
        sending each of *paths* by its ``send``."""
        for path in paths:
            try:
                yield self.sender.send(path)
            except (ForwardError, FileNotFoundError) as exc:
                yield exc

    def _forward(
        self,
        items: list[QueueItem],
        send_each: Callable[[list[Path]], Generator[int | Exception, None, None]],
    ) -> None:
        """Send *items* by *send_each*, settling each as its outcome arrives (the next one is
        being sent meanwhile). A sender that fails unexpectedly fails the item it was sending;
        the items after it, and any left without an outcome, go back to the queue uncounted."""
        started = time.monotonic()
        outcomes = send_each([self.queue.path(item) for item in items])
        settled = 0
        try:
            for item in items:
                try:
                    outcome = next(outcomes)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - settled as a failure of this item
                    outcome = exc
                self._settle(item, outcome, started)
                settled += 1
                started = time.monotonic()
        finally:
            outcomes.close()
            for item in items[settled:]:
                item.attempts -= 1  # retry_later counts one
                self.queue.retry_later(item, 0.0)

    def _settle(self, item: QueueItem, outcome: int | Exception, started: float) -> None:
        """Release, quarantine or retry *item* by the *outcome* of its send (begun *started*)."""
        try:
            if isinstance(outcome, Exception):
                raise outcome
            status = outcome
        except (DestinationBusy, NotSent):
            # Nothing was sent: not an attempt, no back-off (busy: the gate now holds this
            # worker; not sent: the instance before it was retried or backed off)
            item.attempts -= 1  # retry_later counts one
            self.queue.retry_later(item, 0.0)
            return
        except ForwardError as exc:
            age = time.time() - item.first_seen
            expired = self.retry_max_age_s is not None and age > self.retry_max_age_s
            if exc.permanent or expired:
                reason = str(exc) if exc.permanent else f"gave up after {age:.0f} s: {exc}"
                self.spool.quarantine(self.destination, item, reason, exc.status)
                self._audit(
                    "instance.quarantined",
                    item,
                    reason=reason,
                    attempts=item.attempts + 1,
                )
                return
            self._back_off(item, str(exc))
            return
        except FileNotFoundError:
            self.queue.done(item)  # removed by an operator
            return
        except Exception as exc:
            log.exception("forward.unexpected_error", destination=self.destination)
            self._back_off(item, f"unexpected {type(exc).__name__}")
            return
        self.failures = 0
        self.spool.release(self.queue, item, status)
        self._audit(
            "instance.forwarded",
            item,
            status=f"0x{status:04X}",
            attempts=item.attempts + 1,
            send_ms=round((time.monotonic() - started) * 1000, 1),
            latency_ms=round((time.time() - item.first_seen) * 1000, 1),
        )


def make_worker(
    config: DicomDestinationConfig | FolderDestinationConfig,
    spool: Spool,
    audit: AuditLog,
    *,
    calling_ae_title: str,
    index: int = 0,
    fsync: bool = True,
) -> ForwardWorker:
    """A worker (with its own sender) for one destination. The workers of one DICOM
    destination share its :class:`AssociationGate`; the first (*index* 0) opens the only
    association, the others further ones. Every sender process starts with its worker: an
    interpreter starting costs a second of CPU, which a burst of instances should not pay
    (measured: acknowledged 15 % lower on 2 cores when they started during the burst)."""
    sender: Sender
    if isinstance(config, DicomDestinationConfig):
        gate = gate_of(spool.queues[config.name], config.max_associations)
        sender = ProcessSender(config, calling_ae_title, gate=gate, first=index == 0)
    else:
        sender = make_sender(config, calling_ae_title, fsync=fsync)
    return ForwardWorker(
        config.name,
        spool,
        sender,
        audit,
        index=index,
        retry_max_age_s=getattr(config, "retry_max_age_s", None),
        retry_max_delay_s=getattr(config, "retry_max_delay_s", 30.0),
    )


def make_sender(
    config: DicomDestinationConfig | FolderDestinationConfig,
    calling_ae_title: str,
    *,
    fsync: bool = True,
) -> Sender:
    """The sender for a destination's configuration: C-STORE from a child process, or a folder
    written in this one."""
    if isinstance(config, FolderDestinationConfig):
        return FolderSender(config, fsync=fsync)
    return ProcessSender(config, calling_ae_title)

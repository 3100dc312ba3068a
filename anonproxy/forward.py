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
has died, and ends when its pipe is closed (the service stopped or died).

Outcomes, as PS3.4 means them: Success and Warning are delivered; Out of Resources (0xA7xx),
rejected or aborted associations, network errors, time-outs and a failed sender process are
transient and retried with exponential back-off and jitter; any other failure status is permanent
and the instance goes to quarantine with the reason. Every outcome is an audit event.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, Literal, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from anonproxy import codecs, reactor
from anonproxy.audit import AuditLog, configure_logging, get_logger
from anonproxy.config import DicomDestinationConfig, FolderDestinationConfig
from anonproxy.durable import make_directories, sync_data, sync_directory
from anonproxy.errors import ForwardError
from anonproxy.spool import DestinationQueue, QueueItem, Spool, check_uid_name
from anonproxy.tls import client_context

log = get_logger(__name__)

_config.STORE_SEND_CHUNKED_DATASET = True  # stream spool files; never load pixel data twice

_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_RETRY_BASE_S = 0.5
_STATUS_CATEGORY_DELIVERED = {"Success", "Warning"}
_REPLY_MARGIN_S = 30.0  # start-up of the sender process, transfer syntax conversion
_MIN_THROUGHPUT_BYTES_S = 1_000_000  # the reply time-out grows by 1 s per MB of the instance
_CLOSE_WAIT_S = 5.0  # for the sender process to release its association and exit
# PDU length sent to a peer that takes any (Maximum Length 0): pynetdicom would send, and read,
# a whole instance as one PDU.
UNLIMITED_PEER_PDU = 1 << 20
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


class DicomSender:
    """C-STORE to a research PACS over a reused association (in the sender process of a
    :class:`ProcessSender`)."""

    def __init__(self, config: DicomDestinationConfig, calling_ae_title: str) -> None:
        reactor.install()
        self.config = config
        self.ae = AE(ae_title=config.calling_ae_title or calling_ae_title)
        self.ae.acse_timeout = config.acse_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.ae.network_timeout = config.network_timeout
        self._tls_args: tuple[ssl.SSLContext, str] | None = None
        if config.tls is not None:  # DICOM TLS; a certificate that cannot be read: ConfigError
            key = f"destinations.{config.name}.tls"
            self._tls_args = (client_context(config.tls, key), config.host)
        self._assoc: Any = None
        self._last_used = 0.0
        self._wanted: dict[tuple[str, str], None] = {}

    def _contexts(self) -> list[Any]:
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

    def _associate(self) -> None:
        self.close()
        assoc = self.ae.associate(
            self.config.host,
            self.config.port,
            contexts=self._contexts(),
            ae_title=self.config.ae_title,
            max_pdu=0,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            tls_args=self._tls_args,
        )
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "failed or aborted"
            if self._tls_args is not None and not assoc.is_rejected:
                reason += " (TLS)"
            raise ForwardError(f"association {reason}")
        for item in assoc.acceptor.user_information:
            if isinstance(item, MaximumLengthNotification) and not item.maximum_length_received:
                item.maximum_length_received = UNLIMITED_PEER_PDU
        self._assoc = assoc

    def send(self, path: Path) -> int:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        syntax = str(meta.TransferSyntaxUID)
        if (
            self._assoc is not None
            and time.monotonic() - self._last_used > self.config.idle_timeout
        ):
            self.close()
        if (sop_class, syntax) not in self._wanted:
            self._wanted[(sop_class, syntax)] = None
            if len(self._wanted) > _MAX_CONTEXTS // 2:
                self._wanted.pop(next(iter(self._wanted)))
            self.close()  # negotiate again, now with a context for this pair
        if self._assoc is None:
            self._associate()
        accepted = self._accepted_syntaxes(sop_class)
        if not accepted:
            self.close()
            raise ForwardError("SOP class not supported by the destination", permanent=True)
        dataset: Path | Dataset = path
        if syntax not in accepted:
            dataset = self._convert(path, syntax, accepted)
        try:
            status = self._assoc.send_c_store(dataset)
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

    def close(self) -> None:
        if self._assoc is not None:
            with contextlib.suppress(Exception):
                if self._assoc.is_established:
                    self._assoc.release()
            self._assoc = None

    def idle_check(self) -> None:
        """Close the association once it has been idle for the configured time."""
        if self._assoc is not None and (
            time.monotonic() - self._last_used > self.config.idle_timeout
        ):
            self.close()


# --- the sender process ----------------------------------------------------------------------
# Requests, parent to child: ("send", spool path), ("idle", ""), ("close", ""). "send" is
# answered with one reply; "idle" and "close" are not answered.

_Request = tuple[Literal["send", "idle", "close"], str]


@dataclass(frozen=True)
class _Stored:
    """Reply: the destination took the instance with this C-STORE status (Success, Warning)."""

    status: int


@dataclass(frozen=True)
class _Refused:
    """Reply: the fields of the :class:`ForwardError` raised in the sender process."""

    message: str
    permanent: bool
    status: int | None


@dataclass(frozen=True)
class _Missing:
    """Reply: the spool file is gone (an operator removed it)."""


_Reply = _Stored | _Refused | _Missing


def _send_one(sender: DicomSender, path: str) -> _Reply:
    try:
        return _Stored(sender.send(Path(path)))
    except ForwardError as exc:
        return _Refused(str(exc), exc.permanent, exc.status)
    except FileNotFoundError:
        return _Missing()
    except Exception as exc:  # logged here, reported to the parent; the process carries on
        log.exception("forward.unexpected_error", destination=sender.config.name)
        return _Refused(f"unexpected {type(exc).__name__}", permanent=False, status=None)


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
        while True:
            request: _Request = conn.recv()
            operation, path = request
            if operation == "close":
                break
            if operation == "idle":
                sender.idle_check()
                continue
            conn.send(_send_one(sender, path))
    except (EOFError, OSError):
        pass  # the parent is gone
    finally:
        sender.close()
        conn.close()


def _log_level_name() -> str:
    """The level of the service's operational log (the root logger's), for the child."""
    name = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return name if name in _LEVEL_NAMES else "INFO"


class ProcessSender:
    """C-STORE to a research PACS from a child process that runs a :class:`DicomSender`.

    The child is started (with ``spawn``: the service runs threads) by :meth:`prepare` or on the
    first :meth:`send`, and reused for every later one, so its association stays open as a
    :class:`DicomSender`'s does. A child that dies during a send, or does not answer within
    :attr:`reply_timeout` seconds (plus one second per megabyte of the instance), is killed:
    that send fails as transient and the next one starts a new child. A child found ended
    before a send is replaced for that send. Used by one thread.
    """

    def __init__(
        self,
        config: DicomDestinationConfig,
        calling_ae_title: str,
        *,
        log_level: str | None = None,
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
        self._process: SpawnProcess | None = None
        self._conn: Connection | None = None
        self._last_reply = 0.0
        self._maybe_associated = False  # the child may hold an association: idle check due

    @property
    def pid(self) -> int | None:
        """The process ID of the running child, if any."""
        return None if self._process is None else self._process.pid

    def _start(self) -> Connection:
        context = multiprocessing.get_context("spawn")
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
        log.info("forward.sender_started", destination=self.config.name, pid=process.pid)
        return conn

    def prepare(self) -> None:
        """Start the child now, so that the first instance does not wait for it (an
        interpreter starting: about half a second)."""
        if self._conn is None:
            self._start()

    def _stop(self, *, graceful: bool) -> int | None:
        """End the child: ask it to close and wait for it (*graceful*), else kill it. Returns
        its exit code (negative: the signal that ended it)."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        self._maybe_associated = False
        if conn is not None and graceful:
            request: _Request = ("close", "")
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
        timeout = self.reply_timeout + path.stat().st_size / _MIN_THROUGHPUT_BYTES_S
        if self._process is not None and not self._process.is_alive():
            # ended while idle (killed, out of memory): nothing of this instance was sent
            exitcode = self._stop(graceful=False)
            log.warning("forward.sender_ended", destination=self.config.name, exitcode=exitcode)
        conn = self._conn or self._start()
        request: _Request = ("send", str(path))
        try:
            conn.send(request)
            answered = conn.poll(timeout)
            reply: _Reply | None = conn.recv() if answered else None
        except (EOFError, OSError):
            raise self._failed("sender process failed") from None
        if reply is None:
            raise self._failed(f"sender process did not answer within {timeout:.0f} s")
        self._last_reply = time.monotonic()
        self._maybe_associated = True
        if isinstance(reply, _Stored):
            return reply.status
        if isinstance(reply, _Missing):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        raise ForwardError(reply.message, permanent=reply.permanent, status=reply.status)

    def idle_check(self) -> None:
        """Have the child release its association once it has been idle for the configured
        time (as :meth:`DicomSender.idle_check`)."""
        if self._conn is None or not self._maybe_associated:
            return
        if time.monotonic() - self._last_reply <= self.config.idle_timeout:
            return
        self._maybe_associated = False
        request: _Request = ("idle", "")
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
        """Finish the current instance, then stop."""
        self._stop_event.set()

    def run(self) -> None:
        try:
            self.sender.prepare()
            while not self._stop_event.is_set():
                item = self.queue.take(timeout=0.5)
                if item is None:
                    self.sender.idle_check()
                    continue
                self._forward(item)
        finally:
            self.sender.close()

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

    def _forward(self, item: QueueItem) -> None:
        path = self.queue.path(item)
        started = time.monotonic()
        try:
            status = self.sender.send(path)
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
    """A worker (with its own sender) for one destination."""
    return ForwardWorker(
        config.name,
        spool,
        make_sender(config, calling_ae_title, fsync=fsync),
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

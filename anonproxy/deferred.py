"""Instances acknowledged on receipt and de-identified behind (``listen.acknowledge:
after_receipt``, or any instance :meth:`~anonproxy.pipeline.InstancePipeline.should_defer`
picks).

:meth:`DeferredProcessor.accept` runs on the association's thread: it keeps the received data
set durably in ``spool/deferred`` (:meth:`~anonproxy.spool.Spool.defer`: one flush of the file
it was received into, see :mod:`anonproxy.received`) and answers Success, or
Out of Resources (0xA700) when the deferred data sets reach ``storage.incoming_max_bytes``.
That is all the sender waits for: the ``instance.received`` audit record is written by a
thread of its own meanwhile (:class:`_AuditBehind`; an instance acknowledged just before a
SIGKILL, whose record was not written yet, is audited ``instance.recovered`` at the next
start), and nothing reads the data set on that path (its SOP Class comes from the request).

Background threads then run the pipeline's steps on it (the engine in the worker processes,
then :meth:`~anonproxy.pipeline.InstancePipeline.store`), in arrival order per association: one
*lane* per association, with up to *window* instances in the engine at once (while senders
are sending, only on idle cores), up to _AHEAD of a lane de-identified ahead of their commit,
and commits in arrival order. A refused instance
(the engine, the policy, no route, a sealed data set that fails authentication) is moved to
the quarantine of refused inputs and audited ``instance.failed``; a full spool, or a full
disk, is retried after a back-off, the lane waiting (its order kept).

The name of a deferred data set carries what processing it needs after a restart, and no
value of the data set: ``<run>-<sequence>-<lane>-<calling AE title in hex>``, where *run* is
the start time of the service (hexadecimal nanoseconds) and *sequence* counts the data sets
it received, so that names sort in arrival order. :meth:`DeferredProcessor.recover` queues
what a previous run left, by lane, in that order; the spool's commit makes processing one
again after a crash deliver it once (see :mod:`anonproxy.spool`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from anonproxy.audit import get_logger
from anonproxy.errors import SpoolFullError
from anonproxy.forward import retry_delay
from anonproxy.pipeline import InstancePipeline, StoreOutcome
from anonproxy.received import ReceivedFile
from anonproxy.sealed import SealError, is_sealed, plain_prefix
from anonproxy.status import StoreStatus
from anonproxy.workers import Deidentified, Refusal

log = get_logger(__name__)

_NAME = re.compile(
    r"^(?P<lane>[0-9a-f]{16}-)[0-9a-f]{10}-(?P<assoc>[0-9a-f]{1,16})-(?P<ae>[0-9a-f]*)$"
)
_RETRY_MAX_DELAY_S = 5.0  # a full spool drains in seconds once its destination is back
_NICE = 10  # the threads that process deferred data sets yield to those that receive
# While senders are sending (a data set accepted less than _RECEIVING_S ago), nothing is
# committed, for at most _MAX_HOLD_S after the oldest data set of a lane arrived and while the
# deferred data sets fill less than half of storage.incoming_max_bytes: the commits (Python in
# this process, where the association threads need the interpreter) and the forwarding they
# start (as many processes as a second sender) wait for the end of a burst (a study). The
# engine runs ahead meanwhile (up to _AHEAD data sets of a lane staged in the spool), but an
# engine run starts during a burst only on a core the machine leaves idle (at least _IDLE_CORE
# of one, measured over _IDLE_WINDOW_S, less the runs started since): it costs the receiving
# process interpreter time too (a worker's input and output pass through it), and a 2-core
# machine whose cores receive has none to spare. A sender that never pauses gets its data
# sets de-identified and committed _MAX_HOLD_S behind. Measured (MR 256x256, one local
# storescu, 2 cores, a busy machine, medians of 4 interleaved runs): acknowledged 86/s with
# the engine running ahead on both workers, 119/s with no engine run while receiving;
# delivered the same (38/s).
_RECEIVING_S = 0.1
_MAX_HOLD_S = 5.0
_AHEAD = 256
_IDLE_CORE = 0.75
_IDLE_WINDOW_S = 0.2
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class DeferredInstance:
    """A received data set in ``spool/deferred``, waiting for de-identification."""

    path: Path
    lane: str  # the run and the association it arrived on
    calling_ae_title: str
    sop_class_uid: str | None = None  # from the C-STORE request; None: from the file meta
    arrived: float = 0.0  # time.monotonic() when accepted; 0: left by a previous run

    @classmethod
    def from_path(cls, path: Path) -> DeferredInstance:
        """The deferred data set at *path*, its lane and calling AE title from its name (a
        file put there by hand is processed alone, from no calling AE title)."""
        match = _NAME.match(path.stem)
        if match is None:
            return cls(path, "other", "")
        ae_title = bytes.fromhex(match["ae"]).decode("ascii", "replace") if match["ae"] else ""
        return cls(path, match["lane"] + match["assoc"], ae_title)

    def fields(self) -> dict[str, object]:
        """Audit fields naming it: the SOP Class and its random name (never a UID)."""
        return {"sop_class_uid": self.sop_class_uid or _sop_class_uid(self.path),
                "deferred_as": self.path.stem}  # fmt: skip


def _sop_class_uid(path: Path, key: bytes | None = None) -> str:
    """The Media Storage SOP Class UID that pynetdicom wrote (the C-STORE request's
    Affected SOP Class UID), or an empty string; a sealed file's from its first chunk."""
    from pydicom.filereader import read_file_meta_info  # noqa: PLC0415 - recovery only

    try:
        if key is not None and is_sealed(path):
            meta = read_file_meta_info(io.BytesIO(plain_prefix(path, key)))  # type: ignore[arg-type]
        else:
            meta = read_file_meta_info(path)
        return str(meta.get("MediaStorageSOPClassUID", ""))
    except (Exception, SealError):  # noqa: BLE001 - not readable: the engine refuses it
        return ""


class _AuditBehind:
    """Writes the ``instance.received`` records off the association's thread (formatting and
    writing a record costs it a few hundred microseconds), in the order given."""

    def __init__(self, write: Callable[..., None]) -> None:
        self._write = write
        self._records: queue.Queue[tuple[str, dict[str, object]]] = queue.Queue()
        threading.Thread(target=self._run, name="audit-behind", daemon=True).start()

    def put(self, name: str, fields: dict[str, object]) -> None:
        self._records.put((name, fields))

    def _run(self) -> None:
        while True:
            name, fields = self._records.get()
            try:
                self._write(name, **fields)
            except Exception:  # the audit log reports its own failures
                log.exception("audit.write_failed")
            finally:
                self._records.task_done()

    def drain(self) -> None:
        """Return once every record put so far is written."""
        self._records.join()


@dataclass(frozen=True)
class _Prepared:
    """One deferred data set through the engine: where its de-identified copy is."""

    staged: Path
    done: Deidentified | Refusal
    started: float


class DeferredProcessor:
    """Acknowledges on receipt and de-identifies behind. Thread-safe."""

    def __init__(
        self, pipeline: InstancePipeline, *, window: int = 1, run: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.spool = pipeline.spool
        self.audit = pipeline.audit
        self.window = max(1, window)
        # an acceptor process is given its run (unique among the processes, see
        # anonproxy.acceptors); its name is what recovers its data sets when it dies
        self._run = run or f"{time.time_ns():016x}"
        self._sequence = itertools.count()
        self._lanes: dict[str, deque[DeferredInstance]] = {}
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # notified when a lane grows, and on stop
        self._stopping = threading.Event()
        self._last_accept = 0.0
        self._idle = IdleCores()
        self._started = threading.Lock()  # engine runs start one at a time (see _take_idle_core)
        self._starts: deque[float] = deque(maxlen=64)  # when the last engine runs started
        self._engine = ThreadPoolExecutor(
            self.window, thread_name_prefix="deferred-engine", initializer=_lower_priority
        )
        self._audit_behind = _AuditBehind(self.audit.event)
        # deferred data set -> when it was received (time.time()), in arrival order: the age
        # of the oldest for the metrics, without listing the folder
        self._waiting: dict[Path, float] = {}

    def accept(
        self,
        received: ReceivedFile | Path,
        *,
        sop_class_uid: str,
        calling_ae_title: str,
        assoc_id: int,
    ) -> StoreOutcome:
        """Keep the received data set durably and answer for it: Success, or Out of Resources
        when the incoming spool cannot take it (the sender retries)."""
        ae_hex = calling_ae_title.encode("ascii", "replace").hex()
        lane = f"{self._run}-{assoc_id:x}"
        name = f"{self._run}-{next(self._sequence):010x}-{assoc_id:x}-{ae_hex}"
        fields: dict[str, object] = {
            "sop_class_uid": sop_class_uid,
            "assoc_id": assoc_id,
            "deferred_as": name,
        }
        try:
            path = self.spool.defer(received, name)
        except SpoolFullError as exc:
            return self.pipeline.refuse(StoreStatus.OUT_OF_RESOURCES, "incoming", str(exc), fields)
        # written by a thread of its own while this one answers and receives the next
        self._audit_behind.put("instance.received", {"acknowledged": "on receipt", **fields})
        self._last_accept = arrived = time.monotonic()
        self._queue(DeferredInstance(path, lane, calling_ae_title, sop_class_uid, arrived))
        return StoreOutcome(StoreStatus.SUCCESS)

    def recover(self, run: str | None = None) -> int:
        """Queue the deferred data sets a previous run left (in arrival order per lane), or
        only those of *run* (an acceptor process that ended); returns how many."""
        key = self.pipeline.runner.incoming_key
        paths = self.spool.deferred()
        if run is not None:
            paths = [path for path in paths if path.name.startswith(run + "-")]
        found = [DeferredInstance.from_path(path) for path in paths]
        for instance in found:
            instance = dataclasses.replace(  # noqa: PLW2901
                instance, sop_class_uid=_sop_class_uid(instance.path, key)
            )
            self.audit.event("instance.recovered", **instance.fields())
            self._queue(instance)
        return len(found)

    def oldest_age_s(self) -> float:
        """Age of the oldest deferred data set waiting (0 when none)."""
        with self._lock:
            first = next(iter(self._waiting.values()), None)
        return 0.0 if first is None else max(0.0, time.time() - first)

    def backlog(self) -> int:
        """Deferred data sets queued and not yet taken into the engine."""
        with self._lock:
            return sum(len(lane) for lane in self._lanes.values())

    def stop(self, timeout: float) -> None:
        """Finish the instances in the engine, leave the rest for the next start."""
        self._stopping.set()
        with self._lock:
            self._queued.notify_all()
        self._audit_behind.drain()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._engine.shutdown(wait=False, cancel_futures=True)

    # -- lanes --------------------------------------------------------------------------------

    def _queue(self, instance: DeferredInstance) -> None:
        with self._lock:
            if instance.path not in self._waiting:
                received = time.time()
                if not instance.arrived:  # left by a previous run
                    with contextlib.suppress(OSError):
                        received = instance.path.stat().st_mtime
                self._waiting[instance.path] = received
            lane = self._lanes.get(instance.lane)
            if lane is not None:
                lane.append(instance)
                self._queued.notify_all()
                return
            self._lanes[instance.lane] = deque([instance])
            thread = threading.Thread(
                target=self._drain, args=(instance.lane,), name="deferred-lane", daemon=True
            )
            self._threads.add(thread)
        thread.start()

    def _drain(self, key: str) -> None:
        """Process the lane *key* until it is empty: up to _AHEAD instances submitted to the
        engine (which runs *window* at once), committed in arrival order; no commit while
        senders are sending (see :meth:`_hold`)."""
        window: deque[tuple[DeferredInstance, Future[_Prepared]]] = deque()
        failures = 0
        _lower_priority()
        while True:
            stopping = self._stopping.is_set()
            with self._lock:
                lane = self._lanes[key]
                while len(window) < _AHEAD and lane and not stopping:
                    instance = lane.popleft()
                    window.append((instance, self._engine.submit(self._prepare, instance)))
                if stopping:  # what the engine has not started waits for the next start
                    window = deque(item for item in window if not item[1].cancel())
                if not window:
                    del self._lanes[key]  # empty, or stopping: the rest waits for the next start
                    self._threads.discard(threading.current_thread())
                    return
                hold = 0.0 if stopping else self._hold(window[0][0])
                if hold > 0:  # woken early to take what arrives into the engine
                    self._queued.wait(hold)
                    continue
            instance, future = window.popleft()
            retry = self._finish(instance, future)
            if retry is None:
                with self._lock:
                    self._waiting.pop(instance.path, None)
                failures = 0
                continue
            # Order is kept: this one and those behind it go back to the head of the lane.
            later = [instance, *(self._abandon(i, f) for i, f in window)]
            window.clear()
            with self._lock:
                self._lanes[key].extendleft(reversed(later))
            failures += 1
            delay = retry_delay(failures, _RETRY_MAX_DELAY_S)
            self.audit.event(
                "instance.deidentify_retry",
                reason=retry,
                retry_in_s=round(delay, 3),
                deferred_as=instance.path.stem,
            )
            self._stopping.wait(delay)

    def _hold(self, oldest: DeferredInstance) -> float:
        """Seconds to wait before committing *oldest*, the oldest instance of a lane: while
        a data set was accepted less than _RECEIVING_S ago, until *oldest* is _MAX_HOLD_S old
        or the deferred data sets fill half of ``incoming_max_bytes``."""
        now = time.monotonic()
        receiving = self._last_accept + _RECEIVING_S - now
        bound = self.spool.incoming_max_bytes
        if receiving <= 0 or (bound is not None and 2 * self.spool.deferred_bytes >= bound):
            return 0.0
        overdue = oldest.arrived + _MAX_HOLD_S - now
        return min(receiving, overdue) if overdue > 0 else 0.0

    def _abandon(self, instance: DeferredInstance, future: Future[_Prepared]) -> DeferredInstance:
        """Drop the engine's output for an instance that will be processed again."""
        if not future.cancel() and future.exception() is None:
            self.spool.unstage(future.result().staged)
        return instance

    def _prepare(self, instance: DeferredInstance) -> _Prepared:
        """In an engine thread: de-identify into a new staging path (in a worker process)."""
        self._take_idle_core(instance)
        started = time.monotonic()
        staged = self.spool.stage()  # SpoolFullError: the spool is full, retried
        try:
            done = self.pipeline.runner.run(instance.path, staged, offload=True)
        except BaseException:
            self.spool.unstage(staged)
            raise
        return _Prepared(staged, done, started)

    def _take_idle_core(self, instance: DeferredInstance) -> None:
        """While *instance* would be held (:meth:`_hold`), start its engine run only on a core
        left idle: the idle cores measured, less the runs started since (which the measurement
        does not show)."""
        with self._started:
            while not self._stopping.is_set():
                hold = self._hold(instance)
                if hold <= 0:
                    break
                idle, measured_at = self._idle.measure()
                if idle - sum(1 for t in self._starts if t > measured_at) >= _IDLE_CORE:
                    break
                self._stopping.wait(min(hold, _IDLE_WINDOW_S / 2))
            self._starts.append(time.monotonic())

    def _finish(self, instance: DeferredInstance, future: Future[_Prepared]) -> str | None:
        """Commit or quarantine one instance; the reason to retry it later, or None."""
        fields = instance.fields()
        try:
            prepared = future.result()
        except SpoolFullError as exc:
            return str(exc)
        except Exception as exc:  # a bug fails closed: quarantined
            log.exception("deferred.unexpected_error")
            return self._refused(instance, _failed(exc), fields)
        try:
            done = prepared.done
            if isinstance(done, Deidentified):
                self.spool.check_space()  # de-identified ahead: the quota is checked again
                route = (instance.calling_ae_title, str(fields["sop_class_uid"]))
                stored = self.pipeline.store(
                    done, prepared.staged, route, prepared.started, fields, consume=instance.path
                )
                if isinstance(stored, StoreOutcome):
                    return None
                done = stored
            return self._refused(instance, done, fields)
        except SpoolFullError as exc:
            return str(exc)
        except Exception as exc:  # a bug: logged, retried after a back-off
            log.exception("deferred.unexpected_error")
            return f"unexpected {type(exc).__name__}"
        finally:
            self.spool.unstage(prepared.staged)

    def _refused(
        self, instance: DeferredInstance, refusal: Refusal, fields: dict[str, object]
    ) -> str | None:
        """Quarantine a refused instance; the reason to retry it later instead, or None."""
        if refusal.status == StoreStatus.OUT_OF_RESOURCES:  # a full disk: retried
            return refusal.reason
        try:
            self.pipeline.quarantine(instance.path, refusal, fields)
        except OSError as exc:  # cannot be kept in quarantine: it stays, retried
            return f"cannot quarantine: {exc.strerror or type(exc).__name__}"
        return None


class IdleCores:
    """How many cores the machine left idle lately: the idle and I/O-wait time of all its CPUs
    (Linux ``/proc/stat``) over the last _IDLE_WINDOW_S or more, in cores. Where that cannot be
    read, every core counts as idle. Thread-safe."""

    def __init__(self, stat: Path = Path("/proc/stat")) -> None:
        self._stat = stat
        self._lock = threading.Lock()
        self._last = self._read()
        self._idle = (float(os.cpu_count() or 1), 0.0)

    def _read(self) -> tuple[float, float] | None:
        try:
            with self._stat.open("rb") as handle:
                fields = handle.readline().split()  # cpu user nice system idle iowait ...
            return time.monotonic(), (int(fields[4]) + int(fields[5])) / _CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            return None

    def measure(self) -> tuple[float, float]:
        """The idle cores, and when (time.monotonic()) the window they were measured over
        ended: a window of at least _IDLE_WINDOW_S, the latest that ended."""
        with self._lock:
            if self._last is None:
                return self._idle
            now = self._read()
            if now is None:
                return self._idle
            elapsed = now[0] - self._last[0]
            if elapsed >= _IDLE_WINDOW_S:
                self._idle = ((now[1] - self._last[1]) / elapsed, now[0])
                self._last = now
            return self._idle


def _lower_priority() -> None:
    """Run the calling thread (Linux: a thread has its own nice value) below the association
    threads: they answer senders, this works behind."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)


def _failed(exc: Exception) -> Refusal:
    return Refusal(StoreStatus.PROCESSING_FAILURE, "deidentify", f"failed ({type(exc).__name__})")

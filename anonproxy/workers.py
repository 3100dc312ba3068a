"""De-identification off the network threads: decode, de-identify and encode one instance.

:func:`deidentify_file` runs the engine's file path (:mod:`anonproxy.deid.instance`: structure
limits, the profile's burned-in annotation policy, de-identification) on a received DICOM file
(preamble, file meta, data set), writes the de-identified file and returns either a
:class:`Deidentified` (the result, the Modality for routing, and the size written) or a
:class:`Refusal` (a status, the stage and a reason without values). Only the header is decoded
and encoded: the pixel data is copied from file to file unchanged (see
:mod:`anonproxy.deid.files`), so a large instance never sits in memory.

:class:`DeidentifierPool` runs it in worker processes, so that de-identification of several
associations uses every core and the network threads of the service keep the interpreter for
themselves; only the two paths cross the process boundary. An instance that arrives while no
other is being processed is de-identified in the calling thread (a lone association gains
nothing from a round trip to a worker). With ``workers=0`` everything runs in the calling
thread.

A received data set sealed with ``storage.incoming_key_file`` (:mod:`anonproxy.sealed`) is
decrypted where it is de-identified, into an anonymous memory file, every chunk authenticated
first; one that fails authentication is refused (stage ``incoming``) and never decoded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from anonproxy.audit import get_logger
from anonproxy.deid import Deidentifier, DeidResult, instance
from anonproxy.deid.instance import DEFAULT_LIMITS, Limits
from anonproxy.errors import (
    AnonproxyError,
    DecodeError,
    DeidentificationError,
    EncodeError,
    InputUnreadable,
    LimitExceeded,
    PolicyRefusal,
    StructureError,
    TransientError,
)
from anonproxy.processes import child_context, wait_for_exit
from anonproxy.pydicom_settings import silence_value_reports
from anonproxy.sealed import SealError, opened
from anonproxy.status import StoreStatus

log = get_logger(__name__)


@dataclass(frozen=True)
class Deidentified:
    """A de-identified instance, written as a DICOM file."""

    result: DeidResult
    modality: str
    size: int
    pixels: str | None = None  # see anonproxy.deid.instance.DeidentifiedFile


@dataclass(frozen=True)
class Refusal:
    """Why an instance is not accepted (never carries a value of the data set)."""

    status: StoreStatus
    stage: str
    reason: str


#: The errors of the engine's file path as refusals: status and stage, the first that matches
#: (InputUnreadable is an OSError, LimitExceeded and StructureError are DecodeErrors,
#: PolicyRefusal is a DeidentificationError).
_REFUSALS: tuple[tuple[type[Exception], StoreStatus, str], ...] = (
    (TransientError, StoreStatus.OUT_OF_RESOURCES, "state"),  # the state store: retry later
    (InputUnreadable, StoreStatus.CANNOT_UNDERSTAND, "decode"),
    (LimitExceeded, StoreStatus.CANNOT_UNDERSTAND, "limits"),
    (StructureError, StoreStatus.CANNOT_UNDERSTAND, "limits"),
    (DecodeError, StoreStatus.CANNOT_UNDERSTAND, "decode"),
    (PolicyRefusal, StoreStatus.DEIDENTIFICATION_FAILED, "policy"),
    (DeidentificationError, StoreStatus.DEIDENTIFICATION_FAILED, "deidentify"),
    (EncodeError, StoreStatus.PROCESSING_FAILURE, "encode"),
    (OSError, StoreStatus.OUT_OF_RESOURCES, "spool"),  # a full disk: the sender retries later
)


def deidentify_file(
    engine: Deidentifier,
    source: Path,
    target: Path,
    limits: Limits = DEFAULT_LIMITS,
    key: bytes | None = None,
) -> Deidentified | Refusal:
    """De-identify the received DICOM file *source* (sealed with *key*, or plain) into
    *target* (created or truncated; not synced) by the engine's one file path
    (:func:`anonproxy.deid.instance.deidentify_file`: structure *limits* and the profile's
    policy checked before de-identification); an error becomes a refusal: a status, the stage
    and the error's message."""
    try:
        with opened(source, key) as plain:
            done = instance.deidentify_file(engine, plain, target, limits=limits, in_place=True)
    except SealError as exc:
        return Refusal(StoreStatus.CANNOT_UNDERSTAND, "incoming", str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is a refusal, never an acknowledgement
        return _refusal(exc)
    return Deidentified(done.result, done.modality, done.size, done.pixels)


def _refusal(exc: Exception) -> Refusal:
    """The refusal for an error of :func:`anonproxy.deid.instance.deidentify_file`."""
    found = next(((s, g) for kind, s, g in _REFUSALS if isinstance(exc, kind)), None)
    if found is None:  # not an error of the engine: a bug, failed closed
        return Refusal(
            StoreStatus.PROCESSING_FAILURE, "deidentify", f"failed ({type(exc).__name__})"
        )
    status, stage = found
    if isinstance(exc, InputUnreadable):
        reason = f"cannot read the received data set: {exc.strerror or type(exc).__name__}"
    elif isinstance(exc, OSError) and not isinstance(exc, AnonproxyError):
        reason = f"spool write failed: {exc.strerror or type(exc).__name__}"
    else:
        reason = str(exc)
    return Refusal(status, stage, reason)


_worker_engine: Deidentifier | None = None
_worker_limits = DEFAULT_LIMITS
_worker_key: bytes | None = None


def _exit_with_parent(parent: int) -> None:
    """A worker whose service was killed (SIGKILL: no shutdown) exits instead of lingering."""
    wait_for_exit(parent)
    os._exit(0)


def _start_worker(
    factory: Callable[[], Deidentifier],
    limits: Limits,
    parent: int,
    nice: int,
    key: bytes | None = None,
) -> None:
    global _worker_engine, _worker_limits, _worker_key  # noqa: PLW0603 - one per worker process
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if nice:
        os.nice(nice)
    silence_value_reports()
    _worker_engine = factory()
    _worker_limits = limits
    _worker_key = key


def _run_in_worker(source: str, target: str) -> Deidentified | Refusal:
    assert _worker_engine is not None  # noqa: S101 - set by the pool initializer
    return deidentify_file(_worker_engine, Path(source), Path(target), _worker_limits, _worker_key)


def _ready() -> bool:
    return _worker_engine is not None


class DeidentifierPool:
    """Runs :func:`deidentify_file` in worker processes (or inline). Thread-safe.

    *engine* serves the calling threads; each worker process builds its own by calling
    *factory* (picklable: it crosses the process boundary, e.g. a :func:`functools.partial`
    of a module-level function), which must build the same engine. *limits* bound every
    instance (the SCP has checked the size of a received data set already). The worker
    processes run *nice* levels below the service (work that nobody waits for: receiving
    keeps the cores it needs). *incoming_key* opens received data sets sealed with
    ``storage.incoming_key_file`` (it crosses to the worker processes through their pipe).
    """

    def __init__(
        self,
        engine: Deidentifier,
        factory: Callable[[], Deidentifier],
        *,
        workers: int,
        limits: Limits = DEFAULT_LIMITS,
        nice: int = 0,
        incoming_key: bytes | None = None,
    ) -> None:
        self.engine = engine
        self.incoming_key = incoming_key
        self.nice = nice
        self._factory = factory
        self.workers = workers
        self.limits = limits
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy = 0  # instances being de-identified now
        self._starting = False
        self._closed = False
        self.offloaded = 0  # instances sent to a worker process (for tests and metrics)

    def _new_pool(self) -> ProcessPoolExecutor:
        # not a fork of this process: it runs threads (pynetdicom, forward workers)
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=child_context(),
            initializer=_start_worker,
            initargs=(self._factory, self.limits, os.getpid(), self.nice, self.incoming_key),
        )

    def start(self) -> None:
        """Start the worker processes now and wait until each has built its engine (else
        :meth:`run` starts them when instances first overlap)."""
        if self.workers > 0:
            pool = self._warm_pool()
            with self._lock:
                self._pool = pool

    def _warm_pool(self) -> ProcessPoolExecutor:
        pool = self._new_pool()
        for future in [pool.submit(_ready) for _ in range(self.workers * 2)]:
            future.result()
        return pool

    def _start_in_background(self) -> None:
        try:
            pool: ProcessPoolExecutor | None = self._warm_pool()
        except Exception:  # no workers: instances stay in the calling thread
            log.warning("deidentify.workers_not_started", exc_info=True)
            pool = None
        with self._lock:
            self._starting = False
            if not self._closed:
                self._pool, pool = pool, None
        if pool is not None:  # shut down meanwhile
            pool.shutdown(wait=False, cancel_futures=True)

    def run(self, source: Path, target: Path, *, offload: bool = False) -> Deidentified | Refusal:
        """De-identify the file *source* into *target*: in the calling thread when no other
        instance is being processed, in a worker process when several are, or always with
        *offload* (a caller that is not the association's thread: the service process keeps
        its interpreter for receiving). The worker processes (an interpreter each, some
        80 MiB) start when instances first overlap or are offloaded; until they are ready,
        every instance is processed in its calling thread."""
        with self._lock:
            pool = self._pool
            self._busy += 1
            wanted = self._busy > 1 or offload  # a lone instance stays here
            if pool is None and wanted and self.workers > 0 and not self._starting:
                self._starting = True
                threading.Thread(
                    target=self._start_in_background, name="deidentify-pool", daemon=True
                ).start()
            worker_pool = pool if wanted else None
            self.offloaded += worker_pool is not None
        try:
            if worker_pool is None:
                return deidentify_file(self.engine, source, target, self.limits, self.incoming_key)
            return worker_pool.submit(_run_in_worker, str(source), str(target)).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # replace it once, for every waiting thread
                    self._pool = self._new_pool()
            return Refusal(
                StoreStatus.PROCESSING_FAILURE, "deidentify", "de-identification worker failed"
            )
        finally:
            with self._lock:
                self._busy -= 1

    def shutdown(self) -> None:
        """Stop the worker processes."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

"""De-identification off the network threads: decode, de-identify and encode one instance.

:func:`deidentify_encoded` takes the bytes of a DICOM file (preamble, file meta, data set) and
returns either a :class:`Deidentified` (the result, the Modality for routing, and the encoded
de-identified file) or a :class:`Refusal` (a status, the stage and a reason without values).

:class:`DeidentifierPool` runs it in worker processes, so that de-identification of several
associations uses every core and the network threads of the service keep the interpreter for
themselves. Instances larger than ``inline_max_bytes`` are processed in the calling thread, to
avoid copying a large data set between processes (memory, not only time), and so is an
instance that arrives while no other is being processed. With ``workers=0`` everything runs in
the calling thread.
"""

from __future__ import annotations

import io
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pydicom import dcmread, dcmwrite

from anonproxy import limits
from anonproxy.audit import silence_value_reports
from anonproxy.deid import Deidentifier, DeidResult
from anonproxy.errors import DecodeError, DeidentificationError
from anonproxy.status import StoreStatus

DEFAULT_INLINE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SEQUENCE_DEPTH = 16


@dataclass(frozen=True)
class Deidentified:
    """A de-identified instance, encoded as a DICOM file."""

    result: DeidResult
    modality: str
    encoded: bytes


@dataclass(frozen=True)
class Refusal:
    """Why an instance is not accepted (never carries a value of the data set)."""

    status: StoreStatus
    stage: str
    reason: str


def deidentify_encoded(
    engine: Deidentifier, data: bytes, max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH
) -> Deidentified | Refusal:
    """Decode the DICOM file *data*, check its structure (:func:`anonproxy.limits.
    check_structure`), de-identify it and encode the result."""
    try:
        dataset = dcmread(io.BytesIO(data))
        limits.check_structure(dataset, max_sequence_depth)
        modality = str(dataset.get("Modality", "") or "")
    except DecodeError as exc:  # LimitExceeded included: the message names no value
        return Refusal(StoreStatus.CANNOT_UNDERSTAND, "limits", str(exc))
    except Exception as exc:  # noqa: BLE001 - any parser failure is a DICOM status
        return Refusal(
            StoreStatus.CANNOT_UNDERSTAND, "decode", f"cannot parse data set ({type(exc).__name__})"
        )
    try:
        result = engine.deidentify(dataset)
    except DeidentificationError as exc:
        return Refusal(StoreStatus.DEIDENTIFICATION_FAILED, "deidentify", str(exc))
    except Exception as exc:  # noqa: BLE001 - values are decoded lazily: a bad one fails here
        return Refusal(
            StoreStatus.CANNOT_UNDERSTAND,
            "deidentify",
            f"cannot decode data set ({type(exc).__name__})",
        )
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, dataset, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - an encoding failure is never acknowledged
        return Refusal(
            StoreStatus.PROCESSING_FAILURE,
            "encode",
            f"cannot encode the de-identified data set ({type(exc).__name__})",
        )
    return Deidentified(result, modality, buffer.getvalue())


_worker_engine: Deidentifier | None = None
_worker_max_depth = DEFAULT_MAX_SEQUENCE_DEPTH


def _start_worker(profile: dict[str, object], secret: bytes, max_sequence_depth: int) -> None:
    global _worker_engine, _worker_max_depth  # noqa: PLW0603 - one engine per worker process
    silence_value_reports()
    _worker_engine = Deidentifier.from_config(profile, secret)
    _worker_max_depth = max_sequence_depth


def _run_in_worker(data: bytes) -> Deidentified | Refusal:
    assert _worker_engine is not None  # noqa: S101 - set by the pool initializer
    return deidentify_encoded(_worker_engine, data, _worker_max_depth)


def _ready() -> bool:
    return _worker_engine is not None


class DeidentifierPool:
    """Runs :func:`deidentify_encoded` in worker processes (or inline). Thread-safe."""

    def __init__(
        self,
        engine: Deidentifier,
        profile: dict[str, object],
        secret: bytes,
        *,
        workers: int,
        inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES,
        max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH,
    ) -> None:
        self.engine = engine
        self._profile = profile
        self._secret = secret
        self.workers = workers
        self.inline_max_bytes = inline_max_bytes
        self.max_sequence_depth = max_sequence_depth
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy = 0  # instances being de-identified now
        self.offloaded = 0  # instances sent to a worker process (for tests and metrics)

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the service process runs threads (pynetdicom, forward workers)
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self._profile, self._secret, self.max_sequence_depth),
        )

    def start(self) -> None:
        """Start the worker processes and wait until each has built its engine."""
        if self.workers <= 0:
            return
        with self._lock:
            self._pool = self._new_pool()
            futures = [self._pool.submit(_ready) for _ in range(self.workers * 2)]
        for future in futures:
            future.result()

    def run(self, data: bytes) -> Deidentified | Refusal:
        """De-identify one encoded instance: in the calling thread when no other instance is
        being processed (a lone association gains nothing from a round trip to a worker),
        in a worker process when several are."""
        with self._lock:
            pool = self._pool
            self._busy += 1
            inline = pool is None or self._busy == 1 or len(data) > self.inline_max_bytes
            self.offloaded += not inline
        try:
            if inline or pool is None:
                return deidentify_encoded(self.engine, data, self.max_sequence_depth)
            return pool.submit(_run_in_worker, data).result()
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
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

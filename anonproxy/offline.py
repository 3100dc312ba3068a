"""``anonproxy deidentify``: files and folders de-identified offline, by the proxy's engine
and file path (:func:`~anonproxy.deid.instance.deidentify_file`: structure limits, the
burned-in annotation policy, de-identification, the self-check), in worker processes; with
one job, in this process (the same worker set-up and per-file function, without a process to
start and the work to send it).

Each file gets an outcome name (``de-identified``, ``skipped (not DICOM)``, ``failed
(...)``), never a value from the file. The command line (:mod:`anonproxy.cli`) counts them.

Nothing here touches the network: this module and what it imports are kept free of
pynetdicom and the service's modules (the import-linter contract "the offline path imports no
network module"), so the command starts without them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

from anonproxy.config import Settings
from anonproxy.deid import Deidentifier, DeidResult
from anonproxy.deid.instance import Limits, Target, deidentify_file
from anonproxy.deidentifiers import build_deidentifier, patient_lookup, prepare_lookup_table
from anonproxy.errors import (
    AnonproxyError,
    DecodeError,
    InputUnreadable,
    LimitExceeded,
    StructureError,
)
from anonproxy.file_names import check_uid_name
from anonproxy.pydicom_settings import silence_value_reports

#: One file's work: the input, the output file or folder, and whether it is a folder
Task = tuple[Path, Path, bool]

UNREADABLE = "failed (unreadable)"
DEIDENTIFIED = "de-identified"
NOT_DICOM = "skipped (not DICOM)"


def inputs(paths: Sequence[Path]) -> Iterator[Path]:
    """The files under *paths*, folders walked recursively; a dangling symbolic link in a
    folder is an input too (it is reported unreadable, not left out silently)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() or (p.is_symlink() and not p.exists())
            )
        else:
            yield path


def tasks(paths: Sequence[Path], output: Path) -> list[Task]:
    """The work for the inputs *paths* and *output*: one input file and an *output* that is
    not a folder is a file to a file; otherwise every file goes into the folder *output*
    (``<study>/<series>/<instance>.dcm``)."""
    to_file = len(paths) == 1 and paths[0].is_file() and not output.is_dir()
    return [(source, output, not to_file) for source in inputs(paths)]


def deidentify(settings: Settings, secret: bytes, work: list[Task], jobs: int) -> Iterator[str]:
    """The outcome of each task, in order, de-identified by *jobs* worker processes (one job:
    in this process) with the engine of *settings* keyed by *secret*. The lookup table is
    prepared first (ConfigError when it cannot be)."""
    prepare_lookup_table(settings, secret)
    if jobs == 1:
        return _outcomes_here(settings, secret, work)
    return _outcomes(settings, secret, work, jobs)


def _outcomes_here(settings: Settings, secret: bytes, work: list[Task]) -> Iterator[str]:
    """The outcomes of one job, in this process: a worker process's set-up and per-file work
    (:func:`_init_worker`, :func:`_deidentify_one`) without the process, the pickled settings
    and the results sent back (most of the command's time for a few files)."""
    global _WORKER  # noqa: PLW0603 - the engine of this process while the run lasts
    _init_worker(settings, secret)
    try:
        yield from map(_deidentify_one, work)
    finally:
        _WORKER = None


def _outcomes(settings: Settings, secret: bytes, work: list[Task], jobs: int) -> Iterator[str]:
    """The outcomes of *jobs* worker processes (multiprocessing imported for them only)."""
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415 - not for one job

    with ProcessPoolExecutor(
        max_workers=jobs, initializer=_init_worker, initargs=(settings, secret)
    ) as pool:
        yield from pool.map(_deidentify_one, work, chunksize=8)


#: The engine of a worker process and its limits (listen.max_sequence_depth, and
#: listen.max_instance_bytes for the inflated size of a Deflated data set).
_WORKER: tuple[Deidentifier, Limits] | None = None


def _init_worker(settings: Settings, secret: bytes) -> None:
    silence_value_reports()
    global _WORKER  # noqa: PLW0603 - one engine per worker process
    limits = Limits(
        max_sequence_depth=settings.listen.max_sequence_depth,
        max_inflated_bytes=settings.listen.max_instance_bytes,
    )
    patients = patient_lookup(settings, secret)  # the state store's table, when used
    _WORKER = (build_deidentifier(settings.profile, secret, patients), limits)


def _output_path(out_dir: Path, result: DeidResult) -> Path:
    """``OUT/<study>/<series>/<instance>.dcm`` from the de-identified UIDs."""
    return (
        out_dir
        / check_uid_name(result.study_instance_uid)
        / check_uid_name(result.series_instance_uid)
        / (check_uid_name(result.sop_instance_uid) + ".dcm")
    )


def _deidentify_one(task: Task) -> str:
    """De-identify one file by the engine's file path (as the proxy: structure limits and the
    burned-in annotation policy first) to the output file, or into the output folder when
    *to_folder*; returns an outcome name (never a value from the file)."""
    source, output, to_folder = task
    assert _WORKER is not None  # noqa: S101 - set by the pool initializer
    engine, limits = _WORKER
    if not source.is_file():  # missing, a dangling link, a FIFO or a device: nothing to read
        return UNREADABLE
    target: Target = partial(_output_path, output) if to_folder else output
    try:
        deidentify_file(engine, source, target, limits=limits)
    except Exception as exc:  # noqa: BLE001 - fail closed, report without values
        return outcome(exc)
    return DEIDENTIFIED


def outcome(exc: Exception) -> str:
    """The outcome name of a file that was not de-identified (never a value from the file)."""
    if isinstance(exc, InputUnreadable):
        return UNREADABLE
    if isinstance(exc, DecodeError) and not isinstance(exc, LimitExceeded | StructureError):
        return NOT_DICOM
    if isinstance(exc, AnonproxyError):  # the message names attributes and limits only
        return f"failed ({exc})"
    if isinstance(exc, OSError):
        return f"failed (cannot write: {exc.strerror or type(exc).__name__})"
    return f"failed ({type(exc).__name__})"

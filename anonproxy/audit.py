"""Audit trail and operational logging.

The audit trail is one JSON object per line, one line per event, written with structlog to a
file and/or standard output. Event names are dotted ``noun.past_verb``:

``association.accepted``, ``association.rejected``, ``association.released``,
``association.aborted``, ``association.closed``, ``association.idle_timeout``,
``instance.received``, ``instance.deidentified``, ``instance.spooled``, ``instance.failed``,
``instance.found`` (a queue file no commit of this run announced), ``instance.forwarded``,
``instance.forward_retry``, ``instance.quarantined``,
``instance.transparent_timeout``, ``service.started``, ``service.stopped``.

No field ever carries a value of a received dataset: instances are named by their
de-identified SOP Instance UID and by a keyed hash of the original one.

Operational logs (standard error, or ``log.path``) go through structlog as well, as text or
as one JSON object per line (``log.format``). pynetdicom's own logger is kept at WARNING and
passes through :class:`UidScrubber`, because its messages can quote the original UIDs of a
received instance; structlog's events pass through :func:`scrub_uids`.

Log rotation: the audit file and the log file are :class:`ReopenableFile` objects; on SIGHUP
the service reopens them by name (:meth:`AuditLog.reopen`, :func:`reopen_log_file`), so that
logrotate renames them and signals, without ``copytruncate`` (which loses the lines written
between its copy and its truncation).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import structlog
from pydicom._uid_dict import UID_dictionary

from anonproxy.pydicom_settings import silence_value_reports

_UID_PATTERN = re.compile(r"\b[0-2](?:\.(?:0|[1-9][0-9]*)){3,}\b")


def _replace_uid(match: re.Match[str]) -> str:
    uid = match.group(0)
    return uid if uid in UID_dictionary else "<uid>"


def _scrub(text: str) -> str:
    """*text* with every UID that is not a well-known DICOM UID replaced by ``<uid>``."""
    return _UID_PATTERN.sub(_replace_uid, text)


class UidScrubber(logging.Filter):
    """Replace every UID that is not a well-known DICOM UID in a log record with ``<uid>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _scrub(record.getMessage())
        record.args = None
        return True


def scrub_uids(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: :class:`UidScrubber` for the event and its string values."""
    del logger, method
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = _scrub(value)
    return event_dict


class ReopenableFile:
    """A text file opened for appending that :meth:`reopen` opens again by its name (after
    logrotate renamed it). Thread-safe; only ``write`` and ``flush`` (what structlog's
    WriteLogger and logging's StreamHandler use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle: IO[str] | None = path.open("a", encoding="utf-8")

    def write(self, text: str) -> int:
        with self._lock:
            if self._handle is None:
                return 0
            return self._handle.write(text)

    def flush(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.flush()

    def reopen(self) -> None:
        """Close the file and open *path* again (a new file when it was renamed). When it
        cannot be opened, the old handle is kept and OSError raised."""
        handle = self.path.open("a", encoding="utf-8")
        with self._lock:
            old, self._handle = self._handle, handle
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
            self._handle = None


class _TeeLogger:
    """A structlog logger writing each rendered line to several structlog WriteLoggers."""

    def __init__(self, sinks: list[structlog.WriteLogger]) -> None:
        self._sinks = sinks

    def msg(self, message: str) -> None:
        for sink in self._sinks:
            sink.msg(message)

    info = warning = error = msg


class AuditLog:
    """Writes audit events as JSON lines. Thread-safe; one per process."""

    def __init__(
        self,
        path: Path | None,
        *,
        stdout: bool = False,
        sinks: Sequence[Callable[[str, dict[str, Any]], None]] = (),
    ) -> None:
        # Called with each event after its JSON line is written (e.g. the syslog sender); a
        # sink must be quick and never raise: whatever it raises is logged and swallowed.
        self._event_sinks = list(sinks)
        self._files: list[ReopenableFile] = []
        writers: list[structlog.WriteLogger] = []
        if path is not None:
            handle = ReopenableFile(path)
            self._files.append(handle)
            writers.append(structlog.WriteLogger(handle))  # type: ignore[arg-type]
        if stdout:
            writers.append(structlog.WriteLogger(sys.stdout))
        self._logger = structlog.wrap_logger(
            _TeeLogger(writers),
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
            # Never filtered by the operational log level: every audit event is written.
            wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
            cache_logger_on_first_use=True,
        )
        self._lock = threading.Lock()

    def event(self, name: str, **fields: Any) -> None:  # noqa: ANN401 - JSON-able values
        """Write one audit record named *name*."""
        self._logger.info(name, **fields)
        for sink in self._event_sinks:
            try:
                sink(name, fields)
            except Exception:  # noqa: BLE001 - an audit sink never fails the caller
                logging.getLogger(__name__).warning(
                    "audit sink %s failed on %s", type(sink).__name__, name
                )

    def reopen(self) -> None:
        """Open the audit file again by its name (SIGHUP, after logrotate renamed it)."""
        with self._lock:
            for handle in self._files:
                handle.reopen()

    def close(self) -> None:
        """Flush and close the audit file."""
        with self._lock:
            for handle in self._files:
                handle.close()
            self._files.clear()


def silence_pynetdicom_identifiers() -> None:
    """pynetdicom's DIMSE debug handlers and its request/response logs quote original UIDs:
    keep them off."""
    from pynetdicom import _config  # noqa: PLC0415 - only network processes need pynetdicom

    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


LogFormat = Literal["text", "json"]
_LOG_FILE: list[ReopenableFile] = []  # the log file of configure_logging, if any


class _JsonFormatter(logging.Formatter):
    """A standard-library record (pynetdicom's) as one JSON object, like structlog's."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "event": record.getMessage(),
                "logger": record.name,
                "level": record.levelname.lower(),
                "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            }
        )


def configure_logging(
    level: str = "INFO",
    stream: TextIO | None = None,
    *,
    format: LogFormat = "text",
    path: Path | None = None,
) -> None:
    """Operational logs to standard error (or to the file *path*, reopened by
    :func:`reopen_log_file`), as text or JSON lines; pynetdicom's logger at WARNING, UIDs
    scrubbed from both, no value or identifier reported by pydicom or pynetdicom."""
    silence_value_reports()
    silence_pynetdicom_identifiers()
    for old in _LOG_FILE:
        old.close()
    _LOG_FILE.clear()
    out: Any = sys.stderr if stream is None else stream
    if path is not None:
        out = ReopenableFile(path)
        _LOG_FILE.append(out)
    handler = logging.StreamHandler(out)
    handler.addFilter(UidScrubber())
    if format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    pynetdicom_logger.handlers[:] = []
    pynetdicom_logger.setLevel(logging.WARNING)
    pynetdicom_logger.propagate = True
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if format == "json" else []),
            scrub_uids,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def reopen_log_file() -> None:
    """Open the log file of :func:`configure_logging` again by its name (SIGHUP)."""
    for handle in _LOG_FILE:
        handle.reopen()


def get_logger(name: str) -> Any:  # noqa: ANN401 - structlog's bound logger is dynamically typed
    """The operational logger of a module."""
    return structlog.get_logger(name)

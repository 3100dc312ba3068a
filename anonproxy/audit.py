"""Audit trail and operational logging.

The audit trail is one JSON object per line, one line per event, written with structlog to a
file and/or standard output. Event names are dotted ``noun.past_verb``:

``association.accepted``, ``association.rejected``, ``association.released``,
``association.aborted``, ``association.closed``, ``association.idle_timeout``,
``instance.received``, ``instance.deidentified``, ``instance.spooled``, ``instance.failed``,
``instance.forwarded``, ``instance.forward_retry``, ``instance.quarantined``,
``instance.transparent_timeout``, ``service.started``, ``service.stopped``.

No field ever carries a value of a received dataset: instances are named by their
de-identified SOP Instance UID and by a keyed hash of the original one.

Operational logs (standard error) go through structlog as well. pynetdicom's own logger is kept
at WARNING and passes through :class:`UidScrubber`, because its messages can quote the original
UIDs of a received instance.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

import structlog
from pydicom import config as pydicom_config
from pydicom._uid_dict import UID_dictionary

_UID_PATTERN = re.compile(r"\b[0-2](?:\.(?:0|[1-9][0-9]*)){3,}\b")


class UidScrubber(logging.Filter):
    """Replace every UID that is not a well-known DICOM UID in a log record with ``<uid>``."""

    @staticmethod
    def _replace(match: re.Match[str]) -> str:
        uid = match.group(0)
        return uid if uid in UID_dictionary else "<uid>"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = _UID_PATTERN.sub(self._replace, message)
        record.args = None
        return True


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
        self._files: list[IO[str]] = []
        writers: list[structlog.WriteLogger] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = path.open("a", encoding="utf-8")
            self._files.append(handle)
            writers.append(structlog.WriteLogger(handle))
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

    def close(self) -> None:
        """Flush and close the audit file."""
        with self._lock:
            for handle in self._files:
                handle.close()
            self._files.clear()


def silence_value_reports() -> None:
    """pydicom reports invalid values by quoting them (warnings and its logger): turn value
    validation off and keep its logger quiet, so that no received value reaches a log."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    logger = logging.getLogger("pydicom")
    logger.handlers[:] = [logging.NullHandler()]
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")


def silence_pynetdicom_identifiers() -> None:
    """pynetdicom's DIMSE debug handlers and its request/response logs quote original UIDs:
    keep them off."""
    from pynetdicom import _config  # noqa: PLC0415 - only network processes need pynetdicom

    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Operational logs to standard error; pynetdicom's logger at WARNING, UIDs scrubbed, no
    value or identifier reported by pydicom or pynetdicom."""
    silence_value_reports()
    silence_pynetdicom_identifiers()
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    handler.addFilter(UidScrubber())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    pynetdicom_logger.handlers[:] = []
    pynetdicom_logger.setLevel(logging.WARNING)
    pynetdicom_logger.propagate = True
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:  # noqa: ANN401 - structlog's bound logger is dynamically typed
    """The operational logger of a module."""
    return structlog.get_logger(name)

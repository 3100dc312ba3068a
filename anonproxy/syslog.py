"""Sending DICOM audit messages to an audit record repository over syslog.

Messages are RFC 5424: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML``, with
MSGID ``IHE+RFC-3881`` (the value IHE ATNA uses for DICOM audit messages), no structured data,
and the message a UTF-8 byte order mark followed by the XML of :mod:`anonproxy.dicom_audit`.
Over UDP (RFC 5426) each message is one datagram; over TCP and TLS (RFC 5425) each is framed
by octet counting: ``MSG-LEN SP SYSLOG-MSG``. TLS uses the BCP 195 client context of
:mod:`anonproxy.tls`.

Sending never slows an association: :class:`SyslogSender` is an :class:`~anonproxy.audit.AuditLog`
sink that only appends the event to a bounded queue (the oldest event is dropped, and counted,
when it is full); one background thread builds the messages and sends them, reconnecting with
an exponential back-off (0.5 s to 30 s) when the repository is unreachable. Drops are reported
in the operational log at most once a minute. :meth:`SyslogSender.close` flushes for at most a
couple of seconds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from anonproxy.audit import get_logger
from anonproxy.config import Settings, SyslogConfig, TlsClientConfig
from anonproxy.dicom_audit import EVENTS, AuditMessage, DicomAuditBuilder

log = get_logger(__name__)

MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
IO_TIMEOUT_S = 2.0
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
DROP_WARNING_INTERVAL_S = 60.0

Builder = Callable[[str, Mapping[str, Any], datetime], AuditMessage | None]


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without space, at most *limit* long."""
    cleaned = "".join(c if "!" <= c <= "~" else "-" for c in value)[:limit]
    return cleaned or "-"


def format_message(
    message: AuditMessage,
    when: datetime,
    *,
    facility: int,
    hostname: str,
    app_name: str,
    procid: int | str,
) -> bytes:
    """One RFC 5424 syslog message carrying *message*."""
    timestamp = when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = (
        f"<{facility * 8 + message.severity}>1 {timestamp} {_header_field(hostname, 255)}"
        f" {_header_field(app_name, 48)} {_header_field(str(procid), 128)} {MSGID} - "
    )
    return header.encode("ascii") + BOM + message.xml.encode("utf-8")


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: the length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogSender:
    """An audit sink sending DICOM audit messages to one syslog server, from its own thread."""

    def __init__(
        self, config: SyslogConfig, build: Builder, *, hostname: str | None = None
    ) -> None:
        self.config = config
        self._build = build
        self.hostname = hostname or socket.getfqdn()
        self._context: ssl.SSLContext | None = None
        if config.transport == "tls":
            from anonproxy import tls  # noqa: PLC0415 - only for TLS

            assert config.ca_certificates is not None  # noqa: S101 - checked by the config
            self._context = tls.client_context(
                TlsClientConfig(
                    ca_certificates=config.ca_certificates,
                    certificate=config.certificate,
                    private_key=config.private_key,
                    verify_hostname=config.verify_hostname,
                ),
                key="audit.syslog",
            )
        self._queue: deque[tuple[datetime, str, dict[str, Any]]] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._stop = threading.Event()
        self._pending: bytes | None = None
        self._sock: socket.socket | None = None
        self._udp_address: Any = None
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._dropped_reported = 0
        self._last_drop_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> SyslogSender | None:
        """The sender *settings* ask for, or None."""
        config = settings.audit.syslog
        if config is None:
            return None
        return cls(config, DicomAuditBuilder.from_settings(settings))

    # --- the sink (any thread) -------------------------------------------------------------

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        """Queue the audit event *name*; never blocks beyond a lock, never raises."""
        if name not in EVENTS:
            return
        item = (datetime.now(UTC), name, dict(fields))
        with self._condition:
            if self._closed:
                return
            if len(self._queue) >= self.config.queue_size:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            self._condition.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued for at most *timeout* seconds, then stop."""
        deadline = time.monotonic() + timeout
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._condition:
                if not self._queue and self._pending is None:
                    break
            time.sleep(0.01)
        self._stop.set()
        with self._condition:
            self._condition.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        lost = len(self._queue) + (self._pending is not None)
        if self.dropped or lost:
            log.warning("syslog.unsent", dropped=self.dropped, unsent_at_stop=lost, sent=self.sent)
        self._disconnect()

    # --- the sending thread ----------------------------------------------------------------

    def _next(self) -> tuple[datetime, str, dict[str, Any]] | None:
        with self._condition:
            while not self._queue and not self._stop.is_set() and not self._closed:
                self._condition.wait()
            if self._stop.is_set() or not self._queue:
                return None
            return self._queue.popleft()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self._pending is None:
                item = self._next()
                if item is None:
                    if self._closed:
                        return
                    continue
                self._pending = self._message(*item)
                if self._pending is None:
                    continue
            self._report_drops()
            try:
                self._send(self._pending)
            except OSError as exc:
                self._disconnect()
                failures += 1
                if self.config.transport == "udp":  # no delivery guarantee: drop it
                    self._pending = None
                    self.failed += 1
                delay = min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** min(failures - 1, 16))
                log.warning(
                    "syslog.unreachable",
                    host=self.config.host,
                    port=self.config.port,
                    transport=self.config.transport,
                    error=type(exc).__name__,
                    retry_in_s=delay,
                )
                self._stop.wait(delay)
                continue
            failures = 0
            self._pending = None
            self.sent += 1

    def _message(self, when: datetime, name: str, fields: dict[str, Any]) -> bytes | None:
        try:
            message = self._build(name, fields, when)
        except Exception:  # one bad event must not stop the sender
            log.warning("syslog.build_failed", audit_event=name, exc_info=True)
            return None
        if message is None:
            return None
        return format_message(
            message,
            when,
            facility=self.config.facility,
            hostname=self.hostname,
            app_name=self.config.app_name,
            procid=os.getpid(),
        )

    def _report_drops(self) -> None:
        if self.dropped == self._dropped_reported:
            return
        now = time.monotonic()
        if now - self._last_drop_warning < DROP_WARNING_INTERVAL_S and self._last_drop_warning:
            return
        log.warning(
            "syslog.queue_full",
            dropped=self.dropped - self._dropped_reported,
            dropped_total=self.dropped,
            queue_size=self.config.queue_size,
        )
        self._dropped_reported = self.dropped
        self._last_drop_warning = now

    def _send(self, message: bytes) -> None:
        if self.config.transport == "udp":
            if self._sock is None:
                family, kind, proto, _, address = socket.getaddrinfo(
                    self.config.host, self.config.port, type=socket.SOCK_DGRAM
                )[0]
                self._sock = socket.socket(family, kind, proto)
                self._sock.settimeout(IO_TIMEOUT_S)
                self._udp_address = address
            self._sock.sendto(message, self._udp_address)
            return
        if self._sock is None:
            sock = socket.create_connection(
                (self.config.host, self.config.port), timeout=IO_TIMEOUT_S
            )
            if self._context is not None:
                try:
                    sock = self._context.wrap_socket(sock, server_hostname=self.config.host)
                except BaseException:
                    sock.close()
                    raise
            self._sock = sock
        self._sock.sendall(octet_counted(message))

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

"""The HTTP admin endpoint: ``/metrics``, ``/healthz``, ``/readyz`` and the status page
(``admin:`` section).

Served by the standard library's WSGI server (:mod:`wsgiref`, one thread per request: the
server prometheus-client's own ``start_http_server`` uses) with prometheus-client's
:func:`~prometheus_client.make_wsgi_app` for ``/metrics``: no HTTP parsing is written here,
only the routing of three paths.

* ``/metrics``: the proxy's :class:`~anonproxy.metrics.Metrics`, Prometheus text format.
* ``/healthz``: 200 while the process serves HTTP (a liveness probe).
* ``/readyz``: 200 when the proxy can take instances and deliver them: the spool is writable,
  its file system has more free space than ``storage.min_free_bytes``, the audit file is
  writable and no destination's oldest queued instance is older than
  ``admin.max_queue_age_s``; otherwise 503 with the list of what is wrong (fixed sentences and
  destination names, never a value of an instance). For Docker HEALTHCHECK, Kubernetes probes
  and HAProxy health checks.
* ``/`` (and ``/status``): the status page, one server-rendered HTML page without script
  (:func:`anonproxy.overview.render_html` of :func:`anonproxy.overview.gather`, what
  ``anonproxy status`` prints): destinations, refusals, quarantine. No PHI.

With ``admin.token_file``, ``/metrics`` and the status page require
``Authorization: Bearer <token>`` (401 otherwise; compared in constant time). The probes stay
open, so that an orchestrator checks them without a secret: they tell nothing beyond ready or
not and why.

With ``admin.tls`` the endpoint speaks HTTPS only, with the context of DICOM TLS
(:func:`anonproxy.tls.server_context`: TLS 1.2 or newer, BCP 195 suites, client certificates
verified against ``ca_certificates`` when given, required with ``require_client_certificate``).
A connection shakes hands in its own request thread, within :data:`HANDSHAKE_TIMEOUT_S`, so a
client that connects and stays silent holds no other request back; a failed handshake is
closed without an answer.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from anonproxy.config import AdminConfig
from anonproxy.errors import ConfigError
from anonproxy.metrics import Metrics, QueueState
from anonproxy.overview import Overview, render_html
from anonproxy.spool import SUFFIX, Spool
from anonproxy.tls import handshake, server_context

StartResponse = Callable[[str, list[tuple[str, str]]], object]
Environ = dict[str, Any]

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
STATUS_PATHS = frozenset({"/", "/status"})
_JSON = [("Content-Type", "application/json")]
HANDSHAKE_TIMEOUT_S = 10.0


def _status_line(status: HTTPStatus) -> str:
    return f"{status.value} {status.phrase}"


class Probe:
    """The proxy's state as the gauges and ``/readyz`` see it (a
    :class:`~anonproxy.metrics.StateSource`)."""

    def __init__(
        self,
        spool: Spool,
        audit_path: Path | None,
        *,
        max_queue_age_s: float,
        active_associations: Callable[[], int],
        deferred_waiting: Callable[[], int],
        deferred_oldest_age_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.spool = spool
        self.audit_path = audit_path
        self.max_queue_age_s = max_queue_age_s
        self._active_associations = active_associations
        self._deferred_waiting = deferred_waiting
        self._deferred_oldest_age_s = deferred_oldest_age_s

    def queue_states(self) -> dict[str, QueueState]:
        states = {}
        for name, queue in self.spool.queues.items():
            stats = queue.stats()
            states[name] = QueueState(
                pending=int(stats["pending"]),
                oldest_age_s=float(stats["oldest_age_s"]),
                retrying=int(stats["retrying"]),
                quarantined=_count(self.spool.quarantine_dir / name),
            )
        return states

    def active_associations(self) -> int:
        return self._active_associations()

    def deferred_waiting(self) -> int:
        return self._deferred_waiting()

    def deferred_bytes(self) -> int:
        return self.spool.deferred_bytes  # counted by the spool as it keeps and removes them

    def deferred_oldest_age_s(self) -> float:
        return self._deferred_oldest_age_s()

    def rejected_inputs(self) -> int:
        return _count(self.spool.rejected_dir)

    def disk_free_bytes(self) -> int:
        return shutil.disk_usage(self.spool.spool_dir).free

    def problems(self) -> list[str]:
        """Why the proxy is not ready; empty when it is."""
        problems: list[str] = []
        try:
            handle, name = tempfile.mkstemp(prefix="readyz-", dir=self.spool.tmp_dir)
            os.close(handle)
            os.unlink(name)
        except OSError:
            problems.append("spool not writable")
        try:
            free = self.disk_free_bytes()
        except OSError:
            problems.append("spool file system unreadable")
        else:
            # the spool's own threshold: the one at which it refuses instances (0xA700)
            if free < self.spool.min_free_bytes:
                problems.append("disk free below storage.min_free_bytes")
        if self.audit_path is not None and not os.access(self.audit_path, os.W_OK):
            problems.append("audit file not writable")
        for name, state in sorted(self.queue_states().items()):
            if state.pending and state.oldest_age_s > self.max_queue_age_s:
                problems.append(f"queue {name} older than admin.max_queue_age_s")
        return problems


def _count(directory: Path) -> int:
    """Spool files in *directory* (0 when it does not exist)."""
    with contextlib.suppress(OSError):
        return sum(1 for entry in os.scandir(directory) if entry.name.endswith(SUFFIX))
    return 0


def read_token(path: Path) -> str:
    """The bearer token of ``admin.token_file`` (ConfigError when unreadable or empty)."""
    try:
        token = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"admin.token_file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        raise ConfigError(msg) from None
    if not token:
        msg = f"admin.token_file: {path} is empty"
        raise ConfigError(msg)
    return token


class AdminApp:
    """The WSGI application: routes the paths, checks the token."""

    def __init__(
        self,
        metrics: Metrics,
        probe: Probe,
        token: str | None = None,
        status: Callable[[], Overview] | None = None,
    ) -> None:
        self.metrics_app = make_wsgi_app(metrics.registry)
        self.probe = probe
        self.status = status
        self._token = None if token is None else token.encode("utf-8")

    def _authorised(self, environ: Environ) -> bool:
        if self._token is None:
            return True
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, given = header.partition(" ")
        # compare_digest on bytes: time independent of where the values differ
        matches = hmac.compare_digest(given.strip().encode("utf-8"), self._token)
        return scheme.lower() == "bearer" and matches

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        pages = {METRICS_PATH, HEALTH_PATH, READY_PATH}
        if path not in pages and (self.status is None or path not in STATUS_PATHS):
            return _reply(start_response, HTTPStatus.NOT_FOUND, {"error": "not found"})
        if method not in {"GET", "HEAD"}:
            return _reply(
                start_response, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET only"},
                [("Allow", "GET, HEAD")],
            )  # fmt: skip
        if path in {HEALTH_PATH, READY_PATH}:
            return self._health(path, start_response)
        if not self._authorised(environ):
            return _reply(
                start_response, HTTPStatus.UNAUTHORIZED, {"error": "bearer token required"},
                [("WWW-Authenticate", 'Bearer realm="anonproxy"')],
            )  # fmt: skip
        if path in STATUS_PATHS and self.status is not None:
            page = render_html(self.status()).encode("utf-8")
            start_response(
                _status_line(HTTPStatus.OK),
                [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page))),
                 ("Cache-Control", "no-store")],
            )  # fmt: skip
            return [page]
        result: Iterable[bytes] = self.metrics_app(environ, start_response)
        return result

    def _health(self, path: str, start_response: StartResponse) -> list[bytes]:
        """``/healthz``: alive; ``/readyz``: ready, or 503 with the reasons."""
        if path == HEALTH_PATH:
            return _reply(start_response, HTTPStatus.OK, {"status": "alive"})
        problems = self.probe.problems()
        if problems:
            body: dict[str, object] = {"status": "unready", "reasons": problems}
            return _reply(start_response, HTTPStatus.SERVICE_UNAVAILABLE, body)
        return _reply(start_response, HTTPStatus.OK, {"status": "ready"})


def _reply(
    start_response: StartResponse,
    status: HTTPStatus,
    body: dict[str, object],
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    data = json.dumps(body).encode("utf-8") + b"\n"
    start_response(
        _status_line(status),
        [*_JSON, ("Content-Length", str(len(data))), *(headers or [])],
    )
    return [data]


class _QuietHandler(WSGIRequestHandler):
    """No access log on standard error (the scraper's address on every scrape)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ANN401 - WSGIRequestHandler's
        del format, args


class AdminServer:
    """The admin endpoint of one proxy: listens on ``admin.host``:``admin.port`` in a
    background thread."""

    def __init__(
        self,
        config: AdminConfig,
        metrics: Metrics,
        probe: Probe,
        status: Callable[[], Overview] | None = None,
    ) -> None:
        self.config = config
        token = None if config.token_file is None else read_token(config.token_file)
        self.app = AdminApp(metrics, probe, token, status)
        self._tls = None if config.tls is None else server_context(config.tls, "admin.tls")
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; a port that cannot be bound is a ConfigError naming it."""
        server_class = _server_class(self.config.host, self._tls)
        try:
            server = make_server(
                self.config.host, self.config.port, self.app,
                server_class=server_class, handler_class=_QuietHandler,
            )  # fmt: skip
        except OSError as exc:
            msg = (
                f"admin: cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}"
            )
            raise ConfigError(msg) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="admin-http",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._server is None:
            msg = "the admin endpoint is not started"
            raise RuntimeError(msg)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(2.0)
        self._server = None


def _server_class(host: str, tls: ssl.SSLContext | None) -> type[ThreadingWSGIServer]:
    """The threading WSGI server in the address family of *host* (IPv6 when it is one), with
    TLS when *tls* is given."""
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        family = socket.AF_INET  # make_server then names the host in its error

    class _Server(ThreadingWSGIServer):
        address_family = family

        def finish_request(self, request: Any, client_address: Any) -> None:  # noqa: ANN401 - socketserver's
            if tls is None:
                super().finish_request(request, client_address)
                return
            try:
                secure = tls.wrap_socket(request, server_side=True)
                handshake(secure, HANDSHAKE_TIMEOUT_S)
            except (OSError, ValueError):  # ssl.SSLError and time-outs are OSErrors
                return  # the plain socket is closed by socketserver
            try:
                secure.settimeout(HANDSHAKE_TIMEOUT_S)  # a request must not trickle in forever
                super().finish_request(secure, client_address)
            finally:
                with contextlib.suppress(OSError):
                    secure.close()

        def setup_environ(self) -> None:
            super().setup_environ()
            if tls is not None:
                self.base_environ["HTTPS"] = "on"  # wsgi.url_scheme: https

    return _Server

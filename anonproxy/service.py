"""The running node: wires configuration, engine, spool, forward workers, SCP and audit.

Lifecycle: :meth:`Proxy.start` opens the spool (recovering what a previous run left), starts
the forward workers and then the SCP; :meth:`Proxy.run` waits for SIGINT/SIGTERM;
:meth:`Proxy.stop` stops accepting, lets running associations finish (up to a time-out), stops
the workers after their current instance and keeps the rest of the spool for the next start.

With ``listen.processes`` > 1 the SCP runs in acceptor processes (:mod:`anonproxy.acceptors`):
this process supervises them and keeps everything else; :func:`run_acceptor` is an acceptor
process's main function (:class:`Acceptor`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from anonproxy import __version__
from anonproxy.acceptors import (
    AcceptorSpec,
    AcceptorSupervisor,
    Channel,
    RelayedAudit,
    RelayedMapRecorder,
    RelayedMetrics,
    process_count,
)
from anonproxy.admin import AdminServer, Probe
from anonproxy.audit import (
    AuditLog,
    configure_logging,
    get_logger,
    reopen_log_file,
)
from anonproxy.config import DicomDestinationConfig, Settings
from anonproxy.deferred import DeferredProcessor
from anonproxy.deid.instance import Limits
from anonproxy.deidentifiers import (
    build_deidentifier,
    deidentifier_factory,
    import_configured_table,
    open_state,
    patient_lookup,
    uses_lookup_table,
)
from anonproxy.errors import ConfigError, StateUnavailable
from anonproxy.forward import ForwardWorker, make_worker
from anonproxy.metrics import Metrics
from anonproxy.overview import gather
from anonproxy.patients import PatientDirectory
from anonproxy.pipeline import InstancePipeline
from anonproxy.processes import available_cores
from anonproxy.pydicom_settings import silence_value_reports
from anonproxy.received import PREFIX as RECEIVING
from anonproxy.remap import MapRecorder, load_map_key, verify_key
from anonproxy.scp import StorageSCP, check_pynetdicom
from anonproxy.sealed import check_waiting, load_key
from anonproxy.secret import Secret, load_secret
from anonproxy.spool import Spool, split_queue_file
from anonproxy.state import StateStore
from anonproxy.syslog import SyslogSender
from anonproxy.tls import client_context
from anonproxy.workers import DeidentifierPool

log = get_logger(__name__)

HOUSEKEEPING_INTERVAL_S = 2.0
SWITCH_INTERVAL_S = 0.002
#: listen.acknowledge after_receipt: the de-identification nobody waits for runs this many nice
#: levels below receiving (MR 256x256, one sender, 2 cores: 79 -> 110 acknowledged/s)
DEFERRED_NICE = 10


#: Seconds to wait for a destination's TCP port at start (unreachable: a warning, not a stop)
REACHABLE_TIMEOUT_S = 5.0


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileExistsError):  # mkdir of a folder on the way that is a file
        return "a part of the path is a file, not a folder"
    return exc.strerror or type(exc).__name__


def preflight(settings: Settings) -> None:
    """What would stop ``serve`` later, checked before anything is created, each a one-line
    :class:`~anonproxy.errors.ConfigError` naming the setting: the storage folder is writable,
    the audit and log files can be opened for appending, the DICOM port is free, the
    destinations' TLS files load (``listen.tls`` and the syslog's are loaded when the SCP and
    the syslog sender are built, with the same kind of error), pynetdicom is the pinned version
    (the SCP checks it too; with acceptor processes that is in them, once they start)."""
    check_pynetdicom()
    storage = settings.storage.path
    try:
        storage.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".preflight-", dir=storage)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"storage.path: cannot write to {storage}: {_reason(exc)}") from None
    for key, path in (("audit.path", settings.audit.path), ("log.path", settings.log.path)):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError(f"{key}: cannot open {path} for writing: {_reason(exc)}") from None
    listen = settings.listen
    if listen.port:
        _check_port_free(listen.host, listen.port)
    for destination in settings.effective_destinations:
        if isinstance(destination, DicomDestinationConfig) and destination.tls is not None:
            client_context(destination.tls, f"destinations.{destination.name}.tls")


def _check_port_free(host: str, port: int) -> None:
    """ConfigError when *port* cannot be listened on (in use, or below 1024 without the
    capability)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SCP binds
            sock.bind((host, port))
    except OSError as exc:  # socket.gaierror too
        msg = f"listen: cannot listen on {host}:{port}: {_reason(exc)}"
        raise ConfigError(msg) from None


def _warn_unreachable(destinations: list[DicomDestinationConfig]) -> None:
    """Log a warning for each destination whose TCP port does not answer now (the spool
    keeps its instances and the workers retry: not a reason to stop)."""
    for destination in destinations:
        try:
            socket.create_connection(
                (destination.host, destination.port), timeout=REACHABLE_TIMEOUT_S
            ).close()
        except OSError as exc:
            log.warning(
                "destination.unreachable",
                destination=destination.name,
                address=f"{destination.host}:{destination.port}",
                error=_reason(exc),
                note="instances wait in the spool and are retried",
            )


def deidentify_workers(settings: Settings) -> int:
    """Worker processes for de-identification: ``listen.deidentify_workers``, or one per core
    (at most 4) when not set; 0 runs it in the association threads."""
    configured = settings.listen.deidentify_workers
    return min(available_cores(), 4) if configured is None else configured


def acceptor_processes(settings: Settings) -> int:
    """Receiving processes: ``listen.processes``, or one per core when not set (see
    :func:`~anonproxy.acceptors.process_count`); 1 with a transparent route (the answer it
    relays reaches the process that forwards; a configured number above 1 is a ConfigError)."""
    configured = settings.listen.processes
    if configured is None and any(route.transparent for route in settings.routes):
        if process_count(None) > 1:
            log.info("listen.processes_single", processes=1, reason="transparent route")
        return 1
    return process_count(configured)


class Proxy:
    """One anonproxy node."""

    def __init__(self, settings: Settings, secret: Secret | None = None) -> None:
        self.settings = settings
        silence_value_reports()
        # Association threads alternate short CPU bursts with socket and file I/O; with the
        # default 5 ms switch interval a thread back from I/O waits behind a busy forward worker.
        # Measured (MR 256x256, one sender, storescp destination): 5 ms: forwarding latency p50
        # 186 ms; 0.5 ms: p50 9 ms but 20 % fewer instances/s; 2 ms: p50 11 ms, full rate.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.secret = secret or load_secret(settings.storage.path, create=True)  # serve
        self.audit_syslog = SyslogSender.from_settings(settings)  # DICOM audit messages
        # Counted in this process, from the audit events and the SCP's answers (see
        # anonproxy.metrics); a registry of its own per proxy.
        self.metrics = Metrics()
        self.audit = AuditLog(
            settings.audit.path,
            stdout=settings.audit.stdout,
            sinks=[
                *([self.audit_syslog] if self.audit_syslog is not None else []),
                self.metrics.observe,
            ],
        )
        destinations = settings.effective_destinations
        storage = settings.storage
        self.processes = acceptor_processes(settings)
        counters = AcceptorSupervisor.make_counters() if self.processes > 1 else None
        self.spool = Spool(
            storage.path,
            [d.name for d in destinations],
            max_bytes=storage.max_bytes,
            min_free_bytes=storage.min_free_bytes,
            fsync=storage.fsync,
            incoming_max_bytes=storage.incoming_max_bytes,
            counters=counters,
        )
        incoming_key = (
            None if storage.incoming_key_file is None else load_key(storage.incoming_key_file)
        )
        check_waiting(self.spool.deferred(), incoming_key)
        self._map_key_created: str | None = None
        self.state, self.map_recorder = self._open_state()
        patients = (  # the lookup table in the state store, when the profile uses it
            PatientDirectory(self.state, self.secret.value)
            if self.state is not None and uses_lookup_table(settings)
            else None
        )
        self.deidentifiers = DeidentifierPool(
            build_deidentifier(settings.profile, self.secret.value, patients),
            deidentifier_factory(settings.profile, self.secret.value, settings),
            workers=deidentify_workers(settings),
            limits=Limits(max_sequence_depth=settings.listen.max_sequence_depth),
            nice=DEFERRED_NICE if settings.listen.acknowledge == "after_receipt" else 0,
            incoming_key=incoming_key,
        )
        self.pipeline = InstancePipeline(
            self.deidentifiers,
            self.spool,
            [d.name for d in destinations],
            self.audit,
            routes=settings.routes,
            keep_rejected_inputs=storage.keep_rejected_inputs,
            acknowledge=settings.listen.acknowledge,
            read_pixels=settings.profile.clean_pixel_data != "off",
            map_recorder=self.map_recorder,
        )
        # Deferred instances keep every worker process busy, one association alone included.
        self.deferred = DeferredProcessor(self.pipeline, window=self.deidentifiers.workers)
        # one process: the SCP is here; several: in the acceptor processes, supervised here
        self.scp: StorageSCP | None = None
        self.acceptors: AcceptorSupervisor | None = None
        if counters is None:
            self.scp = StorageSCP(
                settings.listen, self.pipeline, self.audit, self.deferred, metrics=self.metrics
            )
        else:
            self.acceptors = AcceptorSupervisor(
                settings.model_dump(mode="json"),
                self.secret.value,
                self.processes,
                host=settings.listen.host,
                port=settings.listen.port,
                max_associations=settings.listen.max_associations,
                target=run_acceptor,
                audit=self.audit,
                metrics=self.metrics,
                spool=self.spool,
                counters=counters,
                map_recorder=self.map_recorder,
                ended=self._acceptor_ended,
            )
        self.workers: list[ForwardWorker] = []
        for destination in destinations:
            for index in range(getattr(destination, "max_associations", 1)):
                self.workers.append(
                    make_worker(
                        destination,
                        self.spool,
                        self.audit,
                        calling_ae_title=settings.listen.ae_title,
                        index=index,
                        fsync=storage.fsync,
                    )
                )
        self.probe = Probe(
            self.spool,
            settings.audit.path,
            max_queue_age_s=settings.admin.max_queue_age_s,
            active_associations=self.active_associations,
            deferred_waiting=lambda: self.spool.deferred_count,
            deferred_oldest_age_s=(
                self.deferred.oldest_age_s if self.acceptors is None else self._oldest_deferred_s
            ),
        )
        self.metrics.watch(self.probe)
        self.admin = (
            AdminServer(
                settings.admin,
                self.metrics,
                self.probe,
                status=functools.partial(
                    gather, storage.path, settings.audit.path, [d.name for d in destinations]
                ),
            )
            if settings.admin.enabled
            else None
        )
        self._housekeeping = threading.Thread(
            target=self._housekeep, name="housekeeping", daemon=True
        )
        self._stopped = threading.Event()
        self._wait = threading.Event()

    def _open_state(self) -> tuple[StateStore | None, MapRecorder | None]:
        """The state store (when the lookup table or the map needs one): migrations applied,
        the configured lookup CSV imported, the map key checked against the store's map."""
        settings = self.settings
        if not (settings.map.enabled or uses_lookup_table(settings)):
            return None, None
        try:
            store = open_state(settings)
        except StateUnavailable as exc:
            raise ConfigError(f"state: {exc}") from None
        try:
            import_configured_table(settings, store, self.secret.value)
            if not settings.map.enabled:
                return store, None
            key = load_map_key(settings.storage.path, create=True)
            verify_key(store, key)
            # the first run: audited after service.started (README: move it to the broker)
            self._map_key_created = key.source if key.created else None
        except BaseException:
            store.close()
            raise
        return store, MapRecorder(key, store, settings.storage.path, fsync=settings.storage.fsync)

    @property
    def port(self) -> int:
        """The port the SCP listens on."""
        if self.acceptors is not None:
            return self.acceptors.port
        assert self.scp is not None  # noqa: S101 - one of the two
        return self.scp.port

    def active_associations(self) -> int:
        """Associations running now, in this process or in the acceptor processes."""
        if self.acceptors is not None:
            return self.acceptors.active_associations()
        assert self.scp is not None  # noqa: S101 - one of the two
        return self.scp.active_associations()

    def _oldest_deferred_s(self) -> float:
        """Age of the oldest deferred data set of any process (the names sort by arrival)."""
        waiting = self.spool.deferred()
        if not waiting:
            return 0.0
        with contextlib.suppress(OSError):
            return max(0.0, time.time() - waiting[0].stat().st_mtime)
        return 0.0

    def _acceptor_ended(self, run: str, pid: int) -> None:
        """An acceptor process ended (the supervisor starts another): remove the files it
        created ahead to receive into (never answered), settle the deferred commits it left
        half-done and queue its deferred data sets here."""
        for path in self.spool.deferred_dir.glob(f"{RECEIVING}{pid}-*"):
            path.unlink(missing_ok=True)
        self.spool.settle_run(run)
        self.deferred.recover(run)

    def start(self) -> None:
        """Recover the spool, start forwarding, then start listening. Data sets a previous
        run acknowledged and did not de-identify are queued before the first new one."""
        self._lock_storage()
        try:
            self._start_locked()
        except BaseException:
            self.stop(timeout=1.0)  # what started stops; the storage is left for the next start
            raise

    def _start_locked(self) -> None:
        if self.admin is not None:
            self.admin.start()  # first: a port in use stops the start before anything runs
        recovered = self.spool.recover()
        if self.map_recorder is not None:  # entries a previous run journaled, shipped now
            self.map_recorder.open()
        if self.settings.listen.acknowledge == "after_receipt" and self.acceptors is None:
            # The worker processes de-identify every instance: started now, not during the
            # first study (two processes starting cost a 2-core machine a second of receiving;
            # with acceptor processes, they de-identify and these start only to recover)
            self.deidentifiers.start()
        deferred = self.deferred.recover()
        for worker in self.workers:
            worker.start()
        self._housekeeping.start()
        listen = self.settings.listen
        if self.acceptors is not None:
            self.acceptors.start()  # ConfigError when one cannot listen
        else:
            assert self.scp is not None  # noqa: S101 - one of the two
            try:
                self.scp.start()
            except OSError as exc:
                msg = f"listen: cannot listen on {listen.host}:{listen.port}: {_reason(exc)}"
                raise ConfigError(msg) from None
        dicom = [
            d for d in self.settings.effective_destinations if isinstance(d, DicomDestinationConfig)
        ]
        if dicom:
            threading.Thread(
                target=_warn_unreachable, args=(dicom,), name="reachable", daemon=True
            ).start()
        self.audit.event(
            "service.started",
            version=__version__,
            ae_title=self.settings.listen.ae_title,
            port=self.port,
            destinations=[d.name for d in self.settings.effective_destinations],
            recovered=recovered,
            recovered_deferred=deferred,
            acknowledge=self.settings.listen.acknowledge,
            **(
                {}
                if self.acceptors is None
                else {"processes": self.processes, "acceptors": self.acceptors.pids()}
            ),
        )
        if self._map_key_created is not None:
            self.audit.event("map.key_created", path=self._map_key_created)

    def _lock_storage(self) -> None:
        """One service per storage folder: two would deliver and delete each other's files."""
        path = self.settings.storage.path / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = path.open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            msg = f"another anonproxy is running on the storage folder {path.parent}"
            raise ConfigError(msg) from None

    def _housekeep(self) -> None:
        """Every few seconds: pick up released instances (and those an acceptor process that
        ended committed and did not announce: audited ``instance.found``) and retry requests,
        publish the queue state, purge kept rejected inputs past their age and the data sets
        of aborted associations (received in part, never processed: no write for twice the
        network time-out, after which an association that stopped sending has been aborted)."""
        max_age = self.settings.storage.rejected_inputs_max_age_days * 86400
        abandoned = 2 * self.settings.listen.network_timeout + HOUSEKEEPING_INTERVAL_S
        # files the acceptor processes are committing are theirs to announce (see spool)
        settle_s = 0.0 if self.acceptors is None else 2 * HOUSEKEEPING_INTERVAL_S
        while not self._stopped.wait(HOUSEKEEPING_INTERVAL_S):
            try:
                for destination, files in self.spool.rescan(settle_s).items():
                    for file in files:  # released by an operator, or announced by nobody
                        self.audit.event(
                            "instance.found",
                            destination=destination,
                            deid_sop_instance_uid=split_queue_file(file)[0],
                        )
                self.spool.write_state()
                self.spool.purge_rejected(max_age)
                self.spool.purge_incoming(abandoned)
            except OSError:
                log.warning("housekeeping.failed", exc_info=True)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful shutdown: stop accepting, let running associations finish for up to
        *timeout* seconds (then abort them: what they did not get acknowledged, they resend),
        stop the workers after their current batch. 20 s stays inside the usual 30 s
        grace period of container orchestrators before SIGKILL."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        deadline = time.monotonic() + timeout
        self._stop_receiving(deadline)
        self.deferred.stop(max(0.1, deadline - time.monotonic()))
        for worker in self.workers:
            worker.stop()
        self.spool.close()
        for worker in self.workers:
            if worker.ident is not None:  # started (a failed start may stop before)
                worker.join(max(0.1, deadline - time.monotonic()))
        if self.scp is not None:
            self.scp.shutdown()
        self.deidentifiers.shutdown()
        if self.map_recorder is not None:
            self.map_recorder.close()
        if self.state is not None:
            self.state.close()
        if self._housekeeping.ident is not None:
            self._housekeeping.join(HOUSEKEEPING_INTERVAL_S * 2)
        with contextlib.suppress(OSError):
            self.spool.write_state()
            self._lock_file.close()
        self.audit.event(
            "service.stopped",
            pending={name: len(q) for name, q in self.spool.queues.items()},
            deferred=len(self.spool.deferred()),
        )
        if self.audit_syslog is not None:
            self.audit_syslog.close(timeout=2.0)
        self.audit.close()

    def _stop_receiving(self, deadline: float) -> None:
        """Stop accepting (the admin endpoint's probes fail from then on) and let the running
        associations finish until *deadline* (acceptor processes: until they exit)."""
        if self.acceptors is not None:
            self.acceptors.request_stop(max(0.1, deadline - time.monotonic() - 1.0))
        elif self.scp is not None:
            self.scp.stop_accepting()
        if self.admin is not None:
            self.admin.stop()  # probes now fail: a load balancer stops sending here
        if self.acceptors is not None:
            self.acceptors.join(max(0.1, deadline - time.monotonic()))
        while self.scp is not None and self.scp.active_associations():
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Start, call *on_started* once the SCP listens, serve until SIGINT or SIGTERM, then
        stop gracefully."""
        with _capture_signals(self._stop_requested, self._reopen_requested):
            self.start()
            if on_started is not None:
                on_started()
            # Python runs a handler in the main thread, once it wakes: a signal the kernel gave
            # another thread (it may) would wait for an untimed wait's end.
            while not self._wait.wait(1.0):
                pass
        self.stop()

    def _stop_requested(self, signum: int, frame: FrameType | None) -> None:
        del frame
        log.info("service.signal", signal=signal.Signals(signum).name)
        self._wait.set()

    def _reopen_requested(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP: reopen the files in a thread of its own (the signal may arrive while this
        thread holds a file's lock)."""
        del signum, frame
        threading.Thread(target=self.reopen_logs, name="reopen-logs", daemon=True).start()

    def reopen_logs(self) -> None:
        """Open the audit file and the log file again by their names (after logrotate renamed
        them). A file that cannot be opened is logged and its old handle kept."""
        try:
            reopen_log_file()
            self.audit.reopen()
            if self.acceptors is not None:
                self.acceptors.reopen_logs()
        except OSError as exc:
            log.error("service.reopen_failed", error=exc.strerror or type(exc).__name__)
            return
        log.info("service.logs_reopened")


@contextmanager
def _capture_signals(
    handler: Callable[[int, FrameType | None], None],
    reopen: Callable[[int, FrameType | None], None],
) -> Iterator[None]:
    """Install *handler* for SIGINT and SIGTERM and *reopen* for SIGHUP; restore the previous
    handlers afterwards."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reopen)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Acceptor:
    """What an acceptor process runs (:mod:`anonproxy.acceptors`): its own SCP, pipeline and
    engine (and deferred processor) built from the settings, committing into the service's
    spool, reporting to the service over *channel*."""

    def __init__(self, settings: Settings, spec: AcceptorSpec, channel: Channel) -> None:
        silence_value_reports()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        storage = settings.storage
        listen = settings.listen
        destinations = [d.name for d in settings.effective_destinations]
        self.spool = Spool(
            storage.path,
            destinations,
            max_bytes=storage.max_bytes,
            min_free_bytes=storage.min_free_bytes,
            fsync=storage.fsync,
            incoming_max_bytes=storage.incoming_max_bytes,
            counters=spec.counters,
            announce=lambda destination, file: channel.send(("committed", destination, file)),
        )
        incoming_key = (
            None if storage.incoming_key_file is None else load_key(storage.incoming_key_file)
        )
        audit = RelayedAudit(channel, spec.index)
        # The acceptor processes are the parallelism: the engine runs in the association
        # threads unless listen.deidentify_workers asks for worker processes (per acceptor).
        workers = 0 if listen.deidentify_workers is None else listen.deidentify_workers
        self.deidentifiers = DeidentifierPool(
            build_deidentifier(
                settings.profile, spec.secret, patient_lookup(settings, spec.secret)
            ),
            deidentifier_factory(settings.profile, spec.secret, settings),
            workers=workers,
            limits=Limits(max_sequence_depth=listen.max_sequence_depth),
            nice=DEFERRED_NICE if listen.acknowledge == "after_receipt" else 0,
            incoming_key=incoming_key,
        )
        pipeline = InstancePipeline(
            self.deidentifiers,
            self.spool,
            destinations,
            audit,
            routes=settings.routes,
            keep_rejected_inputs=storage.keep_rejected_inputs,
            acknowledge=listen.acknowledge,
            read_pixels=settings.profile.clean_pixel_data != "off",
            map_recorder=(
                None if spec.map_key is None else RelayedMapRecorder(spec.map_key, channel)
            ),
        )
        self.deferred = DeferredProcessor(pipeline, window=self.deidentifiers.workers, run=spec.run)
        self.scp = StorageSCP(
            listen.model_copy(update={"port": spec.port}),
            pipeline,
            audit,
            self.deferred,
            metrics=RelayedMetrics(channel),
            shared=spec.shared,
            acceptor_index=spec.index,
            reports=channel.gathered,
        )
        if listen.acknowledge == "after_receipt":
            self.deidentifiers.start()

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let the associations finish within *grace_s* seconds (then abort
        them), finish the deferred instances in the engine."""
        self.scp.stop_accepting()
        deadline = time.monotonic() + grace_s
        while self.scp.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.deferred.stop(max(0.1, deadline - time.monotonic()))
        self.scp.shutdown()
        self.deidentifiers.shutdown()


def run_acceptor(spec: AcceptorSpec) -> None:
    """The main function of an acceptor process (started by the service's
    :class:`~anonproxy.acceptors.AcceptorSupervisor`): build, listen, report ready, serve
    until the service asks it to stop (or ends), stop. SIGINT and SIGTERM are the service's to
    act on (a terminal or systemd signals every process of the group); SIGHUP reopens the log
    file, from the start (a SIGHUP to the process group would end one still starting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # First: SIGHUP's default action ends the process (the service sends it to the acceptors
    # that reported ready, after logrotate renamed the files; see AcceptorSupervisor.reopen_logs)
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: threading.Thread(target=reopen_log_file, daemon=True).start(),
    )
    channel = Channel(spec.events, spec.requests)
    settings = Settings.model_validate(spec.settings)
    configure_logging(settings.log.level, format=settings.log.format, path=settings.log.path)
    try:
        acceptor = Acceptor(settings, spec, channel)
        acceptor.scp.start(spec.listener)
    except ConfigError as exc:
        channel.send(("failed", str(exc)))
        raise SystemExit(2) from None
    except OSError as exc:
        listen = settings.listen
        channel.send(
            ("failed", f"listen: cannot listen on {listen.host}:{spec.port}: {_reason(exc)}")
        )
        raise SystemExit(2) from None
    channel.send(("ready",))
    reopen_log_file()  # a log file renamed while it started (the service's SIGHUP skipped it)
    acceptor.stop(channel.wait_for_stop())
    # Ended here, not by multiprocessing's exit, which joins this process's children: an
    # acceptor orphaned by a SIGKILLed service was seen waiting 16 min there for its idle
    # de-identification worker process. Its workers end with it (they watch their parent).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

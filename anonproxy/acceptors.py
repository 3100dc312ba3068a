"""Several receiving processes (``listen.processes``): acceptor processes and their supervisor.

One process receives at the rate one core de-identifies: Python's GIL keeps the association
threads of one process on one core. With ``listen.processes`` > 1, the service process (the
*supervisor*) starts that many *acceptor* processes. Each accepts from the supervisor's
listening socket on the DICOM port, where the least busy acceptor takes each new connection
(:class:`~anonproxy.scp.SharedListenerServer`), builds its own SCP, pipeline and engine from
the settings (and, under ``listen.acknowledge: after_receipt``, its own deferred processor)
and commits into the one spool. ``listen.processes: 1`` is the single process of before: no
supervisor, nothing of this module runs.

What stays in the supervisor, and why:

* spool recovery at start, the forward workers and their sender processes, housekeeping, the
  admin endpoint, the state store and the audit of service events: one of each per node;
* the **audit trail, the metrics and the DICOM audit messages**: an acceptor's audit events,
  C-STORE answers and receive times reach the supervisor over a pipe of its own
  (:class:`RelayedAudit`, :class:`RelayedMetrics`) and are written, counted and sent there.
  One writer keeps each audit line whole (no two processes append to one file), SIGHUP reopens
  one file, and :mod:`anonproxy.metrics` keeps one registry (no prometheus-client
  multiprocess folder). Records of an acceptor carry ``acceptor`` (its index): its
  association IDs are unique within it only;
* the **queues**: an acceptor's commit tells the supervisor of each new queue file (the same
  pipe), which indexes it for the forward workers (:mod:`anonproxy.spool`, several processes);
* the **re-identification map**: the journal and its shipped length belong to one process. An
  acceptor asks the supervisor to record a patient and study it has not recorded yet, and
  waits for the answer before it spools the instance (:class:`RelayedMapRecorder`; known
  entries cost a look-up in the acceptor);
* the **association limits** (``max_associations``, ``max_associations_per_peer``), global:
  counted in shared memory (:class:`~anonproxy.access.SharedAssociations`), like the spool's
  quotas (:class:`~anonproxy.spool.SpoolCounters`).

The port: the supervisor binds it, listens on it and keeps that socket for its whole run;
each acceptor gets it when it starts (from the fork server of :mod:`anonproxy.processes`: the
supervisor runs threads by then, and a fork of it would copy locks held by them). Port 0 is
resolved once for every acceptor, a port held by another program stops the start with the
usual ConfigError, and connections that arrive while an acceptor restarts wait in the socket's
backlog for the others. (``SO_REUSEPORT``, one socket per acceptor, was left: the kernel
spreads connections over such sockets by a hash of their addresses, blind to how busy each
process is, and a connection queued for an acceptor that dies is reset.)

A process that ends unexpectedly is started again after a back-off (0.5 s, doubled up to
30 s, from 0.5 s again once one ran a minute), audited ``acceptor.restarted`` with its exit
code. Nothing it acknowledged is lost: an instance is acknowledged once committed to the spool
(or kept in ``spool/deferred``); its deferred data sets, named after its *run* (unique among
the processes), and any deferred commit it left half-done are recovered by the supervisor's own
deferred processor. On stop, the supervisor shuts the listening socket down (new connections
are refused), and each acceptor lets its associations finish within the grace period,
finishes its deferred instances in the engine and exits; one that does not is killed. An
acceptor whose supervisor was killed aborts its associations at once and exits
(:data:`ORPHAN_GRACE_S`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from anonproxy.access import SharedAssociations
from anonproxy.audit import AuditLog, get_logger
from anonproxy.deid.identity import StudyIdentity
from anonproxy.errors import ConfigError, StateUnavailable
from anonproxy.metrics import Metrics
from anonproxy.processes import available_cores, child_context
from anonproxy.remap import MapKey, MapRecorder
from anonproxy.spool import Spool, SpoolCounters

log = get_logger(__name__)

#: Acceptor processes when ``listen.processes`` is not set: one per core, at most this many.
MAX_AUTO_PROCESSES = 8
#: Seconds an acceptor may take to listen at start (the fork server starting, and building the
#: engine take one to a few seconds on a loaded 2-core machine).
START_TIMEOUT_S = 60.0
RESTART_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0
#: An acceptor that ran this long before it ended is restarted after the first delay again.
STABLE_S = 60.0
#: Seconds an acceptor whose supervisor ended (killed: a stop would have said so) gives its
#: associations before it aborts them and exits: none. What it acknowledged is on disk for the
#: next start; what it would go on acknowledging could not be forwarded until then, while the
#: sender, aborted, sends it again (to another node behind a load balancer).
ORPHAN_GRACE_S = 0.0


def process_count(configured: int | None) -> int:
    """Acceptor processes for ``listen.processes`` (*configured*): one per core (at most
    :data:`MAX_AUTO_PROCESSES`) when not set."""
    if configured is None:
        return min(available_cores(), MAX_AUTO_PROCESSES)
    return configured


# -- the acceptor's side ----------------------------------------------------------------------


class Channel:
    """The acceptor's end of its pipes to the supervisor: events (one way) and requests
    (answered). Thread-safe. A supervisor gone makes sending fail quietly: the acceptor
    notices its pipe closed and stops (:meth:`wait_for_stop`)."""

    def __init__(self, events: Connection, requests: Connection) -> None:
        self._events = events
        self._requests = requests
        self._send_lock = threading.Lock()
        self._ask_lock = threading.Lock()
        self._broken = False
        self._gathering = threading.local()  # .messages: this thread's, held by gathered()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """What this thread sends meanwhile goes as one message when it leaves (a C-STORE's
        audit records, metrics and commit announcement: one pipe write and one wake-up of the
        service process's reader per data set, not six)."""
        messages: list[tuple[Any, ...]] = []
        self._gathering.messages = messages
        try:
            yield
        finally:
            self._gathering.messages = None
            if len(messages) == 1:
                self.send(messages[0])
            elif messages:
                self.send(("gathered", messages))

    def send(self, message: tuple[Any, ...]) -> None:
        gathering: list[tuple[Any, ...]] | None = getattr(self._gathering, "messages", None)
        if gathering is not None:
            gathering.append(message)
            return
        try:
            with self._send_lock:
                if self._broken:
                    return
                self._events.send(message)
        except Exception as exc:  # noqa: BLE001 - an audit record never fails its caller
            self._broken = True  # the supervisor ended: said once (each data set sends several)
            log.warning("acceptor.relay_failed", message=message[0], error=type(exc).__name__)

    def wait_for_stop(self) -> float:
        """Block until the supervisor asks this acceptor to stop; the seconds its associations
        may take to finish (:data:`ORPHAN_GRACE_S` when the supervisor ended: its pipe
        closed)."""
        while True:
            try:
                # woken each second: Python runs a signal's handler (SIGHUP) in this, the main
                # thread, and the kernel may have given the signal to another
                if not self._events.poll(1.0):
                    continue
                message = self._events.recv()
            except (EOFError, OSError):
                return ORPHAN_GRACE_S
            if message[0] == "stop":
                return float(message[1])

    def ask(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        with self._ask_lock:
            self._requests.send(message)
            answer: tuple[Any, ...] = self._requests.recv()
        return answer


class RelayedAudit(AuditLog):
    """An acceptor's audit log: each event goes to the supervisor, which writes it (and counts
    it in its metrics, and sends its DICOM audit message), with the acceptor's index."""

    def __init__(self, channel: Channel, index: int) -> None:
        super().__init__(None)
        self._channel = channel
        self._index = index

    def event(self, name: str, **fields: Any) -> None:  # noqa: ANN401 - JSON-able values
        self._channel.send(("audit", name, {**fields, "acceptor": self._index}))


class RelayedMetrics(Metrics):
    """An acceptor's metrics: what the SCP counts itself goes to the supervisor's registry
    (the audit events are counted there as they are written)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def data_set_received(self, seconds: float) -> None:
        self._channel.send(("received", seconds))

    def store_answered(self, status: int) -> None:
        self._channel.send(("answered", int(status)))


class RelayedMapRecorder:
    """An acceptor's re-identification map: an entry it has not seen is recorded by the
    supervisor (journaled, synced and shipped) before :meth:`record` returns; StateUnavailable
    when it could not be (the instance is refused with 0xA700, as in one process)."""

    def __init__(self, key: MapKey, channel: Channel) -> None:
        self.key = key
        self._channel = channel
        self._known: set[bytes] = set()
        self._lock = threading.Lock()

    def record(self, identity: StudyIdentity) -> bool:
        entry = self.key.entry_key(identity.original)
        with self._lock:
            if entry in self._known:
                return False
        try:
            answer = self._channel.ask(("map", identity))
        except (OSError, EOFError) as exc:
            msg = "the service process does not answer"
            raise StateUnavailable(msg) from exc
        if answer[0] != "ok":
            raise StateUnavailable(str(answer[1]))
        with self._lock:
            self._known.add(entry)
        return bool(answer[1])


# -- the supervisor's side --------------------------------------------------------------------


@dataclass
class AcceptorSpec:
    """What an acceptor process is started with (pickled to its process)."""

    settings: dict[str, Any]  # Settings in their JSON form
    secret: bytes
    index: int
    run: str  # names its deferred data sets: unique among every process of this storage
    port: int  # resolved by the supervisor (listen.port 0: the port it bound)
    listener: socket.socket  # the supervisor's, listening on the port: shared by the acceptors
    parent: int
    shared: SharedAssociations
    counters: SpoolCounters
    events: Connection  # events to the supervisor; the stop request from it
    requests: Connection  # map entries asked to the supervisor, and its answers
    map_key: MapKey | None  # the supervisor's (map.enabled)


@dataclass
class _Slot:
    """One acceptor process and what the supervisor keeps of it."""

    index: int
    process: Any = None  # multiprocessing.Process (forkserver context)
    run: str = ""
    started: float = 0.0
    failures: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    readers: list[threading.Thread] = field(default_factory=list)
    events: Connection | None = None  # the supervisor's end of the events pipe


class AcceptorSupervisor:
    """Starts *processes* acceptor processes running *target* (a module-level function of
    :class:`AcceptorSpec`: :func:`anonproxy.service.run_acceptor`), relays what they report
    into *audit*, *metrics* and *spool*, records map entries with *map_recorder*, and starts
    again any that ends unexpectedly, after calling *ended* with its run and process ID (the
    service recovers its deferred data sets)."""

    def __init__(
        self,
        settings: dict[str, Any],
        secret: bytes,
        processes: int,
        *,
        host: str,
        port: int,
        max_associations: int,
        target: Callable[[AcceptorSpec], None],
        audit: AuditLog,
        metrics: Metrics,
        spool: Spool,
        counters: SpoolCounters,
        map_recorder: MapRecorder | None,
        ended: Callable[[str, int], None],
    ) -> None:
        self._context = child_context()
        self.settings = settings
        self.secret = secret
        self.host = host
        self.port = port
        self.target = target
        self.audit = audit
        self.metrics = metrics
        self.spool = spool
        self.counters = counters
        self.map_recorder = map_recorder
        self.ended = ended
        self.shared = SharedAssociations(self._context, processes, max_associations)
        self.slots = [_Slot(index) for index in range(processes)]
        self.listener: socket.socket | None = None  # the port, listening (start)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._last_run = 0
        self._monitor: threading.Thread | None = None
        self._wake_r, self._wake_w = self._context.Pipe(duplex=False)

    @staticmethod
    def make_counters() -> SpoolCounters:
        """The spool's counters in shared memory, for the service's spool and the acceptors'."""
        return SpoolCounters.shared(child_context())

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the port, start every acceptor and wait until each serves it. ConfigError
        when the port cannot be listened on or an acceptor cannot start."""
        self._listen()
        for slot in self.slots:
            self._start(slot)
        deadline = time.monotonic() + START_TIMEOUT_S
        for slot in self.slots:
            while not slot.ready.wait(0.05):
                if slot.failure is not None:
                    raise ConfigError(slot.failure)
                if not slot.process.is_alive():
                    slot.process.join()
                    reason = slot.failure or f"exit code {slot.process.exitcode}"
                    msg = f"listen: acceptor process {slot.index} ended at start ({reason})"
                    raise ConfigError(msg)
                if time.monotonic() > deadline:
                    msg = f"listen: acceptor process {slot.index} did not start listening"
                    raise ConfigError(msg)
        self._monitor = threading.Thread(target=self._supervise, name="acceptors", daemon=True)
        self._monitor.start()

    def _listen(self) -> None:
        """Listen on the port, for every acceptor (:attr:`listener`): fails when another
        program holds it, resolves port 0, and keeps it ours between restarts."""
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen()
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            msg = f"listen: cannot listen on {self.host}:{self.port}: {reason}"
            raise ConfigError(msg) from None
        self.listener = sock
        self.port = int(sock.getsockname()[1])

    def _listening(self) -> socket.socket:
        if self.listener is None:
            msg = "an acceptor started before the port was listened on"
            raise RuntimeError(msg)
        return self.listener

    def _next_run(self) -> str:
        with self._lock:
            self._last_run = max(time.time_ns(), self._last_run + 1)
            return f"{self._last_run:016x}"

    def _start(self, slot: _Slot) -> None:
        events_r, events_w = self._context.Pipe()
        requests_parent, requests_child = self._context.Pipe()
        slot.run = self._next_run()
        slot.ready = threading.Event()
        slot.failure = None
        spec = AcceptorSpec(
            settings=self.settings,
            secret=self.secret,
            index=slot.index,
            run=slot.run,
            port=self.port,
            listener=self._listening(),
            parent=os.getpid(),
            shared=self.shared,
            counters=self.counters,
            events=events_w,
            requests=requests_child,
            map_key=(  # a fresh one: the recorder's caches what pickle cannot take
                None
                if self.map_recorder is None
                else MapKey(self.map_recorder.key.value, self.map_recorder.key.source)
            ),
        )
        # Not daemonic: a daemonic process may not start children, and an acceptor starts its
        # de-identification worker processes (listen.deidentify_workers). Every exit of the
        # supervisor that runs Python stops them first (Proxy.stop: join, then kill); one
        # killed leaves them to notice that their parent ended.
        process = self._context.Process(
            target=self.target, args=(spec,), name=f"anonproxy-acceptor-{slot.index}"
        )
        process.start()
        events_w.close()  # the child's ends: closed here, so that its end is seen as EOF
        requests_child.close()
        slot.process = process
        slot.events = events_r
        slot.started = time.monotonic()
        slot.readers = [
            threading.Thread(
                target=self._read_events, args=(slot, events_r), name="acceptor-events",
                daemon=True,
            ),
            threading.Thread(
                target=self._answer_requests, args=(requests_parent,), name="acceptor-requests",
                daemon=True,
            ),
        ]  # fmt: skip
        for reader in slot.readers:
            reader.start()

    def pids(self) -> list[int]:
        """The process IDs of the acceptors running now."""
        return [s.process.pid for s in self.slots if s.process is not None and s.process.pid]

    def active_associations(self) -> int:
        """Associations running now in every acceptor."""
        return self.shared.active()

    def request_stop(self, grace_s: float) -> None:
        """Ask every acceptor to stop: stop accepting, let its associations finish within
        *grace_s* seconds (then abort them), exit; new connections are refused from now on.
        Returns at once (:meth:`join`)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(None)
        for slot in self.slots:
            if slot.events is not None and slot.process is not None and slot.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    slot.events.send(("stop", grace_s))
        if self.listener is not None:  # new connections refused now, in every acceptor
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for the acceptors to exit, kill those still running,
        then release the port."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.1, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5.0)
        for slot in self.slots:
            for reader in slot.readers:
                reader.join(2.0)  # what they sent before they ended is written
        if self._monitor is not None:
            self._monitor.join(2.0)
        if self.listener is not None:
            self.listener.close()

    def reopen_logs(self) -> None:
        """SIGHUP: the acceptors reopen their log files. Only those that reported ready: one
        still starting may not handle SIGHUP yet (its default action ends the process); it
        reopens its log file once ready."""
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid and slot.ready.is_set():
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGHUP)

    # -- supervision ----------------------------------------------------------------------

    def _supervise(self) -> None:
        """Wait for an acceptor to end; start it again unless stopping."""
        while not self._stopping.is_set():
            sentinels = {s.process.sentinel: s for s in self.slots if s.process is not None}
            ready = wait([*sentinels, self._wake_r])
            if self._stopping.is_set():
                return
            for sentinel in ready:
                slot = sentinels.get(sentinel)
                if slot is not None:
                    self._restart(slot)

    def _restart(self, slot: _Slot) -> None:
        process = slot.process
        process.join()
        for reader in slot.readers:
            reader.join(5.0)  # its last events and announcements first
        self.shared.clear(slot.index)  # its associations ended with it
        ran = time.monotonic() - slot.started
        slot.failures = 1 if ran >= STABLE_S else slot.failures + 1
        delay = min(RESTART_MAX_DELAY_S, RESTART_DELAY_S * 2 ** (slot.failures - 1))
        try:
            self.ended(slot.run, process.pid)
        except Exception:  # its data sets wait for the next start then
            log.exception("acceptor.recovery_failed", acceptor=slot.index)
        self.audit.event(
            "acceptor.restarted",
            acceptor=slot.index,
            exit_code=process.exitcode,
            pid=process.pid,
            ran_s=round(ran, 3),
            delay_s=delay,
        )
        if self._stopping.wait(delay):
            return
        self._start(slot)

    def _read_events(self, slot: _Slot, events: Connection) -> None:
        """What an acceptor reports, until its pipe ends (it ended)."""
        handlers: dict[str, Callable[..., None]] = {
            "audit": lambda name, fields: self.audit.event(name, **fields),
            "answered": self.metrics.store_answered,
            "received": self.metrics.data_set_received,
            "committed": lambda destination, file: self.spool.queues[destination].push(file),
            "ready": slot.ready.set,
            "failed": lambda reason: setattr(slot, "failure", reason),
        }

        def handle(message: tuple[Any, ...]) -> None:
            try:
                if message[0] == "gathered":  # see Channel.gathered
                    for each in message[1]:
                        handle(each)
                else:
                    handlers[message[0]](*message[1:])
            except Exception:  # one bad message never stops the relay
                log.exception("acceptor.message_failed", kind=str(message[0])[:32])

        with events:
            while True:
                try:
                    message = events.recv()
                except (EOFError, OSError):
                    return
                handle(message)

    def _answer_requests(self, requests: Connection) -> None:
        """Map entries an acceptor asks to record, until its pipe ends."""
        with requests:
            while True:
                try:
                    kind, identity = requests.recv()
                except (EOFError, OSError):
                    return
                answer: tuple[Any, ...]
                if kind != "map" or self.map_recorder is None:
                    answer = ("error", "no map is kept")
                else:
                    try:
                        answer = ("ok", self.map_recorder.record(identity))
                    except StateUnavailable as exc:
                        answer = ("error", str(exc))
                    except OSError as exc:
                        answer = ("error", f"map journal write failed: {exc.strerror}")
                try:
                    requests.send(answer)
                except OSError:
                    return

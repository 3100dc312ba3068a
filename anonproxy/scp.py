"""Network receive: the Storage SCP and Verification SCP (pynetdicom).

The SCP accepts C-ECHO and the SOP Classes of ``listen.sop_classes`` (by default every Storage
SOP Class, retired ones included: see :mod:`anonproxy.sop_classes`), with every transfer syntax
pydicom knows (compressed ones included, so that compressed images pass through without
transcoding). The called AE title must match; the calling AE title must be in the allow-list
when the list is not empty.

Handlers are thin: they read the event, call the :class:`~anonproxy.pipeline.InstancePipeline`
and return a named status. Every association is audited when it is accepted, rejected,
released or aborted, with its counts and duration.

The presentation contexts the SCP supports (about 200 SOP Classes, each with every transfer
syntax) are built once, with the AE, and shared by every association read-only
(:func:`anonproxy.pynetdicom_patches.shared_contexts`): pynetdicom would otherwise deep-copy
them for each association (65 ms of CPU on the 2-core benchmark machine under load: what a
sender that opens one association per instance pays per instance).

In an acceptor process (``listen.processes`` > 1, :mod:`anonproxy.acceptors`) the SCP accepts
from the listening socket every acceptor process shares, the least busy first
(:class:`SharedListenerServer`, through pynetdicom's ``server_class``), and counts its
associations in the table shared by every process
(:class:`~anonproxy.access.SharedAssociations`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category
from pynetdicom.transport import ThreadedAssociationServer

from anonproxy import limits, pynetdicom_patches, sop_classes, tls
from anonproxy.access import AccessPolicy, Rejection, SharedAssociations
from anonproxy.audit import AuditLog, silence_pynetdicom_identifiers
from anonproxy.config import ListenConfig
from anonproxy.deferred import DeferredProcessor
from anonproxy.errors import DecodeError, LimitExceeded
from anonproxy.forward import set_tcp_nodelay
from anonproxy.metrics import Metrics
from anonproxy.pipeline import InstancePipeline, StoreOutcome
from anonproxy.received import ReceivedFile
from anonproxy.sealed import SealError, opened
from anonproxy.status import EchoStatus, StoreStatus

silence_pynetdicom_identifiers()  # whether or not logging is configured


def check_pynetdicom() -> None:
    """:class:`~anonproxy.pynetdicom_patches.UnsupportedPynetdicom` (a ConfigError) unless
    pynetdicom is the pinned version: what building the SCP checks, for a service whose SCPs
    run in acceptor processes (checked before it starts them)."""
    pynetdicom_patches.check_version()


def receive_into(
    directory: Path, key: bytes | None = None, *, durable: bool = True, checksum: bool = True
) -> None:
    """Make pynetdicom write received C-STORE data sets, as they arrive, into *directory*
    (the spool's owner-only ``deferred`` folder, under hidden names: see
    :mod:`anonproxy.received`), sealed with *key* when one is configured, rather than the
    system's temporary folder: they hold PHI (the hook:
    :func:`anonproxy.pynetdicom_patches.receive_data_sets_into`). The handler removes each file
    once answered, unless it was kept (deferred); with *durable*, the files are created ahead
    with their entries on disk, and with *checksum* (most are kept: ``acknowledge:
    after_receipt``) their CRC-32 computed as they arrive (see :mod:`anonproxy.received`)."""
    pynetdicom_patches.receive_data_sets_into(
        lambda: ReceivedFile(directory, key, durable, checksum=checksum)
    )


#: How long an acceptor process waits, per connection it has open, before it takes a new one
#: from the listening socket it shares with the others (at most
#: :data:`MAX_ACCEPT_DEFERRAL_S`): a less busy process takes it meanwhile. More than the
#: interpreter's switch interval (5 ms): a busy process's accepting thread waits that long for
#: the GIL (with 1 ms, four storescu associations to two processes still went three and one in
#: 3 of 16 trials; with 5 ms, in 1 of 16).
ACCEPT_DEFERRAL_S = 0.005
MAX_ACCEPT_DEFERRAL_S = 0.025
#: How often a deferring process looks whether another took the connection.
_DEFERRAL_STEP_S = 0.001
#: How long the accept loop rests after accepting failed (the shared socket shut down while
#: the service stops, no file descriptor left), rather than trying again at once.
_FAILED_ACCEPT_PAUSE_S = 0.05


class SharedListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server on a listening socket that every acceptor
    process shares (made by the supervisor, :attr:`listener`): each new connection wakes every
    process, the first to accept has it, and the others find none (``BlockingIOError``, which
    socketserver's loop ignores).

    The processes do not race as equals. A process waits :data:`ACCEPT_DEFERRAL_S` per
    connection it has open before it accepts, so a connection goes to the least busy process;
    a busy or stuck sibling costs a new connection at most :data:`MAX_ACCEPT_DEFERRAL_S`. A
    waiting process looks every :data:`_DEFERRAL_STEP_S` whether the connection is still
    there, and goes back to waiting for the next one once another process took it: a
    connection that arrives later gets a full wait of its own. (``SO_REUSEPORT``, which this
    replaces, spread connections by a hash of their addresses: four storescu associations to
    two processes went two and two in 5 of 16 trials, three and one in 9, all four to one
    process in 2; eight to eight processes reached only 4 to 6 of them. Now: two and two in 15
    of 16, and one each of the eight in 8 of 8.)

    Closing the server closes this process's descriptor only: the socket listens while any
    process holds it (the supervisor does, for its whole run)."""

    listener: socket.socket  # set by shared_listener_server

    def server_bind(self) -> None:
        cast("socket.socket", self.socket).close()  # the one socketserver made: not used
        self.socket = self.listener
        self.socket.setblocking(False)  # a process that loses the race finds none, at once
        self.server_address = self.socket.getsockname()
        self._connections: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # accepted
        self._pending = select.poll()  # whether a connection waits on the socket
        self._pending.register(self.socket, select.POLLIN)

    def server_activate(self) -> None:
        """Nothing: the supervisor's socket is listening already."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        deferral = min(self.load() * ACCEPT_DEFERRAL_S, MAX_ACCEPT_DEFERRAL_S)
        until = time.monotonic() + deferral
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, _DEFERRAL_STEP_S))
            if not self._pending.poll(0):
                raise BlockingIOError  # another process took it
        try:
            request = super().get_request()
        except BlockingIOError:
            raise  # another process took it
        except OSError:
            time.sleep(_FAILED_ACCEPT_PAUSE_S)
            raise
        self._connections.add(request[0])
        return request

    def load(self) -> int:
        """The connections this process accepted and has not closed (pynetdicom closes the
        socket when its association ends)."""
        return sum(connection.fileno() != -1 for connection in self._connections)

    def server_close(self) -> None:
        """Close this process's descriptor of the shared socket (pynetdicom's would shut the
        socket down for every process)."""
        cast("socket.socket", self.socket).close()

    def shutdown(self) -> None:
        """Stop serving and close the socket (the server was made with ``make_server``: it is
        not in the AE's list of servers that pynetdicom's ``shutdown`` removes it from)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def shared_listener_server(listener: socket.socket) -> type[SharedListenerServer]:
    """A :class:`SharedListenerServer` class on *listener* (pynetdicom's ``server_class``)."""
    return type("SharedListenerServer", (SharedListenerServer,), {"listener": listener})


@dataclass
class AssociationRecord:
    """Counters of one association, for its closing audit record."""

    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    peer_port: int
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    stored: int = 0
    failed: int = 0


class StorageSCP:
    """The receiving side of anonproxy."""

    def __init__(
        self,
        config: ListenConfig,
        pipeline: InstancePipeline,
        audit: AuditLog,
        deferred: DeferredProcessor | None = None,
        *,
        metrics: Metrics | None = None,
        shared: SharedAssociations | None = None,
        acceptor_index: int = 0,
        reports: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        pynetdicom_patches.install()  # UnsupportedPynetdicom (a ConfigError) on another version
        self.incoming_key = pipeline.runner.incoming_key
        receive_into(
            pipeline.spool.deferred_dir,
            self.incoming_key,
            durable=pipeline.spool.fsync,
            checksum=pipeline.acknowledge_on_receipt,
        )
        self.config = config
        self.pipeline = pipeline
        self.audit = audit
        self.metrics = metrics
        self.deferred = deferred if deferred is not None else DeferredProcessor(pipeline)
        self._records: dict[int, AssociationRecord] = {}
        self._lock = threading.Lock()
        # acceptor processes: the associations of every process, and this one's region
        self.shared = shared
        self.acceptor_index = acceptor_index
        # what a C-STORE's audit records and metrics are reported within (an acceptor process:
        # one message to the service process per data set, see Channel.gathered)
        self.reports = reports
        self._counted: dict[int, str] = {}  # association -> peer address, counted in shared
        self.ae = self._build_ae()
        self.server: Any = None

    def _build_ae(self) -> AE:
        # Access control (see anonproxy.access) is decided in handle_requested; pynetdicom's own
        # checks of the AE titles stay on behind it.
        self.access = AccessPolicy(self.config)
        self._rejections: dict[int, Rejection] = {}
        self.ssl_context: ssl.SSLContext | None = None
        if self.config.tls is not None:
            self.ssl_context = tls.server_context(self.config.tls)
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = self.config.allowed_ae_titles
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        ae.network_timeout = self.config.network_timeout
        syntaxes = list(AllTransferSyntaxes)
        accepted = sop_classes.resolve(self.config.sop_classes)
        sop_classes.register_storage(accepted)
        for sop_class in accepted:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification, syntaxes)
        self.contexts = pynetdicom_patches.shared_contexts(ae.supported_contexts)  # built once
        return ae

    @property
    def handlers(self) -> list[Any]:
        """The pynetdicom event handlers of the SCP."""
        return [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_CONN_OPEN, self.handle_connection_opened),
            (evt.EVT_CONN_OPEN, self.handle_guard_pdus),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_idle_abort),
            (evt.EVT_ABORTED, self.handle_closed),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store_within_limits),
            *(
                []
                if self.shared is None
                else [
                    (event, self.handle_uncount)
                    for event in (
                        evt.EVT_REJECTED, evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE
                    )
                ]
            ),
        ]  # fmt: skip

    def start(self, listener: socket.socket | None = None) -> None:
        """Listen in the background: on a socket of its own, or on *listener*, the listening
        socket the acceptor processes share (:class:`SharedListenerServer`)."""
        address = (self.config.host, self.config.port)
        if listener is None:
            self.server = self.ae.start_server(
                address,
                block=False,
                evt_handlers=self.handlers,
                ssl_context=self.ssl_context,
                contexts=self.contexts,
            )
            return
        self.server = self.ae.make_server(
            address,
            evt_handlers=self.handlers,
            ssl_context=self.ssl_context,
            contexts=self.contexts,
            server_class=shared_listener_server(listener),
        )
        threading.Thread(
            target=self.server.serve_forever, name="acceptor-server", daemon=True
        ).start()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        return int(self.server.server_address[1])

    def stop_accepting(self) -> None:
        """Close the listening socket; running associations go on."""
        if self.server is not None:
            self.server.shutdown()

    def active_associations(self) -> int:
        """How many associations are still running."""
        return len(self.ae.active_associations)

    def shutdown(self) -> None:
        """Abort whatever is still running."""
        self.ae.shutdown()
        if isinstance(self.server, SharedListenerServer):
            self.server.server_close()

    # -- association events ---------------------------------------------------------------

    @staticmethod
    def _describe(assoc: Association) -> dict[str, Any]:
        return {
            "calling_ae_title": str(assoc.requestor.ae_title).strip(),
            "called_ae_title": str(assoc.acceptor.ae_title).strip(),
            "peer_address": assoc.requestor.address,
            "peer_port": assoc.requestor.port,
        }

    def handle_connection_opened(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN (TLS only): shake hands in the connection's own thread, within the
        ACSE time-out. A failed handshake closes the connection and is audited as
        ``association.rejected`` (reason ``tls_handshake_failed``)."""
        assoc = event.assoc
        failure = pynetdicom_patches.finish_tls_handshake(assoc, self.config.acse_timeout)
        if failure is not None:
            self.audit.event(
                "association.rejected",
                reason="tls_handshake_failed",
                detail=tls.failure_reason(failure),
                peer_address=assoc.requestor.address,
                peer_port=assoc.requestor.port,
            )

    def handle_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: apply the access policy to the A-ASSOCIATE-RQ (see
        :mod:`anonproxy.access`); a refusal is an A-ASSOCIATE-RJ and EVT_REJECTED."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # noqa: S101 - EVT_REQUESTED follows the A-ASSOCIATE-RQ
        address = assoc.requestor.address
        if self.shared is None:
            acceptors = [a for a in self.ae.active_associations if a.is_acceptor]
            active = len(acceptors)
            from_peer = sum(a.requestor.address == address for a in acceptors)
        else:  # every acceptor process's
            active, from_peer, counted = self.shared.enter(self.acceptor_index, address)
            if counted:
                with self._lock:
                    self._counted[id(assoc)] = address
        rejection = self.access.check(
            called_ae_title=str(request.called_ae_title),
            calling_ae_title=str(request.calling_ae_title),
            address=address,
            active=active,
            active_from_peer=from_peer,
        )
        if rejection is None:
            return
        with self._lock:
            self._rejections[id(assoc)] = rejection
        evt.trigger(assoc, evt.EVT_REJECTED, {})  # audited before the peer hears of it
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        assoc.kill()  # returns once the A-ASSOCIATE-RJ is sent and the connection closed

    def handle_uncount(self, event: evt.Event) -> None:
        """EVT_REJECTED, EVT_RELEASED, EVT_ABORTED, EVT_CONN_CLOSE (acceptor processes): the
        association no longer counts in the shared limits (once)."""
        with self._lock:
            address = self._counted.pop(id(event.assoc), None)
        if address is not None and self.shared is not None:
            self.shared.leave(self.acceptor_index, address)

    def handle_accepted(self, event: evt.Event) -> None:
        """EVT_ACCEPTED: start the association's record."""
        record = AssociationRecord(**self._describe(event.assoc))
        with self._lock:
            self._records[id(event.assoc)] = record
        sock = pynetdicom_patches.tls_socket(event.assoc)
        self.audit.event(
            "association.accepted",
            assoc_id=id(event.assoc),
            contexts=len(event.assoc.accepted_contexts),
            **self._describe(event.assoc),
            **(tls.session_summary(sock) if sock is not None else {}),
        )

    def handle_rejected(self, event: evt.Event) -> None:
        """EVT_REJECTED: audit the rejection, with its reason, result, source and diagnostic."""
        assoc = event.assoc
        with self._lock:
            rejection = self._rejections.pop(id(assoc), None)
        if rejection is None:  # decided by pynetdicom itself
            answer = assoc.acceptor.primitive
            assert answer is not None  # noqa: S101 - pynetdicom has sent its A-ASSOCIATE-RJ
            rejection = Rejection.from_primitive(
                int(answer.result or 0), int(answer.result_source or 0), int(answer.diagnostic or 0)
            )
        request = assoc.requestor.primitive
        assert request is not None  # noqa: S101 - a rejection answers an A-ASSOCIATE-RQ
        self.audit.event(
            "association.rejected",
            calling_ae_title=str(request.calling_ae_title).strip(),
            called_ae_title=str(request.called_ae_title).strip(),
            peer_address=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            **rejection.audit_fields(),
        )

    def handle_idle_abort(self, event: evt.Event) -> None:
        """EVT_ABORTED: audit ``association.idle_timeout`` when anonproxy aborts an association
        that stayed silent for ``network_timeout`` seconds (``association.aborted`` follows)."""
        if event.assoc.dul.idle_timer_expired():
            self.audit.event(
                "association.idle_timeout",
                assoc_id=id(event.assoc),
                network_timeout_s=self.config.network_timeout,
                **self._describe(event.assoc),
            )

    def handle_closed(self, event: evt.Event) -> None:
        """EVT_RELEASED, EVT_ABORTED, EVT_CONN_CLOSE: remove a data set left half-received
        (its descriptor closed), and close the record once."""
        abandoned = pynetdicom_patches.data_set_in_progress(event.assoc)
        if isinstance(abandoned, ReceivedFile):
            abandoned.discard()
        with self._lock:
            record = self._records.pop(id(event.assoc), None)
        if record is None:
            return
        name = "association.released" if event.event is evt.EVT_RELEASED else "association.aborted"
        if event.event is evt.EVT_CONN_CLOSE:
            # The reactor thread triggers EVT_RELEASED after queueing the A-RELEASE-RP; the peer
            # can close first, and pynetdicom then triggers EVT_CONN_CLOSE before it.
            guard = self._guard(event.assoc)
            released = guard is not None and guard.release_requested
            name = "association.released" if released else "association.closed"
        self.audit.event(
            name,
            assoc_id=id(event.assoc),
            calling_ae_title=record.calling_ae_title,
            called_ae_title=record.called_ae_title,
            peer_address=record.peer_address,
            peer_port=record.peer_port,
            received=record.received,
            stored=record.stored,
            failed=record.failed,
            duration_s=round(time.monotonic() - record.started, 3),
        )

    def handle_guard_pdus(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: check every PDU header before its body is read (see
        :class:`anonproxy.limits.PduGuard`, hooked in by
        :func:`anonproxy.pynetdicom_patches.guard_pdus`); a refusal is an A-ABORT, audited as
        ``association.protocol_violation`` with the reason and the declared length."""
        assoc = event.assoc

        def violation(reason: str, details: dict[str, object]) -> None:
            self.audit.event(
                "association.protocol_violation",
                reason=reason,
                assoc_id=id(assoc),
                peer_address=assoc.requestor.address,
                peer_port=assoc.requestor.port,
                **details,
            )

        guard = limits.PduGuard(
            self.config.max_pdu_size, violation, max_data_set_bytes=self.config.max_instance_bytes
        )
        pynetdicom_patches.guard_pdus(assoc, guard, read_timeout=self.config.network_timeout)

    @staticmethod
    def _guard(assoc: Association) -> limits.PduGuard | None:
        guard = pynetdicom_patches.pdu_guard(assoc)
        return guard if isinstance(guard, limits.PduGuard) else None

    def _refuse_store(self, event: evt.Event, status: StoreStatus, reason: str) -> Dataset | int:
        """Answer a C-STORE refused by a limit, audited as ``instance.failed``."""
        fields: dict[str, object] = {
            "sop_class_uid": str(event.request.AffectedSOPClassUID),
            "assoc_id": id(event.assoc),
        }
        return self._answer(
            self._record(event), self.pipeline.refuse(status, "limits", reason, fields)
        )

    def handle_store_within_limits(self, event: evt.Event) -> Dataset | int:
        """EVT_C_STORE: apply ``max_instance_bytes`` (inflation bounded, see
        :mod:`anonproxy.limits`) before anything decodes the data set, then
        :meth:`handle_store` (the structure checks run with the decoding, in the pipeline).
        The received file is removed afterwards, whatever the outcome.

        * ``StoreStatus.INSTANCE_TOO_LARGE`` (0xA701): larger than ``max_instance_bytes``;
        * ``StoreStatus.CANNOT_UNDERSTAND`` (0xC000): a corrupt deflate stream, or no data set.
        """
        with self.reports():
            return self._handle_store_within_limits(event)

    def _handle_store_within_limits(self, event: evt.Event) -> Dataset | int:
        received = pynetdicom_patches.received_file(event)
        if not isinstance(received, ReceivedFile):  # a C-STORE request without a data set
            return self._refuse_store(event, StoreStatus.CANNOT_UNDERSTAND, "no data set")
        if self.metrics is not None:
            self.metrics.data_set_received(time.monotonic() - received.started)
        try:
            received.finish()
            refusal = self._refusal_by_limits(event, received.path)
            return refusal if refusal is not None else self.handle_store(event, received)
        finally:
            received.discard()  # unless kept: then renamed already

    def _refusal_by_limits(self, event: evt.Event, received: Path) -> Dataset | int | None:
        """The answer to a data set over ``max_instance_bytes``, or None. The PDU guard bounded
        its bytes as they arrived; only a deflated one is read again, to bound its inflation."""
        guard = self._guard(event.assoc)
        if guard is not None and guard.data_sets.oversized:  # the excess was never kept
            guard.data_sets.oversized = False
            return self._refuse_store(
                event, StoreStatus.INSTANCE_TOO_LARGE, "data set exceeds max_instance_bytes"
            )
        deflated = bool(event.context.transfer_syntax.is_deflated)
        if guard is not None and not deflated:
            return None
        try:
            with opened(received, self.incoming_key) as plain:
                limits.check_received_file(
                    plain, deflated=deflated, max_bytes=self.config.max_instance_bytes
                )
        except SealError as exc:
            return self._refuse_store(event, StoreStatus.CANNOT_UNDERSTAND, str(exc))
        except LimitExceeded as exc:
            return self._refuse_store(event, StoreStatus.INSTANCE_TOO_LARGE, str(exc))
        except DecodeError as exc:
            return self._refuse_store(event, StoreStatus.CANNOT_UNDERSTAND, str(exc))
        return None

    # -- DIMSE services ---------------------------------------------------------------------

    def handle_echo(self, event: evt.Event) -> int:
        """EVT_C_ECHO: the Verification SCP always answers Success (0x0000)."""
        del event
        return EchoStatus.SUCCESS

    def handle_store(self, event: evt.Event, received: ReceivedFile) -> Dataset | int:
        """EVT_C_STORE: de-identify and spool one instance, or keep it durably to be
        de-identified behind when the pipeline defers it
        (:meth:`~anonproxy.pipeline.InstancePipeline.should_defer`,
        :mod:`anonproxy.deferred`).

        *received* is the file pynetdicom wrote as the data set arrived (preamble, file meta,
        data set untouched; sealed with ``storage.incoming_key_file``); it is decoded in the
        pipeline, not in this thread. Returns a status (a dataset when it has a comment):

        * ``StoreStatus.SUCCESS`` (0x0000): de-identified and durably spooled, or, deferred,
          durably kept in the incoming spool;
        * ``StoreStatus.OUT_OF_RESOURCES`` (0xA700): the spool (deferred: the incoming spool,
          ``storage.incoming_max_bytes``) cannot take it; retry later;
        * ``StoreStatus.CANNOT_UNDERSTAND`` (0xC000): the data set cannot be parsed;
        * ``StoreStatus.DEIDENTIFICATION_FAILED`` (0xC001): it cannot be fully de-identified or
          is refused by policy; it is not forwarded;
        * ``StoreStatus.PROCESSING_FAILURE`` (0x0110): it cannot be encoded for the spool.

        References: PS3.4 Annex B.2.3; PS3.7 Annex C.
        """
        record = self._record(event)
        sop_class_uid = str(event.request.AffectedSOPClassUID)
        calling_ae_title = record.calling_ae_title if record else ""
        if self.pipeline.should_defer(sop_class_uid):
            outcome = self.deferred.accept(
                received,
                sop_class_uid=sop_class_uid,
                calling_ae_title=calling_ae_title,
                assoc_id=id(event.assoc),
            )
        else:
            outcome = self.pipeline.process(
                received.path,
                sop_class_uid=sop_class_uid,
                calling_ae_title=calling_ae_title,
                assoc_id=id(event.assoc),
            )
        return self._answer(record, outcome)

    def _record(self, event: evt.Event) -> AssociationRecord | None:
        with self._lock:
            return self._records.get(id(event.assoc))

    def _answer(self, record: AssociationRecord | None, outcome: StoreOutcome) -> Dataset | int:
        """Count the outcome in the association's record and the metrics; the C-STORE
        response status (a number when there is no comment: no dataset to build)."""
        if self.metrics is not None:
            self.metrics.store_answered(outcome.status)
        if record is not None:
            record.received += 1
            if code_to_category(outcome.status) in {"Success", "Warning"}:
                record.stored += 1
            else:
                record.failed += 1
        if not outcome.comment:
            return int(outcome.status)
        status = Dataset()
        status.Status = int(outcome.status)
        if outcome.comment:
            status.ErrorComment = outcome.comment
        return status

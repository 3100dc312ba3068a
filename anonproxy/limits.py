"""Resource limits on what a peer sends: PDU lengths, instance size, inflation, nesting depth.

Four bounds protect the SCP from a hostile or broken peer (issue 5, item 3):

* **PDU length.** pynetdicom reads the 6-byte PDU header, then reads (and accumulates) as many
  bytes as the header declares, up to 4 GiB, before it looks at them. :class:`PduGuard` sits
  between pynetdicom's upper layer and its socket (installed on EVT_CONN_OPEN, before the first
  read) and checks each header as it passes: a P-DATA-TF PDU longer than the maximum PDU
  length anonproxy advertised (``listen.max_pdu_size``), or any other PDU longer than
  :data:`MAX_CONTROL_PDU_BYTES`, is refused *before its body is read*: the guard sends an
  A-ABORT (service-provider, invalid-PDU-parameter-value) and closes the connection. The guard
  also checks that the PDV items of a P-DATA-TF PDU exactly fill it, and refuses an unknown
  PDU type at once (A-ABORT, unrecognized-PDU) rather than letting pynetdicom read every
  following 6 bytes as one more PDU header.
* **Instance size** (``listen.max_instance_bytes``): a C-STORE data set larger than the limit
  (as received, or once inflated for the Deflated transfer syntax) is refused with
  :attr:`~anonproxy.status.StoreStatus.INSTANCE_TOO_LARGE` before it is decoded.
* **Inflation.** pydicom (through pynetdicom) inflates a deflated data set in one
  ``zlib.decompress`` call, without a bound. :func:`inflated_size` inflates it first, piece by
  piece with zlib's ``max_length``, keeping nothing, and stops as soon as the limit is passed:
  a decompression bomb costs at most the limit in CPU and a few kilobytes of memory.
* **Structure** (``listen.max_sequence_depth``): :func:`check_structure` (the engine's,
  :mod:`anonproxy.deid.structure`, re-exported here) walks the sequences of a decoded data set
  without recursion and without converting any other element, and refuses, before
  de-identification, one nested deeper than the limit, an unknown VR, a truncated value, an odd
  value length or an unknown Specific Character Set.

Messages and audit fields carry lengths and limits only, never a value of the data set.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anonproxy.deid.files import data_set_offset, inflated_size
from anonproxy.deid.structure import check_structure as check_structure  # noqa: PLC0414 - re-export
from anonproxy.errors import LimitExceeded

MAX_CONTROL_PDU_BYTES = 1 << 20
"""Longest PDU other than P-DATA-TF accepted (A-ASSOCIATE-RQ with 128 presentation contexts
and every transfer syntax is far shorter); A-RELEASE and A-ABORT PDUs are 4 bytes long."""

_P_DATA_TF = 0x04
_A_RELEASE_RQ = 0x05
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_UNRECOGNIZED_PDU = 0x01
_ABORT_INVALID_PARAMETER_VALUE = 0x06

Violation = Callable[[str, dict[str, object]], None]
"""Called with a reason and data-free details when the guard refuses a PDU."""


def abort_pdu(reason: int = _ABORT_INVALID_PARAMETER_VALUE) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8) from the service provider with *reason*."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, _ABORT_SOURCE_PROVIDER, reason)


def pdv_items_fill(body: bytes | bytearray) -> bool:
    """True when the PDV items of a P-DATA-TF PDU body exactly fill it (PS3.8 9.3.5.1): each
    has a length of at least 2 (context ID and message control header) within the PDU."""
    offset, end = 0, len(body)
    if end == 0:
        return False
    while offset < end:
        if end - offset < 6:
            return False
        (length,) = struct.unpack_from(">L", body, offset)
        if length < 2 or length > end - offset - 4:
            return False
        offset += 4 + length
    return True


class DataSetBound:
    """Drops the data set bytes of received P-DATA beyond *max_bytes* (None: no bound), so that
    an oversized C-STORE never reaches the disk in full; :attr:`oversized` tells the C-STORE
    handler, which then answers 0xA701 (the message itself still completes normally)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.oversized = False  # the last complete data set was cut
        self._received = 0  # bytes of the data set being received
        self._dropping = False

    def take(self, primitive: Any) -> None:  # noqa: ANN401 - a pynetdicom P_DATA primitive
        """Count the data set fragments of *primitive*; past the bound, keep only their
        message control header (PS3.8 E.2)."""
        if self.max_bytes is None:
            return
        items = primitive.presentation_data_value_list
        for index, (context_id, value) in enumerate(items):
            control = value[0]
            if control & 0x01:  # a command fragment
                continue
            self._received += len(value) - 1
            self._dropping = self._dropping or self._received > self.max_bytes
            if self._dropping:
                items[index] = [context_id, value[:1]]
            if control & 0x02:  # the last fragment: the next data set starts afresh
                self.oversized, self._dropping, self._received = self._dropping, False, 0


class PduGuard:
    """Checks every PDU header a pynetdicom acceptor reads, before the body is read.

    :meth:`install` replaces the ``recv`` of the association's
    :class:`pynetdicom.transport.AssociationSocket` (the only reader is the upper layer's
    ``_read_pdu_data``, which reads a 6-byte header, then the body in one call), and keeps the
    upper layer from reading while the association request is being decided (state Sta3).
    """

    def __init__(
        self,
        assoc: Any,  # noqa: ANN401 - pynetdicom Association
        max_pdu_size: int,
        on_violation: Violation,
        max_data_set_bytes: int | None = None,
    ) -> None:
        self.assoc = assoc
        self.max_pdu_size = max_pdu_size
        self.on_violation = on_violation
        self.data_sets = DataSetBound(max_data_set_bytes)
        self.tripped = False
        self.release_requested = False  # an A-RELEASE-RQ was read (the peer ends normally)
        self._body_type: int | None = None  # the type of the PDU whose body comes next
        self._recv: Callable[[int], bytearray] = assoc.dul.socket.recv

    @classmethod
    def install(
        cls,
        assoc: Any,  # noqa: ANN401 - pynetdicom Association
        max_pdu_size: int,
        on_violation: Violation,
        read_timeout: float | None = None,
        max_data_set_bytes: int | None = None,
    ) -> PduGuard:
        """Guard the socket of *assoc* (call on EVT_CONN_OPEN, before its first read).

        With *read_timeout*, a read that waits longer (a peer that stops in the middle of a
        PDU) fails, and the upper layer sees the connection closed: pynetdicom reads a PDU in a
        blocking loop, where its own idle time-out is never checked.

        With *max_data_set_bytes*, data sets are bounded as they arrive (see
        :class:`DataSetBound`, the guard's ``data_sets``).
        """
        guard = cls(assoc, max_pdu_size, on_violation, max_data_set_bytes)
        assoc.anonproxy_guard = guard
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None and read_timeout is not None:
            raw.settimeout(read_timeout)
        assoc.dul.socket.recv = guard.recv
        transport_event: Callable[[], bool] = assoc.dul._is_transport_event

        def hold_while_deciding() -> bool:
            # Sta3: the A-ASSOCIATE-RQ is being decided. pynetdicom's state machine has no
            # transition for the local answer (Evt7/Evt8) once anything read here has moved it
            # on (garbage or an A-ABORT: Sta13 or Sta1), and its reactor thread then dies with
            # InvalidEventError. Read nothing until the answer is sent, nor while an event
            # read earlier waits (the A-ASSOCIATE-RQ's own Evt6, behind Evt5).
            dul = assoc.dul
            if dul.state_machine.current_state == "Sta3" or not dul.event_queue.empty():
                return False
            return transport_event()

        assoc.dul._is_transport_event = hold_while_deciding

        # A P-DATA-TF whose command set lacks Command Field (or is otherwise undecodable)
        # raises in pynetdicom's DIMSE decoder inside the reactor thread, which dies and leaves
        # the association (and its slot) behind. Turn that into Evt19 (A-ABORT), as pynetdicom
        # does itself for messages that fail later.
        dimse = assoc.dimse
        receive: Callable[[Any], None] = dimse.receive_primitive

        def receive_or_abort(primitive: Any) -> None:  # noqa: ANN401 - a P_DATA primitive
            try:
                guard.data_sets.take(primitive)
                receive(primitive)
            except Exception:  # noqa: BLE001 - any decoding failure is a protocol violation
                dimse.message = None
                if not guard.tripped:
                    guard.on_violation("invalid_dimse_message", {"pdu_type": _P_DATA_TF})
                assoc.dul.event_queue.put("Evt19")

        dimse.receive_primitive = receive_or_abort
        return guard

    def limit(self, pdu_type: int) -> int:
        """The longest body accepted for a PDU of *pdu_type*."""
        if pdu_type == _P_DATA_TF and self.max_pdu_size:
            return self.max_pdu_size
        if pdu_type == _P_DATA_TF:
            return 0xFFFFFFFF  # max_pdu_size 0: unlimited, as advertised
        return MAX_CONTROL_PDU_BYTES

    def recv(self, nr_bytes: int) -> bytearray:
        """Read like ``AssociationSocket.recv``; an empty read once a PDU has been refused."""
        if self.tripped:
            return bytearray()
        if self._body_type is None:
            header = self._recv(nr_bytes)
            if nr_bytes == 6 and len(header) == 6:
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type not in _KNOWN_PDU_TYPES:
                    self._refuse("unknown_pdu_type", _ABORT_UNRECOGNIZED_PDU, pdu_type=pdu_type)
                    return bytearray()
                if length > self.limit(pdu_type):
                    self._refuse(
                        "pdu_too_long",
                        _ABORT_INVALID_PARAMETER_VALUE,
                        pdu_type=pdu_type,
                        declared_length=length,
                        limit=self.limit(pdu_type),
                    )
                    return bytearray()
                self._body_type = pdu_type
                self.release_requested |= pdu_type == _A_RELEASE_RQ
            return header
        pdu_type, self._body_type = self._body_type, None
        body = self._recv(nr_bytes)
        if pdu_type == _P_DATA_TF and len(body) == nr_bytes and not pdv_items_fill(body):
            self._refuse(
                "pdv_length_inconsistent",
                _ABORT_INVALID_PARAMETER_VALUE,
                pdu_type=pdu_type,
                declared_length=nr_bytes,
            )
            return bytearray()
        return body

    def _refuse(self, reason: str, abort_reason: int, **details: object) -> None:
        """A-ABORT the peer and close the connection; the upper layer then sees it closed."""
        self.tripped = True
        self.on_violation(reason, details)
        raw = getattr(self.assoc.dul.socket, "socket", None)
        if raw is None:
            return
        try:
            raw.sendall(abort_pdu(abort_reason))
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already


def check_received_file(path: Path, *, deflated: bool, max_bytes: int) -> None:
    """Refuse a received data set (the file pynetdicom wrote: preamble, file meta, data set)
    larger than *max_bytes* (once inflated, when deflated).

    Raises :class:`LimitExceeded` (or :class:`DecodeError` for a corrupt deflate stream).
    """
    with path.open("rb") as handle:
        start = data_set_offset(handle)
        size = os.fstat(handle.fileno()).st_size - start
        if size > max_bytes:
            raise LimitExceeded("data set exceeds max_instance_bytes")
        if deflated:
            handle.seek(start)
            inflated_size(handle, max_bytes)

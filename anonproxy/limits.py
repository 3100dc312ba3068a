"""Resource limits on what a peer sends: PDU lengths, instance size, inflation, nesting depth.

Four bounds protect the SCP from a hostile or broken peer (issue 5, item 3):

* **PDU length.** pynetdicom reads the 6-byte PDU header, then reads (and accumulates) as many
  bytes as the header declares, up to 4 GiB, before it looks at them. :class:`PduGuard` sits
  between pynetdicom's upper layer and its socket (hooked in by
  :func:`anonproxy.pynetdicom_patches.guard_pdus` on EVT_CONN_OPEN, before the first read) and
  checks each header as it passes: a P-DATA-TF PDU longer than the maximum PDU
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
import struct
from collections.abc import Callable
from pathlib import Path

from pynetdicom.pdu_primitives import P_DATA

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

    def fits(self, size: int) -> bool:
        """Count *size* bytes of data set fragments, none the last, when they are within the
        bound; False, nothing counted, when they are not (:meth:`take` must cut them)."""
        if self.max_bytes is None:
            return True
        if self._dropping or self._received + size > self.max_bytes:
            return False
        self._received += size
        return True

    def take(self, primitive: P_DATA) -> None:
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
                items[index] = (context_id, value[:1])
            if control & 0x02:  # the last fragment: the next data set starts afresh
                self.oversized, self._dropping, self._received = self._dropping, False, 0


class PduGuard:
    """Checks every PDU header a pynetdicom acceptor reads, before the body is read.

    The policy only: :func:`anonproxy.pynetdicom_patches.guard_pdus` puts it between the
    association's upper layer and its socket (on EVT_CONN_OPEN, before the first read), hands
    it the socket's own read (:meth:`attach`) and shows it each received P-DATA
    (:meth:`take`) and each message the DIMSE layer cannot decode (:meth:`undecodable`).
    """

    def __init__(
        self,
        max_pdu_size: int,
        on_violation: Violation,
        max_data_set_bytes: int | None = None,
    ) -> None:
        self.max_pdu_size = max_pdu_size
        self.on_violation = on_violation
        self.data_sets = DataSetBound(max_data_set_bytes)
        self.tripped = False
        self.release_requested = False  # an A-RELEASE-RQ was read (the peer ends normally)
        self._body_type: int | None = None  # the type of the PDU whose body comes next
        self._recv: Callable[[int], bytearray] = lambda _: bytearray()
        self._abort: Callable[[bytes], None] = lambda _: None

    def attach(self, read: Callable[[int], bytearray], abort: Callable[[bytes], None]) -> None:
        """*read*: the socket's own ``recv``; *abort*: sends an A-ABORT PDU and closes the
        connection (the upper layer then sees it closed)."""
        self._recv, self._abort = read, abort

    def take(self, primitive: P_DATA) -> None:
        """A received P-DATA, before it is decoded: bounded by :attr:`data_sets`."""
        self.data_sets.take(primitive)

    def fits(self, size: int) -> bool:
        """Data set fragments written without a P-DATA (see :meth:`DataSetBound.fits`)."""
        return self.data_sets.fits(size)

    def undecodable(self) -> None:
        """The DIMSE layer cannot decode a received message: it is aborted (unless a refusal
        of this guard's came first)."""
        if not self.tripped:
            self.on_violation("invalid_dimse_message", {"pdu_type": _P_DATA_TF})

    def invalid_pdu(self, pdu_type: int) -> None:
        """A received PDU has parameters pynetdicom refuses (an even presentation context ID,
        say): it is aborted as an invalid PDU."""
        self.on_violation("invalid_pdu_parameters", {"pdu_type": pdu_type})

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
        self._abort(abort_pdu(abort_reason))


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

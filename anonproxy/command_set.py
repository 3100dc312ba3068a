"""The command set of a C-STORE or C-ECHO message, encoded and decoded without pydicom.

Every DIMSE message starts with its command set: elements of group 0000 (PS3.7 Annex E),
always encoded Implicit VR Little Endian (PS3.7 6.3.1). pynetdicom builds each command set it
sends as a pydicom data set and encodes it twice (once for the Command Group Length, once to
send it), and reads each one it receives through a pydicom data set, element by element: about
0.45 ms per message sent and 0.15 ms per message received. An instance costs two messages in
the acceptor (the C-STORE request in, its response out) and two in a forward sender.

The proxy exchanges C-STORE and C-ECHO messages only; :func:`encode` and :func:`decode` know
their elements (:data:`ELEMENTS`). Either returns None for anything else: an element not
listed, a value of another type, text that is not plain (printable ASCII without a backslash,
which would make several values; for a UID, digits and dots), a value longer than its VR
allows, an empty or repeated element. The caller then takes pydicom's path, so every value
outside what these functions take behaves as before, warnings and errors included.
:mod:`anonproxy.pynetdicom_patches` (patch ``command_sets``) uses them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping

#: The command elements of C-STORE and C-ECHO messages (PS3.7 Table E.1-1) but (0000,0901)
#: Offending Element (AT, left to pydicom): keyword -> (element number in group 0000, VR).
ELEMENTS: Mapping[str, tuple[int, str]] = {
    "CommandGroupLength": (0x0000, "UL"),
    "AffectedSOPClassUID": (0x0002, "UI"),
    "CommandField": (0x0100, "US"),
    "MessageID": (0x0110, "US"),
    "MessageIDBeingRespondedTo": (0x0120, "US"),
    "Priority": (0x0700, "US"),
    "CommandDataSetType": (0x0800, "US"),
    "Status": (0x0900, "US"),
    "ErrorComment": (0x0902, "LO"),
    "AffectedSOPInstanceUID": (0x1000, "UI"),
    "MoveOriginatorApplicationEntityTitle": (0x1030, "AE"),
    "MoveOriginatorMessageID": (0x1031, "US"),
}
_BY_ELEMENT = {element: (keyword, vr) for keyword, (element, vr) in ELEMENTS.items()}
_GROUP_LENGTH = ELEMENTS["CommandGroupLength"][0]
_MAX_LENGTH = {"UI": 64, "AE": 16, "LO": 64}  # characters (PS3.5 6.2)
_PADDING = {"UI": b"\0", "AE": b" ", "LO": b" "}
_PLAIN = {"UI": re.compile(r"[0-9.]*"), "AE": re.compile(r"[ -\[\]-~]*")}
_PLAIN["LO"] = _PLAIN["AE"]
_HEADER = struct.Struct("<HHI")  # group, element, value length (Implicit VR)
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


def _plain(vr: str, text: str) -> bool:
    return len(text) <= _MAX_LENGTH[vr] and _PLAIN[vr].fullmatch(text) is not None


def _encode_value(vr: str, value: object) -> bytes | None:
    if value is None:
        return b""  # an element without a value, as pydicom writes one
    if vr == "US":
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            return None
        return _US.pack(value)
    if not isinstance(value, str) or not _plain(vr, value):
        return None
    encoded = value.encode("ascii")
    return encoded + _PADDING[vr] if len(encoded) % 2 else encoded


def encode(values: Mapping[str, object]) -> bytes | None:
    """The command set of *values* (keyword -> value; None: the element without a value),
    the Command Group Length first, the elements in tag order; None when a keyword or a value
    is not one this module takes."""
    elements = []
    for keyword, value in values.items():
        known = ELEMENTS.get(keyword)
        if known is None or known[0] == _GROUP_LENGTH:
            return None
        encoded = _encode_value(known[1], value)
        if encoded is None:
            return None
        elements.append((known[0], encoded))
    elements.sort()
    body = b"".join(_HEADER.pack(0, element, len(data)) + data for element, data in elements)
    return _HEADER.pack(0, _GROUP_LENGTH, _UL.size) + _UL.pack(len(body)) + body


def _decode_value(vr: str, data: bytes) -> int | str | None:
    if vr == "US":
        return _US.unpack(data)[0] if len(data) == _US.size else None
    if vr == "UL":
        return _UL.unpack(data)[0] if len(data) == _UL.size else None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    # pydicom's readings: a UID without trailing nulls and spaces, an AE title without
    # leading and trailing spaces, LO text without trailing nulls and spaces
    text = text.strip(" ") if vr == "AE" else text.rstrip("\0 ")
    return text if text and _plain(vr, text) else None


def decode(data: bytes) -> dict[str, int | str] | None:
    """The values of the command set *data* by keyword; None when it holds anything this
    module does not take (then pydicom reads it)."""
    values: dict[str, int | str] = {}
    position, end, last = 0, len(data), -1
    while position < end:
        if position + _HEADER.size > end:
            return None
        group, element, length = _HEADER.unpack_from(data, position)
        position += _HEADER.size
        known = _BY_ELEMENT.get(element)
        if group != 0 or known is None or element <= last or position + length > end:
            return None
        value = _decode_value(known[1], data[position : position + length])
        if value is None:
            return None
        values[known[0]] = value
        position += length
        last = element
    return values

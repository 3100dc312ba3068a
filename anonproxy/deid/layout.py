"""Write only what changed: a de-identified header made of the received bytes of the elements
the engine left alone and new encodings of the others.

Encoding a whole header with pydicom's writer (every element through the generic writer, the
file meta deep-copied and validated) costs more than the de-identification decisions. The
engine leaves most elements of an image untouched, so :func:`encode_changed` copies those and
encodes only the rest. Its output is the bytes the full writer (``dcmwrite``) gives for the
same data set; the layout decisions:

* **What is copied.** pydicom keeps every element nobody has accessed as the bytes it read (a
  :class:`RawDataElement`: tag, VR, length and value as received, immutable); the engine
  converts an element to read or change it, or replaces it. So a raw element still in the data
  set is unchanged, and its received encoding is its header — tag, VR and length, 8 or 12
  bytes, re-packed from the raw element — followed by the value bytes pydicom already holds:
  neither a second copy of the header nor any decoding is needed. pydicom's writer writes a
  raw element the same way, so the copy is byte for byte what it would write. (Recording the
  byte ranges of the received elements instead costs a walk of the header and a second copy of
  it in memory, for the same bytes.)
* **What is encoded.** Everything else — converted (read, perhaps changed), replaced or
  inserted elements, sequences — in the character set of the data set: a single value or a
  list of plain values of the VRs the engine writes most (text, codes, dates, UIDs, numbers;
  :func:`_encode_plain`) the way pydicom's writers encode them; a sequence item by item when
  pydicom would write its items element by element as they are (:func:`_encode_item`), its
  items and itself keeping the defined or undefined lengths pydicom recorded; anything else
  (person names, tags, most binary values, values pydicom stores in its own types, an item it
  would re-encode) by pydicom's ``write_data_element``, as the full writer does. Any doubt is
  pydicom's encoding.
* **The encoding stays.** :class:`Layout` records the transfer syntax a file was read in by
  :func:`~anonproxy.deid.files.read_received` (with preamble and file meta, not deflated, its
  elements encoded as the syntax says). The writer only runs while the data set is still in
  that transfer syntax and character set (pydicom's own test of whether it must re-encode every
  element). Otherwise :func:`encode_changed` returns None and the caller writes the whole
  header (e.g. pixels decoded and stored losslessly by
  :func:`~anonproxy.deid.pixels.blank_decoded`, or a rewritten Specific Character Set).
* **Group lengths.** Above group 6 they are not written (PS3.5 7.2), as pydicom does; the
  engine removes them anyway.
* **File meta.** Encoded anew (the Media Storage SOP Instance UID changes): a shallow copy of
  the data set's file meta with the changes ``dcmwrite(..., enforce_file_format=True)`` makes
  (Media Storage SOP Class and Instance UIDs from the data set, File Meta Information Version
  and Implementation Class UID when missing, a new group length), checked and completed by
  pydicom's ``validate_file_meta``, encoded element by element behind the data set's preamble
  (as dcmwrite: 128 zero bytes without one, which the engine sees to). The data set's own file
  meta elements are never modified.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from anonproxy.deid.structure import get_decoded, held_elements

#: Explicit VRs whose header has two reserved bytes and a 4-byte length (PS3.5 7.1.2): OB, OD,
#: OF, OL, OV, OW, SQ, SV, UC, UN, UR, UT, UV.
LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
#: VRs written in the default character set, and the byte that pads them to even length.
_ASCII_VRS = {"AE": b" ", "AS": b" ", "CS": b" ", "DA": b" ", "DT": b" ", "TM": b" ", "UI": b"\0"}
_DEFAULT_CODECS = convert_encodings([default_encoding])
_NUMBER_STRING_VRS = frozenset({"DS", "IS"})
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_BINARY_NUMBER_VRS = {
    "FD": "d",
    "FL": "f",
    "SL": "l",
    "SS": "h",
    "SV": "q",
    "UL": "L",
    "US": "H",
    "UV": "Q",
}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_ITEM = (0xFFFE, 0xE000)
_ITEM_DELIMITER = (0xFFFE, 0xE00D)
_PREAMBLE = b"\x00" * 128
_GROUP_LENGTH = 0x00020000
_VERSION = 0x00020001
_MEDIA_SOP_CLASS = 0x00020002
_MEDIA_SOP_INSTANCE = 0x00020003
_TRANSFER_SYNTAX_UID = 0x00020010
_IMPLEMENTATION_CLASS_UID = 0x00020012
_IMPLEMENTATION_VERSION_NAME = 0x00020013
#: What validate_file_meta reads, in its order: the Type 1 file meta elements
_TYPE_1_META = (
    _VERSION,
    _IMPLEMENTATION_CLASS_UID,
    _MEDIA_SOP_CLASS,
    _MEDIA_SOP_INSTANCE,
    _TRANSFER_SYNTAX_UID,
)
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_SPECIFIC_CHARACTER_SET = 0x00080005


@dataclass(frozen=True)
class Layout:
    """The transfer syntax a data set's elements were received in, recorded by
    :func:`~anonproxy.deid.files.read_received` when pydicom read them as that syntax says:
    its raw elements are then the received bytes."""

    syntax: UID
    implicit: bool = field(init=False)  # of the syntax, read once (UID's are lookups)
    little: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "implicit", bool(self.syntax.is_implicit_VR))
        object.__setattr__(self, "little", bool(self.syntax.is_little_endian))


def _character_set(ds: Dataset) -> str | list[str]:
    """``ds._character_set``: the parent's encoding without a Specific Character Set (as that
    property, which looks the attribute up through ``Dataset.get``), else pydicom's."""
    if _SPECIFIC_CHARACTER_SET not in ds._dict:  # pydicom's own
        return ds._parent_encoding
    return ds._character_set


#: Python codec lists that convert_encodings gives back unchanged (see _codecs)
_UNCHANGED_CODECS: set[tuple[str, ...]] = set()
_MAX_UNCHANGED_CODECS = 64


def _codecs(encodings: str | list[str] | None) -> list[str]:
    """``convert_encodings(encodings or [default_encoding])``, remembering the lists it gives
    back unchanged. An item without a Specific Character Set passes on its parent's codecs:
    Python codec names, which pydicom looks up one by one (two regular expressions and the
    codec registry each) to give them back as they are, warning of nothing."""
    if encodings.__class__ is list:
        key = tuple(encodings)
        if key in _UNCHANGED_CODECS:
            return list(key)
    converted = convert_encodings(encodings or [default_encoding])
    if (
        encodings.__class__ is list
        and converted == encodings
        and len(_UNCHANGED_CODECS) < _MAX_UNCHANGED_CODECS
    ):
        _UNCHANGED_CODECS.add(tuple(converted))
    return converted


def _delimiter(tag: tuple[int, int], endian: str) -> bytes:
    return struct.pack(f"{endian}HHL", *tag, 0)


def encode_changed(ds: Dataset, layout: Layout, below: int | None = None) -> bytes | None:
    """The preamble, file meta and top-level elements of *ds* (those with a tag below *below*
    only, with a pixel data element copied separately): the elements the engine left alone
    copied as received, the others encoded; None when *ds* is no longer in the transfer
    syntax and character set of *layout* (the caller writes the whole header instead).
    Raises as pydicom's writer does for what cannot be encoded (ValueError, TypeError...)."""
    meta = getattr(ds, "file_meta", None)
    if (
        meta is None
        or _value(meta, _TRANSFER_SYNTAX_UID) != layout.syntax
        or ds.original_encoding != (layout.implicit, layout.little)
        or ds.original_character_set != _character_set(ds)  # pydicom's own test
        or meta.original_encoding != (False, True)  # else pydicom re-encodes the meta too
        or meta.original_character_set != _character_set(meta)
    ):
        return None
    implicit, little = layout.implicit, layout.little
    encodings = _value(ds, _SPECIFIC_CHARACTER_SET, default_encoding)
    codecs = convert_encodings(encodings or [default_encoding])  # as write_data_element
    pieces = [_preamble(ds), b"DICM", _encode_file_meta(_file_meta(ds, meta))]
    elements = sorted(((int(t), e) for t, e in held_elements(ds)), key=itemgetter(0))
    for tag, _ in elements:  # sorted: only the first few can be below group 3
        if tag >= 0x00030000:
            break
        if tag >> 16 in (0, 2):
            raise ValueError("command or file meta element in the data set")
    if below is not None:
        elements = [(tag, element) for tag, element in elements if tag < below]
    _encode_elements(elements, implicit, little, codecs, encodings, pieces)
    return b"".join(pieces)


def _encode_elements(  # noqa: PLR0917 - _encode_element's arguments, and where to put them
    elements: list[tuple[int, DataElement | RawDataElement]],
    implicit: bool,
    little: bool,
    codecs: list[str],
    encodings: str | list[str] | None,
    pieces: list[bytes],
) -> None:
    """Append to *pieces* the encodings of *elements* (sorted by tag), as
    :func:`_encode_element` encodes them; the elements still as received, most of them, are
    their value as read behind a new header, packed here."""
    endian = "<" if little else ">"
    header = _IMPLICIT_HEADER[endian] if implicit else None
    long_header, short_header = _LONG_HEADER[endian], _SHORT_HEADER[endian]
    append = pieces.append
    for tag, element in elements:
        if not tag & 0xFFFF and tag >> 16 > 6:  # pydicom writes no retired group length
            continue
        if element.__class__ is RawDataElement:  # as _encode_raw, inline
            value, vr = element.value, element.VR
            if value is not None and element.length != _UNDEFINED_LENGTH:
                if header is not None:
                    append(header.pack(tag >> 16, tag & 0xFFFF, len(value)))
                    append(value)
                    continue
                if vr in EXPLICIT_VR_LENGTH_32:
                    append(long_header.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)))
                    append(value)
                    continue
                if vr and len(value) <= 0xFFFF:
                    append(short_header.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)))
                    append(value)
                    continue
        append(_encode_element(element, implicit, little, codecs, encodings))


def _value(ds: Dataset, tag: int, default: Any = None) -> Any:  # noqa: ANN401 - any value
    """``ds.get(keyword, default)`` by tag (pydicom's keyword look-up costs more)."""
    element = get_decoded(ds, tag)
    return element.value if element is not None else default


def _preamble(ds: Dataset) -> bytes:
    preamble = getattr(ds, "preamble", None) or _PREAMBLE
    if len(preamble) != len(_PREAMBLE):
        raise ValueError("the preamble must be 128 bytes long")
    return bytes(preamble)


def _file_meta(ds: Dataset, meta: FileMetaDataset) -> FileMetaDataset:
    """A shallow copy of *meta* with the changes ``dcmwrite(..., enforce_file_format=True)``
    makes before writing it; the elements it changes are new objects."""
    # the elements as held (get_item keeps what pydicom has not decoded; a file meta read from
    # a file holds no deferred element), given to the copy as its dictionary: FileMetaDataset
    # checks their groups once, not in a __setitem__ each
    held: dict[BaseTag, DataElement | RawDataElement] = {
        key: element if element.__class__ is DataElement else meta.get_item(key)
        for key, element in meta._dict.items()  # pydicom's own
        if int(key) != _GROUP_LENGTH  # int: a BaseTag compares in Python
    }
    copy = FileMetaDataset(held)
    for tag, source in (
        (_MEDIA_SOP_CLASS, _SOP_CLASS_UID),
        (_MEDIA_SOP_INSTANCE, _SOP_INSTANCE_UID),
    ):
        current = get_decoded(copy, tag)
        wanted = get_decoded(ds, source)
        value = wanted.value if wanted is not None else None
        if current is None or (value and value != current.value):
            copy[tag] = DataElement(tag, "UI", value)
    for tag in (_VERSION, _IMPLEMENTATION_CLASS_UID):  # write_file_meta_info adds them anew
        element = get_decoded(copy, tag)  # copy[tag], by tag
        if element is not None and element.is_empty:
            del copy[tag]
    return copy


def _encode_file_meta(meta: FileMetaDataset) -> bytes:
    """*meta* completed as ``write_file_meta_info(..., enforce_standard=True)`` completes it,
    encoded in Explicit VR Little Endian behind its group length."""
    _validate_file_meta(meta)
    body = b"".join(
        _encode_element(element, False, True, _DEFAULT_CODECS, None)
        for tag, element in sorted(((int(t), e) for t, e in meta.items()), key=itemgetter(0))
        if tag != _GROUP_LENGTH
    )
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _validate_file_meta(meta: FileMetaDataset) -> None:
    """``validate_file_meta(meta, enforce_standard=True)``. When the elements it adds are there
    (Implementation Version Name, and the Type 1 ones with a value) and so are those it
    requires, it only decodes these (to see that they have a value), as here by tag: pydicom
    looks each up by keyword. (Only group 2 elements: a FileMetaDataset holds no other.)"""
    held = meta._dict  # pydicom's own
    if _IMPLEMENTATION_VERSION_NAME in held and all(
        (element := get_decoded(meta, tag)) is not None and not element.is_empty
        for tag in _TYPE_1_META
    ):  # meta[tag], by tag (decoded)
        return
    validate_file_meta(meta, enforce_standard=True)


def _encode(
    element: DataElement | RawDataElement,
    implicit: bool,
    little: bool,
    encodings: str | list[str] | None = None,
) -> bytes:
    """*element* encoded by pydicom's writer."""
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = implicit, little
    write_data_element(out, element, encodings)
    return out.getvalue()


def _encode_element(
    element: DataElement | RawDataElement,
    implicit: bool,
    little: bool,
    codecs: list[str],
    encodings: str | list[str] | None,
) -> bytes:
    """*element* encoded as pydicom's ``write_data_element`` encodes it in a data set of
    character set *encodings* (*codecs*, converted): a raw element with its value as read, a
    sequence item by item, a plain value directly, anything else by pydicom."""
    endian = "<" if little else ">"
    encoded: bytes | None
    if isinstance(element, RawDataElement):
        encoded = _encode_raw(element, implicit, endian)
    elif element.VR == "SQ":
        encoded = _encode_sequence(element, implicit, little, codecs)
    else:
        encoded = _encode_plain(element, implicit, endian, codecs)
    return encoded if encoded is not None else _encode(element, implicit, little, encodings)


def _encode_raw(raw: RawDataElement, implicit: bool, endian: str) -> bytes | None:
    """An undecoded element: its value as read behind a new header (of defined length)."""
    value = raw.value
    if value is None or raw.length == _UNDEFINED_LENGTH or (not implicit and not raw.VR):
        return None
    head = _element_header(raw.tag, raw.VR or "", len(value), implicit, endian)
    return None if head is None else head + value


def _encode_sequence(
    element: DataElement, implicit: bool, little: bool, codecs: list[str]
) -> bytes | None:
    """A sequence, item by item as pydicom's ``write_sequence`` writes it (each item and the
    sequence of defined or undefined length as recorded), when pydicom would not re-encode
    any item: every item at every depth decoded from this transfer syntax in its character
    set or made by the engine of plain elements (:func:`_encode_item`); None otherwise."""
    endian = "<" if little else ">"
    pieces = []
    for item in element.value:
        body = _encode_item(item, implicit, little, codecs)
        if body is None:
            return None
        if getattr(item, "is_undefined_length_sequence_item", False):
            pieces += [
                struct.pack(f"{endian}HHL", *_ITEM, _UNDEFINED_LENGTH),
                body,
                _delimiter(_ITEM_DELIMITER, endian),
            ]
        else:
            pieces += [struct.pack(f"{endian}HHL", *_ITEM, len(body)), body]
    value = b"".join(pieces)
    if element.is_undefined_length:
        head = _element_header(element.tag, "SQ", _UNDEFINED_LENGTH, implicit, endian)
        value += _delimiter(_SEQUENCE_DELIMITER, endian)
    else:
        head = _element_header(element.tag, "SQ", len(value), implicit, endian)
    return None if head is None else head + value


def _encode_item(item: Dataset, implicit: bool, little: bool, codecs: list[str]) -> bytes | None:
    """The elements of a sequence item as pydicom's ``write_dataset`` writes them, when it
    writes each of them with ``write_data_element`` as it is: an item decoded from this
    transfer syntax whose character set is unchanged (pydicom's own test), or an item the
    engine made of decoded elements with no ambiguous VR and no sequence (pydicom's
    ambiguous-VR correction changes nothing in it). None for any other item: pydicom decodes
    and corrects every element, and so does the caller."""
    elements = held_elements(item)  # as pydicom's writer takes them (get_item)
    encoding = item.original_encoding
    if encoding == (None, None):  # made by the engine
        if any(
            isinstance(e, RawDataElement) or e.VR == "SQ" or " or " in e.VR for _, e in elements
        ):
            return None
    elif (
        encoding != (implicit, little)
        or item.original_character_set != _character_set(item)  # pydicom's own test
    ):
        return None
    encodings = _value(item, _SPECIFIC_CHARACTER_SET, codecs)
    inner = _codecs(encodings)
    pieces: list[bytes] = []
    _encode_elements(
        sorted(((int(t), e) for t, e in elements), key=itemgetter(0)),
        implicit,
        little,
        inner,
        encodings,
        pieces,
    )
    return b"".join(pieces)


#: Element headers by byte order ("<", ">"): implicit VR, explicit VR with a 4-byte length,
#: explicit VR with a 2-byte length.
_IMPLICIT_HEADER = {endian: struct.Struct(f"{endian}HHL") for endian in "<>"}
_LONG_HEADER = {endian: struct.Struct(f"{endian}HH2sHL") for endian in "<>"}
_SHORT_HEADER = {endian: struct.Struct(f"{endian}HH2sH") for endian in "<>"}


def _element_header(tag: int, vr: str, length: int, implicit: bool, endian: str) -> bytes | None:
    """Tag, VR (explicit VR) and length; None for a value too long for a 2-byte length
    (pydicom writes that element as UN)."""
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return _IMPLICIT_HEADER[endian].pack(group, number, length)
    if vr in EXPLICIT_VR_LENGTH_32:
        return _LONG_HEADER[endian].pack(group, number, vr.encode(), 0, length)
    if length <= 0xFFFF:
        return _SHORT_HEADER[endian].pack(group, number, vr.encode(), length)
    return None


def _encode_plain(
    element: DataElement | RawDataElement, implicit: bool, endian: str, codecs: list[str]
) -> bytes | None:
    """The encoded element (header and value) when its value is plain — None, a str, int or
    float, or a list of them — and its VR one whose pydicom writer :func:`_plain_value`
    mirrors; None for anything else: pydicom encodes it."""
    if isinstance(element, RawDataElement) or element.is_undefined_length:
        return None
    vr = element.VR
    try:
        encoded = _plain_value(vr, element.value, endian, codecs)
    except (UnicodeError, struct.error):
        return None  # pydicom decides: replacement characters, or an error
    if encoded is None:
        return None
    head = _element_header(element.tag, vr, len(encoded), implicit, endian)
    return None if head is None else head + encoded


def _plain_value(  # noqa: PLR0911 - one return per family of VRs
    vr: str, value: object, endian: str, codecs: list[str]
) -> bytes | None:
    """The value as pydicom's writer for *vr* encodes it: the characters of the default
    character set padded with a space (a NUL for UI), DS and IS as their received strings,
    text in the character set *codecs* padded with a space, binary numbers (not SS, whose
    LUT descriptors pydicom writes apart), OB bytes padded with a NUL; None for a value or VR
    it does not mirror."""
    if value.__class__ is str or value.__class__ is UID:  # most values: one string
        if not value:
            return b""
        if vr in _ASCII_VRS:
            encoded = value.encode(default_encoding)
            return encoded + _ASCII_VRS[vr] if len(encoded) % 2 else encoded
        if vr in _TEXT_VRS and value.__class__ is str:
            encoded = encode_string(value, codecs)
            return encoded + b" " if len(encoded) % 2 else encoded
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if value is None or value == "":
        return b""
    if vr in _ASCII_VRS and all(isinstance(v, str) for v in values):
        encoded = "\\".join(values).encode(default_encoding)  # type: ignore[arg-type]
        return encoded + _ASCII_VRS[vr] if len(encoded) % 2 else encoded
    if vr in _NUMBER_STRING_VRS:
        text = "\\".join(
            v.original_string if hasattr(v, "original_string") else str(v) for v in values
        )
        encoded = text.encode(default_encoding)
        return encoded + b" " if len(encoded) % 2 else encoded
    if vr in _TEXT_VRS and all(type(v) is str for v in values):
        encoded = b"\\".join(encode_string(v, codecs) for v in values)  # type: ignore[arg-type]
        return encoded + b" " if len(encoded) % 2 else encoded
    if vr in _BINARY_NUMBER_VRS and all(type(v) in (int, float) for v in values):
        return struct.pack(f"{endian}{len(values)}{_BINARY_NUMBER_VRS[vr]}", *values)
    if vr == "OB" and type(value) is bytes:
        return value + b"\0" if len(value) % 2 else value
    return None

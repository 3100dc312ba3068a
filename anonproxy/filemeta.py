"""The File Meta Information of a DICOM file, read from its bytes without pydicom.

Forwarding needs three values of each spooled file, the SOP Class UID, the SOP Instance UID
and the Transfer Syntax UID, and the offset where the data set starts: the data set itself is
streamed from that offset as it is (PS3.10 7.1: the group 0002 elements follow the 128-byte
preamble and ``DICM``, always Explicit VR Little Endian). pydicom's ``read_file_meta_info``
decodes every element of the group into a data set, and pynetdicom's ``split_dataset`` does it
again for the same file (about 0.3 ms each per instance); :func:`read_file_meta` reads the
group's bytes once and decodes only the three UIDs. A file it cannot read this way (no preamble,
an element of undefined length, a group longer than :data:`_READ_BYTES`) is read with pydicom's
reader instead, so the result is the same for every file that reader accepts.

:func:`encode_file_meta` is the other way: the group 0002 that pynetdicom writes at the start
of each received data set's file, without building and validating a pydicom data set (~0.3 ms
per instance in the thread that reads the association's socket). It encodes what pydicom's
``write_file_meta_info`` writes, byte for byte, for the values it accepts (plain UIDs); anything
else is left to pydicom.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

_READ_BYTES = 4096  # the spool's file meta groups are a few hundred bytes
_PREFIX = 128 + 4  # preamble and b"DICM"
# Explicit VR: these VRs have 2 reserved bytes and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SOP_CLASS, _SOP_INSTANCE, _TRANSFER_SYNTAX = 0x0002, 0x0003, 0x0010


@dataclass(frozen=True)
class FileMeta:
    """What a C-STORE of the file needs from its File Meta Information."""

    sop_class: str  # (0002,0002) Media Storage SOP Class UID
    sop_instance: str  # (0002,0003) Media Storage SOP Instance UID
    transfer_syntax: str  # (0002,0010) Transfer Syntax UID
    offset: int  # where the data set starts


def _uid(value: bytes) -> str:
    return value.decode("ascii").rstrip("\0 ")


def _parse(head: bytes) -> FileMeta | None:
    """The meta of *head* (the first bytes of a file), or None when it needs pydicom."""
    if len(head) < _PREFIX or head[128:_PREFIX] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    position = _PREFIX
    end = len(head)
    while True:
        if position + 8 > end:
            if end < _READ_BYTES and position == end:
                break  # the file ends after its meta: an empty data set
            return None  # the group goes on past what was read
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            break
        vr = head[position + 4 : position + 6]
        if vr in _LONG_VRS:
            if position + 12 > end:
                return None
            (length,) = struct.unpack_from("<L", head, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", head, position + 6)
            start = position + 8
        if length == 0xFFFFFFFF or start + length > end:
            return None
        values[element] = head[start : start + length]
        position = start + length
    try:
        return FileMeta(
            _uid(values[_SOP_CLASS]),
            _uid(values[_SOP_INSTANCE]),
            _uid(values[_TRANSFER_SYNTAX]),
            position,
        )
    except (KeyError, UnicodeDecodeError):
        return None


def _read_with_pydicom(path: Path) -> FileMeta:
    from pynetdicom.dsutils import split_dataset  # noqa: PLC0415 - the rare case

    meta, offset = split_dataset(path)
    try:
        return FileMeta(
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            offset,
        )
    except AttributeError:
        msg = "the file meta lacks a SOP Class, SOP Instance or Transfer Syntax UID"
        raise ValueError(msg) from None


def read_file_meta(path: Path) -> FileMeta:
    """The File Meta Information of the DICOM file at *path* (see the module's docstring).

    Raises OSError (FileNotFoundError for a missing file), or ValueError when the file has no
    SOP Class, SOP Instance or Transfer Syntax UID in its meta.
    """
    with path.open("rb") as handle:
        head = handle.read(_READ_BYTES)
    return _parse(head) or _read_with_pydicom(path)


_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
_PLAIN_SH = re.compile(r"[ -\[\]-~]{0,16}")


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def encode_file_meta(
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    implementation_class: str,
    implementation_version: str,
) -> bytes | None:
    """Group 0002 (after the preamble and ``DICM``) with these values and the File Meta
    Information Version bytes 00 01: what pydicom's ``write_file_meta_info`` writes for them;
    None unless every UID is plain (digits and dots, at most 64) and the version name printable
    ASCII (no backslash) of at most 16 characters."""
    uids = (sop_class, sop_instance, transfer_syntax, implementation_class)
    if not all(_PLAIN_UID.fullmatch(uid) for uid in uids):
        return None
    if not _PLAIN_SH.fullmatch(implementation_version):
        return None
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(_SOP_CLASS, b"UI", _padded(sop_class, b"\0")),
            _element(_SOP_INSTANCE, b"UI", _padded(sop_instance, b"\0")),
            _element(_TRANSFER_SYNTAX, b"UI", _padded(transfer_syntax, b"\0")),
            _element(0x0012, b"UI", _padded(implementation_class, b"\0")),
            _element(0x0013, b"SH", _padded(implementation_version, b" ")),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<L", len(body))) + body

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
"""

from __future__ import annotations

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

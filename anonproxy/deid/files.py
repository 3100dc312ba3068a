"""Instance files read and written without holding the pixel data in memory.

Pixel data is most of an image's bytes and is not an attribute that Table E.1-1 acts on (burned-in
text is a matter of policy, see ``burned_in_annotation``). :func:`read_header` therefore decodes
everything in the file except the value of the first pixel data element — (7FE0,0010) Pixel Data,
(7FE0,0008) Float Pixel Data or (7FE0,0009) Double Float Pixel Data — whose place in the file it
records as a :class:`PixelSpan`; the elements after it (Data Set Trailing Padding, Digital
Signatures, private groups above 7FE0) are decoded as usual, so the engine sees and acts on every
attribute. :func:`write_spliced` writes the de-identified header, copies the span's bytes
(element header and value, native or encapsulated) unchanged from the source file, then writes
what is left of the trailing elements. The transfer syntax does not change, so the copied bytes
stay valid; a Deflated data set cannot be split and is read whole.

:func:`read_received` also records the transfer syntax the header was received in (a
:class:`~anonproxy.deid.layout.Layout`); given it, :func:`write_spliced` copies the elements the
engine left alone as received and encodes only the others
(:func:`~anonproxy.deid.layout.encode_changed`), and writes the whole header with pydicom only
when the transfer syntax or character set changed.

A span that does not fit in the file (a truncated value, a broken item of encapsulated pixel
data) is a :class:`~anonproxy.errors.DecodeError`.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anonproxy.deid.layout import LONG_VRS, Layout, encode_changed
from anonproxy.errors import DecodeError, LimitExceeded

_SOP_CLASS_UID = 0x00080016
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_COPY_CHUNK = 1 << 20
_INFLATE_CHUNK = 64 * 1024
#: A file up to this size is read into memory to parse its header (see _read_until_pixels)
_IN_MEMORY_BYTES = 1 << 20

_DECODE_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    struct.error,
    NotImplementedError,  # pydicom: an unknown VR
    OSError,  # pydicom: "no tag to read" in a damaged file
    zlib.error,  # a damaged deflated data set
    RecursionError,  # sequences nested beyond Python's recursion limit
    BytesLengthException,  # a value length that is no multiple of its VR's size
)


class _NotSpliceable(Exception):
    """The pixel data element is encoded otherwise than the data set says."""


@dataclass(frozen=True)
class PixelSpan:
    """Where the encoded pixel data element lies in the source file: ``[offset, end)``."""

    source: Path
    tag: int
    offset: int
    end: int
    header: int = 8  # bytes of the element's tag, VR and length before its value

    @property
    def length(self) -> int:
        """Bytes of the element: header and value."""
        return self.end - self.offset


def inflated_size(deflated: BinaryIO, limit: int) -> int:
    """The inflated size of a raw deflate stream (the Deflated Explicit VR Little Endian
    transfer syntax) read from *deflated*, inflated piece by piece without keeping the output.

    Raises :class:`~anonproxy.errors.LimitExceeded` as soon as it passes *limit* bytes,
    :class:`~anonproxy.errors.DecodeError` when the stream is corrupt.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            pending = inflater.unconsumed_tail or deflated.read(_INFLATE_CHUNK)
            if not pending:
                break
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if total > limit:
                raise LimitExceeded("inflated data set exceeds max_instance_bytes")
        total += len(inflater.flush())
    except zlib.error:
        raise DecodeError("deflated data set cannot be inflated") from None
    if total > limit:
        raise LimitExceeded("inflated data set exceeds max_instance_bytes")
    return total


def data_set_offset(handle: BinaryIO) -> int:
    """Where the data set starts in a DICOM file with preamble and file meta (read from the
    File Meta Information Group Length); 0 when that cannot be told."""
    handle.seek(0)
    head = handle.read(144)
    if len(head) < 144 or head[128:136] != b"DICM\x02\x00\x00\x00" or head[136:138] != b"UL":
        return 0
    return 144 + int(struct.unpack_from("<L", head, 140)[0])


def read_header(
    path: str | os.PathLike[str], *, max_inflated_bytes: int | None = None
) -> tuple[Dataset, PixelSpan | None]:
    """Decode the instance file at *path* except the value of its first pixel data element.

    Returns the data set (file meta included; it never contains that element) and the
    element's span, or ``None`` when the file has no pixel data, or when it is deflated, has no
    preamble and file meta, or is not encoded as its transfer syntax says: such a file is read
    whole (see :func:`anonproxy.deid.read_instance`). Raises DecodeError when the file is not
    readable DICOM; with *max_inflated_bytes*, LimitExceeded for a deflated data set that
    inflates to more (checked piece by piece before pydicom inflates it in one piece).
    """
    ds, span, _ = read_received(path, max_inflated_bytes=max_inflated_bytes)
    return ds, span


def read_received(
    path: str | os.PathLike[str], *, max_inflated_bytes: int | None = None
) -> tuple[Dataset, PixelSpan | None, Layout | None]:
    """:func:`read_header`, and the transfer syntax its elements were received in (None for a
    file read whole): give it to :func:`write_spliced` to write only what changed."""
    source = Path(path)
    try:
        with source.open("rb") as handle:
            try:
                ds = _read_until_pixels(handle)
            except InvalidDicomError:
                return read_instance(source), None, None
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if syntax is not None and syntax.is_deflated and max_inflated_bytes is not None:
                handle.seek(data_set_offset(handle))
                inflated_size(handle, max_inflated_bytes)
            if (
                syntax is None
                or syntax.is_deflated
                or ds.original_encoding != (syntax.is_implicit_VR, syntax.is_little_endian)
            ):
                # Deflated, or encoded otherwise than its transfer syntax says (pydicom reads
                # what it finds; the output is written as the transfer syntax says).
                return read_instance(source), None, None
            try:
                span = _pixel_span(handle, source, syntax.is_implicit_VR, syntax.is_little_endian)
            except _NotSpliceable:
                return read_instance(source), None, None
            layout = Layout(syntax)  # its raw elements are the received bytes
            if span is not None:
                _read_trailing(handle, ds, span, syntax.is_implicit_VR, syntax.is_little_endian)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # not a decoding problem
    except _DECODE_ERRORS:
        raise DecodeError("source is not a readable DICOM file") from None
    return ds, span, layout


def _read_until_pixels(handle: BinaryIO) -> Dataset:
    """``dcmread(handle, stop_before_pixels=True)``, the handle left where it stopped. A file
    of at most :data:`_IN_MEMORY_BYTES` is read into memory first: pydicom parses a buffer
    faster than a file (the same bytes: the same data set, or the same error); a larger one,
    whose pixel data should not be read, is parsed from the file."""
    if os.fstat(handle.fileno()).st_size > _IN_MEMORY_BYTES:
        return dcmread(handle, stop_before_pixels=True)
    buffer = BytesIO(handle.read())
    ds = dcmread(buffer, stop_before_pixels=True)
    handle.seek(buffer.tell())
    return ds


def _pixel_span(handle: BinaryIO, source: Path, implicit: bool, little: bool) -> PixelSpan | None:
    """The span of the element at the handle's position (where ``stop_before_pixels`` left
    it), or None at the end of the file."""
    offset = handle.tell()
    size = os.fstat(handle.fileno()).st_size
    if offset >= size:
        return None
    endian = "<" if little else ">"
    head = handle.read(8)
    if len(head) < 8:
        raise DecodeError("truncated pixel data element")
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = group << 16 | element
    if tag not in PIXEL_DATA_TAGS:
        raise DecodeError("unexpected element where pixel data was expected")
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
        value_at = offset + 8
    elif not (head[4:6].isalpha() and head[4:6].isupper()):
        raise _NotSpliceable  # an implicit VR element in an explicit VR data set
    elif head[4:6] in LONG_VRS:
        extra = handle.read(4)
        if len(extra) < 4:
            raise DecodeError("truncated pixel data element")
        (length,) = struct.unpack(endian + "L", extra)
        value_at = offset + 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
        value_at = offset + 8
    if length != _UNDEFINED_LENGTH:
        end = value_at + length
    else:
        end = _end_of_items(handle, value_at, size, endian)
    if end > size:
        raise DecodeError("truncated pixel data element")
    return PixelSpan(source, tag, offset, end, value_at - offset)


def _end_of_items(handle: BinaryIO, at: int, size: int, endian: str) -> int:
    """Skip the items of encapsulated pixel data; the offset after its delimiter."""
    while at + 8 <= size:
        handle.seek(at)
        group, element, length = struct.unpack(endian + "HHL", handle.read(8))
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return at + 8
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            raise DecodeError("malformed item in encapsulated pixel data")
        at += 8 + length
    raise DecodeError("truncated encapsulated pixel data")


def _read_trailing(
    handle: BinaryIO, ds: Dataset, span: PixelSpan, implicit: bool, little: bool
) -> None:
    """Decode the elements after the pixel data element into *ds* (undecoded values)."""
    size = os.fstat(handle.fileno()).st_size
    if span.end >= size:
        return
    handle.seek(span.end)
    trailing = read_dataset(handle, implicit, little, bytelength=size - span.end)
    for tag in trailing.keys():  # noqa: SIM118 - get_item keeps the raw element
        if tag <= span.tag:
            raise DecodeError("elements out of order after the pixel data")
        ds[tag] = trailing.get_item(tag)  # raw, as read


Check = Callable[[bytes], None]
"""Called with every encoded byte of an output but the pixel data (the engine's self-check);
raises to stop the output."""


def write_spliced(
    ds: Dataset,
    span: PixelSpan | None,
    target: BinaryIO,
    check: Check | None = None,
    layout: Layout | None = None,
) -> int | None:
    """Write *ds* as a DICOM file (preamble, file meta, data set) to *target*, with the pixel
    data element of *span* copied unchanged from its source file in its place.

    With *layout* (from :func:`read_received`, for the data set read with *span*), the
    elements the engine left alone are copied as received and only the others are
    encoded (:func:`~anonproxy.deid.layout.encode_changed`); without it, or when the transfer
    syntax or character set changed, pydicom encodes the whole header. The bytes are the same.

    With *check*, the encoded header and trailing elements are passed to it before they are
    written (the pixel data is not): when it raises, nothing of the data set has reached
    *target*. Without a span, the elements are checked as encoded apart from the pixel data.
    Returns where the value of the copied pixel data element starts in *target* (None without
    a span).
    """
    if span is None:
        changed = None
        if layout is not None and PIXEL_DATA_TAGS.isdisjoint(ds.keys()):
            changed = encode_changed(ds, layout)
        if changed is not None:
            if check is not None:
                check(changed)
            target.write(changed)
        elif check is None:
            dcmwrite(target, ds, enforce_file_format=True)
        elif PIXEL_DATA_TAGS.isdisjoint(ds.keys()):  # e.g. an SR: every byte is checked
            encoded = DicomBytesIO()
            dcmwrite(encoded, ds, enforce_file_format=True)
            check(encoded.getvalue())
            target.write(encoded.getvalue())
        else:  # pixel data read whole (deflated, or no preamble): checked without it
            check(encode_without_pixels(ds))
            dcmwrite(target, ds, enforce_file_format=True)
        return None
    # int(): a BaseTag compares in Python; most data sets have nothing after the pixel data
    after = [t for t in ds.keys() if int(t) > span.tag]  # noqa: SIM118
    trailing = Dataset({t: ds.get_item(t) for t in after}) if after else None
    header = encode_changed(ds, layout, span.tag) if layout is not None else None
    if header is None:
        header = _encode_whole(ds, trailing)
    tail = _encode_elements(trailing, ds) if trailing is not None else b""
    if check is not None:
        check(header + tail if tail else header)
    target.write(header)
    _copy_range(span, target)
    target.write(tail)
    return len(header) + span.header


def _encode_whole(ds: Dataset, trailing: Dataset | None) -> bytes:
    """The preamble, file meta and elements of *ds* but *trailing*, encoded by pydicom."""
    removed = {t: trailing.get_item(t) for t in trailing.keys()} if trailing else {}  # noqa: SIM118
    for tag in removed:
        del ds[tag]
    try:
        header = DicomBytesIO()
        dcmwrite(header, ds, enforce_file_format=True)
    finally:
        for tag, element in removed.items():  # give the caller back its data set
            ds[tag] = element
    return header.getvalue()


def _encode_elements(elements: Dataset, ds: Dataset, *, with_meta: bool = False) -> bytes:
    """*elements* (and, *with_meta*, the file meta of *ds*) encoded as the data set *ds* is
    written: its transfer syntax (Explicit VR Little Endian for a deflated or unknown one) and
    character set."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and not syntax.is_deflated and syntax.is_transfer_syntax:
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    else:
        implicit, little = False, True
    out = DicomBytesIO()
    out.is_implicit_VR = implicit
    out.is_little_endian = little
    elements.set_original_encoding(implicit, little, ds.original_character_set)
    if with_meta and meta is not None:
        write_file_meta_info(out, meta, enforce_standard=False)
    write_dataset(out, elements, ds.get("SpecificCharacterSet", "iso8859"))
    return out.getvalue()


def encode_without_pixels(ds: Dataset) -> bytes:
    """The file meta and every element of *ds* but the pixel data, encoded as *ds* would be
    written: what the self-check reads."""
    elements = Dataset({t: ds.get_item(t) for t in ds.keys() if t not in PIXEL_DATA_TAGS})  # noqa: SIM118
    return _encode_elements(elements, ds, with_meta=True)


def _copy_range(span: PixelSpan, target: BinaryIO) -> None:
    """Copy the span's bytes into *target* at its position, in the kernel where it can."""
    target.flush()
    with span.source.open("rb") as source:
        remaining = span.length
        position = span.offset
        try:
            src_fd, dst_fd = source.fileno(), target.fileno()
            while remaining:
                copied = os.copy_file_range(src_fd, dst_fd, remaining, position)
                if copied == 0:
                    raise DecodeError("pixel data ended early in the source file")
                position += copied
                remaining -= copied
        except OSError:  # no copy_file_range here (or no file descriptor): copy in user space
            source.seek(position)
            target.seek(0, os.SEEK_END)
            while remaining:
                chunk = source.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    raise DecodeError("pixel data ended early in the source file") from None
                target.write(chunk)
                remaining -= len(chunk)
    target.seek(0, os.SEEK_END)


def write_instance(
    ds: Dataset,
    path: str | os.PathLike[str],
    pixels: PixelSpan | None = None,
    check: Check | None = None,
    after: Callable[[int, int | None], None] | None = None,
    *,
    layout: Layout | None = None,
) -> int:
    """Write a DICOM file atomically and return its size: parent folders created, a temporary
    name renamed, so *path* never holds a partial file. With *pixels* (from
    :func:`read_header`), that pixel data element is copied from its source file; *check* as
    for :func:`write_spliced`; *after* is called, before the rename, with the file descriptor
    and where the copied pixel data value starts (see :func:`write_spliced`); *layout* as for
    :func:`write_spliced`."""
    dst = Path(path)
    if not dst.parent.is_dir():  # one stat: mkdir of an existing folder raises and is caught
        dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=".deid-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            value_at = write_spliced(ds, pixels, fh, check, layout)
            if after is not None:
                fh.flush()
                after(fh.fileno(), value_at)
            size = fh.seek(0, os.SEEK_END)
        os.replace(tmp_name, dst)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return size


def read_instance(path: str | os.PathLike[str]) -> Dataset:
    """Read a DICOM instance file, with or without file meta; DecodeError if it is not one."""
    try:
        try:
            ds = dcmread(path)
        except InvalidDicomError:
            ds = dcmread(path, force=True)
            if _SOP_CLASS_UID in ds:
                _add_file_meta(ds)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # not a decoding problem
    except _DECODE_ERRORS:
        raise DecodeError("source is not a readable DICOM file") from None
    if _SOP_CLASS_UID not in ds:  # e.g. a DICOMDIR: not a composite instance
        raise DecodeError("source is not a DICOM instance (no SOP Class UID)")
    return ds


def _add_file_meta(ds: Dataset) -> None:
    """File meta for a dataset read without it, from its encoding (before de-identification)."""
    meta = FileMetaDataset()
    implicit, little = ds.original_encoding
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    ds.file_meta = meta

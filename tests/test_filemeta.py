"""The file meta reader of the forwarding path (anonproxy.filemeta) against pydicom's
(pynetdicom's ``send_c_store(path)`` using it: tests/test_pynetdicom_patches.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, split_dataset

from anonproxy.filemeta import FileMeta, _parse, encode_file_meta, read_file_meta


def _pydicom_meta(path: Path) -> FileMeta:
    meta = read_file_meta_info(path)
    _, offset = split_dataset(path)
    return FileMeta(
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        offset,
    )


def test_equals_pydicom_over_the_corpus(corpus: list[Path]) -> None:
    read = 0
    for path in corpus:
        try:
            expected = _pydicom_meta(path)
        except Exception:  # noqa: BLE001, S112 - not a file pydicom reads without force
            continue
        assert read_file_meta(path) == expected, path.name
        read += 1
    assert read >= 5


def test_reads_the_group_itself_for_a_spooled_file(corpus: list[Path]) -> None:
    """The fast path answers (not pydicom's fall-back) for an ordinary file."""
    path = next(p for p in corpus if p.name == "CT_small.dcm")
    with path.open("rb") as handle:
        head = handle.read(4096)
    parsed = _parse(head)
    assert parsed is not None
    assert parsed == _pydicom_meta(path)
    with path.open("rb") as handle:  # the data set starts there: its first element, group 8
        handle.seek(parsed.offset)
        assert struct.unpack("<H", handle.read(2))[0] == 0x0008


def _with_long_meta(source: Path, target: Path) -> None:
    """*source* again with a 6000-byte Private Information element in its file meta."""
    ds = dcmread(source)
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"\x01" * 6000
    ds.save_as(target, enforce_file_format=True)


def test_a_meta_group_longer_than_it_reads_falls_back_to_pydicom(
    corpus: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / "long-meta.dcm"
    _with_long_meta(next(p for p in corpus if p.name == "MR_small.dcm"), target)
    with target.open("rb") as handle:
        assert _parse(handle.read(4096)) is None  # the group goes on past what was read
    assert read_file_meta(target) == _pydicom_meta(target)


def test_no_preamble_is_left_to_pydicom(tmp_path: Path) -> None:
    path = tmp_path / "raw.dcm"
    path.write_bytes(b"\x08\x00\x16\x00UI\x04\x001.2\x00")
    assert _parse(path.read_bytes()) is None
    with pytest.raises(Exception):  # noqa: B017, PT011 - pydicom's own error for such a file
        read_file_meta(path)


_UIDS = st.from_regex(r"[0-9.]{1,64}", fullmatch=True)


def _pydicom_encoded(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    buffer = DicomBytesIO()
    write_file_meta_info(
        buffer,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(transfer_syntax),
        ),
    )
    return bytes(buffer.getvalue())


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # "1..2": written all the same
@given(_UIDS, _UIDS, _UIDS)
@settings(max_examples=300, deadline=None)
def test_encodes_what_pydicom_writes(sop_class: str, sop_instance: str, syntax: str) -> None:
    """Byte for byte pynetdicom's file meta of a received data set, written by pydicom."""
    encoded = encode_file_meta(
        sop_class, sop_instance, syntax, PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )  # fmt: skip
    assert encoded == _pydicom_encoded(sop_class, sop_instance, syntax)
    parsed = _parse(b"\0" * 128 + b"DICM" + encoded)
    assert parsed == FileMeta(sop_class, sop_instance, syntax, 132 + len(encoded))


@pytest.mark.parametrize("uid", ["", "1.2.3a", "1." * 40, "1.2 ", "1.2\\3", "1.2\u00e9", "None"])
def test_leaves_anything_but_plain_uids_to_pydicom(uid: str) -> None:
    assert encode_file_meta(uid, "1.2", "1.2.840.10008.1.2", "1.2", "V") is None
    assert encode_file_meta("1.2", "1.2", "1.2.840.10008.1.2", "1.2", "A\\B") is None

"""The one file path (anonproxy.deid.instance): structure limits and the burned-in annotation
policy before de-identification, typed errors, the two ways of writing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO

from anonproxy.deid import Deidentifier, DeidResult, Limits, Profile
from anonproxy.deid.instance import deidentify_file
from anonproxy.errors import (
    DecodeError,
    DeidentificationError,
    InputUnreadable,
    LimitExceeded,
    PolicyRefusal,
)

from .helpers import SECRET, minimal


def _ct(tmp_path: Path, name: str = "ct.dcm", **attributes: object) -> Path:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_burned_in_annotation_yes_is_refused_by_default_before_deidentification(
    tmp_path: Path,
) -> None:
    source = _ct(tmp_path, BurnedInAnnotation="YES")
    target = tmp_path / "out" / "x.dcm"
    with pytest.raises(PolicyRefusal) as error:
        Deidentifier(Profile(), secret=SECRET).deidentify_file(source, target)
    assert isinstance(error.value, DeidentificationError)
    assert str(error.value) == "burned-in annotation refused by policy"
    assert not target.exists()
    passed = Deidentifier(Profile(burned_in_annotation="pass"), secret=SECRET)
    assert passed.deidentify_file(source, target).burned_in_annotation == "YES"
    assert dcmread(target).PatientIdentityRemoved == "YES"
    no = _ct(tmp_path, "no.dcm", BurnedInAnnotation="NO")
    Deidentifier(Profile(), secret=SECRET).deidentify_file(no, tmp_path / "no-out.dcm")


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="reject or pass"):
        Profile(burned_in_annotation="maybe")  # type: ignore[arg-type]


def test_structure_limits_apply_to_the_api(tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    current = ds
    for _ in range(3):
        item = Dataset()
        current.RequestAttributesSequence = [item]
        current = item
    source = tmp_path / "deep.dcm"
    ds.save_as(source, enforce_file_format=True)
    engine = Deidentifier(Profile(), secret=SECRET)
    with pytest.raises(LimitExceeded, match="max_sequence_depth 2"):
        engine.deidentify_file(source, tmp_path / "out.dcm", limits=Limits(max_sequence_depth=2))
    engine.deidentify_file(source, tmp_path / "out.dcm")  # the default: 16


def test_an_unreadable_source_is_input_unreadable_an_os_error(tmp_path: Path) -> None:
    link = tmp_path / "link.dcm"
    link.symlink_to(tmp_path / "missing.dcm")
    engine = Deidentifier(Profile(), secret=SECRET)
    for source in (link, tmp_path / "absent.dcm", tmp_path):
        with pytest.raises(InputUnreadable) as error:
            engine.deidentify_file(source, tmp_path / "out.dcm")
        assert isinstance(error.value, OSError)
        assert str(tmp_path) not in str(error.value)
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not DICOM " * 20, "utf-8")
    with pytest.raises(DecodeError):
        engine.deidentify_file(not_dicom, tmp_path / "out.dcm")


def test_the_target_is_a_path_or_named_from_the_result_and_written_in_place(
    tmp_path: Path,
) -> None:
    source = _ct(tmp_path)
    engine = Deidentifier(Profile(), secret=SECRET)

    def by_uids(result: DeidResult) -> Path:
        return tmp_path / "out" / result.study_instance_uid / f"{result.sop_instance_uid}.dcm"

    named = deidentify_file(engine, source, by_uids)
    assert named.path == by_uids(named.result)
    assert named.size == named.path.stat().st_size
    assert named.modality == "CT"
    staged = tmp_path / "staged.dcm"
    staged.write_bytes(b"old content, longer than nothing")
    in_place = deidentify_file(engine, source, staged, in_place=True)
    assert in_place.size == staged.stat().st_size
    assert staged.read_bytes() == named.path.read_bytes()
    with pytest.raises(FileNotFoundError):  # the staged file's folder is gone
        deidentify_file(engine, source, tmp_path / "gone" / "x.dcm", in_place=True)


def test_an_odd_length_private_element_is_tolerated_and_removed(tmp_path: Path) -> None:
    """Vendors' private quirks (deid-data's ctbrain files: (0011,0011) OB of length 5) do not
    refuse the instance: the private element is removed anyway. A public one is refused."""
    encoded = DicomBytesIO()
    ds = minimal()
    ds.save_as(encoded, implicit_vr=False, little_endian=True)
    whole = encoded.getvalue()
    at = whole.index(b"\x20\x00\x0d\x00")  # (0020,000D): the first element after group 0011
    for group, name in ((0x0011, "private"), (0x0018, "public")):
        odd = group.to_bytes(2, "little") + b"\x11\x00OB\x00\x00" + (5).to_bytes(4, "little")
        source = tmp_path / f"{name}.dcm"
        source.write_bytes(whole[:at] + odd + b"\x01\x02\x03\x00\xff" + whole[at:])
        engine = Deidentifier(Profile(), secret=SECRET)
        if name == "public":
            with pytest.raises(DecodeError, match="odd value length"):
                engine.deidentify_file(source, tmp_path / "out.dcm")
            continue
        engine.deidentify_file(source, tmp_path / "out.dcm")
        assert 0x00110011 not in dcmread(tmp_path / "out.dcm")

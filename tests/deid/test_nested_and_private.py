"""Rules at every nesting depth; private attributes and Retain Safe Private."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.uid import CTImageStorage

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.files import encode_without_pixels
from anonproxy.deid.instance import deidentify_file

from .helpers import PATIENT_NAME, SECRET, item, minimal, seq, walk_strings, with_meta


def _deep(depth: int) -> Dataset:
    """A non-table sequence nested ``depth`` times, each item with identifying attributes."""
    inner = item(PatientName=PATIENT_NAME, StudyDescription="Lumbar spine", CodeValue="T-1")
    inner.add_new(0x00291010, "LO", "private text")
    for _ in range(depth):
        inner = item(ReferencedInstanceSequence=seq(inner), CodeValue="X-1")
    return inner


def test_table_rules_apply_inside_nested_sequences() -> None:
    ds = minimal()
    ds.ReferencedInstanceSequence = seq(_deep(3))
    result = Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    level: Dataset = ds
    for _ in range(4):
        level = level.ReferencedInstanceSequence[0]
        assert "CodeValue" not in level  # text the IOD does not define there
    assert level.PatientName == ""  # Z
    assert "StudyDescription" not in level  # X
    assert 0x00291010 not in level  # private
    assert result.action_counts["X"] >= 2
    assert all(PATIENT_NAME.split("^")[0] not in v for _, v in walk_strings(ds))


def test_removed_sequence_takes_its_items_with_it() -> None:
    ds = minimal()
    ds.OtherPatientIDsSequence = seq(item(PatientID="OTHER-123"))
    Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert "OtherPatientIDsSequence" not in ds


def test_unknown_public_text_and_person_names_are_removed() -> None:
    ds = minimal()
    ds.add_new(0x00091001, "LO", "odd group")  # private
    ds.add_new(0x00331010, "LO", "x")  # private
    ds.add_new(0x00190010, "LO", "x")  # private creator
    ds.add_new(0x00424567, "LO", "unknown public text")  # not in the dictionary
    ds.add_new(0x00424568, "US", 3)  # unknown, not text: removed as well
    ds.add_new(0x00080000, "UL", 1234)  # group length: removed
    ds.add_new(0x00321032, "PN", "Doctor^Who")  # PN: in table (X) anyway
    ds.ContrastBolusRoute = "IV"  # not in table, kept
    ds.add_new(0x00400A07, "PN", "Some^Body")  # retired PN not in the table
    Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert 0x00424567 not in ds
    assert 0x00424568 not in ds
    assert 0x00080000 not in ds
    assert 0x00321032 not in ds
    assert 0x00400A07 not in ds
    assert ds.ContrastBolusRoute == "IV"
    assert not any(e.tag >> 16 & 1 for e in ds)


def test_strict_profile_removes_public_attributes_outside_the_allow_list() -> None:
    ds = minimal()
    ds.ContrastBolusRoute = "IV"  # allow-listed
    ds.Rows = 2  # allow-listed
    ds.TableSpeed = 1.0  # allow-listed
    ds.FilterMaterial = "CU"  # not allow-listed
    Deidentifier(Profile.from_options([], strict=True), secret=SECRET).deidentify(ds)
    assert ds.ContrastBolusRoute == "IV"
    assert ds.Rows == 2
    assert "FilterMaterial" not in ds
    assert ds.PatientIdentityRemoved == "YES"


def _with_private(ds: Dataset) -> Dataset:
    ds.add_new(0x70530010, "LO", "Philips PET Private Group")
    ds.add_new(0x70531000, "DS", "1.25")  # (7053,xx00) safe: SUV factor
    ds.add_new(0x70531077, "LO", "not in E.3.10-1")
    ds.add_new(0x00190010, "LO", "SOMEVENDOR")
    ds.add_new(0x00191000, "LO", "unsafe")
    ds.add_new(0x00E10010, "LO", "ELSCINT1")
    ds.add_new(0x00E11021, "DS", "12.5")  # (00E1,xx21) ELSCINT1 DLP: safe
    ds.add_new(0x00E11022, "DS", "99")  # not safe
    return ds


def test_private_attributes_removed_by_default() -> None:
    ds = _with_private(minimal())
    ds.ReferencedInstanceSequence = seq(_with_private(item(CodeValue="1")))
    result = Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert not any(e.tag >> 16 & 1 for e in ds)
    assert not any(e.tag >> 16 & 1 for e in ds.ReferencedInstanceSequence[0])
    assert result.action_counts["X"] >= 16


def test_retain_safe_private_keeps_exactly_the_safe_attributes_and_their_creators() -> None:
    ds = _with_private(minimal())
    ds.ReferencedInstanceSequence = seq(_with_private(item(CodeValue="1")))
    deid = Deidentifier(Profile.from_options(["retain_safe_private"]), secret=SECRET)
    result = deid.deidentify(ds)
    for level in (ds, ds.ReferencedInstanceSequence[0]):
        private = {e.tag for e in level if e.tag >> 16 & 1}
        assert private == {0x70530010, 0x70531000, 0x00E10010, 0x00E11021}
        assert level[0x70531000].value == 1.25
    assert result.action_counts["K"] == 8


def test_safe_private_needs_the_right_creator() -> None:
    ds = minimal()
    ds.add_new(0x70530010, "LO", "Other Vendor")
    ds.add_new(0x70531000, "DS", "1.25")
    Deidentifier(Profile.from_options(["retain_safe_private"]), secret=SECRET).deidentify(ds)
    assert 0x70531000 not in ds
    assert 0x70530010 not in ds


def test_safe_private_element_in_another_block() -> None:
    """The creator reserves block 0x11 here: (7053,1100) is the same safe attribute."""
    ds = minimal()
    ds.add_new(0x70530011, "LO", "Philips PET Private Group")
    ds.add_new(0x70531100, "DS", "2.5")
    Deidentifier(Profile.from_options(["retain_safe_private"]), secret=SECRET).deidentify(ds)
    assert ds[0x70531100].value == 2.5
    assert 0x70530011 in ds


def _sequence_sent_as_un(tmp_path: Path) -> tuple[Path, str]:
    """A CT file (Explicit VR Little Endian) whose Clinical Trial Time Point Type Code
    Sequence (outside Table E.1-1, in the CT IOD) was sent as UN by a node that did not know
    it, its item naming someone the rest of the instance does not name."""
    ds = with_meta(minimal(CTImageStorage))
    ds.ClinicalTrialTimePointTypeCodeSequence = seq(
        item(CodeValue="X1", CodingSchemeDesignator="99X", PatientName="Smithers^Alicia")
    )
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    tag = tag_for_keyword("ClinicalTrialTimePointTypeCodeSequence") or 0
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ"
    data = encoded.getvalue()
    assert data.count(header) == 1
    path = tmp_path / "un.dcm"
    path.write_bytes(data.replace(header, header[:4] + b"UN"))
    assert dcmread(path).get_item(tag).VR == "UN"
    return path, "Smithers"


def test_a_sequence_received_as_un_is_walked_in_the_file_path(tmp_path: Path) -> None:
    source, name = _sequence_sent_as_un(tmp_path)
    deidentify_file(Deidentifier(Profile(), SECRET), source, tmp_path / "out.dcm")
    written = (tmp_path / "out.dcm").read_bytes()
    assert name.encode() not in written
    assert dcmread(tmp_path / "out.dcm").ClinicalTrialTimePointTypeCodeSequence[0].PatientName == ""


def test_a_sequence_received_as_un_is_walked_by_the_engine_alone(tmp_path: Path) -> None:
    source, name = _sequence_sent_as_un(tmp_path)
    ds = dcmread(source)
    Deidentifier(Profile(), SECRET).deidentify(ds)
    assert name.encode() not in encode_without_pixels(ds)

"""pydicom's test corpus: de-identified, written, re-read; pixel data and file meta checked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

from anonproxy.deid import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Deidentifier,
    Profile,
)
from anonproxy.deid.pixels import triage
from anonproxy.errors import DecodeError

from .helpers import SECRET, corpus_file, minimal, walk_strings, with_meta

NAMES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_rle.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "examples_overlay.dcm",
    "MR_small_implicit.dcm",
    "liver_1frame.dcm",
]
ALL_COMPATIBLE = [
    "retain_safe_private",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_temporal_information_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def _path(name: str) -> Path:
    path = corpus_file(name)
    assert path is not None, f"{name} is not in pydicom's wheel"
    return path


@pytest.mark.parametrize("options", [[], ALL_COMPATIBLE], ids=["basic", "all-options"])
@pytest.mark.parametrize("name", NAMES)
def test_corpus_file_deidentifies_and_writes(name: str, options: list[str], tmp_path: Path) -> None:
    src = _path(name)
    original = dcmread(src, force=True)  # rtstruct.dcm has no file meta
    deid = Deidentifier(Profile.from_options(options), secret=SECRET)
    dst = tmp_path / "deep" / "dir" / "out.dcm"
    result = deid.deidentify_file(src, dst)
    out = dcmread(dst)
    assert out.SOPInstanceUID == result.sop_instance_uid != original.SOPInstanceUID
    assert out.StudyInstanceUID == result.study_instance_uid
    assert out.SeriesInstanceUID == result.series_instance_uid
    assert out.SOPClassUID == result.sop_class_uid == original.SOPClassUID
    if "PixelData" in original:
        assert out.PixelData == original.PixelData
    meta = out.file_meta
    assert meta.MediaStorageSOPInstanceUID == result.sop_instance_uid
    assert meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    if "TransferSyntaxUID" in original.file_meta:
        assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    read = triage(original) is not None  # OCR read the pixels: the Clean Pixel Data Option
    assert len(out.DeidentificationMethodCodeSequence) == 1 + len(options) + read
    assert result.burned_in_annotation == original.get("BurnedInAnnotation")
    surviving = {v for _, v in walk_strings(out)}
    for keyword in IDENTIFYING:
        value = str(original.get(keyword, "") or "")
        if len(value) >= 4:
            assert value not in surviving, keyword
    assert not list(tmp_path.glob("deep/dir/.deid-*"))  # no temporary file left


def test_file_meta_is_rewritten() -> None:
    ds = with_meta(minimal())
    result = Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    meta = ds.file_meta
    assert meta.MediaStorageSOPInstanceUID == result.sop_instance_uid
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == "ANONPROXY_010"
    for keyword in (
        "SourceApplicationEntityTitle",
        "SendingApplicationEntityTitle",
        "ReceivingApplicationEntityTitle",
    ):
        assert keyword not in meta


def test_method_attributes_name_profile_and_options() -> None:
    ds = minimal()
    options = ["retain_uids", "clean_descriptors"]
    Deidentifier(Profile.from_options(options), secret=SECRET).deidentify(ds)
    assert ds.PatientIdentityRemoved == "YES"
    assert "Retain UIDs Option" in ds.DeidentificationMethod
    assert "Clean Descriptors Option" in ds.DeidentificationMethod
    got = [(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence]
    expected = [
        codes.DCM.BasicApplicationConfidentialityProfile,
        codes.DCM.RetainUidsOption,
        codes.DCM.CleanDescriptorsOption,
    ]
    assert got == [(c.value, "DCM") for c in expected]


def test_burned_in_annotation_is_kept_and_reported() -> None:
    ds = minimal()
    ds.BurnedInAnnotation = "YES"
    result = Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert ds.BurnedInAnnotation == "YES"
    assert result.burned_in_annotation == "YES"


def test_result_is_frozen_and_counts_use_action_letters() -> None:
    result = Deidentifier(Profile(), secret=SECRET).deidentify(minimal())
    assert set(result.action_counts) <= {"X", "Z", "D", "K", "C", "U"}
    assert all(type(k) is str for k in result.action_counts)
    with pytest.raises(AttributeError):
        result.sop_instance_uid = "1.2"  # type: ignore[misc]


def test_not_dicom_source_is_a_decode_error(tmp_path: Path) -> None:
    src = tmp_path / "x.dcm"
    src.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(DecodeError):
        Deidentifier(Profile(), secret=SECRET).deidentify_file(src, tmp_path / "y.dcm")


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="retain_everything"):
        Profile.from_options(["retain_uids", "retain_everything"])


def test_concurrent_use_of_one_engine_gives_identical_results() -> None:
    raw = _path("CT_small.dcm").read_bytes()
    deid = Deidentifier(Profile.from_options(ALL_COMPATIBLE), secret=SECRET)

    def run(_: int) -> tuple[object, bytes]:
        ds = dcmread(BytesIO(raw))
        result = deid.deidentify(ds)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return result, out.getvalue()

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(run, range(64)))
    assert all(o == outcomes[0] for o in outcomes)

"""Pixel triage and region rules: regions blanked in the written file, every other pixel as it
was, every frame; what cannot be blanked in place is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from anonproxy.config import parse_settings
from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.instance import deidentify_file
from anonproxy.deid.pixels import CLEAN_PIXEL_DATA, PixelRule, boxes, parse_pixel_rules, triage
from anonproxy.errors import ConfigError

from .helpers import SECRET, item, minimal, seq

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def _header(**attributes: object) -> Dataset:
    ds = minimal(str(attributes.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")))
    ds.Rows, ds.Columns = 64, 80
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, None),
        ({"Modality": "MR", "ImageType": ["DERIVED", "PRIMARY"]}, None),
        ({"Modality": "CT", "BurnedInAnnotation": "YES"}, "burned-in annotation"),
        ({"SOPClassUID": US_IMAGE, "Modality": "US"}, "ultrasound"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6", "Modality": "US"}, "ultrasound"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "OT"}, "secondary capture"),
        ({"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY", "SCREEN"]}, "screen capture"),
        (
            {"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]},
            "screen capture",
        ),
        ({"Modality": "MR", "ImageType": ["DERIVED", "SECONDARY", "MPR"]}, None),  # a reformat
        ({"Modality": "SM", "ImageType": ["DERIVED", "SECONDARY"]}, "secondary image"),
        ({"Modality": "XC"}, "photograph"),
    ],
)
def test_triage_reads_the_header_only(attributes: dict[str, object], reason: str | None) -> None:
    assert triage(_header(**attributes)) == reason


def test_triage_passes_what_is_no_image() -> None:
    assert triage(minimal("1.2.840.10008.5.1.4.1.1.88.33")) is None


def _rule(condition: dict[str, object], regions: list[object] | None = None) -> PixelRule:
    return PixelRule.parse(0, {"name": "r", "if": condition, "regions": regions or ["all"]})


@pytest.mark.parametrize(
    ("condition", "matches"),
    [
        ({"Manufacturer": "acme medical"}, True),
        ({"Manufacturer": {"contains": "ACME"}}, True),
        ({"Manufacturer": {"starts_with": "Medical"}}, False),
        ({"ManufacturerModelName": {"regex": r"^US-\d+$"}}, True),
        ({"Rows": {"ge": 64}, "Columns": {"lt": 81}}, True),
        ({"Rows": {"gt": 64}}, False),
        ({"any": [{"Modality": "MR"}, {"Modality": "US"}]}, True),
        ({"all": [{"Modality": "US"}, {"not": {"StationName": "ROOM1"}}]}, False),
        ({"StationName": {"equals": "room1"}, "not": {"Rows": {"lt": 10}}}, True),
        ({"DeviceSerialNumber": "X"}, False),  # absent: no match
    ],
)
def test_conditions(condition: dict[str, object], matches: bool) -> None:
    ds = _header(
        Manufacturer="ACME Medical",
        ManufacturerModelName="US-200",
        Modality="US",
        StationName="ROOM1",
    )
    assert _rule(condition).matches(ds) is matches


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"if": {}, "regions": ["all"], "colour": 1}, "unknown key 'colour'"),
        ({"if": {}, "regions": []}, "regions: a non-empty list"),
        ({"if": {}, "regions": ["1,2,3"]}, "is not x,y,w,h"),
        ({"if": {"Rows": {"about": 3}}, "regions": ["all"]}, "one operator of"),
        ({"if": {"Rows": {"ge": "big"}}, "regions": ["all"]}, "ge: a number"),
        ({"if": {"Manufacturer": {"regex": "("}}, "regions": ["all"]}, "regex"),
        ({"if": {"any": {"Rows": 1}}, "regions": ["all"]}, "a list of conditions"),
    ],
)
def test_a_bad_rule_is_refused_naming_it(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=r"pixel_rules\.0") as error:
        parse_pixel_rules([raw])
    assert message in str(error.value)


def test_a_bad_rule_in_the_configuration_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"profile\.pixel_rules"):
        parse_settings({"profile": {"pixel_rules": [{"regions": ["nowhere"]}]}})


def test_regions_become_boxes_clipped_to_the_image() -> None:
    ds = _header()  # 80 columns x 64 rows
    rule = _rule({}, ["0,0,0,10", "-20,-8,20,8", [70, 60, 50, 50], "all"])
    assert boxes(rule, ds) == [(0, 0, 80, 10), (60, 56, 80, 64), (70, 60, 80, 64), (0, 0, 80, 64)]
    ds.SequenceOfUltrasoundRegions = seq(
        item(RegionLocationMinX0=10, RegionLocationMinY0=5, RegionLocationMaxX1=69,
             RegionLocationMaxY1=58)
    )  # fmt: skip
    outside = boxes(_rule({}, ["outside_ultrasound_regions"]), ds)
    assert outside == [(0, 0, 80, 5), (0, 59, 80, 64), (0, 5, 10, 59), (70, 5, 80, 59)]


def _blanked(name: str, tmp_path: Path, regions: list[object], **kwargs: object) -> Path:
    profile = Profile.from_options(
        [], pixel_rules=[{"name": "banner", "regions": regions}], clean_pixel_data="off"
    )
    out = tmp_path / "out.dcm"
    deidentify_file(Deidentifier(profile, secret=SECRET), get_testdata_file(name), out, **kwargs)
    return out


def _frames(array: np.ndarray, ds: Dataset) -> np.ndarray:
    return array if int(ds.get("NumberOfFrames", 1) or 1) > 1 else array[np.newaxis]


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # MONOCHROME2, 16 bits, explicit little endian
        "MR_small_bigendian.dcm",  # 16 bits, big endian
        "MR_small_implicit.dcm",
        "examples_rgb_color.dcm",  # RGB, 8 bits, interleaved
        "ExplVR_BigEnd.dcm",  # RGB, planar
        "examples_palette.dcm",  # PALETTE COLOR
        "rtdose.dcm",  # 32 bits, 15 frames
    ],
)
@pytest.mark.parametrize("in_place", [False, True], ids=["atomic", "in-place"])
def test_regions_are_blanked_in_every_frame_and_nothing_else_changes(
    name: str, in_place: bool, tmp_path: Path
) -> None:
    source = dcmread(get_testdata_file(name))
    regions = ["2,3,5,4", "-4,-2,0,0", "0,10,0,2"]  # a box, a corner, full rows
    out = dcmread(_blanked(name, tmp_path, regions, in_place=in_place))
    before, after = _frames(source.pixel_array, source), _frames(out.pixel_array, out)
    rows, columns = int(source.Rows), int(source.Columns)
    mask = np.zeros((rows, columns), dtype=bool)
    mask[3:7, 2:7] = True
    mask[rows - 2 :, columns - 4 :] = True
    mask[10:12, :] = True
    assert (after[:, ~mask] == before[:, ~mask]).all()  # untouched pixels: bit-exact
    assert (after[:, mask] == 0).all()
    assert out.BurnedInAnnotation == "NO"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert CLEAN_PIXEL_DATA.value in codes
    assert "clean pixel data: rule banner" in out.DeidentificationMethod


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_rle.dcm",  # RLE Lossless
        "JPEG2000.dcm",  # JPEG 2000, lossy
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG Baseline, YBR_FULL_422
        "image_dfl.dcm",  # deflated: read whole, not copied
        "SC_ybr_full_422_uncompressed.dcm",  # subsampled chroma
        "liver_1frame.dcm",  # 1 bit allocated
    ],
)
def test_pixel_data_not_blankable_in_place_is_decoded_blanked_and_stored_losslessly(
    name: str, tmp_path: Path
) -> None:
    """No second lossy generation: the decoded pixels are stored JPEG-LS Lossless when they
    came compressed, else uncompressed; outside the regions they are the decoded pixels of the
    source, exactly."""
    source = dcmread(get_testdata_file(name))
    out = dcmread(_blanked(name, tmp_path, ["2,3,5,4", "0,10,0,2"]))
    assert out.SOPInstanceUID.startswith("2.25.")  # the engine's, not a new random one
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    compressed = source.file_meta.TransferSyntaxUID.is_compressed
    expected = JPEGLSLossless if compressed else ExplicitVRLittleEndian
    assert out.file_meta.TransferSyntaxUID == expected
    before, after = _frames(source.pixel_array, source), _frames(out.pixel_array, out)
    mask = np.zeros((int(source.Rows), int(source.Columns)), dtype=bool)
    mask[3:7, 2:7] = True
    mask[10:12, :] = True
    assert (after[:, ~mask] == before[:, ~mask]).all()
    assert (after[:, mask] == 0).all()
    assert out.BurnedInAnnotation == "NO"
    if int(source.SamplesPerPixel) == 3:
        assert out.PhotometricInterpretation == "RGB"


def test_without_a_matching_rule_the_pixel_data_is_copied_as_received(tmp_path: Path) -> None:
    profile = Profile.from_options(
        [], pixel_rules=[{"if": {"Manufacturer": "nobody"}, "regions": ["all"]}]
    )
    out = tmp_path / "out.dcm"
    source = get_testdata_file("CT_small.dcm")
    deidentify_file(Deidentifier(profile, secret=SECRET), source, out)
    assert (dcmread(out).pixel_array == dcmread(source).pixel_array).all()


def test_the_outcome_names_the_rule_or_the_triage_reason(tmp_path: Path) -> None:
    ct = get_testdata_file("CT_small.dcm")
    plain = Deidentifier(Profile(clean_pixel_data="off"), secret=SECRET)
    assert deidentify_file(plain, ct, tmp_path / "a.dcm").pixels is None
    us = dcmread(ct)
    us.SOPClassUID = us.file_meta.MediaStorageSOPClassUID = US_IMAGE
    us.save_as(tmp_path / "us.dcm")
    assert deidentify_file(plain, tmp_path / "us.dcm", tmp_path / "b.dcm").pixels == (
        "unchecked: ultrasound"
    )
    done = _blanked("CT_small.dcm", tmp_path, ["all"])
    assert dcmread(done).BurnedInAnnotation == "NO"
    ruled = Deidentifier(Profile.from_options([], pixel_rules=[{"regions": ["all"]}]), SECRET)
    outcome = deidentify_file(ruled, ct, tmp_path / "c.dcm").pixels
    assert outcome == "blanked by rule pixel_rules.0; OCR read 1 images: no identifying text"


def test_the_service_engine_decodes_12_bit_jpeg_to_blank_it(tmp_path: Path) -> None:
    """build_deidentifier installs anonproxy.codecs: 12-bit JPEG Extended decodes without the
    GPL codec, and a rule on it is blanked (the engine alone has no such decoder)."""
    from anonproxy.config import ProfileConfig
    from anonproxy.deidentifiers import build_deidentifier

    engine = build_deidentifier(ProfileConfig(pixel_rules=[{"regions": ["0,0,0,20"]}]), SECRET)
    source = get_testdata_file("JPEG-lossy.dcm")
    deidentify_file(engine, source, tmp_path / "out.dcm")
    out, before = dcmread(tmp_path / "out.dcm"), dcmread(source).pixel_array
    assert out.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert not out.pixel_array[:20].any()
    assert (out.pixel_array[20:] == before[20:]).all()

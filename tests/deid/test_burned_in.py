"""Burned-in text: what makes a line identifying, how lines are chosen and verified (with a
scripted reader), and the real thing: RapidOCR on the ultrasound files of pydicom-data and
deid-data, checked afterwards by an independent OCR engine (Tesseract)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.burned_in import find_text, keep_boxes, parse_keep_regions
from anonproxy.deid.instance import deidentify_file
from anonproxy.deid.ocr import OcrUnavailable, RapidOcrReader, TextLine
from anonproxy.deid.pixels import triage
from anonproxy.errors import DeidentificationError

SECRET = b"burned-in-test-secret-0123456789"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def _header(**values: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = US_IMAGE
    ds.Modality = "US"
    ds.PatientName = "DOWNTIME^MARY"
    ds.PatientID = "40404040404"
    ds.PatientBirthDate = "19510829"
    ds.StudyDate = "20200414"
    ds.AccessionNumber = "ACC7788991"
    ds.InstitutionName = "CCHS CLEVELAND CLINIC"
    ds.Manufacturer = "ACME"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _engine(options: tuple[str, ...] = (), **profile: object) -> Deidentifier:
    return Deidentifier(Profile.from_options(options, **profile), SECRET)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("DOWNTIME,MARY  AC", "PatientName"),
        ("mary downtime", "PatientName"),
        ("DOWNTIMF MARY", "PatientName"),  # one character misread
        ("ZZZ DOWNTI...", "PatientName"),  # cut by the screen
        ("ID 4O4O4O4O4O4", "PatientID"),  # letters O read for zeros
        ("CCHS CLEVELAN...", "InstitutionName"),
        ("DOB: 08/29/1951", "PatientBirthDate"),
        ("29-AUG-1951", "PatientBirthDate"),
        ("8:48:26 AM 4/14/2020", "StudyDate"),
        ("12/01/2019", "date"),  # any date
        ("00047431395", "telephone number"),  # a long number: a record number as well
        ("Dr. Hibbert", "titled name"),
    ],
)
def test_a_line_is_identifying_by_value_misread_or_form(line: str, why: str) -> None:
    ds = _header()
    assert _engine().pixel_text(ds).identifies(line) == why


@pytest.mark.parametrize(
    "line", ["LIVER", "TIS 0.5 MI 1.4", "6C1 HD", "Sag Liver L-M", "16cm", "ACME", "GEN THI"]
)
def test_clinical_and_device_text_is_not_identifying(line: str) -> None:
    assert _engine().pixel_text(_header()).identifies(line) is None


def test_dates_are_not_identifying_when_the_profile_keeps_them() -> None:
    engine = _engine(("retain_longitudinal_temporal_information_full_dates",))
    text = engine.pixel_text(_header())
    assert text.identifies("4/14/2020") is None
    assert text.identifies("DOB: 08/29/1951") is None
    assert text.identifies("DOWNTIME MARY") == "PatientName"


def test_institution_is_not_identifying_under_retain_institution_identity() -> None:
    text = _engine(("retain_institution_identity",)).pixel_text(_header())
    assert text.identifies("CCHS CLEVELAND CLINIC") is None


# -- find_text with a scripted reader ------------------------------------------------------------


class ScriptedReader:
    """Reads the given lines wherever their box is not blanked (all zero) in the image."""

    def __init__(self, lines: list[TextLine]) -> None:
        self.lines = lines
        self.reads = 0

    def read(self, image: NDArray[np.uint8]) -> list[TextLine]:
        self.reads += 1
        return [
            line
            for line in self.lines
            if image[line.box[1] : line.box[3], line.box[0] : line.box[2]].any()
        ]


def _image(ds: Dataset, frames: int = 1) -> Dataset:
    ds.Rows, ds.Columns = 60, 100
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(range(200, 250)) * (120 * frames)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.999.12.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.12.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.12.3"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


BANNER = TextLine("DOWNTIME, MARY 4/14/2020", (0, 0, 60, 10))
SETTINGS = TextLine("TIS 0.5", (70, 0, 100, 10))
LABEL = TextLine("LIVER", (40, 40, 60, 50))


def test_identifying_lines_are_blanked_with_padding_and_checked_again() -> None:
    ds = _image(_header(), frames=3)
    reader = ScriptedReader([BANNER, SETTINGS, LABEL])
    found = find_text(ds, reader, _engine().pixel_text(ds))
    assert found.boxes == ((0, 0, 62, 12),)
    assert found.reasons == ("PatientName",)
    assert reader.reads == 2 * 4  # first, middle and last frame and the still image, twice
    assert "PatientName" in found.describe()
    assert "DOWNTIME" not in found.describe()


def test_all_text_blanks_every_line_outside_the_keep_regions() -> None:
    ds = _image(_header())
    text = _engine().pixel_text(ds)
    keep = [(30, 30, 100, 60)]
    found = find_text(
        ds, ScriptedReader([BANNER, SETTINGS, LABEL]), text, mode="all_text", keep=keep
    )
    assert sorted(found.boxes) == [(0, 0, 62, 12), (68, 0, 100, 12)]  # LABEL is kept


def test_text_still_read_after_blanking_refuses_the_instance() -> None:
    class Stubborn(ScriptedReader):
        def read(self, image: NDArray[np.uint8]) -> list[TextLine]:
            return list(self.lines)  # reads the banner whatever was blanked

    ds = _image(_header())
    with pytest.raises(DeidentificationError, match="PatientName still read") as refused:
        find_text(ds, Stubborn([BANNER]), _engine().pixel_text(ds))
    assert "MARY" not in str(refused.value)


def test_a_rule_blanks_first_and_ocr_checks_what_remains() -> None:
    ds = _image(_header())
    reader = ScriptedReader([BANNER])
    found = find_text(ds, reader, _engine().pixel_text(ds), blanked=[(0, 0, 100, 12)])
    assert found.boxes == ()
    assert reader.reads == 1


def test_without_an_ocr_engine_images_that_need_it_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "rapidocr", None)
    with pytest.raises(OcrUnavailable, match="no OCR engine"):
        RapidOcrReader()


def test_clean_pixel_data_off_leaves_the_pixels_unchecked(tmp_path: Path) -> None:
    source = tmp_path / "us.dcm"
    _image(_header()).save_as(source, enforce_file_format=True)
    done = deidentify_file(_engine(clean_pixel_data="off"), source, tmp_path / "out.dcm")
    assert done.pixels == "unchecked: ultrasound"
    assert "BurnedInAnnotation" not in dcmread(tmp_path / "out.dcm")


# -- the real files: RapidOCR in, Tesseract to check ---------------------------------------------

DEID_DATA = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds"
REAL = [
    get_testdata_file("US1_J2KR.dcm"),  # JPEG 2000 lossless, RGB: decoded and stored native
    get_testdata_file("OBXXXX1A_2frame.dcm"),  # native, 2 frames: blanked in place
    str(DEID_DATA / "GREYSCALE_IMAGE.dcm"),
    str(DEID_DATA / "RGB_IMAGE.dcm"),
]


def _tokens(ds: Dataset) -> set[str]:
    """The header's identifying words that a screen may show (names, IDs, institution,
    birth and study dates as the banners of these files write them)."""
    words: set[str] = set()
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "InstitutionName"):
        for word in re.split(r"[^0-9A-Za-z]+", str(ds.get(keyword) or "")):
            if (len(word) >= 4 and not word.isdigit()) or len(word) >= 6:
                words.add(word.upper())
    for keyword in ("PatientBirthDate", "StudyDate"):
        value = str(ds.get(keyword) or "")
        if len(value) == 8:
            y, m, d = value[:4], value[4:6], value[6:]
            words |= {f"{m}/{d}/{y}", f"{int(m)}/{int(d)}/{y}"}
    return words


def _tesseract(frame: NDArray[np.uint8], folder: Path) -> str:
    """What Tesseract reads in a frame, upscaled twice, as is and inverted."""
    grey = np.asarray(Image.fromarray(frame).convert("L"))
    text = []
    for n, variant in enumerate((grey, 255 - grey)):
        path = folder / f"frame{n}.png"
        Image.fromarray(variant).resize((grey.shape[1] * 2, grey.shape[0] * 2)).save(path)
        run = subprocess.run(
            ["tesseract", str(path), "-", "--psm", "11"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_THREAD_LIMIT": "1"},
        )
        text.append(run.stdout.upper())
    return "\n".join(text)


def _frame(ds: Dataset) -> NDArray[np.uint8]:
    array = ds.pixel_array
    frame = array[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else array
    if frame.dtype != np.uint8:
        frame = (frame * (255.0 / max(1, int(frame.max())))).astype(np.uint8)
    return frame


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed")
def test_burned_in_identifiers_of_real_ultrasound_are_gone_and_nothing_else_changed(
    tmp_path: Path,
) -> None:
    from anonproxy import codecs

    codecs.install()
    engine = _engine(burned_in_annotation="pass")  # deid-data's files declare it: read them
    seen_before: set[str] = set()
    for source in REAL:
        original = dcmread(source)
        tokens = _tokens(original)
        out_path = tmp_path / f"{Path(source).stem}.out.dcm"
        done = deidentify_file(engine, source, out_path)
        out = dcmread(out_path)
        assert done.pixels is not None, source
        assert "lines blanked" in done.pixels, source
        assert out.BurnedInAnnotation == "NO"
        assert "113101" in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
        before, after = _frame(original), _frame(out)
        seen_before |= {t for t in tokens if t in _tesseract(before, tmp_path)}
        read_after = _tesseract(after, tmp_path)
        assert not [t for t in tokens if t in read_after], Path(source).name
        # Outside the blanked lines the pixels are those received (decoded, for JPEG 2000).
        boxes = re.findall(r"(\d+),(\d+),(\d+),(\d+)", done.pixels)
        untouched = np.ones(before.shape[:2], dtype=bool)
        for x0, y0, x1, y1 in (tuple(map(int, b)) for b in boxes):
            untouched[y0:y1, x0:x1] = False
            assert not after[y0:y1, x0:x1].any()
        assert np.array_equal(_frames_of(original)[:, untouched], _frames_of(out)[:, untouched]), (
            Path(source).name
        )
    assert seen_before, "Tesseract read none of the identifiers in the originals"


def _frames_of(ds: Dataset) -> NDArray[np.generic]:
    array = ds.pixel_array
    return array if int(ds.get("NumberOfFrames", 1) or 1) > 1 else array[np.newaxis]


CT_MR_DX = [
    name
    for name in (
        "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
        "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm", "MR2_J2KI.dcm", "MR2_J2KR.dcm",
        "MR2_UNCI.dcm", "MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "CT1_J2KI.dcm",
        "CT1_J2KR.dcm", "CT1_UNC.dcm", "JPEG2000.dcm", "examples_overlay.dcm",
    )
    if get_testdata_file(name) is not None
]  # fmt: skip


def test_at_most_five_percent_of_ct_mr_dx_are_blanked_or_refused(tmp_path: Path) -> None:
    """Through the product's path (most are not read at all), and every one forced through OCR
    (what a site that reads everything would see)."""
    from anonproxy import codecs
    from anonproxy.deid.ocr import default_reader

    codecs.install()
    engine = _engine()
    touched, forced, read = [], [], 0
    for name in CT_MR_DX:
        source = get_testdata_file(name)
        original = dcmread(source)
        read += triage(original) is not None
        try:
            done = deidentify_file(engine, source, tmp_path / f"{name}.out")
        except DeidentificationError:
            touched.append(name)
        else:
            if done.pixels is not None and "lines blanked" in done.pixels:
                touched.append(name)
        try:
            if find_text(original, default_reader(), engine.pixel_text(original)).boxes:
                forced.append(name)
        except DeidentificationError:
            forced.append(name)
    assert len(CT_MR_DX) >= 15
    assert read  # secondary captures of NM images are read
    assert len(touched) <= 0.05 * len(CT_MR_DX), touched
    assert len(forced) <= 0.05 * len(CT_MR_DX), forced


def test_keep_regions_are_ultrasound_regions_or_boxes_and_bad_ones_are_named() -> None:
    from pydicom.dataset import Dataset as Item

    ds = _image(_header())
    region = Item()
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 10, 20
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 89, 49
    ds.SequenceOfUltrasoundRegions = [region]
    keep = parse_keep_regions(["ultrasound_regions", "-20,0,20,10"])
    assert keep_boxes(ds, keep) == [(10, 20, 90, 50), (80, 0, 100, 10)]
    with pytest.raises(ValueError, match=r"pixel_keep_regions\.1"):
        parse_keep_regions(["ultrasound_regions", "all"])
    from anonproxy.config import ProfileConfig

    with pytest.raises(ValueError, match=r"pixel_keep_regions\.0"):
        ProfileConfig(pixel_keep_regions=["nowhere"])

"""dciodvfy (dicom3tools) finds no error in de-identified output that the input did not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from anonproxy.deid import Deidentifier, Profile

from conftest import CORPUS_NAMES, TEST_SECRET, corpus_paths
from peers import tool

pytestmark = pytest.mark.integration

_UID = re.compile(r"\b[0-9]+(?:\.[0-9]+){2,}\b")
PROFILES = {
    "basic": [],
    "options": [
        "retain_longitudinal_temporal_information_modified_dates",
        "retain_patient_characteristics",
        "clean_descriptors",
        "clean_structured_content",
    ],
}


def _errors(path: Path) -> set[str]:
    """dciodvfy's error lines, with UIDs made comparable (they change by design)."""
    done = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    return {_UID.sub("<uid>", line) for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("profile", PROFILES, ids=list(PROFILES))
@pytest.mark.parametrize("source", corpus_paths(), ids=CORPUS_NAMES)
def test_no_new_dciodvfy_error(source: Path, profile: str, tmp_path: Path) -> None:
    engine = Deidentifier(Profile.from_options(PROFILES[profile]), secret=TEST_SECRET.value)
    output = tmp_path / "out.dcm"
    engine.deidentify_file(source, output)
    new = _errors(output) - _errors(source)
    assert not new, "\n".join(sorted(new))


BURNED_IN = ["US1_J2KR.dcm", "OBXXXX1A.dcm", "RGB_IMAGE.dcm"]


@pytest.mark.parametrize("name", BURNED_IN)
def test_no_new_dciodvfy_error_after_ocr_blanking(name: str, tmp_path: Path) -> None:
    """Real ultrasound whose banner OCR blanks (in place, or decoded and stored native)."""
    from pydicom.data import get_testdata_file

    from anonproxy import codecs
    from anonproxy.deid.instance import deidentify_file

    codecs.install()
    ultrasounds = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds"
    source = Path(get_testdata_file(name) or ultrasounds / name)
    engine = Deidentifier(Profile(burned_in_annotation="pass"), secret=TEST_SECRET.value)
    output = tmp_path / "out.dcm"
    done = deidentify_file(engine, source, output)
    assert "lines blanked" in str(done.pixels)
    new = _errors(output) - _errors(source)
    assert not new, "\n".join(sorted(new))

"""Structured Reports stay valid SR documents after de-identification (issue 11).

The SR files of pydicom's test data, and a Comprehensive SR and an Enhanced SR built with
highdicom (tests/sr_samples.py), are de-identified under three profiles: dciodvfy (dicom3tools)
finds no error in the output that the input did not have, and no identifying value planted in
the built SRs (header, observer sequences, TEXT and PNAME content items) is left in its bytes.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sr_samples import PLANTED, PYDICOM_SR_NAMES, build_sr, pydicom_sr_path

from anonproxy.deid import Deidentifier, Profile

from conftest import TEST_SECRET
from peers import tool

pytestmark = pytest.mark.integration

BUILT = ["comprehensive", "enhanced"]
SAMPLES = [*PYDICOM_SR_NAMES, *(f"highdicom-{kind}" for kind in BUILT)]
PROFILES = {
    "basic": [],
    "clean_structured_content": ["clean_structured_content"],
    "modified_dates+clean": [
        "retain_longitudinal_temporal_information_modified_dates",
        "clean_structured_content",
        "clean_descriptors",
    ],
}
_UID = re.compile(r"\b[0-9]+(?:\.[0-9]+){2,}\b")
# dciodvfy names the reference it misses in the evidence; an invalid one ("0", in reportsi.dcm)
# is replaced by a valid UID: the same error, so the value is normalised whatever it is.
_MISSED_REFERENCE = re.compile(r"(ReferencedSOPInstanceUID) \S+")


@functools.cache
def _errors(path: Path) -> frozenset[str]:
    """dciodvfy's error lines, with UIDs made comparable (they change by design)."""
    done = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    return frozenset(
        _MISSED_REFERENCE.sub(r"\1 <uid>", _UID.sub("<uid>", line))
        for line in lines
        if line.startswith("Error")
    )


def _person_names(ds: Dataset) -> set[str]:
    """Every non-empty PN value of *ds*, nested ones included."""
    names: set[str] = set()
    for element in ds.iterall():
        if element.VR == "PN" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            names.update(str(value) for value in values if str(value))
    return names


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sr")
    paths = {name: pydicom_sr_path(name) for name in PYDICOM_SR_NAMES}
    for kind in BUILT:
        paths[f"highdicom-{kind}"] = build_sr(kind, folder / f"{kind}.dcm")
    return paths


def test_built_samples_are_valid_srs(samples: dict[str, Path]) -> None:
    """The built SRs themselves pass dciodvfy, so that the comparison below means something."""
    for kind in BUILT:
        assert not _errors(samples[f"highdicom-{kind}"]), kind


@pytest.mark.parametrize("profile", PROFILES, ids=list(PROFILES))
@pytest.mark.parametrize("sample", SAMPLES)
def test_no_new_dciodvfy_error(
    samples: dict[str, Path], sample: str, profile: str, tmp_path: Path
) -> None:
    source = samples[sample]
    engine = Deidentifier(Profile.from_options(PROFILES[profile]), secret=TEST_SECRET.value)
    output = tmp_path / "out.dcm"
    engine.deidentify_file(source, output)
    new = _errors(output) - _errors(source)
    assert not new, "\n".join(sorted(new))


@pytest.mark.parametrize("profile", PROFILES, ids=list(PROFILES))
@pytest.mark.parametrize("sample", SAMPLES)
def test_no_identifying_value_survives(
    samples: dict[str, Path], sample: str, profile: str, tmp_path: Path
) -> None:
    """No planted value of the built SRs is in the output's bytes, wherever it stood (header,
    observer and participant sequences, content items); no PN value of any sample is a PN value
    of its output."""
    source = samples[sample]
    engine = Deidentifier(Profile.from_options(PROFILES[profile]), secret=TEST_SECRET.value)
    output = tmp_path / "out.dcm"
    engine.deidentify_file(source, output)
    data = output.read_bytes()
    planted = PLANTED if sample.startswith("highdicom-") else {}
    survived = sorted(what for what, value in planted.items() if value.encode() in data)
    assert not survived, f"left in the output: {', '.join(survived)}"
    names = _person_names(dcmread(source)) & _person_names(dcmread(output))
    assert not names, f"person names left in the output: {sorted(names)}"

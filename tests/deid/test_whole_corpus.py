"""Every instance file pydicom ships de-identifies, writes and reads back (odd encodings too:
big endian, implicit VR data under an explicit VR transfer syntax, deflate, private SQs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.errors import InvalidDicomError

from anonproxy.deid import Deidentifier, Profile, read_instance, write_instance
from anonproxy.errors import DecodeError

from .helpers import SECRET

FOLDER = Path(str(get_testdata_file("CT_small.dcm"))).parent


def _instances() -> list[Path]:
    found = []
    for path in sorted(FOLDER.glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if all(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")):
            found.append(path)
    return found


INSTANCES = _instances()


def test_the_corpus_is_large() -> None:
    assert len(INSTANCES) >= 60


@pytest.mark.parametrize("source", INSTANCES, ids=[p.name for p in INSTANCES])
def test_instance_round_trips(source: Path, tmp_path: Path) -> None:
    engine = Deidentifier(Profile.from_options([]), secret=SECRET)
    try:
        ds = read_instance(source)
    except DecodeError:
        pytest.fail(f"{source.name} is an instance but was not read")
    original = str(ds.SOPInstanceUID)
    result = engine.deidentify(ds)
    write_instance(ds, tmp_path / "out.dcm")
    out = dcmread(tmp_path / "out.dcm")
    assert out.SOPInstanceUID == result.sop_instance_uid != original
    assert out.PatientIdentityRemoved == "YES"
    if "PixelData" in ds:
        assert out.PixelData == ds.PixelData

"""Synthetic instances for volume tests: real headers and pixels of the pydicom test corpus with
fresh UIDs and planted identifying values."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def make_series(
    directory: Path,
    count: int,
    *,
    template: str = "MR_small.dcm",
    patient_name: str = "Doe^Jane^Q",
    patient_id: str = "PID-4711-X",
) -> list[Path]:
    """Write *count* instances of one series of one study; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(str(get_testdata_file(template)))
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = "ACC-90210-Z"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    paths = []
    for number in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number + 1
        path = directory / f"i{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

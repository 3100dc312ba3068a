"""Synthetic instances for volume tests: real headers and pixels of the pydicom test corpus with
fresh UIDs and planted identifying values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def make_series(
    directory: Path,
    count: int,
    *,
    template: str = "MR_small.dcm",
    patient_name: str = "Doe^Jane^Q",
    patient_id: str = "PID-4711-X",
    rows: int | None = None,
    frames: int = 1,
) -> list[Path]:
    """Write *count* instances of one series of one study; returns their paths.

    With *rows*, the pixel data is replaced by random 12-bit pixels of *rows* x *rows* (and
    *frames* frames), in Explicit VR Little Endian: the synthetic series of the benchmarks.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(str(get_testdata_file(template)))
    if rows is not None:
        _synthetic_pixels(ds, rows, frames)
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


def random_pixels(rows: int, frames: int) -> np.ndarray:
    """12-bit random pixels, *frames* x *rows* x *rows*, the same on every call."""
    return np.random.default_rng(7).integers(0, 4096, size=(frames, rows, rows), dtype=np.uint16)


def _synthetic_pixels(ds: Dataset, rows: int, frames: int) -> None:
    pixels = random_pixels(rows, frames)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()

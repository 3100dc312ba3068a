"""Builders shared by the de-identification tests (no fixture files: datasets built in code)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

SECRET = b"anonproxy-deid-test-secret-000001"
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.10.1.999"  # not in the IOD data

PATIENT_NAME = "Rumpelstiltskin^Gertrude^Q"
PATIENT_ID = "PID-4711-X"
ACCESSION = "ACC-90210-Z"
INSTITUTION = "Saint Elsewhere Hospital"
BIRTH_DATE = "19530417"
SOP_UID = "1.2.826.0.1.3680043.10.1.1.1"
STUDY_UID = "1.2.826.0.1.3680043.10.1.1.2"
SERIES_UID = "1.2.826.0.1.3680043.10.1.1.3"


def minimal(sop_class: str = CTImageStorage) -> Dataset:
    """The smallest dataset the engine accepts, with planted identifying values."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = BIRTH_DATE
    ds.InstitutionName = INSTITUTION
    return ds


def with_meta(ds: Dataset) -> Dataset:
    ds.file_meta = Dataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1.77"
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY_AE"
    ds.file_meta.SendingApplicationEntityTitle = "SENDER_AE"
    ds.file_meta.ReceivingApplicationEntityTitle = "RECEIVER_AE"
    return ds


def item(**elements: object) -> Dataset:
    out = Dataset()
    for keyword, value in elements.items():
        setattr(out, keyword, value)
    return out


def seq(*items: Dataset) -> Sequence:
    return Sequence(list(items))


def corpus_file(name: str) -> Path | None:
    """Path of a file of pydicom's test corpus if it is installed locally (never downloads)."""
    path = get_testdata_file(name, download=False)
    return Path(str(path)) if path else None


def load(name: str) -> Dataset:
    path = corpus_file(name)
    assert path is not None
    return dcmread(path)


def walk_strings(ds: Dataset) -> Iterator[tuple[int, str]]:
    """(tag, string) of every string value at every depth, file meta included."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from walk_strings_plain(meta)
    yield from walk_strings_plain(ds)


def walk_strings_plain(ds: Dataset) -> Iterator[tuple[int, str]]:
    for elem in ds:
        yield from _elem_strings(elem)


def _elem_strings(elem: DataElement) -> Iterator[tuple[int, str]]:
    if elem.VR == "SQ":
        for inner in elem.value:
            yield from walk_strings_plain(inner)
        return
    value = elem.value
    if isinstance(value, bytes | bytearray) or value is None:
        return
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    for v in values:
        yield elem.tag, str(v)

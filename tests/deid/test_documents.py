"""Encapsulated documents and video transfer syntaxes: refused by default; documents cleaned
(searched, passed unchanged only when they name nobody) on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG4HP41,
    EncapsulatedCDAStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    VideoEndoscopicImageStorage,
)

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.documents import is_video
from anonproxy.errors import DeidentificationError, PolicyRefusal

from .helpers import PATIENT_NAME, SECRET, minimal


def pdf(text: str, *, author: str | None = None) -> bytes:
    """A one-page PDF showing *text* (Helvetica), with an Author in its metadata if given."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if author is not None:
        objects.append(f"<< /Author ({author}) >>".encode("latin-1"))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info = b" /Info %d 0 R" % len(objects) if author is not None else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\n" % (len(objects) + 1, info)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def _document(tmp_path: Path, document: bytes, sop_class: str = EncapsulatedPDFStorage) -> Path:
    ds = minimal(sop_class)
    ds.EncapsulatedDocument = document + b"\0" * (len(document) % 2)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "Report"
    path = tmp_path / "document.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def _engine(**policies: str) -> Deidentifier:
    return Deidentifier(Profile.from_options([], **policies), secret=SECRET)  # type: ignore[arg-type]


FAMILY = PATIENT_NAME.split("^")[0]


def test_a_document_is_refused_by_default(tmp_path: Path) -> None:
    source = _document(tmp_path, pdf("Normal study."))
    with pytest.raises(PolicyRefusal, match="encapsulated PDF document refused by policy"):
        _engine().deidentify_file(source, tmp_path / "out.dcm")
    assert not (tmp_path / "out.dcm").exists()


@pytest.mark.parametrize(
    ("document", "found"),
    [
        (pdf(f"Patient {FAMILY}: normal study."), "PatientName"),
        (pdf("Normal study.", author=FAMILY), "PatientName"),
        (pdf("Normal study. Call 555 0199 12 for questions."), "telephone number"),
        (pdf("Normal study, signed Dr. Moreau"), "titled name"),
        (b"%PDF-1.4\nnot a document", "cannot be parsed"),
    ],
    ids=["name-in-text", "name-in-metadata", "phone", "titled-name", "damaged"],
)
def test_clean_refuses_a_document_that_names_someone(
    tmp_path: Path, document: bytes, found: str
) -> None:
    source = _document(tmp_path, document)
    with pytest.raises(DeidentificationError) as refused:
        _engine(encapsulated_documents="clean").deidentify_file(source, tmp_path / "out.dcm")
    assert found in str(refused.value)
    assert FAMILY not in str(refused.value)


def test_clean_passes_a_document_that_names_nobody_unchanged(tmp_path: Path) -> None:
    document = pdf("No acute intracranial abnormality.")
    source = _document(tmp_path, document)
    _engine(encapsulated_documents="clean").deidentify_file(source, tmp_path / "out.dcm")
    out = dcmread(tmp_path / "out.dcm")
    assert out.EncapsulatedDocument.rstrip(b"\0") == document
    assert out.PatientName == ""


def test_clean_reads_a_cda_as_text(tmp_path: Path) -> None:
    cda = f"<ClinicalDocument><patient><name>{FAMILY}</name></patient></ClinicalDocument>"
    source = _document(tmp_path, cda.encode(), EncapsulatedCDAStorage)
    with pytest.raises(DeidentificationError, match="CDA document names someone"):
        _engine(encapsulated_documents="clean").deidentify_file(source, tmp_path / "out.dcm")


def _video(tmp_path: Path) -> Path:
    ds = minimal(VideoEndoscopicImageStorage)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = (
        3,
        "YBR_PARTIAL_420",
        0,
    )
    ds.PixelData = encapsulate([b"\0\0\0\1" * 8])
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_video_is_refused_by_default_and_passed_on_request(tmp_path: Path) -> None:
    assert is_video(MPEG4HP41)
    assert not is_video(ExplicitVRLittleEndian)
    assert not is_video(None)
    source = _video(tmp_path)
    with pytest.raises(PolicyRefusal, match="video transfer syntax"):
        _engine().deidentify_file(source, tmp_path / "out.dcm")
    result = _engine(video="pass").deidentify_file(source, tmp_path / "out.dcm")
    assert result.sop_class_uid == VideoEndoscopicImageStorage


def test_an_unknown_policy_value_is_refused() -> None:
    with pytest.raises(ValueError, match="encapsulated_documents is reject or clean"):
        Profile(encapsulated_documents="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="video is reject or pass"):
        Profile(video="maybe")  # type: ignore[arg-type]


def test_the_header_profile_alone_dummies_the_document() -> None:
    """deidentify(ds) applies Table E.1-1 only: Encapsulated Document is D there."""
    ds: Dataset = minimal(EncapsulatedPDFStorage)
    ds.EncapsulatedDocument = pdf(f"Patient {FAMILY}")
    _engine(encapsulated_documents="clean").deidentify(ds)
    assert FAMILY.encode() not in ds.EncapsulatedDocument

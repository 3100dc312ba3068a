"""Structured Report samples: the SR files shipped inside the pydicom wheel, and a Comprehensive SR
and an Enhanced SR built with highdicom whose header and content tree carry planted identifying
values (``PLANTED``) in every place an SR can hold them."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, generate_uid

# The SR files of pydicom's own test data: shipped in its wheel, read from the installed package
# (never pydicom.data.get_testdata_file, which may download files that are not shipped).
PYDICOM_SR_NAMES = ["reportsi.dcm", "reportsi_with_empty_number_tags.dcm", "test-SR.dcm"]


def pydicom_sr_path(name: str) -> Path:
    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        msg = f"{name} is not in the installed pydicom wheel"
        raise FileNotFoundError(msg)
    return path


PATIENT_NAME = "Moriarty^James^Xavier"
PATIENT_ID = "PID-7734521-Q"
BIRTH_DATE = "19620704"
ACCESSION = "ACC-5550199-R"
REFERRING = "Lecter^Hannibal"
PHYSICIAN = "Dr. Gregory Housemann"
PHONE = "+1-555-014-2987"
ADDRESS = "221B Bakerloo Street"
PNAME_ITEM = "Watsonby^Johanna"
VERIFIER = "Cuddington^Lisabeth"
AUTHOR = "Wilsonby^Jameson"
PARTICIPANT = "Chaseworth^Roberta"
AUTHOR_ID = "NPI-4455667"
PARTICIPANT_ID = "NPI-8899001"

# Identifying strings planted in the built SRs; none may be in a de-identified output's bytes.
PLANTED = {
    "patient name": "Moriarty",
    "patient id": PATIENT_ID,
    "birth date": BIRTH_DATE,
    "accession number": ACCESSION,
    "referring physician": "Lecter",
    "physician named in TEXT": "Housemann",
    "phone in TEXT": PHONE,
    "address in TEXT": "Bakerloo",
    "PNAME item": "Watsonby",
    "verifying observer": "Cuddington",
    "author observer": "Wilsonby",
    "participant": "Chaseworth",
    "author id": AUTHOR_ID,
    "participant id": PARTICIPANT_ID,
}

_SCHEME = "99ANONPROXY"


def _uid(name: str) -> str:
    """A fixed UID per name: the samples are the same on every run."""
    return generate_uid(entropy_srcs=["anonproxy-sr-sample", name])


def _referenced_image() -> Dataset:
    """The header of the CT image the reports refer to (their evidence, patient and study)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid("image")
    ds.StudyInstanceUID = _uid("study")
    ds.SeriesInstanceUID = _uid("image series")
    ds.Modality = "CT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "M"
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.StudyID = "S-42"
    ds.AccessionNumber = ACCESSION
    ds.ReferringPhysicianName = REFERRING
    return ds


def _content(image: Dataset) -> hd.sr.ContainerContentItem:
    """CONTAINER > CONTAINER > one item of each value type (TEXT ... IMAGE)."""
    findings = hd.sr.ContainerContentItem(
        name=Code("121070", "DCM", "Findings"), relationship_type="CONTAINS"
    )
    findings.ContentSequence = [
        hd.sr.TextContentItem(
            name=Code("121071", "DCM", "Finding"),
            value=(
                f"Discussed with {PHYSICIAN} by phone {PHONE}; the patient lives at "
                f"{ADDRESS}, Springfield."
            ),
            relationship_type="CONTAINS",
        ),
        hd.sr.PnameContentItem(
            name=Code("121008", "DCM", "Person Observer Name"),
            value=PNAME_ITEM,
            relationship_type="CONTAINS",
        ),
        hd.sr.DateContentItem(
            name=Code("21112-8", "LN", "Birth date"),
            value=BIRTH_DATE,
            relationship_type="CONTAINS",
        ),
        hd.sr.DateTimeContentItem(
            name=Code("111526", "DCM", "DateTime Started"),
            value="20240315101500",
            relationship_type="CONTAINS",
        ),
        hd.sr.TimeContentItem(
            name=Code("T-0001", _SCHEME, "Time of telephone call"),
            value="114500",
            relationship_type="CONTAINS",
        ),
        hd.sr.UIDRefContentItem(
            name=Code("121018", "DCM", "Procedure Study Instance UID"),
            value=image.StudyInstanceUID,
            relationship_type="CONTAINS",
        ),
        hd.sr.CodeContentItem(
            name=Code("363698007", "SCT", "Finding Site"),
            value=Code("39607008", "SCT", "Lung"),
            relationship_type="CONTAINS",
        ),
        hd.sr.NumContentItem(
            name=Code("81827009", "SCT", "Diameter"),
            value=12.5,
            unit=Code("mm", "UCUM", "millimeter"),
            relationship_type="CONTAINS",
        ),
        hd.sr.ImageContentItem(
            name=Code("121112", "DCM", "Source of Measurement"),
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
            relationship_type="CONTAINS",
        ),
    ]
    root = hd.sr.ContainerContentItem(name=Code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = [findings]
    return root


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = _SCHEME
    item.CodeMeaning = meaning
    return item


def _person(name: str, identifier: str) -> Dataset:
    """An item of the Identified Person or Device Macro, for a person."""
    item = Dataset()
    item.ObserverType = "PSN"
    item.PersonName = name
    item.PersonIdentificationCodeSequence = [_code(identifier, "National provider identifier")]
    item.InstitutionName = "Princeton Plainsboro Teaching Hospital"
    item.InstitutionCodeSequence = []
    return item


def _requested_procedure(image: Dataset) -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = image.StudyInstanceUID
    item.ReferencedStudySequence = []
    item.AccessionNumber = ACCESSION
    item.PlacerOrderNumberImagingServiceRequest = "PLACER-31337"
    item.FillerOrderNumberImagingServiceRequest = "FILLER-31337"
    item.RequestedProcedureID = "RP-1"
    item.RequestedProcedureDescription = "CT chest"
    item.RequestedProcedureCodeSequence = [_code("CTCHEST", "CT chest")]
    return item


def build_sr(kind: str, path: Path) -> Path:
    """Write a ``"comprehensive"`` or ``"enhanced"`` SR with every planted value to *path*."""
    image = _referenced_image()
    cls = {"comprehensive": hd.sr.ComprehensiveSR, "enhanced": hd.sr.EnhancedSR}[kind]
    sr = cls(
        evidence=[image],
        content=_content(image),
        series_instance_uid=_uid(f"{kind} series"),
        series_number=99,
        sop_instance_uid=_uid(f"{kind} instance"),
        instance_number=1,
        manufacturer="anonproxy tests",
        is_complete=True,
        is_final=True,
        is_verified=True,
        institution_name="Princeton Plainsboro Teaching Hospital",
        verifying_observer_name=VERIFIER,
        verifying_organization="Princeton Plainsboro Teaching Hospital",
        performed_procedure_codes=[Code("CTCHEST", _SCHEME, "CT chest")],
        requested_procedures=[_requested_procedure(image)],
    )
    sr.AuthorObserverSequence = [_person(AUTHOR, AUTHOR_ID)]
    participant = _person(PARTICIPANT, PARTICIPANT_ID)
    participant.ParticipationType = "ENT"
    participant.ParticipationDateTime = "20240315120000"
    sr.ParticipantSequence = [participant]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = _SCHEME
    scheme.CodingSchemeName = "anonproxy test codes"
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.ContentDate = "20240315"
    sr.ContentTime = "120000"
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path, enforce_file_format=True)
    return path

"""Compound codes resolved by the attribute's Type in the IOD of the SOP Class."""

from __future__ import annotations

import pytest

from anonproxy.deid import ActionCode, Deidentifier, Profile
from anonproxy.deid.actions import UNKNOWN_IOD, resolve
from anonproxy.deid.tables import iod_types

from .helpers import PATIENT_ID, SECRET, UNKNOWN_SOP_CLASS, item, minimal, seq

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("code", "type_", "expected"),
    [
        ("X/Z/D", "1", "D"),
        ("X/Z/D", "1C", "D"),
        ("X/Z/D", "2", "Z"),
        ("X/Z/D", "2C", "Z"),
        ("X/Z/D", "3", "X"),
        ("X/Z/D", None, "X"),
        ("X/Z/U*", "1", "U"),
        ("X/Z/U*", "2", "U"),
        ("X/Z/U*", "3", "U"),
        ("X/D", "2", "D"),
        ("X/D", "3", "X"),
        ("Z/D", "1", "D"),
        ("Z/D", "2", "Z"),
        ("Z/D", "3", "Z"),
        ("X/Z", "1", "D"),  # a Type 1 attribute cannot be empty
        ("Z", "1", "D"),
        ("Z", "2", "Z"),
        ("Z", None, "Z"),
        ("X", "1", "X"),
        ("U", "3", "U"),
        # unknown SOP Class: Z where offered, else D
        ("X/Z", UNKNOWN_IOD, "Z"),
        ("X/D", UNKNOWN_IOD, "D"),
        ("X/Z/D", UNKNOWN_IOD, "Z"),
        ("Z/D", UNKNOWN_IOD, "Z"),
        ("X/Z/U*", UNKNOWN_IOD, "U"),
    ],
)
def test_resolve(code: str, type_: str | None, expected: str) -> None:
    assert resolve(code, type_) == ActionCode(expected)


def test_ct_iod_types() -> None:
    types = iod_types(CT)
    assert types is not None
    assert types["PatientID"] == "2"
    assert types["InstitutionName"] == "3"
    assert types["ContentDate"] == "2C"
    assert types["GroupOfPatientsIdentificationSequence/PatientID"] == "1"
    assert iod_types(UNKNOWN_SOP_CLASS) is None


def test_ct_patient_id_type_2_is_zeroed_and_institution_type_3_removed() -> None:
    ds = minimal(CT)
    ds.ContentDate = "20200101"  # Z/D, Type 2C in CT → Z
    ds.ProtocolName = "Brain protocol"  # X/D, Type 3 → X
    ds.AcquisitionDate = "20200101"  # X/Z, Type 3 → X
    result = Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert "PatientID" in ds
    assert ds.PatientID == ""
    assert "InstitutionName" not in ds
    assert ds.ContentDate == ""
    assert "ProtocolName" not in ds
    assert "AcquisitionDate" not in ds
    assert result.action_counts["Z"] >= 3
    assert result.action_counts["X"] >= 3


def test_unknown_sop_class_takes_z_where_offered() -> None:
    ds = minimal(UNKNOWN_SOP_CLASS)
    ds.ProtocolName = "Brain protocol"  # X/D → D
    Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert ds.PatientID == ""
    assert ds.InstitutionName == ""
    assert ds.ProtocolName == "ANONYMIZED"


def test_nested_type_1_patient_id_gets_a_dummy() -> None:
    """GroupOfPatientsIdentificationSequence is not in Table E.1-1 (kept, walked); its
    PatientID is Type 1 there, so Z/D resolves to D by the keyword path."""
    ds = minimal(CT)
    ds.GroupOfPatientsIdentificationSequence = seq(item(PatientID=PATIENT_ID))
    Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert ds.PatientID == ""
    nested = ds.GroupOfPatientsIdentificationSequence[0]
    assert nested.PatientID == "ANONYMIZED"

"""The decisions an engine keeps per position (:meth:`Deidentifier._decide`): made once per
SOP Class, parent sequences, mode, tag and VR as held, never shared between two of those or
between two engines, bounded; and the elements read without a value, which pydicom converts
when they are first looked at, written as pydicom's writer writes them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement, RawDataElement

from anonproxy.deid import Deidentifier, Profile, engine
from anonproxy.deid.files import read_received, write_spliced
from anonproxy.deid.structure import held_elements

from .helpers import PATIENT_ID, SECRET, UNKNOWN_SOP_CLASS, item, minimal, seq

CT = "1.2.840.10008.5.1.4.1.1.2"
ECHO_TRAIN_LENGTH = 0x00180091  # IS, zero length in pydicom's MR_small.dcm


def _ct_and_unknown(deid: Deidentifier) -> tuple[str | None, str | None]:
    """Protocol Name (X/D) of a CT (Type 3: removed) and of an unknown SOP Class (D)."""
    ct = minimal(CT)
    ct.ProtocolName = "Brain protocol"
    unknown = minimal(UNKNOWN_SOP_CLASS)
    unknown.ProtocolName = "Brain protocol"
    deid.deidentify(ct)
    deid.deidentify(unknown)
    return ct.get("ProtocolName"), unknown.get("ProtocolName")


def test_each_sop_class_is_resolved_by_its_own_iod_in_one_engine() -> None:
    deid = Deidentifier(Profile(), SECRET)
    for _ in range(2):  # the second round takes the decisions the first one made
        assert _ct_and_unknown(deid) == (None, "ANONYMIZED")
    fresh = Deidentifier(Profile(), SECRET)
    unknown_first = minimal(UNKNOWN_SOP_CLASS)
    unknown_first.ProtocolName = "Brain protocol"
    fresh.deidentify(unknown_first)
    assert unknown_first.ProtocolName == "ANONYMIZED"
    assert _ct_and_unknown(fresh) == (None, "ANONYMIZED")


def test_a_tag_is_decided_apart_at_each_depth() -> None:
    """Patient ID is Type 2 at the top level of a CT (Z) and Type 1 in the Group of Patients
    Identification Sequence (D): one engine, both in one data set, twice."""
    deid = Deidentifier(Profile(), SECRET)
    for _ in range(2):
        ds = minimal(CT)
        ds.GroupOfPatientsIdentificationSequence = seq(item(PatientID=PATIENT_ID))
        deid.deidentify(ds)
        assert ds.PatientID == ""
        assert ds.GroupOfPatientsIdentificationSequence[0].PatientID == "ANONYMIZED"


def test_two_engines_never_share_decisions() -> None:
    basic = Deidentifier(Profile(), SECRET)
    device = Deidentifier(Profile.from_options(["retain_device_identity"]), SECRET)
    for deid, kept in ((basic, False), (device, True), (basic, False), (device, True)):
        ds = minimal(CT)
        ds.DeviceSerialNumber = "SN-0042-X"
        deid.deidentify(ds)
        assert (ds.get("DeviceSerialNumber") == "SN-0042-X") is kept


def test_the_decisions_are_bounded_and_stay_right_past_the_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "_MAX_POSITIONS", 2)
    monkeypatch.setattr(engine, "_MAX_DECISIONS", 3)
    deid = Deidentifier(Profile(), SECRET)
    for _ in range(3):
        assert _ct_and_unknown(deid) == (None, "ANONYMIZED")
        ds = minimal(CT)
        ds.GroupOfPatientsIdentificationSequence = seq(item(PatientID=PATIENT_ID))
        deid.deidentify(ds)
        assert ds.PatientID == ""
        assert ds.GroupOfPatientsIdentificationSequence[0].PatientID == "ANONYMIZED"
        assert "InstitutionName" not in ds
    assert len(deid._decisions) <= 2
    assert all(len(decisions) <= 3 for decisions in deid._decisions.values())


def test_held_elements_converts_an_element_read_without_a_value() -> None:
    ds, _, _ = read_received(Path(str(get_testdata_file("MR_small.dcm"))))
    raw = ds.get_item(ECHO_TRAIN_LENGTH, keep_deferred=True)
    assert isinstance(raw, RawDataElement)
    assert raw.value is None
    held = dict(held_elements(ds))
    assert isinstance(held[ECHO_TRAIN_LENGTH], DataElement)
    assert sum(isinstance(e, RawDataElement) for e in held.values()) >= 30  # the rest as held


def test_an_element_read_without_a_value_is_written_as_the_full_writer_writes_it() -> None:
    """The engine alone (no structure check before it): the copying writer converts what
    pydicom's writer converts, and their bytes are the same."""
    path = Path(str(get_testdata_file("MR_small.dcm")))
    outputs = []
    for copying in (True, False):
        ds, span, layout = read_received(path)
        _, check = Deidentifier(Profile(), SECRET).deidentify_with_check(ds)
        out = io.BytesIO()
        write_spliced(ds, span, out, None, layout if copying else None)
        outputs.append(out.getvalue())
        assert check.finding(out.getvalue()) is None
    assert outputs[0] == outputs[1]

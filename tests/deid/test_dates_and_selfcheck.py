"""Modified dates (per-patient shift), full dates, and the pre-forward self-check."""

from __future__ import annotations

import random
import re
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.dates import DateShifter
from anonproxy.deid.selfcheck import first_uid
from anonproxy.errors import DeidentificationError

from .helpers import (
    ACCESSION,
    INSTITUTION,
    PATIENT_ID,
    PATIENT_NAME,
    SECRET,
    SOP_UID,
    item,
    minimal,
    seq,
)

MODIFIED = ["retain_longitudinal_temporal_information_modified_dates"]
FULL = ["retain_longitudinal_temporal_information_full_dates"]
dates = st.dates(min_value=date(1901, 1, 1), max_value=date(2099, 12, 31))


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _parse(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


@settings(max_examples=60, deadline=None)
@given(study=dates, acquired=dates, patient=st.text(min_size=0, max_size=20))
def test_modified_dates_preserve_intervals_within_a_patient(
    study: date, acquired: date, patient: str
) -> None:
    ds = minimal()
    ds.PatientID = patient
    ds.StudyDate = _da(study)
    ds.StudyTime = "101500"
    ds.AcquisitionDateTime = _da(acquired) + "083000.5+0100"
    ds.ReferencedInstanceSequence = seq(item(InstanceCreationDate=_da(acquired)))
    Deidentifier(Profile.from_options(MODIFIED), secret=SECRET).deidentify(ds)
    new_study = _parse(ds.StudyDate)
    new_acquired = _parse(ds.AcquisitionDateTime)
    assert new_acquired - new_study == acquired - study
    assert -365 <= (new_study - study).days <= -1
    assert ds.AcquisitionDateTime[8:] == "083000.5+0100"
    assert ds.StudyTime == "101500"
    assert _parse(ds.ReferencedInstanceSequence[0].InstanceCreationDate) == new_acquired
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"


def test_offset_is_per_patient_and_keyed() -> None:
    shifter = DateShifter(SECRET)
    offsets = {shifter.offset_days(f"P{n}") for n in range(50)}
    assert len(offsets) > 10
    assert shifter.offset_days("P1") == DateShifter(SECRET).offset_days("P1")
    assert DateShifter(SECRET, (-10, -10)).offset_days("P1") == -10


def test_dt_precision_is_kept() -> None:
    assert DateShifter.shift_dt("2020", -1) == "2019"
    assert DateShifter.shift_dt("202003", -1) == "202002"
    assert DateShifter.shift_dt("20200301120000", -1) == "20200229120000"
    assert DateShifter.shift_da("2020.03.01", -1) == "20200229"
    with pytest.raises(ValueError, match="DA"):
        DateShifter.shift_da("yesterday", 1)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_unparsable_date_falls_back_to_the_basic_code() -> None:
    ds = minimal()
    ds.StudyDate = "not a date"  # Basic Z
    Deidentifier(Profile.from_options(MODIFIED), secret=SECRET).deidentify(ds)
    assert ds.StudyDate == ""


def test_full_dates_keep_dates_and_basic_removes_them() -> None:
    ds, basic = minimal(), minimal()
    for d in (ds, basic):
        d.StudyDate = "20200102"
    Deidentifier(Profile.from_options(FULL), secret=SECRET).deidentify(ds)
    Deidentifier(Profile(), secret=SECRET).deidentify(basic)
    assert ds.StudyDate == "20200102"
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert basic.StudyDate == ""
    assert basic.LongitudinalTemporalInformationModified == "REMOVED"


def test_full_and_modified_dates_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        Profile.from_options(FULL + MODIFIED)


@pytest.mark.parametrize(
    ("tag", "vr", "value", "keyword"),
    [
        (0x00181040, "LO", f"IV via {PATIENT_NAME.split('^')[0]}", "PatientName"),  # kept LO
        (0x00181040, "LO", PATIENT_ID, "PatientID"),
        (0x00181040, "LO", f"acc {ACCESSION.lower()}", "AccessionNumber"),
        (0x00181040, "LO", INSTITUTION, "InstitutionName"),
        (0x00080117, "UI", SOP_UID, "SOPInstanceUID"),  # ContextUID: not in the table
    ],
)
def test_self_check_rejects_a_surviving_identifier_without_naming_it(
    tag: int, vr: str, value: str, keyword: str
) -> None:
    ds = minimal()
    ds.add_new(tag, vr, value)
    with pytest.raises(DeidentificationError) as info:
        Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    message = str(info.value)
    assert message.startswith(f"self-check: identifying value of {keyword} survived in ")
    assert f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in message
    for planted in (value, PATIENT_ID, ACCESSION, INSTITUTION, SOP_UID, *PATIENT_NAME.split("^")):
        if len(planted) >= 3:
            assert planted.casefold() not in message.casefold()


def test_self_check_ignores_words_inside_other_words_and_product_names() -> None:
    ds = minimal()
    ds.PatientName = "Ann^Lee"
    ds.ContrastBolusRoute = "Scanner knee"  # "ann" and "lee" only inside words
    ds.Manufacturer = "Saint Elsewhere Hospital Devices"  # institution name = product vocabulary
    ds.ManufacturerModelName = "Model Saint Elsewhere Hospital"
    Deidentifier(Profile(), secret=SECRET).deidentify(ds)
    assert ds.ContrastBolusRoute == "Scanner knee"


@pytest.mark.parametrize(
    ("patient_id", "options"),
    [
        ("YES", []),  # Patient Identity Removed (hypothesis found this one)
        ("Modified", MODIFIED),  # Longitudinal Temporal Information Modified
        ("REMOVED", []),
        ("113100", []),  # the Basic Profile's code value
        ("DCM", []),  # its coding scheme
        ("Retain Longitudinal Temporal Information Full Dates Option", FULL),  # a code meaning
    ],
)
def test_a_value_the_engine_writes_itself_is_not_a_self_check_hit(
    patient_id: str, options: list[str]
) -> None:
    """An identifying value equal to what the engine writes into every instance would be found
    again there, in the engine's own attributes: the instance was refused."""
    ds = minimal()
    ds.PatientID = patient_id
    Deidentifier(Profile.from_options(options), secret=SECRET).deidentify(ds)
    assert ds.PatientID != patient_id


def test_retained_institution_is_not_a_self_check_hit() -> None:
    ds = minimal()
    ds.ContrastBolusRoute = INSTITUTION
    profile = Profile.from_options(["retain_institution_identity"])
    Deidentifier(profile, secret=SECRET).deidentify(ds)
    assert ds.InstitutionName == INSTITUTION


def test_clean_descriptors_scrubs_identifiers_and_person_names() -> None:
    ds = minimal()
    ds.OperatorsName = "Smithereens^Jo"
    ds.StudyDescription = f"CT head for {PATIENT_NAME.split('^')[0]}, op Smithereens"
    ds.SeriesDescription = "Axial 5mm"
    result = Deidentifier(Profile.from_options(["clean_descriptors"]), secret=SECRET).deidentify(ds)
    assert ds.StudyDescription == "CT head for , op"
    assert ds.SeriesDescription == "Axial 5mm"
    assert result.action_counts["C"] >= 2


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"])
def test_missing_required_uid_is_rejected(missing: str) -> None:
    ds = minimal()
    delattr(ds, missing)
    with pytest.raises(DeidentificationError, match=missing):
        Deidentifier(Profile(), secret=SECRET).deidentify(ds)


def test_a_value_that_cannot_be_processed_becomes_a_deidentification_error() -> None:
    ds = minimal()
    ds.add_new(0x00080018, "UI", SOP_UID)
    ds.add_new(0x00081155, "US", 5)  # ReferencedSOPInstanceUID with the wrong VR: U impossible
    with pytest.raises(DeidentificationError, match=r"\(0008,1155\)"):
        Deidentifier(Profile(), secret=SECRET).deidentify(ds)


@pytest.mark.parametrize("patient_id", ["#", "#1234567", "\x01", "+1 (555) 010-0199"])
def test_identifiers_that_look_like_markers_are_searched_as_themselves(patient_id: str) -> None:
    """A telephone number is marked inside the self-check; a Patient ID that starts like the
    mark (hypothesis found '#') must not become an empty pattern that matches everything."""
    ds = minimal()
    ds.PatientID = patient_id
    ds.StudyDescription = "routine"
    Deidentifier(Profile.from_options(["clean_descriptors"]), secret=SECRET).deidentify(ds)
    assert ds.StudyDescription == "routine"


def test_first_uid_is_the_first_whole_uid_token() -> None:
    """first_uid finds what the regular expression of UID tokens finds first, scanning left to
    right, on random data made of UIDs, digits, dots, a letter and NUL."""
    token = re.compile(rb"[0-9]+(?:\.[0-9]+)+")
    rng = random.Random(1234)
    uids = ["1.2", "1.2.3", "2.3", "12.3", "3.45", "1.2.3.4", "x.1", "1..2", "5"]
    pieces = [b"1.2", b"1.2.3", b"2.3", b"3.45", b".", b"..", b"1", b"45", b"a", b"\x00"]
    found = 0
    for _ in range(20_000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        chosen = rng.sample(uids, rng.randrange(1, 5))
        expected = next((t.decode() for t in token.findall(data) if t.decode() in chosen), None)
        assert first_uid(data, chosen) == expected, (data, chosen)
        found += expected is not None
    assert found > 2000


def test_in_words_without_the_regex_answers_as_the_regex() -> None:
    """_in_words with the lower-cased ASCII text (no regular expression when the value is not
    in it) answers as the regular expression alone, on random values and texts, ASCII or not
    (the Kelvin sign and the long s match k and s when case is ignored)."""
    from anonproxy.deid.selfcheck import _in_words

    rng = random.Random(4321)
    alphabet = ["a", "B", "k", "s", " ", "-", "1", "_", "\n", "é", "\u212a", "\u017f", "ß"]
    hits = 0
    for _ in range(20_000):
        value = "".join(rng.choice(alphabet[:8]) for _ in range(rng.randrange(1, 4))).casefold()
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        expected = re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None
        lowered = text.lower() if text.isascii() else None
        assert _in_words(value, text, lowered) is expected, (value, text)
        assert _in_words(value, text) is expected, (value, text)
        hits += expected
    assert hits > 300


def test_date_offsets_remembered_are_the_keyed_ones() -> None:
    """DateShifter remembers offsets (bounded): the same as a new shifter's, for many IDs."""
    from anonproxy.deid import dates

    shifter = DateShifter(b"secret", (-30, -1))
    ids = [f"patient-{n}" for n in range(dates._MAX_OFFSETS + 50)]
    first = [shifter.offset_days(patient_id) for patient_id in ids]
    again = [shifter.offset_days(patient_id) for patient_id in reversed(ids)][::-1]
    fresh = [DateShifter(b"secret", (-30, -1)).offset_days(patient_id) for patient_id in ids]
    assert first == again == fresh
    assert len(set(first)) > 20
    assert len(shifter._offsets) <= dates._MAX_OFFSETS

"""Patient pseudonyms (profile.patient_id): keyed hash, lookup table, unknown patients."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value

from anonproxy.config import ProfileConfig, parse_settings
from anonproxy.deid import Deidentifier, PatientPseudonyms, Profile
from anonproxy.deid.pseudonyms import Pseudonymizer
from anonproxy.deidentifiers import build_deidentifier, build_profile
from anonproxy.errors import ConfigError, DeidentificationError

from .helpers import PATIENT_ID, PATIENT_NAME, SECRET, item, minimal, seq, walk_strings


def _deid(patient_id: dict[str, object], secret: bytes = SECRET) -> Deidentifier:
    return build_deidentifier(ProfileConfig.model_validate({"patient_id": patient_id}), secret)


def _profile(section: dict[str, object]) -> Profile:
    return build_profile(ProfileConfig.model_validate(section))


def test_hash_pseudonym_is_formatted_keyed_and_stable_across_restarts() -> None:
    first, second = minimal(), minimal()
    _deid({"format": "ANON-{hash:16}"}).deidentify(first)
    _deid({}).deidentify(second)  # a new engine: a "restart"; the default format
    assert re.fullmatch(r"ANON-[0-9A-F]{16}", first.PatientID)  # 64 bits
    assert first.PatientID == second.PatientID
    assert str(first.PatientName) == first.PatientID
    other_secret = minimal()
    _deid({}, secret=b"another installation").deidentify(other_secret)
    assert other_secret.PatientID != first.PatientID
    other_patient = minimal()
    other_patient.PatientID = "PID-0000-Y"
    _deid({}).deidentify(other_patient)
    assert other_patient.PatientID != first.PatientID
    assert all(PATIENT_ID not in v for _, v in walk_strings(first))
    assert first.DeidentificationMethod[-1] == "patient pseudonyms (hash)"


def test_patient_name_format_and_base32() -> None:
    ds = minimal()
    _deid(
        {"format": "P{base32:8}", "patient_name_format": "TRIAL^{pseudonym}^{hash:4}"}
    ).deidentify(ds)
    assert re.fullmatch(r"P[A-Z2-7]{8}", ds.PatientID)
    assert re.fullmatch(rf"TRIAL\^{ds.PatientID}\^[0-9A-F]{{4}}", str(ds.PatientName))


def test_nested_patient_ids_keep_their_profile_action() -> None:
    ds = minimal()
    ds.ReferencedInstanceSequence = seq(item(PatientID="OTHER-777", CodeValue="1"))
    _deid({}).deidentify(ds)
    nested = ds.ReferencedInstanceSequence[0]
    assert nested.get("PatientID", "") == ""  # the table's Z/D (or X), not a pseudonym
    assert ds.PatientID.startswith("ANON-")


def test_absent_section_keeps_the_table_actions() -> None:
    ds = minimal()
    build_deidentifier(ProfileConfig(), SECRET).deidentify(ds)
    assert ds.PatientID == ""  # Z/D: Type 2 in the CT IOD
    assert ds.PatientName == ""
    empty_id = minimal()
    empty_id.PatientID = ""
    _deid({}).deidentify(empty_id)
    assert empty_id.PatientName == ""  # no ID: no pseudonym


@settings(max_examples=60, deadline=None)
@given(original=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                      exclude_characters="\\"), min_size=1, max_size=64))  # fmt: skip
def test_hash_pseudonym_never_contains_the_original(original: str) -> None:
    spec = PatientPseudonyms.build(format="ID{hash:6}")
    pseudonym, name = Pseudonymizer(spec, SECRET).pseudonyms(original)
    assert pseudonym == name
    assert len(pseudonym) <= 64
    validate_value("LO", pseudonym, pydicom_config.RAISE)
    if len(original) >= 3:
        assert original.casefold() not in pseudonym.casefold()
    else:
        assert original.casefold() != pseudonym.casefold()
    assert Pseudonymizer(spec, SECRET).pseudonyms(original) == (pseudonym, name)


def test_format_revealing_the_original_rejects_the_instance() -> None:
    ds = minimal()
    ds.PatientID = "ANON"
    with pytest.raises(DeidentificationError) as error:
        _deid({"format": "ANON-{hash:10}"}).deidentify(ds)
    assert "PatientID" in str(error.value)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "patients.csv"
    path.write_text(text, "utf-8")
    return path


def test_lookup_table_with_header_and_unknown_policies(tmp_path: Path) -> None:
    table = _csv(tmp_path, f"original,pseudonym\n{PATIENT_ID},SUBJ-001\nOTHER,SUBJ-002\n")
    ds = minimal()
    _deid({"method": "lookup", "lookup_csv": str(table)}).deidentify(ds)
    assert ds.PatientID == "SUBJ-001"
    assert ds.PatientName == "SUBJ-001"
    assert PATIENT_NAME.split("^")[0] not in str(ds.PatientName)

    unknown = minimal()
    unknown.PatientID = "NOT-IN-TABLE-99"
    with pytest.raises(DeidentificationError) as error:
        _deid({"method": "lookup", "lookup_csv": str(table)}).deidentify(unknown)
    assert "lookup table" in str(error.value)
    assert "NOT-IN-TABLE-99" not in str(error.value)

    fallback = minimal()
    fallback.PatientID = "NOT-IN-TABLE-99"
    _deid(
        {"method": "lookup", "lookup_csv": str(table), "unknown_patient": "hash",
         "format": "X-{hash:8}"}
    ).deidentify(fallback)  # fmt: skip
    assert re.fullmatch(r"X-[0-9A-F]{8}", fallback.PatientID)


def test_lookup_table_without_header(tmp_path: Path) -> None:
    table = _csv(tmp_path, f"{PATIENT_ID},SUBJ-9\n")
    profile = _profile(
        {"patient_id": {"method": "lookup", "lookup_csv": str(table)}, "preset": "CleanDesc"}
    )
    ds = minimal()
    Deidentifier(profile, secret=SECRET).deidentify(ds)
    assert ds.PatientID == "SUBJ-9"
    actions = {tag: action for tag, _, action in profile.describe()}
    assert actions["(0010,0020)"] == "pseudonym:lookup"
    assert actions["(0010,0010)"] == "pseudonym:lookup"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A-12345,X-A-12345\n", "contains the original"),
        ("A-12345,S1\nA-12345,S2\n", "listed twice"),
        ("A-12345\n", "two non-empty columns"),
        ("A-12345," + "S" * 65 + "\n", "at most 64"),
    ],
)
def test_bad_lookup_tables_are_refused_naming_the_line_not_the_value(
    tmp_path: Path, text: str, message: str
) -> None:
    table = _csv(tmp_path, "original,pseudonym\n" + text)
    with pytest.raises(ConfigError) as error:
        _profile({"patient_id": {"method": "lookup", "lookup_csv": str(table)}})
    assert message in str(error.value)
    assert "line 2" in str(error.value) or "line 3" in str(error.value)
    assert "A-12345" not in str(error.value)


def test_missing_lookup_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read patient lookup table"):
        _profile({"patient_id": {"method": "lookup", "lookup_csv": str(tmp_path / "none.csv")}})


@pytest.mark.parametrize(
    ("patient_id", "message"),
    [
        ({"format": "ANON"}, "needs a placeholder"),
        ({"format": "ANON-{hash:3}"}, "from 4 to 64"),
        ({"format": "A{hash:64}B"}, "exceed 64"),
        ({"format": "{name}-{hash:8}"}, "unknown placeholder"),
        ({"format": "A\\{hash:8}"}, "backslash"),
        ({"format": "{pseudonym}"}, "only allowed in patient_name_format"),
        ({"method": "hash", "lookup_csv": "x.csv"}, "method lookup only"),
        ({"method": "table"}, "patient_id.method"),
        ({"unknown_patient": "ignore"}, "patient_id.unknown_patient"),
    ],
)
def test_invalid_patient_id_settings_are_refused(
    patient_id: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"profile": {"patient_id": patient_id}}, "site.yaml")
    assert "profile.patient_id" in str(error.value)
    assert message in str(error.value)

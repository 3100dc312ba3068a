"""Presets, date shift range, build_profile/build_deidentifier (deidentifiers), the API doc."""

from __future__ import annotations

import doctest
import pickle
from datetime import date

import pytest

import anonproxy.deid
from anonproxy.config import ProfileConfig, parse_settings
from anonproxy.deid import PRESETS, Profile, ProfileOption
from anonproxy.deid.dates import DateShifter
from anonproxy.deidentifiers import build_deidentifier, build_profile, deidentifier_factory
from anonproxy.errors import ConfigError

from .helpers import PATIENT_ID, SECRET, minimal

MODIFIED = ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES


@pytest.mark.parametrize(
    ("preset", "options"),
    [
        ("BasicProfile", set()),
        ("RetainSafePrivate", {"retain_safe_private"}),
        ("RetainUIDs", {"retain_uids"}),
        ("RetainDeviceIdent", {"retain_device_identity"}),
        ("RetainInstitutionIdent", {"retain_institution_identity"}),
        ("RetainPatientChars", {"retain_patient_characteristics"}),
        ("RetainLongFullDates", {"retain_longitudinal_temporal_information_full_dates"}),
        ("RetainLongModifDates", {"retain_longitudinal_temporal_information_modified_dates"}),
        ("CleanDesc", {"clean_descriptors"}),
        ("CleanStructdCont", {"clean_structured_content"}),
        ("CleanGraph", {"clean_graphics"}),
    ],
)
def test_each_preset_maps_to_its_options(preset: str, options: set[str]) -> None:
    profile = build_profile(ProfileConfig(preset=[preset]))
    assert {o.value for o in profile.options} == options


def test_every_preset_is_tested_and_every_option_has_a_preset() -> None:
    assert len(PRESETS) == 11
    assert set().union(*PRESETS.values()) == set(ProfileOption)


def test_presets_and_options_combine_by_union() -> None:
    profile = build_profile(
        ProfileConfig(preset=["CleanDesc", "RetainUIDs"], options=["retain_uids", "clean_graphics"])
    )
    assert {o.value for o in profile.options} == {
        "clean_descriptors", "retain_uids", "clean_graphics",
    }  # fmt: skip
    assert Profile.from_options(["clean_graphics"], presets=["CleanDesc"]).options == {
        ProfileOption.CLEAN_GRAPHICS,
        ProfileOption.CLEAN_DESCRIPTORS,
    }


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"profile": {"preset": "RetainEverything"}}, "site.yaml")
    text = str(error.value)
    assert "profile.preset" in text
    assert all(name in text for name in PRESETS)
    with pytest.raises(ValueError, match="CleanGraph"):
        Profile.from_options([], presets=["Nope"])


def test_contradicting_preset_and_option_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_settings({"profile": {"preset": "RetainLongFullDates", "options": [MODIFIED.value]}})


@pytest.mark.parametrize("bad", [[-1, -10], [1, 5], [-10, 0], [-40000, -1], [-5], "x"])
def test_date_shift_days_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"profile\.date_shift_days"):
        parse_settings({"profile": {"date_shift_days": bad}})


def test_build_deidentifier_applies_the_whole_profile_section() -> None:
    settings = parse_settings(
        {
            "profile": {
                "preset": "RetainLongModifDates",
                "date_shift_days": [-20, -10],
                "rules": [{"keyword": "StudyDescription", "action": "keep"}],
                "patient_id": {"format": "S-{hash:8}"},
            }
        }
    )
    deid = build_deidentifier(settings.profile, SECRET)
    ds = minimal()
    ds.StudyDate = "20200315"
    ds.StudyDescription = "Knee"
    deid.deidentify(ds)
    shift = (date(int(ds.StudyDate[:4]), int(ds.StudyDate[4:6]), int(ds.StudyDate[6:])) -
             date(2020, 3, 15)).days  # fmt: skip
    assert -20 <= shift <= -10
    assert shift == DateShifter(SECRET, (-20, -10)).offset_days(PATIENT_ID)
    assert ds.StudyDescription == "Knee"
    assert ds.PatientID.startswith("S-")
    # the same engine as the one the worker processes build (the factory crosses by pickle)
    again = minimal()
    again.StudyDate = "20200315"
    factory = pickle.loads(pickle.dumps(deidentifier_factory(settings.profile, SECRET)))  # noqa: S301
    factory().deidentify(again)
    assert again.StudyDate == ds.StudyDate
    assert again.PatientID == ds.PatientID


def test_build_deidentifier_reports_an_unreadable_lookup_table_as_config_error() -> None:
    settings = parse_settings(
        {"profile": {"patient_id": {"method": "lookup", "lookup_csv": "/nonexistent/p.csv"}}}
    )
    with pytest.raises(ConfigError, match="patient lookup table"):
        build_deidentifier(settings.profile, SECRET)


def test_default_config_profile_is_the_basic_profile() -> None:
    profile = build_profile(parse_settings({}).profile)
    assert profile == Profile()
    assert len(list(profile.describe())) == 657


def test_the_python_api_documentation_runs() -> None:
    result = doctest.testmod(anonproxy.deid, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20
    assert result.failed == 0

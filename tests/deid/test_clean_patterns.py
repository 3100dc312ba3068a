"""C (clean) of text: identifying values of the instance and the site's clean_patterns go."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from anonproxy.config import ProfileConfig
from anonproxy.deidentifiers import build_deidentifier
from anonproxy.errors import ConfigError

from .helpers import SECRET


def test_clean_descriptors_removes_the_patient_and_the_site_patterns() -> None:
    config = ProfileConfig(
        options=["clean_descriptors"],
        clean_patterns=[r"\bDr\.?\s+\w+", r"\b\d{3}-\d{4}\b"],
    )
    engine = build_deidentifier(config, SECRET)
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.PatientName = "Kowalski^Anna"
    ds.StudyDescription = "CT head for Kowalski, call Dr. Moreau on 555-0199"
    engine.deidentify(ds)
    assert ds.StudyDescription == "CT head for , call on"


def test_without_the_option_the_description_is_removed_anyway() -> None:
    engine = build_deidentifier(ProfileConfig(clean_patterns=[r"Dr\.\s+\w+"]), SECRET)
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyDescription = "call Dr. Moreau"
    engine.deidentify(ds)
    assert "StudyDescription" not in ds


def test_an_invalid_pattern_is_a_configuration_error_naming_it() -> None:
    from anonproxy.config import parse_settings

    with pytest.raises(ConfigError, match=r"profile\.clean_patterns.*clean_patterns\.1"):
        parse_settings({"profile": {"clean_patterns": ["ok", "(unclosed"]}})

"""User rules (profile.rules): selectors, actions, precedence, nesting, self-check, validation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value

from anonproxy.config import parse_settings
from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.dates import DateShifter
from anonproxy.deid.rules import parse_tag, parse_tag_mask
from anonproxy.deid.uids import UidRemapper
from anonproxy.errors import ConfigError, DeidentificationError

from .helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    SECRET,
    item,
    minimal,
    seq,
    walk_strings,
)

DESCRIPTION = "Knee MRI protocol 7"


def _run(rules: list[dict[str, object]], ds: Dataset | None = None, **kw: object) -> Dataset:
    ds = ds if ds is not None else minimal()
    if "StudyDescription" not in ds:
        ds.StudyDescription = DESCRIPTION
    profile = Profile.from_options([], rules=rules, **kw)  # type: ignore[arg-type]
    Deidentifier(profile, secret=SECRET).deidentify(ds)
    return ds


# -- selectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector",
    [
        {"keyword": "StudyDescription"},
        {"tag": "(0008,1030)"},
        {"tag": "0008,1030"},
        {"tag": "00081030"},
        {"tag": "0x00081030"},
        {"tag_mask": "(0008,10xx)"},
        {"tag_mask": "(0008,1x3x)"},
    ],
)
def test_each_public_selector_overrides_the_profile(selector: dict[str, object]) -> None:
    ds = _run([{**selector, "action": "keep"}])  # Basic Profile: X
    assert ds.StudyDescription == DESCRIPTION


def test_tag_parsing() -> None:
    assert parse_tag("(0008,1030)") == 0x00081030
    assert parse_tag_mask("(50xx,xxxx)") == (0x50000000, 0xFF000000)
    assert parse_tag_mask("(0009,XX10)") == (0x00090010, 0xFFFF00FF)
    with pytest.raises(ValueError, match="only allowed in tag_mask"):
        parse_tag("(0009,xx10)")
    with pytest.raises(ValueError, match="4 hex digits"):
        parse_tag("(0008,103)")


def test_rules_apply_at_every_nesting_depth() -> None:
    inner = item(StudyDescription=DESCRIPTION, CodeValue="1")
    inner.add_new(0x00091010, "LO", "vendor value")
    for _ in range(3):
        inner = item(ReferencedInstanceSequence=seq(inner))
    ds = minimal()
    ds.ReferencedInstanceSequence = inner.ReferencedInstanceSequence
    _run([{"keyword": "StudyDescription", "action": "keep"},
          {"tag_mask": "(0009,xx10)", "action": "replace", "value": "SITE"}], ds)  # fmt: skip
    level: Dataset = ds
    for _ in range(3):
        level = level.ReferencedInstanceSequence[0]
    assert level.StudyDescription == DESCRIPTION
    assert level[0x00091010].value == "SITE"


def _with_private_blocks(ds: Dataset) -> Dataset:
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00290011, "LO", "OTHER VENDOR")
    ds.add_new(0x00291008, "CS", "IMAGE NUM 4")
    ds.add_new(0x00291010, "OB", b"\x01\x02")  # (0029,xx10) of SIEMENS CSA HEADER
    ds.add_new(0x00291110, "OB", b"\x03\x04")  # (0029,xx10) of OTHER VENDOR
    return ds


def test_private_creator_rule_keeps_the_element_and_its_creator_only() -> None:
    ds = _with_private_blocks(minimal())
    ds.ReferencedInstanceSequence = seq(_with_private_blocks(item(CodeValue="1")))
    _run([{"private_creator": "SIEMENS CSA HEADER", "element": "0x10", "action": "keep"}], ds)
    for level in (ds, ds.ReferencedInstanceSequence[0]):
        private = {e.tag for e in level if e.tag >> 16 & 1}
        assert private == {0x00290010, 0x00291010}
        assert level[0x00291010].value == b"\x01\x02"


def test_private_creator_rule_in_another_block_and_group_filter() -> None:
    ds = minimal()
    ds.add_new(0x00290012, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291210, "LO", "kept")
    ds.add_new(0x00310010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00311010, "LO", "other group")
    rule = {"private_creator": "SIEMENS CSA HEADER", "element": 16, "group": "0029"}
    _run([{**rule, "action": "keep"}], ds)
    assert ds[0x00291210].value == "kept"
    assert 0x00290012 in ds
    assert 0x00311010 not in ds
    assert 0x00310010 not in ds


def test_rule_removing_a_safe_private_attribute_wins_over_retain_safe_private() -> None:
    ds = minimal()
    ds.add_new(0x70530010, "LO", "Philips PET Private Group")
    ds.add_new(0x70531000, "DS", "1.25")  # safe under Retain Safe Private
    rules = [{"private_creator": "Philips PET Private Group", "element": 0, "action": "remove"}]
    profile = Profile.from_options(["retain_safe_private"], rules=rules)
    Deidentifier(profile, secret=SECRET).deidentify(ds)
    assert 0x70531000 not in ds
    assert 0x70530010 not in ds  # no element of the block is kept: creator goes too


# -- precedence -----------------------------------------------------------------------------


def test_first_rule_wins_and_specific_selectors_do_not_reorder() -> None:
    broad_first = [
        {"tag_mask": "(0008,1xxx)", "action": "remove"},
        {"keyword": "StudyDescription", "action": "keep"},
    ]
    assert "StudyDescription" not in _run(broad_first)
    assert _run(list(reversed(broad_first))).StudyDescription == DESCRIPTION


_POOL: list[tuple[dict[str, object], bool]] = [
    ({"keyword": "StudyDescription"}, True),
    ({"tag": "(0008,1030)"}, True),
    ({"tag_mask": "(0008,10xx)"}, True),
    ({"tag_mask": "(xxxx,1030)"}, True),
    ({"keyword": "SeriesDescription"}, False),
    ({"tag_mask": "(0018,xxxx)"}, False),
    ({"tag_mask": "(0008,11xx)"}, False),
]
_EXPECTED = {"keep": DESCRIPTION, "empty": "", "replace": "REPLACED", "dummy": "ANONYMIZED"}


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(
        st.tuples(
            st.integers(0, len(_POOL) - 1),
            st.sampled_from(["keep", "remove", "empty", "replace", "dummy"]),
        ),
        max_size=6,
    )
)
def test_outcome_is_the_first_matching_rule_in_file_order(picks: list[tuple[int, str]]) -> None:
    rules: list[dict[str, object]] = []
    for index, action in picks:
        rule = {**_POOL[index][0], "action": action}
        if action == "replace":
            rule["value"] = "REPLACED"
        rules.append(rule)
    ds = _run(rules)
    first = next((a for i, a in picks if _POOL[i][1]), None)
    if first is None or first == "remove":  # no rule: the Basic Profile removes it (X)
        assert "StudyDescription" not in ds
    else:
        assert ds.StudyDescription == _EXPECTED[first]


def test_rules_take_precedence_over_pseudonyms_and_the_profile() -> None:
    from anonproxy.deid import PatientPseudonyms

    profile = Profile.from_options(
        [],
        rules=[{"keyword": "PatientID", "action": "replace", "value": "TRIAL-1"}],
        patient_ids=PatientPseudonyms.build(),
    )
    ds = minimal()
    Deidentifier(profile, secret=SECRET).deidentify(ds)
    assert ds.PatientID == "TRIAL-1"
    assert str(ds.PatientName).startswith("ANON-")  # no rule: the pseudonym


# -- actions --------------------------------------------------------------------------------


def test_actions_on_a_text_attribute() -> None:
    def one(rule: dict[str, object]) -> object:
        ds = _run([{"keyword": "StudyDescription", **rule}])
        return ds.get("StudyDescription")

    assert one({"action": "keep"}) == DESCRIPTION
    assert one({"action": "remove"}) is None
    assert one({"action": "empty"}) == ""
    assert one({"action": "dummy"}) == "ANONYMIZED"
    assert one({"action": "replace", "value": "RESEARCH"}) == "RESEARCH"
    assert one({"action": "regex_replace", "pattern": r"\d+", "replacement": "#"}) == (
        "Knee MRI protocol #"
    )
    hashed = one({"action": "hash"})
    assert isinstance(hashed, str)
    assert re.fullmatch(r"[0-9A-F]{32}", hashed)
    assert one({"action": "hash"}) == hashed  # deterministic
    other = minimal()
    other.StudyDescription = DESCRIPTION
    profile = Profile.from_options([], rules=[{"keyword": "StudyDescription", "action": "hash"}])
    Deidentifier(profile, secret=b"another secret").deidentify(other)
    assert other.StudyDescription != hashed  # keyed


def test_hash_renders_per_vr() -> None:
    ds = minimal()
    ds.StationName = "CT-ROOM-3"  # SH
    ds.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1.1.99"  # UI
    ds.ReferencedFrameNumber = "17"  # IS
    ds.add_new(0x60003000, "OW", b"\x00\x01")  # Overlay Data: no hash rendering
    rules = [
        {"keyword": kw, "action": "hash"}
        for kw in ("StationName", "ReferencedSOPInstanceUID", "ReferencedFrameNumber")
    ] + [{"tag_mask": "(60xx,3000)", "action": "hash"}]
    _run(rules, ds)
    assert re.fullmatch(r"[0-9A-F]{16}", ds.StationName)
    assert ds.ReferencedSOPInstanceUID == UidRemapper(SECRET)("1.2.826.0.1.3680043.10.1.1.99")
    validate_value("IS", str(ds.ReferencedFrameNumber), pydicom_config.RAISE)
    assert 0x60003000 not in ds  # cannot be hashed: removed, never kept


def test_shift_date_rule_uses_the_per_patient_offset() -> None:
    ds = minimal()
    ds.StudyDate = "20200315"
    ds.StudyTime = "101500"
    ds.AcquisitionDateTime = "20200316120000"
    rules = [
        {"keyword": "StudyDate", "action": "shift_date"},
        {"keyword": "StudyTime", "action": "shift_date"},
        {"keyword": "AcquisitionDateTime", "action": "shift_date"},
        {"keyword": "StudyDescription", "action": "shift_date"},  # not a date: removed
    ]
    profile = Profile.from_options([], rules=rules)
    Deidentifier(profile, secret=SECRET, date_shift_days=(-20, -10)).deidentify(ds)
    offset = DateShifter(SECRET, (-20, -10)).offset_days(PATIENT_ID)
    assert ds.StudyDate == DateShifter.shift_da("20200315", offset)
    assert ds.AcquisitionDateTime == DateShifter.shift_dt("20200316120000", offset)
    assert ds.StudyTime == "101500"
    assert "StudyDescription" not in ds
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"


def test_replace_converts_for_numeric_vrs_and_splits_values() -> None:
    ds = minimal()
    ds.Rows = 512
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDescription = DESCRIPTION
    _run([{"keyword": "Rows", "action": "replace", "value": 256},
          {"keyword": "ImageType", "action": "replace", "value": "DERIVED\\SECONDARY"}], ds)  # fmt: skip
    assert ds.Rows == 256
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]


def test_an_invalid_result_rejects_the_instance_without_showing_values() -> None:
    ds = minimal()
    ds.StudyDate = "20200315"
    rule = {"keyword": "StudyDate", "action": "regex_replace", "pattern": "2020",
            "replacement": "SECRETX"}  # fmt: skip
    with pytest.raises(DeidentificationError) as error:
        _run([rule], ds)
    message = str(error.value)
    assert "user rule 0" in message
    assert "StudyDate" in message
    assert "SECRETX" not in message
    assert "2020" not in message


# -- self-check -----------------------------------------------------------------------------


def test_keep_rule_on_an_identifying_attribute_is_excluded_from_the_self_check() -> None:
    ds = _run([{"keyword": "PatientName", "action": "keep"}])
    assert str(ds.PatientName) == PATIENT_NAME
    # the other identifying values are still searched
    ds = minimal()
    ds.StudyDescription = f"follow-up of {PATIENT_ID}"
    with pytest.raises(DeidentificationError, match="PatientID"):
        _run([{"keyword": "PatientName", "action": "keep"},
              {"keyword": "StudyDescription", "action": "keep"}], ds)  # fmt: skip


def test_values_written_by_rules_are_self_checked() -> None:
    ds = minimal()
    ds.StudyDescription = f"Knee of {PATIENT_NAME.split('^')[0]}"
    rule = {"keyword": "StudyDescription", "action": "regex_replace", "pattern": "Knee",
            "replacement": "Leg"}  # fmt: skip
    with pytest.raises(DeidentificationError, match="self-check: identifying value of Patient"):
        _run([rule], ds)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
                    min_size=3, max_size=60))  # fmt: skip
def test_hashed_text_never_contains_the_original_and_is_valid(text: str) -> None:
    ds = minimal()
    ds.StudyDescription = text
    ds.StationName = text[:16]
    ds = _run([{"keyword": "StudyDescription", "action": "hash"},
               {"keyword": "StationName", "action": "hash"}], ds)  # fmt: skip
    for keyword, vr in (("StudyDescription", "LO"), ("StationName", "SH")):
        value = ds[keyword].value
        validate_value(vr, value, pydicom_config.RAISE)
        original = text if keyword == "StudyDescription" else text[:16]
        if len(original.strip()) >= 3:
            assert original.strip() not in value
    assert all(PATIENT_NAME.split("^")[0] not in v for _, v in walk_strings(ds))


# -- describe and configuration -------------------------------------------------------------


def test_rules_are_visible_in_describe() -> None:
    profile = Profile.from_options(
        [],
        rules=[
            {"keyword": "StudyDescription", "action": "keep"},
            {"tag_mask": "(50xx,xxxx)", "action": "remove"},
            {"tag_mask": "(60xx,xxxx)", "action": "keep"},
            {"private_creator": "ACME", "element": 0x10, "action": "hash"},
            {"keyword": "ContrastBolusRoute", "action": "dummy"},
        ],
    )
    rows = list(profile.describe())
    actions = {tag: action for tag, _, action in rows}
    assert actions["(0008,1030)"] == "rule:keep"
    assert actions["(50xx,xxxx)"] == "rule:remove"
    assert actions["(60xx,3000)"] == "rule:keep"
    assert actions["(gggg,eeee)"] == "X, partly rule:hash"
    assert actions["(0008,0050)"] == "Z"  # untouched rows keep the profile's code
    assert len(rows) == 657
    listed = list(profile.describe_rules())
    assert [tag for tag, _, _ in listed] == [
        "(0008,1030)", "(50xx,xxxx)", "(60xx,xxxx)", "(gggg,xx10) ACME", "(0018,1040)",
    ]  # fmt: skip
    assert listed[0][1] == "StudyDescription (user rule 0)"
    assert [action for _, _, action in listed] == [
        "rule:keep", "rule:remove", "rule:keep", "rule:hash", "rule:dummy",
    ]  # fmt: skip


def test_describe_shows_partial_mask_rules() -> None:
    profile = Profile.from_options([], rules=[{"tag": "(6000,3000)", "action": "keep"}])
    actions = {tag: action for tag, _, action in profile.describe()}
    assert actions["(60xx,3000)"] == "X, partly rule:keep"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"keyword": "StudyDescription", "action": "frobnicate"}, "action"),
        ({"tag": "(0008,10300)", "action": "keep"}, "4 hex digits"),
        ({"tag": "(0009,xx10)", "action": "keep"}, "only allowed in tag_mask"),
        ({"tag_mask": "(0009,zz10)", "action": "keep"}, "4 hex digits"),
        ({"keyword": "NoSuchKeyword", "action": "keep"}, "data dictionary"),
        ({"keyword": "StudyDescription", "action": "replace"}, "needs value"),
        ({"keyword": "StudyDescription", "action": "regex_replace", "replacement": "x"},
         "needs pattern"),
        ({"keyword": "StudyDescription", "action": "regex_replace", "pattern": "(",
          "replacement": ""}, "invalid regular expression"),
        ({"keyword": "StudyDescription", "action": "keep", "value": "x"}, "replace only"),
        ({"keyword": "StudyDescription", "tag": "(0008,1030)", "action": "keep"}, "exactly one"),
        ({"action": "keep"}, "exactly one"),
        ({"private_creator": "ACME", "action": "keep"}, "needs element"),
        ({"private_creator": "ACME", "element": 300, "action": "keep"}, "0xFF"),
        ({"keyword": "StudyDescription", "element": 16, "action": "keep"}, "private_creator only"),
        ({"tag": "(0029,0010)", "action": "keep"}, "private creator elements"),
        ({"tag": "(0008,0000)", "action": "keep"}, "group lengths"),
        ({"tag": "(0002,0016)", "action": "keep"}, "file meta"),
    ],
)  # fmt: skip
def test_invalid_rules_are_refused_at_load_naming_the_rule_index(
    rule: dict[str, object], message: str
) -> None:
    rules = [{"keyword": "StudyDescription", "action": "keep"}, rule]
    with pytest.raises(ConfigError) as error:
        parse_settings({"profile": {"rules": rules}}, "site.yaml")
    text = str(error.value)
    assert "profile.rules.1" in text
    assert message in text
    with pytest.raises(ValueError, match=re.escape("rule 1: ")):
        Profile.from_options([], rules=rules)


def test_rule_errors_never_repeat_the_configured_value() -> None:
    rule = {"keyword": "StudyDescription", "action": "keep", "value": "Jane Doe"}
    with pytest.raises(ConfigError) as error:
        parse_settings({"profile": {"rules": [rule]}}, "site.yaml")
    assert "Jane Doe" not in str(error.value)

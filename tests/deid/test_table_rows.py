"""Table-driven: every row of Table E.1-1 under the Basic Profile and under each option."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence

from anonproxy.deid import Deidentifier, Profile, ProfileOption
from anonproxy.deid.actions import UNKNOWN_IOD, resolve
from anonproxy.deid.tables import table_e1_1

from .helpers import SECRET, UNKNOWN_SOP_CLASS, item, minimal

RAW = json.loads(
    resources.files("anonproxy.deid._standard").joinpath("table_e1_1.json").read_text("utf-8")
)
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "ps315" / "table_e1_1.json"
PROFILES: list[list[str]] = [[]] + [[o.value] for o in ProfileOption]
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def expected_code(row: dict[str, Any], options: list[str]) -> str:
    """The spec: an enabled option's code replaces the Basic code; C beats K."""
    codes = {row["options"][o] for o in options if o in row["options"]}
    return "C" if "C" in codes else "K" if "K" in codes else row["basic"]


def test_shipped_table_has_657_rows_with_known_codes() -> None:
    rows = RAW["rows"]
    assert len(rows) == 657
    assert {r["basic"] for r in rows} == {
        "X", "Z", "D", "U", "X/D", "X/Z", "X/Z/D", "Z/D", "X/Z/U*"
    }  # fmt: skip
    assert {c for r in rows for c in r["options"].values()} == {"K", "C"}
    assert RAW["options"] == [o.value for o in ProfileOption]
    assert sum(r["basic"] == "X" for r in rows) == 417
    matches = {r["match"] for r in rows}
    assert matches == {"tag", "mask", "private"}
    masks = sorted(r["tag"] for r in rows if r["match"] == "mask")
    assert masks == ["50xxxxxx", "60xx3000", "60xx4000"]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared not available")
def test_shipped_table_matches_the_shared_source() -> None:
    source = json.loads(SHARED.read_text("utf-8"))
    renamed = {
        "retain_longitudinal_full_dates": "retain_longitudinal_temporal_information_full_dates",
        "retain_longitudinal_modified_dates": (
            "retain_longitudinal_temporal_information_modified_dates"
        ),
    }
    for src, row in zip(source, RAW["rows"], strict=True):
        assert src["name"] == row["name"]
        assert src["basic"] == row["basic"]
        options = {
            renamed.get(k, k): v for k, v in src.items() if v in ("K", "C") and k not in ("basic",)
        }
        assert options == row["options"], src["tag"]
        if row["match"] == "tag":
            assert src["tag"].replace("(", "").replace(",", "").replace(")", "") == row["tag"]


@pytest.mark.parametrize("options", PROFILES, ids=lambda o: o[0] if o else "basic")
def test_describe_gives_the_effective_code_of_every_row(options: list[str]) -> None:
    described = list(Profile.from_options(options).describe())
    assert len(described) == 657
    for (tag, name, code), row in zip(described, RAW["rows"], strict=True):
        assert name == row["name"]
        assert re.fullmatch(r"\([0-9A-Fgx]{4},[0-9A-Fex]{4}\)", tag), tag
        assert code == expected_code(row, options), (tag, options)


def _vr(row_tag: int, name: str) -> str:
    try:
        return str(dictionary_VR(row_tag)).split(" or ")[0]
    except KeyError:
        return "SQ" if name.endswith("Sequence") else "LO"


SAMPLES: dict[str, object] = {
    "AE": "SAMPLEAE", "AS": "042Y", "CS": "SAMPLE", "DA": "20200102", "DS": "1.5",
    "DT": "20200102030405", "IS": "7", "LO": "Sample text", "LT": "Sample text",
    "SH": "Sample text", "ST": "Sample text", "UC": "Sample text", "UT": "Sample text",
    "PN": "Sample^Person", "TM": "030405", "UR": "http://example.com/x", "AT": 0x00100010,
    "FL": 1.5, "FD": 1.5, "SL": 7, "SS": 7, "UL": 7, "US": 7, "SV": 7, "UV": 7,
    "OB": b"\x01\x02\x03\x04", "OD": b"\x01" * 8, "OF": b"\x01" * 4, "OL": b"\x01" * 4,
    "OV": b"\x01" * 8, "OW": b"\x01\x02\x03\x04", "UN": b"\x01\x02\x03\x04",
}  # fmt: skip
KEPT_BY_CLEAN = {"TM", "CS", "AS", "DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"}
TEXT = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def _sample(tag: int, vr: str) -> object:
    if vr == "SQ":
        return Sequence([item(CodeValue="1", CodingSchemeDesignator="DCM", CodeMeaning="x")])
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.1.555.{tag}"
    return SAMPLES[vr]


def _outcome_error(action: str, vr: str, before: object, ds: Dataset, tag: int) -> str | None:
    present = tag in ds
    after = ds[tag].value if present else None
    empty = after is None or after in ("", b"") or (vr == "SQ" and len(after) == 0)
    checks = {
        "X": not present,
        "Z": present and empty,
        "D": present and not empty and (vr == "SQ" or after != before),
        "K": present and (len(after) == 1 if vr == "SQ" else after == before),
        "U": present and (vr == "SQ" or (UID_RE.match(str(after)) and after != before)),
    }
    if action == "C":
        if vr == "SQ":
            ok = present and len(after) == 1
        elif vr in ("DA", "DT"):
            ok = present and str(after)[:8] != str(before)[:8] and str(after).isdigit()
        elif vr == "UI":
            ok = present and str(after).startswith("2.25.")
        else:
            ok = present and after == before
        return None if ok else f"C on {vr}"
    return None if checks[action] else f"{action} on {vr}"


@pytest.mark.parametrize("options", PROFILES, ids=lambda o: o[0] if o else "basic")
def test_engine_applies_the_effective_action_of_every_row(options: list[str]) -> None:
    """Unknown SOP Class, so compound codes take the documented conservative choice."""
    deid = Deidentifier(Profile.from_options(options), secret=SECRET)
    failures = []
    checked = 0
    for row in table_e1_1():
        if row.match != "tag" or row.keyword in ("SOPInstanceUID",):
            continue
        vr = _vr(row.value, row.name)
        ds = minimal(UNKNOWN_SOP_CLASS)
        before = _sample(row.value, vr)
        ds.add(DataElement(row.value, vr, before))
        if vr == "SQ":
            before = None
        code = expected_code(
            next(r for r in RAW["rows"] if r["tag"] == f"{row.value:08X}"), options
        )
        action = str(resolve(code, UNKNOWN_IOD))
        if action == "C" and vr not in KEPT_BY_CLEAN | TEXT | {"SQ", "UI", "DA", "DT"}:
            action = str(resolve(row.basic, UNKNOWN_IOD))  # documented fallback
        deid.deidentify(ds)
        if (error := _outcome_error(action, vr, before, ds, row.value)) is not None:
            failures.append((row.tag, row.name, error))
        checked += 1
    assert checked == 652
    assert failures == []

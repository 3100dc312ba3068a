"""PHI corpus (issue 11): sentinels planted wherever PS3.15 Annex E says identifying
information may hide (:mod:`tests.deid.phi_corpus`), de-identified file to file under the Basic
Profile and each option, for five SOP Classes, four transfer syntaxes and four seeds.

The output bytes (inflated when deflated) are searched for every sentinel: ASCII
case-insensitively, UTF-16-LE, UTF-16-BE and byte-swapped. A value no rule retains must not be
found; a value an option retains (Table E.1-1 column K) must be there unchanged; cleaned text
keeps its neutral words and loses its identifying ones; shifted dates are other valid dates.
An identifying value put into an attribute the profile keeps must make the engine refuse.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from anonproxy.deid import Deidentifier, DeidResult, Profile
from anonproxy.deid.tables import iod_types
from anonproxy.errors import DeidentificationError

from .phi_corpus import (
    BASIC,
    CLEAN_PATTERNS,
    FULL_DATES,
    MUST_VANISH,
    OPTIONS,
    PROFILES,
    SAFE_PRIVATE,
    SECRET,
    SOP_CLASSES,
    STRING_VRS,
    UID_ROOT,
    Expect,
    Kind,
    Sentinel,
    describe,
    generate,
    locate,
    planted_rows,
    swap_pairs,
    tag_of,
    top,
    walk,
)

SYNTAXES = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "big": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
}
SEEDS = {"implicit": 11, "explicit": 23, "big": 37, "deflated": 53}
_NAMES = tuple(SOP_CLASSES)
_SYNTAX_NAMES = tuple(SYNTAXES)
#: (profile, SOP Class, transfer syntax): every profile meets every transfer syntax and seed
#: (across SOP Classes) and every SOP Class meets every transfer syntax (across profiles).
CASES = [
    (profile, name, _SYNTAX_NAMES[(i + j) % len(_SYNTAX_NAMES)])
    for i, profile in enumerate(PROFILES)
    for j, name in enumerate(_NAMES)
]
CASE_IDS = [f"{p}-{n}-{s}" for p, n, s in CASES]
MAX_LINES = 30

_TEXT_NEEDLE = rb"sntl[a-z]{3}|clnp[a-z]{3}|zyxw\d{4}|qvut\d{4}"
#: Sentinel-like tokens. Only left boundaries: the bytes after a value may be a tag or a length
#: that reads as a digit; a needle preceded by a digit or "." is inside a (mapped) UID.
_NEEDLES = re.compile(
    _TEXT_NEEDLE
    + rb"|(?<![0-9.])(?:\d{14}|\d{8}|\d{6}\.250)"  # DT, DA, TM
    + rb"|-\d{4}e-9|(?<![0-9])(?:-9\d{6}|\d{3}w)"  # DS, IS, AS
    + rb"|"
    + re.escape(UID_ROOT.encode())
    + rb"\d{4}"
)
_TEXT_NEEDLES = re.compile(_TEXT_NEEDLE)
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


# -- searching the output ----------------------------------------------------------------------


def _data_set_offset(data: bytes) -> int:
    """Offset of the data set after the preamble and the (explicit VR LE) file meta."""
    pos = 132
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        if data[pos + 4 : pos + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def plain_bytes(path: Path, syntax: str) -> bytes:
    """The file's bytes, the data set inflated if the transfer syntax is Deflated."""
    data = path.read_bytes()
    if syntax != DeflatedExplicitVRLittleEndian:
        return data
    start = _data_set_offset(data)
    return data[:start] + zlib.decompress(data[start:], -zlib.MAX_WBITS)


def found_needles(data: bytes) -> frozenset[str]:
    """Every sentinel-like token in ``data``: ASCII (any case), UTF-16-LE, UTF-16-BE, and text
    tokens in byte-swapped pairs (both alignments)."""
    low = data.lower()
    views = (
        low,
        re.sub(rb"([\x20-\x7e])\x00", rb"\1", low),
        re.sub(rb"\x00([\x20-\x7e])", rb"\1", low),
    )
    found = {m.decode() for view in views for m in _NEEDLES.findall(view)}
    for view in (swap_pairs(low), swap_pairs(low[1:])):
        found.update(m.decode() for m in _TEXT_NEEDLES.findall(view))
    return frozenset(found)


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1").strip("\x00 ")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return str(value).strip("\x00 ")


def _found_in(out: Dataset, needle: str) -> list[str]:
    """Where ``needle`` is in the decoded output (for messages)."""
    places = []
    forms = (needle.encode(), needle.encode("utf-16-le"), needle.encode("utf-16-be"))
    for path, tag, value in (*walk(out.file_meta), *walk(out)):
        if isinstance(value, bytes | bytearray):
            hit = any(f in bytes(value).lower() for f in forms) or needle.encode() in swap_pairs(
                bytes(value).lower()
            )
        else:
            hit = needle in _text(value).lower()
        if hit:
            places.append(describe(path, tag))
    return places or ["bytes not decoded as an element"]


def _report(title: str, lines: list[str]) -> str:
    more = f"\n  ... {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else ""
    return f"{title}: {len(lines)}\n  " + "\n  ".join(lines[:MAX_LINES]) + more


# -- running the corpus ---------------------------------------------------------------------------


def write(ds: Dataset, syntax: str, path: Path) -> None:
    ds.file_meta.TransferSyntaxUID = syntax
    dcmwrite(path, ds, enforce_file_format=True)


def engine(profile: str) -> Deidentifier:
    options = [] if profile == BASIC else [profile]
    return Deidentifier(Profile.from_options(options), secret=SECRET, clean_patterns=CLEAN_PATTERNS)


@dataclass
class Outcome:
    """One instance through one profile: the sentinels and what came out (or the refusal)."""

    sentinels: list[Sentinel]
    source: Dataset
    error: str | None
    result: DeidResult | None = None
    out: Dataset | None = None
    found: frozenset[str] = frozenset()


class Runs:
    """Sources written once per (SOP Class, transfer syntax); outcomes computed once."""

    def __init__(self, folder: Path, seed: int | None = None) -> None:
        self.folder = folder
        self.seed = seed  # None: the fixed seed of each transfer syntax
        self._sources: dict[tuple[str, str], tuple[Path, Dataset, list[Sentinel]]] = {}
        self._engines: dict[str, Deidentifier] = {}
        self._outcomes: dict[tuple[str, str, str], Outcome] = {}

    def source(self, name: str, syntax: str) -> tuple[Path, Dataset, list[Sentinel]]:
        key = (name, syntax)
        if key not in self._sources:
            ds, sentinels = generate(name, SEEDS[syntax] if self.seed is None else self.seed)
            path = self.folder / f"{name}-{syntax}.dcm"
            write(ds, SYNTAXES[syntax], path)
            self._sources[key] = (path, ds, sentinels)
        return self._sources[key]

    def engine(self, profile: str) -> Deidentifier:
        if profile not in self._engines:
            self._engines[profile] = engine(profile)
        return self._engines[profile]

    def outcome(self, profile: str, name: str, syntax: str) -> Outcome:
        key = (profile, name, syntax)
        if key not in self._outcomes:
            self._outcomes[key] = self._run(profile, name, syntax)
        return self._outcomes[key]

    def _run(self, profile: str, name: str, syntax: str) -> Outcome:
        src, ds, sentinels = self.source(name, syntax)
        dst = self.folder / f"{profile}-{name}-{syntax}.out.dcm"
        try:
            result = self.engine(profile).deidentify_file(src, dst)
        except Exception as exc:  # noqa: BLE001 - every refusal is reported by the tests
            return Outcome(sentinels, ds, f"{type(exc).__name__}: {exc}")
        out = dcmread(dst)
        found = found_needles(plain_bytes(dst, out.file_meta.TransferSyntaxUID))
        return Outcome(sentinels, ds, None, result, out, found)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("phi-corpus"))


def _located(outcome: Outcome, s: Sentinel) -> DataElement | None:
    assert outcome.out is not None
    return locate(outcome.out.file_meta if s.kind is Kind.META else outcome.out, s.path, s.tag)


def _label(s: Sentinel, profile: str) -> str:
    return f"{s.where} [{s.kind.value}, {s.vr}, {s.expect[profile].value}]"


# -- the generator ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _NAMES)
def test_corpus_plants_every_vr_at_every_depth(name: str) -> None:
    ds, sentinels = generate(name, 1)
    again, same = generate(name, 1)
    assert [s.value for s in same] == [s.value for s in sentinels]  # seeded, reproducible
    assert len(again) == len(ds)
    table = {(s.vr, s.depth) for s in sentinels if s.kind is Kind.TABLE}
    missing = {(vr, d) for vr in STRING_VRS for d in range(4)} - table
    assert not missing, f"VRs not planted at a depth: {sorted(missing)}"
    top_rows = {s.tag for s in sentinels if s.kind is Kind.TABLE and not s.path}
    assert {tag for tag, _ in planted_rows()} <= top_rows
    needles = [n for s in sentinels for n in s.needles]
    assert len(needles) == len(set(needles)), "a sentinel value is planted twice"
    assert {s.kind for s in sentinels} == set(Kind)
    for option in OPTIONS:  # each option changes the outcome of some planted value
        changed = [s for s in sentinels if s.expect[option] != s.expect[BASIC]]
        has_content = name.endswith("_sr") or option != "clean_structured_content"
        assert bool(changed) == has_content, option
    if name.endswith("_sr"):
        deepest = {s.vr for s in sentinels if s.kind is Kind.SR and s.depth == 4}
        assert deepest >= {"UT", "PN", "DA", "DT", "TM", "UI"}, deepest


@pytest.mark.parametrize("name", _NAMES)
def test_corpus_positions_match_the_iod(name: str) -> None:
    """The values planted where the IOD defines (or does not define) an attribute are there."""
    iod = iod_types(SOP_CLASSES[name])
    assert iod is not None
    _, sentinels = generate(name, 1)
    for s in sentinels:
        if s.kind is Kind.DEFINED:
            assert s.keyword_path in iod, s.where
        if s.kind is Kind.UNDEFINED:
            assert s.keyword_path not in iod, s.where


@pytest.mark.parametrize("syntax", _SYNTAX_NAMES)
def test_search_finds_every_planted_value(syntax: str, runs: Runs) -> None:
    """The search itself: every needle is found in the written source, in every encoding."""
    for name in _NAMES:
        path, _, sentinels = runs.source(name, syntax)
        found = found_needles(plain_bytes(path, SYNTAXES[syntax]))
        missed = [f"{s.where}: {n}" for s in sentinels for n in s.needles if n not in found]
        assert not missed, _report(f"{name}: needles not found in the source", missed)


# -- the engine on the corpus -------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "name", "syntax"), CASES, ids=CASE_IDS)
def test_instance_is_accepted(profile: str, name: str, syntax: str, runs: Runs) -> None:
    """Nothing identifying is planted in a kept attribute: the instance must not be refused."""
    outcome = runs.outcome(profile, name, syntax)
    assert outcome.error is None, f"refused: {outcome.error}"


@pytest.mark.parametrize(("profile", "name", "syntax"), CASES, ids=CASE_IDS)
def test_no_sentinel_survives(profile: str, name: str, syntax: str, runs: Runs) -> None:
    """No value that the profile removes, empties, dummies, maps or shifts is in the output
    bytes; cleaned text holds none of the identifying words planted in it."""
    outcome = runs.outcome(profile, name, syntax)
    if outcome.out is None:
        return  # refused: nothing is released (test_instance_is_accepted reports it)
    leaks: list[str] = []
    for s in outcome.sentinels:
        expect = s.expect[profile]
        if expect in MUST_VANISH:
            for needle in s.needles:
                if needle in outcome.found:
                    places = ", ".join(_found_in(outcome.out, needle))
                    leaks.append(f"{_label(s, profile)} '{needle}' found in {places}")
        if expect in (Expect.CLEANED, Expect.SCRUBBED) and (elem := _located(outcome, s)):
            text = _text(elem.value).lower()
            kept = [w for w in s.drop_words if w in text]
            if kept:
                leaks.append(f"{_label(s, profile)} still holds identifying {kept}")
    assert not leaks, _report("planted values that must not survive", leaks)


@pytest.mark.parametrize(("profile", "name", "syntax"), CASES, ids=CASE_IDS)
def test_removed_attributes_are_absent(profile: str, name: str, syntax: str, runs: Runs) -> None:
    """X rows, and rule 3 (outside the table: unknown, retired, private, text/PN/binary the IOD
    does not define there, dates), and everything inside a removed or emptied sequence."""
    outcome = runs.outcome(profile, name, syntax)
    if outcome.out is None:
        return  # refused: nothing is released (test_instance_is_accepted reports it)
    present = [
        _label(s, profile)
        for s in outcome.sentinels
        if s.expect[profile] is Expect.ABSENT and _located(outcome, s) is not None
    ]
    assert not present, _report("attributes that must be removed are present", present)


def _kept(s: Sentinel, elem: DataElement) -> str | None:
    if isinstance(s.value, bytes):
        same = bytes(elem.value).rstrip(b"\x00") == s.value.rstrip(b"\x00")
    else:
        same = _text(elem.value) == s.value
    return None if same else "was changed"


def _cleaned(s: Sentinel, elem: DataElement) -> str | None:
    lost = [w for w in s.keep_words if w not in _text(elem.value).lower()]
    return f"lost its neutral words {lost}" if lost else None


def _shifted(s: Sentinel, elem: DataElement) -> str | None:
    text = _text(elem.value)
    try:
        valid = text.isdigit() and len(text) == len(str(s.value))
        datetime.strptime(text[:8], "%Y%m%d")
    except ValueError:
        valid = False
    if not valid:
        return "is not a valid date"
    return "was not shifted" if text == s.value else None


_CHECKS = {Expect.KEPT: _kept, Expect.CLEANED: _cleaned, Expect.SHIFTED: _shifted}


def _retention_problem(outcome: Outcome, s: Sentinel, expect: Expect) -> str | None:
    elem = _located(outcome, s)
    if expect is Expect.VALID:  # times under modified dates: kept or changed, but valid
        valid = elem is None or not elem.value or _TM.fullmatch(_text(elem.value))
        return None if valid else "is not a valid TM"
    return "is missing" if elem is None else _CHECKS[expect](s, elem)


@pytest.mark.parametrize(("profile", "name", "syntax"), CASES, ids=CASE_IDS)
def test_retained_values_are_kept(profile: str, name: str, syntax: str, runs: Runs) -> None:
    """K: present and unchanged; C: neutral words kept; modified dates: other valid dates."""
    outcome = runs.outcome(profile, name, syntax)
    assert outcome.out is not None, f"refused: {outcome.error}"
    problems = []
    for s in outcome.sentinels:
        expect = s.expect[profile]
        if expect in (Expect.KEPT, Expect.CLEANED, Expect.SHIFTED, Expect.VALID):
            problem = _retention_problem(outcome, s, expect)
            if problem is not None:
                problems.append(f"{_label(s, profile)} {problem}")
    assert not problems, _report("values the profile retains", problems)


@pytest.mark.parametrize(("profile", "name", "syntax"), CASES, ids=CASE_IDS)
def test_output_is_readable_and_keeps_the_sop_class(
    profile: str, name: str, syntax: str, runs: Runs
) -> None:
    outcome = runs.outcome(profile, name, syntax)
    assert outcome.out is not None, f"refused: {outcome.error}"
    assert outcome.result is not None
    out, source = outcome.out, outcome.source
    assert out.SOPClassUID == SOP_CLASSES[name] == outcome.result.sop_class_uid
    assert out.SOPInstanceUID == outcome.result.sop_instance_uid
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPClassUID == SOP_CLASSES[name]
    if top(outcome.sentinels, "SOPInstanceUID").expect[profile] is Expect.KEPT:
        assert out.SOPInstanceUID == source.SOPInstanceUID
    else:
        assert out.SOPInstanceUID != source.SOPInstanceUID
        assert out.SOPInstanceUID.startswith("2.25.")
    assert out.PatientIdentityRemoved == "YES"
    if "PixelData" in source:
        assert out.PixelData == source.PixelData


# -- an identifying value in a kept attribute -----------------------------------------------------

Plant = Callable[[Dataset, list[Sentinel]], tuple[str, str]]


def _family(sentinels: list[Sentinel]) -> str:
    return str(top(sentinels, "PatientName").value).split("^")[0]


def _set(keyword: str, make: Callable[[list[Sentinel]], str]) -> Plant:
    def plant(ds: Dataset, sentinels: list[Sentinel]) -> tuple[str, str]:
        value = make(sentinels)
        setattr(ds, keyword, value)
        return value, keyword

    return plant


def _image_type(ds: Dataset, sentinels: list[Sentinel]) -> tuple[str, str]:
    value = _family(sentinels).upper()
    ds.ImageType = ["ORIGINAL", "PRIMARY", value]
    return value, "ImageType"


def _deep_name(sentinels: list[Sentinel]) -> str:
    tag = tag_of("ReferringPhysicianName")
    deepest = next(s for s in sentinels if s.tag == tag and s.depth == 3)
    return str(deepest.value).split("^")[0]


def _safe_private(ds: Dataset, sentinels: list[Sentinel]) -> tuple[str, str]:
    group, _creator, byte, _vr = SAFE_PRIVATE
    tag = group << 16 | 0x1000 | byte
    value = _family(sentinels)
    ds[tag].value = value
    return value, f"({group:04X},{0x1000 | byte:04X})"


def _concept_name(ds: Dataset, sentinels: list[Sentinel]) -> tuple[str, str]:
    """A Code Meaning of a concept name in the content tree, at depth 3."""
    value = _family(sentinels)
    items = ds.ContentSequence
    for _ in range(2):
        items = next(i for i in items if i.ValueType == "CONTAINER").ContentSequence
    items[0].ConceptNameCodeSequence[0].CodeMeaning = f"{value} finding"
    return value, "CodeMeaning"


REFUSALS: dict[str, tuple[str, str, Plant]] = {
    "ct-ConvolutionKernel-patient-name": (
        BASIC,
        "ct",
        _set("ConvolutionKernel", _family),
    ),
    "ct-ConvolutionKernel-deep-person-name": (
        BASIC,
        "ct",
        _set("ConvolutionKernel", _deep_name),
    ),
    "ct-ConvolutionKernel-birth-date": (
        BASIC,
        "ct",
        _set("ConvolutionKernel", lambda s: str(top(s, "PatientBirthDate").value)),
    ),
    "ct-Manufacturer-patient-name": (
        BASIC,
        "ct",
        _set("Manufacturer", lambda s: f"ACME {_family(s)}"),
    ),
    "ct-BodyPartExamined-cs": (
        BASIC,
        "ct",
        _set("BodyPartExamined", lambda s: _family(s).upper()),
    ),
    "sc-ImageType-cs": (BASIC, "sc", _image_type),
    "comprehensive_sr-concept-name-depth-3": (BASIC, "comprehensive_sr", _concept_name),
    "ct-StationName-retain-device": (
        "retain_device_identity",
        "ct",
        _set("StationName", lambda s: str(top(s, "PatientID").value)),
    ),
    "gsps-InstitutionName-retain-institution": (
        "retain_institution_identity",
        "gsps",
        _set("InstitutionName", lambda s: f"{_family(s)} clinic"),
    ),
    "sc-PatientSex-retain-characteristics": (
        "retain_patient_characteristics",
        "sc",
        _set("PatientSex", lambda s: _family(s).upper()),
    ),
    "ct-safe-private-retain-safe-private": ("retain_safe_private", "ct", _safe_private),
    "enhanced_sr-TimezoneOffsetFromUTC-retain-full-dates": (
        FULL_DATES,
        "enhanced_sr",
        _set("TimezoneOffsetFromUTC", lambda s: str(top(s, "AccessionNumber").value)),
    ),
}


def _names_attribute(message: str, attribute: str) -> bool:
    if attribute.startswith("("):
        return attribute.lower() in message.lower()
    tag = tag_of(attribute)
    return attribute in message or f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in message.upper()


def _needles(sentinels: Iterable[Sentinel]) -> set[str]:
    return {n for s in sentinels for n in s.needles}


@pytest.mark.parametrize("case", REFUSALS)
def test_identifying_value_in_kept_attribute_is_refused(
    case: str, runs: Runs, tmp_path: Path
) -> None:
    profile, name, plant = REFUSALS[case]
    baseline = runs.outcome(profile, name, "explicit")
    assert baseline.error is None, f"the corpus itself is refused: {baseline.error}"
    ds, sentinels = generate(name, SEEDS["explicit"])
    value, attribute = plant(ds, sentinels)
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write(ds, ExplicitVRLittleEndian, src)
    with pytest.raises(DeidentificationError) as refused:
        runs.engine(profile).deidentify_file(src, dst)
    message = str(refused.value)
    assert not dst.exists()
    assert value.lower() not in message.lower()
    assert not [n for n in _needles(sentinels) if n in message.lower()]
    assert _names_attribute(message, attribute), message


@settings(
    max_examples=int(os.environ.get("ANONPROXY_FUZZ_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(min_value=100, max_value=10**6), case=st.sampled_from(CASES))
def test_any_seed(
    seed: int, case: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Other seeds (other trees, rows at depth and choices): the same three properties."""
    runs = Runs(tmp_path_factory.mktemp("phi-seed"), seed)
    test_instance_is_accepted(*case, runs)
    test_no_sentinel_survives(*case, runs)
    test_removed_attributes_are_absent(*case, runs)

"""PHI corpus generator (issue 11): synthetic instances with a unique sentinel in every place
PS3.15 Annex E says identifying information may hide.

:func:`generate` builds one instance of a SOP Class (:data:`SOP_CLASSES`) from a seed and returns
``(dataset, sentinels)``. Planted, each with its own value:

* every Table E.1-1 row with an exact tag that pydicom knows and a string or binary VR at the top
  level, and a seeded sample (every VR, every retaining option, cleanable text) in items at depth
  1-3 of three chains: Request Attributes > Referenced Study > Other Patient IDs, Referenced
  Study > Referenced Image > Referenced Study, Request Attributes > Scheduled Protocol Code >
  Protocol Context; device and institution identity in Contributing Equipment;
* SR content trees built recursively with seeded random choices (TEXT, PNAME, DATE, DATETIME,
  TIME, UIDREF, CODE, NUM and CONTAINER items nested 3 deep), verifying and author observers;
* code sequences naming a person or an organisation, graphic annotations (GSPS);
* private blocks (several VRs, a private sequence, a Table E.3.10-1 safe attribute), unknown
  public elements in every VR, binary elements holding text as ASCII, UTF-16-LE and byte-swapped,
  DA/DT/TM and PN attributes without a table row, retired text attributes, curves and overlays,
  text the IOD does not define where it is put, file meta AE titles.

A :class:`Sentinel` records where its value is, the needles to search the output for and, per
profile (``"basic"`` and each option), the :class:`Expect`-ed outcome. Expectations are derived
from the option columns of Table E.1-1 (``row.option_code(option)``) and from the IOD data
(``iod_types``), never written per attribute by hand.

Cleanable text (rows that an option cleans, SR TEXT, graphic text) is ``"<token> [word]
<identifying value>"``: the token and the word are neutral, the identifying value (a name
component at any depth, an ID, the accession number, birth date, institution, department,
address, phone number, or a token only :data:`CLEAN_PATTERNS` match) must go.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from functools import cache
from itertools import count
from types import MappingProxyType

from pydicom import Dataset
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from anonproxy.deid.tables import TableRow, iod_types, safe_private_attributes, table_e1_1

OPTIONS: tuple[str, ...] = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_temporal_information_full_dates",
    "retain_longitudinal_temporal_information_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
BASIC = "basic"
PROFILES: tuple[str, ...] = (BASIC, *OPTIONS)
FULL_DATES = "retain_longitudinal_temporal_information_full_dates"
MODIFIED_DATES = "retain_longitudinal_temporal_information_modified_dates"
#: The options under which Table E.1-1 cleans free text (the values are made cleanable).
_TEXT_CLEANING = (
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
    "retain_patient_characteristics",
)

SOP_CLASSES: dict[str, str] = {
    "ct": "1.2.840.10008.5.1.4.1.1.2",
    "comprehensive_sr": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced_sr": "1.2.840.10008.5.1.4.1.1.88.22",
    "gsps": "1.2.840.10008.5.1.4.1.1.11.1",
    "sc": "1.2.840.10008.5.1.4.1.1.7",
}
UID_ROOT = "1.2.826.0.1.3680043.10.999."
#: The site's clean patterns the tests configure: they match the PATTERN tokens.
CLEAN_PATTERNS: tuple[str, ...] = (r"\bCLNP[A-Z]{3}\b",)
SECRET = b"anonproxy-phi-corpus-secret-0001"

TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UR", "UT"})
STRING_VRS = TEXT_VRS | {"AS", "CS", "DA", "DS", "DT", "IS", "PN", "TM", "UI"}
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
SR_VALUE_TYPES = ("TEXT", "PNAME", "DATE", "DATETIME", "TIME", "UIDREF", "CODE", "NUM")

#: (sequence tag, item index) from the top level down to the item holding the element.
Path = tuple[tuple[int, int], ...]

CONTENT_SEQUENCE = 0x0040A730
DEPTH_SAMPLE = 24  # rows planted at each depth besides one per VR and per retaining option
UNKNOWN_GROUP = 0x4444  # even, no attribute of pydicom's dictionary
SAFE_PRIVATE = (0x0019, "GEMS_ACQU_01", 0x9E, "LO")  # a row of Table E.3.10-1
_NON_TABLE_DATES = (
    "StudyUpdateDateTime",
    "SecondaryReviewDate",
    "SecondaryReviewTime",
    "ExpiryDate",
)
_NON_TABLE_NAMES = ("SecondaryReviewerName", "EvaluatorName")
#: Public binary attributes outside the table that none of the SOP Classes here defines.
_FOREIGN_BINARY = {
    "HPGLDocument": "OB",
    "RecommendedDisplayCIELabValueList": "OW",
    "SpectroscopyData": "OF",
    "DoubleFloatPixelData": "OD",
    "AnnotationIndexList": "OL",
    "SelectorOVValue": "OV",
}
_NUMBER_VRS = ("AT", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV")
_UNKNOWN_VRS = (*sorted(STRING_VRS | BINARY_VRS), *_NUMBER_VRS)
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "UR": 64}
_LAST_PIXEL = 31  # pixel values stay below 0x20: no pixel byte is printable text


class Expect(StrEnum):
    """What a profile must do with a planted value."""

    ABSENT = "absent"  # the element is removed (X, or inside a removed sequence)
    GONE = "gone"  # the value does not survive anywhere (emptied, dummied, mapped, removed)
    KEPT = "kept"  # the element is present with the planted value
    CLEANED = "cleaned"  # present: the neutral words stay, the identifying ones go
    SCRUBBED = "scrubbed"  # the identifying words go; the neutral ones may stay or go
    SHIFTED = "shifted"  # present: a valid date other than the planted one
    VALID = "valid"  # if present, a valid value of its VR (a time under modified dates)
    FREE = "free"  # the rules allow either (codes and numbers inside dummied content)


#: Outcomes where the planted value must not be found in the output.
MUST_VANISH = frozenset({Expect.ABSENT, Expect.GONE, Expect.SHIFTED})


class Kind(StrEnum):
    """Why a value was planted (the rule it exercises)."""

    TABLE = "table"  # a Table E.1-1 row
    MASK = "mask"  # a repeating-group row: curves (50xx), overlays (60xx)
    SR = "sr"  # the value of an SR content item, or text in graphic annotations
    CODE = "code"  # a code of a person or organisation code sequence
    DEFINED = "defined"  # outside the table, defined by the IOD at that position
    UNDEFINED = "undefined"  # outside the table, text/PN/binary the IOD does not define there
    DATE = "date"  # DA/DT/TM outside the table
    RETIRED = "retired"  # retired text outside the table
    UNKNOWN = "unknown"  # public tag not in the data dictionary
    PRIVATE = "private"
    SAFE_PRIVATE = "safe_private"  # Table E.3.10-1
    META = "meta"  # file meta information
    PATTERN = "pattern"  # a token only the clean patterns match, inside cleanable text


@dataclass(frozen=True)
class Sentinel:
    """One planted value: where it is, what to search for, what each profile must do."""

    value: str | bytes
    needles: tuple[str, ...]  # lower case; searched in the output bytes
    path: Path
    tag: int
    vr: str
    kind: Kind
    expect: Mapping[str, Expect]
    keep_words: tuple[str, ...] = ()  # CLEANED: must stay in the element's value
    drop_words: tuple[str, ...] = ()  # CLEANED/SCRUBBED: must go from it

    @property
    def depth(self) -> int:
        return len(self.path)

    @property
    def where(self) -> str:
        return describe(self.path, self.tag)

    @property
    def keyword_path(self) -> str:
        return "/".join(_name(t) for t in (*(t for t, _ in self.path), self.tag))


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def describe(path: Path, tag: int) -> str:
    """``RequestAttributesSequence[0]/PatientName (0010,0010)``, for messages."""
    parts = [f"{_name(seq)}[{index}]" for seq, index in path]
    return "/".join([*parts, _name(tag)]) + f" ({tag >> 16:04X},{tag & 0xFFFF:04X})"


@cache
def _rows() -> dict[int, TableRow]:
    return {row.value: row for row in table_e1_1() if row.match == "tag"}


@cache
def _mask_rows() -> tuple[TableRow, ...]:
    return tuple(row for row in table_e1_1() if row.match == "mask")


def _row(tag: int) -> TableRow | None:
    if tag >> 16 & 1:
        return None
    row = _rows().get(tag)
    if row is None:
        row = next((r for r in _mask_rows() if tag & r.mask == r.value), None)
    return row


def dictionary_vr(tag: int) -> str | None:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return None
    return "OB" if vr == "OB or OW" else vr


@cache
def planted_rows() -> tuple[tuple[int, str], ...]:
    """(tag, VR) of the exact-tag rows planted: pydicom knows them, string or binary VR, not
    file meta."""
    out = []
    for tag in _rows():
        vr = dictionary_vr(tag)
        if (
            tag >> 16 not in (0x0000, 0x0002)
            and vr is not None
            and (vr in STRING_VRS or vr in BINARY_VRS)
        ):
            out.append((tag, vr))
    return tuple(sorted(out))


def resolve(code: str, type_: str | None) -> str:
    """A compound code resolved by the attribute's Type (PS3.15 E.1.1): what the IOD requires."""
    letters = code.replace("*", "").split("/")
    if len(letters) == 1:
        return "D" if code == "Z" and type_ in ("1", "1C") else code
    if "U" in letters:
        return "U"
    order = {"1": "DZX", "1C": "DZX", "2": "ZDX", "2C": "ZDX"}.get(type_ or "", "XZD")
    return next(letter for letter in order if letter in letters)


def effective_code(tag: int, profile: str, iod: Mapping[str, str], keywords: str) -> str | None:
    """The code of ``tag`` under ``profile`` (option column, else Basic), resolved at the
    keyword path ``keywords``; None when Table E.1-1 has no row for it."""
    row = _row(tag)
    if row is None:
        return None
    code = row.basic if profile == BASIC else row.option_code(profile) or row.basic
    type_ = iod.get(keywords)
    if code == "X" and row.match == "tag" and type_ in ("1", "1C", "2", "2C"):
        code = "X/Z/D"  # the IOD requires it there: emptied or dummied, never kept
    return resolve(code, type_)


_BY_CODE = {
    "K": Expect.KEPT,
    "X": Expect.ABSENT,
    "Z": Expect.GONE,
    "D": Expect.GONE,
    "U": Expect.GONE,
}
_CLEANED_BY_VR = {
    "DA": Expect.SHIFTED,
    "DT": Expect.SHIFTED,
    "TM": Expect.VALID,
    "UI": Expect.GONE,
    "PN": Expect.GONE,
}


def _by_code(code: str, vr: str, cleanable: bool) -> Expect:
    """Rule 1: the attribute's own row decides."""
    if code != "C":
        return _BY_CODE[code]
    if vr in _CLEANED_BY_VR:
        return _CLEANED_BY_VR[vr]
    if vr in TEXT_VRS:
        return Expect.CLEANED if cleanable else Expect.SCRUBBED
    return Expect.SCRUBBED if vr in BINARY_VRS else Expect.FREE


def _outside_dates(profile: str, nearest: str | None, vr: str) -> Expect:
    """Rules 1 and 3 for DA/DT/TM without a row: dummied in dummied content, removed
    elsewhere; shifted under modified dates, kept under full dates."""
    if nearest == "C":
        return Expect.GONE
    if profile == MODIFIED_DATES:
        return Expect.VALID if vr == "TM" else Expect.SHIFTED
    if profile == FULL_DATES:
        return Expect.KEPT
    return Expect.GONE if nearest == "D" else Expect.ABSENT


def _outside_table(
    profile: str, nearest: str | None, vr: str, *, defined: bool, retired: bool, cleanable: bool
) -> Expect:
    """Rules 1-3 for an attribute without a row, below the closest sequence that has one
    (``nearest``: its resolved code, None at the top level or below sequences without rows)."""
    if vr in DATE_VRS:
        return _outside_dates(profile, nearest, vr)
    if nearest == "C" and vr in TEXT_VRS:
        return Expect.CLEANED if cleanable else Expect.SCRUBBED
    if nearest in ("C", "D"):
        return Expect.GONE if vr in TEXT_VRS or vr in ("PN", "UI") else Expect.FREE
    if retired:
        return Expect.ABSENT
    if defined:
        return Expect.KEPT
    return Expect.ABSENT if vr in TEXT_VRS or vr == "PN" or vr in BINARY_VRS else Expect.FREE


@cache
def expectations(
    sop_class: str, chain: tuple[int, ...], vr: str, kind: Kind, cleanable: bool
) -> Mapping[str, Expect]:
    """Profile → expected outcome for a value of ``vr`` at the tag path ``chain``."""
    iod = iod_types(sop_class) or {}
    return MappingProxyType(
        {p: _expect(iod, p, chain, vr, kind=kind, cleanable=cleanable) for p in PROFILES}
    )


def _expect(
    iod: Mapping[str, str],
    profile: str,
    chain: tuple[int, ...],
    vr: str,
    *,
    kind: Kind,
    cleanable: bool,
) -> Expect:
    keywords = [_name(t) for t in chain]
    nearest: str | None = None
    for depth, tag in enumerate(chain[:-1]):
        code = effective_code(tag, profile, iod, "/".join(keywords[: depth + 1]))
        if code in ("X", "Z"):
            return Expect.ABSENT  # the sequence is removed or emptied
        nearest = code or nearest
    if kind in _BY_KIND:
        return _BY_KIND[kind]
    if kind is Kind.SAFE_PRIVATE:
        return Expect.KEPT if profile == "retain_safe_private" else Expect.ABSENT
    path = "/".join(keywords)
    own = effective_code(chain[-1], profile, iod, path)
    if own is not None:  # its own row, even inside cleaned content (Table E.1-1 keeps the
        # text objects of a Graphic Annotation Sequence D under Clean Graphics)
        return _by_code(own, vr, cleanable)
    return _outside_table(
        profile,
        nearest,
        vr,
        defined=path in iod,
        retired=kind is Kind.RETIRED,
        cleanable=cleanable,
    )


_BY_KIND = {
    Kind.PRIVATE: Expect.ABSENT,
    Kind.UNKNOWN: Expect.ABSENT,
    Kind.META: Expect.ABSENT,
    Kind.PATTERN: Expect.GONE,
}


def swap_pairs(data: bytes) -> bytes:
    """``data`` with the bytes of each pair swapped (an odd last byte is dropped)."""
    data = data[: len(data) & ~1]
    out = bytearray(len(data))
    out[0::2] = data[1::2]
    out[1::2] = data[0::2]
    return bytes(out)


def binary_text(token: str) -> bytes:
    """``token`` as ASCII, UTF-16-LE and byte-swapped ASCII; length a multiple of 8."""
    ascii_ = f" {token} ".encode("ascii")
    ascii_ += b" " * (len(ascii_) & 1)
    data = ascii_ + token.encode("utf-16-le") + swap_pairs(ascii_)
    return data + b"\x00" * (-len(data) % 8)


def pixel_bytes(size: int) -> bytes:
    """Pixel data whose bytes are never printable text."""
    return bytes(i % (_LAST_PIXEL + 1) for i in range(size))


class _Builder:
    """Plants sentinels into one dataset; every value is unique within the instance."""

    def __init__(self, sop_class: str, seed: int) -> None:
        self.sop_class = sop_class
        self.rng = random.Random(seed)
        self.iod: Mapping[str, str] = iod_types(sop_class) or {}
        self.sentinels: list[Sentinel] = []
        self._text = count()
        self._person = count(1)
        self._day = count()
        self._time = count()
        self._uid = count()
        self._number = count(1)
        self._pool: list[tuple[str, tuple[str, ...]]] = []
        self._pool_order: list[int] = []

    # -- unique values --------------------------------------------------------------------

    def token(self, prefix: str = "SNTL") -> str:
        n = next(self._text)
        letters = "".join(string.ascii_uppercase[n // 26**k % 26] for k in (2, 1, 0))
        return prefix + letters

    def person(self) -> str:
        n = next(self._person)
        return f"Zyxw{n:04d}^Qvut{n:04d}"

    def day(self) -> str:
        # 400 days apart: a date shifted by up to a year never meets another sentinel
        while True:
            value = (date(1200, 1, 1) + timedelta(days=400 * next(self._day))).strftime("%Y%m%d")
            if value != "19000101":
                return value

    def time(self) -> str:
        n = next(self._time)
        return f"{10 + n // 3600:02d}{n // 60 % 60:02d}{n % 60:02d}.250"

    def uid(self) -> str:
        return f"{UID_ROOT}{1000 + next(self._uid)}"

    def value(self, vr: str) -> tuple[str, tuple[str, ...]]:
        """A unique value valid for ``vr`` and its needles."""
        if vr == "PN":
            name = self.person()
            return name, tuple(part.lower() for part in name.split("^"))
        simple = {
            "DA": self.day,
            "DT": lambda: self.day() + "101500",
            "TM": self.time,
            "UI": self.uid,
            "DS": lambda: f"-{next(self._number):04d}E-9",
            "IS": lambda: f"-9{next(self._number):06d}",
            "AS": lambda: f"{100 + next(self._number) % 900:03d}W",
        }
        if vr in simple:
            value = simple[vr]()
            return value, (value.lower(),)
        token = self.token()
        if vr == "UR":
            return f"http://{token.lower()}.invalid/", (token.lower(),)
        return token, (token.lower(),)

    # -- identifying values for cleanable text -----------------------------------------------

    def add_identifying(self, value: str, vr: str) -> None:
        """Offer a planted identifying value to the cleanable texts (PN: each component)."""
        parts = value.split("^") if vr == "PN" else [value]
        self._pool.extend((part, (part.lower(),)) for part in parts)

    def cleanable(
        self, vr: str, path: Path, tag: int
    ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """``"<token> [word] <identifying>"`` fitting ``vr``; (value, keep words, drop words)."""
        if not self._pool_order:
            self._pool_order = [*range(len(self._pool)), -1]  # -1: a clean-pattern token
            self.rng.shuffle(self._pool_order)
        pick = self._pool_order.pop()
        if pick < 0:
            ident = self.token("CLNP")
            self.record(ident, (ident.lower(),), path=path, tag=tag, vr=vr, kind=Kind.PATTERN)
            drop: tuple[str, ...] = (ident.lower(),)
        else:
            ident, drop = self._pool[pick]
        token = self.token()
        limit = _MAX_LENGTH.get(vr, 1024)
        words = (token, "chest", ident) if len(token) + len(ident) + 8 <= limit else (token, ident)
        return " ".join(words), tuple(w.lower() for w in words[:-1]), drop

    # -- planting -----------------------------------------------------------------------------

    def record(
        self,
        value: str | bytes,
        needles: tuple[str, ...],
        *,
        path: Path,
        tag: int,
        vr: str,
        kind: Kind,
        keep: tuple[str, ...] = (),
        drop: tuple[str, ...] = (),
        cleanable: bool = False,
    ) -> Sentinel:
        chain = (*(t for t, _ in path), tag)
        sentinel = Sentinel(
            value=value,
            needles=needles,
            path=path,
            tag=tag,
            vr=vr,
            kind=kind,
            expect=expectations(self.sop_class, chain, vr, kind, cleanable),
            keep_words=keep,
            drop_words=drop,
        )
        self.sentinels.append(sentinel)
        return sentinel

    def plant(
        self,
        ds: Dataset,
        path: Path,
        tag: int,
        vr: str,
        kind: Kind,
        *,
        value: str | None = None,
        cleanable: bool = False,
    ) -> Sentinel:
        """Add element ``tag`` with a unique value (or ``value``) and record it."""
        keep: tuple[str, ...] = ()
        drop: tuple[str, ...] = ()
        data: str | bytes
        if vr in BINARY_VRS:
            token = value or self.token()
            data, needles = binary_text(token), (token.lower(),)
        elif cleanable:
            data, keep, drop = self.cleanable(vr, path, tag)
            needles = (keep[0],)
        elif value is not None:
            data = value
            needles = tuple(p.lower() for p in value.split("^")) if vr == "PN" else (value.lower(),)
        else:
            data, needles = self.value(vr)
        ds.add_new(tag, vr, data)
        return self.record(
            data,
            needles,
            path=path,
            tag=tag,
            vr=vr,
            kind=kind,
            keep=keep,
            drop=drop,
            cleanable=cleanable,
        )

    def item(self, ds: Dataset, path: Path, tag: int) -> tuple[Dataset, Path]:
        """A new item appended to sequence ``tag`` of ``ds`` (created if missing)."""
        if tag not in ds:
            ds.add_new(tag, "SQ", Sequence())
        items = ds[tag].value
        item = Dataset()
        items.append(item)
        return item, (*path, (tag, len(items) - 1))

    def plant_rows(
        self,
        ds: Dataset,
        path: Path,
        *,
        sample: int | None = None,
        reserved: Mapping[int, str] | None = None,
    ) -> None:
        """The planted Table E.1-1 rows (:func:`planted_rows`) not in ``ds`` yet: all of them,
        or (``sample``) one of each VR, one cleanable, one kept by each option, the reserved
        ones and ``sample`` more, chosen with the seed."""
        reserved = reserved or {}
        rows = [(tag, vr) for tag, vr in planted_rows() if tag not in ds]
        if sample is not None:
            groups: dict[str, list[int]] = {}
            for tag, vr in rows:
                for group in _row_groups(tag, vr):
                    groups.setdefault(group, []).append(tag)
            chosen = {self.rng.choice(tags) for tags in groups.values()} | set(reserved)
            rest = sorted({tag for tag, _ in rows} - chosen)
            chosen |= set(self.rng.sample(rest, min(sample, len(rest))))
            rows = [(tag, vr) for tag, vr in rows if tag in chosen]
        for tag, vr in rows:
            cleanable = _cleanable(tag, vr)
            value = reserved.get(tag)
            self.plant(ds, path, tag, vr, Kind.TABLE, value=value, cleanable=cleanable)


def _cleanable(tag: int, vr: str) -> bool:
    """Free text that an option cleans: its value is made of neutral and identifying words."""
    row = _rows()[tag]
    return vr in TEXT_VRS and any(row.option_code(o) == "C" for o in _TEXT_CLEANING)


def _row_groups(tag: int, vr: str) -> Iterator[str]:
    yield vr
    if _cleanable(tag, vr):
        yield "cleanable"
    row = _rows()[tag]
    yield from (option for option in OPTIONS if row.option_code(option) == "K")


# -- the instances ------------------------------------------------------------------------------


def tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _identity(b: _Builder, ds: Dataset) -> None:
    """The identifying values every instance has (planted first: cleanable text names them)."""
    reserved = {
        "PatientName": "PN",
        "PatientID": "LO",
        "OtherPatientIDs": "LO",
        "AccessionNumber": "SH",
        "PatientBirthDate": "DA",
        "InstitutionName": "LO",
        "InstitutionalDepartmentName": "LO",
        "PatientAddress": "LO",
        "PatientTelephoneNumbers": "SH",
    }
    for keyword, vr in reserved.items():
        sentinel = b.plant(ds, (), tag_of(keyword), vr, Kind.TABLE)
        b.add_identifying(str(sentinel.value), vr)
    item, path = b.item(ds, (), tag_of("OtherPatientIDsSequence"))
    other = b.plant(item, path, tag_of("PatientID"), "LO", Kind.TABLE)
    b.add_identifying(str(other.value), "LO")
    b.plant(item, path, tag_of("IssuerOfPatientID"), "LO", Kind.TABLE)


def _deep_rows(b: _Builder, ds: Dataset) -> None:
    """The rows again at depth 1-3 (a sample per item), in three chains of sequences."""
    deep_name = b.person()
    b.add_identifying(deep_name, "PN")
    chains = (
        ("RequestAttributesSequence", "ReferencedStudySequence", "OtherPatientIDsSequence"),
        ("ReferencedStudySequence", "ReferencedImageSequence", "ReferencedStudySequence"),
        ("RequestAttributesSequence", "ScheduledProtocolCodeSequence", "ProtocolContextSequence"),
    )
    for chain in chains:
        path: Path = ()
        parent = ds
        for keyword in chain:
            parent, path = b.item(parent, path, tag_of(keyword))
            deepest = len(path) == 3 and keyword == "OtherPatientIDsSequence"
            reserved = {tag_of("ReferringPhysicianName"): deep_name} if deepest else {}
            b.plant_rows(parent, path, sample=DEPTH_SAMPLE, reserved=reserved)
        if chain[-1] == "ProtocolContextSequence":  # a content item: its text is cleanable
            b.plant(parent, path, tag_of("TextValue"), "UT", Kind.SR, cleanable=True)


def _equipment(b: _Builder, ds: Dataset) -> None:
    """Contributing Equipment (no row): device and institution identity at depth 1-2."""
    item, path = b.item(ds, (), tag_of("ContributingEquipmentSequence"))
    for keyword in ("Manufacturer", "InstitutionName", "InstitutionalDepartmentName"):
        _plant_known(b, item, path, keyword)
    for keyword in ("StationName", "DeviceSerialNumber", "ContributionDescription"):
        _plant_known(b, item, path, keyword)
    udi, udi_path = b.item(item, path, tag_of("UDISequence"))
    _plant_known(b, udi, udi_path, "UniqueDeviceIdentifier")


def _plant_known(b: _Builder, ds: Dataset, path: Path, keyword: str) -> Sentinel:
    """``keyword`` with its dictionary VR: a table row, or an IOD-defined attribute."""
    tag = tag_of(keyword)
    vr = str(dictionary_vr(tag))
    if _row(tag) is None:
        return b.plant(ds, path, tag, vr, Kind.DEFINED)
    return b.plant(ds, path, tag, vr, Kind.TABLE, cleanable=_cleanable(tag, vr))


def _codes(b: _Builder, ds: Dataset, path: Path, keyword: str) -> None:
    """A code sequence naming a person or an organisation, with planted code and meaning."""
    item, inner = b.item(ds, path, tag_of(keyword))
    b.plant(item, inner, tag_of("CodeValue"), "SH", Kind.CODE)
    item.CodingSchemeDesignator = "L"
    b.plant(item, inner, tag_of("CodeMeaning"), "LO", Kind.CODE)


def _people(b: _Builder, ds: Dataset) -> None:
    _codes(b, ds, (), "PersonIdentificationCodeSequence")
    _codes(b, ds, (), "InstitutionCodeSequence")
    item, path = b.item(ds, (), tag_of("OperatorIdentificationSequence"))
    _codes(b, item, path, "PersonIdentificationCodeSequence")
    b.plant(item, path, tag_of("InstitutionName"), "LO", Kind.TABLE)
    _codes(b, item, path, "InstitutionCodeSequence")


def _private(b: _Builder, ds: Dataset, path: Path, group: int = 0x0009) -> None:
    """A private block: creator, elements of several VRs and a private sequence."""
    ds.add_new(group << 16 | 0x0010, "LO", "ACME PHI 1.0")
    for offset, vr in enumerate(("LO", "SH", "PN", "DA", "UI", "UT", "OB", "UN")):
        b.plant(ds, path, group << 16 | 0x1010 + offset, vr, Kind.PRIVATE)
    seq_tag = group << 16 | 0x1020
    ds.add_new(seq_tag, "SQ", Sequence([Dataset()]))
    inner = ds[seq_tag].value[0]
    inner.add_new(group << 16 | 0x0010, "LO", "ACME PHI 1.0")
    b.plant(inner, (*path, (seq_tag, 0)), group << 16 | 0x1010, "LO", Kind.PRIVATE)


def _safe_private(b: _Builder, ds: Dataset) -> None:
    group, creator, byte, vr = SAFE_PRIVATE
    assert (group, creator, byte) in safe_private_attributes()
    ds.add_new(group << 16 | 0x0010, "LO", creator)
    b.plant(ds, (), group << 16 | 0x1000 | byte, vr, Kind.SAFE_PRIVATE)
    b.plant(ds, (), group << 16 | 0x1001, "LO", Kind.PRIVATE)  # same block, not safe


def _unknown(b: _Builder, ds: Dataset) -> None:
    """An element of every VR in a public group the dictionary does not know."""
    numbers = {"AT": 0x00100010, "FD": 1.5, "FL": 2.5}
    for element, vr in enumerate(_UNKNOWN_VRS, start=0x1001):
        tag = UNKNOWN_GROUP << 16 | element
        if vr in STRING_VRS or vr in BINARY_VRS:
            b.plant(ds, (), tag, vr, Kind.UNKNOWN)
        else:
            value = numbers.get(vr, 7)
            ds.add_new(tag, vr, value)
            b.record(str(value), (), path=(), tag=tag, vr=vr, kind=Kind.UNKNOWN)


def _outside(b: _Builder, ds: Dataset) -> None:
    """Public attributes without a table row: dates, names, retired text, foreign binary."""
    for keyword in (*_NON_TABLE_DATES, *_NON_TABLE_NAMES):
        tag = tag_of(keyword)
        kind = Kind.DATE if keyword in _NON_TABLE_DATES else Kind.UNDEFINED
        b.plant(ds, (), tag, str(dictionary_vr(tag)), kind)
    for tag, vr in retired_text():
        b.plant(ds, (), tag, vr, Kind.RETIRED)
    for keyword, vr in _FOREIGN_BINARY.items():
        b.plant(ds, (), tag_of(keyword), vr, Kind.UNDEFINED)
    b.plant(ds, (), tag_of("Manufacturer"), "LO", Kind.DEFINED)
    b.plant(ds, (), 0x50002500, "LO", Kind.MASK)  # Curve Label (retired, 50xx)
    ds.add_new(0x50000005, "US", 1)
    b.plant(ds, (), 0x50003000, "OB", Kind.MASK)  # Curve Data


@cache
def retired_text() -> tuple[tuple[int, str], ...]:
    """One retired attribute outside the table per free-text VR."""
    picked: dict[str, int] = {}
    for tag, (vr, _vm, _description, retired, _keyword) in sorted(DicomDictionary.items()):
        wanted = retired and vr in TEXT_VRS - {"AE"} and tag >> 16 >= 0x0008
        if wanted and vr not in picked and _row(tag) is None:
            picked[vr] = tag
    return tuple((tag, vr) for vr, tag in sorted(picked.items()))


def _image(ds: Dataset, bits: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixel_bytes(64 * bits // 8)


def _overlay(b: _Builder, ds: Dataset) -> None:
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 40)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    b.plant(ds, (), 0x60003000, "OW", Kind.MASK)  # Overlay Data
    b.plant(ds, (), 0x60004000, "LT", Kind.MASK)  # Overlay Comments


def _references(
    b: _Builder, ds: Dataset, path: Path, keyword: str = "ReferencedImageSequence"
) -> None:
    """A reference to an image, with text and binary values the IOD does not define there."""
    item, inner = b.item(ds, path, tag_of(keyword))
    item.ReferencedSOPClassUID = SOP_CLASSES["ct"]
    b.plant(item, inner, tag_of("ReferencedSOPInstanceUID"), "UI", Kind.TABLE)
    b.plant(item, inner, tag_of("TextValue"), "UT", Kind.UNDEFINED)
    b.plant(item, inner, tag_of("Manufacturer"), "LO", Kind.UNDEFINED)
    b.plant(item, inner, tag_of("HPGLDocument"), "OB", Kind.UNDEFINED)
    _private(b, item, inner, 0x0011)


def _ct(b: _Builder, ds: Dataset) -> None:
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    _image(ds, 16)
    b.plant(ds, (), tag_of("ConvolutionKernel"), "SH", Kind.DEFINED)
    _references(b, ds, ())
    _overlay(b, ds)


def _sc(b: _Builder, ds: Dataset) -> None:
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    _image(ds, 8)
    _references(b, ds, ())
    _overlay(b, ds)


def _content_item(b: _Builder, ds: Dataset, path: Path, value_type: str, name: str | None) -> None:
    item, inner = b.item(ds, path, CONTENT_SEQUENCE)
    item.RelationshipType = "HAS OBS CONTEXT" if value_type == "PNAME" else "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    leaf = {
        "TEXT": ("TextValue", "UT"),
        "PNAME": ("PersonName", "PN"),
        "DATE": ("Date", "DA"),
        "DATETIME": ("DateTime", "DT"),
        "TIME": ("Time", "TM"),
        "UIDREF": ("UID", "UI"),
    }.get(value_type)
    if leaf is not None:
        keyword, vr = leaf
        b.plant(item, inner, tag_of(keyword), vr, Kind.SR, value=name, cleanable=vr == "UT")
    elif value_type == "CODE":
        item.ConceptCodeSequence = [_code("T-D3000", "SRT", "Chest")]
    elif value_type == "NUM":
        measured = Dataset()
        measured.NumericValue = "12.5"
        measured.MeasurementUnitsCodeSequence = [_code("mm", "UCUM", "millimeter")]
        item.MeasuredValueSequence = [measured]
    if b.rng.random() < 0.3:
        b.plant(item, inner, tag_of("ObservationDateTime"), "DT", Kind.TABLE)
    if b.rng.random() < 0.3:
        b.plant(item, inner, tag_of("ObservationUID"), "UI", Kind.TABLE)


def _content_tree(b: _Builder, ds: Dataset, path: Path, depth: int, deep_name: str) -> None:
    """Content items of every value type in seeded random order, and a CONTAINER holding the
    next level (CONTAINERs at depths 1-3, values down to depth 4)."""
    types = [*SR_VALUE_TYPES, *b.rng.sample(SR_VALUE_TYPES, k=b.rng.randint(0, 2))]
    if depth < 4:
        types.append("CONTAINER")
    b.rng.shuffle(types)
    for value_type in types:
        if value_type != "CONTAINER":
            _content_item(b, ds, path, value_type, None)
            continue
        item, inner = b.item(ds, path, CONTENT_SEQUENCE)
        item.RelationshipType = "CONTAINS"
        item.ValueType = "CONTAINER"
        item.ContinuityOfContent = "SEPARATE"
        item.ConceptNameCodeSequence = [_code("121070", "DCM", "Findings")]
        if depth == 2:
            _private(b, item, inner)
        _content_tree(b, item, inner, depth + 1, deep_name)
    if depth == 4:
        _content_item(b, ds, path, "PNAME", deep_name)


def _sr(b: _Builder, ds: Dataset) -> None:
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    item, path = b.item(ds, (), tag_of("VerifyingObserverSequence"))
    for keyword, vr in (
        ("VerifyingObserverName", "PN"),
        ("VerifyingOrganization", "LO"),
        ("VerificationDateTime", "DT"),
    ):
        b.plant(item, path, tag_of(keyword), vr, Kind.TABLE)
    _codes(b, item, path, "VerifyingObserverIdentificationCodeSequence")
    _codes(b, item, path, "PersonIdentificationCodeSequence")
    item, path = b.item(ds, (), tag_of("AuthorObserverSequence"))
    item.ObserverType = "PSN"
    b.plant(item, path, tag_of("PersonName"), "PN", Kind.TABLE)
    _codes(b, item, path, "PersonIdentificationCodeSequence")
    b.plant(item, path, tag_of("InstitutionName"), "LO", Kind.TABLE)
    _codes(b, item, path, "InstitutionCodeSequence")
    evidence, path = b.item(ds, (), tag_of("CurrentRequestedProcedureEvidenceSequence"))
    b.plant(evidence, path, tag_of("StudyInstanceUID"), "UI", Kind.TABLE)
    series, path = b.item(evidence, path, tag_of("ReferencedSeriesSequence"))
    b.plant(series, path, tag_of("SeriesInstanceUID"), "UI", Kind.TABLE)
    instance, path = b.item(series, path, tag_of("ReferencedSOPSequence"))
    instance.ReferencedSOPClassUID = SOP_CLASSES["ct"]
    b.plant(instance, path, tag_of("ReferencedSOPInstanceUID"), "UI", Kind.TABLE)


def _gsps(b: _Builder, ds: Dataset) -> None:
    ds.Modality = "PR"
    ds.ContentLabel = "PHI_CORPUS"
    series, path = b.item(ds, (), tag_of("ReferencedSeriesSequence"))
    b.plant(series, path, tag_of("SeriesInstanceUID"), "UI", Kind.TABLE)
    _references(b, series, path)
    layer = Dataset()
    layer.GraphicLayer = "LAYER1"
    layer.GraphicLayerOrder = 1
    ds.GraphicLayerSequence = [layer]
    for _ in range(b.rng.randint(1, 3)):
        item, path = b.item(ds, (), tag_of("GraphicAnnotationSequence"))
        item.GraphicLayer = "LAYER1"
        ref, ref_path = b.item(item, path, tag_of("ReferencedImageSequence"))
        ref.ReferencedSOPClassUID = SOP_CLASSES["ct"]
        b.plant(ref, ref_path, tag_of("ReferencedSOPInstanceUID"), "UI", Kind.TABLE)
        text, text_path = b.item(item, path, tag_of("TextObjectSequence"))
        text.BoundingBoxAnnotationUnits = "PIXEL"
        b.plant(text, text_path, tag_of("UnformattedTextValue"), "ST", Kind.SR, cleanable=True)
        text.BoundingBoxTopLeftHandCorner = [1.0, 1.0]
        text.BoundingBoxBottomRightHandCorner = [8.0, 8.0]
        text.BoundingBoxTextHorizontalJustification = "LEFT"
        graphic = Dataset()
        graphic.GraphicAnnotationUnits = "PIXEL"
        graphic.GraphicDimensions = 2
        graphic.NumberOfGraphicPoints = 2
        graphic.GraphicData = [1.0, 1.0, 4.0, 4.0]
        graphic.GraphicType = "POLYLINE"
        graphic.GraphicFilled = "N"
        item.GraphicObjectSequence = [graphic]


_BUILDERS = {
    "ct": _ct,
    "comprehensive_sr": _sr,
    "enhanced_sr": _sr,
    "gsps": _gsps,
    "sc": _sc,
}


def generate(name: str, seed: int) -> tuple[Dataset, list[Sentinel]]:
    """One instance of ``SOP_CLASSES[name]`` built from ``seed``, and its sentinels."""
    sop_class = SOP_CLASSES[name]
    b = _Builder(sop_class, seed)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    _identity(b, ds)
    deep_name = b.person()
    if name.endswith("_sr"):
        b.add_identifying(deep_name, "PN")
    _deep_rows(b, ds)
    _equipment(b, ds)
    _people(b, ds)
    _BUILDERS[name](b, ds)
    if name.endswith("_sr"):
        _content_tree(b, ds, (), 1, deep_name)
    b.plant_rows(ds, ())  # every row not planted yet, at the top level
    _outside(b, ds)
    _private(b, ds, ())
    _safe_private(b, ds)
    _unknown(b, ds)
    ds.file_meta = meta = Dataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = f"{UID_ROOT}1"
    for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
        b.plant(meta, (), tag_of(keyword), "AE", Kind.META)
    return ds, b.sentinels


def top(sentinels: list[Sentinel], keyword: str) -> Sentinel:
    """The sentinel of ``keyword`` at the top level."""
    tag = tag_of(keyword)
    return next(s for s in sentinels if s.tag == tag and not s.path and s.kind is not Kind.META)


def walk(ds: Dataset, path: Path = ()) -> Iterator[tuple[Path, int, object]]:
    """(path, tag, value) of every element at every depth (sequences: their items)."""
    for elem in ds:
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                yield from walk(item, (*path, (elem.tag, index)))
        else:
            yield path, elem.tag, elem.value


def locate(ds: Dataset, path: Path, tag: int) -> DataElement | None:
    """The element at ``path``/``tag`` of ``ds``, or None."""
    for seq_tag, index in path:
        elem = ds.get(seq_tag)
        if elem is None or elem.VR not in ("SQ", "UN") or not isinstance(elem.value, Sequence):
            return None
        if index >= len(elem.value):
            return None
        ds = elem.value[index]
    return ds.get(tag)

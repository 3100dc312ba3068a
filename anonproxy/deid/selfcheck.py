"""The identifying values of an instance: text cleaning and the self-check of the output bytes.

Before an instance is modified, :meth:`IdentifyingValues.collect` reads, from the whole data
set (every sequence item, at every depth), the values that identify a person, the visit or the
institution:

* the family, given and middle name components of every person name (VR PN);
* identifiers: Patient ID and Other Patient IDs (wherever they occur), Accession Number, Study
  ID, Admission ID, Service Episode ID, Medical Record Locator, the procedure step and order
  numbers, and the Code Value of a Person Identification Code Sequence item;
* the Patient's Birth Date (also in the forms a report writes it: ``1953-04-17``,
  ``17.04.1953``, ``17/04/1953``, ``04/17/1953``), unless the profile keeps dates as received;
* addresses (split at commas, ``^`` and line breaks), telephone numbers and telecom
  information (phone numbers match whatever separators a text puts between their digits);
* institution, department and other organisation names.

A value is left out when the profile keeps its attribute (K, or a ``keep`` rule: e.g.
Institution Name under Retain Institution Identity), when it is too short to be searched
without rejecting innocent instances (fewer than 3 characters; fewer than 6 when it is made of
digits only, since numbers of that length occur in any header; fewer than 3 letters or
digits), when it equals one of the engine's own dummy values or a value the engine writes into
every instance (``YES`` in Patient Identity Removed, the CID 7050 codes and their meanings:
:data:`anonproxy.deid.codes.WRITTEN_VALUES`), or when it occurs as a word in the product
description of the equipment (Manufacturer, Manufacturer's Model Name, Software Versions;
person names apart) or among the codes of the instance (Code Value, Coding Scheme Designator
and Version, but for a person's identification code): product and coding vocabulary is not
identifying (a test file's Institution Name "Here" and its Manufacturer "... name here";
another's Patient's Name "Test^S R" and its Coding Scheme Designator "TEST").

:meth:`IdentifyingValues.scrub` is the text part of the C (clean) action: it deletes these
values from a text value. :class:`SelfCheck` is the last gate before an instance is stored:
it searches the *encoded* de-identified data set (every element but the pixel data, file meta
included) for each value as a whole word, case-insensitively, in the instance's character set
and as UTF-8, UTF-16 (both byte orders) and byte-swapped ASCII, and for every original UID the
engine replaced. A hit names the attribute the value came from and, when it can be found, the
attribute it survived in; never the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import VR

from anonproxy.deid.actions import STRING_DUMMIES
from anonproxy.deid.codes import WRITTEN_VALUES
from anonproxy.deid.structure import (
    as_held,
    decoded,
    dictionary_keyword,
    dictionary_sequence,
    get_decoded,
)

MIN_LENGTH = 3
#: Marks a telephone number among the identifying values (its digits follow): a character no
#: value of a data set holds (control characters are not allowed in DICOM strings).
PHONE = "\x01"
MIN_DIGITS = 6

#: VR members bound once (an attribute of the VR enum costs ~0.1 us a look-up, per element)
_SQ, _UN, _PN = VR.SQ, VR.UN, VR.PN
_PN_GROUPS = re.compile(r"=")
_ADDRESS_SPLIT = re.compile(r"[,;^\r\n]+")
_UID_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_DIGITS = frozenset(b"0123456789")
_DOT = ord(".")
_PHONE_SEPARATORS = r"[\s\-./()]*"


def _tags(*keywords: str) -> frozenset[int]:
    tags = {tag_for_keyword(k) for k in keywords}
    if None in tags:
        raise ValueError(f"unknown keyword in {keywords}")
    return frozenset(t for t in tags if t is not None)


_IDENTIFIERS = _tags(
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "ServiceEpisodeID",
    "MedicalRecordLocator",
    "RequestedProcedureID",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
)
_ORGANISATIONS = _tags(
    "InstitutionName",
    "InstitutionalDepartmentName",
    "ResponsibleOrganization",
    "VerifyingOrganization",
)
_ADDRESSES = _tags(
    "PatientAddress",
    "InstitutionAddress",
    "PersonAddress",
    "PatientTelecomInformation",
    "PersonTelecomInformation",
)
_PHONES = _tags("PatientTelephoneNumbers", "PersonTelephoneNumbers", "TelephoneNumberTrial")
_BIRTH_DATE = 0x00100030
_KINDS: dict[int, str] = {
    **dict.fromkeys(_IDENTIFIERS, "identifier"),
    **dict.fromkeys(_ORGANISATIONS, "organisation"),
    **dict.fromkeys(_ADDRESSES, "address"),
    **dict.fromkeys(_PHONES, "phone"),
    _BIRTH_DATE: "birth",
}
_PERSON_IDENTIFICATION_CODE_SEQUENCE = 0x00401101
_CODE_VALUE = 0x00080100
_PRODUCT_TAGS = (0x00080070, 0x00081090, 0x00181020)
#: Code Value, Coding Scheme Designator and Version: the words of coding schemes.
_VOCABULARY_TAGS = frozenset({0x00080100, 0x00080102, 0x00080103})
_SPECIFIC_CHARACTER_SET = 0x00080005
#: What _collect reads: elements of these VRs (sequences, perhaps one sent as UN, names) and
#: of these tags; it skips any other element received with its VR
_COLLECTED_VRS = frozenset({"SQ", "UN", "PN"})
_COLLECTED_TAGS = frozenset({*_KINDS, *_VOCABULARY_TAGS, _CODE_VALUE})


def _strings(value: object) -> Iterator[str]:
    """The non-empty string values of an element value (str, PersonName or multi-value)."""
    if value is None or isinstance(value, bytes | bytearray):
        return
    if isinstance(value, MultiValue | list | tuple):
        for item in value:
            yield from _strings(item)
        return
    text = value if isinstance(value, str) else str(value)  # PersonName, numbers
    if text:
        yield text


def _searchable(value: str) -> bool:
    """Long enough to be searched without rejecting innocent instances."""
    folded = value.casefold()
    if folded in STRING_DUMMIES or folded in WRITTEN_VALUES:
        return False
    if value.isdigit():
        return len(value) >= MIN_DIGITS
    letters = len(value) if value.isalnum() else sum(c.isalnum() for c in value)
    return letters >= MIN_LENGTH


def _name_components(value: object) -> Iterator[str]:
    """Family, given and middle names of every component group (prefix and suffix skipped)."""
    for name in _strings(value):
        for group in _PN_GROUPS.split(name):
            for part in group.split("^")[:3]:
                yield part.strip()


def _birth_date_forms(value: str) -> Iterator[str]:
    digits = value.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return
    y, m, d = digits[:4], digits[4:6], digits[6:]
    yield from (digits, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}")
    yield f"{y}/{m}/{d}"


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return VR.UN


def _parts(kind: str, value: object) -> Iterator[str]:
    """The searchable pieces of one identifying value of ``kind``."""
    if kind == "name":
        yield from _name_components(value)
        return
    for text in _strings(value):
        if kind == "birth":
            yield from _birth_date_forms(text)
        elif kind in {"address", "phone"}:
            for part in _ADDRESS_SPLIT.split(text):
                digits = re.sub(r"\D", "", part)
                if len(digits) >= MIN_DIGITS and not re.search(r"[^\d\s\-./()+]", part):
                    yield PHONE + digits  # a telephone number: matched by its digits
                else:
                    yield part.strip()
        else:
            yield text.strip("\x00 ")


def _collect(
    ds: Dataset,
    kept: Callable[[int], bool],
    found: dict[str, tuple[str, str]],
    codes: list[str],
    in_person_code: bool,
) -> None:
    """Add to *found* ``value → (keyword, kind)`` for the identifying values of *ds* (and its
    items), and to *codes* the coding-scheme words of its codes."""
    for key, element in ds.items():  # only what is read below is decoded
        held = as_held(ds, key, element)
        vr = held.VR
        if vr is not None and vr not in _COLLECTED_VRS and key not in _COLLECTED_TAGS:
            continue  # most elements: none of the kinds below, by their VR and tag
        tag = int(key)
        if tag >> 16 & 1 or not tag & 0xFFFF:  # private data elements, group lengths
            continue
        vr = vr or _dictionary_vr(tag)
        if vr == _SQ or (vr == _UN and dictionary_sequence(tag)):  # UN: decoded as SQ
            elem = decoded(ds, key)  # ds[key]; the key as held: found without comparing tags
            if elem.VR == _SQ and not kept(tag):
                person = tag == _PERSON_IDENTIFICATION_CODE_SEQUENCE
                for item in elem.value or ():
                    _collect(item, kept, found, codes, person)
            continue
        if in_person_code and tag == _CODE_VALUE:
            kind: str | None = "identifier"
        elif tag in _VOCABULARY_TAGS:
            codes.extend(_strings(decoded(ds, key).value))
            continue
        else:
            kind = _KINDS.get(tag, "name" if vr == _PN else None)
        if kind is None or kept(tag):
            continue
        keyword = dictionary_keyword(tag) or "person identification code"
        for part in _parts(kind, decoded(ds, key).value):
            phone = kind in {"address", "phone"} and part.startswith(PHONE)
            if kind == "birth" or phone or (PHONE not in part and _searchable(part)):
                found.setdefault(part.casefold(), (keyword, kind))


def _in_words(value: str, text: str, ascii_lowered: str | None = None) -> bool:
    """True if ``value`` is a whole word (or words) of ``text``, whatever the case.
    *ascii_lowered* is ``text.lower()`` when *text* is ASCII (None otherwise): an ASCII value
    not in it is no word of *text* (between ASCII characters, ignoring case is comparing
    lower case), found without the regular expression (one per value: compiled anew for the
    values of each patient)."""
    if ascii_lowered is not None and value.isascii() and value.lower() not in ascii_lowered:
        return False
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def _word_alternatives(values: Iterable[str]) -> str:
    """The regular expression body of ``values``: phone numbers (:data:`PHONE` and digits) by their
    digits with any separators, the others literally; longest first."""
    ordered = sorted(set(values), key=lambda v: (-len(v), v))
    return "|".join(
        _PHONE_SEPARATORS.join(v[1:]) if v.startswith(PHONE) else re.escape(v) for v in ordered
    )


@lru_cache(maxsize=1024)
def _text_pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern per set of values: the instances of a series share their patient's."""
    if not values:
        return None
    return re.compile(rf"(?<!\w)(?:{_word_alternatives(values)})(?!\w)", re.IGNORECASE)


def _swapped(data: bytes) -> bytes:
    """``data`` with the bytes of each pair swapped (text stored as big-endian OW)."""
    out = bytearray(data[: len(data) & ~1])
    out[0::2], out[1::2] = data[1 : len(out) : 2], data[0 : len(out) : 2]
    return bytes(out)


def _encoded_forms(value: str, encodings: tuple[str, ...]) -> Iterator[bytes]:
    """``value`` as bytes in ``encodings``, as UTF-16 and byte-swapped, lower-cased as
    :meth:`bytes.lower` does (ASCII letters). The UTF-16 form is the little-endian one without
    its last zero byte: big-endian text holds it one byte later."""
    for encoding in (*encodings, "utf-16-le"):
        try:
            yield value.encode(encoding).lower().rstrip(b"\x00")
        except (UnicodeError, LookupError):
            continue
    ascii_form = value.encode("ascii", "ignore").lower()
    for start in (0, 1):  # the text may start at an odd or even offset of the OW value
        swapped = _swapped(ascii_form[start:])
        if len(swapped) >= MIN_LENGTH:
            yield swapped


@lru_cache(maxsize=1024)
def _bytes_pattern(values: tuple[str, ...], encodings: tuple[str, ...]) -> re.Pattern[bytes] | None:
    """The encoded forms of ``values`` in lower-cased bytes. No flag and no look-behind, so
    that the regular expression engine skips the bytes no value starts with; word boundaries
    are checked on each match (:func:`_whole_word`)."""
    forms: set[bytes] = set()
    phones: set[str] = set()
    for value in values:
        if value.startswith(PHONE):
            phones.add(value[1:])
            continue
        forms.update(f for f in _encoded_forms(value, encodings) if f)
    alternatives = [re.escape(f) for f in sorted(forms, key=lambda f: (-len(f), f))]
    alternatives += [
        _PHONE_SEPARATORS.encode().join(re.escape(d.encode()) for d in digits)
        for digits in sorted(phones)
    ]
    if not alternatives:
        return None
    return re.compile(b"|".join(alternatives))


_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")


def _search(pattern: re.Pattern[bytes], data: bytes) -> bytes | None:
    """The first match of ``pattern`` in ``data`` (lower-cased first) that stands as a whole
    word: no letter, digit or underscore right before or after it."""
    lowered = data.lower()
    for match in pattern.finditer(lowered):
        start, end = match.span()
        if (start == 0 or lowered[start - 1] not in _WORD_BYTES) and (
            end == len(lowered) or lowered[end] not in _WORD_BYTES
        ):
            return match.group(0)
    return None


@dataclass(frozen=True, slots=True)
class IdentifyingValues:
    """Identifying values of one instance (never logged, never put in a message)."""

    words: Mapping[str, str]  # casefolded value (PHONE + digits for a phone) → keyword
    encodings: tuple[str, ...]  # Python codecs of the instance's Specific Character Set

    @classmethod
    def collect(
        cls, ds: Dataset, kept: Callable[[int], bool], *, birth_date: bool = True
    ) -> IdentifyingValues:
        """Read the identifying values of ``ds`` at every depth; skip what ``kept(tag)`` says
        the profile keeps as received, and the birth date unless ``birth_date``."""
        found: dict[str, tuple[str, str]] = {}
        codes: list[str] = []
        skip_birth = not birth_date
        _collect(
            ds, lambda tag: kept(tag) or (skip_birth and tag == _BIRTH_DATE), found, codes, False
        )
        product = "\n".join(
            text
            for tag in _PRODUCT_TAGS
            if (elem := get_decoded(ds, tag)) is not None
            for text in _strings(elem.value)
        )
        vocabulary = "\n".join(codes)
        lowered_vocabulary = vocabulary.lower() if vocabulary.isascii() else None
        lowered_product = product.lower() if product.isascii() else None
        words = {
            value: keyword
            for value, (keyword, kind) in found.items()
            if value.startswith(PHONE)
            or not (
                _in_words(value, vocabulary, lowered_vocabulary)
                or (kind != "name" and _in_words(value, product, lowered_product))
            )
        }
        charset = ds.get(_SPECIFIC_CHARACTER_SET)
        try:
            encodings = convert_encodings(list(_strings(charset.value)) if charset else None)
        except LookupError:  # an unknown term: the structure check refuses it before this
            encodings = ["iso8859"]
        return cls(words=words, encodings=(*encodings, "utf-8"))

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """The values as whole words in text (phone numbers with any separators)."""
        return _text_pattern(tuple(sorted(self.words)))

    def scrub(self, text: str) -> str:
        """``text`` without any identifying value."""
        pattern = self.pattern
        if pattern is None:
            return text
        return " ".join(pattern.sub(" ", text).split())

    def find(self, text: str) -> str | None:
        """Keyword of an identifying value in ``text``, or None."""
        pattern = self.pattern
        match = pattern.search(text) if pattern is not None else None
        return None if match is None else self._keyword(match.group(0))

    def _keyword(self, matched: str) -> str:
        folded = matched.casefold()
        digits = PHONE + re.sub(r"\D", "", folded)
        return self.words.get(folded) or self.words.get(digits) or "identifying value"


def first_uid(data: bytes, uids: Iterable[str]) -> str | None:
    r"""The UID of *uids* that comes first in *data* as a UID token, or None. The tokens are
    what ``[0-9]+(?:\.[0-9]+)+`` finds from left to right: a UID is one where no digit, and
    no dot after a digit, comes right before it, and no digit, and no dot before a digit, right
    after it. Each UID is looked for with :meth:`bytes.find` (a regular expression run over
    the data costs ten times as much)."""
    first: tuple[int, str] | None = None
    size = len(data)
    for uid in uids:
        if not _UID_TOKEN.fullmatch(uid):
            continue  # never a token
        encoded = uid.encode("ascii")
        at = data.find(encoded)
        while at != -1 and (first is None or at < first[0]):
            end = at + len(encoded)
            before = at == 0 or (
                data[at - 1] not in _DIGITS
                and not (data[at - 1] == _DOT and at >= 2 and data[at - 2] in _DIGITS)
            )
            after = end == size or (
                data[end] not in _DIGITS
                and not (data[end] == _DOT and end + 1 < size and data[end + 1] in _DIGITS)
            )
            if before and after:
                first = (at, uid)
                break
            at = data.find(encoded, at + 1)
    return first[1] if first is not None else None


class SelfCheck:
    """Searches an encoded de-identified data set for the identifying values of its original
    and for the original UIDs the engine replaced. Built by the engine for one instance."""

    __slots__ = ("_ds", "_ids", "_uids")

    def __init__(self, ids: IdentifyingValues, uids: Mapping[str, str], ds: Dataset) -> None:
        self._ids = ids
        self._uids = uids  # original UID → keyword
        self._ds = ds

    def finding(self, data: bytes) -> str | None:
        """Why ``data`` (encoded elements) must not be released, or None. Names attributes
        only."""
        uid = first_uid(data, self._uids)
        if uid is not None:
            where = self._where(uid)
            return f"self-check: identifying value of {self._uids[uid]} survived{where}"
        pattern = self._pattern()
        matched = _search(pattern, data) if pattern is not None else None
        if matched is None:
            return None
        keyword = self._source_of(matched)
        return f"self-check: identifying value of {keyword} survived{self._where(None)}"

    def _pattern(self) -> re.Pattern[bytes] | None:
        return _bytes_pattern(tuple(sorted(self._ids.words)), self._ids.encodings)

    def _source_of(self, matched: bytes) -> str:
        for value, keyword in self._ids.words.items():
            if value.startswith(PHONE):
                if re.sub(rb"\D", b"", matched) == value[1:].encode():
                    return keyword
            elif matched in set(_encoded_forms(value, self._ids.encodings)):
                return keyword
        return "identifying value"

    def _where(self, uid: str | None) -> str:
        """`` in <keyword> (gggg,eeee)`` of the first element holding the finding, if any."""
        for tag, value in _leaves(self._ds):
            if uid is not None:
                hit = any(text.strip("\x00 ") == uid for text in _strings(value))
            elif isinstance(value, bytes | bytearray):
                pattern = self._pattern()
                hit = pattern is not None and _search(pattern, bytes(value)) is not None
            else:
                hit = any(self._ids.find(text) is not None for text in _strings(value))
            if hit:
                keyword = keyword_for_tag(tag)
                label = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
                return f" in {keyword} {label}" if keyword else f" in {label}"
        return " in the encoded data set"


def _leaves(ds: Dataset) -> Iterator[tuple[int, object]]:
    """``(tag, value)`` of every non-sequence element, at every depth, file meta first."""
    meta = getattr(ds, "file_meta", None)
    for current in (meta, ds) if meta is not None else (ds,):
        for elem in current:
            if elem.VR == _SQ:
                for item in elem.value or ():
                    yield from _leaves(item)
            else:
                yield elem.tag, elem.value

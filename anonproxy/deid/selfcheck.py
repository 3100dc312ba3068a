"""The identifying values of an instance: the pre-forward self-check and text cleaning.

Before an instance is modified, :meth:`IdentifyingValues.collect` reads the values that identify
the patient, the visit and the instance:

* Patient's Name components (split at ``^`` and ``=``) of 3 characters or more;
* Patient ID, Other Patient IDs (and Patient ID in Other Patient IDs Sequence items),
  Accession Number, Patient's Birth Date, Institution Name;
* the original SOP Instance, Study Instance and Series Instance UIDs.

A value is left out when the profile keeps its attribute (K, e.g. Institution Name under Retain
Institution Identity, the UIDs under Retain UIDs), when it is shorter than 3 characters (too
short to be searched without rejecting innocent instances), when it equals one of the engine's
own dummy values, or when it occurs as a word in the product description of the equipment
(Manufacturer, Manufacturer's Model Name, Software Versions): product vocabulary is not
identifying, and those attributes are kept by the standard (e.g. a test file whose Institution
Name "Here" also appears in its Manufacturer "... name here").

:meth:`IdentifyingValues.find` then looks, after the action of each attribute, for a surviving
value: UIDs by exact match in every UI value, and every value as a whole word (case-insensitive,
bounded by non-word characters) in text values (AE, LO, LT, PN, SH, ST, UC, UR, UT). Dates,
codes and numbers (DA, DT, TM, CS, DS, IS, ...) are not searched: a retained Study Date equal to
the birth date of a newborn is not a leak of the Patient's Birth Date attribute. Nor are the
coded-vocabulary attributes of the Code Sequence Macro (Code Value, Coding Scheme Designator and
Version, Context Identifier, Mapping Resource): their values come from coding schemes (a test
file's Patient's Name "Test^S R" and its Coding Scheme Designator "TEST").

:meth:`IdentifyingValues.scrub` is the text part of the C (clean) action: it deletes the same
values, plus the name components of every person name at the top level of the instance
(referring physician, operators, ...), from a text value.

Nothing here logs or formats a value; findings are reported as the attribute keyword.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import VR

from anonproxy.deid.actions import STRING_DUMMIES

MIN_LENGTH = 3

TEXT_VRS: frozenset[str] = frozenset(
    {VR.AE, VR.LO, VR.LT, VR.PN, VR.SH, VR.ST, VR.UC, VR.UR, VR.UT}
)

#: Code Sequence Macro attributes holding coding-scheme vocabulary, not free text.
CODED_VOCABULARY_TAGS: frozenset[int] = frozenset(
    {0x00080100, 0x00080102, 0x00080103, 0x0008010F, 0x00080105, 0x00080119, 0x00080120}
)

_PN_SPLIT = re.compile(r"[\^=]")

#: Attributes whose values are identifiers (keyword → tag), read at the top level.
_ID_TAGS: dict[str, int] = {
    "PatientID": 0x00100020,
    "OtherPatientIDs": 0x00101000,
    "AccessionNumber": 0x00080050,
    "PatientBirthDate": 0x00100030,
    "InstitutionName": 0x00080080,
}
_PATIENT_NAME = 0x00100010
_OTHER_PATIENT_IDS_SEQUENCE = 0x00101002
_PRODUCT_TAGS = (0x00080070, 0x00081090, 0x00181020)
_UID_TAGS: dict[str, int] = {
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}


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


def _name_components(value: object) -> Iterator[str]:
    for name in _strings(value):
        for part in _PN_SPLIT.split(name):
            stripped = part.strip()
            if len(stripped) >= MIN_LENGTH:
                yield stripped


def _word_pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    return _compiled_word_pattern(tuple(sorted(set(values), key=lambda v: (-len(v), v))))


@lru_cache(maxsize=1024)
def _compiled_word_pattern(ordered: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern per set of values: the instances of a series share their patient's."""
    if not ordered:
        return None
    body = "|".join(re.escape(v) for v in ordered)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _identifying(ds: Dataset, kept: frozenset[int]) -> Iterator[tuple[str, str]]:
    """``(value, keyword)`` of every identifying value at the top level of ``ds``."""
    if _PATIENT_NAME not in kept and (elem := ds.get(_PATIENT_NAME)) is not None:
        for part in _name_components(elem.value):
            yield part, "PatientName"
    for keyword, tag in (*_ID_TAGS.items(), *_UID_TAGS.items()):
        if tag not in kept and (elem := ds.get(tag)) is not None:
            for text in _strings(elem.value):
                if value := text.strip("\x00 "):
                    yield value, keyword
    seq = ds.get(_OTHER_PATIENT_IDS_SEQUENCE)
    if _OTHER_PATIENT_IDS_SEQUENCE in kept or seq is None or seq.VR != VR.SQ:
        return
    for item in seq.value:
        if (elem := item.get(_ID_TAGS["PatientID"])) is not None:
            for text in _strings(elem.value):
                if value := text.strip("\x00 "):
                    yield value, "OtherPatientIDsSequence"


@dataclass(frozen=True, slots=True)
class IdentifyingValues:
    """Identifying values of one instance (never logged, never put in a message)."""

    uids: Mapping[str, str]  # original UID → keyword
    words: Mapping[str, str]  # casefolded value → keyword
    pattern: re.Pattern[str] | None
    scrub_pattern: re.Pattern[str] | None

    @classmethod
    def collect(
        cls, ds: Dataset, kept: frozenset[int], person_name_tags: Iterable[int] = ()
    ) -> IdentifyingValues:
        """Read the identifying values of ``ds`` (top level); skip attributes in ``kept``.

        ``person_name_tags`` are the PN attributes whose name components are also scrubbed
        from cleaned text (not searched by the self-check).
        """
        words: dict[str, str] = {}
        uids: dict[str, str] = {}
        for value, keyword in _identifying(ds, kept):
            folded = value.casefold()
            if keyword in _UID_TAGS:
                uids[value] = keyword  # searched as substrings of text, not in the pattern
                continue
            if len(value) >= MIN_LENGTH and folded not in STRING_DUMMIES:
                words.setdefault(folded, keyword)
        product = "\n".join(
            text
            for tag in _PRODUCT_TAGS
            if (elem := ds.get(tag)) is not None
            for text in _strings(elem.value)
        )
        if product:
            words = {
                w: k
                for w, k in words.items()
                if k in _UID_TAGS or not re.search(rf"(?<!\w){re.escape(w)}(?!\w)", product, re.I)
            }
        scrub_words = set(words)
        for tag in person_name_tags:
            if (elem := ds.get(tag)) is not None and elem.VR == VR.PN:
                scrub_words.update(p.casefold() for p in _name_components(elem.value))
        return cls(
            uids=uids,
            words=words,
            pattern=_word_pattern(words),
            scrub_pattern=_word_pattern(scrub_words),
        )

    def find(self, vr: str, value: object) -> str | None:
        """Keyword of an identifying value that survives in ``value`` (of VR ``vr``), or None."""
        if vr == VR.UI:
            for text in _strings(value):
                keyword = self.uids.get(text.strip("\x00 "))
                if keyword is not None:
                    return keyword
            return None
        if vr not in TEXT_VRS:
            return None
        for text in _strings(value):
            if text.casefold() in STRING_DUMMIES:
                continue
            for uid, keyword in self.uids.items():
                if uid in text:
                    return keyword
            if self.pattern is None:
                continue
            match = self.pattern.search(text)
            if match is not None:
                return self.words.get(match.group(0).casefold(), "identifying value")
        return None

    def scrub(self, text: str) -> str:
        """``text`` without any identifying value or top-level person name component."""
        if self.scrub_pattern is None:
            return text
        return " ".join(self.scrub_pattern.sub(" ", text).split())

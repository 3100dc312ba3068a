"""Action codes of PS3.15 Table E.1-1, their resolution by attribute Type, and dummy values.

Compound codes are resolved from the attribute's Type in the IOD of the instance's SOP Class
(keyword path including the parent sequences):

* Type 1 / 1C → D (U for ``X/Z/U*``): the attribute must stay and have a value;
* Type 2 / 2C → Z: it must stay, and may be empty;
* Type 3, or not in the IOD → X.

When the code does not offer the preferred letter the next one that keeps the instance
conformant is used (``X/D`` for a Type 2 attribute → D, ``Z/D`` for a Type 3 → Z, plain ``Z``
for a Type 1 → D, since a Type 1 attribute cannot be empty).

**X/Z/U*** (Referenced Image Sequence, Source Image Sequence) is always resolved to U: the
references are kept with their UIDs replaced consistently. The code allows any of its letters;
U is as safe as X (a mapped UID identifies nothing) and keeps every Type, condition and
cross-reference conformant — removing a Source Image Sequence nested in a functional group
makes validators report a Referenced Series Sequence that references nothing.

**Unknown SOP Classes** (not in the shipped IOD data): the Type is unknown, so the engine takes
Z wherever the code offers it (``X/Z``, ``X/Z/D``, ``Z/D`` (e.g. Patient ID), ``X/Z/U*``, ``Z``
→ Z) and D otherwise (``X/D`` → D). Z is conformant for Type 2 and 3 attributes and carries no
value at all; D is conformant for every Type.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache

from pydicom.datadict import dictionary_VM
from pydicom.valuerep import VR


class ActionCode(StrEnum):
    """The single-letter action codes of PS3.15 Table E.1-1."""

    X = "X"  # remove
    Z = "Z"  # replace with a zero-length value
    D = "D"  # replace with a non-zero-length dummy value
    K = "K"  # keep
    C = "C"  # clean
    U = "U"  # replace the UID, consistently within the set of instances


_MUST_HAVE_VALUE = frozenset({"1", "1C"})
_PREFERENCE: dict[str | None, tuple[str, ...]] = {
    "1": ("D", "U", "Z", "X"),
    "1C": ("D", "U", "Z", "X"),
    "2": ("Z", "D", "U", "X"),
    "2C": ("Z", "D", "U", "X"),
    "3": ("X", "Z", "D", "U"),
    None: ("X", "Z", "D", "U"),  # not in the IOD
}
_UNKNOWN_IOD_PREFERENCE = ("Z", "D", "U", "X")

#: Sentinel Type meaning "the SOP Class is not in the IOD data".
UNKNOWN_IOD = "?"


def resolve(code: str, type_: str | None) -> ActionCode:
    """Resolve a (possibly compound) Basic Profile code for an attribute of Type ``type_``.

    ``type_`` is ``"1"``, ``"1C"``, ``"2"``, ``"2C"``, ``"3"``, ``None`` (the attribute is
    not in the IOD) or :data:`UNKNOWN_IOD`. Only Z and the compound codes depend on it; a
    plain X, D, U, K or C is returned as it is.
    """
    letters = code.replace("*", "").split("/")
    if "U" in letters:
        return ActionCode.U  # X/Z/U*: keep the references, UIDs replaced (module docstring)
    if len(letters) == 1:
        chosen = letters[0]
    else:
        preference = _UNKNOWN_IOD_PREFERENCE if type_ == UNKNOWN_IOD else _PREFERENCE[type_]
        chosen = next(letter for letter in preference if letter in letters)
    if chosen == "Z" and type_ in _MUST_HAVE_VALUE:
        chosen = "D"  # a Type 1 attribute cannot be zero-length
    return ActionCode(chosen)


_TEXT_DUMMY = "ANONYMIZED"

#: Dummy value of one value of each VR: valid for the VR and free of identifying content.
DUMMY_BY_VR: dict[str, object] = {
    VR.AE: "ANONYMOUS",
    VR.AS: "000Y",
    VR.CS: _TEXT_DUMMY,
    VR.DA: "19000101",
    VR.DS: "0",
    VR.DT: "19000101000000",
    VR.IS: "0",
    VR.LO: _TEXT_DUMMY,
    VR.LT: _TEXT_DUMMY,
    VR.PN: "ANONYMOUS",
    VR.SH: _TEXT_DUMMY,
    VR.ST: _TEXT_DUMMY,
    VR.TM: "000000",
    VR.UC: _TEXT_DUMMY,
    VR.UR: "urn:uuid:00000000-0000-0000-0000-000000000000",
    VR.UT: _TEXT_DUMMY,
    VR.AT: 0,
    VR.FL: 0.0,
    VR.FD: 0.0,
    VR.SL: 0,
    VR.SS: 0,
    VR.SV: 0,
    VR.UL: 0,
    VR.US: 0,
    VR.UV: 0,
    VR.OB: b"\x00\x00",
    VR.OD: b"\x00" * 8,
    VR.OF: b"\x00" * 4,
    VR.OL: b"\x00" * 4,
    VR.OV: b"\x00" * 8,
    VR.OW: b"\x00\x00",
    VR.UN: b"\x00\x00",
}

#: Dummies for attributes whose CS has a restricted set of values (defined terms).
DUMMY_BY_KEYWORD: dict[str, object] = {
    "ReasonForTheAttributeModification": "COERCE",
    "CodingSchemeDesignator": "99ANONPROXY",  # a dummy code: a private coding scheme (PS3.16)
}

#: Every string dummy; values equal to one of these are not identifying (self-check skips them).
STRING_DUMMIES: frozenset[str] = frozenset(
    v.casefold() for v in (*DUMMY_BY_VR.values(), *DUMMY_BY_KEYWORD.values()) if isinstance(v, str)
)


@lru_cache(maxsize=1024)
def minimum_vm(tag: int) -> int:
    """The smallest number of values the dictionary VM of ``tag`` allows (1 if unknown)."""
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return 1
    head = vm.split("-", 1)[0].rstrip("n") or "1"
    return int(head) if head.isdigit() else 1


def dummy_value(tag: int, vr: str, keyword: str) -> object:
    """A dummy value for ``tag`` valid for its VR and VM; KeyError if the VR has none (SQ)."""
    value = DUMMY_BY_KEYWORD.get(keyword, DUMMY_BY_VR[vr])
    count = minimum_vm(tag)
    if count > 1 and not isinstance(value, bytes):
        return [value] * count
    return value

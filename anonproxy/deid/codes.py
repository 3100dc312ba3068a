"""The codes of CID 7050 "De-identification Method" (PS3.16) the engine writes into
De-identification Method Code Sequence (0012,0064): the Basic Application Level
Confidentiality Profile and its options; and the other fixed values it writes into every
instance (:data:`WRITTEN_VALUES`).

Written out here (code value, scheme, meaning as PS3.16 and pydicom's ``codes.DCM`` give
them; tests/deid/test_codes.py compares them) rather than looked up in pydicom's code
dictionary: importing ``pydicom.sr`` loads every concept of PS3.16 (40-60 ms a process, about
what the engine's own modules take), and ``anonproxy deidentify`` would pay it at each start.
"""

from __future__ import annotations

from typing import NamedTuple


class Code(NamedTuple):
    """A coded concept: what a Code Sequence item holds (Code Value, Coding Scheme Designator,
    Code Meaning)."""

    value: str
    scheme_designator: str
    meaning: str


BASIC_PROFILE = Code("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA = Code("113101", "DCM", "Clean Pixel Data Option")
CLEAN_GRAPHICS = Code("113103", "DCM", "Clean Graphics Option")
CLEAN_STRUCTURED_CONTENT = Code("113104", "DCM", "Clean Structured Content Option")
CLEAN_DESCRIPTORS = Code("113105", "DCM", "Clean Descriptors Option")
RETAIN_LONGITUDINAL_FULL_DATES = Code(
    "113106", "DCM", "Retain Longitudinal Temporal Information Full Dates Option"
)
RETAIN_LONGITUDINAL_MODIFIED_DATES = Code(
    "113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"
)
RETAIN_PATIENT_CHARACTERISTICS = Code("113108", "DCM", "Retain Patient Characteristics Option")
RETAIN_DEVICE_IDENTITY = Code("113109", "DCM", "Retain Device Identity Option")
RETAIN_UIDS = Code("113110", "DCM", "Retain UIDs Option")
RETAIN_SAFE_PRIVATE = Code("113111", "DCM", "Retain Safe Private Option")
RETAIN_INSTITUTION_IDENTITY = Code("113112", "DCM", "Retain Institution Identity Option")

#: Patient Identity Removed (0012,0062)
PATIENT_IDENTITY_REMOVED = "YES"
#: Longitudinal Temporal Information Modified (0028,0303): dates kept, shifted, or removed
DATES_UNMODIFIED, DATES_MODIFIED, DATES_REMOVED = "UNMODIFIED", "MODIFIED", "REMOVED"
#: The first value of De-identification Method (0012,0063), and the one of the strict profile
METHOD_BY, METHOD_STRICT = "anonproxy", "strict allow-list of public attributes"

#: What the engine writes into every instance whatever the instance holds: the codes and the
#: values above. An identifying value equal to one of them is not looked for in the output
#: (:mod:`anonproxy.deid.selfcheck`): a Patient ID "YES" is found again in Patient Identity
#: Removed, where the engine put its own word.
WRITTEN_VALUES: frozenset[str] = frozenset(
    text.casefold()
    for name, value in list(globals().items())
    if not name.startswith("_")
    for text in (value if isinstance(value, Code) else (value,) if isinstance(value, str) else ())
)

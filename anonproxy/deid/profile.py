"""The de-identification profile: PS3.15 Basic Application Confidentiality Profile + options.

A :class:`Profile` is valid once constructed. It computes, for every row of Table E.1-1, the
*effective code*: the Basic Profile code, overridden by the code of any enabled option that has
a code in that row. When several enabled options give a code for the same row, ``C`` (clean)
wins over ``K`` (keep), the more protective of the two; this only happens for device dates,
where Retain Device Identity says K and Retain ... Modified Dates says C. Enabling both
longitudinal options (full dates and modified dates) is a contradiction and raises ValueError.

Compound codes (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) stay compound here; the
engine resolves them per instance from the attribute's Type in the IOD of its SOP Class.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from anonproxy.deid.tables import TableRow, table_e1_1


class ProfileOption(StrEnum):
    """The options of PS3.15 Table E.1-1; values are CID 7050 keywords in snake_case."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    RETAIN_UIDS = "retain_uids"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES = (
        "retain_longitudinal_temporal_information_full_dates"
    )
    RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES = (
        "retain_longitudinal_temporal_information_modified_dates"
    )
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"

    @property
    def code(self) -> Code:
        """The CID 7050 code of the option (De-identification Method Code Sequence)."""
        return _OPTION_CODES[self]


_OPTION_CODES: dict[ProfileOption, Code] = {
    ProfileOption.RETAIN_SAFE_PRIVATE: codes.DCM.RetainSafePrivateOption,
    ProfileOption.RETAIN_UIDS: codes.DCM.RetainUidsOption,
    ProfileOption.RETAIN_DEVICE_IDENTITY: codes.DCM.RetainDeviceIdentityOption,
    ProfileOption.RETAIN_INSTITUTION_IDENTITY: codes.DCM.RetainInstitutionIdentityOption,
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: codes.DCM.RetainPatientCharacteristicsOption,
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES: (
        codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption
    ),
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES: (
        codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption
    ),
    ProfileOption.CLEAN_DESCRIPTORS: codes.DCM.CleanDescriptorsOption,
    ProfileOption.CLEAN_STRUCTURED_CONTENT: codes.DCM.CleanStructuredContentOption,
    ProfileOption.CLEAN_GRAPHICS: codes.DCM.CleanGraphicsOption,
}

BASIC_PROFILE_CODE: Code = codes.DCM.BasicApplicationConfidentialityProfile

_OPTION_ORDER = tuple(ProfileOption)


def effective_code(row: TableRow, options: Iterable[ProfileOption]) -> str:
    """The code of ``row`` under the Basic Profile with ``options`` enabled."""
    option_codes = {code for o in options if (code := row.option_code(o.value)) is not None}
    if "C" in option_codes:
        return "C"
    if "K" in option_codes:
        return "K"
    return row.basic


@dataclass(frozen=True)
class Profile:
    """Basic Application Confidentiality Profile with a set of options (immutable).

    ``strict`` additionally removes every public attribute that Table E.1-1 does not name and
    that is not in the shipped allow-list (``_standard/strict_allowlist.json``).
    """

    options: frozenset[ProfileOption] = frozenset()
    strict: bool = False
    _tag_codes: Mapping[int, str] = field(init=False, repr=False, compare=False)
    _mask_codes: tuple[tuple[int, int, str], ...] = field(init=False, repr=False, compare=False)
    _private_code: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        options = frozenset(ProfileOption(o) for o in self.options)
        object.__setattr__(self, "options", options)
        if {
            ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES,
            ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES,
        } <= options:
            raise ValueError(
                "options retain_longitudinal_temporal_information_full_dates and "
                "retain_longitudinal_temporal_information_modified_dates exclude each other"
            )
        tag_codes: dict[int, str] = {}
        masks: list[tuple[int, int, str]] = []
        private_code = "X"
        for row in table_e1_1():
            code = effective_code(row, options)
            if row.match == "tag":
                tag_codes[row.value] = code
            elif row.match == "mask":
                masks.append((row.mask, row.value, code))
            else:
                private_code = code
        object.__setattr__(self, "_tag_codes", MappingProxyType(tag_codes))
        object.__setattr__(self, "_mask_codes", tuple(masks))
        object.__setattr__(self, "_private_code", private_code)

    @classmethod
    def from_options(cls, options: Iterable[str], *, strict: bool = False) -> Profile:
        """Build a profile from CID 7050 snake_case option names; ``[]`` is the Basic Profile.

        Raises ValueError naming the first unknown option.
        """
        parsed: set[ProfileOption] = set()
        for name in options:
            try:
                parsed.add(ProfileOption(name))
            except ValueError:
                known = ", ".join(o.value for o in ProfileOption)
                raise ValueError(f"unknown profile option {name!r}; known: {known}") from None
        return cls(options=frozenset(parsed), strict=strict)

    @property
    def ordered_options(self) -> tuple[ProfileOption, ...]:
        """The enabled options in the standard's column order."""
        return tuple(o for o in _OPTION_ORDER if o in self.options)

    @property
    def tag_codes(self) -> Mapping[int, str]:
        """Effective code per exact tag of Table E.1-1 (read-only)."""
        return self._tag_codes

    def mask_code(self, tag: int) -> str | None:
        """Effective code of the repeating-group rows (50xx,xxxx), (60xx,3000), (60xx,4000)."""
        group = tag >> 16
        if group & 1 or not 0x5000 <= group <= 0x60FF:
            return None
        for mask, value, code in self._mask_codes:
            if tag & mask == value:
                return code
        return None

    @property
    def private_code(self) -> str:
        """Effective code of the private attributes row: X, or C under Retain Safe Private."""
        return self._private_code

    def describe(self) -> Iterator[tuple[str, str, str]]:
        """``(tag, name, effective code)`` for every row of Table E.1-1, in the table's order.

        Compound codes are shown unresolved: they depend on the IOD of each instance.
        """
        for row in table_e1_1():
            yield row.tag, row.name, effective_code(row, self.options)

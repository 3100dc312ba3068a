"""The de-identification profile: PS3.15 Basic Application Confidentiality Profile + options.

A :class:`Profile` is valid once constructed. It computes, for every row of Table E.1-1, the
*effective code*: the Basic Profile code, overridden by the code of any enabled option that has
a code in that row. When several enabled options give a code for the same row, ``C`` (clean)
wins over ``K`` (keep), the more protective of the two; this only happens for device dates,
where Retain Device Identity says K and Retain ... Modified Dates says C. Enabling both
longitudinal options (full dates and modified dates) is a contradiction and raises ValueError.

Compound codes (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) stay compound here; the
engine resolves them per instance from the attribute's Type in the IOD of its SOP Class.

On top of the table a profile carries the user's **rules** (:mod:`anonproxy.deid.rules`, applied
first, in order, first match wins) and the **patient pseudonyms** settings
(:mod:`anonproxy.deid.pseudonyms`, applied next to Patient ID and Patient's Name); the table
comes last. **Presets** (:data:`PRESETS`) are the option names other tools use (``CleanDesc``,
``RetainUIDs``, ...); they map to option sets and combine with ``options`` by union.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal, get_args

from anonproxy.deid import codes
from anonproxy.deid.burned_in import CleanPixelData, parse_keep_regions
from anonproxy.deid.codes import Code
from anonproxy.deid.documents import EncapsulatedDocumentPolicy, VideoPolicy
from anonproxy.deid.pixels import PixelRule, Region, parse_pixel_rules
from anonproxy.deid.pseudonyms import PatientPseudonyms
from anonproxy.deid.rules import Rule, parse_rules
from anonproxy.deid.tables import TableRow, table_e1_1

_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_PSEUDONYM_TAGS = (_PATIENT_ID, _PATIENT_NAME)

#: What happens to an instance whose Burned In Annotation (0028,0301) is YES: ``reject`` (it is
#: refused before de-identification: Table E.1-1 does not act on the text in its pixels) or
#: ``pass`` (de-identified as any other).
BurnedInAnnotationPolicy = Literal["reject", "pass"]


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
    ProfileOption.RETAIN_SAFE_PRIVATE: codes.RETAIN_SAFE_PRIVATE,
    ProfileOption.RETAIN_UIDS: codes.RETAIN_UIDS,
    ProfileOption.RETAIN_DEVICE_IDENTITY: codes.RETAIN_DEVICE_IDENTITY,
    ProfileOption.RETAIN_INSTITUTION_IDENTITY: codes.RETAIN_INSTITUTION_IDENTITY,
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: codes.RETAIN_PATIENT_CHARACTERISTICS,
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES: (
        codes.RETAIN_LONGITUDINAL_FULL_DATES
    ),
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES: (
        codes.RETAIN_LONGITUDINAL_MODIFIED_DATES
    ),
    ProfileOption.CLEAN_DESCRIPTORS: codes.CLEAN_DESCRIPTORS,
    ProfileOption.CLEAN_STRUCTURED_CONTENT: codes.CLEAN_STRUCTURED_CONTENT,
    ProfileOption.CLEAN_GRAPHICS: codes.CLEAN_GRAPHICS,
}

BASIC_PROFILE_CODE: Code = codes.BASIC_PROFILE

#: Named presets (the option names known from other de-identification tools) → option sets.
PRESETS: Mapping[str, frozenset[ProfileOption]] = MappingProxyType(
    {
        "BasicProfile": frozenset(),
        "RetainSafePrivate": frozenset({ProfileOption.RETAIN_SAFE_PRIVATE}),
        "RetainUIDs": frozenset({ProfileOption.RETAIN_UIDS}),
        "RetainDeviceIdent": frozenset({ProfileOption.RETAIN_DEVICE_IDENTITY}),
        "RetainInstitutionIdent": frozenset({ProfileOption.RETAIN_INSTITUTION_IDENTITY}),
        "RetainPatientChars": frozenset({ProfileOption.RETAIN_PATIENT_CHARACTERISTICS}),
        "RetainLongFullDates": frozenset(
            {ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES}
        ),
        "RetainLongModifDates": frozenset(
            {ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES}
        ),
        "CleanDesc": frozenset({ProfileOption.CLEAN_DESCRIPTORS}),
        "CleanStructdCont": frozenset({ProfileOption.CLEAN_STRUCTURED_CONTENT}),
        "CleanGraph": frozenset({ProfileOption.CLEAN_GRAPHICS}),
    }
)


def preset_options(presets: Iterable[str]) -> frozenset[ProfileOption]:
    """The union of the options of ``presets``; ValueError naming an unknown one (and listing
    the known names)."""
    options: set[ProfileOption] = set()
    for name in presets:
        preset = PRESETS.get(name)
        if preset is None:
            known = ", ".join(PRESETS)
            raise ValueError(f"unknown preset {name!r}; known: {known}")
        options |= preset
    return frozenset(options)


def parse_options(options: Iterable[str]) -> frozenset[ProfileOption]:
    """CID 7050 snake_case option names → options; ValueError naming the first unknown one."""
    parsed: set[ProfileOption] = set()
    for name in options:
        try:
            parsed.add(ProfileOption(name))
        except ValueError:
            known = ", ".join(o.value for o in ProfileOption)
            raise ValueError(f"unknown profile option {name!r}; known: {known}") from None
    return frozenset(parsed)


def check_option_set(options: Iterable[ProfileOption]) -> None:
    """ValueError if the options contradict each other (both longitudinal options)."""
    if {
        ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES,
        ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES,
    } <= set(options):
        raise ValueError(
            "options retain_longitudinal_temporal_information_full_dates and "
            "retain_longitudinal_temporal_information_modified_dates exclude each other"
        )


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
    that is not in the shipped allow-list (``_standard/strict_allowlist.json``). ``rules`` are
    the user's rules in precedence order (:class:`~anonproxy.deid.rules.Rule`); ``patient_ids``
    the patient pseudonym settings (None: the table's actions for Patient ID and Name).
    ``burned_in_annotation`` is the policy for instances that declare Burned In Annotation YES
    (:data:`BurnedInAnnotationPolicy`), ``encapsulated_documents`` and ``video`` those for
    encapsulated documents and video transfer syntaxes (:mod:`anonproxy.deid.documents`);
    ``pixel_rules`` the regions of burned-in text to blank (:mod:`anonproxy.deid.pixels`);
    ``clean_pixel_data`` what OCR blanks in the images triage sends to it, and
    ``pixel_keep_regions`` where ``all_text`` keeps text (:mod:`anonproxy.deid.burned_in`); they
    are applied to instance files (:func:`anonproxy.deid.instance.deidentify_file`).
    """

    options: frozenset[ProfileOption] = frozenset()
    strict: bool = False
    rules: tuple[Rule, ...] = ()
    patient_ids: PatientPseudonyms | None = None
    burned_in_annotation: BurnedInAnnotationPolicy = "reject"
    encapsulated_documents: EncapsulatedDocumentPolicy = "reject"
    video: VideoPolicy = "reject"
    pixel_rules: tuple[PixelRule, ...] = ()
    clean_pixel_data: CleanPixelData = "identifying"
    pixel_keep_regions: tuple[Region | str, ...] = ()
    _tag_codes: Mapping[int, str] = field(init=False, repr=False, compare=False)
    _mask_codes: tuple[tuple[int, int, str], ...] = field(init=False, repr=False, compare=False)
    _private_code: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        options = frozenset(ProfileOption(o) for o in self.options)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "rules", parse_rules(self.rules))
        object.__setattr__(self, "pixel_rules", parse_pixel_rules(self.pixel_rules))
        object.__setattr__(
            self, "pixel_keep_regions", parse_keep_regions(list(self.pixel_keep_regions))
        )
        check_option_set(options)
        for name, policy in (
            ("burned_in_annotation", BurnedInAnnotationPolicy),
            ("encapsulated_documents", EncapsulatedDocumentPolicy),
            ("video", VideoPolicy),
            ("clean_pixel_data", CleanPixelData),
        ):
            if getattr(self, name) not in get_args(policy):
                raise ValueError(f"{name} is {' or '.join(get_args(policy))}")
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
    def from_options(
        cls,
        options: Iterable[str],
        *,
        strict: bool = False,
        presets: Iterable[str] = (),
        rules: Iterable[Mapping[str, object] | Rule] = (),
        patient_ids: PatientPseudonyms | None = None,
        burned_in_annotation: BurnedInAnnotationPolicy = "reject",
        encapsulated_documents: EncapsulatedDocumentPolicy = "reject",
        video: VideoPolicy = "reject",
        pixel_rules: Iterable[Mapping[str, object] | PixelRule] = (),
        clean_pixel_data: CleanPixelData = "identifying",
        pixel_keep_regions: Iterable[str | Region] = (),
    ) -> Profile:
        """Build a profile from CID 7050 snake_case option names; ``[]`` is the Basic Profile.

        ``presets`` add their options (union); ``rules`` are mappings in the YAML form
        (``{"keyword": "StudyDescription", "action": "keep"}``) or :class:`Rule` objects.
        Raises ValueError naming the first unknown option or preset, or the first bad rule.
        """
        parsed = parse_options(options) | preset_options(presets)
        return cls(
            options=parsed,
            strict=strict,
            rules=parse_rules(rules),
            patient_ids=patient_ids,
            burned_in_annotation=burned_in_annotation,
            encapsulated_documents=encapsulated_documents,
            video=video,
            pixel_rules=parse_pixel_rules(list(pixel_rules)),
            clean_pixel_data=clean_pixel_data,
            pixel_keep_regions=tuple(pixel_keep_regions),
        )

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

    def rule_for(self, tag: int, creator: str | None = None) -> Rule | None:
        """The user rule that selects ``tag`` (first in order), or None."""
        for rule in self.rules:
            if rule.matches(tag, creator):
                return rule
        return None

    def describe(self) -> Iterator[tuple[str, str, str]]:
        """``(tag, name, effective action)`` for every row of Table E.1-1, in the table's order.

        The action is the profile's code (compound codes unresolved: they depend on the IOD of
        each instance); ``rule:<action>`` when the first user rule touching the row selects all
        of it; ``<code>, partly rule:<action>`` when rules select only part of a mask row or of
        the private attributes; ``pseudonym:<method>`` for Patient ID and Patient's Name when
        patient pseudonyms are configured (and no rule selects them). The user rules
        themselves, including those on attributes outside the table, are listed by
        :meth:`describe_rules`.
        """
        for row in table_e1_1():
            code = effective_code(row, self.options)
            if row.match == "private":
                partial = sorted({r.action.value for r in self.rules if r.is_private})
                if partial:
                    code = f"{code}, partly rule:{'/'.join(partial)}"
                yield row.tag, row.name, code
                continue
            mask = 0xFFFFFFFF if row.match == "tag" else row.mask
            for rule in self.rules:
                if rule.covers(row.value, mask):
                    code = f"rule:{rule.action.value}"
                    break
                if rule.overlaps(row.value, mask):
                    code = f"{code}, partly rule:{rule.action.value}"
                    break
            else:
                if self.patient_ids is not None and row.value in _PSEUDONYM_TAGS:
                    code = self.patient_ids.describe()
            yield row.tag, row.name, code

    def describe_rules(self) -> Iterator[tuple[str, str, str]]:
        """``(selector, name, rule:<action>)`` for every user rule, in precedence order (the
        first rule that selects an attribute wins)."""
        for rule in self.rules:
            yield rule.selector, rule.describe_name(), f"rule:{rule.action.value}"

"""User rules: per-attribute actions that override the profile (``profile.rules`` in YAML).

A rule selects attributes by exactly one of:

* ``keyword`` — a keyword of the data dictionary (``StudyDescription``); the keyword of a
  repeating-group attribute (``OverlayData``) selects the whole group range, like its mask;
* ``tag`` — ``"(0008,1030)"`` (also ``"0008,1030"``, ``"00081030"``, ``"0x00081030"``);
* ``tag_mask`` — a tag where ``x`` stands for any hex digit: ``"(0009,xx10)"``, ``"(50xx,xxxx)"``;
* ``private_creator`` + ``element`` (+ optional ``group``) — the private data elements
  ``(gggg,xxEE)`` whose block ``xx`` is reserved by that private creator (compared after
  stripping padding, case-sensitive). ``element`` is the low byte ``EE``: an integer (YAML
  ``0x10`` is 16) or a hex string (``"0x10"``, ``"10"``, ``"xx10"``).

and has an ``action``:

=================  =================================================================================
``keep``           keep the value (sequences: kept, their items still de-identified)
``remove``         delete the attribute
``empty``          zero-length value (an empty sequence for SQ), whatever the attribute's Type
``dummy``          the engine's dummy for the VR (as action D; UI values are mapped, SQ walked)
``replace``        the string ``value`` (``\\`` separates values; converted for numeric VRs)
``hash``           keyed HMAC-SHA256 of each value, rendered for the VR: upper-case hex, 16
                   digits (64 bits) for AE, CS, SH and 32 (128 bits) for LO, PN, ST, LT, UT,
                   UC; ``2.25.<int>`` (128 bits) for UI (the same mapping as action U); a
                   number for IS (30 bits) and DS (43 bits), VRs that cannot hold 64 bits
``shift_date``     DA and DT shifted by the per-patient offset of the modified-dates option; TM
                   kept (times of day are not shifted)
``regex_replace``  ``re.sub(pattern, replacement, value)`` on each value
=================  =================================================================================

**Precedence.** User rules come first, in file order, and the *first* rule that selects an
attribute wins; a more specific selector does *not* take precedence over an earlier, broader
one (put exceptions before the general rule). Then the patient pseudonyms (Patient ID and
Patient's Name at the top level), then the profile (options over the Basic Profile). A rule on
a private attribute overrides the private-attribute removal; the private creator element of a
block is kept when any element of its block is kept.

**Scope.** Rules apply at every nesting depth to public attributes and to private *data*
elements ``(gggg,1000-FFFF)``. They never apply to group lengths ``(gggg,0000)``, to private
creator elements ``(gggg,0010-00FF)`` (kept exactly when their block keeps an element), nor to
the file meta information (group 0002); a ``tag`` or ``keyword`` rule naming one of those is a
configuration error. Patient Identity Removed and the De-identification Method attributes are
set after the rules.

**Fallback.** A value the action cannot be applied to (e.g. ``hash`` of binary data or of a
date, ``shift_date`` of a text, ``replace`` of a sequence) is *removed*, never kept. A
``replace`` or ``regex_replace`` result that is not valid for the VR rejects the instance with
an error naming the rule and the attribute.

The self-check keeps running: only a ``keep`` rule on one of the identifying attributes
(Patient's Name, Patient ID, ...) takes that attribute's value out of the self-check, as the
profile's K does; values written by any rule are searched like every other value.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

import pydicom.datadict
from pydicom.datadict import keyword_for_tag, tag_for_keyword


class RuleAction(StrEnum):
    """What a user rule does to the attributes it selects."""

    KEEP = "keep"
    REMOVE = "remove"
    EMPTY = "empty"
    DUMMY = "dummy"
    REPLACE = "replace"
    HASH = "hash"
    SHIFT_DATE = "shift_date"
    REGEX_REPLACE = "regex_replace"


_TAG_RE = re.compile(r"\(?\s*(?:0x)?([0-9a-fx]{4})\s*,?\s*([0-9a-fx]{4})\s*\)?", re.IGNORECASE)
_ELEMENT_RE = re.compile(r"(?:0x|xx)?([0-9a-f]{1,2})", re.IGNORECASE)
_GROUP_RE = re.compile(r"(?:0x)?([0-9a-f]{1,4})", re.IGNORECASE)
_FULL_MASK = 0xFFFFFFFF


def _split_tag(text: str, *, allow_x: bool) -> tuple[int, int]:
    """``(value, mask)`` of a tag written ``(gggg,eeee)``; ValueError naming the syntax."""
    m = _TAG_RE.fullmatch(text.strip())
    if m is None:
        msg = "a tag is written (gggg,eeee) with 4 hex digits each" + (
            ", x for any digit" if allow_x else ""
        )
        raise ValueError(msg)
    digits = m[1] + m[2]
    if "x" in digits.lower() and not allow_x:
        raise ValueError("x (any digit) is only allowed in tag_mask")
    value = int(re.sub("[xX]", "0", digits), 16)
    mask = int("".join("0" if c in "xX" else "F" for c in digits), 16)
    return value, mask


def parse_tag(text: str) -> int:
    """The tag written ``"(gggg,eeee)"`` (also ``gggg,eeee``, ``ggggeeee``, ``0xggggeeee``)."""
    return _split_tag(text, allow_x=False)[0]


def parse_tag_mask(text: str) -> tuple[int, int]:
    """``(value, mask)`` of ``"(gggg,eeee)"`` where ``x`` is any hex digit."""
    return _split_tag(text, allow_x=True)


def parse_element(element: int | str) -> int:
    """The low byte of a private element: an integer, or hex text ``0x10`` / ``10`` / ``xx10``."""
    if isinstance(element, bool):
        raise ValueError("element must be a number from 0x00 to 0xFF")
    if isinstance(element, int):
        number = element
    else:
        m = _ELEMENT_RE.fullmatch(element.strip())
        if m is None:
            raise ValueError("element is a hex byte such as 0x10 (or xx10)")
        number = int(m[1], 16)
    if not 0 <= number <= 0xFF:
        raise ValueError("element must be a number from 0x00 to 0xFF (the low byte)")
    return number


def parse_group(group: int | str) -> int:
    """An odd (private) group number, as an integer or hex text (``0x0029``, ``0029``)."""
    if isinstance(group, bool):
        raise ValueError("group must be an odd hex number such as 0x0029")
    if isinstance(group, int):
        number = group
    else:
        m = _GROUP_RE.fullmatch(group.strip())
        if m is None:
            raise ValueError("group is a hex number such as 0x0029")
        number = int(m[1], 16)
    if not (number & 1 and 0x0009 <= number <= 0xFFFF):
        raise ValueError("group must be a private (odd) group from 0x0009 to 0xFFFF")
    return number


@lru_cache(maxsize=1)
def _repeater_keywords() -> dict[str, str]:
    repeaters: dict[str, tuple[object, ...]] = getattr(pydicom.datadict, "RepeatersDictionary")  # noqa: B009
    return {str(entry[4]): key for key, entry in repeaters.items() if entry[4]}


def _keyword_selector(keyword: str) -> tuple[int, int]:
    tag = tag_for_keyword(keyword)
    if tag is not None:
        return tag, _FULL_MASK
    pattern = _repeater_keywords().get(keyword)
    if pattern is None:
        raise ValueError("keyword is not in the DICOM data dictionary")
    return parse_tag_mask(pattern)


def _check_selectable(value: int, mask: int) -> None:
    """Refuse exact selections the engine never hands to rules."""
    if mask != _FULL_MASK:
        if (value >> 16) == 0x0002 and (mask >> 16) == 0xFFFF:
            raise ValueError("rules do not apply to the file meta information (group 0002)")
        return
    group, element = value >> 16, value & 0xFFFF
    if group == 0x0002:
        raise ValueError("rules do not apply to the file meta information (group 0002)")
    if element == 0:
        raise ValueError("rules do not apply to group lengths (gggg,0000)")
    if group & 1 and element < 0x1000:
        raise ValueError(
            "rules do not apply to private creator elements; select the data elements of a "
            "block with private_creator and element"
        )


def _is_private_tag_only(value: int, mask: int) -> bool:
    return bool((mask >> 16) & 1 and (value >> 16) & 1)


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated user rule (immutable). Build it with :meth:`Rule.parse`."""

    index: int
    selector: str  # canonical text of the selector, for describe-profile
    action: RuleAction
    value: int = 0  # tag bits that must match (tag, keyword, tag_mask)
    mask: int = 0  # which bits of the tag are compared; 0 for private creator rules
    private_creator: str | None = None
    element: int = 0
    group: int | None = None
    replace_values: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    replacement: str = ""

    @classmethod
    def parse(cls, spec: Mapping[str, object], index: int = 0) -> Rule:
        """Validate one rule given as a mapping (the YAML form); ValueError says what is wrong.

        Messages never repeat the rule's ``value``, ``pattern`` or ``replacement`` (they may
        carry identifying text).
        """
        known = {
            "keyword", "tag", "tag_mask", "private_creator", "element", "group",
            "action", "value", "pattern", "replacement",
        }  # fmt: skip
        extra = sorted(set(spec) - known)
        if extra:
            raise ValueError(f"unknown rule key(s) {extra}")
        selectors = [k for k in ("keyword", "tag", "tag_mask", "private_creator") if spec.get(k)]
        if len(selectors) != 1:
            raise ValueError(
                "a rule selects by exactly one of keyword, tag, tag_mask, or private_creator "
                "with element"
            )
        kind = selectors[0]
        if kind != "private_creator" and (
            spec.get("element") is not None or spec.get("group") is not None
        ):
            raise ValueError("element and group go with private_creator only")
        try:
            action = RuleAction(str(spec.get("action")))
        except ValueError:
            known_actions = ", ".join(a.value for a in RuleAction)
            raise ValueError(f"unknown action; known: {known_actions}") from None
        fields = _action_fields(action, spec)
        if kind == "private_creator":
            creator = str(spec["private_creator"]).strip("\x00 ")
            if not creator or len(creator) > 64 or "\\" in creator:
                raise ValueError("private_creator is 1 to 64 characters without backslash")
            raw_element = spec.get("element")
            if not isinstance(raw_element, int | str):
                raise ValueError("private_creator needs element (the low byte, e.g. 0x10)")
            element = parse_element(raw_element)
            raw_group = spec.get("group")
            group = parse_group(raw_group) if isinstance(raw_group, int | str) else None
            shown = f"({group:04X}" if group is not None else "(gggg"
            return cls(
                index=index,
                selector=f"{shown},xx{element:02X}) {creator}",
                action=action,
                private_creator=creator,
                element=element,
                group=group,
                replace_values=fields[0],
                pattern=fields[1],
                replacement=fields[2],
            )
        text = str(spec[kind])
        if kind == "keyword":
            value, mask = _keyword_selector(text.strip())
        elif kind == "tag":
            value, mask = parse_tag(text), _FULL_MASK
        else:
            value, mask = parse_tag_mask(text)
        _check_selectable(value, mask)
        return cls(
            index=index,
            selector=_mask_text(value, mask),
            action=action,
            value=value,
            mask=mask,
            replace_values=fields[0],
            pattern=fields[1],
            replacement=fields[2],
        )

    @property
    def is_private(self) -> bool:
        """True when the rule can only select private attributes."""
        return self.private_creator is not None or _is_private_tag_only(self.value, self.mask)

    @property
    def exact_tag(self) -> int | None:
        """The single tag this rule selects, or None (mask or private creator rule)."""
        return self.value if self.private_creator is None and self.mask == _FULL_MASK else None

    def matches(self, tag: int, creator: str | None) -> bool:
        """True if the rule selects ``tag`` (``creator``: its private block's creator)."""
        if self.private_creator is None:
            return tag & self.mask == self.value
        return (
            creator == self.private_creator
            and bool((tag >> 16) & 1)
            and tag & 0xFF == self.element
            and (self.group is None or tag >> 16 == self.group)
        )

    def covers(self, value: int, mask: int) -> bool:
        """True if the rule selects every tag of the (mask) row ``value``/``mask``."""
        if self.private_creator is not None:
            return False
        return self.mask & ~mask == 0 and value & self.mask == self.value

    def overlaps(self, value: int, mask: int) -> bool:
        """True if the rule selects at least one tag of the row ``value``/``mask``."""
        if self.private_creator is not None:
            return False
        common = self.mask & mask
        return value & common == self.value & common

    def describe_name(self) -> str:
        """A short human description for describe-profile (no configured value)."""
        tag = self.exact_tag
        keyword = keyword_for_tag(tag) if tag is not None else ""
        label = keyword or self.selector
        return f"{label} (user rule {self.index})"


def _action_fields(
    action: RuleAction, spec: Mapping[str, object]
) -> tuple[tuple[str, ...], re.Pattern[str] | None, str]:
    """``(replace values, compiled pattern, replacement)`` of a rule's action."""
    value, pattern, replacement = spec.get("value"), spec.get("pattern"), spec.get("replacement")
    if action is RuleAction.REPLACE:
        if value is None or isinstance(value, dict | list | bool):
            raise ValueError("action replace needs value (a string)")
        if pattern is not None or replacement is not None:
            raise ValueError("pattern and replacement go with action regex_replace only")
        return tuple(str(value).split("\\")), None, ""
    if value is not None:
        raise ValueError("value goes with action replace only")
    if action is RuleAction.REGEX_REPLACE:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("action regex_replace needs pattern (a regular expression)")
        if replacement is None or not isinstance(replacement, str | int | float):
            raise ValueError("action regex_replace needs replacement (a string, may be empty)")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression in pattern: {exc.msg}") from None
        try:
            compiled.sub(str(replacement), "")
        except (re.error, IndexError) as exc:
            msg = str(getattr(exc, "msg", "bad group reference"))
            raise ValueError(f"invalid replacement: {msg}") from None
        return (), compiled, str(replacement)
    if pattern is not None or replacement is not None:
        raise ValueError("pattern and replacement go with action regex_replace only")
    return (), None, ""


def _mask_text(value: int, mask: int) -> str:
    digits = "".join(
        "x" if not (mask >> shift) & 0xF else f"{(value >> shift) & 0xF:X}"
        for shift in range(28, -4, -4)
    )
    return f"({digits[:4]},{digits[4:]})"


def parse_rules(specs: Iterable[Mapping[str, object] | Rule]) -> tuple[Rule, ...]:
    """Validate rules in order; ValueError prefixed with ``rule N:`` for the first bad one."""
    rules: list[Rule] = []
    for index, spec in enumerate(specs):
        if isinstance(spec, Rule):
            rules.append(spec if spec.index == index else _reindex(spec, index))
            continue
        try:
            rules.append(Rule.parse(spec, index))
        except ValueError as exc:
            raise ValueError(f"rule {index}: {exc}") from None
    return tuple(rules)


def _reindex(rule: Rule, index: int) -> Rule:
    from dataclasses import replace  # noqa: PLC0415 - rarely needed

    return replace(rule, index=index)


def first_match(rules: tuple[Rule, ...], tag: int, creator: str | None) -> Rule | None:
    """The first rule (file order) that selects ``tag``; None if no rule does."""
    for rule in rules:
        if rule.matches(tag, creator):
            return rule
    return None


# -- the hash action --------------------------------------------------------------------------

_HASH_KEY_LABEL = b"anonproxy:rule-hash:v1"
#: Maximum length of one value of the text VRs the hash action renders as hex.
_HEX_LENGTH: dict[str, int] = {
    "AE": 16, "CS": 16, "SH": 16, "LO": 32, "PN": 32, "ST": 32, "LT": 32, "UT": 32, "UC": 32,
}  # fmt: skip


class RuleHasher:
    """Keyed hash of values for the ``hash`` action (thread-safe, immutable)."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(bytes(secret), _HASH_KEY_LABEL, hashlib.sha256).digest()

    def digest(self, value: str) -> bytes:
        """HMAC-SHA256 of one value (padding stripped)."""
        data = value.strip("\x00 ").encode("utf-8", "surrogateescape")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def render(self, vr: str, value: str) -> str | None:
        """The hash of ``value`` valid for ``vr``; None when the VR has no rendering (the
        engine then removes the attribute). UI is handled by the engine's UID mapping."""
        length = _HEX_LENGTH.get(vr)
        digest = self.digest(value)
        if length is not None:
            return digest.hex().upper()[:length]
        if vr == "IS":
            return str(int.from_bytes(digest[:8], "big") % 1_000_000_000)
        if vr == "DS":
            return str(int.from_bytes(digest[:8], "big") % 10_000_000_000_000)
        return None

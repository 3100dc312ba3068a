"""Bring a site's existing burned-in text rules to ``profile.pixel_rules``.

Two formats are read, and each rule is returned in anonproxy's YAML form (``name``, ``if``,
``regions``; see :mod:`anonproxy.deid.pixels`), in the order of the file:

**RSNA CTP** ``DicomPixelAnonymizer.script``: sections ``{ signature } (x,y,w,h) ...``; the
signature is a boolean expression over terms ``identifier.method("text")``, with ``*`` (and), ``+``
(or), ``!`` (not), parentheses and ``true.``/``false.``; an identifier is an element name
(``Manufacturer``) or a tag (``[0008,0070]``); text outside braces and parentheses is comment, and
the last comment line before a signature names its rule. Methods: ``equals``, ``contains``,
``startsWith``, ``endsWith`` (case-sensitive: a regular expression with ``(?-i:...)``, unless the
text has no letters or is upper-case text compared with a Code String), their ``...IgnoreCase``
forms, ``matches`` (the whole value, Java regular expression read as Python's) and
``isLessThan``/``isGreaterThan``. CTP reads a missing element as empty text, and so does the import
(``equals("")`` holds for a missing element too). CTP blanks the far column and row of a region too
(``x`` to ``x+w`` and ``y`` to ``y+h``, both included): ``(x,y,w,h)`` becomes ``"x,y,w+1,h+1"``.

**pydicom/deid recipes**: ``LABEL`` groups in ``%filter`` sections (any name: deid blanks the
coordinates of a matching label whatever its list); criteria ``contains`` (a regular expression,
case-insensitive), ``notcontains``, ``equals``, ``notequals``, ``missing``, ``present``,
``empty``; ``+`` (and) and ``||`` (or) join criteria on a line and start continuation lines,
evaluated left to right as deid documents (a line is one group); ``coordinates x0,y0,x1,y1``
(corners), ``ctpcoordinates x,y,w,h`` and ``coordinates all``. deid blanks the regions of EVERY
matching label, anonproxy those of the first matching rule only: labels that overlap need their
regions merged by hand (the YAML header says so).

What anonproxy cannot express is skipped, with its reason: attributes inside
sequences (``A::B``), private and repeating-group elements, names that are no DICOM keyword,
``keepcoordinates``, coordinates ``from:`` a field, deid ``equals`` values with ``|`` (deid's
documentation reads them as alternatives, its code as literal text), deid criterion lines
without ``+``/``||`` after the first (documentation and code disagree there too), CTP values
naming several values (``\\``), and criteria deid does not know.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydicom.datadict import (
    dictionary_VR,
    keyword_for_tag,
    repeater_has_keyword,
    tag_for_keyword,
)

from anonproxy.deid.pixels import PixelRule

Format = Literal["ctp", "deid"]
FORMATS: dict[str, str] = {
    "ctp": "RSNA CTP DicomPixelAnonymizer script",
    "deid": "pydicom/deid recipe",
}

Condition = dict[str, Any]


@dataclass(frozen=True)
class ImportedRule:
    """A converted rule, the line it starts on and its source text on one line."""

    line: int
    source: str
    rule: dict[str, Any]


@dataclass(frozen=True)
class SkippedRule:
    """A rule that could not be converted, and why."""

    line: int
    name: str
    reason: str


@dataclass
class ImportResult:
    """The rules of one file: converted, skipped, and notes on what changed in conversion."""

    format: Format
    rules: list[ImportedRule] = field(default_factory=list)
    skipped: list[SkippedRule] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)


class _Unsupported(Exception):
    """A rule uses something anonproxy cannot express; the message says what."""


# -- public entry points ----------------------------------------------------------------------


def from_ctp_script(text: str) -> list[dict[str, Any]]:
    """The rules of a CTP ``DicomPixelAnonymizer.script`` that anonproxy can express."""
    return [imported.rule for imported in import_rules(text, "ctp").rules]


def from_deid_recipe(text: str) -> list[dict[str, Any]]:
    """The rules of a pydicom/deid recipe that anonproxy can express."""
    return [imported.rule for imported in import_rules(text, "deid").rules]


def guess_format(text: str) -> Format | None:
    """``deid`` for a recipe (``FORMAT``, ``%filter`` or ``LABEL`` lines), ``ctp`` for a script
    (a ``{...}`` signature followed by a ``(x,y,w,h)`` region), else None."""
    if re.search(r"^\s*(?:FORMAT\s+dicom|%filter\b|LABEL\s)", text, re.MULTILINE | re.IGNORECASE):
        return "deid"
    if re.search(r"\{[^{}]*\}[^{]*?\(\s*-?\d+\s*,", text):
        return "ctp"
    return None


def import_rules(text: str, fmt: Format) -> ImportResult:
    """The rules of ``text`` in the format ``fmt``, each converted or skipped with its reason."""
    result = import_ctp_script(text) if fmt == "ctp" else import_deid_recipe(text)
    valid: list[ImportedRule] = []
    for imported in result.rules:
        try:  # what the import writes is what anonproxy accepts, or it is not written
            PixelRule.parse(len(valid), imported.rule)
        except ValueError as exc:
            result.skipped.append(SkippedRule(imported.line, imported.rule["name"], str(exc)))
        else:
            valid.append(imported)
    result.rules = valid
    result.skipped.sort(key=lambda skipped: skipped.line)
    result.notes.extend(
        (
            r.line,
            f"{r.rule['name']!r} matches every image: anonproxy applies the first matching"
            " rule only, so the rules after it never apply",
        )
        for r in result.rules[:-1]
        if not r.rule.get("if")
    )
    return result


def to_yaml(result: ImportResult, source: str) -> str:
    """``result`` as a YAML ``pixel_rules:`` list, each rule under a comment naming its line in
    ``source``."""
    out = [
        f"# profile.pixel_rules imported from {_one_line(source)} ({FORMATS[result.format]})",
        f"# by `anonproxy pixel-rules import`: {len(result.rules)} rule(s) converted,"
        f" {len(result.skipped)} skipped (listed on standard error).",
        "# Check every rule on images of the site's own devices before use, then put the list",
        "# under `profile:` in the configuration. The first matching rule wins.",
    ]
    if result.format == "deid":
        out += [
            "# deid blanks the regions of every label that matches, anonproxy those of the first",
            "# matching rule only: where two labels can match one image, merge their regions.",
        ]
    if not result.rules:
        return "\n".join([*out, "pixel_rules: []", ""])
    out.append("pixel_rules:")
    for imported in result.rules:
        out.append(f"  # {_one_line(source)} line {imported.line}: {_cut(imported.source, 160)}")
        dumped = yaml.safe_dump(
            [imported.rule],
            sort_keys=False,
            default_flow_style=None,
            width=100,
            allow_unicode=True,
        )
        out.extend(f"  {line}" for line in dumped.splitlines())
    return "\n".join([*out, ""])


# -- conditions -------------------------------------------------------------------------------

_REGEX_SPECIAL = re.compile(r"[.^$*+?{}\[\]\\|()]")
_ALWAYS: Condition = {}  # holds for every header (compared with, never handed out)
_NEVER: Condition = {"not": {}}  # holds for none


def _never() -> Condition:
    return {"not": {}}


def _escape(text: str) -> str:
    """``text`` as a regular expression, escaping only what is special (readable YAML)."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(), text)


def _and(parts: Iterable[Condition]) -> Condition:
    """The conjunction, as one mapping where no attribute repeats (readable YAML), else as
    ``all`` of as few mappings as that takes."""
    buckets: list[Condition] = []
    for part in parts:
        if part == _NEVER:
            return _never()
        for key, value in _conjuncts(part):
            bucket = next((b for b in buckets if key not in b), None)
            if bucket is None:
                bucket = {}
                buckets.append(bucket)
            bucket[key] = value
    if len(buckets) > 1:
        return {"all": buckets}
    return buckets[0] if buckets else {}


def _conjuncts(condition: Condition) -> Iterable[tuple[str, Any]]:
    """The (key, value) terms a condition requires all of (``all`` lists opened)."""
    for key, value in condition.items():
        if key == "all":
            for inner in value:
                yield from _conjuncts(inner)
        else:
            yield key, value


def _or(parts: Iterable[Condition]) -> Condition:
    flat: list[Condition] = []
    for part in parts:
        if part == _ALWAYS:
            return {}
        if list(part) == ["any"]:
            flat.extend(part["any"])
        elif part != _NEVER:
            flat.append(part)
    if not flat:
        return _never()
    return flat[0] if len(flat) == 1 else {"any": flat}


def _not(condition: Condition) -> Condition:
    if list(condition) == ["not"]:
        inner: Condition = condition["not"]
        return inner
    return {"not": condition}


def _number_or_text(text: str) -> int | str:
    """A canonical integer as a number (``Rows: 480`` compares the same), other text as is."""
    return int(text) if re.fullmatch(r"0|[1-9]\d{0,17}", text) else text


def _missing(keyword: str) -> Condition:
    """Holds when the header has no value for ``keyword`` (absent, or empty and not text)."""
    return {"not": {keyword: {"regex": ""}}}


def _text_test(keyword: str, operator: str, value: str, *, case_sensitive: bool) -> Condition:
    """``keyword`` compared with ``value`` by ``operator`` (equals, contains, starts_with,
    ends_with); case-sensitively as a ``(?-i:...)`` regular expression when asked and the
    value has letters (anonproxy's own operators ignore case), except for upper-case text
    compared with a Code String (CS), whose values are upper case (PS3.5 6.2)."""
    upper_case_text = dictionary_VR(keyword) == "CS" and value == value.upper()
    if case_sensitive and value.lower() != value.upper() and not upper_case_text:
        body = f"(?-i:{_escape(value)})"
        pattern = {
            "equals": f"^{body}$",
            "contains": body,
            "starts_with": f"^{body}",
            "ends_with": f"{body}$",
        }[operator]
        return {keyword: {"regex": pattern}}
    if operator == "equals":
        return {keyword: _number_or_text(value)}
    if operator == "ends_with":
        return {keyword: {"regex": f"{_escape(value)}$"}}
    return {keyword: {operator: value}}


def _regex(keyword: str, pattern: str, what: str) -> Condition:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _Unsupported(f"{what}: not a Python regular expression ({exc.msg})") from None
    return {keyword: {"regex": pattern}}


# -- attribute names --------------------------------------------------------------------------

_TAG = re.compile(r"[\[(]([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})[\])]|0[xX]([0-9A-Fa-f]{8})")


def _keyword(identifier: str, *, sequence: bool = False) -> str:
    """The DICOM keyword of an element name or tag; _Unsupported when anonproxy's conditions
    (which look attributes up by keyword, at the top level) cannot name it, or compare its
    value (a sequence, unless ``sequence``: present or missing only)."""
    tag_match = _TAG.fullmatch(identifier)
    if tag_match:
        tag = int(tag_match[3] or tag_match[1] + tag_match[2], 16)
        keyword = keyword_for_tag(tag)
        if not keyword:
            raise _Unsupported(
                f"{identifier}: a private or unknown element (conditions name"
                " attributes by keyword)"
            )
        if tag_for_keyword(keyword) != tag:
            raise _Unsupported(
                f"{identifier}: an element of a repeating group ({keyword}),"
                " which conditions cannot name"
            )
        return keyword if sequence else _not_a_sequence(keyword, identifier)
    candidates = [identifier, re.sub(r"^SeqOf|Seq$", _long_seq, identifier)]
    candidates += [
        identifier[:i] + identifier[i + 1 :]
        for i in range(1, len(identifier) - 1)
        if identifier[i] == "s" and identifier[i + 1].isupper()
    ]  # PatientsName
    for candidate in candidates:
        if tag_for_keyword(candidate) is not None:
            return candidate if sequence else _not_a_sequence(candidate, identifier)
        if repeater_has_keyword(candidate):
            raise _Unsupported(
                f"{identifier}: an element of a repeating group, which conditions cannot name"
            )
    raise _Unsupported(f"{identifier!r} is not a DICOM keyword")


def _long_seq(match: re.Match[str]) -> str:
    return "SequenceOf" if match.group() == "SeqOf" else "Sequence"


def _not_a_sequence(keyword: str, identifier: str) -> str:
    if dictionary_VR(keyword) == "SQ":
        raise _Unsupported(f"{identifier}: a sequence, whose value conditions cannot compare")
    return keyword


# -- regions ----------------------------------------------------------------------------------


def _region(x: int, y: int, w: int, h: int) -> str | None:
    """``x,y,w,h`` clipped to the image's top-left corner; None for a region that blanks
    nothing (anonproxy reads a negative x/y as counted from the far edge, and a width or
    height of 0 as reaching the edge: neither is what the source meant)."""
    if x < 0:
        x, w = 0, w + x
    if y < 0:
        y, h = 0, h + y
    return f"{x},{y},{w},{h}" if w > 0 and h > 0 else None


# -- CTP --------------------------------------------------------------------------------------

_CTP_SIGNATURE = re.compile(r"\{([^}]*)\}")
_CTP_REGION = re.compile(r"\(([^)]*)\)")
_CTP_NAME = r"(?:\[[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\]|[A-Za-z][A-Za-z0-9]*)"
_CTP_TOKEN = re.compile(
    rf"""\s*(?:
        (?P<const>true\.|false\.)
      | (?P<ident>{_CTP_NAME}(?:::{_CTP_NAME})*)\.(?P<method>[A-Za-z]+)\(\s*"(?P<arg>[^"]*)"\s*\)
      | (?P<op>[()*+!])
    )""",
    re.VERBOSE,
)
_CTP_TEXT_METHODS = {
    "equals": "equals",
    "contains": "contains",
    "startsWith": "starts_with",
    "endsWith": "ends_with",
}


def import_ctp_script(text: str) -> ImportResult:
    """The sections of a CTP ``DicomPixelAnonymizer.script``, each converted or skipped."""
    result = ImportResult("ctp")
    signatures = list(_CTP_SIGNATURE.finditer(text))
    previous_name = "CTP signature"
    for i, signature in enumerate(signatures):
        line = text.count("\n", 0, signature.start()) + 1
        comment_start = signatures[i - 1].end() if i else 0
        base = _ctp_comment(text[comment_start : signature.start()]) or previous_name
        previous_name = base
        name = f"{base} (line {line})"
        end = signatures[i + 1].start() if i + 1 < len(signatures) else len(text)
        region_text = _CTP_REGION.findall(text[signature.end() : end])
        source = _one_line(
            text[signature.start() : signature.end()]
            + " "
            + " ".join(f"({r})" for r in region_text)
        )
        try:
            condition = _CtpParser(signature.group(1)).parse()
            regions = _ctp_regions(region_text, line, result.notes)
        except _Unsupported as exc:
            result.skipped.append(SkippedRule(line, name, str(exc)))
            continue
        result.rules.append(
            ImportedRule(line, source, {"name": name, "if": condition, "regions": regions})
        )
    return result


def _ctp_comment(text: str) -> str:
    """The last comment line (outside regions) with a letter or digit in it."""
    lines = [_one_line(_CTP_REGION.sub(" ", line)) for line in text.splitlines()]
    named = [line for line in lines if re.search(r"[A-Za-z0-9]", line)]
    return _cut(named[-1], 80) if named else ""


def _ctp_regions(region_text: list[str], line: int, notes: list[tuple[int, str]]) -> list[str]:
    regions: list[str] = []
    for raw in region_text:
        try:
            x, y, w, h = (int(part) for part in raw.split(","))
        except ValueError:
            notes.append((line, f"({raw}) is not x,y,w,h: ignored, as CTP ignores it"))
            continue
        region = _region(x, y, w + 1, h + 1)  # CTP blanks x to x+w and y to y+h, both included
        if region is None:
            notes.append((line, f"({raw}) blanks nothing: left out"))
        else:
            regions.append(region)
    if not regions:
        raise _Unsupported("no region that blanks anything")
    return regions


class _CtpParser:
    """A signature to a condition: ``+`` (or) < ``*`` (and) < ``!`` (not), parentheses."""

    def __init__(self, text: str) -> None:
        self.tokens: list[re.Match[str]] = []
        position = 0
        while text[position:].strip():
            token = _CTP_TOKEN.match(text, position)
            if token is None:
                at = _cut(_one_line(text[position:]), 40)
                raise _Unsupported(f"cannot read the signature at {at!r}")
            self.tokens.append(token)
            position = token.end()
        if not self.tokens:
            raise _Unsupported("an empty signature")
        self.position = 0

    def parse(self) -> Condition:
        condition = self._or()
        if self.position < len(self.tokens):
            raise _Unsupported(f"unexpected {self.tokens[self.position].group().strip()!r}")
        return condition

    def _peek(self) -> str | None:
        if self.position < len(self.tokens):
            return self.tokens[self.position].group("op")
        return None

    def _or(self) -> Condition:
        parts = [self._and()]
        while self._peek() == "+":
            self.position += 1
            parts.append(self._and())
        return _or(parts)

    def _and(self) -> Condition:
        parts = [self._unary()]
        while self._peek() == "*":
            self.position += 1
            parts.append(self._unary())
        return _and(parts)

    def _unary(self) -> Condition:
        if self.position >= len(self.tokens):
            raise _Unsupported("the signature ends too early")
        token = self.tokens[self.position]
        self.position += 1
        if token.group("op") == "!":
            return _not(self._unary())
        if token.group("op") == "(":
            condition = self._or()
            if self._peek() != ")":
                raise _Unsupported("a parenthesis is not closed")
            self.position += 1
            return condition
        if token.group("const"):
            return {} if token.group("const") == "true." else _never()
        if token.group("ident"):
            return _ctp_term(token.group("ident"), token.group("method"), token.group("arg"))
        raise _Unsupported(f"unexpected {token.group().strip()!r}")


def _ctp_term(identifier: str, method: str, value: str) -> Condition:
    term = f'{identifier}.{method}("{value}")'
    if "::" in identifier:
        raise _Unsupported(f"{term}: an attribute inside a sequence")
    keyword = _keyword(identifier)
    if "\\" in value and method != "matches":
        raise _Unsupported(f"{term}: several values (\\): conditions compare one text")
    ignore_case = method.endswith("IgnoreCase")
    base = method.removesuffix("IgnoreCase")
    if base in ("isLessThan", "isGreaterThan") and not ignore_case:
        number = re.sub(r"[^0-9.]", "", value)  # CTP keeps the digits and the point
        try:
            operand = float(number)
        except ValueError:
            raise _Unsupported(f"{term}: no number to compare with") from None
        numeric = int(operand) if operand.is_integer() else operand
        return {keyword: {"lt" if base == "isLessThan" else "gt": numeric}}
    if base == "matches" and not ignore_case:
        condition = _regex(keyword, f"^(?-i:{value})$", term)
        return _or([condition, _missing(keyword)]) if re.fullmatch(value, "") else condition
    if base not in _CTP_TEXT_METHODS:
        raise _Unsupported(f"{term}: the method {method!r} is not one anonproxy can express")
    if value == "":  # CTP reads a missing element as empty text
        if base == "equals":
            return {"not": {keyword: {"regex": "."}}}
        return {}  # every text contains, starts and ends with ""
    return _text_test(keyword, _CTP_TEXT_METHODS[base], value, case_sensitive=not ignore_case)


# -- deid -------------------------------------------------------------------------------------

_DEID_ACTIONS = ("contains", "notcontains", "equals", "notequals", "missing", "present", "empty")
_DEID_SPLIT = re.compile(
    r"\s*(\+|\|\|)\s*(?=(?:" + "|".join(_DEID_ACTIONS) + r")\s)", re.IGNORECASE
)


@dataclass
class _Label:
    line: int
    name: str
    members: list[tuple[int, str]] = field(default_factory=list)


def import_deid_recipe(text: str) -> ImportResult:
    """The ``LABEL`` groups of the ``%filter`` sections of a deid recipe, each converted or
    skipped."""
    result = ImportResult("deid")
    labels: list[_Label] = []
    section = ""
    labels_open = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%"):
            section = (line[1:].split("#", 1)[0].split() or [""])[0].lower()
            labels_open = False
        elif section == "filter" and re.match(r"label\b", line, re.IGNORECASE):
            labels.append(_Label(number, _one_line(line[5:].split("#", 1)[0]) or "LABEL"))
            labels_open = True
        elif section == "filter" and labels and labels_open:
            labels[-1].members.append((number, line))
    for label in labels:
        name = f"{label.name} (line {label.line})"
        source = _one_line(" / ".join([f"LABEL {label.name}", *(m for _, m in label.members)]))
        try:
            rule = {"name": name, **_deid_label(label, result.notes)}
        except _Unsupported as exc:
            result.skipped.append(SkippedRule(label.line, name, str(exc)))
            continue
        result.rules.append(ImportedRule(label.line, source, rule))
    return result


def _deid_label(label: _Label, notes: list[tuple[int, str]]) -> dict[str, Any]:
    lines: list[tuple[str | None, Condition]] = []
    regions: list[str] = []
    coordinates = False
    members = [(number, _strip_comment(member)) for number, member in label.members]
    members = [(number, member) for number, member in members if member]
    for number, member in members:  # the first reason to give, wherever it stands
        word = member.split(None, 1)[0].lower()
        if word in ("keepcoordinates", "ctpkeepcoordinates"):
            raise _Unsupported(
                f"line {number}: {word}: anonproxy has no regions to keep (for the Sequence of"
                " Ultrasound Regions, the region outside_ultrasound_regions blanks the rest)"
            )
    for number, member in members:
        word = member.split(None, 1)[0].lower()
        if word in ("coordinates", "ctpcoordinates"):
            coordinates = True
            region = _deid_region(
                member.split(None, 1)[1:], ctp=word == "ctpcoordinates", where=f"line {number}"
            )
            if region is None:
                notes.append((number, f"{member!r} blanks nothing: left out"))
            else:
                regions.append(region)
            continue
        leading = re.match(r"(\+|\|\|)?\s*", member)
        assert leading is not None  # noqa: S101 - the pattern matches the empty text
        operator = {"+": "and", "||": "or"}.get(leading.group(1) or "")
        if lines and operator is None:
            raise _Unsupported(
                f"line {number}: a criterion without + or ||: deid's documentation reads it as"
                " a separate check, its code as one more 'and'; write + or ||"
            )
        lines.append((operator, _deid_line(member[leading.end() :], f"line {number}")))
    if not regions:
        raise _Unsupported(
            "no region that blanks anything"
            if coordinates
            else "no coordinates: the label only flags images"
        )
    return {"if": _chain(lines) if lines else {}, "regions": regions}


def _deid_line(member: str, where: str) -> Condition:
    """One criterion line: criteria joined by ``+``/``||``, evaluated left to right."""
    parts = _DEID_SPLIT.split(member)
    criteria: list[tuple[str | None, Condition]] = [(None, _deid_criterion(parts[0], where))]
    for i in range(1, len(parts), 2):
        operator = "and" if parts[i] == "+" else "or"
        criteria.append((operator, _deid_criterion(parts[i + 1], where)))
    return _chain(criteria)


def _chain(items: list[tuple[str | None, Condition]]) -> Condition:
    condition = items[0][1]
    for operator, item in items[1:]:
        condition = (_and if operator == "and" else _or)([condition, item])
    return condition


def _deid_criterion(text: str, where: str) -> Condition:
    words = text.split(None, 2)
    action = words[0].lower() if words else ""
    if action not in _DEID_ACTIONS:
        raise _Unsupported(f"{where}: {action or text!r} is not a deid filter (deid ignores it)")
    if len(words) < 2:
        raise _Unsupported(f"{where}: {action} needs a field")
    keyword = _keyword(words[1], sequence=action in ("missing", "present"))
    if action in ("missing", "present", "empty"):
        if len(words) > 2:
            raise _Unsupported(f"{where}: {action} takes a field only")
        if action == "empty":
            return {keyword: {"equals": ""}}
        return _missing(keyword) if action == "missing" else _not(_missing(keyword))
    if len(words) < 3:
        raise _Unsupported(f"{where}: {action} needs a field and a value")
    value = words[2].strip()
    negate: Callable[[Condition], Condition] = _not if action.startswith("not") else _same
    if action.endswith("equals"):
        if "|" in value:
            raise _Unsupported(
                f"{where}: {action} {words[1]} {value}: deid's documentation reads | as"
                " alternatives, its code as text; write a contains with ^(...)$ instead"
            )
        return negate(_text_test(keyword, "equals", value, case_sensitive=False))
    if _REGEX_SPECIAL.search(value):  # deid searches a lower-case regular expression
        return negate(_regex(keyword, value, f"{where}: {action} {words[1]} {value}"))
    return negate({keyword: {"contains": value}})


def _same(condition: Condition) -> Condition:
    return condition


def _deid_region(arguments: list[str], *, ctp: bool, where: str) -> str | None:
    raw = arguments[0].strip() if arguments else ""
    if raw.lower() == "all":
        return "all"
    if raw.lower().startswith("from:"):
        raise _Unsupported(f"{where}: coordinates {raw}: regions read from a field")
    try:
        numbers = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise _Unsupported(f"{where}: {raw!r} is not four whole numbers")
    if min(numbers) < 0:
        raise _Unsupported(f"{where}: {raw!r}: deid counts a negative coordinate from the far edge")
    x, y, a, b = numbers
    return _region(x, y, a, b) if ctp else _region(x, y, a - x, b - y)


# -- text ----------------------------------------------------------------------------------------


def _strip_comment(text: str) -> str:
    return re.split(r"\s#", text, maxsplit=1)[0].strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 3].rstrip() + "..."

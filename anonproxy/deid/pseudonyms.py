"""Patient pseudonyms: Patient ID and Patient's Name replaced by a keyed pseudonym or a lookup.

Configured by ``profile.patient_id`` (absent: Patient ID and Patient's Name get the action of
their Table E.1-1 row, ``Z/D`` and ``Z``, as before). The pseudonym replaces the top-level
Patient ID and Patient's Name; the same attributes inside sequence items (e.g. Other Patient
IDs Sequence) keep their profile action, as they may name other patients.

* ``method: hash`` — ``format`` rendered with the keyed hash of the original Patient ID:
  ``{hash:N}`` is the first ``N`` upper-case hex digits and ``{base32:N}`` the first ``N``
  base-32 characters (RFC 4648 alphabet) of ``HMAC-SHA256(key, original ID)``, where the key is
  derived from the installation secret: the same patient gets the same pseudonym on every
  machine and after every restart. The rendered pseudonym is at most 64 characters (LO). The
  default, :data:`DEFAULT_FORMAT` ``ANON-{hash:16}``, carries 64 bits of the hash.
* ``method: lookup`` — a table of ``original → pseudonym``: a :data:`PatientLookup` callable
  given by the caller (``anonproxy serve`` asks its state store, :mod:`anonproxy.patients`),
  or, for embedders, a CSV file ``original,pseudonym`` (a first row reading
  ``original,pseudonym`` is taken as a header) read once when the engine is built. A patient
  not in the table is rejected (``unknown_patient: reject``, the instance gets a failure
  status) or gets the hash pseudonym (``unknown_patient: hash``; a callable records it, so
  that the patient keeps it).

Patient's Name becomes the Patient ID pseudonym, or ``patient_name_format`` rendered with the
same placeholders plus ``{pseudonym}`` (the Patient ID pseudonym), e.g. ``"ANON^{hash:6}"``.

The pseudonym never contains the original: a lookup row whose pseudonym contains its original
(case-insensitive, for originals of 3 characters or more; equal for shorter ones) is refused at
load; a hash pseudonym that happens to contain the original is derived again with a counter
(still deterministic); a format whose literal text contains the original rejects the instance.
An empty or absent Patient ID gets no pseudonym (the table's action applies to both attributes).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from anonproxy.errors import ConfigError, DeidentificationError

MAX_LO = 64
_MIN_CONTAINED = 3
_PLACEHOLDER = re.compile(r"\{(hash|base32|pseudonym)(?::(\d+))?\}")
_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
_KEY_LABEL = b"anonproxy:patient-pseudonym:v1"
_MAX_RETRIES = 64


#: ``lookup(original Patient ID, fallback)``: the patient's pseudonym in the table; for a
#: patient not in it, *fallback* (the hash pseudonym, under ``unknown_patient: hash``) recorded
#: as the patient's pseudonym (or the one another process recorded first), or None when
#: *fallback* is None (``unknown_patient: reject``). It may raise
#: :class:`~anonproxy.errors.TransientError` (the table cannot be reached now).
PatientLookup = Callable[[str, str | None], str | None]


class PseudonymMethod(StrEnum):
    """How the Patient ID pseudonym is made."""

    HASH = "hash"
    LOOKUP = "lookup"


class UnknownPatient(StrEnum):
    """What happens, under the lookup method, to a patient not in the table."""

    REJECT = "reject"
    HASH = "hash"


@dataclass(frozen=True, slots=True)
class PseudonymFormat:
    """A parsed format: literal text and ``(kind, length)`` placeholders, in order."""

    text: str
    parts: tuple[str | tuple[str, int], ...]

    @classmethod
    def parse(
        cls, text: str, *, allow_pseudonym: bool = False, max_length: int = MAX_LO
    ) -> PseudonymFormat:
        """Validate ``text``; ValueError says what is wrong (the text holds no patient data)."""
        parts: list[str | tuple[str, int]] = []
        position = 0
        for m in _PLACEHOLDER.finditer(text):
            parts.append(text[position : m.start()])
            kind, digits = m[1], m[2]
            if kind == "pseudonym":
                if not allow_pseudonym:
                    raise ValueError("{pseudonym} is only allowed in patient_name_format")
                if digits is not None:
                    raise ValueError("{pseudonym} takes no length")
                parts.append((kind, 0))
            else:
                limit = 64 if kind == "hash" else 52
                if digits is None or not 4 <= int(digits) <= limit:
                    raise ValueError(f"{{{kind}:N}} needs a length N from 4 to {limit}")
                parts.append((kind, int(digits)))
            position = m.end()
        parts.append(text[position:])
        literal = "".join(p for p in parts if isinstance(p, str))
        if "{" in literal or "}" in literal:
            raise ValueError(
                "unknown placeholder; use {hash:N}, {base32:N}"
                + (" or {pseudonym}" if allow_pseudonym else "")
            )
        if not any(isinstance(p, tuple) for p in parts):
            raise ValueError("the format needs a placeholder, or every patient gets one pseudonym")
        if _FORBIDDEN.search(literal):
            raise ValueError("the format may not contain a backslash or control characters")
        fixed = len(literal) + sum(n for p in parts if isinstance(p, tuple) for n in [p[1]])
        if fixed > max_length:
            raise ValueError(f"the rendered pseudonym would exceed {max_length} characters")
        return cls(text=text, parts=tuple(p for p in parts if p != ""))

    def render(self, digest: bytes, pseudonym: str = "") -> str:
        """The format with its placeholders filled from ``digest`` (32 bytes)."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif part[0] == "hash":
                out.append(digest.hex().upper()[: part[1]])
            elif part[0] == "base32":
                out.append(base64.b32encode(digest).decode("ascii")[: part[1]])
            else:
                out.append(pseudonym)
        return "".join(out)


def contains_original(pseudonym: str, original: str) -> bool:
    """True if ``pseudonym`` reveals ``original`` (substring, case-insensitive, when the
    original has 3 characters or more; equality otherwise)."""
    p, o = pseudonym.casefold(), original.casefold()
    return o in p if len(o) >= _MIN_CONTAINED else p == o


def load_lookup_csv(path: Path) -> Mapping[str, str]:
    """Read ``original,pseudonym`` rows; ConfigError naming the file and line, never a value."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise ConfigError(f"cannot read patient lookup table {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error):
        raise ConfigError(f"patient lookup table {path} is not a UTF-8 CSV file") from None
    table: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells):
            continue
        if number == 1 and [c.casefold() for c in cells[:2]] == ["original", "pseudonym"]:
            continue
        where = f"patient lookup table {path}, line {number}"
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise ConfigError(f"{where}: expected two non-empty columns original,pseudonym")
        original, pseudonym = cells
        if len(pseudonym) > MAX_LO or _FORBIDDEN.search(pseudonym):
            raise ConfigError(
                f"{where}: the pseudonym must be at most {MAX_LO} characters, "
                "without backslash or control characters"
            )
        if contains_original(pseudonym, original):
            raise ConfigError(f"{where}: the pseudonym contains the original Patient ID")
        if table.get(original, pseudonym) != pseudonym:
            raise ConfigError(f"{where}: this original Patient ID is listed twice")
        table[original] = pseudonym
    return MappingProxyType(table)


@dataclass(frozen=True)
class PatientPseudonyms:
    """The pseudonym settings (no secret): method, formats, lookup table, unknown policy."""

    method: PseudonymMethod = PseudonymMethod.HASH
    format: PseudonymFormat = field(default_factory=lambda: PseudonymFormat.parse(DEFAULT_FORMAT))
    name_format: PseudonymFormat | None = None
    table: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    unknown_patient: UnknownPatient = UnknownPatient.REJECT
    lookup: PatientLookup | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        method: str = "hash",
        format: str | None = None,
        patient_name_format: str | None = None,
        lookup_csv: str | Path | None = None,
        unknown_patient: str = "reject",
        *,
        lookup: PatientLookup | None = None,
    ) -> PatientPseudonyms:
        """Validate settings and read the lookup table (ValueError / ConfigError); with
        *lookup*, the method ``lookup`` asks it instead of reading *lookup_csv*."""
        parsed_method = PseudonymMethod(method)
        table: Mapping[str, str] = MappingProxyType({})
        if parsed_method is PseudonymMethod.LOOKUP and lookup is None:
            if lookup_csv is None:
                raise ValueError("method lookup needs lookup_csv")
            table = load_lookup_csv(Path(lookup_csv))
        return cls(
            method=parsed_method,
            format=PseudonymFormat.parse(format or DEFAULT_FORMAT),
            name_format=(
                PseudonymFormat.parse(patient_name_format, allow_pseudonym=True)
                if patient_name_format
                else None
            ),
            table=table,
            unknown_patient=UnknownPatient(unknown_patient),
            lookup=lookup if parsed_method is PseudonymMethod.LOOKUP else None,
        )

    def describe(self) -> str:
        """``pseudonym:hash`` or ``pseudonym:lookup`` (for describe-profile)."""
        return f"pseudonym:{self.method.value}"


#: The default Patient ID format: 16 hex digits, 64 bits of the keyed hash (two patients are
#: likely to share a pseudonym only past some 4 billion patients; with 40 bits, past a million).
DEFAULT_FORMAT = "ANON-{hash:16}"


class Pseudonymizer:
    """Computes the pseudonyms of one installation (keyed by its secret; thread-safe)."""

    __slots__ = ("_key", "_spec")

    def __init__(self, spec: PatientPseudonyms, secret: bytes) -> None:
        self._spec = spec
        self._key = hmac.new(bytes(secret), _KEY_LABEL, hashlib.sha256).digest()

    def _digest(self, original: str, attempt: int) -> bytes:
        data = original.encode("utf-8", "surrogateescape")
        if attempt:
            data += b"\x00" + str(attempt).encode("ascii")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def _hashed(self, original: str) -> tuple[str, bytes]:
        for attempt in range(_MAX_RETRIES):
            digest = self._digest(original, attempt)
            pseudonym = self._spec.format.render(digest)
            if not contains_original(pseudonym, original):
                return pseudonym, digest
        raise DeidentificationError(
            "the Patient ID pseudonym format reveals the original PatientID (0010,0020)"
        )

    def pseudonyms(self, original_id: str) -> tuple[str, str]:
        """``(Patient ID pseudonym, Patient's Name pseudonym)`` for an original Patient ID.

        Raises DeidentificationError for an unknown patient under ``unknown_patient: reject``
        (the message names the attribute, never the value).
        """
        spec = self._spec
        looked_up: str | None = None
        hashed: tuple[str, bytes] | None = None
        if spec.method is PseudonymMethod.LOOKUP and spec.lookup is not None:
            if spec.unknown_patient is UnknownPatient.HASH:
                hashed = self._hashed(original_id)
            looked_up = spec.lookup(original_id, None if hashed is None else hashed[0])
        elif spec.method is PseudonymMethod.LOOKUP:
            looked_up = spec.table.get(original_id)
        if hashed is not None and looked_up == hashed[0]:
            pseudonym, digest = hashed
        elif looked_up is not None:
            pseudonym, digest = looked_up, self._digest(original_id, 0)
        elif (
            spec.method is PseudonymMethod.LOOKUP and spec.unknown_patient is UnknownPatient.REJECT
        ):
            raise DeidentificationError(
                "PatientID (0010,0020) is not in the patient lookup table (unknown_patient: reject)"
            )
        else:
            pseudonym, digest = self._hashed(original_id)
        name = pseudonym
        if spec.name_format is not None:
            name = spec.name_format.render(digest, pseudonym)[:MAX_LO]
        if contains_original(name, original_id):
            raise DeidentificationError(
                "the Patient's Name pseudonym format reveals the original PatientID (0010,0020)"
            )
        return pseudonym, name

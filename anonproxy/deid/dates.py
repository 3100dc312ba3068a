"""Per-patient date shifting (the C action on DA and DT under modified dates).

Every date of one patient moves by the same number of days, so intervals between dates are
preserved; times of day (TM, and the time part of DT) are kept. The offset is
``low + HMAC-SHA256(secret, b"date:" + PatientID) mod (high - low + 1)``: deterministic for a
patient and secret, unknown without the secret. Instances without a Patient ID share the offset
of the empty ID.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import date, timedelta

_DA_RE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_DT_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(.*)", re.DOTALL)

DEFAULT_SHIFT_DAYS = (-365, -1)
_MAX_OFFSETS = 1024


class DateShifter:
    """Shifts DA and DT values by a keyed per-patient number of days (thread-safe, immutable
    but for a bounded memo of the offsets)."""

    __slots__ = ("_high", "_low", "_offsets", "_secret")

    def __init__(self, secret: bytes, shift_days: tuple[int, int] = DEFAULT_SHIFT_DAYS) -> None:
        low, high = shift_days
        if low > high:
            raise ValueError("date shift range: low bound above high bound")
        self._secret = bytes(secret)
        self._low = low
        self._high = high
        #: offset by Patient ID, at most _MAX_OFFSETS (emptied when full): the instances of a
        #: study share it (a dictionary's get and set are atomic: any thread may fill it)
        self._offsets: dict[str, int] = {}

    def offset_days(self, patient_id: str) -> int:
        """The shift, in days, of every date of the patient with ``patient_id``."""
        offset = self._offsets.get(patient_id)
        if offset is not None:
            return offset
        digest = hmac.new(self._secret, b"date:" + patient_id.encode("utf-8"), hashlib.sha256)
        span = self._high - self._low + 1
        offset = self._low + int.from_bytes(digest.digest()[:8], "big") % span
        if len(self._offsets) >= _MAX_OFFSETS:
            self._offsets.clear()
        self._offsets[patient_id] = offset
        return offset

    @staticmethod
    def shift_da(value: str, days: int) -> str:
        """Shift one DA value (``YYYYMMDD``, or ACR-NEMA ``YYYY.MM.DD``); ValueError if invalid."""
        m = _DA_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError("not a DA value")
        shifted = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
        return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}"

    @staticmethod
    def shift_dt(value: str, days: int) -> str:
        """Shift one DT value, keeping its precision, time and offset; ValueError if invalid."""
        m = _DT_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError("not a DT value")
        year, month, day, rest = m[1], m[2], m[3], m[4]
        if rest and (day is None or not re.fullmatch(r"[0-9.+\-&]*", rest)):
            raise ValueError("not a DT value")
        shifted = date(int(year), int(month or 1), int(day or 1)) + timedelta(days=days)
        out = f"{shifted.year:04d}"
        if month is not None:
            out += f"{shifted.month:02d}"
        if day is not None:
            out += f"{shifted.day:02d}"
        return out + rest

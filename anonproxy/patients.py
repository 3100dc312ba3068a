"""Lookup-table patient pseudonyms kept in the state store (``profile.patient_id.method:
lookup``).

One source of truth: the table lives in the state store (:mod:`anonproxy.state`), loaded by
``anonproxy lookup import ids.csv`` (:func:`import_csv`), and every process that de-identifies
(the service and each worker process, on every node) asks the store. A patient's pseudonym
never changes once recorded: an import that would change one is refused whole, so an edited
CSV cannot give one patient two pseudonyms. A patient not in the table gets, under
``unknown_patient: hash``, the hash pseudonym, recorded in the store by the first process that
sees the patient (the others then read it).

The store never sees an original Patient ID: rows are found by a keyed hash of it
(HMAC-SHA256 with a key derived from the installation secret), so nodes sharing the secret
find the same rows. :class:`PatientDirectory` is the engine's
:data:`~anonproxy.deid.pseudonyms.PatientLookup`; it keeps the pseudonyms it found in memory
(they never change), so a patient seen before needs no round trip, and the store unreachable
then costs nothing. A patient not cached while the store is unreachable raises
:class:`~anonproxy.errors.StateUnavailable` (the instance gets 0xA700).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from pathlib import Path

from anonproxy.deid.pseudonyms import load_lookup_csv
from anonproxy.errors import ConfigError, DeidentificationError
from anonproxy.state import LookupConflict, StateStore

_KEY_LABEL = b"anonproxy:patient-lookup-key:v1"
_CACHE_MAX = 200_000


def original_key(secret: bytes, original_id: str) -> bytes:
    """The keyed hash under which the store keeps a patient's row."""
    key = hmac.new(bytes(secret), _KEY_LABEL, hashlib.sha256).digest()
    return hmac.new(key, original_id.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


class PatientDirectory:
    """The engine's patient lookup against a state store, with a cache (thread-safe)."""

    def __init__(self, store: StateStore, secret: bytes) -> None:
        self._store = store
        self._key = hmac.new(bytes(secret), _KEY_LABEL, hashlib.sha256).digest()
        self._cache: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def _original_key(self, original_id: str) -> bytes:
        data = original_id.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def __call__(self, original_id: str, fallback: str | None) -> str | None:
        """The patient's pseudonym; see :data:`~anonproxy.deid.pseudonyms.PatientLookup`."""
        key = self._original_key(original_id)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        found = self._store.patient_pseudonym(key)
        if found is None and fallback is not None:
            try:
                found = self._store.assign_patient(key, fallback, "hash")
            except LookupConflict:
                raise DeidentificationError(
                    "the hash pseudonym of PatientID (0010,0020) is another patient's in the"
                    " lookup table"
                ) from None
        if found is not None:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[key] = found
        return found


def import_csv(store: StateStore, secret: bytes, path: Path) -> tuple[int, int]:
    """Load the CSV file ``original,pseudonym`` into the store, all rows or none:
    ``(added, already there)``. ConfigError naming the file and line (never a value) for a
    bad row or one that disagrees with the store."""
    table = load_lookup_csv(path)  # validated: two columns, no original inside its pseudonym
    rows = list(table.items())
    key = hmac.new(bytes(secret), _KEY_LABEL, hashlib.sha256).digest()
    keyed = [
        (hmac.new(key, o.encode("utf-8", "surrogateescape"), hashlib.sha256).digest(), p)
        for o, p in rows
    ]
    pseudonyms = [p for _, p in rows]
    if len(set(pseudonyms)) != len(pseudonyms):
        first = next(i for i, p in enumerate(pseudonyms) if pseudonyms.index(p) != i)
        msg = f"{path}: row {first + 1} of the table: this pseudonym is another patient's too"
        raise ConfigError(msg)
    try:
        return store.import_patients(keyed)
    except LookupConflict as exc:
        msg = f"{path}: row {exc.index + 1} of the table: {exc.reason}; nothing imported"
        raise ConfigError(msg) from None

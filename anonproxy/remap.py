"""The re-identification map: which original patient and study each pseudonym stands for.

For the honest broker of a trial ("which patient is ANON-…?"). One entry per patient and study
(not per instance): the original Patient ID, Patient's Name, Accession Number, Study Instance
UID and Study Date beside the values the engine gave them
(:class:`~anonproxy.deid.identity.StudyIdentity`).

**Never lost for an acknowledged instance.** :meth:`MapRecorder.record` runs before the
instance is spooled (so before it is acknowledged and before it can be forwarded): a new entry
is appended to the journal ``<storage>/map/journal.jsonl`` and synced (``fsync``), then shipped
to the state store (:mod:`anonproxy.state`) with every other entry not shipped yet, in one
transaction (threads that record meanwhile wait for that one: group commit). An entry already
journaled and shipped costs a look-up in a set. When the store cannot be reached, the instance
is refused with 0xA700 (the sender sends it again; nothing is forwarded without its map entry
in the store), and the journal keeps the entry; :meth:`MapRecorder.open` ships what a previous
run journaled and did not ship (a SIGKILL between the two), then empties a journal grown past
64 MiB whose entries are all in the store.

**Encrypted at rest.** The originals are sealed with AES-256-GCM (the ``cryptography``
package) under the map key, in the journal as in the store: a 96-bit random nonce per entry,
the entry's key as associated data (an entry cannot be moved to another row). The map key is
32 random bytes (raw or 64 hexadecimal digits) in the file named by ``ANONPROXY_MAP_KEY_FILE``,
else ``<storage>/map.key``, which ``serve`` creates on its first run (keep it elsewhere, as the
honest broker's, with the variable); it must be readable by its owner only. It is not the
pseudonymisation secret and nothing derives one from the other. The store keeps a check value
of the key: a node with another key can neither write the map nor read it
(:func:`verify_key`). Entry keys are HMAC-SHA256 of the original Patient ID and Study Instance
UID under a key derived from the map key, so the store finds an entry without holding an
original in clear.

Nothing here logs, audits or raises a value: callers (``anonproxy map lookup``) print
originals to standard output only.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anonproxy.audit import get_logger
from anonproxy.deid.identity import StudyIdentity, StudyValues
from anonproxy.errors import ConfigError, StateUnavailable
from anonproxy.sealed import load_key
from anonproxy.state import MapRow, StateStore

log = get_logger(__name__)

MAP_KEY_FILE_ENV = "ANONPROXY_MAP_KEY_FILE"
DEFAULT_MAP_KEY_NAME = "map.key"
JOURNAL_FOLDER = "map"
_JOURNAL = "journal.jsonl"
_SHIPPED = "shipped"  # the journal's length already in the store (decimal)
_KEY_BYTES = 32
_NONCE_BYTES = 12
_FORMAT = b"\x01"
_CHECK_NAME = "map_key_check"
_COMPACT_BYTES = 64 << 20  # some 100,000 studies


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder(path: Path, mode: int) -> None:
    """Create *path* (and its parents) and sync the parent of what was created."""
    if path.is_dir():
        return
    _make_folder(path.parent, 0o777)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    _sync_directory(path.parent)


class MapKeyError(ConfigError):
    """No map key, a key that cannot be used, or not the key of this map."""


@dataclass(frozen=True)
class MapKey:
    """The map key and where it came from (hidden from ``repr``)."""

    value: bytes
    source: str
    created: bool = False

    def __repr__(self) -> str:
        return f"MapKey(source={self.source!r}, value=<redacted>)"

    def _derived(self, label: bytes) -> bytes:
        return hmac.new(self.value, b"anonproxy:map:" + label, hashlib.sha256).digest()

    @property
    def check(self) -> bytes:
        """A value the store keeps to tell this key from another (reveals nothing of it)."""
        return self._derived(b"check:v1")[:16]

    @functools.cached_property
    def _entry_hmac(self) -> hmac.HMAC:
        return hmac.new(self._derived(b"entry:v1"), digestmod=hashlib.sha256)

    def entry_key(self, original: StudyValues) -> bytes:
        """The map entry's key: one per original patient and study."""
        data = f"{original.patient_id}\x00{original.study_instance_uid}".encode(
            "utf-8", "surrogateescape"
        )
        mac = self._entry_hmac.copy()
        mac.update(data)
        return mac.digest()

    def seal(self, entry_key: bytes, original: StudyValues) -> bytes:
        """The originals, encrypted and authenticated (bound to *entry_key*)."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        plain = json.dumps(original.as_dict(), ensure_ascii=False).encode("utf-8", "surrogatepass")
        sealed = AESGCM(self._derived(b"seal:v1")).encrypt(nonce, plain, _FORMAT + entry_key)
        return _FORMAT + nonce + sealed

    def open(self, entry_key: bytes, blob: bytes) -> StudyValues:
        """The originals of a sealed entry; MapKeyError when this key does not open it."""
        if blob[:1] != _FORMAT:
            msg = "a map entry in an unknown format"
            raise MapKeyError(msg)
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            plain = AESGCM(self._derived(b"seal:v1")).decrypt(nonce, sealed, _FORMAT + entry_key)
        except InvalidTag:
            msg = "the map key does not open this map entry (another key, or the entry altered)"
            raise MapKeyError(msg) from None
        return StudyValues(**json.loads(plain.decode("utf-8", "surrogatepass")))


def _read_key(path: Path, setting: str) -> bytes:
    try:
        return load_key(path, setting)  # the same rules as the incoming spool's key
    except ConfigError as exc:
        raise MapKeyError(str(exc)) from None


def create_key_file(path: Path) -> bool:
    """Write a new map key to *path* (0600, synced with its folder); False when it exists."""
    _make_folder(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(_KEY_BYTES).encode("ascii") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    _sync_directory(path.parent)
    return True


def load_map_key(
    storage_path: Path, environ: dict[str, str] | None = None, *, create: bool = False
) -> MapKey:
    """The map key: ``ANONPROXY_MAP_KEY_FILE``'s file, else ``<storage_path>/map.key``
    (created with *create*, ``serve``'s first run). MapKeyError when there is none."""
    env = os.environ if environ is None else environ
    if file_name := env.get(MAP_KEY_FILE_ENV):
        return MapKey(_read_key(Path(file_name), MAP_KEY_FILE_ENV), file_name)
    path = storage_path / DEFAULT_MAP_KEY_NAME
    created = False
    if not path.exists():
        if not create:
            msg = (
                f"no map key: {MAP_KEY_FILE_ENV} is not set and {path.resolve()} does not exist;"
                " the re-identification map can be neither read nor written without it"
            )
            raise MapKeyError(msg)
        created = create_key_file(path)
    return MapKey(_read_key(path, "map key"), str(path.resolve()), created)


def verify_key(store: StateStore, key: MapKey, *, write: bool = True) -> bool:
    """MapKeyError when the store's map was written with another key. With *write*, record
    the key's check value in a store that has none; without, False when it has none (no
    map yet)."""
    if write:
        check: bytes | None = store.meta_setdefault(_CHECK_NAME, key.check)
    else:
        check = store.meta_get(_CHECK_NAME)
        if check is None:
            return False
    assert check is not None  # noqa: S101 - set above
    if not hmac.compare_digest(check, key.check):
        msg = (
            f"the map key ({key.source}) is not the key of the re-identification map in the"
            f" state store ({store.description})"
        )
        raise MapKeyError(msg)
    return True


def _row(key: MapKey, identity: StudyIdentity) -> MapRow:
    entry = key.entry_key(identity.original)
    p = identity.pseudonym
    return MapRow(
        entry,
        p.patient_id,
        p.patient_name,
        p.accession_number,
        p.study_instance_uid,
        p.study_date,
        key.seal(entry, identity.original),
        time.time(),
    )


def _encode(row: MapRow) -> bytes:
    fields = {
        "k": row.entry_key.hex(),
        "p": [
            row.patient_id,
            row.patient_name,
            row.accession_number,
            row.study_instance_uid,
            row.study_date,
        ],
        "o": base64.b64encode(row.originals).decode("ascii"),
        "t": row.recorded_at,
    }
    return json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def _decode(line: bytes) -> MapRow:
    fields = json.loads(line.decode("utf-8", "surrogatepass"))
    patient_id, patient_name, accession, study, date = (str(v) for v in fields["p"])
    return MapRow(
        bytes.fromhex(fields["k"]),
        patient_id,
        patient_name,
        accession,
        study,
        date,
        base64.b64decode(fields["o"]),
        float(fields["t"]),
    )


class MapRecording(Protocol):
    """What the pipeline records in the map with: :class:`MapRecorder`, or in an acceptor
    process :class:`~anonproxy.acceptors.RelayedMapRecorder`."""

    def record(self, identity: StudyIdentity) -> bool:
        """Make sure *identity*'s entry is journaled and in the store; True when it was new."""
        ...


class MapRecorder:
    """Journals and ships the map entries of one node (thread-safe)."""

    def __init__(
        self, key: MapKey, store: StateStore, storage_path: Path, *, fsync: bool = True
    ) -> None:
        self.key = key
        self.store = store
        self.folder = storage_path / JOURNAL_FOLDER
        self.fsync = fsync
        self._journal_lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._known: set[bytes] = set()  # journaled (shipped or not)
        self._pending: list[MapRow] = []  # journaled, not shipped, in journal order
        self._pending_keys: set[bytes] = set()
        self._length = 0  # the journal's length
        self._shipped_length = 0
        self._fd: int | None = None
        #: at start, a journal this long whose entries are all in the store is emptied
        self.compact_bytes = _COMPACT_BYTES

    def open(self) -> int:
        """Read the journal (a line cut by a crash is dropped: it was never acknowledged) and
        ship what is not in the store yet; the entries shipped now. StateUnavailable leaves
        them pending (shipped with the next record). MapKeyError when the store's map has
        another key; StateUnavailable when the store cannot be asked."""
        verify_key(self.store, self.key)  # a map is never written with another key
        _make_folder(self.folder, 0o700)
        path = self.folder / _JOURNAL
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        data = b""
        with contextlib.suppress(OSError):
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            os.ftruncate(fd, len(whole))
        shipped = self._read_shipped(len(whole))
        position = 0
        for line in whole.splitlines(keepends=True):
            try:
                row = _decode(line)
            except (ValueError, KeyError, TypeError):  # not ours: skipped, never a value logged
                log.warning("map.journal_line_skipped", offset=position)
                position += len(line)
                continue
            position += len(line)
            self._known.add(row.entry_key)
            if position > shipped:
                self._pending.append(row)
                self._pending_keys.add(row.entry_key)
        self._fd, self._length, self._shipped_length = fd, len(whole), shipped
        if self.fsync:
            _sync_directory(self.folder)
        try:
            shipped_now = self.ship()
        except StateUnavailable:
            log.warning("map.ship_deferred", pending=len(self._pending))
            return 0
        if self._length >= self.compact_bytes:
            self._compact()
        return shipped_now

    def _compact(self) -> None:
        """Empty a journal whose every entry is in the store (at start): it stays bounded.
        The studies it named are journaled again, once each, when next seen."""
        with self._journal_lock:
            if self._pending or self._fd is None:
                return
            os.ftruncate(self._fd, 0)
            if self.fsync:
                os.fsync(self._fd)
            self._length = self._shipped_length = 0
            self._known.clear()
        self._write_shipped(0)  # a crash before this: the stale length is cut to the journal's
        log.info("map.journal_compacted")

    def close(self) -> None:
        """Close the journal."""
        with self._journal_lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def pending(self) -> int:
        """Entries journaled and not in the store yet."""
        with self._journal_lock:
            return len(self._pending)

    def record(self, identity: StudyIdentity) -> bool:
        """Make sure the entry of *identity*'s patient and study is journaled (synced) and in
        the store; True when it was new. StateUnavailable when the store cannot take it now
        (the entry stays journaled, shipped later)."""
        entry = self.key.entry_key(identity.original)
        new = False
        with self._journal_lock:
            if entry not in self._known:
                if self._fd is None:
                    msg = "the map journal is not open"
                    raise RuntimeError(msg)
                row = _row(self.key, identity)
                line = _encode(row)
                self._append(line)
                self._length += len(line)
                self._known.add(entry)
                self._pending.append(row)
                self._pending_keys.add(entry)
                new = True
            waiting = entry in self._pending_keys
        if waiting:
            self.ship(entry)
        return new

    def _append(self, line: bytes) -> None:
        """Append *line* and sync it; on failure (a full disk) cut the journal back to its last
        whole line, so that the next entry does not follow a torn one."""
        assert self._fd is not None  # noqa: S101 - checked by the caller
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._length)
            raise

    def ship(self, entry: bytes | None = None) -> int:
        """Ship every pending entry to the store in one transaction (unless *entry* was shipped
        meanwhile by another thread); the entries shipped."""
        with self._ship_lock:
            with self._journal_lock:
                if entry is not None and entry not in self._pending_keys:
                    return 0
                batch, length = list(self._pending), self._length
            if not batch:
                return 0
            self.store.put_map_rows(batch)
            with self._journal_lock:
                del self._pending[: len(batch)]
                self._pending_keys.difference_update(r.entry_key for r in batch)
                self._shipped_length = length
            self._write_shipped(length)
            return len(batch)

    def _read_shipped(self, limit: int) -> int:
        try:
            value = int((self.folder / _SHIPPED).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return 0  # everything is shipped again: the store keeps rows it has
        return min(max(value, 0), limit)

    def _write_shipped(self, length: int) -> None:
        """Not synced: a length lost in a crash only ships entries again."""
        temporary = self.folder / f".{_SHIPPED}.tmp"
        temporary.write_text(f"{length}\n", encoding="ascii")
        temporary.replace(self.folder / _SHIPPED)


@dataclass(frozen=True)
class Found:
    """A map entry, opened: the pseudonyms and the originals."""

    pseudonym: StudyValues
    original: StudyValues
    recorded_at: float


def find(
    store: StateStore, key: MapKey, *, patient_id: str | None = None, study: str | None = None
) -> list[Found]:
    """The entries of a patient pseudonym or a de-identified Study Instance UID, opened with
    *key* (MapKeyError when it is not this map's key)."""
    if not verify_key(store, key, write=False):
        return []
    return [_opened(key, row) for row in store.map_rows(patient_id=patient_id, study=study)]


def _opened(key: MapKey, row: MapRow) -> Found:
    pseudonym = StudyValues(
        row.patient_id,
        row.patient_name,
        row.accession_number,
        row.study_instance_uid,
        row.study_date,
    )
    return Found(pseudonym, key.open(row.entry_key, row.originals), row.recorded_at)


def journal_rows(storage_path: Path) -> Iterable[MapRow]:
    """The entries of a node's journal, as written (for tests and recovery tools)."""
    path = storage_path / JOURNAL_FOLDER / _JOURNAL
    if path.exists():
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                yield _decode(line)

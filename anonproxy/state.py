"""The state store: what must agree across processes and nodes (``state:``).

Two backends behind one class, :class:`StateStore`:

* ``sqlite`` (the default): one file, ``<storage.path>/state.sqlite3`` unless ``state.path``
  names another, in WAL mode with full synchronous commits; created owner-only. Every process
  of the node (the service, its de-identification workers, the command line) opens it; SQLite's
  locks order their writers.
* ``postgresql``: a server shared by every node, through psycopg 3 and a pool of connections
  (the optional extra ``anonproxy[postgresql]``). The connection string (libpq key words or a
  URI, password included) is read from ``state.dsn_file``, owner-only, never from the YAML.

The schema is versioned: :data:`MIGRATIONS` are applied in order when the store is opened
(:meth:`StateStore.open`), each in the transaction that records it in ``schema_migrations``,
under a lock (SQLite's write lock, PostgreSQL's advisory lock), so that nodes starting
together apply each once. A store whose schema is newer than this program is refused.

What it holds, and nothing else:

* ``patient_pseudonyms``: the lookup table (``anonproxy lookup import``) and the hash
  pseudonyms given to unknown patients under ``unknown_patient: hash``. The original Patient ID
  is stored as a keyed hash only (:mod:`anonproxy.patients` makes it), so a row never reveals
  it. A row never changes: the first pseudonym recorded for a patient is the patient's.
* ``reid_map``: the re-identification map (:mod:`anonproxy.remap`), one row per patient and
  study: the pseudonyms in clear, the originals as one AES-GCM blob this module cannot open.
* ``state_meta``: named values (the map key's check value).

Every failure to reach the store, or a time-out, is :class:`~anonproxy.errors.StateUnavailable`
(a transient error: an instance that needs the store gets 0xA700 and is sent again later).
Messages never carry a value of a row.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anonproxy.config import StateConfig
from anonproxy.errors import ConfigError, StateUnavailable

DEFAULT_SQLITE_NAME = "state.sqlite3"
_ADVISORY_LOCK = 0x616E6F6E  # "anon": PostgreSQL advisory lock held while migrating
_SQLITE_TIMEOUT_S = 30.0


def _schema_v1(blob: str) -> list[str]:
    return [
        f"CREATE TABLE state_meta (name TEXT PRIMARY KEY, value {blob} NOT NULL)",
        f"""CREATE TABLE patient_pseudonyms (
            original_key {blob} PRIMARY KEY,
            pseudonym TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL)""",
        f"""CREATE TABLE reid_map (
            entry_key {blob} PRIMARY KEY,
            patient_id TEXT NOT NULL,
            patient_name TEXT NOT NULL,
            accession_number TEXT NOT NULL,
            study_instance_uid TEXT NOT NULL,
            study_date TEXT NOT NULL,
            originals {blob} NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX reid_map_patient_id ON reid_map (patient_id)",
        "CREATE INDEX reid_map_study ON reid_map (study_instance_uid)",
    ]


#: The schema's versions, in order: (version, statements given the dialect's binary type).
#: Append a new version; never edit one that was released.
MIGRATIONS: tuple[tuple[int, Any], ...] = ((1, _schema_v1),)
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class MapRow:
    """One row of the re-identification map: the pseudonyms in clear, the originals sealed
    (:mod:`anonproxy.remap` seals and opens them; *entry_key* is their associated data)."""

    entry_key: bytes
    patient_id: str
    patient_name: str
    accession_number: str
    study_instance_uid: str
    study_date: str
    originals: bytes
    recorded_at: float

    def __repr__(self) -> str:
        return f"MapRow(entry_key={self.entry_key.hex()[:12]}…, originals=<sealed>)"


_MAP_COLUMNS = (  # fixed text: the statements below hold no value, only placeholders
    "entry_key, patient_id, patient_name, accession_number, study_instance_uid, study_date,"
    " originals, recorded_at"
)


class LookupConflict(Exception):
    """An imported row disagrees with the store (*index*: the row's position in the import)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


class _Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[object] = ()) -> Any: ...  # noqa: ANN401
    def fetchone(self) -> Any: ...  # noqa: ANN401
    def fetchall(self) -> list[Any]: ...
    @property
    def rowcount(self) -> int: ...


class _Backend(Protocol):
    blob: str

    def transaction(
        self, *, write: bool = False, lock: bool = False
    ) -> contextlib.AbstractContextManager[_Cursor]:
        """A transaction; its ``execute(sql, params)`` takes ``?`` placeholders. *write*: it
        writes (SQLite takes its write lock first); *lock*: it reads then writes and must run
        alone (PostgreSQL takes the store's advisory lock too)."""

    def close(self) -> None:
        """Close every connection."""


class _SqliteCursor:
    """``execute`` with ``?`` placeholders, as in SQLite."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._cursor = conn.cursor()

    def execute(self, sql: str, params: Sequence[object] = ()) -> _SqliteCursor:
        self._cursor.execute(sql, tuple(params))
        return self

    def fetchone(self) -> Any:  # noqa: ANN401 - a row
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed."""
        return int(self._cursor.rowcount or 0)


class _Sqlite:
    """One connection per thread to the store's file."""

    blob = "BLOB"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # owner-only; SQLite's -wal file follows
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self.transaction() as cur:
            cur.execute("SELECT 1")

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=_SQLITE_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False, lock: bool = False) -> Iterator[_SqliteCursor]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE" if write or lock else "BEGIN")
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state store: {_sqlite_reason(exc)}") from None
        try:
            yield _SqliteCursor(conn)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StateUnavailable(f"state store: {_sqlite_reason(exc)}") from None

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()


def _sqlite_reason(exc: sqlite3.Error) -> str:
    """SQLite's message names the failure (locked, disk I/O, not a database), not a value."""
    return str(exc).split(":", 1)[0][:80]


class _PgCursor:
    """``execute`` with ``?`` placeholders turned into psycopg's ``%s``."""

    def __init__(self, conn: Any) -> None:  # noqa: ANN401 - a psycopg connection
        self._cursor = conn.cursor()

    def execute(self, sql: str, params: Sequence[object] = ()) -> _PgCursor:
        self._cursor.execute(sql.replace("?", "%s"), tuple(params))
        return self

    def fetchone(self) -> Any:  # noqa: ANN401 - a row
        row = self._cursor.fetchone()
        return None if row is None else tuple(_plain(v) for v in row)

    def fetchall(self) -> list[Any]:
        return [tuple(_plain(v) for v in row) for row in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed."""
        return int(self._cursor.rowcount or 0)


def _plain(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value


class _Postgres:
    """A psycopg 3 connection pool."""

    blob = "BYTEA"

    def __init__(self, conninfo: str, *, pool_size: int, timeout_s: float) -> None:
        try:
            import psycopg  # noqa: PLC0415 - the optional extra anonproxy[postgresql]
            from psycopg_pool import ConnectionPool  # noqa: PLC0415
        except ImportError:
            msg = (
                "state.backend postgresql needs psycopg 3 and psycopg-pool: "
                "pip install 'anonproxy[postgresql]'"
            )
            raise ConfigError(msg) from None
        self._errors: tuple[type[BaseException], ...] = (psycopg.OperationalError,)
        from psycopg_pool import PoolTimeout  # noqa: PLC0415

        self._errors += (PoolTimeout,)
        self._timeout = timeout_s
        self._pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            kwargs={"connect_timeout": max(1, round(timeout_s))},
            open=False,
            name="anonproxy-state",
            # a connection the server closed (a restart) is replaced, not handed out
            check=ConnectionPool.check_connection,
        )
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False, lock: bool = False) -> Iterator[_PgCursor]:
        try:
            with self._pool.connection(timeout=self._timeout) as conn, conn.transaction():
                cursor = _PgCursor(conn)
                if lock:
                    cursor.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_LOCK,))
                yield cursor
        except self._errors as exc:
            raise StateUnavailable(f"state store: {type(exc).__name__}") from None

    def close(self) -> None:
        self._pool.close()


def read_dsn_file(path: Path) -> str:
    """The connection string in *path* (owner-only, else ConfigError; never logged)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        msg = f"state.dsn_file: cannot read {path}: {reason}"
        raise ConfigError(msg) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        msg = f"state.dsn_file: {path} must be readable by its owner only (chmod 600)"
        raise ConfigError(msg)
    if not text:
        msg = f"state.dsn_file: {path} is empty"
        raise ConfigError(msg)
    return text


class StateStore:
    """The store of one installation; thread-safe. Open it with :meth:`open`."""

    def __init__(self, backend: _Backend, description: str) -> None:
        self._backend = backend
        self.description = description  # backend and where, never a password

    @classmethod
    def open(cls, config: StateConfig, storage_path: Path, *, migrate: bool = True) -> StateStore:
        """Open the store of a ``state:`` section (and ``storage.path``) and apply the schema's
        migrations. ConfigError for a bad setting; StateUnavailable when it cannot be reached."""
        backend: _Backend
        if config.backend == "postgresql":
            if config.dsn_file is None:
                msg = "state.backend postgresql needs state.dsn_file"
                raise ConfigError(msg)
            backend = _Postgres(
                read_dsn_file(config.dsn_file),
                pool_size=config.pool_size,
                timeout_s=config.timeout_s,
            )
            description = "postgresql"
        else:
            path = config.path or storage_path / DEFAULT_SQLITE_NAME
            try:
                backend = _Sqlite(path)
            except OSError as exc:
                msg = f"state.path: cannot create {path}: {exc.strerror}"
                raise ConfigError(msg) from None
            description = f"sqlite {path}"
        store = cls(backend, description)
        if migrate:
            try:
                store.migrate()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        """Close the connections."""
        self._backend.close()

    # -- schema -----------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply the migrations not applied yet (in one transaction each, under the lock);
        the versions applied now. ConfigError when the store's schema is newer."""
        applied: list[int] = []
        with self._backend.transaction(write=True, lock=True) as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = cur.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                msg = (
                    f"the state store ({self.description}) has schema version {current},"
                    f" newer than this anonproxy's {SCHEMA_VERSION}: upgrade anonproxy"
                )
                raise ConfigError(msg)
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for sql in statements(self._backend.blob):
                    cur.execute(sql)
                cur.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                applied.append(version)
        return applied

    def schema_version(self) -> int:
        """The latest migration applied (0: none)."""
        with self._backend.transaction() as cur:
            row = cur.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    # -- named values -----------------------------------------------------------------------

    def meta_get(self, name: str) -> bytes | None:
        """The value named *name*, or None."""
        with self._backend.transaction() as cur:
            row = cur.execute("SELECT value FROM state_meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def meta_setdefault(self, name: str, value: bytes) -> bytes:
        """The value named *name*, recorded as *value* when there is none."""
        with self._backend.transaction(write=True, lock=True) as cur:
            cur.execute(
                "INSERT INTO state_meta (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, value),
            )
            row = cur.execute("SELECT value FROM state_meta WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    # -- patient pseudonyms -----------------------------------------------------------------

    def patient_pseudonym(self, original_key: bytes) -> str | None:
        """The pseudonym recorded for the patient whose keyed hash is *original_key*."""
        with self._backend.transaction() as cur:
            row = cur.execute(
                "SELECT pseudonym FROM patient_pseudonyms WHERE original_key = ?",
                (original_key,),
            ).fetchone()
        return None if row is None else str(row[0])

    def assign_patient(self, original_key: bytes, pseudonym: str, source: str) -> str:
        """Record *pseudonym* for the patient unless one is recorded already; the patient's
        pseudonym either way (the first writer wins, across processes and nodes).
        LookupConflict when *pseudonym* is another patient's."""
        with self._backend.transaction(write=True, lock=True) as cur:
            recorded, taken = _recorded(cur, original_key, pseudonym)
            if recorded is not None:
                return recorded
            if taken:
                raise LookupConflict(0, "the pseudonym is another patient's")
            _insert_patient(cur, original_key, pseudonym, source, time.time())
        return pseudonym

    def import_patients(self, rows: Sequence[tuple[bytes, str]]) -> tuple[int, int]:
        """Record ``(original_key, pseudonym)`` rows, all or none: ``(added, already
        there)``. LookupConflict (the first offending row's index) when a patient already has
        another pseudonym, or a pseudonym is already another patient's."""
        added = present = 0
        now = time.time()
        with self._backend.transaction(write=True, lock=True) as cur:
            for index, (key, pseudonym) in enumerate(rows):
                recorded, taken = _recorded(cur, key, pseudonym)
                if recorded == pseudonym:
                    present += 1
                    continue
                if recorded is not None:
                    raise LookupConflict(index, "this patient already has another pseudonym")
                if taken:
                    raise LookupConflict(index, "this pseudonym is already another patient's")
                _insert_patient(cur, key, pseudonym, "import", now)
                added += 1
        return added, present

    def patient_count(self) -> int:
        """How many patients have a pseudonym recorded."""
        with self._backend.transaction() as cur:
            return int(cur.execute("SELECT COUNT(*) FROM patient_pseudonyms").fetchone()[0])

    # -- re-identification map --------------------------------------------------------------

    def put_map_rows(self, rows: Sequence[MapRow]) -> int:
        """Record map rows in one transaction (a row already there is kept); rows added."""
        added = 0
        with self._backend.transaction(write=True) as cur:
            for r in rows:
                cur.execute(
                    f"INSERT INTO reid_map ({_MAP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
                    " ON CONFLICT DO NOTHING",
                    (
                        r.entry_key,
                        r.patient_id,
                        r.patient_name,
                        r.accession_number,
                        r.study_instance_uid,
                        r.study_date,
                        r.originals,
                        r.recorded_at,
                    ),
                )
                added += max(0, cur.rowcount)
        return added

    def map_rows(self, *, patient_id: str | None = None, study: str | None = None) -> list[MapRow]:
        """The map rows of a patient pseudonym or of a de-identified Study Instance UID."""
        column, value = (
            ("patient_id", patient_id) if patient_id is not None else ("study_instance_uid", study)
        )
        with self._backend.transaction() as cur:
            found = cur.execute(
                f"SELECT {_MAP_COLUMNS} FROM reid_map WHERE {column} = ?"  # noqa: S608 - fixed
                " ORDER BY recorded_at",
                (value,),
            ).fetchall()
        return [_map_row(r) for r in found]

    def map_count(self) -> int:
        """How many rows the map holds."""
        with self._backend.transaction() as cur:
            return int(cur.execute("SELECT COUNT(*) FROM reid_map").fetchone()[0])


def _map_row(r: Sequence[Any]) -> MapRow:
    return MapRow(
        bytes(r[0]),
        str(r[1]),
        str(r[2]),
        str(r[3]),
        str(r[4]),
        str(r[5]),
        bytes(r[6]),
        float(r[7]),
    )


def _recorded(cur: _Cursor, original_key: bytes, pseudonym: str) -> tuple[str | None, bool]:
    """The patient's recorded pseudonym (None: none yet), and whether *pseudonym* is recorded
    for another patient."""
    rows = cur.execute(
        "SELECT original_key, pseudonym FROM patient_pseudonyms"
        " WHERE original_key = ? OR pseudonym = ?",
        (original_key, pseudonym),
    ).fetchall()
    mine = [str(r[1]) for r in rows if bytes(r[0]) == original_key]
    return (mine[0] if mine else None), len(rows) > len(mine)


def _insert_patient(
    cur: _Cursor, original_key: bytes, pseudonym: str, source: str, when: float
) -> None:
    cur.execute(
        "INSERT INTO patient_pseudonyms (original_key, pseudonym, source, recorded_at)"
        " VALUES (?, ?, ?, ?)",
        (original_key, pseudonym, source, when),
    )

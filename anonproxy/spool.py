"""The durable spool between receiving and forwarding.

Layout under the storage path::

    spool/deferred/.recv-*          data sets being received (PHI: owner-only, sealed with
                                    storage.incoming_key_file; removed once answered, at
                                    start-up and when abandoned by an aborted association)
    spool/deferred/<name>.dcm       data sets received and acknowledged, waiting for
                                    de-identification (PHI: owner-only; see Spool.defer)
    spool/incoming/                 what versions before 0.2 received into (emptied at start)
    spool/tmp/                      de-identified instances being written (removed at start-up)
    spool/<destination>/<uid>_<version>.dcm
                                    de-identified instances waiting for that destination
                                    (one file per commit, see below)
    quarantine/<destination>/       instances a destination refused for good, with <uid>.json
    quarantine/rejected/            inputs refused before de-identification (PHI: owner-only,
                                    random names), with <name>.json: stage, status, reason

The commit of a de-identified instance (:meth:`Spool.commit`), and why it is crash-safe:

1. The instance is written once to ``spool/tmp`` and its data made durable (``fdatasync``: the
   content and its size, not the file's times, which nothing needs).
2. It is hard-linked into the queue folder of every destination it is routed to, under a name
   of its own: ``<uid>_<version>.dcm``, the de-identified SOP Instance UID (validated against
   the UID grammar: no path can be smuggled in) and a version that orders the commits of one
   UID (wall-clock nanoseconds, increasing within a process, and the process ID). A link never
   replaces a file: a name, once it exists, always holds the same complete data.
3. Every queue folder is synced (``fsync`` of the folder): the new names are durable. Commits
   running at the same time share these syncs (group commit,
   :class:`~anonproxy.durable.DirectorySync`): one that arrives while a sync of the folder runs
   waits for the next sync, which covers every commit that arrived meanwhile; none returns
   before a sync that started after its link.
4. :meth:`Spool.commit` returns, and only then does the C-STORE handler answer Success. The
   name in ``spool/tmp`` is removed without a sync: recovery empties that folder.

A crash before step 3 has completed may keep or lose each new name, but a name that survives
holds the whole instance, since its data was durable before the name existed (step 1 before
step 2): recovery never finds a partial file in a queue, only instances that were acknowledged
or that their sender, never answered, sends again. A crash after step 3 loses nothing. Each
step syncs what it changed once: the file's data once, each folder once per batch of commits.

An instance sent again has the same de-identified UID and gets a new version. A queue's index
holds one file per UID, the newest version: a newer version replaces a waiting older one (the
older file is removed unsent), and waits while an older one is being sent;
:meth:`DestinationQueue.done` removes only the file that was sent, then offers the newer one.
Recovery keeps the newest version of each UID.

A deferred data set (acknowledged on receipt) is committed with ``consume``: its de-identified
copy is linked into the queues under hidden names, the original is removed, and only then are
the names made visible. A crash before the original's removal leaves hidden links that
:meth:`Spool.recover` discards (the original is processed again); a crash after it leaves
hidden links that recovery makes visible. Either way a forward worker never sees an instance
whose original is still there, so processing it again never delivers it twice.

**Several processes** (``listen.processes``, :mod:`anonproxy.acceptors`) commit into one spool:
the service process, which owns the queues and the forward workers, and the acceptor
processes, whose :class:`Spool` is built with ``announce``: a commit tells the service of each
new queue file (:meth:`DestinationQueue.push` runs there) instead of indexing it in a queue
nobody takes from. What makes a commit durable is per file and per folder, so two processes
committing at once are as safe as two threads (each process groups its own folder syncs).
The byte and file counts that the quotas read (``storage.max_bytes``,
``storage.incoming_max_bytes``) are one :class:`SpoolCounters` in shared memory, counted up by
whichever process commits or keeps and down by whichever removes. A file another process is
committing is linked before it is synced: the rescan of the queue folders
(:meth:`DestinationQueue.load` with ``settle_s``) leaves files linked in the last seconds to
that process's announcement, so that a rescan never lets an unsynced newer version replace an
acknowledged older one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anonproxy.durable import DirectorySync, make_directories, sync_data, sync_directory
from anonproxy.errors import SpoolFullError
from anonproxy.file_names import NOT_QUEUES as NOT_QUEUES  # noqa: PLC0414 - exported here
from anonproxy.file_names import SPOOL_DEFERRED as _DEFERRED
from anonproxy.file_names import SPOOL_INCOMING as _INCOMING
from anonproxy.file_names import SPOOL_TMP as _TMP
from anonproxy.file_names import check_uid_name as check_uid_name  # noqa: PLC0414 - exported
from anonproxy.received import PREFIX as RECEIVING
from anonproxy.received import ReceivedFile
from anonproxy.received import settle as settle_received

SUFFIX = ".dcm"
_NAME = re.compile(r"^[0-9a-z-]{1,200}$")  # deferred and kept inputs: never a UID
_HIDDEN = ".pending"  # a de-identified instance linked, not yet visible: .<original>.<uid>.pending


_names = itertools.count()


def _unique() -> str:
    """A name unique within this storage (one service per storage folder: see its lock)."""
    return f"{os.getpid()}-{next(_names)}"


def _link_replacing(source: Path, target: Path) -> None:
    """Hard-link *source* as *target*, atomically replacing an existing *target* (quarantine
    and kept inputs: the same name again is the same instance again)."""
    try:
        os.link(source, target)
    except FileExistsError:
        temporary = target.with_name(f".{_unique()}.tmp")
        os.link(source, temporary)
        os.replace(temporary, target)


_VERSION = re.compile(r"^[0-9a-f]{24}$")
_last_version_ns = 0
_version_lock = threading.Lock()


def queue_file(uid: str) -> str:
    """A new file name for *uid* in a queue folder: ``<uid>_<version>.dcm``, the version newer
    than any this process made before (see the module's docstring)."""
    global _last_version_ns  # noqa: PLW0603 - one clock per process
    with _version_lock:
        _last_version_ns = max(time.time_ns(), _last_version_ns + 1)
        version = f"{_last_version_ns:016x}{os.getpid() & 0xFFFFFFFF:08x}"
    return f"{check_uid_name(uid)}_{version}{SUFFIX}"


def split_queue_file(file: str) -> tuple[str, str]:
    """The UID and the version of the queue file name *file*; the version is empty for a
    file named ``<uid>.dcm`` (put there by hand, or by an earlier release): older than any."""
    stem = file.removesuffix(SUFFIX)
    uid, _, version = stem.rpartition("_")
    return (uid, version) if uid and _VERSION.match(version) else (stem, "")


def _newer(file: str, than: str) -> bool:
    return split_queue_file(file)[1] > split_queue_file(than)[1]


def fsync_directory(path: Path) -> None:
    """Make a rename or link in *path* durable."""
    sync_directory(path)


def fsync_file(path: Path) -> None:
    """Make the content of the file *path* durable (or, for a folder, its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_directory(path: Path) -> None:
    """Create *path* (and its parents) if needed, readable by the owner only: it holds PHI."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


class SpoolCounters:
    """The spool's counts that its quotas read: bytes in the queues, bytes and number of the
    deferred data sets. In this process only (the default), or in shared memory for the
    acceptor processes (:meth:`shared`, handed to them when they are started); the first
    :class:`Spool` built on them measures the folders (``ready`` is then set)."""

    _BYTES, _DEFERRED_BYTES, _DEFERRED_COUNT, _READY = range(4)

    def __init__(self, values: Any = None, lock: Any = None) -> None:  # noqa: ANN401
        self.values = values if values is not None else [0, 0, 0, 0]
        self.lock = lock if lock is not None else threading.Lock()

    @classmethod
    def shared(cls, context: Any) -> SpoolCounters:  # noqa: ANN401 - a multiprocessing context
        """Counters in shared memory, with a lock of the multiprocessing *context*."""
        return cls(context.RawArray("q", 4), context.Lock())

    @property
    def ready(self) -> bool:
        return bool(self.values[self._READY])

    def set(self, queued: int, deferred_bytes: int, deferred_count: int) -> None:
        with self.lock:
            self.values[self._BYTES] = queued
            self.values[self._DEFERRED_BYTES] = deferred_bytes
            self.values[self._DEFERRED_COUNT] = deferred_count
            self.values[self._READY] = 1

    def add(self, queued: int = 0, deferred_bytes: int = 0, deferred_count: int = 0) -> None:
        """Add to the counts (a negative value removes; none goes below zero)."""
        with self.lock:
            for index, delta in (
                (self._BYTES, queued),
                (self._DEFERRED_BYTES, deferred_bytes),
                (self._DEFERRED_COUNT, deferred_count),
            ):
                if delta:
                    self.values[index] = max(0, self.values[index] + delta)

    def get(self, index: int) -> int:
        return int(self.values[index])


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        msg = "not a valid spool file name"
        raise ValueError(msg)
    return name


@dataclass
class QueueItem:
    """One instance waiting in a destination's queue: its de-identified UID and the file, one
    commit's version, to send."""

    name: str
    file: str
    not_before: float = 0.0
    attempts: int = 0
    first_seen: float = field(default_factory=time.time)


@dataclass
class Delivery:
    """The outcome of one instance at one destination, for a sender that waits for it
    (transparent routes)."""

    done: threading.Event = field(default_factory=threading.Event)
    status: int | None = None  # the destination's DIMSE status; None: not delivered
    reason: str | None = None


class DestinationQueue:
    """The pending instances of one destination: a directory plus an in-memory index.

    The index holds one item per de-identified UID: the newest version committed (see the
    module's docstring). Several forward workers of one destination take items from it; an
    item, and so a UID, is handed to one worker at a time. *removed* is told the size of every
    file the queue removes.
    """

    def __init__(self, directory: Path, removed: Callable[[int], None] | None = None) -> None:
        self.directory = directory
        self.sync_entries = DirectorySync(directory)  # shared by concurrent commits
        self._removed = removed
        self._pending: dict[str, QueueItem] = {}
        self._in_flight: set[str] = set()
        self._newer: dict[str, QueueItem] = {}  # UID in flight -> its newer version, waiting
        self._committing: set[str] = set()  # files linked by commits not yet pushed
        self._watchers: dict[str, list[Delivery]] = {}
        self._cond = threading.Condition()
        self._closed = False

    def path(self, item: QueueItem) -> Path:
        """The spool file of *item*."""
        return self.directory / item.file

    def load(self, settle_s: float = 0.0) -> list[str]:
        """Index the files in the directory (start-up recovery, files an operator put there),
        oldest first; returns those that were not indexed yet. An older version of a UID is
        removed. A file linked less than *settle_s* seconds ago (its inode changed) is left
        alone: another process may be committing it (see the module's docstring)."""
        entries = []
        recent = time.time() - settle_s
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # delivered meanwhile
                    stat = entry.stat()
                    if settle_s and stat.st_ctime > recent:
                        continue
                    entries.append((stat.st_mtime, entry.name))
        entries.sort()
        return [file for mtime, file in entries if self._index(file, mtime, found=True)]

    def expect(self, file: str) -> None:
        """A commit is about to link *file*: :meth:`load` leaves it alone until it is pushed
        (or abandoned), so that it never replaces an acknowledged older version before its
        own folder sync."""
        with self._cond:
            self._committing.add(file)

    def abandon(self, file: str) -> None:
        """The commit of *file* failed (its link is removed)."""
        with self._cond:
            self._committing.discard(file)

    def push(self, file: str) -> None:
        """Announce *file*, a committed ``<uid>_<version>.dcm``: it becomes the copy of its UID
        to send, replacing (removing) a waiting older version, or following one being sent.
        An older version than the one known is removed at once."""
        self._index(file, time.time())

    def _index(self, file: str, first_seen: float, *, found: bool = False) -> bool:
        """Index *file*; whether it was not known (nor being committed) before."""
        name = split_queue_file(file)[0]
        item = QueueItem(name, file, first_seen=first_seen)
        obsolete = None
        with self._cond:
            if found and file in self._committing:
                return False
            self._committing.discard(file)
            current = self._pending.get(name)
            if current is None:
                self._pending[name] = item
            elif name in self._in_flight:  # never removed here: it is being sent
                waiting = self._newer.get(name)
                if file in (current.file, getattr(waiting, "file", None)):
                    return False
                if _newer(file, current.file) and (waiting is None or _newer(file, waiting.file)):
                    self._newer[name] = item
                    obsolete = None if waiting is None else waiting.file
                else:
                    obsolete = file
            elif file == current.file:
                return False
            elif _newer(file, current.file):
                self._pending[name] = replace(current, file=file)  # its back-off stays
                obsolete = current.file
            else:
                obsolete = file
            self._cond.notify()
        if obsolete is not None:
            self._discard(obsolete)
        return obsolete != file

    def _discard(self, file: str) -> None:
        """Remove the file *file* of this queue (never one being sent)."""
        path = self.directory / file
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            if self._removed is not None:
                self._removed(size)

    def take(self, timeout: float) -> QueueItem | None:
        """The oldest due item not held by another worker, waiting up to *timeout* seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.time()
                wait = deadline - time.monotonic()
                next_due = None
                for item in self._pending.values():
                    if item.name in self._in_flight:
                        continue
                    if item.not_before <= now:
                        self._in_flight.add(item.name)
                        return item
                    next_due = min(next_due or item.not_before, item.not_before)
                if wait <= 0:
                    return None
                if next_due is not None:
                    wait = min(wait, max(next_due - now, 0.01))
                self._cond.wait(wait)
        return None

    def watch(self, name: str) -> Delivery:
        """Be told the outcome of *name* at this destination (register before it is put)."""
        delivery = Delivery()
        with self._cond:
            self._watchers.setdefault(name, []).append(delivery)
        return delivery

    def unwatch(self, name: str, delivery: Delivery) -> None:
        """Stop waiting for *name*."""
        with self._cond:
            watchers = self._watchers.get(name, [])
            if delivery in watchers:
                watchers.remove(delivery)
            if not watchers:
                self._watchers.pop(name, None)

    def done(self, item: QueueItem, status: int | None = 0, reason: str | None = None) -> None:
        """The item was delivered (or quarantined): remove its file, the copy that was sent.
        A newer version of its UID committed meanwhile is then offered (and the watchers wait
        for it); otherwise the UID is forgotten and its watchers told."""
        self._discard(item.file)
        with self._cond:
            self._in_flight.discard(item.name)
            newer = self._newer.pop(item.name, None)
            if newer is not None:
                self._pending[item.name] = newer
                self._cond.notify()
                return
            self._pending.pop(item.name, None)
            watchers = self._watchers.pop(item.name, [])
        for delivery in watchers:
            delivery.status, delivery.reason = status, reason
            delivery.done.set()

    def retry_later(self, item: QueueItem, delay: float) -> None:
        """Give the item back to the queue, due again after *delay* seconds (a newer version
        committed meanwhile takes its place, and the older file is removed unsent)."""
        with self._cond:
            item.attempts += 1
            item.not_before = time.time() + delay
            self._in_flight.discard(item.name)
            newer = self._newer.pop(item.name, None)
            if newer is not None:
                self._pending[item.name] = replace(item, file=newer.file)
            self._cond.notify()
        if newer is not None:
            self._discard(item.file)

    def retry_now(self) -> None:
        """Make every waiting item due now (operator's ``queue retry``)."""
        with self._cond:
            for item in self._pending.values():
                item.not_before = 0.0
            self._cond.notify_all()

    def stats(self) -> dict[str, float | int]:
        """Pending count, in-flight count, retrying count and age of the oldest (seconds)."""
        with self._cond:
            now = time.time()
            oldest = min((i.first_seen for i in self._pending.values()), default=now)
            return {
                "pending": len(self._pending),
                "in_flight": len(self._in_flight),
                "retrying": sum(1 for i in self._pending.values() if i.attempts),
                "oldest_age_s": round(now - oldest, 3),
            }

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        """Wake every waiting worker; :meth:`take` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Spool:
    """Durable store-and-forward spool shared by the SCP and the forward workers."""

    def __init__(
        self,
        root: Path,
        destinations: Iterable[str],
        *,
        max_bytes: int | None = None,
        min_free_bytes: int = 0,
        fsync: bool = True,
        incoming_max_bytes: int | None = None,
        counters: SpoolCounters | None = None,
        announce: Callable[[str, str], None] | None = None,
    ) -> None:
        self.root = root
        self.spool_dir = root / "spool"
        self.tmp_dir = self.spool_dir / _TMP
        self.incoming_dir = self.spool_dir / _INCOMING
        self.deferred_dir = self.spool_dir / _DEFERRED
        self.incoming_max_bytes = incoming_max_bytes
        self.quarantine_dir = root / "quarantine"
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.queues: dict[str, DestinationQueue] = {}
        self.counters = counters if counters is not None else SpoolCounters()
        # (destination, file) of each commit, told to the process that owns the queues
        self._announce = announce
        self.state_file = root / "state" / "queues.json"
        self.retry_request = root / "control" / "retry-now"
        self.rejected_dir = self.quarantine_dir / "rejected"
        make_directories(self.tmp_dir, sync=fsync)
        _private_directory(self.incoming_dir)
        _private_directory(self.deferred_dir)
        for name in destinations:
            directory = self.spool_dir / name
            make_directories(directory, sync=fsync)
            self.queues[name] = DestinationQueue(directory, self._forget)
        if not self.counters.ready:
            self._measure()
        # the deferred folder, open to flush it (a rename or removal in it) without opening it
        self._deferred_fd = (
            os.open(self.deferred_dir, os.O_RDONLY | os.O_DIRECTORY) if fsync else None
        )

    def recover(self) -> dict[str, int]:
        """Index what a previous run left in the spool; returns counts per destination.

        Only the running service calls this: it also removes partial writes, which were never
        acknowledged.
        """
        for stale in self.tmp_dir.iterdir():
            stale.unlink()
        settle_received(self.deferred_dir)  # kept, not yet renamed: renamed; the rest removed
        self.purge_incoming(0.0)
        self._measure()
        for queue in self.queues.values():
            self._settle_hidden(queue.directory)
        return {name: len(queue.load()) for name, queue in self.queues.items()}

    def _measure(self) -> None:
        self.counters.set(
            sum(_measure(queue.directory) for queue in self.queues.values()),
            _measure(self.deferred_dir),
            sum(1 for _ in self.deferred_dir.glob("*" + SUFFIX)),
        )

    @property
    def deferred_bytes(self) -> int:
        """Bytes of the deferred data sets (every process's)."""
        return self.counters.get(SpoolCounters._DEFERRED_BYTES)

    @property
    def deferred_count(self) -> int:
        """How many deferred data sets there are (every process's)."""
        return self.counters.get(SpoolCounters._DEFERRED_COUNT)

    @property
    def queued_bytes(self) -> int:
        """Bytes in the destinations' queues (``storage.max_bytes``)."""
        return self.counters.get(SpoolCounters._BYTES)

    def settle_run(self, run: str) -> None:
        """Finish or undo the deferred commits of the acceptor process whose deferred data sets
        are named ``<run>-*`` (it ended while committing; see :meth:`_settle_hidden`)."""
        for queue in self.queues.values():
            self._settle_hidden(queue.directory, run)

    def _settle_hidden(self, directory: Path, run: str = "") -> None:
        """Finish or undo the commits of deferred instances a crash interrupted (see the
        module's docstring): a hidden link whose original is gone is made visible, one whose
        original is still there is removed (the original will be processed again)."""
        changed = False
        for entry in os.scandir(directory):
            if not (entry.name.startswith("." + run) and entry.name.endswith(_HIDDEN)):
                continue
            original, _, stem = entry.name[1 : -len(_HIDDEN)].partition(".")
            if (self.deferred_dir / (original + SUFFIX)).exists():
                Path(entry.path).unlink()
            else:
                check_uid_name(split_queue_file(stem)[0])
                os.replace(entry.path, directory / (stem + SUFFIX))
            changed = True
        if changed and self.fsync:
            fsync_directory(directory)

    def rescan(self, settle_s: float = 0.0) -> dict[str, list[str]]:
        """Pick up files put in the queue directories by an operator (quarantine release) or
        committed by a process that ended before it announced them; returns them per
        destination. Files linked less than *settle_s* seconds ago are left to the process
        committing them (see the module's docstring)."""
        found = {name: queue.load(settle_s) for name, queue in self.queues.items()}
        if self.retry_request.exists():
            with contextlib.suppress(FileNotFoundError):
                self.retry_request.unlink()
            for queue in self.queues.values():
                queue.retry_now()
        return found

    def write_state(self) -> None:
        """Publish the queue statistics for ``anonproxy queue status``."""
        state = {
            "time": time.time(),
            "queues": {name: queue.stats() for name, queue in self.queues.items()},
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state), "utf-8")
        tmp.replace(self.state_file)

    def purge_rejected(self, older_than_s: float) -> int:
        """Delete kept rejected inputs (and their notes) older than *older_than_s* seconds."""
        now = time.time()
        count = 0
        if self.rejected_dir.is_dir():
            for path in self.rejected_dir.glob("*" + SUFFIX):
                if _age_s(path, now) >= older_than_s:
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                    count += 1
        return count

    def purge_incoming(self, older_than_s: float) -> int:
        """Delete received data sets untouched for *older_than_s* seconds: what an aborted
        association left half-received (it holds PHI and will never be processed)."""
        now = time.time()
        count = 0
        receiving = [p for p in self.deferred_dir.iterdir() if p.name.startswith(RECEIVING)]
        for path in [*self.incoming_dir.iterdir(), *receiving]:
            with contextlib.suppress(OSError):
                if older_than_s and path.stat().st_size == 0:
                    continue  # created ahead for the next data set (see anonproxy.received)
            if _age_s(path, now) >= older_than_s:
                path.unlink(missing_ok=True)
                count += 1
        return count

    def keep_rejected(self, source: Path, note: dict[str, object], name: str | None = None) -> Path:
        """Keep an input refused before de-identification (it holds PHI): owner-only access,
        a random file name (or *name*: keeping it again replaces it), and beside it
        ``<name>.json`` with *note* (why it was refused: never a value of the data set)."""
        _private_directory(self.rejected_dir)
        path = self.rejected_dir / f"{_check_name(name or uuid.uuid4().hex)}{SUFFIX}"
        note_path = path.with_suffix(".json")
        fd = os.open(note_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({**note, "time": time.time()}, handle)
        try:
            _link_replacing(source, path)
            path.chmod(0o600)
        except OSError:  # another file system: copy
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle, source.open("rb") as original:
                shutil.copyfileobj(original, handle)
        if self.fsync:
            fsync_file(path)
            fsync_file(note_path)
            fsync_directory(self.rejected_dir)
        return path

    # -- data sets acknowledged on receipt, waiting for de-identification ------------------

    def _deferred_directory_fd(self) -> int | None:
        """The deferred folder open for flushing it (None with ``fsync: false``)."""
        return self._deferred_fd

    def defer(self, received: ReceivedFile | Path, name: str) -> Path:
        """Keep the received data set *received* durably as *name* in ``spool/deferred``:
        its data flushed to disk (through the descriptor that wrote it), renamed within the
        folder, the folder flushed; returns its new path. A path (another folder) is flushed,
        renamed and the folder flushed alike. Raises :class:`SpoolFullError` when the deferred
        data sets reach ``incoming_max_bytes``, the disk is nearly full, or on an I/O error."""
        target = self.deferred_dir / f"{_check_name(name)}{SUFFIX}"
        if self.incoming_max_bytes is not None and self.deferred_bytes >= self.incoming_max_bytes:
            msg = "incoming spool quota reached"
            raise SpoolFullError(msg)
        self._check_free_space()
        try:
            if isinstance(received, ReceivedFile):
                size = received.keep(target, self._deferred_directory_fd())
            else:
                size = received.stat().st_size
                if self.fsync:
                    fsync_file(received)
                os.rename(received, target)
                if self.fsync:
                    fsync_directory(self.deferred_dir)
        except OSError as exc:
            target.unlink(missing_ok=True)  # not acknowledged: the sender sends it again
            msg = f"incoming spool write failed: {exc.strerror or type(exc).__name__}"
            raise SpoolFullError(msg) from None
        self.counters.add(deferred_bytes=size, deferred_count=1)
        return target

    def deferred(self) -> list[Path]:
        """The deferred data sets, in the order of their names."""
        return sorted(self.deferred_dir.glob("*" + SUFFIX))

    def consume(self, deferred: Path) -> None:
        """Remove a deferred data set durably: it was de-identified and committed, or kept
        as refused (the removal is what makes either final)."""
        size = deferred.stat().st_size
        deferred.unlink()
        directory = self._deferred_directory_fd()
        if directory is not None:
            os.fsync(directory)
        self.counters.add(deferred_bytes=-size, deferred_count=-1)

    def check_space(self) -> None:
        """Raise :class:`SpoolFullError` when the spool cannot take one more instance."""
        if self.max_bytes is not None and self.queued_bytes >= self.max_bytes:
            msg = "spool quota reached"
            raise SpoolFullError(msg)
        self._check_free_space()

    def _check_free_space(self) -> None:
        if self.min_free_bytes:
            free = shutil.disk_usage(self.spool_dir).free
            if free < self.min_free_bytes:
                msg = "free disk space below the spool's high-water mark"
                raise SpoolFullError(msg)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A new path in ``spool/tmp`` to write one instance to, removed on leaving (after
        :meth:`commit` has linked it). Raises :class:`SpoolFullError` when the spool cannot
        take one more instance."""
        tmp = self.stage()
        try:
            yield tmp
        finally:
            self.unstage(tmp)

    def stage(self) -> Path:
        """:meth:`staging` for a caller that removes the path itself (:meth:`unstage`)."""
        self.check_space()
        return self.tmp_dir / f"{_unique()}{SUFFIX}"

    @staticmethod
    def unstage(tmp: Path) -> None:
        """Remove a path of :meth:`stage` (linked by :meth:`commit`, or abandoned)."""
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

    def commit(
        self, tmp: Path, name: str, destinations: Iterable[str], *, consume: Path | None = None
    ) -> int:
        """Durably store the instance written at *tmp* (from :meth:`staging`) as *name* for
        *destinations*; returns its size in bytes. Raises :class:`SpoolFullError` on an I/O
        error (nothing committed). With *consume*, the deferred data set that *tmp*
        de-identifies is removed in the same commit (see the module's docstring)."""
        file = queue_file(name)  # raises ValueError for a name that is no UID
        destinations = list(destinations)
        targets = [self.queues[d] for d in destinations]
        link = file if consume is None else f".{consume.stem}.{file[: -len(SUFFIX)]}{_HIDDEN}"
        linked: list[Path] = []
        consuming = False
        try:
            size = tmp.stat().st_size
            if self.fsync:
                sync_data(tmp)
            for queue in targets:
                queue.expect(file)
                os.link(tmp, queue.directory / link)
                linked.append(queue.directory / link)
            if self.fsync:
                for queue in targets:
                    queue.sync_entries()
            if consume is not None:
                consuming = True
                self.consume(consume)  # the commit point
        except OSError as exc:
            if not consuming or consume is None or consume.exists():  # not committed: undo
                for path in linked:
                    path.unlink(missing_ok=True)
                for queue in targets:
                    queue.abandon(file)
                msg = f"spool write failed: {exc.strerror or type(exc).__name__}"
                raise SpoolFullError(msg) from None
            # the original is gone (its folder's sync failed): committed all the same
        if consume is not None:
            for queue in targets:  # not synced: recovery makes them visible after a crash
                with contextlib.suppress(OSError):
                    os.replace(queue.directory / link, queue.directory / file)
        self.counters.add(queued=size * len(targets))
        self._publish(destinations, file)
        return size

    def _publish(self, destinations: list[str], file: str) -> None:
        """A committed file becomes its destinations' to send: indexed in their queues, or in
        an acceptor process announced to the service process, which indexes it (the queues of
        an acceptor are not read)."""
        for destination in destinations:
            queue = self.queues[destination]
            if self._announce is None:
                queue.push(file)
            else:
                queue.abandon(file)
                self._announce(destination, file)

    def _forget(self, size: int) -> None:
        """A queue removed a file of *size* bytes."""
        self.counters.add(queued=-size)

    def release(
        self,
        queue: DestinationQueue,
        item: QueueItem,
        status: int | None = 0,
        reason: str | None = None,
    ) -> None:
        """An item left the spool (delivered, or quarantined with *reason*)."""
        queue.done(item, status, reason)

    def quarantine(
        self, destination: str, item: QueueItem, reason: str, status: int | None = None
    ) -> Path:
        """Move an item a destination refused for good into quarantine, with its reason."""
        queue = self.queues[destination]
        target_dir = self.quarantine_dir / destination
        make_directories(target_dir, sync=self.fsync)
        target = target_dir / (item.name + SUFFIX)
        note = {"reason": reason, "attempts": item.attempts + 1, "time": time.time()}
        (target_dir / (item.name + ".json")).write_text(json.dumps(note), "utf-8")
        with contextlib.suppress(FileNotFoundError):
            _link_replacing(queue.path(item), target)
        if self.fsync:
            fsync_directory(target_dir)
        self.release(queue, item, status, reason)
        return target

    def close(self) -> None:
        """Wake every worker waiting on a queue."""
        for queue in self.queues.values():
            queue.close()


# -- operator view (works on the storage folder, with or without a running service) ---------


def _measure(directory: Path) -> int:
    """Bytes of the files in *directory*."""
    total = 0
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            total += entry.stat().st_size
    return total


def _age_s(path: Path, now: float) -> float:
    with contextlib.suppress(OSError):
        return now - path.stat().st_mtime
    return 0.0


def queue_status(root: Path) -> dict[str, dict[str, object]]:
    """Per destination: pending files, age of the oldest, quarantined count, and the running
    service's view (in flight, retrying) when it published one."""
    now = time.time()
    spool_dir = root / "spool"
    state: dict[str, dict[str, object]] = {}
    with contextlib.suppress(OSError, ValueError):
        published = json.loads((root / "state" / "queues.json").read_text("utf-8"))
        state = published.get("queues", {})
    result: dict[str, dict[str, object]] = {}
    names = sorted(
        {p.name for p in spool_dir.iterdir() if p.is_dir() and p.name not in NOT_QUEUES}
        if spool_dir.is_dir()
        else set()
    )
    for name in names:
        files = list((spool_dir / name).glob("*" + SUFFIX))
        quarantined = list((root / "quarantine" / name).glob("*" + SUFFIX))
        result[name] = {
            "pending": len(files),
            "oldest_age_s": round(max((_age_s(f, now) for f in files), default=0.0), 1),
            "quarantined": len(quarantined),
            "retrying": state.get(name, {}).get("retrying", 0),
        }
    return result


def deferred_status(root: Path) -> dict[str, float | int]:
    """Data sets acknowledged on receipt and waiting for de-identification (count, bytes, age
    of the oldest), and inputs refused before de-identification kept in quarantine."""
    now = time.time()
    waiting = list((root / "spool" / _DEFERRED).glob("*" + SUFFIX))
    sizes = [path.stat().st_size for path in waiting if path.exists()]
    return {
        "waiting": len(waiting),
        "bytes": sum(sizes),
        "oldest_age_s": round(max((_age_s(p, now) for p in waiting), default=0.0), 1),
        "refused": len(list((root / "quarantine" / "rejected").glob("*" + SUFFIX))),
    }


def refused_inputs(root: Path) -> list[dict[str, object]]:
    """Every input refused before de-identification and kept in quarantine: its random name,
    the stage, status and reason of the refusal, its age."""
    now = time.time()
    entries: list[dict[str, object]] = []
    for path in sorted((root / "quarantine" / "rejected").glob("*" + SUFFIX)):
        note: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            note = json.loads(path.with_suffix(".json").read_text("utf-8"))
        entries.append(
            {
                "name": path.name,
                "stage": note.get("stage", "unknown"),
                "status": note.get("status", "unknown"),
                "reason": note.get("reason", "unknown"),
                "age_s": round(_age_s(path, now), 1),
            }
        )
    return entries


def quarantined(root: Path) -> list[dict[str, object]]:
    """Every quarantined instance: destination, de-identified UID, reason, attempts, age."""
    now = time.time()
    entries: list[dict[str, object]] = []
    base = root / "quarantine"
    if not base.is_dir():
        return entries
    for directory in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "rejected"):
        for path in sorted(directory.glob("*" + SUFFIX)):
            note: dict[str, object] = {}
            with contextlib.suppress(OSError, ValueError):
                note = json.loads(path.with_suffix(".json").read_text("utf-8"))
            entries.append(
                {
                    "destination": directory.name,
                    "uid": path.name[: -len(SUFFIX)],
                    "reason": note.get("reason", "unknown"),
                    "attempts": note.get("attempts", 0),
                    "age_s": round(_age_s(path, now), 1),
                }
            )
    return entries


def release_quarantined(root: Path, destination: str, uid: str) -> bool:
    """Put a quarantined instance back in its destination's queue."""
    check_uid_name(uid)
    source = root / "quarantine" / destination / (uid + SUFFIX)
    target_dir = root / "spool" / destination
    if not source.is_file() or not target_dir.is_dir():
        return False
    os.replace(source, target_dir / queue_file(uid))  # a new version: sent after any other
    with contextlib.suppress(FileNotFoundError):
        source.with_suffix(".json").unlink()
    return True


def purge_quarantined(root: Path, older_than_s: float = 0.0) -> int:
    """Delete quarantined instances (and kept rejected inputs) older than *older_than_s*."""
    now = time.time()
    count = 0
    base = root / "quarantine"
    if not base.is_dir():
        return 0
    for path in base.glob("*/*" + SUFFIX):
        if _age_s(path, now) >= older_than_s:
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            count += 1
    return count

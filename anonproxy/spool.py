"""The durable spool between receiving and forwarding.

Layout under the storage path::

    spool/incoming/                 data sets being received (PHI: owner-only, removed at
                                    start-up and when abandoned by an aborted association)
    spool/tmp/                      de-identified instances being written (removed at start-up)
    spool/<destination>/<uid>.dcm   de-identified instances waiting for that destination
    quarantine/<destination>/       instances a destination refused for good, with <uid>.json

An instance is written once to ``spool/tmp`` (write, fsync), then hard-linked into the queue
directory of every destination it is routed to, the directories are fsynced, and only then is
the temporary name removed. When :meth:`Spool.commit` returns, the instance survives a crash or
a SIGKILL; the C-STORE handler answers Success only after that. File names are de-identified
SOP Instance UIDs only, validated against the UID grammar (no path can be smuggled in).
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from anonproxy.errors import SpoolFullError

_UID_NAME = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SUFFIX = ".dcm"
_TMP, _INCOMING = "tmp", "incoming"
NOT_QUEUES = frozenset({_TMP, _INCOMING})  # folders of the spool that are no queue: reserved


def check_uid_name(uid: str) -> str:
    """Return *uid* if it is a valid UID usable as a file name, else raise ValueError."""
    if len(uid) > 64 or not _UID_NAME.match(uid):
        msg = "not a valid UID for a file name"
        raise ValueError(msg)
    return uid


_names = itertools.count()


def _unique() -> str:
    """A name unique within this storage (one service per storage folder: see its lock)."""
    return f"{os.getpid()}-{next(_names)}"


def _link_replacing(source: Path, target: Path) -> None:
    """Hard-link *source* as *target*, atomically replacing an existing *target* (a re-sent
    instance has the same de-identified UID, hence the same name)."""
    try:
        os.link(source, target)
    except FileExistsError:
        temporary = target.with_name(f".{_unique()}.tmp")
        os.link(source, temporary)
        os.replace(temporary, target)


def fsync_directory(path: Path) -> None:
    """Make a rename or link in *path* durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class QueueItem:
    """One instance waiting in a destination's queue."""

    name: str
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

    Several forward workers of one destination take items from it; an item is handed to one
    worker at a time.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pending: dict[str, QueueItem] = {}
        self._in_flight: set[str] = set()
        self._watchers: dict[str, list[Delivery]] = {}
        self._cond = threading.Condition()
        self._closed = False

    def path(self, name: str) -> Path:
        """The spool file of *name*."""
        return self.directory / (name + SUFFIX)

    def load(self) -> int:
        """Index the files already in the directory (start-up recovery), oldest first."""
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX):
                with contextlib.suppress(FileNotFoundError):  # delivered meanwhile
                    entries.append((entry.stat().st_mtime, entry.name[: -len(SUFFIX)]))
        entries.sort()
        with self._cond:
            for mtime, name in entries:
                self._pending.setdefault(name, QueueItem(name, first_seen=mtime))
            self._cond.notify_all()
        return len(entries)

    def push(self, name: str) -> None:
        """Announce a newly spooled instance."""
        with self._cond:
            if name not in self._pending:
                self._pending[name] = QueueItem(name)
            self._cond.notify()

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
        """The item was delivered (or quarantined): forget it and remove its spool file."""
        with contextlib.suppress(FileNotFoundError):
            self.path(item.name).unlink()
        with self._cond:
            self._in_flight.discard(item.name)
            self._pending.pop(item.name, None)
            watchers = self._watchers.pop(item.name, [])
        for delivery in watchers:
            delivery.status, delivery.reason = status, reason
            delivery.done.set()

    def retry_later(self, item: QueueItem, delay: float) -> None:
        """Give the item back to the queue, due again after *delay* seconds."""
        with self._cond:
            item.attempts += 1
            item.not_before = time.time() + delay
            self._in_flight.discard(item.name)
            self._cond.notify()

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
    ) -> None:
        self.root = root
        self.spool_dir = root / "spool"
        self.tmp_dir = self.spool_dir / _TMP
        self.incoming_dir = self.spool_dir / _INCOMING
        self.quarantine_dir = root / "quarantine"
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.queues: dict[str, DestinationQueue] = {}
        self._bytes_lock = threading.Lock()
        self.state_file = root / "state" / "queues.json"
        self.retry_request = root / "control" / "retry-now"
        self.rejected_dir = self.quarantine_dir / "rejected"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_dir.mkdir(exist_ok=True, mode=0o700)
        self.incoming_dir.chmod(0o700)
        for name in destinations:
            directory = self.spool_dir / name
            directory.mkdir(parents=True, exist_ok=True)
            self.queues[name] = DestinationQueue(directory)
        self._bytes = self._measure()

    def _measure(self) -> int:
        total = 0
        for queue in self.queues.values():
            for entry in os.scandir(queue.directory):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
        return total

    def recover(self) -> dict[str, int]:
        """Index what a previous run left in the spool; returns counts per destination.

        Only the running service calls this: it also removes partial writes, which were never
        acknowledged.
        """
        for stale in self.tmp_dir.iterdir():
            stale.unlink()
        self.purge_incoming(0.0)
        return {name: queue.load() for name, queue in self.queues.items()}

    def rescan(self) -> None:
        """Pick up files put in the queue directories by an operator (quarantine release)."""
        for queue in self.queues.values():
            queue.load()
        if self.retry_request.exists():
            with contextlib.suppress(FileNotFoundError):
                self.retry_request.unlink()
            for queue in self.queues.values():
                queue.retry_now()

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
        """Delete kept rejected inputs older than *older_than_s* seconds."""
        now = time.time()
        count = 0
        if self.rejected_dir.is_dir():
            for path in self.rejected_dir.glob("*" + SUFFIX):
                if _age_s(path, now) >= older_than_s:
                    path.unlink(missing_ok=True)
                    count += 1
        return count

    def purge_incoming(self, older_than_s: float) -> int:
        """Delete received data sets untouched for *older_than_s* seconds: what an aborted
        association left half-received (it holds PHI and will never be processed)."""
        now = time.time()
        count = 0
        for path in self.incoming_dir.iterdir():
            if _age_s(path, now) >= older_than_s:
                path.unlink(missing_ok=True)
                count += 1
        return count

    def keep_rejected(self, source: Path) -> Path:
        """Keep an input refused before de-identification (it holds PHI): owner-only access,
        a random file name."""
        self.rejected_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.rejected_dir.chmod(0o700)
        path = self.rejected_dir / f"{uuid.uuid4().hex}{SUFFIX}"
        try:
            os.link(source, path)
            path.chmod(0o600)
        except OSError:  # another file system: copy
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle, source.open("rb") as original:
                shutil.copyfileobj(original, handle)
        return path

    def _check_space(self) -> None:
        if self.max_bytes is not None and self._bytes >= self.max_bytes:
            msg = "spool quota reached"
            raise SpoolFullError(msg)
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
        self._check_space()
        tmp = self.tmp_dir / f"{_unique()}{SUFFIX}"
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def commit(self, tmp: Path, name: str, destinations: Iterable[str]) -> int:
        """Durably store the instance written at *tmp* (from :meth:`staging`) as *name* for
        *destinations*; returns its size in bytes. Raises :class:`SpoolFullError` on an I/O
        error."""
        check_uid_name(name)
        targets = [self.queues[d] for d in destinations]
        try:
            size = tmp.stat().st_size
            if self.fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for queue in targets:
                _link_replacing(tmp, queue.path(name))
                if self.fsync:
                    fsync_directory(queue.directory)
        except OSError as exc:
            msg = f"spool write failed: {exc.strerror or type(exc).__name__}"
            raise SpoolFullError(msg) from None
        with self._bytes_lock:
            self._bytes += size * len(targets)
        for queue in targets:
            queue.push(name)
        return size

    def release(
        self,
        queue: DestinationQueue,
        item: QueueItem,
        status: int | None = 0,
        reason: str | None = None,
    ) -> None:
        """An item left the spool (delivered, or quarantined with *reason*)."""
        with contextlib.suppress(OSError):
            size = queue.path(item.name).stat().st_size
            with self._bytes_lock:
                self._bytes = max(0, self._bytes - size)
        queue.done(item, status, reason)

    def quarantine(
        self, destination: str, item: QueueItem, reason: str, status: int | None = None
    ) -> Path:
        """Move an item a destination refused for good into quarantine, with its reason."""
        queue = self.queues[destination]
        target_dir = self.quarantine_dir / destination
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / (item.name + SUFFIX)
        note = {"reason": reason, "attempts": item.attempts + 1, "time": time.time()}
        (target_dir / (item.name + ".json")).write_text(json.dumps(note), "utf-8")
        with contextlib.suppress(FileNotFoundError):
            _link_replacing(queue.path(item.name), target)
        if self.fsync:
            fsync_directory(target_dir)
        self.release(queue, item, status, reason)
        return target

    def close(self) -> None:
        """Wake every worker waiting on a queue."""
        for queue in self.queues.values():
            queue.close()


# -- operator view (works on the storage folder, with or without a running service) ---------


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
    os.replace(source, target_dir / (uid + SUFFIX))
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

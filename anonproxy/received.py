"""The file a C-STORE data set is received into, as pynetdicom writes it, and how it is kept.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes the preamble, the file meta it builds from
the request and then each data set fragment as it arrives, into the object its
``NamedTemporaryFile`` returns; :mod:`anonproxy.scp` replaces that with :class:`ReceivedFile`:
owner-only (0600), under a hidden name (``.recv-*``, never a ``.dcm``) in the spool's
``deferred`` folder, and, with a key (``storage.incoming_key_file``), sealed as it arrives
(:mod:`anonproxy.sealed`): its plain text never reaches the disk.

**Kept with one flush.** Answering Success for a deferred data set needs its data and a
directory entry naming it on disk. A rename and two flushes (the file, then the folder: two
commits of the file system's journal, most of the time the sender waits for) would do; here
the sender waits for one:

* the files are created *ahead*, by a thread of its own, a few at a time, and the folder is
  flushed before any of them is handed out: the entry of the file a data set is received
  into is on disk before its first byte arrives;
* :meth:`ReceivedFile.keep` writes, in an extended attribute of the file (``user.anonproxy``),
  the name it is kept as, its length and the CRC-32 of its bytes, flushes the file (fsync:
  its data and that attribute, one commit), and only then renames it (not flushed: both
  names are understood after a crash).

After a crash, :func:`settle` (at start-up, before anything else reads the folder) renames each
hidden file whose attribute matches its length and bytes to the name it holds, and removes the
others: received in part, never answered (an attribute can be on disk before the data it
describes; the CRC tells). On a file system without user extended attributes, or for a file
created on demand (none was ready), keeping falls back to fdatasync, rename, fsync of the
folder. Closing a kept file (which can wait for the journal too) is left to that thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import re
import threading
import time
import zlib
from pathlib import Path

from anonproxy.sealed import Sealer

PREFIX = ".recv-"  # received, not (yet) kept: never listed as a deferred data set
_ATTRIBUTE = "user.anonproxy"
_KEPT = re.compile(rb"^kept ([0-9a-z-]{1,200}\.dcm) ([0-9]+) ([0-9a-f]{8})$")
# Files created ahead, made in batches of _BATCH (one flush of the folder each): the flushes
# of the folder cost the association's flushes as little as they can (a journal commits one
# flush at a time).
_AHEAD, _BATCH = 16, 8
_names = itertools.count()


def _create(directory: Path) -> tuple[Path, int]:
    path = directory / f"{PREFIX}{os.getpid()}-{next(_names)}"
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


class _Ahead:
    """Creates the files of one folder ahead (their entries flushed: *durable*) and closes
    kept ones, in threads of their own."""

    def __init__(self, directory: Path, durable: bool) -> None:
        self.directory = directory
        self.durable = durable
        self._spares: queue.Queue[tuple[Path, int]] = queue.Queue()
        self._wanted = _AHEAD  # files taken and not yet made again
        self._batch_wanted = threading.Condition()  # notified once _BATCH files are wanted
        self._closing: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.maker = threading.Thread(target=self._create, name="receive-ahead", daemon=True)
        self.maker.start()
        threading.Thread(target=self._close, name="receive-close", daemon=True).start()

    def take(self) -> tuple[Path, int, bool]:
        """A new file: its path, descriptor, and whether its entry is on disk already."""
        while True:
            try:
                path, fd = self._spares.get_nowait()
            except queue.Empty:
                return (*_create(self.directory), False)
            with self._batch_wanted:
                self._wanted += 1
                if self._wanted == _BATCH:  # the maker wakes once a batch, not at each file
                    self._batch_wanted.notify()
            if os.fstat(fd).st_nlink:  # not removed meanwhile (a restart's clean-up)
                return path, fd, self.durable
            os.close(fd)

    def close_later(self, fd: int) -> None:
        self._closing.put(fd)

    def _create(self) -> None:
        try:
            folder = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        while True:
            with self._batch_wanted:  # wait until a batch was taken
                while self._wanted < _BATCH:
                    self._batch_wanted.wait()
                wanted, self._wanted = self._wanted, 0
            made: list[tuple[Path, int]] = []
            try:
                for _ in range(wanted):
                    made.append(_create(self.directory))
                if self.durable:
                    os.fsync(folder)
            except OSError:  # the folder is gone (a test's), or full: created on demand
                for _, fd in made:
                    os.close(fd)
                os.close(folder)
                return
            for spare in made:
                self._spares.put(spare)

    def _close(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                os.close(self._closing.get())


_ahead: dict[tuple[Path, bool], _Ahead] = {}
_ahead_lock = threading.Lock()


def _for(directory: Path, durable: bool) -> _Ahead:
    with _ahead_lock:
        ahead = _ahead.get((directory, durable))
        if ahead is None:
            ahead = _ahead[(directory, durable)] = _Ahead(directory, durable)
        return ahead


class ReceivedFile:
    """One received data set's file: ``write``, ``name``, ``file.flush`` and ``close``, as
    pynetdicom uses its NamedTemporaryFile; unbuffered (pynetdicom writes whole fragments).
    *durable*: the files are to be kept durably (``storage.fsync``). *checksum*: most of them
    will be kept, so the CRC-32 of the kept mark is computed as the bytes are written; without
    it, only a file that is kept is read back for its CRC (an instance de-identified before
    its answer is never kept: no CRC of its bytes on the association's path)."""

    def __init__(
        self,
        directory: Path,
        key: bytes | None = None,
        durable: bool = True,
        *,
        checksum: bool = True,
    ) -> None:
        self.started = time.monotonic()  # the data set's first fragment arrived
        self._ahead = _for(directory, durable)
        self.path, self._fd, self._entry_on_disk = self._ahead.take()
        self.kept = False
        self._discarded = False
        self._sealer = Sealer(key) if key is not None else None
        self.size = 0  # bytes written to the disk
        self._crc: int | None = 0 if checksum else None  # None: read back if kept
        self.finished = False

    @property
    def name(self) -> str:
        """The path pynetdicom reports (``event.dataset_path``) and removes after the handler;
        nothing once kept or discarded (a kept file was renamed by then): removing a name that
        is not there would wait for the lock of the folder, where other data sets are being
        created and kept."""
        return "" if self.kept or self._discarded else str(self.path)

    @property
    def file(self) -> ReceivedFile:
        return self

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def _write_all(self, data: bytes) -> None:
        if self._crc is not None:
            self._crc = zlib.crc32(data, self._crc)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self.size += written
            view = view[written:]

    def write(self, data: bytes) -> int:
        if self._sealer is not None:
            data = self._sealer.update(data)
        self._write_all(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def finish(self) -> None:
        """The data set is complete: write what is left (the last sealed chunk). Idempotent."""
        if not self.finished:
            self.finished = True
            if self._sealer is not None:
                self._write_all(self._sealer.finish())

    def keep(self, target: Path, directory_fd: int | None) -> int:
        """Durably keep the finished file as *target* (in the same folder; see the module's
        docstring): on disk when this returns, unless *directory_fd* is None (no flush,
        ``storage.fsync: false``). Returns its size. Raises OSError."""
        self.finish()
        if directory_fd is None:
            os.rename(self.path, target)
        elif self._entry_on_disk and self._mark(target):
            os.fsync(self._fd)  # the data and the mark: one commit
            os.rename(self.path, target)  # settle() finishes it after a crash
        else:
            os.fdatasync(self._fd)
            os.rename(self.path, target)
            os.fsync(directory_fd)
        self.path = target.with_name(f"{PREFIX}kept-{target.name}")  # never removed again
        self.kept = True
        fd, self._fd = self._fd, -1
        self._ahead.close_later(fd)
        return self.size

    def _mark(self, target: Path) -> bool:
        """Write the kept mark; False when the file system has no user attributes."""
        crc = self._crc if self._crc is not None else _crc_of(self.path)
        mark = f"kept {target.name} {self.size} {crc:08x}".encode("ascii")
        try:
            os.setxattr(self._fd, _ATTRIBUTE, mark)
        except OSError as exc:
            if exc.errno in {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}:
                return False
            raise
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def discard(self) -> None:
        """Close and remove it (refused, processed, or abandoned), unless it was kept."""
        self.close()
        if not self.kept and not self._discarded:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._discarded = True


def _crc_of(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def settle(directory: Path) -> int:
    """At start-up: give each hidden file of *directory* that was kept (its mark matches its
    length and bytes) the name it was kept as, and remove the others (received in part,
    created ahead). Returns how many were renamed; the folder is flushed."""
    renamed = 0
    for entry in os.scandir(directory):
        if not entry.name.startswith(PREFIX):
            continue
        path = Path(entry.path)
        try:
            found = _KEPT.match(os.getxattr(path, _ATTRIBUTE))
        except OSError:
            found = None
        if found is not None:
            name, size, crc = found[1].decode("ascii"), int(found[2]), int(found[3], 16)
            if path.stat().st_size == size and _crc_of(path) == crc:
                os.replace(path, directory / name)
                renamed += 1
                continue
        path.unlink(missing_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return renamed

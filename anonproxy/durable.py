"""What makes a file or a name survive a crash, in one place.

* :func:`sync_data`: the content of a file (``fdatasync``: the data and what is needed to read
  it back, such as its size; not its times). Enough for a file that nobody changes once it is
  complete: its name is made durable by syncing the folder that holds it.
* :func:`sync_directory`: the entries of a folder (``fsync`` of the folder): a created, linked,
  renamed or removed name in it.
* :func:`make_directories`: create a folder and its missing parents, each new one made
  durable in its parent (a file in a folder whose own entry was lost is lost with it).
* :class:`DirectorySync`: :func:`sync_directory` shared by the threads that need the same
  folder synced at the same time (group commit).
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def sync_data(path: Path) -> None:
    """Make the content of the file *path* durable (not its times)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _fdatasync(fd)
    finally:
        os.close(fd)


def sync_directory(path: Path) -> None:
    """Make the entries of the folder *path* durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(path: Path, mode: int = 0o777, *, sync: bool = True) -> None:
    """Create the folder *path* and its missing parents (with *mode*, less the umask); with
    *sync*, the parent of every folder created is synced once they all exist."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:  # created meanwhile by another thread or process
            if not directory.is_dir():
                raise
    if sync:
        for directory in missing:
            sync_directory(directory.parent)


class _Batch:
    """The callers one sync of the folder covers."""

    __slots__ = ("error", "pending")

    def __init__(self) -> None:
        self.pending = True
        self.error: OSError | None = None


class DirectorySync:
    """Group commit of the entries of one folder: :meth:`__call__` returns once a sync of the
    folder that *started after the call* has completed.

    A caller that finds no sync running runs one itself (the leader); callers that arrive
    while it runs join the next batch, and when it ends one of them runs one sync for the
    whole batch while the others wait for it. So a link made before the call is covered (the
    sync that covers a caller starts after the caller joined its batch), and N concurrent
    callers cost about two syncs, not N. A failed sync fails every caller of its batch.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._next = _Batch()  # the batch the next sync covers: not started yet
        self._running = False
        self.syncs = 0  # syncs run (for tests and measurements)

    def __call__(self) -> None:
        with self._cond:
            batch = self._next
            while batch.pending and self._running:
                self._cond.wait()
            lead = batch.pending  # no sync running, and none has covered this batch yet
            if lead:
                self._running = True
                self._next = _Batch()
        if lead:
            try:
                sync_directory(self.path)
            except OSError as exc:
                batch.error = exc
            except BaseException:
                batch.error = OSError(errno.EINTR, "folder sync interrupted")
                raise
            finally:
                with self._cond:
                    self.syncs += 1
                    batch.pending = False
                    self._running = False
                    self._cond.notify_all()
        if batch.error is not None:
            error = batch.error
            raise OSError(error.errno, error.strerror, error.filename)

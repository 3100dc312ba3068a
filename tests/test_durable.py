"""What is synced: group commit of folder syncs, new folders synced into their parents (the
folder destination, the secret's folder)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from anonproxy import durable
from anonproxy.config import FolderDestinationConfig
from anonproxy.durable import DirectorySync, make_directories
from anonproxy.errors import ForwardError
from anonproxy.forward import FolderSender
from anonproxy.secret import load_secret

from builders import make_series


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths whose file descriptors are fsynced or fdatasynced, in order."""
    paths: list[Path] = []
    for name in ("fsync", "fdatasync"):
        original = getattr(os, name)

        def record(fd: int, original: object = original) -> None:
            paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            original(fd)  # type: ignore[operator]

        monkeypatch.setattr(os, name, record)
    monkeypatch.setattr(durable, "_fdatasync", os.fdatasync)
    return paths


def test_a_sync_covers_every_caller_that_arrived_before_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No caller returns before a sync that started after its call; concurrent callers share."""
    runs: list[tuple[float, float]] = []

    def slow_sync(path: Path) -> None:
        started = time.monotonic()
        time.sleep(0.02)
        runs.append((started, time.monotonic()))

    monkeypatch.setattr(durable, "sync_directory", slow_sync)
    sync = DirectorySync(tmp_path)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(5):
            called = time.monotonic()
            sync()
            with lock:
                calls.append((called, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 80
    assert len(runs) == sync.syncs < 40  # shared: one sync per caller would be 80
    for called, returned in calls:
        assert any(called <= start and end <= returned for start, end in runs)


def test_a_failed_sync_fails_every_caller_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    release = threading.Event()
    attempts: list[int] = []

    def failing(path: Path) -> None:
        attempts.append(1)
        if len(attempts) == 1:  # the first one blocks, the second one fails
            entered.set()
            release.wait(5)
            return
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "sync_directory", failing)
    sync = DirectorySync(tmp_path)
    results: list[str] = []

    def caller() -> None:
        try:
            sync()
            results.append("ok")
        except OSError as exc:
            results.append(exc.strerror or "")

    leader = threading.Thread(target=caller)
    leader.start()
    assert entered.wait(5)
    followers = [threading.Thread(target=caller) for _ in range(3)]
    for thread in followers:
        thread.start()
    time.sleep(0.1)  # all three wait for the next sync
    release.set()
    for thread in [leader, *followers]:
        thread.join(5)
    assert sorted(results) == ["Input/output error"] * 3 + ["ok"]
    assert len(attempts) == 2


def test_new_folders_are_synced_into_their_parents(tmp_path: Path, synced: list[Path]) -> None:
    (tmp_path / "a").mkdir()
    make_directories(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert set(synced) == {tmp_path / "a", tmp_path / "a" / "b"}
    synced.clear()
    make_directories(tmp_path / "a" / "b" / "c")  # nothing new: nothing synced
    assert synced == []


def test_the_folder_destination_syncs_the_file_and_every_folder_it_creates(
    tmp_path: Path, synced: list[Path]
) -> None:
    [source] = make_series(tmp_path / "in", 1)
    root = tmp_path / "out" / "root"  # neither exists yet
    sender = FolderSender(FolderDestinationConfig(type="folder", name="f", path=root))
    synced.clear()
    assert sender.send(source) == 0
    [written] = list(root.glob("*/*/*.dcm"))
    assert written.read_bytes() == source.read_bytes()
    series, study = written.parent, written.parent.parent
    assert written.name == f"{dcmread(source).SOPInstanceUID}.dcm"
    created_in = {tmp_path, tmp_path / "out", root, study}  # the parent of each new folder
    assert created_in <= set(synced)
    assert synced[-1] == series  # the file's own name, last
    assert not list(root.glob("*/*/.*"))  # no temporary left


def test_the_folder_destination_refuses_an_instance_without_uids(tmp_path: Path) -> None:
    [source] = make_series(tmp_path / "in", 1)
    dataset = dcmread(source)
    del dataset.SeriesInstanceUID
    dataset.save_as(source)
    sender = FolderSender(FolderDestinationConfig(type="folder", name="f", path=tmp_path / "o"))
    with pytest.raises(ForwardError, match="Series") as raised:
        sender.send(source)
    assert raised.value.permanent
    assert not (tmp_path / "o").exists()


def test_a_new_secret_is_synced_with_its_folder(tmp_path: Path, synced: list[Path]) -> None:
    storage = tmp_path / "var" / "lib"  # neither exists yet
    secret = load_secret(storage, environ={}, create=True)
    assert secret.created
    key = storage / "secret.key"
    assert synced.index(key) < synced.index(storage)  # the file, then its name
    assert {tmp_path, tmp_path / "var"} <= set(synced)  # the folders created for it

"""The durable spool: atomic put, fan-out, recovery, quota, quarantine, queue semantics."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from anonproxy.errors import SpoolFullError
from anonproxy.spool import Spool, check_uid_name, queue_file, queue_status, split_queue_file

UID = "2.25.123456789"


def put(spool: Spool, name: str, payload: bytes, destinations: list[str]) -> int:
    """Store *payload* as the pipeline does: written in a staging file, then committed."""
    with spool.staging() as staged:
        staged.write_bytes(payload)
        return spool.commit(staged, name, destinations)


def test_put_fans_out_to_every_destination_and_leaves_no_temporary(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a", "b"])
    size = put(spool, UID, b"DICM" * 10, ["a", "b"])
    assert size == 40
    for name in ("a", "b"):
        [file] = (tmp_path / "spool" / name).iterdir()
        assert split_queue_file(file.name)[0] == UID
        assert file.read_bytes() == b"DICM" * 10
        assert len(spool.queues[name]) == 1
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_recovery_indexes_what_a_previous_run_left(tmp_path: Path) -> None:
    put(Spool(tmp_path, ["a"]), UID, b"x", ["a"])
    (tmp_path / "spool" / "tmp" / "partial.dcm").write_bytes(b"half")
    again = Spool(tmp_path, ["a"])
    assert again.recover() == {"a": 1}
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # never acknowledged
    item = again.queues["a"].take(timeout=0.1)
    assert item is not None
    assert item.name == UID


def test_received_data_sets_are_owner_only_and_purged_when_abandoned(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])
    incoming = tmp_path / "spool" / "incoming"
    assert incoming.stat().st_mode & 0o777 == 0o700  # they hold PHI
    (incoming / "in-old.dcm").write_bytes(b"half a data set")
    (incoming / "in-new.dcm").write_bytes(b"being received")
    past = time.time() - 300
    os.utime(incoming / "in-old.dcm", (past, past))
    assert spool.purge_incoming(120) == 1
    assert [p.name for p in incoming.iterdir()] == ["in-new.dcm"]
    again = Spool(tmp_path, ["a"])
    again.recover()  # a restart: nothing is being received
    assert list(incoming.iterdir()) == []
    assert "incoming" not in queue_status(tmp_path)


def test_a_failing_write_leaves_nothing_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])

    def write_until_the_disk_is_full() -> None:
        with spool.staging() as staged:
            staged.write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_until_the_disk_is_full()
    assert list((tmp_path / "spool" / "a").iterdir()) == []
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    assert len(spool.queues["a"]) == 0


def test_quota_and_free_space_high_water_mark(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"], max_bytes=10)
    put(spool, "2.25.1", b"x" * 10, ["a"])
    with pytest.raises(SpoolFullError, match="quota"):
        put(spool, "2.25.2", b"y", ["a"])
    item = spool.queues["a"].take(timeout=0.1)
    assert item is not None
    spool.release(spool.queues["a"], item)
    put(spool, "2.25.2", b"y", ["a"])  # space came back
    huge = Spool(tmp_path / "h", ["a"], min_free_bytes=1 << 62)
    with pytest.raises(SpoolFullError, match="high-water"):
        put(huge, UID, b"x", ["a"])


@pytest.mark.parametrize("name", ["../etc/passwd", "1.2.3/../../x", "01.2", "", "1." * 40])
def test_file_names_are_validated_uids(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="UID"):
        check_uid_name(name)
    with pytest.raises(ValueError, match="UID"):
        put(Spool(tmp_path, ["a"]), name, b"x", ["a"])


def test_an_item_goes_to_one_worker_at_a_time_and_retries_later(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])
    put(spool, UID, b"x", ["a"])
    queue = spool.queues["a"]
    item = queue.take(timeout=0.1)
    assert item is not None
    assert queue.take(timeout=0.05) is None  # in flight elsewhere
    queue.retry_later(item, 0.2)
    assert queue.take(timeout=0.05) is None  # not due yet
    again = queue.take(timeout=2)
    assert again is not None
    assert again.attempts == 1
    assert queue.stats()["retrying"] == 1


def test_take_wakes_up_on_push_and_on_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])
    queue = spool.queues["a"]
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(queue.take(timeout=10)))
    waiter.start()
    time.sleep(0.05)
    put(spool, UID, b"x", ["a"])
    waiter.join(2)
    assert got
    assert got[0] is not None
    closer = threading.Thread(target=lambda: got.append(queue.take(timeout=10)))
    closer.start()
    started = time.monotonic()
    spool.close()
    closer.join(2)
    assert time.monotonic() - started < 2
    assert got[-1] is None


def test_quarantine_keeps_the_instance_and_its_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])
    put(spool, UID, b"x", ["a"])
    item = spool.queues["a"].take(timeout=0.1)
    assert item is not None
    target = spool.quarantine("a", item, "C-STORE status 0xC000 (Failure)")
    assert target.read_bytes() == b"x"
    note = json.loads(target.with_suffix(".json").read_text("utf-8"))
    assert note["reason"].startswith("C-STORE status 0xC000")
    assert list((tmp_path / "spool" / "a").iterdir()) == []
    assert len(spool.queues["a"]) == 0


def _files(spool: Spool, destination: str = "a") -> list[str]:
    return sorted(p.name for p in spool.queues[destination].directory.iterdir())


def test_an_instance_sent_again_while_its_copy_is_sent_is_sent_again(tmp_path: Path) -> None:
    """The newer acknowledged copy survives the delivery of the older one, and goes next."""
    spool = Spool(tmp_path, ["a"])
    queue = spool.queues["a"]
    put(spool, UID, b"first", ["a"])
    sending = queue.take(timeout=0.1)
    assert sending is not None
    assert queue.path(sending).read_bytes() == b"first"
    put(spool, UID, b"second", ["a"])  # acknowledged while the first is on its way
    assert queue.take(timeout=0.05) is None  # one copy of a UID in flight at a time
    spool.release(queue, sending)  # the first was delivered
    [file] = _files(spool)
    assert (queue.directory / file).read_bytes() == b"second"
    again = queue.take(timeout=0.1)
    assert again is not None
    assert again.name == UID
    assert queue.path(again).read_bytes() == b"second"
    spool.release(queue, again)
    assert _files(spool) == []
    assert len(queue) == 0


def test_a_newer_copy_replaces_a_waiting_or_failed_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])
    queue = spool.queues["a"]
    put(spool, UID, b"old", ["a"])
    put(spool, UID, b"new", ["a"])  # the old one was waiting: removed unsent
    [file] = _files(spool)
    assert (queue.directory / file).read_bytes() == b"new"
    item = queue.take(timeout=0.1)
    assert item is not None
    put(spool, UID, b"newest", ["a"])
    queue.retry_later(item, 0.0)  # the copy being sent failed: the newest takes its place
    [file] = _files(spool)
    assert (queue.directory / file).read_bytes() == b"newest"
    again = queue.take(timeout=0.1)
    assert again is not None
    assert again.attempts == 1
    assert queue.path(again).read_bytes() == b"newest"
    assert len(queue) == 1


def test_recovery_keeps_the_newest_version_of_each_uid(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a"])
    put(spool, UID, b"old", ["a"])
    item = spool.queues["a"].take(timeout=0.1)
    assert item is not None
    put(spool, UID, b"new", ["a"])  # the old copy is in flight: both on disk
    assert len(_files(spool)) == 2
    again = Spool(tmp_path, ["a"])  # a crash: the old copy was never marked delivered
    assert again.recover() == {"a": 2}
    [file] = _files(again)
    item = again.queues["a"].take(timeout=0.1)
    assert item is not None
    assert item.file == file
    assert again.queues["a"].path(item).read_bytes() == b"new"


def test_versions_order_commits_and_old_names_still_load(tmp_path: Path) -> None:
    names = [queue_file(UID) for _ in range(100)]
    assert names == sorted(names)
    assert len(set(names)) == 100
    assert {split_queue_file(name)[0] for name in names} == {UID}
    spool = Spool(tmp_path, ["a"])
    (tmp_path / "spool" / "a" / f"{UID}.dcm").write_bytes(b"by hand")  # version "": oldest
    spool.rescan()
    put(spool, UID, b"committed", ["a"])
    item = spool.queues["a"].take(timeout=0.1)
    assert item is not None
    assert spool.queues["a"].path(item).read_bytes() == b"committed"
    assert len(_files(spool)) == 1


def test_concurrent_commits_share_folder_syncs(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["a", "b"])
    barrier = threading.Barrier(8)

    def commit(n: int) -> None:
        barrier.wait()
        for k in range(10):
            put(spool, f"2.25.{n}{k}", b"x" * 1000, ["a", "b"])

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(spool.queues["a"]) == len(spool.queues["b"]) == 80
    for name in ("a", "b"):
        syncs = spool.queues[name].sync_entries.syncs
        assert 0 < syncs < 80  # some commits shared a sync (1 per commit without grouping)


def test_a_failed_folder_sync_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, ["a"])

    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("anonproxy.durable.sync_directory", broken)
    with pytest.raises(SpoolFullError, match="Input/output error"):
        put(spool, UID, b"x", ["a"])
    assert _files(spool) == []
    assert len(spool.queues["a"]) == 0


def test_a_rescan_during_a_commit_never_removes_the_acknowledged_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newer copy is linked but its folder sync fails: the older, acknowledged copy stays,
    even though a rescan ran while the newer one was linked."""
    spool = Spool(tmp_path, ["a"])
    queue = spool.queues["a"]
    put(spool, UID, b"acknowledged", ["a"])

    def rescan_then_fail() -> None:
        spool.rescan()  # the periodic pick-up of files put there by an operator
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(queue, "sync_entries", rescan_then_fail)
    with pytest.raises(SpoolFullError):
        put(spool, UID, b"never acknowledged", ["a"])
    monkeypatch.undo()
    [file] = _files(spool)
    assert (queue.directory / file).read_bytes() == b"acknowledged"
    item = queue.take(timeout=0.1)
    assert item is not None
    assert queue.path(item).read_bytes() == b"acknowledged"
    spool.release(queue, item)
    put(spool, UID, b"later", ["a"])  # the failed commit left nothing that blocks a later one
    [file] = _files(spool)
    assert (queue.directory / file).read_bytes() == b"later"


def test_a_rescan_reports_only_the_files_no_commit_announced(tmp_path: Path) -> None:
    """What an acceptor process committed and never announced (it was killed in between) is
    found by the service's rescan, once; what was announced is never reported."""
    service = Spool(tmp_path, ["a"])
    announced: list[tuple[str, str]] = []
    acceptor = Spool(tmp_path, ["a"], announce=lambda *message: announced.append(message))
    put(acceptor, UID, b"announced", ["a"])
    service.queues["a"].push(announced[0][1])
    put(acceptor, "2.25.42", b"killed before its announcement", ["a"])
    [(_, unannounced)] = announced[1:]
    assert service.rescan() == {"a": [unannounced]}
    assert service.rescan() == {"a": []}
    assert len(service.queues["a"]) == 2

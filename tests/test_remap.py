"""The re-identification map (anonproxy.remap): one entry per patient and study, journaled
durably and shipped to the state store, originals encrypted at rest (neither the journal nor
the store holds one as bytes), unreadable and unwritable with another key; a journal entry a
killed process did not ship is shipped by the next start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anonproxy.config import StateConfig
from anonproxy.deid.identity import StudyIdentity, StudyValues
from anonproxy.errors import StateUnavailable
from anonproxy.remap import (
    MAP_KEY_FILE_ENV,
    MapKey,
    MapKeyError,
    MapRecorder,
    find,
    journal_rows,
    load_map_key,
    verify_key,
)
from anonproxy.state import StateStore

KEY = MapKey(bytes(range(32)), "test")
OTHER_KEY = MapKey(bytes(range(1, 33)), "other")

PLANTED = StudyValues(
    patient_id="PLANTED-MRN-55102",
    patient_name="Plantedname^Agatha",
    accession_number="PLANTACC-7781",
    study_instance_uid="1.2.826.0.1.3680043.10.777.424242",
    study_date="19730415",
)
PLANTED_BYTES = [
    b"PLANTED-MRN",
    b"Plantedname",
    b"Agatha",
    b"PLANTACC",
    b"424242",
    b"19730415",
]


def _identity(original: StudyValues, n: int = 0) -> StudyIdentity:
    return StudyIdentity(
        original,
        StudyValues(
            f"ANON-{n:04d}", f"ANON-{n:04d}", f"ACC{n:04d}", f"2.25.{n + 1000}", "20010101"
        ),
    )


def _other_study(n: int) -> StudyValues:
    return StudyValues(
        PLANTED.patient_id, PLANTED.patient_name, f"PLANTACC-{n}", f"1.2.3.{n}", PLANTED.study_date
    )


def _recorder(storage: Path, store: StateStore, key: MapKey = KEY) -> MapRecorder:
    verify_key(store, key)
    recorder = MapRecorder(key, store, storage)
    recorder.open()
    return recorder


def test_originals_are_encrypted_at_rest(state_config: StateConfig, tmp_path: Path) -> None:
    storage = tmp_path / "var"
    store = StateStore.open(state_config, storage)
    try:
        recorder = _recorder(storage, store)
        assert recorder.record(_identity(PLANTED, 1))
        recorder.close()
        found = find(store, KEY, patient_id="ANON-0001")
        assert [f.original for f in found] == [PLANTED]
        assert found[0].pseudonym.study_instance_uid == "2.25.1001"
        assert find(store, KEY, study="2.25.1001")[0].original == PLANTED
        with pytest.raises(MapKeyError, match="not the key"):  # another key reads nothing
            find(store, OTHER_KEY, patient_id="ANON-0001")
        with pytest.raises(MapKeyError, match="not the key"):  # and writes nothing
            verify_key(store, OTHER_KEY)
        row = store.map_rows(patient_id="ANON-0001")[0]
        with pytest.raises(MapKeyError, match="does not open"):
            OTHER_KEY.open(row.entry_key, row.originals)
        with pytest.raises(MapKeyError, match="does not open"):  # bound to its own row
            KEY.open(b"\x00" * 32, row.originals)
    finally:
        store.close()
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert any(p.name == "journal.jsonl" for p in files)
    for path in files:
        data = path.read_bytes()
        for planted in PLANTED_BYTES:
            assert planted not in data, (path.name, planted)
    for planted in PLANTED_BYTES:
        assert planted.decode() not in repr(_identity(PLANTED))


def test_one_entry_per_patient_and_study(tmp_path: Path) -> None:
    store = StateStore.open(StateConfig(), tmp_path)
    try:
        recorder = _recorder(tmp_path, store)
        new = [recorder.record(_identity(PLANTED, 1)) for _ in range(50)]
        assert new == [True] + [False] * 49
        assert recorder.record(_identity(_other_study(2), 2))
        assert store.map_count() == 2
        assert len(list(journal_rows(tmp_path))) == 2
        recorder.close()
        again = _recorder(tmp_path, store)  # a restart: the journal tells what is known
        assert not again.record(_identity(PLANTED, 1))
        assert len(list(journal_rows(tmp_path))) == 2
        again.close()
    finally:
        store.close()


class _Down:
    """A store that cannot be reached (wraps a real one for everything else)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def put_map_rows(self, rows: object) -> int:
        raise StateUnavailable("state store: down")

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_an_unreachable_store_keeps_the_entry_journaled_and_refuses(tmp_path: Path) -> None:
    store = StateStore.open(StateConfig(), tmp_path)
    try:
        recorder = MapRecorder(KEY, _Down(store), tmp_path)  # type: ignore[arg-type]
        recorder.open()
        with pytest.raises(StateUnavailable):
            recorder.record(_identity(PLANTED, 1))
        with pytest.raises(StateUnavailable):  # still pending: asked again, refused again
            recorder.record(_identity(PLANTED, 1))
        assert recorder.pending == 1
        recorder.store = store  # the store is back: the next record ships both
        assert recorder.record(_identity(_other_study(2), 2))
        assert recorder.pending == 0
        assert store.map_count() == 2
        recorder.close()
    finally:
        store.close()


_KILLED = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_remap import KEY, PLANTED, _Down, _identity, _other_study
from anonproxy.config import StateConfig
from anonproxy.errors import StateUnavailable
from anonproxy.remap import MapRecorder
from anonproxy.state import StateStore

storage = Path({storage!r})
store = StateStore.open(StateConfig(), storage)
recorder = MapRecorder(KEY, _Down(store), storage)
recorder.open()
for n in range(3):
    try:
        recorder.record(_identity(_other_study(n) if n else PLANTED, n))
    except StateUnavailable:
        pass
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_entries_journaled_by_a_killed_process_are_shipped_at_the_next_start(
    tmp_path: Path,
) -> None:
    script = _KILLED.format(tests=str(Path(__file__).parent), storage=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=False)
    assert done.returncode == -9
    assert len(list(journal_rows(tmp_path))) == 3
    store = StateStore.open(StateConfig(), tmp_path)
    try:
        assert store.map_count() == 0
        recorder = MapRecorder(KEY, store, tmp_path)
        assert recorder.open() == 3
        assert store.map_count() == 3
        assert [f.original for f in find(store, KEY, patient_id="ANON-0000")] == [PLANTED]
        recorder.close()
        assert MapRecorder(KEY, store, tmp_path).open() == 0  # shipped once
    finally:
        store.close()


def test_a_line_cut_by_a_crash_is_dropped(tmp_path: Path) -> None:
    store = StateStore.open(StateConfig(), tmp_path)
    try:
        recorder = _recorder(tmp_path, store)
        recorder.record(_identity(PLANTED, 1))
        recorder.close()
        journal = tmp_path / "map" / "journal.jsonl"
        whole = journal.read_bytes()
        with journal.open("ab") as handle:
            handle.write(b'{"k": "00ab')  # a write cut short: never synced, never acknowledged
        again = _recorder(tmp_path, store)
        assert journal.read_bytes() == whole
        assert again.record(_identity(_other_study(2), 2))
        assert len(list(journal_rows(tmp_path))) == 2
        again.close()
    finally:
        store.close()


def test_the_map_key_file(tmp_path: Path) -> None:
    with pytest.raises(MapKeyError, match="neither read nor written"):
        load_map_key(tmp_path, {})
    created = load_map_key(tmp_path, {}, create=True)
    assert created.created
    assert (tmp_path / "map.key").stat().st_mode & 0o777 == 0o600
    assert load_map_key(tmp_path, {}).value == created.value
    elsewhere = tmp_path / "broker.key"
    elsewhere.write_text(os.urandom(32).hex())
    elsewhere.chmod(0o640)
    with pytest.raises(MapKeyError, match="owner only"):
        load_map_key(tmp_path, {MAP_KEY_FILE_ENV: str(elsewhere)})
    elsewhere.chmod(0o600)
    key = load_map_key(tmp_path, {MAP_KEY_FILE_ENV: str(elsewhere)})
    assert key.value != created.value
    assert "value=<redacted>" in repr(key)


def test_a_journal_write_that_fails_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from anonproxy import remap

    store = StateStore.open(StateConfig(), tmp_path)
    try:
        recorder = _recorder(tmp_path, store)
        recorder.record(_identity(PLANTED, 1))
        journal = tmp_path / "map" / "journal.jsonl"
        before = journal.read_bytes()
        real_write = os.write
        calls: list[int] = []

        def full_disk(fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data)[:10])  # a short write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(remap.os, "write", full_disk)
        with pytest.raises(OSError, match="No space"):
            recorder.record(_identity(_other_study(2), 2))
        monkeypatch.setattr(remap.os, "write", real_write)
        assert journal.read_bytes() == before
        assert recorder.record(_identity(_other_study(2), 2))  # recorded once there is room
        assert len(list(journal_rows(tmp_path))) == 2
        assert store.map_count() == 2
        recorder.close()
    finally:
        store.close()


def test_a_long_journal_all_shipped_is_emptied_at_start(tmp_path: Path) -> None:
    store = StateStore.open(StateConfig(), tmp_path)
    try:
        recorder = _recorder(tmp_path, store)
        for n in range(5):
            recorder.record(_identity(_other_study(n), n))
        recorder.close()
        journal = tmp_path / "map" / "journal.jsonl"
        assert journal.stat().st_size > 1000
        again = MapRecorder(KEY, _Down(store), tmp_path)  # type: ignore[arg-type]
        again.compact_bytes = 1000
        again.open()  # everything already shipped: emptied
        assert journal.stat().st_size == 0
        again.close()
        third = MapRecorder(KEY, store, tmp_path)
        third.compact_bytes = 1000
        third.open()
        assert third.record(_identity(_other_study(1), 1))  # journaled again, once
        assert not third.record(_identity(_other_study(1), 1))
        assert len(list(journal_rows(tmp_path))) == 1
        assert store.map_count() == 5  # the store kept every entry
        third.close()
    finally:
        store.close()

"""The sealed incoming spool (storage.incoming_key_file): the chunked AES-GCM format, its key
file, what start-up refuses, and keeping a received file with one flush (anonproxy.received)."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import pytest

from anonproxy import received as received_module
from anonproxy.errors import ConfigError
from anonproxy.received import ReceivedFile, settle
from anonproxy.sealed import CHUNK, Sealer, SealError, check_waiting, load_key, opened

from peers import wait_for

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def _seal(path: Path, plain: bytes, key: bytes = KEY, chunk: int = CHUNK, step: int = 7000) -> Path:
    sealer = Sealer(key, chunk)
    with path.open("wb") as handle:
        for start in range(0, len(plain), step):  # as fragments arrive
            handle.write(sealer.update(plain[start : start + step]))
        handle.write(sealer.finish())
    return path


def _open(path: Path, key: bytes | None = KEY) -> bytes:
    with opened(path, key) as plain:
        return plain.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 100, 4096, 4097, 3 * 4096, 3 * 4096 + 5])
def test_sealed_files_open_to_their_plain_text_whatever_their_length(
    tmp_path: Path, size: int
) -> None:
    plain = os.urandom(size)
    path = _seal(tmp_path / "x", plain, chunk=4096, step=1000)
    assert plain[:16] not in path.read_bytes() or size < 4
    assert _open(path) == plain


def test_a_plain_file_opens_as_itself(tmp_path: Path) -> None:
    path = tmp_path / "plain.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    with opened(path, KEY) as plain:
        assert plain == path


def test_every_alteration_fails_authentication(tmp_path: Path) -> None:
    plain = os.urandom(5 * 4096 + 10)
    sealed = _seal(tmp_path / "x", plain, chunk=4096).read_bytes()
    block = 4096 + 16
    header = 36
    altered = {
        "byte flipped in a chunk": sealed[:100] + bytes([sealed[100] ^ 1]) + sealed[101:],
        "byte flipped in the salt": sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:],
        "cut at a chunk boundary": sealed[: header + 2 * block],
        "last chunk dropped": sealed[: header + 5 * block],
        "tail cut": sealed[:-1],
        "chunks swapped": sealed[:header]
        + sealed[header + block : header + 2 * block]
        + sealed[header : header + block]
        + sealed[header + 2 * block :],
        "empty after the header": sealed[:header],
    }
    for what, data in altered.items():
        path = tmp_path / "altered"
        path.write_bytes(data)
        with pytest.raises(SealError, match=r"authentication|cut short"):
            _open(path)
        assert what


def test_another_key_or_none_is_told_apart_from_tampering(tmp_path: Path) -> None:
    path = _seal(tmp_path / "x", b"data")
    with pytest.raises(SealError, match="another key"):
        _open(path, OTHER)
    with pytest.raises(SealError, match=r"no storage\.incoming_key_file"):
        _open(path, None)


def test_the_key_file_must_be_owner_only_and_hold_256_bits(tmp_path: Path) -> None:
    raw = tmp_path / "raw.key"
    raw.write_bytes(KEY)
    raw.chmod(0o600)
    assert load_key(raw) == KEY
    text = tmp_path / "hex.key"
    text.write_text(KEY.hex() + "\n")
    text.chmod(0o400)
    assert load_key(text) == KEY
    raw.chmod(0o640)
    with pytest.raises(ConfigError, match=r"storage.incoming_key_file: .* owner only"):
        load_key(raw)
    short = tmp_path / "short.key"
    short.write_bytes(KEY[:16])
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="32 random bytes"):
        load_key(short)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing.key")


def test_start_up_refuses_sealed_data_sets_it_cannot_open(tmp_path: Path) -> None:
    waiting = [_seal(tmp_path / "a.dcm", b"one"), _seal(tmp_path / "b.dcm", b"two")]
    check_waiting(waiting, KEY)  # the right key: nothing to say
    with pytest.raises(ConfigError, match="2 received data sets wait sealed; configure"):
        check_waiting(waiting, None)
    with pytest.raises(ConfigError, match="2 received data sets wait sealed with another key"):
        check_waiting(waiting, OTHER)
    plain = tmp_path / "c.dcm"
    plain.write_bytes(b"\0" * 132)
    check_waiting([plain], None)  # plain ones need no key


def _received(directory: Path, data: bytes, key: bytes | None = None) -> ReceivedFile:
    received = ReceivedFile(directory, key)
    received.write(data)
    received.finish()
    return received


def test_a_kept_file_survives_a_crash_before_its_rename_and_a_partial_one_does_not(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "deferred"
    folder.mkdir()
    ahead = received_module._for(folder, durable=True)
    assert wait_for(lambda: ahead._spares.qsize() >= 3, timeout=10)  # created, folder flushed
    fd = os.open(folder, os.O_RDONLY)
    try:
        kept = _received(folder, b"x" * 5000, KEY)
        assert kept.keep(folder / "k-1.dcm", fd) == (folder / "k-1.dcm").stat().st_size
        assert (folder / "k-1.dcm").stat().st_mode & 0o777 == 0o600
        # a crash after the flush, before the rename reached the disk: the mark is there
        os.rename(folder / "k-1.dcm", folder / ".recv-crashed-1")
        # a crash while receiving: no mark; and one whose data did not all reach the disk
        _received(folder, b"partial")
        cut = _received(folder, b"y" * 5000)
        cut.keep(folder / "k-2.dcm", fd)
        with (folder / "k-2.dcm").open("r+b") as handle:
            handle.truncate(4000)
        os.rename(folder / "k-2.dcm", folder / ".recv-crashed-2")
    finally:
        os.close(fd)
    assert settle(folder) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["k-1.dcm"]
    assert _open(folder / "k-1.dcm") == b"x" * 5000


def test_without_checksum_a_kept_file_gets_the_same_mark_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file received without *checksum* (acknowledged after de-identification: rarely
    kept) computes no CRC while it is written; kept all the same, its mark is the one a
    checksummed file gets, so settle() keeps it after a crash."""
    folder = tmp_path / "deferred"
    folder.mkdir()
    crcs: list[int] = []
    crc32 = zlib.crc32
    monkeypatch.setattr(received_module.zlib, "crc32", lambda *a: crcs.append(1) or crc32(*a))
    ahead = received_module._for(folder, durable=True)
    assert wait_for(lambda: ahead._spares.qsize() >= 2, timeout=10)  # entries on disk: marked
    fd = os.open(folder, os.O_RDONLY)
    try:
        marks = []
        for checksum in (True, False):
            received = ReceivedFile(folder, checksum=checksum)
            crcs.clear()
            for chunk in (b"a" * 3000, b"b" * 70000, b"c"):
                received.write(chunk)
            received.finish()
            assert bool(crcs) is checksum  # computed as written, or not at all
            target = folder / f"k-{int(checksum)}.dcm"
            received.keep(target, fd)
            marks.append(os.getxattr(target, "user.anonproxy").replace(target.name.encode(), b""))
            os.rename(target, folder / f".recv-crashed-{checksum}")  # its rename lost
    finally:
        os.close(fd)
    assert marks[0] == marks[1]
    assert settle(folder) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["k-0.dcm", "k-1.dcm"]


def test_once_kept_or_discarded_a_received_file_gives_pynetdicom_no_name_to_remove(
    tmp_path: Path,
) -> None:
    """pynetdicom removes ``name`` after the handler: a kept file was renamed and a discarded
    one removed, so nothing is left to remove (and no lookup waits for the folder's lock)."""
    folder = tmp_path / "deferred"
    folder.mkdir()
    kept, dropped = _received(folder, b"kept"), _received(folder, b"dropped")
    assert Path(kept.name).is_file()
    assert Path(dropped.name).is_file()
    kept.keep(folder / "k.dcm", None)
    dropped.discard()
    assert kept.name == dropped.name == ""
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".recv-")] == ["k.dcm"]


def _voluntary_switches(native_id: int) -> int:
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("voluntary_ctxt"))[24:])


def test_the_files_made_ahead_wake_their_maker_once_a_batch(tmp_path: Path) -> None:
    """Taking a file made ahead (once per C-STORE, in the thread reading the socket) woke the
    thread that makes them at every file, which then took the interpreter's lock only to wait
    again: 62-79 wake-ups for 32 files. It wakes once a batch of 8 is wanted."""
    ahead = received_module._for(tmp_path, durable=False)
    assert wait_for(lambda: ahead._spares.qsize() >= 16, timeout=10)
    time.sleep(0.05)  # the maker waits again
    maker = ahead.maker.native_id
    assert maker is not None
    before = _voluntary_switches(maker)
    for _ in range(32):
        path, fd, _ = ahead.take()
        os.close(fd)
        os.unlink(path)
        time.sleep(0.002)  # as C-STORE requests come: the maker has time to wait between them
    assert wait_for(lambda: ahead._spares.qsize() >= 16, timeout=10)
    assert _voluntary_switches(maker) - before <= 12

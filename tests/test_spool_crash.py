"""Crash safety of the commit: a process committing from four threads is SIGKILLed at random
points; after recovery, every commit that returned is in every queue (its newest version
at least), and no queue holds a partial or stray file."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from anonproxy.spool import Spool, split_queue_file

DESTINATIONS = ["a", "b"]
THREADS = 4

# The committing process: each thread re-sends its own five UIDs in turn (so versions pile
# up), a payload that tells its UID and sequence number, and prints "<uid> <seq>" once the
# commit returned.
CHILD = """
import sys, threading
from pathlib import Path
from anonproxy.spool import Spool
sys.path.insert(0, sys.argv[3])
from test_spool_crash import payload

spool = Spool(Path(sys.argv[1]), ["a", "b"])
spool.recover()
start = int(sys.argv[2])
lock = threading.Lock()

def commit(thread):
    for n in range(100000):
        uid, seq = f"2.25.{thread + 1}0{n % 5}", start + 4 * n + thread
        tmp = spool.stage()
        tmp.write_bytes(payload(uid, seq))
        spool.commit(tmp, uid, ["a", "b"])
        spool.unstage(tmp)
        with lock:
            print(uid, seq, flush=True)

for thread in range(4):
    threading.Thread(target=commit, args=(thread,), daemon=True).start()
threading.Event().wait()
"""


def payload(uid: str, seq: int) -> bytes:
    """The content of commit *seq* of *uid*: its header, then 1 KB to 1 MB derived from it."""
    header = f"{uid} {seq}\n".encode()
    size = 1000 + (seq * 7919) % 1_000_000
    block = hashlib.sha256(header).digest()
    return header + (block * (size // len(block) + 1))[:size]


def run_and_kill(root: Path, start: int, rng: random.Random) -> dict[str, int]:
    """Run the committing process, SIGKILL it at a random point; the newest sequence number
    acknowledged per UID."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(start), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            first.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(60), "the committing process never committed"
        time.sleep(rng.uniform(0.0, 0.2))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        reader.join(10)
    assert child.returncode == -signal.SIGKILL
    acknowledged: dict[str, int] = {}
    for line in lines:
        if not line.endswith("\n"):
            continue  # cut by the SIGKILL while printing: its commit was never reported
        uid, seq = line.split()
        acknowledged[uid] = max(acknowledged.get(uid, -1), int(seq))
    return acknowledged


def test_every_returned_commit_survives_sigkill_and_no_partial_file_remains(
    tmp_path: Path,
) -> None:
    rng = random.Random(20261201)  # test timing, not cryptography
    root = tmp_path / "var"
    newest: dict[str, int] = {}
    for round_number in range(20):
        for uid, seq in run_and_kill(root, round_number * 10_000_000, rng).items():
            newest[uid] = max(newest.get(uid, -1), seq)
        spool = Spool(root, DESTINATIONS)
        spool.recover()
        assert list(spool.tmp_dir.iterdir()) == []
        for destination in DESTINATIONS:
            queue = spool.queues[destination]
            found: dict[str, int] = {}
            for path in queue.directory.iterdir():
                uid, version = split_queue_file(path.name)
                assert version, f"stray file {path.name}"
                header = path.read_bytes().split(b"\n", 1)[0].decode()
                file_uid, seq = header.split()
                assert file_uid == uid
                assert path.read_bytes() == payload(uid, int(seq)), "partial file"
                assert uid not in found, "two versions of one UID after recovery"
                found[uid] = int(seq)
            for uid, seq in newest.items():
                assert found.get(uid, -1) >= seq, f"acknowledged commit lost: {uid} {seq}"
            assert len(queue) == len(found)
            assert set(found) <= {f"2.25.{t}0{k}" for t in range(1, THREADS + 1) for k in range(5)}
    assert newest  # commits returned before the kills

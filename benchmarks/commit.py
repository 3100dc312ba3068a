"""What durability costs per instance: :meth:`anonproxy.spool.Spool.commit`, in one run.

    .venv/bin/python benchmarks/commit.py [--count 200] [--rounds 3] [--destinations 1]
        [--baseline REV] [--dir PATH]

Commits ``--count`` instances of 4 KB and of 500 KB (written to a staging file as a worker
process does, then committed) with ``storage.fsync`` on and off, from 1 and from 4 committing
threads (concurrent associations), and prints commits/s for each case with the ratios that
matter: fsync on/off, 4/1 committers and, with ``--baseline``, this tree against the
``anonproxy/spool.py`` of git revision REV (loaded beside it, the two run alternately case by
case). Each case runs ``--rounds`` times and the best round is shown (the machine is shared:
compare ratios of one run). The spools live in a temporary folder under ``--dir`` (default:
the system's; it must be on the file system whose fsync is to be measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from anonproxy import spool as current

SIZES = {"4 KB": 4 * 1024, "500 KB": 500 * 1024}
COMMITTERS = (1, 4)
_uids = itertools.count(1)


def load_baseline(revision: str, work: Path) -> ModuleType:
    """The spool module of git *revision*, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:anonproxy/spool.py"],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    path = work / "baseline_spool.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("baseline_spool", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_case(
    module: ModuleType,
    work: Path,
    size: int,
    fsync: bool,
    committers: int,
    args: argparse.Namespace,
) -> tuple[float, float | None]:
    """Commits per second of *committers* threads committing ``args.count`` instances, and
    the queue folder syncs run per commit (None: the spool does not count them)."""
    root = Path(tempfile.mkdtemp(prefix="commit-", dir=work))
    destinations = [f"d{n}" for n in range(args.destinations)]
    spool = module.Spool(root, destinations, fsync=fsync)
    payload = os.urandom(size)
    per_thread = args.count // committers
    errors: list[Exception] = []
    start = threading.Barrier(committers + 1)

    def commit_many() -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                tmp = spool.stage()
                with tmp.open("wb") as handle:
                    handle.write(payload)
                spool.commit(tmp, f"2.25.{next(_uids)}", destinations)
                spool.unstage(tmp)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=commit_many) for _ in range(committers)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    commits = per_thread * committers
    counters = [getattr(q, "sync_entries", None) for q in spool.queues.values()]
    syncs = None if None in counters else sum(c.syncs for c in counters) / commits / len(counters)
    spool.close()
    shutil.rmtree(root)
    return commits / elapsed, syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="commits per case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is shown")
    parser.add_argument("--destinations", type=int, default=1, help="queues per instance")
    parser.add_argument("--baseline", help="git revision whose spool.py to compare against")
    parser.add_argument("--dir", type=Path, default=None, help="where the spools are made")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anonproxy-commit-", dir=args.dir) as tmp:
        work = Path(tmp)
        modules: dict[str, ModuleType] = {"this tree": current}
        if args.baseline:
            modules = {f"baseline {args.baseline}": load_baseline(args.baseline, work), **modules}
        cases = list(itertools.product(SIZES, (True, False), COMMITTERS))
        best: dict[tuple[str, str, bool, int], float] = {}
        syncs: dict[tuple[str, str, int], float] = {}
        order = random.Random(0)
        for _ in range(args.rounds):
            for size, fsync, committers in cases:  # the implementations side by side
                for label in order.sample(list(modules), len(modules)):
                    rate, per_commit = run_case(
                        modules[label], work, SIZES[size], fsync, committers, args
                    )
                    key = (label, size, fsync, committers)
                    best[key] = max(best.get(key, 0.0), rate)
                    if fsync and per_commit is not None:
                        syncs[label, size, committers] = per_commit
    report(best, syncs, list(modules), args)


def report(
    best: dict[tuple[str, str, bool, int], float],
    syncs: dict[tuple[str, str, int], float],
    labels: list[str],
    args: argparse.Namespace,
) -> None:
    print(
        f"commits/s, best of {args.rounds} rounds of {args.count} commits,"
        f" {args.destinations} destination(s); load {os.getloadavg()[0]:.2f}"
    )
    rate: Callable[..., float] = lambda *key: best[key]  # noqa: E731
    for label in labels:
        print(f"\n== {label}")
        for size in SIZES:
            for committers in COMMITTERS:
                on, off = rate(label, size, True, committers), rate(label, size, False, committers)
                shared = syncs.get((label, size, committers))
                print(
                    f"  {size:>6s}, {committers} committer(s): fsync on {on:8.1f}/s"
                    f"   off {off:8.1f}/s   on/off {on / off:.3f}"
                    + ("" if shared is None else f"   folder syncs per commit {shared:.2f}")
                )
            print(
                f"  {size:>6s}, 4/1 committers with fsync on:"
                f" {rate(label, size, True, 4) / rate(label, size, True, 1):.2f}"
            )
    if len(labels) == 2:
        old, new = labels
        print(f"\n== {new} / {old} (fsync on)")
        for size in SIZES:
            for committers in COMMITTERS:
                ratio = rate(new, size, True, committers) / rate(old, size, True, committers)
                print(f"  {size:>6s}, {committers} committer(s): {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())

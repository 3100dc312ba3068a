"""Forwarding alone: how fast a destination's queue drains to a research PACS.

Usage: python benchmarks/forwarding.py [--mr N] [--ct N] [--associations N] [--repeat K]

For each series, N de-identified-sized instances are committed to a spool queue, then the
destination's forward workers (as the service makes them: ``make_worker``, one sender process
per association) drain it to DCMTK storescp (one association at a time). The rate is taken
from the first to the last arrival at storescp (its files' times: the start of the sender
processes is not counted, nor their CPU). The baseline, measured in the same round, is storescu sending the
same files to storescp: one association, DCMTK on both ends. Prints each round's rate, its
ratio to the baseline, and the CPU per instance of this process (the workers), the sender
processes and storescp.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pydicom.uid import generate_uid
from throughput import cpu_seconds, direct, make_series

from anonproxy.audit import AuditLog
from anonproxy.config import DicomDestinationConfig
from anonproxy.forward import make_worker
from anonproxy.spool import Spool

from peers import StoreSCP, descendants


def senders_cpu_s(scp: StoreSCP) -> float:
    """CPU seconds of this process's children but storescp: the sender processes (and the
    idle fork server that starts them)."""
    pids = [pid for pid in descendants(os.getpid()) if pid != scp.process.pid]
    return sum(cpu_seconds(pid, children=False) for pid in pids)


def drain(work: Path, folder: Path, associations: int) -> dict[str, float]:
    """One drain of every file of *folder*: rate and CPU per instance."""
    paths = sorted(folder.iterdir())
    scp = StoreSCP(work / "research").start()
    spool = Spool(work / "var", ["research"])
    for path in paths:
        with spool.staging() as staged:
            shutil.copyfile(path, staged)
            spool.commit(staged, generate_uid(), ["research"])
    config = DicomDestinationConfig(
        name="research",
        host="127.0.0.1",
        port=scp.port,
        ae_title=scp.ae_title,
        max_associations=associations,
    )
    audit = AuditLog(work / "audit.jsonl")
    workers = [
        make_worker(config, spool, audit, calling_ae_title="ANONPROXY", index=i)
        for i in range(associations)
    ]
    try:
        for worker in workers:  # started before the clock: their start is not forwarding
            worker.sender.prepare()
            worker.sender.started(60)  # a ProcessSender's
        started = senders_cpu_s(scp)
        own, peer = cpu_seconds(os.getpid(), children=False), cpu_seconds(scp.process.pid)
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 600
        while len(scp.files()) < len(paths):
            if time.monotonic() > deadline:
                raise TimeoutError("instances did not arrive")
            time.sleep(0.01)
        senders = senders_cpu_s(scp) - started
        own = cpu_seconds(os.getpid(), children=False) - own
        peer = cpu_seconds(scp.process.pid) - peer
        times = sorted(path.stat().st_mtime for path in scp.files())
    finally:
        for worker in workers:
            worker.stop()
        spool.close()
        for worker in workers:
            worker.join(15)
        scp.stop()
    count = len(paths)
    return {
        "rate": (count - 1) / max(times[-1] - times[0], 1e-6),
        "workers_ms": own / count * 1e3,
        "senders_ms": senders / count * 1e3,
        "storescp_ms": peer / count * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mr", type=int, default=600, help="MR 256x256 instances (0: skip)")
    parser.add_argument("--ct", type=int, default=300, help="CT 512x512 instances (0: skip)")
    parser.add_argument("--associations", type=int, default=1, help="max_associations")
    parser.add_argument("--repeat", type=int, default=2, help="rounds")
    args = parser.parse_args()
    for name, template, count, rows in (
        ("MR-256", "MR_small.dcm", args.mr, 256),
        ("CT-512", "CT_small.dcm", args.ct, 512),
    ):
        if not count:
            continue
        work = Path(tempfile.mkdtemp(prefix="anonproxy-forwarding-"))
        try:
            folder = work / "series"
            make_series(folder, template, count, rows)
            print(f"== {name}: {count} instances, {args.associations} association(s)")
            ratios = []
            for round_ in range(args.repeat):
                baseline = count / direct(work / f"direct{round_}", [folder], count)["seconds"]
                result = drain(work / f"drain{round_}", folder, args.associations)
                ratios.append(result["rate"] / baseline)
                print(
                    f"  round {round_ + 1}: storescu->storescp {baseline:7.1f}/s,"
                    f" forwarding {result['rate']:7.1f}/s, ratio {ratios[-1]:.2f};"
                    f" CPU per instance: workers {result['workers_ms']:.2f} ms,"
                    f" sender processes {result['senders_ms']:.2f} ms,"
                    f" storescp {result['storescp_ms']:.2f} ms"
                )
            print(f"  median ratio {statistics.median(ratios):.2f}")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

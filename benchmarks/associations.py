"""One association per instance: storescu called once per file, against DCMTK storescp and
through anonproxy, in one run.

    .venv/bin/python benchmarks/associations.py [--files 200] [--processes 1,2]

Many modalities open an association for every instance they send; what each association costs
the proxy (accepting it, negotiating ~200 presentation contexts, the audit of its opening and
closing) then counts as much as the instance. Prints the instances per second of each run,
until storescu's last exit for the direct run and until the last instance arrived at the
research PACS through the proxy, with its ratio to the direct run, and the proxy's CPU time per
instance (every process of it). One sender at a time: the latency of an association, not the
parallel rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import Peer, cpu_seconds, make_series, serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peers import PEER_ENV, free_port, tool


def send_each(port: int, files: list[Path], called: str) -> float:
    """storescu once per file, one after the other; returns elapsed seconds."""
    started = time.perf_counter()
    for path in files:
        subprocess.run(
            [tool("storescu"), "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), str(path)],
            env=PEER_ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    return time.perf_counter() - started


def direct(work: Path, files: list[Path]) -> float:
    scp = Peer(work / "direct").start()
    try:
        return send_each(scp.port, files, "RESEARCH")
    finally:
        scp.stop()
        shutil.rmtree(scp.directory, ignore_errors=True)


def via_proxy(work: Path, files: list[Path], processes: int) -> tuple[float, float]:
    """Seconds until the last instance arrived, and the proxy's CPU seconds meanwhile."""
    scp = Peer(work / "research").start()
    root = work / "proxy"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "anonproxy.json"
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port, **({"processes": processes} if processes > 1 else {})},
                "destinations": [{"name": "research", "ae_title": "RESEARCH",
                                  "host": "127.0.0.1", "port": scp.port}],
                "storage": {"path": str(root / "var"), "min_free_bytes": 0},
                "audit": {"path": str(root / "var" / "audit.jsonl")},
                "log": {"level": "WARNING"},
                "admin": {"port": 0},
            }
        ),
        "utf-8",
    )  # fmt: skip
    proxy = serve(config, root, port)
    try:
        idle = cpu_seconds(proxy.pid)
        started = time.perf_counter()
        send_each(port, files, "ANONPROXY")
        while scp.count() < len(files):
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(proxy.pid) - idle
    finally:
        proxy.terminate()
        proxy.wait(60)
        scp.stop()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(scp.directory, ignore_errors=True)
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200, help="MR 256x256 instances")
    parser.add_argument("--processes", default="1", help="listen.processes of each run, e.g. 1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anonproxy-bench-") as tmp:
        work = Path(tmp)
        make_series(work / "series", "MR_small.dcm", args.files, 256)
        files = sorted((work / "series").glob("*.dcm"))
        base = args.files / direct(work, files)
        print(f"== one association per instance: {args.files} MR 256x256 instances")
        print(f"  {'direct storescu->storescp':40s} {base:7.1f} inst/s")
        for processes in (int(n) for n in args.processes.split(",")):
            seconds, cpu = via_proxy(work, files, processes)
            rate = args.files / seconds
            print(
                f"  {f'anonproxy, listen.processes {processes}':40s} {rate:7.1f} inst/s"
                f"  ratio {rate / base:.2f}  CPU {1000 * cpu / args.files:.1f} ms/instance"
            )


if __name__ == "__main__":
    main()

"""Throughput, latency and memory of anonproxy against a direct DCMTK baseline, in one run.

    .venv/bin/python benchmarks/throughput.py [--mr 1000] [--ct 500] [--large-mib 1024]

Generates synthetic series (MR 256x256, CT 512x512, optionally one large multi-frame instance),
starts DCMTK storescp as the destination and measures, in the same run:

* direct: storescu -> storescp;
* proxy: storescu -> anonproxy serve -> storescp, until the last instance arrived;
* proxy with 4 parallel storescu senders.

Prints instances/s, MB/s, time to the last arrival, forwarding latency p50/p99 (from the audit
trail), the proxy's peak RSS, and the ratio against the direct run. DCMTK runs with
TCP_NODELAY=1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import builders
from peers import PEER_ENV, StoreSCP, free_port, tool, wait_port

SECRET = "benchmark-secret-0123456789abcdef"


def make_series(directory: Path, template: str, count: int, rows: int, frames: int = 1) -> int:
    """Write *count* instances of *rows*x*rows* 16-bit pixels; returns total bytes."""
    paths = builders.make_series(
        directory, count, template=template, patient_name="Bench^Mark", rows=rows, frames=frames
    )
    return sum(path.stat().st_size for path in paths)


def run_senders(port: int, folders: list[Path], called: str) -> float:
    """Run one storescu per folder concurrently; returns elapsed seconds."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                tool("storescu"),
                "-aet",
                "BENCH",
                "-aec",
                called,
                "+sd",
                "+r",
                "-nh",
                "127.0.0.1",
                str(port),
                str(folder),
            ],
            env=PEER_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise RuntimeError(err.decode()[-500:])
    return time.perf_counter() - started


def count_files(directory: Path) -> int:
    return sum(1 for _ in directory.rglob("*.dcm"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def direct(work: Path, folders: list[Path], expected: int) -> dict[str, float]:
    scp = StoreSCP(work / "direct").start()
    try:
        elapsed = run_senders(scp.port, folders, "RESEARCH")
        while count_files(scp.directory) < expected:
            time.sleep(0.01)
        elapsed = max(elapsed, 0.0)
    finally:
        scp.stop()
    shutil.rmtree(scp.directory, ignore_errors=True)
    return {"seconds": elapsed}


def via_proxy(work: Path, folders: list[Path], expected: int) -> dict[str, float]:
    scp = StoreSCP(work / "research").start()
    port = free_port()
    root = work / "proxy"
    config = root / "anonproxy.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port},
                "destinations": [
                    {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                     "port": scp.port}
                ],
                "storage": {"path": str(root / "var"), "min_free_bytes": 0},
                "audit": {"path": str(root / "var" / "audit.jsonl")},
                "log": {"level": "WARNING"},
            }
        ),
        "utf-8",
    )  # fmt: skip
    proxy = subprocess.Popen(
        [sys.executable, "-m", "anonproxy", "serve", "--config", str(config)],
        cwd=root,
        env={**os.environ, "ANONPROXY_SECRET": SECRET},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 30)
        started = time.perf_counter()
        acknowledged = run_senders(port, folders, "ANONPROXY")
        while count_files(scp.directory) < expected:
            if time.perf_counter() - started > 1800:
                raise TimeoutError("instances did not arrive")
            time.sleep(0.01)
        arrived = time.perf_counter() - started
        rss = peak_rss_mib(proxy.pid)
    finally:
        proxy.terminate()
        proxy.wait(60)
        scp.stop()
    latencies = [
        float(e["latency_ms"])
        for e in map(json.loads, (root / "var" / "audit.jsonl").read_text().splitlines())
        if e["event"] == "instance.forwarded"
    ]
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(scp.directory, ignore_errors=True)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "seconds": arrived,
        "acknowledged_s": acknowledged,
        "p50_ms": quantiles[49],
        "p99_ms": quantiles[98],
        "peak_rss_mib": rss,
    }


def report(name: str, count: int, size: int, base: dict[str, float], runs: dict[str, dict]) -> None:
    rate = count / base["seconds"]
    print(f"\n== {name}: {count} instances, {size / 1e6:.1f} MB")
    print(
        f"  direct storescu->storescp      {rate:8.1f} inst/s {size / 1e6 / base['seconds']:8.1f} MB/s"
    )
    for label, result in runs.items():
        r = count / result["seconds"]
        print(
            f"  {label:30s} {r:8.1f} inst/s {size / 1e6 / result['seconds']:8.1f} MB/s"
            f"  last arrival {result['seconds']:.2f} s  ratio {r / rate:.2f}"
            f"  acknowledged {count / result['acknowledged_s']:.1f} inst/s"
            f"  p50 {result['p50_ms']:.0f} ms  p99 {result['p99_ms']:.0f} ms"
            f"  peak RSS {result['peak_rss_mib']:.0f} MiB"
        )


def bench(work: Path, name: str, template: str, count: int, rows: int, frames: int = 1) -> None:
    series = work / name
    size = make_series(series, template, count, rows, frames)
    base = direct(work, [series], count)
    runs = {"anonproxy, 1 sender": via_proxy(work, [series], count)}
    if count >= 4:
        parts = [work / f"{name}-part{i}" for i in range(4)]
        for i, path in enumerate(sorted(series.glob("*.dcm"))):
            parts[i % 4].mkdir(exist_ok=True)
            os.link(path, parts[i % 4] / path.name)
        runs["anonproxy, 4 senders"] = via_proxy(work, parts, count)
    report(name, count, size, base, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mr", type=int, default=1000, help="MR 256x256 instances (0: skip)")
    parser.add_argument("--ct", type=int, default=500, help="CT 512x512 instances (0: skip)")
    parser.add_argument("--large-mib", type=int, default=0, help="one multi-frame instance")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anonproxy-bench-") as tmp:
        work = Path(tmp)
        if args.mr:
            bench(work, "MR-256", "MR_small.dcm", args.mr, 256)
        if args.ct:
            bench(work, "CT-512", "CT_small.dcm", args.ct, 512)
        if args.large_mib:
            frames = max(1, args.large_mib * 1024 * 1024 // (512 * 512 * 2))
            bench(work, "multiframe", "CT_small.dcm", 1, 512, frames)


if __name__ == "__main__":
    main()

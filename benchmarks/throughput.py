"""Throughput, latency and memory of anonproxy against a direct DCMTK baseline, in one run.

    .venv/bin/python benchmarks/throughput.py [--mr 1000] [--ct 500] [--large-mib 1024]
        [--deidentify-workers N] [--acknowledge after_deidentification|after_receipt|both]
        [--no-ocr] [--senders 1,4] [--destination storescp|storescp-fork|orthanc]
        [--max-associations N] [--peer-max-pdu N] [--incoming-key off|on|both]
        [--processes N] [--repeat K]

Generates synthetic series (MR 256x256, CT 512x512, one multi-frame instance of about 1 GiB),
starts the research PACS (``--destination``: DCMTK storescp, which serves one association at a
time, storescp ``--fork``, or Orthanc; ``--peer-max-pdu``: its Maximum Length) and measures, in
the same run:

* direct: storescu -> storescp;
* proxy: storescu -> anonproxy serve -> storescp, until the last instance arrived, for each
  ``listen.acknowledge`` mode (both by default), with the incoming spool sealed
  (``--incoming-key``: ``+sealed`` in the run's name) or not;
* proxy with N parallel storescu senders (``--senders``, default 1 and 4), the destination's
  ``max_associations`` as configured (``--max-associations``) or its default;
* the floor of the stack (series only): storescu -> benchmarks/stack_floor.py, a pynetdicom SCP
  that only receives (``receive-only``; ``receive-only, one fsync``: and flushes each data set
  to disk before it answers), or receives, decodes the header and re-encodes with pydicom
  (``floor``): what one association through any proxy on this stack cannot beat.

Prints, per run, the delivery rate (instances/s and MB/s until the last arrival at the
research PACS) and the acknowledgement rate (storescu's own elapsed time: how long the sender
is held), each with its ratio to the direct run and to the receive-only floors; with
``--repeat K``, K rounds of all runs one after the other, and the medians (of the rates, and
of the ratios taken within each round, each round's ratio in brackets); forwarding
latency p50/p95/p99 (from the audit trail: spool commit to the destination's answer), the
proxy's peak RSS (alone; summed with its child processes; the part of that sum the run added
over each process's RSS before it; and the PSS of all of them, shared pages counted once,
before the run and at most during it, sampled every 0.1 s for the large instance and every
second for a series, whose rate a sample's CPU would lower), and the CPU time per
instance of the proxy (all its processes), of storescu and of the research PACS, with the
ceiling that sum sets on this machine (cores / CPU per instance: how fast the whole chain could
go on these cores if nothing ever waited). Then the sender curve: each run with N senders
over the one with one sender, in the same round; and the most N senders could reach, the
ceiling at one sender's CPU per instance over one sender's delivery rate (more senders bring
more work, not more cores). ``--processes N`` sets the proxy's
``listen.processes`` (acceptor processes). DCMTK and Orthanc run with TCP_NODELAY=1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pydicom import dcmread

from anonproxy.processes import available_cores

import builders
from peers import PEER_ENV, Orthanc, StoreSCP, descendants, free_port, tool, wait_port

SECRET = "benchmark-secret-0123456789abcdef"
FLOOR = "pynetdicom+pydicom floor"  # receive to disk, decode the header, re-encode: no more
RECEIVE_ONLY = "pynetdicom receive-only"
DURABLE = "pynetdicom receive-only, one fsync"  # the least an acknowledgement on disk costs
MODES = ("after_deidentification", "after_receipt")
LISTEN: dict[str, int] = {}  # listen options of the proxy under test (--deidentify-workers)
PROFILE: dict[str, str] = {}  # profile options of the proxy under test (--no-ocr)
DESTINATION: dict[str, object] = {}  # options of its destination (--max-associations)
PEER: dict[str, object] = {"kind": "storescp", "max_pdu": None}  # --destination, --peer-max-pdu
CORES = available_cores()  # those this process may use: its affinity, its cgroup's CPU quota


class Peer:
    """The research PACS of a run: storescp (with or without --fork) or Orthanc, counted at
    the peer (files written, or Orthanc's instance count)."""

    def __init__(self, directory: Path) -> None:
        self.kind = str(PEER["kind"])
        max_pdu = PEER["max_pdu"]
        self.ae_title = "RESEARCH"
        self.server: StoreSCP | Orthanc
        if self.kind == "orthanc":
            options = {} if max_pdu is None else {"MaximumPduLength": max_pdu}
            self.server = Orthanc(directory, ae_title="RESEARCH", options=options)
        else:
            extra = [] if max_pdu is None else ["--max-pdu", str(max_pdu)]
            if self.kind == "storescp-fork":
                extra.append("--fork")
            self.server = StoreSCP(directory, extra=extra)
        self.directory = directory

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> Peer:
        self.server.start()
        return self

    def count(self) -> int:
        if isinstance(self.server, Orthanc):
            return int(self.server.get("/statistics")["CountInstances"])
        return count_files(self.directory)

    def cpu_s(self) -> float:
        process = self.server.process
        return cpu_seconds(process.pid) if process is not None else 0.0

    def stop(self) -> None:
        self.server.stop()


def make_series(directory: Path, template: str, count: int, rows: int, frames: int = 1) -> int:
    """Write *count* instances of *rows*x*rows* 16-bit pixels; returns total bytes."""
    paths = builders.make_series(
        directory, count, template=template, patient_name="Bench^Mark", rows=rows, frames=frames
    )
    return sum(path.stat().st_size for path in paths)


def children_cpu_s() -> float:
    """CPU seconds of the child processes of this one that have ended (the storescu runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """CPU seconds (user and system) of a process and its child processes so far."""
    total = 0
    for member in [pid, *(descendants(pid) if children else ())]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


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


def _status_kib(pid: int, *keys: str) -> list[int]:
    """Fields of /proc/PID/status in KiB (0 when the process has ended)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return [0] * len(keys)
    values = dict(line.split(":", 1) for line in lines if ":" in line)
    return [int(values.get(key, "0 kB").split()[0]) for key in keys]


def reset_peaks(pid: int) -> dict[int, int]:
    """Reset the peak RSS (VmHWM) of the process and its child processes to their current RSS
    (``/proc/PID/clear_refs``: 5); returns their current RSS in KiB, per process."""
    current = {}
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            Path(f"/proc/{member}/clear_refs").write_text("5")
        current[member] = _status_kib(member, "VmRSS")[0]
    return current


def pss_mib(pid: int) -> float:
    """Proportional set size of the process and its child processes (shared pages counted
    once in all): what they take of the machine's memory together."""
    total = 0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


class PssSampler:
    """The largest PSS of a process tree (:func:`pss_mib`), sampled every *interval* seconds
    until stopped: the memory it takes at its peak, shared pages counted once.

    A sample reads every process's ``smaps_rollup``, which costs ~22 ms of CPU for the proxy's
    tree: every 0.1 s, that is a fifth of a core taken from the proxy while it is timed."""

    def __init__(self, pid: int, interval: float) -> None:
        self.peak = pss_mib(pid)
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        self._thread.start()

    def _sample(self, pid: int) -> None:
        while not self._stopped.wait(self._interval):
            self.peak = max(self.peak, pss_mib(pid))

    def stop(self) -> float:
        self._stopped.set()
        self._thread.join()
        return self.peak


def peak_rss_mib(pid: int, before: dict[int, int]) -> tuple[float, float, float]:
    """Peak RSS of the process, the sum of the peaks of it and its child processes (an upper
    bound of the whole: shared pages are counted in each), and the sum over them of the peak
    above the RSS each had when the peaks were reset (:func:`reset_peaks`): what the run
    added."""
    peaks, added = [], 0
    for member in [pid, *descendants(pid)]:
        peak, rss = _status_kib(member, "VmHWM", "VmRSS")
        if peak:
            peaks.append(peak)
            added += max(0, peak - before.get(member, rss))
    if not peaks:
        return float("nan"), float("nan"), float("nan")
    return peaks[0] / 1024, sum(peaks) / 1024, added / 1024


def make_large(directory: Path, mib: int) -> int:
    """One multi-frame instance of about *mib* MiB (512x512 16-bit frames), written in chunks
    so that the benchmark itself never holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = max(1, mib * 2**20 // (512 * 512 * 2))
    (template,) = builders.make_series(directory / "template", 1, rows=64)
    ds = dcmread(template)
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    del ds.PixelData
    for tag in [t for t in ds.keys() if t > 0x7FE00010]:  # noqa: SIM118 - tags, not elements
        del ds[tag]
    path = directory / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame = builders.random_pixels(512, 1).tobytes()
    with path.open("ab") as handle:
        handle.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(frame) * frames))
        for _ in range(frames):
            handle.write(frame)
    shutil.rmtree(directory / "template")
    return path.stat().st_size


def direct(work: Path, folders: list[Path], expected: int) -> dict[str, float]:
    scp = Peer(work / "direct").start()
    try:
        elapsed = run_senders(scp.port, folders, "RESEARCH")
        while scp.count() < expected:
            time.sleep(0.01)
        elapsed = max(elapsed, 0.0)
    finally:
        scp.stop()
    shutil.rmtree(scp.directory, ignore_errors=True)
    return {"seconds": elapsed}


def stack_floor(folders: list[Path], *options: str) -> dict[str, float]:
    """One storescu into benchmarks/stack_floor.py: the ceiling of pynetdicom + pydicom."""
    port = free_port()
    scp = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("stack_floor.py")), str(port), *options],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 30)
        return {"seconds": run_senders(port, folders, "FLOOR")}
    finally:
        scp.kill()
        scp.wait()


def audit(root: Path) -> list[dict]:
    """The audit records written so far (a line being written is left for the next read)."""
    text = (root / "var" / "audit.jsonl").read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def serve(config: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    """``anonproxy serve`` of *config* in *root*, once it has started (every acceptor process
    listens on *port*)."""
    proxy = subprocess.Popen(
        [sys.executable, "-m", "anonproxy", "serve", "--config", str(config)],
        cwd=root,
        env={**os.environ, "ANONPROXY_SECRET": SECRET},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 60)
        while not any(e["event"] == "service.started" for e in audit(root)):
            time.sleep(0.05)
    except BaseException:
        proxy.kill()
        raise
    return proxy


def via_proxy(work: Path, folders: list[Path], expected: int, acknowledge: str) -> dict[str, float]:
    """One run; *acknowledge* is a listen.acknowledge mode, with ``+sealed`` for an incoming
    spool sealed with storage.incoming_key_file."""
    scp = Peer(work / "research").start()
    port = free_port()
    root = work / "proxy"
    config = root / "anonproxy.yaml"
    root.mkdir(parents=True, exist_ok=True)
    acknowledge, _, sealed = acknowledge.partition("+")
    storage: dict[str, object] = {"path": str(root / "var"), "min_free_bytes": 0}
    if sealed:
        key = root / "incoming.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        storage["incoming_key_file"] = str(key)
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port, "acknowledge": acknowledge, **LISTEN},
                "destinations": [
                    {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                     "port": scp.port, **DESTINATION}
                ],
                "profile": PROFILE,
                "storage": storage,
                "audit": {"path": str(root / "var" / "audit.jsonl")},
                "log": {"level": "WARNING"},
                "admin": {"port": 0},  # any free port: 8080 may be taken
            }
        ),
        "utf-8",
    )  # fmt: skip
    proxy = serve(config, root, port)
    try:
        time.sleep(1.0)  # the worker and sender processes finish starting
        idle_pss = pss_mib(proxy.pid)
        before = reset_peaks(proxy.pid)
        cpu = (cpu_seconds(proxy.pid), children_cpu_s(), scp.cpu_s())
        main_cpu = cpu_seconds(proxy.pid, children=False)
        started = time.perf_counter()
        # the one large instance: its peak is the point; a series: its rate is
        sampler = PssSampler(proxy.pid, 0.1 if expected == 1 else 1.0)
        acknowledged = run_senders(port, folders, "ANONPROXY")
        while scp.count() < expected:
            if time.perf_counter() - started > 1800:
                raise TimeoutError("instances did not arrive")
            failed = [e for e in audit(root) if e["event"] == "instance.failed"]
            if failed:
                raise RuntimeError(f"the proxy refused an instance: {failed[0]['reason']}")
            time.sleep(0.05)
        arrived = time.perf_counter() - started
        peak_pss = sampler.stop()
        cpu = (cpu_seconds(proxy.pid) - cpu[0], children_cpu_s() - cpu[1], scp.cpu_s() - cpu[2])
        main_cpu = cpu_seconds(proxy.pid, children=False) - main_cpu
        rss, tree_rss, added_rss = peak_rss_mib(proxy.pid, before)
    finally:
        proxy.terminate()
        proxy.wait(60)
        scp.stop()
    latencies = [float(e["latency_ms"]) for e in audit(root) if e["event"] == "instance.forwarded"]
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(scp.directory, ignore_errors=True)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "seconds": arrived,
        "acknowledged_s": acknowledged,
        "p50_ms": quantiles[49],
        "p95_ms": quantiles[94],
        "p99_ms": quantiles[98],
        "peak_rss_mib": rss,
        "tree_rss_mib": tree_rss,
        "added_rss_mib": added_rss,
        "idle_pss_mib": idle_pss,
        "peak_pss_mib": peak_pss,
        "cpu_proxy_s": cpu[0],
        "cpu_proxy_main_s": main_cpu,
        "cpu_senders_s": cpu[1],
        "cpu_peer_s": cpu[2],
    }


DIRECT = "direct storescu->storescp"


def _median(rounds: list[dict[str, dict]], label: str, value: Callable[[dict], float]) -> float:
    return statistics.median(value(results[label]) for results in rounds)


def _ratio(
    rounds: list[dict[str, dict]], label: str, key: str, base: str, base_key: str = "seconds"
) -> tuple[float, str]:
    """The median over *rounds* of the rate of *label* (from its *key* seconds) over that of
    *base* (from its *base_key* seconds) in the same round; and the ratios of each round,
    when there are several."""
    ratios = [results[base][base_key] / results[label][key] for results in rounds]
    each = "" if len(ratios) == 1 else " [" + " ".join(f"{r:.2f}" for r in ratios) + "]"
    return statistics.median(ratios), each


def report(name: str, count: int, size: int, rounds: list[dict[str, dict]]) -> None:
    """Medians over the rounds: rates, and ratios taken within each round."""
    mb = size / 1e6
    print(f"\n== {name}: {count} instances, {mb:.1f} MB, {len(rounds)} round(s), medians")
    seconds = _median(rounds, DIRECT, lambda r: r["seconds"])
    print(f"  {DIRECT:44s} {count / seconds:8.1f} inst/s {mb / seconds:8.1f} MB/s")
    labels = list(rounds[0])
    for label in [label for label in labels if label in (RECEIVE_ONLY, DURABLE, FLOOR)]:
        seconds = _median(rounds, label, lambda r: r["seconds"])
        ratio, each = _ratio(rounds, label, "seconds", DIRECT)
        print(f"  {label:44s} {count / seconds:8.1f} inst/s {mb / seconds:8.1f} MB/s"
              f"  ratio {ratio:.2f}{each}")  # fmt: skip
    for label in [label for label in labels if label.startswith("anonproxy")]:
        result = {key: _median(rounds, label, lambda r, k=key: r[k]) for key in rounds[0][label]}
        ratio, each = _ratio(rounds, label, "seconds", DIRECT)
        floor = _ratio(rounds, label, "seconds", FLOOR) if FLOOR in labels else None
        print(
            f"  {label + ', delivered':44s} {count / result['seconds']:8.1f} inst/s"
            f" {mb / result['seconds']:8.1f} MB/s"
            f"  last arrival {result['seconds']:.2f} s  ratio {ratio:.2f}{each}"
            + (f" ({floor[0]:.2f}{floor[1]} of the floor)" if floor else "")
            + f"  p50 {result['p50_ms']:.0f} ms  p95 {result['p95_ms']:.0f} ms"
            f"  p99 {result['p99_ms']:.0f} ms"
            f"  peak RSS {result['peak_rss_mib']:.0f} MiB"
            f" (with child processes {result['tree_rss_mib']:.0f} MiB, of which the run added"
            f" {result['added_rss_mib']:.0f}; PSS of all {result['idle_pss_mib']:.0f} MiB idle,"
            f" {result['peak_pss_mib']:.0f} MiB at most)"
        )
        ratio, each = _ratio(rounds, label, "acknowledged_s", DIRECT)
        receive_only = (
            _ratio(rounds, label, "acknowledged_s", RECEIVE_ONLY)
            if RECEIVE_ONLY in labels
            else None
        )
        durable = _ratio(rounds, label, "acknowledged_s", DURABLE)[0] if DURABLE in labels else None
        print(
            f"  {label + ', acknowledged':44s} {count / result['acknowledged_s']:8.1f} inst/s"
            f" {mb / result['acknowledged_s']:8.1f} MB/s"
            f"  sender held {result['acknowledged_s']:.2f} s  ratio {ratio:.2f}{each}"
            + (f" ({receive_only[0]:.2f}{receive_only[1]} of receive-only" if receive_only else "")
            + (f", {durable:.2f} of receive-only with one fsync" if durable else "")
            + (")" if receive_only else "")
        )
        shares = [result[f"cpu_{part}_s"] * 1000 / count for part in ("proxy", "senders", "peer")]
        print(
            f"  {'':44s} CPU per instance: proxy {shares[0]:.1f} ms (all its processes;"
            f" the service process {result['cpu_proxy_main_s'] * 1000 / count:.1f}),"
            f" storescu {shares[1]:.1f} ms, research PACS {shares[2]:.1f} ms;"
            f" ceiling on {CORES} cores {_ceiling(result, count):.0f} inst/s"
        )
    _curves(count, rounds)


def _ceiling(result: dict[str, float], count: int) -> float:
    """How fast the whole chain (proxy, storescu, research PACS) could go on :data:`CORES`
    at the CPU per instance of *result*: instances/s."""
    cpu_s = sum(result[f"cpu_{part}_s"] for part in ("proxy", "senders", "peer"))
    return CORES * count / cpu_s


def _curves(count: int, rounds: list[dict[str, dict]]) -> None:
    """Per acknowledgement mode, the rates with N senders over those with one, in the same
    round; and the most N senders could reach: the ceiling of the chain at one sender's CPU
    per instance over one sender's delivery rate (each further association only adds CPU)."""
    one = re.compile(r"anonproxy (\S+), 1 sender$")
    for label in [label for label in rounds[0] if one.match(label)]:
        mode = one.match(label)[1]  # type: ignore[index]
        others = [o for o in rounds[0] if o.startswith(f"anonproxy {mode}, ") and o != label]
        if not others:
            continue
        bounds = [_ceiling(r[label], count) * r[label]["seconds"] / count for r in rounds]
        print(
            f"  sender curve, {mode}: N senders' rate over one sender's (one sender delivers"
            f" {1 / statistics.median(bounds):.2f} of the chain's ceiling, so N senders"
            f" reach {statistics.median(bounds):.2f} x at most)"
        )
        for other in others:
            acknowledged = _ratio(rounds, other, "acknowledged_s", label, "acknowledged_s")
            delivered = _ratio(rounds, other, "seconds", label, "seconds")
            print(
                f"    {other.rsplit(', ', 1)[1]:>10s}: acknowledged {acknowledged[0]:.2f}"
                f"{acknowledged[1]}, delivered {delivered[0]:.2f}{delivered[1]}"
            )


def bench(
    work: Path,
    name: str,
    series: Path,
    count: int,
    size: int,
    modes: tuple[str, ...],
    senders: tuple[int, ...] = (1, 4),
    repeat: int = 1,
) -> None:
    """*repeat* rounds, each of every run one after the other (interleaved: a machine that
    slows down in one round slows down all runs of that round)."""
    folders: dict[int, list[Path]] = {1: [series]}
    for number in senders:
        if number > 1 and count >= number:
            parts = [work / f"{name}-{number}-part{i}" for i in range(number)]
            for i, path in enumerate(sorted(series.glob("*.dcm"))):
                parts[i % number].mkdir(exist_ok=True)
                os.link(path, parts[i % number] / path.name)
            folders[number] = parts
    rounds = []
    for _ in range(repeat):
        results = {DIRECT: direct(work, [series], count)}
        if count > 1:  # one association of many instances: the stack's per-instance ceiling
            results[RECEIVE_ONLY] = stack_floor([series], "--receive-only")
            results[DURABLE] = stack_floor([series], "--receive-only", "--durable")
            results[FLOOR] = stack_floor([series])
        for number, parts in folders.items():
            plural = "sender" if number == 1 else "senders"
            for mode in modes:
                label = f"anonproxy {mode}, {number} {plural}"
                results[label] = via_proxy(work, parts, count, mode)
        rounds.append(results)
    report(name, count, size, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mr", type=int, default=1000, help="MR 256x256 instances (0: skip)")
    parser.add_argument("--ct", type=int, default=500, help="CT 512x512 instances (0: skip)")
    parser.add_argument(
        "--large-mib", type=int, default=1024, help="one multi-frame instance (0: skip)"
    )
    parser.add_argument(
        "--deidentify-workers", type=int, help="the proxy's listen.deidentify_workers"
    )
    parser.add_argument(
        "--acknowledge",
        choices=[*MODES, "both"],
        default="both",
        help="the proxy's listen.acknowledge (default: both, one run each)",
    )
    parser.add_argument(
        "--no-ocr",
        action="store_true",
        help="profile.clean_pixel_data: off (the pixels of CT and MR images are not read)",
    )
    parser.add_argument(
        "--senders", default="1,4", help="parallel storescu senders per run, e.g. 1,2,4,8"
    )
    parser.add_argument(
        "--incoming-key",
        choices=["off", "on", "both"],
        default="off",
        help="storage.incoming_key_file: the incoming spool sealed (both: a run without, one with)",
    )
    parser.add_argument(
        "--destination",
        choices=["storescp", "storescp-fork", "orthanc"],
        default="storescp",
        help="the research PACS (storescp serves one association at a time)",
    )
    parser.add_argument(
        "--max-associations", help="the destination's max_associations (default: its default)"
    )
    parser.add_argument(
        "--peer-max-pdu", type=int, help="the research PACS's Maximum Length (4096..131072)"
    )
    parser.add_argument(
        "--processes", type=int, help="the proxy's listen.processes (acceptor processes)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every run, interleaved; medians printed (ratios within each round)",
    )
    args = parser.parse_args()
    if args.processes is not None:
        LISTEN["processes"] = args.processes
    PEER.update(kind=args.destination, max_pdu=args.peer_max_pdu)
    if args.max_associations is not None:
        value = args.max_associations
        DESTINATION["max_associations"] = int(value) if value.isdigit() else value
    senders = tuple(int(n) for n in args.senders.split(","))
    if args.no_ocr:
        PROFILE["clean_pixel_data"] = "off"
    modes = MODES if args.acknowledge == "both" else (args.acknowledge,)
    sealed = {"off": ("",), "on": ("+sealed",), "both": ("", "+sealed")}[args.incoming_key]
    modes = tuple(mode + variant for mode in modes for variant in sealed)
    if args.deidentify_workers is not None:
        LISTEN["deidentify_workers"] = args.deidentify_workers
    with tempfile.TemporaryDirectory(prefix="anonproxy-bench-") as tmp:
        work = Path(tmp)
        if args.mr:
            series = work / "MR-256"
            size = make_series(series, "MR_small.dcm", args.mr, 256)
            bench(work, "MR-256", series, args.mr, size, modes, senders, args.repeat)
        if args.ct:
            series = work / "CT-512"
            size = make_series(series, "CT_small.dcm", args.ct, 512)
            bench(work, "CT-512", series, args.ct, size, modes, senders, args.repeat)
        if args.large_mib:
            series = work / "multiframe"
            size = make_large(series, args.large_mib)
            bench(
                work, f"multi-frame {args.large_mib} MiB", series, 1, size, modes, (1,), args.repeat
            )


if __name__ == "__main__":
    main()

"""`anonproxy deidentify` against dicognito on the same files, in one run.

    .venv/bin/pip install dicognito    # the baseline; not a dependency of anonproxy
    .venv/bin/python benchmarks/deidentify.py [--copies 20] [--rounds 2] [--ocr]

Copies pydicom's test corpus (the files shipped in its wheel) *copies* times into a temporary
folder, each file a distinct instance (its SOP Instance UID changed, same length: with
identical copies, and the corpus's instances saved in several transfer syntaxes, both tools
overwrote most of their outputs, which costs ~0.35 ms a file on ext4 and which a batch of
distinct instances never does), then times, on exactly those files, *rounds* times in turn:

* ``anonproxy deidentify -j 1`` (one core, as dicognito runs): the whole Table E.1-1 and the
  self-check, with ``profile.clean_pixel_data: off`` — the header work dicognito does too
  (neither reads the pixels);
* ``anonproxy deidentify`` with all cores, the same profile;
* ``python -m dicognito --output-directory OUT IN`` (one process).

With ``--ocr``, also ``anonproxy deidentify -j 1`` with the default profile, whose Clean Pixel
Data option reads the images that triage sends to OCR (most of the corpus's ultrasound and
secondary captures): pixel work dicognito does not do, timed apart.

Prints, per tool, the best round in files/s and ms per file, every round's seconds, and the
ratio of anonproxy's ms per file to dicognito's (the target of issue 13: at most 0.5 with one
core). Each figure includes the start of the process (imports, the engine, the worker
processes), spread over the files: it is not the same for both tools (one file, the best of 11
runs: anonproxy's command line ~0.8 s of CPU, dicognito's ~0.57 s, of which importing pydicom
~0.54 s for both), so each round also times every tool on
one file (CT_small.dcm), and a second table gives the start and the ms per file without it
(the best round's seconds minus the best one-file run, over the files but one), with the
ratio of those. Every figure is also given in CPU seconds (user and system, the tool and its
worker processes): on a shared machine they vary less than the time (they still grow with the
load of the other core).

The anonproxy measured is the one ``python -m anonproxy`` imports in the current folder (its
package there comes before PYTHONPATH): to time another checkout, run the script from it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.errors import InvalidDicomError


def corpus() -> list[Path]:
    """The instance files of pydicom's wheel (with file meta and a SOP Class UID)."""
    folder = Path(str(get_testdata_file("CT_small.dcm"))).parent
    files = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SOPClassUID" in ds and "StudyInstanceUID" in ds:
            files.append(path)
    return files


def distinct_copy(path: Path, number: int) -> bytes:
    """The bytes of *path* as instance *number* (1 to 9999): its SOP Instance UID (where it is
    stored as text: file meta and data set, not in a deflated data set) has the last four
    digits of its longest component replaced by *number*'s, the same length; so the files
    are distinct instances (the corpus holds one instance in several transfer syntaxes, and
    the copies repeat them) and no output of a tool overwrites another."""
    data = path.read_bytes()
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    parts = uid.split(".")
    longest = max(range(len(parts)), key=lambda i: len(parts[i]))
    if len(parts[longest]) < 5:
        return data
    parts[longest] = parts[longest][:-4] + f"{number:04d}"
    return data.replace(uid.encode("ascii"), ".".join(parts).encode("ascii"))


def timed(label: str, command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds *command* took, and the CPU seconds (user and system) it and its processes used:
    on a shared machine the CPU time varies much less than the time. Exit status 1 is
    accepted: `anonproxy deidentify` exits 1 when it refused some files (the corpus holds
    files that cannot be de-identified), and prints why."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode not in (0, 1):
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    if done.returncode == 1:
        print(f"  ({label}: {done.stdout.strip()})")
    return elapsed, cpu


NO_OCR = ["--set", 'profile.clean_pixel_data="off"']


Tool = Callable[[Path, Path], list[str]]  # (input folder, output folder) -> command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of the corpus")
    parser.add_argument("--rounds", type=int, default=2, help="times each tool runs (best kept)")
    parser.add_argument("--ocr", action="store_true", help="also time the default profile (OCR)")
    args = parser.parse_args()
    files = corpus()
    env = {**os.environ, "ANONPROXY_SECRET": "benchmark-secret-0123456789abcdef"}
    default_profile = [sys.executable, "-m", "anonproxy", "deidentify", "-q"]
    anonproxy = [*default_profile, *NO_OCR]
    dicognito = [sys.executable, "-m", "dicognito", "--quiet", "-o"]
    tools: dict[str, Tool] = {
        "anonproxy deidentify -j 1": lambda src, out: [*anonproxy, "-j", "1", str(src), str(out)],
        f"anonproxy deidentify ({os.cpu_count()} cores)": lambda src, out: [
            *anonproxy,
            str(src),
            str(out),
        ],
        "dicognito": lambda src, out: [*dicognito, str(out), str(src)],
    }
    if args.ocr:
        tools["anonproxy -j 1, default profile (OCR)"] = lambda src, out: [
            *default_profile,
            "-j",
            "1",
            str(src),
            str(out),
        ]
    with tempfile.TemporaryDirectory(prefix="anonproxy-deid-bench-") as tmp:
        work = Path(tmp)
        source = work / "in"
        for copy in range(args.copies):
            folder = source / f"{copy:03d}"
            folder.mkdir(parents=True)
            for index, path in enumerate(files):
                number = copy * len(files) + index + 1
                (folder / path.name).write_bytes(distinct_copy(path, number))
        single = work / "one"
        single.mkdir()
        shutil.copyfile(str(get_testdata_file("CT_small.dcm")), single / "CT_small.dcm")
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in tools}
        starts: dict[str, list[tuple[float, float]]] = {label: [] for label in tools}
        for round_ in range(args.rounds):
            for index, (label, command) in enumerate(tools.items()):
                for inputs, times in ((source, runs), (single, starts)):
                    out = work / f"out-{round_}-{index}"
                    try:
                        times[label].append(timed(label, command(inputs, out), env))
                    except (subprocess.CalledProcessError, FileNotFoundError):
                        print(f"{label} failed (dicognito: pip install dicognito)")
                    shutil.rmtree(out, ignore_errors=True)
    count = len(files) * args.copies
    print(f"{count} files ({len(files)} pydicom test files x {args.copies}), best of {args.rounds}")
    report(runs, starts, count)


def report(
    runs: dict[str, list[tuple[float, float]]],
    starts: dict[str, list[tuple[float, float]]],
    count: int,
) -> None:
    """The two tables: with the start of each process, and without it; each in seconds and
    in CPU seconds (the best round of each)."""
    best = {
        label: tuple(min(r[i] for r in rounds) for i in (0, 1))
        for label, rounds in runs.items()
        if rounds
    }
    base = best.get("dicognito")
    for label, rounds in runs.items():
        if label not in best:
            continue
        wall, cpu = best[label]
        ratio = f"  {wall / base[0]:5.2f} x dicognito's" if base else ""
        cpu_ratio = f" ({cpu / base[1]:4.2f} x)" if base else ""
        times = ", ".join(f"{r[0]:.2f}" for r in rounds)
        print(
            f"  {label:38s} {count / wall:8.1f} files/s {wall / count * 1000:7.2f} ms/file"
            f"{ratio}  CPU {cpu / count * 1000:5.2f} ms/file{cpu_ratio}  (rounds: {times} s)"
        )
    first = {
        label: tuple(min(r[i] for r in rounds) for i in (0, 1))
        for label, rounds in starts.items()
        if rounds
    }
    print("without the start of the process (the best one-file run):")
    per_file = {
        label: tuple((best[label][i] - first[label][i]) / (count - 1) for i in (0, 1))
        for label in best
        if label in first
    }
    base_per_file = per_file.get("dicognito")
    for label, (wall, cpu) in per_file.items():
        ratio = cpu_ratio = ""
        if base_per_file is not None:
            ratio = f"  {wall / base_per_file[0]:5.2f} x dicognito's"
            cpu_ratio = f" ({cpu / base_per_file[1]:4.2f} x)"
        print(
            f"  {label:38s} start {first[label][0]:5.2f} s {wall * 1000:7.2f} ms/file{ratio}"
            f"  CPU {cpu * 1000:5.2f} ms/file{cpu_ratio}"
        )


if __name__ == "__main__":
    main()

"""`anonproxy deidentify` against dicognito on the same files, in one run.

    .venv/bin/pip install dicognito    # the baseline; not a dependency of anonproxy
    .venv/bin/python benchmarks/deidentify.py [--copies 20] [--rounds 2] [--ocr]

Copies pydicom's test corpus (the files shipped in its wheel) *copies* times into a temporary
folder, then times, on exactly those files, *rounds* times in turn:

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
core). Each figure includes the start of the process (a few hundred ms, spread over the files).
"""

from __future__ import annotations

import argparse
import os
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


def timed(label: str, command: list[str], env: dict[str, str]) -> float:
    """Seconds *command* took. Exit status 1 is accepted: `anonproxy deidentify` exits 1 when it
    refused some files (the corpus holds files that cannot be de-identified), and prints why."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    if done.returncode == 1:
        print(f"  ({label}: {done.stdout.strip()})")
    return elapsed


NO_OCR = ["--set", 'profile.clean_pixel_data="off"']


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
    with tempfile.TemporaryDirectory(prefix="anonproxy-deid-bench-") as tmp:
        work = Path(tmp)
        source = work / "in"
        for copy in range(args.copies):
            folder = source / f"{copy:03d}"
            folder.mkdir(parents=True)
            for path in files:
                shutil.copyfile(path, folder / path.name)
        count = len(files) * args.copies

        def io(out: Path) -> list[str]:
            return [str(source), str(out)]

        tools: dict[str, Callable[[Path], list[str]]] = {
            "anonproxy deidentify -j 1": lambda out: [*anonproxy, "-j", "1", *io(out)],
            f"anonproxy deidentify ({os.cpu_count()} cores)": lambda out: [*anonproxy, *io(out)],
            "dicognito": lambda out: [*dicognito, str(out), str(source)],
        }
        if args.ocr:
            tools["anonproxy -j 1, default profile (OCR)"] = lambda out: [
                *default_profile,
                "-j",
                "1",
                *io(out),
            ]
        runs: dict[str, list[float]] = {label: [] for label in tools}
        for round_ in range(args.rounds):
            for index, (label, command) in enumerate(tools.items()):
                out = work / f"out-{round_}-{index}"
                try:
                    runs[label].append(timed(label, command(out), env))
                except (subprocess.CalledProcessError, FileNotFoundError):
                    print(f"{label} failed (dicognito: pip install dicognito)")
                shutil.rmtree(out, ignore_errors=True)
    baseline = min(runs["dicognito"], default=None)
    print(f"{count} files ({len(files)} pydicom test files x {args.copies}), best of {args.rounds}")
    for label, seconds in runs.items():
        if not seconds:
            continue
        best = min(seconds)
        ratio = f"  {best / baseline:5.2f} x dicognito's ms/file" if baseline else ""
        rounds = ", ".join(f"{s:.2f}" for s in seconds)
        print(
            f"  {label:38s} {count / best:8.1f} files/s {best / count * 1000:7.2f} ms/file"
            f"{ratio}  (rounds: {rounds} s)"
        )


if __name__ == "__main__":
    main()

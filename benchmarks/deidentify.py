"""`anonproxy deidentify` against dicognito on the same files, in one run.

    .venv/bin/pip install dicognito    # the baseline; not a dependency of anonproxy
    .venv/bin/python benchmarks/deidentify.py [--copies 20]

Copies pydicom's test corpus (the files shipped in its wheel) *copies* times into a temporary
folder, then times, on exactly those files:

* ``anonproxy deidentify IN OUT`` with all cores (the whole Table E.1-1, self-check on);
* ``anonproxy deidentify -j 1`` (one core);
* ``python -m dicognito --output-directory OUT IN`` (one process, as dicognito runs).

Prints files/s, ms per file, and the ratio against dicognito.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
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


def timed(command: list[str], env: dict[str, str]) -> float:
    """Seconds *command* took. Exit status 1 is accepted: `anonproxy deidentify` exits 1 when it
    refused some files (the corpus holds files that cannot be de-identified), and prints why."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    if done.returncode == 1:
        print(f"  ({Path(command[1]).name} {command[3]}: {done.stdout.strip()})")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of the corpus")
    args = parser.parse_args()
    files = corpus()
    env = {**os.environ, "ANONPROXY_SECRET": "benchmark-secret-0123456789abcdef"}
    with tempfile.TemporaryDirectory(prefix="anonproxy-deid-bench-") as tmp:
        work = Path(tmp)
        source = work / "in"
        for copy in range(args.copies):
            folder = source / f"{copy:03d}"
            folder.mkdir(parents=True)
            for path in files:
                shutil.copyfile(path, folder / path.name)
        count = len(files) * args.copies
        anonproxy = [sys.executable, "-m", "anonproxy", "deidentify", "-q"]
        runs = {
            f"anonproxy deidentify ({os.cpu_count()} cores)": timed(
                [*anonproxy, str(source), str(work / "out1")], env
            ),
            "anonproxy deidentify -j 1": timed(
                [*anonproxy, "-j", "1", str(source), str(work / "out2")], env
            ),
        }
        try:
            runs["dicognito"] = timed(
                [sys.executable, "-m", "dicognito", "--quiet", "-o", str(work / "out3"),
                 str(source)],
                env,
            )  # fmt: skip
        except (subprocess.CalledProcessError, FileNotFoundError):
            print("dicognito is not installed: pip install dicognito")
    baseline = runs.get("dicognito")
    print(f"{count} files ({len(files)} pydicom test files x {args.copies})")
    for label, seconds in runs.items():
        ratio = f"  {baseline / seconds:.2f}x dicognito's speed" if baseline else ""
        print(
            f"  {label:34s} {count / seconds:8.1f} files/s {seconds / count * 1000:7.2f} ms/file"
            f"{ratio}"
        )


if __name__ == "__main__":
    main()

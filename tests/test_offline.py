"""``anonproxy deidentify``'s work (:mod:`anonproxy.offline`): one job in this process, more
in worker processes, with the same outcomes and outputs."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from anonproxy import cli, offline
from anonproxy.config import Settings
from anonproxy.deid import Deidentifier
from anonproxy.deid.instance import DeidentifiedFile, Limits, Target

from conftest import TEST_SECRET

SECRET = TEST_SECRET.value


def _inputs(folder: Path, corpus: list[Path]) -> list[Path]:
    """The corpus, a file that is not DICOM, a truncated instance and a dangling link."""
    folder.mkdir()
    for path in corpus:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not DICOM", "utf-8")
    (folder / "truncated.dcm").write_bytes(corpus[0].read_bytes()[:1000])
    (folder / "gone.dcm").symlink_to(folder / "nowhere.dcm")
    return [folder]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_one_job_runs_here_with_the_outcomes_and_outputs_of_worker_processes(
    tmp_path: Path, corpus: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _inputs(tmp_path / "in", corpus)
    pids: list[int] = []
    file_path = offline.deidentify_file

    def recorded(
        engine: Deidentifier, source: Path, target: Target, *, limits: Limits
    ) -> DeidentifiedFile:
        pids.append(os.getpid())
        return file_path(engine, source, target, limits=limits)

    monkeypatch.setattr(offline, "deidentify_file", recorded)
    settings = Settings()
    here = list(
        offline.deidentify(settings, SECRET, offline.tasks(inputs, tmp_path / "one"), jobs=1)
    )
    # in this process: every readable input went through the patched function here
    assert pids == [os.getpid()] * (len(corpus) + 2)
    assert offline._WORKER is None  # the engine is not kept after the run
    pooled = list(
        offline.deidentify(settings, SECRET, offline.tasks(inputs, tmp_path / "two"), jobs=2)
    )
    assert len(pids) == len(corpus) + 2  # the worker processes' calls were not here
    assert here == pooled
    assert here.count(offline.DEIDENTIFIED) == len(corpus)
    assert offline.NOT_DICOM in here
    assert offline.UNREADABLE in here
    assert len(here) == len(corpus) + 3
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert one
    assert one == two
    assert all(dcmread(tmp_path / "one" / name).PatientIdentityRemoved == "YES" for name in one)


def test_one_job_goes_on_after_a_file_that_fails(
    tmp_path: Path, corpus: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in one file is that file's outcome (without its message, which
    could quote a value); the files after it are de-identified."""
    file_path = offline.deidentify_file
    failing = corpus[1]

    def fails_once(
        engine: Deidentifier, source: Path, target: Target, *, limits: Limits
    ) -> DeidentifiedFile:
        if source == failing:
            raise RuntimeError("PATIENT^NAME")
        return file_path(engine, source, target, limits=limits)

    monkeypatch.setattr(offline, "deidentify_file", fails_once)
    work = [(path, tmp_path / f"{n}.dcm", False) for n, path in enumerate(corpus[:4])]
    outcomes = list(offline.deidentify(Settings(), SECRET, work, jobs=1))
    assert outcomes[1] == "failed (RuntimeError)"
    assert outcomes[:1] + outcomes[2:] == [offline.DEIDENTIFIED] * 3
    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == ["0.dcm", "2.dcm", "3.dcm"]
    assert offline._WORKER is None


def test_one_job_stopped_early_drops_its_engine(tmp_path: Path, corpus: list[Path]) -> None:
    outcomes = offline.deidentify(Settings(), SECRET, offline.tasks(corpus, tmp_path), jobs=1)
    assert next(outcomes) == offline.DEIDENTIFIED
    assert offline._WORKER is not None
    outcomes.close()  # type: ignore[attr-defined]  # a generator
    assert offline._WORKER is None


def test_deidentify_command_collects_garbage_again_after_its_start(
    tmp_path: Path, corpus: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command has the collector off while it imports the engine, whose objects it then
    leaves out of every collection (frozen), and on afterwards."""
    monkeypatch.setenv("ANONPROXY_SECRET", SECRET.decode())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "one.dcm"
    try:
        assert cli.main(["deidentify", "-q", "-j", "1", str(corpus[0]), str(out)]) == 0
        assert gc.isenabled()
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()  # the start's objects back to the collector of this test session
    assert dcmread(out).PatientIdentityRemoved == "YES"

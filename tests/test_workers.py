"""De-identification in worker processes gives exactly what the association thread gives."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from anonproxy.config import ProfileConfig
from anonproxy.deid import Limits
from anonproxy.deidentifiers import build_deidentifier, deidentifier_factory
from anonproxy.status import StoreStatus
from anonproxy.workers import (
    Deidentified,
    DeidentifierPool,
    Refusal,
    _run_in_worker,
    deidentify_file,
)

from conftest import TEST_SECRET, corpus_paths

PROFILE = ProfileConfig(options=["retain_longitudinal_temporal_information_modified_dates"])


@pytest.fixture(scope="module")
def pool():
    engine = build_deidentifier(PROFILE, TEST_SECRET.value)
    workers = DeidentifierPool(engine, deidentifier_factory(PROFILE, TEST_SECRET.value), workers=2)
    workers.start()
    yield workers
    workers.shutdown()


def test_workers_and_the_calling_thread_agree(pool: DeidentifierPool, tmp_path: Path) -> None:
    files = [p for p in corpus_paths() if p.name != "rtstruct.dcm"]  # rtstruct has no meta
    results: dict[str, Deidentified | Refusal] = {}

    def run(path: Path) -> None:
        results[path.name] = pool.run(path, tmp_path / f"worker-{path.name}")

    threads = [threading.Thread(target=run, args=(p,)) for p in files]  # concurrent: workers
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pool.offloaded > 0
    for path in files:
        inline = deidentify_file(pool.engine, path, tmp_path / f"inline-{path.name}")
        assert isinstance(inline, Deidentified)
        assert results[path.name] == inline
        written = (tmp_path / f"worker-{path.name}").read_bytes()
        assert written == (tmp_path / f"inline-{path.name}").read_bytes()
        assert len(written) == inline.size


def test_a_refusal_crosses_the_process_boundary(pool: DeidentifierPool, tmp_path: Path) -> None:
    assert pool._pool is not None
    source = tmp_path / "broken.dcm"
    source.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 9)
    refusal = pool._pool.submit(_run_in_worker, str(source), str(tmp_path / "out")).result()
    assert isinstance(refusal, Refusal)
    assert refusal.status == StoreStatus.CANNOT_UNDERSTAND
    assert refusal.stage == "decode"


def test_a_dead_worker_fails_one_instance_closed_and_the_pool_recovers(
    pool: DeidentifierPool, tmp_path: Path
) -> None:
    source = corpus_paths()[0]
    target = tmp_path / "out.dcm"
    assert pool._pool is not None
    for process in list(pool._pool._processes.values()):
        os.kill(process.pid, signal.SIGKILL)
    outcomes = []

    def run() -> None:
        outcomes.append(pool.run(source, tmp_path / f"out-{threading.get_ident()}.dcm"))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(o, Deidentified | Refusal) for o in outcomes)
    refused = [o for o in outcomes if isinstance(o, Refusal)]
    assert all(o.status == StoreStatus.PROCESSING_FAILURE for o in refused)
    again = [pool.run(source, target) for _ in range(2)]
    assert all(isinstance(o, Deidentified) for o in again)
    assert dcmread(target).PatientIdentityRemoved == "YES"


def test_a_write_that_fails_is_out_of_resources(pool: DeidentifierPool, tmp_path: Path) -> None:
    """A full disk or an I/O error while writing: 0xA700, which the sender retries later."""
    source = corpus_paths()[0]
    refusal = deidentify_file(pool.engine, source, tmp_path / "missing-folder" / "out.dcm")
    assert isinstance(refusal, Refusal)
    assert refusal.status == StoreStatus.OUT_OF_RESOURCES
    assert refusal.stage == "spool"


def test_policy_and_structure_refusals_keep_their_stage_and_status(tmp_path: Path) -> None:
    engine = build_deidentifier(PROFILE, TEST_SECRET.value)
    ds = dcmread(corpus_paths()[0])
    ds.BurnedInAnnotation = "YES"
    burned = tmp_path / "burned.dcm"
    ds.save_as(burned, enforce_file_format=True)
    refusal = deidentify_file(engine, burned, tmp_path / "out.dcm")
    assert refusal == Refusal(
        StoreStatus.DEIDENTIFICATION_FAILED, "policy", "burned-in annotation refused by policy"
    )
    passing = build_deidentifier(ProfileConfig(burned_in_annotation="pass"), TEST_SECRET.value)
    assert isinstance(deidentify_file(passing, burned, tmp_path / "out.dcm"), Deidentified)
    del ds.BurnedInAnnotation
    ds.RequestAttributesSequence = [Dataset()]
    ds.RequestAttributesSequence[0].RequestAttributesSequence = [Dataset()]
    deep = tmp_path / "deep.dcm"
    ds.save_as(deep, enforce_file_format=True)
    refusal = deidentify_file(engine, deep, tmp_path / "out.dcm", Limits(max_sequence_depth=1))
    assert refusal == Refusal(
        StoreStatus.CANNOT_UNDERSTAND, "limits", "sequences nest deeper than max_sequence_depth 1"
    )
    gone = deidentify_file(engine, tmp_path / "vanished.dcm", tmp_path / "out.dcm")
    assert isinstance(gone, Refusal)
    assert (gone.status, gone.stage) == (StoreStatus.CANNOT_UNDERSTAND, "decode")


def test_worker_processes_start_only_when_instances_overlap(tmp_path: Path) -> None:
    engine = build_deidentifier(PROFILE, TEST_SECRET.value)
    lazy = DeidentifierPool(engine, deidentifier_factory(PROFILE, TEST_SECRET.value), workers=1)
    source = corpus_paths()[0]
    try:
        assert isinstance(lazy.run(source, tmp_path / "alone.dcm"), Deidentified)
        assert lazy._pool is None  # a lone association never needs them
        deadline = time.monotonic() + 60
        while lazy.offloaded == 0 and time.monotonic() < deadline:
            threads = [
                threading.Thread(target=lazy.run, args=(source, tmp_path / f"{i}.dcm"))
                for i in range(3)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert lazy.offloaded > 0
        assert lazy._pool is not None
    finally:
        lazy.shutdown()
    assert lazy._pool is None

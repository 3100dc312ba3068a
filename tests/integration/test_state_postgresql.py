"""A proxy on a PostgreSQL state store (a throw-away cluster, tests/pgcluster.py): lookup-table
pseudonyms and map entries in the shared database; while PostgreSQL is stopped, instances of
a patient and study already known keep flowing, an unknown patient gets Out of Resources
(0xA700) and is not forwarded, and the same instances sent again after it returns succeed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from anonproxy.remap import find, load_map_key
from anonproxy.state import StateStore

from builders import make_series
from peers import StoreSCP, storescu, wait_for
from pgcluster import PostgresCluster, new_database

pytestmark = pytest.mark.integration


def _patients(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in folder.iterdir():
        if path.is_file():
            pid = str(dcmread(path, stop_before_pixels=True).PatientID)
            counts[pid] = counts.get(pid, 0) + 1
    return counts


def test_postgresql_outage_refuses_only_what_needs_the_store(
    make_proxy, cluster: PostgresCluster, tmp_path: Path
) -> None:
    state = new_database(cluster, tmp_path)
    table = tmp_path / "ids.csv"
    table.write_text("PID-KNOWN-1,SUBJ-0001\n", "utf-8")
    known = make_series(tmp_path / "known", 6, patient_id="PID-KNOWN-1")
    for path in known[3:]:  # the study's second half waits for the outage
        (tmp_path / "known-later").mkdir(exist_ok=True)
        shutil.move(path, tmp_path / "known-later" / path.name)
    make_series(tmp_path / "unknown", 3, patient_id="PID-UNKNOWN-2")
    research = StoreSCP(tmp_path / "research").start()
    try:
        proxy = make_proxy(
            [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
              "port": research.port}],
            state={"backend": "postgresql", "dsn_file": str(state.dsn_file), "timeout_s": 1.0},
            profile={"patient_id": {"method": "lookup", "lookup_csv": str(table),
                                    "unknown_patient": "hash"}},
        )  # fmt: skip
        assert storescu(proxy.port, [tmp_path / "known"]).returncode == 0
        assert wait_for(lambda: len(research.files()) == 3, timeout=90)
        cluster.pause()
        try:
            later = storescu(proxy.port, [tmp_path / "known-later"], extra=["-d"])
            assert "0xa700" not in (later.stdout + later.stderr).lower()
            refused = storescu(proxy.port, [tmp_path / "unknown"], extra=["-d"])
            assert "0xa700" in (refused.stdout + refused.stderr).lower()
            assert wait_for(lambda: len(research.files()) == 6, timeout=90)
        finally:
            cluster.resume()
        assert _patients(research.directory) == {"SUBJ-0001": 6}  # nothing of the refused

        # Each process's connection pool (several with listen.processes > 1) reconnects after
        # a delay that doubled with every failed attempt during the outage: sent again until
        # every process has reconnected
        def accepted() -> bool:
            again = storescu(proxy.port, [tmp_path / "unknown"], extra=["-d"])
            return "0xa700" not in (again.stdout + again.stderr).lower()

        assert wait_for(accepted, timeout=60, interval=1.0)
        assert wait_for(lambda: len(research.files()) == 9, timeout=90)
    finally:
        research.stop()
    patients = _patients(research.directory)
    assert patients["SUBJ-0001"] == 6
    [hashed] = [p for p in patients if p != "SUBJ-0001"]
    store = StateStore.open(state, tmp_path)
    try:
        key = load_map_key(tmp_path / "var")
        assert [f.original.patient_id for f in find(store, key, patient_id="SUBJ-0001")] == [
            "PID-KNOWN-1"
        ]
        assert [f.original.patient_id for f in find(store, key, patient_id=hashed)] == [
            "PID-UNKNOWN-2"
        ]
        assert store.map_count() == 2
        assert store.patient_count() == 2  # the table's patient and the hashed one
    finally:
        store.close()

"""The state store (anonproxy.state) on both backends: SQLite in a file and PostgreSQL (a
throw-away cluster, tests/pgcluster.py): migrations applied once, the lookup table's rules (a
patient's pseudonym never changes), one pseudonym per patient for concurrent writers in two
processes, and a store that cannot be reached raising the transient error."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from anonproxy.config import StateConfig
from anonproxy.errors import ConfigError, StateUnavailable
from anonproxy.patients import PatientDirectory, import_csv
from anonproxy.state import SCHEMA_VERSION, LookupConflict, StateStore

from pgcluster import PostgresCluster, new_database

SECRET = b"a test secret of enough length"


def test_migrations_are_applied_once_and_recorded(
    state_config: StateConfig, tmp_path: Path
) -> None:
    store = StateStore.open(state_config, tmp_path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.migrate() == []  # nothing left to apply
    finally:
        store.close()
    again = StateStore.open(state_config, tmp_path)  # a second start (another node) applies nothing
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert again.patient_count() == 0
    finally:
        again.close()


def test_a_store_newer_than_the_program_is_refused(
    state_config: StateConfig, tmp_path: Path
) -> None:
    store = StateStore.open(state_config, tmp_path)
    try:
        with store._backend.transaction(write=True) as cur:
            cur.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)",
                (SCHEMA_VERSION + 1,),
            )
    finally:
        store.close()
    with pytest.raises(ConfigError, match="newer than this anonproxy"):
        StateStore.open(state_config, tmp_path)


def test_the_sqlite_file_is_owner_only(tmp_path: Path) -> None:
    StateStore.open(StateConfig(), tmp_path).close()
    assert (tmp_path / "state.sqlite3").stat().st_mode & 0o077 == 0


def test_a_patients_pseudonym_never_changes(state_config: StateConfig, tmp_path: Path) -> None:
    table = tmp_path / "ids.csv"
    table.write_text("original,pseudonym\nMRN-1,SUBJ-001\nMRN-2,SUBJ-002\n")
    store = StateStore.open(state_config, tmp_path)
    try:
        assert import_csv(store, SECRET, table) == (2, 0)
        assert import_csv(store, SECRET, table) == (0, 2)  # again: nothing changes
        edited = tmp_path / "edited.csv"
        edited.write_text("MRN-3,SUBJ-003\nMRN-1,SUBJ-999\n")
        with pytest.raises(ConfigError, match=r"row 2 .*another pseudonym; nothing imported"):
            import_csv(store, SECRET, edited)
        taken = tmp_path / "taken.csv"
        taken.write_text("MRN-4,SUBJ-002\n")
        with pytest.raises(ConfigError, match="another patient's"):
            import_csv(store, SECRET, taken)
        assert store.patient_count() == 2  # all or none: MRN-3 was not imported
        lookup = PatientDirectory(store, SECRET)
        assert lookup("MRN-1", None) == "SUBJ-001"
        assert lookup("MRN-3", None) is None  # unknown under reject
        assert lookup("MRN-3", "ANON-3") == "ANON-3"  # unknown under hash: recorded
        assert PatientDirectory(store, SECRET)("MRN-3", "ANON-other") == "ANON-3"
        with pytest.raises(LookupConflict):
            store.assign_patient(b"k" * 32, "SUBJ-001", "hash")
    finally:
        store.close()


def test_the_store_never_holds_an_original_patient_id(tmp_path: Path) -> None:
    table = tmp_path / "ids.csv"
    table.write_text("PLANTED-MRN-8812,SUBJ-001\n")
    store = StateStore.open(StateConfig(), tmp_path / "var")
    try:
        import_csv(store, SECRET, table)
        PatientDirectory(store, SECRET)("PLANTED-MRN-7734", "ANON-7734")
    finally:
        store.close()
    files = list((tmp_path / "var").iterdir())
    assert files
    for path in files:
        data = path.read_bytes()
        assert b"PLANTED-MRN" not in data, path.name


def _assign_many(config: dict[str, object], storage: str, tag: str, start, out) -> None:
    store = StateStore.open(StateConfig.model_validate(config), Path(storage), migrate=False)
    directory = PatientDirectory(store, SECRET)
    start.wait(30)
    got = {f"P{i}": directory(f"P{i}", f"{tag}-{i}") for i in range(60)}
    store.close()
    out.put(got)


def test_concurrent_writers_in_two_processes_agree(
    state_config: StateConfig, tmp_path: Path
) -> None:
    """Each process offers its own pseudonym for the same 60 new patients at once: the first
    writer wins, both processes get the same pseudonym for every patient."""
    StateStore.open(state_config, tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    section = state_config.model_dump(mode="json")
    processes = [
        ctx.Process(target=_assign_many, args=(section, str(tmp_path), tag, start, out))
        for tag in ("A", "B")
    ]
    for p in processes:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in processes]
    for p in processes:
        p.join(30)
        assert p.exitcode == 0
    first, second = results
    assert first == second
    assert len(set(first.values())) == 60
    store = StateStore.open(state_config, tmp_path)
    try:
        assert store.patient_count() == 60
    finally:
        store.close()


def test_an_unreachable_postgresql_is_a_transient_error(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    config = new_database(cluster, tmp_path)
    store = StateStore.open(config, tmp_path)
    try:
        directory = PatientDirectory(store, SECRET)
        assert directory("MRN-1", "ANON-1") == "ANON-1"
        cluster.pause()
        try:
            assert directory("MRN-1", "ANON-x") == "ANON-1"  # cached: no round trip
            with pytest.raises(StateUnavailable) as raised:
                directory("MRN-2", "ANON-2")
            assert "MRN" not in str(raised.value)
        finally:
            cluster.resume()
        assert directory("MRN-2", "ANON-2") == "ANON-2"  # the pool reconnects
    finally:
        store.close()


def test_the_dsn_file_must_be_owner_only(tmp_path: Path) -> None:
    dsn = tmp_path / "state.dsn"
    dsn.write_text("host=127.0.0.1 password=not-for-the-logs\n")
    dsn.chmod(0o644)
    with pytest.raises(ConfigError, match="owner only") as raised:
        StateStore.open(StateConfig(backend="postgresql", dsn_file=dsn), tmp_path)
    assert "not-for-the-logs" not in str(raised.value)


def test_lookup_import_refuses_an_edited_table_without_naming_a_value(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import TEST_SECRET

    env = {"ANONPROXY_SECRET": TEST_SECRET.value.decode(), "PATH": "/usr/bin:/bin"}
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'var'}}}\naudit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "anonproxy", *args, "-c", str(config)],
            env=env, capture_output=True, text=True, check=False, cwd=tmp_path,
        )  # fmt: skip

    (tmp_path / "ids.csv").write_text("MRN-PLANTED-1,SUBJ-001\nMRN-PLANTED-2,SUBJ-002\n")
    first = run("lookup", "import", str(tmp_path / "ids.csv"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "imported 2 patients (0 already there; 2 in the table)"
    (tmp_path / "ids.csv").write_text("MRN-PLANTED-1,SUBJ-001\nMRN-PLANTED-2,SUBJ-777\n")
    edited = run("lookup", "import", str(tmp_path / "ids.csv"))
    assert edited.returncode == 2
    assert "row 2 of the table: this patient already has another pseudonym" in edited.stderr
    assert "PLANTED" not in edited.stdout + edited.stderr
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"event": "lookup.imported"' in audit
    assert "PLANTED" not in audit

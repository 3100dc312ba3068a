"""The lookup table and the re-identification map through a running proxy (storescu →
``anonproxy serve`` with worker processes → storescp) and the commands an operator and the
honest broker run: ``lookup import``, ``map lookup``, ``map export``; SIGKILL after every
instance was acknowledged loses no map entry; ``map.enabled: false`` keeps nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydicom import dcmread

from builders import make_series
from conftest import TEST_SECRET, audit_records, serve
from peers import StoreSCP, free_port, stop_process, storescu, wait_for, wait_port

pytestmark = pytest.mark.integration

ORIGINALS = {  # values planted in the sent instances, looked for in every file we write
    "known_id": "PID-4711-X",
    "known_name": "Doe^Jane^Q",
    "unknown_id": "PLANTED-MRN-33017",
    "unknown_name": "Plantedname^Bob",
    "accession": "ACC-90210-Z",
}


def anonproxy(args: list[str], cwd: Path, key: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ANONPROXY_MAP_KEY_FILE"}
    env["ANONPROXY_SECRET"] = TEST_SECRET.value.decode()
    if key is not None:
        env["ANONPROXY_MAP_KEY_FILE"] = str(key)
    return subprocess.run(
        [sys.executable, "-m", "anonproxy", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_map_survives_sigkill_and_the_honest_broker_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "broker" / "map.key"  # the honest broker's key, outside the storage
    key.parent.mkdir()
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    monkeypatch.setenv("ANONPROXY_MAP_KEY_FILE", str(key))  # serve() passes the environment
    make_series(tmp_path / "known", 12, patient_id=ORIGINALS["known_id"])
    make_series(
        tmp_path / "unknown", 12,
        patient_id=ORIGINALS["unknown_id"], patient_name=ORIGINALS["unknown_name"],
    )  # fmt: skip
    research = StoreSCP(tmp_path / "research").start()
    port = free_port()
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port, "deidentify_workers": 2},
                "destinations": [
                    {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                     "port": research.port, "retry_max_delay_s": 2}
                ],
                "profile": {"patient_id": {"method": "lookup", "unknown_patient": "hash"}},
                "storage": {"path": str(tmp_path / "var"), "min_free_bytes": 0},
                "audit": {"path": str(tmp_path / "var" / "audit.jsonl")},
                "admin": {"port": 0},
            }
        ),
        "utf-8",
    )  # fmt: skip
    table = tmp_path / "ids.csv"
    table.write_text(f"original,pseudonym\n{ORIGINALS['known_id']},SUBJ-0001\n", "utf-8")
    imported = anonproxy(["lookup", "import", str(table), "-c", str(config)], tmp_path, key)
    assert imported.returncode == 0, imported.stderr
    assert "imported 1 patients" in imported.stdout
    proxy = serve(config, tmp_path)
    try:
        wait_port(port, timeout=30)
        for folder in ("known", "unknown"):
            sent = storescu(port, [tmp_path / folder])
            assert sent.returncode == 0, sent.stderr[-2000:]
        proxy.send_signal(signal.SIGKILL)  # every instance acknowledged; no shutdown
        proxy.wait(10)
        proxy = serve(config, tmp_path)  # restart: the spool is forwarded
        assert wait_for(lambda: len(research.files()) == 24, timeout=90)
    finally:
        stop_process(proxy, 60)
        research.stop()
    delivered = [dcmread(p, stop_before_pixels=True) for p in research.files()]
    by_patient: dict[str, set[str]] = {}
    for ds in delivered:
        by_patient.setdefault(str(ds.PatientID), set()).add(str(ds.StudyInstanceUID))
    assert set(by_patient) >= {"SUBJ-0001"}  # from the store's table, in the worker processes
    assert len(by_patient) == 2
    hashed = next(p for p in by_patient if p != "SUBJ-0001")
    assert hashed.startswith("ANON-")
    study = next(iter(by_patient[hashed]))

    from test_syslog import Receiver  # a syslog receiver on loopback (tests/integration)

    receiver = Receiver("udp")
    settings = json.loads(config.read_text("utf-8"))
    settings["audit"]["syslog"] = {"host": "127.0.0.1", "port": receiver.port}
    config.write_text(json.dumps(settings), "utf-8")
    try:
        looked = anonproxy(
            ["map", "lookup", "--pseudonym", "SUBJ-0001", "-c", str(config)], tmp_path, key
        )
        assert wait_for(lambda: "110110" in receiver.event_ids(), timeout=10)  # Patient Record
        [message] = [
            m
            for m in receiver.audit_messages()
            if m.find("EventIdentification/EventID").get("csd-code") == "110110"
        ]
        assert ET.tostring(message).decode().count(ORIGINALS["known_id"]) == 0
    finally:
        receiver.close()
    assert looked.returncode == 0, looked.stderr
    lines = looked.stdout.splitlines()
    assert lines[0].startswith("pseudonym_patient_id,original_patient_id,")
    assert len(lines) == 2  # one entry per patient and study, not per instance
    assert f"SUBJ-0001,{ORIGINALS['known_id']},SUBJ-0001,{ORIGINALS['known_name']}" in lines[1]
    exported = anonproxy(["map", "export", "--study", study, "-c", str(config)], tmp_path, key)
    assert exported.returncode == 0, exported.stderr
    assert ORIGINALS["unknown_id"] in exported.stdout
    assert ORIGINALS["unknown_name"] in exported.stdout
    assert ORIGINALS["accession"] in exported.stdout

    without = anonproxy(
        ["map", "lookup", "--pseudonym", "SUBJ-0001", "-c", str(config)], tmp_path, None
    )
    assert without.returncode == 2
    assert "no map key" in without.stderr
    assert ORIGINALS["known_id"] not in without.stdout + without.stderr
    wrong = tmp_path / "wrong.key"
    wrong.write_text(os.urandom(32).hex())
    wrong.chmod(0o600)
    refused = anonproxy(
        ["map", "lookup", "--pseudonym", "SUBJ-0001", "-c", str(config)], tmp_path, wrong
    )
    assert refused.returncode == 2
    assert "not the key" in refused.stderr
    assert ORIGINALS["known_id"] not in refused.stdout + refused.stderr

    records = audit_records(tmp_path / "var" / "audit.jsonl")
    looks = [r for r in records if r["event"] in ("map.lookup", "map.export")]
    assert [(r["event"], r["entries"]) for r in looks] == [("map.lookup", 1), ("map.export", 1)]
    assert looks[0]["pseudonym"] == "SUBJ-0001"
    assert [r["added"] for r in records if r["event"] == "lookup.imported"] == [1]
    journal = (tmp_path / "var" / "map" / "journal.jsonl").read_text("utf-8").splitlines()
    assert len(journal) == 2  # 24 instances, two studies
    written = [p for p in (tmp_path / "var").rglob("*") if p.is_file()]
    for path in written:  # the audit, the journal, the store, the spool's metadata
        data = path.read_bytes()
        if path.suffix == ".dcm":
            continue
        for value in ORIGINALS.values():
            assert value.encode() not in data, (path.relative_to(tmp_path), value)


def test_map_disabled_keeps_nothing(make_proxy, tmp_path: Path) -> None:
    make_series(tmp_path / "series", 3, patient_id=ORIGINALS["unknown_id"])
    research = StoreSCP(tmp_path / "research").start()
    try:
        proxy = make_proxy(
            [
                {
                    "name": "research",
                    "ae_title": "RESEARCH",
                    "host": "127.0.0.1",
                    "port": research.port,
                }
            ],
            map={"enabled": False},
        )
        assert proxy.map_recorder is None
        assert proxy.state is None
        assert storescu(proxy.port, [tmp_path / "series"]).returncode == 0
        assert wait_for(lambda: len(research.files()) == 3, timeout=90)
    finally:
        research.stop()
    names = {p.name for p in (tmp_path / "var").rglob("*")}
    assert not names & {"map", "journal.jsonl", "map.key", "state.sqlite3"}

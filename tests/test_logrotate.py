"""Log rotation without copytruncate: logrotate renames the audit file and the log file, then
sends SIGHUP; ``anonproxy serve`` opens them again by name and loses nothing."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from conftest import audit_records, corpus_identifying_values, serve
from peers import free_port, storescu, wait_for, wait_port

pytestmark = pytest.mark.integration


def forwarded(audit: Path) -> int:
    """Instances the audit file says were delivered."""
    return sum(r["event"] == "instance.forwarded" for r in audit_records(audit))


def test_sighup_reopens_the_audit_file_and_the_log_file_after_a_rename(
    tmp_path: Path, corpus: list[Path]
) -> None:
    port = free_port()
    audit = tmp_path / "var" / "audit.jsonl"
    log = tmp_path / "log" / "anonproxy.log"
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        yaml.safe_dump({
            "listen": {"port": port},
            "storage": {"path": str(tmp_path / "var"), "min_free_bytes": 0},
            "audit": {"path": str(audit)},
            "log": {"format": "json", "path": str(log)},
            "admin": {"port": 0},
        }),
        "utf-8",
    )  # fmt: skip
    first, second = (p for p in corpus if p.name in {"CT_small.dcm", "MR_small.dcm"})
    received = tmp_path / "var" / "received"
    process = serve(config, tmp_path)
    try:
        wait_port(port, timeout=30)
        # started: with several processes, one listens before the others (and the audit)
        assert wait_for(lambda: audit.exists() and "service.started" in audit.read_text())
        assert storescu(port, [first]).returncode == 0
        assert wait_for(lambda: forwarded(audit) == 1, timeout=30)
        # logrotate: rename, then signal
        audit.rename(audit.with_name("audit.jsonl.1"))
        log.rename(log.with_name("anonproxy.log.1"))
        process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: log.exists() and "service.logs_reopened" in log.read_text())
        assert audit.exists()
        assert storescu(port, [second]).returncode == 0
        assert wait_for(lambda: forwarded(audit) == 1, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err

    old = audit_records(audit.with_name("audit.jsonl.1"))
    new = audit_records(audit)
    assert old[0]["event"] == "service.started"
    assert new[-1]["event"] == "service.stopped"
    for records in (old, new):  # one instance in each file, each with its whole story
        events = [r["event"] for r in records]
        assert events.count("instance.received") == 1
        assert events.count("instance.spooled") == 1
        assert events.count("instance.forwarded") == 1
    assert {
        r["deid_sop_instance_uid"] for r in old + new if r["event"] == "instance.forwarded"
    } == {p.stem for p in received.rglob("*.dcm")}
    lines = [
        json.loads(line)
        for path in (log.with_name("anonproxy.log.1"), log)
        for line in path.read_text("utf-8").splitlines()
    ]  # every line of both log files is a JSON object
    events = [line["event"] for line in lines]
    assert "service.logs_reopened" in events
    text = log.with_name("anonproxy.log.1").read_text() + log.read_text() + err
    assert not [v for v in corpus_identifying_values([first, second]) if v in text]

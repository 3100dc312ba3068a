"""Audit records are JSON lines; pynetdicom's log lines lose every non-standard UID."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

from anonproxy.audit import AuditLog, configure_logging, get_logger


def test_one_json_line_per_event_from_many_threads(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a" / "audit.jsonl")

    def emit(n: int) -> None:
        for i in range(100):
            audit.event("instance.spooled", thread=n, index=i, actions={"X": 1})

    threads = [threading.Thread(target=emit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()
    lines = (tmp_path / "a" / "audit.jsonl").read_text("utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 400
    assert {r["event"] for r in records} == {"instance.spooled"}
    assert all("time" in r for r in records)


def test_pynetdicom_logs_are_scrubbed_of_instance_uids() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    logger = logging.getLogger("pynetdicom.dimse")
    logger.warning(
        "Storing 1.2.826.0.1.3680043.8.498.1234567 of class %s", "1.2.840.10008.5.1.4.1.1.2"
    )
    logger.debug("Affected SOP Instance UID: 1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322")
    output = stream.getvalue()
    assert "<uid>" in output
    assert "1.2.826.0.1.3680043.8.498.1234567" not in output
    assert "1.2.840.10008.5.1.4.1.1.2" in output  # a well-known SOP Class UID is not PHI
    assert "5962" not in output  # DEBUG of pynetdicom is off


def test_the_audit_trail_ignores_the_operational_log_level(tmp_path: Path) -> None:
    configure_logging("ERROR", io.StringIO())
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.event("association.accepted", calling_ae_title="CT01")
    audit.close()
    [record] = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert record["event"] == "association.accepted"


def test_json_operational_logs_are_scrubbed_of_uids_by_structlog_and_logging() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream, format="json")
    get_logger("anonproxy.test").info(
        "forward.sent", detail="instance 1.2.826.0.1.3680043.8.498.1234567 sent", count=1
    )
    logging.getLogger("pynetdicom.dimse").warning("Storing 1.2.826.0.1.3680043.8.498.7654321")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["forward.sent", "Storing <uid>"]
    assert lines[0]["detail"] == "instance <uid> sent"
    assert lines[0]["count"] == 1
    assert {line["level"] for line in lines} == {"info", "warning"}
    configure_logging("INFO", io.StringIO())


def test_a_reopened_audit_file_is_a_new_file_after_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.event("service.started")
    path.rename(tmp_path / "audit.jsonl.1")
    audit.event("instance.received")  # still into the renamed file, as with any open file
    audit.reopen()
    audit.event("service.stopped")
    audit.close()
    old = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl.1").open()]
    new = [json.loads(line)["event"] for line in path.open()]
    assert (old, new) == (["service.started", "instance.received"], ["service.stopped"])

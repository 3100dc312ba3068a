"""listen.acknowledge: after_receipt with real peers: Success at receive speed, nothing lost or
delivered twice across a SIGKILL, refused inputs quarantined, the incoming spool bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from builders import make_series
from conftest import audit_records, serve
from peers import StoreSCP, free_port, stop_process, storescu, wait_for, wait_port

pytestmark = pytest.mark.integration

RECEIPT = {"acknowledge": "after_receipt"}


class CountingSCP(StoreSCP):
    """storescp that writes every arrival to its own file: a duplicate shows as a second
    file of the same SOP Instance UID."""

    def options(self) -> list[str]:
        return ["--unique-filenames"]

    def arrivals(self) -> Counter[str]:
        return Counter(
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files()
        )


def _events(root: Path, name: str) -> list[dict[str, object]]:
    return [e for e in audit_records(root / "audit.jsonl") if e["event"] == name]


def _held(root: Path) -> list[Path]:
    """Received data sets in the incoming spool: deferred ones, and files received into (the
    empty files created ahead for the next data sets hold nothing)."""
    folder = root / "spool" / "deferred"
    return [p for p in folder.iterdir() if p.suffix == ".dcm" or p.stat().st_size]


def _research(scp: StoreSCP) -> dict[str, object]:
    return {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": scp.port,
            "retry_max_delay_s": 2}  # fmt: skip


def _successes(sent: subprocess.CompletedProcess[str]) -> int:
    """How many C-STOREs storescu (run with -v) saw answered Success (it logs a refusal such
    as 0xA700 at -v only, and exits 0)."""
    return (sent.stdout + sent.stderr).count("Received Store Response (Success)")


def _refused(sent: subprocess.CompletedProcess[str]) -> list[Path]:
    """The files storescu (run with -v) saw refused, to send again."""
    refused, current = [], None
    for line in (sent.stdout + sent.stderr).splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (Refused" in line and current is not None:
            refused.append(current)
    return refused


def _anonproxy(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "anonproxy", *args, "--config", str(config)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout


def test_sigkill_with_acknowledged_instances_waiting_delivers_each_once_after_restart(
    tmp_path: Path,
) -> None:
    """The research PACS is down until the restart: a second arrival can then only come from
    processing a data set twice, not from the forward worker's instance in flight at the
    SIGKILL (delivered, not yet removed from the spool: sent again, at least once)."""
    count = 500
    make_series(tmp_path / "series", count, template="CT_small.dcm")
    research = CountingSCP(tmp_path / "research")
    root = tmp_path / "var"
    port = free_port()
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port, "deidentify_workers": 1, **RECEIPT},
                "destinations": [_research(research)],
                "storage": {"path": str(root), "min_free_bytes": 0},
                "audit": {"path": str(root / "audit.jsonl")},
            }
        ),
        "utf-8",
    )
    proxy = serve(config, tmp_path)
    try:
        wait_port(port, timeout=30)
        sent = storescu(port, [tmp_path / "series"], extra=["-v"])
        assert _successes(sent) == count
        proxy.send_signal(signal.SIGKILL)  # every instance acknowledged, most not processed
        proxy.wait(10)
        waiting = len(list((root / "spool" / "deferred").glob("*.dcm")))
        assert waiting > count // 4, waiting  # acknowledged, waiting for de-identification
        research.start()
        proxy = serve(config, tmp_path)  # the next start processes them, then forwards
        assert wait_for(lambda: len(research.arrivals()) == count, timeout=120)
        assert wait_for(lambda: not _held(root), timeout=10)
        # every acknowledged data set is audited: received (written behind the answer), or,
        # when the SIGKILL came first, recovered at the next start
        audited = {e["deferred_as"] for e in _events(root, "instance.received")}
        audited |= {e["deferred_as"] for e in _events(root, "instance.recovered")}
        assert len(audited) == count
        time.sleep(2)  # anything delivered twice would arrive now
        arrivals = research.arrivals()
        assert len(arrivals) == count
        assert set(arrivals.values()) == {1}, arrivals.most_common(3)
        started = [e for e in audit_records(root / "audit.jsonl")
                   if e["event"] == "service.started"]  # fmt: skip
        assert started[-1]["recovered_deferred"] == waiting
    finally:
        stop_process(proxy, 60)
        research.stop()


def test_a_refused_instance_is_acknowledged_quarantined_and_audited_not_forwarded(
    make_proxy, tmp_path: Path
) -> None:
    research = StoreSCP(tmp_path / "research").start()
    try:
        [clean, burned] = make_series(tmp_path / "series", 2, template="CT_small.dcm")
        ds = dcmread(burned)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(burned)
        proxy = make_proxy([_research(research)], listen=RECEIPT)
        sent = storescu(proxy.port, [clean, burned], extra=["-v"])
        assert _successes(sent) == 2  # both acknowledged on receipt
        root = tmp_path / "var"
        assert wait_for(lambda: bool(_events(root, "instance.failed")), timeout=30)
        assert wait_for(lambda: len(research.files()) == 1, timeout=30)
        [failed] = _events(root, "instance.failed")
        assert (failed["stage"], failed["status"]) == ("policy", "0xC001")
        assert "burned-in annotation" in str(failed["reason"])
        assert str(ds.PatientName) not in json.dumps(_events(root, "instance.failed"))
        [arrived] = research.files()
        assert dcmread(arrived).InstanceNumber == dcmread(clean).InstanceNumber
        kept = root / "quarantine" / "rejected" / str(failed["kept_as"])
        assert kept.stat().st_mode & 0o077 == 0
        assert _held(root) == []
        ops = tmp_path / "ops.yaml"
        ops.write_text(json.dumps({"storage": {"path": str(root)}}), "utf-8")
        listing = _anonproxy(ops, "quarantine", "list")
        header, rows = listing.split("\n\n", 1)
        assert header.splitlines()[1:] == []  # no destination refused anything
        assert rows.splitlines()[0].startswith("refused input\tstage")
        assert rows.splitlines()[1].split("\t")[:3] == [kept.name, "policy", "0xC001"]
        status = _anonproxy(ops, "queue", "status").splitlines()
        assert status[1] == "(received)\t0\t0.0\t0\t1"
        assert "purged 1" in _anonproxy(ops, "quarantine", "purge")
        assert not kept.exists()
    finally:
        research.stop()


def test_over_the_incoming_bound_the_sender_gets_out_of_resources_and_a_retry_succeeds(
    make_proxy, tmp_path: Path
) -> None:
    make_series(tmp_path / "series", 30, template="CT_small.dcm")
    size = (tmp_path / "series" / "i00000.dcm").stat().st_size
    research = StoreSCP(tmp_path / "research")  # down: its spool fills, de-identification waits
    proxy = make_proxy(
        [_research(research)],
        listen=RECEIPT,
        storage={"path": str(tmp_path / "var"), "min_free_bytes": 0, "max_bytes": 5 * size,
                 "incoming_max_bytes": 10 * size},
    )  # fmt: skip
    root = tmp_path / "var"
    first = storescu(proxy.port, [tmp_path / "series"], extra=["-v"])
    assert "Received Store Response (Refused: OutOfResources)" in first.stdout + first.stderr
    refused = [e for e in _events(root, "instance.failed") if e["status"] == "0xA700"]
    assert {e["stage"] for e in refused} == {"incoming"}
    # the records of acknowledged data sets are written behind the answers
    assert wait_for(lambda: len(_events(root, "instance.received")) == _successes(first), 5)
    acknowledged = len(_events(root, "instance.received"))
    assert 10 <= acknowledged < 30
    assert acknowledged + len(refused) == 30
    assert _successes(first) == acknowledged
    research.start()  # the PACS is back: the spool drains, de-identification resumes
    try:
        assert wait_for(lambda: len(research.files()) == acknowledged, timeout=60)
        assert wait_for(lambda: not _held(root), timeout=10)
        again = _refused(first)
        assert len(again) == len(refused)
        for _ in range(20):  # the sender retries what was refused until it is taken
            again = _refused(storescu(proxy.port, again, extra=["-v"]))
            if not again:
                break
            time.sleep(0.5)
        assert again == []
        assert wait_for(lambda: len(research.files()) == 30, timeout=60)
    finally:
        research.stop()

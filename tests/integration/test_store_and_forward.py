"""Store-and-forward never loses an acknowledged instance (real peers on loopback)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from builders import make_series
from conftest import TEST_SECRET
from peers import PEER_ENV, RefusingSCP, StoreSCP, free_port, storescu, tool, wait_for, wait_port

pytestmark = pytest.mark.integration


def _events(root: Path, name: str) -> list[dict[str, object]]:
    path = root / "audit.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text("utf-8").splitlines()) if e["event"] == name]


def _deidentified_uid(path: Path) -> str:
    from anonproxy.deid import Deidentifier, Profile

    engine = Deidentifier(Profile.from_options([]), secret=TEST_SECRET.value)
    return engine.deidentify(dcmread(path)).sop_instance_uid


def test_destination_down_then_back_delivers_everything(make_proxy, tmp_path: Path) -> None:
    files = make_series(tmp_path / "series", 300)
    research = StoreSCP(tmp_path / "research")  # not started: the research PACS is down
    proxy = make_proxy(
        [
            {
                "name": "research",
                "ae_title": "RESEARCH",
                "host": "127.0.0.1",
                "port": research.port,
                "retry_max_delay_s": 5,
            }
        ]
    )
    sent = storescu(proxy.port, [tmp_path / "series"])
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert len(proxy.spool.queues["research"]) == 300  # all acknowledged, all held
    time.sleep(2)
    assert _events(tmp_path / "var", "instance.forward_retry")
    research.start()
    try:
        came_back = time.monotonic()
        assert wait_for(lambda: len(research.files()) == 300, timeout=60)
        assert time.monotonic() - came_back < 60
        assert wait_for(lambda: len(proxy.spool.queues["research"]) == 0, timeout=10)
    finally:
        research.stop()
    assert len(_events(tmp_path / "var", "instance.forwarded")) == 300
    assert len(files) == 300


def _serve(config: Path, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "ANONPROXY_SECRET": TEST_SECRET.value.decode()}
    return subprocess.Popen(
        [sys.executable, "-m", "anonproxy", "serve", "--config", str(config)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _acknowledged(storescu_log: str) -> list[Path]:
    """Files storescu saw acknowledged with Success, from its verbose log."""
    acknowledged = []
    current = None
    for line in storescu_log.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def test_sigkill_mid_send_loses_nothing_acknowledged(tmp_path: Path) -> None:
    make_series(tmp_path / "series", 300)
    research = StoreSCP(tmp_path / "research").start()
    port = free_port()
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port},
                "destinations": [
                    {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                     "port": research.port, "retry_max_delay_s": 2}
                ],
                "storage": {"path": str(tmp_path / "var"), "min_free_bytes": 0},
                "audit": {"path": str(tmp_path / "var" / "audit.jsonl")},
            }
        ),
        "utf-8",
    )  # fmt: skip
    proxy = _serve(config, tmp_path)
    try:
        wait_port(port, timeout=30)
        sender = subprocess.Popen(
            [tool("storescu"), "-v", "-aet", "MODALITY", "-aec", "ANONPROXY", "+sd", "+r",
             "127.0.0.1", str(port), str(tmp_path / "series")],
            env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert wait_for(
            lambda: len(_events(tmp_path / "var", "instance.spooled")) >= 100, timeout=60
        )
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(10)
        log, _ = sender.communicate(timeout=60)
        acknowledged = _acknowledged(log)
        assert 100 <= len(acknowledged) < 300
        proxy = _serve(config, tmp_path)  # restart: the spool is forwarded on start-up
        wanted = {_deidentified_uid(path) for path in acknowledged}

        def arrived() -> set[str]:
            return {p.stem.split(".", 1)[1] for p in research.files()} & wanted  # MR.<uid>

        assert wait_for(lambda: arrived() == wanted, timeout=60), len(wanted - arrived())
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(30)
        research.stop()
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in research.files()}
    assert wanted <= uids


def test_spool_over_quota_answers_out_of_resources_and_recovers(make_proxy, tmp_path: Path) -> None:
    make_series(tmp_path / "series", 40)
    size = (tmp_path / "series" / "i00000.dcm").stat().st_size
    research = StoreSCP(tmp_path / "research")  # down while the spool fills
    proxy = make_proxy(
        [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
          "port": research.port, "retry_max_delay_s": 2}],
        storage={"path": str(tmp_path / "var"), "min_free_bytes": 0, "max_bytes": size * 15},
    )  # fmt: skip
    result = storescu(proxy.port, [tmp_path / "series"], extra=["-d"])
    assert "0xa700" in (result.stdout + result.stderr).lower()
    spooled = len(_events(tmp_path / "var", "instance.spooled"))
    refused = [e for e in _events(tmp_path / "var", "instance.failed") if e["status"] == "0xA700"]
    assert 10 <= spooled < 40
    assert spooled + len(refused) == 40
    research.start()
    try:
        assert wait_for(lambda: len(research.files()) == spooled, timeout=60)
        assert wait_for(lambda: len(proxy.spool.queues["research"]) == 0, timeout=10)
        again = storescu(proxy.port, [tmp_path / "series"])  # space is back: all accepted
        assert again.returncode == 0
        assert wait_for(lambda: len(research.files()) == 40, timeout=60)
    finally:
        research.stop()


def test_permanent_failure_goes_to_quarantine_and_others_keep_flowing(
    make_proxy, tmp_path: Path
) -> None:
    make_series(tmp_path / "series", 5)
    refuser = RefusingSCP(0xC123).start()
    research = StoreSCP(tmp_path / "research").start()
    try:
        proxy = make_proxy(
            [
                {"name": "refuser", "ae_title": "REFUSER", "host": "127.0.0.1",
                 "port": refuser.port},
                {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                 "port": research.port},
            ]
        )  # fmt: skip
        assert storescu(proxy.port, [tmp_path / "series"]).returncode == 0
        assert wait_for(lambda: len(research.files()) == 5, timeout=30)
        root = tmp_path / "var"
        assert wait_for(lambda: len(_events(root, "instance.quarantined")) == 5, timeout=30)
        quarantined = list((root / "quarantine" / "refuser").glob("*.dcm"))
        assert len(quarantined) == 5
        note = json.loads(quarantined[0].with_suffix(".json").read_text("utf-8"))
        assert "0xC123" in note["reason"]
        assert refuser.calls == 5  # a permanent failure is not retried
    finally:
        refuser.stop()
        research.stop()


def test_sop_class_not_supported_is_quarantined(make_proxy, tmp_path: Path) -> None:
    make_series(tmp_path / "series", 2)  # MR Image Storage
    ct_only = RefusingSCP(0x0000, sop_classes=["1.2.840.10008.5.1.4.1.1.2"]).start()
    try:
        proxy = make_proxy(
            [{"name": "ct", "ae_title": "REFUSER", "host": "127.0.0.1", "port": ct_only.port}]
        )
        assert storescu(proxy.port, [tmp_path / "series"]).returncode == 0
        root = tmp_path / "var"
        assert wait_for(lambda: len(_events(root, "instance.quarantined")) == 2, timeout=30)
        reasons = {e["reason"] for e in _events(root, "instance.quarantined")}
        assert reasons == {"SOP class not supported by the destination"}
        assert ct_only.calls == 0
    finally:
        ct_only.stop()


def test_routes_choose_destinations_and_fan_out(make_proxy, tmp_path: Path, corpus) -> None:
    a = StoreSCP(tmp_path / "a").start()
    b = StoreSCP(tmp_path / "b").start()
    try:
        proxy = make_proxy(
            [
                {"name": "a", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": a.port},
                {"name": "b", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": b.port},
            ],
            routes=[
                {"destinations": ["a"], "modalities": ["CT"]},
                {"destinations": ["a", "b"], "calling_ae_titles": ["MRSCANNER"]},
            ],
        )
        ct = [p for p in corpus if p.name == "CT_small.dcm"]
        mr = [p for p in corpus if p.name == "MR_small.dcm"]
        assert storescu(proxy.port, ct).returncode == 0
        assert storescu(proxy.port, mr, calling="MRSCANNER").returncode == 0
        assert wait_for(lambda: len(a.files()) == 2 and len(b.files()) == 1, timeout=30)
        unrouted = storescu(proxy.port, mr, extra=["-d"])  # MR from another AE: no route
        assert "0xc002" in (unrouted.stdout + unrouted.stderr).lower()
        failed = _events(tmp_path / "var", "instance.failed")
        assert [e["stage"] for e in failed] == ["route"]
    finally:
        a.stop()
        b.stop()


def test_transparent_route_relays_the_destination_answer(
    make_proxy, tmp_path: Path, corpus
) -> None:
    refuser = RefusingSCP(0xC123).start()
    down = free_port()
    try:
        proxy = make_proxy(
            [
                {"name": "refuser", "ae_title": "REFUSER", "host": "127.0.0.1",
                 "port": refuser.port},
                {"name": "down", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": down},
            ],
            routes=[
                {"destinations": ["refuser"], "modalities": ["CT"], "transparent": True},
                {"destinations": ["down"], "modalities": ["MR"], "transparent": True,
                 "transparent_timeout_s": 1},
            ],
        )  # fmt: skip
        ct = [p for p in corpus if p.name == "CT_small.dcm"]
        refused = storescu(proxy.port, ct, extra=["-d"])
        assert "0xc123" in (refused.stdout + refused.stderr).lower()
        mr = [p for p in corpus if p.name == "MR_small.dcm"]
        started = time.monotonic()
        held = storescu(proxy.port, mr)
        assert held.returncode == 0  # time-out: Success, the instance stays spooled
        assert 1 <= time.monotonic() - started < 10
        assert len(proxy.spool.queues["down"]) == 1
        assert _events(tmp_path / "var", "instance.transparent_timeout")
    finally:
        refuser.stop()

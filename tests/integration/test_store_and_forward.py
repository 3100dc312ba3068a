"""Store-and-forward never loses an acknowledged instance (real peers on loopback)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from anonproxy import codecs

from builders import make_series
from conftest import TEST_SECRET, audit_records, serve
from peers import (
    PEER_ENV,
    RefusingSCP,
    StoreSCP,
    descendants,
    free_port,
    running,
    storescu,
    tool,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.integration


def _events(root: Path, name: str) -> list[dict[str, object]]:
    return [e for e in audit_records(root / "audit.jsonl") if e["event"] == name]


def _quarantined(root: Path, count: int) -> list[dict[str, object]]:
    """Wait until *count* instances were quarantined; their audit records."""
    assert wait_for(lambda: len(_events(root, "instance.quarantined")) == count, timeout=30)
    return _events(root, "instance.quarantined")


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
    proxy = serve(config, tmp_path)
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
        children = descendants(proxy.pid)  # de-identification workers, sender
        assert children
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(10)
        assert wait_for(lambda: not any(map(running, children)), timeout=15)  # none linger
        log, _ = sender.communicate(timeout=60)
        acknowledged = _acknowledged(log)
        assert 100 <= len(acknowledged) < 300
        proxy = serve(config, tmp_path)  # restart: the spool is forwarded on start-up
        wanted = {_deidentified_uid(path) for path in acknowledged}

        def arrived() -> set[str]:
            return {p.stem.split(".", 1)[1] for p in research.files()} & wanted  # MR.<uid>

        assert wait_for(lambda: arrived() == wanted, timeout=60), len(wanted - arrived())
    finally:
        proxy.send_signal(signal.SIGTERM)  # graceful: lets a running association finish
        try:
            proxy.wait(60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
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
        _quarantined(root, 5)
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
        reasons = {e["reason"] for e in _quarantined(tmp_path / "var", 2)}
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
            listen={"processes": 1},  # a transparent route's answer needs the one process
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


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "JPEG-lossy.dcm",  # 12-bit JPEG Extended: anonproxy.codecs, not the GPL libjpeg
    ],
)
def test_compressed_instance_is_decompressed_for_a_destination_that_needs_it(
    make_proxy, tmp_path: Path, name: str
) -> None:
    research = StoreSCP(tmp_path / "research", accept_compressed=False).start()
    try:
        proxy = make_proxy(
            [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
              "port": research.port}]
        )  # fmt: skip
        source = Path(str(get_testdata_file(name)))
        sent = storescu(proxy.port, [source])
        assert "Store Failed" not in sent.stderr
        assert wait_for(lambda: len(research.files()) == 1, timeout=30)
    finally:
        research.stop()
    out = dcmread(research.files()[0])
    assert not out.file_meta.TransferSyntaxUID.is_compressed
    codecs.install()  # this process decodes the source too
    # The pixel data is decompressed, not changed: the source's pixels, decoded here.
    assert (out.pixel_array == dcmread(source).pixel_array).all()


def test_operator_commands_list_release_and_purge_quarantine(make_proxy, tmp_path: Path) -> None:
    make_series(tmp_path / "series", 3)
    refuser = RefusingSCP(0xA900).start()
    try:
        proxy = make_proxy(
            [{"name": "pacs", "ae_title": "REFUSER", "host": "127.0.0.1", "port": refuser.port}]
        )
        assert storescu(proxy.port, [tmp_path / "series"]).returncode == 0
        root = tmp_path / "var"
        _quarantined(root, 3)
        config = tmp_path / "ops.yaml"
        config.write_text(json.dumps({"storage": {"path": str(root)}}), "utf-8")

        def anonproxy(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "anonproxy", *args, "--config", str(config)],
                capture_output=True, text=True, check=True, timeout=60,
            )  # fmt: skip
            return done.stdout

        listing = anonproxy("quarantine", "list").splitlines()[1:]
        assert len(listing) == 3
        assert all("0xA900" in line for line in listing)
        status = anonproxy("queue", "status")
        assert "pacs\t0\t" in status
        assert status.rstrip().endswith("\t3")  # quarantined
        refuser.status = 0x0000  # the PACS is fixed: release one, it is delivered
        uid = listing[0].split("\t")[1]
        assert "released 1 of 1" in anonproxy("quarantine", "release", "pacs", uid)
        assert wait_for(lambda: len(_events(root, "instance.forwarded")) == 1, timeout=30)
        [found] = _events(root, "instance.found")  # the housekeeping picked it up
        assert (found["destination"], found["deid_sop_instance_uid"]) == ("pacs", uid)
        assert "purged 2" in anonproxy("quarantine", "purge")
        assert anonproxy("quarantine", "list").splitlines()[1:] == []
        assert "retry requested" in anonproxy("queue", "retry")
        assert wait_for(lambda: not (root / "control" / "retry-now").exists(), timeout=10)
    finally:
        refuser.stop()


def test_rejected_inputs_are_kept_only_when_configured_and_private(
    make_proxy, tmp_path: Path, corpus
) -> None:
    proxy = make_proxy(
        profile={"burned_in_annotation": "reject"},
        storage={"path": str(tmp_path / "var"), "min_free_bytes": 0,
                 "keep_rejected_inputs": True},
    )  # fmt: skip
    source = tmp_path / "burned.dcm"
    ds = dcmread(next(p for p in corpus if p.name == "CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(source)
    result = storescu(proxy.port, [source], extra=["-d"])
    assert "0xc001" in (result.stdout + result.stderr).lower()
    [failed] = _events(tmp_path / "var", "instance.failed")
    assert failed["stage"] == "policy"
    kept = tmp_path / "var" / "quarantine" / "rejected" / str(failed["kept_as"])
    assert kept.is_file()
    assert kept.stat().st_mode & 0o077 == 0
    assert (kept.parent.stat().st_mode & 0o077) == 0
    assert dcmread(kept).PatientName == ds.PatientName  # the input, for inspection
    assert str(ds.PatientName) not in str(failed)

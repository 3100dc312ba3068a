"""listen.sop_classes against real DCMTK peers on loopback: retired Storage SOP Classes are
accepted by default, the set can be restricted, a private class can be added; an accepted class
the research PACS refuses is quarantined."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from conftest import audit_records
from peers import PEER_ENV, StoreSCP, storescu, tool, wait_for

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
PRIVATE = "1.2.826.0.1.3680043.9.7433.1.42"  # a private SOP Class UID


def _with_sop_class(directory: Path, sop_class: str, modality: str) -> Path:
    """CT_small with another SOP Class (data set and file meta)."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = modality
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{modality}.dcm"
    ds.save_as(path)
    return path


def _dcmsend(port: int, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """DCMTK dcmsend: proposes the SOP Class of the file itself."""
    command = [tool("dcmsend"), "-v", "-aet", "MODALITY", "-aec", "ANONPROXY", *extra,
               "127.0.0.1", str(port), str(path)]  # fmt: skip
    return subprocess.run(
        command, env=PEER_ENV, capture_output=True, text=True, timeout=60, check=False
    )


def _events(root: Path, name: str) -> list[dict[str, object]]:
    return [e for e in audit_records(root / "audit.jsonl") if e["event"] == name]


def _received(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def _assert_deidentified(path: Path, original: Path, sop_class: str) -> None:
    out, before = dcmread(path), dcmread(original)
    assert out.SOPClassUID == sop_class
    assert out.file_meta.MediaStorageSOPClassUID == sop_class
    assert out.PatientIdentityRemoved == "YES"
    assert out.SOPInstanceUID != before.SOPInstanceUID
    assert str(out.get("PatientName", "")) != str(before.PatientName)


def _stored_ok(done: subprocess.CompletedProcess[str]) -> bool:
    log = done.stdout + done.stderr
    return done.returncode == 0 and "Store Failed" not in log and "ERROR" not in log


@pytest.mark.parametrize("sender", ["dcmsend", "storescu"])
def test_retired_storage_class_is_accepted_and_forwarded_deidentified(
    make_proxy, tmp_path: Path, sender: str
) -> None:
    """Ultrasound Image Storage (Retired): accepted with the default listen.sop_classes,
    de-identified, forwarded to storescp; the audit names the SOP Class of the request."""
    path = _with_sop_class(tmp_path / "in", US_RETIRED, "US")
    research = StoreSCP(tmp_path / "research").start()
    try:
        proxy = make_proxy(
            [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
              "port": research.port}]
        )  # fmt: skip
        done = _dcmsend(proxy.port, path) if sender == "dcmsend" else storescu(proxy.port, [path])
        assert _stored_ok(done), (done.stdout + done.stderr)[-2000:]
        assert wait_for(lambda: len(research.files()) == 1, timeout=20)
        _assert_deidentified(research.files()[0], path, US_RETIRED)
    finally:
        research.stop()
    [received] = _events(tmp_path / "var", "instance.received")
    assert received["sop_class_uid"] == US_RETIRED
    assert _events(tmp_path / "var", "instance.failed") == []


def test_restricted_to_ct_refuses_mr_and_passes_ct(make_proxy, tmp_path: Path) -> None:
    proxy = make_proxy(listen={"sop_classes": [CT]})
    mr = Path(str(get_testdata_file("MR_small.dcm")))
    refused = storescu(proxy.port, [mr])
    assert refused.returncode != 0
    assert "No Acceptable Presentation Contexts" in refused.stdout + refused.stderr
    assert _events(tmp_path / "var", "instance.received") == []
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    passed = storescu(proxy.port, [ct])
    assert _stored_ok(passed), (passed.stdout + passed.stderr)[-2000:]
    received = tmp_path / "var" / "received"  # the built-in folder destination
    assert wait_for(lambda: len(_received(received)) == 1, timeout=20)
    _assert_deidentified(_received(received)[0], ct, CT)
    retired = _dcmsend(proxy.port, _with_sop_class(tmp_path / "in", US_RETIRED, "US"))
    assert "No Acceptable Presentation Contexts" in retired.stdout + retired.stderr


def _private_sent(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return _dcmsend(port, path, "-nuc")  # -nuc: no check that it is a known storage class


@pytest.mark.parametrize("sop_classes", [["storage", PRIVATE], [PRIVATE]], ids=["added", "alone"])
def test_private_class_added_by_the_configuration(
    make_proxy, tmp_path: Path, sop_classes: Sequence[str]
) -> None:
    """Accepted once configured, kept in the local folder; a research PACS that does not know
    the class refuses it, and there it is quarantined."""
    path = _with_sop_class(tmp_path / "in", PRIVATE, "OT")
    research = StoreSCP(tmp_path / "research").start()  # DCMTK's storescp: no private classes
    try:
        proxy = make_proxy(
            [{"name": "copy", "type": "folder", "path": str(tmp_path / "copy")},
             {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
              "port": research.port}],
            listen={"sop_classes": list(sop_classes)},
        )  # fmt: skip
        done = _private_sent(proxy.port, path)
        assert _stored_ok(done), (done.stdout + done.stderr)[-2000:]
        assert wait_for(lambda: len(_received(tmp_path / "copy")) == 1, timeout=20)
        _assert_deidentified(_received(tmp_path / "copy")[0], path, PRIVATE)
        assert wait_for(
            lambda: len(_events(tmp_path / "var", "instance.quarantined")) == 1, timeout=20
        )
        [quarantined] = _events(tmp_path / "var", "instance.quarantined")
        assert quarantined["destination"] == "research"
        assert quarantined["reason"] == "SOP class not supported by the destination"
        assert research.files() == []
    finally:
        research.stop()


def test_private_class_is_refused_by_default(make_proxy, tmp_path: Path) -> None:
    proxy = make_proxy()
    done = _private_sent(proxy.port, _with_sop_class(tmp_path / "in", PRIVATE, "OT"))
    assert "No Acceptable Presentation Contexts" in done.stdout + done.stderr
    assert _events(tmp_path / "var", "instance.received") == []


def test_check_config_names_the_key_of_a_bad_entry(tmp_path: Path) -> None:
    import sys

    config = tmp_path / "anonproxy.yaml"
    config.write_text("listen:\n  sop_classes: [storage, CT]\n", "utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "anonproxy", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "listen.sop_classes" in done.stderr
    assert "'CT' is neither 'storage' nor a SOP Class UID" in done.stderr

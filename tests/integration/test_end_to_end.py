"""End to end with real peers: DCMTK storescu → anonproxy → DCMTK storescp or Orthanc."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from conftest import audit_records, corpus_identifying_values
from peers import StoreSCP, echoscu, storescu, wait_for

pytestmark = pytest.mark.integration


def _audit(proxy_root: Path) -> list[dict[str, object]]:
    return audit_records(proxy_root / "audit.jsonl")


def _original(path: Path) -> dict[str, str]:
    ds = dcmread(path, stop_before_pixels=True, force=True)
    return {k: str(ds.get(k, "")) for k in ("SOPInstanceUID", "StudyInstanceUID", "PatientName")}


def test_storescu_to_storescp_deidentified_and_complete(
    make_proxy, storescp: StoreSCP, corpus: list[Path], tmp_path: Path
) -> None:
    proxy = make_proxy(
        [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": storescp.port}],
        listen={"deidentify_workers": 2},  # the worker processes, as in production
    )
    sent = storescu(proxy.port, corpus)
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert "Store Failed" not in sent.stderr, sent.stderr[-2000:]
    assert "No presentation context" not in sent.stderr, sent.stderr[-2000:]

    expected = {_original(p)["SOPInstanceUID"] for p in corpus}  # some files share UIDs
    assert wait_for(lambda: len(storescp.files()) >= len(expected), timeout=60)
    received = storescp.files()
    assert len(received) == len(expected)

    phi = corpus_identifying_values(corpus)
    for path in received:
        data = path.read_bytes()
        leaked = [value for value in phi if value.encode() in data]
        assert not leaked, f"{path.name} carries identifying values"
        ds = dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID.startswith("2.25.")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # Pixel data passes unchanged (no transcoding), and study structure is preserved.
    by_original: dict[str, list[Path]] = {}
    for path in corpus:
        by_original.setdefault(_original(path)["StudyInstanceUID"], []).append(path)
    out = [dcmread(p) for p in received]
    out_by_sop = {str(ds.SOPInstanceUID): ds for ds in out}
    audit = _audit(tmp_path / "var")
    deidentified = [e for e in audit if e["event"] == "instance.deidentified"]
    assert len(deidentified) == len(corpus)
    originals = [_original(p)["SOPInstanceUID"] for p in corpus]
    unique = [p for p, uid in zip(corpus, originals, strict=True) if originals.count(uid) == 1]
    for path in unique:  # an instance sent in several encodings ends as the last one sent
        source = dcmread(path, force=True)
        if "PixelData" not in source:
            continue
        name = path.name
        matches = [
            ds
            for ds in out
            if ds.get("Rows") == source.Rows
            and ds.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
            and ds.PixelData == source.PixelData
        ]
        assert matches, f"pixel data of {name} changed"
    new_studies = {str(ds.StudyInstanceUID) for ds in out}
    assert len(new_studies) == len({k for k in by_original if k})
    assert all(uid.startswith("2.25.") for uid in out_by_sop)

    # One JSON line per event; nothing identifying in the audit trail.
    text = (tmp_path / "var" / "audit.jsonl").read_text("utf-8")
    assert not [value for value in phi if value in text]
    events = {e["event"] for e in audit}
    assert {"association.accepted", "instance.received", "instance.spooled"} <= events
    assert wait_for(
        lambda: (
            sum(e["event"] == "instance.forwarded" for e in _audit(tmp_path / "var"))
            >= len(expected)
        ),
        timeout=30,
    )
    assert any(e["event"] == "association.released" for e in _audit(tmp_path / "var"))
    # Received data sets (with PHI) went through the owner-only incoming spool, and are gone
    # (what is left are the empty files created ahead for the next ones).
    received = tmp_path / "var" / "spool" / "deferred"
    assert [p.stat().st_size for p in received.iterdir()] == [0] * len(list(received.iterdir()))
    assert all(p.stat().st_mode & 0o077 == 0 for p in received.iterdir())


def test_same_study_same_pseudonym_across_associations_and_restarts(
    make_proxy, tmp_path: Path, corpus: list[Path]
) -> None:
    ct = next(p for p in corpus if p.name == "CT_small.dcm")
    first = make_proxy()
    assert storescu(first.port, [ct]).returncode == 0
    assert storescu(first.port, [ct]).returncode == 0
    first.stop()
    second = make_proxy()  # a restart: same storage, same secret
    assert storescu(second.port, [ct]).returncode == 0
    received = tmp_path / "var" / "received"
    assert wait_for(lambda: len(list(received.rglob("*.dcm"))) == 1, timeout=30)
    files = list(received.rglob("*.dcm"))
    assert len(files) == 1  # three sends of one instance: one de-identified instance
    study, series = files[0].parent.parent.name, files[0].parent.name
    ds = dcmread(files[0])
    assert (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) == (study, series)
    assert files[0].name == f"{ds.SOPInstanceUID}.dcm"


def test_orthanc_as_research_pacs(make_proxy, orthanc, corpus: list[Path]) -> None:
    before = set(orthanc.instances())
    proxy = make_proxy(
        [
            {
                "name": "orthanc",
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.port,
            }
        ]
    )
    files = [p for p in corpus if p.name in {"CT_small.dcm", "MR_small.dcm", "rtplan.dcm"}]
    assert storescu(proxy.port, files).returncode == 0
    assert wait_for(lambda: len(set(orthanc.instances()) - before) == 3, timeout=60)
    phi = corpus_identifying_values(files)
    for instance in set(orthanc.instances()) - before:
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        assert tags["PatientIdentityRemoved"] == "YES"
        assert not phi & {str(v) for v in tags.values()}


def test_echo_and_calling_ae_allow_list(make_proxy, tmp_path: Path, corpus: list[Path]) -> None:
    proxy = make_proxy(listen={"allowed_calling_ae_titles": ["MODALITY"]})
    assert echoscu(proxy.port, calling="MODALITY") == 0
    assert echoscu(proxy.port, calling="INTRUDER") != 0
    assert echoscu(proxy.port, called="WRONG") != 0
    refused = storescu(proxy.port, corpus[:1], calling="INTRUDER")
    assert refused.returncode != 0
    events = [e["event"] for e in _audit(tmp_path / "var")]
    assert events.count("association.rejected") >= 3
    assert "instance.received" not in events


def _send_raw(port: int, meta_from: Path, body: bytes, tmp_path: Path) -> int:
    """Send a data set body as it is (pynetdicom streams files without parsing them)."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE

    from anonproxy import pynetdicom_patches

    # files streamed, never parsed (chunked_data_sets): not left to the proxy under test, whose
    # SCP is in acceptor processes with listen.processes > 1
    pynetdicom_patches.install()
    meta = read_file_meta_info(meta_from)
    path = tmp_path / "raw.dcm"
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)
        handle.write(body)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ANONPROXY")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return int(status.Status)


def _body_of(path: Path) -> bytes:
    """The data set of a DICOM file, after its file meta information."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength) :]


def test_bad_data_sets_fail_closed_and_the_server_keeps_serving(
    make_proxy, tmp_path: Path, corpus: list[Path]
) -> None:
    from pydicom.filewriter import dcmwrite

    proxy = make_proxy()
    ct = next(p for p in corpus if p.name == "CT_small.dcm")
    # A garbled body: an element whose length runs past the end of the data.
    garbled = b"\x08\x00\x18\x00UI\xff\x7f1.2.3"
    assert _send_raw(proxy.port, ct, garbled, tmp_path) in {0xC000, 0xC001}
    # A parseable data set without SOP Instance UID cannot be de-identified (storescu would
    # refuse to send such a file; a hostile peer would not).
    ds = dcmread(ct)
    del ds.SOPInstanceUID
    no_uid = tmp_path / "no_uid.dcm"
    dcmwrite(no_uid, ds, enforce_file_format=True)
    assert _send_raw(proxy.port, ct, _body_of(no_uid), tmp_path) == 0xC001
    assert not list((tmp_path / "var" / "received").rglob("*.dcm"))
    failed = [e for e in _audit(tmp_path / "var") if e["event"] == "instance.failed"]
    assert len(failed) == 2
    assert {e["status"] for e in failed} <= {"0xC000", "0xC001"}
    assert storescu(proxy.port, [ct]).returncode == 0  # still serving
    assert wait_for(lambda: len(list((tmp_path / "var" / "received").rglob("*.dcm"))) == 1)

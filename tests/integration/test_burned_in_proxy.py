"""Burned-in text through a running proxy (issue 12): DCMTK storescu sends real ultrasound, the
research PACS (DCMTK storescp) receives it with its banner lines blanked and every other pixel
as sent; an ultrasound image whose pixels cannot be read is refused, never forwarded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from peers import StoreSCP, storescu, wait_for

pytestmark = pytest.mark.integration

SOURCES = ["OBXXXX1A.dcm", "US1_J2KR.dcm"]  # native (blanked in place); JPEG 2000 (decoded)


def _audit(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "audit.jsonl").read_text("utf-8").splitlines()]


def test_banner_lines_are_blanked_before_the_research_pacs_sees_them(
    make_proxy, storescp: StoreSCP, tmp_path: Path
) -> None:
    proxy = make_proxy(
        [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": storescp.port}]
    )
    sources = [Path(str(get_testdata_file(name))) for name in SOURCES]
    sent = storescu(proxy.port, sources)
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert "Store Failed" not in sent.stderr
    assert wait_for(lambda: len(storescp.files()) == len(sources), timeout=60), [
        (e["event"], e.get("reason")) for e in _audit(tmp_path / "var")
    ]
    audit = _audit(tmp_path / "var")
    deidentified = [e for e in audit if e["event"] == "instance.deidentified"]
    assert len(deidentified) == len(sources)
    by_rows = {int(dcmread(p).Rows): p for p in sources}  # the two differ in size
    for path in storescp.files():
        out = dcmread(path)
        original = dcmread(by_rows[int(out.Rows)])
        assert out.BurnedInAnnotation == "NO"
        assert str(original.InstitutionName).encode() not in path.read_bytes()
        matching = [e for e in deidentified if e["deid_sop_instance_uid"] == out.SOPInstanceUID]
        assert matching, (out.SOPInstanceUID, [e["deid_sop_instance_uid"] for e in deidentified])
        record = matching[0]
        assert "InstitutionName" in record["pixels"]
        boxes = [
            tuple(map(int, b)) for b in re.findall(r"(\d+),(\d+),(\d+),(\d+)", record["pixels"])
        ]
        assert boxes
        before, after = original.pixel_array, out.pixel_array
        untouched = np.ones(before.shape[:2], dtype=bool)
        for x0, y0, x1, y1 in boxes:
            untouched[y0:y1, x0:x1] = False
            assert not after[y0:y1, x0:x1].any()
        assert np.array_equal(before[untouched], after[untouched])


def test_ultrasound_whose_pixels_cannot_be_read_is_quarantined_not_forwarded(
    make_proxy, storescp: StoreSCP, tmp_path: Path
) -> None:
    """Ultrasound is acknowledged once durably kept and read behind (OCR takes seconds); one
    whose pixels cannot be read goes to the quarantine of refused inputs, audited."""
    proxy = make_proxy(
        [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": storescp.port}]
    )
    ds = dcmread(get_testdata_file("US1_J2KR.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a JPEG 2000 stream cut short
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    sent = storescu(proxy.port, [broken], extra=["-v"])
    assert "Received Store Response (Success)" in sent.stderr, sent.stderr[-2000:]
    root = tmp_path / "var"
    assert wait_for(lambda: any(e["event"] == "instance.failed" for e in _audit(root)), timeout=30)
    [failed] = [e for e in _audit(root) if e["event"] == "instance.failed"]
    assert failed["status"] == "0xC001"
    assert "burned-in text: cannot decode the pixel data" in failed["reason"]
    assert (root / "quarantine" / "rejected" / str(failed["kept_as"])).is_file()
    assert not storescp.files()

"""Package data: loaders, the strict allow-list, and regeneration from ../shared."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import pytest

from anonproxy.deid import tables
from anonproxy.deid.tables import (
    iod_edition,
    safe_private_attributes,
    strict_allowlist,
    table_e1_1,
    table_edition,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
STANDARD = resources.files("anonproxy.deid._standard")


def test_editions() -> None:
    assert table_edition() == "2026d"
    assert iod_edition() == "2026b"
    readme = STANDARD.joinpath("README.md").read_text("utf-8")
    assert "PS3.15 2026d" in readme
    assert "PS3.3 / PS3.4 2026b" in readme
    assert "python tools/generate_standard_data.py" in readme


def test_rows_parse_into_tags_masks_and_the_private_row() -> None:
    rows = table_e1_1()
    by_tag = {r.tag: r for r in rows}
    assert by_tag["(0010,0010)"].value == 0x00100010
    assert by_tag["(0010,0010)"].basic == "Z"
    assert by_tag["(0010,0020)"].basic == "Z/D"  # since PS3.15 2024b
    assert by_tag["(0008,0018)"].option_code("retain_uids") == "K"
    curve = by_tag["(50xx,xxxx)"]
    assert (curve.match, curve.value, curve.mask) == ("mask", 0x50000000, 0xFF000000)
    overlay = by_tag["(60xx,3000)"]
    assert (overlay.value, overlay.mask) == (0x60003000, 0xFF00FFFF)
    private = by_tag["(gggg,eeee)"]
    assert private.match == "private"
    assert private.option_code("retain_safe_private") == "C"


def test_safe_private_table() -> None:
    safe = safe_private_attributes()
    assert len(safe) == 479
    assert (0x7053, "Philips PET Private Group", 0x00) in safe
    assert (0x2001, "Philips Imaging DD 001", 0x01) in safe
    assert (0x2001, "Philips Imaging DD 002", 0x01) in safe  # same tag, another creator


def test_strict_allowlist_resolves_every_keyword() -> None:
    allow = strict_allowlist()
    assert 0x7FE00010 in allow  # PixelData
    assert 0x00280010 in allow  # Rows
    assert 0x00100010 not in allow  # PatientName


@pytest.mark.skipif(not (SHARED / "ps315").exists(), reason="../shared not available")
def test_generator_reproduces_the_shipped_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_standard_data", REPO / "tools" / "generate_standard_data.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--shared", str(SHARED), "--out", str(tmp_path)]) == 0
    for name in ("table_e1_1.json", "safe_private.json", "iod_types.zip"):
        assert (tmp_path / name).read_bytes() == STANDARD.joinpath(name).read_bytes(), name


def test_the_types_of_an_iod_read_only_its_modules() -> None:
    """iod_types inflates the modules of the IOD asked for, not the whole archive (the first
    file of `anonproxy deidentify` paid ~0.1 s for the whole document)."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    tables._module_types.cache_clear()
    types = tables.iod_types.__wrapped__(ct)
    assert types is not None
    assert types["PatientID"] == "2"
    assert types["OtherPatientIDsSequence/PatientID"] == "1"
    modules = tables._iod_index()["iods"][tables._iod_index()["sop_classes"][ct]]
    assert "ct-image" in modules
    assert tables._module_types.cache_info().currsize == len(modules)
    assert len(modules) < len(tables._iod_archive().namelist()) // 10

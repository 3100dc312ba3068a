"""Shared fixtures: the pydicom test corpus, real peers and an in-process proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file

from anonproxy.config import parse_settings
from anonproxy.secret import Secret

from peers import Orthanc, StoreSCP
from pgcluster import cluster, state_config  # noqa: F401 - fixtures: PostgreSQL, each backend

if TYPE_CHECKING:
    from anonproxy.service import Proxy

TEST_SECRET = Secret(b"anonproxy-test-secret-0123456789", "test")

# Files of the pydicom test corpus shipped in its wheel (no download), across SOP classes and
# transfer syntaxes: uncompressed, deflated, RLE, JPEG baseline/extended, JPEG-LS, JPEG 2000.
CORPUS_NAMES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle.dcm",
    "image_dfl.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "rtdose.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "liver_1frame.dcm",
    "examples_overlay.dcm",
]


def audit_records(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file; a line a running proxy is still writing is left out."""
    if not path.exists():
        return []
    text = path.read_text("utf-8")
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


#: Receiving processes of the suite's proxies (``listen.processes``, unless a test sets it): 1,
#: the one process (an acceptor process costs an interpreter's start-up per proxy), or
#: ANONPROXY_TEST_PROCESSES=2 for a pass with several (see anonproxy.acceptors).
TEST_PROCESSES = int(os.environ.get("ANONPROXY_TEST_PROCESSES") or 1)


def serve(config: Path, cwd: Path, *, stdout: int | None = None) -> subprocess.Popen[str]:
    """`anonproxy serve --config CONFIG` as a user runs it, with the test secret; standard
    error is captured (and standard output, with ``stdout=subprocess.PIPE``). A configuration
    without an ``admin`` section gets its endpoint on a free port (``admin.port`` 8080, the
    default, is taken by whichever test proxy or local service started first); one without
    ``listen.processes`` gets :data:`TEST_PROCESSES`."""
    data = yaml.safe_load(config.read_text("utf-8")) or {}
    listen = data.get("listen") or {}
    if "admin" not in data or "processes" not in listen:
        data = {"admin": {"port": 0}, **data, "listen": {"processes": TEST_PROCESSES, **listen}}
        config.write_text(json.dumps(data), "utf-8")
    return subprocess.Popen(
        [sys.executable, "-m", "anonproxy", "serve", "--config", str(config)],
        cwd=cwd,
        env={**os.environ, "ANONPROXY_SECRET": TEST_SECRET.value.decode()},
        stdout=subprocess.DEVNULL if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def corpus_paths() -> list[Path]:
    return [Path(str(get_testdata_file(name))) for name in CORPUS_NAMES]


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    """Paths of the test corpus."""
    return corpus_paths()


def identifying_values(path: Path) -> set[str]:
    """Values of an input that must never appear in any output, log or audit record."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    values: set[str] = set()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "InstitutionName",
        "ReferringPhysicianName",
        "OtherPatientIDs",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ):
        value = str(ds.get(keyword, "") or "").strip()
        # Short values ("M", "0") and short numbers ("2721" in a new 2.25 UID) occur by chance.
        if len(value) >= (8 if value.isdigit() else 4):
            values.add(value)
    return values


def corpus_identifying_values(paths: list[Path]) -> set[str]:
    """Identifying values of several inputs. The Basic Profile keeps Manufacturer, and some
    test files name a maker as their institution: those names are not counted."""
    values = set().union(*(identifying_values(p) for p in paths))
    makers = {
        str(dcmread(p, stop_before_pixels=True, force=True).get("Manufacturer", "")).strip()
        for p in paths
    }
    return {v for v in values if not any(v in maker for maker in makers)}


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start in-process proxies on free ports; every one is stopped at the end."""
    proxies: list[Proxy] = []

    def factory(destinations: list[dict[str, Any]] | None = None, **sections: Any) -> Proxy:
        data: dict[str, Any] = {
            # de-identification in the association threads: no worker processes to spawn per
            # test (tests that want them set deidentify_workers)
            "listen": {
                "port": 0,
                "deidentify_workers": 0,
                "processes": TEST_PROCESSES,
                **sections.pop("listen", {}),
            },
            "destinations": destinations or [],
            "storage": {"path": str(tmp_path / "var"), "min_free_bytes": 0},
            "audit": {"path": str(tmp_path / "var" / "audit.jsonl")},
            "admin": {"port": 0},  # any free port: tests start several proxies
            **sections,
        }
        from anonproxy.service import Proxy

        proxy = Proxy(parse_settings(data), TEST_SECRET)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.stop(timeout=5)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK storescp as the research PACS (AE title RESEARCH)."""
    scp = StoreSCP(tmp_path / "research").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc as the research PACS (AE title ORTHANC)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()

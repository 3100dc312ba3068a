"""``anonproxy status`` and the admin endpoint's status page: one gathering of the storage
folder and the audit file (anonproxy.overview), a terminal and a browser rendering."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from anonproxy.overview import gather, render_html, render_text

from conftest import audit_records, corpus_identifying_values
from peers import StoreSCP, free_port, storescu, wait_for

CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver: never downloaded
NOW = 1_800_000_000.0


def _line(seconds_ago: float, event: str, **fields: Any) -> str:
    when = datetime.fromtimestamp(NOW - seconds_ago, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"event": event, **fields, "time": when}) + "\n"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_gather_reads_queues_quarantine_and_the_audit_tail(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    for name in ("a.dcm", "b.dcm"):
        _touch(storage / "spool" / "research" / name)
    _touch(storage / "spool" / "archive" / "c.dcm")
    _touch(storage / "quarantine" / "research" / "d.dcm")
    for name in ("r1.dcm", "r2.dcm"):
        _touch(storage / "quarantine" / "rejected" / name)
    audit = storage / "audit.jsonl"
    # the rotated file (logrotate: audit.jsonl.1, uncompressed) holds the archive's last success
    audit.with_name("audit.jsonl.1").write_text(
        _line(3 * 86400, "instance.forwarded", destination="archive")
        + _line(2 * 86400, "instance.failed", stage="deidentify", status="0xC001"),
        "utf-8",
    )
    audit.write_text(
        _line(5 * 3600, "instance.failed", stage="deidentify", status="0xC001", reason="x")
        + _line(7200, "instance.forward_retry", destination="research",
                reason="association rejected")
        + _line(1800, "instance.failed", stage="policy", status="0xC001", reason="y")
        + _line(900, "instance.failed", stage="deidentify", status="0xC001", reason="z")
        + _line(600, "instance.forwarded", destination="research", status="0x0000")
        # a free text is never shown: a destination's reason of another form is "other"
        + _line(300, "instance.quarantined", destination="archive",
                reason="C-STORE status 0xC000 (Failure): DOE^JOHN 1.2.3.4.5")
        + '{"event": "instance.forwarded", "destination": "research", "ti',  # being written
        "utf-8",
    )  # fmt: skip

    overview = gather(storage, audit, ["research", "archive", "idle"], now=NOW)

    rows = {row.name: row for row in overview.destinations}
    assert list(rows) == ["research", "archive", "idle"]
    research, archive, idle = rows["research"], rows["archive"], rows["idle"]
    assert (research.pending, research.quarantined, archive.pending) == (2, 1, 1)
    assert research.last_success == NOW - 600
    assert (research.last_error, research.last_error_reason) == (
        NOW - 7200,
        "association rejected",
    )
    assert archive.last_success == NOW - 3 * 86400  # from the rotated file
    assert (archive.last_error, archive.last_error_reason) == (NOW - 300, "other")
    assert idle.last_success is idle.last_error is None
    assert overview.refused_inputs == 2
    counts = {(r.stage, r.status): (r.last_hour, r.last_day) for r in overview.refusals}
    assert counts == {("deidentify", "0xC001"): (1, 2), ("policy", "0xC001"): (1, 1)}
    for rendered in (render_text(overview), render_html(overview)):
        assert "DOE" not in rendered
        assert "1.2.3.4.5" not in rendered
        assert "anonproxy quarantine release DESTINATION UID..." in rendered


def test_gather_without_an_audit_file_says_there_is_no_history(tmp_path: Path) -> None:
    overview = gather(tmp_path / "nothing", None, ["research"])
    assert [row.name for row in overview.destinations] == ["research"]
    assert "no audit file" in render_text(overview)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from Debian, driven through Debian's chromedriver (given explicitly:
    Selenium Manager never looks for or downloads a driver)."""
    if not CHROMEDRIVER.exists() or shutil.which("chromium") is None:
        pytest.skip("chromium and chromium-driver (Debian) are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000",
                     f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _table(driver: Any, table_id: str) -> dict[str, list[str]]:
    """The rows of a table of the page, by their first cell, read through the browser."""
    rows = driver.find_elements("css selector", f"#{table_id} tbody tr")
    cells = [[cell.text for cell in row.find_elements("tag name", "td")] for row in rows]
    return {row[0]: row[1:] for row in cells}


@pytest.mark.integration
def test_status_page_in_a_browser_and_the_status_command_show_the_same(
    make_proxy, storescp: StoreSCP, corpus: list[Path], tmp_path: Path, browser: Any
) -> None:
    research = {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                "port": storescp.port}  # fmt: skip
    offline = {"name": "offline", "ae_title": "OFFLINE", "host": "127.0.0.1",
               "port": free_port(), "retry_max_delay_s": 1}  # fmt: skip
    storage = {"path": str(tmp_path / "var"), "min_free_bytes": 0, "keep_rejected_inputs": True}
    proxy = make_proxy([research, offline], storage=storage)
    sent = [p for p in corpus if p.name == "CT_small.dcm"]
    refused = tmp_path / "refused" / "burned_in.dcm"
    refused.parent.mkdir()
    ds = dcmread(sent[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(refused)
    assert storescu(proxy.port, [*sent, refused]).returncode == 0
    audit = tmp_path / "var" / "audit.jsonl"

    def events(name: str) -> list[dict[str, Any]]:
        return [r for r in audit_records(audit) if r["event"] == name]

    assert wait_for(lambda: events("instance.forwarded") and events("instance.forward_retry"))

    browser.get(f"http://127.0.0.1:{proxy.admin.port}/status")
    screenshot = tmp_path / "status.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 1000
    assert browser.title == "anonproxy status"
    destinations = _table(browser, "destinations")
    assert set(destinations) == {"research", "offline"}
    # pending, oldest, retrying, quarantined, last success, last error
    assert destinations["research"][0] == "0"
    assert destinations["research"][4].endswith("UTC")
    assert destinations["research"][5] == "none recorded"
    assert destinations["offline"][0] == "1"
    assert destinations["offline"][4] == "none recorded"
    assert destinations["offline"][5].endswith("UTC: association failed or aborted")
    refusals = _table(browser, "refusals")
    [(stage, [status, last_hour, last_day])] = refusals.items()
    assert (status, last_hour, last_day) == ("0xC001", "1", "1")
    quarantine = _table(browser, "quarantine")
    assert quarantine["refused inputs (originals, before de-identification)"] == ["1"]
    commands = browser.find_element("id", "commands").text
    assert "anonproxy quarantine list" in commands
    assert "anonproxy quarantine release DESTINATION UID..." in commands
    page = browser.page_source
    assert "<script" not in page
    for value in corpus_identifying_values([*sent, refused]):
        assert value not in page

    # the command reads the same storage folder and audit file
    config = tmp_path / "status.yaml"
    config.write_text(
        yaml.safe_dump({"destinations": [research, offline], "storage": storage,
                        "audit": {"path": str(audit)}}),
        "utf-8",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "anonproxy", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("ANONPROXY_SECRET")},
    )  # fmt: skip
    lines = done.stdout.splitlines()
    offline_line = next(line for line in lines if line.startswith("offline "))  # destinations
    assert offline_line.endswith("UTC: association failed or aborted")
    assert any(line.split()[:4] == [stage, "0xC001", "1", "1"] for line in lines)
    for value in corpus_identifying_values([*sent, refused]):
        assert value not in done.stdout


@pytest.mark.integration
def test_status_page_requires_the_token_like_metrics(make_proxy, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n", "utf-8")
    proxy = make_proxy(admin={"port": 0, "token_file": str(token_file)})
    for path in ("/", "/status"):
        url = f"http://127.0.0.1:{proxy.admin.port}{path}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "<h1>anonproxy status</h1>" in response.read().decode("utf-8")

"""The deployment files agree with the example configuration: the systemd unit's sandbox lets
the service write where the configuration stores, logrotate rotates the audit file it writes,
and the package declares its licence as a PEP 639 expression."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from anonproxy.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "anonproxy.service"
LOGROTATE = ROOT / "deploy" / "logrotate" / "anonproxy"
EXAMPLE = ROOT / "config" / "anonproxy.example.yaml"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign] - keys keep their case
    parser.read(UNIT, "utf-8")
    return parser


def test_the_systemd_unit_is_sandboxed() -> None:
    service = unit()["Service"]
    assert service["User"] == service["Group"] == "anonproxy"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""  # none; CAP_NET_BIND_SERVICE for port 104
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in UNIT.read_text("utf-8")
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error: no restart loop
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # reopens audit and log files


def test_the_unit_lets_the_example_configuration_write_its_state() -> None:
    writable = [Path(p) for p in unit()["Service"]["ReadWritePaths"].split()]
    settings = load_settings(EXAMPLE)
    assert settings.audit.path is not None
    for path in (settings.storage.path, settings.audit.path):
        assert any(path.is_relative_to(folder) for folder in writable), path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    copy = tmp_path / "anonproxy.service"  # ExecStart pointed at a program that exists here
    text = UNIT.read_text("utf-8")
    copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M), "utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "anonproxy.service" not in done.stderr, done.stderr


def test_logrotate_rotates_the_example_audit_file_by_signal_not_copytruncate() -> None:
    text = LOGROTATE.read_text("utf-8")
    settings = load_settings(EXAMPLE)
    assert f"{settings.audit.path} {{" in text
    assert "copytruncate" not in re.sub(r"#.*", "", text)
    assert text.count("--signal=HUP anonproxy.service") == 2
    assert "delaycompress" in text  # audit.jsonl.1 stays readable by anonproxy status


def test_the_licence_is_a_pep_639_expression() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert project["project"]["license"] == "Apache-2.0"
    assert not [c for c in project["project"].get("classifiers", []) if "License ::" in c]
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in requires)

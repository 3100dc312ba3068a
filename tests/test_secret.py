"""The pseudonymisation secret: sources, creation on first run, permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from anonproxy.errors import ConfigError
from anonproxy.secret import load_secret


def test_created_on_first_run_with_mode_0600_then_reused(tmp_path: Path) -> None:
    first = load_secret(tmp_path / "var", environ={})
    assert first.created
    path = Path(first.source)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not first.loose_permissions
    second = load_secret(tmp_path / "var", environ={})
    assert not second.created
    assert second.value == first.value
    assert first.value.decode() not in repr(first)


def test_environment_wins_over_the_storage_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-0123456789abcdef\n", "utf-8")
    secret = load_secret(tmp_path, environ={"ANONPROXY_SECRET_FILE": str(key_file)})
    assert secret.value == b"from-a-file-0123456789abcdef"
    secret = load_secret(tmp_path, environ={"ANONPROXY_SECRET": "from-the-env-0123456789"})
    assert secret.value == b"from-the-env-0123456789"
    assert secret.source == "env:ANONPROXY_SECRET"
    assert not (tmp_path / "secret.key").exists()


def test_short_or_unreadable_secret_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shorter"):
        load_secret(tmp_path, environ={"ANONPROXY_SECRET": "short"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path, environ={"ANONPROXY_SECRET_FILE": str(tmp_path / "nope")})


def test_loose_permissions_are_detected(tmp_path: Path) -> None:
    secret = load_secret(tmp_path, environ={})
    Path(secret.source).chmod(0o644)
    assert load_secret(tmp_path, environ={}).loose_permissions

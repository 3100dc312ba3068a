"""The pseudonymisation secret: sources, creation on first run, permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from anonproxy.errors import ConfigError
from anonproxy.secret import SecretNotFound, create_secret, load_secret


def test_created_on_first_run_with_mode_0600_then_reused(tmp_path: Path) -> None:
    first = load_secret(tmp_path / "var", environ={}, create=True)
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
    secret = load_secret(tmp_path, environ={}, create=True)
    Path(secret.source).chmod(0o644)
    assert load_secret(tmp_path, environ={}).loose_permissions


def test_never_created_unless_asked_and_the_error_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SecretNotFound) as raised:
        load_secret(tmp_path / "var", environ={})
    message = str(raised.value)
    assert str((tmp_path / "var" / "secret.key").resolve()) in message
    assert "ANONPROXY_SECRET_FILE" in message
    assert "ANONPROXY_SECRET " in message
    assert "anonproxy secret create" in message
    assert not (tmp_path / "var").exists()


def test_create_secret_never_replaces_one(tmp_path: Path) -> None:
    created = create_secret(tmp_path / "var", environ={})
    assert created.created
    assert stat.S_IMODE(Path(created.source).stat().st_mode) == 0o600
    assert load_secret(tmp_path / "var", environ={}).value == created.value
    with pytest.raises(ConfigError, match="already exists"):
        create_secret(tmp_path / "var", environ={})
    assert load_secret(tmp_path / "var", environ={}).value == created.value
    named = tmp_path / "etc" / "anonproxy.key"
    from_env = create_secret(tmp_path / "var", environ={"ANONPROXY_SECRET_FILE": str(named)})
    assert Path(from_env.source) == named.resolve()
    assert from_env.value != created.value
    with pytest.raises(ConfigError, match="nothing to create"):
        create_secret(tmp_path, environ={"ANONPROXY_SECRET": "from-the-env-0123456789"})

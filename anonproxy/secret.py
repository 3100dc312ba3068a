"""The pseudonymisation secret (HMAC key).

Looked up in this order: the file named by ``ANONPROXY_SECRET_FILE``, the value of
``ANONPROXY_SECRET``, then ``<storage>/secret.key``, which is created on first run (32 random
bytes, hex, mode 0600). The secret is never read from the YAML configuration and never logged.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from anonproxy.errors import ConfigError

SECRET_FILE_ENV = "ANONPROXY_SECRET_FILE"  # noqa: S105 - a variable name
SECRET_ENV = "ANONPROXY_SECRET"  # noqa: S105 - a variable name
DEFAULT_SECRET_NAME = "secret.key"  # noqa: S105 - a file name
_MIN_LENGTH = 16


@dataclass(frozen=True)
class Secret:
    """A loaded secret and where it came from (the value is hidden from ``repr``)."""

    value: bytes
    source: str
    created: bool = False

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r}, value=<redacted>)"

    @property
    def loose_permissions(self) -> bool:
        """True when the secret file can be read by group or others."""
        if self.source.startswith("env:"):
            return False
        mode = Path(self.source).stat().st_mode
        return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def _check(value: bytes, source: str) -> bytes:
    value = value.strip()
    if len(value) < _MIN_LENGTH:
        msg = f"the secret from {source} is shorter than {_MIN_LENGTH} bytes"
        raise ConfigError(msg)
    return value


def load_secret(storage_path: Path, environ: dict[str, str] | None = None) -> Secret:
    """Load the secret, creating ``<storage_path>/secret.key`` on first run."""
    env = os.environ if environ is None else environ
    if file_name := env.get(SECRET_FILE_ENV):
        try:
            return Secret(_check(Path(file_name).read_bytes(), SECRET_FILE_ENV), file_name)
        except OSError as exc:
            msg = f"cannot read {SECRET_FILE_ENV}: {exc.strerror}"
            raise ConfigError(msg) from None
    if value := env.get(SECRET_ENV):
        return Secret(_check(value.encode("utf-8"), SECRET_ENV), f"env:{SECRET_ENV}")
    path = storage_path / DEFAULT_SECRET_NAME
    created = False
    if not path.exists():
        storage_path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: read theirs
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_hex(32).encode("ascii") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            created = True
    return Secret(_check(path.read_bytes(), str(path)), str(path.resolve()), created)

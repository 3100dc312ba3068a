"""The pseudonymisation secret (HMAC key).

Looked up in this order: the file named by ``ANONPROXY_SECRET_FILE``, the value of
``ANONPROXY_SECRET``, then ``<storage>/secret.key``. The secret is never read from the YAML
configuration and never logged.

A secret is created (32 random bytes, hex, mode 0600) only by ``anonproxy serve`` on its first
run (``load_secret(..., create=True)``) or by ``anonproxy secret create``
(:func:`create_secret`): a new secret changes every pseudonym, so ``check-config`` or an offline
``deidentify`` run from another folder must not make one by accident. Without a secret, they
stop with :class:`SecretNotFound`, which says where the secret was looked for.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from anonproxy.durable import make_directories, sync_directory
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


class SecretNotFound(ConfigError):
    """No secret in the environment and no ``<storage>/secret.key``."""


def _create(path: Path) -> bool:
    """Write a new secret to *path* (mode 0600), durably: its data synced, then its folder
    (and any folder created for it, in its parent), so that the pseudonyms made with it never
    outlive it after a crash. False when *path* already exists (another process created it
    first)."""
    make_directories(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode("ascii") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    sync_directory(path.parent)
    return True


def _not_found(path: Path) -> SecretNotFound:
    return SecretNotFound(
        f"no pseudonymisation secret: {SECRET_FILE_ENV} and {SECRET_ENV} are not set and"
        f" {path.resolve()} does not exist (storage.path of the configuration). Run this"
        " command with the proxy's configuration and secret, or create one with `anonproxy"
        " secret create` (`anonproxy serve` creates it on its first run): a new secret"
        " gives new pseudonyms"
    )


def load_secret(
    storage_path: Path, environ: dict[str, str] | None = None, *, create: bool = False
) -> Secret:
    """Load the secret; with *create* (``serve``), create ``<storage_path>/secret.key`` when
    there is none, otherwise raise :class:`SecretNotFound`."""
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
        if not create:
            raise _not_found(path)
        created = _create(path)  # False: another process created it first: read theirs
    return Secret(_check(path.read_bytes(), str(path)), str(path.resolve()), created)


def create_secret(storage_path: Path, environ: dict[str, str] | None = None) -> Secret:
    """``anonproxy secret create``: a new secret in the file named by ``ANONPROXY_SECRET_FILE``
    when set, else ``<storage_path>/secret.key``. An existing secret is never replaced
    (ConfigError), nor one given by ``ANONPROXY_SECRET``."""
    env = os.environ if environ is None else environ
    if file_name := env.get(SECRET_FILE_ENV):
        path = Path(file_name)
    elif env.get(SECRET_ENV):
        msg = f"the secret is given by {SECRET_ENV}: there is nothing to create"
        raise ConfigError(msg)
    else:
        path = storage_path / DEFAULT_SECRET_NAME
    try:
        created = _create(path)
    except OSError as exc:
        msg = f"cannot create the secret {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    if not created:
        msg = (
            f"a secret already exists at {path.resolve()}: kept (a new one changes every pseudonym)"
        )
        raise ConfigError(msg)
    return Secret(_check(path.read_bytes(), str(path)), str(path.resolve()), created=True)

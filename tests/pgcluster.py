"""A throw-away PostgreSQL cluster for tests: Debian's ``postgresql`` binaries, ``initdb`` in a
temporary folder, ``postgres`` on a loopback port with password authentication (SCRAM), run as
``nobody`` when the tests run as root (PostgreSQL refuses to run as root). Stopped and removed
by :meth:`PostgresCluster.stop`; :meth:`pause` and :meth:`resume` stop and restart the server
on the same port and data (an outage)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anonproxy.config import StateConfig

USER = "anonproxy"


def binaries() -> Path | None:
    """The folder of the newest installed PostgreSQL server's programs, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One cluster; :attr:`dsn` is its libpq connection string (password included)."""

    def __init__(self) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="anonproxy-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.password = secrets.token_hex(16)
        self.port = _free_port()
        # as root: the server runs as nobody (signals reach it directly, no wrapper)
        self.as_user: dict[str, object] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self.as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        os.chmod(self.root, 0o700)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            os.chown(pwfile, pwd.getpwnam("nobody").pw_uid, -1)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            cwd="/",
            **self.as_user,  # type: ignore[call-overload]
        )
        pwfile.unlink()
        self.process: subprocess.Popen[bytes] | None = None
        self.resume()

    @property
    def dsn(self) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname=postgres user={USER} password={self.password}"
        )

    def resume(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.process = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                "",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            **self.as_user,  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None:
                raise RuntimeError("postgres exited at start")
            time.sleep(0.1)
        raise RuntimeError("postgres did not start in 30 s")

    def pause(self) -> None:
        """Stop the server (fast shutdown: connections are closed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """Stop the server and remove the cluster."""
        self.pause()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """One cluster per test module (import this fixture into the module)."""
    pg = PostgresCluster()
    yield pg
    pg.stop()


def new_database(cluster: PostgresCluster, folder: Path) -> StateConfig:
    """A new database in *cluster*, and a ``state:`` section whose ``dsn_file`` (in *folder*,
    owner-only) names it."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = folder / "state.dsn"
    dsn.write_text(cluster.dsn.replace("dbname=postgres", f"dbname={name}") + "\n")
    dsn.chmod(0o600)
    return StateConfig(backend="postgresql", dsn_file=dsn, timeout_s=3.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """Each backend in turn: SQLite under the test's storage, a new PostgreSQL database."""
    if request.param == "sqlite":
        return StateConfig()
    return new_database(request.getfixturevalue("cluster"), tmp_path)

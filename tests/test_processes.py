"""The service's child processes start from a fork server (anonproxy.processes): the program
already imported, the signals as under spawn, and the fork server neither ended by the
signals sent to a whole process group nor outliving the process that started it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver
from pathlib import Path

import pytest

from anonproxy.processes import available_cores, child_context, wait_for_exit

from peers import running, wait_for


def _child_state() -> tuple[int, dict[str, object], list[str]]:
    """In a child: its parent, its SIGTERM/SIGHUP actions, and which of the program's
    modules it had before its task (the fork server's preload) — it imports nothing itself."""
    actions = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGHUP")}
    preloaded = [m for m in ("anonproxy.service", "pynetdicom", "pydicom") if m in sys.modules]
    return os.getppid(), actions, preloaded


def test_a_child_starts_from_the_fork_server_with_the_program_imported_and_default_signals() -> (
    None
):
    with ProcessPoolExecutor(1, mp_context=child_context()) as pool:
        parent, actions, preloaded = pool.submit(_child_state).result(timeout=120)
    server = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert parent == server != os.getpid()
    assert preloaded == ["anonproxy.service", "pynetdicom", "pydicom"]
    assert actions["SIGTERM"] == signal.SIG_DFL
    assert actions["SIGHUP"] == signal.SIG_DFL


def test_the_fork_server_outlives_group_signals_and_ends_with_its_starter() -> None:
    """SIGTERM and SIGHUP (systemd's stop, a terminal's hang-up: the whole group) leave the fork
    server serving; the process that started it SIGKILLed, a child watching that process ends,
    then the fork server."""
    starter = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            from multiprocessing import forkserver
            from anonproxy.processes import child_context, wait_for_exit
            context = child_context()
            first = context.Process(target=wait_for_exit, args=(os.getpid(),))
            first.start()
            print(forkserver._forkserver._forkserver_pid, first.pid, flush=True)
            sys.stdin.readline()  # the fork server signalled: start another child
            second = context.Process(target=wait_for_exit, args=(os.getpid(),))
            second.start()
            print(forkserver._forkserver._forkserver_pid, second.pid, flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert starter.stdout is not None
        assert starter.stdin is not None
        server, first = map(int, starter.stdout.readline().split())
        os.kill(server, signal.SIGTERM)
        os.kill(server, signal.SIGHUP)
        starter.stdin.write("\n")
        starter.stdin.flush()
        same, second = map(int, starter.stdout.readline().split())
        assert same == server
        assert all(map(running, (server, first, second)))
        starter.kill()
        starter.wait(10)
        assert wait_for(lambda: not any(map(running, (first, second, server))), timeout=10)
    finally:
        starter.kill()
        starter.wait()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", "affinity"),  # no quota
        ("150000 100000\n", 2),  # --cpus 1.5: two cores, rounded up
        ("50000 100000\n", 1),
        (None, "affinity"),  # no cgroup v2 file
    ],
)
def test_available_cores_are_the_affinity_within_the_cgroup_quota(
    tmp_path: Path, cpu_max: str | None, expected: int | str
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    wanted = affinity if expected == "affinity" else min(affinity, int(expected))
    assert available_cores(path) == wanted


@pytest.mark.parametrize("pidfd", [True, False])
def test_wait_for_exit_returns_when_the_process_ends(
    monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    """By the process's pidfd, or by looking every poll_s seconds (Linux before 5.3 has no
    pidfd_open: ENOSYS)."""
    if not pidfd:

        def no_pidfd(pid: int) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    try:
        wait_for_exit(sleeper.pid, poll_s=0.05)  # returns once it has ended, not yet reaped
        assert not running(sleeper.pid)
    finally:
        sleeper.wait()
    reaped = time.monotonic()
    wait_for_exit(sleeper.pid, poll_s=0.05)  # gone: at once
    assert time.monotonic() - reaped < 0.5

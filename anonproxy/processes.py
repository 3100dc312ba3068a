"""The service's child processes, started from a fork server that has imported the program.

Every child process of the service (the acceptors, the forward senders, the de-identification
workers) is started with multiprocessing's **forkserver** method, through
:func:`child_context`. The first start launches the fork server: a fresh interpreter (not a
fork of the service, whose threads may hold locks), which imports :data:`PRELOAD` once and
then forks each child on request. A child therefore starts in milliseconds rather than
importing pydicom, pynetdicom and anonproxy again (about a second of CPU under ``spawn``), and
it shares the pages of those imports with the fork server and its siblings until it writes
them: measured with four idle children, 203 MiB PSS for the whole tree against 386 MiB under
``spawn``.

What a child must not rely on:

* its parent process: the fork server is the parent, and it ends only once the process that
  started it and every child it forked have ended (each child holds the pipe it watches). A
  child that must end with the process that started it watches that process
  (:func:`wait_for_exit`) or a pipe from it. A fork server that ended is started again on the
  next start of a child;
* the environment of the moment: the fork server has the service's environment of when it
  started, as every child then has.

Signals: the fork server ignores SIGTERM and SIGHUP, which systemd and a terminal send to every
process of the group (multiprocessing has it ignore SIGINT too); it must outlive the service's
orderly stop, in which children may still be started. Its children have the default actions
back before their code runs (:mod:`anonproxy.fork_server`), as under ``spawn``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import select
import time
from multiprocessing.context import ForkServerContext
from pathlib import Path

#: What the fork server imports before forking: its signal set-up first, then the service, which
#: imports the code of every child.
PRELOAD = ["anonproxy.fork_server", "anonproxy.service"]

#: The CPU quota of this process's control group (cgroup v2; a container's ``--cpus``).
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def child_context() -> ForkServerContext:
    """The multiprocessing context of every child process of the service."""
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(PRELOAD)  # read when the fork server starts
    return forkserver


def wait_for_exit(pid: int, *, poll_s: float = 1.0) -> None:
    """Block until the process *pid* has ended (at once if it has already): by its pidfd, or
    by looking at it every *poll_s* seconds on a kernel without them (before Linux 5.3)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # ENOSYS
        while _exists(pid):
            time.sleep(poll_s)
        return
    try:
        select.select([handle], [], [])
    finally:
        os.close(handle)


def _exists(pid: int) -> bool:
    """Whether *pid* is a process that has not ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def available_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may use: those it may run on (its CPU affinity: a container's
    ``--cpuset-cpus``), no more than its control group's CPU quota (``--cpus``, rounded up)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 file, or not of that form: the affinity alone
    return max(1, cores)

"""Imported by the fork server of :mod:`anonproxy.processes` before anything else, and by no
other process: the fork server ignores SIGTERM and SIGHUP, and each child it forks has their
default actions back before its code runs."""

from __future__ import annotations

import signal
from multiprocessing import util

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _default_actions(_: object) -> None:
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


for _signum in _SIGNALS:
    signal.signal(_signum, signal.SIG_IGN)
# Run by multiprocessing in each child between the fork and its target.
util.register_after_fork(_default_actions, _default_actions)

"""The names anonproxy gives files and folders from de-identified UIDs, and the spool folders
that are no destination's queue: checked by the spool (:mod:`anonproxy.spool`, which exports
them too), by the configuration (a destination may not take a reserved name) and by the offline
command's output folders, which need them without the spool and what it imports (its sealed
files' cryptography, the receiving path).
"""

from __future__ import annotations

import re

_UID_NAME = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: The spool's folders that are not a destination's queue (``spool/tmp``, ``spool/incoming``,
#: ``spool/deferred``): names no destination may take.
SPOOL_TMP, SPOOL_INCOMING, SPOOL_DEFERRED = "tmp", "incoming", "deferred"
NOT_QUEUES = frozenset({SPOOL_TMP, SPOOL_INCOMING, SPOOL_DEFERRED})


def check_uid_name(uid: str) -> str:
    """Return *uid* if it is a valid UID usable as a file name, else raise ValueError."""
    if len(uid) > 64 or not _UID_NAME.match(uid):
        msg = "not a valid UID for a file name"
        raise ValueError(msg)
    return uid

"""Keyed, deterministic UID replacement (action code U) and the original-UID audit hash.

New UIDs are ``2.25.<n>`` where ``n`` is the integer of the first 128 bits of
``HMAC-SHA256(secret, b"uid:" + uid)`` (PS3.5 Annex B.2 allows a UUID-sized integer under the
2.25 root): at most 44 characters, no leading zeros, the same for the same secret on every
machine and run, and unlinkable to the original without the secret.

The audit hash of the original SOP Instance UID uses a *different* key,
``HMAC-SHA256(secret, b"anonproxy:original-uid-hash:v1")``, so the hash stored in an audit log
can neither be turned into the new UID nor computed from it.
"""

from __future__ import annotations

import hashlib
import hmac

import pydicom.uid

#: anonproxy's Implementation Class UID: ``2.25.`` + the integer of
#: ``uuid5(NAMESPACE_URL, "urn:anonproxy:implementation-class-uid:v1")``, derived once.
IMPLEMENTATION_CLASS_UID = "2.25.108173207205427750141799670009618415673"
#: anonproxy's Implementation Version Name (SH, ≤ 16 characters).
IMPLEMENTATION_VERSION_NAME = "ANONPROXY_010"

_UID_PREFIX = b"uid:"
#: Bound of a remapper's memo (some 0.5 MB)
_MAX_MAPPED = 4096
_HASH_KEY_LABEL = b"anonproxy:original-uid-hash:v1"


#: UIDs defined by the standard (pydicom's UID dictionary, PS3.6 Annex A).
WELL_KNOWN_UIDS: frozenset[str] = frozenset(getattr(pydicom.uid, "UID_dictionary"))  # noqa: B009


def is_well_known(uid: str) -> bool:
    """True for UIDs defined by the standard (SOP Classes, Transfer Syntaxes, ...)."""
    return uid in WELL_KNOWN_UIDS


class UidRemapper:
    """Maps UIDs to ``2.25.<int>`` with a keyed HMAC; well-known UIDs are returned unchanged.

    Immutable after construction but for a bounded memo of the UIDs mapped (the instances of
    a series share their study, series and frame of reference UIDs; a dictionary's get and set
    are atomic), so one instance can be shared by any number of threads.
    """

    __slots__ = ("_hash_key", "_keyed", "_mapped", "_secret")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray) or not secret:
            raise ValueError("secret must be non-empty bytes")
        self._secret = bytes(secret)
        self._hash_key = hmac.new(self._secret, _HASH_KEY_LABEL, hashlib.sha256).digest()
        #: HMAC-SHA256 keyed and fed the prefix once; each UID continues a copy of it
        self._keyed = hmac.new(self._secret, _UID_PREFIX, hashlib.sha256)
        #: replacement by original UID (unpadded), at most _MAX_MAPPED (emptied when full)
        self._mapped: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        """The replacement of ``uid`` (trailing NUL/space padding is ignored)."""
        uid = uid.strip("\x00 ")
        mapped = self._mapped.get(uid)
        if mapped is not None:
            return mapped
        if not uid or is_well_known(uid):
            return uid
        digest = self._keyed.copy()
        digest.update(uid.encode("ascii", "replace"))
        mapped = f"2.25.{int.from_bytes(digest.digest()[:16], 'big')}"
        if len(self._mapped) >= _MAX_MAPPED:
            self._mapped.clear()  # bounded whatever the senders send
        self._mapped[uid] = mapped
        return mapped

    def original_hash(self, uid: str) -> str:
        """Hex keyed hash of an original UID for audit records (not reversible, not the UID)."""
        uid = uid.strip("\x00 ")
        return hmac.new(self._hash_key, uid.encode("ascii", "replace"), "sha256").hexdigest()

    @staticmethod
    def describe() -> str:
        """One-line description of the mapping, for ``describe-profile``."""
        return "U: 2.25.<first 128 bits of HMAC-SHA256(secret, 'uid:' + UID)>"

"""Access control at association request: who may associate, from where, and how many at once.

The decision is taken when the A-ASSOCIATE-RQ arrives, before any presentation context is
negotiated. A refusal is an A-ASSOCIATE-RJ with the result, source and reason of PS3.8 9.3.4:

* called AE title is not ``listen.ae_title``: rejected-permanent, service-user, reason 7;
* calling AE title not in the allow-list: rejected-permanent, service-user, reason 3;
* calling AE title listed, but bound to other addresses: the same (reason 3);
* more associations from this address than ``max_associations_per_peer``, or more in all than
  ``max_associations``: rejected-transient, service-provider (presentation), reason 2
  (local-limit-exceeded).

With several acceptor processes (``listen.processes``, :mod:`anonproxy.acceptors`) the two
limits stay global: the associations running are counted in :class:`SharedAssociations`, a
small table in shared memory that the service creates and hands to each acceptor process. Each
process counts its own associations in a region of its own (total, and per peer: a keyed
hash of the address beside a count), under one lock; a request reads the sum over every
region. A process that dies leaves its region to the service, which clears it before
starting its replacement, so that a killed process never holds the limits.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from anonproxy.config import AllowedPeer, ListenConfig

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_RESULTS = {0x01: "rejected-permanent", 0x02: "rejected-transient"}
_SOURCES = {
    0x01: "service-user",
    0x02: "service-provider-acse",
    0x03: "service-provider-presentation",
}


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: its result, source and reason (diagnostic), and why, for the audit."""

    result: int
    source: int
    diagnostic: int
    reason: str

    def audit_fields(self) -> dict[str, object]:
        """The fields of an ``association.rejected`` audit record."""
        return {
            "reason": self.reason,
            "result": _RESULTS.get(self.result, str(self.result)),
            "source": _SOURCES.get(self.source, str(self.source)),
            "diagnostic": self.diagnostic,
        }

    @classmethod
    def from_primitive(cls, result: int, source: int, diagnostic: int) -> Rejection:
        """A rejection that pynetdicom decided, described from its A-ASSOCIATE-RJ fields."""
        reasons = {
            (0x01, 0x03): "calling_ae_title_not_recognised",
            (0x01, 0x07): "called_ae_title_not_recognised",
            (0x01, 0x02): "application_context_not_supported",
            (0x02, 0x02): "protocol_version_not_supported",
            (0x03, 0x01): "temporary_congestion",
            (0x03, 0x02): "association_limit_exceeded",
        }
        return cls(result, source, diagnostic, reasons.get((source, diagnostic), "no_reason"))


CALLED_AE_TITLE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x07, "called_ae_title_not_recognised")
CALLING_AE_TITLE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x03, "calling_ae_title_not_recognised")
ADDRESS_NOT_ALLOWED = Rejection(0x01, 0x01, 0x03, "calling_ae_title_not_allowed_from_address")
PEER_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "peer_association_limit_exceeded")
ASSOCIATION_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "association_limit_exceeded")


def parse_address(address: str) -> _Address | None:
    """The peer's IP address (an IPv4-mapped IPv6 address as IPv4); None when unparseable."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


class AccessPolicy:
    """The SCP's access rules, from :class:`~anonproxy.config.ListenConfig`."""

    def __init__(self, config: ListenConfig) -> None:
        self.ae_title = config.ae_title
        self.max_associations = config.max_associations
        self.max_associations_per_peer = config.max_associations_per_peer
        # AE title -> the networks it may come from; None: from anywhere.
        self._allowed: dict[str, list[_Network] | None] = {}
        for entry in config.allowed_calling_ae_titles:
            if isinstance(entry, AllowedPeer):
                networks = self._allowed.setdefault(entry.ae_title, [])
                if networks is not None:
                    networks.extend(entry.addresses)
            else:
                self._allowed[entry] = None

    def check(
        self,
        *,
        called_ae_title: str,
        calling_ae_title: str,
        address: str,
        active: int,
        active_from_peer: int,
    ) -> Rejection | None:
        """The rejection of an association request, or None to go on negotiating.

        *active* and *active_from_peer* count the incoming associations, this one included.
        """
        if called_ae_title.strip() != self.ae_title:
            return CALLED_AE_TITLE_NOT_RECOGNISED
        if self._allowed:
            calling = calling_ae_title.strip()
            if calling not in self._allowed:
                return CALLING_AE_TITLE_NOT_RECOGNISED
            networks = self._allowed[calling]
            if networks is not None and not self._from(address, networks):
                return ADDRESS_NOT_ALLOWED
        if self.max_associations_per_peer is not None and (
            active_from_peer > self.max_associations_per_peer
        ):
            return PEER_LIMIT_EXCEEDED
        if active > self.max_associations:
            return ASSOCIATION_LIMIT_EXCEEDED
        return None

    @staticmethod
    def _from(address: str, networks: Sequence[_Network]) -> bool:
        parsed = parse_address(address)
        return parsed is not None and any(parsed in network for network in networks)


#: Slots of a process's region beyond ``max_associations`` (requests being rejected are counted
#: until their A-ASSOCIATE-RJ is sent).
_SPARE_SLOTS = 8


def _peer_key(address: str) -> int:
    """A 63-bit key of a peer address (its table slot; never the address itself)."""
    digest = hashlib.blake2b(address.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class SharedAssociations:
    """The incoming associations of every acceptor process, in shared memory (see the
    module's docstring). Made by the service with a multiprocessing *context*
    (:func:`anonproxy.processes.child_context`) and
    handed to the processes when they are started."""

    def __init__(self, context: Any, processes: int, max_associations: int) -> None:  # noqa: ANN401
        self.processes = processes
        self.slots = max_associations + _SPARE_SLOTS
        self._size = 1 + 2 * self.slots  # [total, (key, count) * slots] per process
        self._table = context.RawArray("q", processes * self._size)
        self._lock = context.Lock()

    def enter(self, index: int, address: str) -> tuple[int, int, bool]:
        """Count an association request from *address* in process *index*: the associations
        running (this one included) in all and from that address, and whether it was counted
        (a full region counts it as over both limits; then :meth:`leave` must not be called)."""
        key = _peer_key(address)
        table = self._table
        total = from_peer = 0
        own: int | None = None
        free: int | None = None
        with self._lock:
            for process in range(self.processes):
                base = process * self._size
                total += table[base]
                for at in range(base + 1, base + self._size, 2):
                    count = table[at + 1]
                    if count and table[at] == key:
                        from_peer += count
                        if process == index:
                            own = at
                    elif not count and process == index and free is None:
                        free = at
            slot = own if own is not None else free
            if slot is None:
                return total + 1 + self.slots, from_peer + 1 + self.slots, False
            table[slot] = key
            table[slot + 1] += 1
            table[index * self._size] += 1
        return total + 1, from_peer + 1, True

    def leave(self, index: int, address: str) -> None:
        """An association counted by :meth:`enter` in process *index* ended."""
        key = _peer_key(address)
        table = self._table
        base = index * self._size
        with self._lock:
            for at in range(base + 1, base + self._size, 2):
                if table[at + 1] and table[at] == key:
                    table[at + 1] -= 1
                    table[base] = max(0, table[base] - 1)
                    return

    def active(self) -> int:
        """Associations running now, in every process."""
        with self._lock:
            return sum(self._table[p * self._size] for p in range(self.processes))

    def clear(self, index: int) -> None:
        """Forget what process *index* counted (it ended: its associations ended with it)."""
        base = index * self._size
        with self._lock:
            for at in range(base, base + self._size):
                self._table[at] = 0

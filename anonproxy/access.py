"""Access control at association request: who may associate, from where, and how many at once.

The decision is taken when the A-ASSOCIATE-RQ arrives, before any presentation context is
negotiated. A refusal is an A-ASSOCIATE-RJ with the result, source and reason of PS3.8 9.3.4:

* called AE title is not ``listen.ae_title``: rejected-permanent, service-user, reason 7;
* calling AE title not in the allow-list: rejected-permanent, service-user, reason 3;
* calling AE title listed, but bound to other addresses: the same (reason 3);
* more associations from this address than ``max_associations_per_peer``, or more in all than
  ``max_associations``: rejected-transient, service-provider (presentation), reason 2
  (local-limit-exceeded).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

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

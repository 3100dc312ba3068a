"""Prometheus metrics of one proxy (served at ``/metrics`` by :mod:`anonproxy.admin`).

Everything is counted in the service process, which is where every outcome is known: the SCP
handlers answer C-STOREs there, the pipeline audits each instance's de-identification, spooling
and refusal there (the worker processes of :class:`~anonproxy.workers.DeidentifierPool` only
run the engine and hand their result back), and the forward workers are threads of it (their
sender child processes report back to them). So prometheus-client's multiprocess mode (a
folder of memory-mapped files shared by forked processes) is not needed: one registry, in one
process, sees everything.

Counters and histograms are fed from the audit trail: :meth:`Metrics.observe` is a sink of
:class:`~anonproxy.audit.AuditLog` and reads each event's name, stage, status, destination and
timings, the one place every association and instance event passes through. The C-STORE
answers are counted by the SCP itself (:meth:`Metrics.store_answered`): it alone knows the
status sent, deferred and relayed answers included. Gauges are read when scraped, from a
:class:`StateSource` (spool queues, quarantine, active associations, disk free).

No label ever carries a value of a data set: labels are event stages, DIMSE statuses, the
fixed reason names of :mod:`anonproxy.access` and configured destination names. Free-text
reasons (which may name an attribute) are not used as labels.

Each :class:`Metrics` has its own :class:`~prometheus_client.CollectorRegistry`, so that
several proxies in one process (the tests) count apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Seconds: from a few milliseconds (a small CT) to minutes (OCR of a long cine loop).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# A label from an event field must look like one of the code's fixed names (a stage, an
# access reason): anything else is counted as "other", never copied.
_FIXED_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_STATUS = re.compile(r"^0x[0-9A-F]{4}$")
OTHER = "other"


def fixed_name(value: object) -> str:
    """*value* when it looks like one of the code's fixed names, else ``other``."""
    return value if isinstance(value, str) and _FIXED_NAME.match(value) else OTHER


def dimse_status(value: object) -> str:
    """*value* when it is a DIMSE status as the audit writes it (``0xC001``), else ``other``."""
    return value if isinstance(value, str) and _STATUS.match(value) else OTHER


@dataclass(frozen=True)
class QueueState:
    """One destination's queue as seen when scraped."""

    pending: int
    oldest_age_s: float
    retrying: int
    quarantined: int


class StateSource(Protocol):
    """What the gauges read on each scrape."""

    def queue_states(self) -> Mapping[str, QueueState]:
        """Per destination name."""
        ...

    def active_associations(self) -> int:
        """Associations running now."""
        ...

    def disk_free_bytes(self) -> int:
        """Free space of the spool's file system."""
        ...

    def deferred_waiting(self) -> int:
        """Data sets acknowledged on receipt, waiting for de-identification."""
        ...

    def deferred_bytes(self) -> int:
        """Their bytes on disk (what ``storage.incoming_max_bytes`` bounds)."""
        ...

    def deferred_oldest_age_s(self) -> float:
        """Seconds since the oldest of them was received (0 when none waits)."""
        ...

    def rejected_inputs(self) -> int:
        """Inputs refused before de-identification, kept in quarantine."""
        ...


class _StateCollector(Collector):
    """Gauges read from a :class:`StateSource` when scraped."""

    def __init__(self, source: StateSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        queues = self.source.queue_states()
        families = {
            "pending": GaugeMetricFamily(
                "anonproxy_spool_pending", "Instances waiting in a destination's queue",
                labels=["destination"],
            ),
            "oldest_age_s": GaugeMetricFamily(
                "anonproxy_spool_oldest_age_seconds",
                "Age of the oldest instance in a destination's queue (0 when empty)",
                labels=["destination"],
            ),
            "retrying": GaugeMetricFamily(
                "anonproxy_spool_retrying", "Queued instances that failed at least once",
                labels=["destination"],
            ),
            "quarantined": GaugeMetricFamily(
                "anonproxy_quarantine_instances",
                "Instances a destination refused for good, kept in quarantine",
                labels=["destination"],
            ),
        }  # fmt: skip
        for name, state in sorted(queues.items()):
            for field, family in families.items():
                family.add_metric([name], float(getattr(state, field)))
        yield from families.values()
        yield GaugeMetricFamily(
            "anonproxy_quarantine_rejected_inputs",
            "Inputs refused before de-identification, kept in quarantine",
            value=self.source.rejected_inputs(),
        )
        yield GaugeMetricFamily(
            "anonproxy_deferred_waiting",
            "Data sets acknowledged on receipt and waiting for de-identification",
            value=self.source.deferred_waiting(),
        )
        yield GaugeMetricFamily(
            "anonproxy_deferred_bytes",
            "Bytes of the data sets waiting for de-identification (storage.incoming_max_bytes)",
            value=self.source.deferred_bytes(),
        )
        yield GaugeMetricFamily(
            "anonproxy_deferred_oldest_age_seconds",
            "Age of the oldest data set waiting for de-identification (0 when none waits)",
            value=self.source.deferred_oldest_age_s(),
        )
        yield GaugeMetricFamily(
            "anonproxy_associations_active", "Associations running now",
            value=self.source.active_associations(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "anonproxy_spool_disk_free_bytes", "Free space of the spool's file system",
            value=self.source.disk_free_bytes(),
        )  # fmt: skip


class Metrics:
    """The metrics of one proxy, in their own registry. Thread-safe (prometheus-client's
    metrics are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.store_responses = Counter(
            "anonproxy_cstore_responses", "C-STORE responses sent, by DIMSE status",
            ["status"], registry=registry,
        )  # fmt: skip
        self.associations_accepted = Counter(
            "anonproxy_associations_accepted", "Associations accepted", registry=registry
        )
        self.associations_rejected = Counter(
            "anonproxy_associations_rejected", "Associations rejected (or TLS handshakes "
            "failed), by reason", ["reason"], registry=registry,
        )  # fmt: skip
        self.instances_received = Counter(
            "anonproxy_instances_received", "Instances received", registry=registry
        )
        self.refusals = Counter(
            "anonproxy_refusals", "Instances refused (not forwarded), by stage and DIMSE status",
            ["stage", "status"], registry=registry,
        )  # fmt: skip
        self.receive_seconds = Histogram(
            "anonproxy_receive_seconds",
            "Receiving one C-STORE data set: from its first fragment to the whole data set "
            "(the sender's and the network's pace)",
            registry=registry, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.deidentify_seconds = Histogram(
            "anonproxy_deidentify_seconds",
            "From the start of processing to the de-identified data set (parse, checks, engine)",
            registry=registry, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.store_seconds = Histogram(
            "anonproxy_store_seconds",
            "From the start of processing to the instance durably spooled (de-identification "
            "and commit)",
            registry=registry, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.forward_seconds = Histogram(
            "anonproxy_forward_seconds", "Sending one instance to a destination",
            ["destination"], registry=registry, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.forwarded = Counter(
            "anonproxy_forwarded", "Instances delivered to a destination", ["destination"],
            registry=registry,
        )  # fmt: skip
        self.forward_retries = Counter(
            "anonproxy_forward_retries", "Transient forward failures (retried later)",
            ["destination"], registry=registry,
        )  # fmt: skip
        self.quarantined = Counter(
            "anonproxy_quarantined", "Instances a destination refused for good",
            ["destination"], registry=registry,
        )  # fmt: skip
        self.deidentify_retries = Counter(
            "anonproxy_deidentify_retries",
            "Deferred de-identifications retried (the spool could not take them)",
            registry=registry,
        )
        self._handlers = self._event_handlers()

    def watch(self, source: StateSource) -> None:
        """Read the gauges from *source* on every scrape."""
        self.registry.register(_StateCollector(source))

    def data_set_received(self, seconds: float) -> None:
        """A C-STORE data set was received whole, *seconds* after its first fragment."""
        self.receive_seconds.observe(seconds)

    def store_answered(self, status: int) -> None:
        """A C-STORE response was sent with *status*."""
        self.store_responses.labels(status=f"0x{status:04X}").inc()

    def observe(self, name: str, fields: dict[str, Any]) -> None:
        """An audit event (a sink of :class:`~anonproxy.audit.AuditLog`)."""
        handler = self._handlers.get(name)
        if handler is not None:
            handler(fields)

    def _event_handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        """What each audit event counts, by event name."""
        return {
            "association.accepted": lambda _: self.associations_accepted.inc(),
            "association.rejected": lambda f: self.associations_rejected.labels(
                reason=fixed_name(f.get("reason"))
            ).inc(),
            "instance.received": lambda _: self.instances_received.inc(),
            "instance.failed": lambda f: self.refusals.labels(
                stage=fixed_name(f.get("stage")), status=dimse_status(f.get("status"))
            ).inc(),
            "instance.deidentified": lambda f: _observe(
                self.deidentify_seconds, f.get("deidentify_ms")
            ),
            "instance.spooled": lambda f: _observe(self.store_seconds, f.get("total_ms")),
            "instance.forwarded": self._forwarded,
            "instance.forward_retry": lambda f: self.forward_retries.labels(
                destination=fixed_destination(f.get("destination"))
            ).inc(),
            "instance.quarantined": lambda f: self.quarantined.labels(
                destination=fixed_destination(f.get("destination"))
            ).inc(),
            "instance.deidentify_retry": lambda _: self.deidentify_retries.inc(),
        }

    def _forwarded(self, fields: dict[str, Any]) -> None:
        destination = fixed_destination(fields.get("destination"))
        self.forwarded.labels(destination=destination).inc()
        _observe(self.forward_seconds.labels(destination=destination), fields.get("send_ms"))


def _observe(histogram: Histogram, milliseconds: object) -> None:
    """Observe a duration the audit gives in milliseconds (ignored when absent)."""
    if isinstance(milliseconds, int | float) and milliseconds >= 0:
        histogram.observe(milliseconds / 1000)


_DESTINATION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # config.py's destination names


def fixed_destination(value: object) -> str:
    """*value* when it is a destination name as the configuration allows, else ``other``."""
    return value if isinstance(value, str) and _DESTINATION.match(value) else OTHER

"""What happens to one received instance: de-identify, then spool durably.

This module joins the engine (:mod:`anonproxy.deid`) and the spool (:mod:`anonproxy.spool`); it
knows nothing about the network. :meth:`InstancePipeline.process` returns a
:class:`StoreOutcome` (a status and an ErrorComment) and never raises: every failure fails
closed, so an instance that was not fully de-identified and durably stored is never
acknowledged and never forwarded.

:meth:`InstancePipeline.should_defer` decides, per instance, whether it is processed before
the answer (:meth:`~InstancePipeline.process`) or acknowledged once durably received and
processed behind by :mod:`anonproxy.deferred`, which runs the same steps
(:meth:`~InstancePipeline.store` after the engine) and quarantines what is refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anonproxy.audit import AuditLog
from anonproxy.config import RouteConfig
from anonproxy.deid.pixels import read_by_sop_class
from anonproxy.errors import SpoolFullError, TransientError
from anonproxy.remap import MapRecording
from anonproxy.spool import Delivery, Spool
from anonproxy.status import StoreStatus
from anonproxy.workers import Deidentified, DeidentifierPool, Refusal

_ERROR_COMMENT_MAX = 64  # PS3.7: Error Comment is LO


@dataclass(frozen=True)
class StoreOutcome:
    """The answer for the sender."""

    status: int  # a StoreStatus, or a destination's status relayed by a transparent route
    error_comment: str | None = None
    deid_sop_instance_uid: str | None = None

    @property
    def comment(self) -> str | None:
        """The ErrorComment, cut to the length the LO VR allows."""
        return None if self.error_comment is None else self.error_comment[:_ERROR_COMMENT_MAX]


class InstancePipeline:
    """De-identifies and spools instances for a set of destinations. Thread-safe."""

    def __init__(
        self,
        runner: DeidentifierPool,
        spool: Spool,
        destinations: Sequence[str],
        audit: AuditLog,
        *,
        routes: Sequence[RouteConfig] = (),
        keep_rejected_inputs: bool = False,
        acknowledge: str = "after_deidentification",
        read_pixels: bool = False,
        map_recorder: MapRecording | None = None,
    ) -> None:
        self.runner = runner
        self.spool = spool
        self.destinations = list(destinations)
        self.routes = list(routes)
        self.audit = audit
        self.keep_rejected_inputs = keep_rejected_inputs
        self.acknowledge_on_receipt = acknowledge == "after_receipt"
        self.read_pixels = read_pixels  # profile.clean_pixel_data is not off
        self.map_recorder = map_recorder  # the re-identification map (None: map.enabled false)

    def should_defer(self, sop_class_uid: str) -> bool:
        """Whether a received data set (*sop_class_uid* from its C-STORE request) is
        acknowledged once durably kept in the incoming spool and
        de-identified behind (:mod:`anonproxy.deferred`), rather than before the answer
        (:meth:`process`). The sender then no longer learns of a refusal: the input is
        quarantined and audited instead.

        Every instance is deferred under ``listen.acknowledge: after_receipt``; otherwise, when
        OCR reads pixels (*read_pixels*), the instances of the SOP Classes whose pixels it reads
        (ultrasound, secondary capture, visible light: seconds each). Other images that OCR reads
        (a CT screen capture, Burned In Annotation YES, a pixel rule's match) are told apart by
        their header only, which is not decoded on this thread: they are read before the answer.
        This runs on the association's thread before the answer: it looks at the request only.
        """
        return self.acknowledge_on_receipt or (
            self.read_pixels and read_by_sop_class(sop_class_uid) is not None
        )

    def refuse(
        self,
        status: StoreStatus,
        stage: str,
        reason: str,
        fields: dict[str, object],
        source: Path | None = None,
    ) -> StoreOutcome:
        """Refuse the instance. Inputs refused before de-identification are kept (they hold
        PHI) only when configured; the audit record names the kept file by its random name."""
        if self.keep_rejected_inputs and source is not None:
            try:
                kept: str | None = self.spool.keep_rejected(
                    source, refusal_note(Refusal(status, stage, reason), fields)
                ).name
            except Exception:  # noqa: BLE001 - keeping is best effort; the refusal stands
                kept = None
            fields = {**fields, "kept_as": kept}
        self.audit.event(
            "instance.failed", stage=stage, status=f"0x{status:04X}", reason=reason, **fields
        )
        return StoreOutcome(status, reason)

    def route(
        self, calling_ae_title: str, modality: str, sop_class_uid: str
    ) -> tuple[list[str], dict[str, float]]:
        """The destinations of an instance, and those of them whose answer the sender waits
        for (transparent routes) with the time-out. Every destination when no route is
        configured, else those of every matching route, in configuration order."""
        if not self.routes:
            return self.destinations, {}
        chosen: dict[str, None] = {}
        transparent: dict[str, float] = {}
        for route in self.routes:
            if route.matches(calling_ae_title, modality, sop_class_uid):
                chosen.update(dict.fromkeys(route.destinations))
                if route.transparent:
                    for name in route.destinations:
                        transparent[name] = max(
                            transparent.get(name, 0.0), route.transparent_timeout_s
                        )
        return list(chosen), transparent

    def process(
        self,
        source: Path,
        *,
        sop_class_uid: str,
        calling_ae_title: str = "",
        **context: object,
    ) -> StoreOutcome:
        """De-identify the DICOM file *source* (preamble, file meta, data set as received) and
        spool it for its destinations. *source* is left in place."""
        started = time.monotonic()
        fields = {"sop_class_uid": sop_class_uid, **context}
        self.audit.event("instance.received", **fields)
        try:
            with self.spool.staging() as staged:
                done = self.runner.run(source, staged)
                outcome = (
                    done
                    if isinstance(done, Refusal)
                    else self.store(
                        done, staged, (calling_ae_title, sop_class_uid), started, fields
                    )
                )
        except SpoolFullError as exc:
            return self.refuse(StoreStatus.OUT_OF_RESOURCES, "spool", str(exc), fields)
        if isinstance(outcome, Refusal):
            return self.refuse(outcome.status, outcome.stage, outcome.reason, fields, source)
        return outcome

    def store(
        self,
        done: Deidentified,
        staged: Path,
        route: tuple[str, str],
        started: float,
        fields: dict[str, object],
        *,
        consume: Path | None = None,
    ) -> StoreOutcome | Refusal:
        """Route and spool an instance the engine de-identified into *staged*; *route* is the
        calling AE title and SOP Class UID, *fields* go into its audit records. With
        *consume* (a deferred data set, :mod:`anonproxy.deferred`), the commit removes it and
        transparent routes are not waited for. Returns the answer, or the refusal when no
        route takes it; raises :class:`SpoolFullError` when the spool cannot take it."""
        result = done.result
        fields["original_sop_instance_uid_hash"] = result.original_sop_instance_uid_hash
        calling_ae_title, sop_class_uid = route
        destinations, transparent = self.route(calling_ae_title, done.modality, sop_class_uid)
        if not destinations:
            return Refusal(StoreStatus.NO_ROUTE, "route", "no route for this instance")
        refused = self._record(done)
        if refused is not None:
            return refused
        if consume is not None:
            transparent = {}  # acknowledged already: nobody waits for the answer
        self.audit.event(
            "instance.deidentified",
            deid_sop_instance_uid=result.sop_instance_uid,
            deid_study_instance_uid=result.study_instance_uid,
            actions=result.action_counts,
            pixels=done.pixels,
            deidentify_ms=round((time.monotonic() - started) * 1000, 2),
            **fields,
        )
        name = result.sop_instance_uid
        watching = {d: self.spool.queues[d].watch(name) for d in transparent}
        try:
            size = self.spool.commit(staged, name, destinations, consume=consume)
        except SpoolFullError:
            self._unwatch(name, watching)
            raise
        self.audit.event(
            "instance.spooled",
            deid_sop_instance_uid=name,
            destinations=destinations,
            bytes=size,
            total_ms=round((time.monotonic() - started) * 1000, 2),
            **({} if consume is None else {"deferred_as": consume.stem}),
        )
        if watching:
            return self._relay(name, watching, transparent)
        return StoreOutcome(StoreStatus.SUCCESS, deid_sop_instance_uid=name)

    def _record(self, done: Deidentified) -> Refusal | None:
        """Record the instance's patient and study in the re-identification map before it is
        spooled (so before it is acknowledged or forwarded): journaled durably, then in the
        state store. The refusal (0xA700: the sender retries) when it cannot be."""
        identity = done.result.identity
        if self.map_recorder is None or identity is None:
            return None
        try:
            self.map_recorder.record(identity)
        except TransientError as exc:
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "map", str(exc))
        except OSError as exc:
            reason = f"map journal write failed: {exc.strerror or type(exc).__name__}"
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "map", reason)
        return None

    def quarantine(
        self, deferred: Path, refusal: Refusal, fields: dict[str, object]
    ) -> StoreOutcome:
        """A deferred data set refused: keep it in the quarantine of refused inputs (under its
        own random name: keeping it again after a crash replaces it), remove it from the
        deferred ones and audit ``instance.failed``. Raises OSError when it cannot be kept
        (it then stays where it is, to be processed again)."""
        kept = self.spool.keep_rejected(deferred, refusal_note(refusal, fields), deferred.stem)
        self.spool.consume(deferred)
        fields = {**fields, "kept_as": kept.name}
        return self.refuse(refusal.status, refusal.stage, refusal.reason, fields)

    def _unwatch(self, name: str, watching: dict[str, Delivery]) -> None:
        for destination, delivery in watching.items():
            self.spool.queues[destination].unwatch(name, delivery)

    def _relay(
        self, name: str, watching: dict[str, Delivery], timeouts: dict[str, float]
    ) -> StoreOutcome:
        """Transparent routes: wait for the destinations and relay the first refusal (or the
        last answer). A time-out answers Success, since the instance is durably spooled."""
        answer: StoreOutcome = StoreOutcome(StoreStatus.SUCCESS, deid_sop_instance_uid=name)
        try:
            for destination, delivery in watching.items():
                if not delivery.done.wait(timeouts[destination]):
                    self.audit.event(
                        "instance.transparent_timeout",
                        deid_sop_instance_uid=name,
                        destination=destination,
                    )
                    continue
                if delivery.reason is not None:  # quarantined: relay the refusal
                    status = (
                        StoreStatus.PROCESSING_FAILURE
                        if delivery.status is None
                        else delivery.status
                    )
                    return StoreOutcome(status, f"{destination}: {delivery.reason}", name)
                if delivery.status:
                    answer = StoreOutcome(delivery.status, None, name)  # a warning, relayed
        finally:
            self._unwatch(name, watching)
        return answer


def refusal_note(refusal: Refusal, fields: dict[str, object]) -> dict[str, object]:
    """What is written beside a kept refused input: the refusal and the SOP Class (never a
    value of the data set)."""
    return {
        "stage": refusal.stage,
        "status": f"0x{refusal.status:04X}",
        "reason": refusal.reason,
        "sop_class_uid": fields.get("sop_class_uid"),
    }

"""DICOM audit messages (PS3.15 A.5) built from audit trail events.

Each message is an ``AuditMessage`` of the DICOM audit message schema (PS3.15 A.5.1): one
EventIdentification (EventID, EventTypeCode, EventActionCode, EventDateTime,
EventOutcomeIndicator), the ActiveParticipants, one AuditSourceIdentification, and the
ParticipantObjectIdentification of the data concerned. Codes are DCM codes (PS3.16) as pydicom
lists them in ``pydicom.sr.codedict.codes.DCM``.

Mapping of audit trail events (:mod:`anonproxy.audit`) to PS3.15 A.5.3 messages:

``service.started`` / ``service.stopped``
    Application Activity (110100), EventTypeCode Application Start (110120) / Application
    Stop (110121), action E; the participant is anonproxy in the role Application (110150).
``association.accepted``
    User Authentication (110114), EventTypeCode Login (110122), outcome 0: the calling AE (the
    requestor, with its address) was authenticated by its AE title, address and, with TLS,
    its certificate; anonproxy (the called AE) is the authenticating node.
``association.rejected``
    User Authentication / Login with outcome 4 (minor failure) and the rejection reason; a
    failed TLS handshake is a Security Alert (110113) of type Node Authentication (110126)
    instead, since the peer never reached the DICOM layer.
``association.released`` / ``association.aborted`` / ``association.closed``
    User Authentication, EventTypeCode Logout (110123); outcome 0 for a release, 4 for an
    abort; the description gives the counts of instances received, stored and failed.
``instance.forwarded`` / ``instance.quarantined``
    DICOM Instances Transferred (110104), action R (anonproxy sends its copy; outcome 4 when
    quarantined). anonproxy is the Source (110153, the requestor), the destination the
    Destination (110152). The participant object is the de-identified study (ID type Study
    Instance UID, 110180) with the SOP Class and de-identified SOP Instance UID in its
    ParticipantObjectDescription, flagged ``<Anonymized>true</Anonymized>``, life cycle 7
    (De-identification). When the events did not name the de-identified Study Instance UID
    (field ``deid_study_instance_uid`` of ``instance.deidentified``), the object is named by its
    de-identified SOP Instance UID under the local code ``SOPInstanceUID`` (system
    ``anonproxy``) instead.
``map.lookup`` / ``map.export``
    Patient Record (110110), action R (read), outcome 0: the honest broker (the operating-system
    user who ran ``anonproxy map``, the requestor) read the originals of a patient pseudonym
    or of a de-identified study from the re-identification map. The participant object is the
    pseudonym (type Person, role Patient, ID type Patient Number) or the de-identified study
    (ID type Study Instance UID), life cycle 6 (Access/Use); the description gives the number
    of map entries read. The originals are never part of it.

No message carries a value of a received data set: only de-identified UIDs, SOP Class UIDs,
AE titles, addresses, counts and anonproxy's own reason codes.
"""

from __future__ import annotations

import ipaddress
import socket
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from anonproxy.config import Settings

# (code value, meaning) of the DCM codes used, as in PS3.16 / pydicom's codes.DCM.
APPLICATION_ACTIVITY = ("110100", "Application Activity")
DICOM_INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
APPLICATION = ("110150", "Application")
DESTINATION_ROLE_ID = ("110152", "Destination Role ID")
SOURCE_ROLE_ID = ("110153", "Source Role ID")
STUDY_INSTANCE_UID = ("110180", "Study Instance UID")
PATIENT_RECORD = ("110110", "Patient Record")

# RFC 5424 severities
NOTICE = 5
WARNING = 4

EVENTS = frozenset(
    {
        "service.started",
        "service.stopped",
        "association.accepted",
        "association.rejected",
        "association.released",
        "association.aborted",
        "association.closed",
        "instance.deidentified",
        "instance.forwarded",
        "instance.quarantined",
        "map.lookup",
        "map.export",
    }
)
"""The audit trail events the builder reads (``instance.deidentified`` only fills a cache)."""

_CACHE_SIZE = 20000


@dataclass(frozen=True)
class Peer:
    """A destination as an audit participant."""

    user_id: str
    address: str | None = None


@dataclass(frozen=True)
class AuditMessage:
    """An XML audit message and its syslog severity."""

    severity: int
    xml: str


@dataclass
class DicomAuditBuilder:
    """Turns audit trail events into DICOM audit messages. Not thread-safe: one thread calls."""

    ae_title: str
    hostname: str = field(default_factory=socket.getfqdn)
    audit_source_id: str | None = None
    enterprise_site_id: str | None = None
    destinations: dict[str, Peer] = field(default_factory=dict)
    calling_ae_titles: dict[str, str] = field(default_factory=dict)
    _instances: OrderedDict[str, tuple[str, str | None]] = field(
        default_factory=OrderedDict, repr=False
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomAuditBuilder:
        """A builder for the node *settings* describe."""
        syslog = settings.audit.syslog
        destinations: dict[str, Peer] = {}
        calling: dict[str, str] = {}
        for destination in settings.effective_destinations:
            ae_title = getattr(destination, "ae_title", None)
            host = getattr(destination, "host", None)
            destinations[destination.name] = Peer(ae_title or destination.name, host)
            calling[destination.name] = (
                getattr(destination, "calling_ae_title", None) or settings.listen.ae_title
            )
        return cls(
            ae_title=settings.listen.ae_title,
            audit_source_id=syslog.audit_source_id if syslog else None,
            enterprise_site_id=syslog.enterprise_site_id if syslog else None,
            destinations=destinations,
            calling_ae_titles=calling,
        )

    def __call__(self, name: str, fields: Mapping[str, Any], when: datetime) -> AuditMessage | None:
        """The message for event *name*, or None when it has none."""
        if name == "instance.deidentified":
            self._remember(fields)
            return None
        if name in ("service.started", "service.stopped"):
            return self._application_activity(name, when)
        if name in ("instance.forwarded", "instance.quarantined"):
            return self._transferred(name, fields, when)
        if name.startswith("association."):
            return self._association(name, fields, when)
        if name in ("map.lookup", "map.export"):
            return self._map_read(name, fields, when)
        return None

    def _association(
        self, name: str, fields: Mapping[str, Any], when: datetime
    ) -> AuditMessage | None:
        if name == "association.accepted":
            return self._authentication(LOGIN, fields, when, failure=None)
        if name == "association.rejected":
            reason = str(fields.get("reason", "rejected"))
            if reason == "tls_handshake_failed":
                return self._node_authentication_failure(fields, when)
            return self._authentication(LOGIN, fields, when, failure=reason)
        if name in ("association.released", "association.aborted", "association.closed"):
            counts = (
                f"received={fields.get('received', 0)} stored={fields.get('stored', 0)}"
                f" failed={fields.get('failed', 0)}"
            )
            failure = None if name != "association.aborted" else f"aborted; {counts}"
            return self._authentication(LOGOUT, fields, when, failure=failure, note=counts)
        return None

    # --- the messages ----------------------------------------------------------------------

    def _application_activity(self, name: str, when: datetime) -> AuditMessage:
        kind = APPLICATION_START if name == "service.started" else APPLICATION_STOP
        root = self._event(APPLICATION_ACTIVITY, kind, "E", when, None)
        self._participant(root, self.ae_title, False, self.hostname, role=APPLICATION)
        self._source(root)
        return AuditMessage(NOTICE, _serialize(root))

    def _authentication(
        self,
        kind: tuple[str, str],
        fields: Mapping[str, Any],
        when: datetime,
        *,
        failure: str | None,
        note: str | None = None,
    ) -> AuditMessage:
        root = self._event(USER_AUTHENTICATION, kind, "E", when, failure, note=note)
        calling = str(fields.get("calling_ae_title") or "") or _address(fields)
        self._participant(root, calling, True, fields.get("peer_address"))
        called = str(fields.get("called_ae_title") or "") or self.ae_title
        self._participant(root, called, False, self.hostname)
        self._source(root)
        return AuditMessage(WARNING if failure else NOTICE, _serialize(root))

    def _node_authentication_failure(
        self, fields: Mapping[str, Any], when: datetime
    ) -> AuditMessage:
        detail = fields.get("detail")
        description = "tls_handshake_failed" + (f": {detail}" if detail else "")
        root = self._event(SECURITY_ALERT, NODE_AUTHENTICATION, "E", when, description)
        self._participant(root, _address(fields), True, fields.get("peer_address"))
        self._participant(root, self.ae_title, False, self.hostname)
        self._source(root)
        return AuditMessage(WARNING, _serialize(root))

    def _transferred(self, name: str, fields: Mapping[str, Any], when: datetime) -> AuditMessage:
        sop_instance_uid = str(fields.get("deid_sop_instance_uid", ""))
        destination = str(fields.get("destination", ""))
        sop_class_uid, study_uid = self._instances.get(sop_instance_uid, ("", None))
        failure = "quarantined by the destination" if name == "instance.quarantined" else None
        root = self._event(DICOM_INSTANCES_TRANSFERRED, None, "R", when, failure)
        self._participant(
            root,
            self.calling_ae_titles.get(destination, self.ae_title),
            True,
            self.hostname,
            role=SOURCE_ROLE_ID,
        )
        peer = self.destinations.get(destination, Peer(destination or "unknown"))
        self._participant(root, peer.user_id, False, peer.address, role=DESTINATION_ROLE_ID)
        self._source(root)
        if study_uid:
            object_id, id_type = study_uid, STUDY_INSTANCE_UID
            id_type_element = _code("ParticipantObjectIDTypeCode", id_type, "DCM")
        else:
            object_id = sop_instance_uid
            id_type_element = _code(
                "ParticipantObjectIDTypeCode",
                ("SOPInstanceUID", "SOP Instance UID"),
                "anonproxy",
            )
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": object_id,
                "ParticipantObjectTypeCode": "2",  # System object
                "ParticipantObjectTypeCodeRole": "3",  # Report
                "ParticipantObjectDataLifeCycle": "7",  # De-identification
            },
        )
        obj.append(id_type_element)
        description = ET.SubElement(obj, "ParticipantObjectDescription")
        sop_class = ET.SubElement(description, "SOPClass", {"NumberOfInstances": "1"})
        if sop_class_uid:
            sop_class.set("UID", sop_class_uid)
        ET.SubElement(sop_class, "Instance", {"UID": sop_instance_uid})
        ET.SubElement(description, "Anonymized").text = "true"
        return AuditMessage(WARNING if failure else NOTICE, _serialize(root))

    def _map_read(self, name: str, fields: Mapping[str, Any], when: datetime) -> AuditMessage:
        note = f"{name}: {fields.get('entries', 0)} map entries read"
        root = self._event(PATIENT_RECORD, None, "R", when, None, note=note)
        self._participant(root, str(fields.get("user") or "unknown"), True, self.hostname)
        self._participant(root, self.ae_title, False, self.hostname, role=APPLICATION)
        self._source(root)
        by_study = fields.get("query") == "study"
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": str(fields.get("pseudonym") or ""),
                "ParticipantObjectTypeCode": "2" if by_study else "1",  # System object, Person
                "ParticipantObjectTypeCodeRole": "3" if by_study else "1",  # Report, Patient
                "ParticipantObjectDataLifeCycle": "6",  # Access / Use
            },
        )
        if by_study:
            obj.append(_code("ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID, "DCM"))
        else:  # RFC 3881 Patient Number
            obj.append(
                ET.Element(
                    "ParticipantObjectIDTypeCode",
                    {
                        "csd-code": "2",
                        "codeSystemName": "RFC-3881",
                        "originalText": "Patient Number",
                    },
                )
            )
        return AuditMessage(NOTICE, _serialize(root))

    # --- parts -----------------------------------------------------------------------------

    def _remember(self, fields: Mapping[str, Any]) -> None:
        uid = fields.get("deid_sop_instance_uid")
        if not uid:
            return
        study = fields.get("deid_study_instance_uid")
        self._instances[str(uid)] = (
            str(fields.get("sop_class_uid") or ""),
            str(study) if study else None,
        )
        self._instances.move_to_end(str(uid))
        while len(self._instances) > _CACHE_SIZE:
            self._instances.popitem(last=False)

    @staticmethod
    def _event(
        event_id: tuple[str, str],
        event_type: tuple[str, str] | None,
        action: str,
        when: datetime,
        failure: str | None,
        *,
        note: str | None = None,
    ) -> ET.Element:
        root = ET.Element("AuditMessage")
        identification = ET.SubElement(
            root,
            "EventIdentification",
            {
                "EventActionCode": action,
                "EventDateTime": _datetime(when),
                "EventOutcomeIndicator": "4" if failure else "0",
            },
        )
        identification.append(_code("EventID", event_id, "DCM"))
        if event_type is not None:
            identification.append(_code("EventTypeCode", event_type, "DCM"))
        if failure or note:
            ET.SubElement(identification, "EventOutcomeDescription").text = failure or note
        return root

    @staticmethod
    def _participant(
        root: ET.Element,
        user_id: str,
        requestor: bool,
        address: object,
        *,
        role: tuple[str, str] | None = None,
    ) -> None:
        attributes = {"UserID": user_id, "UserIsRequestor": "true" if requestor else "false"}
        if address:
            attributes["NetworkAccessPointID"] = str(address)
            attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(str(address)) else "1"
        participant = ET.SubElement(root, "ActiveParticipant", attributes)
        if role is not None:
            participant.append(_code("RoleIDCode", role, "DCM"))

    def _source(self, root: ET.Element) -> None:
        attributes = {"AuditSourceID": self.audit_source_id or self.hostname}
        if self.enterprise_site_id:
            attributes["AuditEnterpriseSiteID"] = self.enterprise_site_id
        source = ET.SubElement(root, "AuditSourceIdentification", attributes)
        # 4: application server process (PS3.15 A.5.1.2.1)
        ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})


def _code(tag: str, code: tuple[str, str], system: str) -> ET.Element:
    return ET.Element(tag, {"csd-code": code[0], "codeSystemName": system, "originalText": code[1]})


def _datetime(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _address(fields: Mapping[str, Any]) -> str:
    address = fields.get("peer_address")
    port = fields.get("peer_port")
    if not address:
        return "unknown"
    return f"{address}:{port}" if port else str(address)


def _serialize(root: ET.Element) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")

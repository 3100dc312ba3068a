"""DICOM audit messages (PS3.15 A.5) and their RFC 5424 syslog framing."""

from __future__ import annotations

import re
import socket
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any

from pydicom.sr.codedict import codes

from anonproxy.audit import AuditLog
from anonproxy.config import SyslogConfig, parse_settings
from anonproxy.dicom_audit import AuditMessage, DicomAuditBuilder
from anonproxy.syslog import BOM, SyslogSender, format_message, octet_counted

WHEN = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)
DEID_SOP = "2.25.111111111111111111111111111111111"
DEID_STUDY = "2.25.222222222222222222222222222222222"
CT = "1.2.840.10008.5.1.4.1.1.2"
TOP_LEVEL = ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification"]


def _builder() -> DicomAuditBuilder:
    settings = parse_settings(
        {
            "listen": {"ae_title": "ANONPROXY"},
            "destinations": [
                {"name": "research", "ae_title": "RESEARCH", "host": "10.1.2.3", "port": 104}
            ],
            "audit": {"path": None, "syslog": {"host": "127.0.0.1", "audit_source_id": "ap1"}},
        }
    )
    return DicomAuditBuilder.from_settings(settings)


def _parse(message: AuditMessage | None) -> ET.Element:
    assert message is not None
    root = ET.fromstring(message.xml)  # noqa: S314 - our own output
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    assert tags.count("EventIdentification") == 1
    assert tags.count("AuditSourceIdentification") == 1
    assert "ActiveParticipant" in tags
    # schema order: event, participants, source, objects
    order = [t for t in tags if t != "ParticipantObjectIdentification"]
    assert order == sorted(order, key=TOP_LEVEL.index)
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert datetime.fromisoformat(event.get("EventDateTime", "").replace("Z", "+00:00"))
    for participant in root.iter("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
    for coded in root.iter():
        if "csd-code" in coded.attrib and coded.tag != "AuditSourceTypeCode":
            assert coded.get("codeSystemName")
            assert coded.get("originalText")
    return root


def _code(element: ET.Element | None) -> tuple[str | None, str | None]:
    assert element is not None
    return element.get("csd-code"), element.get("originalText")


def _dcm(keyword: str) -> tuple[str, str]:
    code = getattr(codes.DCM, keyword)
    return str(code.value), str(code.meaning)


def test_codes_are_those_of_the_standard() -> None:
    from anonproxy import dicom_audit

    for keyword, constant in {
        "ApplicationActivity": dicom_audit.APPLICATION_ACTIVITY,
        "DICOMInstancesTransferred": dicom_audit.DICOM_INSTANCES_TRANSFERRED,
        "SecurityAlert": dicom_audit.SECURITY_ALERT,
        "UserAuthentication": dicom_audit.USER_AUTHENTICATION,
        "ApplicationStart": dicom_audit.APPLICATION_START,
        "ApplicationStop": dicom_audit.APPLICATION_STOP,
        "Login": dicom_audit.LOGIN,
        "Logout": dicom_audit.LOGOUT,
        "NodeAuthentication": dicom_audit.NODE_AUTHENTICATION,
        "Application": dicom_audit.APPLICATION,
        "DestinationRoleID": dicom_audit.DESTINATION_ROLE_ID,
        "SourceRoleID": dicom_audit.SOURCE_ROLE_ID,
        "StudyInstanceUID": dicom_audit.STUDY_INSTANCE_UID,
        "PatientRecord": dicom_audit.PATIENT_RECORD,
    }.items():
        assert _dcm(keyword) == constant


def test_association_accepted_is_a_login() -> None:
    root = _parse(
        _builder()(
            "association.accepted",
            {
                "calling_ae_title": "MODALITY",
                "called_ae_title": "ANONPROXY",
                "peer_address": "192.0.2.7",
                "peer_port": 40000,
            },
            WHEN,
        )
    )
    assert _code(root.find("EventIdentification/EventID")) == _dcm("UserAuthentication")
    assert _code(root.find("EventIdentification/EventTypeCode")) == _dcm("Login")
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventOutcomeIndicator") == "0"
    assert event.get("EventDateTime") == "2024-05-01T12:30:45.123Z"
    requestor, node = root.findall("ActiveParticipant")
    assert requestor.attrib == {
        "UserID": "MODALITY",
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "192.0.2.7",
        "NetworkAccessPointTypeCode": "2",
    }
    assert node.get("UserID") == "ANONPROXY"
    assert node.get("UserIsRequestor") == "false"
    source = root.find("AuditSourceIdentification")
    assert source is not None
    assert source.get("AuditSourceID") == "ap1"


def test_association_rejected_is_a_failed_login_or_a_security_alert() -> None:
    builder = _builder()
    message = builder(
        "association.rejected",
        {"calling_ae_title": "EVIL", "peer_address": "192.0.2.9", "reason": "unknown_calling_ae"},
        WHEN,
    )
    root = _parse(message)
    assert message is not None
    assert message.severity == 4
    assert _code(root.find("EventIdentification/EventTypeCode")) == _dcm("Login")
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "unknown_calling_ae"
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventOutcomeIndicator") == "4"

    root = _parse(
        builder(
            "association.rejected",
            {"reason": "tls_handshake_failed", "peer_address": "192.0.2.9", "peer_port": 5},
            WHEN,
        )
    )
    assert _code(root.find("EventIdentification/EventID")) == _dcm("SecurityAlert")
    assert _code(root.find("EventIdentification/EventTypeCode")) == _dcm("NodeAuthentication")
    assert root.findall("ActiveParticipant")[0].get("UserID") == "192.0.2.9:5"


def test_association_end_is_a_logout_with_counts() -> None:
    fields = {"calling_ae_title": "MODALITY", "received": 3, "stored": 2, "failed": 1}
    root = _parse(_builder()("association.released", fields, WHEN))
    assert _code(root.find("EventIdentification/EventTypeCode")) == _dcm("Logout")
    text = root.findtext("EventIdentification/EventOutcomeDescription")
    assert text == "received=3 stored=2 failed=1"
    root = _parse(_builder()("association.aborted", fields, WHEN))
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventOutcomeIndicator") == "4"


def test_service_start_and_stop_are_application_activity() -> None:
    for name, keyword in (
        ("service.started", "ApplicationStart"),
        ("service.stopped", "ApplicationStop"),
    ):
        root = _parse(_builder()(name, {"port": 11112}, WHEN))
        assert _code(root.find("EventIdentification/EventID")) == _dcm("ApplicationActivity")
        assert _code(root.find("EventIdentification/EventTypeCode")) == _dcm(keyword)
        assert _code(root.find("ActiveParticipant/RoleIDCode")) == _dcm("Application")


def _transfer(builder: DicomAuditBuilder, name: str = "instance.forwarded") -> ET.Element:
    message = builder(
        name,
        {"deid_sop_instance_uid": DEID_SOP, "destination": "research", "status": "0x0000"},
        WHEN,
    )
    root = _parse(message)
    assert _code(root.find("EventIdentification/EventID")) == _dcm("DICOMInstancesTransferred")
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventActionCode") == "R"
    source, destination = root.findall("ActiveParticipant")
    assert (source.get("UserID"), source.get("UserIsRequestor")) == ("ANONPROXY", "true")
    assert _code(source.find("RoleIDCode")) == _dcm("SourceRoleID")
    assert destination.get("UserID") == "RESEARCH"
    assert destination.get("NetworkAccessPointID") == "10.1.2.3"
    assert _code(destination.find("RoleIDCode")) == _dcm("DestinationRoleID")
    objects = root.findall("ParticipantObjectIdentification")
    assert len(objects) == 1
    obj = objects[0]
    assert obj.get("ParticipantObjectTypeCode") == "2"
    assert obj.get("ParticipantObjectTypeCodeRole") == "3"
    assert obj.get("ParticipantObjectDataLifeCycle") == "7"
    assert obj.findtext("ParticipantObjectDescription/Anonymized") == "true"
    instance = obj.find("ParticipantObjectDescription/SOPClass/Instance")
    assert instance is not None
    assert instance.get("UID") == DEID_SOP
    return root


def test_forwarded_instance_is_dicom_instances_transferred_of_the_deidentified_study() -> None:
    builder = _builder()
    builder(
        "instance.deidentified",
        {
            "deid_sop_instance_uid": DEID_SOP,
            "deid_study_instance_uid": DEID_STUDY,
            "sop_class_uid": CT,
        },
        WHEN,
    )
    root = _transfer(builder)
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None
    assert obj.get("ParticipantObjectID") == DEID_STUDY
    assert _code(obj.find("ParticipantObjectIDTypeCode")) == _dcm("StudyInstanceUID")
    sop_class = obj.find("ParticipantObjectDescription/SOPClass")
    assert sop_class is not None
    assert sop_class.attrib == {"NumberOfInstances": "1", "UID": CT}


def test_forwarded_instance_without_study_is_named_by_its_instance() -> None:
    root = _transfer(_builder())
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None
    assert obj.get("ParticipantObjectID") == DEID_SOP
    id_type = obj.find("ParticipantObjectIDTypeCode")
    assert id_type is not None
    assert id_type.get("codeSystemName") == "anonproxy"


def test_quarantined_instance_is_a_failed_transfer() -> None:
    root = _transfer(_builder(), "instance.quarantined")
    event = root.find("EventIdentification")
    assert event is not None
    assert event.get("EventOutcomeIndicator") == "4"


def test_a_map_look_up_is_a_patient_record_read_of_the_pseudonym() -> None:
    """``anonproxy map lookup`` / ``export``: Patient Record, read, by the user who ran it; the
    object is the pseudonym or the de-identified study, never an original."""
    for name, query, value in (
        ("map.lookup", "patient_id", "ANON-0123456789ABCDEF"),
        ("map.export", "study", DEID_STUDY),
    ):
        fields = {"query": query, "pseudonym": value, "entries": 2, "user": "broker"}
        root = _parse(_builder()(name, fields, WHEN))
        event = root.find("EventIdentification")
        assert event is not None
        assert event.get("EventActionCode") == "R"
        assert _code(event.find("EventID")) == _dcm("PatientRecord")
        assert event.findtext("EventOutcomeDescription") == f"{name}: 2 map entries read"
        users = [
            (p.get("UserID"), p.get("UserIsRequestor")) for p in root.iter("ActiveParticipant")
        ]
        assert users == [("broker", "true"), ("ANONPROXY", "false")]
        [obj] = root.findall("ParticipantObjectIdentification")
        assert obj.get("ParticipantObjectID") == value
        assert obj.get("ParticipantObjectTypeCode") == ("2" if query == "study" else "1")
        id_type = _code(obj.find("ParticipantObjectIDTypeCode"))
        assert id_type == (
            _dcm("StudyInstanceUID") if query == "study" else ("2", "Patient Number")
        )


def test_other_events_have_no_message() -> None:
    builder = _builder()
    for name in ("instance.received", "instance.spooled", "instance.forward_retry"):
        assert builder(name, {"deid_sop_instance_uid": DEID_SOP}, WHEN) is None


def test_messages_carry_only_the_fields_they_name() -> None:
    """Fields other than AE titles, addresses, UIDs, counts and reasons never reach a message
    (the events carry no dataset value; this guards against a future field that would)."""
    planted = "ZQPLANTED^VALUE"
    builder = _builder()
    fields: dict[str, Any] = {
        "deid_sop_instance_uid": DEID_SOP,
        "destination": "research",
        "calling_ae_title": "MODALITY",
        "peer_address": "192.0.2.7",
        "original_sop_instance_uid_hash": planted,
        "patient": planted,
        "actions": {planted: 1},
    }
    for name in (
        "instance.deidentified",
        "instance.forwarded",
        "association.accepted",
        "association.released",
        "service.started",
    ):
        message = builder(name, fields, WHEN)
        assert message is None or planted not in message.xml


def test_syslog_message_is_rfc5424() -> None:
    message = AuditMessage(5, "<AuditMessage/>")
    data = format_message(
        message, WHEN, facility=10, hostname="node 1.example", app_name="anonproxy", procid=42
    )
    header, _, body = data.partition(BOM)
    assert (
        header == b"<85>1 2024-05-01T12:30:45.123456Z node-1.example anonproxy 42 IHE+RFC-3881 - "
    )
    assert body == b"<AuditMessage/>"
    assert octet_counted(b"abc") == b"3 abc"
    assert re.fullmatch(rb"\d+ .*", octet_counted(data), re.DOTALL)


def test_config_needs_ca_for_tls() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SyslogConfig(host="x", transport="tls")
    with pytest.raises(ValidationError):
        SyslogConfig(host="x", certificate="a.pem")  # type: ignore[arg-type]


def test_sink_never_blocks_or_raises_and_drops_oldest(tmp_path: Any) -> None:
    """A full queue drops the oldest events (counted) and the audit log carries on."""
    with socket.socket() as probe:  # a closed TCP port: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = SyslogConfig(host="127.0.0.1", port=port, transport="tcp", queue_size=5)
    sender = SyslogSender(config, _builder())
    audit = AuditLog(tmp_path / "audit.jsonl", sinks=[sender, _raising_sink])
    started = time.monotonic()
    for _ in range(100):
        audit.event("association.accepted", calling_ae_title="MODALITY")
    assert time.monotonic() - started < 1.0
    assert sender.dropped >= 90
    started = time.monotonic()
    sender.close(timeout=0.5)
    assert time.monotonic() - started < 1.5
    audit.close()
    assert len((tmp_path / "audit.jsonl").read_text("utf-8").splitlines()) == 100


def _raising_sink(name: str, fields: dict[str, Any]) -> None:
    raise RuntimeError(name)

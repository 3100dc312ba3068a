"""Security with real peers on loopback: access control (DCMTK echoscu/storescu and pynetdicom
requestors bound to other loopback addresses), DICOM TLS with a test CA made by the openssl
command (DCMTK storescu/echoscu/storescp with their TLS options), and idle associations."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from anonproxy.tls import BCP195_CIPHERS, server_context

from conftest import audit_records, corpus_identifying_values
from peers import Pki, TlsStoreSCP, echo, storescu, wait_for

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    return audit_records(tmp_path / "var" / "audit.jsonl")


def _rejections(tmp_path: Path) -> list[dict[str, Any]]:
    return [e for e in _audit(tmp_path) if e["event"] == "association.rejected"]


def _received(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "var" / "received").rglob("*.dcm"))


def _ct(corpus: list[Path]) -> Path:
    return next(p for p in corpus if p.name == "CT_small.dcm")


def _hold(port: int, address: str, calling: str = "MODALITY") -> Any:
    """An established association from *address* (a loopback address), kept open."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title="ANONPROXY", bind_address=(address, 0))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki")).create()


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: its client certificate is not trusted by the proxy."""
    return Pki(tmp_path_factory.mktemp("rogue"), name="rogue").create()


def _tls_listen(pki: Pki, *, mutual: bool = True) -> dict[str, Any]:
    return {
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca),
        "require_client_certificate": mutual,
    }


# --- access control ------------------------------------------------------------------------------


def test_unknown_ae_and_wrong_address_are_rejected_listed_ae_accepted(
    make_proxy, tmp_path: Path, corpus: list[Path]
) -> None:
    proxy = make_proxy(
        listen={
            "allowed_calling_ae_titles": [
                {"ae_title": "MODALITY", "addresses": ["127.0.0.0/8"]},
                {"ae_title": "CT01", "addresses": ["10.9.9.9/32"]},
            ]
        }
    )
    # A listed AE title from its address: accepted, and its instance goes through.
    assert echo(proxy.port, calling="MODALITY").returncode == 0
    sent = storescu(proxy.port, [_ct(corpus)], calling="MODALITY")
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert wait_for(lambda: len(_received(tmp_path)) == 1, timeout=30)

    # An unknown calling AE title: A-ASSOCIATE-RJ permanent, service user, reason 3.
    unknown = echo(proxy.port, calling="INTRUDER")
    assert unknown.returncode != 0
    assert "Rejected Permanent, Source: Service User" in unknown.stderr
    assert "Calling AE Title Not Recognized" in unknown.stderr
    # A listed AE title from another address (CT01 is bound to 10.9.9.9): the same answer.
    elsewhere = storescu(proxy.port, [_ct(corpus)], calling="CT01")
    assert elsewhere.returncode != 0
    assert "Calling AE Title Not Recognized" in elsewhere.stderr
    # The wrong called AE title: reason 7.
    wrong = echo(proxy.port, calling="MODALITY", called="NOTME")
    assert "Called AE Title Not Recognized" in wrong.stderr

    rejected = _rejections(tmp_path)
    assert [(e["calling_ae_title"], e["reason"], e["diagnostic"]) for e in rejected] == [
        ("INTRUDER", "calling_ae_title_not_recognised", 3),
        ("CT01", "calling_ae_title_not_allowed_from_address", 3),
        ("MODALITY", "called_ae_title_not_recognised", 7),
    ]
    assert all(e["result"] == "rejected-permanent" for e in rejected)
    assert all(e["source"] == "service-user" for e in rejected)
    assert all(e["peer_address"] == "127.0.0.1" for e in rejected)
    received = [e for e in _audit(tmp_path) if e["event"] == "instance.received"]
    assert len(received) == 1  # only MODALITY's
    assert len(_received(tmp_path)) == 1


def test_per_peer_and_global_association_limits(make_proxy, tmp_path: Path) -> None:
    proxy = make_proxy(listen={"max_associations": 2, "max_associations_per_peer": 1})
    held = [_hold(proxy.port, "127.0.0.2")]
    assert held[0].is_established
    try:
        assert echo(proxy.port).returncode == 0  # one from 127.0.0.1, one from 127.0.0.2
        # echoscu is done once released; the proxy's association thread ends just after
        assert wait_for(lambda: proxy.active_associations() == 1, timeout=10)
        held.append(_hold(proxy.port, "127.0.0.1"))
        assert held[1].is_established
        # A second association from 127.0.0.1: over the per-peer limit.
        over_peer = echo(proxy.port)
        assert over_peer.returncode != 0
        assert "Rejected Transient" in over_peer.stderr
        assert "Local Limit Exceeded" in over_peer.stderr
        # A first association from 127.0.0.3, with two running: over the global limit.
        third = _hold(proxy.port, "127.0.0.3")
        assert third.is_rejected
        answer = third.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for assoc in held:
            assoc.release()
    assert wait_for(lambda: proxy.active_associations() == 0, timeout=10)
    assert echo(proxy.port).returncode == 0  # slots are given back
    rejected = _rejections(tmp_path)
    assert [(e["peer_address"], e["reason"]) for e in rejected] == [
        ("127.0.0.1", "peer_association_limit_exceeded"),
        ("127.0.0.3", "association_limit_exceeded"),
    ]
    assert all(e["result"] == "rejected-transient" for e in rejected)
    assert all(e["source"] == "service-provider-presentation" for e in rejected)
    assert all(e["diagnostic"] == 2 for e in rejected)


# --- limits ---------------------------------------------------------------------------------------


def test_idle_association_is_aborted_after_network_timeout_and_audited(
    make_proxy, tmp_path: Path
) -> None:
    proxy = make_proxy(listen={"network_timeout": 1.0})
    assoc = _hold(proxy.port, "127.0.0.1")
    assert assoc.is_established
    # Activity keeps it open past the time-out...
    for _ in range(5):
        time.sleep(0.4)
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    # ...silence does not.
    started = time.monotonic()
    assert wait_for(lambda: not assoc.is_established, timeout=10, interval=0.05)
    assert time.monotonic() - started < 5
    assert assoc.is_aborted

    # The proxy audits the time-out after its A-ABORT has left: the peer may see it first.
    def idle() -> list[dict[str, Any]]:
        return [e for e in _audit(tmp_path) if e["event"] == "association.idle_timeout"]

    assert wait_for(idle, timeout=5)
    time.sleep(0.2)  # no second record follows
    idle_events = idle()
    assert len(idle_events) == 1
    assert idle_events[0]["network_timeout_s"] == 1.0
    assert idle_events[0]["calling_ae_title"] == "MODALITY"
    # The association's closing record follows (aborted, or closed when the transport closed
    # first), with its counts.
    closing = {"association.aborted", "association.closed"}
    assert wait_for(lambda: any(e["event"] in closing for e in _audit(tmp_path)), timeout=5)
    assert wait_for(lambda: proxy.active_associations() == 0, timeout=5)


def test_max_pdu_size_is_offered_to_the_peer(make_proxy) -> None:
    proxy = make_proxy(listen={"max_pdu_size": 16384})
    assoc = _hold(proxy.port, "127.0.0.1")
    try:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 16384
    finally:
        assoc.release()


# --- DICOM TLS ------------------------------------------------------------------------------------


def test_server_context_is_tls12_plus_with_bcp195_ciphers(pki: Pki) -> None:
    from anonproxy.config import TlsServerConfig

    context = server_context(TlsServerConfig.model_validate(_tls_listen(pki)))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    allowed = set(BCP195_CIPHERS.split(":"))
    for cipher in context.get_ciphers():
        assert cipher["protocol"] == "TLSv1.3" or cipher["name"] in allowed, cipher["name"]


def test_storescu_over_tls_gets_through_and_arrives_deidentified(
    make_proxy, tmp_path: Path, corpus: list[Path], pki: Pki
) -> None:
    proxy = make_proxy(listen={"tls": _tls_listen(pki)})
    assert echo(proxy.port, extra=pki.dcmtk_client()).returncode == 0
    files = [p for p in corpus if p.name in {"CT_small.dcm", "MR_small.dcm"}]
    sent = storescu(proxy.port, files, extra=pki.dcmtk_client())
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert "Store Failed" not in sent.stderr
    assert wait_for(lambda: len(_received(tmp_path)) == 2, timeout=30)
    phi = corpus_identifying_values(files)
    for path in _received(tmp_path):
        assert not [value for value in phi if value.encode() in path.read_bytes()]
        assert dcmread(path).PatientIdentityRemoved == "YES"
    accepted = [e for e in _audit(tmp_path) if e["event"] == "association.accepted"]
    assert accepted
    assert all(e["tls_version"] in {"TLSv1.2", "TLSv1.3"} for e in accepted)
    assert all(e["client_certificate"] == "MODALITY" for e in accepted)
    text = (tmp_path / "var" / "audit.jsonl").read_text("utf-8")
    assert not [value for value in phi if value in text]


def test_plain_tcp_to_a_tls_listener_fails(
    make_proxy, tmp_path: Path, corpus: list[Path], pki: Pki
) -> None:
    proxy = make_proxy(listen={"tls": _tls_listen(pki, mutual=False)})
    # A connection that never shakes hands stalls nobody (the handshake runs in its own
    # thread, bounded by acse_timeout).
    with socket.create_connection(("127.0.0.1", proxy.port)):
        assert echo(proxy.port, extra=pki.dcmtk_client()).returncode == 0
    assert echo(proxy.port).returncode != 0
    sent = storescu(proxy.port, [_ct(corpus)])
    assert sent.returncode != 0 or "Store Failed" in sent.stderr
    # The refusal is audited just after the peer sees the TLS alert.
    assert wait_for(lambda: len(_rejections(tmp_path)) == 3, timeout=5)
    rejected = _rejections(tmp_path)  # the silent connection (closed), echoscu, storescu
    assert all(e["reason"] == "tls_handshake_failed" for e in rejected)
    assert not _received(tmp_path)
    assert echo(proxy.port, extra=pki.dcmtk_client()).returncode == 0  # still serving TLS
    assert wait_for(lambda: proxy.active_associations() == 0, timeout=5)  # none lingers


def test_client_without_trusted_certificate_is_refused_under_mutual_tls(
    make_proxy, tmp_path: Path, corpus: list[Path], pki: Pki, rogue: Pki
) -> None:
    proxy = make_proxy(listen={"tls": _tls_listen(pki, mutual=True)})
    anonymous = storescu(proxy.port, [_ct(corpus)], extra=pki.dcmtk_client(certificate=False))
    assert anonymous.returncode != 0
    untrusted = ["+tls", str(rogue.client_key), str(rogue.client_cert), "+cf", str(pki.ca)]
    assert echo(proxy.port, extra=untrusted).returncode != 0
    # The refusal is audited just after the peer sees the TLS alert.
    assert wait_for(lambda: len(_rejections(tmp_path)) == 2, timeout=5)
    rejected = _rejections(tmp_path)
    assert [e["reason"] for e in rejected] == ["tls_handshake_failed"] * 2
    assert "CERTIFICATE" in rejected[0]["detail"].upper()
    assert "certificate verification failed" in rejected[1]["detail"]
    assert not _received(tmp_path)
    assert not [e for e in _audit(tmp_path) if e["event"] == "association.accepted"]


def test_without_mutual_tls_a_client_certificate_is_optional(make_proxy, pki: Pki) -> None:
    proxy = make_proxy(listen={"tls": _tls_listen(pki, mutual=False)})
    assert echo(proxy.port, extra=pki.dcmtk_client(certificate=False)).returncode == 0


def test_forwarding_over_tls_to_a_tls_pacs(
    make_proxy, tmp_path: Path, corpus: list[Path], pki: Pki, rogue: Pki
) -> None:
    pacs = TlsStoreSCP(tmp_path / "research", pki).start()
    try:
        destination = {"name": "research", "ae_title": "RESEARCH", "host": "localhost"}
        proxy = make_proxy(
            [
                {
                    **destination,
                    "port": pacs.port,
                    "tls": {
                        "ca_certificates": str(pki.ca),
                        "certificate": str(pki.client_cert),
                        "private_key": str(pki.client_key),
                    },
                },
                {  # the same PACS, but trusting another CA: never delivered
                    **destination,
                    "name": "untrusted",
                    "port": pacs.port,
                    "tls": {
                        "ca_certificates": str(rogue.ca),
                        "certificate": str(pki.client_cert),
                        "private_key": str(pki.client_key),
                    },
                },
            ]
        )
        sent = storescu(proxy.port, [_ct(corpus)])
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert wait_for(lambda: len(pacs.files()) == 1, timeout=30)
        ds = dcmread(pacs.files()[0])
        assert ds.PatientIdentityRemoved == "YES"
        assert not corpus_identifying_values([_ct(corpus)]) & {str(ds.PatientName)}

        def retried() -> bool:
            return any(
                e["event"] == "instance.forward_retry" and e["destination"] == "untrusted"
                for e in _audit(tmp_path)
            )

        assert wait_for(retried, timeout=30)
        retry = next(e for e in _audit(tmp_path) if e["event"] == "instance.forward_retry")
        assert "TLS" in retry["reason"]
        forwarded = [e for e in _audit(tmp_path) if e["event"] == "instance.forwarded"]
        assert [e["destination"] for e in forwarded] == ["research"]
    finally:
        pacs.stop()

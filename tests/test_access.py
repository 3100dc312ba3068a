"""Access policy: the allow-list schema (AE titles, optionally bound to addresses) and the
A-ASSOCIATE-RJ each refusal gets."""

from __future__ import annotations

import pytest

from anonproxy.access import (
    ADDRESS_NOT_ALLOWED,
    ASSOCIATION_LIMIT_EXCEEDED,
    CALLED_AE_TITLE_NOT_RECOGNISED,
    CALLING_AE_TITLE_NOT_RECOGNISED,
    PEER_LIMIT_EXCEEDED,
    AccessPolicy,
    Rejection,
    parse_address,
)
from anonproxy.config import AllowedPeer, ListenConfig, dump_settings, parse_settings
from anonproxy.errors import ConfigError


def _policy(**listen: object) -> AccessPolicy:
    return AccessPolicy(parse_settings({"listen": listen}).listen)


def _check(policy: AccessPolicy, calling: str, address: str = "127.0.0.1", **kw: object):
    args = {"called_ae_title": "ANONPROXY", "active": 1, "active_from_peer": 1, **kw}
    return policy.check(calling_ae_title=calling, address=address, **args)  # type: ignore[arg-type]


def test_plain_list_of_ae_titles_still_works() -> None:
    listen = parse_settings({"listen": {"allowed_calling_ae_titles": ["CT01", " MR02 "]}}).listen
    assert listen.allowed_calling_ae_titles == ["CT01", "MR02"]
    assert listen.allowed_ae_titles == ["CT01", "MR02"]
    policy = AccessPolicy(listen)
    assert _check(policy, "CT01", "10.1.2.3") is None
    assert _check(policy, "XX") is CALLING_AE_TITLE_NOT_RECOGNISED


def test_entries_bind_an_ae_title_to_addresses_and_networks() -> None:
    listen = parse_settings(
        {
            "listen": {
                "allowed_calling_ae_titles": [
                    "PACS",
                    {"ae_title": "CT01", "addresses": ["10.0.0.0/24", "127.0.0.1"]},
                    {"ae_title": "CT01", "addresses": ["2001:db8::/32"]},  # entries add up
                ]
            }
        }
    ).listen
    assert isinstance(listen.allowed_calling_ae_titles[1], AllowedPeer)
    assert listen.allowed_ae_titles == ["PACS", "CT01"]
    policy = AccessPolicy(listen)
    assert _check(policy, "CT01", "10.0.0.77") is None
    assert _check(policy, "CT01", "127.0.0.1") is None
    assert _check(policy, "CT01", "::ffff:10.0.0.9") is None  # IPv4-mapped on a dual stack
    assert _check(policy, "CT01", "2001:db8::5") is None
    assert _check(policy, "CT01", "10.0.1.1") is ADDRESS_NOT_ALLOWED
    assert _check(policy, "CT01", "127.0.0.2") is ADDRESS_NOT_ALLOWED
    assert _check(policy, "CT01", "not an address") is ADDRESS_NOT_ALLOWED
    assert _check(policy, "PACS", "192.168.7.7") is None
    assert _check(policy, "MR02", "10.0.0.77") is CALLING_AE_TITLE_NOT_RECOGNISED
    # The effective configuration prints the networks.
    assert "10.0.0.0/24" in dump_settings(parse_settings({"listen": listen.model_dump()}))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"ae_title": "CT01", "addresses": ["10.0.0.5/24"]}], "allowed_calling_ae_titles.0"),
        ([{"ae_title": "CT01", "addresses": ["ct01.example"]}], "allowed_calling_ae_titles.0"),
        ([{"ae_title": "CT01", "addresses": []}], "allowed_calling_ae_titles.0"),
        ([{"ae_title": "CT01"}], "allowed_calling_ae_titles.0"),
        ([{"ae_title": "BAD\\AE", "addresses": ["10.0.0.1"]}], "allowed_calling_ae_titles.0"),
        ([{"ae_title": "CT01", "addresses": ["10.0.0.1"], "port": 1}], "port"),
        (["CT01", {"ae_title": "CT01", "addresses": ["10.0.0.1"]}], "with and without"),
    ],
)
def test_bad_entries_name_the_key(entries: list[object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"listen\.allowed_calling_ae_titles") as error:
        parse_settings({"listen": {"allowed_calling_ae_titles": entries}})
    assert message in str(error.value)


def test_empty_allow_list_admits_any_calling_ae_title() -> None:
    assert _check(_policy(), "ANYONE", "203.0.113.9") is None


def test_called_ae_title_must_match() -> None:
    policy = _policy(allowed_calling_ae_titles=["CT01"])
    assert _check(policy, "CT01", called_ae_title="OTHER") is CALLED_AE_TITLE_NOT_RECOGNISED
    assert _check(policy, "XX", called_ae_title="OTHER") is CALLED_AE_TITLE_NOT_RECOGNISED


def test_limits_per_peer_and_in_all() -> None:
    policy = _policy(max_associations=4, max_associations_per_peer=2)
    assert _check(policy, "A", active=2, active_from_peer=2) is None
    assert _check(policy, "A", active=3, active_from_peer=3) is PEER_LIMIT_EXCEEDED
    assert _check(policy, "A", active=5, active_from_peer=1) is ASSOCIATION_LIMIT_EXCEEDED
    assert _check(_policy(max_associations=4), "A", active=4, active_from_peer=4) is None


def test_rejections_carry_the_ps38_result_source_and_reason() -> None:
    assert CALLING_AE_TITLE_NOT_RECOGNISED.audit_fields() == {
        "reason": "calling_ae_title_not_recognised",
        "result": "rejected-permanent",
        "source": "service-user",
        "diagnostic": 3,
    }
    assert (ADDRESS_NOT_ALLOWED.result, ADDRESS_NOT_ALLOWED.source) == (1, 1)
    assert ADDRESS_NOT_ALLOWED.diagnostic == 3
    assert (CALLED_AE_TITLE_NOT_RECOGNISED.source, CALLED_AE_TITLE_NOT_RECOGNISED.diagnostic) == (
        1,
        7,
    )
    for limit in (PEER_LIMIT_EXCEEDED, ASSOCIATION_LIMIT_EXCEEDED):
        assert limit.audit_fields()["result"] == "rejected-transient"
        assert limit.audit_fields()["source"] == "service-provider-presentation"
        assert limit.diagnostic == 2  # local-limit-exceeded
    assert Rejection.from_primitive(2, 3, 2).reason == "association_limit_exceeded"


def test_parse_address() -> None:
    assert str(parse_address("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"
    assert parse_address("") is None


def test_tls_settings_validate() -> None:
    with pytest.raises(ConfigError, match="require_client_certificate needs ca_certificates"):
        parse_settings(
            {
                "listen": {
                    "tls": {
                        "certificate": "s.pem",
                        "private_key": "s.key",
                        "require_client_certificate": True,
                    }
                }
            }
        )
    destination = {"name": "r", "ae_title": "R", "host": "h", "port": 1}
    with pytest.raises(ConfigError, match="certificate and private_key go together"):
        parse_settings(
            {
                "destinations": [
                    {**destination, "tls": {"ca_certificates": "ca.pem", "certificate": "c"}}
                ]
            }
        )
    with pytest.raises(ConfigError, match=r"destinations\.0\.dicom\.tls\.ca_certificates"):
        parse_settings({"destinations": [{**destination, "tls": {}}]})
    assert ListenConfig().tls is None

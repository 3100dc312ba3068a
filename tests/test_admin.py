"""The HTTP admin endpoint: /metrics after real C-STOREs, /healthz, /readyz, the token."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from anonproxy.admin import AdminServer, Probe
from anonproxy.config import AdminConfig
from anonproxy.errors import ConfigError
from anonproxy.metrics import Metrics
from anonproxy.status import StoreStatus

from conftest import audit_records, identifying_values
from peers import StoreSCP, free_port, storescu, wait_for

pytestmark = pytest.mark.integration

SUCCESS = f"0x{StoreStatus.SUCCESS:04X}"
REFUSED = f"0x{StoreStatus.DEIDENTIFICATION_FAILED:04X}"


def get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path: the status and the body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus text exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def burned_in_copy(source: Path, target: Path) -> Path:
    """*source* declaring Burned In Annotation YES: refused by the default profile."""
    ds = dcmread(source)
    ds.BurnedInAnnotation = "YES"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def test_metrics_move_with_stores_refusals_rejections_and_forwarding(
    make_proxy, storescp: StoreSCP, corpus: list[Path], tmp_path: Path
) -> None:
    research = {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                "port": storescp.port}  # fmt: skip
    proxy = make_proxy(
        [research],
        # worker processes, as in production: counted in the service process all the same
        listen={"deidentify_workers": 1, "allowed_calling_ae_titles": ["MODALITY"]},
    )
    port = proxy.admin.port
    before = samples(get(port, "/metrics")[1])
    assert value(before, "anonproxy_cstore_responses_total", status=SUCCESS) == 0
    assert value(before, "anonproxy_spool_pending", destination="research") == 0

    sent = [p for p in corpus if p.name in {"CT_small.dcm", "MR_small.dcm"}]
    refused = burned_in_copy(sent[0], tmp_path / "refused" / "burned_in.dcm")
    assert storescu(proxy.port, sent).returncode == 0
    assert "Store Failed" not in storescu(proxy.port, [refused], extra=["-v"]).stderr
    assert storescu(proxy.port, sent[:1], calling="INTRUDER").returncode != 0
    assert wait_for(lambda: len(storescp.files()) == 2, timeout=30)

    def forwarded() -> bool:
        scraped = samples(get(port, "/metrics")[1])
        return value(scraped, "anonproxy_forwarded_total", destination="research") == 2

    assert wait_for(forwarded, timeout=30)
    text = get(port, "/metrics")[1]
    scraped = samples(text)
    assert value(scraped, "anonproxy_cstore_responses_total", status=SUCCESS) == 2
    assert value(scraped, "anonproxy_cstore_responses_total", status=REFUSED) == 1
    assert value(scraped, "anonproxy_instances_received_total") == 3
    audit = audit_records(tmp_path / "var" / "audit.jsonl")
    accepted = [r for r in audit if r["event"] == "association.accepted"]
    assert value(scraped, "anonproxy_associations_accepted_total") == len(accepted) >= 2
    assert (
        value(
            scraped,
            "anonproxy_associations_rejected_total",
            reason="calling_ae_title_not_recognised",
        )
        == 1
    )
    refusals = {
        labels: count
        for (name, labels), count in scraped.items()
        if name == "anonproxy_refusals_total"
    }
    assert sum(refusals.values()) == 1
    [(labels, _)] = refusals.items()
    assert dict(labels)["status"] == REFUSED
    assert value(scraped, "anonproxy_receive_seconds_count") == 3  # the refused one too
    assert value(scraped, "anonproxy_receive_seconds_sum") > 0
    assert value(scraped, "anonproxy_deidentify_seconds_count") == 2
    assert value(scraped, "anonproxy_deidentify_seconds_sum") > 0
    assert value(scraped, "anonproxy_store_seconds_count") == 2
    assert value(scraped, "anonproxy_deidentify_seconds_bucket", le="+Inf") == 2
    assert value(scraped, "anonproxy_forward_seconds_count", destination="research") == 2
    assert value(scraped, "anonproxy_forward_retries_total", destination="research") == 0
    assert value(scraped, "anonproxy_spool_pending", destination="research") == 0
    assert value(scraped, "anonproxy_spool_oldest_age_seconds", destination="research") == 0
    assert value(scraped, "anonproxy_quarantine_instances", destination="research") == 0
    assert wait_for(  # pynetdicom's association threads end just after the peer has gone
        lambda: value(samples(get(port, "/metrics")[1]), "anonproxy_associations_active") == 0,
        timeout=10,
    )
    assert value(scraped, "anonproxy_spool_disk_free_bytes") > 0
    phi = set().union(*(identifying_values(p) for p in [*sent, refused]))
    assert not [v for v in phi if v in text]


def test_healthz_and_readyz_follow_the_free_space_threshold(make_proxy, tmp_path: Path) -> None:
    storage = {"path": str(tmp_path / "var"), "min_free_bytes": 1 << 62}  # above any disk
    proxy = make_proxy(storage=storage)
    port = proxy.admin.port
    assert get(port, "/healthz") == (200, '{"status": "alive"}\n')
    status, body = get(port, "/readyz")
    assert status == 503
    assert json.loads(body) == {
        "status": "unready",
        "reasons": ["disk free below storage.min_free_bytes"],
    }
    proxy.spool.min_free_bytes = 0  # the threshold the spool refuses instances at
    assert get(port, "/readyz") == (200, '{"status": "ready"}\n')
    assert get(port, "/nothing")[0] == 404


def test_readyz_reports_a_queue_older_than_max_queue_age(
    make_proxy, corpus: list[Path], tmp_path: Path
) -> None:
    down = {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
            "port": free_port(), "retry_max_delay_s": 0.5}  # fmt: skip
    proxy = make_proxy([down], admin={"port": 0, "max_queue_age_s": 0.5})
    port = proxy.admin.port
    assert get(port, "/readyz")[0] == 200
    assert storescu(proxy.port, corpus[:1]).returncode == 0

    def unready() -> bool:
        status, body = get(port, "/readyz")
        return status == 503 and json.loads(body)["reasons"] == [
            "queue research older than admin.max_queue_age_s"
        ]

    assert wait_for(unready, timeout=20)
    scraped = samples(get(port, "/metrics")[1])
    assert value(scraped, "anonproxy_spool_pending", destination="research") == 1
    assert value(scraped, "anonproxy_spool_oldest_age_seconds", destination="research") > 0.5

    def retried() -> bool:
        scraped = samples(get(port, "/metrics")[1])
        return value(scraped, "anonproxy_forward_retries_total", destination="research") >= 1

    assert wait_for(retried, timeout=20)


def test_metrics_require_the_bearer_token_when_configured(make_proxy, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token = "s3cret-token-for-tests"  # noqa: S105 - a test's token
    token_file.write_text(token + "\n", "utf-8")
    proxy = make_proxy(admin={"port": 0, "token_file": str(token_file)})
    port = proxy.admin.port
    assert get(port, "/metrics")[0] == 401
    assert get(port, "/metrics", token=token[::-1])[0] == 401
    status, text = get(port, "/metrics", token=token)
    assert status == 200
    assert "anonproxy_cstore_responses" in text
    assert get(port, "/healthz")[0] == 200  # probes stay open for orchestrators
    assert get(port, "/readyz")[0] == 200


def test_admin_port_in_use_and_bad_token_file_are_configuration_errors(tmp_path: Path) -> None:
    from anonproxy.spool import Spool

    spool = Spool(tmp_path / "var", ["research"])
    probe = Probe(
        spool, None, max_queue_age_s=60, active_associations=lambda: 0, deferred_waiting=lambda: 0
    )
    first = AdminServer(AdminConfig(port=0), Metrics(), probe)
    first.start()
    try:
        taken = AdminServer(AdminConfig(port=first.port), Metrics(), probe)
        with pytest.raises(
            ConfigError, match=rf"admin: cannot listen on 127\.0\.0\.1:{first.port}"
        ):
            taken.start()
    finally:
        first.stop()
    empty = tmp_path / "empty.token"
    empty.write_text("\n", "utf-8")
    with pytest.raises(ConfigError, match=r"admin\.token_file"):
        AdminServer(AdminConfig(token_file=empty), Metrics(), probe)
    with pytest.raises(ConfigError, match=r"admin\.token_file"):
        AdminServer(AdminConfig(token_file=tmp_path / "missing"), Metrics(), probe)


def dockerfile_healthcheck() -> list[str]:
    """The exec form of the Dockerfile's HEALTHCHECK CMD."""
    text = (Path(__file__).parent.parent / "Dockerfile").read_text("utf-8")
    match = re.search(r"^HEALTHCHECK .*?\\\n\s+CMD (\[.*\])$", text, re.MULTILINE)
    assert match, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    return list(json.loads(match.group(1)))


def test_the_dockerfile_healthcheck_asks_readyz(make_proxy, tmp_path: Path) -> None:
    """The image's HEALTHCHECK command, run here against a proxy (on its free admin port
    instead of 8080): exit 0 when ready, not 0 when not."""
    storage = {"path": str(tmp_path / "var"), "min_free_bytes": 1 << 62}
    proxy = make_proxy(storage=storage)
    argv = dockerfile_healthcheck()
    assert argv[0] == "python"
    argv = [sys.executable, *[a.replace(":8080/", f":{proxy.admin.port}/") for a in argv[1:]]]
    unready = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert unready.returncode != 0
    proxy.spool.min_free_bytes = 0
    ready = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert ready.returncode == 0, ready.stderr


def test_admin_tls_serves_https_only_and_a_silent_client_holds_no_one_back(
    tmp_path: Path,
) -> None:
    import socket
    import ssl
    import time

    from anonproxy.config import TlsServerConfig
    from anonproxy.spool import Spool

    from peers import Pki

    pki = Pki(tmp_path / "pki").create()
    spool = Spool(tmp_path / "var", ["research"])
    probe = Probe(
        spool, None, max_queue_age_s=60, active_associations=lambda: 0, deferred_waiting=lambda: 0
    )
    tls = TlsServerConfig(certificate=pki.server_cert, private_key=pki.server_key)
    server = AdminServer(AdminConfig(port=0, tls=tls), Metrics(), probe)
    server.start()
    try:
        silent = socket.create_connection(("127.0.0.1", server.port))  # never says hello
        started = time.monotonic()
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"https://localhost:{server.port}/readyz"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "ready"}
        assert time.monotonic() - started < 5  # not behind the silent client's handshake
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        silent.close()
    finally:
        server.stop()

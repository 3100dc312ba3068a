"""Several receiving processes (listen.processes, anonproxy.acceptors): acceptor processes on one
port, global association limits, the audit relayed whole, a killed acceptor restarted with
nothing acknowledged lost, a port held by another program, presentation contexts built once.

Real peers: DCMTK storescu into the proxy, DCMTK storescp as the research PACS; pynetdicom as
the association requestor where an association must be held open."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from anonproxy import acceptors, scp
from anonproxy.acceptors import Channel, process_count
from anonproxy.access import SharedAssociations
from anonproxy.config import parse_settings
from anonproxy.errors import ConfigError
from anonproxy.service import acceptor_processes, preflight

from builders import make_series
from conftest import audit_records, serve
from peers import (
    PEER_ENV,
    StoreSCP,
    descendants,
    free_port,
    running,
    storescu,
    tool,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.integration


def _records(audit: Path, event: str) -> list[dict[str, Any]]:
    """The audit records of one *event*, in the order written."""
    return [r for r in audit_records(audit) if r["event"] == event]


def _four_senders_until(
    port: int, tmp_path: Path, each: int, until: tuple[Path, str, int]
) -> tuple[list[list[Path]], list[subprocess.Popen[str]]]:
    """Four storescu sending *each* instances at once, running once the audit trail *until*
    names holds at least that many records of that event; their files and processes."""
    audit, event, count = until
    batches = [_files(tmp_path / f"in{n}", each) for n in range(4)]
    running = [_storescu_background(port, batch) for batch in batches]
    assert wait_for(lambda: len(_records(audit, event)) >= count, timeout=60, interval=0.01)
    return batches, running


def _files(directory: Path, count: int) -> list[Path]:
    """*count* small MR instances of one study, each with a fresh SOP Instance UID."""
    return make_series(directory, count, rows=16)


def _dicom(scp: StoreSCP) -> dict[str, Any]:
    return {"name": "research", "type": "dicom", "host": "127.0.0.1", "port": scp.port,
            "ae_title": "RESEARCH"}  # fmt: skip


def _storescu_background(port: int, paths: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [tool("storescu"), "-aet", "MODALITY", "-aec", "ANONPROXY", "127.0.0.1", str(port),
         *map(str, paths)],
        env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _audit_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the audit file, each a whole JSON object (fails on a broken line)."""
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_shared_associations_count_across_processes_and_forget_a_dead_one() -> None:
    import multiprocessing

    shared = SharedAssociations(multiprocessing.get_context("spawn"), 2, max_associations=2)
    assert shared.enter(0, "10.0.0.1") == (1, 1, True)
    assert shared.enter(1, "10.0.0.1") == (2, 2, True)  # the other process sees the first
    assert shared.enter(1, "10.0.0.2") == (3, 1, True)
    shared.leave(1, "10.0.0.1")
    assert shared.active() == 2
    shared.clear(0)  # process 0 ended
    assert shared.active() == 1
    assert shared.enter(0, "10.0.0.2")[:2] == (2, 2)
    assert process_count(None) == min(len(os.sched_getaffinity(0)), 8)
    assert process_count(3) == 3


def test_an_acceptor_waiting_for_stop_runs_a_signal_another_thread_took() -> None:
    """An acceptor's main thread waits for the supervisor's stop; Python runs the SIGHUP
    handler (reopen the log file) there, so it must wake although the kernel gave the signal
    to another thread."""
    import multiprocessing

    events, supervisor = multiprocessing.Pipe()
    handled = threading.Event()
    before_stop: list[bool] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.set())

    def signal_this_thread_then_stop() -> None:
        time.sleep(0.5)  # the main thread is waiting by now
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        before_stop.append(handled.wait(5))
        supervisor.send(("stop", 2.5))

    try:
        sender = threading.Thread(target=signal_this_thread_then_stop)
        sender.start()
        assert Channel(events, events).wait_for_stop() == 2.5
        sender.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert before_stop == [True]


def test_what_a_c_store_reports_goes_to_the_supervisor_as_one_message() -> None:
    """Inside gathered(), this thread's messages wait and leave together; another thread's
    leave at once; one message alone leaves as itself."""
    import multiprocessing

    events, supervisor = multiprocessing.Pipe()
    channel = Channel(events, events)
    with channel.gathered():
        channel.send(("audit", "instance.received", {}))
        channel.send(("received", 0.25))
        other = threading.Thread(target=channel.send, args=(("answered", 0),))
        other.start()
        other.join()
        assert supervisor.recv() == ("answered", 0)
        assert not supervisor.poll(0.1)
    assert supervisor.recv() == (
        "gathered",
        [("audit", "instance.received", {}), ("received", 0.25)],
    )
    with channel.gathered():
        channel.send(("committed", "research", "1.2.3_4.dcm"))
    assert supervisor.recv() == ("committed", "research", "1.2.3_4.dcm")
    with channel.gathered():
        pass
    assert not supervisor.poll(0.1)


def test_a_bad_message_among_gathered_ones_costs_only_itself(tmp_path: Path) -> None:
    import multiprocessing

    from anonproxy.audit import AuditLog
    from anonproxy.metrics import Metrics
    from anonproxy.spool import Spool, SpoolCounters

    audit_path = tmp_path / "audit.jsonl"
    supervisor = acceptors.AcceptorSupervisor(
        {},
        b"",
        1,
        host="127.0.0.1",
        port=0,
        max_associations=1,
        target=lambda spec: None,
        audit=AuditLog(audit_path),
        metrics=Metrics(),
        spool=Spool(tmp_path / "var", ["research"], fsync=False),
        counters=SpoolCounters(),
        map_recorder=None,
        ended=lambda run, code: None,
    )
    events, acceptor = multiprocessing.Pipe()
    reader = threading.Thread(target=supervisor._read_events, args=(supervisor.slots[0], events))
    reader.start()
    bad = [("audit", "test.one", {}), ("no such kind",), ("audit", "test.two", {})]
    with capture_logs() as logs:
        acceptor.send(("gathered", bad))
        acceptor.close()
        reader.join(5)
    assert [r["event"] for r in audit_records(audit_path)] == ["test.one", "test.two"]
    assert [e["event"] for e in logs] == ["acceptor.message_failed"]


def test_a_transparent_route_makes_auto_processes_one_and_refuses_a_configured_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transparent route relays the answer to the process that forwards: left to one per
    core, the service receives in one process and logs why; a number above 1 is refused."""
    monkeypatch.setattr(acceptors, "available_cores", lambda: 4)
    routes = [{"destinations": ["pacs"], "transparent": True}]
    pacs = [{"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}]
    auto = parse_settings({"listen": {"processes": None}, "destinations": pacs, "routes": routes})
    with capture_logs() as logs:
        assert acceptor_processes(auto) == 1
    assert [e for e in logs if e["event"] == "listen.processes_single"] == [
        {
            "event": "listen.processes_single",
            "processes": 1,
            "reason": "transparent route",
            "log_level": "info",
        }
    ]
    without = auto.model_copy(update={"routes": []})
    assert acceptor_processes(without) == 4
    pinned = parse_settings({"listen": {"processes": 1}, "destinations": pacs, "routes": routes})
    assert acceptor_processes(pinned) == 1
    with pytest.raises(ConfigError, match=r"routes\.0\.transparent.*listen\.processes: 1"):
        parse_settings({"listen": {"processes": 2}, "destinations": pacs, "routes": routes})


def test_presentation_contexts_are_built_once_and_shared(make_proxy) -> None:
    """pynetdicom deep-copies the server's contexts for every association; the shared ones come
    back as themselves, and negotiation still accepts a supported context and refuses others."""
    proxy = make_proxy(listen={"processes": 1})  # the SCP object of the one process
    contexts = proxy.scp.contexts
    assert len(contexts) > 150
    copied = copy.deepcopy(contexts)
    assert all(a is b for a, b in zip(copied, contexts, strict=True))
    assert proxy.scp.server.contexts is contexts
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.3.4.5.6.7")  # no such SOP Class: refused
    assoc = ae.associate("127.0.0.1", proxy.port, ae_title="ANONPROXY")
    try:
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [Verification]
        assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == ["1.2.3.4.5.6.7"]
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_several_acceptors_receive_in_parallel_and_audit_every_record_whole(
    make_proxy, storescp: StoreSCP, tmp_path: Path
) -> None:
    proxy = make_proxy([_dicom(storescp)], listen={"processes": 2})
    assert len(proxy.acceptors.pids()) == 2
    senders = 4
    batches = [_files(tmp_path / f"in{n}", 5) for n in range(senders)]
    running = [_storescu_background(proxy.port, batch) for batch in batches]
    for process in running:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert "Store Failed" not in stderr
    expected = senders * 5
    assert wait_for(lambda: len(storescp.files()) == expected, timeout=60)
    audit = tmp_path / "var" / "audit.jsonl"
    assert wait_for(lambda: len(_records(audit, "instance.forwarded")) == expected)
    records = _audit_lines(audit)  # every line whole
    events = Counter(r["event"] for r in records)
    assert events["instance.received"] == events["instance.spooled"] == expected
    accepted = {
        (r["acceptor"], r["assoc_id"]) for r in records if r["event"] == "association.accepted"
    }
    closed = [
        (r["acceptor"], r["assoc_id"])
        for r in records
        if r["event"] in {"association.released", "association.closed"}
    ]
    assert len(accepted) == senders
    assert {acceptor for acceptor, _ in accepted} == {0, 1}  # both took some
    assert sorted(closed) == sorted(accepted)  # one pair per association
    forwarded = Counter(
        r["deid_sop_instance_uid"] for r in records if r["event"] == "instance.forwarded"
    )
    assert len(forwarded) == expected
    assert set(forwarded.values()) == {1}
    assert {r["acceptor"] for r in records if r["event"] == "instance.spooled"} <= {0, 1}
    assert not list((tmp_path / "var" / "spool" / "research").glob("*.dcm"))


def test_acceptors_with_their_own_worker_processes_receive_and_deliver(
    make_proxy, storescp: StoreSCP, tmp_path: Path
) -> None:
    """listen.deidentify_workers with several processes: each acceptor starts its worker
    processes (as a daemonic process it could not: under after_receipt, which starts them with
    the acceptor, the acceptor ended at start)."""
    listen = {"processes": 2, "deidentify_workers": 1, "acknowledge": "after_receipt"}
    proxy = make_proxy([_dicom(storescp)], listen=listen)
    assert len(proxy.acceptors.pids()) == 2
    sent = storescu(proxy.port, _files(tmp_path / "in", 4))
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(storescp.files()) == 4, timeout=60)


def test_sighup_while_an_acceptor_restarts_does_not_end_it(make_proxy, tmp_path: Path) -> None:
    """logrotate's SIGHUP reaches the acceptors that reported ready: one still starting would
    end on it (SIGHUP's default action) and be restarted again."""
    proxy = make_proxy(listen={"processes": 2})
    slot = proxy.acceptors.slots[0]
    victim = slot.process.pid
    os.kill(victim, signal.SIGKILL)

    def restarted_and_ready() -> bool:
        proxy.reopen_logs()  # again and again while it restarts
        return bool(slot.process.pid != victim and slot.ready.is_set())

    assert wait_for(restarted_and_ready, timeout=60, interval=0.02)
    proxy.reopen_logs()
    time.sleep(1.0)  # a restart a SIGHUP caused would be audited by now
    audit = tmp_path / "var" / "audit.jsonl"
    assert [r["exit_code"] for r in _records(audit, "acceptor.restarted")] == [-signal.SIGKILL]
    assert slot.process.is_alive()


def test_a_killed_acceptor_is_restarted_and_nothing_acknowledged_is_lost(
    make_proxy, storescp: StoreSCP, tmp_path: Path
) -> None:
    proxy = make_proxy([_dicom(storescp)], listen={"processes": 2})
    audit = tmp_path / "var" / "audit.jsonl"
    batches, running = _four_senders_until(proxy.port, tmp_path, 12, (audit, "instance.spooled", 3))
    victim = proxy.acceptors.pids()[0]
    os.kill(victim, signal.SIGKILL)
    for process in running:
        process.communicate(timeout=120)
    assert wait_for(lambda: _records(audit, "acceptor.restarted"), timeout=30)
    restarted = _records(audit, "acceptor.restarted")[0]
    assert restarted["exit_code"] == -signal.SIGKILL
    assert restarted["pid"] == victim
    assert wait_for(
        lambda: len(proxy.acceptors.pids()) == 2 and victim not in proxy.acceptors.pids(),
        timeout=60,
    )
    # what the senders did not get acknowledged, they send again: all of it now
    for batch in batches:
        done = storescu(proxy.port, batch)
        assert done.returncode == 0, done.stderr
        assert "Store Failed" not in done.stderr
    acknowledged = {r["deid_sop_instance_uid"] for r in _records(audit, "instance.spooled")}
    assert len(acknowledged) == 48
    assert wait_for(
        lambda: (
            {r["deid_sop_instance_uid"] for r in _records(audit, "instance.forwarded")}
            == acknowledged
        ),
        timeout=60,
    )
    records = _audit_lines(audit)
    # a commit whose announcement died with the acceptor is found in the queue folder
    committed = Counter(
        r["deid_sop_instance_uid"]
        for r in records
        if r["event"] in ("instance.spooled", "instance.found")
    )
    forwarded = Counter(
        r["deid_sop_instance_uid"] for r in records if r["event"] == "instance.forwarded"
    )
    assert all(forwarded[uid] <= committed[uid] for uid in forwarded)  # never sent twice
    assert len(storescp.files()) == 48
    assert wait_for(lambda: not list((tmp_path / "var" / "spool" / "research").glob("*.dcm")))


def test_acceptors_orphaned_by_a_sigkilled_service_end_within_their_grace_period(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    """The service SIGKILLed while a sender is sending: its acceptor processes (and theirs)
    end within the orphans' grace period, though the sender goes on sending; the next start
    delivers what they acknowledged. (An orphan logged a formatted traceback for each message
    its dead supervisor could not take.)"""
    port = free_port()
    config = tmp_path / "anonproxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"port": port, "processes": 2},
                "destinations": [_dicom(storescp)],
                "storage": {"path": str(tmp_path / "var"), "min_free_bytes": 0},
                "audit": {"path": str(tmp_path / "var" / "audit.jsonl")},
            }
        ),
        "utf-8",
    )
    audit = tmp_path / "var" / "audit.jsonl"
    service = serve(config, tmp_path)
    sender = None
    try:
        wait_port(port, timeout=60)
        sender = _storescu_background(port, _files(tmp_path / "series", 600))
        assert wait_for(lambda: len(_records(audit, "instance.spooled")) >= 30, timeout=60)
        children = descendants(service.pid)
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        assert wait_for(lambda: not any(map(running, children)), timeout=20)
    finally:
        if sender is not None:
            sender.kill()
            sender.wait()
        service.kill()
        service.wait()
    acknowledged = {r["deid_sop_instance_uid"] for r in _records(audit, "instance.spooled")}
    service = serve(config, tmp_path)  # the spool is forwarded on start-up
    try:
        assert wait_for(
            lambda: acknowledged <= {p.stem.split(".", 1)[1] for p in storescp.files()},
            timeout=60,
        )
    finally:
        service.terminate()
        service.wait(60)


def test_the_per_peer_limit_holds_across_acceptors(make_proxy, tmp_path: Path) -> None:
    proxy = make_proxy(listen={"processes": 2, "max_associations_per_peer": 1})
    audit = tmp_path / "var" / "audit.jsonl"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", proxy.port, ae_title="ANONPROXY")
    assert held.is_established
    try:
        assert wait_for(lambda: _records(audit, "association.accepted"))
        holder = _records(audit, "association.accepted")[0]["acceptor"]
        rejected_by: set[int] = set()
        for attempt in range(40):  # the kernel picks the acceptor: until both have refused
            assoc = ae.associate("127.0.0.1", proxy.port, ae_title="ANONPROXY")
            assert assoc.is_rejected
            answer = assoc.acceptor.primitive
            assert (answer.result, answer.result_source, answer.diagnostic) == (2, 3, 2)
            assert wait_for(lambda n=attempt + 1: len(_records(audit, "association.rejected")) == n)
            rejected_by = {r["acceptor"] for r in _records(audit, "association.rejected")}
            if rejected_by - {holder}:
                break
        assert rejected_by - {holder}, "every request reached the acceptor holding the first"
        rejections = _records(audit, "association.rejected")
        assert {r["reason"] for r in rejections} == {"peer_association_limit_exceeded"}
        assert {(r["result"], r["source"], r["diagnostic"]) for r in rejections} == {
            ("rejected-transient", "service-provider-presentation", 2)
        }
    finally:
        held.release()
    assert wait_for(lambda: proxy.acceptors.active_associations() == 0)
    again = ae.associate("127.0.0.1", proxy.port, ae_title="ANONPROXY")
    assert again.is_established
    again.release()


def test_the_least_busy_acceptor_takes_each_new_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servers on one shared listening socket (as two acceptor processes): the one that
    runs two associations leaves the next connections to the idle one until they run as
    many. Deferrals stretched to tenths of a second so that the order cannot be a race."""
    monkeypatch.setattr(scp, "ACCEPT_DEFERRAL_S", 0.2)
    monkeypatch.setattr(scp, "MAX_ACCEPT_DEFERRAL_S", 1.0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    servers = []
    for _ in range(2):
        ae = AE(ae_title="ANONPROXY")
        ae.add_supported_context(Verification)
        servers.append(
            ae.make_server(("127.0.0.1", 0), server_class=scp.shared_listener_server(listener))
        )
    busy, idle = servers
    requestor = AE(ae_title="MODALITY")
    requestor.add_requested_context(Verification)
    held = []
    try:
        threading.Thread(target=busy.serve_forever, daemon=True).start()
        held += [requestor.associate("127.0.0.1", port, ae_title="ANONPROXY") for _ in range(2)]
        assert all(assoc.is_established for assoc in held)
        threading.Thread(target=idle.serve_forever, daemon=True).start()
        for expected in (1, 2):
            held.append(requestor.associate("127.0.0.1", port, ae_title="ANONPROXY"))
            assert held[-1].is_established
            assert wait_for(lambda n=expected: len(idle.active_associations) == n, timeout=5)
        assert len(busy.active_associations) == 2
    finally:
        for assoc in held:
            assoc.release()
        for server in servers:
            server.shutdown()
        listener.close()


def test_a_stopping_service_refuses_new_connections_and_lets_running_ones_finish(
    make_proxy,
) -> None:
    proxy = make_proxy(listen={"processes": 2})
    requestor = AE(ae_title="MODALITY")
    requestor.add_requested_context(Verification)
    running = requestor.associate("127.0.0.1", proxy.port, ae_title="ANONPROXY")
    assert running.is_established
    stopping = threading.Thread(target=proxy.stop, kwargs={"timeout": 10})
    stopping.start()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):  # reset: caught mid-shutdown
            return True
        return False

    try:
        assert wait_for(refused, timeout=5)
        assert running.send_c_echo().Status == 0x0000  # still served in its grace period
    finally:
        running.release()
    stopping.join(15)
    assert not stopping.is_alive()


def test_a_port_another_program_holds_stops_the_start(make_proxy, tmp_path: Path) -> None:
    with socket.socket() as foreign:  # no SO_REUSEPORT: our sockets cannot share it
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        settings = parse_settings(
            {"listen": {"host": "127.0.0.1", "port": port, "processes": 2},
             "storage": {"path": str(tmp_path / "pre"), "min_free_bytes": 0}}
        )  # fmt: skip
        with pytest.raises(ConfigError, match=f"listen: cannot listen on 127.0.0.1:{port}"):
            preflight(settings)
        with pytest.raises(ConfigError, match=f"listen: cannot listen on 127.0.0.1:{port}"):
            make_proxy(listen={"host": "127.0.0.1", "port": port, "processes": 2})


def test_after_receipt_a_killed_acceptors_deferred_data_sets_are_recovered(
    make_proxy, storescp: StoreSCP, tmp_path: Path
) -> None:
    """Acknowledged on receipt, not yet de-identified when its acceptor is killed: the service
    de-identifies and delivers them (its deferred data sets are named after its run)."""
    proxy = make_proxy([_dicom(storescp)], listen={"processes": 2, "acknowledge": "after_receipt"})
    audit = tmp_path / "var" / "audit.jsonl"
    batches, running = _four_senders_until(
        proxy.port, tmp_path, 10, (audit, "instance.received", 4)
    )
    received = _records(audit, "instance.received")
    victim_index = received[0]["acceptor"]
    victim = proxy.acceptors.slots[victim_index]
    victim_run = victim.run  # names the data sets it keeps (its successor gets another)
    os.kill(victim.process.pid, signal.SIGKILL)
    for process in running:
        process.communicate(timeout=120)
    assert wait_for(lambda: _records(audit, "acceptor.restarted"), timeout=30)
    for batch in batches:  # what was not acknowledged is sent again
        done = storescu(proxy.port, batch)
        assert done.returncode == 0, done.stderr
        assert "Store Failed" not in done.stderr
    assert wait_for(lambda: len(storescp.files()) == 40, timeout=90)
    assert wait_for(lambda: not list((tmp_path / "var" / "spool" / "deferred").glob("*.dcm")))
    records = _audit_lines(audit)
    kept_by_victim = {
        r["deferred_as"]
        for r in records
        if r["event"] == "instance.received" and r["deferred_as"].startswith(f"{victim_run}-")
    }
    assert kept_by_victim
    committed = {r.get("deferred_as") for r in records if r["event"] == "instance.spooled"}
    assert kept_by_victim <= committed
    assert not [r for r in records if r["event"] == "instance.failed"]

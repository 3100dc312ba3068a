"""Acknowledged on receipt, de-identified behind: arrival order per association, recovery after
a crash at every step of the commit, exactly once, quarantine of refused inputs, the bound."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from anonproxy.audit import AuditLog
from anonproxy.config import ProfileConfig
from anonproxy.deferred import DeferredInstance, DeferredProcessor, IdleCores
from anonproxy.deidentifiers import build_deidentifier, deidentifier_factory
from anonproxy.pipeline import InstancePipeline
from anonproxy.spool import Spool, deferred_status, refused_inputs, split_queue_file
from anonproxy.status import StoreStatus
from anonproxy.workers import DeidentifierPool

from builders import make_series
from conftest import TEST_SECRET, audit_records
from peers import wait_for


class Crash(BaseException):
    """A SIGKILL at this point: nothing after it runs, no clean-up."""


class Node:
    """A spool, a pipeline and a deferred processor on one storage folder (one "run")."""

    def __init__(self, root: Path, **spool_options: int) -> None:
        self.root = root
        self.spool = Spool(root, ["a"], **spool_options)
        profile = ProfileConfig()
        runner = DeidentifierPool(
            build_deidentifier(profile, TEST_SECRET.value),
            deidentifier_factory(profile, TEST_SECRET.value),
            workers=0,
        )
        self.audit = AuditLog(root / "audit.jsonl")
        self.pipeline = InstancePipeline(
            runner, self.spool, ["a"], self.audit, acknowledge="after_receipt"
        )
        self.processor = DeferredProcessor(self.pipeline)

    def receive(self, source: Path, assoc_id: int, calling: str = "MODALITY") -> int:
        """What the SCP does with a received data set under after_receipt; the status."""
        received = self.spool.incoming_dir / f"in-{source.name}-{assoc_id}"
        shutil.copyfile(source, received)
        outcome = self.processor.accept(
            received, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", calling_ae_title=calling,
            assoc_id=assoc_id,
        )  # fmt: skip
        return outcome.status

    def settled(self, count: int) -> bool:
        """True once the deferred folder is empty and *count* instances were spooled."""
        return not self.spool.deferred() and len(self.events("instance.spooled")) == count

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in audit_records(self.root / "audit.jsonl") if e["event"] == name]

    def queued(self) -> list[str]:
        return sorted(
            split_queue_file(p.name)[0] for p in (self.root / "spool" / "a").glob("*.dcm")
        )

    def close(self) -> None:
        self.processor.stop(5)
        self.audit.close()


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return make_series(tmp_path / "series", 6)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.close()


def _node(nodes: list[Node], root: Path, **options: int) -> Node:
    node = Node(root, **options)
    nodes.append(node)
    return node


def _stopped(nodes: list[Node], root: Path) -> Node:
    """A node whose processor takes nothing: what it accepts stays on disk, as after a crash
    that came before any de-identification."""
    node = _node(nodes, root)
    node.processor.stop(0)
    return node


def test_accepted_data_sets_are_owner_only_and_durable_until_processed(
    tmp_path: Path, series: list[Path], nodes: list[Node]
) -> None:
    node = _stopped(nodes, tmp_path / "var")
    assert node.receive(series[0], 1) == StoreStatus.SUCCESS
    [kept] = node.spool.deferred()
    assert kept.parent.stat().st_mode & 0o777 == 0o700  # PHI
    assert "." not in kept.stem  # a random name, never a UID
    assert str(dcmread(series[0]).SOPInstanceUID) not in kept.name
    assert list(node.spool.incoming_dir.iterdir()) == []
    assert wait_for(lambda: len(node.events("instance.received")) == 1, timeout=5)  # behind
    [received] = node.events("instance.received")
    assert received["deferred_as"] == kept.stem
    assert deferred_status(tmp_path / "var")["waiting"] == 1


def test_recovery_processes_each_left_data_set_once_in_arrival_order_per_association(
    tmp_path: Path, series: list[Path], nodes: list[Node]
) -> None:
    root = tmp_path / "var"
    first = _stopped(nodes, root)
    order = [(series[i], assoc) for i, assoc in enumerate([7, 9, 7, 9, 7, 9])]
    for source, assoc in order:
        assert first.receive(source, assoc, calling=f"AE{assoc}") == StoreStatus.SUCCESS
    left = first.spool.deferred()
    assert len(left) == 6
    lanes = [DeferredInstance.from_path(path) for path in left]
    assert [i.calling_ae_title for i in lanes] == [f"AE{a}" for _, a in order]  # name order
    second = _node(nodes, root)  # the next start
    second.spool.recover()
    assert second.processor.recover() == 6
    assert wait_for(lambda: second.settled(6), timeout=30)
    spooled = [str(e["deferred_as"]) for e in second.events("instance.spooled")]
    for assoc in (7, 9):
        lane = [p.stem for p, (_, a) in zip(left, order, strict=True) if a == assoc]
        assert [name for name in spooled if name in lane] == lane  # arrival order kept
    expected = sorted(_deidentified_uid(source) for source in series)
    assert second.queued() == expected
    assert second.processor.recover() == 0  # nothing left to process twice


def _deidentified_uid(path: Path) -> str:
    from anonproxy.deid import Deidentifier, Profile

    engine = Deidentifier(Profile.from_options([]), secret=TEST_SECRET.value)
    return engine.deidentify(dcmread(path)).sop_instance_uid


@pytest.mark.parametrize("crash_at", ["before_removal", "after_removal"])
def test_a_crash_inside_the_commit_delivers_exactly_once(
    tmp_path: Path,
    series: list[Path],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    crash_at: str,
) -> None:
    """A SIGKILL before the original's removal (the commit point) or after it, before the
    de-identified copy is made visible to the forward workers."""
    root = tmp_path / "var"
    first = _node(nodes, root)
    uid = _deidentified_uid(series[0])

    def crash(*args: object) -> None:
        raise Crash

    if crash_at == "before_removal":
        monkeypatch.setattr(Spool, "consume", crash)
    else:
        monkeypatch.setattr("anonproxy.spool.os.replace", crash)
    first.processor._engine.submit = _inline_submit  # type: ignore[method-assign]
    with pytest.raises(Crash):
        first.processor._finish(*_accept_one(first, series[0]))
    monkeypatch.undo()
    [hidden] = [p.name for p in (root / "spool" / "a").iterdir()]
    assert hidden.startswith(".")
    assert f".{uid}_" in hidden
    assert hidden.endswith(".pending")
    assert len(first.spool.deferred()) == (1 if crash_at == "before_removal" else 0)
    assert first.queued() == []  # no forward worker could see it

    second = _node(nodes, root)  # the next start
    visible_with_original: list[bool] = []
    push = second.spool.queues["a"].push

    def checked_push(name: str) -> None:
        visible_with_original.append(bool(second.spool.deferred()))
        push(name)

    second.spool.queues["a"].push = checked_push  # type: ignore[method-assign]
    second.spool.recover()
    assert second.processor.recover() == (1 if crash_at == "before_removal" else 0)
    assert wait_for(lambda: not second.spool.deferred(), timeout=30)
    assert wait_for(lambda: second.queued() == [uid], timeout=10)
    [visible] = [p.name for p in (root / "spool" / "a").iterdir()]
    assert split_queue_file(visible)[0] == uid
    item = second.spool.queues["a"].take(timeout=1)
    assert item is not None
    second.spool.release(second.spool.queues["a"], item)  # delivered
    assert second.spool.queues["a"].take(timeout=0.2) is None  # and never offered again
    assert not any(visible_with_original)


def _inline_submit(function, *args):  # the executor's submit, inline
    from concurrent.futures import Future

    future: Future[object] = Future()
    future.set_result(function(*args))
    return future


def _accept_one(node: Node, source: Path) -> tuple[DeferredInstance, object]:
    """Accept one data set without a lane thread; its instance and engine future."""
    node.processor._queue = lambda instance: None  # type: ignore[method-assign]
    assert node.receive(source, 1) == StoreStatus.SUCCESS
    [path] = node.spool.deferred()
    instance = DeferredInstance.from_path(path)
    return instance, node.processor._engine.submit(node.processor._prepare, instance)


def test_a_refused_data_set_is_quarantined_with_its_reason_and_never_spooled(
    tmp_path: Path, nodes: list[Node]
) -> None:
    [source] = make_series(tmp_path / "burned", 1)
    ds = dcmread(source)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(source)
    root = tmp_path / "var"
    node = _node(nodes, root)
    assert node.receive(source, 1) == StoreStatus.SUCCESS  # the sender hears Success
    assert wait_for(lambda: bool(node.events("instance.failed")), timeout=30)
    [failed] = node.events("instance.failed")
    assert failed["stage"] == "policy"
    assert failed["status"] == "0xC001"
    assert node.spool.deferred() == []
    assert node.queued() == []
    [entry] = refused_inputs(root)
    assert entry["name"] == failed["kept_as"] == f"{failed['deferred_as']}.dcm"
    assert entry["stage"] == "policy"
    kept = root / "quarantine" / "rejected" / str(entry["name"])
    assert kept.stat().st_mode & 0o077 == 0
    assert dcmread(kept).PatientName == ds.PatientName  # the original, for the operator
    assert "Doe" not in kept.with_suffix(".json").read_text("utf-8")
    assert deferred_status(root)["refused"] == 1


def test_over_the_incoming_bound_the_sender_is_told_to_retry(
    tmp_path: Path, series: list[Path], nodes: list[Node]
) -> None:
    # the first two exactly: random SOP Instance UIDs make the files' sizes differ by a few
    # bytes, and a quota of twice the first one let a shorter second one leave room
    bound = sum(path.stat().st_size for path in series[:2])
    node = _node(nodes, tmp_path / "var", incoming_max_bytes=bound)
    node.processor.stop(0)  # nothing is processed: the backlog stays
    statuses = [node.receive(source, 1) for source in series[:3]]
    assert statuses == [StoreStatus.SUCCESS, StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES]
    [failed] = node.events("instance.failed")
    assert failed["stage"] == "incoming"
    assert failed["reason"] == "incoming spool quota reached"
    assert len(node.spool.deferred()) == 2


def test_a_full_spool_holds_the_lane_and_its_order_until_there_is_room(
    tmp_path: Path, series: list[Path], nodes: list[Node]
) -> None:
    size = series[0].stat().st_size
    root = tmp_path / "var"
    node = _node(nodes, root, max_bytes=2 * size)
    for source in series[:4]:
        assert node.receive(source, 1) == StoreStatus.SUCCESS
    assert wait_for(lambda: len(node.events("instance.deidentify_retry")) >= 1, timeout=30)
    queued = len(node.queued())
    assert 2 <= queued < 4  # the spool quota: the rest waits, acknowledged
    assert len(node.spool.deferred()) == 4 - queued
    queue = node.spool.queues["a"]
    deadline = time.monotonic() + 60
    while len(node.events("instance.spooled")) < 4 and time.monotonic() < deadline:
        item = queue.take(timeout=0.2)  # a forward worker delivers: room again
        if item is not None:
            node.spool.release(queue, item)
    spooled = [str(e["deferred_as"]) for e in node.events("instance.spooled")]
    assert spooled == sorted(spooled)  # one association: in arrival order
    assert len(spooled) == 4
    assert node.spool.deferred() == []


def test_a_burst_is_acknowledged_before_any_of_it_is_deidentified(
    tmp_path: Path, series: list[Path], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anonproxy.deferred._RECEIVING_S", 1.0)  # a slow machine's gaps
    node = _node(nodes, tmp_path / "var")
    for source in series:
        assert node.receive(source, 1) == StoreStatus.SUCCESS
    assert wait_for(lambda: node.settled(len(series)), timeout=30)
    last_received = max(str(e["time"]) for e in node.events("instance.received"))
    first_spooled = min(str(e["time"]) for e in node.events("instance.spooled"))
    assert first_spooled > last_received  # the sender first, de-identification behind


def _machine(monkeypatch: pytest.MonkeyPatch, idle_cores: float) -> None:
    """The cores the machine leaves idle, as the deferred processor measures them."""
    monkeypatch.setattr(
        "anonproxy.deferred.IdleCores.measure", lambda self: (idle_cores, time.monotonic())
    )


def test_the_engine_runs_ahead_on_idle_cores_while_the_commits_wait_for_the_end_of_the_burst(
    tmp_path: Path, series: list[Path], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anonproxy.deferred._RECEIVING_S", 5.0)  # "sending" for 5 s more
    _machine(monkeypatch, idle_cores=8.0)
    node = _node(nodes, tmp_path / "var")
    for source in series:
        assert node.receive(source, 1) == StoreStatus.SUCCESS
    staged = node.spool.tmp_dir
    assert wait_for(lambda: len(list(staged.iterdir())) == len(series), timeout=4.5)
    assert node.events("instance.spooled") == []  # nothing committed, nothing forwarded yet
    assert len(node.spool.deferred()) == len(series)
    assert wait_for(lambda: node.settled(len(series)), timeout=30)
    spooled = [str(e["deferred_as"]) for e in node.events("instance.spooled")]
    assert spooled == sorted(spooled)  # committed in arrival order
    assert list(staged.iterdir()) == []


def test_on_a_machine_without_an_idle_core_the_engine_waits_for_the_end_of_the_burst(
    tmp_path: Path, series: list[Path], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anonproxy.deferred._RECEIVING_S", 1.5)
    _machine(monkeypatch, idle_cores=0.5)  # receiving takes the cores
    node = _node(nodes, tmp_path / "var")
    for source in series:
        assert node.receive(source, 1) == StoreStatus.SUCCESS
    time.sleep(1.0)  # still "sending"
    assert list(node.spool.tmp_dir.iterdir()) == []  # nothing went into the engine
    assert wait_for(lambda: node.settled(len(series)), timeout=30)  # all of it once it ended


def test_idle_cores_are_measured_from_the_cpu_times_of_the_machine(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")

    def times(idle_s: float, iowait_s: float) -> None:
        stat.write_text(f"cpu  900 0 300 {int(idle_s * ticks)} {int(iowait_s * ticks)} 0 0 0\n")

    times(100.0, 10.0)
    cores = IdleCores(stat)
    times(100.3, 10.1)  # 0.4 s idle or waiting for I/O ...
    time.sleep(0.25)  # ... in about 0.25 s: 1.6 cores
    idle, measured_at = cores.measure()
    assert 0.5 < idle <= 1.6
    assert measured_at <= time.monotonic()
    times(200.0, 10.1)
    assert cores.measure() == (idle, measured_at)  # a window shorter than _IDLE_WINDOW_S: kept
    assert IdleCores(tmp_path / "absent").measure()[0] == os.cpu_count()  # no figure: all idle


def test_a_stop_during_a_burst_leaves_what_was_not_committed_for_the_next_start(
    tmp_path: Path, series: list[Path], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anonproxy.deferred._RECEIVING_S", 60.0)  # always "sending"
    monkeypatch.setattr("anonproxy.deferred._MAX_HOLD_S", 60.0)
    _machine(monkeypatch, idle_cores=8.0)
    root = tmp_path / "var"
    node = _node(nodes, root)
    for source in series:
        assert node.receive(source, 1) == StoreStatus.SUCCESS
    assert wait_for(lambda: len(list(node.spool.tmp_dir.iterdir())) >= 1, timeout=30)
    node.close()  # what the engine finished is committed, what it had not started is not
    assert node.events("instance.failed") == []  # stopping quarantines nothing
    committed = len(node.events("instance.spooled"))
    left = len(node.spool.deferred())
    assert committed + left == len(series)
    monkeypatch.setattr("anonproxy.deferred._RECEIVING_S", 0.0)
    again = _node(nodes, root)
    assert again.processor.recover() == left
    assert wait_for(lambda: not again.spool.deferred(), timeout=30)
    assert wait_for(lambda: len(again.queued()) == len(series), timeout=30)
    assert len(set(again.queued())) == len(series)  # each once


def test_a_sender_that_never_pauses_is_followed_at_most_max_hold_behind(
    tmp_path: Path, series: list[Path], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("anonproxy.deferred._RECEIVING_S", 60.0)  # always "sending"
    monkeypatch.setattr("anonproxy.deferred._MAX_HOLD_S", 0.2)
    node = _node(nodes, tmp_path / "var")
    for source in series:
        assert node.receive(source, 1) == StoreStatus.SUCCESS
    assert wait_for(lambda: node.settled(len(series)), timeout=30)

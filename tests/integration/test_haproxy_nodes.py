"""Several nodes behind HAProxy sharing PostgreSQL (issue 15, item 3), all real and on
loopback: Debian's HAProxy with the shipped deploy/haproxy/haproxy.cfg (its addresses made
loopback ports), two ``anonproxy serve`` nodes with their own storage and the same secret,
map key and PostgreSQL database (a throw-away cluster), storescp as the research PACS.

One patient's study sent over 4 parallel storescu associations through HAProxy reaches both
nodes and arrives once per instance with one Study and Series Instance UID and one patient
pseudonym; the shared map holds one entry and the lookup table one pseudonym. A node
SIGKILLed mid-study: what it acknowledged arrives after it restarts, what it did not is sent
again and HAProxy gives it to the other node."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from anonproxy.state import StateStore

from builders import make_series
from conftest import audit_records, serve
from peers import PEER_ENV, StoreSCP, free_port, tool, wait_for, wait_port
from pgcluster import PostgresCluster, new_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def _haproxy_config(port: int, nodes: list[tuple[int, int]], sock: Path) -> str:
    """The shipped configuration with loopback addresses: the frontend on *port*, one server
    per node (DICOM port, admin port), checks every 0.5 s, a stats socket for the test."""
    text = SHIPPED.read_text("utf-8")
    text = text.replace("    bind :11112", f"    bind 127.0.0.1:{port}")
    text = re.sub(r"^    server .*\n", "", text, flags=re.MULTILINE)
    text = text.replace("inter 2s", "inter 500ms")
    text = text.replace("maxconn 4096", f"maxconn 4096\n    stats socket {sock} mode 600")
    servers = "".join(
        f"    server node{i + 1} 127.0.0.1:{dicom} check port {admin}\n"
        for i, (dicom, admin) in enumerate(nodes)
    )
    return text + servers


def _servers_up(sock: Path) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [
        line.split(",") for line in data.decode().splitlines() if line.startswith("anonproxy,node")
    ]
    return sum(1 for row in rows if row[17] == "UP")


class Nodes:
    """Two anonproxy nodes (subprocesses) on one PostgreSQL database, behind HAProxy."""

    def __init__(self, tmp_path: Path, cluster: PostgresCluster, research: StoreSCP) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            pytest.skip("HAProxy is not installed (apt-get install haproxy)")
        self.tmp = tmp_path
        self.state = new_database(cluster, tmp_path)
        self.ports = [(free_port(), free_port()) for _ in range(2)]  # (DICOM, admin)
        self.configs: list[Path] = []
        for n, (dicom, admin) in enumerate(self.ports):
            config = tmp_path / f"node{n}.yaml"
            config.write_text(
                json.dumps(
                    {
                        "listen": {"port": dicom, "deidentify_workers": 1},
                        "destinations": [
                            {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1",
                             "port": research.port, "retry_max_delay_s": 2}
                        ],
                        "profile": {"patient_id": {"method": "lookup", "unknown_patient": "hash"}},
                        "state": {"backend": "postgresql", "dsn_file": str(self.state.dsn_file)},
                        "storage": {"path": str(tmp_path / f"var{n}"), "min_free_bytes": 0},
                        "audit": {"path": str(tmp_path / f"var{n}" / "audit.jsonl")},
                        "admin": {"port": admin},
                    }
                ),
                "utf-8",
            )  # fmt: skip
            self.configs.append(config)
        self.proxies = [serve(config, tmp_path) for config in self.configs]
        for dicom, _ in self.ports:
            wait_port(dicom, timeout=60)
        self.port, self.sock = free_port(), tmp_path / "haproxy.sock"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(_haproxy_config(self.port, self.ports, self.sock), "utf-8")
        self.balancer = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_for(lambda: self.sock.exists() and _servers_up(self.sock) == 2, timeout=30)

    def send(self, folder: Path, *, verbose: bool = False) -> subprocess.Popen[str]:
        command = [tool("storescu"), "-aet", "MODALITY", "-aec", "ANONPROXY", "+sd", "+r",
                   *(["-v"] if verbose else []), "127.0.0.1", str(self.port), str(folder)]  # fmt: skip
        return subprocess.Popen(
            command, env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def events(self, n: int, name: str) -> list[dict[str, object]]:
        records = audit_records(self.tmp / f"var{n}" / "audit.jsonl")
        return [r for r in records if r["event"] == name]

    def stop(self) -> None:
        self.balancer.terminate()
        self.balancer.wait(10)
        for proxy in self.proxies:
            proxy.send_signal(signal.SIGTERM)
        for proxy in self.proxies:
            try:
                proxy.wait(60)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()

    def store_counts(self) -> tuple[int, int]:
        """(map entries, patients with a pseudonym) in the shared store."""
        store = StateStore.open(self.state, self.tmp)
        try:
            return store.map_count(), store.patient_count()
        finally:
            store.close()


@pytest.fixture
def research(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "research").start()
    yield scp
    scp.stop()


@pytest.fixture
def nodes(
    tmp_path: Path, cluster: PostgresCluster, research: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Nodes]:
    key = tmp_path / "map.key"  # one map key for every node
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    monkeypatch.setenv("ANONPROXY_MAP_KEY_FILE", str(key))
    started = Nodes(tmp_path, cluster, research)
    yield started
    started.stop()


def _split(files: list[Path], parts: int) -> list[Path]:
    folders = []
    for index, path in enumerate(files):
        folder = path.parent.parent / f"{path.parent.name}-{index % parts}"
        folder.mkdir(exist_ok=True)
        shutil.move(path, folder / path.name)
        folders.append(folder)
    return sorted(set(folders))


def _delivered(research: StoreSCP) -> list[Dataset]:
    return [dcmread(p, stop_before_pixels=True) for p in research.files()]


def test_one_study_over_four_associations_and_two_nodes(
    nodes: Nodes, research: StoreSCP, tmp_path: Path
) -> None:
    folders = _split(make_series(tmp_path / "study", 40, patient_id="PID-HA-5150"), 4)
    senders = [nodes.send(folder) for folder in folders]
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out[-2000:]
        assert "Store Failed" not in out
    assert wait_for(lambda: len(research.files()) == 40, timeout=90)
    time.sleep(1)  # anything delivered twice would arrive now
    spooled = [len(nodes.events(n, "instance.spooled")) for n in range(2)]
    assert sum(spooled) == 40
    assert min(spooled) > 0, spooled  # both nodes took associations
    forwarded = sum(len(nodes.events(n, "instance.forwarded")) for n in range(2))
    assert forwarded == 40  # every instance delivered once
    delivered = _delivered(research)
    assert len({str(ds.SOPInstanceUID) for ds in delivered}) == 40
    assert len({str(ds.StudyInstanceUID) for ds in delivered}) == 1
    assert len({str(ds.SeriesInstanceUID) for ds in delivered}) == 1
    assert len({str(ds.PatientID) for ds in delivered}) == 1
    assert nodes.store_counts() == (1, 1)


def _acknowledged(log: str) -> list[Path]:
    """Files storescu saw acknowledged with Success, from its verbose log."""
    done, current = [], None
    for line in log.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_a_node_killed_mid_study_loses_nothing_acknowledged(
    nodes: Nodes, research: StoreSCP, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "study", 150, patient_id="PID-HA-5151")
    sender = nodes.send(tmp_path / "study", verbose=True)

    def busy() -> int | None:
        for n in range(2):
            if len(nodes.events(n, "instance.spooled")) >= 30:
                return n
        return None

    assert wait_for(lambda: busy() is not None, timeout=60)
    victim = busy()
    assert victim is not None
    nodes.proxies[victim].send_signal(signal.SIGKILL)
    nodes.proxies[victim].wait(10)
    log, _ = sender.communicate(timeout=60)
    acknowledged = _acknowledged(log)
    assert 30 <= len(acknowledged) < 150
    rest = tmp_path / "rest"
    rest.mkdir()
    for path in set(files) - set(acknowledged):
        shutil.copy(path, rest / path.name)
    again = nodes.send(rest)  # the killed node is down: HAProxy gives it to the other one
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out[-2000:]
    assert "Store Failed" not in out
    survivor = 1 - victim
    assert len(nodes.events(survivor, "instance.spooled")) == 150 - len(acknowledged)
    nodes.proxies[victim] = serve(nodes.configs[victim], tmp_path)  # its spool is forwarded
    assert wait_for(lambda: len(research.files()) == 150, timeout=90)
    delivered = _delivered(research)
    assert len({str(ds.SOPInstanceUID) for ds in delivered}) == 150
    assert len({str(ds.StudyInstanceUID) for ds in delivered}) == 1
    assert len({str(ds.SeriesInstanceUID) for ds in delivered}) == 1
    assert len({str(ds.PatientID) for ds in delivered}) == 1
    assert nodes.store_counts() == (1, 1)

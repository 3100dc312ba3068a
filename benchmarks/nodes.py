"""Aggregate throughput of 4 senders through HAProxy to 1 node and to 2 nodes sharing
PostgreSQL, on this machine, in one run.

    .venv/bin/python benchmarks/nodes.py [--instances 200] [--rounds 2]

Each round sends one patient's study of ``--instances`` MR instances (64x64, so that the cost
per instance is the proxy's, not the pixels') split over 4 parallel storescu associations
through HAProxy (the shipped deploy/haproxy/haproxy.cfg on loopback ports, as in
tests/integration/test_haproxy_nodes.py), to a storescp research PACS, and prints instances
acknowledged per second (the last storescu's end) and delivered per second (the last arrival).
The lookup table and the map are in PostgreSQL (a throw-away cluster); the first round's
patient is new, later rounds' patients and studies too (each round a new study). On a 2-core
machine two nodes share the cores: the figure to read is that the second node and the
database cost nothing per instance once a patient and study are known (the ratio 2 nodes / 1
node near 1, not below), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from builders import make_series
from conftest import serve
from peers import PEER_ENV, StoreSCP, free_port, tool, wait_for, wait_port
from pgcluster import PostgresCluster, new_database

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from test_haproxy_nodes import _haproxy_config, _servers_up


def _run(
    root: Path, cluster: PostgresCluster, count: int, instances: int, rounds: int
) -> list[tuple[float, float]]:
    state = new_database(cluster, root)
    research = StoreSCP(root / "research", extra=["--fork"]).start()  # a node each
    ports = [(free_port(), free_port()) for _ in range(count)]
    proxies = []
    for n, (dicom, admin) in enumerate(ports):
        config = root / f"node{n}.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"port": dicom},
                    "destinations": [
                        {
                            "name": "research",
                            "ae_title": "RESEARCH",
                            "host": "127.0.0.1",
                            "port": research.port,
                        }
                    ],
                    "profile": {"patient_id": {"method": "lookup", "unknown_patient": "hash"}},
                    "state": {"backend": "postgresql", "dsn_file": str(state.dsn_file)},
                    "storage": {"path": str(root / f"var{n}"), "min_free_bytes": 0},
                    "audit": {"path": str(root / f"var{n}" / "audit.jsonl")},
                    "admin": {"port": admin},
                }
            )
        )
        proxies.append(serve(config, root))
    for dicom, _ in ports:
        wait_port(dicom, timeout=60)
    port, sock = free_port(), root / "haproxy.sock"
    (root / "haproxy.cfg").write_text(_haproxy_config(port, ports, sock))
    balancer = subprocess.Popen(
        ["haproxy", "-db", "-f", str(root / "haproxy.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = []
    try:
        assert wait_for(lambda: sock.exists() and _servers_up(sock) == count, timeout=30)
        for r in range(rounds):
            study = root / f"study{r}"
            files = make_series(study, instances, patient_id=f"PID-BENCH-{r}", rows=64)
            for i, path in enumerate(files):
                (study / f"p{i % 4}").mkdir(exist_ok=True)
                shutil.move(path, study / f"p{i % 4}" / path.name)
            before = len(research.files())
            started = time.perf_counter()
            senders = [
                subprocess.Popen(
                    [
                        tool("storescu"),
                        "-aet",
                        "MODALITY",
                        "-aec",
                        "ANONPROXY",
                        "+sd",
                        "+r",
                        "127.0.0.1",
                        str(port),
                        str(study / f"p{i}"),
                    ],
                    env=PEER_ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i in range(4)
            ]
            for s in senders:
                assert s.wait(600) == 0
            acknowledged = time.perf_counter() - started
            wanted = before + instances
            assert wait_for(lambda w=wanted: len(research.files()) >= w, timeout=600, interval=0.02)
            delivered = time.perf_counter() - started
            results.append((instances / acknowledged, instances / delivered))
    finally:
        balancer.terminate()
        balancer.wait(10)
        for proxy in proxies:
            proxy.send_signal(signal.SIGTERM)
        for proxy in proxies:
            proxy.wait(60)
        research.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    key = Path(tempfile.mkdtemp()) / "map.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    os.environ["ANONPROXY_MAP_KEY_FILE"] = str(key)
    cluster = PostgresCluster()
    try:
        figures = {}
        for count in (1, 2):
            with tempfile.TemporaryDirectory() as folder:
                figures[count] = _run(Path(folder), cluster, count, args.instances, args.rounds)
        print(
            f"{args.instances} MR 64x64 instances, 4 senders through HAProxy, os.getloadavg {os.getloadavg()[0]:.1f}"
        )
        for count, rows in figures.items():
            print(
                f"{count} node(s): "
                + "; ".join(f"acknowledged {a:.0f}/s delivered {d:.0f}/s" for a, d in rows)
            )
        best = {c: max(d for _, d in rows) for c, rows in figures.items()}
        print(f"delivered, best round, 2 nodes / 1 node: {best[2] / best[1]:.2f}")
    finally:
        cluster.stop()
        shutil.rmtree(key.parent, ignore_errors=True)


if __name__ == "__main__":
    main()

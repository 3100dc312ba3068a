"""What the re-identification map costs per instance: :meth:`anonproxy.remap.MapRecorder.record`.

    .venv/bin/python benchmarks/remap.py [--studies 200] [--instances 20000] [--rounds 3]
        [--postgresql] [--threads 1]

Three cases, in one run, each the best of ``--rounds``:

* *new study*: each call is a new patient and study: one journal line appended and synced,
  then one transaction of the state store (SQLite in a temporary folder, or with
  ``--postgresql`` a throw-away cluster from tests/pgcluster.py);
* *known study*: every further instance of a study already recorded (a set look-up);
* *lookup hit*: :class:`anonproxy.patients.PatientDirectory` for a cached patient.

With ``--threads N``, N threads record new studies at once (concurrent associations: their
entries share transactions). The machine is shared: compare the figures of one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from anonproxy.config import StateConfig
from anonproxy.deid.identity import StudyIdentity, StudyValues
from anonproxy.patients import PatientDirectory
from anonproxy.remap import MapKey, MapRecorder
from anonproxy.state import StateStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

KEY = MapKey(bytes(range(32)), "benchmark")


def _identity(n: int, salt: str) -> StudyIdentity:
    original = StudyValues(f"MRN-{salt}-{n}", "Doe^Jane", f"A{n}", f"1.2.3.{salt}.{n}", "20200101")
    pseudo = StudyValues(f"ANON-{n}", f"ANON-{n}", f"X{n}", f"2.25.{n}", "20190101")
    return StudyIdentity(original, pseudo)


def _best(rounds: int, run: Callable[[int], float]) -> float:
    return max(run(r) for r in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--instances", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--postgresql", action="store_true")
    args = parser.parse_args()
    cluster = None
    with tempfile.TemporaryDirectory() as folder:
        storage = Path(folder)
        config = StateConfig()
        if args.postgresql:
            from pgcluster import PostgresCluster, new_database

            cluster = PostgresCluster()
            config = new_database(cluster, storage)
        store = StateStore.open(config, storage)
        recorder = MapRecorder(KEY, store, storage)
        recorder.open()
        try:

            def new_studies(r: int) -> float:
                per = args.studies // args.threads

                def work(t: int) -> None:
                    for n in range(per):
                        recorder.record(_identity(n, f"{r}x{t}"))

                threads = [threading.Thread(target=work, args=(t,)) for t in range(args.threads)]
                started = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return per * args.threads / (time.perf_counter() - started)

            def known(r: int) -> float:
                same = _identity(0, "0x0")
                started = time.perf_counter()
                for _ in range(args.instances):
                    recorder.record(same)
                return args.instances / (time.perf_counter() - started)

            directory = PatientDirectory(store, b"benchmark secret 0123456789")
            directory("MRN-1", "ANON-1")

            def hit(r: int) -> float:
                started = time.perf_counter()
                for _ in range(args.instances):
                    directory("MRN-1", "ANON-1")
                return args.instances / (time.perf_counter() - started)

            backend = "postgresql" if args.postgresql else "sqlite"
            print(f"backend {backend}, {args.threads} thread(s), best of {args.rounds}")
            print(f"new study (journal fsync + store):  {_best(args.rounds, new_studies):10.0f}/s")
            print(f"known study (set look-up):           {_best(args.rounds, known):10.0f}/s")
            print(f"lookup table, cached patient:        {_best(args.rounds, hit):10.0f}/s")
        finally:
            recorder.close()
            store.close()
            if cluster is not None:
                cluster.stop()


if __name__ == "__main__":
    main()

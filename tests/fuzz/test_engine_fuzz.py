"""Fuzzing the engine with mutated real data sets (issue 5, item 5).

Byte-level mutations of files of the pydicom test corpus (bit flips, overwritten bytes and
length fields, insertions, deletions, truncation) go through ``read_instance`` and
``Deidentifier.deidentify``. The only exceptions allowed are :class:`DecodeError` and
:class:`DeidentificationError`. Bounded by example count and time, so it runs in CI.
A failing input is saved under ``tests/fuzz/crashers/`` (see test_crashers.py).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from anonproxy.deid import Deidentifier, Profile, read_instance
from anonproxy.errors import DecodeError, DeidentificationError
from anonproxy.pydicom_settings import silence_value_reports

from conftest import TEST_SECRET

CRASHERS = Path(__file__).parent / "crashers"
SEEDS = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "image_dfl.dcm",
    "waveform_ecg.dcm",
]
EXAMPLES = int(os.environ.get("ANONPROXY_FUZZ_EXAMPLES", "1500"))


def seeds() -> list[bytes]:
    return [Path(str(get_testdata_file(name))).read_bytes() for name in SEEDS]


SEED_BYTES = seeds()
ENGINE = Deidentifier(Profile(), secret=TEST_SECRET.value)
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 30), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u16"), st.integers(0, 1 << 30), st.sampled_from(INTERESTING[:6])),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30), st.just(0)),
    st.tuples(
        st.just("vr"), st.integers(0, 1 << 30), st.sampled_from([b"SQ", b"UN", b"ZZ", b"OB"])
    ),
)


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    """Apply *mutations* to *data*; positions wrap around the data set (after the preamble)."""
    out = bytearray(data)
    for kind, raw_position, arg in mutations:
        if len(out) <= 140:
            break
        position = 132 + raw_position % (len(out) - 136)
        if kind == "flip":
            out[position] ^= 1 << int(arg)  # type: ignore[call-overload]
        elif kind == "byte":
            out[position] = int(arg)  # type: ignore[call-overload]
        elif kind == "u32":
            out[position : position + 4] = struct.pack("<L", int(arg) & 0xFFFFFFFF)  # type: ignore[call-overload]
        elif kind == "u16":
            out[position : position + 2] = struct.pack("<H", int(arg) & 0xFFFF)  # type: ignore[call-overload]
        elif kind == "insert":
            out[position:position] = bytes(arg)  # type: ignore[call-overload]
        elif kind == "delete":
            del out[position : position + int(arg)]  # type: ignore[call-overload]
        elif kind == "truncate":
            del out[position:]
        elif kind == "vr":
            out[position : position + 2] = bytes(arg)  # type: ignore[call-overload]
    return bytes(out)


def run_engine(path: Path) -> None:
    """The harness: read, then de-identify; only the engine's own errors may escape."""
    try:
        ds = read_instance(path)
        ENGINE.deidentify(ds)
    except (DecodeError, DeidentificationError):
        pass


def _save_crasher(data: bytes) -> Path:
    CRASHERS.mkdir(exist_ok=True)
    path = CRASHERS / f"engine-{hashlib.sha256(data).hexdigest()[:16]}.dcm"
    path.write_bytes(data)
    return path


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # CI runs the same inputs every time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(
    seed=st.integers(0, len(SEEDS) - 1),
    mutations=st.lists(mutation, min_size=1, max_size=6),
)
def test_mutated_corpus_files_raise_only_engine_errors(
    tmp_path_factory: pytest.TempPathFactory, seed: int, mutations: list[tuple[str, int, object]]
) -> None:
    silence_value_reports()
    data = mutate(SEED_BYTES[seed], mutations)
    path = tmp_path_factory.getbasetemp() / "fuzz-input.dcm"
    path.write_bytes(data)
    try:
        run_engine(path)
    except Exception:  # noqa: BLE001 - anything else is a finding
        saved = _save_crasher(data)
        pytest.fail(f"engine raised an unexpected exception; input saved as {saved.name}")

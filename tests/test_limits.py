"""Bounds on received data sets: the size counted as fragments arrive, inflation, file checks."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from pynetdicom.pdu_primitives import P_DATA

from anonproxy.deid.files import data_set_offset, inflated_size
from anonproxy.errors import DecodeError, LimitExceeded
from anonproxy.limits import DataSetBound, check_received_file

from conftest import corpus_paths


def _p_data(*items: tuple[int, bytes]) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [
        [1, bytes([control]) + data] for control, data in items
    ]
    return primitive


def test_fragments_past_the_bound_are_dropped_and_the_data_set_flagged() -> None:
    bound = DataSetBound(max_bytes=100)
    command = _p_data((0x03, b"c" * 50))  # a whole command set: never counted
    bound.take(command)
    first = _p_data((0x00, b"a" * 80))
    bound.take(first)
    assert first.presentation_data_value_list == [[1, b"\x00" + b"a" * 80]]
    second = _p_data((0x00, b"b" * 80), (0x02, b"z" * 80))
    bound.take(second)
    # headers only (as pynetdicom's own decoder makes them: (context ID, bytes) tuples)
    assert second.presentation_data_value_list == [(1, b"\x00"), (1, b"\x02")]
    assert bound.oversized
    bound.oversized = False  # the handler answers 0xA701 and clears it
    within = _p_data((0x02, b"y" * 100))  # the next data set starts afresh
    bound.take(within)
    assert within.presentation_data_value_list == [[1, b"\x02" + b"y" * 100]]
    assert not bound.oversized


def test_no_bound_leaves_fragments_alone() -> None:
    primitive = _p_data((0x02, b"x" * 1000))
    DataSetBound(None).take(primitive)
    assert primitive.presentation_data_value_list == [[1, b"\x02" + b"x" * 1000]]


def test_inflation_is_bounded_and_a_corrupt_stream_refused() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\0" * 10_000_000) + compressor.flush()
    assert len(bomb) < 20_000
    assert inflated_size(io.BytesIO(bomb), 10_000_000) == 10_000_000
    with pytest.raises(LimitExceeded):
        inflated_size(io.BytesIO(bomb), 1_000_000)
    with pytest.raises(DecodeError):
        inflated_size(io.BytesIO(b"\xff" * 64), 1_000_000)


def test_received_file_size_counts_the_data_set_only(tmp_path: Path) -> None:
    source = next(p for p in corpus_paths() if p.read_bytes()[128:132] == b"DICM")
    with source.open("rb") as handle:
        start = data_set_offset(handle)
    assert start > 132
    data_set = source.stat().st_size - start
    check_received_file(source, deflated=False, max_bytes=data_set)
    with pytest.raises(LimitExceeded):
        check_received_file(source, deflated=False, max_bytes=data_set - 1)

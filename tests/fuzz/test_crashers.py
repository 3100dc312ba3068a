"""The crasher corpus replayed as regression tests (issue 5, item 5).

``tests/fuzz/crashers/engine-*.dcm`` are inputs the engine fuzzer found that once escaped the
engine with pydicom's own exceptions (an unknown VR, "no tag to read", a value length that is
no multiple of its VR's size); ``read_instance`` now turns them into DecodeError.
``pdu-*.bin`` are byte streams the PDU fuzzer saves when one breaks the server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_engine_fuzz import run_engine
from .test_pdu_fuzz import send
from peers import echoscu, wait_for

CRASHERS = Path(__file__).parent / "crashers"
ENGINE_CRASHERS = sorted(CRASHERS.glob("engine-*.dcm"))
PDU_CRASHERS = sorted(CRASHERS.glob("pdu-*.bin"))


def test_the_crasher_corpus_is_not_empty() -> None:
    assert ENGINE_CRASHERS


@pytest.mark.parametrize("path", ENGINE_CRASHERS, ids=lambda p: p.name)
def test_engine_crasher_raises_only_engine_errors(path: Path) -> None:
    run_engine(path)


@pytest.mark.integration
@pytest.mark.skipif(not PDU_CRASHERS, reason="no PDU crasher recorded")
def test_pdu_crashers_do_not_break_the_server(make_proxy) -> None:
    proxy = make_proxy(listen={"network_timeout": 5, "acse_timeout": 5})
    for path in PDU_CRASHERS:
        send(proxy.port, path.read_bytes())
    assert wait_for(lambda: proxy.scp.active_associations() == 0, timeout=15)
    assert echoscu(proxy.port) == 0

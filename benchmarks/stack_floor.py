"""The floor of the stack: a pynetdicom Storage SCP that does the least any de-identifying
proxy built on pynetdicom and pydicom must do, and nothing else.

    .venv/bin/python benchmarks/stack_floor.py PORT [--receive-only] [--durable]

Each C-STORE data set is received to disk as it arrives (as anonproxy does, for the memory
target), its header decoded and re-encoded with pydicom (pixel data copied as bytes, as
anonproxy does), then answered Success. No de-identification, no fsync, no forwarding, no audit.
With ``--receive-only`` the handler only removes the received file; with ``--durable`` it
first flushes it to disk (one fsync: the least a receiver that answers Success only for what
is on disk pays per data set; anonproxy's ``after_receipt`` pays one too). The SCP uses anonproxy's
changes to pynetdicom (:mod:`anonproxy.pynetdicom_patches`) and default maximum PDU size, so it
is pynetdicom at its best here.

``benchmarks/throughput.py`` starts it to print the ceiling next to the direct DCMTK rate: a
proxy on this stack cannot answer one association faster than this.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts

from anonproxy import pynetdicom_patches
from anonproxy.config import ListenConfig
from anonproxy.deid.files import read_header, write_spliced
from anonproxy.status import StoreStatus

AE_TITLE = "FLOOR"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--receive-only", action="store_true")
    parser.add_argument("--durable", action="store_true")
    args = parser.parse_args()
    pynetdicom_patches.install()  # received data sets written to a file as they arrive
    output = Path(tempfile.mkdtemp(prefix="anonproxy-floor-")) / "out.dcm"

    def handle_store(event: Event) -> int:
        received = event.dataset_path
        if args.durable:
            fd = os.open(received, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if not args.receive_only:
            dataset, pixels = read_header(received)
            with output.open("wb") as handle:
                write_spliced(dataset, pixels, handle)
        os.unlink(received)
        return StoreStatus.SUCCESS

    ae = AE(AE_TITLE)
    ae.maximum_pdu_size = ListenConfig().max_pdu_size
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, list(AllTransferSyntaxes))
    ae.start_server(
        ("127.0.0.1", args.port), evt_handlers=[(evt.EVT_C_STORE, handle_store)], block=True
    )


if __name__ == "__main__":
    main()

"""Count C-ECHO responses that pynetdicom's own association thread takes from the sender."""

import logging
import sys
import threading
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dropped = []


class Unexpected(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "Received unexpected" in record.getMessage():
            dropped.append(record.getMessage())


logging.getLogger("pynetdicom").addHandler(Unexpected())
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

stop = False


def spin() -> None:  # another busy Python thread, as in any real application
    while not stop:
        sum(range(1000))


threading.Thread(target=spin, daemon=True).start()
ae = AE("RACE")
ae.add_requested_context(Verification)
ae.dimse_timeout = 5
assoc = ae.associate(host, port)
timeouts = 0
started = time.monotonic()
for i in range(count):
    if not assoc.is_established:
        assoc = ae.associate(host, port)
    status = assoc.send_c_echo(msg_id=i % 65536 + 1)
    if "Status" not in status:
        timeouts += 1
stop = True
if assoc.is_established:
    assoc.release()
print(
    f"{count} C-ECHOs in {time.monotonic() - started:.1f}s: {timeouts} without a response, "
    f"{len(dropped)} responses taken by the association thread"
)

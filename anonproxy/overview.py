"""What ``anonproxy status`` prints and the admin endpoint's status page shows: one function
gathers it (:func:`gather`), two render it (:func:`render_text`, :func:`render_html`).

Everything is read from the storage folder and the audit file, the same for the command (run
beside the service, or with the service stopped) and for the page (served by the running
service):

* the queues: :func:`anonproxy.spool.queue_status` (pending files, age of the oldest,
  quarantined, and the retrying count the running service publishes), and
  :func:`anonproxy.spool.deferred_status` (received data sets waiting for de-identification,
  refused inputs kept in quarantine);
* the history: the tail of the audit file (and of its last rotation, ``<audit>.1``, which the
  shipped logrotate configuration leaves uncompressed), read backwards from its end: the
  ``instance.failed`` records of the last day (refusals by stage and status, over the last hour
  and the last day) and each destination's last ``instance.forwarded`` (last success) and last
  ``instance.forward_retry`` or ``instance.quarantined`` (last error). No state kept in memory
  by the service, so the command and the page agree, across restarts too. Without an audit
  file (``audit.path: null``) there is no history, and the output says so.

No PHI: destinations are configured names, refusals are the code's stage names and DIMSE
statuses, and a last error is shown only as one of the forward workers' fixed reasons
(anything else is shown as ``other``): never a free text, a value of a data set or a UID.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anonproxy import spool
from anonproxy.metrics import OTHER, dimse_status, fixed_destination, fixed_name

HOUR_S = 3600.0
DAY_S = 86400.0
#: Bytes of audit read backwards at most, looking for a destination's last success or error
#: older than a day (a quiet destination on a busy proxy).
HISTORY_BUDGET_BYTES = 32 << 20
_CHUNK = 1 << 16

# The forward workers' reasons (anonproxy.forward): fixed sentences, status codes and exception
# class names only. A reason of another form is shown as "other".
_FORWARD_REASON = re.compile(
    r"(?:gave up after \d+ s: )?(?P<reason>"
    r"association (?:rejected|failed or aborted)(?: \(TLS\))?"
    r"|C-STORE status 0x[0-9A-F]{4} \([A-Za-z ]{1,40}\)"
    r"|C-STORE not sent: [A-Za-z]{1,40}"
    r"|no C-STORE response \(time-out or aborted association\)"
    r"|sender process (?:failed|did not answer within \d+ s)"
    r"|folder write failed: [A-Za-z ]{1,60}"
    r"|SOP class not supported by the destination"
    r"|no common transfer syntax with the destination"
    r"|cannot decompress for the destination: [A-Za-z]{1,40}"
    r"|instance lacks a valid Study or Series Instance UID"
    r"|unexpected [A-Za-z]{1,40})"
)

QUARANTINE_COMMANDS = (
    ("anonproxy quarantine list", "each entry, its reason and age"),
    ("anonproxy quarantine release DESTINATION UID...", "send again (after fixing the cause)"),
    ("anonproxy quarantine purge --older-than-days N", "delete (refused inputs included)"),
)


def fixed_reason(reason: object) -> str:
    """A forward failure's reason when it is one of the fixed reasons, else ``other``."""
    if isinstance(reason, str):
        match = _FORWARD_REASON.fullmatch(reason)
        if match:
            gave_up = " (gave up)" if reason.startswith("gave up") else ""
            return match.group("reason") + gave_up
    return OTHER


@dataclass
class DestinationStatus:
    """One destination: its queue, quarantine and last outcomes (times in seconds since the
    epoch; None: none in the audit read)."""

    name: str
    pending: int = 0
    oldest_age_s: float = 0.0
    retrying: int = 0
    quarantined: int = 0
    last_success: float | None = None
    last_error: float | None = None
    last_error_reason: str | None = None


@dataclass(frozen=True)
class RefusalCount:
    """Inputs refused (``instance.failed``) at one stage with one status."""

    stage: str
    status: str
    last_hour: int
    last_day: int


@dataclass
class Overview:
    """The status of one proxy's storage folder."""

    time: float
    storage: Path
    destinations: list[DestinationStatus]
    received_waiting: int
    received_oldest_age_s: float
    refused_inputs: int
    received_bytes: int = 0
    refusals: list[RefusalCount] = field(default_factory=list)
    #: The audit file read for the history; None when there is none.
    audit: Path | None = None
    #: The oldest audit record read (the history covers from then on).
    history_since: float | None = None


def gather(
    storage: Path,
    audit: Path | None,
    destinations: Sequence[str] = (),
    *,
    now: float | None = None,
) -> Overview:
    """The status of the proxy storing in *storage* and auditing to *audit*: the configured
    *destinations* and every queue found in the spool."""
    now = time.time() if now is None else now
    queues = spool.queue_status(storage) if storage.is_dir() else {}
    received = spool.deferred_status(storage) if storage.is_dir() else {}
    rows = {name: DestinationStatus(name) for name in [*destinations, *queues]}
    for name, queue in queues.items():
        row = rows[name]
        row.pending = _int(queue.get("pending"))
        row.oldest_age_s = float(_int(queue.get("oldest_age_s")))
        row.retrying = _int(queue.get("retrying"))
        row.quarantined = _int(queue.get("quarantined"))
    overview = Overview(
        time=now,
        storage=storage,
        destinations=list(rows.values()),
        received_waiting=_int(received.get("waiting")),
        received_oldest_age_s=float(received.get("oldest_age_s", 0.0)),
        refused_inputs=_int(received.get("refused")),
        received_bytes=_int(received.get("bytes")),
        audit=audit,
    )
    if audit is not None:
        _read_history(overview, audit, rows)
    return overview


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _read_history(overview: Overview, audit: Path, rows: dict[str, DestinationStatus]) -> None:
    """Refusals of the last day and each destination's last success and last error, from the
    audit records newest first."""
    hour: Counter[tuple[str, str]] = Counter()
    day: Counter[tuple[str, str]] = Counter()
    day_start = overview.time - DAY_S
    for record, when in _records_newest_first([audit, audit.with_name(audit.name + ".1")]):
        overview.history_since = when
        if when < day_start and all(
            row.last_success is not None and row.last_error is not None for row in rows.values()
        ):
            break
        event = record.get("event")
        if event == "instance.failed" and when >= day_start:
            key = (fixed_name(record.get("stage")), dimse_status(record.get("status")))
            day[key] += 1
            if when >= overview.time - HOUR_S:
                hour[key] += 1
            continue
        row = rows.get(fixed_destination(record.get("destination")))
        if row is None:
            continue
        if event == "instance.forwarded" and row.last_success is None:
            row.last_success = when
        elif event in {"instance.forward_retry", "instance.quarantined"} and row.last_error is None:
            row.last_error = when
            row.last_error_reason = fixed_reason(record.get("reason"))
    overview.refusals = [
        RefusalCount(stage, status, hour[(stage, status)], count)
        for (stage, status), count in sorted(day.items())
    ]


def _records_newest_first(paths: Sequence[Path]) -> Iterator[tuple[dict[str, Any], float]]:
    """The audit records of *paths* (the current file, then older ones), newest first, with
    their time; at most :data:`HISTORY_BUDGET_BYTES` read. A line that is not a record (one
    being written, a truncated one) is skipped."""
    budget = HISTORY_BUDGET_BYTES
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            for line in _lines_backwards(path, budget):
                budget -= len(line) + 1
                record = _parse(line)
                if record is not None:
                    yield record
        if budget <= 0:
            return


def _parse(line: bytes) -> tuple[dict[str, Any], float] | None:
    try:
        record = json.loads(line)
        when = datetime.fromisoformat(record["time"]).timestamp()
    except (KeyError, TypeError, ValueError):  # JSONDecodeError and UnicodeDecodeError too
        return None
    return (record, when) if isinstance(record, dict) else None


def _lines_backwards(path: Path, budget: int) -> Iterator[bytes]:
    """The complete lines of *path* from the last to the first, within *budget* bytes."""
    with path.open("rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        end = position
        rest = b""
        first = True
        while position > 0 and end - position < budget:
            step = min(_CHUNK, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + rest
            lines = data.split(b"\n")
            rest = lines[0]
            tail = lines[1:]
            if first:  # the last line is being written until it ends with a newline
                tail = tail[:-1]
                first = False
            yield from (line for line in reversed(tail) if line)
        if position == 0 and rest and not first:
            yield rest


# -- rendering ---------------------------------------------------------------------------


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "none recorded"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _backlog(overview: Overview) -> str:
    """The received data sets waiting: how many, their size, the oldest one's age."""
    return (
        f"{overview.received_waiting} ({overview.received_bytes / 1e6:.1f} MB,"
        f" oldest {_age(overview.received_oldest_age_s)})"
    )


def _history_note(overview: Overview) -> str:
    if overview.audit is None:
        return "no audit file (audit.path is not set): no history of successes and refusals"
    if overview.history_since is None:
        return f"history: the audit file {overview.audit} holds no record yet"
    return (
        f"history: the audit file {overview.audit}, records since {_when(overview.history_since)}"
    )


def destination_rows(overview: Overview) -> list[list[str]]:
    """The destinations table (header first), as both renderings show it."""
    rows = [
        ["destination", "pending", "oldest", "retrying", "quarantined", "last success",
         "last error"],
    ]  # fmt: skip
    for row in overview.destinations:
        error = "none recorded"
        if row.last_error is not None:
            error = f"{_when(row.last_error)}: {row.last_error_reason}"
        rows.append(
            [row.name, str(row.pending), _age(row.oldest_age_s), str(row.retrying),
             str(row.quarantined), _when(row.last_success), error]
        )  # fmt: skip
    return rows


def refusal_rows(overview: Overview) -> list[list[str]]:
    """The refusals table (header first)."""
    rows = [["stage", "status", "last hour", "last day"]]
    rows += [[r.stage, r.status, str(r.last_hour), str(r.last_day)] for r in overview.refusals]
    return rows


def quarantine_rows(overview: Overview) -> list[list[str]]:
    """Quarantine counts (header first): per destination, and the refused inputs."""
    rows = [["quarantine", "instances"]]
    rows += [[row.name, str(row.quarantined)] for row in overview.destinations]
    rows.append(
        ["refused inputs (originals, before de-identification)", str(overview.refused_inputs)]
    )
    return rows


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_text(overview: Overview) -> str:
    """The status for a terminal (``anonproxy status``)."""
    parts = [
        f"anonproxy status at {_when(overview.time)}; storage {overview.storage}",
        "",
        _columns(destination_rows(overview)),
        "",
        f"received, waiting for de-identification: {_backlog(overview)}",
        "",
        "refusals (inputs not forwarded), by stage and status:",
        _columns(refusal_rows(overview)) if overview.refusals else "none in the last day",
        "",
        _columns(quarantine_rows(overview)),
        "",
        "act on the quarantine (add --config FILE):",
        *(f"  {command:50} {meaning}" for command, meaning in QUARANTINE_COMMANDS),
        "",
        _history_note(overview),
    ]
    return "\n".join(parts) + "\n"


def _table(table_id: str, rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in rows[1:]
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
    "th,td{border:1px solid #999;padding:.2em .6em;text-align:left}th{background:#eee}"
    "code{background:#f4f4f4;padding:0 .2em}"
)


def render_html(overview: Overview, *, refresh_s: int = 30) -> str:
    """The status page: one server-rendered HTML page, no script (reloads itself every
    *refresh_s* seconds)."""
    refusals = (
        _table("refusals", refusal_rows(overview))
        if overview.refusals
        else '<p id="refusals">none in the last day</p>'
    )
    commands = "".join(
        f"<li><code>{html.escape(command)}</code>: {html.escape(meaning)}</li>"
        for command, meaning in QUARANTINE_COMMANDS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{refresh_s}">'
        f"<title>anonproxy status</title><style>{_STYLE}</style></head><body>"
        "<h1>anonproxy status</h1>"
        f'<p id="time">{html.escape(_when(overview.time))}; storage'
        f" <code>{html.escape(str(overview.storage))}</code></p>"
        "<h2>Destinations</h2>"
        + _table("destinations", destination_rows(overview))
        + f'<p id="received">Received, waiting for de-identification: '
        f"{html.escape(_backlog(overview))}</p>"
        "<h2>Refusals by stage and status</h2>"
        + refusals
        + "<h2>Quarantine</h2>"
        + _table("quarantine", quarantine_rows(overview))
        + f'<p>Act on it (with <code>--config FILE</code>):</p><ul id="commands">{commands}</ul>'
        f'<p id="history">{html.escape(_history_note(overview))}</p>'
        "</body></html>\n"
    )

"""Command-line interface: ``anonproxy serve | check-config | deidentify | describe-profile``,
the state store's ``lookup import`` and ``map lookup | export``, and the operator's commands.

The CLI builds :class:`~anonproxy.config.Settings` and hands them to the code that does the work;
it holds no logic of its own.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anonproxy import __version__
from anonproxy.config import Settings, dump_settings, load_settings
from anonproxy.errors import ConfigError
from anonproxy.secret import Secret, SecretNotFound, create_secret, load_secret


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, args.overrides)


def _secret(settings: Settings, *, create: bool = False) -> Secret:
    """The secret; created on first run only with *create* (``serve``): other commands stop
    with :class:`~anonproxy.secret.SecretNotFound` (a ConfigError: exit status 2)."""
    secret = load_secret(settings.storage.path, create=create)
    if secret.created:
        print(
            f"anonproxy: created a new pseudonymisation secret at {secret.source}", file=sys.stderr
        )
    _warn_loose(secret)
    return secret


def _warn_loose(secret: Secret) -> None:
    if secret.loose_permissions:
        print(
            f"anonproxy: WARNING: the secret file {secret.source} is readable by group or others;"
            " run: chmod 600",
            file=sys.stderr,
        )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the proxy until SIGINT or SIGTERM."""
    from anonproxy.audit import configure_logging  # noqa: PLC0415 - keep start-up light
    from anonproxy.service import Proxy, preflight  # noqa: PLC0415

    settings = _settings(args)
    preflight(settings)  # one line and exit status 2 for what would stop the start
    configure_logging(settings.log.level, format=settings.log.format, path=settings.log.path)
    secret = _secret(settings, create=True)
    proxy = Proxy(settings, secret)
    listen = settings.listen
    destinations = ", ".join(f"{d.name} ({d.type})" for d in settings.effective_destinations)

    def announce() -> None:
        print(
            f"anonproxy {__version__}: listening as {listen.ae_title} on {listen.host}:"
            f"{proxy.port}; destinations: {destinations}; audit: {settings.audit.path}",
            file=sys.stderr,
            flush=True,
        )

    proxy.run(on_started=announce)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (secrets are never part of it)."""
    settings = _settings(args)
    sys.stdout.write(dump_settings(settings))
    try:
        secret = _secret(settings)
    except SecretNotFound as exc:  # reported, never created here
        print(f"# secret: none yet: {exc}")
        return 0
    print(f"# secret: from {secret.source} (value redacted)")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    """``secret create``: a new pseudonymisation secret where ``serve`` will look for it; an
    existing one is never replaced."""
    secret = create_secret(_settings(args).storage.path)
    print(f"created a new pseudonymisation secret at {secret.source} (mode 0600): back it up")
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    """``lookup import FILE``: the patient lookup table into the state store, all rows or
    none; a row that would change a patient's pseudonym is refused (exit status 2)."""
    from anonproxy.audit import AuditLog  # noqa: PLC0415
    from anonproxy.deidentifiers import open_state  # noqa: PLC0415
    from anonproxy.patients import import_csv  # noqa: PLC0415

    settings = _settings(args)
    secret = _secret(settings)
    store = _open_store(settings, open_state)
    try:
        added, present = import_csv(store, secret.value, args.file)
        total = store.patient_count()
    finally:
        store.close()
    audit = AuditLog(settings.audit.path)
    audit.event("lookup.imported", added=added, already_present=present, user=_user())
    audit.close()
    print(f"imported {added} patients ({present} already there; {total} in the table)")
    return 0


def _open_store(settings: Settings, open_state: Callable[[Settings], Any]) -> Any:  # noqa: ANN401
    from anonproxy.errors import StateUnavailable  # noqa: PLC0415

    try:
        return open_state(settings)
    except StateUnavailable as exc:
        raise ConfigError(f"state: {exc}") from None


def _user() -> str:
    import getpass  # noqa: PLC0415

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


MAP_COLUMNS = (
    "patient_id",
    "patient_name",
    "accession_number",
    "study_instance_uid",
    "study_date",
)


def cmd_map(args: argparse.Namespace) -> int:
    """``map lookup --pseudonym P`` | ``map export --study UID``: print the originals of the
    re-identification map on standard output (CSV: each field's pseudonym and original), after
    writing the look-up to the audit trail (without any original). Needs the map key."""
    import csv  # noqa: PLC0415

    from anonproxy.audit import AuditLog  # noqa: PLC0415
    from anonproxy.deidentifiers import open_state  # noqa: PLC0415
    from anonproxy.remap import find, load_map_key  # noqa: PLC0415
    from anonproxy.syslog import SyslogSender  # noqa: PLC0415

    settings = _settings(args)
    if not settings.map.enabled:
        raise ConfigError("map.enabled is false: this installation keeps no map")
    key = load_map_key(settings.storage.path)  # MapKeyError (a ConfigError) without it
    store = _open_store(settings, open_state)
    try:
        if args.action == "lookup":
            query, value = "patient_id", args.pseudonym
            found = find(store, key, patient_id=value)
        else:
            query, value = "study", args.study
            found = find(store, key, study=value)
    finally:
        store.close()
    syslog = SyslogSender.from_settings(settings)
    audit = AuditLog(settings.audit.path, sinks=[syslog] if syslog is not None else [])
    audit.event(
        f"map.{args.action}", query=query, pseudonym=value, entries=len(found), user=_user()
    )
    audit.close()
    if syslog is not None:
        syslog.close(timeout=5.0)
    if not found:
        print(f"anonproxy: no map entry for this {query.replace('_', ' ')}", file=sys.stderr)
        return 1
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(
        [f"{side}_{column}" for column in MAP_COLUMNS for side in ("pseudonym", "original")]
        + ["recorded_at"]
    )
    for entry in found:
        pseudonym, original = entry.pseudonym.as_dict(), entry.original.as_dict()
        writer.writerow(
            [value for c in MAP_COLUMNS for value in (pseudonym[c], original[c])]
            + [datetime.fromtimestamp(entry.recorded_at, UTC).isoformat(timespec="seconds")]
        )
    return 0


ACTION_MEANINGS = {
    "X": "remove",
    "Z": "zero length",
    "D": "dummy value",
    "K": "keep",
    "C": "clean",
    "U": "replace UID (keyed, consistent)",
}


def cmd_describe_profile(args: argparse.Namespace) -> int:
    """Print the effective action for every attribute of Table E.1-1 (or a summary)."""
    from anonproxy.deidentifiers import build_profile  # noqa: PLC0415

    settings = _settings(args)
    profile = build_profile(settings.profile)
    rows = list(profile.describe())
    if not args.summary:
        for tag, name, action in rows:
            print(f"{tag}\t{action}\t{name}")
        rules = list(profile.describe_rules())
        if rules:
            print("# user rules, first match wins (before the profile):")
            for selector, name, action in rules:
                print(f"{selector}\t{action}\t{name}")
        return 0
    counts = Counter(action for _, _, action in rows)
    print(f"{len(rows)} attributes of PS3.15 Table E.1-1:")
    for action, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        letters = action.rstrip("*").split("/")
        if "U" in letters and len(letters) > 1:  # X/Z/U*: see anonproxy.deid.actions
            meaning = "replace the UIDs inside (references kept)"
        else:
            meaning = " or ".join(ACTION_MEANINGS.get(letter, letter) for letter in letters)
            if len(letters) > 1:
                meaning += ", by the attribute's Type in the IOD"
        print(f"  {action:7} {count:4}  {meaning}")
    return 0


def cmd_deidentify(args: argparse.Namespace) -> int:
    """De-identify files or folders offline, with the same engine as the proxy."""
    # The engine's import (pydicom, numpy, anonproxy.deid) makes some 100 000 objects that live
    # as long as the process, and almost no garbage: the collector is off meanwhile, then given
    # them as permanent (gc.freeze), so that neither the collections the import would trigger
    # nor the later ones walk them (one-file run: 2.14 -> 1.98 G instructions). Everything made
    # afterwards is collected as before.
    gc.disable()
    try:
        from anonproxy import offline  # noqa: PLC0415 - keep start-up light
    finally:
        gc.freeze()
        gc.enable()

    settings = _settings(args)
    secret = _secret(settings)
    work = offline.tasks(args.inputs, args.output)
    jobs = args.jobs
    if not jobs:
        from anonproxy.processes import available_cores  # noqa: PLC0415 - multiprocessing

        jobs = available_cores()
    outcomes: Iterable[str] = offline.deidentify(settings, secret.value, work, jobs)
    if not args.quiet:
        from tqdm import tqdm  # noqa: PLC0415

        outcomes = tqdm(outcomes, total=len(work), unit="file", file=sys.stderr)
    counts = Counter(outcomes)
    print(f"{len(work)} file(s): " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    return 0 if all(o in (offline.DEIDENTIFIED, offline.NOT_DICOM) for o in counts) else 1


def cmd_queue(args: argparse.Namespace) -> int:
    """``queue status``: per destination counts; ``queue retry``: retry waiting items now."""
    from anonproxy import spool  # noqa: PLC0415

    root = _settings(args).storage.path
    if args.action == "retry":
        request = root / "control" / "retry-now"
        request.parent.mkdir(parents=True, exist_ok=True)
        request.touch()
        print("retry requested; the running service picks it up within seconds")
        return 0
    status = spool.queue_status(root)
    # "(received)": data sets acknowledged on receipt and waiting for de-identification, and
    # the inputs refused before de-identification (quarantine/rejected); no destination's
    # name has parentheses.
    received = spool.deferred_status(root)
    print("destination\tpending\toldest_age_s\tretrying\tquarantined")
    print(
        f"(received)\t{received['waiting']}\t{received['oldest_age_s']}\t0\t{received['refused']}"
    )
    for name, row in status.items():
        print(
            f"{name}\t{row['pending']}\t{row['oldest_age_s']}\t{row['retrying']}"
            f"\t{row['quarantined']}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """What the admin endpoint's status page shows, for a terminal (read from the storage
    folder and the audit file: the service may run or not)."""
    from anonproxy.overview import gather, render_text  # noqa: PLC0415

    settings = _settings(args)
    overview = gather(
        settings.storage.path,
        settings.audit.path,
        [d.name for d in settings.effective_destinations],
    )
    sys.stdout.write(render_text(overview))
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    """``quarantine list | release DEST UID... | purge [--older-than-days N]``."""
    from anonproxy import spool  # noqa: PLC0415

    root = _settings(args).storage.path
    if args.action == "list":
        print("destination\tuid\tattempts\tage_s\treason")
        for entry in spool.quarantined(root):
            print(
                f"{entry['destination']}\t{entry['uid']}\t{entry['attempts']}"
                f"\t{entry['age_s']}\t{entry['reason']}"
            )
        refused = spool.refused_inputs(root)
        if refused:  # originals (PHI), in quarantine/rejected under random names
            print("\nrefused input\tstage\tstatus\tage_s\treason")
            for entry in refused:
                print(
                    f"{entry['name']}\t{entry['stage']}\t{entry['status']}"
                    f"\t{entry['age_s']}\t{entry['reason']}"
                )
        return 0
    if args.action == "release":
        if not args.destination or not args.uids:
            print("anonproxy: quarantine release needs DESTINATION UID...", file=sys.stderr)
            return 2
        released = [
            uid for uid in args.uids if spool.release_quarantined(root, args.destination, uid)
        ]
        print(f"released {len(released)} of {len(args.uids)}")
        return 0 if len(released) == len(args.uids) else 1
    purged = spool.purge_quarantined(root, args.older_than_days * 86400)
    print(f"purged {purged}")
    return 0


def cmd_pixel_rules_import(args: argparse.Namespace) -> int:
    """Print the rules of a CTP pixel anonymizer script or a deid recipe as profile.pixel_rules;
    report each rule not converted. 0: all converted, 1: some (or all) not."""
    from anonproxy.pixel_rules_import import guess_format, import_rules, to_yaml  # noqa: PLC0415

    try:
        text = args.file.read_text("utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{args.file}: {exc.strerror or exc}") from None
    fmt = args.format or guess_format(text)
    if fmt is None:
        raise ConfigError(
            f"{args.file}: neither a CTP DicomPixelAnonymizer script nor a deid recipe;"
            " give --format ctp or --format deid"
        )
    result = import_rules(text, fmt)
    sys.stdout.write(to_yaml(result, str(args.file)))
    for line, note in result.notes:
        print(f"anonproxy: {args.file}:{line}: note: {note}", file=sys.stderr)
    for skipped in result.skipped:
        print(
            f"anonproxy: {args.file}:{skipped.line}: skipped {skipped.name!r}: {skipped.reason}",
            file=sys.stderr,
        )
    if not result.rules and not result.skipped:
        print(f"anonproxy: {args.file}: no rule found", file=sys.stderr)
    return 0 if result.rules and not result.skipped else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``anonproxy`` command."""
    parser = argparse.ArgumentParser(prog="anonproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"anonproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help="YAML configuration file (default: the embedded default configuration)",
        )
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one setting of the configuration, the value read as YAML "
            "(repeatable; e.g. --set admin.host=0.0.0.0 in a container)",
        )
        return sub

    add("serve", "run the proxy").set_defaults(func=cmd_serve)
    add("check-config", "print the effective configuration").set_defaults(func=cmd_check_config)
    describe = add("describe-profile", "print the effective action for every attribute")
    describe.add_argument("--summary", action="store_true", help="counts per action only")
    describe.set_defaults(func=cmd_describe_profile)
    deid = add("deidentify", "de-identify files or folders offline")
    deid.add_argument("inputs", nargs="+", type=Path, help="input files or folders (recursive)")
    deid.add_argument("output", type=Path, help="output folder (or file, for one input file)")
    deid.add_argument(
        "-j", "--jobs", type=int, default=0, help="worker processes (default: one per core)"
    )
    deid.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    deid.set_defaults(func=cmd_deidentify)
    status_help = (
        "destinations (queue, last success, last error), refusals over the last hour and day,"
        " quarantine: what the admin endpoint's status page shows"
    )
    add("status", status_help).set_defaults(func=cmd_status)
    queue = add("queue", "spool queues: status, or retry waiting instances now")
    queue.add_argument("action", choices=["status", "retry"])
    queue.set_defaults(func=cmd_queue)
    quarantine = add(
        "quarantine",
        "instances a destination refused for good, and inputs refused before de-identification",
    )
    quarantine.add_argument("action", choices=["list", "release", "purge"])
    quarantine.add_argument("destination", nargs="?", help="release: the destination")
    quarantine.add_argument("uids", nargs="*", help="release: de-identified SOP Instance UIDs")
    quarantine.add_argument(
        "--older-than-days", type=float, default=0.0, help="purge: only older entries"
    )
    quarantine.set_defaults(func=cmd_quarantine)
    secret = add(
        "secret",
        "create the pseudonymisation secret (ANONPROXY_SECRET_FILE, or <storage>/secret.key);"
        " an existing one is kept",
    )
    secret.add_argument("action", choices=["create"])
    secret.set_defaults(func=cmd_secret)
    lookup = add(
        "lookup",
        "import the patient lookup table (CSV original,pseudonym) into the state store;"
        " a patient's pseudonym never changes once recorded",
    )
    lookup.add_argument("action", choices=["import"])
    lookup.add_argument("file", type=Path, help="the CSV file")
    lookup.set_defaults(func=cmd_lookup)
    remap = add(
        "map",
        "print originals from the re-identification map (needs ANONPROXY_MAP_KEY_FILE; each"
        " look-up is audited)",
    )
    remap.add_argument("action", choices=["lookup", "export"])
    remap.add_argument("--pseudonym", help="lookup: a patient's pseudonym (Patient ID)")
    remap.add_argument("--study", help="export: a de-identified Study Instance UID")
    remap.set_defaults(func=cmd_map)
    pixel_help = "profile.pixel_rules from other tools' rule files"
    pixel = commands.add_parser("pixel-rules", help=pixel_help, description=pixel_help)
    pixel_commands = pixel.add_subparsers(dest="pixel_command", required=True)
    import_help = (
        "print the rules of a CTP DicomPixelAnonymizer script or a pydicom/deid recipe as a"
        " YAML pixel_rules list; rules that cannot be converted are reported on standard error"
        " (exit status 1)"
    )
    pixel_import = pixel_commands.add_parser("import", help=import_help, description=import_help)
    pixel_import.add_argument("file", type=Path, help="the script or recipe")
    pixel_import.add_argument(
        "--format", choices=["ctp", "deid"], default=None, help="default: guessed from the content"
    )
    pixel_import.set_defaults(func=cmd_pixel_rules_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anonproxy`` command."""
    # numpy (which pydicom imports) starts OpenBLAS's threads, one per core, which spin for a
    # while after the import; anonproxy does no linear algebra (its parallel work is in
    # processes): one thread, unless the environment says otherwise (`anonproxy deidentify`
    # on one file: ~0.09 s of CPU less)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "map" and not (args.pseudonym if args.action == "lookup" else args.study):
        parser.error("map lookup needs --pseudonym, map export needs --study")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"anonproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `anonproxy describe-profile | head`
        sys.stderr.close()
        return 0

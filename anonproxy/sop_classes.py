"""The SOP Classes the Storage SCP accepts (``listen.sop_classes``).

``storage`` stands for every Storage SOP Class, current and retired: every SOP Class of
pydicom's UID dictionary whose name contains "Storage", except Storage Commitment (an N-ACTION
service, not C-STORE) and Media Storage Directory Storage (the DICOMDIR of PS3.10, never sent
by C-STORE), together with pynetdicom's storage classes (``AllStoragePresentationContexts``,
which knows a few classes newer than pydicom's dictionary). The list is built once, here.

pynetdicom serves a C-STORE only for a SOP Class it files under its Storage Service Class; the
retired classes and private ones are registered with it (:func:`register_storage`), else it
aborts the association on their first C-STORE.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from pydicom._uid_dict import UID_dictionary

STORAGE = "storage"  # the word that stands for every Storage SOP Class

UID_SYNTAX = re.compile(r"^[0-9]+(\.[0-9]+)+$")  # PS3.5 9.1: digits and dots
MAX_UID_LENGTH = 64

_NOT_STORAGE = ("Storage Commitment", "Media Storage Directory")


@functools.cache
def _named_storage() -> frozenset[str]:
    """The Storage SOP Classes of pydicom's UID dictionary (by their names)."""
    return frozenset(
        uid
        for uid, (name, kind, *_) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and not name.startswith(_NOT_STORAGE)
    )


@functools.cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP Class UID, current and retired, in the order of the standard."""
    # pynetdicom only here and in register_storage (the SCP's): the configuration's check of
    # listen.sop_classes, which every command runs, imports no network module
    from pynetdicom.presentation import AllStoragePresentationContexts  # noqa: PLC0415

    found = set(_named_storage())
    found.update(str(context.abstract_syntax) for context in AllStoragePresentationContexts)
    return tuple(sorted(found, key=lambda uid: [int(part) for part in uid.split(".")]))


def check_entry(entry: str) -> str:
    """One entry of ``listen.sop_classes``: the word ``storage`` or a SOP Class UID. A UID of
    the standard that is not a Storage SOP Class (a transfer syntax, Storage Commitment, a
    query model...) is an error."""
    value = entry.strip()
    if value == STORAGE:
        return value
    if not UID_SYNTAX.match(value) or len(value) > MAX_UID_LENGTH:
        msg = (
            f"{entry!r} is neither {STORAGE!r} nor a SOP Class UID "
            f"(digits and dots, at most {MAX_UID_LENGTH} characters)"
        )
        raise ValueError(msg)
    known = UID_dictionary.get(value)
    # pydicom's names first: pynetdicom's list is read (imported) only for a UID they do not
    # name a Storage SOP Class
    if known is not None and value not in _named_storage() and value not in storage_sop_classes():
        name, kind = known[0], known[1]
        msg = f"{value} is {name} ({kind}), not a Storage SOP Class"
        raise ValueError(msg)
    return value


def resolve(entries: Iterable[str]) -> list[str]:
    """The SOP Class UIDs that *entries* (checked by :func:`check_entry`) stand for, each once,
    in their order (``storage`` expands to :func:`storage_sop_classes`)."""
    uids: dict[str, None] = {}
    for entry in entries:
        uids.update(dict.fromkeys(storage_sop_classes() if entry == STORAGE else [entry]))
    return list(uids)


def register_storage(uids: Iterable[str]) -> None:
    """Make pynetdicom serve C-STORE for each of *uids* (retired or private classes it does not
    file under its Storage Service Class). Idempotent; keywords are made from the UID, so no
    name of ``pynetdicom.sop_class`` is ever replaced."""
    from pynetdicom.service_class import StorageServiceClass  # noqa: PLC0415
    from pynetdicom.sop_class import register_uid, uid_to_service_class  # noqa: PLC0415

    for uid in uids:
        if not issubclass(uid_to_service_class(uid), StorageServiceClass):
            register_uid(uid, "AnonproxyStorage_" + uid.replace(".", "_"), StorageServiceClass)

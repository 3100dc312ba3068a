"""listen.sop_classes: every Storage SOP Class, retired ones included; additions, restrictions,
validation that names the key; the SCP's supported contexts."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom._uid_dict import UID_dictionary
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from anonproxy import sop_classes
from anonproxy.config import parse_settings
from anonproxy.errors import ConfigError

CT = "1.2.840.10008.5.1.4.1.1.2"
RETIRED = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.5": "Nuclear Medicine Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.3": "X-Ray Angiographic Bi-Plane Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1": "VL Image Storage - Trial",
    "1.2.840.10008.5.1.4.1.1.88.4": "Comprehensive SR Storage - Trial",
}


def test_every_storage_class_of_pynetdicom_and_the_retired_ones() -> None:
    storage = set(sop_classes.storage_sop_classes())
    assert {str(c.abstract_syntax) for c in AllStoragePresentationContexts} <= storage
    for uid, name in RETIRED.items():
        assert uid in storage
        assert UID_dictionary[uid][0] == name
        assert UID_dictionary[uid][3] == "Retired"
    retired = [uid for uid in storage if uid in UID_dictionary and UID_dictionary[uid][3]]
    assert len(retired) >= 20


def test_no_service_that_is_not_c_store() -> None:
    storage = set(sop_classes.storage_sop_classes())
    for uid in (
        "1.2.840.10008.1.1",  # Verification
        "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
        "1.2.840.10008.1.20.2",  # Storage Commitment Pull Model (retired)
        "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR)
        "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Query/Retrieve - FIND
    ):
        assert uid not in storage
    assert all(UID_dictionary.get(uid, ("", "SOP Class"))[1] == "SOP Class" for uid in storage)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (None, ["storage"]),
        (["storage", "1.2.3.4.5", "storage"], ["storage", "1.2.3.4.5"]),
        ([CT], [CT]),
    ],
)
def test_config_entries(entries: list[str] | None, expected: list[str]) -> None:
    listen: dict[str, Any] = {} if entries is None else {"sop_classes": entries}
    assert parse_settings({"listen": listen}).listen.sop_classes == expected


@pytest.mark.parametrize(
    ("entries", "detail"),
    [
        (["STORAGE-ALL"], "neither 'storage' nor a SOP Class UID"),
        (["1.2.840.10008.5.1.4.1.1.2x"], "digits and dots"),
        (["1." + "2" * 64], "at most 64"),
        (["1..2"], "digits and dots"),
        (["1.2.840.10008.1.2.1"], "Explicit VR Little Endian (Transfer Syntax), not a Storage"),
        (["1.2.840.10008.1.20.1"], "not a Storage SOP Class"),
        ([1.2], "valid string"),  # YAML reads 1.2 as a number
        ([], "at least 1"),
    ],
)
def test_config_rejects_a_bad_entry_naming_the_key(entries: list[Any], detail: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"listen": {"sop_classes": entries}})
    assert "listen.sop_classes" in str(error.value)
    assert detail in str(error.value)


def test_resolve_expands_storage_once_and_keeps_order() -> None:
    every = sop_classes.resolve(["storage"])
    assert every == list(sop_classes.storage_sop_classes())
    assert sop_classes.resolve(["1.2.3.4.5", "storage", CT]) == ["1.2.3.4.5", *every]
    assert sop_classes.resolve([CT]) == [CT]


def test_retired_and_private_classes_are_served_as_storage() -> None:
    private = "1.2.3.4.5.999"
    sop_classes.register_storage([*sop_classes.storage_sop_classes(), private])
    sop_classes.register_storage([private])  # idempotent
    for uid in [*sop_classes.storage_sop_classes(), private]:
        assert issubclass(uid_to_service_class(uid), StorageServiceClass), uid


def test_the_scp_supports_the_configured_classes_and_verification(tmp_path: Any) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from anonproxy.scp import StorageSCP

    def supported(listen: dict[str, Any]) -> list[str]:
        settings = parse_settings({"listen": listen})
        scp = StorageSCP.__new__(StorageSCP)
        scp.config = settings.listen
        return [str(cx.abstract_syntax) for cx in scp._build_ae().supported_contexts]

    every = supported({})
    assert len(every) == len(sop_classes.storage_sop_classes()) + 1
    assert Verification in every
    assert "1.2.840.10008.5.1.4.1.1.6" in every
    assert sorted(supported({"sop_classes": [CT]})) == sorted([CT, Verification])
    assert "1.2.3.4.5" in supported({"sop_classes": ["storage", "1.2.3.4.5"]})

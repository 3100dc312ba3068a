"""De-identification under DICOM PS3.15 Annex E (Table E.1-1, edition 2026d).

Pure and thread-safe: no networking, no logging, no value of a dataset in any message.

>>> from anonproxy.deid import Profile, Deidentifier
>>> deid = Deidentifier(Profile.from_options(["retain_uids"]), secret=b"...")  # doctest: +SKIP
>>> result = deid.deidentify(ds)  # doctest: +SKIP
"""

from anonproxy.deid.actions import ActionCode
from anonproxy.deid.engine import Deidentifier, DeidResult, read_instance, write_instance
from anonproxy.deid.profile import Profile, ProfileOption
from anonproxy.deid.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "ActionCode",
    "DeidResult",
    "Deidentifier",
    "Profile",
    "ProfileOption",
    "read_instance",
    "write_instance",
]

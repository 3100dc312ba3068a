"""DIMSE status codes used by anonproxy, named after PS3.4 and PS3.7.

Handlers return these members; no bare hexadecimal status appears anywhere else.
"""

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    """The instance is de-identified and durably spooled."""

    OUT_OF_RESOURCES = 0xA700
    """Refused, Out of Resources: the spool cannot take the instance now; retry later."""

    INSTANCE_TOO_LARGE = 0xA701
    """Refused, Out of Resources (anonproxy sub-code): the data set (inflated, when deflated) is
    larger than ``listen.max_instance_bytes``. PS3.4 B.2.3 names this case Out of Resources; the
    sub-code tells it apart from a full spool (0xA700), since retrying will not help."""

    CANNOT_UNDERSTAND = 0xC000
    """Error, Cannot Understand: the data set cannot be parsed."""

    DEIDENTIFICATION_FAILED = 0xC001
    """Error, Cannot Understand (anonproxy sub-code): the instance cannot be fully de-identified,
    or it is refused by the profile's policy (e.g. burned-in annotation); it is not forwarded."""

    NO_ROUTE = 0xC002
    """Error, Cannot Understand (anonproxy sub-code): no configured route takes this instance."""

    PROCESSING_FAILURE = 0x0110
    """PS3.7 C.4.2: an unexpected failure while processing the instance."""


class EchoStatus(IntEnum):
    """C-ECHO response statuses (PS3.7 Annex C)."""

    SUCCESS = 0x0000

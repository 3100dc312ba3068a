"""Exceptions of anonproxy.

Messages never carry a value from a dataset: they name attributes (tag or keyword), counts and
reasons, so that they can be logged, audited and sent as an ErrorComment.
"""


class AnonproxyError(Exception):
    """Base class of every error anonproxy raises on purpose."""


class ConfigError(AnonproxyError):
    """The configuration is invalid; the message names the key."""


class DecodeError(AnonproxyError):
    """A received dataset cannot be parsed."""


class LimitExceeded(DecodeError):
    """A data set exceeds a configured limit (its message names the limit only)."""


class StructureError(DecodeError):
    """A data set breaks a rule of its encoding checked before de-identification: an unknown
    VR, a truncated value, an odd value length, an unknown Specific Character Set."""


class InputUnreadable(AnonproxyError, OSError):
    """An instance file cannot be read at all (missing, not permitted, not a file): the
    operating system's error, without the path."""


class DeidentificationError(AnonproxyError):
    """An instance cannot be fully de-identified; it must not be forwarded."""


class PolicyRefusal(DeidentificationError):
    """The profile's policy refuses the instance (e.g. Burned In Annotation YES under
    ``burned_in_annotation: reject``); the message names the policy, never a value."""


class EncodeError(AnonproxyError):
    """The de-identified data set cannot be encoded; it must not be released."""


class SpoolFullError(AnonproxyError):
    """The spool cannot take the instance durably (quota, disk space or I/O error)."""


class ForwardError(AnonproxyError):
    """A destination did not take an instance."""

    def __init__(self, message: str, *, permanent: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status  # the destination's DIMSE status, when it answered one


class TransientError(AnonproxyError):
    """A resource the instance needs is unavailable now; the sender retries later (0xA700)."""


class StateUnavailable(TransientError):
    """The state store (``state:``) cannot be reached or did not answer in time."""

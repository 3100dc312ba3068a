"""The identifying values of a study before and after de-identification, as data.

The engine returns them with each result (:attr:`~anonproxy.deid.engine.DeidResult.identity`)
so that a caller keeping a re-identification map (``anonproxy.remap``) can record which
original patient and study a pseudonym stands for. They are values of the data set: the
engine never logs them, their ``repr`` hides the originals, and whoever receives them must
keep them out of logs, audit records, metrics, exceptions and file names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pydicom import Dataset

from anonproxy.deid.structure import get_decoded

#: The top-level attributes recorded, as (keyword, tag).
IDENTIFYING: tuple[tuple[str, int], ...] = (
    ("patient_id", 0x00100020),
    ("patient_name", 0x00100010),
    ("accession_number", 0x00080050),
    ("study_instance_uid", 0x0020000D),
    ("study_date", 0x00080020),
)


@dataclass(frozen=True, slots=True)
class StudyValues:
    """Patient ID, Patient's Name, Accession Number, Study Instance UID and Study Date of one
    data set (top level; an absent or empty attribute is the empty string)."""

    patient_id: str
    patient_name: str
    accession_number: str
    study_instance_uid: str
    study_date: str

    @classmethod
    def of(cls, ds: Dataset) -> StudyValues:
        """The values of *ds* (its top level), as text, trailing padding removed."""
        values: list[str] = []
        for _, tag in IDENTIFYING:  # the order of the fields
            elem = get_decoded(ds, tag)
            value = None if elem is None else elem.value
            values.append("" if value is None else str(value).strip("\x00 "))
        return cls(*values)

    def __repr__(self) -> str:  # values of a data set (originals, or pseudonyms): never shown
        return "StudyValues(<redacted>)"

    def as_dict(self) -> dict[str, str]:
        """The values by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class StudyIdentity:
    """What one instance's study was (*original*) and became (*pseudonym*)."""

    original: StudyValues
    pseudonym: StudyValues

    def __repr__(self) -> str:
        return "StudyIdentity(original=<redacted>, pseudonym=<redacted>)"

"""De-identification under DICOM PS3.15 Annex E (Table E.1-1, edition 2026d).

Pure and thread-safe: no networking, no logging, no value of a dataset in any message.

Python API for embedders — the same code path as ``anonproxy serve`` and ``anonproxy deidentify``.
Build a profile from options, presets and rules (the YAML forms of ``profile:``), then an engine
keyed by your secret (keep it: the same secret gives the same UIDs, dates and pseudonyms):

>>> from pydicom import Dataset
>>> from anonproxy.deid import Deidentifier, Profile
>>> profile = Profile.from_options(
...     ["retain_longitudinal_temporal_information_modified_dates"],
...     presets=["CleanDesc"],
...     rules=[
...         {"keyword": "StudyDescription", "action": "keep"},
...         {"keyword": "AccessionNumber", "action": "hash"},
...         {"private_creator": "ACME 1.0", "element": 0x10, "action": "keep"},
...     ],
... )
>>> deid = Deidentifier(profile, secret=b"a long random secret", date_shift_days=(-30, -1))

De-identify a pydicom Dataset in place; the result carries the new UIDs and counts per action
(``X``, ``Z``, ``U``, ... for the profile, ``rule:<action>`` and ``pseudonym``), never a value:

>>> ds = Dataset()
>>> ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
>>> ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9.1"
>>> ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9.2"
>>> ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9.3"
>>> ds.PatientName = "Doe^Jane"
>>> ds.PatientID = "MRN-12345"
>>> ds.AccessionNumber = "A-778899"
>>> ds.StudyDescription = "CT chest"
>>> result = deid.deidentify(ds)
>>> ds.PatientName, ds.StudyDescription, ds.PatientIdentityRemoved
('', 'CT chest', 'YES')
>>> len(ds.AccessionNumber), result.action_counts["rule:keep"], result.action_counts["rule:hash"]
(16, 1, 1)
>>> result.sop_instance_uid.startswith("2.25."), result.action_counts["U"]
(True, 3)

With patient pseudonyms (the settings of ``profile.patient_id``); and a file in, a file out
(written atomically):

>>> import tempfile
>>> from pathlib import Path
>>> pseudonyms = PatientPseudonyms.build(format="P-{hash:8}")
>>> deid = Deidentifier(
...     Profile.from_options([], presets=["RetainUIDs"], patient_ids=pseudonyms),
...     secret=b"a long random secret",
... )
>>> folder = Path(tempfile.mkdtemp())
>>> ds.PatientID = "MRN-12345"
>>> ds.save_as(folder / "in.dcm", implicit_vr=True, little_endian=True)
>>> result = deid.deidentify_file(folder / "in.dcm", folder / "out" / "deid.dcm")
>>> out = read_instance(folder / "out" / "deid.dcm")  # or pydicom.dcmread
>>> out.PatientID.startswith("P-"), len(out.PatientID), out.PatientID == str(out.PatientName)
(True, 10, True)

A file goes the way ``anonproxy serve`` and ``anonproxy deidentify`` take it
(:mod:`anonproxy.deid.instance`): its structure is checked first (:class:`Limits`: sequence
nesting, inflated size), then the profile's ``burned_in_annotation`` policy applies: an
instance that declares Burned In Annotation YES is refused (``"reject"``, the default) or
de-identified as any other (``"pass"``):

>>> from anonproxy.errors import PolicyRefusal
>>> ds.BurnedInAnnotation = "YES"
>>> ds.save_as(folder / "burned.dcm", implicit_vr=True, little_endian=True)
>>> try:
...     deid.deidentify_file(folder / "burned.dcm", folder / "out" / "burned.dcm")
... except PolicyRefusal as refusal:
...     print(refusal)
burned-in annotation refused by policy
>>> passing = Deidentifier(Profile(burned_in_annotation="pass"), secret=b"a long random secret")
>>> result = passing.deidentify_file(folder / "burned.dcm", folder / "out" / "burned.dcm")
>>> result.burned_in_annotation
'YES'

Errors: :class:`~anonproxy.errors.DeidentificationError` (the instance must not be released;
the message names the attribute, never a value; :class:`~anonproxy.errors.PolicyRefusal` is
one), :class:`~anonproxy.errors.DecodeError` for a file that is not DICOM
(:class:`~anonproxy.errors.LimitExceeded` and :class:`~anonproxy.errors.StructureError` past
the limits), :class:`~anonproxy.errors.InputUnreadable` (an OSError) for a file that cannot be
read, :class:`~anonproxy.errors.EncodeError` and OSError when the output cannot be written,
ValueError for a bad option, preset or rule.
"""

from anonproxy.deid.actions import ActionCode
from anonproxy.deid.engine import Deidentifier, DeidResult
from anonproxy.deid.files import read_header, read_instance, write_instance
from anonproxy.deid.instance import Limits
from anonproxy.deid.profile import PRESETS, Profile, ProfileOption
from anonproxy.deid.pseudonyms import PatientPseudonyms
from anonproxy.deid.rules import Rule, RuleAction
from anonproxy.deid.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "PRESETS",
    "ActionCode",
    "DeidResult",
    "Deidentifier",
    "Limits",
    "PatientPseudonyms",
    "Profile",
    "ProfileOption",
    "Rule",
    "RuleAction",
    "read_header",
    "read_instance",
    "write_instance",
]

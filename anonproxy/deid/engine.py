"""The de-identification engine: applies a :class:`~anonproxy.deid.profile.Profile` to datasets.

One :class:`Deidentifier` is built at start-up and shared by every association thread: it holds
only immutable, precomputed data (effective code per tag, allow-lists, keys), and all per-call
state lives in a :class:`_Run` local to :meth:`Deidentifier.deidentify`.

Order of work for one instance:

1. check that SOP Class, SOP Instance, Study Instance and Series Instance UIDs are present
   (every composite IOD requires them; the spool files instances by them);
2. collect the identifying values of the whole data set, at every depth, for cleaning and for
   the self-check (:mod:`anonproxy.deid.selfcheck`);
3. walk the dataset recursively (every sequence item, at every depth): for each attribute take
   the first rule that applies:

   * a **user rule** (:mod:`anonproxy.deid.rules`; first matching rule in file order) on a
     public attribute or a private data element: its action (counted as ``rule:<action>``);
   * the **patient pseudonyms** (:mod:`anonproxy.deid.pseudonyms`), if configured, on the
     top-level Patient ID and Patient's Name (counted as ``pseudonym``);
   * private (odd group): removed (X), unless Retain Safe Private is on and the attribute is in
     Table E.3.10-1 for its private creator; a private creator element is kept when an element
     of its block is kept (by Retain Safe Private or a user rule);
   * group length ``(gggg,0000)``: removed (retired, and stale after de-identification);
   * a row of Table E.1-1 (exact tag, or the masks (50xx,xxxx), (60xx,3000), (60xx,4000)):
     the profile's effective code, compound codes (and X on an attribute the IOD requires at
     that position) resolved by the Type in the IOD (:func:`anonproxy.deid.actions.resolve`);
   * otherwise by :meth:`Deidentifier._code_outside_table`, in the mode of the position
     (:class:`_Mode`): inside a sequence whose action is D every value is dummied or mapped,
     inside one whose action is C text is cleaned; elsewhere the IOD of the SOP Class decides
     (text, names and binary values it does not define at that nesting position are removed);
     unknown and retired attributes are removed everywhere;

   the table's decision for a public attribute (the last two rules) is a function of the
   profile, the SOP Class, the parent sequences, the mode, the tag and the VR the element is
   held with, so the engine makes it once per position and keeps it (bounded); an element
   the table leaves as received with an explicit VR is never decoded;
4. file meta: Media Storage SOP Instance UID := the new SOP Instance UID; Source, Sending and
   Receiving AE Titles and the private information removed; Implementation Class UID and
   Version Name set to anonproxy's;
5. Patient Identity Removed, De-identification Method (+ Code Sequence, CID 7050) and
   Longitudinal Temporal Information Modified are set;
6. the **self-check** (:class:`~anonproxy.deid.selfcheck.SelfCheck`) searches the encoded
   output for the identifying values and the original UIDs: :meth:`Deidentifier.deidentify`
   encodes the data set for it, :meth:`Deidentifier.deidentify_with_check` leaves it to the
   writer (:func:`anonproxy.deid.files.write_spliced`), which checks the bytes it writes. A
   finding raises :class:`~anonproxy.errors.DeidentificationError`.

The actions:

* **X** remove; **K** keep (sequences are still walked);
* **Z** zero-length value (an empty sequence for SQ); D instead in a Type 1 context;
* **D** a dummy valid for the VR and VM (:data:`anonproxy.deid.actions.DUMMY_BY_VR`); UI gets
  the mapped UID; sequences keep their items, whose content is dummied (:attr:`_Mode.DUMMY`);
* **U** every value mapped by :class:`~anonproxy.deid.uids.UidRemapper` (well-known UIDs kept);
  sequences are walked so that the UIDs inside them are mapped by their own rows;
* **C** clean, by VR: DA and DT shifted by the per-patient offset
  (:class:`~anonproxy.deid.dates.DateShifter`); TM, CS and numbers kept; text (LO, LT, PN, SH,
  ST, UC, UT) has the identifying values of the instance deleted
  (:meth:`~anonproxy.deid.selfcheck.IdentifyingValues.scrub`), then what
  :data:`IDENTIFYING_PATTERNS` and the site's ``clean_patterns`` match; UI mapped; sequences
  keep their items, whose content is cleaned (:attr:`_Mode.CLEAN`).
  **Fallback:** what cannot be cleaned yet — AE titles, binary values (curve data, overlay
  data, OB/OW/UN) and dates that do not parse — gets the action of the Basic Profile code of
  its row instead (always a de-identifying action).

If any step fails the dataset is left partly modified and must be discarded; the error names
the attribute (tag/keyword), never a value.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from types import MappingProxyType
from typing import Final

from pydicom import config as pydicom_config
from pydicom.datadict import (
    dictionary_is_retired,
    dictionary_VR,
    keyword_for_tag,
    tag_for_keyword,
)
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import VR, validate_value

from anonproxy.deid.actions import UNKNOWN_IOD, ActionCode, dummy_value, resolve
from anonproxy.deid.burned_in import PixelText
from anonproxy.deid.codes import (
    DATES_MODIFIED,
    DATES_REMOVED,
    DATES_UNMODIFIED,
    METHOD_BY,
    METHOD_STRICT,
    PATIENT_IDENTITY_REMOVED,
)
from anonproxy.deid.dates import DEFAULT_SHIFT_DAYS, DateShifter
from anonproxy.deid.files import encode_without_pixels
from anonproxy.deid.identity import StudyIdentity, StudyValues
from anonproxy.deid.instance import DEFAULT_LIMITS, Limits, deidentify_file
from anonproxy.deid.profile import BASIC_PROFILE_CODE, Profile, ProfileOption
from anonproxy.deid.pseudonyms import Pseudonymizer
from anonproxy.deid.rules import Rule, RuleAction, RuleHasher, first_match
from anonproxy.deid.selfcheck import IdentifyingValues, SelfCheck
from anonproxy.deid.structure import (
    MIRRORS_PYDICOM as _MIRRORS_PYDICOM,
)
from anonproxy.deid.structure import (
    as_held,
    decoded,
    dictionary_sequence,
    get_decoded,
)
from anonproxy.deid.structure import dictionary_keyword as _keyword  # the walk's short name
from anonproxy.deid.tables import (
    any_iod_paths,
    iod_types,
    retired_allowlist,
    safe_private_attributes,
    strict_allowlist,
    table_e1_1,
)
from anonproxy.deid.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    UidRemapper,
)
from anonproxy.errors import DeidentificationError, TransientError

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_BURNED_IN_ANNOTATION = 0x00280301
_CODE_VALUE = 0x00080100
_CODING_SCHEME_DESIGNATOR = 0x00080102
_CODE_MEANING = 0x00080104

#: File meta attributes removed: AE titles of the peers and the private information.
_META_REMOVED = frozenset(
    {
        0x00020016,  # Source Application Entity Title
        0x00020017,  # Sending Application Entity Title
        0x00020018,  # Receiving Application Entity Title
        0x00020100,  # Private Information Creator UID
        0x00020102,  # Private Information
    }
)

#: VR members bound once (see _AS_RECEIVED)
_SQ, _UI = VR.SQ, VR.UI
#: VRs of text values (person names apart).
_TEXT_VRS = frozenset({VR.AE, VR.LO, VR.LT, VR.SH, VR.ST, VR.UC, VR.UR, VR.UT})
_BINARY_VRS = frozenset({VR.OB, VR.OD, VR.OF, VR.OL, VR.OV, VR.OW, VR.UN})
_CLEANABLE_TEXT_VRS = frozenset({VR.LO, VR.LT, VR.PN, VR.SH, VR.ST, VR.UC, VR.UT})
_KEPT_BY_CLEAN_VRS = frozenset(
    {VR.TM, VR.CS, VR.AS, VR.DS, VR.IS, VR.US, VR.SS, VR.UL, VR.SL, VR.UV, VR.SV, VR.FL,
     VR.FD, VR.AT}
)  # fmt: skip
#: The Code Sequence Macro (PS3.3 8.8): kept in the items of a code sequence that names a
#: concept (Concept Name Code Sequence, units...) inside dummied or cleaned content.
_CODE_MACRO_TAGS = frozenset(
    tag_for_keyword(keyword) or 0
    for keyword in (
        "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
        "LongCodeValue", "URNCodeValue", "ContextIdentifier", "ContextUID", "MappingResource",
        "MappingResourceUID", "MappingResourceName", "ContextGroupVersion",
        "ContextGroupExtensionFlag", "ContextGroupLocalVersion",
        "ContextGroupExtensionCreatorUID", "EquivalentCodeSequence",
    )
)  # fmt: skip
#: Attributes that may keep identifying values when a profile option or rule says K.
_SELF_CHECK_UID_TAGS = {
    _SOP_INSTANCE_UID: "SOPInstanceUID",
    _STUDY_INSTANCE_UID: "StudyInstanceUID",
    _SERIES_INSTANCE_UID: "SeriesInstanceUID",
}
_REQUIRED_TYPES = frozenset({"1", "1C", "2", "2C"})

_STREET_TYPES = (
    "Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Boulevard|Blvd|Way|Court|Ct|Place|Pl|"
    "Square|Sq|Terrace|Close|Crescent|Parkway|Highway|Hwy|Strasse|Straße|Weg|Platz|Gasse|Allee"
)
#: What identifies a person in free text whatever the instance holds; removed from the text the
#: C (clean) action keeps, before the site's ``clean_patterns``: telephone numbers (7 digits
#: or more, with any separators), e-mail addresses, a title followed by capitalised names,
#: house number and street, and a record-number label followed by its number.
IDENTIFYING_PATTERNS: Mapping[str, re.Pattern[str]] = MappingProxyType(
    {
        "telephone number": re.compile(r"(?<![\w.])\+?\d(?:[\s\-./()]*\d){6,}(?![\w])"),
        "e-mail address": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
        "titled name": re.compile(
            r"\b(?:Dr|Drs|Mr|Mrs|Ms|Mx|Miss|Prof|Professor|Doctor|Nurse|Sister)\b\.?"
            r"(?:\s+[A-Z][\w'-]*\.?){1,3}"
        ),
        "street address": re.compile(
            rf"\b\d+[A-Za-z]?,?\s+(?:[A-Z][\w'-]*\s+){{0,4}}(?:{_STREET_TYPES})\b\.?"
        ),
        "record number": re.compile(
            r"\b(?:MRN|MR#|ID|PID|Acc(?:ession)?(?:\s+(?:No|Number))?)\b\.?\s*[:#]?\s*"
            r"[A-Za-z0-9-]*\d[A-Za-z0-9-]*",
            re.IGNORECASE,
        ),
    }
)

_STRING_VRS = frozenset(
    {VR.AE, VR.AS, VR.CS, VR.DA, VR.DS, VR.DT, VR.IS, VR.LO, VR.LT, VR.PN, VR.SH, VR.ST, VR.TM,
     VR.UC, VR.UI, VR.UR, VR.UT}
)  # fmt: skip
_INT_VRS = frozenset({VR.US, VR.SS, VR.UL, VR.SL, VR.UV, VR.SV})
_FLOAT_VRS = frozenset({VR.FL, VR.FD})
_DATE_VRS = frozenset({VR.DA, VR.DT})
_TIME_VRS = frozenset({VR.DA, VR.DT, VR.TM})
_PSEUDONYM_KEY = "pseudonym"

_LONGITUDINAL = {
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES: DATES_UNMODIFIED,
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES: DATES_MODIFIED,
}


@dataclass(frozen=True)
class DeidResult:
    """What happened to one instance; carries UIDs and counts, never an original value."""

    action_counts: dict[str, int]
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    original_sop_instance_uid_hash: str
    burned_in_annotation: str | None
    #: the study's identifying values before and after (for a re-identification map; hidden
    #: from ``repr``, never logged)
    identity: StudyIdentity | None = field(default=None, repr=False, compare=False)


#: Bounds of the decisions an engine keeps (:meth:`Deidentifier._decisions_at`): positions
#: (SOP Class, parent sequences, mode), and decisions per position (tags and VRs; also the
#: bound of the per-tag memos); at most their product, some 40 MB, whatever the senders send.
_MAX_POSITIONS = 512
_MAX_DECISIONS = 512


class _Kept(Enum):
    """A public attribute the table leaves as it is (no action counted)."""

    AS_RECEIVED = "as received"  # explicit VR, not a sequence: never decoded
    WALKED = "walked"  # a sequence, or implicit VR: decoded, items walked


#: Members bound once: an attribute of an enum class costs ~0.1 us a look-up, and the walk and
#: _apply look them up for every element
_AS_RECEIVED: Final = _Kept.AS_RECEIVED
_WALKED: Final = _Kept.WALKED
_X: Final = ActionCode.X
_K: Final = ActionCode.K
_Z: Final = ActionCode.Z
_D: Final = ActionCode.D
_U: Final = ActionCode.U


class _Mode(Enum):
    """How the attributes that Table E.1-1 does not name are treated at a position."""

    TABLE = "table"  # the IOD decides: text, names and binary values it does not define go
    DUMMY = "dummy"  # inside a sequence whose action is D: every value is dummied or mapped
    CLEAN = "clean"  # inside a sequence whose action is C: text is cleaned, UIDs mapped


@dataclass
class _Run:
    """Per-call state of one :meth:`Deidentifier.deidentify`."""

    iod: dict[str, str] | None
    ids: IdentifyingValues
    date_offset: int
    sop_class: str = ""
    pseudonyms: tuple[str, str] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    where: int = 0
    mapped_uids: dict[str, str] = field(default_factory=dict)  # original → keyword

    def defines(self, path: str) -> bool:
        """True if the IOD of the instance (any IOD, for an unknown SOP Class) defines the
        attribute at keyword path ``path``."""
        return path in (self.iod if self.iod is not None else any_iod_paths())


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _where(tag: int) -> str:
    keyword = keyword_for_tag(tag)
    return f"{keyword} {_tag_text(tag)}" if keyword else _tag_text(tag)


@lru_cache(maxsize=4096)
def _unknown_or_retired(tag: int) -> bool:
    """True if ``tag`` is not in the public data dictionary or is retired."""
    try:
        return bool(dictionary_is_retired(tag))
    except KeyError:
        return True


def _vr_of(held_vr: str | None, tag: int) -> str:
    """The VR of an element as held (received, explicit VR), else from the dictionary; UN if
    unknown. The first VR of an ambiguous one. A sequence received as UN is SQ: pydicom
    decodes it by the dictionary, items and all."""
    if held_vr == VR.UN and dictionary_sequence(tag):
        return VR.SQ
    return _first_vr(str(held_vr)) if held_vr else (_first_vr(_dictionary_vr(tag)) or VR.UN)


def _first_vr(vr: str) -> str:
    """The first VR of an ambiguous one ("US or SS" → "US")."""
    return vr.split(" or ", 1)[0]


class Deidentifier:
    """Applies a profile to datasets; thread-safe, one instance shared by all associations.

    ``secret`` keys the UID mapping, the date offsets, the patient pseudonyms, the ``hash``
    rule action and the original-UID hash; the same secret gives the same results on every
    machine and run. ``date_shift_days`` is the inclusive range of the per-patient date offset
    used under the modified-dates option and by ``shift_date`` rules.
    """

    def __init__(
        self,
        profile: Profile,
        secret: bytes,
        *,
        date_shift_days: tuple[int, int] = DEFAULT_SHIFT_DAYS,
        clean_patterns: Iterable[str] = (),
    ) -> None:
        self._profile = profile
        self._clean_patterns = tuple(re.compile(p, re.IGNORECASE) for p in clean_patterns)
        self._uids = UidRemapper(secret)
        self._dates = DateShifter(secret, date_shift_days)
        self._tag_codes = dict(profile.tag_codes)
        self._basic_codes = {row.value: row.basic for row in table_e1_1() if row.match == "tag"}
        self._retain_safe_private = profile.private_code != ActionCode.X
        self._safe_private = safe_private_attributes() if self._retain_safe_private else None
        self._allow = strict_allowlist() if profile.strict else None
        self._rules = profile.rules
        self._private_rules = any(r.is_private for r in profile.rules)
        #: first public rule per tag (None: no rule), filled as tags are met; None: no rules
        self._public_rules: dict[int, Rule | None] | None = (
            {} if any(not r.is_private for r in profile.rules) else None
        )
        #: _kept_by_profile per tag, filled as tags are met (bounded)
        self._kept: dict[int, bool] = {}
        #: table decisions per position, filled by _walk (bounded; see _decisions_at)
        self._decisions: dict[
            tuple[str, tuple[str, ...], _Mode], dict[tuple[int, str | None], ActionCode | _Kept]
        ] = {}
        self._hasher = RuleHasher(secret)
        self._pseudonyms = (
            Pseudonymizer(profile.patient_ids, secret) if profile.patient_ids else None
        )
        self._retired_kept = retired_allowlist()
        self._row_keywords = frozenset(
            row.keyword for row in table_e1_1() if row.match == "tag" and row.keyword
        )
        options = profile.options
        self._full_dates = (
            ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES in options
        )
        self._modified_dates = (
            ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES in options
        )
        self._method = [METHOD_BY, BASIC_PROFILE_CODE.meaning] + [
            o.code.meaning for o in profile.ordered_options
        ]
        if profile.strict:
            self._method.append(METHOD_STRICT)
        if profile.patient_ids is not None:
            self._method.append(f"patient pseudonyms ({profile.patient_ids.method.value})")
        if profile.rules:
            self._method.append(f"{len(profile.rules)} user rule(s)")
        self._method_codes = [BASIC_PROFILE_CODE] + [o.code for o in profile.ordered_options]
        self._longitudinal = next(
            (v for o, v in _LONGITUDINAL.items() if o in profile.options), self._rule_dates()
        )

    def _kept_by_profile(self, tag: int) -> bool:
        """True if the profile keeps ``tag`` as received (K, or a ``keep`` user rule)."""
        kept = self._kept.get(tag)
        if kept is None:
            rule = first_match(self._rules, tag, None)
            if rule is not None:
                kept = rule.action is RuleAction.KEEP
            else:
                kept = self._tag_codes.get(tag) == ActionCode.K
            if len(self._kept) < _MAX_DECISIONS:
                self._kept[tag] = kept
        return kept

    def _rule_dates(self) -> str:
        """Longitudinal Temporal Information Modified without a longitudinal option."""
        if any(r.action is RuleAction.SHIFT_DATE for r in self._rules):
            return DATES_MODIFIED
        if any(
            r.action is RuleAction.KEEP
            and (tag := r.exact_tag) is not None
            and _dictionary_vr(tag) in _DATE_VRS
            for r in self._rules
        ):
            return DATES_UNMODIFIED
        return DATES_REMOVED

    def defines(self, sop_class_uid: str, tag: int) -> bool:
        """True if the IOD of ``sop_class_uid`` (some IOD, for a SOP Class the data does not
        know) defines the attribute ``tag`` at the top level of a data set: a pixel data
        element it does not define is not written (see :mod:`anonproxy.deid.instance`)."""
        iod = iod_types(sop_class_uid)
        return _keyword(tag) in (iod if iod is not None else any_iod_paths())

    def find_identifying(self, ds: Dataset, text: str) -> str | None:
        """What in ``text`` identifies someone, or None: the keyword of an identifying value of
        the instance ``ds`` (read before de-identification) or the kind of an
        :data:`IDENTIFYING_PATTERNS` match. Used on payloads that cannot be cleaned (encapsulated
        documents, :mod:`anonproxy.deid.documents`)."""
        found = self.identifying_values(ds).find(text)
        if found is not None:
            return found
        return next((kind for kind, p in IDENTIFYING_PATTERNS.items() if p.search(text)), None)

    def identifying_values(self, ds: Dataset) -> IdentifyingValues:
        """The identifying values of ``ds`` (read before de-identification) that the profile
        does not keep as received; the birth date unless dates are kept whole."""
        return IdentifyingValues.collect(ds, self._kept_by_profile, birth_date=not self._full_dates)

    def pixel_text(self, ds: Dataset) -> PixelText:
        """What makes burned-in text in the pixels of ``ds`` (read before de-identification)
        identifying: its identifying values, :data:`IDENTIFYING_PATTERNS`, and dates unless
        they are kept whole (:mod:`anonproxy.deid.burned_in`)."""
        return PixelText.of(
            ds,
            self.identifying_values(ds),
            dict(IDENTIFYING_PATTERNS),
            dates=not self._full_dates,
        )

    @property
    def profile(self) -> Profile:
        """The profile this engine applies."""
        return self._profile

    # -- public API -------------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> DeidResult:
        """De-identify ``ds`` (and ``ds.file_meta``, if any) in place, then run the self-check
        on its encoding (every element but the pixel data).

        Raises DeidentificationError when the instance cannot be fully de-identified; the
        dataset must then be discarded.
        """
        result, check = self.deidentify_with_check(ds)
        try:
            encoded = encode_without_pixels(ds)
        except Exception as exc:  # noqa: BLE001 - an encoding failure is never released
            raise DeidentificationError(f"cannot encode ({type(exc).__name__})") from None
        finding = check.finding(encoded)
        if finding is not None:
            raise DeidentificationError(finding)
        return result

    def deidentify_with_check(self, ds: Dataset) -> tuple[DeidResult, SelfCheck]:
        """De-identify ``ds`` in place, like :meth:`deidentify`, but leave the self-check to
        the caller: it must pass every encoded byte it writes, but the pixel data, to
        :meth:`SelfCheck.finding <anonproxy.deid.selfcheck.SelfCheck.finding>` and release
        nothing when that returns a finding (:func:`anonproxy.deid.files.write_spliced` does).
        """
        run: _Run | None = None
        try:
            sop_class = self._required_uid(ds, _SOP_CLASS_UID, "SOPClassUID")
            original_uids = {
                tag: self._required_uid(ds, tag, keyword)
                for tag, keyword in _SELF_CHECK_UID_TAGS.items()
            }
            original_sop = original_uids[_SOP_INSTANCE_UID]
            burned_in = get_decoded(ds, _BURNED_IN_ANNOTATION)
            burned_in_value = str(burned_in.value) if burned_in is not None else None
            patient_id = get_decoded(ds, _PATIENT_ID)
            originals = StudyValues.of(ds)
            ids = self.identifying_values(ds)
            original_id = str(patient_id.value or "") if patient_id is not None else ""
            run = _Run(
                iod=iod_types(sop_class),
                ids=ids,
                date_offset=self._dates.offset_days(original_id),
                sop_class=sop_class,
            )
            original_id = original_id.strip("\x00 ")
            if self._pseudonyms is not None and original_id:
                run.pseudonyms = self._pseudonyms.pseudonyms(original_id)
            for tag, keyword in _SELF_CHECK_UID_TAGS.items():
                if not self._kept_by_profile(tag):
                    run.mapped_uids[original_uids[tag]] = keyword
            self._walk(ds, (), run, _Mode.TABLE)
            new_sop = self._required_uid(ds, _SOP_INSTANCE_UID, "SOPInstanceUID")
            new_study = self._required_uid(ds, _STUDY_INSTANCE_UID, "StudyInstanceUID")
            new_series = self._required_uid(ds, _SERIES_INSTANCE_UID, "SeriesInstanceUID")
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                self._file_meta(meta, new_sop, run)
            self._update(ds)
            if getattr(ds, "preamble", None) is not None:
                # PS3.10 7.1: the 128-byte File Preamble is the application's, outside the data
                # set and Table E.1-1 (a sender may put a TIFF header or any text there): the
                # output's is zeros.
                ds.preamble = None
        except (DeidentificationError, TransientError):
            raise
        except Exception:  # noqa: BLE001 - any failure must become a rejection, without values
            where = _where(run.where) if run is not None and run.where else "dataset"
            raise DeidentificationError(f"cannot process {where}") from None
        result = DeidResult(
            action_counts={str(code): n for code, n in run.counts.items()},
            sop_class_uid=sop_class,
            sop_instance_uid=new_sop,
            study_instance_uid=new_study,
            series_instance_uid=new_series,
            original_sop_instance_uid_hash=self._uids.original_hash(original_sop),
            burned_in_annotation=burned_in_value,
            identity=StudyIdentity(originals, StudyValues.of(ds)),
        )
        return result, SelfCheck(run.ids, run.mapped_uids, ds)

    def deidentify_file(
        self,
        src_path: str | os.PathLike[str],
        dst_path: str | os.PathLike[str],
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> DeidResult:
        """Read ``src_path``, de-identify it and write it as a DICOM file to ``dst_path``: the
        path of ``anonproxy serve`` and ``anonproxy deidentify``
        (:func:`anonproxy.deid.instance.deidentify_file`).

        Parent directories of ``dst_path`` are created; the file is written to a temporary
        name and renamed, so ``dst_path`` never holds a partial file. A source without file
        meta (no preamble) is accepted if it is a dataset with a SOP Class UID; file meta is
        then built from its encoding. Before de-identification the structure is checked
        against ``limits`` and the profile's burned-in annotation policy is applied. Raises
        InputUnreadable (an OSError) if the source cannot be read, DecodeError if it is not
        DICOM (LimitExceeded, StructureError), PolicyRefusal, DeidentificationError as
        :meth:`deidentify`, EncodeError, OSError if the output cannot be written.
        """
        return deidentify_file(self, src_path, dst_path, limits=limits).result

    # -- walking ----------------------------------------------------------------------------

    @staticmethod
    def _required_uid(ds: Dataset, tag: int, keyword: str) -> str:
        elem = get_decoded(ds, tag)
        value = elem.value if elem is not None else None
        if not isinstance(value, str) or not value.strip("\x00 "):
            raise DeidentificationError(f"missing or invalid {keyword} {_tag_text(tag)}")
        return value.strip("\x00 ")

    def _walk(  # noqa: PLR0912 - the dispatch of every element, inline
        self, ds: Dataset, parents: tuple[str, ...], run: _Run, mode: _Mode
    ) -> None:
        # The elements as held (none decoded); each key is the Dataset's own tag object, which
        # pydicom finds without comparing tags, and its int for the engine's own tables.
        elements = [(key, int(key), as_held(ds, key, held).VR) for key, held in ds.items()]
        private_rules: dict[int, Rule] = {}
        kept_private: frozenset[int] = frozenset()
        if (self._retain_safe_private or self._private_rules) and any(
            (t >> 16) & 1 for _, t, _ in elements
        ):
            kept_private, private_rules = self._private_plan(ds, [t for _, t, _ in elements])
        rules = self._public_rules
        decisions = self._decisions_at(run.sop_class, parents, mode)
        for key, tag, held_vr in elements:
            run.where = tag
            if (tag >> 16) & 1:
                rule = private_rules.get(tag)
                kept = tag in kept_private
                if rule is None and not kept:  # most private data elements: as _private
                    del ds[key]
                    run.counts[_X] += 1
                else:
                    self._private(ds, key, rule, parents, run, kept=kept)
                continue
            if not tag & 0xFFFF:  # group length
                del ds[key]
                run.counts[_X] += 1
                continue
            if rules is not None and (rule := self._public_rule(tag)) is not None:
                self._apply_rule(ds, key, rule, parents, run, mode=mode)
                continue
            if run.pseudonyms is not None and not parents and tag in (_PATIENT_ID, _PATIENT_NAME):
                self._pseudonym(ds[key], run)
                continue
            decision = decisions.get((tag, held_vr))
            if decision is None:
                decision = self._decide(tag, held_vr, parents, run, mode)
                if len(decisions) < _MAX_DECISIONS:
                    decisions[(tag, held_vr)] = decision
            if decision is _AS_RECEIVED:
                continue
            if decision is _WALKED:
                self._keep(ds, key, parents, run, mode)  # decoded, items walked
                continue
            self._apply(ds, key, decision, parents, run, mode=mode)
        if not parents:  # the Overlay Plane module is at the top level of a data set
            self._drop_incomplete_overlays(ds, run)

    def _decisions_at(
        self, sop_class: str, parents: tuple[str, ...], mode: _Mode
    ) -> dict[tuple[int, str | None], ActionCode | _Kept]:
        """The table decisions already made at one position (SOP Class, parent sequences,
        mode) of this engine's profile, by tag and VR as held: filled by :meth:`_decide`."""
        key = (sop_class, parents, mode)
        decisions = self._decisions.get(key)
        if decisions is None:
            if len(self._decisions) >= _MAX_POSITIONS:
                self._decisions.clear()  # bounded: a sender cannot grow it without limit
            decisions = self._decisions.setdefault(key, {})
        return decisions

    def _decide(
        self, tag: int, held_vr: str | None, parents: tuple[str, ...], run: _Run, mode: _Mode
    ) -> ActionCode | _Kept:
        """What the table (Table E.1-1, its masks, then :meth:`_code_outside_table`) does with
        public attribute *tag* held with VR *held_vr* (None: implicit VR, undecoded) at this
        position: a function of the profile, the SOP Class, the parents, the mode, the tag
        and the VR only, so :meth:`_walk` keeps it per position."""
        code = self._tag_codes.get(tag)
        if code is None and 0x5000 <= tag >> 16 <= 0x60FF:
            code = self._profile.mask_code(tag)
        if code is None:
            code = self._code_outside_table(held_vr, tag, parents, run, mode)
            if code is None:  # kept as received, undecoded when its VR was explicit
                walked = not held_vr or _vr_of(held_vr, tag) == VR.SQ
                return _Kept.WALKED if walked else _Kept.AS_RECEIVED
        return self._resolve(code, tag, parents, run)

    def _public_rule(self, tag: int) -> Rule | None:
        """The first user rule that selects public attribute *tag* (None: no rule does)."""
        rules = self._public_rules
        assert rules is not None  # noqa: S101 - checked by the caller
        if tag in rules:
            return rules[tag]
        rule = first_match(self._rules, tag, None)
        if len(rules) < _MAX_DECISIONS:
            rules[tag] = rule
        return rule

    def _private(
        self,
        ds: Dataset,
        tag: int,
        rule: Rule | None,
        parents: tuple[str, ...],
        run: _Run,
        *,
        kept: bool,
    ) -> None:
        """A private data element: its user rule, else kept when safe, else removed."""
        if rule is not None:
            self._apply_rule(ds, tag, rule, parents, run, mode=_Mode.TABLE)
        elif kept:
            self._keep(ds, tag, parents, run, _Mode.TABLE)
            run.counts[ActionCode.K] += 1
        else:
            del ds[tag]
            run.counts[ActionCode.X] += 1

    @staticmethod
    def _drop_incomplete_overlays(ds: Dataset, run: _Run) -> None:
        """An overlay whose Overlay Data (60xx,3000) was removed is removed whole: the Overlay
        Plane module requires its data, so a partial overlay would make the instance
        non-conformant (the module is optional: removing it all is conformant)."""
        tags = list(ds.keys())
        groups = {t >> 16 for t in tags if 0x6000 <= t >> 16 <= 0x60FF and not t >> 16 & 1}
        for group in groups:
            if (group << 16 | 0x3000) in ds:
                continue
            for tag in tags:
                if tag >> 16 == group:
                    del ds[tag]
                    run.counts[ActionCode.X] += 1

    def _resolve(self, code: str, tag: int, parents: tuple[str, ...], run: _Run) -> ActionCode:
        """The action of ``code`` for ``tag`` at this position. Compound codes and Z by the
        attribute's Type in the IOD; X too, where the IOD requires the attribute (Type 1 or 2
        at that position, e.g. Requested Procedure ID in the items of an SR's Referenced
        Request Sequence): an empty or dummy value identifies no more than none at all."""
        if len(code) == 1 and code not in "XZ":
            return ActionCode(code)
        if run.iod is None:
            return ActionCode.X if code == "X" else resolve(code, UNKNOWN_IOD)
        type_ = run.iod.get("/".join((*parents, _keyword(tag))))
        if code == "X":
            required = type_ in _REQUIRED_TYPES and tag in self._basic_codes  # not a mask row
            return resolve("X/Z/D", type_) if required else ActionCode.X
        return resolve(code, type_)

    def _apply(
        self,
        ds: Dataset,
        tag: int,
        action: ActionCode,
        parents: tuple[str, ...],
        run: _Run,
        *,
        mode: _Mode,
    ) -> None:
        if action is _X:
            del ds[tag]
            run.counts[action] += 1
            return
        if action is _K:
            self._keep(ds, tag, parents, run, mode)
            run.counts[action] += 1
            return
        elem = decoded(ds, tag)
        if action is _Z:
            elem.value = Sequence() if elem.VR == _SQ else empty_value_for_VR(elem.VR)
        elif action is _D:
            self._dummy(elem, parents, run)
        elif action is _U:
            self._map_uids(elem, parents, run, mode)
        elif not self._clean(elem, parents, run, mode):
            # cannot clean this value: fall back to the Basic Profile code of the row, or to a
            # dummy for an attribute outside the table
            basic = self._basic_code(tag)
            self._apply(ds, tag, self._resolve(basic, tag, parents, run), parents, run, mode=mode)
            return
        run.counts[action] += 1

    def _basic_code(self, tag: int) -> str:
        basic = self._basic_codes.get(tag)
        if basic is None:  # the masks and the attributes outside the table: remove
            return "X/Z/D" if _keyword(tag) else ActionCode.X
        return basic

    def _keep(
        self, ds: Dataset, tag: int, parents: tuple[str, ...], run: _Run, mode: _Mode
    ) -> None:
        """K: the value stays, decoded (the writer encodes it as pydicom would: trailing
        padding normalised); a sequence's items are walked."""
        elem = decoded(ds, tag)
        if elem.VR == _SQ:
            self._walk_items(elem, parents, run, mode)

    def _walk_items(
        self, elem: DataElement, parents: tuple[str, ...], run: _Run, mode: _Mode
    ) -> None:
        inner = (*parents, _keyword(elem.tag))
        for item in elem.value:
            self._walk(item, inner, run, mode)
        run.where = elem.tag

    def _code_outside_table(  # noqa: PLR0911 - one return per rule of the docstring
        self, held_vr: str | None, tag: int, parents: tuple[str, ...], run: _Run, mode: _Mode
    ) -> str | None:
        """The action code of a public attribute that Table E.1-1 does not name, or None when
        it stays as received without being decoded.

        Everywhere: an attribute the data dictionary does not know is removed, whatever its
        VR, and so is a retired one (but for the shipped allow-list). Then by position:

        * in the items of a code sequence that names a concept, the Code Sequence Macro
          stays (a code sequence with a row of its own, such as Person Identification Code
          Sequence, follows its row);
        * inside a sequence whose action is D (:attr:`_Mode.DUMMY`): text, names and ages are
          dummied, dates and times dummied (shifted or kept under a longitudinal option),
          UIDs mapped, binary values removed; codes and numbers stay;
        * inside a sequence whose action is C (:attr:`_Mode.CLEAN`): text and names cleaned,
          dates shifted, UIDs mapped, binary values removed; the rest stays;
        * elsewhere (:attr:`_Mode.TABLE`): a text, person name or binary value the IOD of the
          SOP Class does not define at that nesting position is removed; a person name is
          removed, emptied or dummied by its Type; a date or time likewise (shifted under the
          modified-dates option, kept under the full-dates option); ``strict`` removes, at the
          top level, what its allow-list does not name.
        """
        vr = _vr_of(held_vr, tag)
        keyword = _keyword(tag)
        if not keyword or (_unknown_or_retired(tag) and tag not in self._retired_kept):
            return ActionCode.X
        if vr == _SQ:
            return None  # its items are walked, in the mode of its position
        if (
            mode is not _Mode.TABLE
            and tag in _CODE_MACRO_TAGS
            and parents
            and parents[-1].endswith("CodeSequence")
            and parents[-1] not in self._row_keywords
        ):
            return None
        if mode is _Mode.DUMMY:
            return self._dummy_code(vr)
        if mode is _Mode.CLEAN:
            return self._clean_code(vr)
        if not parents and self._allow is not None and tag not in self._allow:
            return ActionCode.X
        if vr == VR.PN:
            return "X/Z/D"
        if vr in _TIME_VRS:
            return self._date_code(vr, "X/Z/D")
        if vr in _TEXT_VRS or vr in _BINARY_VRS:
            return None if run.defines("/".join((*parents, keyword))) else ActionCode.X
        return None

    def _date_code(self, vr: str, otherwise: str) -> str:
        """A date or time outside the table: kept under full dates, shifted (dates) or kept
        (times) under modified dates, else ``otherwise``."""
        if self._full_dates:
            return ActionCode.K
        if self._modified_dates:
            return ActionCode.K if vr == VR.TM else ActionCode.C
        return otherwise

    def _dummy_code(self, vr: str) -> str:
        if vr in _TIME_VRS:
            return self._date_code(vr, ActionCode.D)
        if vr in _TEXT_VRS or vr in (VR.PN, VR.AS):
            return ActionCode.D
        if vr == _UI:
            return ActionCode.U
        return ActionCode.X if vr in _BINARY_VRS else ActionCode.K

    def _clean_code(self, vr: str) -> str:
        if vr in _TIME_VRS:
            return ActionCode.K if vr == VR.TM or self._full_dates else ActionCode.C
        if vr in _TEXT_VRS:
            return ActionCode.C
        if vr in (VR.PN, _UI):  # a name left after cleaning would still be a name
            return ActionCode.D if vr == VR.PN else ActionCode.U
        return ActionCode.X if vr in _BINARY_VRS else ActionCode.K

    def _private_plan(
        self, ds: Dataset, keys: Iterable[int]
    ) -> tuple[frozenset[int], dict[int, Rule]]:
        """The private tags at this level kept as received (Table E.3.10-1 under Retain Safe
        Private, and the creators of kept blocks), and the user rule of each private data
        element a rule selects. A creator is kept when any element of its block is kept."""
        safe = self._safe_private or frozenset()
        private = [t for t in keys if (t >> 16) & 1]
        creators: dict[int, str] = {}
        for tag in private:
            if 0x0010 <= tag & 0xFFFF <= 0x00FF:
                value = ds[tag].value
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                creators[tag] = str(value).strip("\x00 ")
        keep: set[int] = set()
        rules: dict[int, Rule] = {}
        for tag in private:
            element = tag & 0xFFFF
            if element < 0x1000:
                continue
            creator_tag = (tag & 0xFFFF0000) | (element >> 8)
            creator = creators.get(creator_tag)
            rule = first_match(self._rules, tag, creator) if self._private_rules else None
            if rule is not None:
                rules[tag] = rule
                if rule.action is not RuleAction.REMOVE and creator is not None:
                    keep.add(creator_tag)
            elif creator and (tag >> 16, creator, element & 0xFF) in safe:
                keep.add(tag)
                keep.add(creator_tag)
        return frozenset(keep), rules

    # -- user rules and pseudonyms ----------------------------------------------------------

    def _pseudonym(self, elem: DataElement, run: _Run) -> None:
        assert run.pseudonyms is not None  # noqa: S101 - checked by the caller
        patient_id, patient_name = run.pseudonyms
        elem.value = patient_id if elem.tag == _PATIENT_ID else patient_name
        run.counts[_PSEUDONYM_KEY] += 1

    def _apply_rule(
        self,
        ds: Dataset,
        tag: int,
        rule: Rule,
        parents: tuple[str, ...],
        run: _Run,
        *,
        mode: _Mode,
    ) -> None:
        """Apply a user rule; a value the action cannot take is removed (never kept)."""
        action = rule.action
        elem = decoded(ds, tag)
        vr = _first_vr(elem.VR)
        done = True
        if action is RuleAction.REMOVE:
            done = False
        elif action is RuleAction.KEEP:
            self._keep(ds, tag, parents, run, mode)
        elif action is RuleAction.EMPTY:
            elem.value = Sequence() if vr == _SQ else empty_value_for_VR(elem.VR)
        elif action is RuleAction.DUMMY:
            self._dummy(elem, parents, run)
        elif vr == _SQ or isinstance(elem.value, bytes | bytearray):
            done = False  # the value actions need values, not items or bytes
        elif action is RuleAction.REPLACE:
            done = self._rule_replace(elem, vr, rule)
        elif action is RuleAction.HASH:
            done = self._rule_hash(elem, vr, run)
        elif action is RuleAction.SHIFT_DATE:
            done = vr == VR.TM or (vr in _DATE_VRS and self._shift_dates(elem, vr, run))
        else:
            done = self._rule_regex(elem, vr, rule)
        if not done:
            del ds[tag]
            run.counts[f"rule:{RuleAction.REMOVE.value}"] += 1
            return
        run.counts[f"rule:{action.value}"] += 1

    @staticmethod
    def _rule_replace(elem: DataElement, vr: str, rule: Rule) -> bool:
        values: list[object]
        try:
            if vr in _INT_VRS:
                values = [int(v) for v in rule.replace_values]
            elif vr in _FLOAT_VRS:
                values = [float(v) for v in rule.replace_values]
            elif vr in _STRING_VRS:
                values = list(rule.replace_values)
            else:
                return False
        except ValueError:
            return False
        _set_valid(elem, vr, values, rule)
        return True

    def _rule_hash(self, elem: DataElement, vr: str, run: _Run) -> bool:
        if vr == _UI:
            self._map_uids(elem, (), run, _Mode.TABLE)
            return True
        if vr not in _STRING_VRS:
            return False
        values = _str_values(elem)
        hashed = [self._hasher.render(vr, v) for v in values]
        if any(h is None for h in hashed):
            return False
        if hashed:
            elem.value = _as_value([h for h in hashed if h is not None])
        return True

    @staticmethod
    def _rule_regex(elem: DataElement, vr: str, rule: Rule) -> bool:
        if vr not in _STRING_VRS or rule.pattern is None:
            return False
        values = [rule.pattern.sub(rule.replacement, v) for v in _str_values(elem)]
        if values:
            _set_valid(elem, vr, list(values), rule)
        return True

    # -- actions ----------------------------------------------------------------------------

    def _dummy(self, elem: DataElement, parents: tuple[str, ...], run: _Run) -> None:
        """D: a dummy value; a sequence keeps its items, their content dummied."""
        vr = _first_vr(elem.VR)
        if vr == _SQ:
            self._walk_items(elem, parents, run, _Mode.DUMMY)
        elif vr == _UI:
            values = [v for v in _uid_values(elem)] or [f"anonproxy-dummy:{elem.tag:08X}"]
            elem.value = _as_value([self._map_uid(v, elem.tag, run) for v in values])
        else:
            elem.value = dummy_value(elem.tag, vr, _keyword(elem.tag))

    def _map_uid(self, uid: str, tag: int, run: _Run) -> str:
        mapped = self._uids(uid)
        if mapped != uid:  # well-known UIDs stay
            run.mapped_uids.setdefault(uid, _keyword(tag) or "UID")
        return mapped

    def _map_uids(
        self, elem: DataElement, parents: tuple[str, ...], run: _Run, mode: _Mode
    ) -> None:
        if elem.VR == _SQ:
            self._walk_items(elem, parents, run, mode)
            return
        if elem.VR != _UI:
            raise DeidentificationError(f"cannot map UID of {_where(elem.tag)}: VR is not UI")
        values = _uid_values(elem)
        if values:
            elem.value = _as_value([self._map_uid(v, elem.tag, run) for v in values])

    def _clean(self, elem: DataElement, parents: tuple[str, ...], run: _Run, mode: _Mode) -> bool:
        """Apply C; False when this value cannot be cleaned (caller falls back to Basic). A
        sequence keeps its items, their content cleaned (dummied inside dummied content)."""
        vr = _first_vr(elem.VR)
        cleaned = True
        if vr == _SQ:
            inner = _Mode.DUMMY if mode is _Mode.DUMMY else _Mode.CLEAN
            self._walk_items(elem, parents, run, inner)
        elif vr == _UI:
            self._map_uids(elem, parents, run, mode)
        elif vr in (VR.DA, VR.DT):
            cleaned = self._shift_dates(elem, vr, run)
        elif vr in _CLEANABLE_TEXT_VRS:
            values = _str_values(elem)
            scrubbed = [_meaningful(self._clean_text(run.ids.scrub(v))) for v in values]
            if any(values) and not any(scrubbed):  # nothing left: a dummy keeps the Type
                elem.value = dummy_value(elem.tag, vr, _keyword(elem.tag))
            elif scrubbed:
                elem.value = _as_value(scrubbed)
        else:
            cleaned = vr in _KEPT_BY_CLEAN_VRS
        return cleaned

    def _clean_text(self, text: str) -> str:
        """Remove what identifies whoever it names (:data:`IDENTIFYING_PATTERNS`) and what the
        site's ``clean_patterns`` match."""
        for pattern in (*IDENTIFYING_PATTERNS.values(), *self._clean_patterns):
            text = pattern.sub(" ", text)
        return " ".join(text.split())

    def _shift_dates(self, elem: DataElement, vr: str, run: _Run) -> bool:
        shift = self._dates.shift_da if vr == VR.DA else self._dates.shift_dt
        try:
            shifted = [shift(v, run.date_offset) for v in _str_values(elem)]
        except ValueError:
            return False
        if shifted:
            elem.value = _as_value(shifted)
        return True

    # -- file meta and updaters -------------------------------------------------------------

    def _file_meta(self, meta: Dataset, new_sop: str, run: _Run) -> None:
        for tag in list(meta.keys()):
            run.where = tag
            if tag in _META_REMOVED:
                del meta[tag]
                run.counts[ActionCode.X] += 1
        _set(meta, "MediaStorageSOPInstanceUID", new_sop)
        _set(meta, "ImplementationClassUID", IMPLEMENTATION_CLASS_UID)
        _set(meta, "ImplementationVersionName", IMPLEMENTATION_VERSION_NAME)

    def _update(self, ds: Dataset) -> None:
        _set(ds, "PatientIdentityRemoved", PATIENT_IDENTITY_REMOVED)
        _set(ds, "DeidentificationMethod", list(self._method))
        items = [
            # the elements setattr would make (add_new's), given to the Dataset as its own
            # dictionary: without its keyword look-ups and __setitem__'s checks
            Dataset(
                {
                    _CODE_VALUE_TAG: DataElement(_CODE_VALUE_TAG, _SH, code.value),
                    _SCHEME_TAG: DataElement(_SCHEME_TAG, _SH, code.scheme_designator),
                    _MEANING_TAG: DataElement(_MEANING_TAG, _LO, code.meaning),
                }
            )
            for code in self._method_codes
        ]
        _set(ds, "DeidentificationMethodCodeSequence", Sequence(items))
        _set(ds, "LongitudinalTemporalInformationModified", self._longitudinal)


#: The elements of a De-identification Method Code Sequence item, by tag (:meth:`_update`)
_CODE_VALUE_TAG = BaseTag(_CODE_VALUE)
_SCHEME_TAG = BaseTag(_CODING_SCHEME_DESIGNATOR)
_MEANING_TAG = BaseTag(_CODE_MEANING)
_SH, _LO = VR.SH, VR.LO

#: Tag and dictionary VR of the attributes the engine sets (:func:`_set`)
_SET_BY_KEYWORD: dict[str, tuple[BaseTag, str]] = {
    keyword: (BaseTag(tag_for_keyword(keyword) or 0), str(dictionary_VR(keyword)))
    for keyword in (
        "MediaStorageSOPInstanceUID", "ImplementationClassUID", "ImplementationVersionName",
        "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    )
}  # fmt: skip


def _set(ds: Dataset, keyword: str, value: object) -> None:
    """``setattr(ds, keyword, value)`` without pydicom's keyword look-ups (the engine sets
    these for every instance): the value of the element there replaced, else a new element
    of the dictionary VR."""
    tag, vr = _SET_BY_KEYWORD[keyword]
    store = ds._dict  # pydicom's own
    if tag in store:
        element = decoded(ds, tag)
        element.value = value
    else:
        element = DataElement(tag, vr, value)
        if vr != _SQ and _MIRRORS_PYDICOM:  # as __setitem__ stores a public element
            store[tag] = element
            return
    ds[tag] = element


def _meaningful(text: str) -> str:
    """``text``, or "" when no letter or digit is left in it (``"^"``, ``", ."``)."""
    return text if any(c.isalnum() for c in text) else ""


def _set_valid(elem: DataElement, vr: str, values: list[object], rule: Rule) -> None:
    """Set the values a rule made, after checking them against the VR (no value in errors)."""
    for value in values:
        try:
            validate_value(vr, value, pydicom_config.RAISE)
        except (ValueError, TypeError):
            raise DeidentificationError(
                f"user rule {rule.index} ({rule.action.value}) makes an invalid {vr} value "
                f"for {_where(elem.tag)}"
            ) from None
    elem.value = values[0] if len(values) == 1 else values


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _str_values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        raise DeidentificationError(f"cannot read value of {_where(elem.tag)}")
    return [str(value)]


def _uid_values(elem: DataElement) -> list[str]:
    return [v for v in (s.strip("\x00 ") for s in _str_values(elem)) if v]


def _as_value(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values

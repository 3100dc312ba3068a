"""The de-identification engine: applies a :class:`~anonproxy.deid.profile.Profile` to datasets.

One :class:`Deidentifier` is built at start-up and shared by every association thread: it holds
only immutable, precomputed data (effective code per tag, allow-lists, keys), and all per-call
state lives in a :class:`_Run` local to :meth:`Deidentifier.deidentify`.

Order of work for one instance:

1. check that SOP Class, SOP Instance, Study Instance and Series Instance UIDs are present
   (every composite IOD requires them; the spool files instances by them);
2. collect the identifying values for the self-check (:mod:`anonproxy.deid.selfcheck`);
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
     the profile's effective code, compound codes resolved by the Type in the IOD
     (:func:`anonproxy.deid.actions.resolve`);
   * otherwise, by default, kept: the standard allows public attributes outside the table to be
     kept, **except** any attribute of VR PN, and any attribute that is not in the data
     dictionary or is retired and has a free-text VR (LO, SH, LT, ST, UT, UC, PN) or VR UN,
     which are removed. With ``Profile(strict=True)`` every public attribute outside the table
     that is not in ``_standard/strict_allowlist.json`` is removed.

   right after its action, each remaining value is searched for identifying values
   (self-check); a hit raises :class:`~anonproxy.errors.DeidentificationError`;
4. file meta: Media Storage SOP Instance UID := the new SOP Instance UID; Source, Sending and
   Receiving AE Titles and the private information removed; Implementation Class UID and
   Version Name set to anonproxy's; the remaining values searched as well;
5. Patient Identity Removed, De-identification Method (+ Code Sequence, CID 7050) and
   Longitudinal Temporal Information Modified are set.

The actions:

* **X** remove; **K** keep (sequences are still walked);
* **Z** zero-length value (an empty sequence for SQ); D instead in a Type 1 context;
* **D** a dummy valid for the VR and VM (:data:`anonproxy.deid.actions.DUMMY_BY_VR`); UI gets
  the mapped UID; sequences are kept and walked ("structure kept, content de-identified");
* **U** every value mapped by :class:`~anonproxy.deid.uids.UidRemapper` (well-known UIDs kept);
  sequences are walked so that the UIDs inside them are mapped by their own rows;
* **C** clean, by VR: DA and DT shifted by the per-patient offset
  (:class:`~anonproxy.deid.dates.DateShifter`); TM, CS and numbers kept; text (LO, LT, PN, SH,
  ST, UC, UT) has the identifying values and top-level person names deleted
  (:meth:`~anonproxy.deid.selfcheck.IdentifyingValues.scrub`); UI mapped; sequences walked.
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_is_retired, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import VR, validate_value

from anonproxy.deid.actions import UNKNOWN_IOD, ActionCode, dummy_value, resolve
from anonproxy.deid.dates import DEFAULT_SHIFT_DAYS, DateShifter
from anonproxy.deid.files import read_header, write_instance
from anonproxy.deid.profile import BASIC_PROFILE_CODE, Profile, ProfileOption
from anonproxy.deid.pseudonyms import Pseudonymizer
from anonproxy.deid.rules import Rule, RuleAction, RuleHasher, first_match
from anonproxy.deid.selfcheck import CODED_VOCABULARY_TAGS, TEXT_VRS, IdentifyingValues
from anonproxy.deid.tables import (
    iod_types,
    safe_private_attributes,
    strict_allowlist,
    table_e1_1,
)
from anonproxy.deid.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    UidRemapper,
)
from anonproxy.errors import DeidentificationError

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_BURNED_IN_ANNOTATION = 0x00280301

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

_FREE_TEXT_VRS = frozenset({VR.LO, VR.SH, VR.LT, VR.ST, VR.UT, VR.UC, VR.PN, VR.UN})
#: VRs whose values must be decoded to be kept: the self-check reads them (text, UIDs), they
#: hold items (SQ), or their real VR is unknown (UN).
_DECODE_TO_KEEP_VRS = frozenset(TEXT_VRS | {VR.PN, VR.SQ, VR.UI, VR.UN} | _FREE_TEXT_VRS)
_CLEANABLE_TEXT_VRS = frozenset({VR.LO, VR.LT, VR.PN, VR.SH, VR.ST, VR.UC, VR.UT})
_KEPT_BY_CLEAN_VRS = frozenset(
    {VR.TM, VR.CS, VR.AS, VR.DS, VR.IS, VR.US, VR.SS, VR.UL, VR.SL, VR.UV, VR.SV, VR.FL,
     VR.FD, VR.AT}
)  # fmt: skip
#: The identifying-value attributes whose codes can become K under some option.
_SELF_CHECK_TAGS = frozenset(
    {
        0x00100010,  # PatientName
        0x00100020,  # PatientID
        0x00101000,  # OtherPatientIDs
        0x00101002,  # OtherPatientIDsSequence
        0x00080050,  # AccessionNumber
        0x00100030,  # PatientBirthDate
        0x00080080,  # InstitutionName
        _SOP_INSTANCE_UID,
        _STUDY_INSTANCE_UID,
        _SERIES_INSTANCE_UID,
    }
)

_STRING_VRS = frozenset(
    {VR.AE, VR.AS, VR.CS, VR.DA, VR.DS, VR.DT, VR.IS, VR.LO, VR.LT, VR.PN, VR.SH, VR.ST, VR.TM,
     VR.UC, VR.UI, VR.UR, VR.UT}
)  # fmt: skip
_INT_VRS = frozenset({VR.US, VR.SS, VR.UL, VR.SL, VR.UV, VR.SV})
_FLOAT_VRS = frozenset({VR.FL, VR.FD})
_DATE_VRS = frozenset({VR.DA, VR.DT})
_PSEUDONYM_KEY = "pseudonym"

_LONGITUDINAL = {
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_FULL_DATES: "UNMODIFIED",
    ProfileOption.RETAIN_LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED_DATES: "MODIFIED",
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


@dataclass
class _Run:
    """Per-call state of one :meth:`Deidentifier.deidentify`."""

    iod: dict[str, str] | None
    ids: IdentifyingValues
    date_offset: int
    pseudonyms: tuple[str, str] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    where: int = 0


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


@lru_cache(maxsize=4096)
def _keyword(tag: int) -> str:
    return keyword_for_tag(tag)


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
        self._hasher = RuleHasher(secret)
        self._pseudonyms = (
            Pseudonymizer(profile.patient_ids, secret) if profile.patient_ids else None
        )
        self._kept_ids = frozenset(t for t in _SELF_CHECK_TAGS if self._kept_by_profile(t))
        self._person_name_tags = tuple(
            tag
            for tag in self._tag_codes
            if tag not in _SELF_CHECK_TAGS and _dictionary_vr(tag) == VR.PN
        )
        self._method = ["anonproxy", BASIC_PROFILE_CODE.meaning] + [
            o.code.meaning for o in profile.ordered_options
        ]
        if profile.strict:
            self._method.append("strict allow-list of public attributes")
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
        rule = first_match(self._rules, tag, None)
        if rule is not None:
            return rule.action is RuleAction.KEEP
        return self._tag_codes.get(tag) == ActionCode.K

    def _rule_dates(self) -> str:
        """Longitudinal Temporal Information Modified without a longitudinal option."""
        if any(r.action is RuleAction.SHIFT_DATE for r in self._rules):
            return "MODIFIED"
        if any(
            r.action is RuleAction.KEEP
            and (tag := r.exact_tag) is not None
            and _dictionary_vr(tag) in _DATE_VRS
            for r in self._rules
        ):
            return "UNMODIFIED"
        return "REMOVED"

    @property
    def profile(self) -> Profile:
        """The profile this engine applies."""
        return self._profile

    # -- public API -------------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> DeidResult:
        """De-identify ``ds`` (and ``ds.file_meta``, if any) in place.

        Raises DeidentificationError when the instance cannot be fully de-identified; the
        dataset must then be discarded.
        """
        run: _Run | None = None
        try:
            sop_class = self._required_uid(ds, _SOP_CLASS_UID, "SOPClassUID")
            original_sop = self._required_uid(ds, _SOP_INSTANCE_UID, "SOPInstanceUID")
            self._required_uid(ds, _STUDY_INSTANCE_UID, "StudyInstanceUID")
            self._required_uid(ds, _SERIES_INSTANCE_UID, "SeriesInstanceUID")
            burned_in = ds.get(_BURNED_IN_ANNOTATION)
            burned_in_value = str(burned_in.value) if burned_in is not None else None
            patient_id = ds.get(_PATIENT_ID)
            ids = IdentifyingValues.collect(ds, self._kept_ids, self._person_name_tags)
            original_id = str(patient_id.value or "") if patient_id is not None else ""
            run = _Run(
                iod=iod_types(sop_class),
                ids=ids,
                date_offset=self._dates.offset_days(original_id),
            )
            original_id = original_id.strip("\x00 ")
            if self._pseudonyms is not None and original_id:
                run.pseudonyms = self._pseudonyms.pseudonyms(original_id)
            self._walk(ds, (), run)
            new_sop = self._required_uid(ds, _SOP_INSTANCE_UID, "SOPInstanceUID")
            new_study = self._required_uid(ds, _STUDY_INSTANCE_UID, "StudyInstanceUID")
            new_series = self._required_uid(ds, _SERIES_INSTANCE_UID, "SeriesInstanceUID")
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                self._file_meta(meta, new_sop, run)
            self._update(ds)
        except DeidentificationError:
            raise
        except Exception:  # noqa: BLE001 - any failure must become a rejection, without values
            where = _where(run.where) if run is not None and run.where else "dataset"
            raise DeidentificationError(f"cannot process {where}") from None
        return DeidResult(
            action_counts={str(code): n for code, n in run.counts.items()},
            sop_class_uid=sop_class,
            sop_instance_uid=new_sop,
            study_instance_uid=new_study,
            series_instance_uid=new_series,
            original_sop_instance_uid_hash=self._uids.original_hash(original_sop),
            burned_in_annotation=burned_in_value,
        )

    def deidentify_file(
        self, src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]
    ) -> DeidResult:
        """Read ``src_path``, de-identify it and write it as a DICOM file to ``dst_path``.

        Parent directories of ``dst_path`` are created; the file is written to a temporary
        name and renamed, so ``dst_path`` never holds a partial file. A source without file
        meta (no preamble) is accepted if it is a dataset with a SOP Class UID; file meta is
        then built from its encoding. Raises DecodeError if the source is not DICOM,
        DeidentificationError as :meth:`deidentify`.
        """
        ds, pixels = read_header(src_path)  # the pixel data stays on disk
        result = self.deidentify(ds)
        write_instance(ds, dst_path, pixels)
        return result

    # -- walking ----------------------------------------------------------------------------

    @staticmethod
    def _required_uid(ds: Dataset, tag: int, keyword: str) -> str:
        elem = ds.get(tag)
        value = elem.value if elem is not None else None
        if not isinstance(value, str) or not value.strip("\x00 "):
            raise DeidentificationError(f"missing or invalid {keyword} {_tag_text(tag)}")
        return value.strip("\x00 ")

    def _walk(self, ds: Dataset, parents: tuple[str, ...], run: _Run) -> None:
        keys = list(ds.keys())
        rules = self._rules
        private_rules: dict[int, Rule] = {}
        kept_private: frozenset[int] = frozenset()
        if (self._retain_safe_private or self._private_rules) and any((t >> 16) & 1 for t in keys):
            kept_private, private_rules = self._private_plan(ds, keys)
        tag_codes = self._tag_codes
        for tag in keys:
            run.where = tag
            group = tag >> 16
            if group & 1:
                rule = private_rules.get(tag)
                if rule is not None:
                    self._apply_rule(ds, tag, rule, parents, run)
                elif tag in kept_private:
                    self._keep(ds, tag, parents, run)
                    run.counts[ActionCode.K] += 1
                else:
                    del ds[tag]
                    run.counts[ActionCode.X] += 1
                continue
            if not tag & 0xFFFF:  # group length
                del ds[tag]
                run.counts[ActionCode.X] += 1
                continue
            if rules and (rule := first_match(rules, tag, None)) is not None:
                self._apply_rule(ds, tag, rule, parents, run)
                continue
            if run.pseudonyms is not None and not parents and tag in (_PATIENT_ID, _PATIENT_NAME):
                self._pseudonym(ds[tag], run)
                continue
            code = tag_codes.get(tag)
            if code is None and 0x5000 <= group <= 0x60FF:
                code = self._profile.mask_code(tag)
            if code is None:
                self._not_in_table(ds, tag, parents, run)
                continue
            action = self._resolve(code, tag, parents, run)
            self._apply(ds, tag, action, parents, run)
        if not parents:  # the Overlay Plane module is at the top level of a data set
            self._drop_incomplete_overlays(ds, run)

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
        if len(code) == 1 and code != "Z":
            return ActionCode(code)
        if run.iod is None:
            return resolve(code, UNKNOWN_IOD)
        path = "/".join((*parents, _keyword(tag)))
        return resolve(code, run.iod.get(path))

    def _apply(
        self, ds: Dataset, tag: int, action: ActionCode, parents: tuple[str, ...], run: _Run
    ) -> None:
        if action is ActionCode.X:
            del ds[tag]
            run.counts[action] += 1
            return
        elem = ds[tag]
        if action is ActionCode.K:
            self._keep(ds, tag, parents, run)
        elif action is ActionCode.Z:
            elem.value = Sequence() if elem.VR == VR.SQ else empty_value_for_VR(elem.VR)
        elif action is ActionCode.D:
            self._dummy(elem, parents, run)
        elif action is ActionCode.U:
            self._map_uids(elem, parents, run)
        elif not self._clean(ds, elem, parents, run):
            # cannot clean this value: fall back to the Basic Profile code of the row
            basic = self._basic_code(tag)
            self._apply(ds, tag, self._resolve(basic, tag, parents, run), parents, run)
            return
        run.counts[action] += 1

    def _basic_code(self, tag: int) -> str:
        basic = self._basic_codes.get(tag)
        if basic is None:  # the masks (50xx,xxxx), (60xx,3000), (60xx,4000): all X
            return ActionCode.X
        return basic

    def _keep(self, ds: Dataset, tag: int, parents: tuple[str, ...], run: _Run) -> None:
        elem = ds[tag]
        if elem.VR == VR.SQ:
            self._walk_items(elem, parents, run)
        else:
            self._check(elem, run)

    def _walk_items(self, elem: DataElement, parents: tuple[str, ...], run: _Run) -> None:
        inner = (*parents, _keyword(elem.tag))
        for item in elem.value:
            self._walk(item, inner, run)
        run.where = elem.tag

    def _check(self, elem: DataElement, run: _Run) -> None:
        if elem.tag in CODED_VOCABULARY_TAGS:
            return
        keyword = run.ids.find(elem.VR, elem.value)
        if keyword is not None:
            raise DeidentificationError(
                f"self-check: identifying value of {keyword} survived in {_where(elem.tag)}"
            )

    def _not_in_table(self, ds: Dataset, tag: int, parents: tuple[str, ...], run: _Run) -> None:
        if self._allow is None or tag in self._allow:
            # Fast path: a kept attribute whose VR the self-check does not read (numbers,
            # codes, dates, binary data such as Pixel Data) stays as received, undecoded.
            # Only with the VR known from the data (explicit VR): an implicit VR element may
            # have to be re-encoded in another encoding, which needs its decoded form.
            raw_vr = ds.get_item(tag).VR
            if raw_vr and _first_vr(raw_vr) not in _DECODE_TO_KEEP_VRS:
                return
        elem = ds[tag]
        vr = elem.VR
        if (
            vr == VR.PN
            or (self._allow is not None and tag not in self._allow)
            or (vr in _FREE_TEXT_VRS and _unknown_or_retired(tag))
        ):
            del ds[tag]
            run.counts[ActionCode.X] += 1
            return
        self._keep(ds, tag, parents, run)

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
        self._check(elem, run)
        run.counts[_PSEUDONYM_KEY] += 1

    def _apply_rule(
        self, ds: Dataset, tag: int, rule: Rule, parents: tuple[str, ...], run: _Run
    ) -> None:
        """Apply a user rule; a value the action cannot take is removed (never kept)."""
        action = rule.action
        elem = ds[tag]
        vr = _first_vr(elem.VR)
        done = True
        if action is RuleAction.REMOVE:
            done = False
        elif action is RuleAction.KEEP:
            self._keep(ds, tag, parents, run)
        elif action is RuleAction.EMPTY:
            elem.value = Sequence() if vr == VR.SQ else empty_value_for_VR(elem.VR)
        elif action is RuleAction.DUMMY:
            self._dummy(elem, parents, run)
        elif vr == VR.SQ or isinstance(elem.value, bytes | bytearray):
            done = False  # the value actions need values, not items or bytes
        elif action is RuleAction.REPLACE:
            done = self._rule_replace(elem, vr, rule)
        elif action is RuleAction.HASH:
            done = self._rule_hash(elem, vr)
        elif action is RuleAction.SHIFT_DATE:
            done = vr == VR.TM or (vr in _DATE_VRS and self._shift_dates(elem, vr, run))
        else:
            done = self._rule_regex(elem, vr, rule)
        if not done:
            del ds[tag]
            run.counts[f"rule:{RuleAction.REMOVE.value}"] += 1
            return
        if action not in (RuleAction.KEEP, RuleAction.EMPTY) and vr != VR.SQ:
            self._check(elem, run)
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

    def _rule_hash(self, elem: DataElement, vr: str) -> bool:
        if vr == VR.UI:
            uids = _uid_values(elem)
            if uids:
                elem.value = _as_value([self._uids(v) for v in uids])
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
        vr = _first_vr(elem.VR)
        if vr == VR.SQ:
            self._walk_items(elem, parents, run)
        elif vr == VR.UI:
            values = [v for v in _uid_values(elem)] or [f"anonproxy-dummy:{elem.tag:08X}"]
            elem.value = _as_value([self._uids(v) for v in values])
        else:
            elem.value = dummy_value(elem.tag, vr, _keyword(elem.tag))

    def _map_uids(self, elem: DataElement, parents: tuple[str, ...], run: _Run) -> None:
        if elem.VR == VR.SQ:
            self._walk_items(elem, parents, run)
            return
        if elem.VR != VR.UI:
            raise DeidentificationError(f"cannot map UID of {_where(elem.tag)}: VR is not UI")
        values = _uid_values(elem)
        if values:
            elem.value = _as_value([self._uids(v) for v in values])

    def _clean(self, ds: Dataset, elem: DataElement, parents: tuple[str, ...], run: _Run) -> bool:
        """Apply C; False when this value cannot be cleaned (caller falls back to Basic)."""
        vr = _first_vr(elem.VR)
        cleaned = True
        if vr == VR.SQ:
            self._walk_items(elem, parents, run)
        elif vr == VR.UI:
            self._map_uids(elem, parents, run)
        elif vr in (VR.DA, VR.DT):
            cleaned = self._shift_dates(elem, vr, run)
        elif vr in _CLEANABLE_TEXT_VRS:
            values = [self._clean_text(run.ids.scrub(str(v))) for v in _str_values(elem)]
            if values:
                elem.value = _as_value(values)
            self._check(elem, run)
        else:
            cleaned = vr in _KEPT_BY_CLEAN_VRS
        return cleaned

    def _clean_text(self, text: str) -> str:
        """Remove what the site's ``clean_patterns`` match (names of staff, phone numbers...)."""
        for pattern in self._clean_patterns:
            text = pattern.sub(" ", text)
        return " ".join(text.split()) if self._clean_patterns else text

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
        meta.MediaStorageSOPInstanceUID = new_sop
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        for elem in meta:
            run.where = elem.tag
            self._check(elem, run)

    def _update(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = list(self._method)
        items = []
        for code in self._method_codes:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = self._longitudinal


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

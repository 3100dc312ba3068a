"""U: keyed, deterministic, consistent UID replacement; well-known UIDs untouched."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from anonproxy.deid import IMPLEMENTATION_CLASS_UID, Deidentifier, Profile
from anonproxy.deid.uids import UidRemapper

from .helpers import SECRET, SERIES_UID, SOP_UID, STUDY_UID, item, minimal, seq

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

components = st.one_of(st.just(0), st.integers(min_value=1, max_value=10**12))
uids = st.lists(components, min_size=2, max_size=12).map(lambda c: ".".join(map(str, c)))


@settings(max_examples=300, deadline=None)
@given(uid=uids, secret=st.binary(min_size=1, max_size=64))
def test_mapped_uid_is_valid_and_deterministic(uid: str, secret: bytes) -> None:
    new = UidRemapper(secret)(uid)
    assert len(new) <= 64
    assert UID_RE.match(new)
    assert new.startswith("2.25.")
    assert new == UidRemapper(secret)(uid)  # another instance, same secret
    assert new == UidRemapper(secret)(uid + "\x00")  # padding ignored


@settings(max_examples=50, deadline=None)
@given(sample=st.sets(uids, min_size=2, max_size=30))
def test_mapping_is_injective_on_samples(sample: set[str]) -> None:
    remap = UidRemapper(SECRET)
    assert len({remap(u) for u in sample}) == len(sample)


def test_known_value_is_stable_across_machines_and_runs() -> None:
    # HMAC-SHA256(b"k", b"uid:1.2.3"), first 128 bits as an integer: fixed forever.
    assert UidRemapper(b"k")("1.2.3") == "2.25.244913531273007164541877438886791492991"


def test_well_known_uids_are_never_remapped() -> None:
    remap = UidRemapper(SECRET)
    for uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"):
        assert remap(uid) == uid


def test_same_uid_maps_the_same_everywhere_and_across_instances() -> None:
    def build() -> object:
        ds = minimal()
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1.1.9"
        ds.ReferencedInstanceSequence = seq(
            item(
                ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                ReferencedSOPInstanceUID=SOP_UID,
                ReferencedFrameOfReferenceUID="1.2.826.0.1.3680043.10.1.1.9",
            )
        )
        return ds

    one, two, other = build(), build(), build()
    result = Deidentifier(Profile(), secret=SECRET).deidentify(one)
    Deidentifier(Profile(), secret=SECRET).deidentify(two)
    Deidentifier(Profile(), secret=b"another secret").deidentify(other)
    ref = one.ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == one.SOPInstanceUID == result.sop_instance_uid
    assert ref.ReferencedFrameOfReferenceUID == one.FrameOfReferenceUID
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert one.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert one.SOPInstanceUID != SOP_UID
    assert two.SOPInstanceUID == one.SOPInstanceUID
    assert two.StudyInstanceUID == one.StudyInstanceUID == result.study_instance_uid
    assert other.SOPInstanceUID != one.SOPInstanceUID
    assert other.SeriesInstanceUID != one.SeriesInstanceUID


def test_retain_uids_keeps_them() -> None:
    ds = minimal()
    result = Deidentifier(Profile.from_options(["retain_uids"]), secret=SECRET).deidentify(ds)
    assert (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
        SOP_UID,
        STUDY_UID,
        SERIES_UID,
    )
    assert result.sop_instance_uid == SOP_UID
    assert "U" not in result.action_counts


def test_original_hash_uses_a_separate_key() -> None:
    remap = UidRemapper(SECRET)
    digest = remap.original_hash(SOP_UID)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    new_int = int(remap(SOP_UID).removeprefix("2.25."))
    assert int(digest[:32], 16) != new_int
    assert UidRemapper(b"other").original_hash(SOP_UID) != digest


def test_implementation_class_uid_is_valid() -> None:
    assert IMPLEMENTATION_CLASS_UID.startswith("2.25.")
    assert UID_RE.match(IMPLEMENTATION_CLASS_UID)
    assert len(IMPLEMENTATION_CLASS_UID) <= 64


def test_remembered_uids_are_the_keyed_ones() -> None:
    """A remapper remembers what it mapped (bounded): the same replacements as a new one's,
    padding ignored, well-known UIDs and the empty UID never remembered."""
    from anonproxy.deid import uids

    remapper = UidRemapper(b"secret")
    originals = [f"1.2.826.0.1.{n}" for n in range(uids._MAX_MAPPED + 100)]
    first = [remapper(uid) for uid in originals]
    again = [remapper(uid + "\x00") for uid in reversed(originals)][::-1]
    fresh = [UidRemapper(b"secret")(uid) for uid in originals]
    assert first == again == fresh
    assert len(set(first)) == len(originals)
    assert len(remapper._mapped) <= uids._MAX_MAPPED
    assert remapper("1.2.840.10008.1.2") == "1.2.840.10008.1.2"  # well-known
    assert remapper(" ") == ""
    assert "1.2.840.10008.1.2" not in remapper._mapped
    assert "" not in remapper._mapped

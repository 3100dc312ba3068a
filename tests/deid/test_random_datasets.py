"""Property tests: arbitrary nested datasets never raise anything but DeidentificationError,
and no original PN/LO/SH value of an attribute named by Table E.1-1 survives."""

from __future__ import annotations

from itertools import count

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.sequence import Sequence

from anonproxy.deid import Deidentifier, Profile
from anonproxy.errors import DeidentificationError

from .helpers import UNKNOWN_SOP_CLASS, minimal, walk_strings

CT = "1.2.840.10008.5.1.4.1.1.2"
TEXT_VRS = ("PN", "LO", "SH")
_CODES = Profile().tag_codes


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


TABLE_TEXT = sorted(t for t in _CODES if _vr(t) in TEXT_VRS)
TABLE_SEQUENCES = sorted(t for t in _CODES if _vr(t) == "SQ")
OTHER = [(0x00181040, "LO"), (0x00080070, "LO"), (0x00200011, "IS"), (0x00280010, "US")]
KEPT_SEQUENCE = 0x0008114A  # Referenced Instance Sequence: not in Table E.1-1
PRIVATE = [(0x00090010, "LO"), (0x00091001, "LO"), (0x00291020, "SH"), (0x7FD11010, "OB")]

_serial = count()


def _token(draw: st.DrawFn) -> str:
    letters = draw(st.text(alphabet="abcdefghjkmnpqrstuvwxyz", min_size=1, max_size=6))
    return f"q{next(_serial)}z{letters}"


@st.composite
def datasets(draw: st.DrawFn, depth: int = 0) -> tuple[Dataset, list[str]]:
    ds = Dataset()
    planted: list[str] = []
    for tag in draw(st.lists(st.sampled_from(TABLE_TEXT), max_size=6, unique=True)):
        value = _token(draw)
        if _vr(tag) == "PN":
            value = f"{value}^{_token(draw)}"
        ds.add_new(tag, _vr(tag), value)
        planted.extend(value.split("^"))
    for tag, vr in draw(st.lists(st.sampled_from(OTHER), max_size=3, unique=True)):
        ds.add_new(tag, vr, 5 if vr in ("US", "IS") else _token(draw))
    for tag, vr in draw(st.lists(st.sampled_from(PRIVATE), max_size=4, unique=True)):
        ds.add_new(tag, vr, b"\x01\x02" if vr == "OB" else _token(draw))
    if depth < 3:
        for tag in draw(
            st.lists(st.sampled_from([KEPT_SEQUENCE, *TABLE_SEQUENCES]), max_size=2, unique=True)
        ):
            items = draw(st.lists(datasets(depth + 1), max_size=2))
            ds.add_new(tag, "SQ", Sequence([i for i, _ in items]))
            for _, values in items:
                planted.extend(values)
    return ds, planted


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    generated=datasets(),
    sop_class=st.sampled_from([CT, UNKNOWN_SOP_CLASS]),
    options=st.sets(
        st.sampled_from(["retain_safe_private", "retain_uids", "clean_graphics"]), max_size=2
    ),
)
def test_random_nested_datasets(
    generated: tuple[Dataset, list[str]], sop_class: str, options: set[str]
) -> None:
    body, planted = generated
    ds = minimal(sop_class)
    for elem in body:
        if elem.tag not in ds:
            ds.add(elem)
    try:
        Deidentifier(Profile.from_options(sorted(options)), secret=b"s").deidentify(ds)
    except DeidentificationError:
        return
    surviving = [v for _, v in walk_strings(ds)]
    for value in planted:
        assert not any(value in s for s in surviving)

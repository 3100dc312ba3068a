"""Write only what changed (:mod:`anonproxy.deid.layout`): the output of the copying writer is
the output of pydicom's full writer, element for element and byte for byte, over pydicom's test
corpus (and pydicom-data's, when installed) and generated instances in every transfer syntax
the writer copies from; the self-check still reads every byte but the pixel data."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.files import PixelSpan, read_received, write_spliced
from anonproxy.deid.layout import LONG_VRS, Layout, _encode, _encode_sequence, encode_changed
from anonproxy.deid.structure import DEFAULT_MAX_SEQUENCE_DEPTH, check_structure
from anonproxy.errors import AnonproxyError, DeidentificationError

from .helpers import ACCESSION, PATIENT_ID, PATIENT_NAME, SECRET
from .phi_corpus import SOP_CLASSES, generate

#: Basic, and two sets of options that keep, clean and map otherwise.
OPTION_SETS = {
    "basic": (),
    "private-descriptors": ("retain_safe_private", "clean_descriptors"),
    "uids-dates-device": (
        "retain_uids",
        "retain_longitudinal_temporal_information_full_dates",
        "retain_device_identity",
    ),
}
SYNTAXES = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "big": ExplicitVRBigEndian,
}


def _engine(options: tuple[str, ...]) -> Deidentifier:
    return Deidentifier(Profile.from_options(options, clean_pixel_data="off"), SECRET)


def corpus() -> list[Path]:
    """pydicom's test files, and pydicom-data's when that package is installed."""
    folder = Path(str(get_testdata_file("CT_small.dcm"))).parent
    files = sorted(folder.glob("*.dcm"))
    try:
        import data_store

        files += sorted(Path(str(data_store.__file__)).parent.rglob("*.dcm"))
    except ImportError:
        pass
    return files


def _deidentified(
    engine: Deidentifier, path: Path
) -> tuple[Dataset, PixelSpan | None, Layout | None] | None:
    """The file read and de-identified as :func:`anonproxy.deid.instance.deidentify_file`
    does it, or None when it is refused."""
    try:
        ds, span, layout = read_received(path)
        check_structure(ds, DEFAULT_MAX_SEQUENCE_DEPTH)
        engine.deidentify_with_check(ds)
    except (AnonproxyError, InvalidDicomError):
        return None
    return ds, span, layout


def _both(engine: Deidentifier, path: Path) -> tuple[bytes, bytes, bool] | None:
    """The output of the full writer, of the copying writer, and whether the copying writer
    copied (rather than fell back): each from its own read of *path*."""
    full = _deidentified(engine, path)
    copied = _deidentified(engine, path)
    if full is None or copied is None:
        assert full is None
        assert copied is None
        return None
    expected, actual = io.BytesIO(), io.BytesIO()
    try:
        write_spliced(full[0], full[1], expected)
    except (ValueError, TypeError, AttributeError):  # pydicom cannot write it: neither may
        with pytest.raises((ValueError, TypeError, AttributeError)):
            write_spliced(*copied[:2], actual, layout=copied[2])
        return None
    ds, span, layout = copied
    used = layout is not None and encode_changed(ds, layout, span.tag if span else None) is not None
    write_spliced(ds, span, actual, layout=layout)
    return expected.getvalue(), actual.getvalue(), used


def _elements(ds: Dataset) -> Iterator[tuple[str, object]]:
    """``(path, VR and value)`` of every element at every depth, sequences item by item."""
    for element in ds:
        where = f"{element.tag}"
        if element.VR == "SQ":
            yield where, ("SQ", len(element.value))
            for index, item in enumerate(element.value):
                for inner, value in _elements(item):
                    yield f"{where}[{index}]{inner}", value
        else:
            yield where, (element.VR, element.value)


def assert_same_instance(expected: bytes, actual: bytes) -> None:
    """Both decode to the same preamble, file meta and elements (pixel data included), and
    are the same bytes."""
    old, new = dcmread(io.BytesIO(expected)), dcmread(io.BytesIO(actual))
    assert new.preamble == old.preamble
    assert list(_elements(new.file_meta)) == list(_elements(old.file_meta))
    assert list(_elements(new)) == list(_elements(old))
    assert actual == expected


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_the_whole_corpus_is_written_as_the_full_writer_writes_it(
    options: tuple[str, ...],
) -> None:
    engine = _engine(options)
    written = copied = 0
    for path in corpus():
        both = _both(engine, path)
        if both is None:
            continue
        expected, actual, used = both
        written += 1
        copied += used
        try:
            assert_same_instance(expected, actual)
        except AssertionError as failed:
            raise AssertionError(f"{path.name}: {failed}") from None
    assert written >= 60
    # only the deflated files and those without preamble are written by the full writer
    assert copied >= written - 6, (copied, written)


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
)
def test_untouched_elements_are_copied_in_every_transfer_syntax(name: str) -> None:
    """Every element the engine left undecoded reaches the output as the bytes received."""
    path = Path(str(get_testdata_file(name)))
    ds, span, layout = read_received(path)
    assert layout is not None
    assert span is not None
    Deidentifier(Profile(), SECRET).deidentify_with_check(ds)
    untouched = [e for _, e in ds.items() if isinstance(e, RawDataElement)]
    header = encode_changed(ds, layout, span.tag)
    assert header is not None
    if name != "MR_small_implicit.dcm":  # implicit VR: the engine decodes what it keeps
        assert len(untouched) >= 30
    received = path.read_bytes()
    for raw in untouched:
        size = 8 if layout.implicit or raw.VR.encode() not in LONG_VRS else 12
        assert received[raw.value_tell - size : raw.value_tell + raw.length] in header


@settings(
    max_examples=int(os.environ.get("ANONPROXY_FUZZ_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(min_value=1, max_value=10**6),
    name=st.sampled_from(sorted(SOP_CLASSES)),
    syntax=st.sampled_from(sorted(SYNTAXES)),
    options=st.sampled_from(list(OPTION_SETS.values())),
)
def test_generated_instances_are_written_as_the_full_writer_writes_them(
    seed: int,
    name: str,
    syntax: str,
    options: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Sentinels in every VR at every depth (tests/deid/phi_corpus.py), in implicit VR little
    endian, explicit VR little and big endian."""
    ds, _ = generate(name, seed)
    ds.file_meta.TransferSyntaxUID = SYNTAXES[syntax]
    path = tmp_path_factory.mktemp("layout") / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    both = _both(_engine(options), path)
    assert both is not None, "the generated instance is refused"
    expected, actual, used = both
    assert used
    assert_same_instance(expected, actual)


def _planted(tmp_path: Path, **values: str) -> Path:
    """CT_small with the helpers' identifying values and *values*."""
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_replaced_value_never_reaches_the_output(tmp_path: Path) -> None:
    source = _planted(tmp_path)
    out = tmp_path / "out.dcm"
    Deidentifier(Profile(), SECRET).deidentify_file(source, out)
    data = out.read_bytes()
    for planted in (PATIENT_NAME.split("^")[0], PATIENT_ID, ACCESSION):
        assert planted.encode() in source.read_bytes()
        assert planted.encode() not in data
    both = _both(Deidentifier(Profile(), SECRET), source)
    assert both is not None
    assert both[2]
    assert both[1] == data


def test_the_self_check_refuses_a_copied_element_holding_an_identifying_value(
    tmp_path: Path,
) -> None:
    family = PATIENT_NAME.split("^")[0]
    source = _planted(tmp_path, ConvolutionKernel=family)
    engine = Deidentifier(Profile(), SECRET)
    ds, span, layout = read_received(source)
    assert layout is not None
    received = ds.get_item(0x00181210)
    assert isinstance(received, RawDataElement)
    _, check = engine.deidentify_with_check(ds)
    assert ds.get_item(0x00181210) is received  # kept as received: copied, not encoded
    seen: list[bytes] = []

    def refuse(encoded: bytes) -> None:
        seen.append(encoded)
        if check.finding(encoded) is not None:
            raise DeidentificationError("refused")

    target = io.BytesIO()
    with pytest.raises(DeidentificationError):
        write_spliced(ds, span, target, refuse, layout)
    assert target.getvalue() == b""  # nothing reached the target
    assert family.encode() in seen[0]
    out = tmp_path / "out.dcm"
    with pytest.raises(DeidentificationError):
        engine.deidentify_file(source, out)
    assert not out.exists()


def test_a_changed_character_set_is_written_by_the_full_writer(tmp_path: Path) -> None:
    source = _planted(tmp_path)
    ds, span, layout = read_received(source)
    assert layout is not None
    assert span is not None
    Deidentifier(Profile(), SECRET).deidentify_with_check(ds)
    assert encode_changed(ds, layout, span.tag) is not None
    ds.SpecificCharacterSet = "ISO_IR 192"
    assert encode_changed(ds, layout, span.tag) is None
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert encode_changed(ds, layout, span.tag) is None


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_sequences_read_from_the_file_are_encoded_item_by_item(syntax: str, tmp_path: Path) -> None:
    """Nested sequences (kept, dummied, cleaned items at depth 1-3) and the engine's items of
    plain elements are encoded without pydicom's writer, to its bytes."""
    ds, _ = generate("comprehensive_sr", 23)
    ds.file_meta.TransferSyntaxUID = SYNTAXES[syntax]
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = _deidentified(_engine(("clean_structured_content",)), path)
    assert read is not None
    out, _, _ = read
    implicit, little = SYNTAXES[syntax].is_implicit_VR, SYNTAXES[syntax].is_little_endian
    codecs = convert_encodings(out.get("SpecificCharacterSet", "iso8859"))
    sequences = [e for e in out if e.VR == "SQ"]
    item_by_item = 0
    for element in sequences:
        encoded = _encode_sequence(element, implicit, little, codecs)
        if encoded is not None:
            item_by_item += 1
            assert encoded == _encode(element, implicit, little, out.get("SpecificCharacterSet"))
    assert item_by_item >= 3
    method = out["DeidentificationMethodCodeSequence"]  # the engine's items: plain elements
    assert _encode_sequence(method, implicit, little, codecs) is not None
    method.value[0].ReferencedSOPSequence = [Dataset()]  # a sequence in a new item: pydicom's
    assert _encode_sequence(method, implicit, little, codecs) is None

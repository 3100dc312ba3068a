"""Header-only decoding with the pixel data copied from file to file (anonproxy.deid.files)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file, get_testdata_files

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.files import read_header, write_spliced
from anonproxy.errors import DecodeError

from builders import make_series
from conftest import TEST_SECRET, corpus_paths

ENGINE = Deidentifier(Profile.from_options([]), secret=TEST_SECRET.value)


def _whole(path: Path, engine: Deidentifier = ENGINE) -> bytes | str:
    """The output of decoding, de-identifying and encoding the whole file (the reference)."""
    try:
        ds = dcmread(path)
        engine.deidentify(ds)
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - compared by type with the spliced path
        return type(exc).__name__
    return out.getvalue()


def _spliced(path: Path, target: Path, engine: Deidentifier = ENGINE) -> bytes | str:
    try:
        ds, span = read_header(path)
        engine.deidentify(ds)
        with target.open("wb") as handle:
            write_spliced(ds, span, handle)
    except Exception as exc:  # noqa: BLE001 - compared by type with the whole path
        return type(exc).__name__
    return target.read_bytes()


def _readable_test_files() -> list[Path]:
    paths = list(corpus_paths())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files("*.dcm"):
            try:
                dcmread(name)
            except Exception:  # noqa: BLE001, S112 - files pydicom itself cannot read
                continue
            paths.append(Path(name))
    return paths


@pytest.mark.filterwarnings("ignore")
def test_splicing_gives_the_bytes_of_a_whole_re_encoding(tmp_path: Path) -> None:
    """Every readable pydicom test file: the same output byte for byte, or the same refusal."""
    compared = 0
    for path in _readable_test_files():
        whole, spliced = _whole(path), _spliced(path, tmp_path / "out.dcm")
        if path.name == "MR_truncated.dcm":  # a whole read accepts the truncated pixel data
            assert spliced == "DecodeError"
            continue
        if isinstance(whole, str):  # refused; read_header may read a file without meta
            continue
        assert whole == spliced, path.name
        compared += isinstance(whole, bytes)
    assert compared > 60


def test_encapsulated_pixel_data_is_copied_unchanged(tmp_path: Path) -> None:
    source = Path(str(get_testdata_file("JPEG2000.dcm")))
    ds, span = read_header(source)
    assert span is not None
    assert "PixelData" not in ds
    ENGINE.deidentify(ds)
    target = tmp_path / "out.dcm"
    with target.open("wb") as handle:
        write_spliced(ds, span, handle)
    original = source.read_bytes()[span.offset : span.end]
    assert original[:4] == b"\xe0\x7f\x10\x00"
    assert target.read_bytes().endswith(original)
    assert dcmread(target).PixelData == dcmread(source).PixelData


def _with_trailing_elements(tmp_path: Path) -> Path:
    """MR_small with Data Set Trailing Padding and a private group after the pixel data."""
    ds = dcmread(str(get_testdata_file("MR_small.dcm")))
    ds.private_block(0x7FE1, "ACME 1.0", create=True).add_new(0x01, "LO", "kept by rule")
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)
    path = tmp_path / "trailing.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_trailing_elements_are_de_identified_and_kept_ones_follow_the_pixels(
    tmp_path: Path,
) -> None:
    source = _with_trailing_elements(tmp_path)
    keep = Deidentifier(
        Profile.from_options(
            [], rules=[{"private_creator": "ACME 1.0", "element": 0x01, "action": "keep"}]
        ),
        secret=TEST_SECRET.value,
    )
    ds, span = read_header(source)
    assert span is not None
    assert 0xFFFCFFFC in ds  # decoded, so that the engine acts on it
    spliced = _spliced(source, tmp_path / "out.dcm", keep)
    assert spliced == _whole(source, keep)
    out = dcmread(tmp_path / "out.dcm")
    assert 0xFFFCFFFC not in out  # X in Table E.1-1
    assert out[0x7FE1, 0x1001].value == "kept by rule"
    assert out.PixelData == dcmread(source).PixelData


def test_a_truncated_pixel_value_is_refused(tmp_path: Path) -> None:
    (source,) = make_series(tmp_path / "in", 1, rows=64)
    _, span = read_header(source)
    assert span is not None
    source.write_bytes(source.read_bytes()[: span.offset + 100])
    with pytest.raises(DecodeError, match="truncated"):
        read_header(source)


def test_a_broken_item_of_encapsulated_pixel_data_is_refused(tmp_path: Path) -> None:
    data = bytearray(Path(str(get_testdata_file("JPEG2000.dcm"))).read_bytes())
    delimiter = data.rindex(b"\xfe\xff\xdd\xe0")
    data[delimiter : delimiter + 4] = b"\xfe\xff\x00\xe1"  # neither an item nor the delimiter
    source = tmp_path / "broken.dcm"
    source.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match="encapsulated"):
        read_header(source)


def test_a_file_without_pixel_data_has_no_span(tmp_path: Path) -> None:
    ds = dcmread(str(get_testdata_file("rtplan.dcm")))
    path = tmp_path / "plan.dcm"
    ds.save_as(path, enforce_file_format=True)
    header, span = read_header(path)
    assert span is None
    assert header.SOPInstanceUID == ds.SOPInstanceUID


def test_pixel_data_never_enters_memory(tmp_path: Path) -> None:
    """A 64 MiB multi-frame instance is de-identified with under 4 MiB of Python allocations."""
    (source,) = make_series(tmp_path / "in", 1, rows=512, frames=128)
    assert source.stat().st_size > 64 * 2**20
    target = tmp_path / "out.dcm"
    tracemalloc.start()
    try:
        ds, span = read_header(source)
        ENGINE.deidentify(ds)
        with target.open("wb") as handle:
            write_spliced(ds, span, handle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    assert target.stat().st_size > 64 * 2**20
    header = dcmread(target, stop_before_pixels=True)
    assert header.PatientIdentityRemoved == "YES"
    assert span is not None
    with target.open("rb") as out, source.open("rb") as original:
        out.seek(-4096, 2)  # the trailing padding of the source is removed (X)
        original.seek(span.end - 4096)
        assert out.read() == original.read(4096)


def test_big_endian_pixel_data_is_spliced(tmp_path: Path) -> None:
    source = Path(str(get_testdata_file("MR_small_bigendian.dcm")))
    _, span = read_header(source)
    assert span is not None
    raw = source.read_bytes()[span.offset : span.offset + 4]
    assert struct.unpack(">HH", raw) == (0x7FE0, 0x0010)
    assert _spliced(source, tmp_path / "out.dcm") == _whole(source)


def test_the_file_preamble_is_never_copied(tmp_path: Path) -> None:
    """A sender's 128-byte preamble (free for the application: a TIFF header, or text) is not
    the data set's and is written as zeros, by the engine's API and by the file path."""
    from anonproxy.deid.instance import deidentify_file

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.preamble = b"SMITH^JOHN MRN 12345678".ljust(128, b"\0")
    source = tmp_path / "in.dcm"
    ds.save_as(source, enforce_file_format=True)
    assert source.read_bytes()[:5] == b"SMITH"
    deidentify_file(ENGINE, source, tmp_path / "out.dcm")
    written = (tmp_path / "out.dcm").read_bytes()
    assert written[:132] == bytes(128) + b"DICM"
    assert b"SMITH" not in written
    again = dcmread(source)
    ENGINE.deidentify(again)
    out = io.BytesIO()
    dcmwrite(out, again, enforce_file_format=True)
    assert out.getvalue()[:128] == bytes(128)


@pytest.mark.parametrize("header_bytes", [1_000, 1_100_000])
def test_a_header_is_read_as_pydicom_reads_the_file(tmp_path: Path, header_bytes: int) -> None:
    """A file of up to 1 MiB is parsed in memory, a longer one from the file: either way the
    data set and the span are those of pydicom reading the file."""
    (source,) = make_series(tmp_path / "in", 1, rows=256)  # 128 KiB of pixel data
    ds = dcmread(source)
    ds.add_new(0x00091001, "OB", b"\x01" * header_bytes)  # a private value of that length
    ds.save_as(source, enforce_file_format=True)
    expected = dcmread(source, stop_before_pixels=True)
    header, span = read_header(source)
    assert span is not None
    assert span.offset == source.read_bytes().index(b"\xe0\x7f\x10\x00OW")
    before_pixels = [tag for tag in header.keys() if tag < span.tag]  # noqa: SIM118
    assert before_pixels == list(expected.keys())
    for tag in before_pixels:  # as read (raw: tag, VR, length, value, offset in the file)
        assert header.get_item(tag) == expected.get_item(tag)
    assert header.file_meta == expected.file_meta
    assert header[0x00091001].value == b"\x01" * header_bytes


def test_a_header_cut_short_by_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    """Parsed in memory, a file that ends within a value of its header is still refused."""
    from anonproxy.deid.instance import deidentify_file
    from anonproxy.errors import StructureError

    (source,) = make_series(tmp_path / "in", 1, rows=64)
    ds = dcmread(source, stop_before_pixels=True)
    ds.add_new(0x00091001, "OB", b"\x01" * 100_000)
    ds.save_as(source, enforce_file_format=True)
    data = source.read_bytes()
    source.write_bytes(data[: data.index(b"\x01" * 16) + 90_000])  # within the private value
    with pytest.raises(StructureError, match="truncated"):
        deidentify_file(ENGINE, source, tmp_path / "out.dcm")


@pytest.mark.filterwarnings("ignore")
def test_decoded_converts_every_element_as_pydicom_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """decoded(ds, tag) leaves every data set, item and file meta of the readable test files as
    ds[tag] does: the same elements (VR, value, offset), of the same types; and it is
    ds[tag] itself with another pydicom than the one it mirrors."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    from anonproxy.deid import structure
    from anonproxy.deid.structure import decoded, get_decoded

    def walk(ds: Dataset, read: Callable[[Dataset, int], DataElement]) -> None:
        for tag in list(ds.keys()):
            element = read(ds, tag)
            if element.VR == "SQ":
                for item in element.value:
                    walk(item, read)

    compared = 0
    for path in _readable_test_files():
        by_pydicom, by_engine = dcmread(path, force=True), dcmread(path, force=True)
        for dataset in (by_pydicom, by_pydicom.file_meta):
            walk(dataset, lambda ds, tag: ds[tag])
        for dataset in (by_engine, by_engine.file_meta):
            walk(dataset, decoded)
        assert by_engine == by_pydicom, path.name
        assert by_engine.file_meta == by_pydicom.file_meta, path.name
        for tag in by_pydicom.keys():  # noqa: SIM118
            expected, got = by_pydicom.get_item(tag), by_engine.get_item(tag)
            assert type(got) is type(expected), path.name
            assert type(got.value) is type(expected.value), path.name
            assert (got.VR, got.file_tell) == (expected.VR, expected.file_tell), path.name
            compared += 1
    assert compared > 5000
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    assert get_decoded(ds, 0x00100010) is ds[0x00100010]
    assert get_decoded(ds, 0x00101234) is None
    from pydicom.hooks import hooks

    converted: list[object] = []
    monkeypatch.setattr(hooks, "raw_element_kwargs", {"unused": True})  # not pydicom's default
    monkeypatch.setattr(
        structure, "convert_raw_data_element", lambda raw, **_: converted.append(raw.tag)
    )
    decoded(ds, 0x00100030)  # Patient's Birth Date, raw: converted by pydicom's hooks
    assert converted == [0x00100030]
    monkeypatch.setattr(structure, "_MIRRORS_PYDICOM", False)
    calls: list[object] = []
    monkeypatch.setattr(Dataset, "__getitem__", lambda ds, key: calls.append(key))
    decoded(ds, 0x00100020)
    assert calls == [0x00100020]


@pytest.mark.filterwarnings("ignore")
def test_sequences_converted_by_decoded_are_pydicoms() -> None:
    """A sequence decoded converts (raw, explicit VR SQ) is what ds[tag] makes of it, and the
    data set and its items are left as ds[tag] leaves them: the Pixel Representation passed
    down, the value a Sequence; checked on every readable test file, every depth."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from anonproxy.deid.structure import decoded

    def state(ds: Dataset) -> object:
        return getattr(ds, "_pixel_rep", None)

    def walk(by_pydicom: Dataset, by_engine: Dataset) -> int:
        count = 0
        for tag in list(by_pydicom.keys()):
            raw = by_engine.get_item(tag)
            expected, got = by_pydicom[tag], decoded(by_engine, tag)
            assert got == expected
            assert state(by_engine) == state(by_pydicom)
            if expected.VR != "SQ":
                continue
            count += raw.VR == "SQ"
            assert type(got.value) is Sequence
            for item_p, item_e in zip(expected.value, got.value, strict=True):
                assert state(item_e) == state(item_p)
                count += walk(item_p, item_e)
        return count

    converted = 0
    for path in _readable_test_files():
        by_pydicom, by_engine = dcmread(path, force=True), dcmread(path, force=True)
        converted += walk(by_pydicom, by_engine)
        assert by_engine == by_pydicom, path.name
    assert converted > 100


@pytest.mark.filterwarnings("ignore")
def test_get_decoded_is_dataset_get_by_tag() -> None:
    """get_decoded(ds, tag) is ds.get(tag): the element, or None when absent, on every tag of
    the test files and on absent ones."""
    from anonproxy.deid.structure import get_decoded

    checked = 0
    for path in _readable_test_files()[:40]:
        by_pydicom, by_engine = dcmread(path, force=True), dcmread(path, force=True)
        for tag in [*by_pydicom.keys(), 0x00101234, 0x7FFF0010, 0x00080005]:
            assert get_decoded(by_engine, int(tag)) == by_pydicom.get(int(tag)), path.name
            checked += 1
    assert checked > 1000


@pytest.mark.filterwarnings("ignore")
def test_triage_and_policy_read_by_tag_as_by_keyword() -> None:
    """triage, the burned-in annotation test, the document type and the video test read their
    attributes by tag: the same answers as pydicom's keyword look-ups, on the test files."""
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

    from anonproxy.deid import pixels
    from anonproxy.deid.documents import DOCUMENT_TYPES, document_type, is_video

    def by_keyword(ds: Dataset) -> tuple[object, ...]:
        text = lambda keyword: str(ds.get(keyword) or "").strip("\0 ")  # noqa: E731
        sop_class = text("SOPClassUID")
        return (
            text("BurnedInAnnotation").upper() == "YES",
            DOCUMENT_TYPES.get(sop_class),
            ds.get("Rows") is None,
        )

    answers = set()
    for path in _readable_test_files():
        ds = dcmread(path, force=True)
        expected = by_keyword(dcmread(path, force=True))
        got = (
            pixels.declares_burned_in_annotation(ds),
            document_type(ds),
            pixels._value(ds, 0x00280010) is None,
        )
        assert got == expected, path.name
        answers.add(pixels.triage(ds))
    assert {None, "ultrasound", "secondary capture"} <= answers
    for syntax in ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.1"):
        name = UID(syntax).name
        expected_video = any(word in name for word in ("MPEG", "HEVC", "H.264", "H.265"))
        assert is_video(syntax) is is_video(UID(syntax)) is expected_video
    assert not is_video(None)
    assert not is_video("")
    with pytest.raises(TypeError):
        is_video(["1.2.840.10008.1.2.4.100"])  # not a string: pydicom's UID() refuses it


def test_codecs_are_pydicoms_conversion() -> None:
    """layout._codecs is convert_encodings(encodings or [default]): lists it gives back
    unchanged are remembered, and only those; the warnings are pydicom's."""
    from pydicom.charset import convert_encodings, default_encoding

    from anonproxy.deid import layout

    cases: list[object] = [
        ["iso8859"], ["latin_1"], ["iso8859", "iso2022_jp"], ["GB18030"], ["GB18030", "GBK"],
        ["ISO_IR 100"], ["ISO IR 100"], ["ISO_IR 192", "ISO 2022 IR 87"], [""], [], None,
        "ISO_IR 100", ["no-such-codec"], ["ISO 2022 IR 6", "ISO 2022 IR 100"],
    ]  # fmt: skip
    for _ in range(2):  # the second time, from what was remembered
        for encodings in cases:
            with warnings.catch_warnings(record=True) as ours:
                warnings.simplefilter("always")
                got = layout._codecs(encodings)  # type: ignore[arg-type]
            with warnings.catch_warnings(record=True) as theirs:
                warnings.simplefilter("always")
                expected = convert_encodings(encodings or [default_encoding])  # type: ignore[arg-type]
            assert got == expected, encodings
            assert [str(w.message) for w in ours] == [str(w.message) for w in theirs], encodings
    assert ("iso8859",) in layout._UNCHANGED_CODECS
    assert ("ISO_IR 100",) not in layout._UNCHANGED_CODECS


@pytest.mark.filterwarnings("ignore")
def test_character_set_is_pydicoms_property() -> None:
    """layout._character_set(ds) is ds._character_set for every data set and item of the test
    files (with and without a Specific Character Set) and for a new one."""
    from pydicom.dataset import Dataset

    from anonproxy.deid.layout import _character_set

    def walk(ds: Dataset) -> int:
        assert _character_set(ds) == ds._character_set
        count = 1
        for element in ds:
            if element.VR == "SQ":
                count += sum(walk(item) for item in element.value)
        return count

    checked = sum(walk(dcmread(path, force=True)) for path in _readable_test_files())
    assert checked > 500
    assert _character_set(Dataset()) == Dataset()._character_set

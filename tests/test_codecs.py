"""Pixel data decoding with the default install's codecs (no GPL package): every compressed file
of pydicom's test data decodes, 12-bit JPEG Extended included (anonproxy.codecs).

Decoding is checked in a fresh process that cannot import Pillow (a test dependency, through
highdicom, not a dependency of the package) nor pylibjpeg-libjpeg (GPL-3.0): what decodes there
decodes in the default install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from anonproxy import codecs

from peers import tool

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

# Files that no decoder can decode, with the reason.
BROKEN = {
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        "a copy of JPEG2000.dcm with 4 bytes of its codestream overwritten by a Sequence "
        "Delimiter (pydicom issue 1140): not a valid JPEG 2000 codestream"
    ),
}

# The plugins of the default install for each syntax (the table of anonproxy/codecs.py).
PLUGINS = {
    JPEGBaseline8Bit: {"gdcm"},
    JPEGExtended12Bit: {"gdcm", codecs.PLUGIN},
    JPEGLossless: {"gdcm"},
    JPEGLosslessSV1: {"gdcm"},
    JPEGLSLossless: {"gdcm", "pyjpegls"},
    JPEGLSNearLossless: {"gdcm", "pyjpegls"},
    JPEG2000Lossless: {"gdcm", "pylibjpeg"},
    JPEG2000: {"gdcm", "pylibjpeg"},
    HTJ2KLossless: {"pylibjpeg"},
    HTJ2KLosslessRPCL: {"pylibjpeg"},
    HTJ2K: {"pylibjpeg"},
    RLELossless: {"pylibjpeg", "pydicom"},
}

# Run first in the fresh process: Pillow and pylibjpeg-libjpeg cannot be imported.
_DEFAULT_INSTALL = """
import json, sys, warnings
sys.modules["PIL"] = None
sys.modules["libjpeg"] = None
warnings.simplefilter("ignore")
"""


def _header(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SC_rgb_jpeg.dcm says explicit VR, is implicit
        return dcmread(path, stop_before_pixels=True, force=True)


def _compressed_files() -> list[Path]:
    """Files of pydicom's test data with Pixel Data in a compressed transfer syntax."""
    found = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        ds = _header(path)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = dcmread(path, specific_tags=["PixelData"], force=True)
        if syntax is not None and UID(syntax).is_compressed and "PixelData" in full:
            found.append(path)
    return found


COMPRESSED = _compressed_files()


def _in_default_install(body: str) -> Any:
    """Run ``body`` in a fresh Python without Pillow nor pylibjpeg-libjpeg; its JSON output."""
    script = _DEFAULT_INSTALL + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@cache
def _decoded_in_default_install() -> dict[str, Any]:
    """Each compressed test file decoded with ``pixel_array``: shape and dtype, or the error."""
    return dict(
        _in_default_install(
            f"""
            from pathlib import Path
            from pydicom import dcmread
            from anonproxy import codecs
            codecs.install()
            result = {{}}
            for path in {[str(p) for p in COMPRESSED]!r}:
                try:
                    array = dcmread(path).pixel_array
                    result[Path(path).name] = [list(array.shape), str(array.dtype)]
                except Exception as exc:
                    result[Path(path).name] = f"{{type(exc).__name__}}: {{exc}}"
            print(json.dumps(result))
            """
        )
    )


def _dcmtk_decoded(path: Path, tmp_path: Path) -> np.ndarray:
    """The pixels of ``path`` as DCMTK's dcmdjpeg decodes them (IJG libjpeg, 8/12/16 bits)."""
    out = tmp_path / f"{path.stem}.dcmdjpeg.dcm"
    subprocess.run([tool("dcmdjpeg"), str(path), str(out)], check=True, capture_output=True)
    return dcmread(out).pixel_array


def test_the_test_data_has_compressed_files_of_most_syntaxes() -> None:
    syntaxes = {_header(p).file_meta.TransferSyntaxUID for p in COMPRESSED}
    assert len(COMPRESSED) >= 35
    assert {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless} <= syntaxes
    assert {JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless} <= syntaxes


@pytest.mark.parametrize("path", COMPRESSED, ids=lambda p: p.name)
def test_every_compressed_test_file_decodes_in_the_default_install(path: Path) -> None:
    outcome = _decoded_in_default_install()[path.name]
    if path.name in BROKEN:
        assert isinstance(outcome, str), f"{path.name} decodes now: take it out of BROKEN"
        return
    assert not isinstance(outcome, str), outcome
    ds = _header(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    shape = [*([frames] if frames > 1 else []), ds.Rows, ds.Columns]
    shape += [ds.SamplesPerPixel] if ds.SamplesPerPixel > 1 else []
    assert outcome[0] == shape
    assert np.dtype(outcome[1]).itemsize * 8 in (8, 16, 32)


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPGExtended.dcm"])
def test_12_bit_jpeg_extended_decodes_as_dcmtk_and_pydicom_expect(
    name: str, tmp_path: Path
) -> None:
    codecs.install()
    path = Path(str(get_testdata_file(name)))
    ds = dcmread(path)
    assert (ds.BitsStored, ds.file_meta.TransferSyntaxUID) == (12, JPEGExtended12Bit)
    array = ds.pixel_array
    assert (array.shape, array.dtype) == ((1024, 256), np.uint16)
    # The values pydicom's own test suite expects (tests/pixels/pixels_reference.py, JPGE_*).
    assert (array[420, 140], array[230, 120]) == (244, 95)
    assert array.max() < 4096
    assert np.array_equal(array, _dcmtk_decoded(path, tmp_path))


def test_12_bit_multi_frame_jpeg_extended_decodes_as_dcmtk(tmp_path: Path) -> None:
    """Three 12-bit frames, compressed by DCMTK (dcmcjpeg +ee, lossy Process 4)."""
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    pixels = ds.pixel_array.astype(np.int32)
    pixels = (pixels - pixels.min()) * 4095 // (pixels.max() - pixels.min())
    frames = np.stack([pixels, pixels[::-1], pixels[:, ::-1]]).astype("<u2")
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    source, compressed = tmp_path / "source.dcm", tmp_path / "jpeg12.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run([tool("dcmcjpeg"), "+ee", str(source), str(compressed)], check=True)
    assert dcmread(compressed).file_meta.TransferSyntaxUID == JPEGExtended12Bit

    codecs.install()
    array = dcmread(compressed).pixel_array
    assert (array.shape, array.dtype) == ((3, 64, 64), np.uint16)
    assert np.array_equal(array, _dcmtk_decoded(compressed, tmp_path))
    assert np.abs(array.astype(np.int32) - frames).mean() < 8  # lossy, but close


def test_install_is_idempotent_and_adds_the_plugin_after_the_others() -> None:
    codecs.install()
    codecs.install()
    decoder = get_decoder(JPEGExtended12Bit)
    assert decoder.available_plugins.count(codecs.PLUGIN) == 1
    ds = dcmread(get_testdata_file("JPGExtended.dcm"))
    array, _ = decoder.as_array(ds, decoding_plugin=codecs.PLUGIN)
    assert array[420, 140] == 244


def test_a_broken_12_bit_frame_is_refused_without_quoting_data() -> None:
    codecs.install()
    ds = dcmread(get_testdata_file("JPGExtended.dcm"))
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = pydicom.encaps.encapsulate([next(frame)[:40]])
    with pytest.raises(RuntimeError, match=f"{codecs.PLUGIN}: GDCM could not decode") as info:
        get_decoder(JPEGExtended12Bit).as_array(ds, decoding_plugin=codecs.PLUGIN)
    assert str(ds.PatientName) not in str(info.value)


def test_the_table_of_plugins_is_what_pydicom_has_in_the_default_install() -> None:
    available = _in_default_install(
        f"""
        from pydicom.pixels import get_decoder
        from anonproxy import codecs
        codecs.install()
        syntaxes = {[str(s) for s in PLUGINS]!r}
        print(json.dumps({{s: list(get_decoder(s).available_plugins) for s in syntaxes}}))
        """
    )
    assert {UID(s): set(labels) for s, labels in available.items()} == PLUGINS


def test_a_destination_without_jpeg_gets_12_bit_jpeg_decompressed() -> None:
    """The forwarder installs the plugin itself (a fresh sender process has not)."""
    path = get_testdata_file("JPEG-lossy.dcm")
    result = _in_default_install(
        f"""
        from anonproxy.forward import DicomSender
        from pydicom.uid import ExplicitVRLittleEndian, JPEGExtended12Bit
        ds = DicomSender._convert({str(path)!r}, JPEGExtended12Bit, {{ExplicitVRLittleEndian}})
        array = ds.pixel_array
        print(json.dumps([str(ds.file_meta.TransferSyntaxUID), ds.BitsAllocated,
                          int(array[420, 140]), int(array[230, 120])]))
        """
    )
    assert result == [ExplicitVRLittleEndian, 16, 244, 95]

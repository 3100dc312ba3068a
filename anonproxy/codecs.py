"""Pixel data decoders without the GPL, and the one pydicom lacks: 12-bit JPEG Extended.

anonproxy is Apache-2.0, so the default install has no GPL codec: pylibjpeg-libjpeg (GPL-3.0)
is left out. pydicom 3 tries, for each frame, its installed plugins in turn; the first that
decodes it wins. With the default install, each compressed transfer syntax that pydicom 3.0.2
decodes is decoded by (plugin label: package, its licence):

=========================================  ==================================================
Transfer syntax                            Plugins, in pydicom's order
=========================================  ==================================================
JPEG Baseline (Process 1)                  gdcm: python-gdcm (Apache-2.0; GDCM BSD-3-Clause,
                                           IJG libjpeg); pillow: Pillow (MIT-CMU), if present
JPEG Extended (Process 2 and 4), 8-bit     gdcm; pillow, if present
JPEG Extended (Process 2 and 4), 12-bit    anonproxy-gdcm: this module, on python-gdcm
JPEG Lossless, Process 14 (and SV1)        gdcm
JPEG-LS Lossless, Near-Lossless            gdcm; pyjpegls: pyjpegls (MIT; CharLS BSD-3-Clause)
JPEG 2000 (Lossless Only), JPEG 2000       gdcm; pylibjpeg: pylibjpeg with pylibjpeg-openjpeg
                                           (MIT; OpenJPEG BSD-2-Clause); pillow, if present
HTJ2K (Lossless, Lossless RPCL, lossy)     pylibjpeg: pylibjpeg-openjpeg
RLE Lossless                               pylibjpeg: pylibjpeg-rle (MIT); pydicom (MIT)
=========================================  ==================================================

pydicom's gdcm plugin refuses JPEG Extended at a precision other than 8 bits, and Pillow's
libjpeg is built for 8 bits: without pylibjpeg-libjpeg no plugin decodes 12-bit JPEG. GDCM
itself does (it carries IJG libjpeg built for 8, 12 and 16 bits): :func:`install` adds the
``anonproxy-gdcm`` plugin, which hands the frame to ``gdcm.JPEGCodec`` at 12 bits (DCMTK's
dcmdjpeg gives the same values). It decodes monochrome frames and refuses 12-bit colour.

Not decoded: JPEG 2000 Part 2 Multi-component (pydicom 3.0.2 has no decoder for it), the MPEG
and HEVC video syntaxes, and JPIP referenced pixel data (not in the data set at all).
"""

from __future__ import annotations

import threading
from typing import cast

from pydicom.pixels.decoders.base import DecodeRunner, JPEGExtended12BitDecoder
from pydicom.uid import JPEGExtended12Bit

try:
    import gdcm

    HAVE_GDCM = True
except ImportError:  # pragma: no cover - python-gdcm is a dependency
    HAVE_GDCM = False

PLUGIN = "anonproxy-gdcm"

# pydicom's plugin interface: what the plugin needs, per transfer syntax, and whether it is there.
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}

_lock = threading.Lock()


def is_available(uid: str) -> bool:
    """pydicom's plugin interface: whether this plugin can decode ``uid`` here."""
    return HAVE_GDCM and uid == JPEGExtended12Bit


def install() -> None:
    """Add the ``anonproxy-gdcm`` plugin to pydicom's JPEG Extended decoder (once)."""
    with _lock:
        if PLUGIN not in JPEGExtended12BitDecoder.available_plugins and HAVE_GDCM:
            JPEGExtended12BitDecoder.add_plugin(PLUGIN, (__name__, "_decode_frame"))


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame of JPEG Extended (monochrome, 8 or 12 bits) decoded by ``gdcm.JPEGCodec``."""
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the anonproxy-gdcm plugin decodes monochrome JPEG only")
    wide = runner.bits_stored > 8
    precision = 12 if wide else 8  # the JPEG Extended sample precisions
    codec = gdcm.JPEGCodec()
    # The codec picks its 8-, 12- or 16-bit libjpeg from the pixel format's Bits Allocated,
    # and copies the dimensions and photometric interpretation then: those come first.
    codec.SetNumberOfDimensions(2)
    codec.SetDimensions((runner.columns, runner.rows, 1))
    kind = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    codec.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    codec.SetPixelFormat(
        gdcm.PixelFormat(1, precision, precision, precision - 1, runner.pixel_representation)
    )
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    encoded = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    encoded.SetValue(fragments.__ref__())
    decoded = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    value = decoded.GetByteValue() if codec.Decode(encoded, decoded) else None
    if value is None:
        raise ValueError("GDCM could not decode the JPEG frame")
    # GDCM returns the buffer as a str: its bytes come back with surrogateescape.
    frame = cast(str, value.GetBuffer()).encode("utf-8", "surrogateescape")
    size = runner.rows * runner.columns * (2 if wide else 1)
    if len(frame) < size:
        raise ValueError("GDCM decoded fewer samples than the frame holds")
    runner.set_option("bits_allocated", 16 if wide else 8)
    return frame[:size]

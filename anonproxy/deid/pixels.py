"""Burned-in text in pixel data: triage from the header, and region rules that blank it.

**Triage** (:func:`triage`) decides from the header alone whether the pixels of an instance may
carry burned-in text: ultrasound, secondary capture, photographs, endoscopy and other visible
light, screen captures (Image Type SCREEN, SAVE, SCREEN SAVE, DOSE_INFO...; SECONDARY too, but
for CT, MR, PT, NM and the projection modalities, whose SECONDARY images are reconstructions),
and any image declaring Burned In Annotation YES (documents and video:
:mod:`anonproxy.deid.documents`). CT, MR, PT, NM, DX originals and reconstructions without that
flag are not looked at: their path does not change.

**Region rules** (``profile.pixel_rules``, :class:`PixelRule`): an ordered list, the first rule
whose condition matches the header of the received instance gives the regions to blank::

    - name: ACME US banner
      if: {Manufacturer: {contains: ACME}, Rows: {ge: 480}}
      regions: ["0,0,-0,60", "-200,-40,200,40"]     # x,y,w,h; negative: from the right/bottom

A condition maps header attributes (keywords: Manufacturer, ManufacturerModelName,
StationName, Rows, Columns, Modality, SOPClassUID...) to a value (equals) or to one operator:
``equals``, ``contains``, ``starts_with``, ``regex`` (strings, case-insensitive), ``lt``, ``le``,
``gt``, ``ge`` (numbers); ``all``, ``any`` (lists of conditions) and ``not`` combine them. A
region is ``"x,y,w,h"`` (``w`` or ``h`` of 0 or ``-0``: to the edge), ``all`` (the whole image),
or ``outside_ultrasound_regions`` (everything outside the Sequence of Ultrasound Regions).

**Blanking**, in every frame. Native (uncompressed) pixel data of 8, 16 or 32 bits allocated in
MONOCHROME1/2, RGB, PALETTE COLOR or YBR_FULL, copied as received, is blanked by
:func:`blank_native` straight in the output file: nothing is decoded and every other byte stays
as received (bit-exact). Anything else (compressed transfer syntaxes, deflated data sets, 1-bit,
subsampled YBR) is decoded and blanked by :func:`blank_decoded`, then stored JPEG-LS Lossless
when it came compressed (native otherwise, or when the encoder refuses it): lossless from the
decoded pixels, never a second lossy generation (YBR colour becomes RGB); pixel data that
cannot be decoded refuses the instance.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from anonproxy.deid import codes
from anonproxy.deid.codes import Code
from anonproxy.deid.structure import get_decoded
from anonproxy.errors import DeidentificationError

#: SOP Class UID prefixes whose pixels often carry burned-in text (PS3.4 Storage SOP Classes).
_TRIAGED_SOP_CLASSES: Mapping[str, str] = {
    "1.2.840.10008.5.1.4.1.1.6": "ultrasound",  # and 6.1, 6.2, 6.3
    "1.2.840.10008.5.1.4.1.1.3": "ultrasound",  # multi-frame: 3 (retired), 3.1
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",  # and 7.1 to 7.4
    "1.2.840.10008.5.1.4.1.1.77.": "visible light",
}
_TRIAGED_MODALITIES = {"US": "ultrasound", "XC": "photograph", "ES": "endoscopy", "OT": "other"}
#: Image Type (0008,0008) values of screen captures and saved screens (dose screens, 3D views).
_SCREEN_IMAGE_TYPES = frozenset(
    {"SCREEN", "SAVE", "SCREEN SAVE", "SCREENSHOT", "SCREEN CAPTURE", "CAPTURE", "DOSE_INFO",
     "DOSE INFO", "CSA REPORT"}
)  # fmt: skip
#: Modalities whose SECONDARY images are reconstructions (MPR, MIP, subtractions, maps), not
#: captures: only the values above send them to the pixel stage. Elsewhere SECONDARY does too.
_RECONSTRUCTING_MODALITIES = frozenset(
    {"CT", "MR", "PT", "NM", "DX", "CR", "MG", "XA", "RF", "IO", "PX", "BMD", "OPT", "OCT"}
)


#: The attributes triage reads, by tag (``ds.get(keyword)`` looks each keyword up first)
_ROWS = 0x00280010
_BURNED_IN_ANNOTATION = 0x00280301
_SOP_CLASS_UID = 0x00080016
_MODALITY = 0x00080060
_IMAGE_TYPE = 0x00080008


def _value(ds: Dataset, tag: int) -> Any:  # noqa: ANN401 - any value
    """``ds.get(keyword)`` for the keyword of *tag*, by tag (:func:`get_decoded`)."""
    element = get_decoded(ds, tag)
    return element.value if element is not None else None


def _text(ds: Dataset, tag: int) -> str:
    value = _value(ds, tag)
    return "" if value is None else str(value).strip("\0 ")


def declares_burned_in_annotation(ds: Dataset) -> bool:
    """True if Burned In Annotation (0028,0301) is YES."""
    return _text(ds, _BURNED_IN_ANNOTATION).upper() == "YES"


def read_by_sop_class(sop_class: str) -> str | None:
    """The reason to read the pixels of every image of *sop_class*, or None."""
    for prefix, reason in _TRIAGED_SOP_CLASSES.items():
        if sop_class == prefix or sop_class.startswith(prefix.rstrip(".") + "."):
            return reason
    return None


def triage(ds: Dataset) -> str | None:
    """Why the pixels of the image ``ds`` need looking at, or None (the header says they do
    not, or it is no image)."""
    if _value(ds, _ROWS) is None:
        return None
    if declares_burned_in_annotation(ds):
        return "burned-in annotation"
    by_class = read_by_sop_class(_text(ds, _SOP_CLASS_UID))
    if by_class is not None:
        return by_class
    modality = _text(ds, _MODALITY).upper()
    if modality in _TRIAGED_MODALITIES:
        return _TRIAGED_MODALITIES[modality]
    return _image_type_reason(
        {str(v).strip().upper() for v in _value(ds, _IMAGE_TYPE) or []}, modality
    )


def _image_type_reason(image_type: set[str], modality: str) -> str | None:
    if image_type & _SCREEN_IMAGE_TYPES:
        return "screen capture"
    if "SECONDARY" in image_type and modality not in _RECONSTRUCTING_MODALITIES:
        return "secondary image"
    return None


# -- rules ------------------------------------------------------------------------------------

_STRING_OPERATORS = ("equals", "contains", "starts_with", "regex")
_NUMBER_OPERATORS = {"lt": float.__lt__, "le": float.__le__, "gt": float.__gt__, "ge": float.__ge__}


@dataclass(frozen=True)
class Region:
    """``x,y,w,h`` in pixels; negative ``x``/``y`` count from the right/bottom edge, a width or
    height of 0 reaches the edge."""

    x: int
    y: int
    w: int
    h: int

    def box(self, columns: int, rows: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` clipped to an image of ``columns`` x ``rows``."""
        x0 = self.x if self.x >= 0 else columns + self.x
        y0 = self.y if self.y >= 0 else rows + self.y
        x1 = columns if self.w <= 0 else x0 + self.w
        y1 = rows if self.h <= 0 else y0 + self.h
        return max(0, x0), max(0, y0), min(columns, x1), min(rows, y1)


#: CID 7050: added to De-identification Method Code Sequence when a rule blanked the pixels.
CLEAN_PIXEL_DATA: Code = codes.CLEAN_PIXEL_DATA

ALL = "all"
OUTSIDE_ULTRASOUND_REGIONS = "outside_ultrasound_regions"


@dataclass(frozen=True)
class PixelRule:
    """One region rule: a name, a condition on the header, the regions to blank."""

    name: str
    condition: Mapping[str, Any]
    regions: tuple[Region | str, ...]

    @classmethod
    def parse(cls, index: int, raw: Mapping[str, Any]) -> PixelRule:
        """A rule in its YAML form; ValueError naming the rule and what is wrong."""
        where = f"pixel_rules.{index}"
        unknown = set(raw) - {"name", "if", "regions"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        condition = raw.get("if") or {}
        if not isinstance(condition, Mapping):
            raise ValueError(f"{where}.if: a mapping of attributes to values or operators")
        _check_condition(condition, f"{where}.if")
        regions = raw.get("regions")
        if not isinstance(regions, Sequence) or isinstance(regions, str) or not regions:
            raise ValueError(f"{where}.regions: a non-empty list")
        return cls(
            name=str(raw.get("name") or where),
            condition=condition,
            regions=tuple(parse_region(r, f"{where}.regions") for r in regions),
        )

    def matches(self, ds: Dataset) -> bool:
        """True if the header ``ds`` meets the condition."""
        return _holds(self.condition, ds)


def parse_pixel_rules(raw: Sequence[Mapping[str, Any] | PixelRule]) -> tuple[PixelRule, ...]:
    """Rules in their YAML form (or already parsed); ValueError naming the first bad one."""
    return tuple(
        r if isinstance(r, PixelRule) else PixelRule.parse(i, r) for i, r in enumerate(raw)
    )


def first_rule(rules: Sequence[PixelRule], ds: Dataset) -> PixelRule | None:
    """The first rule whose condition the header ``ds`` meets."""
    return next((rule for rule in rules if rule.matches(ds)), None)


def parse_region(raw: object, where: str) -> Region | str:
    """A region in its YAML form; ValueError naming *where*."""
    if raw in (ALL, OUTSIDE_ULTRASOUND_REGIONS):
        return str(raw)
    parts = raw.split(",") if isinstance(raw, str) else raw
    try:
        if not isinstance(parts, list | tuple):
            raise TypeError
        x, y, w, h = (int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        msg = f"{where}: {raw!r} is not x,y,w,h, all or {OUTSIDE_ULTRASOUND_REGIONS}"
        raise ValueError(msg) from None
    return Region(x, y, w, h)


def _check_condition(condition: Mapping[str, Any], where: str) -> None:
    for key, value in condition.items():
        if key in ("all", "any"):
            if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
                raise ValueError(f"{where}.{key}: a list of conditions")
            for i, inner in enumerate(value):
                _check_condition(inner, f"{where}.{key}.{i}")
        elif key == "not":
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.not: a condition")
            _check_condition(value, f"{where}.not")
        elif isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in (
                *_STRING_OPERATORS,
                *_NUMBER_OPERATORS,
            ):
                known = ", ".join((*_STRING_OPERATORS, *_NUMBER_OPERATORS))
                raise ValueError(f"{where}.{key}: one operator of {known}")
            operator, operand = next(iter(value.items()))
            if operator == "regex":
                try:
                    re.compile(str(operand))
                except re.error as exc:
                    raise ValueError(f"{where}.{key}.regex: {exc.msg}") from None
            elif operator in _NUMBER_OPERATORS and not isinstance(operand, int | float):
                raise ValueError(f"{where}.{key}.{operator}: a number")


def _holds(condition: Mapping[str, Any], ds: Dataset) -> bool:
    for key, value in condition.items():
        if key == "all":
            ok = all(_holds(c, ds) for c in value)
        elif key == "any":
            ok = any(_holds(c, ds) for c in value)
        elif key == "not":
            ok = not _holds(value, ds)
        else:
            ok = _compare(ds.get(key), value)
        if not ok:
            return False
    return True


def _compare(actual: object, expected: object) -> bool:
    if actual is None:
        return False
    operator, operand = (
        next(iter(expected.items())) if isinstance(expected, Mapping) else ("equals", expected)
    )
    if operator in _NUMBER_OPERATORS:
        try:
            return bool(_NUMBER_OPERATORS[operator](float(str(actual)), float(str(operand))))
        except ValueError:
            return False
    text, wanted = str(actual).strip("\0 ").casefold(), str(operand).casefold()
    if operator == "regex":
        return re.search(str(operand), str(actual), re.IGNORECASE) is not None
    return {"equals": text == wanted, "contains": wanted in text}.get(
        operator, text.startswith(wanted)
    )


# -- blanking -----------------------------------------------------------------------------------


def boxes(rule: PixelRule, ds: Dataset) -> list[tuple[int, int, int, int]]:
    """The regions of ``rule`` as ``(x0, y0, x1, y1)`` boxes of the image of ``ds``."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    out: list[tuple[int, int, int, int]] = []
    for region in rule.regions:
        if region == ALL:
            out.append((0, 0, columns, rows))
        elif region == OUTSIDE_ULTRASOUND_REGIONS:
            out.extend(_outside_ultrasound_regions(ds, columns, rows))
        else:
            assert isinstance(region, Region)  # noqa: S101 - parsed as one of the three
            out.append(region.box(columns, rows))
    return [b for b in out if b[0] < b[2] and b[1] < b[3]]


def _outside_ultrasound_regions(
    ds: Dataset, columns: int, rows: int
) -> Iterator[tuple[int, int, int, int]]:
    """Rows and columns outside the bounding box of the Sequence of Ultrasound Regions (the
    whole image when it has none)."""
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    if not regions:
        yield 0, 0, columns, rows
        return
    x0 = min(int(r.RegionLocationMinX0) for r in regions)
    y0 = min(int(r.RegionLocationMinY0) for r in regions)
    x1 = max(int(r.RegionLocationMaxX1) for r in regions) + 1
    y1 = max(int(r.RegionLocationMaxY1) for r in regions) + 1
    yield 0, 0, columns, y0  # above
    yield 0, y1, columns, rows  # below
    yield 0, y0, x0, y1  # left
    yield x1, y0, columns, y1  # right


_SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"}


def blank_native(
    handle_fd: int,
    value_offset: int,
    ds: Dataset,
    regions: Sequence[tuple[int, int, int, int]],
    *,
    little_endian: bool = True,
) -> None:
    """Overwrite ``regions`` in native pixel data that starts at ``value_offset`` of the open
    file ``handle_fd``, in every frame; DeidentificationError for an encoding it cannot blank.
    MONOCHROME1 is blanked white-to-black as its minimum (largest stored value), YBR_FULL with
    neutral chroma, the others with 0."""
    check_blankable(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    bits = int(ds.get("BitsAllocated", 0))
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    planar = int(ds.get("PlanarConfiguration", 0)) if samples > 1 else 0
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    size = bits // 8
    fill = _fill(photometric, samples, size, int(ds.get("BitsStored", bits)), little_endian)
    frame_bytes = rows * columns * samples * size
    for frame in range(frames):
        base = value_offset + frame * frame_bytes
        for x0, y0, x1, y1 in regions:
            for y in range(y0, y1):
                if planar:
                    for sample in range(samples):
                        start = base + (sample * rows * columns + y * columns + x0) * size
                        os.pwrite(handle_fd, fill[sample] * (x1 - x0), start)
                elif x0 == 0 and x1 == columns:  # whole rows are contiguous: one write
                    start = base + y0 * columns * samples * size
                    os.pwrite(handle_fd, b"".join(fill) * columns * (y1 - y0), start)
                    break
                else:
                    start = base + (y * columns + x0) * samples * size
                    os.pwrite(handle_fd, b"".join(fill) * (x1 - x0), start)


def blank_decoded(ds: Dataset, regions: Sequence[tuple[int, int, int, int]]) -> None:
    """Decode the pixel data of ``ds`` (held in memory), blank ``regions`` in every frame and
    store the result losslessly, so no second lossy generation: JPEG-LS Lossless if it came
    compressed, else native (Explicit VR Little Endian); YBR colour decoded to RGB.
    DeidentificationError when it cannot be decoded (no value in the message)."""
    import numpy as np  # noqa: PLC0415 - only instances with burned-in text need it

    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    compressed = bool(ds.file_meta.TransferSyntaxUID.is_compressed)
    try:
        array = np.array(ds.pixel_array)  # a writable copy, every frame
    except Exception as exc:  # noqa: BLE001 - a codec failure refuses the instance
        raise DeidentificationError(
            f"pixel rule: cannot decode the pixel data to blank it ({type(exc).__name__})"
        ) from None
    frames = array if int(ds.get("NumberOfFrames", 1) or 1) > 1 else array[np.newaxis]
    samples = int(ds.get("SamplesPerPixel", 1))
    stored = int(ds.get("BitsStored", array.dtype.itemsize * 8))
    fill = (1 << stored) - 1 if photometric == "MONOCHROME1" else 0
    for x0, y0, x1, y1 in regions:
        frames[:, y0:y1, x0:x1] = fill
    if samples == 3:
        photometric = "RGB"  # pydicom decodes YBR to RGB
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if array.dtype.itemsize > 2:  # set_pixel_data takes 8 and 16 bits only
        ds.PixelData = array.astype(array.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW"
        return
    ds.set_pixel_data(array, photometric, min(stored, 8 * array.dtype.itemsize),
                      generate_instance_uid=False)  # fmt: skip
    if compressed:
        _compress_lossless(ds)


def _compress_lossless(ds: Dataset) -> None:
    """Encode the native pixel data of ``ds`` as JPEG-LS Lossless (pyjpegls), as it came
    compressed; left native if the encoder refuses it. A destination that does not accept
    JPEG-LS gets it uncompressed from the forwarder."""
    native = ds.PixelData
    try:
        ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
    except Exception:  # noqa: BLE001 - native is lossless too
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = native
        ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"


def check_blankable(ds: Dataset) -> None:
    """DeidentificationError unless :func:`blank_native` can blank the pixel data of ``ds``."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    bits = int(ds.get("BitsAllocated", 0))
    if photometric not in _SUPPORTED_PHOTOMETRIC or bits not in (8, 16, 32):
        raise DeidentificationError(
            f"pixel rule: cannot blank {photometric or 'unknown'} pixel data of {bits} bits"
        )


def _fill(photometric: str, samples: int, size: int, stored: int, little: bool) -> list[bytes]:
    """The bytes of one blank sample per sample plane."""
    order: Literal["little", "big"] = "little" if little else "big"
    if photometric == "MONOCHROME1":
        return [((1 << stored) - 1).to_bytes(size, order)]
    if photometric == "YBR_FULL":
        mid = (1 << (size * 8 - 1)).to_bytes(size, order)
        return [bytes(size), mid, mid]
    return [bytes(size)] * samples

"""Finding burned-in identifying text with OCR: the detector of the Clean Pixel Data option.

For an image that triage sent to the pixel stage (:func:`anonproxy.deid.pixels.triage`),
:func:`find_text` reads frames with a :class:`~anonproxy.deid.ocr.TextReader` and returns the
boxes of the text lines to blank:

* **Which frames.** The first; for a multi-frame image also the middle and the last frame, and
  an image of the pixels that stay still across up to 8 frames spread over the loop (a banner
  over a moving cine loop reads better there). Every frame is then blanked with the same boxes.
* **Which lines** (:data:`CleanPixelData`). ``identifying``: a line is blanked when it holds an
  identifying value of the instance (:meth:`Deidentifier.identifying_values
  <anonproxy.deid.engine.Deidentifier.identifying_values>`: person names, identifiers,
  institution, addresses, telephone numbers, and the birth, study, series, acquisition and
  content dates in the usual written forms), or text that identifies by its form (a date, a
  telephone or record number, an e-mail address, a titled name, a street address). The match
  is fuzzy: case, spacing and punctuation are ignored, a word may differ from a value by one
  character in five (OCR misreads) or be a truncation of it of five characters or more (screens
  cut long names), and digits misread as letters (``O``, ``I``, ``S``, ``B``) count as digits.
  Dates are not identifying under Retain Longitudinal Temporal Information with Full Dates.
  ``all_text``: every line outside the keep regions is blanked.
* **The whole line** is blanked, padded by 2 pixels: a banner line that holds a name also holds
  the rest of the patient's identity.
* **Verification.** The frames are blanked in memory and read again; lines found then are
  blanked too (the blanking can uncover text the detector had merged), up to
  :data:`MAX_READS` reads; if an identifying line is still read after that,
  :class:`~anonproxy.errors.DeidentificationError` refuses the instance, naming the attribute or
  the kind of text, never the text.

Pixel data that cannot be decoded refuses the instance too (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import TYPE_CHECKING, Literal

from pydicom.dataset import Dataset

from anonproxy.deid.ocr import Box, TextLine, TextReader
from anonproxy.deid.pixels import Region, parse_region
from anonproxy.deid.selfcheck import PHONE
from anonproxy.errors import DeidentificationError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from anonproxy.deid.selfcheck import IdentifyingValues

#: ``profile.clean_pixel_data``: what OCR blanks in the images that triage sends to it.
CleanPixelData = Literal["identifying", "all_text", "off"]

#: ``profile.pixel_keep_regions``: ``ultrasound_regions`` (inside the Sequence of Ultrasound
#: Regions) or ``x,y,w,h``; a line wholly inside one is kept under ``all_text``.
ULTRASOUND_REGIONS = "ultrasound_regions"

MAX_READS = 3
STILL_FRAMES = 8
PADDING = 2

_DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DATE_PATTERN = re.compile(
    r"(?<!\d)(?:\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})|\d{4}[-/.]\d{1,2}[-/.]\d{1,2})(?!\d)"
    r"|(?<![a-z])\d{1,2}[- ]?(?:" + "|".join(_MONTHS) + r")[a-z]*[- ,]*\d{2,4}(?!\d)",
    re.IGNORECASE,
)
_FLOAT_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009})
_AS_DIGITS = str.maketrans({"o": "0", "i": "1", "l": "1", "s": "5", "b": "8"})
_WORD_SPLIT = re.compile(r"[^0-9a-z]+")


def _normal(text: str) -> str:
    """Lower case, letters and digits only."""
    return _WORD_SPLIT.sub("", text.casefold())


def _digits_first(word: str) -> str:
    """A word made mostly of digits with the letters OCR reads for digits turned into digits."""
    digits = sum(c.isdigit() for c in word)
    return word.translate(_AS_DIGITS) if digits * 2 >= len(word) else word


def _date_forms(value: str) -> Iterator[str]:
    """A DA value ``YYYYMMDD`` as written on screens, letters and digits only: ``19510829``,
    ``08291951``, ``29081951``, ``8291951``, ``082951``, ``29aug1951``..."""
    digits = value.strip()[:8]
    if len(digits) != 8 or not digits.isdigit():
        return
    y, m, d = digits[:4], digits[4:6], digits[6:]
    month, day = str(int(m)), str(int(d))
    name = _MONTHS[int(m) - 1] if 1 <= int(m) <= 12 else m
    yield from (y + m + d, m + d + y, d + m + y, month + day + y, day + month + y)
    yield from (m + d + y[2:], d + m + y[2:], y[2:] + m + d)
    yield from (d + name + y, day + name + y, name + d + y, name + day + y)


@dataclass(frozen=True)
class PixelText:
    """What makes a line of burned-in text identifying, for one instance (never logged)."""

    values: dict[str, str]  # normalised value or word of a value → attribute keyword
    dates: dict[str, str]  # normalised written form of a date → attribute keyword
    forms: dict[str, re.Pattern[str]]  # kinds of identifying text → pattern

    @classmethod
    def of(
        cls,
        ds: Dataset,
        ids: IdentifyingValues,
        patterns: dict[str, re.Pattern[str]],
        *,
        dates: bool = True,
    ) -> PixelText:
        """From the identifying values of the original header ``ds``; its dates and any date
        are identifying unless *dates* is False."""
        values: dict[str, str] = {}
        for value, keyword in ids.words.items():
            if value.startswith(PHONE):
                values.setdefault(value[1:], keyword)
                continue
            values.setdefault(_digits_first(_normal(value)), keyword)
            for word in _WORD_SPLIT.split(value.casefold()):
                if len(word) >= 3 and not word.isdigit():
                    values.setdefault(word, keyword)
        date_forms: dict[str, str] = {}
        forms = {"date": _DATE_PATTERN} if dates else {}
        forms.update(patterns)
        if dates:
            for keyword in _DATES:
                for form in _date_forms(str(ds.get(keyword) or "")):
                    date_forms.setdefault(form, keyword)
        values.pop("", None)
        return cls(values, date_forms, forms)

    def identifies(self, text: str) -> str | None:
        """What in the line *text* identifies someone (an attribute keyword or a kind of
        text), or None."""
        line = _normal(text)
        words = [_digits_first(w) for w in _WORD_SPLIT.split(text.casefold()) if w]
        joined = _digits_first(line)
        for value, keyword in self.values.items():
            if value in words or (len(value) >= 4 and (value in line or value in joined)):
                return keyword
        for word in words:
            misread = self._fuzzy(word)
            if misread is not None:
                return misread
        for form, keyword in self.dates.items():
            if form in line or form in joined:
                return keyword
        if "date" not in self.forms:  # kept dates are not telephone numbers either
            text = _DATE_PATTERN.sub(" ", text)
        return next((kind for kind, p in self.forms.items() if p.search(text)), None)

    def _fuzzy(self, word: str) -> str | None:
        """The keyword of a value that ``word`` misreads (one character in five) or truncates
        (five characters or more)."""
        if len(word) < 5:
            return None
        for value, keyword in self.values.items():
            if len(value) >= 5 and value.startswith(word):
                return keyword
            if abs(len(value) - len(word)) <= len(value) // 5 and len(value) >= 5:
                ratio = SequenceMatcher(None, word, value, autojunk=False).ratio()
                if ratio >= 0.8:
                    return keyword
        return None


# -- frames -------------------------------------------------------------------------------------


def _decode(ds: Dataset, index: int) -> NDArray[np.generic]:
    from pydicom.pixels.utils import pixel_array  # noqa: PLC0415 - only for images that are read

    try:
        return pixel_array(ds, index=index)
    except Exception as exc:  # noqa: BLE001 - a codec failure refuses the instance
        raise DeidentificationError(
            f"burned-in text: cannot decode the pixel data to read it ({type(exc).__name__})"
        ) from None


def _display(ds: Dataset, frame: NDArray[np.generic]) -> NDArray[np.uint8]:
    """An 8-bit image of a decoded frame: grey levels stretched to 0..255 (MONOCHROME1
    inverted), colour as RGB (palette colour through its lookup table)."""
    import numpy as np  # noqa: PLC0415

    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut  # noqa: PLC0415

        frame = apply_color_lut(frame, ds)
    if frame.dtype == np.uint8 and photometric != "MONOCHROME1":
        return np.ascontiguousarray(frame)
    data = frame.astype(np.float64)
    low, high = float(data.min()), float(data.max())
    scaled = (data - low) * (255.0 / (high - low)) if high > low else np.zeros_like(data)
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.ascontiguousarray(scaled.astype(np.uint8))


def _blank_value(ds: Dataset) -> int:
    """The stored value that blanking writes (as :func:`anonproxy.deid.pixels.blank_decoded`)."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return (1 << int(ds.get("BitsStored", 8))) - 1
    return 0


@dataclass
class _Frames:
    """The decoded frames that are read, and the image of the pixels that stay still."""

    ds: Dataset
    decoded: list[NDArray[np.generic]]
    still_mask: NDArray[np.bool_] | None

    @classmethod
    def of(cls, ds: Dataset) -> _Frames:
        import numpy as np  # noqa: PLC0415

        if _FLOAT_PIXEL_DATA & set(ds.keys()):  # the decoders want Pixel Data alone
            ds = ds.copy()
            for tag in _FLOAT_PIXEL_DATA:
                ds.pop(tag, None)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        if count == 1:
            return cls(ds, [_decode(ds, 0)], None)
        spread = sorted({round(i * (count - 1) / (STILL_FRAMES - 1)) for i in range(STILL_FRAMES)})
        wanted = sorted({0, count // 2, count - 1, *spread})
        frames = {index: _decode(ds, index) for index in wanted}
        first = frames[0]
        still = np.ones(first.shape[:2], dtype=bool)
        for index in spread[1:]:
            differs = frames[index] != first
            still &= ~(differs.any(axis=-1) if differs.ndim == 3 else differs)
        read = sorted({0, count // 2, count - 1})
        return cls(ds, [frames[index] for index in read], still)

    def images(self, boxes: Sequence[Box]) -> Iterator[NDArray[np.uint8]]:
        """The 8-bit images to read, with *boxes* blanked."""
        import numpy as np  # noqa: PLC0415

        fill = _blank_value(self.ds)
        for frame in self.decoded:
            yield _display(self.ds, _blanked(frame, boxes, fill))
        if self.still_mask is not None:
            first = _blanked(self.decoded[0], boxes, fill)
            mask = self.still_mask if first.ndim == 2 else self.still_mask[..., np.newaxis]
            yield _display(self.ds, np.where(mask, first, fill).astype(first.dtype))


def _blanked(frame: NDArray[np.generic], boxes: Sequence[Box], fill: int) -> NDArray[np.generic]:
    if not boxes:
        return frame
    out = frame.copy()
    for x0, y0, x1, y1 in boxes:
        out[y0:y1, x0:x1] = fill
    return out


# -- detection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextFound:
    """The outcome of :func:`find_text`: the boxes to blank in every frame, how many images
    were read (in all reads), and the attributes or kinds of text that made lines identifying
    (for the audit record; never the text)."""

    boxes: tuple[Box, ...]
    images_read: int
    reasons: tuple[str, ...]

    def describe(self) -> str:
        """``"OCR read N images: K lines blanked (<attributes, kinds>) at x0,y0,x1,y1 ..."``
        (boxes, ``x1`` and ``y1`` excluded), never the text."""
        if not self.boxes:
            return f"OCR read {self.images_read} images: no identifying text"
        where = " ".join(",".join(str(v) for v in box) for box in self.boxes)
        why = ", ".join(self.reasons)
        count = len(self.boxes)
        return f"OCR read {self.images_read} images: {count} lines blanked ({why}) at {where}"


def parse_keep_regions(raw: Sequence[object]) -> tuple[Region | str, ...]:
    """``profile.pixel_keep_regions``; ValueError naming the first bad one."""
    return tuple(
        r if r == ULTRASOUND_REGIONS or isinstance(r, Region) else _region(r, i)
        for i, r in enumerate(raw)
    )


def _region(raw: object, index: int) -> Region:
    region = parse_region(raw, f"pixel_keep_regions.{index}")
    if not isinstance(region, Region):
        raise ValueError(f"pixel_keep_regions.{index}: x,y,w,h or {ULTRASOUND_REGIONS}")
    return region


def keep_boxes(ds: Dataset, keep: Iterable[Region | str]) -> list[Box]:
    """The keep regions as boxes of the image of ``ds``."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    out: list[Box] = []
    for region in keep:
        if region == ULTRASOUND_REGIONS:
            for item in ds.get("SequenceOfUltrasoundRegions") or []:
                out.append(
                    (
                        int(item.RegionLocationMinX0),
                        int(item.RegionLocationMinY0),
                        int(item.RegionLocationMaxX1) + 1,
                        int(item.RegionLocationMaxY1) + 1,
                    )
                )
        elif isinstance(region, Region):
            out.append(region.box(columns, rows))
    return out


def _inside(box: Box, regions: Sequence[Box]) -> bool:
    return any(
        r[0] <= box[0] and r[1] <= box[1] and box[2] <= r[2] and box[3] <= r[3] for r in regions
    )


def _padded(box: Box, columns: int, rows: int) -> Box:
    x0, y0, x1, y1 = box
    return (
        max(0, x0 - PADDING),
        max(0, y0 - PADDING),
        min(columns, x1 + PADDING),
        min(rows, y1 + PADDING),
    )


def find_text(
    ds: Dataset,
    reader: TextReader,
    text: PixelText,
    *,
    mode: CleanPixelData = "identifying",
    blanked: Sequence[Box] = (),
    keep: Sequence[Box] = (),
) -> TextFound:
    """Read the frames of the image ``ds`` (the whole original instance, pixel data
    included), *blanked* (a rule's boxes) already applied, and return the text lines to blank;
    DeidentificationError when identifying text is still read after :data:`MAX_READS` reads."""
    frames = _Frames.of(ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    boxes: list[Box] = []
    reasons: set[str] = set()
    read = 0
    for attempt in range(MAX_READS):
        found: list[tuple[TextLine, str | None]] = []
        for image in frames.images([*blanked, *boxes]):
            read += 1
            found += [(line, text.identifies(line.text)) for line in reader.read(image)]
        identifying = [(line, why) for line, why in found if why is not None]
        new = identifying
        if mode == "all_text":  # and identifying lines inside the keep regions too
            new = [
                (line, why or "text") for line, why in found if why or not _inside(line.box, keep)
            ]
        if not new:
            break
        if attempt == MAX_READS - 1 and identifying:
            still = ", ".join(sorted({why for _, why in identifying if why is not None}))
            raise DeidentificationError(
                f"burned-in text: {still} still read after blanking {len(boxes)} lines"
            )
        boxes = _merged([*boxes, *(_padded(line.box, columns, rows) for line, _ in new)])
        reasons |= {why or "text" for _, why in new}
    return TextFound(tuple(boxes), read, tuple(sorted(reasons)))


def _merged(boxes: Iterable[Box]) -> list[Box]:
    """*boxes* with those that overlap by half of the smaller one replaced by their union (the
    two images of a frame read the same line)."""
    out: list[Box] = []
    for box in boxes:
        for i, other in enumerate(out):
            w = min(box[2], other[2]) - max(box[0], other[0])
            h = min(box[3], other[3]) - max(box[1], other[1])
            smaller = min(_area(box), _area(other))
            if w > 0 and h > 0 and w * h * 2 >= smaller:
                out[i] = (
                    min(box[0], other[0]),
                    min(box[1], other[1]),
                    max(box[2], other[2]),
                    max(box[3], other[3]),
                )
                break
        else:
            out.append(box)
    return out


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])

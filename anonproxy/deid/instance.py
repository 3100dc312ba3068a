"""One instance file in, one de-identified file out: the single path of ``anonproxy serve``
(:mod:`anonproxy.workers`), ``anonproxy deidentify`` and :meth:`Deidentifier.deidentify_file`.

:func:`deidentify_file` goes through these steps; each failure is a typed error whose message
names attributes, limits and policies, never a value of the data set:

1. read the header (:func:`~anonproxy.deid.files.read_received`: the pixel data stays on disk,
   the transfer syntax its elements were received in is recorded):
   :class:`~anonproxy.errors.InputUnreadable` when the file cannot be read at all,
   :class:`~anonproxy.errors.DecodeError` when it is not DICOM,
   :class:`~anonproxy.errors.LimitExceeded` when a deflated data set inflates past
   :attr:`Limits.max_inflated_bytes`;
2. check the structure (:func:`~anonproxy.deid.structure.check_structure`): LimitExceeded past
   :attr:`Limits.max_sequence_depth`, :class:`~anonproxy.errors.StructureError`;
3. apply the profile's policy (:func:`check_policy`): :class:`~anonproxy.errors.PolicyRefusal`
   for Burned In Annotation (0028,0301) YES under ``burned_in_annotation: reject``, a video
   transfer syntax under ``video: reject``, an encapsulated document under
   ``encapsulated_documents: reject``; DeidentificationError for a document that names someone
   under ``clean``;
4. de-identify (:meth:`Deidentifier.deidentify_with_check`):
   :class:`~anonproxy.errors.DeidentificationError`;
5. write the de-identified header with the pixel data copied from the source
   (:func:`~anonproxy.deid.files.write_spliced`: the elements the engine left alone copied as
   received, the others encoded), the self-check reading the encoded bytes
   before they are written: DeidentificationError when an identifying value survived (nothing
   is written), :class:`~anonproxy.errors.EncodeError` when the data set cannot be encoded,
   OSError when the file cannot be written.

Any other failure while reading or de-identifying is a DecodeError naming its type only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from anonproxy.deid.burned_in import TextFound, find_text, keep_boxes
from anonproxy.deid.documents import document_text, document_type, is_video
from anonproxy.deid.files import (
    Check,
    PixelSpan,
    read_instance,
    read_received,
    write_instance,
    write_spliced,
)
from anonproxy.deid.layout import Layout
from anonproxy.deid.ocr import Box, TextReader, default_reader
from anonproxy.deid.pixels import (
    CLEAN_PIXEL_DATA,
    PixelRule,
    blank_decoded,
    blank_native,
    boxes,
    check_blankable,
    declares_burned_in_annotation,
    first_rule,
    triage,
)
from anonproxy.deid.structure import DEFAULT_MAX_SEQUENCE_DEPTH, check_structure, get_decoded
from anonproxy.errors import (
    AnonproxyError,
    DecodeError,
    DeidentificationError,
    EncodeError,
    InputUnreadable,
    PolicyRefusal,
)

if TYPE_CHECKING:
    from anonproxy.deid.engine import Deidentifier, DeidResult
    from anonproxy.deid.selfcheck import SelfCheck

_ENCAPSULATED_DOCUMENT = 0x00420011
_PIXEL_DATA = 0x7FE00010
_MODALITY = 0x00080060
_TRANSFER_SYNTAX_UID = 0x00020010

#: Where the de-identified file goes: a path, or a function of the result that names it (e.g.
#: ``OUT/<study>/<series>/<instance>.dcm`` from the new UIDs).
Target: TypeAlias = str | os.PathLike[str] | Callable[["DeidResult"], str | os.PathLike[str]]


@dataclass(frozen=True)
class Limits:
    """Bounds on an instance file, checked before de-identification: sequence nesting depth
    (``listen.max_sequence_depth``) and, when set, the inflated size of a Deflated data set
    (``listen.max_instance_bytes``)."""

    max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH
    max_inflated_bytes: int | None = None


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class DeidentifiedFile:
    """An instance file de-identified and written: the engine's result, the Modality (0008,0060)
    for routing, where the file was written, its size, and what happened to its pixels
    (``"blanked by rule <name>"``, ``"unchecked: <triage reason>"``, or None when the header
    says there is nothing to look at)."""

    result: DeidResult
    modality: str
    path: Path
    size: int
    pixels: str | None = None


def check_policy(engine: Deidentifier, dataset: Dataset) -> DataElement | None:
    """Raise PolicyRefusal when the profile of *engine* refuses the instance: Burned In
    Annotation YES under ``burned_in_annotation: reject``, a video transfer syntax under
    ``video: reject``, an encapsulated document under ``encapsulated_documents: reject``; under
    ``clean``, DeidentificationError when the document names someone or cannot all be read
    (:mod:`anonproxy.deid.documents`). Returns the Encapsulated Document element that ``clean``
    found naming nobody: it is kept as received (Table E.1-1 would replace it by a dummy)."""
    profile = engine.profile
    if profile.burned_in_annotation == "reject" and declares_burned_in_annotation(dataset):
        raise PolicyRefusal("burned-in annotation refused by policy")
    meta = getattr(dataset, "file_meta", None)
    if profile.video == "reject" and is_video(_syntax(meta) if meta else None):
        raise PolicyRefusal("video transfer syntax refused by policy (pixel data not checked)")
    kind = document_type(dataset)
    if kind is None:
        return None
    if profile.encapsulated_documents == "reject":
        raise PolicyRefusal(f"encapsulated {kind} document refused by policy")
    found = engine.find_identifying(dataset, document_text(dataset, kind))
    if found is not None:
        raise DeidentificationError(f"encapsulated {kind} document names someone ({found})")
    received = dataset[_ENCAPSULATED_DOCUMENT]
    return DataElement(received.tag, received.VR, bytes(received.value))  # the engine dummies it


def _syntax(meta: Dataset) -> Any:  # noqa: ANN401 - the UID, or what pydicom made of it
    """``meta.get("TransferSyntaxUID")``, by tag."""
    element = get_decoded(meta, _TRANSFER_SYNTAX_UID)
    return element.value if element is not None else None


def deidentify_file(
    engine: Deidentifier,
    source: str | os.PathLike[str],
    target: Target,
    *,
    limits: Limits = DEFAULT_LIMITS,
    in_place: bool = False,
    reader: TextReader | None = None,
) -> DeidentifiedFile:
    """Read the instance file *source*, check it, de-identify it with *engine* and write it.

    *target* is the output path, or a function of the result that gives it. With *in_place*,
    the file there is created or truncated and written directly (the spool's staged file; not
    synced); otherwise parent folders are created and the file is written under a temporary
    name, then renamed, so that the path never holds a partial file. Errors: see the module;
    those of a *target* function are its own.
    """
    dataset, pixels, layout, modality = _read(source, limits)
    try:
        document = check_policy(engine, dataset)
        plan = _PixelPlan.of(engine, source, dataset, pixels, reader)
        blank: Blank | None = None
        decoded: list[Box] | None = None
        if plan.regions and _blankable_in_place(dataset, pixels):
            blank = _blanking(dataset, plan.regions)
        elif plan.regions:  # compressed, or read whole: decoded, blanked, stored losslessly
            decoded = plan.regions
            dataset, pixels, layout = plan.whole or read_instance(source), None, None
        result, self_check = engine.deidentify_with_check(dataset)
        if document is not None:
            dataset[_ENCAPSULATED_DOCUMENT] = document
        if decoded is not None:
            blank_decoded(dataset, decoded)
        if plan.rule is not None or plan.text is not None:
            _record_clean_pixel_data(dataset, plan.rule, plan.text)
    except AnonproxyError:
        raise
    except Exception as exc:  # noqa: BLE001 - values are decoded lazily: a bad one fails here
        raise DecodeError(f"cannot decode data set ({type(exc).__name__})") from None
    if pixels is not None and not engine.defines(result.sop_class_uid, pixels.tag):
        pixels = None  # e.g. Double Float Pixel Data in a CT: binary the IOD does not define
    path = Path(target(result) if callable(target) else target)
    size = _write(
        dataset, pixels, path, _refusing(self_check), blank, layout=layout, in_place=in_place
    )
    return DeidentifiedFile(result, modality, path, size, plan.outcome)


@dataclass(frozen=True)
class _PixelPlan:
    """What happens to the pixels of one instance: the first matching pixel rule and the boxes
    to blank (the rule's, then what OCR found), what OCR read, the whole instance when OCR
    read it, and why the pixels needed looking at (None: the header says they do not)."""

    rule: PixelRule | None
    regions: list[Box]
    text: TextFound | None
    whole: Dataset | None
    reason: str | None

    @classmethod
    def of(
        cls,
        engine: Deidentifier,
        source: str | os.PathLike[str],
        dataset: Dataset,
        pixels: PixelSpan | None,
        reader: TextReader | None,
    ) -> _PixelPlan:
        """Triage, the pixel rules, then the Clean Pixel Data option's OCR on the whole
        instance (read before de-identification; the rule's boxes blanked first)."""
        profile = engine.profile
        rule = first_rule(profile.pixel_rules, dataset)
        regions = boxes(rule, dataset) if rule is not None else []
        meta = getattr(dataset, "file_meta", None)
        if is_video(_syntax(meta) if meta is not None else None):
            # passed by policy (video: pass): its frames are not read
            return cls(rule, regions, None, None, "video")
        reason = triage(dataset) or ("pixel rule" if rule is not None else None)
        has_pixels = pixels is not None or _PIXEL_DATA in dataset
        if reason is None or profile.clean_pixel_data == "off" or not has_pixels:
            return cls(rule, regions, None, None, reason)
        whole = read_instance(source)
        text = find_text(
            whole,
            reader if reader is not None else default_reader(),
            engine.pixel_text(whole),
            mode=profile.clean_pixel_data,
            blanked=regions,
            keep=keep_boxes(whole, profile.pixel_keep_regions),
        )
        return cls(rule, [*regions, *text.boxes], text, whole, reason)

    @property
    def outcome(self) -> str | None:
        """The audit record's account of the pixels (no text read ever goes in it)."""
        done = [f"blanked by rule {self.rule.name}"] if self.rule is not None else []
        if self.text is not None:
            done.append(self.text.describe())
        if done:
            return "; ".join(done)
        return f"unchecked: {self.reason}" if self.reason is not None else None


Blank = Callable[[int, int | None], None]
"""Blanks the pixel data in the written file: its descriptor, where the pixel value starts."""


def _blankable_in_place(dataset: Dataset, pixels: PixelSpan | None) -> bool:
    """True if the pixel data is copied as received (native, not deflated, with file meta) in
    an encoding :func:`~anonproxy.deid.pixels.blank_native` writes into."""
    meta = getattr(dataset, "file_meta", None)
    syntax = _syntax(meta) if meta is not None else None
    if pixels is None or syntax is None or syntax.is_compressed:
        return False
    try:
        check_blankable(dataset)
    except DeidentificationError:
        return False
    return True


def _blanking(dataset: Dataset, regions: list[Box]) -> Blank:
    """Blank *regions* of the native pixel data of *dataset* (its image attributes read now,
    before de-identification) where the writer copied it."""
    little = bool(dataset.file_meta.TransferSyntaxUID.is_little_endian)
    image = Dataset()
    for keyword in (
        "Rows", "Columns", "SamplesPerPixel", "PlanarConfiguration", "NumberOfFrames",
        "BitsAllocated", "BitsStored", "PhotometricInterpretation",
    ):  # fmt: skip
        if keyword in dataset:
            setattr(image, keyword, dataset.get(keyword))

    def blank(fd: int, value_at: int | None) -> None:
        if value_at is None:
            raise DeidentificationError("pixel data to blank was not written where expected")
        blank_native(fd, value_at, image, regions, little_endian=little)

    return blank


def _record_clean_pixel_data(
    dataset: Dataset, rule: PixelRule | None, text: TextFound | None
) -> None:
    """Burned In Annotation NO; the Clean Pixel Data Option in the method (CID 7050), and how
    (the rule's name, what OCR blanked) in a De-identification Method value."""
    how = [f"rule {rule.name}"] if rule is not None else []
    if text is not None:
        how.append(f"OCR, {len(text.boxes)} lines blanked")
    dataset.BurnedInAnnotation = "NO"
    dataset.DeidentificationMethod = [
        *dataset.DeidentificationMethod,
        f"clean pixel data: {'; '.join(how)}"[:64],  # LO
    ]
    item = Dataset()
    item.CodeValue = CLEAN_PIXEL_DATA.value
    item.CodingSchemeDesignator = CLEAN_PIXEL_DATA.scheme_designator
    item.CodeMeaning = CLEAN_PIXEL_DATA.meaning
    dataset.DeidentificationMethodCodeSequence.append(item)


def _refusing(self_check: SelfCheck) -> Check:
    """The writer's check: DeidentificationError on a finding of the self-check."""

    def check(encoded: bytes) -> None:
        finding = self_check.finding(encoded)
        if finding is not None:
            raise DeidentificationError(finding)

    return check


def _read(
    source: str | os.PathLike[str], limits: Limits
) -> tuple[Dataset, PixelSpan | None, Layout | None, str]:
    """Steps 1 and 2: the header, the span of the pixel data, the transfer syntax it was
    received in (:class:`~anonproxy.deid.layout.Layout`) and the Modality."""
    try:
        dataset, pixels, layout = read_received(
            source, max_inflated_bytes=limits.max_inflated_bytes
        )
        check_structure(dataset, limits.max_sequence_depth)
        element = get_decoded(dataset, _MODALITY)  # dataset.get("Modality"), by tag
        modality = str(element.value or "") if element is not None else ""
    except OSError as exc:  # FileNotFoundError, PermissionError, IsADirectoryError
        raise InputUnreadable(exc.errno, exc.strerror) from None
    except AnonproxyError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is a decoding failure
        raise DecodeError(f"cannot parse data set ({type(exc).__name__})") from None
    return dataset, pixels, layout, modality


def _write(
    dataset: Dataset,
    pixels: PixelSpan | None,
    path: Path,
    check: Check,
    blank: Blank | None,
    *,
    layout: Layout | None,
    in_place: bool,
) -> int:
    """Step 5: encode *dataset* into *path*, the encoded bytes checked first, the pixel regions
    of a rule blanked after (only what changed encoded, with *layout*); the size."""
    try:
        if not in_place:
            return write_instance(dataset, path, pixels, check, blank, layout=layout)
        with path.open("wb") as handle:
            value_at = write_spliced(dataset, pixels, handle, check, layout)
            if blank is not None:
                handle.flush()
                blank(handle.fileno(), value_at)
            return handle.seek(0, os.SEEK_END)
    except (OSError, AnonproxyError):
        raise  # a full disk or an I/O error; the self-check's refusal
    except Exception as exc:  # noqa: BLE001 - an encoding failure is never released
        raise EncodeError(
            f"cannot encode the de-identified data set ({type(exc).__name__})"
        ) from None

"""Reading burned-in text: the OCR engine behind the Clean Pixel Data option.

:class:`RapidOcrReader` runs RapidOCR (``rapidocr``, Apache-2.0) on ONNX Runtime (MIT) with the
PP-OCR detection and recognition models that ship inside the ``rapidocr`` wheel. The model files
are named explicitly, so nothing is ever downloaded: a wheel without them makes the reader
unavailable (:class:`OcrUnavailable`), and the instances that need it are refused.

Why RapidOCR rather than Tesseract (measured with ``benchmarks/ocr_candidates.py`` on the
ultrasound files of pydicom-data and deid-data): it read every identifying token burned into
those frames (68 of 68) where Tesseract, even on grayscale frames upscaled and inverted, missed
some of the small light-on-dark banner text; its detector gives a box per text line that is
tight enough to blank; it runs in-process on arrays (no temporary image files), at about
0.7 s per 640 x 480 frame on one core of the developer machine. It costs about 320 MB of wheels
(ONNX Runtime, OpenCV headless) and about 400 MB of memory per process that reads.

A reader is loaded once per process (:func:`default_reader`) and is used from one thread at a
time per process (the de-identification workers are processes).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from anonproxy.errors import PolicyRefusal

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in pixels, ``x1`` and ``y1`` excluded."""


@dataclass(frozen=True)
class TextLine:
    """One line of text read in a frame, and the box that holds it."""

    text: str
    box: Box


class TextReader(Protocol):
    """Reads the lines of text of an 8-bit frame (rows x columns, or rows x columns x 3 RGB)."""

    def read(self, image: NDArray[np.uint8]) -> list[TextLine]:
        """The lines of text found in *image*."""
        ...


class OcrUnavailable(PolicyRefusal):
    """No OCR engine can run here: instances whose pixels need reading are refused."""


def _box(points: Sequence[Sequence[float]]) -> Box:
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return int(min(xs)), int(min(ys)), int(max(xs)) + 1, int(max(ys)) + 1


class RapidOcrReader:
    """RapidOCR with the models of its own wheel, on ONNX Runtime, without the orientation
    classifier (burned-in banners are upright). ``text_score`` is the recognition confidence
    below which a line is dropped; it is kept low, since a line that is read badly is still
    blanked when enough of it matches."""

    def __init__(self, *, text_score: float = 0.3) -> None:
        try:
            import rapidocr  # noqa: PLC0415 - heavy, loaded only where pixels are read
        except ImportError:
            raise OcrUnavailable(
                "no OCR engine is installed (the rapidocr and onnxruntime packages)"
            ) from None
        models = Path(rapidocr.__file__ or "").parent / "models"
        found = {kind: sorted(models.glob(f"*_{kind}_*.onnx")) for kind in ("det", "rec")}
        if not found["det"] or not found["rec"]:
            raise OcrUnavailable("the OCR models are missing from the rapidocr package")
        self._lock = threading.Lock()
        self._engine: Any = rapidocr.RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_cls": False,
                "Global.text_score": text_score,
                "Det.model_path": str(found["det"][-1]),
                "Rec.model_path": str(found["rec"][-1]),
            }
        )

    def read(self, image: NDArray[np.uint8]) -> list[TextLine]:
        """The lines of text in *image* and in its :func:`detail` image (both: each reads
        lines the other misses)."""
        frame = image[..., ::-1].copy() if image.ndim == 3 else image  # OpenCV's BGR order
        lines: list[TextLine] = []
        for variant in (frame, detail(image)):
            with self._lock:  # one inference at a time per process
                out = self._engine(variant)
            if out.txts is not None:
                lines += [
                    TextLine(str(text), _box(points))
                    for points, text in zip(out.boxes, out.txts, strict=False)
                ]
        return lines


def detail(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Dark strokes on white wherever *image* differs from its local background (a median over
    21 x 21 pixels), amplified: faint text on a light banner and light text on a dark one
    become black on white alike."""
    import cv2  # noqa: PLC0415 - OpenCV comes with rapidocr
    import numpy as np  # noqa: PLC0415

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    difference = cv2.absdiff(grey, cv2.medianBlur(grey, 21)).astype(np.uint16) * 6
    return (255 - np.minimum(difference, 255)).astype(np.uint8)


_lock = threading.Lock()
_reader: TextReader | None = None


def default_reader() -> TextReader:
    """The process's reader, loaded at first use; OcrUnavailable when none can run."""
    global _reader  # noqa: PLW0603 - one model load per process
    with _lock:
        if _reader is None:
            _reader = RapidOcrReader()
        return _reader

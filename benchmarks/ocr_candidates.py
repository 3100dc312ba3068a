"""OCR candidates for burned-in text detection (issue 12, item 3): RapidOCR vs Tesseract.

Measures, on the real ultrasound files of pydicom-data and deid-data, per file and per
candidate: seconds per frame (first frame only; warm, with the cold start reported apart),
the text read, the recall of the identifying tokens that the header also holds (PatientName
components, PatientID, AccessionNumber, InstitutionName words, operator and referring
physician names, dates in any common formatting), whether the boxes are word-level and good
enough for blanking (every detected box is blanked, then every candidate reads the blanked
frame again), the peak RSS of each candidate, its install footprint and licences, and the
effect of simple preprocessing (grayscale, upscaling x2, inverting).

Nothing here is a dependency of anonproxy: it runs in a separate scratch venv, outside the
project, and nothing imports it.

Setup (the project venv is left untouched; the data stay outside the repository)::

    # the data: the wheel and the sdist hold the files, pip only downloads them
    .venv/bin/pip download --no-deps -d /tmp/ocr-data pydicom-data deid-data
    cd /tmp/ocr-data && python3.11 -m zipfile -e pydicom_data-*.whl pydicom_data \\
        && tar xzf deid-data-*.tar.gz && cd -
    # candidate (a): RapidOCR, whose default ONNX models ship inside the `rapidocr` wheel
    python3.11 -m venv /tmp/ocr-venv
    /tmp/ocr-venv/bin/pip install rapidocr onnxruntime pydicom numpy Pillow \\
        pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle python-gdcm pyjpegls
    # candidate (b): Tesseract from Debian, used through its command line (TSV output)
    apt-get update && apt-get install -y tesseract-ocr tesseract-ocr-eng
    # optional: the older `rapidocr-onnxruntime` wheel (PP-OCRv4 models inside; it needs
    # opencv-python, which clashes with rapidocr's opencv-python-headless: its own venv)
    python3.11 -m venv /tmp/ocr-venv-legacy
    /tmp/ocr-venv-legacy/bin/pip install rapidocr-onnxruntime pydicom numpy Pillow \
        pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle python-gdcm pyjpegls

    /tmp/ocr-venv/bin/python benchmarks/ocr_candidates.py /tmp/ocr-data

Files read: pydicom-data's ``US1_*`` and ``OBXXXX1A*`` and every ``.dcm`` (also inside a
``.zip``) under deid-data's ``ultrasounds/``. A file whose pixel data do not decode with the
installed plugins (e.g. 12-bit JPEG without the GPL pylibjpeg-libjpeg) is reported and skipped.

Each candidate runs in its own process (spawned) so that its import, model load and peak RSS
are its own; run it on a quiet machine (the load average is printed). The tokens actually
burned into each frame were checked by eye once and are listed in ``BURNED_IN`` below:
recall is given against those ("burned-in header") and against all the header tokens ("all
header", which includes tokens that no frame shows, and the odd match in noise); identifiers
that are burned in but differ from the header (deid-data's fake MRNs) are counted apart.

Options: ``--candidates rapidocr,tesseract,tesseract-psm6`` (also ``tesseract-psm3``,
``tesseract-omp``: all cores for Tesseract's OpenMP, and ``rapidocr-onnxruntime``, run from
its own venv), ``--variants orig,gray,gray-x2-inv`` (also ``gray-inv``, ``gray-x2``,
``otsu-x2-inv``), ``--repeat 3``, ``--only US1_,RGB_`` (file-name prefixes), ``--text``.
"""

from __future__ import annotations

import argparse
import difflib
import io
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array

Frame = NDArray[np.uint8]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the frame's own pixels

MATCH_RATIO = 0.8  # difflib ratio for a fuzzy match, on upper-cased text without separators
SHORT_TOKEN = 5  # tokens shorter than this must equal a whole OCR word exactly
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
NAME_TAGS = ("PatientName", "OperatorsName", "ReferringPhysicianName")
ID_TAGS = ("PatientID", "AccessionNumber")
DATE_TAGS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate")

# What each frame really shows, checked by eye on the first frame (normalised text: upper
# case, letters and digits only). "visible": header tokens that are burned in; "extra":
# identifiers that are burned in but that the header does not hold (deid-data's fake MRNs).
BURNED_IN: dict[str, dict[str, tuple[str, ...]]] = {
    "GREYSCALE_": {  # IMAGE and CINE: "ZZZ TEST PATIENTFI... 00079241539 DOB: 08/29/1951 ..."
        "visible": ("ZZZ", "TEST", "PATIENTFIVE", "CCHS", "CLEVELAND", "19510829", "20170302"),
        "extra": ("00079241539",),
    },
    "RGB_IMAGE": {  # "ZZZDOWNTIME,MARY  AC  8:48:26 AM 4/14/2020  120907058 / CCHS CLEVELAND ..."
        "visible": (
            "ZZZDOWNTIME",
            "MARY",
            "AC",
            "120907058",
            "CCHS",
            "CLEVELAND",
            "CLINIC",
            "20200414",
        ),
        "extra": ("00047431395",),
    },
    "RGB_CINE": {  # "TEST, ADL ^^  30 M 01/30/1986  AGMC Sports Medicine  7-OCT-2016"
        "visible": ("TEST", "ADL", "19860130", "20161007"),
        "extra": ("0001128201", "AGMC"),
    },
    "US1_": {"visible": ("BAPTIST", "MED", "CTR"), "extra": ()},
    "OBXXXX1A": {  # "OB  11-05-25-142825  Philips Healthcare  5/25/2011"
        "visible": ("OB", "110525142825", "PHILIPS", "HEALTHCARE", "20110525"),
        "extra": (),
    },
    "ultrasound-multiframe": {"visible": (), "extra": ()},  # no identifier burned in
}


def norm(text: str) -> str:
    """Upper case, letters and digits only: separators and punctuation do not count."""
    return re.sub(r"[^0-9A-Z]", "", text.upper())


# --- inputs -------------------------------------------------------------------------------


@dataclass
class Token:
    """One identifying value of the header, with the spellings it may take on screen."""

    tag: str
    text: str
    spellings: tuple[str, ...]  # normalised


@dataclass
class Sample:
    name: str
    frame: Frame | None
    info: str
    tokens: list[Token] = field(default_factory=list)
    visible: set[str] | None = None  # normalised texts of the tokens burned in (None: unknown)
    extra: tuple[str, ...] = ()


def date_spellings(value: str) -> tuple[str, ...]:
    """A DICOM DA value as it may be burned in: 2001/01/02, 01/02/2001, 1/2/01, 02-JAN-2001..."""
    if not re.fullmatch(r"\d{8}", value):
        return (value,)
    y, m, d = value[:4], int(value[4:6]), int(value[6:8])
    if not (1 <= m <= 12 and 1 <= d <= 31):
        return (value,)
    mon = MONTHS[m - 1]
    forms = {
        f"{y}{m:02}{d:02}",
        f"{m:02}{d:02}{y}",
        f"{m}{d}{y}",
        f"{d:02}{m:02}{y}",
        f"{d}{m}{y}",
        f"{m:02}{d:02}{y[2:]}",
        f"{d:02}{m:02}{y[2:]}",
        f"{d:02}{mon}{y}",
        f"{d}{mon}{y}",
        f"{mon}{d:02}{y}",
        f"{y}{mon}{d:02}",
    }
    return tuple(sorted(forms, key=lambda s: (len(s), s)))


def header_tokens(ds: pydicom.Dataset) -> list[Token]:
    tokens: list[Token] = []
    seen: set[str] = set()

    def add(tag: str, text: str, spellings: tuple[str, ...]) -> None:
        key = norm(text)
        if len(key) >= 2 and key not in seen:
            seen.add(key)
            tokens.append(Token(tag, text, spellings))

    for tag in NAME_TAGS:
        for value in _values(ds, tag):
            for word in re.split(r"[\^\s,=]+", value):
                add(tag, word, (norm(word),))
    for tag in ID_TAGS:
        for value in _values(ds, tag):
            add(tag, value, (norm(value),))
    for value in _values(ds, "InstitutionName"):
        for word in value.split():
            add("InstitutionName", word, (norm(word),))
    for tag in DATE_TAGS:
        for value in _values(ds, tag):
            add(tag, value, date_spellings(value.strip()))
    return tokens


def _values(ds: pydicom.Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v) for v in value if str(v)]
    return [str(value)]


def first_frame(ds: pydicom.Dataset) -> Frame:
    """The first frame as 8-bit gray (rows, cols) or RGB (rows, cols, 3)."""
    arr = pixel_array(ds, index=0)  # YBR_* is converted to RGB
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.uint32) * 255 // max(int(arr.max()), 1)).astype(np.uint8)
    if arr.dtype != np.uint8:  # more than 8 bits: stretch min..max to 0..255
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr.astype(np.float64) - lo) * 255.0 / max(hi - lo, 1.0)).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 255 - arr
    return np.ascontiguousarray(arr)


def find_inputs(root: Path) -> Iterator[tuple[str, Callable[[], bytes | Path]]]:
    """(name, opener) for the ultrasound files of pydicom-data and deid-data under root."""
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and (
            (p.suffix == ".dcm" and (p.name.startswith(("US1_", "OBXXXX1A"))))
            or (p.parent.name == "ultrasounds" and p.suffix in (".dcm", ".zip"))
        )
    )
    for path in paths:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.lower().endswith(".dcm")]
            for member in members:

                def opener(path: Path = path, member: str = member) -> bytes:
                    with zipfile.ZipFile(path) as archive:
                        return archive.read(member)

                yield Path(member).stem, opener
        else:

            def as_path(path: Path = path) -> Path:
                return path

            yield path.stem, as_path


def load_samples(root: Path, only: tuple[str, ...] = ()) -> list[Sample]:
    samples: list[Sample] = []
    for name, opener in find_inputs(root):
        if only and not name.startswith(only):
            continue
        source = opener()
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
        frames = int(ds.get("NumberOfFrames") or 1)
        info = (
            f"{ds.Columns}x{ds.Rows} {ds.PhotometricInterpretation} {frames}fr "
            f"{ds.file_meta.TransferSyntaxUID.name}; BurnedInAnnotation="
            f"{ds.get('BurnedInAnnotation', '-')}"
        )
        try:
            frame: Frame | None = first_frame(ds)
        except Exception as exc:  # noqa: BLE001 - a missing decoder plugin is reported, not fatal
            frame = None
            info += f"; SKIPPED, does not decode: {type(exc).__name__}: {exc}"
        sample = Sample(name, frame, info, header_tokens(ds))
        for prefix, truth in BURNED_IN.items():
            if name.startswith(prefix):
                sample.visible = {norm(t) for t in truth["visible"]}
                sample.extra = truth["extra"]
        samples.append(sample)
        del ds, source
    return samples


# --- preprocessing ---------------------------------------------------------------------------


def to_gray(frame: Frame) -> Frame:
    if frame.ndim == 2:
        return frame
    return np.asarray(Image.fromarray(frame).convert("L"))


def upscale(frame: Frame, factor: int) -> Frame:
    img = Image.fromarray(frame)
    return np.asarray(
        img.resize((img.width * factor, img.height * factor), Image.Resampling.LANCZOS)
    )


def otsu(gray: Frame) -> Frame:
    """Binarise with Otsu's threshold: text white, the rest black."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    cum = np.cumsum(hist)
    cum_mean = np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (cum_mean[-1] * cum / total - cum_mean) ** 2 / (cum * (total - cum))
    threshold = int(np.nanargmax(between))
    return np.where(gray > threshold, 255, 0).astype(np.uint8)


# name -> (function, scale factor of the output relative to the frame)
VARIANTS: dict[str, tuple[Callable[[Frame], Frame], int]] = {
    "orig": (lambda f: f, 1),
    "gray": (to_gray, 1),
    "gray-inv": (lambda f: 255 - to_gray(f), 1),
    "gray-x2": (lambda f: upscale(to_gray(f), 2), 2),
    "gray-x2-inv": (lambda f: 255 - upscale(to_gray(f), 2), 2),
    "otsu-x2-inv": (lambda f: 255 - otsu(upscale(to_gray(f), 2)), 2),
}


# --- candidates ----------------------------------------------------------------------------


@dataclass
class Word:
    text: str
    box: Box
    line: int  # words of one line share it
    line_box: Box  # the box of the whole line (for RapidOCR: the detector's own)


class Engine(Protocol):
    name: str
    word_boxes: bool
    child_peak_mb: float  # peak RSS of the largest subprocess it ran (0: runs in-process)

    def warm_up(self, img: Frame) -> None: ...

    def read(self, img: Frame) -> list[Word]: ...


def _quad_box(points: Any) -> Box:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (
        int(np.floor(pts[:, 0].min())),
        int(np.floor(pts[:, 1].min())),
        int(np.ceil(pts[:, 0].max())),
        int(np.ceil(pts[:, 1].max())),
    )


def _bgr(img: Frame) -> Frame:
    """RapidOCR takes arrays as OpenCV does (BGR); a gray array is expanded by it."""
    return np.ascontiguousarray(img[..., ::-1]) if img.ndim == 3 else img


class RapidOcr:
    """`rapidocr` 3.x with onnxruntime, its wheel's own models named explicitly.

    With model_path set, rapidocr never reaches its download code (which runs only when
    model_path is empty and the packaged file is missing or fails its SHA-256), and the
    PP-OCRv6 recogniser carries its character list inside the ONNX file.
    """

    name = "rapidocr"
    word_boxes = True
    child_peak_mb = 0.0

    def __init__(self) -> None:
        from rapidocr import RapidOCR

        models = Path(sys.modules["rapidocr"].__file__ or "").parent / "models"
        self.engine = RapidOCR(
            params={
                "Global.log_level": "warning",
                "Det.model_path": str(models / "PP-OCRv6_det_small.onnx"),
                "Rec.model_path": str(models / "PP-OCRv6_rec_small.onnx"),
                "Cls.model_path": str(models / "ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
            }
        )

    def warm_up(self, img: Frame) -> None:
        self.read(img)

    def read(self, img: Frame) -> list[Word]:
        out: Any = self.engine(_bgr(img), return_word_box=True)  # a RapidOCROutput
        words: list[Word] = []
        if out.txts is None:
            return words
        per_line = out.word_results or [()] * len(out.txts)
        for n, (line_box, text, line_words) in enumerate(
            zip(out.boxes, out.txts, per_line, strict=False)
        ):
            if line_words:
                whole = _quad_box(line_box)
                words += [Word(str(w[0]), _quad_box(w[2]), n, whole) for w in line_words]
            else:
                words.append(Word(str(text), _quad_box(line_box), n, _quad_box(line_box)))
        return words


class LegacyRapidOcr:
    """`rapidocr-onnxruntime` 1.4 (PP-OCRv4 models in the wheel); line boxes only."""

    name = "rapidocr-onnxruntime"
    word_boxes = False
    child_peak_mb = 0.0

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def warm_up(self, img: Frame) -> None:
        self.read(img)

    def read(self, img: Frame) -> list[Word]:
        result, _ = self.engine(_bgr(img))
        words: list[Word] = []
        for n, (quad, text, _score) in enumerate(result or []):
            box = _quad_box(quad)
            words += [Word(t, box, n, box) for t in str(text).split()]
        return words


class Tesseract:
    """Debian's `tesseract` command: a PNG in, TSV out (word boxes), English model.

    Page segmentation 11 (sparse text) by default, 6 (one block) or 3 (automatic) for
    comparison. Tesseract's OpenMP threads cost more than they give on frames this small: one
    thread (OMP_THREAD_LIMIT=1) unless threads is None (the build's default: all cores).
    The process's peak RSS is sampled from /proc every 5 ms while it runs (getrusage would
    count the Python process it was forked from).
    """

    word_boxes = True

    def __init__(self, name: str, psm: int = 11, threads: int | None = 1) -> None:
        exe = shutil.which("tesseract")
        if exe is None:
            raise RuntimeError("no `tesseract` on PATH (apt-get install tesseract-ocr)")
        self.exe, self.name, self.psm = exe, name, psm
        self.env = dict(os.environ)
        if threads is not None:
            self.env["OMP_THREAD_LIMIT"] = str(threads)
        self.child_peak_mb = 0.0

    def warm_up(self, img: Frame) -> None:
        self.read(img)

    def read(self, img: Frame) -> list[Word]:
        with tempfile.TemporaryDirectory(prefix="ocr-tesseract-") as tmp:
            png, out = Path(tmp) / "frame.png", Path(tmp) / "frame"
            Image.fromarray(img).save(png, compress_level=1)
            args = [self.exe, str(png), str(out), "-l", "eng", "--psm", str(self.psm), "tsv"]
            with subprocess.Popen(
                args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            ) as proc:
                while proc.poll() is None:
                    self.child_peak_mb = max(self.child_peak_mb, _vm_hwm_mb(proc.pid))
                    time.sleep(0.005)
                if proc.returncode:
                    stderr = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"tesseract exited {proc.returncode}: {stderr.strip()}")
            tsv = out.with_suffix(".tsv").read_text(encoding="utf-8", errors="replace")
        words: list[Word] = []
        lines: dict[tuple[str, ...], int] = {}
        for row in tsv.splitlines()[1:]:
            cols = row.split("\t")
            if len(cols) < 12 or cols[0] != "5" or not cols[11].strip():
                continue
            left, top, width, height = (int(c) for c in cols[6:10])
            line = lines.setdefault(tuple(cols[1:5]), len(lines))
            box = (left, top, left + width, top + height)
            words.append(Word(cols[11], box, line, box))
        for n in set(lines.values()):  # a line's box: the union of its words' boxes
            union = _union([w.box for w in words if w.line == n])
            for w in words:
                if w.line == n:
                    w.line_box = union
        return words


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak RSS of a process's current image (VmHWM; 0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


ENGINES: dict[str, Callable[[], Engine]] = {
    "rapidocr": RapidOcr,
    "rapidocr-onnxruntime": LegacyRapidOcr,
    "tesseract": lambda: Tesseract("tesseract"),
    "tesseract-psm6": lambda: Tesseract("tesseract-psm6", psm=6),
    "tesseract-psm3": lambda: Tesseract("tesseract-psm3", psm=3),
    "tesseract-omp": lambda: Tesseract("tesseract-omp", threads=None),
}
SUBPROCESS_ENGINES = {name for name in ENGINES if name.startswith("tesseract")}


# --- worker: one process per candidate --------------------------------------------------------


@dataclass
class Job:
    sample: str
    variant: str
    path: Path  # the image, saved with np.save: the worker loads one at a time
    scale: int  # of the image relative to the frame (boxes are scaled back)


@dataclass
class Reading:
    seconds: float  # best of the repeats (the machine may be shared)
    words: list[Word]


@dataclass
class WorkerResult:
    engine: str
    error: str = ""
    word_boxes: bool = False
    import_s: float = 0.0  # import and construction
    first_s: float = 0.0  # first call on a synthetic 640x480 frame: model load + inference
    warm_s: float = 0.0  # the same call again
    rss_start_mb: float = 0.0  # before the candidate is imported
    peak_mb: dict[str, float] = field(default_factory=dict)  # variant -> peak RSS so far
    child_peak_mb: dict[str, float] = field(default_factory=dict)  # the same, subprocesses

    def memory_mb(self, variant: str) -> float:
        """What the candidate itself needs: its largest subprocess, or what it added here."""
        if self.engine in SUBPROCESS_ENGINES:
            return self.child_peak_mb[variant]
        return self.peak_mb[variant] - self.rss_start_mb

    readings: dict[tuple[str, str], Reading] = field(default_factory=dict)


def synthetic_frame() -> Frame:
    img = Image.new("L", (640, 480), 0)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=20)
    draw.text((10, 10), "DOE^JOHN  12345678  ST MARY HOSPITAL", fill=255, font=font)
    draw.text((10, 40), "2001/01/02  10:11:12 AM", fill=255, font=font)
    return np.asarray(img)


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_engine(engine_name: str, jobs: list[Job], repeat: int) -> WorkerResult:
    """In a fresh process: import, cold start, then the jobs, grouped by variant."""
    result = WorkerResult(engine_name, rss_start_mb=_rss_now_mb())
    try:
        t0 = time.perf_counter()
        engine = ENGINES[engine_name]()
        result.import_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a missing candidate is reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.word_boxes = engine.word_boxes
    probe = synthetic_frame()
    t0 = time.perf_counter()
    engine.warm_up(probe)
    result.first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.warm_up(probe)
    result.warm_s = time.perf_counter() - t0
    for job in jobs:
        img = np.load(job.path)
        times: list[float] = []
        words: list[Word] = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            words = engine.read(img)
            times.append(time.perf_counter() - t0)
        if job.scale != 1:
            k = job.scale
            for w in words:
                w.box, w.line_box = _unscale(w.box, k), _unscale(w.line_box, k)
        result.readings[job.sample, job.variant] = Reading(min(times), words)
        result.peak_mb[job.variant] = _vm_hwm_mb()
        result.child_peak_mb[job.variant] = engine.child_peak_mb
    return result


def _unscale(box: Box, k: int) -> Box:
    return (box[0] // k, box[1] // k, -(-box[2] // k), -(-box[3] // k))


def run_isolated(engine_name: str, jobs: list[Job], repeat: int) -> WorkerResult:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_engine, (engine_name, jobs, repeat))


# --- scoring ---------------------------------------------------------------------------------


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def matches(spelling: str, words: list[Word]) -> bool:
    """Fuzzy match of one normalised spelling against the words read.

    A short token (AC, OB, ADL, MARY) must equal a whole word: at a ratio of 0.8 "AL" would
    match "ADL". A longer one needs a ratio >= MATCH_RATIO with a word or with a stretch of
    its line (the OCR glues or splits words and punctuation: "DOB:08/29/1951").
    """
    if not spelling:
        return False
    by_line: dict[int, list[str]] = {}
    for w in words:
        by_line.setdefault(w.line, []).extend(p for p in re.split(r"[\s,^;]+", w.text) if p)
    for parts in by_line.values():
        normed = [norm(p) for p in parts]
        if len(spelling) < SHORT_TOKEN:
            if spelling in normed:
                return True
            continue
        if any(p and _ratio(spelling, p) >= MATCH_RATIO for p in normed):
            return True
        line = "".join(normed)
        n = len(spelling)
        for width in (n - 1, n, n + 1):
            for start in range(max(len(line) - width, 0) + 1):
                if _ratio(spelling, line[start : start + width]) >= MATCH_RATIO:
                    return True
    return False


def found_tokens(sample: Sample, words: list[Word]) -> set[str]:
    """Normalised texts of the header tokens (and extra identifiers) found in the words."""
    found = {norm(t.text) for t in sample.tokens if any(matches(s, words) for s in t.spellings)}
    found |= {norm(x) for x in sample.extra if matches(norm(x), words)}
    return found


@dataclass
class Score:
    vis: int
    vis_total: int
    hdr: int
    hdr_total: int
    extra: int
    extra_total: int

    def cell(self) -> str:
        vis = f"{self.vis}/{self.vis_total}" if self.vis_total >= 0 else "?"
        return f"{vis:>5} {self.hdr:>2}/{self.hdr_total:<2} {self.extra}/{self.extra_total}"


def score(sample: Sample, words: list[Word]) -> Score:
    found = found_tokens(sample, words)
    header = {norm(t.text) for t in sample.tokens}
    visible = sample.visible if sample.visible is not None else set()
    extra = {norm(x) for x in sample.extra}
    return Score(
        len(found & visible),
        len(visible) if sample.visible is not None else -1,
        len(found & header),
        len(header),
        len(found & extra),
        len(extra),
    )


BLANK_MODES = ("words", "lines")


def blank(frame: Frame, boxes: Sequence[Box], pad: int = 2) -> Frame:
    out = frame.copy()
    rows, cols = out.shape[:2]
    for x0, y0, x1, y1 in boxes:
        out[max(y0 - pad, 0) : min(y1 + pad, rows), max(x0 - pad, 0) : min(x1 + pad, cols)] = 0
    return out


# --- footprint -------------------------------------------------------------------------------

PYPI_FOOTPRINT = {
    "rapidocr": ["rapidocr", "onnxruntime"],
    "rapidocr-onnxruntime": ["rapidocr-onnxruntime"],
}
DEBIAN_FOOTPRINT = ["tesseract-ocr", "tesseract-ocr-eng", "tesseract-ocr-osd", "libtesseract5"]
DEBIAN_FOOTPRINT += ["liblept5"]


def pypi_closure(roots: list[str]) -> list[tuple[str, str, float, str]]:
    """(name, version, installed MB, licence) for roots and their installed requirements."""
    rows: list[tuple[str, str, float, str]] = []
    pending, seen = list(roots), set()
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        size = sum(_file_size(dist.locate_file(p)) for p in dist.files or [])
        rows.append((dist.metadata["Name"], dist.version, size / 1e6, _licence(dist)))
        for req in dist.requires or []:
            if "extra ==" not in req and (m := re.match(r"[A-Za-z0-9_.\-]+", req)):
                pending.append(m.group(0))
    return sorted(rows, key=lambda r: -r[2])


def _licence(dist: metadata.Distribution) -> str:
    """The licence a package declares: its SPDX expression, else its classifiers or field."""
    meta = dist.metadata
    if expression := meta.get_all("License-Expression"):
        return str(expression[0])
    classifiers = [str(c) for c in meta.get_all("Classifier") or []]
    if licences := [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")]:
        return ", ".join(licences)
    field_ = meta.get_all("License") or ["?"]
    return (str(field_[0]).splitlines() or ["?"])[0][:40]


def project_dependencies() -> set[str]:
    """Names of anonproxy's own dependencies (read from the repository's pyproject.toml)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return set()
    names = set()
    for dep in project.get("dependencies", []):
        if m := re.match(r"[A-Za-z0-9_.\-]+", dep):
            names.add(m.group(0).lower().replace("_", "-"))
    return names


def _file_size(path: Any) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def debian_footprint(packages: list[str]) -> list[tuple[str, str, float]]:
    if shutil.which("dpkg-query") is None:
        return []
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Version}\t${Installed-Size}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        name, version, size = line.split("\t")
        rows.append((name, version, int(size or 0) / 1000.0))
    return rows


# --- report ----------------------------------------------------------------------------------


def show_words(words: list[Word]) -> str:
    lines: dict[int, list[str]] = {}
    for w in words:
        lines.setdefault(w.line, []).append(w.text)
    return " | ".join(" ".join(ws) for ws in lines.values())


@dataclass
class Run:
    samples: list[Sample]  # the decoded ones
    engines: list[str]  # the available ones
    variants: list[str]
    results: dict[str, WorkerResult]
    # (boxes from, "words" or "lines", reader) -> sample -> identifiers still read
    leaks: dict[tuple[str, str, str], dict[str, set[str]]]
    blank_variant: dict[str, str]  # engine -> the variant whose boxes were blanked

    def reading(self, engine: str, sample: str, variant: str) -> Reading:
        return self.results[engine].readings[sample, variant]


def best_variant(run: Run, engine: str) -> str:
    def recall(v: str) -> int:
        return sum(score(s, run.reading(engine, s.name, v).words).vis for s in run.samples)

    return max(run.variants, key=lambda v: (recall(v), -run.variants.index(v)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("data", type=Path, help="folder with pydicom-data and deid-data unpacked")
    parser.add_argument(
        "--candidates",
        default="rapidocr,tesseract,tesseract-psm6",
        help=f"comma-separated, of: {', '.join(ENGINES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--variants",
        default="orig,gray,gray-x2-inv",
        help=f"preprocessing, comma-separated, of: {', '.join(VARIANTS)} (default: "
        "%(default)s); the first is the one timed in the per-file table",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per frame, best kept")
    parser.add_argument(
        "--only", default="", help="comma-separated file-name prefixes to keep (default: all)"
    )
    parser.add_argument("--no-blanking", action="store_true", help="skip the blanking check")
    parser.add_argument("--text", action="store_true", help="print the text each one reads")
    args = parser.parse_args(argv)
    engines = [e for e in args.candidates.split(",") if e]
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [e for e in engines if e not in ENGINES] + [
        v for v in variants if v not in VARIANTS
    ]:
        parser.error(f"unknown candidate or variant: {', '.join(unknown)}")

    samples = load_samples(args.data, tuple(p for p in args.only.split(",") if p))
    if not samples:
        parser.error(f"no US1_*, OBXXXX1A* or ultrasounds/ file under {args.data}")
    decoded = [s for s in samples if s.frame is not None]
    load = os.getloadavg()[0]
    print(f"{len(samples)} files, {len(decoded)} decoded; {os.cpu_count()} CPUs, load {load:.2f}\n")
    for s in samples:
        print(f"  {s.name:<26} {s.info}")
    print()

    with tempfile.TemporaryDirectory(prefix="ocr-candidates-") as tmp:
        run = measure(Path(tmp), decoded, engines, variants, args.repeat, not args.no_blanking)
    for name in engines:
        if run.results[name].error:
            print(f"{name}: not available: {run.results[name].error}\n")
    if not run.engines:
        return 1
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (timings need a quiet machine)\n")
    print_per_file(run)
    print_tokens(run, args.text)
    print_summary(run)
    print_blanking(run)
    print_footprint(run.engines)
    return 0


def measure(
    tmp: Path,
    samples: list[Sample],
    engines: list[str],
    variants: list[str],
    repeat: int,
    blanking: bool,
) -> Run:
    jobs: list[Job] = []
    for v in variants:  # grouped by variant: the peak RSS is then known per variant
        fn, scale = VARIANTS[v]
        for s in samples:
            assert s.frame is not None
            path = tmp / f"{len(jobs)}.npy"
            np.save(path, np.ascontiguousarray(fn(s.frame)))
            jobs.append(Job(s.name, v, path, scale))
    results: dict[str, WorkerResult] = {}
    for name in engines:
        print(f"running {name} on {len(jobs)} frames ...", file=sys.stderr, flush=True)
        results[name] = run_isolated(name, jobs, repeat)
    ran = [n for n in engines if not results[n].error]
    run = Run(samples, ran, variants, results, {}, {})
    if not blanking or not ran:
        return run

    # every box that a candidate found on its best variant is blanked, and all re-read
    blank_jobs: list[Job] = []
    for src in ran:
        run.blank_variant[src] = best_variant(run, src)
        for s in samples:
            assert s.frame is not None
            words = run.reading(src, s.name, run.blank_variant[src]).words
            for mode in BLANK_MODES:
                boxes = [w.box if mode == "words" else w.line_box for w in words]
                path = tmp / f"blank-{len(blank_jobs)}.npy"
                np.save(path, blank(s.frame, boxes))
                blank_jobs.append(Job(s.name, f"{src}/{mode}", path, 1))
    for reader in ran:
        print(f"re-reading blanked frames with {reader} ...", file=sys.stderr, flush=True)
        res = run_isolated(reader, blank_jobs, 1)
        for job in blank_jobs:
            sample = next(s for s in samples if s.name == job.sample)
            src, mode = job.variant.split("/")
            identifiers = (sample.visible or set()) | {norm(x) for x in sample.extra}
            left = found_tokens(sample, res.readings[job.sample, job.variant].words)
            run.leaks.setdefault((src, mode, reader), {})[job.sample] = left & identifiers
    return run


def print_per_file(run: Run) -> None:
    base = run.variants[0]
    print(
        f"== per file: s = seconds for the first frame ({base!r}, best of the repeats); "
        "recall of the burned-in header tokens per variant\n"
    )
    head = f"{'file':<26} {'frame':>9}"
    for e in run.engines:
        head += f" | {e[:22]:<22} {'s':>5} " + " ".join(f"{v[:11]:>11}" for v in run.variants)
    print(head)
    for s in run.samples:
        assert s.frame is not None
        row = f"{s.name:<26} {s.frame.shape[1]:>4}x{s.frame.shape[0]:<4}"
        for e in run.engines:
            row += f" | {'':<22} {run.reading(e, s.name, base).seconds:5.2f} "
            cells = []
            for v in run.variants:
                sc = score(s, run.reading(e, s.name, v).words)
                cells.append(f"{sc.vis}/{sc.vis_total}" if sc.vis_total >= 0 else "?")
            row += " ".join(f"{c:>11}" for c in cells)
        print(row)
    print()


def print_tokens(run: Run, show_text: bool) -> None:
    print("== tokens: header (* burned in), found and missed per candidate\n")
    for s in run.samples:
        tokens = ", ".join(
            f"{t.text}{'*' if s.visible and norm(t.text) in s.visible else ''}" for t in s.tokens
        )
        print(f"{s.name}: {tokens}")
        if s.extra:
            print(f"  burned in, not in the header: {', '.join(s.extra)}")
        header = {norm(t.text) for t in s.tokens}
        for e in run.engines:
            for n, v in enumerate(run.variants):
                words = run.reading(e, s.name, v).words
                found = found_tokens(s, words)
                missed = sorted(((s.visible or set()) | {norm(x) for x in s.extra}) - found)
                if n == 0:
                    extra = sorted(found - header)
                    print(
                        f"  {e:<22} {v:<12} found {sorted(found & header) or '-'}"
                        f"{' + ' + str(extra) if extra else ''}; missed {missed or '-'}"
                    )
                elif missed:
                    print(f"  {e:<22} {v:<12} missed {missed}")
                if show_text and n == 0:
                    print(f"  {'':<35} read: {show_words(words)}")
    print()


def print_summary(run: Run) -> None:
    print("== summary over the decoded files\n")
    print(
        f"{'candidate':<22} {'variant':<12} {'burned-in header':>16} {'all header':>10} "
        f"{'ids not in hdr':>14} {'s/frame median':>14} {'max':>5} {'memory MB':>9}"
    )
    for e in run.engines:
        r = run.results[e]
        for v in run.variants:
            scores = [score(s, run.reading(e, s.name, v).words) for s in run.samples]
            secs = [run.reading(e, s.name, v).seconds for s in run.samples]
            vis = sum(x.vis for x in scores if x.vis_total >= 0)
            vis_t = sum(x.vis_total for x in scores if x.vis_total >= 0)
            hdr, hdr_t = sum(x.hdr for x in scores), sum(x.hdr_total for x in scores)
            ext, ext_t = sum(x.extra for x in scores), sum(x.extra_total for x in scores)
            print(
                f"{e:<22} {v:<12} {vis:>5}/{vis_t:<3} {vis / max(vis_t, 1):6.0%} "
                f"{hdr:>4}/{hdr_t:<5} {ext:>8}/{ext_t:<5} {statistics.median(secs):14.2f} "
                f"{max(secs):5.2f} {r.memory_mb(v):9.0f}"
            )
    print(
        "(memory: peak RSS that the candidate added to its process since before its import,\n"
        " over the variants so far, run in this order; for tesseract: its largest process)\n"
    )

    print("== cold start and memory (each candidate in its own process)\n")
    print(
        f"{'candidate':<22} {'import s':>8} {'1st call s':>10} {'2nd call s':>10} "
        f"{'RSS at start':>12} {'peak RSS':>9} {'memory':>9} {'boxes':>6}"
    )
    first = run.variants[0]
    for e in run.engines:
        r = run.results[e]
        print(
            f"{e:<22} {r.import_s:8.2f} {r.first_s:10.2f} {r.warm_s:10.2f} "
            f"{r.rss_start_mb:9.0f} MB {r.peak_mb[first]:6.0f} MB {r.memory_mb(first):6.0f} MB "
            f"{'words' if r.word_boxes else 'lines':>6}"
        )
    print(
        f"(calls on a synthetic 640x480 frame; the 1st loads the models. Peak RSS of the\n"
        f" worker and memory as above, after the {first!r} frames. `tesseract` starts a process\n"
        " per frame, which loads its model every time: that cost is in each frame's seconds)\n"
    )


def print_blanking(run: Run) -> None:
    if not run.leaks:
        return
    print(
        "== blanking: the boxes a candidate found on its best variant are blanked (2 px margin),\n"
        "   word by word or line by line, and each candidate re-reads the frame: burned-in\n"
        "   identifiers still read, over all files (0 is the goal)\n"
    )
    print(f"{'boxes from':<36}" + "".join(f" {e[:16]:>16}" for e in run.engines))
    for src in run.engines:
        for mode in BLANK_MODES:
            row = f"{src + ' (' + run.blank_variant[src] + ', ' + mode + ')':<36}"
            for reader in run.engines:
                row += f" {sum(len(v) for v in run.leaks[src, mode, reader].values()):>16}"
            print(row)
    for (src, mode, reader), per_sample in run.leaks.items():
        for sample, left in per_sample.items():
            if left:
                print(f"  {src} {mode}, read by {reader}: {sample} still shows {sorted(left)}")
    print()


def print_footprint(engines: list[str]) -> None:
    print("== install footprint and licences\n")
    ours = project_dependencies()
    for e in engines:
        if e in PYPI_FOOTPRINT:
            rows = pypi_closure(PYPI_FOOTPRINT[e])
            new = [r for r in rows if r[0].lower().replace("_", "-") not in ours]
            print(
                f"{e}: PyPI, {sum(r[2] for r in rows):.0f} MB installed with its requirements, "
                f"{sum(r[2] for r in new):.0f} MB of them not already anonproxy dependencies"
            )
            for name, version, size, licence in rows:
                mark = "" if (name, version, size, licence) in new else " (anonproxy has it)"
                print(f"  {name:<26} {version:<16} {size:7.1f} MB  {licence}{mark}")
            print()
    if any(e.startswith("tesseract") for e in engines):
        rows_deb = debian_footprint(DEBIAN_FOOTPRINT)
        print(
            f"tesseract: Debian, {sum(r[2] for r in rows_deb):.0f} MB for these packages "
            "(plus the libraries they pull in: libicu, cairo/pango, libcurl... on a slim image)"
        )
        for name, version, size in rows_deb:
            print(f"  {name:<26} {version:<16} {size:7.1f} MB  Apache-2.0")
        print()


if __name__ == "__main__":
    sys.exit(main())

"""The pixel stage's cost, in one run: CT/MR through the file path with the pixel stage off and
on, the time to blank a banner in every frame of an ultrasound-sized cine loop, and OCR.

    .venv/bin/python benchmarks/pixel_stage.py [--repeat 200] [--frames 100] [--ocr-repeat 1]

* CT and MR originals (pydicom's CT_small, and MR_small with Image Type ORIGINAL) go through
  :func:`anonproxy.deid.instance.deidentify_file` with ``clean_pixel_data: off`` (the baseline),
  the default profile (OCR on), and a profile of 10 pixel rules none of which matches them:
  triage and rule matching read the header only, so the three must be equal within noise (the
  ratios are printed).
* A synthetic 640x480 RGB ultrasound loop of ``--frames`` frames gets a 640x60 banner blanked
  by a rule: milliseconds per frame, and per instance.
* OCR (the default ``clean_pixel_data: identifying``) on the real ultrasound files of
  pydicom-data and deid-data (test dependencies): seconds per instance, images read, seconds
  per image read, and what was blanked (attributes and boxes; never the text).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from anonproxy.deid import Deidentifier, Profile
from anonproxy.deid.instance import deidentify_file

SECRET = b"benchmark-secret-0123456789abcdef"
RULES = [
    {"name": f"device {n}", "if": {"Manufacturer": {"contains": f"vendor-{n}"}}, "regions": ["all"]}
    for n in range(10)
]


def per_file_ms(engine: Deidentifier, sources: list[Path], out: Path, repeat: int) -> float:
    """The median, over *repeat* rounds, of the milliseconds per file of one round."""
    rounds = []
    for _ in range(repeat):
        started = time.perf_counter()
        for index, source in enumerate(sources):
            deidentify_file(engine, source, out / f"{index}.dcm", in_place=True)
        rounds.append((time.perf_counter() - started) * 1000 / len(sources))
    return statistics.median(rounds)


def ultrasound_loop(path: Path, frames: int) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in "abc")
    ds.Modality, ds.Manufacturer = "US", "ACME"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 480, 640, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = np.random.default_rng(1).integers(0, 255, 480 * 640 * 3 * frames, np.uint8)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="rounds for CT/MR")
    parser.add_argument("--frames", type=int, default=100, help="frames of the US loop")
    parser.add_argument("--ocr-repeat", type=int, default=1, help="rounds per OCR file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anonproxy-pixel-bench-") as tmp:
        out = Path(tmp)
        mr = dcmread(get_testdata_file("MR_small.dcm"))
        mr.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        mr.save_as(out / "mr.dcm")
        sources = [Path(str(get_testdata_file("CT_small.dcm"))), out / "mr.dcm"]
        off = Deidentifier(Profile(clean_pixel_data="off"), secret=SECRET)
        plain = Deidentifier(Profile(), secret=SECRET)
        ruled = Deidentifier(Profile.from_options([], pixel_rules=RULES), secret=SECRET)
        per_file_ms(plain, sources, out, 5)  # warm up (tables, IOD data)
        stage_off = per_file_ms(off, sources, out, args.repeat)
        without = per_file_ms(plain, sources, out, args.repeat)
        with_rules = per_file_ms(ruled, sources, out, args.repeat)
        print(
            "CT_small + MR_small (ORIGINAL) through the file path (ms per file, median of rounds)"
        )
        print(f"  pixel stage off          {stage_off:7.3f}")
        print(f"  on (OCR, no rules)       {without:7.3f}  ratio {without / stage_off:.3f}")
        print(f"  10 non-matching rules    {with_rules:7.3f}  ratio {with_rules / stage_off:.3f}")
        loop = out / "us.dcm"
        ultrasound_loop(loop, args.frames)
        banner = Deidentifier(
            Profile.from_options(
                [],
                pixel_rules=[{"if": {"Modality": "US"}, "regions": ["0,0,0,60"]}],
                clean_pixel_data="off",  # the blanking alone; OCR is measured below
            ),
            secret=SECRET,
        )
        started = time.perf_counter()
        deidentify_file(banner, loop, out / "us-out.dcm", in_place=True)
        seconds = time.perf_counter() - started
        blanked = dcmread(out / "us-out.dcm").pixel_array
        assert not blanked[:, :60].any()
        print(f"US 640x480 RGB, {args.frames} frames, banner 640x60 blanked in every frame")
        print(
            f"  {seconds * 1000:8.1f} ms per instance, {seconds * 1000 / args.frames:6.3f} ms per frame"
        )
        ocr(out, args.ocr_repeat)


def ocr(out: Path, repeat: int) -> None:
    """OCR on the real ultrasound files (the model is loaded before timing)."""
    import deid_data

    from anonproxy import codecs
    from anonproxy.deid.ocr import default_reader

    codecs.install()
    engine = Deidentifier(Profile(burned_in_annotation="pass"), secret=SECRET)
    started = time.perf_counter()
    default_reader()
    print(f"OCR model load {time.perf_counter() - started:.2f} s (once per process)")
    ultrasounds = Path(deid_data.__file__).parent / "data" / "ultrasounds"
    files = [
        Path(str(get_testdata_file(name)))
        for name in ("US1_J2KR.dcm", "OBXXXX1A.dcm", "OBXXXX1A_2frame.dcm")
    ] + [ultrasounds / "GREYSCALE_IMAGE.dcm", ultrasounds / "RGB_IMAGE.dcm"]
    print("OCR (clean_pixel_data: identifying), seconds: instance, per image read")
    for source in files:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            done = deidentify_file(engine, source, out / "ocr.dcm", in_place=True)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        read = int((done.pixels or "OCR read 1 ").split()[2])
        print(f"  {source.name:22s} {seconds:6.2f} {seconds / read:6.2f}  {done.pixels}")


if __name__ == "__main__":
    main()

"""Generate anonproxy's de-identification package data from the shared copies of the standard.

Reads (under ``--shared``, default ``<repo>/../shared``):

* ``ps315/table_e1_1.json``: PS3.15 Table E.1-1 (edition 2026d), one row per attribute;
* ``ps315/safe_private.json``: PS3.15 Table E.3.10-1 (edition 2026d), safe private attributes;
* ``iod/iod_types.json.gz``: PS3.3 attribute Types per module and modules per IOD (2026b).

Writes into ``anonproxy/deid/_standard/``:

* ``table_e1_1.json``: the 657 rows with parsed tags (``match`` is ``tag``, ``mask`` or
  ``private``), the Basic Profile code and the option codes keyed by the CID 7050 snake_case
  option names;
* ``safe_private.json``: ``[group, private creator, element byte, VR]`` rows, hex upper case;
* ``iod_types.zip``: the Type of every keyword path of every module (one JSON member per
  module), the modules of every IOD and the SOP Class UID → IOD map (retired Storage SOP
  Classes mapped to the IOD of their current successor; the member ``index.json``). The engine
  uses it to resolve compound codes and to tell which attributes the IOD defines at each
  nesting position; a process reads only the modules of the IODs it meets (the whole
  document, 11 MB of JSON, took ~0.1 s to inflate and parse: the first file of every
  ``anonproxy deidentify`` paid it).

The installed package reads only these outputs, never ``../shared``.

Usage::

    python tools/generate_standard_data.py [--shared PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_for_tag

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO.parent / "shared"
DEFAULT_OUT = REPO / "anonproxy" / "deid" / "_standard"

#: Column names of the shared JSON → CID 7050 snake_case option names, in the standard's order.
OPTION_COLUMNS: dict[str, str] = {
    "retain_safe_private": "retain_safe_private",
    "retain_uids": "retain_uids",
    "retain_device_identity": "retain_device_identity",
    "retain_institution_identity": "retain_institution_identity",
    "retain_patient_characteristics": "retain_patient_characteristics",
    "retain_longitudinal_full_dates": "retain_longitudinal_temporal_information_full_dates",
    "retain_longitudinal_modified_dates": (
        "retain_longitudinal_temporal_information_modified_dates"
    ),
    "clean_descriptors": "clean_descriptors",
    "clean_structured_content": "clean_structured_content",
    "clean_graphics": "clean_graphics",
}

BASIC_CODES = {"X", "Z", "D", "U", "X/D", "X/Z", "X/Z/D", "Z/D", "X/Z/U*"}
OPTION_CODES = {"K", "C"}
#: Strictest first; "None" (no Type given in the source) ranks as Type 3.
TYPE_ORDER = ("1", "1C", "2", "2C", "3")

TAG_RE = re.compile(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)")
SAFE_TAG_RE = re.compile(r"\(([0-9A-Fa-f]{4}),xx([0-9A-Fa-f]{2})\)")
PRIVATE_ROW = "(gggg,eeee) where gggg is odd"


def parse_e1_1(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows of Table E.1-1 in the package layout; fail on anything unexpected."""
    out: list[dict[str, Any]] = []
    for row in rows:
        tag_text = row["tag"]
        basic = row["basic"]
        if basic not in BASIC_CODES:
            raise SystemExit(f"unknown Basic Profile code {basic!r} in row {tag_text}")
        options: dict[str, str] = {}
        for column, option in OPTION_COLUMNS.items():
            code = row[column]
            if code is None:
                continue
            if code not in OPTION_CODES:
                raise SystemExit(f"unknown option code {code!r} in row {tag_text}")
            options[option] = code
        entry: dict[str, Any] = {"name": row["name"]}
        if tag_text == PRIVATE_ROW:
            entry.update(match="private", tag="ggggeeee", keyword="")
        else:
            m = TAG_RE.fullmatch(tag_text)
            if m is None:
                raise SystemExit(f"cannot parse tag {tag_text!r}")
            tag = (m.group(1) + m.group(2)).upper().replace("X", "x")
            if "x" in tag:
                entry.update(match="mask", tag=tag, keyword="")
            else:
                entry.update(match="tag", tag=tag, keyword=keyword_for_tag(int(tag, 16)))
        entry.update(
            retired=bool(row["retired"]),
            in_std_comp_iod=bool(row["in_std_comp_iod"]),
            basic=basic,
            options=options,
        )
        out.append(entry)
    return out


def parse_safe_private(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Return Table E.3.10-1 as ``[group, creator, element byte, VR]``, sorted."""
    out: list[list[str]] = []
    for row in rows:
        m = SAFE_TAG_RE.fullmatch(row["tag"])
        if m is None:
            raise SystemExit(f"cannot parse safe private tag {row['tag']!r}")
        out.append(
            [m.group(1).upper(), row["private_creator"].strip(), m.group(2).upper(), row["vr"]]
        )
    return sorted(out)


def _rank(type_: str) -> int:
    return TYPE_ORDER.index(type_) if type_ in TYPE_ORDER else len(TYPE_ORDER) - 1


#: Retired Storage SOP Classes (PS3.6 2026b) whose IOD lives on in a current SOP Class: the
#: engine judges their instances by the current class's IOD.
RETIRED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame (Retired)
    "1.2.840.10008.5.1.4.1.1.5": "1.2.840.10008.5.1.4.1.1.20",  # NM Image (Retired)
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # US Image (Retired)
}


def reduce_iods(iod_data: dict[str, Any]) -> dict[str, Any]:
    """Per module, the Type of every keyword path; per IOD, its modules; SOP Class → IOD."""
    modules: dict[str, dict[str, str]] = iod_data["modules"]
    used = sorted({ref["module"] for refs in iod_data["iods"].values() for ref in refs})
    sop_classes = dict(sorted(iod_data["sop_classes"].items()))
    for retired, current in RETIRED_SOP_CLASSES.items():
        if retired in sop_classes or current not in sop_classes:
            raise SystemExit(f"retired SOP Class map out of date: {retired} -> {current}")
        sop_classes[retired] = sop_classes[current]
    return {
        "edition": iod_data["edition"],
        "sop_classes": dict(sorted(sop_classes.items())),
        "iods": {
            iod: sorted({ref["module"] for ref in refs})
            for iod, refs in sorted(iod_data["iods"].items())
        },
        "modules": {
            module: {
                path: TYPE_ORDER[_rank(type_)]
                for path, type_ in sorted(modules.get(module, {}).items())
            }
            for module in used
        },
    }


#: The date of every member of iod_types.zip (the earliest a zip can hold): with it, the
#: archive is byte-identical across runs.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def write_iod_archive(path: Path, iod_doc: dict[str, Any]) -> None:
    """*iod_doc* as a zip archive: ``index.json`` (source, edition, sop_classes, iods) and
    ``modules/<module>.json`` ({path: Type}) per module, each deflated on its own (a reader
    inflates only the members it needs), in sorted order."""
    index = {key: value for key, value in iod_doc.items() if key != "modules"}
    members = [("index.json", index)] + [
        (f"modules/{module}.json", types) for module, types in sorted(iod_doc["modules"].items())
    ]
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            data = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
            archive.writestr(info, data.encode("utf-8"), compresslevel=9)


def dumps_rows(doc: dict[str, Any]) -> str:
    """JSON text with one table row per line (small diffs when the standard changes)."""
    head = {k: v for k, v in doc.items() if k != "rows"}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ',"rows":[']
    rows = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in doc["rows"]]
    lines.append(",\n".join(rows))
    lines.append("]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    shared: Path = args.shared
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    e1_rows = json.loads((shared / "ps315" / "table_e1_1.json").read_text(encoding="utf-8"))
    table = parse_e1_1(e1_rows)
    if len(table) != 657:
        raise SystemExit(f"expected 657 rows in Table E.1-1, found {len(table)}")
    table_doc = {
        "standard": "DICOM PS3.15 Table E.1-1",
        "edition": "2026d",
        "options": list(OPTION_COLUMNS.values()),
        "rows": table,
    }
    (out / "table_e1_1.json").write_text(dumps_rows(table_doc), encoding="utf-8")

    safe_rows = json.loads((shared / "ps315" / "safe_private.json").read_text(encoding="utf-8"))
    safe_doc = {
        "standard": "DICOM PS3.15 Table E.3.10-1",
        "edition": "2026d",
        "columns": ["group", "private_creator", "element_byte", "vr"],
        "rows": parse_safe_private(safe_rows),
    }
    (out / "safe_private.json").write_text(dumps_rows(safe_doc), encoding="utf-8")

    with gzip.open(shared / "iod" / "iod_types.json.gz", "rt", encoding="utf-8") as fh:
        iod_data = json.load(fh)
    iod_doc = {"source": "DICOM PS3.3/PS3.4 via highdicom 0.28.2 package data"}
    iod_doc.update(reduce_iods(iod_data))
    write_iod_archive(out / "iod_types.zip", iod_doc)

    print(
        f"wrote {len(table)} E.1-1 rows, {len(safe_doc['rows'])} safe private rows, "
        f"{len(iod_doc['iods'])} IODs / {len(iod_doc['sop_classes'])} SOP classes "
        f"({len(iod_doc['modules'])} modules) to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

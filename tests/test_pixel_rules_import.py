"""Region rules from other tools (anonproxy.pixel_rules_import, `anonproxy pixel-rules import`)
and the ultrasound starter set (config/pixel_rules/ultrasound-starter.yaml).

The CTP scripts and deid recipes below are written for these tests, in each tool's syntax."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import Dataset

from anonproxy.deid.pixels import PixelRule, boxes, first_rule, parse_pixel_rules, triage
from anonproxy.pixel_rules_import import (
    from_ctp_script,
    from_deid_recipe,
    guess_format,
    import_rules,
    to_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
STARTER = ROOT / "config" / "pixel_rules" / "ultrasound-starter.yaml"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def header(**attributes: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = (
        US_IMAGE if attributes.get("Modality", "US") == "US" else "1.2.840.10008.5.1.4.1.1.2"
    )
    ds.Modality = "US"
    ds.Rows, ds.Columns = 480, 640
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def matches(rule: dict[str, Any], **attributes: Any) -> bool:
    return PixelRule.parse(0, rule).matches(header(**attributes))


# -- CTP ----------------------------------------------------------------------------------------

CTP_SCRIPT = """\
Pixel rules of a test site.  Text outside braces is comment.

*** Ultrasound ***
ACME scanners
 Model X, small screen
  { Modality.equals("US") *
    [0008,0070].containsIgnoreCase("acme") *
    ( Rows.equals("480") + Rows.equals("600") ) }
  (0,0,640,40)  (500,440,140,40)

  { ManufacturerModelName.startsWithIgnoreCase("model y") * !StationName.contains("Lab") }
  (0,0,800,50)

Case matters here
  { Manufacturer.contains("Acme") * ManufacturerModelName.endsWith("Z") }
  (10,-5,100,20)

No station name
  { StationName.equals("") * Rows.isGreaterThan("1000") * SeriesDescription.matches("B-?mode.*") }
  (0,0,1024,60)

Inside a sequence
  { SeqOfUltrasoundRegions::RegionSpatialFormat.equals("1") }
  (0,0,10,10)

Private
  { [0009,1010].contains("x") }
  (0,0,10,10)

Unknown method
  { Manufacturer.soundsLike("acme") }
  (0,0,10,10)

Nothing to blank
  { Manufacturer.equals("NOBODY") }
  (0,0,-1,10) (text)
"""


def test_ctp_script_rules_keep_their_names_conditions_and_regions() -> None:
    result = import_rules(CTP_SCRIPT, "ctp")
    rules = {imported.rule["name"]: imported for imported in result.rules}
    assert list(rules) == [
        "Model X, small screen (line 6)",
        "Model X, small screen (line 11)",
        "Case matters here (line 15)",
        "No station name (line 19)",
    ]
    first = rules["Model X, small screen (line 6)"].rule
    assert first["if"] == {
        "Modality": "US",  # a Code String: upper case by definition, compared as it is
        "Manufacturer": {"contains": "acme"},
        "any": [{"Rows": 480}, {"Rows": 600}],
    }
    # CTP blanks x..x+w and y..y+h, both included
    assert first["regions"] == ["0,0,641,41", "500,440,141,41"]
    assert rules["Case matters here (line 15)"].rule["regions"] == ["10,0,101,16"]  # clipped
    assert rules["Model X, small screen (line 6)"].line == 6
    assert 'Rows.equals("600")' in rules["Model X, small screen (line 6)"].source
    parse_pixel_rules([imported.rule for imported in result.rules])  # anonproxy accepts them


def test_ctp_conditions_mean_what_they_meant_in_ctp() -> None:
    rules = from_ctp_script(CTP_SCRIPT)
    x, y, case, station = rules
    assert matches(x, Manufacturer="ACME Medical", Rows=600)
    assert not matches(x, Manufacturer="ACME Medical", Rows=768)
    assert not matches(x, Manufacturer="ACME Medical", Modality="CT", Rows=480)
    assert matches(y, ManufacturerModelName="MODEL Y PLUS", StationName="US-ROOM-2")
    assert matches(y, ManufacturerModelName="Model Y")  # a missing StationName holds !contains
    assert not matches(y, ManufacturerModelName="Model Y", StationName="Lab 3")
    assert matches(y, ManufacturerModelName="Model Y", StationName="LAB 3")  # contains: case
    assert matches(case, Manufacturer="Acme", ManufacturerModelName="XZ")
    assert not matches(case, Manufacturer="ACME", ManufacturerModelName="XZ")
    assert not matches(case, Manufacturer="Acme", ManufacturerModelName="Xz")
    assert matches(station, Rows=1050, SeriesDescription="Bmode 2")
    assert matches(station, Rows=1050, StationName="", SeriesDescription="B-mode")
    assert not matches(station, Rows=1050, StationName="US1", SeriesDescription="B-mode")
    assert not matches(station, Rows=1000, SeriesDescription="B-mode")
    assert not matches(station, Rows=1050, SeriesDescription="b-mode")  # matches: case
    assert not matches(station, Rows=1050, SeriesDescription="xB-mode")  # the whole value


def test_ctp_rules_anonproxy_cannot_express_are_skipped_with_their_reason() -> None:
    result = import_rules(CTP_SCRIPT, "ctp")
    reasons = {skipped.line: skipped.reason for skipped in result.skipped}
    assert set(reasons) == {23, 27, 31, 35}
    assert "inside a sequence" in reasons[23]
    assert "[0009,1010]" in reasons[27]
    assert "private" in reasons[27]
    assert "soundsLike" in reasons[31]
    assert "no region" in reasons[35]
    notes = " ".join(note for _, note in result.notes)
    assert "(text) is not x,y,w,h" in notes
    assert "(0,0,-1,10) blanks nothing" in notes


def test_ctp_names_tags_and_old_element_names_map_to_keywords() -> None:
    script = """
    { [0008,1090].equals("12") * [0028,0011].isLessThan("1,000") * PatientsName.equals("") }
    (0,0,1,1)
    { true. * !false. } (0,0,1,1)
    """
    tags, constants = from_ctp_script(script)
    assert tags["if"] == {
        "ManufacturerModelName": 12,
        "Columns": {"lt": 1000},
        "not": {"PatientName": {"regex": "."}},
    }
    assert tags["name"] == "CTP signature (line 2)"
    assert constants["if"] == {}


# -- deid -------------------------------------------------------------------------------------

DEID_RECIPE = """\
FORMAT dicom

%filter whitelist

LABEL Says it is clean
  contains BurnedInAnnotation NO

%filter graylist

LABEL Acme banner # (test site)
  contains Modality US
  + contains Manufacturer Acme || contains Manufacturer Akme
  + equals Rows 480
  coordinates 0,0,640,40
  ctpcoordinates 500,440,140,40

LABEL Acme any model but the old ones
  contains Manufacturer Acme
  + notcontains ManufacturerModelName OLD[0-9]+
  + notequals StationName LAB
  || present SequenceOfUltrasoundRegions
  coordinates all

LABEL No operator
  contains Manufacturer Acme
  missing StationName
  coordinates 0,0,10,10

LABEL Alternatives in equals
  equals Rows 600|768
  coordinates 0,0,10,10

LABEL Keep the scan
  present SequenceOfUltrasoundRegions
  keepcoordinates from:SequenceOfUltrasoundRegions

LABEL Not a keyword
  contains Manfacturer Acme
  ctpcoordinates 0,0,10,10

LABEL Empty fields
  empty StationName
  + missing OperatorsName
  coordinates 0,0,100,20
  coordinates 0,0,0,20

%header

REMOVE PatientID
"""


def test_deid_labels_become_rules_with_corner_and_ctp_coordinates() -> None:
    result = import_rules(DEID_RECIPE, "deid")
    rules = {imported.rule["name"]: imported.rule for imported in result.rules}
    assert list(rules) == [
        "Acme banner (line 10)",
        "Acme any model but the old ones (line 17)",
        "Empty fields (line 41)",
    ]
    banner = rules["Acme banner (line 10)"]
    assert banner["regions"] == ["0,0,640,40", "500,440,140,40"]  # corners; x,y,w,h
    assert banner["if"] == {
        "Modality": {"contains": "US"},
        "any": [{"Manufacturer": {"contains": "Acme"}}, {"Manufacturer": {"contains": "Akme"}}],
        "Rows": 480,
    }
    assert rules["Acme any model but the old ones (line 17)"]["regions"] == ["all"]
    assert rules["Empty fields (line 41)"]["regions"] == ["0,0,100,20"]
    assert any("blanks nothing" in note for _, note in result.notes)
    parse_pixel_rules(list(rules.values()))


def test_deid_criteria_mean_what_they_mean_in_deid() -> None:
    banner, model, empty = from_deid_recipe(DEID_RECIPE)
    assert matches(banner, Manufacturer="AKME inc", Rows=480)
    assert not matches(banner, Manufacturer="AKME inc", Rows=600)
    assert not matches(banner, Manufacturer="Other", Rows=480)
    # left to right: ((Acme and not OLD<n>) and StationName is not LAB) or regions present
    assert matches(model, Manufacturer="Acme", ManufacturerModelName="NEW1", StationName="US")
    assert not matches(model, Manufacturer="Acme", ManufacturerModelName="old7")
    assert matches(model, Manufacturer="Acme", ManufacturerModelName="old")  # no digit
    assert not matches(model, Manufacturer="Acme", StationName="lab")
    us_regions = header(Manufacturer="Other")
    us_regions.SequenceOfUltrasoundRegions = [Dataset()]
    assert PixelRule.parse(0, model).matches(us_regions)
    assert matches(empty, StationName="")
    assert not matches(empty, StationName="", OperatorsName="Doe^J")
    assert not matches(empty)  # missing is not empty


def test_deid_labels_anonproxy_cannot_express_are_skipped_with_their_reason() -> None:
    result = import_rules(DEID_RECIPE, "deid")
    reasons = {skipped.name: skipped.reason for skipped in result.skipped}
    assert set(reasons) == {
        "Says it is clean (line 5)",
        "No operator (line 24)",
        "Alternatives in equals (line 29)",
        "Keep the scan (line 33)",
        "Not a keyword (line 37)",
    }
    assert "no coordinates" in reasons["Says it is clean (line 5)"]
    assert "line 26" in reasons["No operator (line 24)"]
    assert "600|768" in reasons["Alternatives in equals (line 29)"]
    assert "keepcoordinates" in reasons["Keep the scan (line 33)"]
    assert "outside_ultrasound_regions" in reasons["Keep the scan (line 33)"]
    assert "Manfacturer" in reasons["Not a keyword (line 37)"]


def _installed_deid_recipe() -> Path:
    """deid's own recipe, when the deid package is installed (it is not a dependency)."""
    try:
        distribution = metadata.distribution("deid")
    except metadata.PackageNotFoundError:
        pytest.skip("the deid package is not installed")
    path = Path(str(distribution.locate_file("deid/data/deid.dicom")))
    if not path.is_file():
        pytest.skip("the deid package has no deid/data/deid.dicom")
    return path


def test_deid_s_own_recipe_imports() -> None:
    text = _installed_deid_recipe().read_text("utf-8")
    assert guess_format(text) == "deid"
    result = import_rules(text, "deid")
    assert len(result.rules) > 50
    rules = parse_pixel_rules([imported.rule for imported in result.rules])
    assert all(skipped.reason for skipped in result.skipped)
    iu22 = header(Manufacturer="Philips Medical Systems", ManufacturerModelName="iU22", Rows=480)
    rule = first_rule(rules, iu22)
    assert rule is not None
    assert rule.name.startswith("Philips IU22")
    assert boxes(rule, iu22) == [(0, 0, 640, 47)]


# -- format, YAML and the command line -------------------------------------------------------


def test_the_format_is_told_by_the_content() -> None:
    assert guess_format(CTP_SCRIPT) == "ctp"
    assert guess_format(DEID_RECIPE) == "deid"
    assert guess_format("LABEL x\n  contains Modality US\n  coordinates all\n") == "deid"
    assert guess_format("just some text (1, 2)") is None


def test_the_yaml_names_the_source_line_of_each_rule() -> None:
    text = to_yaml(import_rules(CTP_SCRIPT, "ctp"), "site.script")
    assert "  # site.script line 6: {" in text
    assert "  # site.script line 19: {" in text
    loaded = yaml.safe_load(text)
    assert [r["name"] for r in loaded["pixel_rules"]] == [
        r["name"] for r in from_ctp_script(CTP_SCRIPT)
    ]
    assert yaml.safe_load(to_yaml(import_rules("", "deid"), "empty")) == {"pixel_rules": []}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANONPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "anonproxy", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_prints_rules_that_check_config_accepts(tmp_path: Path) -> None:
    source = tmp_path / "DicomPixelAnonymizer.script"
    source.write_text(CTP_SCRIPT.split("Inside a sequence", maxsplit=1)[0], "utf-8")
    done = run(["pixel-rules", "import", str(source)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"# {source} line 6:" in done.stdout
    rules = yaml.safe_load(done.stdout)["pixel_rules"]
    assert len(rules) == 4
    config = tmp_path / "anonproxy.yaml"
    config.write_text(yaml.safe_dump({"profile": {"pixel_rules": rules}}), "utf-8")
    checked = run(["check-config", "--config", str(config)], tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "Model X, small screen (line 6)" in checked.stdout


def test_the_command_reports_each_rule_it_skips_and_fails(tmp_path: Path) -> None:
    source = tmp_path / "site.recipe"
    source.write_text(DEID_RECIPE, "utf-8")
    done = run(["pixel-rules", "import", str(source), "--format", "deid"], tmp_path)
    assert done.returncode == 1
    assert len(yaml.safe_load(done.stdout)["pixel_rules"]) == 3
    assert f"{source}:29: skipped 'Alternatives in equals (line 29)':" in done.stderr
    assert done.stderr.count("skipped") == 5
    unknown = tmp_path / "notes.txt"
    unknown.write_text("nothing to import here\n", "utf-8")
    refused = run(["pixel-rules", "import", str(unknown)], tmp_path)
    assert refused.returncode == 2
    assert "--format" in refused.stderr


# -- the ultrasound starter set ---------------------------------------------------------------

#: A header of each device of the starter set (values as such devices write them).
STARTER_DEVICES: dict[str, dict[str, Any]] = {
    "GE LOGIQ 9 banner": {"Manufacturer": "GE Healthcare", "ManufacturerModelName": "LOGIQ9"},
    "GE LOGIQ E9 banner": {
        "Manufacturer": "GE Healthcare",
        "ManufacturerModelName": "LOGIQE9",
        "Rows": 720,
        "Columns": 960,
    },
    "Philips iU22 banner, 480 rows": {
        "Manufacturer": "Philips Medical Systems",
        "ManufacturerModelName": "iU22",
    },
    "Philips iU22 banner, 600 rows": {
        "Manufacturer": "Philips Medical Systems",
        "ManufacturerModelName": "iU22",
        "Rows": 600,
        "Columns": 800,
    },
    "Philips iU22 banner, 768 rows": {
        "Manufacturer": "Philips Medical Systems",
        "ManufacturerModelName": "iU22",
        "Rows": 768,
        "Columns": 1024,
    },
    "Philips EPIQ banner": {
        "Manufacturer": "Philips Ultrasound",
        "ManufacturerModelName": "EPIQ 7G",
        "Rows": 768,
        "Columns": 1024,
    },
    "Siemens ACUSON Antares banner": {
        "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "ACUSON Antares",
        "Rows": 768,
        "Columns": 1024,
    },
    "Siemens ACUSON banner, 600 x 800": {
        "Manufacturer": "Siemens",
        "ManufacturerModelName": "ACUSON S2000",
        "Rows": 600,
        "Columns": 800,
    },
    "Acuson Sequoia banner": {"Manufacturer": "ACUSON", "ManufacturerModelName": "SEQUOIA"},
    "ATL HDI 5000 banner": {
        "Manufacturer": "ATL",
        "ManufacturerModelName": "HDI 5000",
        "Rows": 476,
    },
    "Toshiba Aplio 400/500 banner": {
        "Manufacturer": "TOSHIBA_MEC_US",
        "ManufacturerModelName": "TUS-A500",
        "Rows": 720,
        "Columns": 960,
    },
    "Zonare z.one banner": {
        "Manufacturer": "ZONARE Medical Systems",
        "ManufacturerModelName": "Z_ONE",
        "Rows": 600,
        "Columns": 800,
    },
    "SuperSonic Imagine Aixplorer banner": {
        "Manufacturer": "SuperSonic Imagine SA",
        "ManufacturerModelName": "Aixplorer",
        "Rows": 1050,
        "Columns": 1400,
    },
}


def _starter_rules() -> tuple[PixelRule, ...]:
    return parse_pixel_rules(yaml.safe_load(STARTER.read_text("utf-8"))["pixel_rules"])


def test_the_starter_set_parses_and_covers_the_devices_it_names() -> None:
    assert [rule.name for rule in _starter_rules()] == list(STARTER_DEVICES)


@pytest.mark.parametrize("name", list(STARTER_DEVICES))
def test_each_starter_rule_is_the_first_match_for_its_device(name: str) -> None:
    rules = _starter_rules()
    ds = header(**STARTER_DEVICES[name])
    assert triage(ds) == "ultrasound"
    rule = first_rule(rules, ds)
    assert rule is not None
    assert rule.name == name
    blanked = boxes(rule, ds)
    assert blanked
    assert blanked[0][:2] in ((0, 0), (40, 0))  # the top strip
    assert all(x1 <= ds.Columns and y1 <= ds.Rows for _, _, x1, y1 in blanked)
    other_modality = header(**{**STARTER_DEVICES[name], "Modality": "CT"})
    assert first_rule(rules, other_modality) is None


def test_the_starter_fallback_is_commented_out_and_valid_once_enabled() -> None:
    text = STARTER.read_text("utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - name: Ultrasound"))
    block = [lines[start]] + [line for line in lines[start + 1 :] if line.startswith("  #   ")]
    enabled = yaml.safe_load("\n".join(line.replace("  # ", "", 1) for line in block))
    assert enabled[0]["regions"] == ["outside_ultrasound_regions"]
    fallback = parse_pixel_rules(enabled)
    assert first_rule(fallback, header(ManufacturerModelName="Unknown US 1")) is not None
    assert "outside_ultrasound_regions" not in yaml.safe_load(text)["pixel_rules"][-1]["regions"]
    assert "CHECK EVERY RULE ON THE SITE'S OWN DEVICES" in text

"""The README tells the truth: its profile summary is what `describe-profile` prints, and its
two set-up commands are the ones `.ci/run` and `./dev` implement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")


def test_default_profile_summary_matches_describe_profile(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "anonproxy", "describe-profile", "--summary"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    section = README.split("## What the default profile does", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL)
    assert block is not None
    assert block.group(1) == done.stdout


def test_the_two_commands_are_the_ones_ci_runs() -> None:
    assert "./dev serve" in README
    assert "./dev test" in README
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    assert "exec ./dev test" in ci
    dev = (ROOT / "dev").read_text("utf-8")
    for package in ("dcmtk", "orthanc", "dicom3tools", "openssl", "python3-venv"):
        assert package in ci
        assert package in dev


def test_every_yaml_example_in_the_readme_is_a_valid_configuration() -> None:
    import textwrap

    import yaml

    from anonproxy.config import parse_settings

    blocks = re.findall(r"( *)```yaml\n(.*?)\1```", README, re.DOTALL)
    assert len(blocks) >= 2
    for _, body in blocks:
        settings = parse_settings(yaml.safe_load(textwrap.dedent(body)), "README")
        assert settings.listen.ae_title == "ANONPROXY"


def test_the_try_it_line_sends_a_folder_of_compressed_files(
    make_proxy, corpus: list[Path], tmp_path: Path
) -> None:
    """The README's dcmsend line on a folder of JPEG, JPEG 2000 and RLE files: each arrives
    (storescu +sd would stop at the first compressed file)."""
    import shutil

    from peers import wait_for

    [line] = re.findall(r"^dcmsend -aec ANONPROXY \+sd \+r 127\.0\.0\.1 11112 \S+$", README, re.M)
    names = {"CT_small.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "MR_small_RLE.dcm"}
    study = tmp_path / "study"
    study.mkdir()
    for path in corpus:
        if path.name in names:
            shutil.copy(path, study / path.name)
    proxy = make_proxy()
    command = [*line.replace(" 11112 ", f" {proxy.port} ").split()[:-1], str(study)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    received = tmp_path / "var" / "received"
    assert wait_for(lambda: len(list(received.rglob("*.dcm"))) == len(names), timeout=60)

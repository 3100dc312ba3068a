"""The command line, run as a user runs it (a subprocess of the installed `anonproxy`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from anonproxy.acceptors import process_count
from anonproxy.config import DEFAULT_LISTEN_PROCESSES

from conftest import TEST_SECRET, corpus_identifying_values
from peers import free_port, storescu, wait_for, wait_port

ANONPROXY = [sys.executable, "-m", "anonproxy"]


def run(
    args: list[str], cwd: Path, *, secret: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    """The command in *cwd*, with the test secret in ANONPROXY_SECRET unless not *secret*
    (only `serve` and `secret create` make one)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANONPROXY_")}
    if secret:
        environment["ANONPROXY_SECRET"] = TEST_SECRET.value.decode()
    return subprocess.run(
        [*ANONPROXY, *args],
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_check_config_prints_the_embedded_default_without_the_secret(tmp_path: Path) -> None:
    created = run(["secret", "create"], tmp_path, secret=False)
    assert created.returncode == 0, created.stderr
    assert str(tmp_path / "var" / "secret.key") in created.stdout
    result = run(["check-config"], tmp_path, secret=False)
    assert result.returncode == 0, result.stderr
    assert "ae_title: ANONPROXY" in result.stdout
    assert "type: folder" in result.stdout
    secret = (tmp_path / "var" / "secret.key").read_text("utf-8").strip()
    assert secret not in result.stdout + result.stderr + created.stdout + created.stderr
    assert f"# secret: from {tmp_path / 'var' / 'secret.key'} (value redacted)" in result.stdout
    again = run(["secret", "create"], tmp_path, secret=False)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert (tmp_path / "var" / "secret.key").read_text("utf-8").strip() == secret


def test_only_serve_and_secret_create_make_a_secret(tmp_path: Path, corpus: list[Path]) -> None:
    """check-config says there is none; deidentify stops and names where it looked."""
    where = str(tmp_path / "var" / "secret.key")
    checked = run(["check-config"], tmp_path, secret=False)
    assert checked.returncode == 0, checked.stderr
    assert "# secret: none yet: no pseudonymisation secret" in checked.stdout
    assert where in checked.stdout
    out = tmp_path / "out"
    refused = run(["deidentify", str(corpus[0]), str(out), "-q", "-j", "1"], tmp_path, secret=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("anonproxy: no pseudonymisation secret")
    assert where in refused.stderr
    assert "ANONPROXY_SECRET_FILE" in refused.stderr
    assert "anonproxy secret create" in refused.stderr
    assert not (tmp_path / "var").exists()
    assert not out.exists()


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listen: {port: 104, ae_titel: X}\n", "utf-8")
    result = run(["check-config", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert "listen.ae_titel" in result.stderr


def test_set_overrides_one_setting_and_is_validated_like_the_file(tmp_path: Path) -> None:
    result = run(
        ["check-config", "--set", "admin.host=0.0.0.0", "--set", "admin.port=9090",
         "--set", "listen.ae_title=EDGE1"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "host: 0.0.0.0\n  port: 9090" in result.stdout
    assert "ae_title: EDGE1" in result.stdout
    typo = run(["check-config", "--set", "admin.prot=9090"], tmp_path)
    assert typo.returncode == 2
    assert "admin.prot" in typo.stderr
    wrong = run(["check-config", "--set", "admin.port=http"], tmp_path)
    assert wrong.returncode == 2
    assert "admin.port" in wrong.stderr
    into_list = run(["check-config", "--set", "destinations.name=x"], tmp_path)
    assert into_list.returncode == 2
    assert "destinations is not a mapping" in into_list.stderr
    assert run(["check-config", "--set", "admin.port"], tmp_path).returncode == 2


def test_check_config_warns_about_a_loose_secret_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef", "utf-8")
    key.chmod(0o644)
    result = run(["check-config"], tmp_path, ANONPROXY_SECRET_FILE=str(key))
    assert result.returncode == 0
    assert "readable by group or others" in result.stderr


def test_deidentify_folder_uses_all_cores_and_names_files_by_new_uids(
    tmp_path: Path, corpus: list[Path]
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for path in corpus:
        (source / path.name).write_bytes(path.read_bytes())
    (source / "notes.txt").write_text("not DICOM", "utf-8")
    result = run(["deidentify", str(source), str(tmp_path / "out"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(corpus) + 1} file(s)" in result.stdout
    assert "1 skipped (not DICOM)" in result.stdout
    outputs = list((tmp_path / "out").rglob("*.dcm"))
    assert outputs
    phi = corpus_identifying_values(corpus)
    for path in outputs:
        assert not [v for v in phi if v in str(path)]
        ds = dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert not [v for v in phi if v.encode() in path.read_bytes()]


def test_deidentify_one_file_to_a_file(tmp_path: Path, corpus: list[Path]) -> None:
    out = tmp_path / "one.dcm"
    result = run(["deidentify", str(corpus[0]), str(out), "-q", "-j", "1"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert dcmread(out).PatientIdentityRemoved == "YES"


#: What `anonproxy deidentify` must not import (its start-up; pyproject's import-linter
#: contract "the offline path imports no network module" says the same of the code)
NETWORK_MODULES = (
    "pynetdicom",
    "anonproxy.service",
    "anonproxy.scp",
    "anonproxy.forward",
    "anonproxy.admin",
    "anonproxy.acceptors",
)


def test_deidentify_imports_no_network_module(tmp_path: Path, corpus: list[Path]) -> None:
    """The offline command starts without pynetdicom and the service, also with a
    configuration that sets listen.sop_classes (checked when the configuration loads)."""
    config = tmp_path / "anonproxy.yaml"
    config.write_text('listen:\n  sop_classes: ["1.2.840.10008.5.1.4.1.1.2", storage]\n')
    out = tmp_path / "one.dcm"
    program = (
        "import sys\n"
        "from anonproxy.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "print(*sorted(sys.modules), sep='\\n')\n"
        "sys.exit(status)\n"
    )
    args = ["deidentify", "-q", "-j", "1", "-c", str(config), str(corpus[0]), str(out)]
    result = subprocess.run(
        [sys.executable, "-c", program, *args],
        cwd=tmp_path,
        env={**os.environ, "ANONPROXY_SECRET": TEST_SECRET.value.decode()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert dcmread(out).PatientIdentityRemoved == "YES"
    modules = result.stdout.splitlines()
    assert "anonproxy.offline" in modules  # the list is the command's
    network = [m for m in modules if m in NETWORK_MODULES or m.startswith("pynetdicom.")]
    assert network == []


def test_deidentify_bounds_the_inflation_of_a_deflated_file(tmp_path: Path) -> None:
    """A deflate bomb is refused after inflating max_instance_bytes, piece by piece."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = bytes(8 * 1024 * 1024)  # 8 MiB of zeros: a few KiB once deflated
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, implicit_vr=False, little_endian=True, enforce_file_format=True)
    deflated = dcmread(bomb)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.save_as(bomb, enforce_file_format=True)
    assert bomb.stat().st_size < 100_000
    config = tmp_path / "small.yaml"
    config.write_text("listen:\n  max_instance_bytes: 1000000\n", "utf-8")
    out = tmp_path / "out"
    result = run(["deidentify", str(bomb), str(out), "--config", str(config), "-j", "1"], tmp_path)
    assert "inflated data set exceeds max_instance_bytes" in result.stdout + result.stderr
    assert not out.exists() or not list(out.rglob("*.dcm"))


def _burned_in(tmp_path: Path) -> Path:
    """CT_small declaring Burned In Annotation YES."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    path = tmp_path / "burned.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deidentify_refuses_burned_in_annotation_unless_the_profile_passes_it(
    tmp_path: Path,
) -> None:
    source = _burned_in(tmp_path)
    refused = run(["deidentify", str(source), str(tmp_path / "out"), "-q", "-j", "1"], tmp_path)
    assert refused.returncode == 1
    assert "1 failed (burned-in annotation refused by policy)" in refused.stdout
    assert not (tmp_path / "out").exists()
    config = tmp_path / "pass.yaml"
    config.write_text("profile:\n  burned_in_annotation: pass\n", "utf-8")
    out = tmp_path / "passed.dcm"  # one input file: the output file
    passed = run(
        ["deidentify", str(source), str(out), "-q", "-j", "1", "--config", str(config)], tmp_path
    )
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert dcmread(out).BurnedInAnnotation == "NO"  # read by OCR, nothing identifying found


def test_deidentify_enforces_max_sequence_depth(tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    current = ds
    for _ in range(3):  # nested three deep
        item = Dataset()
        current.RequestAttributesSequence = [item]
        current = item
    current.RequestedProcedureDescription = "innermost"
    source = tmp_path / "deep.dcm"
    ds.save_as(source, enforce_file_format=True)
    config = tmp_path / "shallow.yaml"
    config.write_text("listen:\n  max_sequence_depth: 2\n", "utf-8")
    out = tmp_path / "out"
    result = run(
        ["deidentify", str(source), str(out), "-q", "-j", "1", "-c", str(config)], tmp_path
    )
    assert result.returncode == 1
    assert "failed (sequences nest deeper than max_sequence_depth 2)" in result.stdout
    assert "innermost" not in result.stdout + result.stderr
    assert not out.exists() or not list(out.rglob("*.dcm"))
    default = run(["deidentify", str(source), str(out), "-q", "-j", "1"], tmp_path)  # 16 deep
    assert default.returncode == 0, default.stdout + default.stderr


def test_deidentify_reports_an_unreadable_input_and_fails(tmp_path: Path) -> None:
    """A dangling symbolic link (unreadable as root too) is failed (unreadable), not skipped
    as not DICOM, and the exit status says so; the other inputs are still de-identified."""
    source = tmp_path / "in"
    source.mkdir()
    (source / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (source / "gone.dcm").symlink_to(tmp_path / "missing.dcm")
    (source / "notes.txt").write_text("not DICOM", "utf-8")
    out = tmp_path / "out"
    result = run(["deidentify", str(source), str(out), "-q", "-j", "1"], tmp_path)
    assert result.returncode == 1
    assert "3 file(s)" in result.stdout
    assert "1 failed (unreadable)" in result.stdout
    assert "1 skipped (not DICOM)" in result.stdout
    assert "1 de-identified" in result.stdout
    assert len(list(out.rglob("*.dcm"))) == 1
    alone = run(["deidentify", str(tmp_path / "nowhere.dcm"), str(out), "-q"], tmp_path)
    assert alone.returncode == 1
    assert "1 failed (unreadable)" in alone.stdout


def test_describe_profile_lists_every_row_of_table_e1_1(tmp_path: Path) -> None:
    result = run(["describe-profile"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 657
    actions = {tag: action for tag, action, _ in rows}
    assert actions["(0010,0010)"] == "Z"
    assert actions["(0008,0018)"] == "U"


@pytest.mark.integration
def test_serve_on_the_default_folder_destination_then_sigterm(
    tmp_path: Path, corpus: list[Path]
) -> None:
    port = free_port()
    config = tmp_path / "anonproxy.yaml"
    # everything else is default (the admin endpoint on a free port: 8080 may be taken)
    config.write_text(f"listen: {{port: {port}}}\nadmin: {{port: 0}}\n", "utf-8")
    process = subprocess.Popen(
        [*ANONPROXY, "serve", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port, timeout=30)
        # started: with several processes, one listens before the others (and the audit)
        audit_file = tmp_path / "var" / "audit.jsonl"
        assert wait_for(lambda: audit_file.exists() and "map.key_created" in audit_file.read_text())
        files = [p for p in corpus if p.name in {"CT_small.dcm", "rtplan.dcm"}]
        sent = storescu(port, files)
        assert sent.returncode == 0, sent.stderr
        received = tmp_path / "var" / "received"
        assert wait_for(lambda: len(list(received.rglob("*.dcm"))) == 2, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "created a new pseudonymisation secret" in err
    assert str(tmp_path / "var" / "secret.key") in err
    audit = [json.loads(line) for line in (tmp_path / "var" / "audit.jsonl").open()]
    assert audit[0]["event"] == "service.started"
    # listen.processes by default (1: the one process, unsupervised; null: one per core)
    assert audit[0].get("processes", 1) == process_count(DEFAULT_LISTEN_PROCESSES)
    assert audit[1] == {
        **audit[1],
        "event": "map.key_created",
        "path": str(tmp_path / "var" / "map.key"),
    }
    assert audit[-1]["event"] == "service.stopped"
    phi = corpus_identifying_values(corpus)
    assert not [v for v in phi if v in out + err]

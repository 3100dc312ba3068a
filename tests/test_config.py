"""Configuration: validation names the key; embedded default; effective destinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from anonproxy.config import (
    FolderDestinationConfig,
    dump_settings,
    load_settings,
    parse_settings,
)
from anonproxy.errors import ConfigError


def test_embedded_default_listens_as_anonproxy_and_delivers_to_a_folder() -> None:
    settings = load_settings(None)
    assert settings.listen.ae_title == "ANONPROXY"
    assert settings.listen.port == 11112
    assert settings.destinations == []
    [destination] = settings.effective_destinations
    assert isinstance(destination, FolderDestinationConfig)
    assert destination.path == Path("var/received")


def test_readme_keys_are_accepted() -> None:
    settings = parse_settings(
        {
            "listen": {"ae_title": "ANONPROXY", "host": "0.0.0.0", "port": 11112,
                       "allowed_calling_ae_titles": []},
            "destinations": [
                {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": 4242},
                {"name": "copy", "type": "folder", "path": "/tmp/copy"},
            ],
            "profile": {"options": []},
            "storage": {"path": "./var"},
            "audit": {"path": "./var/audit.jsonl"},
        }
    )  # fmt: skip
    assert [d.type for d in settings.effective_destinations] == ["dicom", "folder"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"listen": {"portt": 104}}, "listen.portt"),
        ({"listen": {"ae_title": "A" * 17}}, "listen.ae_title"),
        (
            {"listen": {"allowed_calling_ae_titles": ["BAD\\AE"]}},
            "listen.allowed_calling_ae_titles",
        ),
        ({"profile": {"options": ["retain_everything"]}}, "profile.options"),
        ({"storage": {"paht": "x"}}, "storage.paht"),
        ({"secret": "hunter2"}, "secret"),
        ({"destinations": [{"name": "a", "type": "folder"}]}, "destinations.0.folder.path"),
        (
            {"destinations": [{"name": "a", "host": "h", "port": 1}]},
            "destinations.0.dicom.ae_title",
        ),
    ],
)
def test_invalid_configuration_names_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(data, "test.yaml")
    assert key in str(error.value)
    assert "test.yaml" in str(error.value)


def test_duplicate_destination_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        parse_settings({"destinations": [{"name": "a", "type": "folder", "path": "x"}] * 2})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed", "utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n", "utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(top)


def test_dump_shows_effective_destinations_and_round_trips() -> None:
    text = dump_settings(load_settings(None))
    assert "type: folder" in text
    import yaml

    assert parse_settings(yaml.safe_load(text)).listen.port == 11112


def test_the_default_max_sequence_depth_is_the_engines() -> None:
    from anonproxy.config import DEFAULT_MAX_SEQUENCE_DEPTH, ListenConfig
    from anonproxy.deid import Limits
    from anonproxy.deid.structure import DEFAULT_MAX_SEQUENCE_DEPTH as ENGINE_DEFAULT

    assert DEFAULT_MAX_SEQUENCE_DEPTH == ENGINE_DEFAULT == Limits().max_sequence_depth
    assert ListenConfig().max_sequence_depth == ENGINE_DEFAULT

"""Configuration: typed, validated once, errors name the dotted key; the example documents all."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import Config, load_config, parse_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "gateway.example.toml"
DEMO = REPO / "config" / "demo.toml"


def _keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field[typing.Any]]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out.update(_keys(hint, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def _flatten(doc: dict[str, typing.Any], prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_example_documents_every_key_with_its_default() -> None:
    documented = _flatten(tomllib.loads(EXAMPLE.read_text()))
    keys = _keys(Config)
    assert sorted(documented) == sorted(keys)
    for key, f in keys.items():
        if key in ("gateway.id", "profile.path"):
            continue  # required, no default
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        assert documented[key] == default, key


def test_example_and_demo_configs_load() -> None:
    example = load_config(EXAMPLE)
    assert example.gateway.id == "gw-0001"
    assert Path(example.profile.path).is_file()
    demo = load_config(DEMO)
    assert demo.source.kind == "simulator"
    assert Path(demo.profile.path).is_file()


def test_demo_config_with_broker_and_store_changed_is_a_run_config(tmp_path: Path) -> None:
    text = DEMO.read_text()
    text = text.replace('host = "localhost"', 'host = "127.0.0.1"').replace(
        "port = 1883", "port = 18830").replace(
        'path = "../var/demo/store.sqlite"', f'path = "{tmp_path / "s.sqlite"}"')
    text = text.replace('path = "../profiles/reference.toml"',
                        f'path = "{REPO / "profiles" / "reference.toml"}"')
    cfg = tmp_path / "demo.toml"
    cfg.write_text(text)
    config = load_config(cfg)
    assert (config.mqtt.host, config.mqtt.port) == ("127.0.0.1", 18830)
    assert config.store.path == str(tmp_path / "s.sqlite")
    assert main(["check-config", "-c", str(cfg)]) == 0


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ('[gateway]\nid = "g"\n[mqtt]\nprot = 1\n', "mqtt.prot", "unknown key"),
        ('[gateway]\nid = "g"\n[mqtt.tls]\nca = "x"\n', "mqtt.tls.ca", "unknown key"),
        ('[gateway]\nid = "g"\n[mqtt]\nport = "x"\n', "mqtt.port", "must be an integer"),
        ('[gateway]\nid = "g"\n[mqtt]\nport = 70000\n', "mqtt.port", "≤ 65535"),
        ('[gateway]\nid = "g"\n[source]\nkind = "can"\n', "source.kind", "one of"),
        ('[gateway]\nid = "g"\n[store]\nmax_bytes = 1.5\n', "store.max_bytes", "integer"),
        ('[gateway]\nid = "g"\n[mqtt]\ntopic_prefix = "a/#"\n', "mqtt.topic_prefix", "wildcard"),
        ('mqtt = 3\n[gateway]\nid = "g"\n', "mqtt", "must be a table"),
        ('[gateway]\nlog_level = "info"\n', "gateway.id", "required"),
        ('[gateway]\nid = "g"\n[mqtt.tls]\nenabled = "yes"\n', "mqtt.tls.enabled", "true or false"),
    ],
)
def test_bad_values_name_the_dotted_key(tmp_path: Path, toml: str, key: str, words: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert f"key '{key}'" in message
    assert words in message
    assert str(cfg) in message


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text('[gateway]\nid = "g"\n\n[mqtt\nport = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.line == 4
    assert "line 4" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = parse_config({"gateway": {"id": "g"}, "store": {"path": "data/s.sqlite"},
                           "source": {"files": ["a.log", "/abs/b.asc"]}}, base_dir=tmp_path)
    assert config.store.path == str(tmp_path / "data" / "s.sqlite")
    assert config.source.files == [str(tmp_path / "a.log"), "/abs/b.asc"]


def test_check_config_exits_78_naming_the_key(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[gateway]\nid = "g"\n[edge]\nhealth_interval = 5\n')
    assert main(["check-config", "-c", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert "edge.health_interval" in err
    assert "Traceback" not in err


def test_check_config_reports_unreadable_secret_files(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[gateway]\nid = "g"\n[profile]\npath = "{REPO / "profiles/reference.toml"}"\n'
                   '[mqtt]\npassword_file = "missing-password"\n')
    assert main(["check-config", "-c", str(cfg)]) == 78
    assert "mqtt.password_file" in capsys.readouterr().err

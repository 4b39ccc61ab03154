"""Tests for vaedraw.config: presets, dotted overrides from --set and TOML, validation, round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vaedraw.config import (
    CHOICES, CONFIG_VERSION, POSITIVE, PRESETS, RunConfig, build_config, diff, flatten, parse_set, preset,
)
from vaedraw.errors import ConfigError

FIELDS = sorted(k for k in flatten(RunConfig().to_dict()) if k != "version")


def _other_value(key: str, value):
    """A valid value for `key` that differs from `value` (the default's)."""
    if key in CHOICES:
        return next(c for c in CHOICES[key] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return 0.25 if key == "model.dropout" else value * 0.5 + 0.125
    if isinstance(value, str):
        return value + "-x"
    raise AssertionError(f"no test value for {key}")


def _companions(key: str, value) -> dict[str, str]:
    """Other settings a value needs to pass the cross-field rules."""
    if key == "model.likelihood" and value == "gaussian":
        return {"data.binarize": "none"}
    return {}


def _toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _get(cfg: RunConfig, key: str):
    section, _, name = key.rpartition(".")
    obj = getattr(cfg, section) if section else cfg
    return getattr(obj, name)


def test_every_preset_builds_and_is_named():
    assert set(PRESETS) >= {"default", "seed", "conditional", "latent2"}
    for name in PRESETS:
        cfg = preset(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.preset == name
        assert cfg.version == CONFIG_VERSION
        # a preset must itself pass validation (build_config runs every check)
        assert build_config(name) == cfg
    seed = preset("seed")
    assert (seed.model.arch, seed.model.likelihood, seed.model.latent_dim) == ("seed", "gaussian", 8)
    assert (seed.train.batch_size, seed.train.lr, seed.train.steps) == (64, 5e-4, 30_000)
    assert preset("conditional").model.n_classes == 10
    assert preset("latent2").model.latent_dim == 2


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="nope"):
        preset("nope")
    with pytest.raises(ConfigError, match="nope"):
        build_config("nope")


@pytest.mark.parametrize("key", FIELDS)
def test_every_field_can_be_set_from_a_string(key):
    default = _get(RunConfig(), key)
    value = _other_value(key, default)
    overrides = {key: str(value).lower() if isinstance(value, bool) else str(value)}
    overrides.update(_companions(key, value))
    cfg = build_config("default", overrides=overrides)
    got = _get(cfg, key)
    assert got == value and type(got) is type(default)
    # nothing else moved
    assert set(diff(RunConfig(), cfg)) == {key, *_companions(key, value)}


@pytest.mark.parametrize("key", [k for k in FIELDS if k != "preset"])
def test_every_field_can_be_set_from_a_toml_file(key, tmp_path):
    default = _get(RunConfig(), key)
    value = _other_value(key, default)
    sections: dict[str, dict[str, object]] = {}
    for k, v in {key: value, **_companions(key, value)}.items():
        section, name = k.split(".")
        sections.setdefault(section, {})[name] = v
    text = "".join(f"[{s}]\n" + "".join(f"{n} = {_toml_literal(v)}\n" for n, v in kv.items())
                   for s, kv in sections.items())
    path = tmp_path / "run.toml"
    path.write_text(text)
    cfg = build_config("default", toml=path)
    got = _get(cfg, key)
    assert got == value and type(got) is type(default)


def test_toml_preset_key_chooses_the_preset_and_set_wins_over_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "latent2"\n[model]\nlatent_dim = 3\nhidden = 64\n[train]\nlr = 1\n')
    cfg = build_config("default", toml=path, overrides={"model.latent_dim": "5"})
    assert cfg.preset == "latent2"
    assert cfg.sample.gmm_components == 20  # from the latent2 preset
    assert cfg.model.hidden == 64  # from the file
    assert cfg.model.latent_dim == 5  # the explicit override comes last
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # a TOML integer is a valid float


def test_numbers_in_scientific_notation_and_booleans_parse():
    cfg = build_config("default", overrides=parse_set(
        ["train.steps=2e3", "train.lr=3e-4", "sample.fit_gmm=off", "model.dropout=0.1"]))
    assert cfg.train.steps == 2000 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 3e-4
    assert cfg.sample.fit_gmm is False
    assert cfg.model.dropout == 0.1


@pytest.mark.parametrize("key", ["model.latnet_dim", "nosuch.field", "nosuch", "model.latent_dim.x",
                                 "train.lr.value"])
def test_unknown_keys_are_errors_naming_the_key(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("default", overrides={key: "1"})


def test_a_section_is_not_a_value():
    with pytest.raises(ConfigError, match="'model'"):
        build_config("default", overrides={"model": "1"})


def test_the_format_version_cannot_be_overridden(tmp_path):
    with pytest.raises(ConfigError, match="version"):
        build_config("default", overrides={"version": "2"})
    path = tmp_path / "run.toml"
    path.write_text("version = 1\n")
    with pytest.raises(ConfigError, match="version"):
        build_config("default", toml=path)


@pytest.mark.parametrize("key,value", [
    ("model.latent_dim", "two"), ("model.latent_dim", "2.5"), ("train.lr", "fast"),
    ("sample.fit_gmm", "maybe"), ("train.seed", "1.5"), ("model.dropout", "nan"),
])
def test_wrong_types_from_strings_are_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("default", overrides={key: value})


@pytest.mark.parametrize("line", ['[model]\nlatent_dim = "two"', "[model]\nlatent_dim = 2.5",
                                  "[sample]\nfit_gmm = 1", "[train]\nlr = [0.1]", "[model]\narch = 3",
                                  "[train]\nsteps = true", '[train]\nlr = "0.1"', '[model]\nlatent_dim = "2"'])
def test_wrong_types_from_toml_are_errors_naming_the_key(line, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    section = line.split("]")[0][1:]
    name = line.split("\n")[1].split(" =")[0]
    with pytest.raises(ConfigError, match=rf"{section}\.{name}"):
        build_config("default", toml=path)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choices_are_errors_naming_the_key_and_the_choices(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        build_config("default", overrides={key: "no-such-choice"})
    assert all(choice in str(info.value) for choice in CHOICES[key])


@pytest.mark.parametrize("key", sorted(POSITIVE))
@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_sizes_are_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("default", overrides={key: value})


@pytest.mark.parametrize("key", ["train.seed", "model.n_classes", "train.lr_min_ratio", "train.eps"])
def test_negative_values_are_errors_naming_the_key(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("default", overrides={key: "-1"})


@pytest.mark.parametrize("overrides,match", [
    ({"model.dropout": "1.0"}, "model.dropout"),
    ({"model.likelihood": "gaussian"}, "binarize"),
    ({"model.arch": "seed", "model.n_classes": "10"}, "n_classes"),
])
def test_cross_field_rules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config("default", overrides=overrides)


@pytest.mark.parametrize("item", ["model.latent_dim", "=3", ""])
def test_set_needs_key_equals_value(item):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set([item])


def test_set_keeps_equals_signs_in_values():
    assert parse_set(["preset=a=b", " model.hidden = 7"]) == {"preset": "a=b", "model.hidden": " 7"}


def test_missing_or_invalid_toml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("default", toml=tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nlatent_dim = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config("default", toml=bad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_dict_and_json(name):
    cfg = build_config(name, overrides={"model.latent_dim": "3", "train.lr": "0.002", "sample.fit_gmm": "false"})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # to_dict is a deep copy: changing it does not change the config
    d = cfg.to_dict()
    d["model"]["latent_dim"] = 99
    assert cfg.model.latent_dim == 3


def test_from_dict_refuses_unknown_keys_and_bad_values():
    d = RunConfig().to_dict()
    d["model"]["width"] = 3
    with pytest.raises(ConfigError, match=r"model\.width"):
        RunConfig.from_dict(d)
    d = RunConfig().to_dict()
    d["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        RunConfig.from_dict(d)


@pytest.mark.parametrize("version", [CONFIG_VERSION + 1, "1", None])
def test_a_newer_or_malformed_config_version_is_refused(version):
    d = RunConfig().to_dict()
    d["version"] = version
    with pytest.raises(ConfigError, match="newer"):
        RunConfig.from_dict(d)


def test_a_config_without_version_or_fields_takes_the_defaults():
    assert RunConfig.from_dict({}) == RunConfig()
    assert RunConfig.from_dict({"model": {"latent_dim": 4}}).model == dataclasses.replace(
        RunConfig().model, latent_dim=4)


def test_diff_names_changed_keys():
    a, b = preset("default"), preset("latent2")
    d = diff(a, b)
    assert d["model.latent_dim"] == (a.model.latent_dim, 2)
    assert d["preset"] == ("default", "latent2")
    assert "train.lr" not in d


def test_config_json_is_plain_data(tmp_path: Path):
    cfg = preset("seed")
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert RunConfig.from_dict(json.loads(path.read_text())) == cfg

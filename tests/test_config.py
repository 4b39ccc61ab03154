"""Tests for vaedraw.config: presets, dotted overrides from --set and TOML, validation, round trips."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from vaedraw.config import (
    ARCH_SECTIONS, CONFIG_VERSION, PRESETS, Range, RunConfig, apply_overrides, build_config, choice_keys,
    choices, diff, flatten, parse_set, preset, recorded_keys, steps_for_epochs, value_range,
)
from vaedraw.errors import EXIT_OUTPUT, EXIT_USAGE, ConfigError, OutputError

FIELDS = sorted(k for k in flatten(RunConfig().to_dict()) if k != "version" and k not in recorded_keys())
CHOICE_KEYS = sorted(k for k in choice_keys() if k not in recorded_keys())
NUMERIC = sorted(k for k in FIELDS if value_range(k) is not None)
# Numbers whose range leaves out 0: sizes, counts and rates.
POSITIVE = sorted(k for k in NUMERIC if 0 not in value_range(k))


def _other_value(key: str, value):
    """A valid value for `key` that differs from `value` (the default's)."""
    if key in CHOICE_KEYS:
        return next(c for c in choices(key) if c != value)
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
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


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
        section, _, name = k.rpartition(".")  # model.conv.channels: the [model.conv] table
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
    path.write_text('preset = "latent2"\n[model]\nlatent_dim = 3\n[model.conv]\nhidden = 64\n[train]\nlr = 1\n')
    cfg = build_config("default", toml=path, overrides={"model.latent_dim": "5"})
    assert cfg.preset == "latent2"
    assert cfg.sample.gmm_components == 20  # from the latent2 preset
    assert cfg.model.conv.hidden == 64  # from the file
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


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_bad_choices_are_errors_naming_the_key_and_the_choices(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        build_config("default", overrides={key: "no-such-choice"})
    assert all(choice in str(info.value) for choice in choices(key))


@pytest.mark.parametrize("key", POSITIVE)
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


# ----------------------------------------------------------------------------- choices from the registries
def test_choices_are_the_registries():
    from vaedraw import data, fastpath, models, objectives, sample, train

    assert choices("model.arch") == tuple(models.ARCHS)
    assert choices("data.dataset") == tuple(data.DATASETS)
    assert choices("data.binarize") == data.spec.BINARIZE
    assert choices("model.likelihood") == tuple(objectives.LIKELIHOODS)
    assert choices("sample.sampler") == tuple(sample.SAMPLERS)
    assert choices("train.precision") == fastpath.PRECISIONS
    assert choices("train.compile") == fastpath.COMPILE_MODES
    assert choices("train.lr_schedule") == train.LR_SCHEDULES
    assert set(choice_keys()) == {"data.dataset", "data.binarize", "model.arch", "model.likelihood",
                                  "sample.sampler", "train.precision", "train.compile", "train.lr_schedule"}


def test_a_registered_architecture_or_data_set_is_a_choice_at_once(monkeypatch):
    from vaedraw import data, models

    monkeypatch.setitem(models.ARCHS, "toy", models.ARCHS["conv"])
    monkeypatch.setitem(data.DATASETS, "toy-digits", data.DATASETS["mnist"])
    assert "toy" in choices("model.arch") and "toy-digits" in choices("data.dataset")
    cfg = build_config("default", overrides={"model.arch": "toy", "data.dataset": "toy-digits"})
    assert (cfg.model.arch, cfg.data.dataset) == ("toy", "toy-digits")
    assert "conv" not in cfg.to_dict()["model"]  # the toy architecture has no conv options
    monkeypatch.delitem(models.ARCHS, "toy")
    with pytest.raises(ConfigError, match=r"model\.arch: unknown value 'toy'"):
        build_config("default", overrides={"model.arch": "toy"})


@pytest.mark.parametrize("key", ["train.lr", "nosuch", "model.conv", "train.lr.value", "model.conv.channels"])
def test_choices_of_a_key_that_is_no_choice_is_an_error(key):
    with pytest.raises(ConfigError, match="not a choice"):
        choices(key)


# ----------------------------------------------------------------------------- architecture sections
def test_conv_options_live_in_their_own_section():
    assert ARCH_SECTIONS == ("conv", "hierarchical")
    cfg = build_config("default", overrides={"model.conv.channels": "8", "model.conv.hidden": "32"})
    assert (cfg.model.conv.channels, cfg.model.conv.hidden) == (8, 32)
    assert cfg.to_dict()["model"]["conv"] == {"channels": 8, "hidden": 32}
    assert not hasattr(cfg.model, "channels")
    # a seed run saves no conv options: it never used them
    assert "conv" not in preset("seed").to_dict()["model"]
    assert RunConfig.from_dict(preset("seed").to_dict()) == preset("seed")


@pytest.mark.parametrize("overrides", [
    {"model.conv.channels": "8"},
    {"model.conv.channels": "32"},  # even at its default: it was asked for, and would be ignored
    {"model.channels": "8"},  # the old spelling names the new key
])
def test_an_option_of_another_architecture_is_an_error_naming_it(overrides, capsys):
    with pytest.raises(ConfigError, match=r"model\.conv\.channels is an option of model\.arch=conv.*model\.arch=seed"):
        build_config("seed", overrides=overrides)
    # whichever comes first: the architecture or its options
    with pytest.raises(ConfigError, match=r"model\.conv\.channels"):
        build_config("default", overrides={**overrides, "model.arch": "seed"})


def test_another_architectures_option_from_a_toml_file_or_a_saved_config_is_an_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model.conv]\nhidden = 256\n")
    with pytest.raises(ConfigError, match=r"model\.conv\.hidden"):
        build_config("default", toml=path, overrides={"model.arch": "seed"})
    d = preset("seed").to_dict()
    d["model"]["conv"] = {"hidden": 64}
    with pytest.raises(ConfigError, match=r"model\.conv\.hidden"):
        RunConfig.from_dict(d)
    # a config built in code that changed them is refused when it is checked
    cfg = preset("seed")
    cfg.model.conv.hidden = 64
    with pytest.raises(ConfigError, match=r"model\.conv\.hidden"):
        apply_overrides(cfg, {})


def test_the_old_flat_spellings_work_with_a_one_line_note(tmp_path, capsys):
    cfg = build_config("default", overrides={"model.channels": "8", "model.hidden": "32"})
    assert (cfg.model.conv.channels, cfg.model.conv.hidden) == (8, 32)
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: model.channels is now model.conv.channels; the old name works in this release only",
                   "note: model.hidden is now model.conv.hidden; the old name works in this release only"]
    path = tmp_path / "run.toml"
    path.write_text("[model]\nchannels = 4\n")
    assert build_config("default", toml=path).model.conv.channels == 4
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("arch,expect", [("conv", (8, 64)), ("seed", (32, 256))])
def test_configs_saved_before_the_conv_section_still_load(arch, expect, capsys):
    """config.json and checkpoint headers of version 1 kept flat channels/hidden for every architecture."""
    old = preset("seed" if arch == "seed" else "default").to_dict()
    old["version"] = 1
    old["model"].pop("conv", None)
    old["data"].pop("subset")
    old["model"].update(channels=8, hidden=64)
    cfg = RunConfig.from_dict(old)
    assert (cfg.model.conv.channels, cfg.model.conv.hidden) == expect  # a seed network never used them
    assert cfg.model.arch == arch and cfg.version == CONFIG_VERSION and cfg.data.subset is False
    assert capsys.readouterr().err == ""  # loading an old run is not the user's spelling: no note


# ----------------------------------------------------------------------------- numbers out of range
OUT_OF_RANGE = [
    ("train.seed", str(2**64)), ("train.seed", "1e30"), ("train.seed", str(2**32)), ("train.seed", "1" * 5000),
    ("train.steps", "1e308"), ("train.steps", "1e400"), ("train.steps", str(10**9 + 1)), ("train.steps", "inf"),
    ("train.beta1", "1"), ("train.beta1", "-0.1"), ("train.beta2", "1.5"), ("train.eps", "0"), ("train.eps", "2"),
    ("train.lr", "inf"), ("train.lr", "nan"), ("train.lr", "1e400"), ("train.lr", "-inf"), ("train.lr_min_ratio", "2"),
    ("model.conv.channels", str(10**9)), ("model.conv.hidden", str(10**6)), ("model.latent_dim", "5000"),
    ("model.n_classes", str(10**6)), ("train.batch_size", str(10**7)), ("sample.gmm_components", str(10**5)),
    ("train.eval_images", str(10**9)), ("sample.temperature", "1e308"), ("sample.temperature", "inf"),
    ("sample.temperature", "nan"), ("train.log_every", str(10**12)), ("model.dropout", "inf"),
]


@pytest.mark.parametrize("key,value", OUT_OF_RANGE)
def test_numbers_out_of_range_are_one_line_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        build_config("default", overrides={key: value})
    message = str(info.value)
    assert "\n" not in message and len(message) < 200
    assert ConfigError.exit_code == EXIT_USAGE


@pytest.mark.parametrize("line", ["[train]\nlr = inf", "[train]\nlr = nan", "[train]\nseed = 18446744073709551616",
                                  "[model.conv]\nchannels = 1000000000", "[train]\nsteps = 1e308",
                                  "[train]\nbeta2 = 1.0", "[sample]\ntemperature = -inf",
                                  f"[train]\nlr = {10**400}"])
def test_numbers_out_of_range_from_toml_are_errors(line, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    key = line.split("]")[0][1:] + "." + line.split("\n")[1].split(" =")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        build_config("default", toml=path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("key,value", [
    ("train.seed", 2**32 - 1), ("train.steps", 10**9), ("train.beta1", 0.0), ("train.beta2", 0.999999),
    ("train.eps", 1.0), ("model.conv.channels", 4096), ("model.conv.hidden", 65536), ("model.latent_dim", 4096),
    ("train.batch_size", 65536), ("sample.gmm_components", 10_000), ("train.lr", 1e30), ("sample.temperature", 100.0),
])
def test_the_bounds_themselves_are_allowed(key, value):
    assert _get(build_config("default", overrides={key: str(value)}), key) == value


def test_every_number_has_a_range():
    ints_and_floats = [k for k in FIELDS if type(_get(RunConfig(), k)) in (int, float)]
    assert ints_and_floats and all(value_range(k) is not None for k in ints_and_floats)
    assert str(value_range("train.seed")) == "[0, 2^32 - 1]" and str(value_range("train.steps")) == "[1, 10^9]"
    assert str(Range(0, 1, hi_open=True)) == "[0, 1)" and 1 not in Range(0, 1, hi_open=True)


@pytest.mark.parametrize("value", ["2.5e0", "1.5", "3e-1"])
def test_a_whole_number_written_with_a_fraction_is_refused_not_truncated(value):
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        build_config("default", overrides={"train.steps": value})


def test_epochs_convert_to_steps_within_the_range():
    assert steps_for_epochs(1, 60_000, 128) == math.ceil(60_000 / 128)
    assert steps_for_epochs(0.5, 9_000, 64) == math.ceil(0.5 * 9_000 / 64)
    for epochs in (1e308, 1e9):
        with pytest.raises(ConfigError, match=r"--epochs .*train\.steps must be in \[1, 10\^9\]"):
            steps_for_epochs(epochs, 60_000, 128)
    for epochs in (math.inf, math.nan, 0, -1):
        with pytest.raises(ConfigError, match="--epochs: must be a positive finite number"):
            steps_for_epochs(epochs, 60_000, 128)


def test_long_values_are_shortened_in_messages():
    with pytest.raises(ConfigError) as info:
        build_config("default", overrides={"model.arch": "x" * 10_000})
    assert len(str(info.value)) < 200


# ----------------------------------------------------------------------------- TOML files that cannot be read
def test_a_toml_file_that_is_not_utf8_or_a_directory_is_one_line_naming_it(tmp_path):
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('[train]\n# caf\xe9\nlr = 0.1\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml is not UTF-8 text \(byte 0xe9"):
        build_config("default", toml=latin)
    with pytest.raises(ConfigError, match=rf"{tmp_path.name} is a directory"):
        build_config("default", toml=tmp_path)


def test_an_unreadable_toml_file_is_an_output_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "locked.toml"
    path.write_text("[train]\nlr = 0.1\n")
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)  # root reads any file: simulate the permission
    with pytest.raises(OutputError, match=r"cannot read config file .*locked\.toml: Permission denied") as info:
        build_config("default", toml=path)
    assert info.value.exit_code == EXIT_OUTPUT


def test_the_rules_see_the_toml_file_and_the_command_line_together(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nlikelihood = "gaussian"\n')
    cfg = build_config("default", toml=path, overrides={"data.binarize": "none"})
    assert (cfg.model.likelihood, cfg.data.binarize) == ("gaussian", "none")


def test_a_non_string_preset_in_toml_is_an_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("preset = 3\n")
    with pytest.raises(ConfigError, match="preset: expected str"):
        build_config("default", toml=path)


# ----------------------------------------------------------------------------- recorded facts
def test_the_bundled_subset_is_recorded_not_set(tmp_path):
    assert recorded_keys() == {"data.subset"}
    for value in ("true", "false"):
        with pytest.raises(ConfigError, match=r"data\.subset.*recorded by training"):
            build_config("default", overrides={"data.subset": value})
    path = tmp_path / "run.toml"
    path.write_text("[data]\nsubset = true\n")
    with pytest.raises(ConfigError, match=r"data\.subset.*recorded"):
        build_config("default", toml=path)
    ran = preset("default")
    ran.data.subset = True  # what training writes for a run on the bundled subset
    saved = RunConfig.from_dict(json.loads(ran.to_json()))
    assert saved.data.subset is True and json.loads(ran.to_json())["data"]["subset"] is True
    assert diff(preset("default"), saved) == {}  # a resume asks for the same config
    d = ran.to_dict()
    d["data"]["subset"] = "yes"
    with pytest.raises(ConfigError, match=r"data\.subset: expected bool"):
        RunConfig.from_dict(d)


def test_a_run_says_in_its_config_whether_it_trained_on_the_bundled_subset(tiny_run, tmp_path):
    import shutil

    from vaedraw import data
    from vaedraw.train import train

    cfg = RunConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    recorded = json.loads((tiny_run / "data.json").read_text())
    assert cfg.data.subset is recorded["train"]["subset"]
    # the bundled subset copied into a folder is still the subset
    folder = tmp_path / "copied-subset"
    folder.mkdir()
    for split, (images, labels) in data._FILES.items():
        for src, base in zip(data._bundled(split), (images, labels)):
            shutil.copy(src, folder / f"{base}.gz")
    small = build_config("default", overrides={
        "model.conv.channels": "4", "model.conv.hidden": "16", "model.latent_dim": "2", "train.steps": "2",
        "train.batch_size": "16", "train.eval_images": "32", "train.log_every": "1", "train.eval_every": "2",
        "train.picture_every": "2", "train.checkpoint_every": "2", "sample.fit_gmm": "false",
        "sample.sampler": "prior"})
    out = train(small, tmp_path / "run", device="cpu", data_dir=folder, progress=False, argv=["test"])
    assert RunConfig.from_dict(json.loads((out / "config.json").read_text())).data.subset is True
    assert json.loads((out / "data.json").read_text())["train"]["subset"] is True


def test_a_refused_train_command_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    from vaedraw.cli import main

    out = tmp_path / "run"
    for args in (["--preset", "seed", "--set", "model.conv.channels=8"], ["--set", f"train.seed={2**64}"],
                 ["--set", "train.beta1=1"], ["--set", "model.conv.hidden=1000000000"]):
        assert main(["train", "--out", str(out), "--device", "cpu", "--no-progress", *args]) == EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err
        assert not out.exists()

"""Typed run configuration: one dataclass per concern, combined into `RunConfig`.

A preset is a named `RunConfig`. Every field can be overridden by a dotted key (`model.latent_dim=2`),
from the command line (`--set`) or from a TOML file whose tables mirror the sections. Unknown keys and
values of the wrong type are `ConfigError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_VERSION = 1  # bump when a field changes meaning; checkpoints store it


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | fashion-mnist
    binarize: str = "dynamic"  # dynamic (resample x ~ Bernoulli(pixel) each batch) | none (grayscale targets)


@dataclass
class ModelConfig:
    arch: str = "conv"  # seed (the article's network) | conv (ours)
    likelihood: str = "bernoulli"  # bernoulli (decoder logits) | gaussian (the article's squared error)
    latent_dim: int = 16  # size of z
    channels: int = 32  # conv: width of the first conv layer; the second is twice as wide
    hidden: int = 256  # conv: width of the dense layer between the convs and z
    dropout: float = 0.0  # drop probability in training (the article: keep 0.8 -> 0.2)
    n_classes: int = 0  # > 0 makes a conditional VAE: encoder and decoder both see the one-hot label


@dataclass
class TrainConfig:
    steps: int = 6000  # optimizer steps; --epochs converts to steps
    batch_size: int = 128  # images per step (global, over all processes)
    lr: float = 1e-3  # Adam learning rate
    lr_schedule: str = "cosine"  # constant | cosine (decay to lr_min_ratio * lr over the run)
    lr_min_ratio: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    log_every: int = 100  # steps between train-loss read-backs (the only host syncs)
    eval_every: int = 1000  # steps between test-split evaluations (dropout off)
    picture_every: int = 500  # steps between monitoring pictures
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    eval_images: int = 10000  # test images used by the periodic evaluation
    precision: str = "auto"  # auto | fp32 | bf16
    compile: str = "auto"  # auto | on | off


@dataclass
class SampleConfig:
    sampler: str = "gmm"  # prior | gmm (mixture fitted to the encoder means after training)
    temperature: float = 1.0  # prior sampler: z ~ N(0, temperature^2 I)
    gmm_components: int = 100  # mixture size for the gmm sampler (measured: docs/EVALUATION.md, Samplers)
    fit_gmm: bool = True  # fit the gmm sampler at the end of training


@dataclass
class RunConfig:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild a config, refusing unknown keys, wrong types and newer versions."""
        version = d.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r} is newer than this vaedraw understands ({CONFIG_VERSION}); "
                "upgrade vaedraw to load it"
            )
        cfg = cls()
        apply_overrides(cfg, {k: v for k, v in flatten(d).items() if k != "version"}, parse_text=False)
        return cfg


# ----------------------------------------------------------------------------- presets
def _seed() -> RunConfig:
    """The article's model, exactly (see docs/SEED.md): 10,151,489 parameters."""
    return RunConfig(
        preset="seed",
        data=DataConfig(binarize="none"),
        model=ModelConfig(arch="seed", likelihood="gaussian", latent_dim=8, dropout=0.2),
        train=TrainConfig(
            steps=30_000, batch_size=64, lr=5e-4, lr_schedule="constant", log_every=200,
            eval_every=2000, picture_every=200, checkpoint_every=2000,
        ),
        # The mixture measures better than the prior for this model too (docs/RESULTS.md, Quality).
        sample=SampleConfig(sampler="gmm", fit_gmm=True),
    )


def _default() -> RunConfig:
    return RunConfig(preset="default")


def _conditional() -> RunConfig:
    cfg = _default()
    cfg.preset = "conditional"
    cfg.model.n_classes = 10
    return cfg


def _latent2() -> RunConfig:
    """A 2-d latent: the manifold picture is then the model itself."""
    cfg = _default()
    cfg.preset = "latent2"
    cfg.model.latent_dim = 2
    cfg.sample.gmm_components = 20
    return cfg


PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "default": _default,
    "seed": _seed,
    "conditional": _conditional,
    "latent2": _latent2,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("mnist", "fashion-mnist"),
    "data.binarize": ("dynamic", "none"),
    "model.arch": ("seed", "conv"),
    "model.likelihood": ("bernoulli", "gaussian"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.compile": ("auto", "on", "off"),
    "sample.sampler": ("prior", "gmm"),
}

POSITIVE = {
    "model.latent_dim", "model.channels", "model.hidden", "train.steps", "train.batch_size", "train.lr",
    "train.log_every", "train.eval_every", "train.picture_every", "train.checkpoint_every",
    "train.eval_images", "sample.temperature", "sample.gmm_components",
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- overrides
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'latent_dim': 2}} -> {'model.latent_dim': 2}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_type(obj: Any, name: str) -> type:
    hints = typing.get_type_hints(type(obj))
    return hints[name]


def _coerce(key: str, value: Any, typ: Any, parse_text: bool = True) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or raise ConfigError."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        raise ConfigError(f"{key}: union types are not supported")  # none are used
    if isinstance(value, str) and typ is not str and parse_text:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            value = typ(float(text)) if typ is int and "e" in text.lower() else typ(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of: {', '.join(CHOICES[key])}")
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    if typ in (int, float) and value < 0:
        raise ConfigError(f"{key}: must not be negative, got {value!r}")
    if typ is float and value != value:
        raise ConfigError(f"{key}: NaN is not a valid value")
    return value


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], parse_text: bool = True) -> RunConfig:
    """Set dotted keys on `cfg` in place (and return it); unknown keys and bad types raise ConfigError.

    parse_text: values given as text (the command line's --set) are parsed into the field's type; typed
    sources (TOML, JSON) pass False so that a string where a number belongs is an error.
    """
    for key, value in overrides.items():
        if key == "version":  # the format marker: a run saved with another value could not be read back
            raise ConfigError("config key 'version' is the config format version; it cannot be set")
        obj: Any = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                where = ".".join(parts[:i]) or "the config"
                raise ConfigError(f"unknown config key {key!r}: {where} has {', '.join(names)}")
            if i == len(parts) - 1:
                current = getattr(obj, part)
                if dataclasses.is_dataclass(current):
                    raise ConfigError(f"config key {key!r} is a section; set one of its fields")
                setattr(obj, part, _coerce(key, value, _field_type(obj, part), parse_text))
            else:
                obj = getattr(obj, part)
                if not dataclasses.is_dataclass(obj):
                    raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
    _check(cfg)
    return cfg


def _check(cfg: RunConfig) -> None:
    """Cross-field rules."""
    m = cfg.model
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.arch == "seed" and (m.n_classes or m.latent_dim <= 0):
        raise ConfigError("model.arch=seed is the article's unconditional network; set model.n_classes=0")
    if m.likelihood == "gaussian" and cfg.data.binarize != "none":
        raise ConfigError("model.likelihood=gaussian models grayscale pixels; set data.binarize=none")


def parse_set(items: list[str]) -> dict[str, str]:
    """['model.latent_dim=2', ...] -> {'model.latent_dim': '2'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. model.latent_dim=2), got {item!r}")
        out[key.strip()] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML override file into dotted keys; its tables mirror the config sections."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return flatten(data)


def build_config(
    preset_name: str = "default", toml: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Preset, then the TOML file, then explicit overrides (later wins)."""
    flat: dict[str, Any] = load_toml(toml) if toml else {}
    name = flat.pop("preset", preset_name)
    cfg = preset(name)
    apply_overrides(cfg, flat, parse_text=False)  # TOML values carry their own types: "0.1" is a string
    apply_overrides(cfg, overrides or {})
    return cfg


def diff(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: {key: (a_value, b_value)}."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}

"""Typed run configuration: one dataclass per concern, combined into `RunConfig`.

A preset is a named `RunConfig`. Every field can be overridden by a dotted key (`model.latent_dim=2`),
from the command line (`--set`) or from a TOML file whose tables mirror the sections. Unknown keys,
values of the wrong type and numbers outside their range are `ConfigError`s that name the key.

Each field carries its own constraint: `bounded(default, lo, hi)` for a number, `choice(default, module,
registry)` for a name that must be a key of a registry (`models.ARCHS`, `data.DATASETS`, ...), read
when a value is checked, so that a registered architecture or data set is a choice at once.

Options of one architecture live in a section named after it (`model.conv.channels`): setting one
while another architecture is chosen is an error naming the key, and only the chosen architecture's
section is saved. A new architecture adds its options as one more section of `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Bump when a field changes meaning or place; checkpoints store it. 2: conv options moved from
# model.channels / model.hidden into model.conv (version-1 configs are read with the old names).
CONFIG_VERSION = 2


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: lo..hi, each end included unless marked open."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}{')' if self.hi_open else ']'}"


def _number(v: float) -> str:
    """10**9 -> '10^9', 2**32 - 1 -> '2^32 - 1': bounds as a reader writes them."""
    if v == math.inf:
        return "inf"
    if isinstance(v, int) and v >= 10**6:
        if (v + 1) & v == 0:  # one less than a power of two
            return f"2^{v.bit_length()} - 1"
        if str(v).rstrip("0") == "1":
            return f"10^{len(str(v)) - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def bounded(default: float, lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """A numeric field whose values must lie in Range(lo, hi); upper bounds keep a typo from building a
    layer of 10^9 units or a run of 10^18 steps."""
    return field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open)})


def choice(default: str, module: str, registry: str):
    """A name field whose values are the entries of `module.registry` (a dict's keys or a tuple)."""
    return field(default=default, metadata={"choices": (module, registry)})


def recorded(default: Any):
    """A fact training writes down about the run, not something a user asks for: --set and TOML refuse
    it, saved configs keep it, and `diff` ignores it (a resumed run asks for the same config)."""
    return field(default=default, metadata={"recorded": True})


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    # a registered data set: mnist | fashion-mnist | folder (a folder of images) | array (an .npz/.npy file)
    dataset: str = choice("mnist", "vaedraw.data", "DATASETS")
    # dynamic (resample x ~ Bernoulli(pixel) each batch) | none (grayscale targets)
    binarize: str = choice("dynamic", "vaedraw.data.spec", "BINARIZE")
    # folder / array only: side in pixels of the square images (short side resized, centre cropped);
    # 0 = the images' own size, which must then be the same for all
    image_size: int = bounded(0, 0, 4096)
    # folder / array only: 1 (grey) | 3 (RGB) | 0 = the images' own (grey if every image is grey, else RGB)
    channels: int = bounded(0, 0, 3)
    # recorded by training: true when the images were the bundled 9,000 + 1,000-digit subset of MNIST's
    # training set (wherever they were read from), not the full data set; data.json says where from
    subset: bool = recorded(False)


@dataclass
class ConvOptions:
    """Options of model.arch=conv (models.ConvVAE)."""

    channels: int = bounded(32, 1, 4096)  # width of the first conv layer; the second is twice as wide
    hidden: int = bounded(256, 1, 65536)  # width of the dense layer between the convs and z


@dataclass
class HierarchicalOptions:
    """Options of model.arch=hierarchical (models.HierarchicalVAE)."""

    channels: int = bounded(32, 2, 4096)  # feature maps at H/4; H/2 has half as many
    groups: int = bounded(2, 0, 32)  # latent groups at each of the two resolutions (H/4, H/2)
    latent_channels: int = bounded(8, 1, 1024)  # channels of a group at H/4; at H/2 half as many
    hidden: int = bounded(256, 1, 65536)  # the dense layer between the H/4 map and the code


@dataclass
class ModelConfig:
    arch: str = choice("conv", "vaedraw.models", "ARCHS")  # seed (the article's network) | conv (ours)
    # bernoulli (decoder logits) | gaussian (the article's squared error) | logistic_mixture (8-bit pixels,
    # grey or colour: PixelCNN++'s discretized mixture of logistics; needs data.binarize=none)
    likelihood: str = choice("bernoulli", "vaedraw.objectives", "LIKELIHOODS")
    mixture_components: int = bounded(10, 1, 64)  # K of logistic_mixture (PixelCNN++: 10); unused otherwise
    latent_dim: int = bounded(16, 1, 4096)  # size of z
    dropout: float = bounded(0.0, 0.0, 1.0, hi_open=True)  # drop probability in training (the article: 0.2)
    # > 0 makes a conditional VAE: encoder and decoder both see the one-hot label
    n_classes: int = bounded(0, 0, 10_000)
    # Sections named after an architecture hold its options (ARCH_SECTIONS); the others are unused.
    conv: ConvOptions = field(default_factory=ConvOptions)
    hierarchical: HierarchicalOptions = field(default_factory=HierarchicalOptions)


@dataclass
class TrainConfig:
    steps: int = bounded(12_000, 1, 10**9)  # optimizer steps; --epochs converts to steps (steps_for_epochs)
    batch_size: int = bounded(128, 1, 65536)  # images per step (global, over all processes)
    lr: float = bounded(1e-3, 0.0, math.inf, lo_open=True, hi_open=True)  # Adam learning rate
    # constant | cosine (decay to lr_min_ratio * lr over the run)
    lr_schedule: str = choice("cosine", "vaedraw.train", "LR_SCHEDULES")
    lr_min_ratio: float = bounded(0.05, 0.0, 1.0)
    beta1: float = bounded(0.9, 0.0, 1.0, hi_open=True)  # Adam's moment decays: [0, 1)
    beta2: float = bounded(0.999, 0.0, 1.0, hi_open=True)
    eps: float = bounded(1e-8, 0.0, 1.0, lo_open=True)
    # scikit-learn's mixture fit at the end of training takes seeds below 2^32
    seed: int = bounded(0, 0, 2**32 - 1)
    log_every: int = bounded(100, 1, 10**9)  # steps between train-loss read-backs (the only host syncs)
    eval_every: int = bounded(1000, 1, 10**9)  # steps between test-split evaluations (dropout off)
    picture_every: int = bounded(500, 1, 10**9)  # steps between monitoring pictures
    checkpoint_every: int = bounded(1000, 1, 10**9)  # steps between checkpoints (one is always written at the end)
    eval_images: int = bounded(10000, 1, 10**7)  # test images used by the periodic evaluation
    # importance samples per image in the objective: 1 = the ELBO, K > 1 the IWAE bound L_K (Burda et al. 2015)
    iwae_k: int = bounded(1, 1, 4096)
    kl_warmup: int = bounded(0, 0, 10**9)  # steps over which the KL weight rises linearly from 0 to 1 (0 = off)
    grad_clip: float = bounded(0.0, 0.0)  # clip the gradient's global norm to this (0 = off)
    precision: str = choice("auto", "vaedraw.fastpath", "PRECISIONS")  # auto | fp32 | bf16
    compile: str = choice("auto", "vaedraw.fastpath", "COMPILE_MODES")  # auto | on | off
    # auto precision/compile measured on this machine once, then cached (autotune.py); false: fastpath.AUTO
    autotune: bool = True
    # TensorBoard event files in RUN_DIR/tensorboard/ (tracking.py; pip install 'vaedraw[tensorboard]')
    tensorboard: bool = False


@dataclass
class SampleConfig:
    sampler: str = choice("gmm", "vaedraw.sample", "SAMPLERS")  # prior | gmm (mixture fitted to encoder means)
    # prior sampler: z ~ N(0, temperature^2 I); latent groups below the code: mu_p + temperature * sigma_p * eps
    temperature: float = bounded(1.0, 0.0, 100.0, lo_open=True)
    # mixture size for the gmm sampler (measured: docs/EVALUATION.md, Samplers)
    gmm_components: int = bounded(100, 1, 10_000)
    fit_gmm: bool = True  # fit the gmm sampler at the end of training


def _sections(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj) if dataclasses.is_dataclass(getattr(obj, f.name))]


ARCH_SECTIONS: tuple[str, ...] = tuple(_sections(ModelConfig()))  # model.<arch>: that architecture's options

# Old spellings that keep working for one release, with a note.
RENAMED: dict[str, str] = {"model.channels": "model.conv.channels", "model.hidden": "model.conv.hidden"}


@dataclass
class RunConfig:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a deep copy); of the architecture sections only the chosen one's."""
        d = dataclasses.asdict(self)
        for name in ARCH_SECTIONS:
            if name != self.model.arch:
                del d["model"][name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild a saved config, refusing unknown keys, wrong types and newer versions.

        Version-1 configs (config.json and checkpoint headers written before the conv section) spell
        the conv options model.channels / model.hidden, and kept them for every architecture: they are
        read into model.conv for a conv model and dropped for the others, which never used them.
        """
        version = d.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r} is newer than this vaedraw understands ({CONFIG_VERSION}); "
                "upgrade vaedraw to load it"
            )
        flat = {k: v for k, v in flatten(d).items() if k != "version"}
        if any(old in flat for old in RENAMED):
            arch = flat.get("model.arch", ModelConfig().arch)
            for old, new in RENAMED.items():
                if old in flat:
                    value = flat.pop(old)
                    if new.split(".")[1] == arch:
                        flat.setdefault(new, value)
        cfg = cls()
        _check(cfg, _assign(cfg, flat, parse_text=False, saved=True))
        return cfg


# ----------------------------------------------------------------------------- presets
def _seed() -> RunConfig:
    """The article's model, exactly (see docs/SEED_PORT.md): 10,151,489 parameters."""
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


def _hierarchical() -> RunConfig:
    """The top-down hierarchical VAE (models/hierarchical.py) at the CPU budget (docs/RESULTS.md)."""
    return RunConfig(
        preset="hierarchical",
        model=ModelConfig(arch="hierarchical", latent_dim=32),
        train=TrainConfig(steps=6000, kl_warmup=1000, grad_clip=200.0),
        # the mixture on the code, the groups below it at temperature 0.4: the lowest FD measured
        # (docs/RESULTS.md, hierarchical samplers)
        sample=SampleConfig(sampler="gmm", temperature=0.4),
    )


PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "default": _default,
    "hierarchical": _hierarchical,
    "seed": _seed,
    "conditional": _conditional,
    "latent2": _latent2,
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {_show(name)}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- field constraints
def _field(key: str) -> dataclasses.Field:
    """The dataclass field behind a dotted key of RunConfig (KeyError if there is none)."""
    obj: Any = RunConfig()
    *path, name = key.split(".")
    for part in path:
        obj = getattr(obj, part)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    return fields[name]


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a name field (e.g. 'model.arch' -> the names in models.ARCHS), read from
    its registry now: the command line's choices and the config's checks agree by construction."""
    try:
        module, registry = _field(key).metadata["choices"]
    except (KeyError, AttributeError, TypeError):
        raise ConfigError(f"config key {key!r} is not a choice among names") from None
    return tuple(getattr(importlib.import_module(module), registry))


def value_range(key: str) -> Range | None:
    """The allowed values of a numeric field, or None for a key that is not a number."""
    try:
        return _field(key).metadata.get("range")
    except (KeyError, AttributeError, TypeError):
        return None


def choice_keys() -> list[str]:
    """Every dotted key whose value is a name from a registry."""
    return [k for k in flatten(dataclasses.asdict(RunConfig())) if k != "version" and "choices" in _field(k).metadata]


def recorded_keys() -> set[str]:
    """Dotted keys that training records rather than a user sets (data.subset)."""
    keys = flatten(dataclasses.asdict(RunConfig()))
    return {k for k in keys if k != "version" and _field(k).metadata.get("recorded")}


def steps_for_epochs(epochs: float, n_images: int, batch_size: int) -> int:
    """--epochs as optimizer steps: ceil(epochs * n_images / batch_size), within train.steps' range."""
    limit = value_range("train.steps")
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"--epochs: must be a positive finite number, got {_show(epochs)}")
    steps = epochs * n_images / batch_size
    if not steps <= limit.hi:
        raise ConfigError(f"--epochs {epochs:g}: {n_images:,} training images in batches of {batch_size} make "
                          f"{steps:.3g} steps; train.steps must be in {limit}")
    return math.ceil(steps)


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


def _show(value: Any, limit: int = 40) -> str:
    """repr(value), shortened: a message stays one line whatever was typed."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'" if isinstance(value, str) else text[:limit] + "..."


def _field_type(obj: Any, name: str) -> type:
    hints = typing.get_type_hints(type(obj))
    return hints[name]


def _parse_text(key: str, text: str, typ: type) -> Any:
    """A command-line string as an int, float or bool (ints may be written 2e3)."""
    try:
        if typ is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int and any(c in text.lower() for c in ".e"):
            number = float(text)
            if math.isinf(number):
                raise ConfigError(f"{key}: must be in {value_range(key)}, got {_show(text)}")
            if not number.is_integer():
                raise ValueError
            return int(number)
        return typ(text)
    except ValueError:
        digits = text.lstrip("+-")
        if typ is int and digits.isdigit():  # longer than Python converts: out of range whatever the bound
            raise ConfigError(f"{key}: must be in {value_range(key)}, got a number of {len(digits):,} digits") from None
        raise ConfigError(f"{key}: expected {typ.__name__}, got {_show(text)}") from None


def _coerce(key: str, value: Any, typ: Any, parse_text: bool = True) -> Any:
    """Convert a TOML value or a command-line string to the field's type and check it, or raise ConfigError."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        raise ConfigError(f"{key}: union types are not supported")  # none are used
    shown = _show(value)
    if isinstance(value, str) and typ is not str and parse_text:
        text = value.strip()
        shown = text if len(text) <= 40 else text[:37] + "..."  # as typed: 1e308, not its 309 digits
        value = _parse_text(key, text, typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: must be in {value_range(key)}, got {shown}") from None
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {_show(value)}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {shown}")
    limits = value_range(key)
    if limits is not None and value not in limits:
        raise ConfigError(f"{key}: must be in {limits}, got {shown}")
    if typ is str and "choices" in _field(key).metadata:
        allowed = choices(key)
        if value not in allowed:
            raise ConfigError(f"{key}: unknown value {_show(value)}; choose one of: {', '.join(allowed)}")
    return value


def _current_key(key: str, note: bool) -> str:
    if key in RENAMED:
        if note:
            print(f"note: {key} is now {RENAMED[key]}; the old name works in this release only", file=sys.stderr)
        return RENAMED[key]
    return key


def _assign(cfg: RunConfig, overrides: dict[str, Any], parse_text: bool, saved: bool = False) -> set[str]:
    """Set dotted keys on `cfg`; returns the keys set (in their current spelling)."""
    recorded = recorded_keys()
    given: set[str] = set()
    for key, value in overrides.items():
        if key == "version":  # the format marker: a run saved with another value could not be read back
            raise ConfigError("config key 'version' is the config format version; it cannot be set")
        key = _current_key(key, note=not saved)
        if key in recorded and not saved:
            raise ConfigError(f"config key {key!r} is recorded by training (what the run was trained on); "
                              "it cannot be set")
        obj: Any = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                where = ".".join(parts[:i]) or "the config"
                raise ConfigError(f"unknown config key {_show(key)}: {where} has {', '.join(names)}")
            if i == len(parts) - 1:
                current = getattr(obj, part)
                if dataclasses.is_dataclass(current):
                    raise ConfigError(f"config key {key!r} is a section; set one of its fields")
                setattr(obj, part, _coerce(key, value, _field_type(obj, part), parse_text))
            else:
                obj = getattr(obj, part)
                if not dataclasses.is_dataclass(obj):
                    raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        given.add(key)
    return given


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], parse_text: bool = True) -> RunConfig:
    """Set dotted keys on `cfg` in place (and return it); unknown keys and bad values raise ConfigError.

    parse_text: values given as text (the command line's --set) are parsed into the field's type; typed
    sources (TOML, JSON) pass False so that a string where a number belongs is an error.
    """
    _check(cfg, _assign(cfg, overrides, parse_text))
    return cfg


def _check(cfg: RunConfig, given: set[str] = frozenset()) -> None:
    """Cross-field rules; `given` are the keys just set, so that setting another architecture's option
    is an error even at its default value."""
    m = cfg.model
    for name in ARCH_SECTIONS:
        if name == m.arch:
            continue
        section, default = getattr(m, name), type(getattr(m, name))()
        stray = sorted(k for k in given if k.startswith(f"model.{name}.")) or \
            [f"model.{name}.{f.name}" for f in dataclasses.fields(section)
             if getattr(section, f.name) != getattr(default, f.name)]
        if stray:
            raise ConfigError(f"{stray[0]} is an option of model.arch={name}, but this config has model.arch="
                              f"{m.arch}: remove it or set model.arch={name}")
    if m.arch == "seed" and m.n_classes:
        raise ConfigError("model.arch=seed is the article's unconditional network; set model.n_classes=0")
    if m.likelihood == "gaussian" and cfg.data.binarize != "none":
        raise ConfigError("model.likelihood=gaussian models grayscale pixels; set data.binarize=none")
    if m.likelihood == "logistic_mixture" and cfg.data.binarize != "none":
        raise ConfigError("model.likelihood=logistic_mixture models the 8-bit pixels as they are; "
                          "set data.binarize=none")


def parse_set(items: list[str]) -> dict[str, str]:
    """['model.latent_dim=2', ...] -> {'model.latent_dim': '2'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. model.latent_dim=2), got {_show(item)}")
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
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory; pass a TOML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise OutputError(f"cannot read config file {p}: {e.strerror or e}") from None
    return flatten(data)


def build_config(
    preset_name: str = "default", toml: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Preset, then the TOML file, then explicit overrides (later wins); checked once, at the end."""
    flat: dict[str, Any] = load_toml(toml) if toml else {}
    name = flat.pop("preset", preset_name)
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected str, got {type(name).__name__} {_show(name)}")
    cfg = preset(name)
    given = _assign(cfg, flat, parse_text=False)  # TOML values carry their own types: "0.1" is a string
    given |= _assign(cfg, overrides or {}, parse_text=True)
    _dataset_defaults(cfg, given)
    _check(cfg, given)
    return cfg


def _dataset_defaults(cfg: RunConfig, given: set[str]) -> None:
    """The data set's own pixel model (DatasetSpec.likelihood, .binarize: a logistic mixture of 8-bit pixels
    for the user's images) where neither the user nor the preset chose one (the preset left the field at
    its default)."""
    from .data import DATASETS

    spec = DATASETS.get(cfg.data.dataset)
    if spec is None:
        return
    if "model.likelihood" not in given and cfg.model.likelihood == ModelConfig().likelihood:
        cfg.model.likelihood = spec.likelihood
    if "data.binarize" not in given and cfg.data.binarize == DataConfig().binarize:
        cfg.data.binarize = spec.binarize


def diff(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: {key: (a_value, b_value)}. Recorded keys (data.subset) are not
    asked for, so they are not compared; nor are the options of an architecture only one side uses
    (model.arch differs, which says it)."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    skip = recorded_keys()
    return {k: (fa[k], fb[k]) for k in sorted(set(fa) & set(fb)) if k not in skip and fa[k] != fb[k]}

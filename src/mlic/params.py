"""Typed access to `params.yaml`: one place that reads it, checks types and rejects unknown keys.

Each stage asks for the sections it depends on (the same ones `dvc.yaml` lists under
`params:`), so a typo such as `preprocess.imagesize` fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mlic.errors import UserError


class ParamsError(UserError, ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range."""


def _in(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
        hi_open: bool = False) -> Any:
    """A dataclass field whose value must lie in [lo, hi] (an end open when `*_open`)."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _check_ranges(obj: Any, where: str) -> None:
    """Every field with a range holds a value inside it; raise naming the key and the range."""
    for field in dataclasses.fields(obj):
        bounds = field.metadata.get("range")
        value = getattr(obj, field.name)
        if bounds is None or value is None or isinstance(value, str):  # a word ("auto") is no number
            continue
        lo, hi, lo_open, hi_open = bounds
        ok = (lo is None or (value > lo if lo_open else value >= lo)) and (
            hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            raise ParamsError(f"{where}.{field.name}: {value!r} is out of range; allowed: "
                              f"{_range_text(lo, hi, lo_open, hi_open)}")


@dataclasses.dataclass(frozen=True)
class Common:
    seed: int = _in(42, 0)


@dataclasses.dataclass(frozen=True)
class Data:
    labels_csv: str = "data/sample/labels.csv"
    images_dir: str = "data/sample/images"
    format: Literal["onehot", "tags"] = "onehot"
    filename_column: str = "filename"
    tags_column: str = "tags"
    delimiter: str = " "
    classes: list[str] | None = None
    skip_bad_images: bool = False
    max_image_pixels: int = _in(100_000_000, 1)


@dataclasses.dataclass(frozen=True)
class Sample:
    kind: Literal["shapes", "hard"] = "shapes"  # == stages/sample.py GENERATORS (a contract test keeps them equal)
    n_images: int = _in(2000, 10)
    min_size: int = _in(112, 8)
    max_size: int = _in(176, 8)

    def __post_init__(self) -> None:
        if self.max_size < self.min_size:
            raise ParamsError(f"max_size {self.max_size} is below min_size {self.min_size}; raise max_size")


@dataclasses.dataclass(frozen=True)
class Split:
    val_fraction: float = _in(0.15, 0.0, 1.0, lo_open=True, hi_open=True)
    test_fraction: float = _in(0.15, 0.0, 1.0, lo_open=True, hi_open=True)

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ParamsError(f"val_fraction + test_fraction = "
                              f"{self.val_fraction + self.test_fraction:g} leaves nothing to train on; keep it below 1")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    image_size: int = _in(64, 8)
    resize_mode: Literal["squash", "pad", "crop"] = "squash"
    encoding: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = _in(92, 1, 95)
    shard_size: int = _in(512, 1)
    workers: int = _in(2, 0)
    runner: Literal["local", "ray"] = "local"   # == runners.RUNNERS (a contract test keeps them equal)
    ray_address: str | None = None


@dataclasses.dataclass(frozen=True)
class Train:
    # the same names as model.BACKBONES (a contract test keeps them equal)
    backbone: Literal["simple_cnn", "resnet_small", "strided_cnn", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                      "efficientnet_b0", "efficientnetv2_b0", "convnext_tiny", "resnet50", "resnet50_v2",
                      "vgg16", "vgg19"] = "simple_cnn"
    width: int = _in(16, 1)
    pool: Literal["avg", "max", "avgmax", "attention"] = "avg"  # == model.POOLS
    attention_lambda: float = _in(1.0, 0.0)
    weights: str | None = None
    batch_size: int = _in(16, 1)
    epochs: int = _in(80, 1)
    learning_rate: float = _in(0.003, 0.0, lo_open=True)
    weight_decay: float = _in(0.0, 0.0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    dropout: float = _in(0.3, 0.0, 1.0, hi_open=True)
    loss: Literal["bce", "weighted_bce", "focal", "asl"] = "bce"  # == losses.LOSSES
    max_pos_weight: float = _in(10.0, 1.0)
    focal_gamma: float = _in(2.0, 0.0)
    focal_alpha: float = _in(0.25, 0.0, 1.0)
    focal_class_balancing: bool = False
    asl_gamma_neg: float = _in(4.0, 0.0)
    asl_gamma_pos: float = _in(0.0, 0.0)
    asl_margin: float = _in(0.05, 0.0, 1.0, hi_open=True)
    finetune_epochs: int = _in(0, 0)
    finetune_layers: int = _in(20, 0)
    finetune_learning_rate: float = _in(0.0001, 0.0, lo_open=True)
    monitor: str = "val_auc_pr"
    early_stopping_patience: int = _in(12, 0)
    augment_flip: bool = True
    tta_flip: bool = False
    augment_rotation: float = _in(0.05, 0.0, 1.0)
    augment_zoom: float = _in(0.1, 0.0, 1.0, hi_open=True)
    augment_contrast: float = _in(0.1, 0.0, 1.0)
    augment_colour: bool = False
    shuffle_buffer: int = _in(2048, 1)
    repeat_threshold: float = _in(0.2, 0.0, 1.0)
    progressive_scale: float = _in(0.0, 0.0, 1.0, hi_open=True)
    progressive_fraction: float = _in(0.5, 0.0, 1.0, hi_open=True)
    # YAML 1.1 reads unquoted on/off as true/false: both spellings are accepted.
    mixed_precision: Literal["auto", "on", "off"] | bool = "auto"
    jit_compile: Literal["auto", "on", "off"] | bool = "auto"
    deterministic_ops: Literal["auto"] | bool = "auto"
    intra_op_threads: Literal["auto"] | int = _in(0, 0)  # devices.resolve_intra_op_threads; 0: TensorFlow's default
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class Evaluate:
    threshold: float = _in(0.5, 0.0, 1.0)
    batch_size: int = _in(64, 1)


@dataclasses.dataclass(frozen=True)
class Calibrate:
    # the same names as thresholds.STRATEGIES and calibration.TEMPERATURE_MODES (a test keeps them equal)
    strategy: Literal["fbeta", "precision", "global"] = "fbeta"
    beta: float = _in(1.0, 0.0, lo_open=True)
    precision_target: float = _in(0.8, 0.0, 1.0, lo_open=True)
    min_support: int = _in(10, 1)
    default_threshold: float = _in(0.5, 0.0, 1.0)
    temperature: Literal["none", "global", "per_class"] = "global"


# A sweep's name goes into a tag the UI filters on (`tags.mlic.sweep = '...'`: no quotes), the
# run names, and the name of the MLflow experiment that serves as its creation lock (sweep.py);
# `-S tracking.sweep=a,b` would be split by DVC into two sweeps (no commas).
SWEEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,39}")


@dataclasses.dataclass(frozen=True)
class Tracking:
    experiment: str = "mlic"
    uri: str | None = None
    log_model: bool = True
    registered_model: str | None = "mlic"
    champion_metric: str = "val/macro_ap"
    sweep: str | None = None

    def __post_init__(self) -> None:
        if self.sweep is not None and not SWEEP_NAME.fullmatch(self.sweep):
            raise ParamsError(
                f"sweep {self.sweep!r} is not a sweep name; use a letter, then up to 39 letters, digits, "
                "'.', '_' or '-' (e.g. lr-dropout), or null for runs outside a sweep")


# What a searched value may be: Optuna stores these in its database and hands them back as they are.
_CHOICE_TYPES = (type(None), bool, int, float, str)
# `tune.space` may name every train param but these two: the trial budget is tune.epochs, and
# resuming is bookkeeping, not a hyperparameter.
_NOT_SEARCHABLE = {"epochs": "a trial's epochs are tune.epochs (its budget); train.epochs is what the "
                             "applied params train for",
                   "resume": "it is bookkeeping, not a hyperparameter"}


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """One searched param: `float` or `int` in [low, high] (`log`: sampled on a log scale), or
    `categorical` among `choices`."""

    type: Literal["float", "int", "categorical"] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.type is None:
            raise ParamsError("needs `type`: float, int or categorical")
        if self.type == "categorical":
            if self.low is not None or self.high is not None or self.log:
                raise ParamsError("type categorical takes `choices` only, not low/high/log")
            if not self.choices:
                raise ParamsError("type categorical needs a non-empty list `choices`")
            bad = [c for c in self.choices if not isinstance(c, _CHOICE_TYPES)]
            if bad:
                raise ParamsError(f"choice {bad[0]!r} is not a single value (text, number, true/false or null)")
            seen = [repr(c) for c in self.choices]
            dup = sorted({c for c in seen if seen.count(c) > 1})
            if dup:
                raise ParamsError(f"choices repeat {', '.join(dup)}; list each value once")
            return
        if self.choices is not None:
            raise ParamsError(f"type {self.type} takes low and high (and log), not choices")
        if self.low is None or self.high is None:
            raise ParamsError(f"type {self.type} needs both low and high")
        if self.type == "int" and not (isinstance(self.low, int) and isinstance(self.high, int)):
            raise ParamsError(f"type int needs whole-number low and high, got {self.low!r} and {self.high!r}")
        if not self.low < self.high:
            raise ParamsError(f"low {self.low!r} must be below high {self.high!r}")
        if self.log and self.low <= 0:
            raise ParamsError(f"log: true needs low > 0, got {self.low!r}")

    def values_to_check(self) -> list[Any]:
        """Values that stand for all it can give: the ends, and for a float range an inner value
        (so a float range over an integer param is caught); every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "float":
            return [self.low, (self.low + self.high) / 2, self.high]
        return [self.low, self.high]


def _default_space() -> dict[str, dict[str, SearchSpec]]:
    return {"train": {"learning_rate": SearchSpec("float", 0.0005, 0.01, log=True),
                      "dropout": SearchSpec("float", 0.1, 0.5),
                      "batch_size": SearchSpec("categorical", choices=[16, 32])}}


@dataclasses.dataclass(frozen=True)
class Tune:
    enabled: bool = False
    n_trials: int = _in(20, 1)
    timeout_s: float | None = _in(None, 0.0, lo_open=True)
    epochs: int = _in(15, 1)
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = _in(5, 0)
    pruner_warmup_epochs: int = _in(3, 0)
    # {section: {key: spec}}, nested rather than `train.learning_rate:` keys: `dvc exp run -S`
    # splits keys at dots, so only the nested form can be changed from the command line.
    space: dict[str, dict[str, SearchSpec]] = dataclasses.field(default_factory=_default_space)

    def __post_init__(self) -> None:
        import difflib

        for section, specs in self.space.items():
            if section != "train":
                raise ParamsError(f"space.{section}: only train params can be searched (a trial trains on the "
                                  "shards preprocess wrote); compare other settings with `dvc exp run --queue`")
            fields = [f.name for f in dataclasses.fields(Train)]
            for key, spec in specs.items():
                where = f"space.train.{key}"
                if key in _NOT_SEARCHABLE:
                    raise ParamsError(f"{where}: cannot be searched: {_NOT_SEARCHABLE[key]}")
                if key not in fields:
                    close = difflib.get_close_matches(key, fields, n=1)
                    raise ParamsError(f"{where}: train has no param {key!r}"
                                      + (f" (did you mean {close[0]!r}?)" if close else ""))
                for value in spec.values_to_check():
                    try:
                        section_from_dict(Train, {key: value}, "train")
                    except ParamsError as exc:
                        raise ParamsError(f"{where}: {value!r} fails train.{key}'s own check: "
                                          f"{str(exc).removeprefix(f'train.{key}: ')}") from None
        if self.enabled and not any(self.space.values()):
            raise ParamsError("space is empty; name at least one train param to search "
                              "(e.g. space: {train: {dropout: {type: float, low: 0.1, high: 0.5}}})")

    def searched(self) -> list[str]:
        """The searched params as dotted keys, `train.learning_rate`, in the order of params.yaml."""
        return [f"{section}.{key}" for section, specs in self.space.items() for key in specs]


SECTIONS: dict[str, type] = {
    "common": Common,
    "data": Data,
    "sample": Sample,
    "split": Split,
    "preprocess": Preprocess,
    "train": Train,
    "evaluate": Evaluate,
    "calibrate": Calibrate,
    "tracking": Tracking,
    "tune": Tune,
}

T = TypeVar("T")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return `value` coerced to `hint` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = " | ".join(repr(a) for a in args)
            raise ParamsError(f"{where}: {value!r} is not allowed; use one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ParamsError as exc:
                errors.append(str(exc))
        if not errors:
            raise ParamsError(f"{where}: unexpected {value!r}")
        rest = [e.removeprefix(f"{where}: ") for e in errors[1:]]
        raise ParamsError("; or ".join([errors[0], *rest]))
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return {
            _check_type(k, args[0], where): _check_type(v, args[1], f"{where}.{k}")
            for k, v in value.items()
        }
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected text, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return section_from_dict(hint, value, where)
    raise ParamsError(f"{where}: unsupported type {hint!r}")  # pragma: no cover - programming error


def section_from_dict(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ParamsError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
        )
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        obj = cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ParamsError(f"{where}: {exc}") from exc
    except ParamsError as exc:  # a rule across keys (__post_init__)
        raise ParamsError(f"{where}: {exc}") from None
    _check_ranges(obj, where)
    return obj


class _Yaml12Numbers(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and DVC, which writes params.yaml) does.

    PyYAML follows YAML 1.1, where an exponent needs a dot and a signed exponent (`1.0e-5`):
    `1e-05`, which `dvc exp run -S train.learning_rate=0.00001` writes (Python's repr), came back
    as text and was refused as "not a number".
    """


_Yaml12Numbers.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML as params.yaml is read everywhere in mlic: safely, numbers as YAML 1.2 reads them."""
    return yaml.load(text, Loader=_Yaml12Numbers)  # noqa: S506 - a SafeLoader subclass


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml as a plain mapping (used for logging every param)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    unknown = [name for name in raw if name not in SECTIONS]
    if unknown:
        import difflib

        hints = [f"{name!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
            str(name), SECTIONS, n=1)) else "") for name in unknown]
        raise ParamsError(f"{path}: unknown section(s) {', '.join(hints)}; known sections: {', '.join(SECTIONS)}")
    return raw


def load_section(name: str, path: str | Path = "params.yaml", raw: dict[str, Any] | None = None) -> Any:
    """Return section `name` of params.yaml as its typed dataclass."""
    if name not in SECTIONS:
        raise ParamsError(f"unknown params section {name!r}; known: {', '.join(SECTIONS)}")
    raw = read_params_file(path) if raw is None else raw
    return section_from_dict(SECTIONS[name], raw.get(name), f"{path}: {name}")


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to dotted keys: {'train': {'lr': 0.1}} -> {'train.lr': 0.1}."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out

"""Typed access to `params.yaml`: one place that reads it, checks types and rejects unknown keys.

Each stage asks for the sections it depends on (the same ones `dvc.yaml` lists under
`params:`), so a typo such as `preprocess.imagesize` fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ParamsError(ValueError):
    """A value in params.yaml is missing, unknown or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Common:
    seed: int = 42


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


@dataclasses.dataclass(frozen=True)
class Sample:
    n_images: int = 2000
    min_size: int = 112
    max_size: int = 176


@dataclasses.dataclass(frozen=True)
class Split:
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclasses.dataclass(frozen=True)
class Preprocess:
    image_size: int = 64
    resize_mode: Literal["squash", "pad", "crop"] = "pad"
    encoding: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 92
    shard_size: int = 512
    workers: int = 2


@dataclasses.dataclass(frozen=True)
class Train:
    backbone: Literal["simple_cnn", "mobilenet_v2", "efficientnet_b0", "resnet50", "vgg16", "vgg19"] = "simple_cnn"
    weights: str | None = None
    batch_size: int = 32
    epochs: int = 40
    learning_rate: float = 0.003
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    dropout: float = 0.3
    pos_weight: bool = False
    max_pos_weight: float = 10.0
    finetune_epochs: int = 0
    finetune_layers: int = 20
    finetune_learning_rate: float = 0.0001
    monitor: str = "val_auc_pr"
    early_stopping_patience: int = 8
    augment_flip: bool = True
    augment_rotation: float = 0.05
    augment_zoom: float = 0.1
    augment_contrast: float = 0.1
    shuffle_buffer: int = 2048
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    deterministic_ops: bool = True


@dataclasses.dataclass(frozen=True)
class Evaluate:
    threshold: float = 0.5
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class Calibrate:
    beta: float = 1.0
    default_threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class Tracking:
    experiment: str = "mlic"
    uri: str | None = None
    log_model: bool = True
    registered_model: str | None = "mlic"
    champion_metric: str = "val/macro_ap"


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
        raise ParamsError(errors[0] if errors else f"{where}: unexpected {value!r}")
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
            hint_1e = " (write 0.001, not 1e-3: YAML reads 1e-3 as text)" if isinstance(value, str) else ""
            raise ParamsError(f"{where}: expected a number, got {value!r}{hint_1e}")
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
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ParamsError(f"{where}: {exc}") from exc


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml as a plain mapping (used for logging every param)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
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

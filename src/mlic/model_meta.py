"""`model_meta.json`: everything a caller needs to turn image files into the model's answer.

Written by `train` beside `model.keras`, read by `mlic predict` and packed into the MLflow model.
It says which classes the output columns are, how an image file becomes the input (image size,
resize mode, and the encoding and JPEG quality of the training shards, all of which the
prediction path repeats through `images.prepare`), and where the calibrated decision
thresholds come from. No TensorFlow here: reading it is instant.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mlic.atomic import read_json, write_json
from mlic.errors import InputError
from mlic.images import RESIZE_MODES

FORMAT_VERSION = 1
INPUT = ("float32 RGB 0..255, shape (image_size, image_size, 3): tfrecords.decode_pixels("
         "images.prepare(file, image_size, resize_mode, encoding, jpeg_quality))")
OUTPUT = "sigmoid probability per class, in `classes` order"


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """The provenance and input contract of one trained model."""

    classes: list[str]            # output columns, in order
    image_size: int               # square side fed to the model
    resize_mode: str              # squash | pad | crop, as preprocess resized the training images
    encoding: str                 # jpeg | png: how the training shards stored the resized pixels
    jpeg_quality: int | None      # of those shards, when jpeg
    thresholds: str               # where the calibrated per-class thresholds are (relative to the project root)
    backbone: str
    seed: int
    train: dict[str, Any]         # the resolved `train` params
    data_fingerprints: dict[str, str]  # split -> fingerprint of the shards the model saw
    parameters: int | None = None  # weights in the model (trainable or not)
    input: str = INPUT
    output: str = OUTPUT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"model meta: classes must be unique and non-empty, got {self.classes}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"model meta: resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.image_size < 1:
            raise ValueError(f"model meta: image_size must be positive, got {self.image_size}")

    @classmethod
    def read(cls, path: str | Path) -> "ModelMeta":
        """Read and check a `model_meta.json`; a clear error names the file and what to do."""
        path = Path(path)
        raw = read_json(path, "model metadata", "run `dvc repro train`")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(raw, dict) or not required <= set(raw):
            missing = sorted(required - set(raw)) if isinstance(raw, dict) else sorted(required)
            raise InputError(f"{path}: model metadata lacks {', '.join(missing)}; it was written by an "
                             "older mlic: run `dvc repro train`")
        if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise InputError(f"{path}: written by a newer mlic (format {raw['format_version']}); upgrade mlic")
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        """Write atomically, keys sorted (stable bytes for DVC)."""
        write_json(path, self.to_dict())

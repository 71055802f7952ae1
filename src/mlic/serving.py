"""The packaged model: an MLflow pyfunc that takes image files and answers labels + probabilities.

Input: a pandas DataFrame with a column `image` holding base64-encoded image *file bytes* (JPEG,
PNG, any size or mode). Output: one row per image, `labels` (class names at the calibrated
thresholds) and one `prob_<class>` column per class. The model's artifacts are the `.keras`
file, `thresholds.json` and `model_meta.json`; mlic's own package is shipped with it as code
(`code/mlic`), so it loads in any interpreter that has its pip requirements, whatever the
backbone (the ImageNet preprocessing layers are mlic's), and turns image files into pixels
exactly as preprocess and the TFRecord reader did (`inference.Predictor`).

Besides `tracking.py`, the only module that imports mlflow: this class *is* an MLflow model.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import types
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from mlic.errors import UserError
from mlic.inference import LABELS_COLUMN, PROB_PREFIX, output_frame

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
ARTIFACT_KERAS = "keras_model"
ARTIFACT_META = "model_meta"
ARTIFACT_THRESHOLDS = "thresholds"
ARTIFACT_SUMMARY = "model_summary"
# In the model_config: data.max_image_pixels of the packaging run. MLflow also logs a model_config
# as run params: under this name it is the very param the run already holds, with the same value.
MAX_PIXELS_KEY = "data.max_image_pixels"
# What the packaged model imports, pinned to the versions it was built and tested with.
REQUIREMENTS = ("tensorflow", "keras", "numpy", "pandas", "pillow", "scikit-learn", "mlflow")


class InvalidImages(UserError, ValueError):
    """Some rows of the input are not images; the message names each row and why."""


def decode_base64_column(values: Sequence[Any]) -> tuple[list[bytes | None], dict[int, str]]:
    """base64 text (or raw bytes) per row -> file bytes; rows that are neither are reported."""
    out: list[bytes | None] = []
    errors: dict[int, str] = {}
    for i, value in enumerate(values):
        if isinstance(value, (bytes, bytearray)):
            out.append(bytes(value))
            continue
        if not isinstance(value, str) or not value.strip():
            out.append(None)
            errors[i] = f"expected base64 text of an image file, got {type(value).__name__}"
            continue
        try:
            # Line breaks are dropped first: `base64` wraps its output at 76 characters by default.
            out.append(base64.b64decode("".join(value.split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            out.append(None)
            errors[i] = f"not valid base64 ({exc})"
    return out, errors


class MlicModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around `inference.Predictor` (built in `load_context` from the artifacts)."""

    # The model is logged with an explicit signature (base64 text in, labels + probabilities out).
    # MLflow 3 would otherwise wrap `predict` for type-hint validation, find none, and warn at
    # import that hints should be added; a hint would replace the explicit signature.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from mlic.inference import DEFAULT_MAX_PIXELS, Predictor

        config = getattr(context, "model_config", None) or {}
        self.predictor = Predictor.from_files(context.artifacts[ARTIFACT_KERAS], context.artifacts[ARTIFACT_META],
                                              context.artifacts[ARTIFACT_THRESHOLDS],
                                              int(config.get(MAX_PIXELS_KEY, DEFAULT_MAX_PIXELS)))

    # model_input is left unannotated on purpose: MLflow 3 reads a type hint there as a schema and
    # would override the explicit signature logged with the model.
    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """DataFrame with column `image` (base64 file bytes) -> `labels` + `prob_<class>` per row.

        Raises an MlflowException (HTTP 400 when served) naming every row that is not an image.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.predict_frame(model_input)
        except InvalidImages as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def predict_frame(self, model_input: Any) -> pd.DataFrame:
        """`predict` without MLflow's error type: raises InvalidImages."""
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise InvalidImages(f"expected a DataFrame with a column {IMAGE_COLUMN!r} of base64-encoded image "
                                f"files; got {got}")
        if len(model_input) == 0:
            raise InvalidImages(f"the request holds no images: send one row per image file, its bytes "
                                f"base64-encoded, in column {IMAGE_COLUMN!r}")
        files, errors = decode_base64_column(model_input[IMAGE_COLUMN].tolist())
        readable = [i for i, f in enumerate(files) if f is not None]
        result = self.predictor.predict([files[i] for i in readable])
        errors.update({readable[j]: reason for j, reason in result.errors.items()})
        if errors:
            rows = "; ".join(f"row {i}: {reason}" for i, reason in sorted(errors.items()))
            raise InvalidImages(f"{len(errors)} of {len(files)} row(s) are not readable images ({rows}); "
                                f"send each image file's bytes, base64-encoded, in column {IMAGE_COLUMN!r}")
        return output_frame(self.predictor.classes, result.labels, result.probabilities)


def signature(classes: Sequence[str]) -> Any:
    """Input: `image` (base64 string). Output: `labels` (list of strings), `prob_<class>` (double)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.string, IMAGE_COLUMN)])
    outputs = Schema([ColSpec(Array(DataType.string), LABELS_COLUMN),
                      *[ColSpec(DataType.double, f"{PROB_PREFIX}{c}") for c in classes]])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(image_size: int) -> pd.DataFrame:
    """One small PNG (not the model's size, so the example shows any size is accepted)."""
    import io

    from PIL import Image

    side = max(8, image_size // 2 + 3)
    gradient = np.linspace(0, 255, side * side * 3).astype(np.uint8).reshape(side, side, 3)
    buf = io.BytesIO()
    Image.fromarray(gradient, "RGB").save(buf, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buf.getvalue()).decode("ascii")]})


def pip_requirements() -> list[str]:
    """The packages the model needs, at the versions installed here."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def _package_files(keras_path: Path, meta_path: Path, thresholds_path: Path,
                   summary_path: Path | None = None) -> Iterator[tuple[dict[str, str], str]]:
    """(artifacts, code dir) staged in a temp folder: mlic's source without caches, and the summary.

    `summary_path` is the summary `train` wrote; without it the model is loaded to make one
    (TensorFlow's import: seconds).
    """
    import mlic

    with tempfile.TemporaryDirectory(prefix="mlic-package-") as tmp:
        code = Path(tmp) / "mlic"
        shutil.copytree(Path(mlic.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # MLmodel records each artifact's path as given (`uri:`): the pipeline's own, project-relative
        # paths say where a file came from; a temp folder's would be a dead path of this machine.
        if summary_path is not None:
            summary = summary_path
        else:
            from mlic.model import load_model, summary_text

            summary = Path(tmp) / "model_summary.txt"
            summary.write_text(summary_text(load_model(keras_path)), encoding="utf-8")
        artifacts = {ARTIFACT_KERAS: str(keras_path), ARTIFACT_META: str(meta_path),
                     ARTIFACT_THRESHOLDS: str(thresholds_path), ARTIFACT_SUMMARY: str(summary)}
        yield artifacts, str(code)


def _model_kwargs(meta_path: Path, max_pixels: int | None) -> dict[str, Any]:
    from mlic.model_meta import ModelMeta

    meta = ModelMeta.read(meta_path)
    # The model's own settings beside its artifacts: MLflow hands them to load_context.
    config = {MAX_PIXELS_KEY: int(max_pixels)} if max_pixels is not None else None
    return dict(python_model=MlicModel(), signature=signature(meta.classes), model_config=config,
                input_example=input_example(meta.image_size), pip_requirements=pip_requirements())


def save_packaged_model(path: str | Path, keras_path: str | Path, meta_path: str | Path,
                        thresholds_path: str | Path, max_image_pixels: int | None = None) -> Path:
    """Write the pyfunc model to a local folder (`mlflow models serve -m <folder>` serves it).
    `max_image_pixels`: larger images are refused (None: data.max_image_pixels's default)."""
    keras_path, meta_path, thresholds_path = Path(keras_path), Path(meta_path), Path(thresholds_path)
    with _package_files(keras_path, meta_path, thresholds_path) as (artifacts, code):
        mlflow.pyfunc.save_model(str(path), artifacts=artifacts, code_paths=[code],
                                 **_model_kwargs(meta_path, max_image_pixels))
    return Path(path)


# MLflow's console lines while the model is logged and registered that mlic hides: by logger,
# a fragment of the message. Only these; MLflow's warnings and any other line still show.
_HIDDEN_LOG = {"mlflow.pyfunc": (
    # its advice against pickling `python_model`: MlicModel holds no state (its artifacts are
    # files), and models-from-code would ship the same code without the pickle
    "`python_model` causes it to be serialized using CloudPickle",
    # an INFO line per `track` about a check that passes (the signature is mlic's own)
    "Validating input example against model signature",
)}
# Printed, not logged, by mlflow.tracking._model_registry.fluent (its `eprint`), so no logger
# level or filter reaches them; `track` says the same in its own line ("registered mlic version 3").
_HIDDEN_PRINT = re.compile(r"Successfully registered model '.*'\.|Created version '\d+' of model '.*'\."
                           r"|Registered model '.*' already exists\. Creating a new version of this model\.\.\.")


class _Hide(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide `_HIDDEN_LOG` and `_HIDDEN_PRINT` for the duration, then put everything back."""
    from mlflow.tracking._model_registry import fluent

    filters = [(logging.getLogger(name), _Hide(fragments)) for name, fragments in _HIDDEN_LOG.items()]
    printed = getattr(fluent, "eprint", None)  # if a later MLflow drops it, its lines show again

    def eprint(*args: Any, **kwargs: Any) -> None:
        if not _HIDDEN_PRINT.fullmatch(" ".join(map(str, args))):
            printed(*args, **kwargs)

    for logger, hide in filters:
        logger.addFilter(hide)
    if printed is not None:
        fluent.eprint = eprint
    try:
        yield
    finally:
        for logger, hide in filters:
            logger.removeFilter(hide)
        if printed is not None:
            fluent.eprint = printed


def _save_pyfunc(validate_serving_input: bool = True, **kwargs: Any) -> Any:
    return mlflow.pyfunc.save_model(**kwargs)


# mlflow.pyfunc as a `Model.log` flavor ("a module with save_model", per its docs).
_PYFUNC_FLAVOR = types.SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


def log_packaged_model(keras_path: str | Path, meta_path: str | Path, thresholds_path: str | Path, *,
                       name: str, registered_model_name: str | None = None, summary_path: str | Path | None = None,
                       params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
                       max_image_pixels: int | None = None) -> Any:
    """Log the pyfunc model into the active run (and register it); returns MLflow's ModelInfo.
    `max_image_pixels`: the served model refuses larger images (None: data.max_image_pixels's default).

    MLflow's check that serves the input example through the freshly saved model is skipped:
    it imports TensorFlow and loads the model (~5 s of every `track`), and the same path is
    tested (tests/test_tracking.py loads the logged model back and compares its predictions,
    the end-to-end test serves it). The input example is still saved with the model.
    MLflow's lines about the registration and a few known ones are hidden (`_quiet_mlflow`):
    the caller says what happened ("registered mlic version 3").
    """
    from mlflow.models import Model

    keras_path, meta_path, thresholds_path = Path(keras_path), Path(meta_path), Path(thresholds_path)
    with _package_files(keras_path, meta_path, thresholds_path,
                        Path(summary_path) if summary_path else None) as (artifacts, code):
        # Model.log is what mlflow.pyfunc.log_model calls; only it takes validate_serving_input, and
        # it hands its extra arguments on to the flavor's save_model, so the flavor drops it.
        with _quiet_mlflow():
            return Model.log(artifact_path=None, name=name, flavor=_PYFUNC_FLAVOR, artifacts=artifacts,
                             code_paths=[code], registered_model_name=registered_model_name, params=params,
                             tags=tags, validate_serving_input=False, **_model_kwargs(meta_path, max_image_pixels))


def register_model(model_uri: str, name: str) -> str:
    """Register the logged model `model_uri` as a new version of `name`; returns the version.
    MLflow's own lines about it are hidden (`_quiet_mlflow`): the caller says what happened."""
    with _quiet_mlflow():
        return str(mlflow.register_model(model_uri, name).version)


def request_body(images_base64: Sequence[str]) -> bytes:
    """The JSON a client POSTs to `/invocations`: one row per base64 image file, column `image`."""
    return json.dumps({"dataframe_split": {"columns": [IMAGE_COLUMN],
                                           "data": [[v] for v in images_base64]}}).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class Server:
    url: str                        # http://127.0.0.1:<port>
    process: subprocess.Popen       # `mlflow models serve`, leader of its own process group


@contextmanager
def model_server(model_uri: str, *, cwd: str | Path, env: dict[str, str], log_path: str | Path,
                 timeout_s: float = 240.0) -> Iterator[Server]:
    """Run `mlflow models serve -m <model_uri> --env-manager local -w 1` on a free loopback port.

    Yields once GET /ping answers 200 (RuntimeError with the log's tail if the server exits or
    does not answer within `timeout_s`). On exit the server and its uvicorn worker are stopped
    through its process group (SIGTERM, then SIGKILL after 30 s). For tests and benchmarks.
    """
    with socket.socket() as sock:  # a port that is free right now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("mlflow", path=env.get("PATH"))
    cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
    cmd += ["models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
            "-w", "1"]
    log_path = Path(log_path)
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        server = Server(f"http://127.0.0.1:{port}", process)
        try:
            deadline = time.monotonic() + timeout_s
            while not _pings(server.url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`{' '.join(cmd)}` did not start (exit {process.poll()}):\n"
                                       + log_path.read_text(encoding="utf-8", errors="replace")[-3000:])
                time.sleep(0.5)
            yield server
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def _pings(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


_RUN_URI = re.compile(r"runs:/([0-9a-f]{32})/?")


def resolve_model_uri(model_uri: str) -> str:
    """`runs:/<run id>` (no model name) -> `models:/<id of the model that run logged>`; other URIs
    as given. Each run names its logged model after itself, so its id is all a user needs."""
    match = _RUN_URI.fullmatch(model_uri)
    if match is None:
        return model_uri
    experiment = mlflow.MlflowClient().get_run(match.group(1)).info.experiment_id
    found = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                        filter_string=f"source_run_id = '{match.group(1)}'")
    if len(found) != 1:
        from mlic.errors import InputError

        raise InputError(f"{model_uri}: that run logged {len(found)} models; give its model URI "
                         "(models:/<model id>, or models:/<name>@champion)")
    return f"models:/{found[0].model_id}"


def load_predictor(model_uri: str, tracking_uri: str | None = None) -> Any:
    """The `inference.Predictor` inside a packaged model (`runs:/<run id>`, `runs:/<run id>/<name>`,
    `models:/...`, a local folder)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(resolve_model_uri(model_uri))
    return model.unwrap_python_model().predictor

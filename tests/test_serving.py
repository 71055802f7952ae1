"""The packaged MLflow model: base64 image files in, labels + probabilities out, loadable anywhere."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlic import serving
from mlic.inference import Predictor

ROOT = Path(__file__).resolve().parents[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def package(model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("package") / "model"
    return serving.save_packaged_model(out, model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                       model_dir.thresholds)


@pytest.fixture(scope="module")
def loaded(package: Path):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(package))


def test_package_holds_model_thresholds_metadata_summary_and_code(package: Path) -> None:
    files = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    for name in ("MLmodel", "input_example.json", "serving_input_example.json", "requirements.txt",
                 "artifacts/model.keras", "artifacts/model_meta.json", "artifacts/thresholds.json",
                 "artifacts/model_summary.txt", "code/mlic/images.py", "code/mlic/inference.py"):
        assert name in files, (name, sorted(files))
    assert not any("__pycache__" in f for f in files)
    requirements = (package / "requirements.txt").read_text()
    for name in ("tensorflow==", "keras==", "pillow==", "pandas==", "scikit-learn==", "mlflow=="):
        assert name in requirements, requirements
    assert "Total params" in (package / "artifacts/model_summary.txt").read_text()


def test_signature_is_image_in_labels_and_probabilities_out(loaded, model_dir) -> None:
    sig = loaded.metadata.signature
    assert sig.inputs.input_names() == ["image"]
    assert sig.outputs.input_names() == ["labels", *(f"prob_{c}" for c in model_dir.classes)]


def test_predicts_like_the_predictor_on_the_same_files(loaded, model_dir, predict_images) -> None:
    paths = [predict_images.images_dir / f for f in predict_images.filenames]
    frame = loaded.predict(pd.DataFrame({"image": [b64(p.read_bytes()) for p in paths]}))
    direct = Predictor.from_files(model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                  model_dir.thresholds).predict([str(p) for p in paths])
    assert list(frame.columns) == ["labels", *(f"prob_{c}" for c in model_dir.classes)]
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), direct.probabilities, atol=1e-6)
    assert [list(x) for x in frame["labels"]] == direct.labels


def test_a_model_built_for_progressive_resizing_packages_and_predicts_like_the_predictor(
        tmp_path: Path, predict_images) -> None:
    # Its backbone takes any side (the small epochs' view shares it); what is saved, packaged and
    # served is the full-size model, so every route gives the predictor's answer.
    import mlflow.pyfunc

    from conftest import make_model_dir

    md = make_model_dir(tmp_path / "prog", backbone="strided_cnn", image_size=64, any_size=True)
    package = serving.save_packaged_model(tmp_path / "pkg", md.models / "model.keras",
                                          md.models / "model_meta.json", md.thresholds)
    paths = [predict_images.images_dir / f for f in predict_images.filenames]
    frame = mlflow.pyfunc.load_model(str(package)).predict(pd.DataFrame({"image": [b64(p.read_bytes()) for p in paths]}))
    direct = Predictor.from_files(md.models / "model.keras", md.models / "model_meta.json",
                                  md.thresholds).predict([str(p) for p in paths])
    assert direct.probabilities.std() > 0  # not a constant answer
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), direct.probabilities, atol=1e-6)
    assert [list(x) for x in frame["labels"]] == direct.labels


def test_rows_that_are_not_images_are_named_in_the_error(loaded, predict_images) -> None:
    from mlflow.exceptions import MlflowException

    good = b64((predict_images.images_dir / predict_images.filenames[0]).read_bytes())
    frame = pd.DataFrame({"image": [good, b64(b"plain text, not an image"), "%%% not base64 %%%"]})
    with pytest.raises(MlflowException) as info:
        loaded.predict(frame)
    message = info.value.message
    assert "row 1: not an image file" in message and "row 2: not valid base64" in message
    assert "row 0" not in message
    assert info.value.get_http_status_code() == 400


def test_input_example_is_an_image_file_in_base64(package: Path) -> None:
    example = json.loads((package / "input_example.json").read_text())
    data = base64.b64decode(example["data"][0][0])
    assert Image.open(io.BytesIO(data)).format == "PNG"


# The interpreter below never imports mlic: the installed package is blocked outright, so only the
# copy shipped inside the model (code/mlic) can serve. vgg16 needs mlic's ImageNet layer to load.
_NO_MLIC = textwrap.dedent("""
    import base64, io, json, sys
    model_dir = sys.argv[1]

    class BlockInstalledMlic:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] != "mlic":
                return None
            if any(entry.startswith(model_dir) for entry in sys.path):
                return None  # MLflow has put the model's own code first on sys.path
            raise ImportError("the installed mlic is blocked in this test")

    sys.meta_path.insert(0, BlockInstalledMlic())
    import mlflow.pyfunc, numpy as np, pandas as pd
    from PIL import Image

    model = mlflow.pyfunc.load_model(model_dir)
    rng = np.random.default_rng(0)
    files = []
    for size, mode, fmt in [((50, 70), "RGB", "JPEG"), ((90, 20), "L", "PNG")]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size[::-1] + ((3,) if mode == "RGB" else ()), dtype=np.uint8),
                        mode).save(buf, format=fmt)
        files.append(base64.b64encode(buf.getvalue()).decode())
    out = model.predict(pd.DataFrame({"image": files}))
    print(json.dumps({"columns": list(out.columns), "rows": len(out),
                      "mlic_from": sys.modules["mlic"].__file__,
                      "imported_installed": any(m.__file__ and "/src/mlic/" in m.__file__
                                                for n, m in list(sys.modules.items()) if n.startswith("mlic"))}))
""")


def test_vgg16_package_loads_and_predicts_without_the_installed_mlic(tmp_path: Path) -> None:
    from conftest import make_model_dir

    md = make_model_dir(tmp_path / "vgg", backbone="vgg16", image_size=32, classes=("a", "b", "c"))
    package = serving.save_packaged_model(tmp_path / "pkg", md.models / "model.keras",
                                          md.models / "model_meta.json", md.thresholds)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", _NO_MLIC, str(package)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["columns"] == ["labels", "prob_a", "prob_b", "prob_c"] and report["rows"] == 2
    assert report["mlic_from"].startswith(str(package))
    assert not report["imported_installed"]


def test_base64_with_line_breaks_and_raw_bytes_are_accepted() -> None:
    wrapped = base64.encodebytes(b"\x89PNG" + bytes(100)).decode()  # 76-character lines, as `base64` prints
    files, errors = serving.decode_base64_column([wrapped, b"raw", None, ""])
    assert files[0] == b"\x89PNG" + bytes(100) and files[1] == b"raw"
    assert sorted(errors) == [2, 3] and "got NoneType" in errors[2]


def test_logging_skips_mlflows_serving_check_and_keeps_the_example(model_dir, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`track` must not pay for MLflow's load-and-serve check (TensorFlow's import); the example stays."""
    import mlflow
    import mlflow.models.utils

    from mlic.serving import log_packaged_model

    def refuse(*args, **kwargs):
        raise AssertionError("MLflow's serving-input check ran")

    monkeypatch.setattr(mlflow.models.utils, "_validate_serving_input", refuse)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    try:
        with mlflow.start_run():
            info = log_packaged_model(model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                      model_dir.thresholds, name="model")
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
        assert (local / "serving_input_example.json").is_file()
    finally:
        mlflow.set_tracking_uri(None)


MLFLOW_CHATTER = ("Validating input example", "Successfully registered model", "already exists. Creating a new version",
                  "Created version", "serialized using CloudPickle")


def test_logging_and_registering_hides_mlflows_chatter(model_dir, tmp_path: Path, capsys) -> None:
    """What `track` printed per run; `track` logs "registered <name> version N" itself."""
    import mlflow

    from mlic.serving import log_packaged_model

    mlflow_log = logging.getLogger("mlflow")
    level = mlflow_log.level
    mlflow_log.setLevel(logging.INFO)       # MLflow's default (MLFLOW_LOGGING_LEVEL), whatever the env says
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    try:
        capsys.readouterr()
        versions = []
        for _ in range(2):                  # a new registered model, then a new version of it
            with mlflow.start_run():
                info = log_packaged_model(model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                          model_dir.thresholds, name="model", registered_model_name="quiet")
            versions.append(info.registered_model_version)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow_log.setLevel(level)
    assert versions == [1, 2]
    out = capsys.readouterr()
    for line in MLFLOW_CHATTER:
        assert line not in out.err + out.out


def test_only_the_named_mlflow_lines_are_hidden_and_only_for_the_call(capsys) -> None:
    from mlflow.tracking._model_registry import fluent

    printed, pyfunc_log = fluent.eprint, logging.getLogger("mlflow.pyfunc")
    filters = list(pyfunc_log.filters)
    with serving._quiet_mlflow():
        fluent.eprint("Created version '3' of model 'mlic'.")
        fluent.eprint("Registered model 'mlic' already exists. Creating a new version of this model...")
        fluent.eprint("Staging model mlic version 3 for Databricks Model Serving...")
        pyfunc_log.info("Validating input example against model signature")
        pyfunc_log.warning("a warning MLflow has for the user")
    assert fluent.eprint is printed and pyfunc_log.filters == filters
    fluent.eprint("Created version '4' of model 'mlic'.")
    err = capsys.readouterr().err
    assert "Staging model mlic version 3" in err and "a warning MLflow has for the user" in err
    assert "version '3'" not in err and "already exists" not in err and "Validating" not in err
    assert "Created version '4' of model 'mlic'." in err


def test_the_packaged_model_applies_calibrates_temperature(model_dir, predict_images, loaded,
                                                          tmp_path: Path) -> None:
    import mlflow.pyfunc

    from mlic.calibration import Calibration

    temps = np.array([0.5, 1.0, 2.0, 3.0])
    cal = Calibration(model_dir.classes, np.full(4, 0.4), temps, ["fbeta"] * 4, "fbeta")
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps(cal.to_dict()), encoding="utf-8")
    out = serving.save_packaged_model(tmp_path / "model", model_dir.models / "model.keras",
                                      model_dir.models / "model_meta.json", thresholds)
    frame = pd.DataFrame({"image": [b64((predict_images.images_dir / f).read_bytes())
                                    for f in predict_images.filenames[:6]]})
    raw = loaded.predict(frame).iloc[:, 1:].to_numpy()           # the package without a temperature
    got = mlflow.pyfunc.load_model(str(out)).predict(frame)
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), cal.probabilities(raw), atol=1e-12)
    assert [list(x) for x in got["labels"]] == [[c for c, q in zip(model_dir.classes, row) if q >= 0.4]
                                                for row in cal.probabilities(raw)]


def test_an_empty_request_gets_mlics_own_error(loaded) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as info:
        loaded.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))
    assert "the request holds no images" in info.value.message and "'image'" in info.value.message
    assert info.value.get_http_status_code() == 400


def test_the_packaged_model_refuses_images_over_its_runs_max_image_pixels(model_dir, predict_images,
                                                                         tmp_path: Path) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from PIL import Image

    from mlic.inference import DEFAULT_MAX_PIXELS

    out = serving.save_packaged_model(tmp_path / "model", model_dir.models / "model.keras",
                                      model_dir.models / "model_meta.json", model_dir.thresholds,
                                      max_image_pixels=300 * 200 - 1)
    model = mlflow.pyfunc.load_model(str(out))
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    good = b64((predict_images.images_dir / predict_images.filenames[0]).read_bytes())
    with pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame({"image": [good, b64(big.read_bytes())]}))
    assert "row 1: too many pixels (300x200" in info.value.message and "row 0" not in info.value.message
    assert model.unwrap_python_model().predictor.max_pixels == 300 * 200 - 1
    assert "data.max_image_pixels: 59999" in (out / "MLmodel").read_text()
    # A package from before the limit travelled with it: data.max_image_pixels's default.
    old = serving.save_packaged_model(tmp_path / "old", model_dir.models / "model.keras",
                                      model_dir.models / "model_meta.json", model_dir.thresholds)
    assert "max_image_pixels" not in (old / "MLmodel").read_text()
    assert mlflow.pyfunc.load_model(str(old)).unwrap_python_model().predictor.max_pixels == DEFAULT_MAX_PIXELS

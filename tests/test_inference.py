"""The one prediction path: image files -> the same pixels as preprocess -> batched model -> labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_shards

from mlic import images
from mlic.inference import Predictor, read_thresholds
from mlic.model_meta import ModelMeta
from mlic.predictions import round_probabilities


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_files(model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                model_dir.thresholds)


def _reference(predictor: Predictor, paths: list[Path]) -> np.ndarray:
    """What the model says on the preprocess pixels of each file, one image at a time."""
    meta = predictor.meta
    x = np.stack([images.to_array(p, meta.image_size, meta.resize_mode) for p in paths]).astype(np.float32)
    return round_probabilities(np.asarray(predictor.model(x, training=False)))


def test_files_give_the_models_answer_on_preprocess_pixels(predictor, predict_images) -> None:
    paths = [predict_images.images_dir / f for f in predict_images.filenames]
    result = predictor.predict([str(p) for p in paths], batch_size=5)
    assert result.errors == {}
    assert result.index == list(range(len(paths)))  # input order, across batches
    np.testing.assert_allclose(result.probabilities, _reference(predictor, paths), atol=1e-6)
    assert result.probabilities.shape == (len(paths), len(predictor.classes))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_does_not_change_the_answer(predictor, predict_images, batch_size: int) -> None:
    paths = [str(predict_images.images_dir / f) for f in predict_images.filenames]
    base = predictor.predict(paths, batch_size=4)
    other = predictor.predict(paths, batch_size=batch_size)
    np.testing.assert_allclose(other.probabilities, base.probabilities, atol=2e-6)


def test_file_bytes_and_paths_give_the_same_answer(predictor, predict_images) -> None:
    paths = [predict_images.images_dir / f for f in predict_images.filenames[:5]]
    by_path = predictor.predict([str(p) for p in paths])
    by_bytes = predictor.predict([p.read_bytes() for p in paths])
    np.testing.assert_array_equal(by_bytes.probabilities, by_path.probabilities)


def test_unreadable_files_are_reported_and_the_rest_predicted(predictor, predict_images, tmp_path: Path) -> None:
    good = [str(predict_images.images_dir / f) for f in predict_images.filenames[:3]]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes((predict_images.images_dir / predict_images.filenames[0]).read_bytes()[:40])
    sources = [good[0], str(text), good[1], str(tmp_path / "missing.png"), str(truncated), good[2]]
    result = predictor.predict(sources, batch_size=4)
    assert result.index == [0, 2, 5]
    assert sorted(result.errors) == [1, 3, 4]
    assert "not an image file" in result.errors[1]
    assert result.errors[3] == "no such file"
    np.testing.assert_allclose(result.probabilities, predictor.predict(good).probabilities, atol=1e-6)


def test_a_class_is_predicted_when_its_probability_reaches_its_threshold(model_dir) -> None:
    meta = ModelMeta.read(model_dir.models / "model_meta.json")
    base = Predictor.from_files(model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                model_dir.thresholds)
    probs = np.array([[0.2, 0.5, 0.7, 0.9], [0.6, 0.4, 0.0, 1.0]])
    at = Predictor(base.model, meta, np.array([0.2, 0.5, 0.71, 1.0]))
    c = meta.classes
    assert at.labels(probs) == [[c[0], c[1]], [c[0], c[3]]]  # equal to the threshold counts; 0.7 < 0.71 does not


def test_thresholds_file_must_match_the_classes(model_dir, tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"cloud": 0.5}))
    with pytest.raises(ValueError, match="missing"):
        read_thresholds(bad, model_dir.classes)
    with pytest.raises(FileNotFoundError, match="dvc repro calibrate"):
        read_thresholds(tmp_path / "none.json", model_dir.classes)


def test_metadata_from_another_model_is_refused(predictor, model_dir) -> None:
    meta = ModelMeta.read(model_dir.models / "model_meta.json")
    other = ModelMeta(**{**meta.to_dict(), "classes": ["a", "b"]})
    with pytest.raises(ValueError, match="different runs"):
        Predictor(predictor.model, other, 0.5)


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_prediction_sees_the_pixels_evaluate_saw_in_the_shards(predictor, predict_images, tmp_path: Path,
                                                                encoding: str) -> None:
    """Files through `Predictor.predict` = the same files written by preprocess and read back by
    the TFRecord reader, JPEG round trip included: no train/serve skew for either encoding."""
    from mlic import dataset
    from mlic.tfrecords import Manifest

    meta = ModelMeta(**{**predictor.meta.to_dict(), "encoding": encoding, "jpeg_quality": 90})
    assert meta.resize_mode == "pad"  # as write_shards writes
    names = predict_images.filenames
    write_shards(predict_images, tmp_path, {"test": range(len(names))}, size=meta.image_size,
                 shard_size=5, seed=0, encoding=encoding)
    shards = {}
    for x, _, files in dataset.make_dataset(Manifest.read(tmp_path, "test"), 4, with_filenames=True):
        for name, p in zip(files.numpy(), predictor.predict_arrays(x.numpy())):
            shards[name.decode()] = p
    ours = Predictor(predictor.model, meta, predictor.thresholds).predict(
        [str(predict_images.images_dir / n) for n in names], batch_size=4)
    np.testing.assert_allclose(ours.probabilities, np.stack([shards[n] for n in names]), atol=1e-6)


TEMPS = np.array([0.5, 1.0, 2.0, 3.0])


def write_calibration(path: Path, classes: list[str], thresholds: list[float], temps: np.ndarray) -> Path:
    from mlic.calibration import Calibration

    cal = Calibration(list(classes), np.array(thresholds), temps, ["fbeta"] * len(classes), "fbeta")
    path.write_text(json.dumps(cal.to_dict()), encoding="utf-8")
    return path


def test_the_temperature_of_thresholds_json_scales_every_probability(model_dir, predict_images,
                                                                   tmp_path: Path) -> None:
    """Probabilities = sigmoid(logit(p) / T) of the model's rounded output p, rounded; labels at the
    thresholds on those. The conftest's plain {class: threshold} file (format 1) still loads, at T = 1."""
    keras_path, meta_path = model_dir.models / "model.keras", model_dir.models / "model_meta.json"
    plain = Predictor.from_files(keras_path, meta_path, model_dir.thresholds)
    np.testing.assert_array_equal(plain.temperature, np.ones(4))
    path = write_calibration(tmp_path / "t.json", model_dir.classes, [0.3, 0.45, 0.5, 0.6], TEMPS)
    scaled = Predictor.from_files(keras_path, meta_path, path)
    np.testing.assert_array_equal(scaled.temperature, TEMPS)

    paths = [str(predict_images.images_dir / f) for f in predict_images.filenames]
    p = plain.predict(paths).probabilities
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(p, 1e-7, 1 - 1e-7))
    expected = np.round(1 / (1 + np.exp(-z / TEMPS)), 6)
    got = scaled.predict(paths, batch_size=5)
    np.testing.assert_allclose(got.probabilities, expected, atol=1e-12)
    assert not np.allclose(got.probabilities, p)  # the temperatures did something
    assert got.labels == scaled.labels(expected)


def test_a_bad_temperature_is_refused(predictor, tmp_path: Path, model_dir) -> None:
    path = write_calibration(tmp_path / "t.json", model_dir.classes, [0.5] * 4, np.ones(4))
    raw = json.loads(path.read_text())
    raw["temperature"][model_dir.classes[0]] = -1.0
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="> 0"):
        read_thresholds(path, model_dir.classes)


def test_an_image_over_max_pixels_is_refused_before_decoding_and_the_rest_predicted(
        predictor, predict_images, tmp_path: Path) -> None:
    from PIL import Image

    from mlic.inference import DEFAULT_MAX_PIXELS
    from mlic.params import Data

    assert predictor.max_pixels == DEFAULT_MAX_PIXELS == Data().max_image_pixels
    good = [str(predict_images.images_dir / f) for f in predict_images.filenames[:2]]
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    strict = Predictor(predictor.model, predictor.meta, predictor.thresholds, predictor.temperature,
                       max_pixels=300 * 200 - 1)
    result = strict.predict([good[0], str(big), good[1], big.read_bytes()])
    assert result.index == [0, 2] and sorted(result.errors) == [1, 3]
    assert "300x200 = 60,000 pixels, more than the limit of 59,999" in result.errors[1]
    assert "data.max_image_pixels" in result.errors[1] and result.errors[3] == result.errors[1]
    np.testing.assert_allclose(result.probabilities, predictor.predict(good).probabilities, atol=1e-6)
    at_limit = Predictor(predictor.model, predictor.meta, predictor.thresholds, predictor.temperature,
                         max_pixels=300 * 200)
    assert at_limit.predict([str(big)]).errors == {}

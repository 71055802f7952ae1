"""model_meta.json: what inference needs, checked on read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlic.model_meta import ModelMeta

META = dict(classes=["a", "b"], image_size=64, resize_mode="pad", encoding="jpeg", jpeg_quality=92,
            thresholds="reports/calibrate/thresholds.json", backbone="simple_cnn", seed=1, train={"epochs": 2},
            data_fingerprints={"train": "x"})


def test_round_trip(tmp_path: Path) -> None:
    meta = ModelMeta(**META)
    meta.write(tmp_path / "m.json")
    assert ModelMeta.read(tmp_path / "m.json") == meta
    assert json.loads((tmp_path / "m.json").read_text())["resize_mode"] == "pad"


@pytest.mark.parametrize("change, match", [
    ({"classes": ["a", "a"]}, "unique"),
    ({"classes": []}, "unique"),
    ({"resize_mode": "stretch"}, "resize_mode"),
    ({"image_size": 0}, "image_size"),
])
def test_bad_values_are_refused(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelMeta(**{**META, **change})


def test_metadata_of_an_older_mlic_says_to_retrain(tmp_path: Path) -> None:
    old = {k: v for k, v in META.items() if k not in ("resize_mode", "thresholds")}
    (tmp_path / "m.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"lacks resize_mode, thresholds.*dvc repro train"):
        ModelMeta.read(tmp_path / "m.json")


def test_missing_file_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dvc repro train"):
        ModelMeta.read(tmp_path / "none.json")

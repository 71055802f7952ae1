"""Preprocess runners: local processes and Ray write the same shards and manifests, byte for byte."""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path

import pytest
import tensorflow as tf

from mlic import images, runners, tfrecords
from mlic.params import Preprocess
from mlic.tfrecords import EncodeSettings

SETTINGS = EncodeSettings(image_size=24, resize_mode="squash", encoding="jpeg", jpeg_quality=90)
SPLITS = {"train": slice(0, 30), "val": slice(30, 38), "test": slice(38, 45)}


@pytest.fixture(scope="module")
def image_set(make_set, tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("runners") / "set", n=45, seed=11)


def _plans(image_set, out: Path, shard_size: int = 7) -> list[tfrecords.SplitPlan]:
    out.mkdir(parents=True, exist_ok=True)
    return [tfrecords.plan_split(name, image_set.filenames[rows], image_set.y[rows], image_set.classes,
                                 image_set.images_dir, out, SETTINGS, shard_size, seed=3 + i)
            for i, (name, rows) in enumerate(SPLITS.items())]


def _run(image_set, out: Path, runner: str, workers: int) -> dict[str, bytes]:
    """Every split through `runner`; the folder's files (shards + manifests) by name."""
    plans = _plans(image_set, out)
    results = list(runners.run_shard_tasks([t for p in plans for t in p.tasks], runner, workers))
    assert len(results) == sum(len(p.tasks) for p in plans)
    for plan in plans:
        tfrecords.finish_split(plan, results)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(image_set, tmp_path_factory) -> dict[str, bytes]:
    """One worker, in this process: what every other runner must reproduce."""
    return _run(image_set, tmp_path_factory.mktemp("ref") / "out", "local", 1)


def test_the_runner_choices_in_params_are_the_code_s() -> None:
    assert set(typing.get_args(typing.get_type_hints(Preprocess)["runner"])) == set(runners.RUNNERS)


def test_reference_holds_every_split_in_several_shards(reference) -> None:
    shards = [n for n in reference if n.endswith(".tfrecord")]
    assert len(shards) == 5 + 2 + 1  # 30 / 7, 8 / 7, 7 / 7
    assert {n for n in reference if n.endswith(".json")} == {f"{s}.manifest.json" for s in SPLITS}
    assert not [n for n in reference if n.startswith(".")]  # no temp left


def test_two_local_workers_write_the_same_bytes(image_set, reference, tmp_path: Path) -> None:
    assert _run(image_set, tmp_path / "out", "local", 2) == reference


def test_ray_writes_the_same_shards_and_manifests(image_set, reference, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' (make setup installs it)")
    assert _run(image_set, tmp_path / "out", "ray", 2) == reference


def test_a_retried_shard_task_rewrites_the_same_bytes_and_leaves_no_temp(image_set, reference,
                                                                         tmp_path: Path) -> None:
    """A lost worker's task runs again (Ray retries it): the second run replaces the file with
    identical bytes, and a temp left by a task killed mid-write does not end up in the shard."""
    out = tmp_path / "out"
    task = _plans(image_set, out)[0].tasks[1]
    (out / f".{task.file}.99999.tmp").write_bytes(b"half a shard from a killed worker")
    first = tfrecords.write_shard(task)
    second = tfrecords.write_shard(task)
    assert first == second and first.error is None
    assert (out / task.file).read_bytes() == reference[task.file]
    assert first.sha256 == hashlib.sha256(reference[task.file]).hexdigest()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [f".{task.file}.99999.tmp"]


def test_shards_read_back_through_tensorflow(reference, tmp_path: Path, image_set) -> None:
    """The pure-Python writer's files are valid TFRecords (checksums verified by the reader)."""
    (tmp_path / "train-00000-of-00005.tfrecord").write_bytes(reference["train-00000-of-00005.tfrecord"])
    records = list(tf.data.TFRecordDataset(str(tmp_path / "train-00000-of-00005.tfrecord")))
    assert len(records) == 6
    names = {tfrecords.parse_example(r, len(image_set.classes))["filename"].numpy().decode() for r in records}
    assert names <= set(image_set.filenames[SPLITS["train"]])


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_an_image_that_fails_is_named_in_one_line_whatever_the_runner(make_set, tmp_path: Path,
                                                                       runner: str) -> None:
    if runner == "ray":
        pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    image_set = make_set(tmp_path / "set", n=12, seed=2)
    bad = image_set.filenames[5]
    (image_set.images_dir / bad).write_bytes(b"not an image any more")
    plan = tfrecords.plan_split("train", image_set.filenames, image_set.y, image_set.classes,
                                image_set.images_dir, tmp_path / "out", SETTINGS, 4, seed=0)
    (tmp_path / "out").mkdir()
    results = list(runners.run_shard_tasks(plan.tasks, runner, 2))
    with pytest.raises(images.ImageError) as err:
        tfrecords.finish_split(plan, results)
    message = str(err.value)
    assert message.startswith(f"{image_set.images_dir / bad}: cannot be decoded") and "\n" not in message
    assert "run `dvc repro split`" in message
    assert not (tmp_path / "out" / "train.manifest.json").exists()


@pytest.mark.parametrize("workers", [1, 3])
def test_a_worker_s_exception_reaches_the_stage(image_set, tmp_path: Path, workers: int) -> None:
    """An OSError in a pool process (here the output folder is gone) is raised in the parent."""
    tasks = [t for p in _plans(image_set, tmp_path / "out") for t in p.tasks]
    (tmp_path / "out").rmdir()
    with pytest.raises(FileNotFoundError):
        list(runners.run_shard_tasks(tasks, "local", workers))


def test_a_missing_shard_result_is_an_error_not_a_short_manifest(image_set, tmp_path: Path) -> None:
    plan = _plans(image_set, tmp_path / "out")[0]
    results = [tfrecords.write_shard(t) for t in plan.tasks[1:]]
    with pytest.raises(RuntimeError, match="no result for shard"):
        tfrecords.finish_split(plan, results)


def test_ray_missing_is_a_user_error_naming_the_extra(monkeypatch, image_set, tmp_path: Path) -> None:
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name, *a, **k)))
    with pytest.raises(runners.RunnerUnavailable, match=r"pip install -e '\.\[ray\]'"):
        list(runners.run_shard_tasks(_plans(image_set, tmp_path / "out")[0].tasks, "ray", 1))


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_preprocess_stage_with_each_runner_writes_the_same_folder(
        runner, make_set, split_stage, preprocess_stage, params_yaml, dvc_stages, tmp_path_factory,
        monkeypatch) -> None:
    """The stage itself, as DVC runs it, with `preprocess.runner` set: same outputs both ways."""
    if runner == "ray":
        pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    trees = {}
    for name in ("local", runner):
        root = tmp_path_factory.mktemp(f"stage_{name}")
        monkeypatch.chdir(root)
        image_set = make_set(root / "raw", n=40, seed=4)
        params_yaml(root / "params.yaml", data=image_set.data_section(),
                    preprocess={"runner": name, "workers": 2, "shard_size": 8})
        assert split_stage.main(dvc_stages("split")[0]) == 0
        argv, _ = dvc_stages("preprocess")
        assert preprocess_stage.main(argv) == 0
        out = root / argv[argv.index("--out") + 1]
        trees[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        metrics = json.loads((root / argv[argv.index("--metrics") + 1]).read_text())
        assert sum(m["records"] for m in metrics.values()) == 40
    assert trees["local"] == trees[runner] and len(trees[runner]) > 4


def test_an_unknown_runner_is_refused_naming_the_choices() -> None:
    from mlic.params import ParamsError, section_from_dict

    with pytest.raises(ParamsError, match=r"preprocess\.runner.*'beam'.*local.*ray"):
        section_from_dict(Preprocess, {"runner": "beam"}, "preprocess")
    cfg = section_from_dict(Preprocess, {"runner": "ray", "ray_address": "ray://head:10001"}, "preprocess")
    assert (cfg.runner, cfg.ray_address) == ("ray", "ray://head:10001")

"""Tests for mlic.devices: seeds, mixed precision / XLA switches, the distribution strategy (CPU only)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlic import devices
from mlic import model as mm

SIZE = 32
N_CLASSES = 3


@pytest.fixture
def float32_policy():
    """Restore the global dtype policy whatever a test sets."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_configure_devices_auto_on_cpu(float32_policy):
    config = devices.configure_devices()
    assert config.gpus == len(tf.config.list_physical_devices("GPU"))
    if config.gpus == 0:
        assert not config.mixed_precision and not config.jit_compile
        assert not isinstance(config.strategy, tf.distribute.MirroredStrategy)
    assert keras.mixed_precision.global_policy().name == (
        "mixed_float16" if config.mixed_precision else "float32"
    )


def test_configure_devices_forced_switches(float32_policy):
    config = devices.configure_devices(mixed_precision="on", jit_compile="off")
    assert config.mixed_precision and not config.jit_compile
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    devices.configure_devices(mixed_precision="off")
    assert keras.mixed_precision.global_policy().name == "float32"
    # Unquoted on/off in YAML arrive as booleans.
    assert devices.configure_devices(mixed_precision=False, jit_compile=True).jit_compile is True
    with pytest.raises(ValueError, match="auto"):
        devices.configure_devices(mixed_precision="yes")


def test_make_strategy_is_default_for_one_device():
    assert devices.make_strategy(0) is tf.distribute.get_strategy()
    assert devices.make_strategy(1) is tf.distribute.get_strategy()


def test_set_seed_reproduces_initial_weights(monkeypatch):
    calls = []
    # Op determinism is process-wide and irreversible: record the call instead of making it.
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: calls.append(1))
    devices.set_seed(7, deterministic_ops=True)
    first = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8).get_weights()
    devices.set_seed(7)
    second = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8).get_weights()
    assert calls == [1]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    # Must run before TF initialises its devices, hence a fresh process.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    from mlic import devices, losses, model as mm

    devices.set_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    per_replica = 4
    global_batch = per_replica * strategy.num_replicas_in_sync
    x = np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    y = (np.random.default_rng(1).random((32, 3)) < 0.4).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    with strategy.scope():
        model = mm.build_model("simple_cnn", 3, 32, width=8)
        model.compile(optimizer="adam", loss=losses.make_loss("weighted_bce", pos_weight=np.ones(3)),
                      metrics=losses.make_metrics(3))
    history = model.fit(ds, epochs=1, verbose=0)
    loss = history.history["loss"][-1]
    assert np.isfinite(loss), loss
    print("LOSS", loss)
    """
)


def test_mirrored_strategy_trains_on_two_logical_cpus():
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOSS" in result.stdout


@pytest.mark.parametrize("value, gpus, jit, expected", [
    ("auto", 0, False, True),    # CPU: the same params and data give the same metrics
    ("auto", 1, False, False),   # GPU: deterministic kernels cost speed
    ("auto", 0, True, False),    # XLA asked for: determinism would silently cancel it
    (True, 1, True, True), (False, 0, False, False),
])
def test_resolve_determinism(value, gpus, jit, expected):
    assert devices.resolve_determinism(value, gpus, jit) is expected


def test_resolve_determinism_rejects_other_values():
    with pytest.raises(ValueError, match="auto"):
        devices.resolve_determinism("on-ish", 0, False)


# A real training.fit on CPU in a fresh process (op determinism is process-wide and cannot be
# undone). XLA compiles on CPU too: its HLO dump folder proves the step really went through XLA.
XLA_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, sys, tempfile
    from pathlib import Path
    import numpy as np
    import tensorflow as tf
    from mlic import devices, losses, model as mm, training
    from mlic.params import Train

    mixed, jit, deterministic = sys.argv[1], sys.argv[2], sys.argv[3]
    deterministic = {"true": True, "false": False}.get(deterministic, deterministic)
    devices.set_seed(0)
    config = devices.configure_devices(mixed, jit, deterministic)
    x = np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    y = (np.random.default_rng(1).random((32, 3)) < 0.4).astype("float32")

    def train_epochs(epochs):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(len(epochs))

    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    cfg = dataclasses.replace(Train(), epochs=1, batch_size=8, early_stopping_patience=0)
    with config.strategy.scope():
        model = mm.build_model("simple_cnn", 3, 32, width=8)
    out = Path(tempfile.mkdtemp()) / "best.keras"
    result = training.fit(model, train_epochs, val, cfg=cfg, n_classes=3, n_train=32, checkpoint=out,
                          jit_compile=config.jit_compile)
    probs = model(x[:2], training=False)
    print("RESULT", json.dumps({"requested": config.jit_compile, "effective": result.jit_compile,
                                "deterministic": config.deterministic_ops, "mixed": config.mixed_precision,
                                "out_dtype": probs.dtype.name, "body": model.get_layer("backbone").layers[1].compute_dtype, "head": model.get_layer("probabilities").compute_dtype,
                                "loss": float(result.history["loss"].iloc[-1])}))
    """
)


def _run_xla_script(tmp_path, *args: str) -> tuple[dict, list]:
    dump = tmp_path / "xla-dump"
    env = {**__import__("os").environ, "TF_XLA_FLAGS": "", "XLA_FLAGS": f"--xla_dump_to={dump}",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", XLA_SCRIPT, *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    import json

    return json.loads(line[len("RESULT "):]), sorted(dump.glob("*")) if dump.exists() else []


@pytest.mark.slow
def test_requested_xla_really_compiles_on_cpu_and_determinism_auto_steps_aside(tmp_path):
    report, dumped = _run_xla_script(tmp_path, "off", "on", "auto")
    assert report["requested"] and report["effective"], report
    assert report["deterministic"] is False, report      # auto stepped aside for the requested XLA
    assert dumped, "jit_compile on, yet XLA compiled nothing"
    assert np.isfinite(report["loss"])


@pytest.mark.slow
def test_forced_determinism_turns_requested_xla_off_and_says_so(tmp_path):
    report, dumped = _run_xla_script(tmp_path, "off", "on", "true")
    assert report["requested"] and not report["effective"] and report["deterministic"], report
    assert not dumped


@pytest.mark.slow
def test_mixed_precision_under_xla_keeps_the_head_float32(tmp_path):
    report, dumped = _run_xla_script(tmp_path, "on", "on", "auto")
    assert report["mixed"] and report["effective"] and dumped, report
    assert report["body"] == "float16", report                       # the backbone really is mixed
    assert report["out_dtype"] == "float32" and report["head"] == "float32", report
    assert np.isfinite(report["loss"])


@pytest.mark.parametrize("value, gpus, n_cores, expected", [
    ("auto", 0, 2, 1),   # CPU: one core left to the input pipeline
    ("auto", 0, 8, 7),
    ("auto", 0, 1, 1),   # never none
    ("auto", 1, 8, 0),   # GPU: TensorFlow's default
    (3, 0, 2, 3), (0, 0, 2, 0),
])
def test_resolve_intra_op_threads(value, gpus, n_cores, expected):
    assert devices.resolve_intra_op_threads(value, gpus, n_cores) == expected


@pytest.mark.parametrize("value", ["yes", -1, 1.5, True])
def test_resolve_intra_op_threads_rejects_other_values(value):
    with pytest.raises(ValueError, match="intra_op_threads"):
        devices.resolve_intra_op_threads(value, 0, 2)


THREADS_SCRIPT = textwrap.dedent(
    """
    import logging
    import tensorflow as tf
    from mlic import devices

    logging.basicConfig(level=logging.WARNING)
    config = devices.configure_devices(intra_op_threads="auto")
    expected = max(1, devices.cores() - 1)
    assert config.intra_op_threads == expected, (config.intra_op_threads, expected)
    assert tf.config.threading.get_intra_op_parallelism_threads() == expected
    tf.constant(1.0) + 1.0  # TensorFlow starts its pools: the count is fixed from here on
    again = devices.configure_devices(intra_op_threads=expected + 1)
    assert again.intra_op_threads == expected, again
    print("THREADS", expected)
    """
)


def test_intra_op_threads_apply_in_a_fresh_process_and_stay_fixed_after():
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "THREADS" in result.stdout
    assert f"intra_op_threads {int(result.stdout.split()[-1]) + 1} not applied" in result.stderr

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
        model = mm.build_model("simple_cnn", 3, 32, augmentation=mm.Augmentation(), width=8)
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

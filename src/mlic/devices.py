"""Where training runs and how repeatably: seeds, op determinism, mixed precision, XLA and the
distribution strategy. `train` calls `set_seed` then `configure_devices` before building the model.

What was requested and what runs can differ: Keras compiles without XLA (with only a warning)
when op determinism is on or a layer has no XLA kernel, so `training.fit` reads it back from the
compiled model (`TrainResult.jit_compile`), and `train` logs and records that, not the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    """What `configure_devices` resolved: pass jit_compile to `compile`, build in strategy.scope()."""

    gpus: int
    mixed_precision: bool
    jit_compile: bool
    strategy: tf.distribute.Strategy
    deterministic_ops: bool = False


def _resolve_switch(value: str | bool, name: str, default: bool) -> bool:
    # YAML 1.1 (PyYAML) reads unquoted on/off as booleans, so accept True/False as on/off.
    if isinstance(value, bool):
        return value
    if value == "auto":
        return default
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {value!r}")


def make_strategy(n_gpus: int) -> tf.distribute.Strategy:
    """MirroredStrategy over the first `n_gpus` GPUs when more than one, else the default."""
    if n_gpus > 1:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(n_gpus)])
    return tf.distribute.get_strategy()


def resolve_determinism(value: str | bool, gpus: int, jit: bool) -> bool:
    """`deterministic_ops`: "auto" is on for a CPU-only run that did not ask for XLA, else off.

    On a GPU deterministic kernels cost speed (and some ops raise), and Keras turns XLA off
    whenever op determinism is on, so "auto" never lets it silently cancel a requested XLA.
    """
    if isinstance(value, bool):
        return value
    if value == "auto":
        return gpus == 0 and not jit
    raise ValueError(f"deterministic_ops must be 'auto', true or false, got {value!r}")


def configure_devices(
    mixed_precision: str | bool = "auto", jit_compile: str | bool = "auto",
    deterministic_ops: str | bool = False,
) -> DeviceConfig:
    """Resolve mixed precision / XLA ("auto": on when a GPU is visible), op determinism
    (`resolve_determinism`, then enabled process-wide) and pick a strategy.

    Each switch is "auto", "on" or "off" (True/False also accepted). Sets the global Keras dtype
    policy, so call it before building the model. With op determinism on Keras compiles without
    XLA whatever `jit_compile` says (`training.fit` warns and reports what ran).
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    mp = _resolve_switch(mixed_precision, "mixed_precision", gpus > 0)
    jit = _resolve_switch(jit_compile, "jit_compile", gpus > 0)
    deterministic = resolve_determinism(deterministic_ops, gpus, jit)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    # Set the policy both ways so a second call in one process never inherits the first.
    keras.mixed_precision.set_global_policy("mixed_float16" if mp else "float32")
    config = DeviceConfig(gpus=gpus, mixed_precision=mp, jit_compile=jit, strategy=make_strategy(gpus),
                          deterministic_ops=deterministic)
    log.info(
        "devices: %d GPU(s), mixed_precision=%s, jit_compile requested=%s, deterministic_ops=%s, strategy=%s",
        gpus, mp, jit, deterministic, type(config.strategy).__name__,
    )
    return config


def set_seed(seed: int, deterministic_ops: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; optionally force deterministic TF kernels.

    Still nondeterministic without `deterministic_ops`: some multi-threaded CPU kernels and
    many GPU kernels (cuDNN autotuning, atomic adds) sum floats in a varying order, so reruns
    agree only to rounding. Even with it, results change with the hardware, TF/Keras versions,
    the MirroredStrategy replica count, and any tf.data stage run with `deterministic=False`.
    Op determinism also turns XLA off and makes some GPU ops slower or raise.
    """
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()

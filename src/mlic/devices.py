"""Where training runs and how repeatably: seeds, op determinism, mixed precision, XLA and the
distribution strategy. `train` calls `set_seed` then `configure_devices` before building the model.

What was requested and what runs can differ: Keras compiles without XLA (with only a warning)
when op determinism is on or a layer has no XLA kernel, so `training.fit` reads it back from the
compiled model (`TrainResult.jit_compile`), and `train` logs and records that, not the request.
"""

from __future__ import annotations

import logging
import os
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
    intra_op_threads: int = 0  # TensorFlow's op threads in effect (its default: one per core)


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


def cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_intra_op_threads(value: str | int, gpus: int, n_cores: int) -> int:
    """`intra_op_threads`: how many threads TensorFlow's ops use; 0 leaves TensorFlow's default
    (one per core).

    "auto" is one fewer than the cores (at least 1) on a machine with no GPU, else 0. Training on
    a CPU runs two kinds of work at once: the model's ops on TensorFlow's op threads, and the
    input pipeline (decode, augmentation) on tf.data's own threads. An op pool as wide as the
    machine makes the two compete for every core; leaving one to the pipeline cost less. On
    2 cores the hard benchmark's full-size epochs took 17 % less CPU and the fit 10 % less wall
    time with 1 op thread than with 2 (`bench/threads.py`). Results depend on the count (a sum
    split over more threads rounds differently), so a run records the number it used.
    """
    if value == "auto":
        return 0 if gpus else max(1, n_cores - 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"intra_op_threads must be 'auto' or a whole number >= 0, got {value!r}")
    return value


def set_intra_op_threads(n: int) -> int:
    """Ask TensorFlow for `n` op threads (0: keep its default); return the count in effect.

    TensorFlow fixes its thread pools when it first runs an op: later in the same process (a test
    session, a second tune trial) a different count cannot apply, and it says so once in the log.
    """
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if n and n != current:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
        except RuntimeError:
            log.warning("intra_op_threads %d not applied: TensorFlow already runs with %s in this process",
                        n, current or "its default")
    return tf.config.threading.get_intra_op_parallelism_threads() or cores()


def configure_devices(
    mixed_precision: str | bool = "auto", jit_compile: str | bool = "auto",
    deterministic_ops: str | bool = False, intra_op_threads: str | int = 0,
) -> DeviceConfig:
    """Resolve mixed precision / XLA ("auto": on when a GPU is visible), op determinism
    (`resolve_determinism`, then enabled process-wide) and pick a strategy.

    Each switch is "auto", "on" or "off" (True/False also accepted). Sets the global Keras dtype
    policy, so call it before building the model. With op determinism on Keras compiles without
    XLA whatever `jit_compile` says (`training.fit` warns and reports what ran).
    `intra_op_threads` (`resolve_intra_op_threads`): set before TensorFlow runs its first op.
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    mp = _resolve_switch(mixed_precision, "mixed_precision", gpus > 0)
    jit = _resolve_switch(jit_compile, "jit_compile", gpus > 0)
    deterministic = resolve_determinism(deterministic_ops, gpus, jit)
    threads = set_intra_op_threads(resolve_intra_op_threads(intra_op_threads, gpus, cores()))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    # Set the policy both ways so a second call in one process never inherits the first.
    keras.mixed_precision.set_global_policy("mixed_float16" if mp else "float32")
    config = DeviceConfig(gpus=gpus, mixed_precision=mp, jit_compile=jit, strategy=make_strategy(gpus),
                          deterministic_ops=deterministic, intra_op_threads=threads)
    log.info(
        "devices: %d GPU(s), mixed_precision=%s, jit_compile requested=%s, deterministic_ops=%s, "
        "intra_op_threads=%d, strategy=%s",
        gpus, mp, jit, deterministic, threads, type(config.strategy).__name__,
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

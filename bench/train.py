"""Training throughput: the mlic input + training step against the in-memory-array recipe, per model and XLA.

For each model (simple_cnn at 64 px, width 16; ResNet50 with weights=None at 224 px) and XLA off
and on, in one process, with the same model object, batch size and images, measures training
images per second of five routes (the last two without a model):

  mlic        make_dataset over TFRecord shards (JPEG quality 92, squash, as preprocess writes
              them), shuffled, with the training augmentation (Augmentation(): flip, rotation,
              zoom, contrast, in tf.data), into model.fit compiled as `train` compiles it
              (training._compile: Adam, BCE, binary accuracy, AUC-PR, F1)
  naive       what users copy: every image decoded with PIL and resized into one float32 array,
              model.fit(x, y, batch_size=B, shuffle=True); no augmentation (it has none)
  step alone  model.fit on one batch held in memory, repeated (a cached tf.data): the training
              step with free input, the ceiling of both routes above
  input alone the mlic dataset (shards + augmentation) iterated with no model: what the input
              pipeline can deliver when it has the CPU to itself (augmentation included)
  input, no aug  the same without augmentation (read, parse, decode only): what augmenting costs

Each timed pass is one fit() over one epoch of the image set, (steps + 1) x batch images: an
untimed lead step (fit()'s set-up, e.g. Keras turning the array into a tf.data pipeline, the
input's first batch, any re-trace), then --*-steps timed steps, timed by a Keras callback at
each step's end (TensorFlow runs the step synchronously on the CPU). Before that, one untimed
warm-up fit per model traces the step and, with XLA, compiles it (ResNet50: 0.75-5 min here).
Routes and XLA settings take turns pass by pass, --repeats times, so a burst of load elsewhere
hits them alike. Columns: img/s of the best pass (the least disturbed) and the median; the best
as a multiple of the naive route's; CPU ms an image (the process's CPU time over the timed
steps, median: the cost, which other load disturbs far less than img/s, though TensorFlow's
threads spinning while they wait count in it too); "1st step s", fit()'s
call to the end of its lead step (median).
Then: what a GPU step 10x/50x the CPU's would need fed, against what the input pipeline gives
(and how many cores it keeps busy at that rate); and memory: the naive array's bytes against the
shards' bytes and the dataset's in-memory bound (its shuffle buffer of serialized records), also
at 100,000 images (computed, not measured).

Machine budget (2 cores, no GPU, other jobs beside): a ResNet50 step of 16 images at 224 px takes
3.5-20 s here (XLA on: the slower), so its default is 3 timed steps a pass; the full run took
9.5 min with the machine nearly to itself and 19 min beside other jobs (load ~8). `--models simple_cnn`
or `--xla off` for less.

Run:  python bench/train.py [--models simple_cnn resnet50] [--xla off on] [--repeats 2]
      [--cnn-batch 32] [--cnn-steps 20] [--resnet-batch 16] [--resnet-steps 3]
      [--quick]   (--quick: simple_cnn only, 3 steps, 1 repeat: a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

from mlic import tfrecords
from mlic.sample import generate_sample

# TensorFlow is imported inside the functions: the sample and shard writers spawn worker
# processes that re-import this module, and each would otherwise pay TF's 3.5 s and 750 MiB.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF's import: keep the table readable

SEED = 42
SHUFFLE_BUFFER = 2048  # make_dataset's default, as train uses it (params train.shuffle_buffer)
AT_SCALE = 100_000     # images, for the computed memory figures


@dataclasses.dataclass(frozen=True)
class Config:
    """One (model, input size) to measure."""

    backbone: str
    size: int
    batch: int
    steps: int    # timed steps per pass, after one untimed lead step: the image set is (steps + 1) x batch
    warmup: int   # steps of the model's untimed warm-up fit (tracing, XLA compilation)
    input_images: int  # images per timed pass of "input alone" / "input, no aug" (whole epochs of the set)
    width: int = 16  # simple_cnn's first-block filters (train.width default)

    @property
    def images(self) -> int:
        return (self.steps + 1) * self.batch

    @property
    def label(self) -> str:
        return f"{self.backbone} {self.size}px b{self.batch}"


def make_images(folder: Path, n_images: int, size: int) -> pd.DataFrame:
    """Draw `n_images` synthetic images (the built-in sample's kind) for a model of `size` px into
    `folder`; return labels.csv. Sides from max(size, 112) to 1.5x that: about the sample's
    112-176 px for small models, larger than the input (so resized down, as photos are) for 224 px."""
    low = max(size, 112)
    t0 = time.perf_counter()
    frame = generate_sample(folder, n_images, seed=SEED, min_size=low, max_size=low * 3 // 2, workers=0)
    print(f"{n_images} images of {low}-{low * 3 // 2} px drawn in {time.perf_counter() - t0:.0f} s", flush=True)
    return frame


def write_shards(images_dir: Path, frame: pd.DataFrame, out: Path, size: int, pool: Any) -> tfrecords.Manifest:
    """The images into one split `bench` as preprocess writes them (squash, JPEG 92, 512 a shard)."""
    classes = list(frame.columns[1:])
    out.mkdir(parents=True)
    settings = tfrecords.EncodeSettings(size, "squash", "jpeg", 92)
    return tfrecords.write_split("bench", frame["filename"].tolist(), frame[classes].to_numpy(), classes,
                                 images_dir, out, settings, shard_size=512, seed=SEED, pool=pool)


def load_array(paths: list[str], size: int) -> np.ndarray:
    """The naive recipe's input: every image decoded (PIL), resized and stacked as float32 0..255."""
    x = np.empty((len(paths), size, size, 3), np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            x[i] = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32)
    return x


def step_timer():
    """A Keras callback recording wall and process CPU time at the end of every step.

    TensorFlow runs the eager train function synchronously on the CPU, so a step's end is when
    its results exist."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[tuple[float, float]] = []  # (wall, process CPU) seconds

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append((time.perf_counter(), time.process_time()))

    return StepTimer()


def timed_fit(model: Any, fit: Callable[[Any, list[Any]], None], steps: int, batch: int) -> tuple[float, float, float]:
    """(img/s, CPU ms an image) over the pass's `steps` timed steps, and the seconds from calling
    fit() to the end of its untimed lead step (set-up, the input's first batch and one step)."""
    timer = step_timer()
    t0 = time.perf_counter()
    fit(model, [timer])
    assert len(timer.ends) == steps + 1, f"{len(timer.ends)} steps ran, expected {steps + 1}"
    (wall0, cpu0), (wall1, cpu1), n = timer.ends[0], timer.ends[-1], steps * batch
    return n / (wall1 - wall0), 1e3 * (cpu1 - cpu0) / n, wall0 - t0


def input_pass(manifest: Any, cfg: Config, epoch: int, min_images: int, augment: bool = True) -> tuple[float, float]:
    """(img/s, CPU ms an image) of the mlic training dataset alone (augmented unless not
    `augment`), over whole epochs of >= min_images."""
    from mlic.augment import Augmentation
    from mlic.dataset import make_dataset

    n_epochs = max(1, -(-min_images // cfg.images))
    ds = make_dataset(manifest, cfg.batch, shuffle=True, seed=SEED, epochs=range(epoch, epoch + n_epochs),
                      augment=Augmentation() if augment else None)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for images, _ in ds:
        n += int(images.shape[0])
    return n / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / n


def measure(cfg: Config, xla_modes: list[bool], folder: Path, frame: pd.DataFrame, shard_dir: Path,
            repeats: int, pool: Any) -> dict[str, Any]:
    """All routes of one (model, size) for each XLA mode; returns rates and memory figures."""
    import keras
    import tensorflow as tf

    from mlic import devices, losses
    from mlic.augment import Augmentation
    from mlic.dataset import make_dataset
    from mlic.model import build_model
    from mlic.training import _compile

    classes = list(frame.columns[1:])
    k = len(classes)
    t0 = time.perf_counter()
    manifest = write_shards(folder / "images", frame, shard_dir, cfg.size, pool)
    shard_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = load_array([str(folder / "images" / f) for f in frame["filename"]], cfg.size)
    load_s = time.perf_counter() - t0
    y = frame[classes].to_numpy(np.float32)
    shard_bytes = sum((manifest.directory / s.file).stat().st_size for s in manifest.shards)
    print(f"\n{cfg.label}: {cfg.images} images; shards {shard_bytes / 2**20:.1f} MiB written in {shard_s:.1f} s; "
          f"naive array {x.nbytes / 2**20:.1f} MiB loaded with PIL in {load_s:.1f} s", flush=True)

    # One batch, repeated: the same shapes and dtypes as the routes' batches (batch dim None, so
    # Keras traces the train function for it exactly as for the other two).
    one_batch = tf.data.Dataset.from_tensor_slices((x[:cfg.batch], y[:cfg.batch])).batch(cfg.batch).cache()

    epochs_used = iter(range(1, 1_000_000))  # a new epoch number per mlic pass: new order, new augmentation

    def mlic_fit(steps):
        def fit(model, callbacks):
            e = next(epochs_used)
            ds = make_dataset(manifest, cfg.batch, shuffle=True, seed=SEED, epochs=range(e, e + 1),
                              augment=Augmentation())
            model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=callbacks,
                      shuffle=False)  # as train: tf.data shuffles (Keras ignores it for a dataset, with a warning)
        return fit

    def naive_fit(steps):
        def fit(model, callbacks):
            n = steps * cfg.batch
            model.fit(x[:n], y[:n], batch_size=cfg.batch, epochs=1, shuffle=True, verbose=0, callbacks=callbacks)
        return fit

    def step_fit(steps):
        def fit(model, callbacks):
            model.fit(one_batch.repeat(steps), epochs=1, verbose=0, callbacks=callbacks, shuffle=False)
        return fit

    routes = {"mlic": mlic_fit, "naive": naive_fit, "step alone": step_fit}
    models, xla_effective = {}, {}
    for xla in xla_modes:
        devices.set_seed(SEED)
        model = build_model(cfg.backbone, k, cfg.size, weights=None, width=cfg.width, seed=SEED)
        _compile(model, 0.001, losses.make_loss("bce"), k, xla)
        # One warm-up fit traces and (XLA) compiles the train step. The routes' batches have the
        # same spec, so the others reuse it (their "1st step s" would show a re-trace: the lead
        # step of every timed pass absorbs it).
        t0 = time.perf_counter()
        mlic_fit(cfg.warmup)(model, [])
        print(f"  warm-up fit, XLA {'on' if xla else 'off'}: {time.perf_counter() - t0:.1f} s", flush=True)
        models[xla], xla_effective[xla] = model, bool(model.jit_compile)
    for augment in (True, False):
        input_pass(manifest, cfg, 0, cfg.images, augment)  # warm-up: tracing, thread pools, page cache

    # Per route: (img/s, CPU ms an image) of each timed pass, and fit()'s seconds before step 0.
    rates: dict[tuple[str, bool | None], list[tuple[float, float]]] = {}
    setup: dict[tuple[str, bool | None], list[float]] = {}
    for r in range(repeats):
        t0 = time.perf_counter()
        for xla in xla_modes:
            for name, route in routes.items():
                rate, cpu, before = timed_fit(models[xla], route(cfg.steps + 1), cfg.steps, cfg.batch)
                rates.setdefault((name, xla), []).append((rate, cpu))
                setup.setdefault((name, xla), []).append(before)
        rates.setdefault(("input alone", None), []).append(input_pass(manifest, cfg, 1000 * (r + 1), cfg.input_images))
        rates.setdefault(("input, no aug", None), []).append(
            input_pass(manifest, cfg, 1000 * (r + 1), cfg.input_images, augment=False))
        print(f"  pass {r + 1}/{repeats}: {time.perf_counter() - t0:.0f} s", flush=True)
    keras.backend.clear_session()
    record_bytes = shard_bytes / cfg.images
    return {"rates": rates, "setup": setup, "xla_effective": xla_effective, "array_bytes": x.nbytes,
            "shard_bytes": shard_bytes, "record_bytes": record_bytes,
            "buffer_bytes": min(SHUFFLE_BUFFER, cfg.images) * record_bytes}


def report(cfg: Config, xla_modes: list[bool], res: dict[str, Any]) -> None:
    """The table of one (model, size), then ratios, what a GPU would need, and memory."""
    rates, setup = res["rates"], res["setup"]
    best = {key: max(v)[0] for key, v in rates.items()}  # the fastest pass: least disturbed by other load
    med = {key: statistics.median(r for r, _ in v) for key, v in rates.items()}
    cpu = {key: statistics.median(c for _, c in v) for key, v in rates.items()}
    model = f"{cfg.backbone} {cfg.size}px b{cfg.batch}"
    header = (f"{'model':<22} {'XLA':<4} {'route':<13} {'img/s best':>10} {'median':>7} {'x naive':>8} "
              f"{'CPU ms/img':>10} {'1st step s':>10}")
    print(f"\n{cfg.label}: {cfg.steps} timed steps a pass, {len(next(iter(rates.values())))} passes")
    print(header + "\n" + "-" * len(header))
    for xla in xla_modes:
        ran = "on" if res["xla_effective"][xla] else "off"
        if ran != ("on" if xla else "off"):
            ran += "!"  # requested one thing, Keras ran another
        for name in ("mlic", "naive", "step alone"):
            key = (name, xla)
            print(f"{model:<22} {ran:<4} {name:<13} {best[key]:>10,.1f} {med[key]:>7,.1f} "
                  f"{best[key] / best[('naive', xla)]:>7.2f}x {cpu[key]:>10.2f} {statistics.median(setup[key]):>10.2f}")
    key_in = ("input alone", None)
    inp = best[key_in]
    for key in (key_in, ("input, no aug", None)):
        print(f"{model:<22} {'-':<4} {key[0]:<13} {best[key]:>10,.1f} {med[key]:>7,.1f} {'':>8} {cpu[key]:>10.2f}")
    for xla in xla_modes:
        step = best[("step alone", xla)]
        print(f"XLA {'on ' if xla else 'off'}: mlic / naive {best[('mlic', xla)] / best[('naive', xla)]:.2f}x, "
              f"mlic / step alone {best[('mlic', xla)] / step:.2f}x, input alone / step alone {inp / step:.1f}x")
    step = max(best[("step alone", xla)] for xla in xla_modes)  # the faster CPU step
    need = [k * step for k in (10, 50)]
    cores = [n * cpu[key_in] / 1e3 for n in need]
    print(f"GPU: a step 10x / 50x this CPU's best ({step:,.1f} img/s) needs {need[0]:,.0f} / {need[1]:,.0f} img/s of "
          f"input; the input pipeline gave {inp:,.0f} img/s here ({inp / step:.0f}x the step) at "
          f"{cpu[key_in]:.2f} CPU ms an image, i.e. {cores[0]:.2f} / {cores[1]:.2f} cores busy with input")
    arr, shards, buf = res["array_bytes"], res["shard_bytes"], res["buffer_bytes"]
    n = cfg.images
    print(f"memory: naive array {arr / 2**20:,.1f} MiB for {n} images -> {arr / n * AT_SCALE / 2**30:,.1f} GiB at "
          f"{AT_SCALE:,}; mlic shards {shards / 2**20:,.1f} MiB on disk -> {shards / n * AT_SCALE / 2**30:,.2f} GiB; "
          f"mlic in memory: shuffle buffer {buf / 2**20:,.1f} MiB here, "
          f"{SHUFFLE_BUFFER * res['record_bytes'] / 2**20:,.1f} MiB at any size >= {SHUFFLE_BUFFER} images")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=("simple_cnn", "resnet50"), default=["simple_cnn", "resnet50"])
    ap.add_argument("--xla", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per route (the best is reported)")
    ap.add_argument("--cnn-size", type=int, default=64)
    ap.add_argument("--cnn-batch", type=int, default=32)
    ap.add_argument("--cnn-steps", type=int, default=20, help="timed steps a pass (images = (steps + 1) x batch)")
    ap.add_argument("--cnn-warmup", type=int, default=2, help="steps of the untimed warm-up fit")
    ap.add_argument("--cnn-input-images", type=int, default=2048, help="images per timed 'input' pass")
    ap.add_argument("--resnet-size", type=int, default=224)
    ap.add_argument("--resnet-batch", type=int, default=16)
    ap.add_argument("--resnet-steps", type=int, default=3,
                    help="timed steps a pass; a step takes 5-20 s on 2 busy cores (XLA on: the slower)")
    ap.add_argument("--resnet-warmup", type=int, default=1, help="steps of the untimed warm-up fit")
    ap.add_argument("--resnet-input-images", type=int, default=512, help="images per timed 'input' pass")
    ap.add_argument("--quick", action="store_true", help="smoke run: simple_cnn, 3 steps, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.cnn_steps, args.cnn_warmup, args.cnn_input_images = ["simple_cnn"], 1, 3, 1, 256
    configs = {
        "simple_cnn": Config("simple_cnn", args.cnn_size, args.cnn_batch, args.cnn_steps, args.cnn_warmup,
                             args.cnn_input_images),
        "resnet50": Config("resnet50", args.resnet_size, args.resnet_batch, args.resnet_steps, args.resnet_warmup,
                           args.resnet_input_images),
    }
    chosen = [configs[m] for m in args.models]
    xla_modes = [mode == "on" for mode in args.xla]
    import tensorflow as tf

    from mlic import devices

    # float32, no op determinism (it would switch XLA off); XLA is set per compile.
    devices.configure_devices(mixed_precision="off", jit_compile="off", deterministic_ops=False)
    print(f"CPUs: {os.cpu_count()} | GPUs: {len(tf.config.list_physical_devices('GPU'))} | TensorFlow "
          f"{tf.__version__} | load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp, tfrecords.worker_pool(os.cpu_count() or 1) as pool:
        for cfg in chosen:
            folder = Path(tmp) / f"images_{cfg.backbone}"
            frame = make_images(folder, cfg.images, cfg.size)
            results[cfg] = measure(cfg, xla_modes, folder, frame, Path(tmp) / f"tfrecords_{cfg.backbone}",
                                   args.repeats, pool)
    for cfg in chosen:
        report(cfg, xla_modes, results[cfg])
    print(f"\nwall {time.perf_counter() - start:.0f} s; load average after: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

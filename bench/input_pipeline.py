"""Input-pipeline throughput: the TFRecord reader against two ways of reading image files.

Measures images per second, and the process's average CPU use (user + system CPU seconds over
wall seconds: ~200 % means both cores of a 2-core machine are busy), of three routes over the
same images, in one process, each yielding batches of (float32 images 0..255, float32 labels):

  tfrecord   mlic.dataset.make_dataset over shards written by mlic.tfrecords.write_split
             (the preprocess defaults: pad to --size, JPEG quality 92, 512 records a shard)
  tf.data    tf.io.read_file + decode_image + tf.image.resize from the paths, parallel map
  PIL gen    a Python generator (PIL open, convert RGB, resize) in Dataset.from_generator

Each route runs one warm-up pass (not timed; also warms the page cache), then --repeats timed
full passes; routes take turns pass by pass so a burst of load elsewhere hits them alike.
Columns: img/s of the fastest pass and the median; CPU % of that pass and the median; CPU
microseconds per image (median: the cost, which other load disturbs less than img/s); and
img/s as a multiple of the PIL generator's. Targets on 2 cores: tfrecord >= 8x PIL, >= tf.data.
A pass of 2,000 images takes a fraction of a second: on a busy machine use --repeats 10.
Encoding the shards is not timed: that is bench/preprocess.py.

Run:  python bench/input_pipeline.py [--images 2000] [--size 96] [--batch 64] [--repeats 3]
      [--data DIR]   (DIR holds images/ + labels.csv; generated there by mlic.sample if absent)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from mlic import tfrecords
from mlic.sample import generate_sample

if TYPE_CHECKING:  # annotations only: TensorFlow is imported inside the functions (see below)
    import tensorflow as tf

# TensorFlow is imported inside the functions: the sample and shard writers spawn worker
# processes that re-import this module, and each would otherwise pay TF's 3.5 s and 750 MiB.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF's import: keep the table readable


def ensure_images(folder: Path, n_images: int) -> pd.DataFrame:
    """labels.csv of `folder`, drawing `n_images` synthetic images there first if it has none."""
    if not (folder / "labels.csv").is_file():
        print(f"generating {n_images} images in {folder} ...", flush=True)
        generate_sample(folder, n_images, seed=42, min_size=112, max_size=176, workers=0)
    return pd.read_csv(folder / "labels.csv")


def pil_generator_route(paths: list[str], y: np.ndarray, size: int, batch: int) -> tf.data.Dataset:
    """What most tutorials do: PIL in a Python generator, so one thread holding the GIL."""
    import tensorflow as tf

    def gen():
        for path, labels in zip(paths, y):
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                                    dtype=np.float32)
            yield pixels, labels
    sig = (tf.TensorSpec((size, size, 3), tf.float32), tf.TensorSpec((y.shape[1],), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=sig).batch(batch).prefetch(tf.data.AUTOTUNE)


def tf_paths_route(paths: list[str], y: np.ndarray, size: int, batch: int) -> tf.data.Dataset:
    """tf.data decoding the original JPEG/PNG files in parallel (no EXIF rotation, no alpha
    compositing: cheaper but not the same pixels as preprocess)."""
    import tensorflow as tf

    def load(path, labels):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size)), labels  # bilinear, float32
    ds = tf.data.Dataset.from_tensor_slices((paths, y))
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)


def write_shards(images_dir: Path, frame: pd.DataFrame, out: Path, size: int) -> int:
    """All images into one split `bench` with the preprocess defaults; returns shard bytes."""
    classes = list(frame.columns[1:])
    settings = tfrecords.EncodeSettings(size, "pad", "jpeg", 92)
    with tfrecords.worker_pool(os.cpu_count() or 1) as pool:
        manifest = tfrecords.write_split("bench", frame["filename"].tolist(), frame[classes].to_numpy(),
                                         classes, images_dir, out, settings, shard_size=512, seed=42,
                                         pool=pool)
    return sum((out / s.file).stat().st_size for s in manifest.shards)


def one_pass(ds: tf.data.Dataset, proc: psutil.Process) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of this process) for one full pass."""
    c0, t0, n = proc.cpu_times(), time.perf_counter(), 0
    for images, _ in ds:
        n += int(images.shape[0])
    wall, c1 = time.perf_counter() - t0, proc.cpu_times()
    return n, wall, (c1.user - c0.user) + (c1.system - c0.system)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="images to generate when --data has none")
    ap.add_argument("--data", type=Path, default=None,
                    help="folder with images/ + labels.csv (default: a temp folder)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per route, after one warm-up")
    args = ap.parse_args(argv)
    import tensorflow as tf

    from mlic.dataset import make_dataset
    from mlic.tfrecords import Manifest

    print(f"CPUs: {os.cpu_count()} | TensorFlow {tf.__version__} | load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        folder = args.data or Path(tmp) / "sample"
        frame = ensure_images(folder, args.images)
        images_dir = folder / "images"
        paths = [str(images_dir / f) for f in frame["filename"]]
        y = frame[frame.columns[1:]].to_numpy(np.float32)
        shard_dir = Path(tmp) / "tfrecords"
        shard_dir.mkdir()
        shard_bytes = write_shards(images_dir, frame, shard_dir, args.size)
        file_bytes = sum(os.path.getsize(p) for p in paths)
        print(f"{len(paths)} images ({file_bytes / 2**20:.1f} MiB of files), {args.size} px, batch "
              f"{args.batch}; shards {shard_bytes / 2**20:.1f} MiB; {args.repeats} timed passes each\n")

        routes = {
            "tfrecord (make_dataset)": make_dataset(Manifest.read(shard_dir, "bench"), args.batch),
            "tf.data from paths": tf_paths_route(paths, y, args.size, args.batch),
            "PIL generator": pil_generator_route(paths, y, args.size, args.batch),
        }
        proc = psutil.Process()
        for ds in routes.values():
            one_pass(ds, proc)  # warm-up: graph tracing, thread pools, page cache
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in routes}
        for _ in range(args.repeats):
            for name, ds in routes.items():
                n, wall, cpu = one_pass(ds, proc)
                assert n == len(paths), f"{name}: {n} images in a pass, expected {len(paths)}"
                runs[name].append((n / wall, 100 * cpu / wall, 1e6 * cpu / n))

    # best = the fastest pass (least disturbed by other load); CPU % is that pass's own.
    best = {name: max(v) for name, v in runs.items()}
    med = {name: statistics.median(r for r, _, _ in v) for name, v in runs.items()}
    base, base_med = best["PIL generator"][0], med["PIL generator"]
    header = (f"{'route':<24} {'img/s best':>10} {'median':>7} {'CPU % best':>10} {'median':>7} "
              f"{'CPU us/img':>10} {'x PIL best':>10} {'median':>7}")
    print(header + "\n" + "-" * len(header))
    for name, v in runs.items():
        rate, cpu, _ = best[name]
        med_cpu, cost = (statistics.median(x[i] for x in v) for i in (1, 2))
        print(f"{name:<24} {rate:>10,.0f} {med[name]:>7,.0f} {cpu:>10.0f} {med_cpu:>7.0f} {cost:>10.0f} "
              f"{rate / base:>9.1f}x {med[name] / base_med:>6.1f}x")
    rec, from_paths = best["tfrecord (make_dataset)"][0], best["tf.data from paths"][0]
    print(f"\ntfrecord / PIL generator = {rec / base:.1f}x (target >= 8x); "
          f"tfrecord / tf.data from paths = {rec / from_paths:.2f}x (target >= 1)")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

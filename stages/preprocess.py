"""Stage `preprocess`: resize every image of each split and encode it into sharded TFRecords.

Reads  params `common`, `data`, `preprocess`; --splits-dir/{train,val,test}.csv and the images.
Writes --out/<split>-NNNNN-of-NNNNN.tfrecord and --out/<split>.manifest.json (one folder,
       renamed into place only when complete), and --metrics (records, shards, megabytes).
Runs   each shard as one task on `preprocess.runner`: local worker processes or Ray (mlic.runners);
       the shards and manifests are the same bytes either way.
Run alone: python stages/preprocess.py --splits-dir data/splits --out data/tfrecords \
           --metrics reports/preprocess.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

# No TensorFlow here (the shards are written without it), so no quiet_tensorflow() either.
from mlic import runners, tfrecords
from mlic.atomic import atomic_dir, write_json
from mlic.split import SPLITS, read_split_csv
from mlic.stage import Params, Stage

log = logging.getLogger("mlic.stages.preprocess")

SECTIONS = ("common", "data", "preprocess")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--splits-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", required=True)


def run(args: argparse.Namespace, params: Params) -> int:
    common, data, cfg = params.common, params.data, params.preprocess
    settings = tfrecords.EncodeSettings(cfg.image_size, cfg.resize_mode, cfg.encoding, cfg.jpeg_quality,
                                        data.max_image_pixels)
    workers = tfrecords.resolve_workers(cfg.workers)

    start = time.perf_counter()
    # An error (an undecodable image, a full disk) propagates out of the `with`, so atomic_dir
    # discards the partial output (train and val written, test half done) rather than renaming it.
    with atomic_dir(args.out) as out:
        plans = []
        for i, name in enumerate(SPLITS):
            filenames, y, classes = read_split_csv(Path(args.splits_dir) / f"{name}.csv")
            plans.append(tfrecords.plan_split(name, filenames, y, classes, Path(data.images_dir), out,
                                              settings, cfg.shard_size, seed=common.seed + i))
        tasks = [t for plan in plans for t in plan.tasks]
        log.info("%d records in %d shards, written by %s", sum(p.count for p in plans), len(tasks),
                 runners.describe(cfg.runner, workers, cfg.ray_address))
        # Every split's shards in one batch of tasks: the workers stay busy across splits.
        results = list(runners.run_shard_tasks(tasks, cfg.runner, workers, cfg.ray_address))
        manifests = [tfrecords.finish_split(plan, results) for plan in plans]
    seconds = time.perf_counter() - start
    metrics: dict[str, dict] = {}
    for manifest in manifests:
        size = sum((Path(args.out) / s.file).stat().st_size for s in manifest.shards)
        metrics[manifest.split] = {"records": manifest.count, "shards": len(manifest.shards),
                                   "megabytes": round(size / 2**20, 3)}
        log.info("%s: %d records in %d shards, %.1f MiB", manifest.split, manifest.count,
                 len(manifest.shards), size / 2**20)
    total = sum(m.count for m in manifests)
    log.info("preprocess done in %.1f s with %s: %.0f img/s", seconds,
             runners.describe(cfg.runner, workers, cfg.ray_address), total / max(seconds, 1e-9))
    write_json(args.metrics, metrics)
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

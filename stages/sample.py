"""Stage `sample`: draw a built-in synthetic multi-label image set.

Reads:  params.yaml sections `common` (seed) and `sample` (kind, n_images, min_size, max_size);
        kind shapes is the easy sample (`mlic.sample`), hard the benchmark (`mlic.sample_hard`).
Writes: <out>/images/img_00000.jpg ... and <out>/labels.csv (`filename` + one 0/1 column per
        class), replacing <out> as a whole only when everything is written.

Run it alone from the project root:

    python stages/sample.py --out data/sample
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mlic.sample import generate_sample
from mlic.sample_hard import generate_hard
from mlic.stage import Params, Stage

log = logging.getLogger("stages.sample")


SECTIONS = ("common", "sample")
# sample.kind -> generator (params.Sample.kind lists the same names: a test keeps them equal)
GENERATORS = {"shapes": generate_sample, "hard": generate_hard}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=Path("data/sample"), help="folder to (re)create")
    ap.add_argument("--workers", type=int, default=None, help="processes; default or 0: all cores")


def run(args: argparse.Namespace, params: Params) -> int:
    """Generate the sample set; return 0 on success."""
    common, sample = params.common, params.sample
    start = time.perf_counter()
    labels = GENERATORS[sample.kind](
        args.out, sample.n_images, common.seed, sample.min_size, sample.max_size, workers=args.workers
    )

    prevalence = labels.drop(columns="filename").mean()
    log.info(
        "%s: %d images, %d classes, prevalence %.1f%% (%s) to %.1f%% (%s), %.1f labels/image, %.1f s -> %s",
        sample.kind,
        len(labels),
        len(prevalence),
        100 * prevalence.min(),
        prevalence.idxmin(),
        100 * prevalence.max(),
        prevalence.idxmax(),
        prevalence.sum(),
        time.perf_counter() - start,
        args.out,
    )
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

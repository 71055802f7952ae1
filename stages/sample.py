"""Stage `sample`: draw the built-in synthetic multi-label image set.

Reads:  params.yaml sections `common` (seed) and `sample` (n_images, min_size, max_size).
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

from mlic.stage import run_stage, setup_logging
from mlic.params import load_section
from mlic.sample import generate_sample

log = logging.getLogger("stages.sample")


def main(argv: list[str] | None = None) -> int:
    """Generate the sample set; return 0 on success."""
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="folder to (re)create")
    parser.add_argument("--workers", type=int, default=None, help="processes; default or 0: all cores")
    args = parser.parse_args(argv)

    common = load_section("common", args.params)
    sample = load_section("sample", args.params)
    start = time.perf_counter()
    labels = generate_sample(
        args.out, sample.n_images, common.seed, sample.min_size, sample.max_size, workers=args.workers
    )

    prevalence = labels.drop(columns="filename").mean()
    log.info(
        "%d images, %d classes, prevalence %.1f%% (%s) to %.1f%% (%s), %.1f labels/image, %.1f s -> %s",
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


if __name__ == "__main__":
    raise SystemExit(run_stage(main))

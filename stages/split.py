"""Stage `split`: validate the user's labels, summarise the data, split it into train/val/test.

Reads  params `common`, `data`, `split`; the labels CSV and images folder named in `data`.
Writes --splits-dir/{train,val,test}.csv (filename + one 0/1 column per class),
       --reports-dir/summary.json (DVC metrics), prevalence.csv, labels_per_image.csv,
       split_counts.csv (DVC plots), cooccurrence.csv, skipped.csv (rows skipped for a bad image)
       and unlisted.csv (images in the folder that the CSV does not list).
Run alone: python stages/split.py --splits-dir data/splits --reports-dir reports/data
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from mlic import image_check, labels, split
from mlic.atomic import atomic_dir, write_csv, write_json
from mlic.stage import Params, Stage

log = logging.getLogger("mlic.stages.split")

SECTIONS = ("common", "data", "split")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--splits-dir", required=True)
    ap.add_argument("--reports-dir", required=True)


def run(args: argparse.Namespace, params: Params) -> int:
    common, data, cfg = params.common, params.data, params.split
    table, skipped = labels.read_labels(data)
    unlisted = image_check.unlisted_images(data.images_dir, [*table.filenames, *skipped["filename"]])
    if unlisted:
        log.warning("%d image(s) in %s are not in %s, so not used (listed in unlisted.csv): %s%s", len(unlisted),
                    data.images_dir, data.labels_csv, ", ".join(unlisted[:3]), ", ..." if len(unlisted) > 3 else "")
    fractions = split.split_fractions(cfg.val_fraction, cfg.test_fraction)
    assignment = split.stratified_split(table.y, fractions, common.seed)

    summary, prevalence, per_image, cooc = labels.summarize(table, len(skipped), len(unlisted))
    counts = split.split_counts(table.y, assignment, table.classes)
    gaps = split.max_prevalence_gap(table.y, assignment)
    summary["split"] = {
        **{name: int((assignment == i).sum()) for i, name in enumerate(split.SPLITS)},
        "max_prevalence_gap": round(float(gaps.max()), 6),
    }

    with atomic_dir(args.splits_dir) as out:
        for i, name in enumerate(split.SPLITS):
            idx = np.flatnonzero(assignment == i)
            write_csv(out / f"{name}.csv", table.subset(idx).to_frame())
    with atomic_dir(args.reports_dir) as rep:
        write_json(rep / "summary.json", summary)
        write_csv(rep / "prevalence.csv", prevalence)
        write_csv(rep / "labels_per_image.csv", per_image)
        write_csv(rep / "cooccurrence.csv", cooc)
        write_csv(rep / "split_counts.csv", counts)
        write_csv(rep / "skipped.csv", skipped)
        write_csv(rep / "unlisted.csv", pd.DataFrame({"filename": unlisted}, dtype=object))
    log.info("split %d images into %s; largest per-class prevalence gap %.4f",
             len(table.filenames), summary["split"], gaps.max())
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

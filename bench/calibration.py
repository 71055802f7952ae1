"""Threshold strategies and temperature modes side by side on evaluate's saved predictions.

For each combination of `calibrate.temperature` and `calibrate.strategy` (and min_support), fits on
validation exactly as the `calibrate` stage does (`calibration.fit`) and prints test macro-F1,
micro-F1, the F1 of the rarest classes, ECE and Brier score (before -> after scaling), and the
trivial predictor calibrated the same way. Run by hand after `dvc repro evaluate`:

    python bench/calibration.py [--predictions reports/evaluate/predictions] [--tfrecords data/tfrecords]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from mlic import calibration, metrics
from mlic.predictions import read_predictions
from mlic.tfrecords import Manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictions", type=Path, default=Path("reports/evaluate/predictions"))
    ap.add_argument("--tfrecords", type=Path, default=Path("data/tfrecords"))
    ap.add_argument("--rare", type=int, default=2, help="how many of the rarest classes to show")
    ap.add_argument("--precision-target", type=float, default=0.8)
    args = ap.parse_args(argv)
    val = read_predictions(args.predictions / "val.csv")
    test = read_predictions(args.predictions / "test.csv")
    prior = Manifest.read(args.tfrecords, "train").prevalence
    rare = list(np.argsort(prior, kind="stable")[: args.rare])
    names = [test.classes[j] for j in rare]
    print(f"val {len(val.filenames)} images, test {len(test.filenames)}; validation positives: "
          + ", ".join(f"{c} {int(n)}" for c, n in zip(val.classes, val.y_true.sum(axis=0))))
    at_half = metrics.per_class_table(test.y_true, test.y_prob, test.classes, 0.5)
    print(f"at 0.5, no temperature: macro-F1 {metrics.compute_metrics(test.y_true, test.y_prob)['macro_f1']:.3f}, "
          + ", ".join(f"{c} F1 {at_half['f1'][j]:.3f}" for c, j in zip(names, rare)))
    head = ("| temperature | strategy | min_support | macro-F1 | micro-F1 | "
            + " | ".join(f"{c} F1" for c in names) + " | ECE before → after | Brier before → after | trivial macro-F1 |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    combos = [("fbeta", 1), ("fbeta", 10), ("fbeta", 20), ("precision", 10), ("global", 10)]
    for temperature, (strategy, k) in itertools.product(calibration.TEMPERATURE_MODES, combos):
        fit = dict(temperature=temperature, strategy=strategy, min_support=k,
                   precision_target=args.precision_target)
        cal = calibration.fit(val.classes, val.y_true, val.y_prob, **fit)
        q = cal.probabilities(test.y_prob)
        m = metrics.compute_metrics(test.y_true, q, cal.thresholds)
        table = metrics.per_class_table(test.y_true, q, test.classes, cal.thresholds)
        pr = calibration.probability_report(test.y_true, test.y_prob, q)
        trivial = calibration.fit(val.classes, val.y_true, metrics.prevalence_baseline(prior, len(val.filenames)),
                                  **fit)
        tq = trivial.probabilities(metrics.prevalence_baseline(prior, len(test.filenames)))
        tm = metrics.compute_metrics(test.y_true, tq, trivial.thresholds)
        print(f"| {temperature} | {strategy} | {k} | {m['macro_f1']:.3f} | {m['micro_f1']:.3f} | "
              + " | ".join(f"{table['f1'][j]:.3f}" for j in rare)
              + f" | {pr['ece_before']:.4f} → {pr['ece_after']:.4f} | {pr['brier_before']:.4f} → "
              f"{pr['brier_after']:.4f} | {tm['macro_f1']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

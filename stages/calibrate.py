"""Stage `calibrate`: fit one decision threshold per class on validation, report on test.

Reads  params `calibrate`, `evaluate`; --predictions/{val,test}.csv written by evaluate.
Writes --thresholds (thresholds.json keyed by class name), --metrics (test and val at the
       fitted thresholds; test at evaluate.threshold is evaluate's `test`), --headline (its
       headline numbers: the DVC metrics file), --per-class (test per-class table at the fitted
       thresholds) and --fbeta-curves (validation F-beta per class against the threshold, what
       the fit maximised), both DVC plots.
Run alone: python stages/calibrate.py --predictions reports/evaluate/predictions \
           --thresholds reports/calibrate/thresholds.json --metrics reports/calibrate/metrics.json \
           --headline reports/calibrate/headline.json --per-class reports/calibrate/per_class_test.csv \
           --fbeta-curves reports/calibrate/fbeta_vs_threshold.csv
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mlic import metrics, thresholds
from mlic.atomic import write_csv, write_json
from mlic.stage import Params, Stage
from mlic.predictions import read_predictions

log = logging.getLogger("mlic.stages.calibrate")


SECTIONS = ("calibrate", "evaluate")


def add_args(ap: argparse.ArgumentParser) -> None:
    for flag in ("--predictions", "--thresholds", "--metrics", "--headline", "--per-class",
                 "--fbeta-curves"):
        ap.add_argument(flag, required=True)


def run(args: argparse.Namespace, params: Params) -> int:
    cfg, ev = params.calibrate, params.evaluate
    val = read_predictions(Path(args.predictions) / "val.csv")
    test = read_predictions(Path(args.predictions) / "test.csv")
    if val.classes != test.classes:
        log.error("val and test predictions have different classes; re-run `dvc repro evaluate`")
        return 2
    fitted = thresholds.fit_thresholds(val.y_true, val.y_prob, beta=cfg.beta, default=cfg.default_threshold)

    report = {
        "test_calibrated": metrics.nan_to_none(metrics.compute_metrics(test.y_true, test.y_prob, fitted)),
        # in-sample (the thresholds were fitted on it): kept in the file, never a headline
        "val_calibrated": metrics.nan_to_none(metrics.compute_metrics(val.y_true, val.y_prob, fitted)),
    }
    # In the model's class order, so the file reads like the model's output columns.
    write_json(args.thresholds, thresholds.thresholds_to_dict(val.classes, fitted), sort_keys=False)
    write_json(args.metrics, report)
    write_json(args.headline, metrics.headline(report))
    write_csv(args.per_class, metrics.per_class_table(test.y_true, test.y_prob, test.classes, fitted).round(6))
    write_csv(args.fbeta_curves, thresholds.fbeta_curve_table(val.y_true, val.y_prob, val.classes,
                                                              beta=cfg.beta).round(6))
    default = metrics.compute_metrics(test.y_true, test.y_prob, ev.threshold)
    c = report["test_calibrated"]
    log.info("test macro-F1 %.3f at fitted thresholds vs %.3f at %.2f; micro-F1 %.3f vs %.3f",
             c["macro_f1"], default["macro_f1"], ev.threshold, c["micro_f1"], default["micro_f1"])
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

"""Stage `calibrate`: fit a temperature and the decision thresholds on validation, report on test.

Reads  params `calibrate`, `evaluate`; --predictions/{val,test}.csv written by evaluate; the
       train split's manifest in --tfrecords (training prevalence: the trivial predictor).
Writes --thresholds (thresholds.json: per class the temperature, the threshold on the scaled
       probability and the rule that set it; what `mlic predict` and the packaged model apply),
       --metrics (test and val at the fitted thresholds; the trivial predictor on test, calibrated
       on validation by the same procedure; ECE and Brier score on test before and after
       scaling; test at evaluate.threshold is evaluate's `test`), --headline (its headline numbers: the DVC
       metrics file), --per-class (test per-class table at the fitted thresholds),
       --fbeta-curves (validation F-beta per class against the threshold) and --reliability
       (test reliability diagram before/after scaling), the last three DVC plots.
Run alone: python stages/calibrate.py --predictions reports/evaluate/predictions \
           --tfrecords data/tfrecords --thresholds reports/calibrate/thresholds.json \
           --metrics reports/calibrate/metrics.json --headline reports/calibrate/headline.json \
           --per-class reports/calibrate/per_class_test.csv \
           --fbeta-curves reports/calibrate/fbeta_vs_threshold.csv \
           --reliability reports/calibrate/reliability_test.csv
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlic import calibration, metrics, thresholds
from mlic.atomic import write_csv, write_json
from mlic.errors import InputError
from mlic.predictions import read_predictions
from mlic.stage import Params, Stage
from mlic.tfrecords import Manifest

log = logging.getLogger("mlic.stages.calibrate")


SECTIONS = ("calibrate", "evaluate")


def add_args(ap: argparse.ArgumentParser) -> None:
    for flag in ("--predictions", "--tfrecords", "--thresholds", "--metrics", "--headline", "--per-class",
                 "--fbeta-curves", "--reliability"):
        ap.add_argument(flag, required=True)


def run(args: argparse.Namespace, params: Params) -> int:
    cfg, ev = params.calibrate, params.evaluate
    val = read_predictions(Path(args.predictions) / "val.csv")
    test = read_predictions(Path(args.predictions) / "test.csv")
    train = Manifest.read(args.tfrecords, "train")
    if not val.classes == test.classes == train.classes:
        raise InputError("val and test predictions and the train manifest have different classes; "
                         "re-run `dvc repro evaluate`")
    fit = functools.partial(calibration.fit, val.classes, temperature=cfg.temperature, strategy=cfg.strategy,
                            beta=cfg.beta, precision_target=cfg.precision_target, min_support=cfg.min_support,
                            default=cfg.default_threshold)
    cal = fit(val.y_true, val.y_prob)
    val_q, test_q = cal.probabilities(val.y_prob), cal.probabilities(test.y_prob)
    # The trivial predictor (training prevalence as every image's score) calibrated by the same
    # procedure on validation, so both columns of the contrast get thresholds fitted for them.
    prior = train.prevalence
    trivial = fit(val.y_true, metrics.prevalence_baseline(prior, len(val.filenames)))
    trivial_q = trivial.probabilities(metrics.prevalence_baseline(prior, len(test.filenames)))

    report = {
        "test_calibrated": metrics.nan_to_none(metrics.compute_metrics(test.y_true, test_q, cal.thresholds)),
        # in-sample (the thresholds were fitted on it): kept in the file, never a headline
        "val_calibrated": metrics.nan_to_none(metrics.compute_metrics(val.y_true, val_q, cal.thresholds)),
        "baseline": {"test_calibrated": metrics.nan_to_none(
            metrics.compute_metrics(test.y_true, trivial_q, trivial.thresholds))},
        "test_probability": calibration.probability_report(test.y_true, test.y_prob, test_q),
    }
    write_json(args.thresholds, cal.to_dict(), sort_keys=False)  # class order, like the model's outputs
    write_json(args.metrics, report)
    write_json(args.headline, metrics.headline(report))
    table = metrics.per_class_table(test.y_true, test_q, test.classes, cal.thresholds)
    write_csv(args.per_class, table.assign(temperature=cal.temperature, rule=cal.rules).round(6))
    write_csv(args.fbeta_curves, thresholds.fbeta_curve_table(val.y_true, val_q, val.classes,
                                                              beta=cfg.beta).round(6))
    write_csv(args.reliability, calibration.reliability_long(test.y_true, test.y_prob, test_q).round(6))
    default = metrics.compute_metrics(test.y_true, test.y_prob, ev.threshold)
    c, b, pr = report["test_calibrated"], report["baseline"]["test_calibrated"], report["test_probability"]
    log.info("test macro-F1 %.3f at fitted thresholds (%s) vs %.3f at %.2f (the trivial predictor "
             "calibrated the same way %.3f); micro-F1 %.3f vs %.3f", c["macro_f1"], fitted_by(cfg, cal.rules),
             default["macro_f1"], ev.threshold, b["macro_f1"], c["micro_f1"], default["micro_f1"])
    log.info("temperature %s: test ECE %.4f -> %.4f, Brier %.4f -> %.4f", cfg.temperature, pr["ece_before"],
             pr["ece_after"], pr["brier_before"], pr["brier_after"])
    return 0


def fitted_by(cfg: Any, rules: Sequence[str]) -> str:
    """`fbeta, beta=2`: the strategy and what shaped it. beta scores the F-beta that `fbeta` and
    `global` maximise; `precision` has its target, and beta only where it fell back to global."""
    if cfg.strategy != "precision":
        return f"{cfg.strategy}, beta={cfg.beta:g}"
    n = sum(r in (thresholds.RULE_FEW_POSITIVES, thresholds.RULE_UNREACHABLE) for r in rules)
    return (f"precision, target {cfg.precision_target:g}"
            + (f"; {n} class(es) at the global threshold, beta={cfg.beta:g}" if n else ""))


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

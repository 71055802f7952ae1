"""Stage `evaluate`: predict val and test once; report the multi-label metric set at one threshold.

Reads  params `evaluate`; --model (.keras) and the val/test TFRecords and the train manifest.
Writes --predictions/{val,test}.csv (filename, true_<class>, prob_<class>), --metrics (the
       full set: val, test, and the trivial prevalence predictor under `baseline`), --headline
       (its few headline numbers: the DVC metrics file), --per-class (test per-class table) and
       --pr-curves (test precision-recall curve per class), both DVC plots.
Run alone: python stages/evaluate.py --model models/model.keras --tfrecords data/tfrecords \
           --predictions reports/evaluate/predictions --metrics reports/evaluate/metrics.json \
           --headline reports/evaluate/headline.json --per-class reports/evaluate/per_class_test.csv \
           --pr-curves reports/evaluate/pr_curves.csv
"""

from __future__ import annotations

import argparse
import logging

from mlic.console import quiet_tensorflow

if __name__ == "__main__":  # before the imports below load TensorFlow; tests calling main() keep pytest's stderr
    quiet_tensorflow()

from mlic import metrics
from mlic.atomic import atomic_dir, write_csv, write_json
from mlic.model import load_model
from mlic.predictions import predict_split, write_predictions
from mlic.stage import Params, Stage
from mlic.tfrecords import Manifest

log = logging.getLogger("mlic.stages.evaluate")


SECTIONS = ("evaluate",)


def add_args(ap: argparse.ArgumentParser) -> None:
    for flag in ("--model", "--tfrecords", "--predictions", "--metrics", "--headline", "--per-class",
                 "--pr-curves"):
        ap.add_argument(flag, required=True)


def run(args: argparse.Namespace, params: Params) -> int:
    cfg = params.evaluate
    model = load_model(args.model)
    train_m = Manifest.read(args.tfrecords, "train")
    if model.output_shape[-1] != len(train_m.classes):
        log.error("the model predicts %d classes but the shards hold %d; re-run `dvc repro train`",
                  model.output_shape[-1], len(train_m.classes))
        return 2
    prevalence = train_m.prevalence

    report: dict[str, dict] = {"baseline": {}}
    with atomic_dir(args.predictions) as out:
        for split in ("val", "test"):
            pred = predict_split(model, Manifest.read(args.tfrecords, split), cfg.batch_size)
            write_predictions(out / f"{split}.csv", pred)
            report[split] = metrics.nan_to_none(metrics.compute_metrics(pred.y_true, pred.y_prob, cfg.threshold))
            baseline = metrics.prevalence_baseline(prevalence, len(pred.filenames))
            report["baseline"][split] = metrics.nan_to_none(
                metrics.compute_metrics(pred.y_true, baseline, cfg.threshold))
            if split == "test":
                table = metrics.per_class_table(pred.y_true, pred.y_prob, pred.classes, cfg.threshold)
                curves = metrics.pr_curve_table(pred.y_true, pred.y_prob, pred.classes)
    write_csv(args.per_class, table.round(6))
    write_csv(args.pr_curves, curves.round(6))
    write_json(args.metrics, report)
    write_json(args.headline, metrics.headline(report))
    t, b = report["test"], report["baseline"]["test"]
    log.info("test at %.2f: macro-F1 %.3f (trivial %.3f), mAP %.3f (trivial %.3f), subset accuracy %.3f "
             "(trivial %.3f), Hamming loss %.4f (trivial %.4f)", cfg.threshold, t["macro_f1"], b["macro_f1"],
             t["macro_ap"], b["macro_ap"], t["subset_accuracy"], b["subset_accuracy"],
             t["hamming_loss"], b["hamming_loss"])
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

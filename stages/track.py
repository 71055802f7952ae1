"""Stage `track`: mirror the pipeline's outputs into ONE complete MLflow run.

Reads  params `tracking`, `calibrate`, `evaluate` and the whole --params file; the Keras history
       CSV, metrics JSONs (`[prefix=]path`), artifacts, the report tables the figures are drawn
       from, the model with its metadata and thresholds (packaged as one pyfunc model,
       registered), the split manifests, and the journal of the stages that ran (`.mlic/`).
Writes no DVC output: its product is the MLflow run. Where it is (run id, experiment, model
       version) goes to the log and to --note, a local file outside git and DVC (a run id means
       nothing to another clone); under `dvc exp run --temp/--queue` that file stays in the
       temporary copy, and the log and MLflow (the run is named after the experiment) say it.
DVC re-runs it whenever anything upstream changed, so each changed pipeline run gets one run.
Run alone: python stages/track.py --params params.yaml --history reports/train/history.csv \
           --metrics train=reports/train/metrics.json reports/evaluate/metrics.json \
           --artifacts dvc.lock models/model_meta.json --model models/model.keras \
           --meta models/model_meta.json --summary models/model_summary.txt \
           --thresholds reports/calibrate/thresholds.json \
           --manifests-dir data/tfrecords --note .mlic/mlflow_run.json
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from pathlib import Path

from mlic import figures, record, tracking
from mlic.atomic import write_json
from mlic.errors import UserError
from mlic.stage import Params, Stage

log = logging.getLogger("mlic.stages.track")


def metrics_arg(text: str) -> tuple[str, Path]:
    """`train=reports/train/metrics.json` -> ("train", path); a bare path has no prefix."""
    head, sep, tail = text.partition("=")
    return (head, Path(tail)) if sep and re.fullmatch(r"\w+", head) else ("", Path(text))


# `track` logs the whole params file (dvc.yaml declares all of it) and reads these sections itself.
SECTIONS = ("tracking", "calibrate", "evaluate")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--history", type=Path, help="per-epoch history CSV (column `epoch`)")
    ap.add_argument("--metrics", nargs="+", action="extend", default=[], type=metrics_arg,
                    metavar="[PREFIX=]JSON", help="metrics files; PREFIX/ goes before their names")
    ap.add_argument("--artifacts", nargs="+", action="extend", default=[], type=Path)
    ap.add_argument("--pr-curves", type=Path, help="evaluate's per-class PR curves (figure)")
    ap.add_argument("--per-class-default", type=Path, help="evaluate's per-class test table (figures)")
    ap.add_argument("--per-class-calibrated", type=Path, help="calibrate's per-class test table (figure)")
    ap.add_argument("--fbeta-curves", type=Path, help="calibrate's F-beta vs threshold table (figure)")
    ap.add_argument("--reliability", type=Path, help="calibrate's reliability table, before/after scaling (figure)")
    ap.add_argument("--model", type=Path, help=".keras model (packaged and logged if tracking.log_model)")
    ap.add_argument("--meta", type=Path, help="model_meta.json, packed with the model")
    ap.add_argument("--summary", type=Path, help="train's model_summary.txt, packed with the model")
    ap.add_argument("--thresholds", type=Path, help="calibrate's thresholds.json, packed with the model")
    ap.add_argument("--manifests-dir", type=Path, help="folder of <split>.manifest.json")
    ap.add_argument("--note", type=Path, default=Path(".mlic/mlflow_run.json"),
                    help="where to note the run's id and model version (local, not versioned)")


def run(args: argparse.Namespace, params: Params) -> int:
    # MLflow draws a progress bar for every artifact it reads back while logging the model.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg, cal, ev = params.tracking, params.calibrate, params.evaluate
    uri = tracking.resolve_tracking_uri(cfg.uri)
    if args.model and not cfg.log_model:
        log.info("tracking.log_model is false: not logging %s", args.model)
    package = None
    if args.model and cfg.log_model:
        if not (args.meta and args.thresholds):
            raise UserError("--model needs --meta and --thresholds: the packaged model carries all three")
        package = tracking.PackageSpec(args.model, args.meta, args.thresholds, cfg.registered_model,
                                       cfg.champion_metric, args.summary)
    tracking.check_store(uri)
    rec = record.build_record(
        params_file=args.params, history_csv=args.history, metrics_files=args.metrics,
        artifacts=args.artifacts, manifests_dir=args.manifests_dir, model_meta=args.meta,
        project_root=Path.cwd(), keep=[cfg.champion_metric] if package else [], sweep=cfg.sweep)
    with tempfile.TemporaryDirectory(prefix="mlic-figures-") as tmp:
        drawn = figures.draw_all(
            Path(tmp), history=args.history, pr_curves_csv=args.pr_curves,
            per_class_default=args.per_class_default, per_class_calibrated=args.per_class_calibrated,
            fbeta_csv=args.fbeta_curves, thresholds_json=args.thresholds, reliability_csv=args.reliability,
            default_threshold=ev.threshold, beta=cal.beta)
        info = tracking.log_record(rec, tracking_uri=uri, experiment=cfg.experiment, package=package,
                                   extra_artifacts=drawn)
    args.note.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.note, info.as_dict())
    log.info("MLflow run %s (%s) in experiment %r. See it: %s",
             info.run_name, info.run_id, info.experiment, tracking.ui_hint(info))
    if info.registered_model:
        log.info("use the model: mlic predict IMAGES... --model models:/%s/%s (or models:/%s@champion)",
                 info.registered_model, info.model_version, info.registered_model)
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

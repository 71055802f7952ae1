"""Stage `track`: mirror the pipeline's outputs into ONE complete MLflow run.

Reads  params `tracking`, `calibrate`, `evaluate` and the whole --params file; the Keras history
       CSV, metrics JSONs (`[prefix=]path`), artifacts, the report tables the figures are drawn
       from, the model with its metadata and thresholds (packaged as one pyfunc model,
       registered), the split manifests, and the journal of the stages that ran (`.mlic/`).
Writes --logged: the fingerprint of the pipeline state it logged (`record.state_fingerprint`).
       Its content is a function of that state alone, so `dvc.lock` holds the same hash in every
       clone; the file is not in git. A fresh clone lacks it, so DVC runs `track` there; after
       a run it matches, so a no-op `dvc repro` logs nothing. Where the run is (run id,
       experiment, model version) goes to the log and to --note, a local file outside git and
       DVC (a run id means nothing to another clone).
Once per state and store: if the store already holds a FINISHED run with this fingerprint (a
       state logged before, `dvc exp apply` of an old experiment, a forced re-run), nothing new is
       logged; the log names the run that holds it.
Run alone: python stages/track.py --params params.yaml --history reports/train/history.csv \
           --metrics train=reports/train/metrics.json reports/evaluate/metrics.json \
           --artifacts dvc.lock models/model_meta.json --model models/model.keras \
           --meta models/model_meta.json --summary models/model_summary.txt \
           --thresholds reports/calibrate/thresholds.json \
           --manifests-dir data/tfrecords --note .mlic/mlflow_run.json --logged reports/track/logged.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import tempfile
from pathlib import Path

import mlic
from mlic import figures, record, store, tracking
from mlic.atomic import write_json
from mlic.errors import UserError
from mlic.stage import Params, Stage

log = logging.getLogger("mlic.stages.track")


def metrics_arg(text: str) -> tuple[str, Path]:
    """`train=reports/train/metrics.json` -> ("train", path); a bare path has no prefix."""
    head, sep, tail = text.partition("=")
    return (head, Path(tail)) if sep and re.fullmatch(r"\w+", head) else ("", Path(text))


# `track` logs the whole params file (dvc.yaml declares all of it) and reads these sections itself.
SECTIONS = ("tracking", "calibrate", "evaluate", "data")


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
    ap.add_argument("--logged", type=Path, required=True,
                    help="where to write the fingerprint of the state logged (the stage's DVC output)")


# What the --logged file says of itself (it is read by people who wonder why it is there).
LOGGED_ABOUT = ("The pipeline state whose MLflow run `track` logged (or found already logged) in the store it "
                "used. Not in git: a fresh clone lacks it, so its first `dvc repro` logs the run. Delete it, or "
                "run `dvc repro --force --single-item track`, to log this state into another store.")


def run(args: argparse.Namespace, params: Params) -> int:
    # MLflow draws a progress bar for every artifact it reads back while logging the model.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg, cal, ev = params.tracking, params.calibrate, params.evaluate
    uri = store.resolve_tracking_uri(cfg.uri)
    if args.model and not cfg.log_model:
        log.info("tracking.log_model is false: not logging %s", args.model)
    package = None
    if args.model and cfg.log_model:
        if not (args.meta and args.thresholds):
            raise UserError("--model needs --meta and --thresholds: the packaged model carries all three")
        package = tracking.PackageSpec(args.model, args.meta, args.thresholds, cfg.registered_model,
                                       cfg.champion_metric, args.summary, params.data.max_image_pixels)
    store.check_store(uri)
    rec = record.build_record(
        params_file=args.params, history_csv=args.history, metrics_files=args.metrics,
        artifacts=args.artifacts, manifests_dir=args.manifests_dir, model_meta=args.meta,
        project_root=Path.cwd(), keep=[cfg.champion_metric] if package else [], sweep=cfg.sweep)
    # The project's src/mlic, which DVC tracks (an editable install may import another checkout's).
    code = Path("src/mlic") if Path("src/mlic/__init__.py").is_file() else Path(mlic.__file__).parent
    inputs = (args.history, args.pr_curves, args.per_class_default, args.per_class_calibrated, args.fbeta_curves,
              args.reliability, args.model, args.meta, args.summary, args.thresholds)
    fingerprint = record.state_fingerprint(rec.params, record.state_files(rec, inputs, code, Path.cwd()))
    rec = dataclasses.replace(rec, tags={**rec.tags, record.FINGERPRINT_TAG: fingerprint})
    info = tracking.logged_run(uri, cfg.experiment, fingerprint)
    if info is not None:
        log.info("this pipeline state is already in the store: run %r (%s); nothing new logged",
                 info.run_name, info.run_id)
    else:
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
    args.logged.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.logged, {"fingerprint": fingerprint, "experiment": cfg.experiment, "about": LOGGED_ABOUT})
    log.info("MLflow run %r (%s) in experiment %r\n%s", info.run_name, info.run_id, info.experiment,
             "\n".join(tracking.ui_hint(info)))
    if info.registered_model:
        log.info("use the model: mlic predict IMAGES... --model models:/%s@champion (this run's: models:/%s/%s)",
                 info.registered_model, info.registered_model, info.model_version)
    return 0


main = Stage(__doc__, SECTIONS, add_args, run)

if __name__ == "__main__":
    main.script()

"""Stage `track`: mirror the pipeline's outputs into ONE complete MLflow run.

Reads  params `tracking` (experiment, uri, log_model, registered_model, champion_metric) and the
       whole --params file; the Keras history CSV, metrics JSONs (`[prefix=]path`), artifacts,
       the model with its metadata and thresholds (packaged as one pyfunc model, registered),
       the split manifests.
Writes --out (run id, experiment, run name, tracking URI, git commit), atomically.
DVC re-runs it whenever anything upstream changed, so each changed pipeline run gets one run.
Run alone: python stages/track.py --params params.yaml --history reports/train/history.csv \
           --metrics train=reports/train/metrics.json reports/evaluate/metrics.json \
           --artifacts dvc.lock models/model_meta.json --model models/model.keras \
           --meta models/model_meta.json --thresholds reports/calibrate/thresholds.json \
           --manifests-dir data/tfrecords --out reports/mlflow_run.json
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from mlic import tracking
from mlic.atomic import write_json
from mlic.stage import run_stage, setup_logging
from mlic.params import load_section

log = logging.getLogger("mlic.stages.track")


def metrics_arg(text: str) -> tuple[str, Path]:
    """`train=reports/train/metrics.json` -> ("train", path); a bare path has no prefix."""
    head, sep, tail = text.partition("=")
    return (head, Path(tail)) if sep and re.fullmatch(r"\w+", head) else ("", Path(text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--history", type=Path, help="per-epoch history CSV (column `epoch`)")
    ap.add_argument("--metrics", nargs="+", action="extend", default=[], type=metrics_arg,
                    metavar="[PREFIX=]JSON", help="metrics files; PREFIX_ goes before their names")
    ap.add_argument("--artifacts", nargs="+", action="extend", default=[], type=Path)
    ap.add_argument("--model", type=Path, help=".keras model (packaged and logged if tracking.log_model)")
    ap.add_argument("--meta", type=Path, help="model_meta.json, packed with the model")
    ap.add_argument("--thresholds", type=Path, help="calibrate's thresholds.json, packed with the model")
    ap.add_argument("--manifests-dir", type=Path, help="folder of <split>.manifest.json")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    setup_logging()

    cfg = load_section("tracking", args.params)
    uri = tracking.resolve_tracking_uri(cfg.uri)
    if args.model and not cfg.log_model:
        log.info("tracking.log_model is false: not logging %s", args.model)
    package = None
    if args.model and cfg.log_model:
        if not (args.meta and args.thresholds):
            ap.error("--model needs --meta and --thresholds: the packaged model carries all three")
        package = tracking.PackageSpec(args.model, args.meta, args.thresholds, cfg.registered_model,
                                       cfg.champion_metric)
    try:
        tracking.check_store(uri)
        info = tracking.log_pipeline_run(
            tracking_uri=uri, experiment=cfg.experiment, params_file=args.params,
            history_csv=args.history, metrics_files=args.metrics, artifacts=args.artifacts,
            package=package, manifests_dir=args.manifests_dir,
            project_root=Path.cwd())
    except (tracking.TrackingUnavailable, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    write_json(args.out, info.as_dict())
    log.info("MLflow run %s (%s) in experiment %r. See it: %s",
             info.run_name, info.run_id, info.experiment, tracking.ui_hint(info))
    if info.registered_model:
        log.info("use the model: mlic predict IMAGES... --model models:/%s/%s (or models:/%s@champion)",
                 info.registered_model, info.model_version, info.registered_model)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))

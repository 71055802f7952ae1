"""Stage `tune`: hyperparameter search inside one experiment (Optuna), off unless `tune.enabled`.

Reads  params `common`, `train`, `tune` (and `tracking` for the MLflow runs); --tfrecords manifests/shards.
Writes --best-params (the best trial's values nested like params.yaml, its validation mAP and the
       `dvc exp run -S ...` command that applies them), --trials (one row per trial: state,
       objective, epochs, values: a DVC plot), --metrics (best value, trials per state: DVC metrics).
       Off (the default): says so in --best-params, an empty table, in about a second and without
       importing TensorFlow. On: the study (`mlic.tune`) lives in .mlic/tune/optuna.db under the
       project, so a killed run, re-run, finishes only what is left of it; MLflow gets a parent run
       per study and a nested run per trial, in experiment `<tracking.experiment>-tune`.
Run alone: python stages/tune.py --tfrecords data/tfrecords --best-params reports/tune/best_params.yaml \
           --trials reports/tune/trials.csv --metrics reports/tune/metrics.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mlic import store, tune
from mlic.stage import Params, Stage

log = logging.getLogger("mlic.stages.tune")

SECTIONS = ("common", "train", "tune")


def add_args(ap: argparse.ArgumentParser) -> None:
    for flag in ("--tfrecords", "--best-params", "--trials", "--metrics"):
        ap.add_argument(flag, required=True)


def run(args: argparse.Namespace, params: Params) -> int:
    cfg = params.tune
    outputs = tune.Outputs(Path(args.best_params), Path(args.trials), Path(args.metrics))
    if not cfg.enabled:
        tune.write_disabled(outputs, cfg.searched())
        log.info("tune is off (tune.enabled: false); search in one experiment with "
                 "`dvc exp run tune -S tune.enabled=true`")
        return 0
    # Say so now, in one line, rather than after the first trial.
    uri = store.resolve_tracking_uri(params.tracking.uri)
    store.check_store(uri)

    def make_trainer() -> tune.TrainTrial:
        if __name__ == "__main__":  # before TensorFlow loads (tests calling main() keep pytest's stderr)
            from mlic.console import quiet_tensorflow

            quiet_tensorflow()
        from mlic import trial  # TensorFlow: only once a trial is about to run

        return trial.Trainer(args.tfrecords, params.common.seed)

    tune.run(cfg, params.train, params.common.seed, Path(args.tfrecords), outputs, make_trainer,
             tracking_uri=uri, experiment=params.tracking.experiment)
    return 0


# `tracking` says where the runs go: it shapes no output, so it is not one of tune's DVC params.
main = Stage(__doc__, SECTIONS, add_args, run, checks=("tracking",))

if __name__ == "__main__":
    main.script()

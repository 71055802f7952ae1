"""Quality per CPU-minute on the hard benchmark: the pipeline, run for real, once per configuration.

The hard benchmark is the built-in `sample.kind: hard` (src/mlic/sample_hard.py: 20+ classes, a
long tail, small fine-detail objects beside large ones, 96-320 px images in mixed modes). This
script `git clone`s the committed project into a work folder, sets the benchmark's sample params
there and commits them (the baseline), reproduces `sample -> split -> preprocess` once, then runs
each configuration as `dvc exp run --temp -S ...` (DVC restores the shared data stages from its
cache; each experiment trains, evaluates, calibrates and logs one MLflow run into the work
folder's store). Everything it reports comes from those runs:

  macro-F1 cal  test macro-F1 at the calibrated thresholds (`test_calibrated/macro_f1`)
  mAP           test macro average precision (`test/macro_ap`)
  rare F1       calibrated test F1 of the three classes rarest in the test split, rarest first
  train CPU min user + sys of the `train` stage (`train/cpu_seconds`: what `time` reports)
  train wall s  wall time of the fit (`train/fit_seconds`); exp wall s: the whole experiment

and a time-to-quality plot: the best validation AUC-PR so far (Keras's macro AUC-PR, the
per-epoch twin of mAP) against the train process's CPU seconds at each epoch's end
(`train.epoch_cpu_seconds`), one line per configuration. Outputs: <out>/quality.csv, quality.md
(the table) and time_to_quality.png; the table is printed too.

Machine: on 2 cores one configuration of the 4,000-image benchmark takes 10-30 minutes; run a
few at a time (`--configs`), later runs reuse the work folder's data (`--workdir`).

Run:  python bench/quality.py [--configs defaults px96 ...] [--images 4000] [--workdir DIR]
      [--out bench/quality] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The benchmark's data: what `sample.kind: hard` is measured at (docs/choosing.md).
HARD = {"sample.kind": "hard", "sample.min_size": 96, "sample.max_size": 320}

# The defaults before the attention head: global average pooling, Adam without weight decay, no
# test-time flip. The configurations measured then are changes from these, written on top of them.
PREV = {"train.pool": "avg", "train.weight_decay": 0.0, "train.tta_flip": False}

# The defaults before progressive resizing: simple_cnn at 64 px, repeat threshold 0.2 (and PREV).
OLD = {**PREV, "preprocess.image_size": 64, "train.backbone": "simple_cnn", "train.progressive_scale": 0.0,
       "train.repeat_threshold": 0.2}

# Configurations, as `dvc exp run -S` overrides on top of the committed defaults. Add yours here.
CONFIGS: dict[str, dict[str, Any]] = {
    # strided_cnn at 160 px, progressive resizing from 80 px for the first half, repeat threshold 0.5,
    # the class-attention head, AdamW, the test-time flip
    "defaults": {},
    "defaults-no-tta": {"train.tta_flip": False},
    "attention-l02": {**PREV, "train.pool": "attention", "train.attention_lambda": 0.2},
    "prev-defaults": PREV,
    **{name: {**PREV, **changes} for name, changes in {
        "prog160-rfs02": {"train.repeat_threshold": 0.2},
        "prog160-rfs02-frac06": {"train.repeat_threshold": 0.2, "train.progressive_fraction": 0.6},
        "no-progressive": {"train.progressive_scale": 0.0},
        "strided128-prog": {"preprocess.image_size": 128},
        "defaults-avgmax": {"train.pool": "avgmax"},
        "defaults-rfs10": {"train.repeat_threshold": 1.0},
        "defaults-weighted": {"train.loss": "weighted_bce"},
    }.items()},
    "old-defaults": OLD,
    **{name: {**OLD, **changes} for name, changes in {
        "px96": {"preprocess.image_size": 96},
        "px128": {"preprocess.image_size": 128},
        "avgmax": {"train.pool": "avgmax"},
        "asl": {"train.loss": "asl"},
        "rfs05": {"train.repeat_threshold": 0.5},
        "px96-avgmax": {"preprocess.image_size": 96, "train.pool": "avgmax"},
        "px128-avgmax": {"preprocess.image_size": 128, "train.pool": "avgmax"},
        "px96-resnet_small": {"preprocess.image_size": 96, "train.backbone": "resnet_small"},
        "px96-asl": {"preprocess.image_size": 96, "train.loss": "asl"},
        "strided128": {"preprocess.image_size": 128, "train.backbone": "strided_cnn"},
        "strided128-colour": {"preprocess.image_size": 128, "train.backbone": "strided_cnn",
                              "train.augment_colour": True},
    }.items()},
}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def environment(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING"))}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(work / "project" / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
            "GIT_AUTHOR_NAME": "bench", "GIT_COMMITTER_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "bench@example.invalid", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
    return env


def prepare(work: Path, images: int, env: dict[str, str]) -> Path:
    """The benchmark project in `work/project`: a clone of HEAD with the hard sample committed."""
    repo = work / "project"
    if (repo / ".git").is_dir():
        return repo
    work.mkdir(parents=True, exist_ok=True)
    run(["git", "clone", "-q", str(ROOT), str(repo)], work, env)
    import yaml

    overrides = {**HARD, "sample.n_images": images}
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    started = time.perf_counter()
    run(["dvc", "repro", "preprocess"], repo, env)
    print(f"hard benchmark data ({images} images): sample + split + preprocess in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", f"hard benchmark: {overrides}"], repo, env)
    return repo


def mlflow_run(env: dict[str, str], name: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string=f"tags.dvc_exp_name = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        sys.exit(f"no MLflow run for experiment {name!r}")
    return client, found[0]


def measure(repo: Path, env: dict[str, str], name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    args = sum((["-S", f"{k}={v}"] for k, v in overrides.items()), [])
    started = time.perf_counter()
    run(["dvc", "exp", "run", "--temp", "-n", name, *args], repo, env)
    wall = time.perf_counter() - started
    client, mlrun = mlflow_run(env, name)
    m, tags = mlrun.data.metrics, mlrun.data.tags
    per_class = pd.read_csv(client.download_artifacts(mlrun.info.run_id, "calibrate_per_class_test.csv"))
    rare = per_class.sort_values(["prevalence", "class"]).head(3)
    history = client.get_metric_history(mlrun.info.run_id, "epoch/val_auc_pr")
    curve = [p.value for p in sorted(history, key=lambda p: p.step)]
    cpu = [float(t) for t in tags.get("train.epoch_cpu_seconds", "").split(",") if t]
    return {"config": name, "overrides": json.dumps(overrides), "macro_f1_calibrated": m["test_calibrated/macro_f1"],
            "map": m["test/macro_ap"],
            "rare_f1": " ".join(f"{c}:{f:.2f}" for c, f in zip(rare["class"], rare["f1"])),
            "train_cpu_min": m.get("train/cpu_seconds", float("nan")) / 60,
            "train_wall_s": m.get("train/fit_seconds", float("nan")), "exp_wall_s": wall,
            "epochs": int(m.get("train/epochs_run", len(curve))), "curve": json.dumps([cpu, curve])}


def report(rows: list[dict[str, Any]], out: Path) -> str:
    import pandas as pd
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "quality.csv", index=False)
    shown = frame[["config", "macro_f1_calibrated", "map", "rare_f1", "train_cpu_min", "train_wall_s", "exp_wall_s",
                   "epochs"]]
    table = shown.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else shown.to_string(index=False)
    (out / "quality.md").write_text(table + "\n", encoding="utf-8")
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for row in rows:
        cpu, curve = json.loads(row["curve"])
        if cpu and len(cpu) == len(curve):
            best = pd.Series(curve).cummax()
            ax.plot([c / 60 for c in cpu], best, label=row["config"])
    ax.set_xlabel("train process CPU minutes (user + sys)")
    ax.set_ylabel("best validation AUC-PR so far")
    ax.set_title("Time to quality on the hard benchmark")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "time_to_quality.png", bbox_inches="tight")
    return table


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["defaults"], help="names in CONFIGS (--list shows them)")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlic-quality"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "quality")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for name, overrides in CONFIGS.items():
            print(f"{name:24} {overrides}")
        return 0
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    env = environment(args.workdir.resolve())
    repo = prepare(args.workdir.resolve(), args.images, env)
    rows = []
    previous = args.out / "quality.csv"
    if previous.is_file():  # configurations measured earlier stay in the table unless re-run
        import pandas as pd

        rows = [r for r in pd.read_csv(previous).to_dict("records") if r["config"] not in args.configs]
    for name in args.configs:
        print(f"{name}: dvc exp run --temp {CONFIGS[name]} ...", flush=True)
        row = measure(repo, env, name, CONFIGS[name])
        print(f"  macro-F1 cal {row['macro_f1_calibrated']:.3f}, mAP {row['map']:.3f}, rare {row['rare_f1']}, "
              f"train {row['train_cpu_min']:.1f} CPU-min, experiment {row['exp_wall_s']:.0f} s", flush=True)
        rows.append(row)
    print(report(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Screen one `train` configuration: the real train stage on shards that already exist.

Between `screen.py` (a hand-written loop, for architectures not in mlic yet) and
`bench/quality.py` (the whole pipeline, one MLflow run per configuration): this runs
`stages/train.py` itself, with the committed params.yaml plus `--set section.key=value`
overrides, in a scratch folder over `--tf` (the hard benchmark's shards from a `bench/quality.py`
work folder: `<workdir>/project/data/tfrecords`). It prints the best validation AUC-PR, the mean
of the last five epochs, the last training AUC-PR and the stage's CPU minutes (user + sys), and
leaves the model and history in the scratch folder. Short screens (`--set train.epochs=40`) rank
changes for a quarter of a full run's time; two run side by side on 2 cores.

Run:  python bench/screen/stage.py --tf SHARDS --name wd05 --set train.epochs=40 --set train.weight_decay=0.05
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tf", required=True, type=Path, help="folder of train/val shards and manifests")
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mlic-screens")
    args = ap.parse_args(argv)

    work = args.workdir / args.name
    (work / "data").mkdir(parents=True, exist_ok=True)
    link = work / "data" / "tfrecords"
    if not link.exists():
        link.symlink_to(args.tf.resolve())
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    params["train"]["resume"] = False  # a screen starts from scratch every time
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    outs = {"--model": "models/model.keras", "--meta": "models/model_meta.json", "--summary": "models/summary.txt",
            "--history": "history.csv", "--metrics": "metrics.json"}
    cmd = [sys.executable, str(ROOT / "stages" / "train.py"), "--tfrecords", "data/tfrecords",
           *[part for flag, path in outs.items() for part in (flag, path)]]
    with open(work / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        print(f"{args.name}: train exited {code}; see {work / 'log.txt'}", file=sys.stderr)
        return code
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    h = pd.read_csv(work / "history.csv")
    print(f"{args.name}: best val AUC-PR {h.val_auc_pr.max():.3f}, last 5 {h.val_auc_pr.tail(5).mean():.3f}, "
          f"train AUC-PR {h.auc_pr.iloc[-1]:.3f}, {len(h)} epochs, "
          f"{(used.ru_utime + used.ru_stime) / 60:.1f} CPU-min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

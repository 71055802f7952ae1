"""TensorFlow's op threads on a CPU: `train.intra_op_threads: auto` (cores - 1) against 0
(TensorFlow's default, one per core), the real train stage on the hard benchmark's shards.

Each variant runs `stages/train.py` through `bench/screen/stage.py` for a few epochs (progressive
resizing keeps its split: half small, half full size), one after the other, so run it on a quiet
machine. Printed per variant: CPU seconds (user + sys) per small and per full-size epoch (the
mean of all but each part's first epoch, which traces the graph), the fit's wall time and the
stage's CPU; then auto's ratios to the default. The two variants train different weights (a
sum split over other threads rounds differently), so compare costs here, quality in
`bench/quality.py`.

Run:  python bench/threads.py --tf /tmp/mlic-quality/project/data/tfrecords [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"default (0)": 0, "auto": "auto"}


def measure(tf_dir: Path, epochs: int, value: object, name: str, workdir: Path) -> dict[str, float]:
    cmd = [sys.executable, str(ROOT / "bench" / "screen" / "stage.py"), "--tf", str(tf_dir), "--name", name,
           "--workdir", str(workdir), "--set", f"train.epochs={epochs}", "--set", "train.early_stopping_patience=0",
           "--set", f"train.intra_op_threads={value}"]
    subprocess.run(cmd, check=True)
    facts = json.loads((workdir / name / ".mlic" / "stages" / "train.json").read_text())["facts"]
    ends = [0.0, *(float(t) for t in facts["epoch_cpu_seconds"].split(","))]
    per_epoch = [b - a for a, b in zip(ends, ends[1:])]
    small = epochs // 2 if facts["progressive"] != "off" else 0
    parts = [per_epoch[:small], per_epoch[small:]]
    return {"threads": facts["intra_op_threads"],
            "small_epoch_cpu_s": sum(parts[0][1:]) / max(len(parts[0]) - 1, 1) if small else float("nan"),
            "full_epoch_cpu_s": sum(parts[1][1:]) / max(len(parts[1]) - 1, 1),
            "fit_wall_s": float(facts["fit_seconds"]), "stage_cpu_s": float(facts["cpu_seconds"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tf", required=True, type=Path, help="folder of train/val shards (bench/quality.py's)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mlic-threads")
    args = ap.parse_args(argv)
    rows = {label: measure(args.tf, args.epochs, value, f"threads-{value}", args.workdir)
            for label, value in VARIANTS.items()}
    keys = ["threads", "small_epoch_cpu_s", "full_epoch_cpu_s", "fit_wall_s", "stage_cpu_s"]
    print(f"{'variant':14}" + "".join(f"{k:>19}" for k in keys))
    for label, row in rows.items():
        print(f"{label:14}" + "".join(f"{row[k]:>19.1f}" for k in keys))
    base, auto = rows["default (0)"], rows["auto"]
    print(f"{'auto / default':14}" + f"{'':>19}" + "".join(f"{auto[k] / base[k]:>19.2f}" for k in keys[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and peak memory of the `preprocess` stage: dataset sizes x runners (local, ray) x workers.

Runs the stage the way DVC does (`python stages/preprocess.py --params ... --splits-dir ... --out
... --metrics ...`) in a subprocess, with a params.yaml written to a temp folder: the project's
own common/data/preprocess sections, with data paths pointing at the benchmark images and
`preprocess.runner` and `preprocess.workers` set per run (ray: a local Ray instance with that many
CPUs, started and stopped by the stage, as `dvc repro` would). Reports, per (size, runner, workers):
  wall s      the subprocess from start to exit, as `dvc repro` sees it (Python and imports too)
  stage s     the stage's own "preprocess done in" time (from its log): the image work, plus
              the worker spawn (or Ray's start) that happens inside it
  img/s       records written / stage s
  CPU %       CPU seconds of the stage and its workers (getrusage RUSAGE_CHILDREN) / wall s
  peak RSS    the largest sum of RSS over the stage process and its worker processes (with Ray,
              its GCS, raylet and workers too), sampled every 250 ms (shared library pages count
              once per process: an upper bound)
  peak USS    the same with USS, the pages private to each process (a lower bound)
then the ratios: peak memory 20k/2k per runner and worker count (~1 means memory does not grow
with the dataset), the 2-worker/1-worker speed-up per runner, ray against local at the same
workers, the steady-state rate (extra images / extra seconds between the two sizes, which cancels
start-up: imports, worker spawn, Ray's start), and shard bytes against raw-pixel bytes. The stage
also checks that every run's shards are the same bytes (the first run's manifests are the reference).

Images are drawn once per size by mlic.sample.generate_sample into --data-root (cached across
runs); all images go into the three split CSVs (5 % val, 5 % test, the rest train).

Run:  python bench/preprocess.py [--sizes 2000 20000] [--runners local ray] [--workers 1 2]
      [--repeats 2] [--size PX] [--data-root /tmp/mlic_bench]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import yaml

from mlic.sample import generate_sample

ROOT = Path(__file__).resolve().parents[1]


def ensure_dataset(root: Path, n: int) -> tuple[Path, Path]:
    """(sample folder, splits folder) for `n` images under `root`, made on first use."""
    sample, splits = root / f"sample_{n}", root / f"splits_{n}"
    if not (sample / "labels.csv").is_file():
        print(f"generating {n} images in {sample} (once; cached) ...", flush=True)
        generate_sample(sample, n, seed=42, min_size=112, max_size=176, workers=0)
    if not (splits / "test.csv").is_file():
        frame = pd.read_csv(sample / "labels.csv")
        m = max(1, n // 20)
        splits.mkdir(parents=True, exist_ok=True)
        for name, part in (("val", frame[:m]), ("test", frame[m:2 * m]), ("train", frame[2 * m:])):
            part.to_csv(splits / f"{name}.csv", index=False)
    return sample, splits


def write_params(path: Path, sample: Path, runner: str, workers: int, size: int | None) -> dict:
    """The project's common/data/preprocess sections, pointed at `sample`, with runner, workers (and size)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params = {k: dict(raw.get(k) or {}) for k in ("common", "data", "preprocess")}
    params["data"].update(labels_csv=str(sample / "labels.csv"), images_dir=str(sample / "images"))
    params["preprocess"].update(workers=workers, runner=runner, ray_address=None)
    if size:
        params["preprocess"]["image_size"] = size
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return params["preprocess"]


def tree_memory(parent: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of USS) in bytes over `parent` and its descendants."""
    rss = uss = 0
    for p in [parent, *parent.children(recursive=True)]:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, uss = rss + m.rss, uss + m.uss
    return rss, uss


def run_stage(params: Path, splits: Path, out: Path, metrics: Path) -> dict[str, float]:
    """Run the stage: wall s, stage s (from its log), CPU s, peak tree RSS and USS bytes."""
    cmd = [sys.executable, "stages/preprocess.py", "--params", str(params), "--splits-dir", str(splits),
           "--out", str(out), "--metrics", str(metrics)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryFile() as log:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        parent, peak_rss, peak_uss = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                rss, uss = tree_memory(parent)
            except psutil.NoSuchProcess:  # the stage exited between poll() and the sample
                break
            peak_rss, peak_uss = max(peak_rss, rss), max(peak_uss, uss)
            # Not more often: reading USS (/proc/<pid>/smaps) of Ray's ~10 processes every 20 ms
            # took a core's worth of CPU and slowed the Ray runs it measured by a third or more.
            time.sleep(0.25)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and, through it, its workers
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess failed ({proc.returncode}):\n{text[-3000:]}")
    found = re.search(r"preprocess done in ([0-9.]+) s", text)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "stage": float(found.group(1)) if found else wall, "cpu": cpu, "rss": peak_rss,
            "uss": peak_uss}


def measure(data: dict[int, tuple[Path, Path]], runners: list[str], workers: list[int], repeats: int,
            size: int | None) -> dict[tuple, dict]:
    """Run the stage `repeats` times per (size, runner, workers); lists of wall/stage seconds and peaks."""
    results: dict[tuple[int, str, int], dict] = {}
    reference: dict[int, dict[str, str]] = {}  # per size: the manifests every run must reproduce
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        params, out, metrics = tmp / "params.yaml", tmp / "tfrecords", tmp / "metrics.json"
        for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits every case alike
            for n, (sample, splits) in data.items():
                for runner, w in [(r, w) for r in runners for w in workers]:
                    px = write_params(params, sample, runner, w, size)["image_size"]
                    run = run_stage(params, splits, out, metrics)
                    manifests = {f.name: f.read_text() for f in out.glob("*.manifest.json")}
                    if reference.setdefault(n, manifests) != manifests:
                        raise RuntimeError(f"{runner} with {w} worker(s) wrote other shards than the first run")
                    r = results.setdefault((n, runner, w), {"size": px})
                    r["records"] = sum(v["records"] for v in json.loads(metrics.read_text()).values())
                    r["shard_bytes"] = sum(f.stat().st_size for f in out.glob("*.tfrecord"))
                    shutil.rmtree(out)
                    for key, value in run.items():
                        r.setdefault(key, []).append(value)
    return results


def report(results: dict[tuple, dict], sizes: list[int], runners: list[str], workers: list[int]) -> None:
    mib = 2**20
    header = (f"{'images':>7} {'runner':>6} {'workers':>7} {'wall s':>14} {'stage s':>14} {'img/s':>7} {'CPU %':>6} "
              f"{'peak RSS MiB':>12} {'peak USS MiB':>12}")
    print(header + "\n" + "-" * len(header))
    for (n, runner, w), r in results.items():
        wall, stage = min(r["wall"]), min(r["stage"])
        cpu = 100 * r["cpu"][r["wall"].index(wall)] / wall  # of the fastest run
        print(f"{n:>7,} {runner:>6} {w:>7} {wall:>6.1f} ({statistics.median(r['wall']):>5.1f}) {stage:>6.1f} "
              f"({statistics.median(r['stage']):>5.1f}) {r['records'] / stage:>7,.0f} {cpu:>6.0f} "
              f"{max(r['rss']) / mib:>12,.0f} {max(r['uss']) / mib:>12,.0f}")
    print()
    small, large = min(sizes), max(sizes)
    lo, hi = min(workers), max(workers)
    for runner in runners:
        steady = {}
        for w in workers if small != large else []:
            a, b = results[small, runner, w], results[large, runner, w]
            steady[w] = (b["records"] - a["records"]) / (min(b["stage"]) - min(a["stage"]))
            print(f"{runner}, {w} worker(s): peak memory {large:,}/{small:,} images = "
                  f"{max(b['rss']) / max(a['rss']):.2f}x RSS, {max(b['uss']) / max(a['uss']):.2f}x USS; "
                  f"steady-state {steady[w]:,.0f} img/s")
        for n in sizes if lo != hi else []:
            a, b = results[n, runner, lo], results[n, runner, hi]
            print(f"{runner}: speed-up {hi} vs {lo} worker(s), {n:,} images: {min(a['wall']) / min(b['wall']):.2f}x "
                  f"end to end (wall), {min(a['stage']) / min(b['stage']):.2f}x stage time")
        if lo != hi and len(steady) > 1:
            print(f"{runner}: speed-up {hi} vs {lo} worker(s), steady state: {steady[hi] / steady[lo]:.2f}x")
    if "local" in runners:
        for other in [r for r in runners if r != "local"]:
            for n in sizes:
                for w in workers:
                    a, b = results[n, "local", w], results[n, other, w]
                    print(f"{other} vs local, {n:,} images, {w} worker(s): {min(a['wall']) / min(b['wall']):.2f}x "
                          f"the speed end to end, {max(b['rss']) / max(a['rss']):.2f}x the peak RSS")
    for n in sizes:
        r = results[n, runners[0], workers[0]]
        raw = r["records"] * r["size"] ** 2 * 3
        print(f"{n:,} images: shards {r['shard_bytes'] / mib:.1f} MiB vs raw uint8 pixels "
              f"{raw / mib:.1f} MiB ({r['size']} px): {r['shard_bytes'] / raw:.3f} of raw "
              f"(1/{raw / r['shard_bytes']:.1f})")


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_ceiling(n: int = 20_000_000) -> float:
    """How far this machine itself scales: a pure-Python CPU loop twice in one process vs in 2.

    Two vCPUs may be hyper-threads of one core, and other load takes its share: this is the most
    any 2-worker speed-up can show here, measured just before the stage runs.
    """
    import multiprocessing

    start = time.perf_counter()
    _spin(n), _spin(n)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [1000, 1000])  # started, before the clock
        start = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        parallel = time.perf_counter() - start
    return serial / parallel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--runners", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="runs per (size, workers): best time, max memory")
    ap.add_argument("--size", type=int, default=None,
                    help="preprocess.image_size (default: the project's params.yaml)")
    ap.add_argument("--data-root", type=Path, default=Path("/tmp/mlic_bench"),
                    help="where generated images and split CSVs are cached")
    args = ap.parse_args(argv)

    load = lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())  # noqa: E731
    print(f"CPUs: {os.cpu_count()} | Python {sys.version.split()[0]} | TensorFlow "
          f"{importlib.metadata.version('tensorflow')} (in the stage) | load average {load()}")
    data = {n: ensure_dataset(args.data_root, n) for n in args.sizes}
    ceiling = machine_ceiling()
    results = measure(data, args.runners, args.workers, args.repeats, args.size)
    print(f"\n{args.repeats} run(s) each: seconds are the best run (median in brackets), memory the "
          "largest;\nstage s includes worker (or Ray) start-up; img/s = records / stage s\n")
    report(results, args.sizes, args.runners, args.workers)
    print(f"this machine's own ceiling: a pure CPU loop runs {ceiling:.2f}x as fast in 2 processes as in 1 "
          f"(measured before the runs), {machine_ceiling():.2f}x after")
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

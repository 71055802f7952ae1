"""Prediction throughput: `mlic predict` against the per-image loop users write, and the served model.

Measures images per second on the pipeline's sample images (data/sample/images, 2,000 files of
various sizes; run `dvc repro` first), in one process, with the trained model (models/):

  Predictor.predict   Predictor.from_files(model.keras, model_meta.json, thresholds.json), then
                      predict(paths, batch_size=--batch): tf.data prepares the images (PIL, in
                      parallel threads) and the model is called on whole batches
  mlic predict (CLI)  mlic.cli.main(["predict", IMAGES, "--out", tmp.csv]) in-process: end to end,
                      model load, file search and the CSV included
  naive loop          the same model object, one image at a time: PIL open + convert("RGB"), the
                      model's resize (mlic.images.resize, same size and mode), a float32 batch of one,
                      model.predict(x, verbose=0); on the first --naive-images images only
Each route gets a warm-up call (the first model call traces), then --repeats timed runs, routes
taking turns; columns: img/s of the best run and the median, and the best as a multiple of the
naive loop's. The loop's labels are compared with Predictor.predict's on the same images.

Then the served model: a real `mlflow models serve -m models:/mlic@champion --env-manager local
-w 1` (MLFLOW_TRACKING_URI=sqlite:///<project>/mlflow.db), timed from start to GET /ping = 200;
--requests sequential single-image POST /invocations (one base64 file each, after 5 warm-ups):
p50/p95 latency, img/s = requests / total time; and 32-image requests (best and median of
--repeats passes of --batch-requests). Bodies are built before timing; each request opens a new
connection (urllib), as a simple client does. The server runs the model's own packaged mlic code.

Run:  python bench/predict.py [--batch 64] [--naive-images 200] [--repeats 3] [--requests 100]
      [--batch-requests 20] [--skip-serve]
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Before TensorFlow's import; keep the table readable and MLflow quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def timed(repeats: int, routes: dict[str, Callable[[], int]]) -> dict[str, list[float]]:
    """Images/s of each run: routes take turns, so a burst of load elsewhere hits them alike."""
    rates: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(repeats):
        for name, fn in routes.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return rates


def post(url: str, body: bytes, expect: int) -> float:
    """Seconds for one POST /invocations that must answer 200 with `expect` predictions."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        payload = response.read()
    seconds = time.perf_counter() - t0
    rows = json.loads(payload)["predictions"]
    assert response.status == 200 and len(rows) == expect, (response.status, payload[:300])
    return seconds


def serve(paths: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Start the champion's server, measure latency and throughput, stop it (whatever happens)."""
    from mlic.serving import model_server, request_body as body

    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ROOT / 'mlflow.db'}",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    b64 = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
    singles = [body([b64[i % len(b64)]]) for i in range(args.requests + 5)]
    batches = [body(b64[(32 * i) % len(b64):][:32]) for i in range(args.batch_requests + 2)]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        t0 = time.perf_counter()
        with model_server("models:/mlic@champion", cwd=ROOT, env=env, log_path=Path(tmp) / "serve.log") as server:
            startup = time.perf_counter() - t0
            url = server.url
            print(f"server up in {startup:.1f} s (start to /ping 200)", flush=True)
            for b in singles[:5]:  # warm-up
                post(url + "/invocations", b, 1)
            latency = np.array([post(url + "/invocations", b, 1) for b in singles[5:]]) * 1000
            for b in batches[:2]:
                post(url + "/invocations", b, 32)
            rates = [32 * args.batch_requests / sum(post(url + "/invocations", b, 32) for b in batches[2:])
                     for _ in range(args.repeats)]
    return {"startup": startup, "p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95)),
            "single": 1000 * len(latency) / float(latency.sum()), "batch": max(rates),
            "batch_med": statistics.median(rates)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=ROOT / "data/sample/images")
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="model.keras + model_meta.json")
    ap.add_argument("--thresholds", type=Path, default=ROOT / "reports/calibrate/thresholds.json")
    ap.add_argument("--batch", type=int, default=64, help="Predictor.predict / CLI batch size")
    ap.add_argument("--naive-images", type=int, default=200, help="images the per-image loop predicts")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per route, after one warm-up")
    ap.add_argument("--requests", type=int, default=100, help="single-image requests for latency")
    ap.add_argument("--batch-requests", type=int, default=20, help="32-image requests per throughput pass")
    ap.add_argument("--skip-serve", action="store_true", help="skip the served-model part")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # before mlic.cli's setup_logging: no INFO lines
    import tensorflow as tf
    from PIL import Image

    from mlic import cli, images
    from mlic.inference import Predictor
    from mlic.predictions import round_probabilities

    load = lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"CPUs: {os.cpu_count()} | TensorFlow {tf.__version__} | load average {load()}")
    paths, _ = cli.expand_inputs([str(args.images)])
    t0 = time.perf_counter()
    predictor = Predictor.from_files(args.models / "model.keras", args.models / "model_meta.json", args.thresholds)
    model, size, mode = predictor.model, predictor.meta.image_size, predictor.meta.resize_mode
    print(f"{len(paths)} images in {args.images}; model loaded in {time.perf_counter() - t0:.1f} s "
          f"({size} px, {mode}); batch {args.batch}; naive loop on {args.naive_images}; {args.repeats} timed runs\n")
    naive_paths = paths[:args.naive_images]

    def run_predictor() -> int:
        result = predictor.predict(paths, batch_size=args.batch)
        assert len(result.index) == len(paths) and not result.errors, result.errors
        return len(paths)

    def run_naive(subset: list[str] = naive_paths, out: list[np.ndarray] | None = None) -> int:
        for path in subset:
            pixels = images.resize(Image.open(path).convert("RGB"), size, mode)
            probs = model.predict(np.asarray(pixels)[None].astype("float32"), verbose=0)
            if out is not None:
                out.append(probs[0])
        return len(subset)

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        csv = Path(tmp) / "predictions.csv"

        def run_cli(inputs: list[str] | None = None) -> int:
            code = cli.main(["predict", *(inputs or [str(args.images)]), "--model", str(args.models),
                             "--batch-size", str(args.batch), "--out", str(csv)])
            assert code == 0, f"mlic predict exited with {code}"
            return sum(1 for _ in csv.open()) - 1

        # Warm-ups: tf.data + the model's first call, the CLI's imports, model.predict's function.
        predictor.predict(paths[:args.batch], batch_size=args.batch)
        run_cli(paths[:2])
        run_naive(paths[:1])
        routes = {"Predictor.predict": run_predictor, "mlic predict (CLI)": run_cli, "naive loop": run_naive}
        rates = timed(args.repeats, routes)
        assert run_cli() == len(paths)
    naive_probs: list[np.ndarray] | np.ndarray = []
    run_naive(out=naive_probs)
    ref = predictor.predict(naive_paths, batch_size=args.batch)
    naive_probs = round_probabilities(np.stack(naive_probs))
    diff = np.abs(naive_probs - ref.probabilities).max(axis=1)
    changed = sum(a != b for a, b in zip(predictor.labels(naive_probs), ref.labels))
    print(f"naive loop vs Predictor.predict on {len(naive_paths)} images: labels differ on {changed}; |prob diff| "
          f"median {np.median(diff):.3f}, max {diff.max():.3f} (the loop skips EXIF orientation and the JPEG "
          "round trip the model was trained on)")

    served = None if args.skip_serve else serve(paths, args)
    best = {name: max(v) for name, v in rates.items()}
    med = {name: statistics.median(v) for name, v in rates.items()}
    naive = best["naive loop"]
    header = f"{'route':<30} {'images':>6} {'img/s best':>10} {'median':>7} {'x naive':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    counts = {"Predictor.predict": len(paths), "mlic predict (CLI)": len(paths), "naive loop": len(naive_paths)}
    for name in rates:
        print(f"{name:<30} {counts[name]:>6} {best[name]:>10,.0f} {med[name]:>7,.0f} {best[name] / naive:>7.1f}x")
    if served:
        print(f"{'served, 1 image/request':<30} {args.requests:>6} {served['single']:>10,.0f} {'':>7} "
              f"{served['single'] / naive:>7.1f}x")
        print(f"{'served, 32 images/request':<30} {32 * args.batch_requests:>6} {served['batch']:>10,.0f} "
              f"{served['batch_med']:>7,.0f} {served['batch'] / naive:>7.1f}x")
    print(f"\nmlic Predictor.predict / naive loop = {best['Predictor.predict'] / naive:.1f}x; "
          f"mlic predict CLI (load + CSV included) / naive loop = {best['mlic predict (CLI)'] / naive:.1f}x")
    if served:
        print(f"served: start-up {served['startup']:.1f} s; 1-image latency p50 {served['p50']:.1f} ms, "
              f"p95 {served['p95']:.1f} ms; 32-image requests "
              f"{served['batch']:,.0f} img/s = {served['batch'] / best['Predictor.predict']:.2f}x Predictor.predict")
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

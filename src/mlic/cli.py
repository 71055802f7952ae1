"""The `mlic` command. `mlic predict PATH... --model M --out predictions.csv` labels new images.

PATH: image files, folders (searched recursively for image files) and globs (quoted globs are
expanded here, `**` included). --model: the pipeline's models folder (default `models`, with
thresholds from calibrate as model_meta.json says), a packaged MLflow model folder, or an MLflow
URI (`runs:/<run id>`: the model that run logged, `models:/<name>@champion`, `models:/<name>/<version>`).
Writes one row per readable image: filename, labels, prob_<class>... as CSV, or JSON if --out
ends in .json. Unreadable images are logged with their reason (and listed in
`<out stem>.errors.csv`); the rest are still predicted. An image with more pixels than
data.max_image_pixels (params.yaml's; a packaged model carries its run's) is one of those, refused
before decoding, as split refuses it. Exit code: 0 all predicted, 1 some inputs
failed, 2 a usage error (no model, nothing to predict).
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlic.errors import UserError, disk_error

log = logging.getLogger("mlic.predict")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(UserError):
    """The command cannot run as asked; the message says what to do."""


def _images_in(folder: Path) -> list[str]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are left out."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).parts
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not any(p.startswith(".") for p in rel):
            found.append(str(path))
    return sorted(found)


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files to predict (in order, each once) and the arguments that matched nothing, with why.

    A file named explicitly is tried whatever its extension; folders and globs keep image files.
    """
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = _images_in(path)
            if not found:
                problems.append((arg, "folder holds no image files (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"))
            files += found
        elif path.is_file():
            files.append(arg)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            found = []
            for match in matches:
                if Path(match).is_dir():
                    found += _images_in(Path(match))
                elif Path(match).suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(match)
            if not found:
                problems.append((arg, "no image file matches this pattern"))
            files += found
        else:
            problems.append((arg, "no such file or folder"))
    return list(dict.fromkeys(files)), problems


def _tracking_uri(params_path: Path) -> str:
    from mlic.params import load_section
    from mlic.store import resolve_tracking_uri

    params_uri = load_section("tracking", params_path).uri if params_path.is_file() else None
    return resolve_tracking_uri(params_uri)


def _max_image_pixels(params_path: Path) -> int:
    """data.max_image_pixels of the project's params (its default without a params file)."""
    from mlic.params import Data, load_section

    return load_section("data", params_path).max_image_pixels if params_path.is_file() else Data.max_image_pixels


def _thresholds_path(models_dir: Path, source: str) -> Path:
    """model_meta.json's `thresholds` is relative to the project root: the cwd, or models/'s parent."""
    candidates = [Path(source)] if Path(source).is_absolute() else [Path.cwd() / source, models_dir.parent / source]
    for path in candidates:
        if path.is_file():
            return path
    raise UsageError(f"calibrated thresholds not found at {' or '.join(str(p) for p in candidates)} "
                     "(named by model_meta.json); run `dvc repro calibrate`, or pass --thresholds FILE")


def load_predictor(model: str, thresholds: str | None, params_path: Path) -> Any:
    """A Predictor for --model: a models folder, a packaged MLflow model folder, or an MLflow URI.

    Whatever stops the model from loading (a missing or mismatched file, an unknown URI) is a
    UsageError naming it.
    """
    try:
        return _load_predictor(model, thresholds, params_path)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        if type(exc).__name__ == "MlflowException":  # a URI MLflow cannot resolve
            raise UsageError(f"--model {model}: {getattr(exc, 'message', exc)}") from None
        raise


def _load_predictor(model: str, thresholds: str | None, params_path: Path) -> Any:
    from mlic.inference import KERAS_FILE, META_FILE, Predictor

    path = Path(model)
    if path.is_dir() and (path / META_FILE).is_file():
        if not (path / KERAS_FILE).is_file():
            raise UsageError(f"{path / KERAS_FILE}: not found; run `dvc repro train`")
        from mlic.model_meta import ModelMeta

        meta = ModelMeta.read(path / META_FILE)
        source = Path(thresholds) if thresholds else _thresholds_path(path, meta.thresholds)
        return Predictor.from_files(path / KERAS_FILE, path / META_FILE, source, _max_image_pixels(params_path))
    if thresholds:
        raise UsageError("--thresholds applies to a models folder only: a packaged model carries its own")
    if path.is_dir() and (path / "MLmodel").is_file():
        from mlic import serving

        return serving.load_predictor(str(path))
    if "://" in model or model.startswith(("runs:/", "models:/")):
        from mlic import serving

        uri = _tracking_uri(params_path)
        return serving.load_predictor(model, tracking_uri=uri)
    raise UsageError(f"--model {model}: not a models folder (with {META_FILE}), an MLflow model folder "
                     "(with MLmodel), or an MLflow URI such as models:/<name>@champion")


def _labels_separator(classes: Sequence[str]) -> str:
    """Space, as in a tags-format labels CSV, unless a class name holds one."""
    return ";" if any(" " in c for c in classes) else " "


def write_results(out: Path, filenames: list[str], classes: list[str], labels: list[list[str]],
                  probabilities: Any) -> None:
    """CSV (labels joined by a space, or `;` if a class name has one) or JSON records (labels a list)."""
    from mlic.atomic import write_csv, write_json
    from mlic.inference import LABELS_COLUMN, output_frame

    frame = output_frame(classes, labels, probabilities)
    frame.insert(0, "filename", filenames)
    if out.suffix.lower() == ".json":
        write_json(out, frame.to_dict(orient="records"), sort_keys=False)
    else:
        frame[LABELS_COLUMN] = frame[LABELS_COLUMN].map(_labels_separator(classes).join)
        write_csv(out, frame)


def predict_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--out {out}: use a .csv or .json file name")
    files, problems = expand_inputs(args.paths)
    for arg, reason in problems:
        log.error("%s: %s", arg, reason)
    if not files:
        raise UsageError("nothing to predict: no image file among the given paths")
    predictor = load_predictor(args.model, args.thresholds, Path(args.params))

    from tqdm import tqdm

    # tqdm(disable=None) draws only on an interactive terminal: logs and CI stay clean.
    with tqdm(total=len(files), unit="img", desc="predict", disable=None, file=sys.stderr) as bar:
        result = predictor.predict(files, batch_size=args.batch_size, on_batch=bar.update)
    for i, reason in result.errors.items():
        log.error("%s: cannot be read (%s)", files[i], reason)
    write_results(out, [files[i] for i in result.index], predictor.classes, result.labels,
                  result.probabilities)
    failed = [(files[i], reason) for i, reason in result.errors.items()] + problems
    errors_file = out.with_name(out.stem + ".errors.csv")
    if failed:
        import pandas as pd

        from mlic.atomic import write_csv

        write_csv(errors_file, pd.DataFrame(failed, columns=["path", "reason"]))
    else:
        errors_file.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    log.info("predicted %d image(s) into %s%s", len(result.index), out,
             f"; {len(failed)} failed, listed in {errors_file}" if failed else "")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def check_command(args: argparse.Namespace) -> int:
    """Exit 0 if runs can be logged to the tracking store (TrackingUnavailable: 2, with the reason)."""
    from mlic.store import check_store, redact_uri

    uri = _tracking_uri(Path(args.params))
    check_store(uri, args.timeout)
    log.info("MLflow tracking store %s is usable", redact_uri(uri))
    return EXIT_OK


def init_command(args: argparse.Namespace) -> int:
    from mlic.project import init_project, next_steps

    result = init_project(Path.cwd(), args.labels, args.images, fmt=args.format, tags_column=args.tags_column,
                          delimiter=args.delimiter, filename_column=args.filename_column,
                          skip_bad_images=True if args.skip_bad_images else None)
    table, data = result.labels, result.data
    log.info("checked %s: %d images, %d classes (%s)%s", data["labels_csv"], len(table.filenames),
             len(table.classes), ", ".join(table.classes[:8]) + (", ..." if len(table.classes) > 8 else ""),
             f"; {result.skipped} rows with unusable images will be skipped and listed" if result.skipped else "")
    log.info("params.yaml: data.labels_csv %s, data.images_dir %s, data.format %s", data["labels_csv"],
             data["images_dir"], data["format"])
    log.info("dvc.yaml: %s", "the sample stage is removed (it only made the built-in sample)"
             if result.sample_removed else "no sample stage (removed before)")
    print("Next:\n" + "\n".join(f"  {line}" for line in next_steps(result)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlic", description="mlic: multi-label image classification.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="label image files with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    p.add_argument("--model", default="models",
                   help="models folder, packaged MLflow model folder, or runs:/ or models:/ URI (default: models)")
    p.add_argument("--out", default="predictions.csv", help=".csv or .json (default: predictions.csv)")
    p.add_argument("--thresholds", help="thresholds.json to use with a models folder (default: model_meta.json's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--params", default="params.yaml", help="for tracking.uri with an MLflow URI, and data.max_image_pixels with a "
                   "models folder (default: params.yaml)")
    p.set_defaults(func=predict_command)
    i = sub.add_parser("init", help="point this project at your own labels CSV and images folder",
                       description="Check your labels CSV and images as split will, then set data.* in "
                       "params.yaml and remove the sample stage from dvc.yaml (comments kept). Run it in the "
                       "project root; nothing is written if the data has problems.")
    i.add_argument("--labels", required=True, help="the labels CSV, inside the project (e.g. data/labels.csv)")
    i.add_argument("--images", required=True, help="the folder the CSV's filenames are relative to")
    i.add_argument("--format", choices=["auto", "onehot", "tags"], default="auto",
                   help="auto (default): tags when the CSV has just the filename and tags columns, else onehot")
    i.add_argument("--tags-column", help="format tags: the column of tags (default: params.yaml's, 'tags')")
    i.add_argument("--delimiter", help="format tags: what separates tags (default: params.yaml's, a space)")
    i.add_argument("--filename-column", help="the column of filenames (default: params.yaml's, 'filename')")
    i.add_argument("--skip-bad-images", action="store_true",
                   help="skip rows whose image is missing or unusable (listed in reports/data/skipped.csv)")
    i.set_defaults(func=init_command)
    c = sub.add_parser("check", help="check that runs can be logged to the MLflow tracking store",
                       description="Resolve the tracking store as `track` does (MLFLOW_TRACKING_URI, else "
                       "tracking.uri in params.yaml, else the project's mlflow.db) and check it: a SQLite file's "
                       "folder and schema; a server's /health and one API call. Exit 0 if usable, else 2 "
                       "with the reason.")
    c.add_argument("--params", default="params.yaml", help="for tracking.uri (default: params.yaml)")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a server (default: 5)")
    c.set_defaults(func=check_command)
    return ap


def main(argv: list[str] | None = None) -> int:
    from mlic.stage import setup_logging

    if argv is None:  # the `mlic` command (tests pass argv and keep pytest's stderr)
        from mlic.console import quiet_tensorflow

        quiet_tensorflow()
    args = build_parser().parse_args(argv)
    setup_logging()
    if getattr(args, "batch_size", 1) < 1:
        log.error("--batch-size must be at least 1")
        return EXIT_USAGE
    try:
        return args.func(args)
    except UserError as exc:  # UsageError, and any input error raised below the command
        log.error("%s", exc)
        return EXIT_USAGE
    except OSError as exc:  # a full disk or an unwritable --out is the machine's, not a bug
        if (disk := disk_error(exc)) is None:
            raise
        log.error("%s", disk)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

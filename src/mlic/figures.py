"""The pictures of one pipeline run, drawn from its report files (PNG, for the MLflow run).

Each function takes the tables the stages wrote and returns a matplotlib `Figure`; `draw_all`
saves the ones whose inputs exist. Figures are built with `matplotlib.figure.Figure`, never
pyplot, so no GUI backend or global state is involved. Per-class panels are small multiples
(one panel per class, fixed column count): with 30 classes one tangle of coloured lines
would be unreadable.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mlic.atomic import require_files
from mlic.calibration import threshold_mapping

log = logging.getLogger(__name__)

COLUMNS = 5
DPI = 100
# Keras history columns drawn, by panel: (title, [(column, label)]).
CURVE_PANELS = (
    ("Loss", [("loss", "train"), ("val_loss", "validation")]),
    ("AUC-PR", [("auc_pr", "train"), ("val_auc_pr", "validation")]),
    ("F1 at 0.5", [("f1", "train"), ("val_f1", "validation")]),
    ("Learning rate", [("learning_rate", "learning rate")]),
)


# The precision-recall panels' horizontal line: a ranker that orders images at random has, at
# every recall, a precision equal to the class's prevalence.
RANDOM_RANKER = "random ranker (precision = the class's prevalence in test)"
RANDOM_RANKER_STYLE = {"color": "grey", "linestyle": ":", "linewidth": 1}

# Report-table columns that hold text; every other column is read as numbers.
TEXT_COLUMNS = ("class", "rule", "probabilities")


def _grid(n: int, title: str, panel_w: float = 2.6, panel_h: float = 2.2,
          key_h: float = 0.0) -> tuple[Figure, list]:
    """`n` panels under `title`; `key_h` inches between title and panels for a figure-level key."""
    cols = min(COLUMNS, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    height = panel_h * rows + 0.6 + key_h
    # Fixed margins rather than a layout engine: one drawing pass instead of two (track's time).
    fig = Figure(figsize=(panel_w * cols, height), dpi=DPI)
    fig.subplots_adjust(left=0.55 / (panel_w * cols), right=1 - 0.15 / (panel_w * cols), bottom=0.55 / height,
                        top=1 - (0.75 + key_h) / height, wspace=0.38, hspace=0.75)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, y=1 - 0.1 / height)  # in inches from the top, whatever the height
    return fig, axes[:n]


def learning_curves(history: pd.DataFrame) -> Figure:
    """Loss, AUC-PR, F1 and learning rate per epoch, train beside validation."""
    panels = [(t, [(c, lab) for c, lab in cols if c in history.columns]) for t, cols in CURVE_PANELS]
    panels = [(t, cols) for t, cols in panels if cols]
    fig, axes = _grid(len(panels), "Training per epoch", panel_w=3.6, panel_h=2.8)
    for ax, (title, cols) in zip(axes, panels):
        for column, label in cols:
            ax.plot(history["epoch"], history[column], label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(cols) > 1:
            ax.legend(fontsize="small")
    return fig


def pr_curves(curves: pd.DataFrame, per_class: pd.DataFrame | None = None) -> Figure:
    """Test precision-recall curve per class (interpolated), with AP and prevalence when known."""
    classes = list(dict.fromkeys(curves["class"]))
    info = per_class.set_index("class") if per_class is not None else None
    baseline = info is not None and any(name in info.index for name in classes)
    # The dotted line is named once, in a key under the title, not in a legend per panel: with
    # 10-30 panels of 2.6 inches a legend would cover part of each curve (which can pass through
    # any corner) and repeat the same words 30 times; the line's height is the class's own value.
    fig, axes = _grid(len(classes), "Precision-recall per class (test)", key_h=0.3 if baseline else 0.0)
    for ax, name in zip(axes, classes):
        part = curves[curves["class"] == name]
        ax.plot(part["recall"], part["precision"], drawstyle="steps-post")
        title = str(name)
        if info is not None and name in info.index:
            row = info.loc[name]
            ax.axhline(row["prevalence"], label=RANDOM_RANKER, **RANDOM_RANKER_STYLE)
            title += f"  AP {row['ap']:.2f}" if math.isfinite(row["ap"]) else "  AP n/a"
        ax.set_title(title, fontsize="medium")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    if baseline:
        height = fig.get_figheight()
        fig.legend(handles=[Line2D([], [], **RANDOM_RANKER_STYLE)], labels=[RANDOM_RANKER], loc="upper center",
                   bbox_to_anchor=(0.5, 1 - 0.42 / height), frameon=False, fontsize="small", handlelength=3)
    return fig


def f1_per_class(default: pd.DataFrame, calibrated: pd.DataFrame, default_threshold: float) -> Figure:
    """Test F1 per class at the default threshold beside the calibrated thresholds."""
    both = default[["class", "f1", "support"]].merge(
        calibrated[["class", "f1"]], on="class", suffixes=("_default", "_calibrated"))
    both = both.sort_values("f1_calibrated", kind="stable")
    n = len(both)
    height = 1.5 + 0.32 * n
    fig = Figure(figsize=(7, height), dpi=DPI)
    # Top margin in inches: the title, and under it the legend in one row (outside the axes: the
    # bars are sorted ascending, and a legend inside would sit on the weakest classes').
    fig.subplots_adjust(left=0.28, right=0.97, bottom=0.6 / height, top=1 - 0.75 / height)
    ax = fig.subplots()
    y = range(n)
    ax.barh([i + 0.2 for i in y], both["f1_default"], height=0.4, label=f"at {default_threshold:g}")
    ax.barh([i - 0.2 for i in y], both["f1_calibrated"], height=0.4, label="at calibrated thresholds")
    ax.set_yticks(list(y), [f"{c} ({s})" for c, s in zip(both["class"], both["support"])])
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on test")
    ax.set_ylabel("class (test positives)")
    ax.set_title("Test F1 per class: default vs calibrated threshold", pad=22)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize="small",
              borderaxespad=0.2)
    return fig


def fbeta_vs_threshold(curves: pd.DataFrame, thresholds: Mapping[str, float], default_threshold: float,
                       beta: float | None = None) -> Figure:
    """Validation F-beta per class against the threshold, with the fitted threshold marked."""
    classes = list(dict.fromkeys(curves["class"]))
    what = "F1" if beta in (None, 1, 1.0) else f"F{beta:g}"
    fig, axes = _grid(len(classes), f"Validation {what} vs threshold per class "
                                    f"(red: fitted, grey: {default_threshold:g})")
    for ax, name in zip(axes, classes):
        part = curves[curves["class"] == name]
        ax.plot(part["threshold"], part["f_beta"])
        ax.axvline(default_threshold, color="grey", linestyle=":", linewidth=1)
        if name in thresholds:
            ax.axvline(thresholds[name], color="tab:red", linewidth=1)
            ax.set_title(f"{name}  t={thresholds[name]:.2f}", fontsize="medium")
        else:
            ax.set_title(str(name), fontsize="medium")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("threshold")
        ax.set_ylabel(what)
    return fig


def reliability(table: pd.DataFrame) -> Figure:
    """Test reliability diagram: observed frequency against mean predicted probability per bin,
    before and after temperature scaling, the diagonal being perfect calibration; ECE in the legend."""
    fig = Figure(figsize=(5.2, 4.6), dpi=DPI)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.9)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    for name, label in (("before", "as trained"), ("after", "after temperature scaling")):
        part = table[table["probabilities"] == name]
        if part.empty:
            continue
        ece = float((part["count"] / part["count"].sum() * (part["frequency"] - part["confidence"]).abs()).sum())
        ax.plot(part["confidence"], part["frequency"], marker="o", markersize=3,
                label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability in the bin")
    ax.set_ylabel("observed frequency of the label")
    ax.set_title("Reliability on test (all image x class pairs)")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def _read(path: Path) -> pd.DataFrame:
    """A report table: `class` stays text (pandas would read a class called `NA` as missing),
    every other column is a number, an empty cell (an undefined AP, say) NaN."""
    frame = pd.read_csv(path, dtype={"class": str}, keep_default_na=False)
    for column in frame.columns:
        if column not in TEXT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as PNG (no timestamp in the file).

    A class name in a script the default font lacks (CJK, say) is drawn as boxes, and matplotlib
    warns once per glyph; the names are exact in the CSV tables, so the warnings are dropped.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        # light compression: a third of the encoding time for a few kB more
        fig.savefig(path, format="png", metadata={"Software": None}, pil_kwargs={"compress_level": 1})
    return path


def draw_all(out_dir: Path, *, history: Path | None = None, pr_curves_csv: Path | None = None,
             per_class_default: Path | None = None, per_class_calibrated: Path | None = None,
             fbeta_csv: Path | None = None, thresholds_json: Path | None = None,
             reliability_csv: Path | None = None, default_threshold: float = 0.5,
             beta: float | None = None) -> dict[str, Path]:
    """Draw every figure whose inputs were given into `out_dir`; {file name: path}.

    A given input that does not exist is an error (FileNotFoundError, before anything is drawn).
    """
    require_files(((path, "report table") for path in (history, pr_curves_csv, per_class_default,
                                                        per_class_calibrated, fbeta_csv, thresholds_json,
                                                        reliability_csv)),
                  files_only=True)
    thresholds = (threshold_mapping(json.loads(Path(thresholds_json).read_text(encoding="utf-8")))
                  if thresholds_json else {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, Path] = {}

    def add(name: str, make: Callable[[], Figure]) -> None:
        # A picture is worth less than the run it illustrates: a failing figure is reported
        # (with its traceback, it is a bug) and the others are still drawn.
        try:
            drawn[name] = save(make(), out_dir / name)
        except Exception:  # noqa: BLE001
            log.warning("figure %s not drawn", name, exc_info=True)

    if history is not None:
        frame = pd.read_csv(history)
        if any(c in frame.columns for _, cols in CURVE_PANELS for c, _ in cols):
            add("learning_curves.png", lambda: learning_curves(frame))
    if pr_curves_csv is not None:
        per_class = _read(per_class_default) if per_class_default is not None else None
        add("pr_curves.png", lambda: pr_curves(_read(pr_curves_csv), per_class))
    if per_class_default is not None and per_class_calibrated is not None:
        add("f1_per_class.png", lambda: f1_per_class(_read(per_class_default), _read(per_class_calibrated),
                                                     default_threshold))
    if fbeta_csv is not None:
        add("fbeta_vs_threshold.png", lambda: fbeta_vs_threshold(_read(fbeta_csv), thresholds,
                                                                 default_threshold, beta))
    if reliability_csv is not None:
        add("reliability.png", lambda: reliability(_read(reliability_csv)))
    return drawn

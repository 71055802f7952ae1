"""mlic.figures: the run's PNG figures from the stages' report tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlic import calibration, figures, metrics, thresholds

CLASSES = ["NA", "dirt road", "野原"]   # names pandas would read as missing, spaces, non-ASCII


@pytest.fixture
def tables(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((80, 3)) < 0.3).astype(int)
    y[0] = 1
    p = np.clip(0.4 * y + 0.6 * rng.random((80, 3)), 0, 1)
    paths = {
        "history": tmp_path / "history.csv", "pr": tmp_path / "pr.csv", "default": tmp_path / "d.csv",
        "calibrated": tmp_path / "c.csv", "fbeta": tmp_path / "f.csv",
    }
    pd.DataFrame({"epoch": range(5), "loss": np.linspace(1, 0.5, 5), "val_loss": np.linspace(1.1, 0.6, 5),
                  "auc_pr": np.linspace(0.3, 0.7, 5), "val_auc_pr": np.linspace(0.3, 0.6, 5),
                  "learning_rate": np.linspace(0.003, 0, 5), "phase": "full"}).to_csv(paths["history"], index=False)
    metrics.pr_curve_table(y, p, CLASSES).to_csv(paths["pr"], index=False)
    metrics.per_class_table(y, p, CLASSES, 0.5).to_csv(paths["default"], index=False)
    fitted = thresholds.fit_thresholds(y, p)
    metrics.per_class_table(y, p, CLASSES, fitted).to_csv(paths["calibrated"], index=False)
    thresholds.fbeta_curve_table(y, p, CLASSES).to_csv(paths["fbeta"], index=False)
    paths["thresholds"] = tmp_path / "thresholds.json"
    paths["thresholds"].write_text(json.dumps(dict(zip(CLASSES, fitted))), encoding="utf-8")
    paths["reliability"] = tmp_path / "r.csv"
    calibration.reliability_long(y, p, calibration.apply(p, 1.5)).to_csv(paths["reliability"], index=False)
    return paths, dict(zip(CLASSES, fitted))


def test_draw_all_writes_five_real_pngs(tables, tmp_path):
    paths, fitted = tables
    drawn = figures.draw_all(tmp_path / "out", history=paths["history"], pr_curves_csv=paths["pr"],
                             per_class_default=paths["default"], per_class_calibrated=paths["calibrated"],
                             fbeta_csv=paths["fbeta"], thresholds_json=paths["thresholds"],
                             reliability_csv=paths["reliability"])
    assert sorted(drawn) == ["f1_per_class.png", "fbeta_vs_threshold.png", "learning_curves.png", "pr_curves.png",
                             "reliability.png"]
    for path in drawn.values():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200
            # not a blank canvas: something was drawn
            assert len(np.unique(np.asarray(im.convert("L")))) > 10


def test_one_panel_per_class_even_for_names_pandas_would_misread(tables):
    paths, fitted = tables
    fig = figures.pr_curves(figures._read(paths["pr"]), figures._read(paths["default"]))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert [t.split("  ")[0] for t in titles] == CLASSES
    assert all("AP " in t for t in titles)
    fig = figures.fbeta_vs_threshold(figures._read(paths["fbeta"]), fitted, 0.5, beta=2.0)
    assert fig.axes[0].get_ylabel() == "F2"


def test_only_figures_with_inputs_are_drawn(tables, tmp_path):
    paths, _ = tables
    assert list(figures.draw_all(tmp_path / "o", history=paths["history"])) == ["learning_curves.png"]


def test_a_class_without_positives_gets_no_ap_and_no_crash(tmp_path):
    rng = np.random.default_rng(1)
    y = (rng.random((30, 3)) < 0.4).astype(int)
    y[:, 2] = 0                                               # AP undefined: an empty cell in the CSV
    p = rng.random((30, 3))
    metrics.per_class_table(y, p, CLASSES, 0.5).to_csv(tmp_path / "d.csv", index=False)
    metrics.pr_curve_table(y, p, CLASSES).to_csv(tmp_path / "pr.csv", index=False)
    fig = figures.pr_curves(figures._read(tmp_path / "pr.csv"), figures._read(tmp_path / "d.csv"))
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()][0].startswith("NA  AP ")


def test_a_failing_figure_is_reported_and_the_others_drawn(tables, tmp_path, monkeypatch, caplog):
    paths, _ = tables

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(figures, "pr_curves", broken)
    drawn = figures.draw_all(tmp_path / "o", history=paths["history"], pr_curves_csv=paths["pr"])
    assert list(drawn) == ["learning_curves.png"]
    assert "figure pr_curves.png not drawn" in caplog.text and "a bug" in caplog.text


def test_a_missing_input_is_an_error_before_drawing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv: report table not found"):
        figures.draw_all(tmp_path / "o", pr_curves_csv=tmp_path / "nope.csv")


def test_reliability_figure_shows_both_curves_with_their_ece(tables):
    paths, _ = tables
    table = figures._read(paths["reliability"])
    fig = figures.reliability(table)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    before = table[table["probabilities"] == "before"]
    ece = (before["count"] / before["count"].sum() * (before["frequency"] - before["confidence"]).abs()).sum()
    assert labels[0] == "perfectly calibrated" and f"as trained (ECE {ece:.3f})" in labels
    assert any(label.startswith("after temperature scaling (ECE") for label in labels)


def test_the_fbeta_figure_reads_thresholds_json_format_2(tables, tmp_path, monkeypatch):
    paths, fitted = tables
    cal = calibration.Calibration(CLASSES, np.array(list(fitted.values())), np.ones(3), None, "fbeta")
    path = tmp_path / "t2.json"
    path.write_text(json.dumps(cal.to_dict()), encoding="utf-8")
    seen = {}
    draw = figures.fbeta_vs_threshold
    monkeypatch.setattr(figures, "fbeta_vs_threshold", lambda c, t, *a: seen.setdefault("t", t) and draw(c, t, *a))
    drawn = figures.draw_all(tmp_path / "o2", fbeta_csv=paths["fbeta"], thresholds_json=path)
    assert list(drawn) == ["fbeta_vs_threshold.png"]
    assert seen["t"] == fitted  # the thresholds marked, not the file's other keys


def _rendered(fig):
    """`fig` laid out by Agg (the backend `save` uses): its artists' window extents are final."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("n", [3, 12, 30])
def test_f1_legend_covers_no_bar_and_not_the_title(n):
    # Strong classes everywhere: the weakest bars (drawn at the bottom) still reach past 0.6,
    # where a legend in the lower right corner would sit on them.
    rng = np.random.default_rng(n)
    names = [f"class {i}" for i in range(n)]
    default = pd.DataFrame({"class": names, "f1": rng.uniform(0.6, 0.95, n), "support": rng.integers(5, 90, n)})
    calibrated = pd.DataFrame({"class": names, "f1": rng.uniform(0.65, 0.98, n)})
    fig = figures.f1_per_class(default, calibrated, 0.5)
    renderer = _rendered(fig)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert len(ax.patches) == 2 * n
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)
    assert not legend.overlaps(ax.get_window_extent(renderer))                 # outside the plotting area
    assert not legend.overlaps(ax.title.get_window_extent(renderer))
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)
    assert len({round(t.get_window_extent(renderer).y0) for t in ax.get_legend().get_texts()}) == 1  # one row


@pytest.mark.parametrize("n", [3, 12, 30])
def test_pr_curves_name_the_random_ranker_line_once_under_the_title(n):
    rng = np.random.default_rng(n)
    names = [f"class {i}" for i in range(n)]
    y = (rng.random((60, n)) < 0.3).astype(int)
    y[0] = 1
    p = np.clip(0.3 * y + 0.7 * rng.random((60, n)), 0, 1)
    fig = figures.pr_curves(metrics.pr_curve_table(y, p, names), metrics.per_class_table(y, p, names, 0.5))
    assert len(fig.legends) == 1
    key = fig.legends[0]
    assert [t.get_text() for t in key.get_texts()] == [figures.RANDOM_RANKER]
    assert "random ranker" in figures.RANDOM_RANKER and "prevalence" in figures.RANDOM_RANKER
    # the key's sample is the panels' line
    (handle,) = key.legend_handles
    panel_line = next(line for line in fig.axes[0].get_lines() if line.get_label() == figures.RANDOM_RANKER)
    assert (handle.get_linestyle(), handle.get_color()) == (panel_line.get_linestyle(), panel_line.get_color())
    renderer = _rendered(fig)
    box = key.get_window_extent(renderer)
    title = next(t for t in fig.texts if t.get_text().startswith("Precision-recall"))
    assert not box.overlaps(title.get_window_extent(renderer))
    for ax in fig.axes:
        if ax.get_visible():
            assert not box.overlaps(ax.get_tightbbox(renderer))                # panel, its title and labels


def test_pr_curves_without_the_per_class_table_have_no_key(tables):
    paths, _ = tables
    assert figures.pr_curves(figures._read(paths["pr"])).legends == []

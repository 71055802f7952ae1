"""stages/calibrate.py's summary line names the strategy with what shaped it (beta, the target)."""

from __future__ import annotations

import pytest

from conftest import _load_stage
from mlic import thresholds
from mlic.params import Calibrate

calibrate = _load_stage("calibrate")
FALLBACK = thresholds.RULE_FEW_POSITIVES


@pytest.mark.parametrize(("strategy", "beta", "rules", "expected"), [
    ("fbeta", 2.0, ["fbeta", "fbeta"], "fbeta, beta=2"),
    ("fbeta", 1.0, ["fbeta", FALLBACK], "fbeta, beta=1"),
    ("global", 0.5, ["global", "global"], "global, beta=0.5"),
    ("precision", 2.0, ["precision", "precision"], "precision, target 0.9"),      # beta played no part
    ("precision", 2.0, ["precision", FALLBACK, thresholds.RULE_UNREACHABLE],
     "precision, target 0.9; 2 class(es) at the global threshold, beta=2"),
    ("precision", 2.0, [thresholds.RULE_DEFAULT], "precision, target 0.9"),   # no positive: no global fit
])
def test_summary_names_beta_only_where_it_shaped_the_thresholds(strategy, beta, rules, expected):
    cfg = Calibrate(strategy=strategy, beta=beta, precision_target=0.9)
    assert calibrate.fitted_by(cfg, rules) == expected

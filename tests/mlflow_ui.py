"""Browser-test kit for the MLflow 3.17 web UI (a helper module imported by tests, not a test file).

A throwaway `mlflow server`, a headless Debian Chromium driven by Playwright, and page helpers
that report what a user would see: where a click on an experiment lands, and what the run
comparison shows.

Where a click on an experiment lands is decided in the browser, not by the store: MLflow 3.17's
UI maps its *workflow type* (the "GenAI | Model training" switch in the sidebar, kept in
localStorage as ``mlflow.workflowType_v1``, overridden by a ``workflowType=`` URL parameter) to
the experiment kind and ignores the ``mlflow.experimentKind`` experiment tag. A fresh browser
is "genai" and lands on the GenAI overview; `ui_page(workflow=MACHINE_LEARNING)` is a user
who flipped the switch to "Model training" once, and lands on the runs table.

CI needs (as root): ``apt-get install -y chromium`` and ``pip install playwright``; no
``playwright install``. Without them the `browser()` fixture helper skips.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tracking_server

if TYPE_CHECKING:  # playwright is optional: only the type checker needs it at import time
    from playwright.sync_api import Browser, Locator, Page

CHROMIUM = Path("/usr/bin/chromium")
# Headless in a container, no network beyond the server under test, nothing persisted.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
WORKFLOW_KEY = "mlflow.workflowType_v1"   # useLocalStorage({key: "mlflow.workflowType", version: 1})
GENAI = "genai"                           # the UI's default: experiments open on the GenAI overview
MACHINE_LEARNING = "machine_learning"     # the sidebar's "Model training": experiments open on runs
EXPERIMENT_TAB = re.compile(r"#/experiments/(\d+)/([a-z-]+)")


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str, artifacts_dir: Path | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """Run `mlflow server` on a free loopback port (`tracking_server.mlflow_server`); yield its
    base URL, stop its process group on exit.

    Create a fresh SQLite store (e.g. with MlflowClient) before starting: two processes
    creating the same store at once race MLflow's table creation.
    """
    with tempfile.TemporaryDirectory(prefix="mlic-ui-") as tmp:
        try:
            server = tracking_server.mlflow_server(backend_store_uri, Path(tmp) / "mlflow.log",
                                                   default_artifact_root=artifacts_dir, timeout_s=timeout)
            with server as service:
                yield service.url
        except tracking_server.ServiceFailed as exc:
            pytest.fail(str(exc), pytrace=False)


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    """A headless Chromium (Debian's /usr/bin/chromium) under Playwright; skips if either is missing,
    or fails where MLIC_REQUIRE_BROWSER or MLIC_REQUIRE_ALL is set (.ci/run sets the latter)."""
    missing = None
    try:
        from playwright import sync_api
    except ImportError:
        missing = "browser tests need `pip install playwright` (in the `test` extra)"
    if missing is None and not CHROMIUM.exists():
        missing = f"browser tests need {CHROMIUM} (`apt-get install -y chromium`)"
    if missing is not None:
        from conftest import required

        if required("MLIC_REQUIRE_BROWSER"):
            pytest.fail(f"{missing}; MLIC_REQUIRE_BROWSER (or MLIC_REQUIRE_ALL) is set", pytrace=False)
        pytest.skip(missing)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def ui_page(
    browser: Browser, workflow: str | None = MACHINE_LEARNING, width: int = 1400, height: int = 1600
) -> Iterator[Page]:
    """A page in a fresh profile; `workflow` presets the sidebar switch (None: UI default, GenAI).

    The tall viewport is for screenshots: the UI scrolls inside its own panes, so a
    full-page screenshot shows no more than the viewport.
    """
    context = browser.new_context(viewport={"width": width, "height": height})
    # Set only when absent, so a test that flips the switch and reloads keeps its choice.
    # The assistant panel opens itself on first load and narrows every table: keep it closed.
    presets = {"mlflow.assistant.panelOpen_v1": "false",
               "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
    if workflow is not None:
        presets[WORKFLOW_KEY] = json.dumps(workflow)
    context.add_init_script(
        f"for (const [k, v] of Object.entries({json.dumps(presets)}))"
        " if (localStorage.getItem(k) === null) localStorage.setItem(k, v);")
    try:
        yield context.new_page()
    finally:
        context.close()


@dataclass(frozen=True)
class Landing:
    """Where a click on an experiment ended up."""

    url: str
    tab: str                    # "runs", "overview", "traces", ... from the final URL
    runs_table: bool            # a grid listing at least one run is visible
    run_names: tuple[str, ...]  # run names shown in that grid


def open_experiment(page: Page, base_url: str, name: str, timeout: float = 30_000) -> Landing:
    """Open the experiments list, click experiment `name` as a user would, report the landing."""
    page.goto(f"{base_url}/#/experiments")
    page.get_by_role("link", name=name, exact=True).click(timeout=timeout)
    # The link is #/experiments/<id>; the UI then redirects (replace) to a tab: wait for that.
    page.wait_for_url(EXPERIMENT_TAB, timeout=timeout)
    match = EXPERIMENT_TAB.search(page.url)
    assert match is not None
    runs = page.get_by_role("grid").locator('a[href*="/runs/"]')
    # Only the runs tab can show runs: wait there, glance elsewhere (the overview has none).
    with contextlib.suppress(Exception):
        runs.first.wait_for(timeout=timeout if match.group(2) == "runs" else 3_000)
    names = tuple(t.strip() for t in runs.all_inner_texts() if t.strip())
    return Landing(url=page.url, tab=match.group(2), runs_table=bool(names), run_names=names)


@dataclass(frozen=True)
class CompareView:
    """What the compare-runs page shows (a run without a metric shows "NaN")."""

    url: str
    text: str                              # all visible text (metrics: only rows scrolled into view)
    params: dict[str, tuple[str, ...]]     # name -> values, in the order of run_ids (measured)
    metrics: dict[str, tuple[str, ...]]    # every metric, read by scrolling its virtual grid


def compare_url(base_url: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The UI's own format (Routes.getCompareRunPageRoute): JSON lists, left for the browser to encode."""
    def js(items: Sequence[str]) -> str:
        return json.dumps(list(items), separators=(",", ":"))
    return f"{base_url}/#/compare-runs?runs={js(run_ids)}&experiments={js(experiment_ids)}"


def open_compare(
    page: Page, base_url: str, run_ids: Sequence[str], experiment_ids: Sequence[str],
    timeout: float = 30_000,
) -> CompareView:
    """Open the comparison of `run_ids` and read its parameter and metric tables."""
    page.goto(compare_url(base_url, run_ids, experiment_ids))
    page.get_by_role("row").filter(has_text=run_ids[0]).first.wait_for(timeout=timeout)
    params = _section(page, "Parameters")
    metrics = _section(page, "Metrics")
    # Rows arrive with the runs' data; a section may legitimately be empty ("No ... to display").
    with contextlib.suppress(Exception):
        params.locator("tr, [role=grid]").first.wait_for(timeout=5_000)
    with contextlib.suppress(Exception):
        metrics.get_by_role("grid").first.wait_for(timeout=5_000)
    param_rows: dict[str, tuple[str, ...]] = {}
    for row in params.locator("tr").all():
        cells = [c.strip() for c in row.locator("th, td").all_inner_texts()]
        if cells and cells[0]:
            param_rows[cells[0]] = tuple(cells[1:])
    return CompareView(url=page.url, text=page.locator("body").inner_text(),
                       params=param_rows, metrics=_read_virtual_grids(metrics))


def _section(page: Page, title: str) -> Locator:
    """The body of the collapsible section that holds the "<title> - Show diff only" switch."""
    switch = page.get_by_role("switch", name=f"{title} - Show diff only")
    # The body follows the section's header button: the nearest such ancestor, so an empty
    # section does not reach up into the next section (e.g. the run details table).
    return switch.locator(
        "xpath=ancestor::*[preceding-sibling::*[@role='button' and @aria-expanded]][1]")


# The metrics table is two react-virtualized grids (names | values) of 300 px: only rows near
# the viewport exist in the DOM (17 of 60 metrics were). Scroll them and collect rows by offset.
_READ_GRIDS = """
async (section) => {
  const grids = [...section.querySelectorAll('[role=grid]')];
  if (grids.length < 2) return [];
  const [names, values] = grids;
  const rows = new Map();
  const collect = () => {
    for (const cell of names.querySelectorAll('[role=rowgroup] > div')) {
      const top = parseFloat(cell.style.top);
      rows.set(top, rows.get(top) || {name: cell.innerText.trim(), cells: new Map()});
    }
    for (const cell of values.querySelectorAll('[role=rowgroup] > div')) {
      const row = rows.get(parseFloat(cell.style.top));
      if (row) row.cells.set(parseFloat(cell.style.left), cell.innerText.trim());
    }
  };
  const tick = () => new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)));
  for (let y = 0; ; y += values.clientHeight / 2) {
    values.scrollTop = y; names.scrollTop = y;
    await tick(); collect();
    if (y >= values.scrollHeight) break;
  }
  values.scrollTop = 0; names.scrollTop = 0;
  return [...rows.entries()].sort((a, b) => a[0] - b[0]).map(([, r]) =>
    [r.name, [...r.cells.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v)]);
}
"""


def _read_virtual_grids(section: Locator) -> dict[str, tuple[str, ...]]:
    if section.count() == 0:
        return {}
    return {name: tuple(values) for name, values in section.evaluate(_READ_GRIDS)}


def chart_sections(page: Page, base_url: str, experiment_id: str, timeout: float = 60_000) -> list[str]:
    """The section titles of the experiment's chart view (the runs page's "Chart" mode), top to
    bottom, as a fresh browser shows them: the metric prefixes, then "Model metrics" and
    "System metrics"."""
    page.goto(f"{base_url}/#/experiments/{experiment_id}/runs?workflowType={MACHINE_LEARNING}&compareRunsMode=CHART")
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    headers.first.wait_for(timeout=timeout)
    return [h.locator("div").first.locator("div").first.inner_text().strip() for h in headers.all()]


def runs_table_names(page: Page, base_url: str, experiment_id: str, timeout: float = 60_000) -> list[str]:
    """The run names the experiment's runs table shows, top to bottom (newest first)."""
    page.goto(f"{base_url}/#/experiments/{experiment_id}/runs?workflowType={MACHINE_LEARNING}")
    links = page.get_by_role("grid").locator('a[href*="/runs/"]')
    links.first.wait_for(timeout=timeout)
    return [t.strip() for t in links.all_inner_texts() if t.strip()]


def screenshot(page: Page, directory: Path, name: str) -> Path:
    """Save what the page shows now as `<directory>/<name>.png`; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

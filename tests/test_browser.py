"""The MLflow UI as a user opens it, in a real browser (headless Chromium): the study's runs table and the compare
view of two variants show the setting that tells them apart. Screenshots are kept under results/browser/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow_testing import mlflow_server
from test_tracking import track, write_study

mlflow = pytest.importorskip("mlflow")

SCREENSHOTS = Path(__file__).resolve().parents[1] / "results" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium (.ci/run) and sets this, so that there the test fails rather than skips without a browser.
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("EVPRETRAIN_REQUIRE_BROWSER"),
    reason="no chromium on PATH (Debian: apt-get install chromium)",
)


class _VisibleText(HTMLParser):
    """The text nodes of a page, in document order, without scripts and styles."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self.lines.append(data.strip())


def chromium(url: str, *args: str) -> str:
    """Load ``url`` in headless Chromium, let the page's requests settle (virtual time), return its stdout."""
    if CHROMIUM is None:
        pytest.fail("EVPRETRAIN_REQUIRE_BROWSER is set but there is no chromium on PATH")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += ["--window-size=1600,1000", "--virtual-time-budget=30000", *args, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def page_text(url: str) -> list[str]:
    parser = _VisibleText()
    parser.feed(chromium(url, "--dump-dom"))
    return parser.lines


def screenshot(url: str, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    chromium(url, f"--screenshot={path}")
    assert path.stat().st_size > 10_000, f"{path} is nearly empty: the page did not render"
    return path


def follows(lines: list[str], expected: list[str]) -> bool:
    """Whether ``expected`` occurs in ``lines`` as consecutive entries."""
    return any(lines[i : i + len(expected)] == expected for i in range(len(lines)))


@pytest.mark.slow
@needs_browser
def test_the_mlflow_ui_shows_what_tells_two_variants_apart(tmp_path):
    write_study(tmp_path / "results")
    with mlflow_server(tmp_path) as uri:
        track(tmp_path, uri)
        address = uri + json.loads((tmp_path / "logged.json").read_text())["ui"]  # what `make ui` prints
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("demo").experiment_id
        parents = {
            run.info.run_name: run.info.run_id
            for run in client.search_runs([experiment], filter_string="tags.stage = 'variant'")
        }
        assert set(parents) == {"full", "no_focus"}

        runs = page_text(address)
        screenshot(address, "mlflow-runs.png")
        # The runs table: both parents by name, the differing setting and the headline metric as columns.
        assert {"full", "no_focus", "Model training"} <= set(runs), runs
        assert any("pretrain.stage3.method.focus" in line for line in runs), runs
        assert any("top1_last" in line for line in runs), runs

        ids = json.dumps([parents["full"], parents["no_focus"]], separators=(",", ":"))
        # workflowType: the sidebar's "Model training" side, as the address `make ui` prints
        query = urllib.parse.urlencode(
            {"runs": ids, "experiments": json.dumps([experiment]), "workflowType": "machine_learning"}, safe='[]",:'
        )
        compare = f"{uri}/#/compare-runs?{query}"
        lines = page_text(compare)
        screenshot(compare, "mlflow-compare.png")
        # The compare view's parameter table: the key, then each run's value in the order the runs were given.
        assert follows(lines, ["Run Name:", "full", "no_focus"]), lines
        assert follows(lines, ["pretrain.stage3.method.focus", "entropy", "none"]), lines
